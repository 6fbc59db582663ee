// Changing TDP SPTEs and everything a change implies (tdp_mmu.c: tdp_mmu_set_spte_atomic,
// tdp_mmu_zap_spte_atomic, tdp_mmu_set_spte, handle_changed_spte, handle_removed_pt,
// tdp_mmu_link_sp, tdp_mmu_split_huge_page).

import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension TDPMMU {
    // MARK: Setting SPTEs

    /// `tdp_mmu_set_spte_atomic`: replaces the iterator's SPTE if it still holds `oldSPTE`, then does
    /// the bookkeeping. On a lost race nothing changes, `oldSPTE` holds what is there now and the
    /// result is false (KVM's -EBUSY). For callers holding the lock for read (or write).
    /// - Precondition: `oldSPTE` is not frozen (only its freezer may touch a frozen SPTE).
    func setSPTEAtomic(_ iterator: inout TDPIterator, _ new: SPTE) -> Bool {
        precondition(!iterator.oldSPTE.isFrozen, "a frozen SPTE belongs to the thread that froze it")
        let old = iterator.oldSPTE
        beforeAtomicUpdate?(iterator.slot, iterator.level)
        guard iterator.slot.compareExchange(expected: &iterator.oldSPTE, desired: new) else {
            counters.lostRaces.add(1, ordering: .relaxed)
            return false
        }
        handleChangedSPTE(gfn: iterator.gfn, old: old, new: new, level: iterator.level, shared: true)
        return true
    }

    /// `tdp_mmu_zap_spte_atomic`: zaps the iterator's SPTE so that no other thread can put anything
    /// in its place before every TLB forgot it: freeze, flush, then non-present.
    func zapSPTEAtomic(_ iterator: inout TDPIterator) -> Bool {
        precondition(!iterator.oldSPTE.isFrozen, "a frozen SPTE belongs to the thread that froze it")
        let old = iterator.oldSPTE
        beforeAtomicUpdate?(iterator.slot, iterator.level)
        guard iterator.slot.compareExchange(expected: &iterator.oldSPTE, desired: .frozen) else {
            counters.lostRaces.add(1, ordering: .relaxed)
            return false
        }
        requestRemoteTLBFlush()
        // Frozen: no one else writes it, so a plain store ends the freeze.
        iterator.slot.store(.nonPresent)
        // The bookkeeping comes after the entry is usable again, so vCPUs spin on it less.
        handleChangedSPTE(gfn: iterator.gfn, old: old, new: .nonPresent, level: iterator.level, shared: true)
        iterator.oldSPTE = .nonPresent
        return true
    }

    /// `tdp_mmu_set_spte` for callers holding the lock for write: no other thread changes SPTEs, but
    /// hardware may still set A/D bits, so the replaced value is taken atomically and is what the
    /// bookkeeping sees. Returns it.
    @discardableResult
    func setSPTE(_ slot: SPTESlot, gfn: UInt64, level: Int, _ new: SPTE) -> SPTE {
        let old = slot.exchange(new)
        if old.isFrozen || new.isFrozen {
            warn("frozen SPTE \(old) -> \(new) at gfn \(hex(gfn)) level \(level) under the write lock")
        }
        handleChangedSPTE(gfn: gfn, old: old, new: new, level: level, shared: false)
        return old
    }

    /// `tdp_mmu_iter_set_spte`.
    func setSPTE(_ iterator: inout TDPIterator, _ new: SPTE) {
        iterator.oldSPTE = setSPTE(iterator.slot, gfn: iterator.gfn, level: iterator.level, new)
    }

    // MARK: Bookkeeping

    /// `handle_changed_spte`: what follows from an SPTE going from `old` to `new`. Keeps
    /// `pages_4k/2m/1g` equal to the present leaves, and tears down a table whose link was zapped or
    /// replaced by a huge leaf. A present leaf never becomes a present leaf of another frame: the
    /// gfn -> host frame mapping of a memslot does not change while anything maps it (a deleted
    /// slot is zapped first), so such a change is a model bug and stops the model, as KVM BUGs.
    func handleChangedSPTE(gfn: UInt64, old: SPTE, new: SPTE, level: Int, shared: Bool) {
        let wasPresent = old.isShadowPresent, isPresent = new.isShadowPresent
        let wasLeaf = wasPresent && old.isLast(level: level)
        let isLeaf = isPresent && new.isLast(level: level)
        let pfnChanged = old.pfn != new.pfn
        precondition((KVMLevel.pageTable...KVMLevel.pt64Root5).contains(level), "SPTE level \(level)")
        if gfn & (pagesPerHugePage(level) - 1) != 0 { warn("gfn \(hex(gfn)) is not aligned for level \(level)") }
        precondition(!(wasLeaf && isLeaf && pfnChanged),
                     "a present leaf SPTE was replaced by one mapping another frame: gfn \(hex(gfn)) level \(level) \(old) -> \(new)")
        if old == new { return }
        events.record(.kvmTDPMMUSPTEChanged(addressSpaceID: 0, gfn: GuestFrameNumber(gfn), level: level, old: old, new: new))
        if isLeaf && !new.checkWritableInvariants(masks) {
            warn("SPTE \(new.describe(masks)) at gfn \(hex(gfn)) breaks W => MMU-writable => host-writable")
        }
        if !wasPresent && !isPresent {
            if !old.isMMIO(masks) && !new.isMMIO(masks) && !new.isFrozen {
                warn("unexpected non-present change \(old) -> \(new) at gfn \(hex(gfn)) level \(level)")
            }
            return
        }
        if isLeaf != wasLeaf { counters.updatePages(level: level, delta: isLeaf ? 1 : -1) }
        // A link removed, or replaced by a huge leaf: its table (and everything below) goes.
        if wasPresent && !wasLeaf && (isLeaf || !isPresent || pfnChanged) {
            if isPresent && !isLeaf { warn("a table link at gfn \(hex(gfn)) level \(level) was pointed at another table") }
            handleRemovedPageTable(records.page(old.pfn)!, shared: shared)
        }
        // KVM also marks the host page dirty/accessed here (kvm_set_pfn_dirty/accessed): the model
        // has no host page flags.
    }

    /// `handle_removed_pt`: a table was unlinked. Freezes each of its SPTEs (waiting out a thread
    /// that froze one to zap it), does their bookkeeping (recursing into their tables), and queues
    /// the table to be freed once no reader can be inside it.
    func handleRemovedPageTable(_ page: TDPPage, shared: Bool) {
        let level = page.level, baseGFN = page.gfn
        events.record(.kvmMMUPrepareZapPage(gfn: GuestFrameNumber(baseGFN), role: page.role))
        unlinkPageTable(page)
        let table = table(of: page.frame)
        for index in 0..<KVMLevel.entriesPerPage {
            let slot = SPTESlot(table + index)
            let gfn = baseGFN + UInt64(index) * pagesPerHugePage(level)
            let old: SPTE
            if shared {
                // Another thread that walked in before the unlink may be zapping this entry; it
                // ends with non-present. Take the entry only from a value that is not frozen.
                var seen = slot.exchange(.frozen)
                while seen.isFrozen {
                    spinPause()
                    seen = slot.exchange(.frozen)
                }
                old = seen
            } else {
                let current = slot.load()
                // Nothing can make a non-present entry present while the lock is held for write;
                // MMIO SPTEs need no bookkeeping (the memslots generation guards them).
                if !current.isShadowPresent { continue }
                // Atomically: the processor may still set D through a cached upper-level entry.
                old = slot.exchange(.frozen)
            }
            handleChangedSPTE(gfn: gfn, old: old, new: .frozen, level: level, shared: shared)
        }
        deferFree(page)
    }

    /// `tdp_mmu_unlink_sp`: the table no longer counts and is no longer an NX recovery candidate.
    private func unlinkPageTable(_ page: TDPPage) {
        counters.pageTables.subtract(1, ordering: .relaxed)
        if page.nxHugePageDisallowed { unaccountNXHugePage(page) }
    }

    // MARK: Linking and splitting

    /// `tdp_mmu_link_sp`: points the iterator's SPTE at `page`'s table and counts the table.
    func linkPageTable(_ iterator: inout TDPIterator, _ page: TDPPage, shared: Bool) -> Bool {
        let link = SPTE.nonLeaf(child: page.frame, adDisabled: !masks.accessedDirtyEnabled, masks: masks)
        if shared {
            guard setSPTEAtomic(&iterator, link) else { return false }
        } else {
            setSPTE(&iterator, link)
        }
        counters.pageTables.add(1, ordering: .relaxed)
        return true
    }

    /// `tdp_mmu_split_huge_page`: fills `page` with the 512 smaller SPTEs equivalent to the huge
    /// leaf the iterator is on and links it in place of the leaf. No TLB flush: old and new
    /// translations are the same, so a vCPU may use either.
    func splitHugePage(_ iterator: inout TDPIterator, into page: TDPPage, shared: Bool) -> Bool {
        let huge = iterator.oldSPTE, level = iterator.level
        let table = table(of: page.frame)
        let role = page.role
        for index in 0..<KVMLevel.entriesPerPage {
            // Not reachable yet: plain stores.
            SPTESlot(table + index).store(huge.smallSPTE(index: index, childLevel: level - 1, roleAccess: role.access,
                                                         nxHugePages: configuration.nxHugePages, masks: masks))
        }
        let linked = linkPageTable(&iterator, page, shared: shared)
        // The link counted the huge leaf out; its replacements count in.
        if linked { counters.updatePages(level: level - 1, delta: Int64(KVMLevel.entriesPerPage)) }
        events.record(.kvmMMUSplitHugePage(gfn: GuestFrameNumber(iterator.gfn), spte: huge, level: level,
                                           errno: linked ? 0 : -16))
        return linked
    }
}

/// `cpu_relax` while another thread finishes with an SPTE it froze: with few cores that thread may
/// need this one's core to get there, so give it up.
@inline(__always)
func spinPause() {
    sched_yield()
}
