import Foundation
import GuestMemory
import KVMMMU
import Synchronization
import X86Paging

// vCPUs on threads of their own, and how other threads reach them: KVM's vcpu->requests and
// vcpu->mode, and the kick.
//
// A vCPU is in guest mode from the entry that resumes the guest until the next exit; in between
// it uses its TLB and walks KVM's tables as the hardware does, taking no lock (the hardware walk
// holds `MMULock` for read only if it can have it at once, standing for the RCU read side, and
// otherwise exits). Another thread that changed SPTEs makes a request of every vCPU and, with a
// TLB flush, waits for each vCPU that was in guest mode to leave it (KVM's kick with
// KVM_REQUEST_WAIT: the IPI's acknowledgement), so that when `kvm_flush_remote_tlbs` returns no
// vCPU can still use a translation the change took away. A vCPU checks its requests after it sets
// its mode on entry, and the requester reads the mode after it sets the request, both sequentially
// consistent: one of the two always sees the other (`kvm_vcpu_exiting_guest_mode`).
//
// A vCPU not running on its own thread (scenarios, the benchmarks) never enters guest mode in this
// sense: it services requests at each entry, and a requester never waits for it.

/// A request another thread makes of a vCPU (KVM's `KVM_REQ_*` bits in `vcpu->requests`).
struct VCPURequest: OptionSet, Sendable {
    let rawValue: UInt32
    /// KVM_REQ_TLB_FLUSH.
    static let flushAll = VCPURequest(rawValue: 1 << 0)
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS.
    static let freeObsoleteRoots = VCPURequest(rawValue: 1 << 1)
}

/// What other threads read and write of a vCPU.
final class VCPUSignals: Sendable {
    /// `vcpu->requests`.
    let requests = Atomic<UInt32>(0)
    /// `vcpu->mode`: bit 0 set in guest mode; the entries made so far above it, so that a waiter
    /// can tell the vCPU left guest mode since it looked even if it entered again.
    let mode = Atomic<UInt64>(0)

    static let inGuestMode: UInt64 = 1
}

extension VCPU {
    /// `kvm_make_request` and, with `wait`, the kick: returns once the vCPU is outside guest mode
    /// or has left it since (it then services the request before it runs the guest again).
    func makeRequest(_ request: VCPURequest, wait: Bool) {
        signals.requests.bitwiseOr(request.rawValue, ordering: .sequentiallyConsistent)
        guard wait else { return }
        let mode = signals.mode.load(ordering: .sequentiallyConsistent)
        guard mode & VCPUSignals.inGuestMode != 0 else { return }
        while signals.mode.load(ordering: .acquiring) == mode { sched_yield() }
    }

    /// Requests from other threads are pending.
    @inline(__always)
    var hasRemoteRequests: Bool { signals.requests.load(ordering: .relaxed) != 0 }

    /// `kvm_check_request`: whether `request` was pending, clearing it. Requests are checked one
    /// at a time in KVM's order, so one made while an earlier one is serviced (a flush made by
    /// freeing obsolete roots) is seen in the same entry.
    func checkRequest(_ request: VCPURequest) -> Bool {
        signals.requests.bitwiseAnd(~request.rawValue, ordering: .acquiringAndReleasing).oldValue & request.rawValue != 0
    }

    /// The vCPU runs on its own thread: requesters wait for it to leave guest mode.
    var runsOnOwnThread: Bool { hot.pointee.runsOnOwnThread }

    /// The vCPU may use its TLB: it runs on the caller's thread, or it is in guest mode.
    @inline(__always)
    var mayRunGuest: Bool { !hot.pointee.runsOnOwnThread || hot.pointee.inGuestMode }

    /// In guest mode with nothing pending: the guest runs on without an entry.
    var staysInGuestMode: Bool { hot.pointee.inGuestMode && !hasRemoteRequests && hot.pointee.requests.isEmpty }

    /// The last step of VM entry, after the requests were serviced and the root loaded: guest mode,
    /// unless a request arrived meanwhile, which cancels the entry (false; service and retry).
    @inline(__always)
    func tryEnterGuestMode() -> Bool {
        guard hot.pointee.runsOnOwnThread else { return true }
        hot.pointee.guestEntries += 1
        hot.pointee.inGuestMode = true
        signals.mode.store(hot.pointee.guestEntries << 1 | VCPUSignals.inGuestMode, ordering: .sequentiallyConsistent)
        if signals.requests.load(ordering: .sequentiallyConsistent) == 0 && hot.pointee.requests.isEmpty { return true }
        leaveGuestMode()
        return false
    }

    /// VM exit (or the vCPU's thread stopping): requesters stop waiting for it.
    @inline(__always)
    func leaveGuestMode() {
        guard hot.pointee.inGuestMode else { return }
        hot.pointee.inGuestMode = false
        signals.mode.store(hot.pointee.guestEntries << 1, ordering: .releasing)
    }

    /// Waits outside guest mode until a writer of `lock` is done (a vCPU whose hardware walk could
    /// not have the lock for read at once).
    func waitOutsideGuestMode(for lock: MMULock) {
        leaveGuestMode()
        lock.lockShared()
        lock.unlockShared()
    }
}

extension VirtualMachine {
    /// Runs every vCPU on a thread of its own, each running `guest` (its guest code: accesses,
    /// register writes, INVLPG...) until it returns, while the calling thread stays free for
    /// the VMM's work; returns when every vCPU's thread has finished, with the first error one
    /// threw. vCPUs are added before: the set of vCPUs does not change while they run.
    public func runVCPUsOnThreads(_ guest: @escaping @Sendable (VCPU) throws -> Void) throws {
        let finished = DispatchGroup()
        let errors = Mutex<[Error]>([])
        for vcpu in vcpus {
            vcpu.hot.pointee.runsOnOwnThread = true
            finished.enter()
            let thread = Thread {
                defer {
                    vcpu.leaveGuestMode()
                    if let tdpState = vcpu.tdpState { vcpu.tdpDrainPML(tdpState) }
                    vcpu.hot.pointee.runsOnOwnThread = false
                    finished.leave()
                }
                VirtualMachine.running.set(vcpu)
                defer { VirtualMachine.running.set(nil) }
                do { try guest(vcpu) } catch { errors.withLock { $0.append(error) } }
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
        finished.wait()
        if let error = errors.withLock({ $0.first }) { throw error }
    }
}

/// A per-thread value: KVM's per-CPU `kvm_running_vcpu`, the vCPU whose exit (or guest code)
/// this thread is running. Unretained: set only while the vCPU runs.
final class RunningVCPU: @unchecked Sendable {
    private let key: pthread_key_t

    init() {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        self.key = key
    }

    var vcpu: VCPU? {
        guard let raw = pthread_getspecific(key) else { return nil }
        return Unmanaged<VCPU>.fromOpaque(raw).takeUnretainedValue()
    }

    func set(_ vcpu: VCPU?) {
        pthread_setspecific(key, vcpu.map { UnsafeRawPointer(Unmanaged.passUnretained($0).toOpaque()) })
    }

    /// The running vCPU as the thread keeps it, for a caller that only compares it and puts it
    /// back: `vcpu` hands out a reference, which costs a retain and a release.
    var opaqueVCPU: UnsafeMutableRawPointer? { pthread_getspecific(key) }

    func setOpaque(_ vcpu: UnsafeMutableRawPointer?) { pthread_setspecific(key, vcpu) }
}
