import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

/// Regressions for the dirty-logging bugs KVM has had in the TDP MMU (docs/BUG-CLASSES.md, class 8).
/// Each test is built so that the bug, reintroduced, fails it.
@Suite struct TDPDirtyLogBugClassTests {
    /// "Fix off-by-one when splitting huge pages during CLEAR" (6.8 MMU pull): in initially-all-set
    /// mode KVM_CLEAR_DIRTY_LOG splits the huge pages around the cleared range before protecting
    /// it, and the range's end is its last gfn plus one. Passed inclusive as exclusive, the huge
    /// page holding only the mask's last gfn is left whole and write-protected at 2 MiB. The slot
    /// here starts 32 pages below a 2 MiB boundary, so one 64-page mask word straddles it and its
    /// highest bit is the first gfn of a huge page.
    @Test func clearSplitsTheHugePageHoldingOnlyTheMasksLastGFN() throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.dirtyLogProtection = .manualInitiallySet
        configuration.eagerPageSplit = true
        let fixture = try TDPFixture(configuration: configuration)
        let base = pages2M - 32
        try fixture.addSlot(id: 0, baseGFN: base, pages: 4 * pages2M)
        try fixture.access(pages2M + 100, .write)
        #expect(fixture.leafLevel(pages2M + 100) == 2, "mapped huge before logging")
        try fixture.mmu.setMemslotFlags(id: 0, flags: .logDirtyPages)
        #expect(fixture.leafLevel(pages2M + 100) == 2, "initially set: nothing split or protected at enable")

        // Bits 0 and 32 of the first word: gfn base (below the boundary) and gfn 512 (its first page).
        try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: [1 | 1 << 32])
        #expect(fixture.leafLevel(pages2M) == 1 && fixture.leafLevel(pages2M + 100) == 1,
                "the huge page that holds only the last cleared gfn is split")
        let cleared = try #require(fixture.mmu.mapping(of: pages2M, in: fixture.root)).spte
        let neighbour = try #require(fixture.mmu.mapping(of: pages2M + 1, in: fixture.root)).spte
        #expect(!cleared.isWritable && cleared.isMMUWritable(fixture.masks), "the cleared gfn is protected")
        #expect(neighbour.isWritable, "its neighbours, still set in the log, stay writable")
        // A write to the neighbour does not fault; one to the cleared gfn is logged again.
        let taken = fixture.mmu.stats.pfTaken
        try fixture.access(pages2M + 1, .write)
        #expect(fixture.mmu.stats.pfTaken == taken)
        try fixture.access(pages2M, .write)
        #expect(fixture.memory.isDirty(GuestFrameNumber(pages2M)))
        fixture.expectClean("CLEAR across a 2 MiB boundary")
    }

    /// "Check for leaf SPTE when clearing dirty bit in the TDP MMU" (6.8 MMU pull): clearing D runs
    /// under the MMU lock held for read, so the compare-exchange can lose to a thread that replaced
    /// the huge leaf with a table. The retry must look at the new value as a whole (present and a
    /// leaf), not only clear D again: bit 9 of a non-leaf EPT entry is not a dirty bit.
    @Test func clearingDirtyBitsSkipsALeafThatBecameATableMeanwhile() throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46, pml: true)
        configuration.eagerPageSplit = false
        let fixture = try TDPFixture(configuration: configuration)
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        try fixture.access(7, .write)
        let huge = try #require(fixture.mmu.mapping(of: 7, in: fixture.root)).spte
        #expect(huge.isLarge && huge.isDirty(fixture.masks))

        let table = try fixture.pool.allocatePage()
        let racingTable = SPTE(SPTE.nonLeaf(child: table, adDisabled: false, masks: fixture.masks).rawValue | fixture.masks.dirty)
        var raced: SPTESlot?
        fixture.mmu.beforeAtomicUpdate = { slot, level in
            guard raced == nil, level == 2 else { return }
            // Another thread splits the huge page: a table entry replaces the leaf.
            _ = slot.exchange(racingTable)
            raced = slot
        }
        try fixture.mmu.clearDirtySlot(0)
        fixture.mmu.beforeAtomicUpdate = nil
        let slot = try #require(raced, "the clear never tried to update the huge leaf")
        #expect(slot.load() == racingTable, "the retry left the table entry alone")
        // Undo the simulated split so the auditor sees the MMU's own state again.
        slot.store(huge)
        try fixture.pool.freePage(table)
        fixture.expectClean("clear-dirty race")
    }
}
