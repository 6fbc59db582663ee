// The NX huge-page mitigation's bookkeeping for the shadow MMU's pages (KVM's
// `account_nx_huge_page`, `unaccount_nx_huge_page` and the shadow MMU's pass of
// `kvm_recover_nx_huge_pages`). Under a TDP L1 the shadow MMU holds `guest_mmu`'s pages, and an L2
// fetch from a page L1 maps huge is mapped 4 KiB through direct pages that exist only because of
// the mitigation: they are counted in `nx_lpage_splits` and zapped a fraction at a time by the
// recovery worker, so that huge leaves come back once the guest stops executing there.

extension ShadowMMU {
    /// `account_nx_huge_page`: `page` exists because an executable huge leaf was refused; it is a
    /// recovery candidate when a huge leaf would otherwise have been allowed (`possible`).
    func accountNXHugePage(_ page: ShadowPage, possible: Bool) {
        page.nxHugePageDisallowed = true
        guard possible, !page.isPossibleNXHugePage else { return }
        page.isPossibleNXHugePage = true
        page.olderPossibleNXHugePage = newestPossibleNXHugePage
        newestPossibleNXHugePage?.newerPossibleNXHugePage = page
        newestPossibleNXHugePage = page
        if oldestPossibleNXHugePage == nil { oldestPossibleNXHugePage = page }
        stats.nxLpageSplits += 1
    }

    /// `unaccount_nx_huge_page`: the page no longer stands for a refused huge leaf (it is being
    /// zapped, or it can never become huge while its memslot logs dirty pages).
    func unaccountNXHugePage(_ page: ShadowPage) {
        page.nxHugePageDisallowed = false
        guard page.isPossibleNXHugePage else { return }
        let older = page.olderPossibleNXHugePage, newer = page.newerPossibleNXHugePage
        if let older { older.newerPossibleNXHugePage = newer } else { oldestPossibleNXHugePage = newer }
        if let newer { newer.olderPossibleNXHugePage = older } else { newestPossibleNXHugePage = older }
        page.olderPossibleNXHugePage = nil
        page.newerPossibleNXHugePage = nil
        page.isPossibleNXHugePage = false
        stats.nxLpageSplits -= 1
    }

    /// The shadow MMU's `possible_nx_huge_pages`, oldest first.
    public var possibleNXHugePages: [ShadowPage] {
        var pages: [ShadowPage] = []
        var page = oldestPossibleNXHugePage
        while let current = page {
            pages.append(current)
            page = current.newerPossibleNXHugePage
        }
        return pages
    }

    /// One pass of the recovery worker over the shadow MMU's list (`kvm_recover_nx_huge_pages`
    /// for `KVM_SHADOW_MMU`, under the lock held for write): the oldest ceil(candidates / ratio)
    /// pages are zapped, with one TLB flush for the batch, so that the next non-executable access
    /// there can map the huge leaf again; a page in a memslot that logs dirty pages is only taken
    /// off the list (it could not become huge). Returns how many pages were taken off.
    @discardableResult
    public func recoverNXHugePages(ratio: Int) -> Int {
        guard ratio > 0 else { return 0 }
        let toZap = (Int(stats.nxLpageSplits) + ratio - 1) / ratio
        var zapped = false
        var done = 0
        while done < toZap, let page = oldestPossibleNXHugePage {
            if memory.logsDirtyPages(page.gfn) {
                unaccountNXHugePage(page)
            } else {
                zap(page, flushing: false)
                zapped = true
            }
            done += 1
        }
        if zapped { flushRemoteTLBs() }
        return done
    }

    /// What the auditor checks of the list: its count is `nx_lpage_splits`, and every page on it is
    /// a live direct page marked NX-disallowed, linked both ways.
    func auditNXHugePages() -> [String] {
        var problems: [String] = []
        let pages = possibleNXHugePages
        if UInt64(pages.count) != stats.nxLpageSplits {
            problems.append("nx_lpage_splits is \(stats.nxLpageSplits) for the shadow MMU but \(pages.count) pages are listed")
        }
        for (index, page) in pages.enumerated() {
            if page.isFreed || !page.nxHugePageDisallowed || !page.isPossibleNXHugePage || !page.role.isDirect {
                problems.append("shadow page \(page.frame) on the NX list is freed, not NX-disallowed or not direct")
            }
            if index > 0 && page.olderPossibleNXHugePage !== pages[index - 1] {
                problems.append("shadow page \(page.frame) on the NX list has a broken back link")
            }
        }
        return problems
    }
}
