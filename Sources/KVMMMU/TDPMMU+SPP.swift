// Sub-page write protection in the TDP MMU (docs/SPP.md): enabling it, the SET/GET requests under
// the MMU lock, the hooks `SubPageProtection` calls when permissions change, the SPP table misses
// the processor exits for, and SPP's part of a write fault. The policy itself lives in SPP.swift;
// this file is where the TDP MMU carries it out on its SPTEs.

import GuestMemory
import X86Paging

extension TDPMMU {
    // MARK: Enabling

    /// KVM_ENABLE_CAP(KVM_CAP_X86_SPP): SPP for this VM from now on (enabling twice returns the
    /// same manager). Refused without EPT, with PML dirty logging (see
    /// `SubPageProtectionError.requiresWriteProtectDirtyLogging`) and with nested virtualization.
    /// Takes the lock for write.
    @discardableResult
    public func enableSubPageProtection(nestedVirtualization: Bool = false) throws(TDPMMUError) -> SubPageProtection {
        try withExclusiveLock { () throws(TDPMMUError) -> SubPageProtection in
            if let existing = subPageProtection { return existing }
            guard configuration.dirtyLogging != .pml else { throw .subPageProtection(.requiresWriteProtectDirtyLogging) }
            let protection: SubPageProtection
            do throws(SubPageProtectionError) {
                protection = try SubPageProtection(memory: memory, masks: masks, nestedVirtualization: nestedVirtualization,
                                                   events: events)
            } catch {
                throw .subPageProtection(error)
            }
            // The hooks run inside SET and the memslot notifications, which hold the lock for write.
            protection.splitOrZapHugeMapping = { [unowned self] gfn in self.zapHugeLeaves(covering: gfn.rawValue) }
            protection.updateLeafArming = { [unowned self] gfn, isProtected in
                self.updateSubPageArming(gfn.rawValue, isProtected: isProtected)
            }
            protection.flushRemoteTLBs = { [unowned self] in self.requestRemoteTLBFlush() }
            subPageProtection = protection
            return protection
        }
    }

    /// The manager, or the -ENODEV of a VM that never enabled SPP.
    func enabledSubPageProtection() throws(TDPMMUError) -> SubPageProtection {
        guard let subPageProtection else { throw .subPageProtection(.notEnabled) }
        return subPageProtection
    }

    // MARK: KVM_SUBPAGES_SET_ACCESS / GET_ACCESS

    /// KVM_SUBPAGES_SET_ACCESS (see `SubPageProtection.setSubpageAccess`). Takes the lock for write.
    public func setSubpageAccess(gfn: GuestFrameNumber, count: Int, masks: [SubPageWriteMask],
                                 flags: UInt32 = 0) throws(TDPMMUError) {
        let protection = try enabledSubPageProtection()
        try withExclusiveLock { () throws(TDPMMUError) in
            try checkMemslotsUnchanged()
            do throws(SubPageProtectionError) {
                try protection.setSubpageAccess(gfn: gfn, count: count, masks: masks, flags: flags)
            } catch {
                throw .subPageProtection(error)
            }
        }
    }

    /// KVM_SUBPAGES_GET_ACCESS (see `SubPageProtection.getSubpageAccess`). Takes the lock for read.
    public func getSubpageAccess(gfn: GuestFrameNumber, count: Int, flags: UInt32 = 0) throws(TDPMMUError) -> [SubPageWriteMask] {
        let protection = try enabledSubPageProtection()
        return try withSharedLock { () throws(TDPMMUError) -> [SubPageWriteMask] in
            do throws(SubPageProtectionError) {
                return try protection.getSubpageAccess(gfn: gfn, count: count, flags: flags)
            } catch {
                throw .subPageProtection(error)
            }
        }
    }

    /// `handle_spp` for an SPPT-miss VM exit at `gpa`: builds the missing part of the SPP table.
    /// Takes the lock for write (the table changes).
    public func handleSubPageTableMiss(at gpa: GuestPhysicalAddress, vcpuID: Int) throws(TDPMMUError) {
        let protection = try enabledSubPageProtection()
        try withExclusiveLock { () throws(TDPMMUError) in
            do throws(SubPageProtectionError) {
                try protection.handleTableMiss(at: gpa, vcpuID: vcpuID)
            } catch {
                throw .subPageProtection(error)
            }
        }
    }

    // MARK: The hooks (lock held for write)

    /// The lazy mode of the series (v7+): every huge leaf mapping `gfn` goes, in every root (a vCPU
    /// may still run on an invalid one until it reloads), so the next fault maps the gfn with a
    /// 4 KiB leaf, which `maxMappingLevel` now demands. The 4 KiB leaves of the other pages come
    /// back on their own faults.
    func zapHugeLeaves(covering gfn: UInt64) {
        guard gfn < rootSpan else { return }
        if zapLeaves(gfn..<gfn + 1, roots: rootsToVisit(validOnly: false), minLevel: KVMLevel.pageDirectory) {
            requestRemoteTLBFlush()
        }
    }

    /// Arms (`isProtected`) or disarms the 4 KiB leaves mapping `gfn` in every root. The caller
    /// (SET) flushes the TLBs once when it is done.
    func updateSubPageArming(_ gfn: UInt64, isProtected: Bool) {
        guard gfn < rootSpan else { return }
        for root in rootsToVisit(validOnly: false) {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: KVMLevel.pageTable,
                                       start: gfn, end: gfn + 1, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                if iterator.level == KVMLevel.pageTable && old.isShadowPresent {
                    let new = isProtected
                        ? old.armedForSubPageProtection(level: KVMLevel.pageTable, masks: masks)
                        : old.disarmedSubPageProtection()
                    if let new {
                        setSPTE(&iterator, new)
                        events.record(.kvmMMUSetSPTE(level: KVMLevel.pageTable, gfn: GuestFrameNumber(gfn), spte: new))
                    }
                }
                iterator.next()
            }
        }
    }

    // MARK: The write fault

    /// SPP's part of a write fault on a present gfn (lock held for read), before the fast path
    /// could make the leaf writable: nil when SPP has no say and the ordinary path goes on.
    ///
    /// A write the processor refused on an armed leaf of a protected page is for the VMM
    /// (`.subPageWriteExit`, the series' RET_PF_USERSPACE); the leaf is never made writable. A
    /// protected page whose leaf dirty logging disarmed is logged and re-armed, and the write
    /// retried against the SPP table (`restore_spp_bit`). A leaf still armed for a page no longer
    /// protected is disarmed and the fault goes on as any other.
    func subPageWriteFault(_ fault: TDPFault, root: TDPRoot, protection: SubPageProtection) -> PageFaultResult? {
        guard let (slot, leaf, level) = lowestSPTE(fault.gfn, in: root), leaf.isShadowPresent, leaf.isLast(level: level)
        else { return nil }
        let gfn = GuestFrameNumber(fault.gfn)
        switch protection.writeFaultAction(gfn: gfn, leaf: leaf, level: level) {
        case .notSubPageProtected:
            return nil
        case .exitToUserspace:
            return .subPageWriteExit
        case .armAndRetry:
            guard let armed = leaf.armedAfterWriteFault(masks: masks) else { return nil }
            var expected = leaf
            beforeAtomicUpdate?(slot, level)
            // Lost to another vCPU or the processor: look again on the next fault.
            guard slot.compareExchange(expected: &expected, desired: armed) else { return .retry }
            handleChangedSPTE(gfn: fault.gfn, old: leaf, new: armed, level: level, shared: true)
            // The write that follows goes through the SPP table without a fault: log it now.
            if fault.slot?.slot.logsDirtyPages == true { memory.markDirty(gfn) }
            events.record(.kvmMMUSetSPTE(level: level, gfn: gfn, spte: armed))
            return .fixed
        case .disarmStaleLeaf:
            guard let disarmed = leaf.disarmedSubPageProtection() else { return nil }
            var expected = leaf
            beforeAtomicUpdate?(slot, level)
            if slot.compareExchange(expected: &expected, desired: disarmed) {
                handleChangedSPTE(gfn: fault.gfn, old: leaf, new: disarmed, level: level, shared: true)
            }
            return nil
        }
    }
}
