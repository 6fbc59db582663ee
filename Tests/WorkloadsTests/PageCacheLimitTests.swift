import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// KVM's shadow-page cache limit: `n_max_mmu_pages` derived from the memslots (1/50 of their
/// pages, at least 64) or set; a fault first makes `KVM_MIN_FREE_MMU_PAGES` available by zapping
/// the oldest non-root pages (`kvm_mmu_zap_oldest_mmu_pages`), counted in `mmu_recycled`.
@Suite struct PageCacheLimitTests {
    @Test func defaultLimitFollowsTheMemslots() throws {
        #expect(ShadowMMU.defaultMaxPages(memslotPages: 16384) == 327)  // 64 MiB
        #expect(ShadowMMU.defaultMaxPages(memslotPages: 1000) == 64)
        let vm = try VirtualMachine(memorySize: 64 << 20)
        #expect(vm.mmu.maxPages == 327)
        #expect(try VirtualMachine(memorySize: 64 << 20, shadowPageLimit: 100).mmu.maxPages == 100)
    }

    /// 200 user pages in 200 different 2 MiB regions need 200 page-table shadow pages (plus their
    /// PD, PDPT and root, and the kernel window's), far over a limit of 64: faults recycle the
    /// oldest pages, every access still reads what the guest mapped, and the structures stay sound.
    @Test func faultsRecycleTheOldestPages() throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, shadowPageLimit: 64)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        let regions = 200 as UInt64
        for region in 0..<regions {
            try kernel.map(GuestVirtualAddress(0x4000_0000 + region << 21), to: GuestPhysicalAddress(0x100_0000 + region << 12),
                           leafLevel: 1, leafFlags: 0x67, tableFlags: { _ in 0x7 })
            try vm.memory.store64(region * 3 + 1, at: GuestPhysicalAddress(0x100_0000 + region << 12))
        }
        let vcpu = try vm.addVCPU(registers: ControlState.defaults.registers(cr3: kernel.root.rawValue))
        for pass in 0..<2 {
            for region in 0..<regions {
                let outcome = try vcpu.access(GuestVirtualAddress(0x4000_0000 + region << 21), .read(.user), size: 8)
                guard case .completed(let gpa, let value) = outcome.result else {
                    Issue.record("pass \(pass) region \(region): \(outcome)")
                    return
                }
                #expect(gpa == GuestPhysicalAddress(0x100_0000 + region << 12))
                #expect(value == region * 3 + 1)
                #expect(vm.mmu.usedPages <= vm.mmu.maxPages + 4, "the limit is soft by a few pages only")
            }
            #expect(vm.mmu.audit().isEmpty)
        }
        #expect(vm.mmu.stats.mmuRecycled > 200)
        #expect(vm.mmu.stats.mmuShadowZapped >= vm.mmu.stats.mmuRecycled)
        // The root is never recycled.
        #expect(vm.mmu.shadowPages.contains { $0.rootCount > 0 && $0.level == 4 })
    }

    /// Lowering the limit below what is in use zaps the oldest pages down to it
    /// (`kvm_mmu_change_mmu_pages`); roots stay.
    @Test func loweringTheLimitZapsDownToIt() throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, shadowPageLimit: 1000)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        for region in 0..<40 as Range<UInt64> {
            try kernel.map(GuestVirtualAddress(0x4000_0000 + region << 21), to: GuestPhysicalAddress(0x100_0000 + region << 12),
                           leafLevel: 1, leafFlags: 0x67, tableFlags: { _ in 0x7 })
        }
        let vcpu = try vm.addVCPU(registers: ControlState.defaults.registers(cr3: kernel.root.rawValue))
        for region in 0..<40 as Range<UInt64> {
            _ = try vcpu.access(GuestVirtualAddress(0x4000_0000 + region << 21), .read(.user), size: 8)
        }
        let used = vm.mmu.usedPages
        #expect(used > 40)
        vm.mmu.setMaxPages(10)
        #expect(vm.mmu.usedPages == 10 && vm.mmu.maxPages == 10)
        #expect(vm.mmu.stats.mmuRecycled == UInt64(used - 10))
        #expect(vm.mmu.audit().isEmpty)
        let outcome = try vcpu.access(GuestVirtualAddress(0x4000_0000 + 7 << 21), .read(.user), size: 8)
        guard case .completed = outcome.result else {
            Issue.record("\(outcome)")
            return
        }
    }

    /// Random guests (the randomized lockstep generator's) under the smallest cache KVM allows:
    /// pages are recycled constantly, under every paging mode, and every access still agrees with
    /// the architecture with the auditor run after each.
    @Test func randomGuestsUnderATinyCache() throws {
        var recycledRuns = 0
        for seed in 0..<12 as Range<UInt64> {
            var generator = LockstepScenarioGenerator(seed: 1000 + seed)
            let scenario = try Scenario(name: "tiny-cache-\(seed)", directives: generator.generate())
            let report = try ScenarioRunner(scenario: scenario, shadowPageLimit: ShadowMMU.minimumMaxPages).run()
            #expect(report.lockstepChecks > 0)
            if report.statsAfter.mmuRecycled > 0 { recycledRuns += 1 }
        }
        #expect(recycledRuns >= 2, "only \(recycledRuns) of 12 random guests recycled a shadow page")
    }
}
