import GuestMemory
import X86Paging

// The shadow MMU's half of the MMU notifiers' aging (`kvm_rmap_age_gfn_range`): what idle-page
// tracking and the host's page reclaim ask of KVM through clear_young and test_young. Under a TDP
// L1 the shadow MMU holds `guest_mmu`'s leaves for L2, found by L1 gfn through the rmaps.

extension ShadowMMU {
    /// `kvm_rmap_age_gfn_range`: whether any leaf mapping a gfn of `gfns` (at any level) is
    /// accessed; unless `testOnly`, each such leaf also loses its accessed state: A cleared, or an
    /// A/D-disabled leaf access-tracked (RWX saved and cleared, so the next access faults and the
    /// fast path restores it). No TLB flush, as in KVM: a translation cached meanwhile makes an
    /// access that does not reach the SPTE.
    @discardableResult
    public func ageGFNRange(_ gfns: Range<UInt64>, testOnly: Bool = false) -> Bool {
        var young = false
        // Only gfns in a memslot have rmaps: the walk is bounded by guest memory, whatever the range.
        for slot in memory.slots {
            let first = max(gfns.lowerBound, slot.baseFrame.rawValue)
            let end = min(gfns.upperBound, slot.baseFrame.rawValue + slot.pageCount)
            guard first < end else { continue }
            for level in 1...3 {
                // A huge leaf is in the rmap of the frame its region starts at.
                let regionPages = pagesPerHugePage(level)
                var region = first & ~(regionPages - 1)
                while region < end {
                    if let frame = memory.hostFrame(of: GuestFrameNumber(region)) {
                        for pointer in rmaps.sptes(frame.rawValue, level: level) {
                            let spte = SPTE(rawValue: pointer.pointee)
                            guard spte.isShadowPresent, spte.isAccessed(masks) else { continue }
                            if testOnly { return true }
                            pointer.pointee = spte.isADEnabled
                                ? spte.rawValue & ~masks.accessed : spte.markedForAccessTrack(masks).rawValue
                            young = true
                        }
                    }
                    region += regionPages
                }
            }
        }
        return young
    }
}
