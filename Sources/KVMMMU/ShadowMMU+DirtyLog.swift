import GuestMemory
import X86Paging

// The shadow MMU's part of memslot changes and dirty logging (x86.c `kvm_mmu_slot_apply_flags`,
// `kvm_arch_flush_shadow_memslot`, `kvm_arch_mmu_enable_log_dirty_pt_masked`). Shadow paging has
// no PML (it needs EPT), so dirty logging write-protects; and the shadow MMU maps guest memory with
// 4 KiB leaves only, so there are no huge pages to split or recover.

extension ShadowMMU {
    /// `kvm_mmu_slot_remove_write_access` at 4 KiB: every SPTE mapping a gfn of `slot` loses W. They
    /// keep MMU-writable, so the next write fault makes the SPTE writable again and marks the gfn
    /// dirty. True when something changed (the caller flushes the TLBs of the slot).
    @discardableResult
    public func removeWriteAccess(from slot: Memslot) -> Bool {
        writeProtect(gfns: slot.baseFrame.rawValue..<slot.endFrame.rawValue)
    }

    /// `kvm_mmu_write_protect_pt_masked`: W cleared from the SPTEs of the gfns `base + i` for each
    /// bit i set in `mask`, after a dirty-log read (get-and-reset) or clear (manual protection)
    /// has taken their bits. True when something changed.
    @discardableResult
    public func writeProtect(base: GuestFrameNumber, mask: UInt64) -> Bool {
        var changed = false
        var bits = mask
        while bits != 0 {
            let gfn = base.rawValue + UInt64(bits.trailingZeroBitCount)
            if writeProtect(gfns: gfn..<gfn + 1) { changed = true }
            bits &= bits - 1
        }
        return changed
    }

    /// `spte_write_protect` with `pt_protect` false over `gfns`: W goes, MMU-writable stays.
    private func writeProtect(gfns: Range<UInt64>) -> Bool {
        var changed = false
        for gfn in gfns {
            for pointer in mappings(of: GuestFrameNumber(gfn)) where SPTE(rawValue: pointer.pointee).isWritable {
                pointer.pointee &= ~SPTE.writableBit
                changed = true
            }
        }
        return changed
    }
}
