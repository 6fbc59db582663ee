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

    /// The A/D type of a new leaf in `page` (`make_spte`): disabled with `role.ad_disabled`,
    /// write-protect-only for L2's pages when the CPU logs dirty pages itself
    /// (`kvm_mmu_page_ad_need_write_protect`: PML would log L2's guest-physical addresses, so
    /// vmcs02 runs without it and L2's writes are caught by write protection), else enabled.
    func leafADState(_ role: PageRole) -> SPTE.ADState {
        if role.adDisabled { return .disabled }
        return cpuDirtyLogging && role.guestMode ? .wrprotOnly : .enabled
    }
}
