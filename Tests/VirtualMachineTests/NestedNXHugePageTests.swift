import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import X86Paging

// The NX huge-page mitigation for L2's pages in `guest_mmu` under a TDP L1: an L2 fetch from memory
// L1 maps with a huge leaf is mapped 4 KiB through a direct page that exists only because of the
// mitigation (`account_nx_huge_page`), counted in `nx_lpage_splits` when a huge leaf was otherwise
// allowed; a later access there stays small (`disallowed_hugepage_adjust`); the recovery worker zaps
// the oldest ceil(count / ratio) such pages, or only takes them off the list in a logging memslot;
// a zap takes them off too. Every L2 access is checked against the architecture and both auditors
// (which check the list against the counter).

@Suite("NX huge pages for L2: guest_mmu's split pages counted in nx_lpage_splits and recovered")
struct NestedNXHugePageTests {
    /// L2's [0, 4 MiB) in two RWX 2 MiB L1 leaves at L1 4 MiB (or at L1 2 MiB, over L1's own
    /// EPT tables, which are write-tracked), L2's paging off.
    func hugeMapped(npt: Bool, nxHugePages: Bool = true, ratio: Int = 60, overL1Tables: Bool = false) throws -> L1Hypervisor {
        let l1 = try L1Hypervisor(npt: npt, nxHugePages: nxHugePages, nxRecoveryRatio: ratio)
        try l1.enterOverTwoHugeLeaves(overL1Tables: overL1Tables)
        return l1
    }

    /// The direct pages `guest_mmu` made for L2's memory, by the L2 region they split.
    func splitPages(_ vm: VirtualMachine) -> [ShadowPage] {
        vm.mmu.shadowPages.filter { $0.role.isDirect && $0.level == 1 }
    }

    @Test("An L2 fetch from an L1 huge leaf maps 4 KiB through a counted direct page; later reads there stay 4 KiB; a huge leaf fetched from is split", arguments: [false, true])
    func fetchSplits(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt)
        let vm = l1.vm
        #expect(try l1.l2(0x1_2340, .fetch, .supervisor).exits == 1)
        // (The direct page's prefetch maps the aligned group of 8 around the page, 4 KiB too.)
        #expect(vm.mmu.stats.pages4K > 0 && vm.mmu.stats.pages2M == 0)
        #expect(vm.stats.nxLpageSplits == 1 && vm.mmu.possibleNXHugePages.count == 1)
        let split = try #require(splitPages(vm).first)
        #expect(split.nxHugePageDisallowed && split.isPossibleNXHugePage)
        // A read in the same region, beyond the prefetched group, keeps the split (no huge leaf
        // over the mitigation's page).
        let small = vm.mmu.stats.pages4K
        #expect(try l1.l2(0x1_A000, .read, .supervisor).exits == 1)
        #expect(vm.mmu.stats.pages4K > small && vm.mmu.stats.pages2M == 0)
        // The other region: a read maps it huge and not executable, so a fetch there exits and
        // splits it.
        #expect(try l1.l2(0x20_1000, .read, .supervisor).exits == 1)
        #expect(vm.mmu.stats.pages2M == 1)
        #expect(try l1.l2(0x20_3000, .fetch, .supervisor).exits == 1)
        #expect(vm.mmu.stats.pages2M == 0 && vm.stats.nxLpageSplits == 2)
        #expect(vm.mmu.possibleNXHugePages.map(\.gfn) == splitPages(vm).sorted { $0.gfn.rawValue < $1.gfn.rawValue }.map(\.gfn),
                "oldest first: the first split first")
        // Fetching again where the split is: 4 KiB leaves are executable, no new page, no new count.
        #expect(try l1.l2(0x1_3000, .fetch, .supervisor).exits == 0)
        #expect(try l1.l2(0x1_E000, .fetch, .supervisor).exits == 0)
        #expect(vm.stats.nxLpageSplits == 2 && splitPages(vm).count == 2)
    }

    @Test("Without the mitigation a fetch maps the huge leaf, executable, and nothing is counted", arguments: [false, true])
    func mitigationOff(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt, nxHugePages: false)
        #expect(try l1.l2(0x1_2340, .fetch, .supervisor).exits == 1)
        #expect(try l1.l2(0x1_F000, .fetch, .supervisor).exits == 0)
        #expect(l1.vm.mmu.stats.pages2M == 1 && l1.vm.stats.nxLpageSplits == 0 && splitPages(l1.vm).isEmpty)
    }

    @Test("Where no huge leaf was possible (L1's own tables in the region are write-tracked) the page is marked but not counted", arguments: [false, true])
    func notPossible(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt, overL1Tables: true)
        #expect(try l1.l2(0x1_0000, .fetch, .supervisor).exits == 1)
        let split = try #require(splitPages(l1.vm).first)
        #expect(split.nxHugePageDisallowed && !split.isPossibleNXHugePage)
        #expect(l1.vm.stats.nxLpageSplits == 0 && l1.vm.mmu.possibleNXHugePages.isEmpty)
    }

    @Test("Recovery zaps the oldest ceil(count / ratio) split pages, and the huge leaf comes back at the next read", arguments: [false, true])
    func recovery(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt, ratio: 2)
        let vm = l1.vm
        _ = try l1.l2(0x1_0000, .fetch, .supervisor)
        _ = try l1.l2(0x20_0000, .fetch, .supervisor)
        #expect(vm.stats.nxLpageSplits == 2)
        let flushesBefore = vm.stats.remoteTLBFlushRequests
        #expect(vm.recoverNXHugePages() == 1, "ceil(2 / 2)")
        #expect(vm.stats.remoteTLBFlushRequests == flushesBefore + 1, "one flush for the batch")
        #expect(vm.stats.nxLpageSplits == 1 && splitPages(vm).map(\.gfn.rawValue) == [0x400 + 0x200])
        // The recovered region maps huge again (a read), the other stays split.
        #expect(try l1.l2(0x1_8000, .read, .supervisor).exits == 1)
        #expect(vm.mmu.stats.pages2M == 1)
        #expect(try l1.l2(0x20_8000, .read, .supervisor).exits == 1)
        #expect(vm.mmu.stats.pages2M == 1)
        #expect(vm.recoverNXHugePages() == 1 && vm.stats.nxLpageSplits == 0 && splitPages(vm).isEmpty)
        #expect(vm.recoverNXHugePages() == 0)
        // A ratio of 0 turns recovery off.
        let off = try hugeMapped(npt: npt, ratio: 0)
        _ = try off.l2(0x1_0000, .fetch, .supervisor)
        #expect(off.vm.recoverNXHugePages() == 0 && off.vm.stats.nxLpageSplits == 1)
    }

    @Test("In a memslot that logs dirty pages recovery only takes pages off the list; a zap takes them off too", arguments: [false, true])
    func loggingAndZaps(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt, ratio: 1)
        let vm = l1.vm
        _ = try l1.l2(0x1_0000, .fetch, .supervisor)
        _ = try l1.l2(0x20_0000, .fetch, .supervisor)
        try vm.setDirtyLogging(slot: 0, true)
        #expect(vm.recoverNXHugePages() == 2)
        #expect(vm.stats.nxLpageSplits == 0 && splitPages(vm).count == 2 && splitPages(vm).allSatisfy { !$0.nxHugePageDisallowed })
        #expect(vm.audit().isEmpty)
        try vm.setDirtyLogging(slot: 0, false)
        _ = try l1.l2(0x1_0000, .read, .supervisor)

        let zapped = try hugeMapped(npt: npt)
        _ = try zapped.l2(0x1_0000, .fetch, .supervisor)
        _ = try zapped.l2(0x20_0000, .fetch, .supervisor)
        zapped.vm.zapAllFast()
        #expect(zapped.vm.stats.nxLpageSplits == 0 && zapped.vm.mmu.possibleNXHugePages.isEmpty)
        #expect(zapped.vm.audit().isEmpty)
        #expect(try zapped.l2(0x1_0000, .fetch, .supervisor).exits == 1)
        #expect(zapped.vm.stats.nxLpageSplits == 1)
    }
}

@Suite("Aging L2's pages: clear_young and test_young reach guest_mmu's leaves by L1 gfn")
struct NestedAgingTests {
    @Test("An L2 page is young after its fault, idle once aged; the next walk of it (a VM entry without VPID flushed L2's TLB) makes it young again, through the fast path when L1's EPT has no A/D", arguments: [false, true])
    func aging(ad: Bool) throws {
        let l1 = try L1Hypervisor()
        l1.ad = ad
        try l1.map(0x5000, to: 0x40_5000, rights: 0x7)
        try l1.enter(registers: PagingRegisters())
        _ = try l1.l2(0x5000, .read, .supervisor)
        let gfns = UInt64(0x405)..<0x406
        #expect(l1.vm.mmu.mappings(of: GuestFrameNumber(0x405)).count == 1)
        #expect(l1.vm.testAgeGFNRange(gfns) && l1.vm.ageGFNRange(gfns))
        #expect(!l1.vm.testAgeGFNRange(gfns) && !l1.vm.ageGFNRange(gfns))
        try l1.vcpu.exitToL1()
        try l1.enter(registers: PagingRegisters())
        let again = try l1.l2(0x5008, .read, .supervisor)
        #expect(again.exits == (ad ? 0 : 1), "A/D off: the access-tracked leaf faults once")
        #expect(l1.vm.testAgeGFNRange(gfns))
        #expect(!l1.vm.testAgeGFNRange(0x406..<0x500))
    }
}
