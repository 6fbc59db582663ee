// KVM_PRE_FAULT_MEMORY (virt/kvm/kvm_main.c kvm_vcpu_pre_fault_memory, x86 mmu.c
// kvm_arch_vcpu_pre_fault_memory and its prefetch fault): the VMM maps a guest-physical range in
// the TDP MMU before the guest touches it, through one vCPU's MMU.

import GuestMemory
import KVMMMU
import X86Paging

/// A KVM_PRE_FAULT_MEMORY range (`struct kvm_pre_fault_memory`): on return, what is left of it.
public struct PreFaultRange: Equatable, Sendable {
    public var gpa: GuestPhysicalAddress
    public var size: UInt64
    /// Must be 0.
    public var flags: UInt64

    public init(gpa: GuestPhysicalAddress, size: UInt64, flags: UInt64 = 0) {
        self.gpa = gpa
        self.size = size
        self.flags = flags
    }
}

/// Why KVM_PRE_FAULT_MEMORY mapped nothing (its errno).
public enum PreFaultError: Error, Equatable, Sendable, CustomStringConvertible {
    /// -EINVAL: flags set, a range not page-aligned, empty or wrapping around.
    case invalidRange(String)
    /// -EOPNOTSUPP: the vCPU's MMU is not the TDP MMU (shadow paging, or L2 running over guest_mmu).
    case notSupported(String)
    /// -ENOENT: no memslot holds the range's first page.
    case noMemslot(GuestPhysicalAddress)
    /// -EBUSY in the model: the vCPU runs on a thread of its own (KVM would wait for its
    /// vcpu->mutex); the call belongs on that thread or between runs.
    case vcpuBusy(Int)
    /// The model's own failure (host memory, a fault that never settles).
    case model(String)

    /// The errno the ioctl returns.
    public var errnoName: String {
        switch self {
        case .invalidRange: "EINVAL"
        case .notSupported: "EOPNOTSUPP"
        case .noMemslot: "ENOENT"
        case .vcpuBusy: "EBUSY"
        case .model: "EIO"
        }
    }

    public var description: String {
        switch self {
        case .invalidRange(let why): "KVM_PRE_FAULT_MEMORY: invalid range: \(why)"
        case .notSupported(let why): "KVM_PRE_FAULT_MEMORY: not supported: \(why)"
        case .noMemslot(let gpa): "KVM_PRE_FAULT_MEMORY: no memslot at \(gpa)"
        case .vcpuBusy(let id): "KVM_PRE_FAULT_MEMORY: vCPU \(id) is running on its own thread"
        case .model(let why): "KVM_PRE_FAULT_MEMORY: \(why)"
        }
    }
}

extension VCPU {
    /// Faults in `range` as KVM_PRE_FAULT_MEMORY does: page by page from its start, each mapped as
    /// large as the memslot allows (progress is to the end of the page mapped, at most the range's
    /// end), leaves made without A, present SPTEs left alone. Stops at the first page it cannot
    /// map: if nothing was mapped that page's error is thrown, otherwise `range` is left holding
    /// the rest (as the ioctl returns 0 with the range updated). The whole call holds the
    /// memslots' srcu, so a memslot change waits for it rather than the reverse: the deadlock of
    /// a prefault retrying on a memslot being deleted (6.18) has no counterpart here.
    public func preFaultMemory(_ range: inout PreFaultRange) throws(PreFaultError) {
        guard range.flags == 0 else { throw .invalidRange("flags \(hex(range.flags)) (must be 0)") }
        guard range.gpa.rawValue & pageOffsetMask == 0, range.size & pageOffsetMask == 0 else {
            throw .invalidRange("\(range.gpa) + \(hex(range.size)) is not page-aligned")
        }
        let (end, wraps) = range.gpa.rawValue.addingReportingOverflow(range.size)
        guard range.size > 0, !wraps else { throw .invalidRange("\(range.gpa) + \(hex(range.size)) is empty or wraps") }
        guard let tdpState else { throw .notSupported("shadow paging maps guest virtual addresses, not a guest-physical range") }
        guard !isInL2 else { throw .notSupported("L2 runs: the vCPU's MMU is guest_mmu") }
        if runsOnOwnThread && VirtualMachine.running.vcpu !== self { throw .vcpuBusy(id) }
        let srcu = vm.memslotsSRCU
        srcu.lockShared()
        defer { srcu.unlockShared() }
        let fullSize = range.size
        while range.size > 0 {
            let mapped: UInt64
            do {
                mapped = try preFaultPage(range.gpa, tdpState)
            } catch {
                if range.size == fullSize { throw error }
                return
            }
            // The page mapped may start below the range or end past it.
            let pageEnd = (range.gpa.rawValue & ~(mapped - 1)) + mapped
            let progress = min(range.size, pageEnd - range.gpa.rawValue)
            range.gpa = GuestPhysicalAddress(range.gpa.rawValue + progress)
            range.size -= progress
        }
        precondition(range.gpa.rawValue == end, "the prefault went past its range")
    }

    /// One page (`kvm_arch_vcpu_pre_fault_memory`): the root loaded, then the prefetch fault until
    /// it settles; the size of the page it mapped.
    private func preFaultPage(_ gpa: GuestPhysicalAddress, _ state: TDPVCPUState) throws(PreFaultError) -> UInt64 {
        for _ in 0...Self.maxExitsPerAccess {
            // kvm_mmu_reload. KVM would retry on an obsolete root until a signal; the model frees
            // it and loads a new one, as the next KVM_RUN would, rather than spin.
            do {
                _ = try tdpLoadRoot(state)
            } catch {
                throw .model("\(error)")
            }
            // Lent, as the exit path lends it: a retain of the root every vCPU shares would be a
            // write to its cache line, which the vCPUs prefaulting side by side pass back and forth.
            guard let root = state.lentRoot else { continue }
            let result: TDPPreFaultResult
            switch root._withUnsafeGuaranteedRef({ root in
                Result { () throws(TDPMMUError) in try state.tdp.preFault(at: gpa, root: root, vcpuID: id) }
            }) {
            case .success(let settled): result = settled
            case .failure(.addressBeyondRoot): throw .noMemslot(gpa)
            case .failure(let error): throw .model("\(error)")
            }
            if let bytes = result.mappedBytes { return bytes }
            if result == .noMemslot { throw .noMemslot(gpa) }
        }
        throw .model("the fault at \(gpa) never settled")
    }
}
