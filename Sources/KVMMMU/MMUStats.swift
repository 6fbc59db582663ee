// KVM's MMU statistics under KVM's own names (x86.c kvm_vm_stats_desc / kvm_vcpu_stats_desc), so a
// model run and a real `kvm_stat` / binary-stats read can be compared counter by counter.

/// The MMU-relevant counters of a VM and its vCPUs, summed over vCPUs.
///
/// Three kinds, as KVM declares them: cumulative counters only grow; instant counters
/// (`mmu_unsync`, `pages_*`, `nx_lpage_splits`) go up and down with the structures they count; peak
/// counters (`max_*`) hold the largest value seen.
public struct MMUStats: Sendable, Equatable {
    // VM statistics, in kvm_vm_stats_desc order (KVM_GENERIC_VM_STATS first).

    /// `remote_tlb_flush`: flushes of every vCPU's TLB actually performed.
    public var remoteTLBFlush: UInt64 = 0
    /// `remote_tlb_flush_requests`: flushes requested (some are merged or elided).
    public var remoteTLBFlushRequests: UInt64 = 0
    /// `mmu_shadow_zapped`: shadow pages prepared for zapping (`__kvm_mmu_prepare_zap_page` calls).
    public var mmuShadowZapped: UInt64 = 0
    /// `mmu_pte_write`: emulated writes to guest memory while gpte-backed shadow pages exist.
    public var mmuPTEWrite: UInt64 = 0
    /// `mmu_pde_zapped`: SPTEs of upper-level pages zapped by an emulated write of a nonzero gpte.
    public var mmuPDEZapped: UInt64 = 0
    /// `mmu_flooded`: shadow pages zapped for a misaligned write or write flooding.
    public var mmuFlooded: UInt64 = 0
    /// `mmu_recycled`: shadow pages zapped to make room (`kvm_mmu_zap_oldest_mmu_pages`).
    public var mmuRecycled: UInt64 = 0
    /// `mmu_cache_miss`: shadow-page lookups that had to allocate.
    public var mmuCacheMiss: UInt64 = 0
    /// `mmu_unsync` (instant): unsync shadow pages.
    public var mmuUnsync: UInt64 = 0
    /// `pages_4k` (instant): present 4 KiB leaf SPTEs, both MMUs.
    public var pages4K: UInt64 = 0
    /// `pages_2m` (instant): present 2 MiB leaf SPTEs.
    public var pages2M: UInt64 = 0
    /// `pages_1g` (instant): present 1 GiB leaf SPTEs.
    public var pages1G: UInt64 = 0
    /// `nx_lpage_splits` (instant): pages on the NX huge-page recovery list.
    public var nxLpageSplits: UInt64 = 0
    /// `max_mmu_rmap_size` (peak): longest rmap chain seen when adding.
    public var maxMMURmapSize: UInt64 = 0
    /// `max_mmu_page_hash_collisions` (peak): most gfn mismatches walked in one hash-bucket lookup.
    public var maxMMUPageHashCollisions: UInt64 = 0

    // vCPU statistics, in kvm_vcpu_stats_desc order (the MMU-related ones and the exits they cause).

    /// `pf_taken`: page faults entering the MMU (not prefetches).
    public var pfTaken: UInt64 = 0
    /// `pf_fixed`: faults that installed an SPTE (RET_PF_FIXED).
    public var pfFixed: UInt64 = 0
    /// `pf_emulate`: faults resolved by emulating the instruction (RET_PF_EMULATE).
    public var pfEmulate: UInt64 = 0
    /// `pf_spurious`: faults that found nothing to fix (RET_PF_SPURIOUS).
    public var pfSpurious: UInt64 = 0
    /// `pf_fast`: faults fixed or found spurious by the lock-free fast path.
    public var pfFast: UInt64 = 0
    /// `pf_mmio_spte_created`: MMIO SPTEs installed.
    public var pfMMIOSPTECreated: UInt64 = 0
    /// `pf_guest`: page faults injected into the guest.
    public var pfGuest: UInt64 = 0
    /// `tlb_flush`: TLB flushes performed for a vCPU.
    public var tlbFlush: UInt64 = 0
    /// `invlpg`: INVLPGs handled.
    public var invlpg: UInt64 = 0
    /// `exits`: VM exits.
    public var exits: UInt64 = 0
    /// `mmio_exits`: exits to user space for MMIO.
    public var mmioExits: UInt64 = 0
    /// `insn_emulation`: instructions emulated.
    public var insnEmulation: UInt64 = 0
    /// `insn_emulation_fail`: emulation failures.
    public var insnEmulationFail: UInt64 = 0
    /// `nested_run`: nested VM entries (VMLAUNCH/VMRESUME or VMRUN of L1's that entered L2).
    public var nestedRun: UInt64 = 0
    /// `guest_mode` (instant): vCPUs running L2 (`is_guest_mode`).
    public var guestMode: UInt64 = 0

    public init() {}

    /// How KVM declares a counter (KVM_STATS_TYPE_*).
    public enum Kind: Sendable, Hashable {
        /// STATS_DESC_COUNTER: only grows.
        case cumulative
        /// STATS_DESC_ICOUNTER: a current level.
        case instant
        /// STATS_DESC_PCOUNTER: the maximum seen.
        case peak
    }

    /// One row of the table every rendering goes through: KVM's name, kind, and the field.
    typealias Field = (name: String, kind: Kind, path: WritableKeyPath<MMUStats, UInt64>)

    /// The single statement of names, order and kinds. Computed (not stored) so no global key paths
    /// are shared between threads.
    static var fields: [Field] {
        [
            ("remote_tlb_flush", .cumulative, \.remoteTLBFlush),
            ("remote_tlb_flush_requests", .cumulative, \.remoteTLBFlushRequests),
            ("mmu_shadow_zapped", .cumulative, \.mmuShadowZapped),
            ("mmu_pte_write", .cumulative, \.mmuPTEWrite),
            ("mmu_pde_zapped", .cumulative, \.mmuPDEZapped),
            ("mmu_flooded", .cumulative, \.mmuFlooded),
            ("mmu_recycled", .cumulative, \.mmuRecycled),
            ("mmu_cache_miss", .cumulative, \.mmuCacheMiss),
            ("mmu_unsync", .instant, \.mmuUnsync),
            ("pages_4k", .instant, \.pages4K),
            ("pages_2m", .instant, \.pages2M),
            ("pages_1g", .instant, \.pages1G),
            ("nx_lpage_splits", .instant, \.nxLpageSplits),
            ("max_mmu_rmap_size", .peak, \.maxMMURmapSize),
            ("max_mmu_page_hash_collisions", .peak, \.maxMMUPageHashCollisions),
            ("pf_taken", .cumulative, \.pfTaken),
            ("pf_fixed", .cumulative, \.pfFixed),
            ("pf_emulate", .cumulative, \.pfEmulate),
            ("pf_spurious", .cumulative, \.pfSpurious),
            ("pf_fast", .cumulative, \.pfFast),
            ("pf_mmio_spte_created", .cumulative, \.pfMMIOSPTECreated),
            ("pf_guest", .cumulative, \.pfGuest),
            ("tlb_flush", .cumulative, \.tlbFlush),
            ("invlpg", .cumulative, \.invlpg),
            ("exits", .cumulative, \.exits),
            ("mmio_exits", .cumulative, \.mmioExits),
            ("insn_emulation", .cumulative, \.insnEmulation),
            ("insn_emulation_fail", .cumulative, \.insnEmulationFail),
            ("nested_run", .cumulative, \.nestedRun),
            ("guest_mode", .instant, \.guestMode),
        ]
    }

    /// KVM's names of every counter, VM statistics then vCPU statistics, each in KVM's descriptor
    /// order. (`lpages`, replaced by `pages_2m` + `pages_1g` in Linux 5.14, is `lpages` below.)
    public static let counterNames: [String] = fields.map(\.name)

    /// The kind KVM declares for `kvmName`, or nil for a name not modelled.
    public static func kind(ofKVMName kvmName: String) -> Kind? {
        fields.first { $0.name == kvmName }?.kind
    }

    /// Every counter with its KVM name, in `counterNames` order.
    public var values: [(name: String, value: UInt64)] {
        Self.fields.map { ($0.name, self[keyPath: $0.path]) }
    }

    /// The counter KVM calls `kvmName`, or nil for a name not modelled. Setting a name not modelled
    /// does nothing.
    public subscript(kvmName kvmName: String) -> UInt64? {
        get {
            guard let field = Self.fields.first(where: { $0.name == kvmName }) else { return nil }
            return self[keyPath: field.path]
        }
        set {
            guard let newValue, let field = Self.fields.first(where: { $0.name == kvmName }) else { return }
            self[keyPath: field.path] = newValue
        }
    }

    /// The counters of two MMUs of one VM as KVM shows them together: counts and levels add up,
    /// peaks take the larger.
    public func merged(with other: MMUStats) -> MMUStats {
        var result = self
        for field in Self.fields {
            switch field.kind {
            case .cumulative, .instant: result[keyPath: field.path] &+= other[keyPath: field.path]
            case .peak: result[keyPath: field.path] = max(self[keyPath: field.path], other[keyPath: field.path])
            }
        }
        return result
    }

    /// The counters the VM side counts (`exits`, `insn_emulation`, `tlb_flush`, `pf_guest`,
    /// `mmio_exits` and `nested_run` in each vCPU's `stat`, as KVM's `vcpu->stat`; the remote
    /// flushes in the VM's).
    public enum VCPUCounter: Sendable {
        case exit, instructionEmulation, tlbFlush, guestFault, remoteTLBFlush, remoteTLBFlushRequest, mmioExit, nestedRun
    }

    /// Counts one event of the VM side (a vCPU's exit, emulation, TLB flush, injected #PF, MMIO
    /// exit, L2 entry, or a remote flush).
    public mutating func count(_ counter: VCPUCounter) {
        switch counter {
        case .exit: exits += 1
        case .instructionEmulation: insnEmulation += 1
        case .tlbFlush: tlbFlush += 1
        case .guestFault: pfGuest += 1
        case .remoteTLBFlush: remoteTLBFlush += 1
        case .remoteTLBFlushRequest: remoteTLBFlushRequests += 1
        case .mmioExit: mmioExits += 1
        case .nestedRun: nestedRun += 1
        }
    }

    /// The pre-5.14 `lpages` counter: present huge leaf SPTEs.
    public var lpages: UInt64 { pages2M + pages1G }

    /// Adjusts the page count of `level` (1 = 4K, 2 = 2M, 3 = 1G) by `delta`, like
    /// `kvm_update_page_stats`.
    /// - Precondition: a level KVM maps at, and the count does not go below zero.
    public mutating func updatePageStats(level: Int, delta: Int) {
        // A plain switch, not key paths: this runs on every SPTE installed or dropped.
        switch level {
        case 1: pages4K = Self.adjusted(pages4K, by: delta)
        case 2: pages2M = Self.adjusted(pages2M, by: delta)
        case 3: pages1G = Self.adjusted(pages1G, by: delta)
        default: preconditionFailure("KVM maps pages only at levels 1-3")
        }
    }

    @inline(__always)
    private static func adjusted(_ count: UInt64, by delta: Int) -> UInt64 {
        let (value, overflow) = Int64(bitPattern: count).addingReportingOverflow(Int64(delta))
        precondition(!overflow && value >= 0, "page count would go negative")
        return UInt64(value)
    }

    /// Raises a peak counter to `value` if it is larger.
    public mutating func recordPeak(_ path: WritableKeyPath<MMUStats, UInt64>, _ value: UInt64) {
        if value > self[keyPath: path] { self[keyPath: path] = value }
    }

    /// What happened between `before` and `self`.
    ///
    /// Cumulative counters subtract (a counter that went backwards, i.e. stats were reset in between,
    /// gives 0). Instant and peak counters keep the later value: a level or a maximum has no meaningful
    /// difference.
    public func delta(from before: MMUStats) -> MMUStats {
        var result = self
        for field in Self.fields where field.kind == .cumulative {
            let now = self[keyPath: field.path]
            let then = before[keyPath: field.path]
            result[keyPath: field.path] = now >= then ? now - then : 0
        }
        return result
    }

    /// One JSON object, keys KVM's names in `counterNames` order: `{"remote_tlb_flush":0,...}`.
    public var jsonObject: String {
        "{" + values.map { "\"\($0.name)\":\($0.value)" }.joined(separator: ",") + "}"
    }
}

extension MMUStats: CustomStringConvertible {
    /// The nonzero counters, `name=value`, in KVM's order; `(all zero)` when there are none.
    public var description: String {
        let nonzero = values.filter { $0.value != 0 }.map { "\($0.name)=\($0.value)" }
        return nonzero.isEmpty ? "(all zero)" : nonzero.joined(separator: " ")
    }
}
