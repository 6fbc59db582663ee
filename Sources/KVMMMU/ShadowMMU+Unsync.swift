import GuestMemory
import X86Paging

// Unsync shadow pages (KVM's `kvm_unsync_page`, `mark_unsync`, `mmu_unsync_walk`): a last-level
// guest table the guest writes to is left writable instead of being write-protected, and its
// shadow page is brought up to date from the guest entries when the guest invalidates its TLB.

extension ShadowMMU {
    /// KVM's `mmu_try_to_unsync_pages`, asked when a writable SPTE is made for `gfn`: true when
    /// the SPTE must stay read-only instead. A gfn holding an upper-level guest table always stays
    /// write-protected; one holding last-level tables does too while syncing (`canUnsync` false)
    /// or for a prefetch that would have to unsync a page; otherwise its shadow pages go unsync.
    func mustWriteProtect(_ gfn: GuestFrameNumber, canUnsync: Bool, prefetch: Bool) -> Bool {
        // `isWriteTracked` and `hasShadowedTable` with one memslot lookup: this runs for every
        // writable SPTE made, a sync's included.
        guard let frame = memory.hostFrame(of: gfn)?.rawValue else { return false }
        if writeTrack[frame] != 0 { return true }
        guard shadowedTableCount[frame] != 0 else { return false }
        for page in hashBuckets[Self.bucket(gfn)] where page.gfn == gfn && page.hasGPTEs && !isObsolete(page) {
            if !canUnsync { return true }
            if page.unsync { continue }
            if prefetch { return true }
            unsync(page)
        }
        return false
    }

    /// `kvm_unsync_page`.
    func unsync(_ page: ShadowPage) {
        page.unsync = true
        stats.mmuUnsync += 1
        events.record(.kvmMMUUnsyncPage(gfn: page.gfn, role: page.role))
        markParentsUnsync(page)
    }

    /// `kvm_unlink_unsync_page`: the page is in sync again (or going away).
    func unlinkUnsync(_ page: ShadowPage) {
        guard page.unsync else { return }
        page.unsync = false
        stats.mmuUnsync -= 1
    }

    /// `kvm_mmu_mark_parents_unsync`.
    func markParentsUnsync(_ page: ShadowPage) {
        for pointer in page.parentPTEs { markUnsync(pointer) }
    }

    /// `mark_unsync`: sets the parent's bit for this SPTE, and the first unsync child of a page
    /// makes its own parents' bits set too.
    func markUnsync(_ pointer: SPTEPointer) {
        let parent = page(containing: pointer)
        guard parent.setUnsyncChild(at: parent.index(of: pointer)) else { return }
        if parent.unsyncChildren == 1 { markParentsUnsync(parent) }
    }

    /// `mmu_unsync_walk`: runs `body` with the unsync last-level pages under `parent`, found by
    /// following the bitmaps and clearing the bits of children that are gone or in sync. The list
    /// lives in a buffer kept from one call to the next, so that a sync allocates nothing.
    func withUnsyncLeaves<Result>(under parent: ShadowPage, _ body: ([ShadowPage]) -> Result) -> Result {
        // Taken, not borrowed: a walk started from `body` (none is expected) gets an empty buffer.
        var leaves = unsyncLeafBuffer
        unsyncLeafBuffer = []
        collectUnsyncLeaves(under: parent, into: &leaves)
        let result = body(leaves)
        leaves.removeAll(keepingCapacity: true)
        unsyncLeafBuffer = leaves
        return result
    }

    private func collectUnsyncLeaves(under parent: ShadowPage, into leaves: inout [ShadowPage]) {
        for index in parent.unsyncChildIndexes {
            let spte = SPTE(rawValue: parent.spte(index).pointee)
            guard spte.isShadowPresent, !spte.isLast(level: parent.level), let child = child(of: spte) else {
                parent.clearUnsyncChild(at: index)
                continue
            }
            if child.unsyncChildren > 0 {
                collectUnsyncLeaves(under: child, into: &leaves)
                if child.unsyncChildren == 0 && !child.unsync { parent.clearUnsyncChild(at: index) }
            } else if child.unsync {
                if !leaves.contains(where: { $0 === child }) { leaves.append(child) }
            } else {
                parent.clearUnsyncChild(at: index)
            }
        }
    }

    /// `mmu_pages_clear_parents` for a whole subtree: after a sync, clears the bits of children
    /// that no longer lead to an unsync page.
    func clearSyncedChildren(under parent: ShadowPage) {
        for index in parent.unsyncChildIndexes {
            let spte = SPTE(rawValue: parent.spte(index).pointee)
            guard spte.isShadowPresent, !spte.isLast(level: parent.level), let child = child(of: spte) else {
                parent.clearUnsyncChild(at: index)
                continue
            }
            if child.unsyncChildren > 0 { clearSyncedChildren(under: child) }
            if child.unsyncChildren == 0 && !child.unsync { parent.clearUnsyncChild(at: index) }
        }
    }

    /// `mmu_zap_unsync_children`: zapping a page zaps the unsync pages below it first.
    func zapUnsyncChildren(of parent: ShadowPage) {
        guard parent.level > 1, parent.unsyncChildren > 0 else { return }
        withUnsyncLeaves(under: parent) { leaves in
            for leaf in leaves where !isObsolete(leaf) { zap(leaf, flushing: false) }
        }
        clearSyncedChildren(under: parent)
    }
}
