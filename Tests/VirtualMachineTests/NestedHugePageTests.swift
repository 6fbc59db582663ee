import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// L2's huge pages in `guest_mmu` under a TDP L1: KVM maps L2's page as large as L1's EPT (or NPT)
// leaf and the memslot's lpage_info allow (`kvm_mmu_hugepage_adjust`); dirty logging splits them,
// eagerly when logging starts (`kvm_shadow_mmu_try_split_huge_pages`) or at the first write, and
// turning logging off zaps the split leaves so that huge pages come back. Every L2 access is
// checked against the architecture's nested walk and followed by both auditors.

@Suite("L2's huge pages in guest_mmu: mapped where L1's leaf and lpage_info allow, split for dirty logging")
struct NestedHugePageTests {
    /// L2's [0, 4 MiB) in two 2 MiB L1 leaves at L1 4 MiB (or over L1's own EPT tables at 2 MiB),
    /// L2's paging off.
    func hugeMapped(npt: Bool = false, eagerPageSplit: Bool = true, overL1Tables: Bool = false,
                    logProtocol: DirtyLogProtocol = .getAndReset) throws -> L1Hypervisor {
        let l1 = try L1Hypervisor(npt: npt, dirtyLogProtocol: logProtocol, eagerPageSplit: eagerPageSplit)
        try l1.enterOverTwoHugeLeaves(overL1Tables: overL1Tables)
        return l1
    }

    func shadowLeaves(_ vm: VirtualMachine, _ gfn: UInt64) -> [SPTE] {
        vm.mmu.mappings(of: GuestFrameNumber(gfn)).map { SPTE(rawValue: $0.pointee) }
    }

    @Test("An L1 2 MiB leaf is mapped 2 MiB in guest_mmu (EPT and NPT); over a shadowed table of L1's, 4 KiB", arguments: [false, true])
    func hugeWhereAllowed(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt)
        try l1.l2(0x1_2340, .write, .supervisor, value: 7)
        try l1.l2(0x3_0000, .read, .supervisor)
        #expect(l1.vm.mmu.stats.pages2M == 1 && l1.vm.mmu.stats.pages4K == 0, "\(l1.vm.mmu.stats.pages2M) \(l1.vm.mmu.stats.pages4K)")
        let second = try l1.l2(0x1F_F000, .read, .supervisor)
        #expect(second.exits == 0, "the 2 MiB leaf maps the whole region")
        #expect(shadowLeaves(l1.vm, 0x412).allSatisfy { $0.isLarge && $0.isWritable })
        // L1's EPT tables live in L1's [2 MiB, 4 MiB): write-tracked, so never under a huge leaf.
        let overTables = try hugeMapped(npt: npt, overL1Tables: true)
        try overTables.l2(0x1_0000, .read, .supervisor)
        try overTables.l2(0x1_1000, .write, .supervisor, value: 1)
        #expect(overTables.vm.mmu.stats.pages2M == 0 && overTables.vm.mmu.stats.pages4K > 0)
    }

    @Test("Eager splitting when logging starts: each 2 MiB leaf becomes a direct page of 512 4 KiB leaves made from it, with no flush, then write-protected; writes log page by page; logging off zaps the split leaves and huge pages return", arguments: [false, true])
    func eagerSplit(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt)
        let vm = l1.vm
        try l1.l2(0x1000, .write, .supervisor, value: 1)
        try l1.l2(0x20_1000, .read, .supervisor)
        #expect(vm.mmu.stats.pages2M == 2)
        let before = vm.stats
        let hugeSPTE = shadowLeaves(vm, 0x400)[0]
        try vm.setDirtyLogging(slot: 0, true)
        let after = vm.stats
        #expect(vm.mmu.stats.pages2M == 0 && vm.mmu.stats.pages4K == 1024)
        #expect(after.mmuCacheMiss - before.mmuCacheMiss == 2, "one direct page per split")
        #expect(after.remoteTLBFlush - before.remoteTLBFlush == 1, "one flush, for the write protection; the splits need none")
        // Every new leaf is the huge one's slice: same rights and memory type, frame + index,
        // write-protected by logging, in a direct page with the huge leaf's access.
        for index in [0, 1, 255, 511] {
            let leaf = try #require(shadowLeaves(vm, 0x400 + UInt64(index)).first)
            #expect(leaf.pfn.rawValue == hugeSPTE.pfn.rawValue + UInt64(index) && !leaf.isLarge && !leaf.isWritable
                    && leaf.isMMUWritable(vm.mmu.masks))
            #expect(leaf.rawValue & ~(SPTE.writableBit | SPTE.baseAddressMask | SPTE.pageSizeBit | vm.mmu.masks.accessed | vm.mmu.masks.dirty)
                    == hugeSPTE.rawValue & ~(SPTE.writableBit | SPTE.baseAddressMask | SPTE.pageSizeBit | vm.mmu.masks.accessed | vm.mmu.masks.dirty))
        }
        let split = vm.mmu.shadowPages.filter { $0.role.isDirect && $0.level == 1 }
        // The huge leaf's access: all of it, but W for a page mapped by a read while L1's NPT leaf
        // was clean (`protect_clean_gpte`; EPT without A/D is always dirty).
        #expect(split.count == 2 && split.allSatisfy { $0.role.guestMode && $0.role.access | ACC.write == 0x7 })
        // Reads need no exit; each page's first write exits once and is logged.
        #expect(try l1.l2(0x5000, .read, .supervisor).exits == 0)
        for page in [UInt64(0x5), 0x6, 0x205] {
            #expect(try l1.l2(page << 12, .write, .supervisor, value: page).exits == 1)
        }
        // (Under NPT, KVM's walk also set D in L1's NPT leaves, in L1's table pages: logged too.)
        #expect(try vm.getDirtyLog(slot: 0).map(\.rawValue).filter { $0 >= 0x400 } == [0x405, 0x406, 0x605])
        // Logging off: the 4 KiB leaves of the direct pages go; the next accesses map 2 MiB again.
        try vm.setDirtyLogging(slot: 0, false)
        #expect(vm.mmu.stats.pages4K == 0)
        try l1.l2(0x7000, .write, .supervisor, value: 3)
        #expect(vm.mmu.stats.pages2M == 1)
    }

    @Test("Without eager splitting: logging write-protects the 2 MiB leaf; reads still use it; the first write splits it to 4 KiB", arguments: [false, true])
    func splitOnFirstWrite(npt: Bool) throws {
        let l1 = try hugeMapped(npt: npt, eagerPageSplit: false)
        let vm = l1.vm
        try l1.l2(0x1000, .write, .supervisor, value: 1)
        try vm.setDirtyLogging(slot: 0, true)
        #expect(vm.mmu.stats.pages2M == 1 && shadowLeaves(vm, 0x400).allSatisfy { $0.isLarge && !$0.isWritable })
        #expect(try l1.l2(0x8000, .read, .supervisor).exits == 0)
        let write = try l1.l2(0x9000, .write, .supervisor, value: 2)
        #expect(write.exits == 1)
        #expect(vm.mmu.stats.pages2M == 0 && vm.mmu.stats.pages4K >= 1)
        #expect(try vm.getDirtyLog(slot: 0).map(\.rawValue).filter { $0 >= 0x400 } == [0x409])
    }

    @Test("A migration loop over L2's huge pages, with and without eager splitting, each protocol: every write in the next collection, the copy equal to the guest", arguments: [true, false], DirtyLogProtocol.allCases)
    func migrationOverHugePages(eagerPageSplit: Bool, logProtocol: DirtyLogProtocol) throws {
        let l1 = try hugeMapped(eagerPageSplit: eagerPageSplit, logProtocol: logProtocol)
        for page in stride(from: UInt64(0), to: 0x40_0000, by: 0x10_0000) { try l1.l2(page, .write, .supervisor, value: page) }
        #expect(l1.vm.mmu.stats.pages2M == 2)
        let migration = try NestedMigration(l1, protocol: logProtocol)
        var random = SeededGenerator(seed: eagerPageSplit ? 11 : 12)
        for pass in 0..<6 {
            for step in 0..<16 {
                let page = random.below(2) == 0 ? UInt64(random.below(4)) : UInt64(random.below(1024))
                let outcome = try migration.l2Write(page << 12 | UInt64(random.below(512) * 8), value: UInt64(pass << 8 | step))
                guard case .completed = outcome.result else { Issue.record("\(outcome)"); return }
            }
            try migration.collect()
            if pass == 3 {
                // Logging off and on again: huge pages come back, and are split again.
                try l1.vm.setDirtyLogging(slot: 0, false)
                try l1.l2(0x30_0000, .read, .supervisor)
                #expect(l1.vm.mmu.stats.pages2M >= 1)
                try l1.vm.setDirtyLogging(slot: 0, true)
                if eagerPageSplit { #expect(l1.vm.mmu.stats.pages2M == 0) }
            }
        }
        #expect(migration.rewriteExits == migration.rewrites && migration.rewrites > 0)
    }
}
