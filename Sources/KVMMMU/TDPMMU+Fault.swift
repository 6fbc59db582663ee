// The TDP page fault (mmu.c kvm_mmu_page_fault / kvm_mmu_do_page_fault / kvm_tdp_mmu_page_fault,
// handle_mmio_page_fault, fast_page_fault, kvm_mmu_hugepage_adjust, disallowed_hugepage_adjust;
// tdp_mmu.c kvm_tdp_mmu_map, tdp_mmu_map_handle_target_level; spte.c make_spte).

import GuestMemory
import X86Paging

/// One fault as KVM carries it through the TDP path (`struct kvm_page_fault`).
struct TDPFault {
    let gfn: UInt64
    let errorCode: PageFaultErrorCode
    var isWrite: Bool { errorCode.contains(.write) }
    var isExec: Bool { errorCode.contains(.fetch) }
    var isPresent: Bool { errorCode.contains(.present) }
    /// The memslot, nil for MMIO.
    var slot: MemslotMetadata? {
        get { slotReference?.takeUnretainedValue() }
        set { slotReference = newValue.map { .passUnretained($0) } }
    }
    /// `slot`, lent rather than retained, so that the fault is a plain value that copies without
    /// reference counting: the fault runs under mmu_lock (and the vCPU's under the memslots'
    /// srcu), which keep the MMU's memslot records from being replaced meanwhile.
    private var slotReference: Unmanaged<MemslotMetadata>?

    /// `slot` lent to `body` without a retain (see `slotReference`); nil for MMIO.
    @inline(__always)
    func withSlot<Result>(_ body: (MemslotMetadata?) -> Result) -> Result {
        guard let slotReference else { return body(nil) }
        return slotReference._withUnsafeGuaranteedRef { body($0) }
    }

    /// Sets `slot` from a reference the caller lends.
    mutating func lendSlot(_ slot: Unmanaged<MemslotMetadata>?) { slotReference = slot }
    /// The host frame (KVM's pfn), aligned down to `goalLevel` by the huge-page adjustment.
    var pfn: UInt64 = 0
    /// The host maps the page writable (not a read-only memslot).
    var mapWritable = false
    /// `max_level`: what the fault allows before looking at the memslot.
    var maxLevel = KVMLevel.pageDirectoryPointer
    /// `req_level`: what the memslot and host would allow.
    var reqLevel = KVMLevel.pageTable
    /// `goal_level`: what will be mapped.
    var goalLevel = KVMLevel.pageTable
    /// `huge_page_disallowed`: an executable access under the NX huge-page mitigation.
    var hugePageDisallowed = false
    /// `prefetch`: KVM_PRE_FAULT_MEMORY's fault, not a guest access: its leaf is made without A,
    /// and it never replaces a present SPTE.
    var isPrefetch = false

    init(gfn: UInt64, errorCode: PageFaultErrorCode) {
        self.gfn = gfn
        self.errorCode = errorCode
    }
}

/// What one KVM_PRE_FAULT_MEMORY fault did.
public enum TDPPreFaultResult: Equatable, Sendable {
    /// The gfn is mapped (now or already) by a leaf at `level`, or would have been: progress of
    /// that page size.
    case mapped(level: Int)
    /// No memslot holds it (RET_PF_EMULATE: the ioctl's -ENOENT); with MMIO caching an MMIO SPTE
    /// was made.
    case noMemslot
    /// The fault must be tried again (a lost race, or a root invalidated meanwhile).
    case retry

    /// For `.mapped`, the bytes the leaf at its level covers (the ioctl's progress unit).
    public var mappedBytes: UInt64? {
        guard case .mapped(let level) = self else { return nil }
        return pagesPerHugePage(level) << UInt64(pageShift)
    }
}

extension TDPMMU {
    /// `__vmx_handle_ept_violation`: the error code KVM makes of an EPT violation's exit
    /// qualification (read -> U, write -> W, fetch -> I/D, any of R/W/X allowed -> P, and with a valid
    /// guest linear address, whether the access was to the final translation or a guest table).
    public static func errorCode(forEPTViolation qualification: EPTViolationQualification) -> PageFaultErrorCode {
        var code: PageFaultErrorCode = []
        if qualification.contains(.dataRead) { code.insert(.user) }
        if qualification.contains(.dataWrite) { code.insert(.write) }
        if qualification.contains(.instructionFetch) { code.insert(.fetch) }
        if !qualification.isDisjoint(with: [.readable, .writable, .executable]) { code.insert(.present) }
        if qualification.contains(.linearAddressValid) {
            code.insert(qualification.contains(.finalTranslation) ? .guestFinal : .guestPage)
        }
        return code
    }

    /// A TDP fault on `gpa` (`kvm_mmu_page_fault` with TDP): an EPT misconfiguration or an NPT fault
    /// with RSVD goes to the MMIO fast path first; everything else (and an MMIO SPTE of a stale
    /// memslots generation) to `kvm_tdp_page_fault`. Runs under the lock held for read.
    ///
    /// Counts `pf_taken` for every fault that is not settled by the MMIO fast path, and `pf_fixed`,
    /// `pf_emulate`, `pf_spurious` by outcome, `pf_fast` for the lock-free fix-up.
    public func pageFault(at gpa: GuestPhysicalAddress, errorCode: PageFaultErrorCode, root: TDPRoot,
                          vcpuID: Int = 0) throws(TDPMMUError) -> PageFaultResult {
        guard root.owner == ObjectIdentifier(self) else { throw .foreignRoot }
        let gfn = gpa.rawValue >> UInt64(pageShift)
        guard gfn < rootSpan else { throw .addressBeyondRoot(gpa, rootLevel: rootLevel) }
        return try withSharedLock { () throws(TDPMMUError) -> PageFaultResult in
            try checkMemslotsUnchanged()
            if errorCode.contains(.reservedBit) {
                switch handleMMIOPageFault(gfn, gpa: gpa, root: root) {
                case .emulate: return .emulate
                case .retry: return .retry
                case nil: break
                }
            }
            let stat = vcpuStats.stat(forVCPU: vcpuID)
            stat.increment(.pfTaken)
            let result = try tdpPageFault(gfn, gpa: gpa, errorCode: errorCode, root: root, vcpuID: vcpuID, stat: stat)
            switch result {
            case .fixed: stat.increment(.pfFixed)
            case .emulate: stat.increment(.pfEmulate)
            case .spurious: stat.increment(.pfSpurious)
            default: break
            }
            return result
        }
    }

    /// One fault of KVM_PRE_FAULT_MEMORY (`kvm_tdp_page_prefault`'s `kvm_mmu_do_page_fault`): a
    /// read of `gpa` as a prefetch, mapped as large as the memslot allows, its leaf without A, a
    /// present SPTE left as it is. Counts only `pf_fixed` (a prefetch is neither taken, spurious
    /// nor emulated in KVM's counters). Runs under the lock held for read.
    public func preFault(at gpa: GuestPhysicalAddress, root: TDPRoot, vcpuID: Int = 0) throws(TDPMMUError) -> TDPPreFaultResult {
        guard root.owner == ObjectIdentifier(self) else { throw .foreignRoot }
        let gfn = gpa.rawValue >> UInt64(pageShift)
        guard gfn < rootSpan else { throw .addressBeyondRoot(gpa, rootLevel: rootLevel) }
        return try withSharedLock { () throws(TDPMMUError) -> TDPPreFaultResult in
            try checkMemslotsUnchanged()
            var fault = TDPFault(gfn: gfn, errorCode: [.guestFinal])
            fault.isPrefetch = true
            let stat = vcpuStats.stat(forVCPU: vcpuID)
            switch try tdpPageFault(&fault, gpa: gpa, root: root, vcpuID: vcpuID, stat: stat) {
            case .fixed:
                stat.increment(.pfFixed)
                return .mapped(level: fault.goalLevel)
            case .spurious:
                return .mapped(level: fault.goalLevel)
            case .emulate:
                return .noMemslot
            default:
                return .retry
            }
        }
    }

    /// What the MMIO fast path decided: `.emulate`, `.retry`, or nil for the slow path.
    enum MMIOFastPathResult { case emulate, retry }

    /// `handle_mmio_page_fault` for a direct MMU: the SPTE the walk ends on is an MMIO SPTE of the
    /// current memslots generation -> emulate; of a stale one -> the slow path rebuilds it; not an
    /// MMIO SPTE (zapped meanwhile) -> let the vCPU fault again.
    private func handleMMIOPageFault(_ gfn: UInt64, gpa: GuestPhysicalAddress, root: TDPRoot) -> MMIOFastPathResult? {
        var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: gfn, end: gfn + 1, pool: pool)
        var last = SPTE.nonPresent
        while iterator.isValid {
            last = iterator.oldSPTE
            iterator.next()
        }
        guard last.isMMIO(masks) else { return .retry }
        let current = memory.generation & SPTE.mmioGenerationMask
        events.record(.checkMMIOSPTE(spte: last, kvmGeneration: current, spteGeneration: last.mmioGeneration))
        guard last.mmioGeneration == current else { return nil }
        // A direct MMU reports no guest virtual address.
        events.record(.handleMMIOPageFault(address: 0, gfn: last.mmioGFN(masks), access: last.mmioAccess(masks)))
        return .emulate
    }

    /// `kvm_tdp_mmu_page_fault` (with `kvm_faultin_pfn`), lock held for read.
    private func tdpPageFault(_ gfn: UInt64, gpa: GuestPhysicalAddress, errorCode: PageFaultErrorCode, root: TDPRoot,
                              vcpuID: Int, stat: VCPUStat) throws(TDPMMUError) -> PageFaultResult {
        var fault = TDPFault(gfn: gfn, errorCode: errorCode)
        return try tdpPageFault(&fault, gpa: gpa, root: root, vcpuID: vcpuID, stat: stat)
    }

    private func tdpPageFault(_ fault: inout TDPFault, gpa: GuestPhysicalAddress, root: TDPRoot,
                              vcpuID: Int, stat: VCPUStat) throws(TDPMMUError) -> PageFaultResult {
        let gfn = fault.gfn, errorCode = fault.errorCode
        fault.lendSlot(lentSlotMetadata(containing: gfn))
        // page_fault_handle_page_track: a write to a write-tracked gfn that is mapped goes to the
        // emulator, which tells the tracker.
        if !errorCode.contains(.reservedBit) && fault.isPresent && fault.isWrite,
           fault.withSlot({ $0?.isWriteTracked(gfn) == true }) {
            return .emulate
        }
        // SPP first: the fast path must never make an armed leaf writable.
        if fault.isWrite && fault.isPresent && !errorCode.contains(.reservedBit), let protection = subPageProtection,
           let result = subPageWriteFault(fault, root: root, protection: protection) {
            return result
        }
        if let fixed = fastPageFault(fault, gpa: gpa, root: root, vcpuID: vcpuID, stat: stat) { return fixed }
        if let slot = fault.withSlot({ $0?.slot }) {
            // A write to a read-only memslot is MMIO to the VMM (KVM_PFN_ERR_RO_FAULT).
            if fault.isWrite && slot.isReadOnly { return .emulate }
            fault.pfn = slot.hostBase.rawValue + (gfn - slot.baseFrame.rawValue)
            // The model's host maps every writable slot writable (hva_to_pfn grants it to reads too).
            fault.mapWritable = !slot.isReadOnly
        } else {
            // kvm_handle_noslot_fault: without MMIO caching, or beyond what an MMIO SPTE can hold,
            // emulate without installing anything.
            if !masks.isMMIOCachingEnabled || gfn > maxGFN { return .emulate }
        }
        // is_page_fault_stale: the root was invalidated while this vCPU still used it.
        if root.isInvalid { return .retry }
        return try map(&fault, root: root, stat: stat)
    }

    // MARK: Fast page fault

    /// `page_fault_can_be_fast`: not an MMIO fault; a not-present fault only when SPTEs are
    /// access-tracked (A/D disabled); otherwise only a write can be fixed without the slow path.
    private func canBeFast(_ fault: TDPFault) -> Bool {
        if fault.errorCode.contains(.reservedBit) { return false }
        if !fault.isPresent { return !masks.accessedDirtyEnabled }
        return fault.isWrite
    }

    /// `is_access_allowed`.
    @inline(__always)
    private func isAccessAllowed(_ fault: TDPFault, _ spte: SPTE) -> Bool {
        if fault.isExec { return spte.isExecutable(masks) }
        if fault.isWrite { return spte.isWritable }
        // Bit 0: P in the x86 format, R in EPT.
        return spte.rawValue & 1 != 0
    }

    /// `fast_page_fault` on the TDP MMU: fixes, with one compare-and-exchange, a leaf that is only
    /// write-protected for dirty logging (MMU-writable) or access-tracked. Nil when the slow path
    /// must run (`RET_PF_INVALID`). KVM runs this without mmu_lock, under RCU; here the caller holds
    /// the lock for read, which keeps the tables alive the same way and excludes nothing it races.
    private func fastPageFault(_ fault: TDPFault, gpa: GuestPhysicalAddress, root: TDPRoot, vcpuID: Int,
                               stat: VCPUStat) -> PageFaultResult? {
        guard canBeFast(fault) else { return nil }
        var result: PageFaultResult?
        var attempts = 0
        var old = SPTE.nonPresent
        var new = SPTE.nonPresent
        var lastSlot: SPTESlot?
        while true {
            let lowest = lowestSPTE(fault.gfn, in: root)
            if let lowest { lastSlot = lowest.slot }
            old = lowest?.spte ?? .nonPresent
            let level = lowest?.level ?? 0
            new = old
            guard let slot = lastSlot, old.isShadowPresent, old.isLast(level: level) else { break }
            if isAccessAllowed(fault, old) {
                result = .spurious
                break
            }
            if !masks.accessedDirtyEnabled && old.isAccessTracked(masks) {
                new = SPTE(old.restoredFromAccessTrack(masks).rawValue | masks.accessed)
            }
            if fault.isWrite && old.isMMUWritable(masks) {
                new.rawValue |= SPTE.writableBit
                // Only the faulting gfn would be marked dirty: a huge page in a logged slot must
                // be split by the slow path instead.
                if level > KVMLevel.pageTable && fault.slot?.slot.logsDirtyPages == true { break }
            }
            if new == old || !isAccessAllowed(fault, new) { break }
            var expected = old
            beforeAtomicUpdate?(slot, level)
            if slot.compareExchange(expected: &expected, desired: new) {
                // fast_pf_fix_direct_spte: W granted here is a write the dirty log must see.
                if new.isWritable && !old.isWritable, fault.slot?.slot.logsDirtyPages == true {
                    memory.markDirty(GuestFrameNumber(fault.gfn))
                }
                result = .fixed
                break
            }
            attempts += 1
            if attempts > 4 { break }
        }
        events.record(.fastPageFault(vcpuID: vcpuID, address: gpa.rawValue, errorCode: fault.errorCode, oldSPTE: old,
                                     newSPTE: lastSlot?.load() ?? new, spurious: result == .spurious,
                                     fixed: result == .fixed))
        if result != nil { stat.increment(.pfFast) }
        return result
    }

    /// `kvm_tdp_mmu_fast_pf_get_last_sptep`: the lowest SPTE on the walk for `gfn` (a leaf, or
    /// where the walk stops), with its slot and level; nil when the walk reads nothing.
    func lowestSPTE(_ gfn: UInt64, in root: TDPRoot) -> (slot: SPTESlot, spte: SPTE, level: Int)? {
        var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: KVMLevel.pageTable, start: gfn,
                                   end: gfn + 1, pool: pool)
        var lowest: (slot: SPTESlot, spte: SPTE, level: Int)?
        while iterator.isValid {
            lowest = (iterator.slot, iterator.oldSPTE, iterator.level)
            iterator.next()
        }
        return lowest
    }

    // MARK: Huge pages

    /// `kvm_mmu_hugepage_adjust`: the level to map at. Nothing but 4K for MMIO, for a memslot that
    /// logs dirty pages (each written page must fault on its own), or for an executable access
    /// under the NX mitigation; otherwise the largest level the memslot, the write tracking and the
    /// host allow.
    func hugepageAdjust(_ fault: inout TDPFault) {
        fault.hugePageDisallowed = fault.isExec && configuration.nxHugePages
        let maxLevel = min(fault.maxLevel, configuration.maxHugePageLevel)
        guard maxLevel > KVMLevel.pageTable,
              let reqLevel = fault.withSlot({ slot in
                  slot.flatMap { $0.slot.logsDirtyPages ? nil : $0.maxMappingLevel(fault.gfn, maxLevel: maxLevel) }
              })
        else { return }
        fault.reqLevel = reqLevel
        // SPP arms only 4 KiB leaves: a protected page keeps its block from mapping huge.
        if let protection = subPageProtection {
            fault.reqLevel = protection.maxMappingLevel(for: GuestFrameNumber(fault.gfn), limit: fault.reqLevel)
        }
        guard fault.reqLevel > KVMLevel.pageTable, !fault.hugePageDisallowed else { return }
        fault.goalLevel = fault.reqLevel
        fault.pfn &= ~(pagesPerHugePage(fault.goalLevel) - 1)
    }

    /// `disallowed_hugepage_adjust`: do not replace a table that exists because of an executable 4K
    /// mapping with a huge page; map one level lower instead.
    @inline(__always)
    private func disallowedHugepageAdjust(_ fault: inout TDPFault, _ spte: SPTE, level: Int) {
        guard level > KVMLevel.pageTable, level == fault.goalLevel, spte.isShadowPresent, !spte.isLarge,
              let child = records.page(spte.pfn), child.nxHugePageDisallowed
        else { return }
        fault.pfn |= fault.gfn & (pagesPerHugePage(level) - pagesPerHugePage(level - 1))
        fault.goalLevel -= 1
    }

    // MARK: Mapping

    /// `kvm_tdp_mmu_map`: walks down to the goal level, linking new tables where there are none and
    /// splitting a huge leaf in the way, then installs the leaf.
    private func map(_ fault: inout TDPFault, root: TDPRoot, stat: VCPUStat) throws(TDPMMUError) -> PageFaultResult {
        hugepageAdjust(&fault)
        events.record(.kvmMMUSPTERequested(gfn: GuestFrameNumber(fault.gfn),
                                           pfn: HostFrameNumber(fault.pfn | (fault.gfn & (pagesPerHugePage(fault.goalLevel) - 1))),
                                           level: fault.goalLevel))
        var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: fault.gfn, end: fault.gfn + 1,
                                   pool: pool)
        while iterator.isValid {
            if configuration.nxHugePages { disallowedHugepageAdjust(&fault, iterator.oldSPTE, level: iterator.level) }
            // Another thread owns the entry for now.
            if iterator.oldSPTE.isFrozen { return .retry }
            if iterator.level == fault.goalLevel { return mapTargetLevel(&iterator, fault, root: root, stat: stat) }
            let old = iterator.oldSPTE
            if old.isShadowPresent && !old.isLarge {
                iterator.next()
                continue
            }
            let child = try allocatePageTable(role: role(root.role, level: iterator.level - 1), gfn: iterator.gfn,
                                              parent: iterator.sptep, nxHugePageDisallowed: fault.hugePageDisallowed)
            let linked = old.isShadowPresent
                ? splitHugePage(&iterator, into: child, shared: true)
                : linkPageTable(&iterator, child, shared: true)
            guard linked else {
                freeUnpublishedPageTable(child)
                return .retry
            }
            // Only NX kept this from being a huge page: a candidate for recovery.
            if fault.hugePageDisallowed && fault.reqLevel >= iterator.level { trackPossibleNXHugePage(child) }
            iterator.next()
        }
        // The walk left the gfn without reaching the goal: the table it was in went away.
        return .retry
    }

    /// `tdp_mmu_map_handle_target_level`.
    private func mapTargetLevel(_ iterator: inout TDPIterator, _ fault: TDPFault, root: TDPRoot,
                                stat: VCPUStat) -> PageFaultResult {
        let old = iterator.oldSPTE, level = iterator.level
        var new: SPTE
        var writeProtected = false
        if let leaf = fault.withSlot({ slot in
            slot.map { makeLeafSPTE(level: level, gfn: iterator.gfn, pfn: fault.pfn, old: old, hostWritable: fault.mapWritable,
                                    slot: $0, role: root.role, prefetch: fault.isPrefetch) }
        }) {
            (new, writeProtected) = leaf
            if let protection = subPageProtection {
                new = protection.applyingProtection(to: new, gfn: GuestFrameNumber(iterator.gfn), level: level)
            }
        } else {
            new = .mmio(gfn: GuestFrameNumber(iterator.gfn), access: ACC.all, generation: memory.generation, masks: masks)
        }
        var result = PageFaultResult.fixed
        if new == old || fault.isPrefetch && old.isShadowPresent {
            result = .spurious
        } else if !setSPTEAtomic(&iterator, new) {
            return .retry
        } else if old.isShadowPresent {
            // A table replaced by a huge leaf: the TLBs may hold translations through it.
            if !old.isLast(level: level) {
                requestRemoteTLBFlush()
            } else if SPTE.leafChangeNeedsTLBFlush(old: old, new: new, masks: masks) {
                warn("a fault took MMU-writable away from \(old.describe(masks)) at gfn \(hex(iterator.gfn))")
                requestRemoteTLBFlush()
            }
        }
        // A write that had to stay write-protected needs the emulator, or it faults forever.
        if writeProtected && fault.isWrite { result = .emulate }
        if new.isMMIO(masks) {
            stat.increment(.pfMMIOSPTECreated)
            events.record(.markMMIOSPTE(gfn: GuestFrameNumber(iterator.gfn), access: new.mmioAccess(masks),
                                        generation: new.mmioGeneration))
            return .emulate
        }
        events.record(.kvmMMUSetSPTE(level: level, gfn: GuestFrameNumber(iterator.gfn), spte: new))
        return result
    }

    /// `make_spte` for the TDP MMU (`pte_access` is ACC_ALL): the leaf for `pfn`
    /// at `level`, and whether it had to stay read-only because the gfn is write-tracked. W (with
    /// MMU-writable and D) is granted whenever the host page is writable and the gfn not tracked,
    /// whatever the access; a gfn of a dirty-logging slot that gets W is marked dirty right here.
    func makeLeafSPTE(level: Int, gfn: UInt64, pfn: UInt64, old: SPTE, hostWritable: Bool, slot: MemslotMetadata,
                      role: PageRole, prefetch: Bool = false) -> (SPTE, writeProtected: Bool) {
        var access = ACC.all
        // NX huge pages: a huge mapping is never executable; an exec fault splits it instead.
        if level > KVMLevel.pageTable && configuration.nxHugePages { access &= ~ACC.exec }
        if !hostWritable { access &= ~ACC.write }
        var writable = false
        var writeProtected = false
        if access & ACC.write != 0 {
            // mmu_try_to_unsync_pages: write tracking refuses; the last-level tables L2's
            // `guest_mmu` shadows go unsync. An SPTE that was a writable leaf already was checked
            // when it was made.
            if (!old.isLast(level: level) || !old.isWritable)
                && (slot.isWriteTracked(gfn) || shadowPagesRefuseWrite(gfn)) {
                writeProtected = true
            } else {
                writable = true
            }
        }
        let adState: SPTE.ADState = role.adDisabled
            ? .disabled
            : (configuration.dirtyLogging == .pml && role.guestMode ? .wrprotOnly : .enabled)
        var spte = SPTE.leaf(pfn: HostFrameNumber(pfn), level: level, access: access, hostWritable: hostWritable,
                             writable: writable, accessed: true, adState: adState, masks: masks)
        // A prefetch (KVM_PRE_FAULT_MEMORY) accessed nothing: `mark_spte_for_access_track`, which
        // without A/D bits takes W away too, before the dirty log looks at W.
        if prefetch { spte = spte.markedForAccessTrack(masks) }
        if spte.isWritable && slot.slot.logsDirtyPages {
            if level > KVMLevel.pageTable { warn("a huge page at gfn \(hex(gfn)) was mapped writable in a dirty-logging slot") }
            memory.markDirty(GuestFrameNumber(gfn))
        }
        return (spte, writeProtected)
    }

    /// The shadow MMU's half of `mmu_try_to_unsync_pages` (`ShadowMMU.unsyncForTDPMapping`),
    /// asked only while it shadows guest tables.
    @inline(__always)
    private func shadowPagesRefuseWrite(_ gfn: UInt64) -> Bool {
        guard let shadow = unmanagedShadowRmaps else { return false }
        return shadow._withUnsafeGuaranteedRef { shadow in
            shadow.indirectShadowPages > 0 && shadow.unsyncForTDPMapping(GuestFrameNumber(gfn))
        }
    }

    // MARK: Looking

    /// The SPTE where a walk of `root` for `gfn` ends: a leaf, an MMIO SPTE, or a non-present entry
    /// (nil only when the gfn lies beyond the root). Takes the lock for read.
    public func mapping(of gfn: UInt64, in root: TDPRoot) -> TDPMapping? {
        guard gfn < rootSpan, root.owner == ObjectIdentifier(self) else { return nil }
        return withSharedLock { () -> TDPMapping? in
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: gfn, end: gfn + 1, pool: pool)
            var found: TDPMapping?
            while iterator.isValid {
                found = TDPMapping(spte: iterator.oldSPTE, level: iterator.level, gfn: iterator.gfn)
                iterator.next()
            }
            return found
        }
    }
}
