import GuestMemory
import X86Paging

extension ShadowMMU {
    /// The structural auditor: KVM's invariants over every shadow page, SPTE, rmap and counter.
    /// Returns one line per violation (empty when all hold). Costs a pass over every SPTE. Under a
    /// TDP L1 (`tdpSharingWriteTracking`) the caller holds the shared `mmu_lock` for write.
    public func audit() -> [String] {
        var problems: [String] = []
        let pages = Array(hashBuckets.joined())
        var leafCount = [0, 0, 0]
        // gfns holding a shadowed guest table that is in sync (must be write-protected); a gfn
        // whose shadow pages are all unsync may be mapped writable.
        var protectedGFNs = Set<UInt64>()
        var trackedGFNs = Set<UInt64>()
        var indirect = 0
        var unsyncPages = 0
        for page in pages where page.hasGPTEs && !page.role.isInvalid {
            indirect += 1
            if !page.unsync { protectedGFNs.insert(page.gfn.rawValue) }
            if page.level > 1 { trackedGFNs.insert(page.gfn.rawValue) }
        }
        if let tdp = tdpSharingWriteTracking {
            // Under a TDP L1, L1 writes its tables through the TDP MMU: one that `guest_mmu`
            // shadows in sync must be read-only there too (tracked, or write-protected until its
            // first write unsyncs it).
            for gfn in protectedGFNs.union(trackedGFNs).sorted() where tdp.mapsWritableLocked(gfn) {
                problems.append("gfn \(hex(gfn)) holds a shadowed table in sync but the TDP MMU lets L1 write it")
            }
        }
        for page in pages where page.unsync {
            unsyncPages += 1
            if page.level != 1 || !page.hasGPTEs {
                problems.append("\(page): only last-level pages that shadow guest tables may be unsync")
            }
            for pointer in page.parentPTEs {
                let parent = self.page(containing: pointer)
                if !parent.hasUnsyncChild(at: parent.index(of: pointer)) {
                    problems.append("\(page): unsync, but its parent \(parent) has no unsync bit for SPTE \(parent.index(of: pointer))")
                }
            }
        }
        for page in pages where page.unsyncChildren > 0 {
            for pointer in page.parentPTEs {
                let parent = self.page(containing: pointer)
                if !parent.hasUnsyncChild(at: parent.index(of: pointer)) {
                    problems.append("\(page): has unsync children, but its parent \(parent) has no bit for SPTE \(parent.index(of: pointer))")
                }
            }
            let bitsSet = Array(page.unsyncChildIndexes).count
            if bitsSet != page.unsyncChildren {
                problems.append("\(page): unsync_children = \(page.unsyncChildren) but \(bitsSet) bits are set")
            }
        }
        if stats.mmuUnsync != UInt64(unsyncPages) {
            problems.append("mmu_unsync = \(stats.mmuUnsync) but \(unsyncPages) pages are unsync")
        }
        var dirtyLog = DirtyLogSnapshot(memory: memory, ringed: memory.dirtyRingSink != nil ? dirtyRingGFNs() : [])
        for page in pages + perVCPURootPages {
            for index in 0..<512 {
                let pointer = page.spte(index)
                let spte = SPTE(rawValue: pointer.pointee)
                guard spte.isShadowPresent else { continue }
                if spte.isLast(level: page.level) {
                    leafCount[page.level - 1] += 1
                    let gfn = page.mappedGFN(at: index)
                    if !rmaps.sptes(spte.pfn.rawValue, level: page.level).contains(pointer) {
                        problems.append("\(page): leaf SPTE \(index) for gfn \(hex(gfn.rawValue)) is missing from the rmap")
                    }
                    if memory.hostFrame(of: gfn) != spte.pfn {
                        problems.append("\(page): SPTE \(index) maps host frame \(hex(spte.pfn.rawValue)), which does not back gfn \(hex(gfn.rawValue)) in any memslot")
                    }
                    let pages = pagesPerHugePage(page.level)
                    let region = gfn.rawValue..<gfn.rawValue + pages
                    if spte.isWritable, let table = region.first(where: { protectedGFNs.contains($0) || trackedGFNs.contains($0) }) {
                        problems.append("\(page): SPTE \(index) lets the guest write gfn \(hex(table)), which holds a shadowed guest table in sync")
                    }
                    if page.level > 1 {
                        // A huge leaf (L2's, under TDP): one memslot's aligned run of frames.
                        if gfn.rawValue & (pages - 1) != 0 || spte.pfn.rawValue & (pages - 1) != 0
                            || memory.slot(containing: GuestFrameNumber(region.upperBound - 1)) != memory.slot(containing: gfn) {
                            problems.append("\(page): huge SPTE \(index) for gfn \(hex(gfn.rawValue)) is not an aligned run of one memslot")
                        }
                        if tdpSharingWriteTracking == nil { problems.append("\(page): huge SPTE \(index) outside guest_mmu under TDP") }
                    }
                    if spte.isWritable && !spte.isMMUWritable(masks) || spte.isMMUWritable(masks) && !spte.isHostWritable(masks) {
                        problems.append("\(page): SPTE \(index) breaks the writable invariants (W => MMU-writable => host-writable)")
                    }
                    if spte.adState != leafADState(page.role) {
                        problems.append("\(page): SPTE \(index) has A/D type \(String(describing: spte.adState)), not KVM's \(leafADState(page.role))")
                    }
                    // The dirty log: a write through this SPTE must find its gfn logged already
                    // (D clear on an A/D SPTE under PML: the write would set D and log it).
                    let logsByD = cpuDirtyLogging && spte.adState == .enabled && !spte.isDirty(masks)
                    if spte.isWritable && !logsByD,
                       let unlogged = dirtyLog.unloggedGFN(from: gfn.rawValue, count: pages) {
                        problems.append("\(page): SPTE \(index) lets the guest write gfn \(hex(unlogged)) of a dirty-logging memslot, which is not marked dirty")
                    }
                } else {
                    guard let child = child(of: spte) else {
                        problems.append("\(page): SPTE \(index) points at host frame \(hex(spte.pfn.rawValue)), which is no shadow page")
                        continue
                    }
                    if child.level != page.level - 1 {
                        problems.append("\(page): SPTE \(index) links a level-\(child.level) page under a level-\(page.level) one")
                    }
                    if !child.parentPTEs.contains(pointer) {
                        problems.append("\(child): missing parent SPTE \(index) of \(page)")
                    }
                    // A per-vCPU root page's role is the root role at its level, not a child's.
                    if child.isPerVCPURoot { continue }
                    // The parent-derived role of the variant's own encoding; for recompute-child-role
                    // this is upstream's, which is the claim that variant exists to check.
                    let expected = variant.childRole(of: page.role, parentIndex: index, direct: child.role.isDirect,
                                                     access: child.role.access)
                    if expected.word & ~invalidRoleBit != child.role.word & ~invalidRoleBit {
                        problems.append("\(child): role \(child.role) does not follow from its parent's (\(expected))")
                    }
                }
            }
        }
        if rmaps.total != leafCount.reduce(0, +) {
            problems.append("the rmaps hold \(rmaps.total) SPTEs but the tables hold \(leafCount.reduce(0, +)) present leaves")
        }
        for page in pages + perVCPURootPages where directory.page(page.frame.rawValue) !== page {
            problems.append("\(page): its host frame does not lead back to it")
        }
        if UInt64(leafCount[0]) != stats.pages4K || UInt64(leafCount[1]) != stats.pages2M || UInt64(leafCount[2]) != stats.pages1G {
            problems.append("pages_4k/2m/1g = \(stats.pages4K)/\(stats.pages2M)/\(stats.pages1G) but the tables hold \(leafCount[0])/\(leafCount[1])/\(leafCount[2]) leaves")
        }
        if usedPages != pages.count { problems.append("n_used_mmu_pages = \(usedPages) but \(pages.count) pages exist") }
        if indirectShadowPages != indirect {
            problems.append("indirect_shadow_pages = \(indirectShadowPages) but \(indirect) valid pages shadow guest tables")
        }
        var expectedTracking: [UInt64: Int] = [:]
        for page in pages where page.hasGPTEs && !page.role.isInvalid && page.level > 1 {
            expectedTracking[page.gfn.rawValue, default: 0] += 1
        }
        for (gfn, count) in expectedTracking.sorted(by: { $0.key < $1.key }) {
            let tracked = memory.hostFrame(of: GuestFrameNumber(gfn)).map { Int(writeTrack[$0.rawValue]) } ?? 0
            if tracked != count {
                problems.append("gfn \(hex(gfn)) holds \(count) shadowed upper-level guest tables but its write-track count is \(tracked)")
            }
        }
        var expectedShadowed: [UInt64: Int] = [:]
        for page in pages where page.hasGPTEs && !page.role.isInvalid { expectedShadowed[page.gfn.rawValue, default: 0] += 1 }
        for (gfn, count) in expectedShadowed.sorted(by: { $0.key < $1.key }) {
            let counted = memory.hostFrame(of: GuestFrameNumber(gfn)).map { Int(shadowedTableCount[$0.rawValue]) } ?? 0
            if counted != count {
                problems.append("gfn \(hex(gfn)) holds \(count) shadowed guest tables but its count says \(counted)")
            }
        }
        if writeTrackTotal != expectedTracking.values.reduce(0, +) {
            problems.append("write tracking counts \(writeTrackTotal) in all but \(expectedTracking.values.reduce(0, +)) upper-level guest tables are shadowed")
        }
        problems += auditNXHugePages()
        return problems
    }

    private var invalidRoleBit: UInt32 { 1 << 11 }
}

/// The dirty log as the auditor reads it: each logging slot's bitmap (copied once) and, with dirty
/// rings, the gfns pushed and not yet reset.
private struct DirtyLogSnapshot {
    let memory: MemslotSet
    let ringed: Set<UInt64>
    var bitmaps: [Int: [UInt64]] = [:]

    init(memory: MemslotSet, ringed: Set<UInt64>) {
        self.memory = memory
        self.ringed = ringed
    }

    /// The first of `count` gfns from `first` that is in a logging slot and not logged, if any.
    mutating func unloggedGFN(from first: UInt64, count: UInt64) -> UInt64? {
        for gfn in first..<first + count {
            guard let slot = memory.slot(containing: GuestFrameNumber(gfn)), slot.logsDirtyPages else { continue }
            if ringed.contains(gfn) { continue }
            if bitmaps[slot.id] == nil { bitmaps[slot.id] = (try? memory.dirtyBitmap(slot: slot.id)) ?? [] }
            let page = gfn - slot.baseFrame.rawValue
            let words = bitmaps[slot.id]!
            if Int(page / 64) < words.count && words[Int(page / 64)] & (1 << (page % 64)) != 0 { continue }
            return gfn
        }
        return nil
    }
}
