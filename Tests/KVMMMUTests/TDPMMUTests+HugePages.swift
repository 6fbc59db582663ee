import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

@Suite struct TDPMMUSplitTests {
    /// Eager splitting replaces a 1G leaf by 512 2M leaves, then some of those by 4K leaves, with
    /// the same translations, exact counters and no TLB flush.
    @Test func eagerSplittingKeepsTranslationsAndCounts() throws {
        let fixture = try TDPFixture()
        let slot = try fixture.addSlot(id: 0, baseGFN: pages1G, pages: pages1G)
        let probes: [UInt64] = [pages1G, pages1G + 1, pages1G + 513, 2 * pages1G - 1]
        for gfn in probes { _ = try fixture.access(gfn, .read) }
        #expect(fixture.mmu.stats.pages1G == 1)
        let flushes = fixture.flushes
        try fixture.mmu.splitHugePages(slot: 0, targetLevel: 2)
        #expect(fixture.mmu.stats.pages1G == 0 && fixture.mmu.stats.pages2M == 512)
        try fixture.mmu.splitHugePages(slot: 0, gfns: pages1G + 100..<pages1G + 1100, targetLevel: 1)
        #expect(fixture.mmu.stats.pages2M == 509 && fixture.mmu.stats.pages4K == 3 * 512)
        #expect(fixture.flushes == flushes)
        #expect(fixture.mmu.events.count(of: "kvm_mmu_split_huge_page") == 1 + 3)
        for gfn in probes {
            #expect(try fixture.access(gfn, .read) == .memory(HostFrameNumber(slot.hostBase.rawValue + gfn - pages1G)))
        }
        #expect(fixture.leafLevel(pages1G + 513) == 1 && fixture.leafLevel(2 * pages1G - 1) == 2)
        // The split leaves keep A, D and W.
        let small = try #require(fixture.mmu.mapping(of: pages1G + 600, in: fixture.root)).spte
        #expect(small.isWritable && small.isDirty(fixture.masks) && small.isAccessed(fixture.masks) && !small.isLarge)
        fixture.expectClean("split")
        #expect(throws: TDPMMUError.invalidLevel(3, "huge pages split down to level 1 or 2")) {
            try fixture.mmu.splitHugePages(slot: 0, targetLevel: 3)
        }
        #expect(throws: TDPMMUError.noSuchMemslot(4)) { try fixture.mmu.splitHugePages(slot: 4, targetLevel: 1) }
        // Zapping the collapsible tables brings the 1G page back on the next fault.
        try fixture.mmu.recoverHugePages(slot: 0)
        #expect(fixture.mmu.stats.pages4K == 0 && fixture.mmu.stats.pages2M == 0 && fixture.mmu.pageTableCount == 1)
        try fixture.access(pages1G + 5, .read)
        #expect(fixture.leafLevel(pages1G + 5) == 3)
        fixture.expectClean("recovered")
    }

    @Test func zapsOfRangesTakeOverlappingHugeLeavesWhole() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 8 * pages2M)
        for region in 0..<UInt64(8) { try fixture.access(region * pages2M + 1, .write) }
        #expect(fixture.mmu.stats.pages2M == 8)
        let flushes = fixture.flushes
        fixture.mmu.zapGFNRange(pages2M + 7..<3 * pages2M + 1)
        #expect(fixture.mmu.stats.pages2M == 5 && fixture.flushes == flushes + 1)
        #expect(fixture.leafLevel(pages2M) == nil && fixture.leafLevel(3 * pages2M + 500) == nil && fixture.leafLevel(4 * pages2M) == 2)
        fixture.mmu.zapGFNRange(100 * pages2M..<101 * pages2M)
        #expect(fixture.flushes == flushes + 1, "nothing zapped, no flush")
        fixture.mmu.unmapGFNRange(0..<8 * pages2M)
        #expect(fixture.mmu.stats.pages2M == 0 && fixture.mmu.pageTableCount == 2)
        fixture.expectClean("zaps")
        fixture.mmu.zapAll()
        #expect(fixture.mmu.pageTableCount == 0)
        fixture.expectClean("zap all")
    }
}

@Suite struct TDPMMUNXHugePageTests {
    func fixture(ratio: Int) throws -> TDPFixture {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46,
                                                    nxHugePages: true)
        configuration.nxHugePagesRecoveryRatio = ratio
        let fixture = try TDPFixture(configuration: configuration)
        try fixture.addSlot(id: 0, baseGFN: pages1G, pages: pages1G)
        return fixture
    }

    /// Executable accesses map 4K under NX huge pages; the tables made only for that are counted in
    /// nx_lpage_splits; non-executable huge mappings are not executable; recovery zaps
    /// ceil(n / ratio) of the oldest and huge pages come back.
    @Test func executableAccessesSplitAndRecoveryBringsHugePagesBack() throws {
        let fixture = try fixture(ratio: 1)
        let base = pages1G
        try fixture.access(base + 3, .fetch)
        #expect(fixture.leafLevel(base + 3) == 1)
        // The 2M table under the 1G entry and the 4K table under it: both only because of NX.
        #expect(fixture.mmu.stats.nxLpageSplits == 2)
        try fixture.access(base + pages2M + 3, .fetch)
        #expect(fixture.mmu.stats.nxLpageSplits == 3)
        // A read in another 2M region of that 1G: the 2M table stays (disallowed_hugepage_adjust),
        // a 2M leaf goes in it, not executable.
        try fixture.access(base + 5 * pages2M, .read)
        let huge = try #require(fixture.mmu.mapping(of: base + 5 * pages2M, in: fixture.root))
        #expect(huge.level == 2 && !huge.spte.isExecutable(fixture.masks))
        // Executing from it splits it into 4K leaves, executable again (make_small_spte); the new
        // table was wanted only by NX, so it is a candidate as well.
        try fixture.access(base + 5 * pages2M + 1, .fetch)
        #expect(fixture.leafLevel(base + 5 * pages2M + 1) == 1 && fixture.mmu.stats.nxLpageSplits == 4)
        let neighbour = try #require(fixture.mmu.mapping(of: base + 5 * pages2M + 2, in: fixture.root)).spte
        #expect(neighbour.isExecutable(fixture.masks))
        fixture.expectClean("NX splits")
        // Ratio 1: every candidate goes; the first (the 2M table) takes the rest with it.
        let zapped = fixture.mmu.recoverNXHugePages()
        #expect(zapped == 1 && fixture.mmu.stats.nxLpageSplits == 0 && fixture.mmu.pageTableCount == 1)
        fixture.expectClean("recovery")
        try fixture.access(base + 9, .read)
        #expect(fixture.leafLevel(base + 9) == 3)
        fixture.expectClean("1G again")
    }

    @Test func recoveryZapsTheCeilingOfTheCountOverTheRatioOldestFirst() throws {
        let fixture = try fixture(ratio: 4)
        // Five 4K tables in five 2M regions, plus the 2M table above them: six candidates.
        for region in 0..<UInt64(5) { try fixture.access(pages1G + region * pages2M, .fetch) }
        #expect(fixture.mmu.stats.nxLpageSplits == 6)
        // ceil(6 / 4) = 2: the 2M table (oldest) takes everything below it.
        #expect(fixture.mmu.recoverNXHugePages() == 1)
        #expect(fixture.mmu.stats.nxLpageSplits == 0)
        fixture.expectClean("recovery")
        let other = try self.fixture(ratio: 4)
        // A 2M table made by a read first is not NX-disallowed: only the 4K tables count.
        try other.access(pages1G + 10 * pages2M, .read)
        try other.mmu.addWriteTrack(pages1G + 10 * pages2M + 4)
        try other.access(pages1G + 10 * pages2M + 8, .read)
        for region in 0..<UInt64(5) { try other.access(pages1G + region * pages2M, .fetch) }
        #expect(other.mmu.stats.nxLpageSplits == 5)
        #expect(other.mmu.recoverNXHugePages() == 2)
        #expect(other.mmu.stats.nxLpageSplits == 3)
        #expect(other.leafLevel(pages1G) == nil && other.leafLevel(pages1G + pages2M) == nil && other.leafLevel(pages1G + 2 * pages2M) == 1)
        other.expectClean("partial recovery")
    }

    @Test func dirtyLoggingSlotsOnlyLoseTheirCandidates() throws {
        let fixture = try fixture(ratio: 1)
        try fixture.access(pages1G + 3, .fetch)
        try fixture.mmu.setMemslotFlags(id: 0, flags: .logDirtyPages)
        let tables = fixture.mmu.pageTableCount
        #expect(fixture.mmu.recoverNXHugePages() == 2)
        #expect(fixture.mmu.stats.nxLpageSplits == 0 && fixture.mmu.pageTableCount == tables)
        fixture.expectClean("logging slot")
    }
}

@Suite struct TDPSPTETransformTests {
    /// make_small_spte then make_huge_spte gives the huge SPTE back, for every format, level and
    /// index; under the NX mitigation the 4K pieces become executable and the collapsed one not.
    @Test(arguments: [SPTEMasks.shadowPaging, .ept(accessedDirty: true, executeOnly: false),
                      .ept(accessedDirty: false, executeOnly: true)])
    func splittingThenCollapsingIsTheIdentity(masks: SPTEMasks) {
        for level in 2...3 {
            for nx in [false, true] {
                let pfn = HostFrameNumber(0x4_0000)  // 1 GiB: aligned for every level
                let huge = SPTE.leaf(pfn: HostFrameNumber(pfn.rawValue & ~(pagesPerHugePage(level) - 1)), level: level,
                                     access: nx ? ACC.write | ACC.user : ACC.all, hostWritable: true, writable: true,
                                     adDisabled: !masks.accessedDirtyEnabled, masks: masks)
                for index in [0, 1, 255, 511] {
                    let small = huge.smallSPTE(index: index, childLevel: level - 1, roleAccess: ACC.all, nxHugePages: nx,
                                               masks: masks)
                    #expect(small.pfn.rawValue == huge.pfn.rawValue + UInt64(index) * pagesPerHugePage(level - 1))
                    #expect(small.isLarge == (level - 1 > 1))
                    #expect(small.isExecutable(masks) == (level == 2 ? true : !nx))
                    #expect(small.hugeSPTE(level: level, nxHugePages: nx, masks: masks) == huge)
                }
            }
        }
    }

    @Test func protectionChangesKeepAccessTrackedSPTEsTracked() {
        let masks = SPTEMasks.ept(accessedDirty: false, executeOnly: false)
        let spte = SPTE.leaf(pfn: HostFrameNumber(0x1234), level: 1, access: ACC.user, hostWritable: true, writable: false,
                             adDisabled: true, masks: masks)
        let tracked = spte.markedForAccessTrack(masks)
        let executable = tracked.madeExecutable(masks)
        #expect(executable.isAccessTracked(masks) && !executable.isExecutable(masks))
        #expect(executable.restoredFromAccessTrack(masks).isExecutable(masks))
        #expect(spte.madeExecutable(masks).madeNonExecutable(masks) == spte)
    }
}
