// Dirty logging with the TDP MMU (spec section 8; tdp_mmu.c wrprot_gfn_range, clear_dirty_gfn_range,
// clear_dirty_pt_masked, write_protect_gfn, zap_collapsible_spte_range; mmu.c
// kvm_arch_mmu_enable_log_dirty_pt_masked; kvm_main.c kvm_get_dirty_log_protect,
// kvm_clear_dirty_log_protect).

import GuestMemory
import X86Paging

extension TDPMMU {
    // MARK: Whole slots

    /// `kvm_mmu_slot_remove_write_access` / `kvm_tdp_mmu_wrprot_slot`: clears W in every leaf at or
    /// above `minLevel` mapping the slot (MMU-writable stays, so a write can be fixed by the fast
    /// path and logged). Flushes if anything changed. Takes the lock for read.
    public func writeProtectSlot(_ id: Int, minLevel: Int) throws(TDPMMUError) {
        guard (KVMLevel.pageTable...KVMLevel.pageDirectoryPointer).contains(minLevel) else {
            throw .invalidLevel(minLevel, "write protection starts at level 1, 2 or 3")
        }
        try withSharedLock { () throws(TDPMMUError) in
            let slot = try existingSlot(id)
            if writeProtectSlotLocked(slot, minLevel: minLevel) { requestRemoteTLBFlush() }
        }
    }

    /// `wrprot_gfn_range` over the valid roots; whether anything changed.
    func writeProtectSlotLocked(_ slot: Memslot, minLevel: Int) -> Bool {
        var changed = false
        for root in rootsToVisit(validOnly: true) {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: minLevel,
                                       start: slot.baseFrame.rawValue, end: slot.endFrame.rawValue, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                // An SPP-armed leaf (W already clear) sets its arming aside too, or writes to its
                // writable sub-pages would go unlogged.
                guard old.isShadowPresent, old.isLast(level: iterator.level),
                      let protected = old.writeProtectedForDirtyLogging() else {
                    iterator.next()
                    continue
                }
                if !setSPTEAtomic(&iterator, protected) { continue }
                changed = true
                iterator.next()
            }
        }
        return changed
    }

    /// `kvm_mmu_slot_leaf_clear_dirty` / `kvm_tdp_mmu_clear_dirty_slot`: the dirty state of every
    /// leaf mapping the slot is cleared, D for A/D SPTEs, W where dirty tracking must write-protect
    /// (A/D disabled, or the write-protect-only A/D type). Takes the lock for read.
    public func clearDirtySlot(_ id: Int) throws(TDPMMUError) {
        try withSharedLock { () throws(TDPMMUError) in
            let slot = try existingSlot(id)
            if clearDirtySlotLocked(slot) { requestRemoteTLBFlush() }
        }
    }

    /// `tdp_mmu_need_write_protect`: every table of a root shares its role but for the level.
    func needsWriteProtectForDirtyLog(_ root: TDPRoot) -> Bool {
        (configuration.dirtyLogging == .pml && root.role.guestMode) || !masks.accessedDirtyEnabled
    }

    func clearDirtySlotLocked(_ slot: Memslot) -> Bool {
        var changed = false
        for root in rootsToVisit(validOnly: true) {
            let dirtyBit = needsWriteProtectForDirtyLog(root) ? SPTE.writableBit : masks.dirty
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1,
                                       start: slot.baseFrame.rawValue, end: slot.endFrame.rawValue, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                guard old.isShadowPresent, old.isLast(level: iterator.level),
                      let cleaned = Self.dirtyStateCleared(old, dirtyBit: dirtyBit) else {
                    iterator.next()
                    continue
                }
                if dirtyBit == masks.dirty && old.needsADWriteProtect {
                    warn("clearing D of \(old.describe(masks)), which needs write protection instead")
                }
                if !setSPTEAtomic(&iterator, cleaned) { continue }
                changed = true
                iterator.next()
            }
        }
        return changed
    }

    /// `old` with its dirty state taken: D cleared, or (`dirtyBit` W) write-protected the SPP-aware
    /// way (`SPTE.writeProtectedForDirtyLogging`). Nil when it has none to take.
    static func dirtyStateCleared(_ old: SPTE, dirtyBit: UInt64) -> SPTE? {
        if dirtyBit == SPTE.writableBit { return old.writeProtectedForDirtyLogging() }
        return old.rawValue & dirtyBit == 0 ? nil : SPTE(old.rawValue & ~dirtyBit)
    }

    // MARK: gfn masks (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG)

    /// `kvm_mmu_write_protect_pt_masked`: W cleared in the 4K leaves mapping the gfns
    /// `slot.base + gfnOffset + i` for each set bit `i` of `mask`. Takes the lock for write.
    public func writeProtectMasked(slot id: Int, gfnOffset: UInt64, mask: UInt64) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            let slot = try existingSlot(id)
            try checkMaskRange(slot, gfnOffset: gfnOffset, mask: mask)
            clearDirtyMaskedLocked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: true)
            rmapsClearDirtyMasked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: true)
        }
    }

    /// `kvm_mmu_clear_dirty_pt_masked`: as `writeProtectMasked` but clearing D (PML), or W where the
    /// SPTEs have no usable D bit. Takes the lock for write.
    public func clearDirtyMasked(slot id: Int, gfnOffset: UInt64, mask: UInt64) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            let slot = try existingSlot(id)
            try checkMaskRange(slot, gfnOffset: gfnOffset, mask: mask)
            clearDirtyMaskedLocked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: false)
            rmapsClearDirtyMasked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: false)
        }
    }

    /// `kvm_arch_mmu_enable_log_dirty_pt_masked` as KVM_RESET_DIRTY_RINGS calls it for one
    /// harvested ring entry's 64-page window: both MMUs re-protect the pages of `mask`. Takes the
    /// lock for write; the caller flushes (`flushAfterDirtyRingReset`).
    public func enableLogDirtyMasked(slot id: Int, gfnOffset: UInt64, mask: UInt64) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            try checkMaskRange(metadata.slot, gfnOffset: gfnOffset, mask: mask)
            enableLogDirtyMaskedLocked(metadata, gfnOffset: gfnOffset, mask: mask)
        }
    }

    /// The rmap half of `kvm_mmu_write_protect_pt_masked` (`writeProtect`) or
    /// `kvm_mmu_clear_dirty_pt_masked`, when the shadow MMU has pages. Lock held for write.
    private func rmapsClearDirtyMasked(_ slot: Memslot, gfnOffset: UInt64, mask: UInt64, writeProtect: Bool) {
        guard let shadow = rmapsPresent else { return }
        let base = GuestFrameNumber(slot.baseFrame.rawValue + gfnOffset)
        if writeProtect {
            shadow.writeProtect(base: base, mask: mask)
        } else {
            shadow.clearDirty(base: base, mask: mask)
        }
    }

    /// `kvm_memslots_have_rmaps` under TDP: the shadow MMU, when it has pages (L2's `guest_mmu`).
    var rmapsPresent: ShadowMMU? {
        guard let shadowRmaps, shadowRmaps.usedPages > 0 else { return nil }
        return shadowRmaps
    }

    private func checkMaskRange(_ slot: Memslot, gfnOffset: UInt64, mask: UInt64) throws(TDPMMUError) {
        guard mask != 0 else { return }
        let last = gfnOffset + UInt64(63 - mask.leadingZeroBitCount)
        guard last < slot.pageCount else {
            throw .invalidDirtyLogRange(slot: slot.id, firstPage: gfnOffset, pages: UInt64(64 - mask.leadingZeroBitCount))
        }
    }

    /// `clear_dirty_pt_masked` over the valid roots. Huge leaves are left alone: in a logged slot
    /// they are never writable (see `enableLogDirtyMaskedLocked`).
    func clearDirtyMaskedLocked(_ slot: Memslot, gfnOffset: UInt64, mask: UInt64, writeProtect: Bool) {
        guard mask != 0 else { return }
        let base = slot.baseFrame.rawValue + gfnOffset
        for root in rootsToVisit(validOnly: true) {
            let dirtyBit = writeProtect || needsWriteProtectForDirtyLog(root) ? SPTE.writableBit : masks.dirty
            var remaining = mask
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1,
                                       start: base + UInt64(mask.trailingZeroBitCount), end: base + 64, pool: pool)
            while iterator.isValid && remaining != 0 {
                let old = iterator.oldSPTE
                defer { iterator.next() }
                guard old.isShadowPresent, old.isLast(level: iterator.level), iterator.level == KVMLevel.pageTable else { continue }
                let bit = UInt64(1) << (iterator.gfn - base)
                guard remaining & bit != 0 else { continue }
                remaining &= ~bit
                guard Self.dirtyStateCleared(old, dirtyBit: dirtyBit) != nil else { continue }
                if dirtyBit == masks.dirty && old.needsADWriteProtect {
                    warn("clearing D of \(old.describe(masks)), which needs write protection instead")
                }
                // Atomic: the processor may set A or D (or the fast path W) meanwhile; a lost
                // exchange leaves what is there now in `before`, and the loop tries again.
                var before = old
                while let cleaned = Self.dirtyStateCleared(before, dirtyBit: dirtyBit) {
                    if iterator.slot.compareExchange(expected: &before, desired: cleaned) {
                        events.record(.kvmTDPMMUSPTEChanged(addressSpaceID: 0, gfn: GuestFrameNumber(iterator.gfn), level: 1,
                                                            old: before, new: cleaned))
                        break
                    }
                }
            }
        }
    }

    /// `kvm_arch_mmu_enable_log_dirty_pt_masked`: re-protects the pages of `mask` after their dirty
    /// bits were harvested. In initially-all-set mode the huge pages around the range are split
    /// (eager splitting) and write-protected first, since nothing protected them when logging
    /// began. Lock held for write.
    func enableLogDirtyMaskedLocked(_ metadata: MemslotMetadata, gfnOffset: UInt64, mask: UInt64) {
        guard mask != 0 else { return }
        let slot = metadata.slot
        if configuration.dirtyLogProtection == .manualInitiallySet {
            let start = slot.baseFrame.rawValue + gfnOffset + UInt64(mask.trailingZeroBitCount)
            let end = slot.baseFrame.rawValue + gfnOffset + UInt64(63 - mask.leadingZeroBitCount)
            if configuration.eagerPageSplit {
                splitHugePagesLocked(slot, gfns: start..<end + 1, targetLevel: KVMLevel.pageTable, shared: false)
                rmapsPresent?.splitHugePages(of: slot, gfns: start..<end + 1, targetLevel: KVMLevel.pageTable,
                                             nxHugePages: configuration.nxHugePages)
            }
            slotGFNWriteProtectLocked(start, minLevel: KVMLevel.pageDirectory)
            // The range may straddle two 2M regions (memslots need not be 2M-aligned).
            if start >> 9 != end >> 9 { slotGFNWriteProtectLocked(end, minLevel: KVMLevel.pageDirectory) }
        }
        let writeProtect = configuration.dirtyLogging != .pml
        clearDirtyMaskedLocked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: writeProtect)
        rmapsClearDirtyMasked(slot, gfnOffset: gfnOffset, mask: mask, writeProtect: writeProtect)
    }

    /// `kvm_mmu_slot_gfn_write_protect`: the rmaps' SPTEs and the TDP MMU's leaves mapping `gfn`
    /// from `minLevel` up. Lock held for write.
    private func slotGFNWriteProtectLocked(_ gfn: UInt64, minLevel: Int) {
        rmapsPresent?.writeProtectGFN(GuestFrameNumber(gfn), minLevel: minLevel)
        writeProtectGFNLocked(gfn, minLevel: minLevel)
    }

    /// KVM_GET_DIRTY_LOG (`kvm_get_dirty_log_protect`): the slot's dirty bitmap. With automatic
    /// protection the bitmap is cleared and the reported pages are write-protected again (or their D
    /// bits cleared with PML) in the same step; with manual protection it is only copied. Takes the
    /// lock for write.
    public func getDirtyLog(slot id: Int) throws(TDPMMUError) -> [UInt64] {
        try withExclusiveLock { () throws(TDPMMUError) -> [UInt64] in
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            if configuration.dirtyLogProtection != .automatic {
                do throws(MemslotError) { return try memory.dirtyBitmap(slot: id) } catch { throw .memslot(error) }
            }
            let bitmap: [UInt64]
            do throws(MemslotError) { bitmap = try memory.getAndClearDirtyLog(slot: id) } catch { throw .memslot(error) }
            var flush = false
            for (word, mask) in bitmap.enumerated() where mask != 0 {
                enableLogDirtyMaskedLocked(metadata, gfnOffset: UInt64(word) * 64, mask: mask)
                flush = true
            }
            if flush { requestRemoteTLBFlush() }
            return bitmap
        }
    }

    /// KVM_CLEAR_DIRTY_LOG (`kvm_clear_dirty_log_protect`), manual protection only: clears the bits
    /// of `bitmap` (bit `i` of word `w` is page `firstPage + 64 * w + i` of the slot) that are set
    /// in the dirty bitmap and re-protects those pages. `firstPage` must be a multiple of 64 and the
    /// range a multiple of 64 pages unless it ends at the slot's end. Takes the lock for write.
    public func clearDirtyLog(slot id: Int, firstPage: UInt64, bitmap: [UInt64]) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            guard configuration.dirtyLogProtection != .automatic else {
                throw .invalidConfiguration("KVM_CLEAR_DIRTY_LOG needs manual dirty-log protection")
            }
            let pages = UInt64(bitmap.count) * 64
            let slotPages = metadata.slot.pageCount
            guard firstPage % 64 == 0, firstPage < slotPages, pages > 0,
                  firstPage + pages <= slotPages || (firstPage + pages - slotPages < 64)
            else { throw .invalidDirtyLogRange(slot: id, firstPage: firstPage, pages: pages) }
            var flush = false
            for (word, requested) in bitmap.enumerated() where requested != 0 {
                let offset = firstPage + UInt64(word) * 64
                let cleared: UInt64
                do throws(MemslotError) { cleared = try memory.clearDirty(slot: id, firstPage: offset, mask: requested) } catch { throw .memslot(error) }
                guard cleared != 0 else { continue }
                enableLogDirtyMaskedLocked(metadata, gfnOffset: offset, mask: cleared)
                flush = true
            }
            if flush { requestRemoteTLBFlush() }
        }
    }

    // MARK: One gfn

    /// `kvm_tdp_mmu_write_protect_gfn`: W and MMU-writable cleared in the leaves at or above
    /// `minLevel` mapping `gfn` in valid roots, so that every write faults to the slow path. Whether
    /// anything changed. Lock held for write.
    @discardableResult
    func writeProtectGFNLocked(_ gfn: UInt64, minLevel: Int) -> Bool {
        var changed = false
        for root in rootsToVisit(validOnly: true) {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: minLevel, start: gfn, end: gfn + 1,
                                       pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                if old.isShadowPresent && old.isLast(level: iterator.level) {
                    // Without MMU-writable a leaf must not keep SPP's grant of writes either.
                    let new = SPTE(old.rawValue & ~(SPTE.writableBit | masks.mmuWritable | SPTE.subPagePermissionBit
                                                    | SPTE.savedSubPagePermissionBit))
                    if new != old {
                        setSPTE(&iterator, new)
                        changed = true
                    }
                }
                iterator.next()
            }
        }
        return changed
    }

    // MARK: Eager page splitting

    /// `kvm_tdp_mmu_try_split_huge_pages`: every huge leaf of a valid root mapping `gfns` (the
    /// whole slot by default) is split down to `targetLevel` (1G -> 2M -> 4K when the target is 1).
    /// No TLB flush: the smaller mappings translate exactly as the huge one. Takes the lock for read.
    public func splitHugePages(slot id: Int, gfns: Range<UInt64>? = nil, targetLevel: Int) throws(TDPMMUError) {
        guard (KVMLevel.pageTable...KVMLevel.pageDirectory).contains(targetLevel) else {
            throw .invalidLevel(targetLevel, "huge pages split down to level 1 or 2")
        }
        try withSharedLock { () throws(TDPMMUError) in
            let slot = try existingSlot(id)
            let range = gfns ?? slot.baseFrame.rawValue..<slot.endFrame.rawValue
            try splitHugePagesChecked(slot, gfns: range, targetLevel: targetLevel, shared: true)
        }
    }

    /// Splitting that cannot report a lack of memory (KVM gives up silently, leaving the rest huge:
    /// dirty logging still works, the huge pages split on the first write).
    func splitHugePagesLocked(_ slot: Memslot, gfns: Range<UInt64>, targetLevel: Int, shared: Bool) {
        do {
            try splitHugePagesChecked(slot, gfns: gfns, targetLevel: targetLevel, shared: shared)
        } catch {
            warn("eager page splitting stopped: \(error)")
        }
    }

    /// `tdp_mmu_split_huge_pages_root` over the valid roots.
    private func splitHugePagesChecked(_ slot: Memslot, gfns: Range<UInt64>, targetLevel: Int,
                                       shared: Bool) throws(TDPMMUError) {
        for root in rootsToVisit(validOnly: true) {
            var spare: TDPPage?
            defer { if let spare { freeUnpublishedPageTable(spare) } }
            // Pre-order: after a 1G leaf becomes a table of 2M leaves the walk steps into it and
            // splits those too.
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: targetLevel + 1,
                                       start: gfns.lowerBound, end: gfns.upperBound, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                guard old.isShadowPresent && old.isLarge else {
                    iterator.next()
                    continue
                }
                let page: TDPPage
                if let spare {
                    page = spare
                } else {
                    do {
                        page = try allocatePageTable(role: role(root.role, level: iterator.level - 1), gfn: iterator.gfn,
                                                     parent: iterator.sptep, nxHugePageDisallowed: false)
                    } catch {
                        events.record(.kvmMMUSplitHugePage(gfn: GuestFrameNumber(iterator.gfn), spte: old,
                                                           level: iterator.level, errno: -12))
                        throw error
                    }
                }
                page.initialize(role: role(root.role, level: iterator.level - 1), gfn: iterator.gfn, parent: iterator.sptep,
                                nxHugePageDisallowed: false)
                spare = page
                // A lost race: look at the SPTE again, keeping the table for it.
                if !splitHugePage(&iterator, into: page, shared: shared) { continue }
                spare = nil
                iterator.next()
            }
        }
    }

    // MARK: Recovering huge pages

    /// `kvm_tdp_mmu_zap_collapsible_sptes` (`kvm_mmu_recover_huge_pages`): after dirty logging
    /// stops, every table (2M or 1G level) of the slot whose range a huge page could now map is
    /// zapped, so the next fault maps it huge. Takes the lock for read.
    public func recoverHugePages(slot id: Int) throws(TDPMMUError) {
        try withSharedLock { () throws(TDPMMUError) in
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            recoverHugePagesLocked(metadata)
        }
    }

    func recoverHugePagesLocked(_ metadata: MemslotMetadata) {
        let slot = metadata.slot
        let start = slot.baseFrame.rawValue, end = slot.endFrame.rawValue
        for root in rootsToVisit(validOnly: true) {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: KVMLevel.pageDirectory,
                                       start: start, end: end, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                // Leaves stay: had a leaf's range been able to map huge, its parent would have been
                // zapped before the walk came down to it. A table straddling the slot's edge cannot.
                guard iterator.level <= KVMLevel.pageDirectoryPointer, old.isShadowPresent,
                      !old.isLast(level: iterator.level), iterator.gfn >= start, iterator.gfn < end,
                      metadata.maxMappingLevel(iterator.gfn, maxLevel: configuration.maxHugePageLevel) >= iterator.level,
                      (subPageProtection?.maxMappingLevel(for: GuestFrameNumber(iterator.gfn), limit: iterator.level)
                        ?? iterator.level) >= iterator.level
                else {
                    iterator.next()
                    continue
                }
                if !zapSPTEAtomic(&iterator) { continue }
                iterator.next()
            }
        }
    }

    /// The slot with `id`, or an error.
    func existingSlot(_ id: Int) throws(TDPMMUError) -> Memslot {
        guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
        return metadata.slot
    }
}
