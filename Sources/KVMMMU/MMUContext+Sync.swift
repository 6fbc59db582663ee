import GuestMemory
import X86Paging

// Bringing unsync shadow pages up to date from the guest's entries: on a guest TLB flush
// (`kvm_mmu_sync_roots`, `mmu_sync_children`), on INVLPG for one address
// (`kvm_mmu_invalidate_addr`), and when a lookup finds an unsync page (`kvm_sync_page`).

extension MMUContext {
    /// KVM's `kvm_sync_page_check`: a page may be synced by this context only if it is indirect
    /// and was made for the same paging regime (every root-role bit equal but the level, the
    /// access, the quadrant and passthrough); otherwise it is zapped.
    func canSync(_ page: ShadowPage) -> Bool {
        guard page.hasGPTEs || (!page.role.isDirect && page.isPassthrough) else { return false }
        var ignored = PageRole()
        ignored.level = 0xF
        ignored.access = ACC.all
        ignored.quadrant = 3
        ignored.isPassthrough = true
        // The seed-1 guest-level fields (bits unused upstream, so upstream is unaffected): RFC v3's
        // sync ignores glevel as upstream's ignores passthrough.
        ignored.word |= PageRole.unusedBits
        return !page.role.isDirect && (page.role.word ^ rootRole.word) & ~ignored.word == 0
    }

    /// `kvm_sync_page`: every SPTE of `page` from its guest entry. -1 when the page could not be
    /// synced and was zapped; otherwise 1 when a TLB flush is due, 0 when not.
    func syncPage(_ page: ShadowPage) -> Int {
        guard canSync(page) else {
            mmu.zap(page, flushing: false)
            return -1
        }
        let result = if page.role.guestMode, let nestedEPT {
            syncSPTEs(of: page, format: nestedEPT.walker.format)
        } else {
            page.role.hasFourByteGPTE ? syncSPTEs(of: page, format: legacy32) : syncSPTEs(of: page, format: long64)
        }
        if result < 0 { mmu.zap(page, flushing: false) }
        return result
    }

    /// The SPTE loop of `kvm_sync_page`: -1 at the first guest entry that cannot be read,
    /// otherwise whether a TLB flush is due.
    private func syncSPTEs<Format: PagingFormat>(of page: ShadowPage, format: Format) -> Int {
        let entries = ShadowedGuestEntries(of: page, in: memslots)
        var flush = false
        for index in 0..<KVMLevel.entriesPerPage where page.spte(index).pointee != SPTE.nonPresent.rawValue {
            let result = syncSPTE(page, index, from: entries, format: format)
            if result < 0 { return -1 }
            if result > 0 { flush = true }
        }
        return flush ? 1 : 0
    }

    /// `FNAME(sync_spte)`: one SPTE of an unsync page from the guest entry it shadows. -1 when the
    /// entry cannot be read, 1 when the SPTE changed so that a TLB flush is due, 0 otherwise.
    func syncSPTE(_ page: ShadowPage, _ index: Int) -> Int {
        let entries = ShadowedGuestEntries(of: page, in: memslots)
        if page.role.guestMode, let nestedEPT { return syncSPTE(page, index, from: entries, format: nestedEPT.walker.format) }
        return page.role.hasFourByteGPTE
            ? syncSPTE(page, index, from: entries, format: legacy32)
            : syncSPTE(page, index, from: entries, format: long64)
    }

    @inline(__always)
    private func syncSPTE<Format: PagingFormat>(_ page: ShadowPage, _ index: Int, from entries: ShadowedGuestEntries,
                                                format: Format) -> Int {
        let pointer = page.spte(index)
        guard pointer.pointee != SPTE.nonPresent.rawValue else { return 0 }
        guard let gpte = entries.entry(Format.Entry.self, at: index) else { return -1 }
        let old = SPTE(rawValue: pointer.pointee)
        if format.isPrefetchInvalid(gpte) {
            dropSPTE(pointer, in: page)
            return 1
        }
        let (gfn, access) = format.leafTranslation(gpte, pageAccess: page.role.access)
        if old.isMMIO(mmu.masks) {
            // `sync_mmio_spte`: an MMIO SPTE for another gfn goes; otherwise it is made again
            // with the new access.
            if gfn != old.mmioGFN(mmu.masks) {
                pointer.pointee = SPTE.nonPresent.rawValue
            } else {
                pointer.pointee = SPTE.mmio(gfn: gfn, access: access, generation: memslots.generation, masks: mmu.masks).rawValue
            }
            return 0
        }
        guard old.isShadowPresent else { return 0 }
        if gfn != page.mappedGFN(at: index) {
            dropSPTE(pointer, in: page)
            return 1
        }
        // Same gfn and the same rights: the SPTE stands (the guest entry has A set, and D where
        // the SPTE is writable, so no A/D update can be lost).
        if page.mappedAccess(at: index) == access { return 0 }
        page.setTranslation(at: index, gfn: gfn, access: access)
        let (new, _) = makeSPTE(page, access: access, gfn: gfn, hostFrame: old.pfn, old: old, prefetch: true,
                                synchronizing: true, hostWritable: old.isHostWritable(mmu.masks))
        pointer.pointee = new.rawValue
        trace(.kvmMMUSetSPTE(level: page.level, gfn: gfn, spte: new))
        return spteUpdateNeedsFlush(old: old, new: new) ? 1 : 0
    }

    /// `mmu_spte_update`'s answer: rights or A/D state the TLB may hold were taken away.
    private func spteUpdateNeedsFlush(old: SPTE, new: SPTE) -> Bool {
        let masks = mmu.masks
        if old.isMMUWritable(masks) && !new.isMMUWritable(masks) { return true }
        if old.isWritable && !new.isWritable { return true }
        if old.isAccessed(masks) && !new.isAccessed(masks) { return true }
        if old.isDirty(masks) && !new.isDirty(masks) { return true }
        return false
    }

    private func dropSPTE(_ pointer: SPTEPointer, in page: ShadowPage) {
        let spte = SPTE(rawValue: pointer.pointee)
        if spte.isShadowPresent {
            mmu.dropSPTE(pointer)
        } else {
            pointer.pointee = SPTE.nonPresent.rawValue
        }
    }

    /// `mmu_sync_children`: write-protects the guest tables of every unsync page under `parent`
    /// and syncs them, then clears the bits that led there.
    func syncChildren(of parent: ShadowPage) {
        guard parent.level > 1, parent.unsyncChildren > 0 else { return }
        mmu.withUnsyncLeaves(under: parent) { leaves in
            guard !leaves.isEmpty else { return }
            var protected = false
            for leaf in leaves where mmu.writeProtect(leaf.gfn) { protected = true }
            if protected { mmu.flushRemoteTLBs() }
            var flush = false
            for leaf in leaves where leaf.unsync && !mmu.isObsolete(leaf) {
                mmu.unlinkUnsync(leaf)
                trace(.kvmMMUSyncPage(gfn: leaf.gfn, role: leaf.role))
                if syncPage(leaf) != 0 { flush = true }
            }
            mmu.clearSyncedChildren(under: parent)
            if flush { mmu.flushRemoteTLBs() }
        }
    }

    /// `kvm_mmu_sync_roots`: the current root's unsync pages, or those under each PAE root.
    public func syncRoots() {
        guard rootsLoaded, !rootRole.isDirect else { return }
        if let root {
            if root.isUnsyncRoot { syncChildren(of: root) }
            return
        }
        for case let page? in paeRoots { syncChildren(of: page) }
    }

    /// `kvm_mmu_sync_prev_roots`: a cached root with unsync pages is freed rather than synced.
    public func syncPreviousRoots() {
        for index in previousRoots.indices {
            if let cached = previousRoots[index], cached.page.isUnsyncRoot { freePreviousRoot(at: index) }
        }
    }

    /// `__kvm_mmu_invalidate_addr` for the root `start`: along the shadow path of `address`,
    /// the SPTE of every unsync page is synced from its guest entry.
    func invalidateAddress(_ address: GuestVirtualAddress, from start: ShadowPage) {
        var page = start
        while true {
            let index = Self.index(address.rawValue, level: page.level)
            let pointer = page.spte(index)
            if page.unsync {
                let result = syncSPTE(page, index)
                if result < 0 { mmu.zapPTE(pointer, in: page) }
                if result != 0 { mmu.flushRemoteTLBs() }
            }
            guard page.unsyncChildren > 0, page.level > 1 else { return }
            let spte = SPTE(rawValue: pointer.pointee)
            guard spte.isShadowPresent, !spte.isLast(level: page.level), let child = mmu.child(of: spte) else { return }
            page = child
        }
    }
}
