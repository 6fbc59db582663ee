import GuestMemory
import X86Paging

// The shadow MMU's part of memslot changes and dirty logging (x86.c `kvm_mmu_slot_apply_flags`,
// `kvm_arch_flush_shadow_memslot`; mmu.c `kvm_mmu_slot_remove_write_access`,
// `kvm_mmu_slot_leaf_clear_dirty`, `kvm_mmu_write_protect_pt_masked`,
// `kvm_mmu_clear_dirty_pt_masked`, `kvm_arch_mmu_enable_log_dirty_pt_masked`), walking the rmaps.
// Under shadow paging these are the whole story; under TDP they are the rmap half KVM runs next
// to the TDP MMU's once `guest_mmu` has shadow pages (`kvm_memslots_have_rmaps`), and the TDP
// MMU calls them under its lock held for write (`TDPMMU.shadowRmaps`).

extension ShadowMMU {
    /// `kvm_mmu_slot_remove_write_access`'s rmap walk (`slot_rmap_write_protect` over the levels
    /// from `minLevel` up): every SPTE mapping a gfn of `slot` loses W. They keep MMU-writable, so
    /// the next write fault makes the SPTE writable again and marks the gfn dirty. True when
    /// something changed (the caller flushes the TLBs of the slot).
    @discardableResult
    public func removeWriteAccess(from slot: Memslot, minLevel: Int = 1) -> Bool {
        writeProtect(gfns: slot.baseFrame.rawValue..<slot.endFrame.rawValue, minLevel: minLevel)
    }

    /// `kvm_mmu_slot_leaf_clear_dirty`'s rmap walk (`__rmap_clear_dirty` over the 4K rmaps of
    /// `slot`): the dirty state of every 4K leaf goes, D for SPTEs whose A/D type is "enabled", W
    /// for the rest (A/D disabled, or write-protect-only: L2's SPTEs under PML). True when
    /// something changed.
    @discardableResult
    public func clearDirty(of slot: Memslot) -> Bool {
        var changed = false
        for gfn in slot.baseFrame.rawValue..<slot.endFrame.rawValue where clearDirty(GuestFrameNumber(gfn)) { changed = true }
        return changed
    }

    /// `kvm_mmu_write_protect_pt_masked`'s rmap part: W cleared from the 4K SPTEs of the gfns
    /// `base + i` for each bit i set in `mask`, after a dirty-log read (get-and-reset), clear
    /// (manual protection) or ring reset has taken their bits. True when something changed.
    @discardableResult
    public func writeProtect(base: GuestFrameNumber, mask: UInt64) -> Bool {
        var changed = false
        var bits = mask
        while bits != 0 {
            let gfn = base.rawValue + UInt64(bits.trailingZeroBitCount)
            if writeProtect(gfns: gfn..<gfn + 1, minLevel: 1, maxLevel: 1) { changed = true }
            bits &= bits - 1
        }
        return changed
    }

    /// `kvm_mmu_clear_dirty_pt_masked`'s rmap part (with PML): `__rmap_clear_dirty` on the 4K
    /// SPTEs of the gfns of `mask`. True when something changed.
    @discardableResult
    public func clearDirty(base: GuestFrameNumber, mask: UInt64) -> Bool {
        var changed = false
        var bits = mask
        while bits != 0 {
            if clearDirty(GuestFrameNumber(base.rawValue + UInt64(bits.trailingZeroBitCount))) { changed = true }
            bits &= bits - 1
        }
        return changed
    }

    /// `kvm_mmu_slot_gfn_write_protect`'s rmap part from `minLevel` up: W and MMU-writable
    /// cleared in the SPTEs mapping `gfn` at those levels (a huge one over it included), so that
    /// the next write takes the slow path. True when something changed.
    @discardableResult
    public func writeProtectGFN(_ gfn: GuestFrameNumber, minLevel: Int) -> Bool {
        var changed = false
        for pointer in mappings(of: gfn, minLevel: minLevel) {
            let spte = SPTE(rawValue: pointer.pointee)
            guard spte.isWritable || spte.isMMUWritable(masks) else { continue }
            pointer.pointee = spte.rawValue & ~(SPTE.writableBit | masks.mmuWritable)
            changed = true
        }
        return changed
    }

    /// `spte_write_protect` with `pt_protect` false over `gfns`: W goes, MMU-writable stays. Each
    /// level's rmaps once per region of that level's page size.
    private func writeProtect(gfns: Range<UInt64>, minLevel: Int, maxLevel: Int = 3) -> Bool {
        var changed = false
        guard !gfns.isEmpty else { return false }
        for level in minLevel...maxLevel {
            let pages = pagesPerHugePage(level)
            for regionStart in stride(from: gfns.lowerBound & ~(pages - 1), to: gfns.upperBound, by: Int(pages)) {
                let gfn = GuestFrameNumber(max(regionStart, gfns.lowerBound))
                for pointer in mappings(of: gfn, minLevel: level, maxLevel: level)
                where SPTE(rawValue: pointer.pointee).isWritable {
                    pointer.pointee &= ~SPTE.writableBit
                    changed = true
                }
            }
        }
        return changed
    }

    /// `__rmap_clear_dirty` on the 4K rmap of `gfn`: `spte_wrprot_for_clear_dirty` where the A/D
    /// type asks for write protection, `spte_clear_dirty` (D cleared) where it is "enabled".
    private func clearDirty(_ gfn: GuestFrameNumber) -> Bool {
        var changed = false
        for pointer in mappings(of: gfn, minLevel: 1, maxLevel: 1) {
            let spte = SPTE(rawValue: pointer.pointee)
            let cleaned = spte.needsADWriteProtect ? spte.rawValue & ~SPTE.writableBit : spte.rawValue & ~masks.dirty
            guard cleaned != spte.rawValue else { continue }
            pointer.pointee = cleaned
            changed = true
        }
        return changed
    }

    // MARK: Huge pages (L2's, under a TDP L1)

    /// `kvm_shadow_mmu_try_split_huge_pages`: every huge leaf in the rmaps of `gfns` (of `slot`) is
    /// split down to `targetLevel`, 1 GiB leaves first (their 2 MiB children are split in turn).
    /// Each split takes a shadow page from the cache, as KVM's does, and stops while the cache is
    /// down to KVM_MIN_FREE_MMU_PAGES (-ENOSPC) or the host has no frame left: the leaves left
    /// huge split on their first write instead. Returns the leaves split.
    @discardableResult
    public func splitHugePages(of slot: Memslot, gfns: Range<UInt64>, targetLevel: Int, nxHugePages: Bool) -> Int {
        var split = 0
        let first = max(gfns.lowerBound, slot.baseFrame.rawValue), end = min(gfns.upperBound, slot.endFrame.rawValue)
        guard first < end else { return 0 }
        for level in stride(from: 3, to: targetLevel, by: -1) {
            let pages = pagesPerHugePage(level)
            for regionStart in stride(from: first & ~(pages - 1), to: end, by: Int(pages)) {
                guard let frame = memory.hostFrame(of: GuestFrameNumber(regionStart))?.rawValue else { continue }
                // Each split changes the rmap: look again until no leaf there can be split.
                while let huge = rmaps.sptes(frame, level: level).first(where: { isSplittable($0) }) {
                    guard splitHugeSPTE(huge, nxHugePages: nxHugePages) else { return split }
                    split += 1
                }
            }
        }
        return split
    }

    /// `shadow_mmu_try_split_huge_pages`'s filter: a huge leaf of a valid page (KVM WARNs on the
    /// others, which the rmaps never hold: non-leaves, unsync pages, pages outside guest mode).
    private func isSplittable(_ pointer: SPTEPointer) -> Bool {
        let page = page(containing: pointer)
        return SPTE(rawValue: pointer.pointee).isLarge && page.role.guestMode && !page.unsync && !page.role.isInvalid
    }

    /// `shadow_mmu_try_split_huge_page`: the child page KVM's fault would have made for this huge
    /// leaf (`shadow_mmu_get_sp_for_split`: direct, at the huge leaf's gfn, with its access and
    /// the parent's role otherwise, `kvm_mmu_child_role`), filled with the leaves
    /// `make_huge_page_split_spte` derives from the huge one wherever it has none yet, then
    /// linked in the huge leaf's place (`__link_shadow_page`: no flush, unless the child already
    /// had a non-leaf entry). False when the split could not be made.
    private func splitHugeSPTE(_ pointer: SPTEPointer, nxHugePages: Bool) -> Bool {
        let parent = page(containing: pointer)
        let index = parent.index(of: pointer)
        let huge = SPTE(rawValue: pointer.pointee)
        let gfn = parent.mappedGFN(at: index)
        guard availablePages > Self.minimumFreePages else {
            events.record(.kvmMMUSplitHugePage(gfn: gfn, spte: huge, level: parent.level, errno: -28))
            return false
        }
        let role = variant.childRole(of: parent.role, parentIndex: index, direct: true, access: parent.mappedAccess(at: index))
        let child: ShadowPage
        do {
            child = try getShadowPage(gfn, role, for: nil).page
        } catch {
            events.record(.kvmMMUSplitHugePage(gfn: gfn, spte: huge, level: parent.level, errno: -12))
            return false
        }
        var flush = false
        for childIndex in 0..<KVMLevel.entriesPerPage {
            let entry = child.spte(childIndex)
            let existing = SPTE(rawValue: entry.pointee)
            if existing.isShadowPresent {
                if !existing.isLast(level: child.level) { flush = true }
                continue
            }
            entry.pointee = huge.smallSPTE(index: childIndex, childLevel: child.level, roleAccess: role.access,
                                           nxHugePages: nxHugePages, masks: masks).rawValue
            rmapAdd(entry, in: child, gfn: child.mappedGFN(at: childIndex), access: role.access)
        }
        link(pointer, to: child, flushingLargeSPTE: flush)
        events.record(.kvmMMUSplitHugePage(gfn: gfn, spte: huge, level: parent.level, errno: 0))
        return true
    }

    /// `kvm_rmap_zap_collapsible_sptes` (dirty logging turned off): every leaf below 1 GiB of a
    /// direct page (one that splits an L1 huge page) whose region `maxLevel(gfn)` now lets map
    /// larger is zapped, so that the next fault maps it huge again. True when any went (the
    /// caller flushes).
    @discardableResult
    public func zapCollapsibleSPTEs(of slot: Memslot, maxLevel: (GuestFrameNumber) -> Int) -> Bool {
        var zapped = false
        for level in 1..<3 {
            let pages = pagesPerHugePage(level)
            for gfn in stride(from: slot.baseFrame.rawValue & ~(pages - 1), to: slot.endFrame.rawValue, by: Int(pages)) {
                for pointer in mappings(of: GuestFrameNumber(max(gfn, slot.baseFrame.rawValue)), minLevel: level, maxLevel: level) {
                    let page = page(containing: pointer)
                    guard page.role.isDirect, SPTE(rawValue: pointer.pointee).isShadowPresent,
                          page.level < maxLevel(page.gfn) else { continue }
                    dropSPTE(pointer)
                    zapped = true
                }
            }
        }
        return zapped
    }

    /// The A/D type of a new leaf in `page` (`make_spte`): disabled with `role.ad_disabled`,
    /// write-protect-only for L2's pages when the CPU logs dirty pages itself
    /// (`kvm_mmu_page_ad_need_write_protect`: PML would log L2's guest-physical addresses, so
    /// vmcs02 runs without it and L2's writes are caught by write protection), else enabled.
    func leafADState(_ role: PageRole) -> SPTE.ADState {
        if role.adDisabled { return .disabled }
        return cpuDirtyLogging && role.guestMode ? .wrprotOnly : .enabled
    }
}
