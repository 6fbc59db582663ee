// Seed 2's per-vCPU root pages (the `local-roots` variant): where upstream has its special roots,
// the variant has real shadow pages owned by one vCPU, linked to the page directories below them
// as any parent is. The guest must see exactly what upstream shows it; the structure differs.

import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

@Suite struct PerVCPURootTests {
    /// 32-bit and PAE guests on a PAE-paging host and on 4- and 5-level hosts: the root is a chain
    /// of per-vCPU pages from the host's top level down to level 3, outside the hash, and the
    /// four page directories hang below the level-3 page by ordinary parent links.
    @Test(arguments: [PagingMode.legacy32, .pae], [nil, 4, 5] as [Int?])
    func rootIsAChainOfPerVCPUPages(_ mode: PagingMode, _ hostLevels: Int?) throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, hostLevels: hostLevels, variant: .localRoots)
        let kernel = try GuestKernel(vm: vm, mode: mode)
        let user = GuestVirtualAddress(0x40_0000), high = GuestVirtualAddress(0x8040_0000)
        for (gva, gpa) in [(user, 0x100_0000), (high, 0x110_0000)] as [(GuestVirtualAddress, UInt64)] {
            try kernel.map(gva, to: GuestPhysicalAddress(gpa), leafLevel: 1, leafFlags: 0x7, tableFlags: { _ in 0x7 })
        }
        let vcpu = try vm.addVCPU(registers: ControlState(pagingMode: mode).registers(cr3: kernel.root.rawValue))
        #expect(try vcpu.access(user, Access(.write, .user), size: 8, value: 5).result
                == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 5))
        #expect(try vcpu.access(high, Access(.read, .supervisor), size: 8).result
                == .completed(gpa: GuestPhysicalAddress(0x110_0000), value: 0))
        #expect(vm.mmu.audit() == [])

        let chain = vcpu.context.perVCPURootPages
        #expect(chain.map(\.level) == Array((3...(hostLevels ?? 3)).reversed()))
        #expect(chain.allSatisfy { $0.isPerVCPURoot && !$0.hasGPTEs })
        let root = try #require(vcpu.context.root)
        #expect(root === chain[0] && root.rootCount == 1)
        #expect(vcpu.context.paeRoots.allSatisfy { $0 == nil })
        #expect(!vm.mmu.shadowPages.contains { $0.isPerVCPURoot })
        // The directories are children now, not roots.
        let directories = vm.mmu.shadowPages.filter { $0.level == 2 }
        #expect(!directories.isEmpty && directories.allSatisfy { $0.rootCount == 0 })
        if mode == .legacy32 {
            // Quadrant = PDPTE index, as Lai's `index % 4`.
            #expect(Set(directories.map(\.role.quadrant)) == [0, 1, 2, 3])
        }
    }

    /// A CR3 load never caches a per-vCPU root (its PAE root cannot serve two roots): the old
    /// chain is freed, `prev_roots` stays empty, and switching back builds a new one.
    @Test(arguments: [PagingMode.legacy32, .pae])
    func perVCPURootsAreNeverCached(_ mode: PagingMode) throws {
        let text = """
            set paging=\(mode == .pae ? "pae" : "legacy32")
            space a
            map 0x400000 0x1000000 4k P,RW,US
            space b
            map 0x400000 0x1100000 4k P,RW,US
            switch a
            access read 0x400000 cpl=3
            switch b
            access read 0x400000 cpl=3
            switch a
            access read 0x400000 cpl=3
            """
        let scenario = try Scenario.parse(text, name: "switch")
        // `run` throws on a lockstep disagreement or a broken invariant (the auditor runs after every step).
        let upstream = try ScenarioRunner(scenario: scenario).run()
        let local = try ScenarioRunner(scenario: scenario, variant: .localRoots).run()
        #expect(local.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result))
        // Neither caches a root here (upstream's special roots are not cacheable either), and both
        // find no cached root on each switch.
        #expect(local.rootCacheHits == 0 && upstream.rootCacheHits == 0)
        #expect(local.rootCacheMisses == upstream.rootCacheMisses)
    }

    /// A flood zaps a PAE guest's page directory while it is in use. Upstream's directory is a
    /// root: it is marked invalid, every vCPU frees its (special) roots, and the next entry builds
    /// them all again. Under local-roots the directory is a child: the zap unlinks it from the
    /// per-vCPU PAE root, the next VM entry loads the emptied PDPTE, and the fault that follows
    /// links a new directory. The guest sees the same either way.
    @Test func aFloodedPageDirectoryIsRelinkedNotReloaded() throws {
        let text = """
            set paging=pae
            map 0x400000 0x1000000 4k P,RW,US
            map 0x40000000 0x1100000 4k P,RW,US
            access read 0x400000 cpl=3
            access read 0x40000000 cpl=3
            pte 0x400000 2 P,RW,US
            pte 0x400000 2 P,RW,US
            pte 0x400000 2 P,RW,US
            access read 0x400000 cpl=3
            access read 0x40000000 cpl=3
            """
        let scenario = try Scenario.parse(text, name: "flood-pd")
        let upstream = try ScenarioRunner(scenario: scenario).run()
        let local = try ScenarioRunner(scenario: scenario, variant: .localRoots).run()
        #expect(local.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result))
        #expect(upstream.statsAfter.mmuFlooded == 1 && local.statsAfter.mmuFlooded == 1)
        // Upstream creates three directory roots (PDPTEs 0 and 1, and 3 for the guest kernel's
        // table window), then after the zap made them obsolete loads its roots again, creating
        // the flooded one anew. Local-roots builds its one per-vCPU root once and only links the
        // new directory under it.
        #expect(upstream.rootsCreated == 4)
        #expect(local.rootsCreated == 1)
        #expect(local.shadowPageKeys == upstream.shadowPageKeys)
    }

    /// Every randomized lockstep seed the other variants run, under local-roots on every host
    /// depth the seed's guest allows: same outcomes as upstream, lockstep and auditor clean.
    @Test(arguments: [0, 3, 7, 11, 19, 23, 42] as [UInt64])
    func randomSeedsUnderLocalRoots(_ seed: UInt64) throws {
        let (_, directives) = LockstepSeed.directives(seed)
        let scenario = try Scenario(name: "local-roots-\(seed)", directives: directives)
        let upstream = try ScenarioRunner(scenario: scenario).run()
        let local = try ScenarioRunner(scenario: scenario, variant: .localRoots).run()
        #expect(local.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result))
        #expect(local.entries.map(\.value) == upstream.entries.map(\.value))
    }
}
