// KVM's `kvmmmu` tracepoints (mmu/mmutrace.h) as values, plus `kvm_page_fault` from the `kvm` trace
// system, and a log that records them. Event names are the tracepoint names, so a model trace and a
// `perf trace -e 'kvmmmu:*'` of a real guest can be lined up.

import Synchronization
import X86Paging

/// One tracepoint hit. Case names are the tracepoint names in camelCase; `name` gives the exact
/// tracepoint name.
///
/// Where a tracepoint records a host pointer (`sptep`), the model has none and the field is left out.
/// The shadow-page tracepoints carry the page's gfn and role; KVM also prints the page's
/// `mmu_valid_gen`, `root_count` and `unsync`, which these events do not carry.
public enum MMUEvent: Sendable, Equatable {
    /// `kvm_mmu_pagetable_walk`: a guest page-table walk starts.
    case kvmMMUPagetableWalk(address: UInt64, pferr: PageFaultErrorCode)
    /// `kvm_mmu_paging_element`: the walk read a guest entry.
    case kvmMMUPagingElement(pte: UInt64, level: Int)
    /// `kvm_mmu_set_accessed_bit`: the walk set A in the guest entry at `gpa`.
    case kvmMMUSetAccessedBit(gpa: GuestPhysicalAddress)
    /// `kvm_mmu_set_dirty_bit`: the walk set D in the guest entry at `gpa`.
    case kvmMMUSetDirtyBit(gpa: GuestPhysicalAddress)
    /// `kvm_mmu_walker_error`: the walk failed with this error code.
    case kvmMMUWalkerError(pferr: PageFaultErrorCode)
    /// `kvm_mmu_get_page`: a shadow page was found (`created` false) or allocated.
    case kvmMMUGetPage(gfn: GuestFrameNumber, role: PageRole, created: Bool)
    /// `kvm_mmu_sync_page`: an unsync page was synced (unlinked from the unsync set).
    case kvmMMUSyncPage(gfn: GuestFrameNumber, role: PageRole)
    /// `kvm_mmu_unsync_page`: a level-1 shadow page went unsync.
    case kvmMMUUnsyncPage(gfn: GuestFrameNumber, role: PageRole)
    /// `kvm_mmu_prepare_zap_page`: a shadow page is being zapped.
    case kvmMMUPrepareZapPage(gfn: GuestFrameNumber, role: PageRole)
    /// `mark_mmio_spte`: an MMIO SPTE was installed.
    case markMMIOSPTE(gfn: GuestFrameNumber, access: UInt8, generation: UInt64)
    /// `handle_mmio_page_fault`: an MMIO SPTE (or the vCPU's MMIO cache) resolved a fault.
    case handleMMIOPageFault(address: UInt64, gfn: GuestFrameNumber, access: UInt8)
    /// `fast_page_fault`: the lock-free path finished; `spurious`/`fixed` are KVM's
    /// `ret == RET_PF_SPURIOUS` / `ret == RET_PF_FIXED`.
    case fastPageFault(vcpuID: Int, address: UInt64, errorCode: PageFaultErrorCode, oldSPTE: SPTE, newSPTE: SPTE,
                       spurious: Bool, fixed: Bool)
    /// `kvm_mmu_zap_all_fast`: every shadow page made obsolete by flipping the valid generation.
    case kvmMMUZapAllFast(mmuValidGen: UInt8, usedPages: Int)
    /// `check_mmio_spte`: an MMIO SPTE's generation was compared with the memslots'.
    case checkMMIOSPTE(spte: SPTE, kvmGeneration: UInt64, spteGeneration: UInt64)
    /// `kvm_mmu_set_spte`: a leaf SPTE was installed for `gfn` at `level`.
    case kvmMMUSetSPTE(level: Int, gfn: GuestFrameNumber, spte: SPTE)
    /// `kvm_mmu_spte_requested`: the mapping the fault path will install. KVM prints `pfn` with the
    /// gfn's low bits below the goal level ORed in; pass it that way.
    case kvmMMUSPTERequested(gfn: GuestFrameNumber, pfn: HostFrameNumber, level: Int)
    /// `kvm_tdp_mmu_spte_changed`: the TDP MMU changed an SPTE.
    case kvmTDPMMUSPTEChanged(addressSpaceID: Int, gfn: GuestFrameNumber, level: Int, old: SPTE, new: SPTE)
    /// `kvm_mmu_split_huge_page`: eager splitting of a huge SPTE (errno 0 on success).
    case kvmMMUSplitHugePage(gfn: GuestFrameNumber, spte: SPTE, level: Int, errno: Int)
    /// `kvm_page_fault` (trace system `kvm`): a page fault exit reached KVM.
    case kvmPageFault(vcpuID: Int, address: UInt64, errorCode: PageFaultErrorCode)
    /// `kvm_spp_set_subpages` (the SPP series; never merged): `gfn`'s sub-page write bitmap was
    /// stored by KVM_SUBPAGES_SET_ACCESS (`vcpuID` nil) or written into the SPP table while a
    /// vCPU's SPPT miss rebuilt it.
    case kvmSPPSetSubpages(vcpuID: Int?, gfn: GuestFrameNumber, access: SubPageWriteMask)
    /// `kvm_spp_induced_exit` (SPP series): an SPPT-miss or SPPT-misconfiguration VM exit
    /// (EXIT_REASON_SPP) with its exit qualification.
    case kvmSPPInducedExit(vcpuID: Int, gpa: GuestPhysicalAddress, qualification: SPPExitQualification)
    /// `kvm_spp_induced_page_fault` (SPP series): a write refused by sub-page permissions went to
    /// the VMM (KVM_EXIT_SPP) with the writing instruction's length.
    case kvmSPPInducedPageFault(vcpuID: Int, gpa: GuestPhysicalAddress, instructionLength: Int)

    /// The tracepoint names, in mmutrace.h order, then `kvm_page_fault`, then the SPP series' three.
    public static let allNames: [String] = [
        "kvm_mmu_pagetable_walk", "kvm_mmu_paging_element", "kvm_mmu_set_accessed_bit",
        "kvm_mmu_set_dirty_bit", "kvm_mmu_walker_error", "kvm_mmu_get_page", "kvm_mmu_sync_page",
        "kvm_mmu_unsync_page", "kvm_mmu_prepare_zap_page", "mark_mmio_spte", "handle_mmio_page_fault",
        "fast_page_fault", "kvm_mmu_zap_all_fast", "check_mmio_spte", "kvm_mmu_set_spte",
        "kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed", "kvm_mmu_split_huge_page", "kvm_page_fault",
        "kvm_spp_set_subpages", "kvm_spp_induced_exit", "kvm_spp_induced_page_fault",
    ]

    /// The exact tracepoint name.
    public var name: String {
        switch self {
        case .kvmMMUPagetableWalk: "kvm_mmu_pagetable_walk"
        case .kvmMMUPagingElement: "kvm_mmu_paging_element"
        case .kvmMMUSetAccessedBit: "kvm_mmu_set_accessed_bit"
        case .kvmMMUSetDirtyBit: "kvm_mmu_set_dirty_bit"
        case .kvmMMUWalkerError: "kvm_mmu_walker_error"
        case .kvmMMUGetPage: "kvm_mmu_get_page"
        case .kvmMMUSyncPage: "kvm_mmu_sync_page"
        case .kvmMMUUnsyncPage: "kvm_mmu_unsync_page"
        case .kvmMMUPrepareZapPage: "kvm_mmu_prepare_zap_page"
        case .markMMIOSPTE: "mark_mmio_spte"
        case .handleMMIOPageFault: "handle_mmio_page_fault"
        case .fastPageFault: "fast_page_fault"
        case .kvmMMUZapAllFast: "kvm_mmu_zap_all_fast"
        case .checkMMIOSPTE: "check_mmio_spte"
        case .kvmMMUSetSPTE: "kvm_mmu_set_spte"
        case .kvmMMUSPTERequested: "kvm_mmu_spte_requested"
        case .kvmTDPMMUSPTEChanged: "kvm_tdp_mmu_spte_changed"
        case .kvmMMUSplitHugePage: "kvm_mmu_split_huge_page"
        case .kvmPageFault: "kvm_page_fault"
        case .kvmSPPSetSubpages: "kvm_spp_set_subpages"
        case .kvmSPPInducedExit: "kvm_spp_induced_exit"
        case .kvmSPPInducedPageFault: "kvm_spp_induced_page_fault"
        }
    }
}

extension MMUEvent: CustomStringConvertible {
    /// The event the way the kernel's TP_printk prints it, give or take the fields the model lacks
    /// (host pointers; a shadow page's generation, root count and sync state).
    public var description: String {
        switch self {
        case let .kvmMMUPagetableWalk(address, pferr):
            return "addr \(hexDigits(address)) pferr \(hexDigits(pferr.rawValue)) \(Self.pferrFlags(pferr))"
        case let .kvmMMUPagingElement(pte, level):
            return "pte \(hexDigits(pte)) level \(level)"
        case let .kvmMMUSetAccessedBit(gpa), let .kvmMMUSetDirtyBit(gpa):
            return "gpa \(hexDigits(gpa.rawValue))"
        case let .kvmMMUWalkerError(pferr):
            return "pferr \(hexDigits(pferr.rawValue)) \(Self.pferrFlags(pferr))"
        case let .kvmMMUGetPage(gfn, role, created):
            return Self.shadowPage(gfn, role) + (created ? " new" : " existing")
        case let .kvmMMUSyncPage(gfn, role), let .kvmMMUUnsyncPage(gfn, role), let .kvmMMUPrepareZapPage(gfn, role):
            return Self.shadowPage(gfn, role)
        case let .markMMIOSPTE(gfn, access, generation):
            return "gfn \(hexDigits(gfn.rawValue)) access \(hexDigits(access)) gen \(hexDigits(generation))"
        case let .handleMMIOPageFault(address, gfn, access):
            return "addr:\(hexDigits(address)) gfn \(hexDigits(gfn.rawValue)) access \(hexDigits(access))"
        case let .fastPageFault(vcpuID, address, errorCode, oldSPTE, newSPTE, spurious, fixed):
            return "vcpu \(vcpuID) gva \(hexDigits(address)) error_code \(Self.pferrFlags(errorCode))"
                + " old \(hex(oldSPTE.rawValue)) new \(hexDigits(newSPTE.rawValue))"
                + " spurious \(spurious ? 1 : 0) fixed \(fixed ? 1 : 0)"
        case let .kvmMMUZapAllFast(mmuValidGen, usedPages):
            return "kvm-mmu-valid-gen \(mmuValidGen) used_pages \(hexDigits(usedPages))"
        case let .checkMMIOSPTE(spte, kvmGeneration, spteGeneration):
            return "spte \(hexDigits(spte.rawValue)) kvm_gen \(hexDigits(kvmGeneration))"
                + " spte-gen \(hexDigits(spteGeneration)) valid \(kvmGeneration == spteGeneration ? 1 : 0)"
        case let .kvmMMUSetSPTE(level, gfn, spte):
            return "gfn \(hexDigits(gfn.rawValue)) spte \(hexDigits(spte.rawValue)) level \(level)"
        case let .kvmMMUSPTERequested(gfn, pfn, level):
            return "gfn \(hexDigits(gfn.rawValue)) pfn \(hexDigits(pfn.rawValue)) level \(level)"
        case let .kvmTDPMMUSPTEChanged(asID, gfn, level, old, new):
            return "as id \(asID) gfn \(hexDigits(gfn.rawValue)) level \(level)"
                + " old_spte \(hexDigits(old.rawValue)) new_spte \(hexDigits(new.rawValue))"
        case let .kvmMMUSplitHugePage(gfn, spte, level, errno):
            return "gfn \(hexDigits(gfn.rawValue)) spte \(hexDigits(spte.rawValue)) level \(level) errno \(errno)"
        case let .kvmPageFault(vcpuID, address, errorCode):
            return "vcpu \(vcpuID) address \(hex(address)) error_code \(hex(errorCode.rawValue))"
        case let .kvmSPPSetSubpages(vcpuID, gfn, access):
            let origin = vcpuID.map { "vcpu \($0) " } ?? ""
            return origin + "gfn \(hexDigits(gfn.rawValue)) access \(hexDigits(access.rawValue))"
        case let .kvmSPPInducedExit(vcpuID, gpa, qualification):
            return "vcpu \(vcpuID) gpa \(hexDigits(gpa.rawValue)) qualification \(hexDigits(qualification.rawValue))"
        case let .kvmSPPInducedPageFault(vcpuID, gpa, instructionLength):
            return "vcpu \(vcpuID) gpa \(hexDigits(gpa.rawValue)) insn_len \(instructionLength)"
        }
    }

    /// `kvm_mmu_set_spte` with the `(rwxu)` decoding KVM prints, which depends on the SPTE format.
    public func description(masks: SPTEMasks) -> String {
        guard case let .kvmMMUSetSPTE(level, gfn, spte) = self else { return description }
        let readable = masks.present != 0 || spte.rawValue & 1 != 0
        let user = masks.user == 0 ? "" : (spte.rawValue & masks.user != 0 ? "u" : "-")
        let bits = (readable ? "r" : "-") + (spte.isWritable ? "w" : "-") + (spte.isExecutable(masks) ? "x" : "-") + user
        return "gfn \(hexDigits(gfn.rawValue)) spte \(hexDigits(spte.rawValue)) (\(bits)) level \(level)"
    }

    /// `KVM_MMU_PAGE_PRINTK` without the fields the event does not carry.
    static func shadowPage(_ gfn: GuestFrameNumber, _ role: PageRole) -> String {
        var text = "sp gfn \(hexDigits(gfn.rawValue)) l\(role.level) \(role.guestEntryBytes)-byte q\(role.quadrant)"
        if role.isDirect { text += " direct" }
        text += " " + ACC.traceString(role.access)
        if role.isInvalid { text += " invalid" }
        text += " " + (role.eferNX ? "" : "!") + "nxe " + (role.adDisabled ? "!" : "") + "ad"
        return text
    }

    /// `kvm_mmu_trace_pferr_flags`: P, W, U, RSVD, F joined by `|`.
    static func pferrFlags(_ pferr: PageFaultErrorCode) -> String {
        var names: [String] = []
        if pferr.contains(.present) { names.append("P") }
        if pferr.contains(.write) { names.append("W") }
        if pferr.contains(.user) { names.append("U") }
        if pferr.contains(.reservedBit) { names.append("RSVD") }
        if pferr.contains(.fetch) { names.append("F") }
        return names.joined(separator: "|")
    }
}

/// Lowercase hex without a prefix, as the kernel's `%llx` prints.
private func hexDigits<T: BinaryInteger>(_ value: T) -> String { String(value, radix: 16) }

/// One recorded event with its position in the log's history.
public struct MMUEventRecord: Sendable, Equatable {
    /// Counts every event recorded since the log was created, from 0; never reused, even across
    /// `clear()`.
    public var sequence: UInt64
    public var event: MMUEvent
}

/// A bounded, thread-safe log of MMU events.
///
/// Off by default: `record` then costs one relaxed atomic load and a branch, and the event is not
/// even built (it is an autoclosure). When on, events go into a ring buffer of `capacity` records;
/// the oldest are overwritten. Per-name counts include overwritten events.
public final class MMUEventLog: Sendable {
    private let recording: Atomic<Bool>
    private let state: Mutex<State>

    /// The ring's size.
    public let capacity: Int

    struct State {
        var ring: [MMUEventRecord] = []
        /// Where the next record goes once the ring is full.
        var head = 0
        var nextSequence: UInt64 = 0
        var counts: [String: Int] = [:]
        var overwritten = 0
    }

    /// - Parameters:
    ///   - capacity: records kept; at least 1.
    ///   - recording: whether to start recording at once.
    public init(capacity: Int = 4096, recording: Bool = false) {
        precondition(capacity >= 1, "an event log keeps at least one event")
        self.capacity = capacity
        self.recording = Atomic(recording)
        self.state = Mutex(State())
    }

    /// Whether `record` keeps events.
    public var isRecording: Bool {
        get { recording.load(ordering: .relaxed) }
        set { recording.store(newValue, ordering: .relaxed) }
    }

    /// Records `event` if recording is on.
    @inline(__always)
    public func record(_ event: @autoclosure () -> MMUEvent) {
        guard recording.load(ordering: .relaxed) else { return }
        append(event())
    }

    private func append(_ event: MMUEvent) {
        state.withLock { state in
            let record = MMUEventRecord(sequence: state.nextSequence, event: event)
            state.nextSequence += 1
            state.counts[event.name, default: 0] += 1
            if state.ring.count < capacity {
                state.ring.append(record)
            } else {
                state.ring[state.head] = record
                state.head = (state.head + 1) % capacity
                state.overwritten += 1
            }
        }
    }

    /// The kept records, oldest first.
    public var events: [MMUEventRecord] {
        state.withLock { state in
            Array(state.ring[state.head...] + state.ring[..<state.head])
        }
    }

    /// Events recorded per tracepoint name since creation or the last `clear()`, overwritten ones
    /// included.
    public var counts: [String: Int] { state.withLock { $0.counts } }

    /// How many events named `name` were recorded since creation or the last `clear()`.
    public func count(of name: String) -> Int { state.withLock { $0.counts[name] ?? 0 } }

    /// Records lost to the ring's capacity since creation or the last `clear()`.
    public var overwrittenCount: Int { state.withLock { $0.overwritten } }

    /// Drops every kept record and count. Sequence numbers keep increasing.
    public func clear() {
        state.withLock { state in
            state.ring.removeAll(keepingCapacity: true)
            state.head = 0
            state.counts = [:]
            state.overwritten = 0
        }
    }
}
