// Zaps the host makes without the guest asking: `kvm_mmu_zap_all_fast` (a memslot deleted or
// moved) and `kvm_zap_gfn_range` (an MTRR or CR0.CD change), directly and through the scenario's
// `zap` directive, checked against what KVM does and, in lockstep, against what the guest may see.

import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

@Suite struct ZapTests {
    /// A 4-level guest with two user pages mapped and touched, on one vCPU.
    private func machine(variant: MMUVariant = .upstream) throws -> (VirtualMachine, VCPU, GuestKernel) {
        let vm = try VirtualMachine(memorySize: 64 << 20, variant: variant)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        for (gva, gpa) in [(0x40_0000, 0x100_0000), (0x40_1000, 0x100_1000)] as [(UInt64, UInt64)] {
            try kernel.map(GuestVirtualAddress(gva), to: GuestPhysicalAddress(gpa), leafLevel: 1, leafFlags: 0x7,
                           tableFlags: { _ in 0x7 })
        }
        let vcpu = try vm.addVCPU(registers: ControlState(pagingMode: .fourLevel).registers(cr3: kernel.root.rawValue))
        for gva in [0x40_0000, 0x40_1000] as [UInt64] {
            _ = try vcpu.access(GuestVirtualAddress(gva), Access(.write, .user), size: 8, value: gva)
        }
        return (vm, vcpu, kernel)
    }

    /// `kvm_zap_gfn_range` drops the leaves mapping the range and nothing else: the shadow pages
    /// (and the write tracking of the guest tables they shadow) stay, one remote flush goes out,
    /// and the next access faults the leaf back in.
    @Test func gfnRangeZapsOnlyTheLeavesMappingIt() throws {
        let (vm, vcpu, _) = try machine()
        let pagesBefore = vm.mmu.shadowPages.map(ObjectIdentifier.init)
        let leavesBefore = vm.mmu.stats.pages4K
        let flushesBefore = vm.stats.remoteTLBFlushRequests
        #expect(vm.mmu.zapGFNRange(0x1001..<0x1002) == 1)
        #expect(vm.mmu.stats.pages4K == leavesBefore - 1)
        #expect(vm.stats.remoteTLBFlushRequests == flushesBefore + 1)
        #expect(vm.mmu.mappings(of: GuestFrameNumber(0x1001)).isEmpty)
        #expect(!vm.mmu.mappings(of: GuestFrameNumber(0x1000)).isEmpty)
        #expect(vm.mmu.shadowPages.map(ObjectIdentifier.init) == pagesBefore)
        #expect(vm.mmu.audit() == [])
        // A range with nothing mapped zaps nothing and flushes nothing.
        #expect(vm.mmu.zapGFNRange(0x3000..<0x3100) == 0)
        #expect(vm.stats.remoteTLBFlushRequests == flushesBefore + 1)

        let fixedBefore = vm.mmu.stats.pfFixed
        let outcome = try vcpu.access(GuestVirtualAddress(0x40_1000), Access(.read, .user), size: 8)
        #expect(outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_1000), value: 0x40_1000))
        #expect(outcome.exits == 1)
        #expect(vm.mmu.stats.pfFixed == fixedBefore + 1)
        // Zapping the gfns of the guest's own tables drops their (read-only) mappings but keeps
        // them shadowed and write-tracked.
        let tables = vm.mmu.shadowPages.filter(\.hasGPTEs).map(\.gfn)
        vm.mmu.zapGFNRange(0..<0x1000)
        #expect(tables.allSatisfy { vm.mmu.mappings(of: $0).isEmpty })
        #expect(vm.mmu.shadowPages.filter { $0.level > 1 && $0.hasGPTEs }.allSatisfy { vm.mmu.isWriteTracked($0.gfn) })
        #expect(vm.mmu.audit() == [])
    }

    /// `kvm_mmu_zap_all_fast`: the generation flips, every page is zapped at once except the root
    /// in use, which is marked invalid and stays until its vCPU frees it at the next entry (and is
    /// zapped, and counted, once more then); the next access builds a new root.
    @Test func zapAllFastInvalidatesTheRootInUseAndFreesTheRest() throws {
        let (vm, vcpu, _) = try machine()
        let pages = vm.mmu.shadowPages
        let oldRoot = try #require(vcpu.context.root)
        let generation = vm.mmu.validGeneration
        let zappedBefore = vm.mmu.stats.mmuShadowZapped
        vm.mmu.events.isRecording = true
        vm.mmu.zapAllFast()
        #expect(vm.mmu.validGeneration != generation)
        #expect(vm.mmu.events.count(of: "kvm_mmu_zap_all_fast") == 1)
        #expect(vm.mmu.stats.mmuShadowZapped == zappedBefore + UInt64(pages.count))
        #expect(oldRoot.role.isInvalid && oldRoot.rootCount == 1)
        #expect(vm.mmu.shadowPages.map(ObjectIdentifier.init) == [ObjectIdentifier(oldRoot)])
        #expect(vm.mmu.stats.pages4K == 0)
        #expect(vm.mmu.usedPages == 1)

        let outcome = try vcpu.access(GuestVirtualAddress(0x40_0000), Access(.read, .user), size: 8)
        #expect(outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 0x40_0000))
        let newRoot = try #require(vcpu.context.root)
        #expect(newRoot !== oldRoot && !newRoot.role.isInvalid)
        #expect(!vm.mmu.shadowPages.contains { $0 === oldRoot })
        #expect(vm.mmu.stats.mmuShadowZapped == zappedBefore + UInt64(pages.count) + 1)
        #expect(vm.mmu.audit() == [])
    }

    /// Cached roots are obsolete too: a switch back after a zap-all misses the cache.
    @Test func zapAllFastEmptiesTheRootCache() throws {
        let text = """
            set pcid=1
            space a
            map 0x400000 0x1000000 4k P,RW,US
            space b
            map 0x400000 0x1100000 4k P,RW,US
            switch a pcid=1
            access read 0x400000 cpl=3
            switch b pcid=2
            access read 0x400000 cpl=3
            switch a pcid=1 noflush
            access read 0x400000 cpl=3
            zap all
            switch b pcid=2 noflush
            access read 0x400000 cpl=3
            """
        let report = try ScenarioRunner(scenario: try Scenario.parse(text, name: "zap-cache")).run()
        // The switch back to a hits; the switch to b after the zap does not.
        #expect(report.rootCacheHits == 1)
        #expect(report.accesses.map(\.outcome.result) == [
            .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 0),
            .completed(gpa: GuestPhysicalAddress(0x110_0000), value: 0),
            .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 0),
            .completed(gpa: GuestPhysicalAddress(0x110_0000), value: 0),
        ])
    }

    /// Per-vCPU roots (local-roots) are obsolete after a zap-all like any root, and are rebuilt.
    @Test(arguments: [MMUVariant.upstream, .localRoots])
    func zapAllFastUnderAPAEGuest(_ variant: MMUVariant) throws {
        let text = """
            set paging=pae
            map 0x400000 0x1000000 4k P,RW,US
            access write 0x400000 cpl=3 value=1
            zap all
            access read 0x400000 cpl=3
            zap gfn 0x1000
            access read 0x400000 cpl=3
            """
        let report = try ScenarioRunner(scenario: try Scenario.parse(text, name: "zap-pae"), variant: variant).run()
        #expect(report.accesses.map(\.outcome.result) == [
            .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 1),
            .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 1),
            .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 1),
        ])
        #expect(report.accesses.map(\.outcome.exits) == [1, 1, 1])
    }

    @Test func zapDirectiveParsesAndRenders() throws {
        let scenario = try Scenario.parse("zap all\nzap gfn 0x10\nzap GFN 16 4\n", name: "zap")
        let directives = scenario.directives.map(\.directive)
        #expect(directives == [.zap(.all), .zap(.gfns(first: 0x10, count: 1)), .zap(.gfns(first: 16, count: 4))])
        #expect(directives.map(\.rendered) == ["zap all", "zap gfn 0x10", "zap gfn 0x10 4"])
        for bad in ["zap", "zap some", "zap gfn", "zap gfn 1 0", "zap all 3", "zap gfn 1 2 3", "zap gfn 0xffffffffffffffff 2"] {
            #expect(throws: ScenarioError.self, "\(bad)") { _ = try Scenario.parse(bad, name: "bad") }
        }
    }
}
