// Zapping TDP SPTEs (tdp_mmu.c: tdp_mmu_zap_leafs, tdp_mmu_zap_root, kvm_tdp_mmu_zap_sp,
// kvm_tdp_mmu_invalidate_all_roots, kvm_tdp_mmu_zap_invalidated_roots; mmu.c kvm_mmu_zap_all_fast,
// kvm_recover_nx_huge_pages).

import GuestMemory
import X86Paging

extension TDPMMU {
    // MARK: Leaves in a gfn range

    /// `kvm_zap_gfn_range` / `kvm_tdp_mmu_zap_leafs`: every present leaf of a valid root that maps
    /// a gfn of `gfns` (a huge leaf that overlaps the range goes whole). Page tables stay. One TLB
    /// flush if anything went. Takes the lock for write.
    public func zapGFNRange(_ gfns: Range<UInt64>) {
        withExclusiveLock {
            if zapLeaves(gfns, roots: rootsToVisit(validOnly: true)) { requestRemoteTLBFlush() }
        }
    }

    /// `kvm_tdp_mmu_unmap_gfn_range` (an MMU-notifier invalidation of host memory): as
    /// `zapGFNRange`, in every root, valid or not. Takes the lock for write.
    public func unmapGFNRange(_ gfns: Range<UInt64>) {
        withExclusiveLock {
            if zapLeaves(gfns, roots: rootsToVisit(validOnly: false)) { requestRemoteTLBFlush() }
        }
    }

    /// Zaps leaves of `roots` in `gfns` at `minLevel` or above; whether a TLB flush is needed (not
    /// for leaves of invalid roots: no vCPU may run on them again without flushing). Lock held for
    /// write.
    func zapLeaves(_ gfns: Range<UInt64>, roots: [TDPRoot], minLevel: Int = KVMLevel.pageTable) -> Bool {
        var flush = false
        for root in roots where !gfns.isEmpty {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: minLevel, start: gfns.lowerBound,
                                       end: gfns.upperBound, pool: pool)
            while iterator.isValid {
                let old = iterator.oldSPTE
                if old.isShadowPresent && old.isLast(level: iterator.level) {
                    setSPTE(&iterator, .nonPresent)
                    if !root.isInvalid { flush = true }
                }
                iterator.next()
            }
        }
        return flush
    }

    // MARK: Whole roots

    /// `tdp_mmu_zap_root`: zaps everything below `root` in two passes, first every SPTE at the 1G
    /// level (freeing the tables below), then the root's own entries, so that no single removal
    /// recurses through a whole root. No TLB flush: the root is invalid, or the VM is going away.
    func zapRoot(_ root: TDPRoot, shared: Bool) {
        zapRootPass(root, level: KVMLevel.pageDirectoryPointer, shared: shared)
        zapRootPass(root, level: rootLevel, shared: shared)
    }

    /// `__tdp_mmu_zap_root`: every present SPTE at exactly `level`.
    private func zapRootPass(_ root: TDPRoot, level: Int, shared: Bool) {
        var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: level, start: 0, end: rootSpan, pool: pool)
        while iterator.isValid {
            if !iterator.oldSPTE.isShadowPresent || iterator.level > level {
                iterator.next()
                continue
            }
            if shared {
                // A lost race: look at the same SPTE again.
                if !setSPTEAtomic(&iterator, .nonPresent) { continue }
            } else {
                setSPTE(&iterator, .nonPresent)
            }
            iterator.next()
        }
    }

    /// `kvm_tdp_mmu_zap_all` (VM teardown): every root, valid or not, emptied. Takes the lock for
    /// write. Roots stay until their references go.
    public func zapAll() {
        withExclusiveLock {
            for root in rootsToVisit(validOnly: false) { zapRoot(root, shared: false) }
        }
    }

    /// `kvm_tdp_mmu_invalidate_all_roots`: every valid root becomes invalid (vCPUs must not run on
    /// it again) and is scheduled to be zapped by `zapInvalidatedRoots`. Takes the lock for write.
    public func invalidateAllRoots() {
        withExclusiveLock { invalidateAllRootsLocked() }
    }

    func invalidateAllRootsLocked() {
        pagesLock.withLock { state in
            for root in state.roots where !root.isInvalid {
                root.invalid.store(true, ordering: .releasing)
                root.scheduledToZap = true
            }
        }
    }

    /// `kvm_tdp_mmu_zap_invalidated_roots`: zaps every root scheduled by an invalidation and drops
    /// the reference the MMU kept on it; the last vCPU to put it frees it. Takes the lock for read,
    /// so vCPUs fault on their new roots meanwhile.
    public func zapInvalidatedRoots() {
        withSharedLock { zapInvalidatedRootsLocked(shared: true) }
    }

    func zapInvalidatedRootsLocked(shared: Bool) {
        let scheduled = pagesLock.withLock { state -> [TDPRoot] in
            let roots = state.roots.filter(\.scheduledToZap)
            for root in roots { root.scheduledToZap = false }
            return roots
        }
        for root in scheduled {
            zapRoot(root, shared: shared)
            do { try putRoot(root) } catch { warn("the MMU's reference to \(root) was already gone") }
        }
    }

    /// `kvm_mmu_zap_all_fast` with the TDP MMU: invalidate every root, make every vCPU drop its
    /// root before it runs again, then zap the invalidated roots.
    public func zapAllFast() {
        withExclusiveLock {
            invalidateAllRootsLocked()
            freeObsoleteRoots()
        }
        zapInvalidatedRoots()
    }

    // MARK: One page table (NX recovery)

    /// `kvm_tdp_mmu_zap_sp`: zaps the SPTE linking `page`, which takes the table and everything
    /// below it. True when it was linked. Lock held for write.
    func zapPageTable(_ page: TDPPage) -> Bool {
        guard let parent = page.parentSPTE else { return false }
        let slot = SPTESlot(parent)
        guard slot.load().isShadowPresent else {
            warn("NX recovery found the link to table \(page.frame) at gfn \(hex(page.gfn)) not present")
            return false
        }
        setSPTE(slot, gfn: page.gfn, level: page.level + 1, .nonPresent)
        return true
    }

    /// One pass of KVM's NX huge-page recovery worker (`kvm_recover_nx_huge_pages`): of the tables
    /// that exist only because the NX mitigation split a huge page, the oldest
    /// ceil(nx_lpage_splits / ratio) are zapped so that the next non-executable access can map a
    /// huge page again; in a memslot that logs dirty pages a table is only taken off the list (it
    /// could not become huge). Returns how many tables were taken off. Takes the lock for write.
    @discardableResult
    public func recoverNXHugePages() -> Int {
        let ratio = configuration.nxHugePagesRecoveryRatio
        guard ratio > 0 else { return 0 }
        return withExclusiveLock { () -> Int in
            let candidates = counters.nxLpageSplits.load(ordering: .relaxed)
            let toZap = (Int(candidates) + ratio - 1) / ratio
            var flush = false
            var done = 0
            while done < toZap {
                let head = pagesLock.withLock { $0.nxHead }
                guard head != 0, let page = records.page(HostFrameNumber(head)) else { break }
                if !page.nxHugePageDisallowed { warn("table \(page.frame) on the NX list is not NX-disallowed") }
                if memory.isLoggingDirtyPages, slotMetadata(containing: page.gfn)?.slot.logsDirtyPages == true {
                    unaccountNXHugePage(page)
                } else if !zapPageTable(page) {
                    unaccountNXHugePage(page)
                } else {
                    flush = true
                }
                if page.isPossibleNXHugePage {
                    warn("table \(page.frame) is still on the NX list after recovery")
                    unaccountNXHugePage(page)
                }
                done += 1
            }
            if flush { requestRemoteTLBFlush() }
            return done
        }
    }
}
