// The TDP MMU's structural auditor: KVM's invariants (spec section 14) over every root, table and
// SPTE, checked against the memslots and the counters.

import GuestMemory
import X86Paging

extension TDPMMU {
    /// Every invariant that must hold when no operation runs, one line per violation (empty when
    /// all hold). Takes the lock for write, so it sees a quiescent MMU (hardware A/D updates aside),
    /// and frees the queued tables first. Costs a walk of every table.
    ///
    /// Checked: the memslots are the ones the MMU knows; roots are referenced, valid roles unique,
    /// zapped invalid roots empty; every non-leaf SPTE links a live table one level down with the
    /// gfn it covers, the shared role and a back pointer to that SPTE; every leaf maps the host frame
    /// its memslot puts behind its gfn (huge leaves: every frame, inside one slot) and MMIO SPTEs
    /// hold their own gfn; W implies MMU-writable implies host-writable, and host-writable is
    /// exactly "not a read-only slot"; the A/D type is the one KVM picks; huge leaves only where the
    /// huge-page rules allow them (aligned alike in guest and host, the host maps that large, not
    /// executable under the NX mitigation, not writable over clean pages of a dirty-logging slot, not MMU-writable
    /// over a write-tracked gfn); in a dirty-logging slot no leaf can be written without its gfn
    /// being marked dirty; write-tracked gfns are mapped neither W nor MMU-writable; no SPTE is
    /// frozen; `pages_4k/2m/1g`, the table count and `nx_lpage_splits` match; every table is
    /// reachable (none leaked) and the NX list holds only live, reachable, NX-disallowed tables;
    /// no KVM WARN fired.
    public func audit() -> [String] {
        withExclusiveLock { auditLocked() }
    }

    /// Whether a leaf of a valid root lets the guest write `gfn` (W set), for the shadow MMU's
    /// auditor: a table `guest_mmu` shadows in sync must not be writable by L1. Takes the lock
    /// for read.
    public func mapsWritable(_ gfn: UInt64) -> Bool {
        withSharedLock { mapsWritableLocked(gfn) }
    }

    /// `mapsWritable` with the lock held (the shadow MMU's auditor, which runs under it).
    func mapsWritableLocked(_ gfn: UInt64) -> Bool {
        for root in rootsToVisit(validOnly: true) {
            var iterator = TDPIterator(root: root.table, rootLevel: rootLevel, minLevel: 1, start: gfn, end: gfn + 1, pool: pool)
            while iterator.isValid {
                let spte = iterator.oldSPTE
                if spte.isShadowPresent && spte.isLast(level: iterator.level) && spte.isWritable { return true }
                iterator.next()
            }
        }
        return false
    }

    private func auditLocked() -> [String] {
        var problems = warnings.withLock { $0.map { "KVM WARN: " + $0 } }
        if memory.generation != knownGeneration {
            problems.append("memslots generation \(memory.generation) differs from the MMU's \(knownGeneration)")
        }
        let slots = memory.slots
        if slots.count != slotIndex.count || zip(slots, slotIndex).contains(where: { $0 != $1.slot }) {
            problems.append("the MMU's memslots \(slotIndex.map(\.slot)) differ from the VM's \(slots)")
        }
        for metadata in slotIndex { auditDisallowCounts(metadata, &problems) }
        if let protection = subPageProtection { problems += protection.audit().map { "SPP: " + $0 } }

        var walk = AuditWalk()
        // Before the bitmaps: a vCPU drains its PML buffer into the bitmap under the buffer's lock.
        walk.pmlBuffered = pmlBufferedGFNs()
        if memory.dirtyRingSink != nil { walk.ringed = dirtyRingGFNs() }
        for metadata in slotIndex where metadata.slot.logsDirtyPages {
            walk.dirtyBitmaps[metadata.slot.id] = try? memory.dirtyBitmap(slot: metadata.slot.id)
        }
        // The roots, each held for the audit (a vCPU may put its last reference meanwhile: the
        // lock held for write does not stop that, as mmu_lock does not stop KVM's put), and the
        // tables queued to be freed. The queue is emptied when the lock is taken, so what is on it
        // now are roots whose last reference went since; a listed root whose count is already 0
        // is on its way there.
        let (roots, queued, dying) = pagesLock.withLock { state -> ([TDPRoot], Set<UInt64>, Set<UInt64>) in
            var held: [TDPRoot] = []
            var dying = Set<UInt64>()
            for root in state.roots {
                if tryGetRoot(root) { held.append(root) } else { dying.insert(root.frame.rawValue) }
            }
            var queued = Set<UInt64>()
            var frame = state.pendingFreeHead
            while frame != 0, queued.insert(frame).inserted, let page = records.page(HostFrameNumber(frame)) {
                frame = page.freeNext
            }
            return (held, queued, dying)
        }
        defer { for root in roots { try? putRoot(root) } }
        var validRoles = Set<UInt32>()
        for root in roots {
            if root.referenceCount <= 0 { problems.append("\(root) is listed with no reference") }
            if !root.isInvalid && !validRoles.insert(root.role.word).inserted {
                problems.append("two valid roots with role \(root.role)")
            }
            guard let page = records.page(root.frame), page.isLive, !page.isRemoved,
                  page.level == rootLevel, page.parentSPTE == nil, page.role == role(root.role, level: rootLevel)
            else {
                problems.append("\(root): its table's record is wrong")
                continue
            }
            walk.reachable.insert(root.frame.rawValue)
            auditTable(table(of: root.frame), level: rootLevel, baseGFN: 0, root: root, &walk, &problems)
            if root.isInvalid && !root.scheduledToZap && walk.presentInRoot(root.frame.rawValue) {
                problems.append("\(root): invalid and zapped, but still maps something")
            }
        }
        let counted = [counters.pages4K.load(ordering: .relaxed), counters.pages2M.load(ordering: .relaxed),
                       counters.pages1G.load(ordering: .relaxed)]
        for level in 1...3 where counted[level - 1] != walk.leaves[level - 1] {
            problems.append("pages_\(["4k", "2m", "1g"][level - 1]) is \(counted[level - 1]) but \(walk.leaves[level - 1]) leaves are present")
        }
        let tables = counters.pageTables.load(ordering: .relaxed)
        if tables != Int64(walk.reachable.count - roots.count) {
            problems.append("tdp_mmu_pages is \(tables) but \(walk.reachable.count - roots.count) tables hang below roots")
        }
        for frame in queued where walk.reachable.contains(frame) {
            problems.append("table \(hex(frame)) is queued to be freed but still reachable")
        }
        let accounted = walk.reachable.count + queued.count + dying.count
        let live = counters.liveTables.load(ordering: .relaxed)
        if live != Int64(accounted) {
            problems.append("\(live) tables are allocated but \(walk.reachable.count) are reachable, \(queued.count + dying.count) "
                            + "on their way to be freed (leaked or lost)")
        }
        let nxPages = possibleNXHugePages()
        if Int64(nxPages.count) != counters.nxLpageSplits.load(ordering: .relaxed) {
            problems.append("nx_lpage_splits is \(counters.nxLpageSplits.load(ordering: .relaxed)) but \(nxPages.count) tables are listed")
        }
        for page in nxPages {
            if !page.isLive || page.isRemoved || !walk.reachable.contains(page.frame.rawValue) {
                problems.append("NX list holds table \(page.frame) that is not a reachable live table")
            } else if !page.nxHugePageDisallowed || !page.isPossibleNXHugePage {
                problems.append("NX list holds table \(page.frame) without its NX flags")
            }
        }
        return problems
    }

    /// What the walk of every root found.
    private struct AuditWalk {
        var reachable = Set<UInt64>()
        var leaves: [Int64] = [0, 0, 0]
        var rootsWithPresentEntries = Set<UInt64>()
        /// The dirty bitmaps of the logging slots, copied once.
        var dirtyBitmaps: [Int: [UInt64]] = [:]
        /// The gfns logged in vCPUs' PML buffers and not yet in the bitmaps.
        var pmlBuffered = Set<UInt64>()
        /// With dirty rings, the gfns on the rings not yet reset (logged there, not in the bitmaps).
        var ringed = Set<UInt64>()
        func presentInRoot(_ frame: UInt64) -> Bool { rootsWithPresentEntries.contains(frame) }

        /// Whether pages `first..<first + count` of the slot are all marked dirty.
        func allDirty(slot: Int, first: UInt64, count: UInt64, base: UInt64) -> Bool {
            if !ringed.isEmpty && (base + first..<base + first + count).allSatisfy({ ringed.contains($0) }) { return true }
            guard let bitmap = dirtyBitmaps[slot] else { return false }
            var page = first
            while page < first + count {
                let word = bitmap[Int(page / 64)]
                if page % 64 == 0 && first + count - page >= 64 {
                    if word != ~0 { return false }
                    page += 64
                } else {
                    if word & (1 << (page % 64)) == 0 { return false }
                    page += 1
                }
            }
            return true
        }
    }

    private func auditTable(_ entries: SPTEPointer, level: Int, baseGFN: UInt64, root: TDPRoot, _ walk: inout AuditWalk,
                            _ problems: inout [String]) {
        for index in 0..<KVMLevel.entriesPerPage {
            let pointer = entries + index
            let spte = SPTESlot(pointer).load()
            let gfn = baseGFN + UInt64(index) * pagesPerHugePage(level)
            // Built only for a report: the walk visits every SPTE.
            var place: String { "gfn \(hex(gfn)) level \(level) (\(root.frame))" }
            if spte.isFrozen {
                problems.append("\(place): frozen SPTE with no operation running")
                continue
            }
            if !spte.isShadowPresent {
                if spte.isMMIO(masks) {
                    auditMMIO(spte, gfn: gfn, level: level, place: place, &problems)
                } else if spte != .nonPresent {
                    problems.append("\(place): non-present SPTE \(spte) is neither empty nor MMIO")
                }
                continue
            }
            if level == rootLevel { walk.rootsWithPresentEntries.insert(root.frame.rawValue) }
            if spte.isLast(level: level) {
                walk.leaves[min(level, 3) - 1] += 1
                auditLeaf(spte, gfn: gfn, level: level, root: root, walk: walk, place: place, &problems)
                continue
            }
            let link = SPTE.nonLeaf(child: spte.pfn, adDisabled: !masks.accessedDirtyEnabled, masks: masks)
            if spte.rawValue & ~masks.accessed != link.rawValue & ~masks.accessed {
                problems.append("\(place): link \(spte) is not what make_nonleaf_spte makes (\(link))")
            }
            guard let child = records.page(spte.pfn), child.isLive, !child.isRemoved else {
                problems.append("\(place): links \(spte.pfn), which is not a live TDP table")
                continue
            }
            if child.level != level - 1 || child.gfn != gfn || child.parentSPTE != pointer
                || child.role != role(root.role, level: level - 1) {
                problems.append("\(place): table \(child.frame) has level \(child.level), gfn \(hex(child.gfn)), role \(child.role)")
            }
            guard walk.reachable.insert(child.frame.rawValue).inserted else {
                problems.append("\(place): table \(child.frame) is linked twice")
                continue
            }
            auditTable(table(of: child.frame), level: level - 1, baseGFN: gfn, root: root, &walk, &problems)
        }
    }

    private func auditMMIO(_ spte: SPTE, gfn: UInt64, level: Int, place: @autoclosure () -> String,
                           _ problems: inout [String]) {
        if level != KVMLevel.pageTable { problems.append("\(place()): MMIO SPTE above level 1") }
        if spte.mmioGFN(masks).rawValue != gfn { problems.append("\(place()): MMIO SPTE holds gfn \(hex(spte.mmioGFN(masks).rawValue))") }
        // A current-generation MMIO SPTE says "no memslot here"; older ones are rebuilt on use.
        if spte.mmioGeneration == memory.generation & SPTE.mmioGenerationMask && slotMetadata(containing: gfn) != nil {
            problems.append("\(place()): current MMIO SPTE for a gfn inside a memslot")
        }
    }

    private func auditLeaf(_ spte: SPTE, gfn: UInt64, level: Int, root: TDPRoot, walk: AuditWalk,
                           place: @autoclosure () -> String,
                           _ problems: inout [String]) {
        var description: String { spte.describe(masks) }
        if level > configuration.maxHugePageLevel {
            problems.append("\(place()): leaf \(description) above the largest huge page level \(configuration.maxHugePageLevel)")
            return
        }
        let pages = pagesPerHugePage(level)
        guard let metadata = slotMetadata(containing: gfn) else {
            problems.append("\(place()): leaf \(description) maps a gfn in no memslot")
            return
        }
        let slot = metadata.slot
        if gfn + pages > slot.endFrame.rawValue {
            problems.append("\(place()): huge leaf runs past the end of \(slot)")
            return
        }
        let expectedFrame = slot.hostBase.rawValue + (gfn - slot.baseFrame.rawValue)
        if spte.pfn.rawValue != expectedFrame {
            problems.append("\(place()): leaf maps \(spte.pfn), but \(slot) puts \(hex(expectedFrame)) there")
        }
        if let problem = auditSubPageProtection(spte, gfn: gfn, level: level) { problems.append("\(place()): \(problem)") }
        if !spte.checkWritableInvariants(masks) { problems.append("\(place()): \(description) breaks W => MMU-writable => host-writable") }
        if spte.isHostWritable(masks) == slot.isReadOnly {
            problems.append("\(place()): \(description) host-writable does not match \(slot)")
        }
        let expectedAD: SPTE.ADState = root.role.adDisabled
            ? .disabled : (configuration.dirtyLogging == .pml && root.role.guestMode ? .wrprotOnly : .enabled)
        if spte.adState != expectedAD { problems.append("\(place()): \(description) has A/D type \(String(describing: spte.adState))") }
        if level > KVMLevel.pageTable {
            if (slot.baseFrame.rawValue ^ slot.hostBase.rawValue) & (pages - 1) != 0 {
                problems.append("\(place()): huge leaf in \(slot), whose guest and host frames are not aligned alike")
            }
            if metadata.hostMappingLevel(gfn) < level {
                problems.append("\(place()): huge leaf larger than the host maps (\(metadata.hostMapping))")
            }
            if configuration.nxHugePages && spte.isExecutable(masks) {
                problems.append("\(place()): executable huge leaf under the NX huge-page mitigation")
            }
            // KVM write-protects huge leaves when logging starts, except in initially-all-set mode,
            // where every page starts dirty and CLEAR_DIRTY_LOG write-protects before it cleans.
            if slot.logsDirtyPages && spte.isWritable
                && !walk.allDirty(slot: slot.id, first: gfn - slot.baseFrame.rawValue, count: pages, base: slot.baseFrame.rawValue) {
                problems.append("\(place()): writable huge leaf in dirty-logging \(slot) over gfns not marked dirty")
            }
            if spte.isMMUWritable(masks), let tracked = metadata.writeTrackedGFNs.first(where: { $0 >= gfn && $0 < gfn + pages }) {
                problems.append("\(place()): MMU-writable huge leaf over write-tracked gfn \(hex(tracked))")
            }
            return
        }
        if metadata.isWriteTracked(gfn) && (spte.isWritable || spte.isMMUWritable(masks)) {
            problems.append("\(place()): write-tracked gfn mapped \(description)")
        }
        // With dirty rings a logged gfn sits in a vCPU's ring (not the bitmap) until
        // KVM_RESET_DIRTY_RINGS re-protects it (`walk.ringed`).
        if slot.logsDirtyPages && spte.isWritable {
            // With PML and hardware A/D, a write sets D and logs the gfn; until then D is clear.
            let writesLogByD = configuration.dirtyLogging == .pml && spte.adState == .enabled
            if (!writesLogByD || spte.isDirty(masks))
                && !walk.allDirty(slot: slot.id, first: gfn - slot.baseFrame.rawValue, count: 1, base: slot.baseFrame.rawValue)
                && !walk.pmlBuffered.contains(gfn) {
                problems.append("\(place()): \(description) can be written in dirty-logging \(slot) but the gfn is not marked dirty")
            }
        }
    }

    /// Disallow counts can only be above what the slot's edges, alignment and write tracking need
    /// (others may account gfns too), never below.
    private func auditDisallowCounts(_ metadata: MemslotMetadata, _ problems: inout [String]) {
        let slot = metadata.slot
        for level in 2...3 {
            let pages = pagesPerHugePage(level)
            let regions = level == 2 ? metadata.regions2M : metadata.regions1G
            let misaligned = (slot.baseFrame.rawValue ^ slot.hostBase.rawValue) & (pages - 1) != 0
            var tracked = [Int32](repeating: 0, count: regions)
            for gfn in metadata.writeTrackedGFNs {
                tracked[Int(gfn / pages - slot.baseFrame.rawValue / pages)] += 1
            }
            for region in 0..<regions {
                let first = (slot.baseFrame.rawValue / pages + UInt64(region)) * pages
                let partial = first < slot.baseFrame.rawValue || first + pages > slot.endFrame.rawValue
                let needed: Int32 = (misaligned || partial ? 1 : 0) + tracked[region]
                let gfn = max(first, slot.baseFrame.rawValue)
                if metadata.disallowCount(gfn, level: level) < needed {
                    problems.append("\(slot): disallow_lpage of the level-\(level) region at \(hex(first)) is "
                                    + "\(metadata.disallowCount(gfn, level: level)), below \(needed)")
                }
            }
        }
    }
}

extension TDPMMU {
    /// SPP's invariants of one leaf: none of its bits without SPP, `SubPageProtection.auditLeaf`
    /// with it, and no huge leaf over a block holding a protected page.
    fileprivate func auditSubPageProtection(_ spte: SPTE, gfn: UInt64, level: Int) -> String? {
        guard let protection = subPageProtection else {
            return spte.isSubPageArmed || spte.hasSavedSubPageArming ? "SPP bits on a leaf, but SPP is not enabled" : nil
        }
        if level > KVMLevel.pageTable && protection.maxMappingLevel(for: GuestFrameNumber(gfn), limit: level) < level {
            return "a level-\(level) leaf covers a page sub-page write protection protects"
        }
        return protection.auditLeaf(spte, gfn: GuestFrameNumber(gfn), level: level)
    }
}
