// Memslot changes as the TDP MMU sees them (x86.c kvm_arch_prepare/commit_memory_region,
// kvm_mmu_slot_apply_flags, kvm_arch_flush_shadow_memslot; mmu.c kvm_mmu_invalidate_mmio_sptes),
// gfn write tracking (page_track.c), and aging (tdp_mmu.c age_gfn_range, test_age_gfn).

import GuestMemory
import X86Paging

extension TDPMMU {
    // MARK: Memslots

    /// Adds a memslot (KVM_MR_CREATE) with `hostMapping` as the largest page the host maps it with,
    /// and its host frames placed as `MemslotSet.addSlot` places them (`hostAlignment`, `hostSkew`:
    /// huge pages need guest and host frames aligned alike). Existing SPTEs need nothing: MMIO SPTEs
    /// of its gfns carry an older memslots generation. Takes the lock for write.
    @discardableResult
    public func addMemslot(id: Int, base: GuestPhysicalAddress, size: UInt64, flags: MemslotFlags = [],
                           hostMapping: HostMappingSize = .oneGiB, hostAlignment: UInt64 = 1,
                           hostSkew: UInt64 = 0) throws(TDPMMUError) -> Memslot {
        try withExclusiveLock { () throws(TDPMMUError) -> Memslot in
            try checkMemslotsUnchanged()
            let slot: Memslot
            do throws(MemslotError) { slot = try memory.addSlot(id: id, base: base, size: size, flags: flags, hostAlignment: hostAlignment,
                                                                  hostSkew: hostSkew) } catch { throw .memslot(error) }
            if slot.logsDirtyPages && configuration.dirtyLogProtection == .manualInitiallySet {
                do throws(MemslotError) { try memory.markAllDirty(slot: id) } catch { throw .memslot(error) }
            }
            insertMetadata(MemslotMetadata(slot: slot, hostMapping: hostMapping))
            memslotsChanged()
            return slot
        }
    }

    /// Deletes a memslot (KVM_MR_DELETE): its SPTEs go before its host frames return to the pool,
    /// every root's with KVM_X86_QUIRK_SLOT_ZAP_ALL (`kvm_mmu_zap_all_fast`: roots invalidated,
    /// vCPUs told to drop them, the invalid roots zapped at once), else only the slot's leaves in
    /// every root. Takes the lock for write.
    public func deleteMemslot(id: Int) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            try checkMemslotsUnchanged()
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            let slot = metadata.slot
            if configuration.zapAllOnMemslotDeletion {
                invalidateAllRootsLocked()
                freeObsoleteRoots()
                zapInvalidatedRootsLocked(shared: false)
            } else if zapLeaves(slot.baseFrame.rawValue..<slot.endFrame.rawValue, roots: rootsToVisit(validOnly: false)) {
                requestRemoteTLBFlush()
            }
            do throws(MemslotError) { try memory.deleteSlot(id: id) } catch { throw .memslot(error) }
            slotIndex.removeAll { $0 === metadata }
            subPageProtection?.memslotDeleted(id: id)
            memslotsChanged()
        }
    }

    /// Moves a memslot (KVM_MR_MOVE): the same host memory at another guest-physical base. KVM
    /// flushes the old slot as for a deletion (`kvm_arch_flush_shadow_memslot`: every root with
    /// KVM_X86_QUIRK_SLOT_ZAP_ALL, else the slot's leaves) and gives the new slot fresh metadata
    /// (`lpage_info`, write tracking), as `kvm_arch_prepare_memory_region` does for a move. Takes the
    /// lock for write.
    @discardableResult
    public func moveMemslot(id: Int, to base: GuestPhysicalAddress) throws(TDPMMUError) -> Memslot {
        try withExclusiveLock { () throws(TDPMMUError) -> Memslot in
            try checkMemslotsUnchanged()
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            let old = metadata.slot
            guard base != old.baseAddress else { return old }
            if let protection = subPageProtection {
                do throws(SubPageProtectionError) {
                    try protection.validateMemslotMove(id: id, to: base)
                } catch {
                    throw .subPageProtection(error)
                }
            }
            if configuration.zapAllOnMemslotDeletion {
                invalidateAllRootsLocked()
                freeObsoleteRoots()
                zapInvalidatedRootsLocked(shared: false)
            } else if zapLeaves(old.baseFrame.rawValue..<old.endFrame.rawValue, roots: rootsToVisit(validOnly: false)) {
                requestRemoteTLBFlush()
            }
            let moved: Memslot
            do throws(MemslotError) { moved = try memory.moveSlot(id: id, to: base) } catch { throw .memslot(error) }
            slotIndex.removeAll { $0 === metadata }
            insertMetadata(MemslotMetadata(slot: moved, hostMapping: metadata.hostMapping))
            // The pages keep their permissions at their new addresses.
            subPageProtection?.memslotMoved(id: id)
            memslotsChanged()
            return moved
        }
    }

    /// Changes a memslot's flags (KVM_MR_FLAGS_ONLY) and applies what that means to the SPTEs
    /// (`kvm_mmu_slot_apply_flags`). Turning dirty logging on: nothing more in initially-all-set
    /// mode (every bit starts set); otherwise eager splitting to 4K if enabled, then with PML the
    /// D bits of every leaf are cleared and huge leaves write-protected, without PML every leaf is
    /// write-protected; then a TLB flush. Turning it off: huge pages are recovered. The flag change
    /// takes the lock for write, the SPTE work for read, as in KVM (faults may run in between and
    /// see the new flags).
    public func setMemslotFlags(id: Int, flags: MemslotFlags) throws(TDPMMUError) {
        let (old, new) = try withExclusiveLock { () throws(TDPMMUError) -> (Memslot, Memslot) in
            try checkMemslotsUnchanged()
            guard let metadata = slotMetadata(id: id) else { throw .noSuchMemslot(id) }
            let old = metadata.slot
            do throws(MemslotError) { try memory.setFlags(id: id, flags: flags) } catch { throw .memslot(error) }
            guard let new = memory.slot(id: id) else { throw .noSuchMemslot(id) }
            metadata.slot = new
            if new.logsDirtyPages && !old.logsDirtyPages && configuration.dirtyLogProtection == .manualInitiallySet {
                do throws(MemslotError) { try memory.markAllDirty(slot: id) } catch { throw .memslot(error) }
            }
            if new != old { memslotsChanged() }
            if old.logsDirtyPages != new.logsDirtyPages, !new.isReadOnly, let shadow = rmapsPresent {
                applyFlagsToRmaps(shadow, metadata)
            }
            return (old, new)
        }
        guard old.logsDirtyPages != new.logsDirtyPages, !new.isReadOnly else { return }
        withSharedLock {
            // The slot cannot change meanwhile: memslot changes take the lock for write.
            guard let metadata = slotMetadata(id: id), metadata.slot == new else { return }
            if new.logsDirtyPages {
                guard configuration.dirtyLogProtection != .manualInitiallySet else { return }
                if configuration.eagerPageSplit {
                    splitHugePagesLocked(new, gfns: new.baseFrame.rawValue..<new.endFrame.rawValue,
                                         targetLevel: KVMLevel.pageTable, shared: true)
                }
                if configuration.dirtyLogging == .pml {
                    _ = clearDirtySlotLocked(new)
                    _ = writeProtectSlotLocked(new, minLevel: KVMLevel.pageDirectory)
                } else {
                    _ = writeProtectSlotLocked(new, minLevel: KVMLevel.pageTable)
                }
                requestRemoteTLBFlush()
            } else {
                recoverHugePagesLocked(metadata)
            }
        }
    }

    /// `kvm_mmu_slot_apply_flags`'s rmap half, before the TDP MMU's (KVM takes mmu_lock for
    /// write for it). Logging on: with eager splitting the huge leaves are split to 4K
    /// (`kvm_shadow_mmu_try_split_huge_pages`), then the slot's SPTEs are write-protected (with
    /// PML, the 4K leaves' dirty state is cleared and the huge ones write-protected); nothing in
    /// initially-all-set mode. Logging off: the split leaves that could map huge again are zapped
    /// (`kvm_rmap_zap_collapsible_sptes`), with a remote TLB flush if any were.
    private func applyFlagsToRmaps(_ shadow: ShadowMMU, _ metadata: MemslotMetadata) {
        let new = metadata.slot
        guard new.logsDirtyPages else {
            let maxLevel = configuration.maxHugePageLevel
            if shadow.zapCollapsibleSPTEs(of: new, maxLevel: { metadata.maxMappingLevel($0.rawValue, maxLevel: maxLevel) }) {
                requestRemoteTLBFlush()
            }
            return
        }
        guard configuration.dirtyLogProtection != .manualInitiallySet else { return }
        if configuration.eagerPageSplit {
            shadow.splitHugePages(of: new, gfns: new.baseFrame.rawValue..<new.endFrame.rawValue, targetLevel: KVMLevel.pageTable,
                                  nxHugePages: configuration.nxHugePages)
        }
        // No flush here: enabling logging ends with one unconditional flush for both MMUs (below).
        if configuration.dirtyLogging == .pml {
            shadow.clearDirty(of: new)
            shadow.removeWriteAccess(from: new, minLevel: KVMLevel.pageDirectory)
        } else {
            shadow.removeWriteAccess(from: new, minLevel: KVMLevel.pageTable)
        }
    }

    /// The host mapping size the slot was given.
    public func hostMapping(ofSlot id: Int) -> HostMappingSize? {
        lock.withReadLock { slotMetadata(id: id)?.hostMapping }
    }

    private func insertMetadata(_ metadata: MemslotMetadata) {
        let index = slotIndex.firstIndex { $0.slot.baseFrame > metadata.slot.baseFrame } ?? slotIndex.count
        slotIndex.insert(metadata, at: index)
    }

    /// After a layout or flag change, lock held for write: MMIO SPTEs hold 19 generation bits; when
    /// those wrap to 0, an old MMIO SPTE could pass for current, so every root goes
    /// (`kvm_mmu_invalidate_mmio_sptes`).
    private func memslotsChanged() {
        knownGeneration = memory.generation
        if knownGeneration & SPTE.mmioGenerationMask == 0 {
            invalidateAllRootsLocked()
            freeObsoleteRoots()
            zapInvalidatedRootsLocked(shared: false)
        }
    }

    // MARK: Write tracking and huge-page accounting

    /// `kvm_write_track_add_gfn`: writes to `gfn` must reach the emulator (a shadowed guest page
    /// table, an external tracker): no huge page may map it, and its leaves lose W and MMU-writable
    /// now. Takes the lock for write.
    public func addWriteTrack(_ gfn: UInt64) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in try addWriteTrackLocked(gfn) }
    }

    /// `addWriteTrack` with the lock already held for write (the shadow MMU's `account_shadowed`
    /// of a `guest_mmu` page, which runs under it).
    func addWriteTrackLocked(_ gfn: UInt64) throws(TDPMMUError) {
        guard let metadata = slotMetadata(containing: gfn) else { throw .gfnNotInMemslot(gfn) }
        guard metadata.updateWriteTrack(gfn, delta: 1) else { throw .countOutOfRange(gfn: gfn, "write-track count overflows") }
        guard metadata.updateDisallowCount(gfn, delta: 1) else {
            _ = metadata.updateWriteTrack(gfn, delta: -1)
            throw .countOutOfRange(gfn: gfn, "huge-page disallow count overflows")
        }
        if writeProtectGFNLocked(gfn, minLevel: KVMLevel.pageTable) { requestRemoteTLBFlush() }
    }

    /// `kvm_write_track_remove_gfn`. Takes the lock for write.
    public func removeWriteTrack(_ gfn: UInt64) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in try removeWriteTrackLocked(gfn) }
    }

    /// `removeWriteTrack` with the lock already held for write.
    func removeWriteTrackLocked(_ gfn: UInt64) throws(TDPMMUError) {
        guard let metadata = slotMetadata(containing: gfn) else { throw .gfnNotInMemslot(gfn) }
        guard metadata.writeTrackCount(gfn) > 0 else { throw .countOutOfRange(gfn: gfn, "the gfn is not write-tracked") }
        _ = metadata.updateWriteTrack(gfn, delta: -1)
        guard metadata.updateDisallowCount(gfn, delta: -1) else {
            warn("huge-page disallow count of gfn \(hex(gfn)) was below its write tracking")
            return
        }
    }

    /// `kvm_gfn_is_write_tracked`.
    public func isWriteTracked(_ gfn: UInt64) -> Bool {
        lock.withReadLock { slotMetadata(containing: gfn)?.isWriteTracked(gfn) ?? false }
    }

    /// `update_gfn_disallow_lpage_count`: adds `delta` to the 2M and 1G disallow counts of `gfn`'s
    /// regions (KVM's account_shadowed does +1 for a shadowed guest page table). Existing huge
    /// mappings are not touched: whoever forbids them write-protects or zaps what it needs. Takes
    /// the lock for write.
    public func updateGFNDisallowLpageCount(_ gfn: UInt64, delta: Int) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in try updateGFNDisallowLpageCountLocked(gfn, delta: delta) }
    }

    /// `updateGFNDisallowLpageCount` with the lock already held for write (the shadow MMU's
    /// `account_shadowed` of a last-level `guest_mmu` page).
    func updateGFNDisallowLpageCountLocked(_ gfn: UInt64, delta: Int) throws(TDPMMUError) {
        guard let metadata = slotMetadata(containing: gfn) else { throw .gfnNotInMemslot(gfn) }
        guard let change = Int32(exactly: delta), metadata.updateDisallowCount(gfn, delta: change) else {
            throw .countOutOfRange(gfn: gfn, "disallow count \(delta > 0 ? "overflows" : "would go negative")")
        }
    }

    /// `kvm_mmu_max_mapping_level` for `gfn` as a fault would see it now (ignoring dirty logging and
    /// NX, which the fault adds), or nil for MMIO.
    public func maxMappingLevel(_ gfn: UInt64) -> Int? {
        lock.withReadLock { slotMetadata(containing: gfn)?.maxMappingLevel(gfn, maxLevel: configuration.maxHugePageLevel) }
    }

    // MARK: Aging

    /// `kvm_tdp_mmu_age_gfn_range` (the MMU notifiers' clear_young): every accessed leaf mapping a
    /// gfn of `gfns`, in every root, loses its accessed state (A cleared; with A/D disabled the SPTE
    /// is access-tracked: RWX saved and cleared, so the next access faults). Whether any was
    /// accessed. No TLB flush, as in KVM. Takes the lock for read and changes SPTEs atomically.
    @discardableResult
    public func ageGFNRange(_ gfns: Range<UInt64>) -> Bool {
        guard !gfns.isEmpty else { return false }
        return withSharedLock { () -> Bool in
            var young = false
            for root in rootsToVisit(validOnly: false) {
                var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: gfns.lowerBound,
                                           end: gfns.upperBound, pool: pool)
                while iterator.isValid {
                    let old = iterator.oldSPTE
                    guard old.isShadowPresent, old.isLast(level: iterator.level), old.isAccessed(masks) else {
                        iterator.next()
                        continue
                    }
                    let new: SPTE
                    if old.isADEnabled {
                        new = SPTE(iterator.slot.clearBits(masks.accessed).rawValue & ~masks.accessed)
                    } else {
                        // KVM records the host page dirty here before W goes; the model has no host
                        // page flags, and a W granted earlier was already logged.
                        new = old.markedForAccessTrack(masks)
                        var expected = old
                        beforeAtomicUpdate?(iterator.slot, iterator.level)
                        if !iterator.slot.compareExchange(expected: &expected, desired: new) {
                            iterator.oldSPTE = expected
                            continue
                        }
                    }
                    young = true
                    events.record(.kvmTDPMMUSPTEChanged(addressSpaceID: 0, gfn: GuestFrameNumber(iterator.gfn),
                                                        level: iterator.level, old: old, new: new))
                    iterator.next()
                }
            }
            return young
        }
    }

    /// `kvm_tdp_mmu_test_age_gfn`: whether any leaf mapping a gfn of `gfns` is accessed. Takes the
    /// lock for read.
    public func testAgeGFNRange(_ gfns: Range<UInt64>) -> Bool {
        guard !gfns.isEmpty else { return false }
        return withSharedLock { () -> Bool in
            for root in rootsToVisit(validOnly: false) {
                var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: gfns.lowerBound,
                                           end: gfns.upperBound, pool: pool)
                while iterator.isValid {
                    let spte = iterator.oldSPTE
                    if spte.isShadowPresent && spte.isLast(level: iterator.level) && spte.isAccessed(masks) { return true }
                    iterator.next()
                }
            }
            return false
        }
    }
}
