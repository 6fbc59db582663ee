// The MMU variants (docs/VARIANTS.md) under the randomized lockstep tests and on hosts deeper than
// the guest: every variant must keep the guest's view exactly as upstream's.

import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// The variants a VM can be built with: all of them.
let runnableVariants = MMUVariant.allCases

@Suite struct VariantLockstepTests {
    /// A handful of the randomized lockstep seeds under every variant: each must pass its lockstep
    /// and auditor checks and see exactly what upstream's run saw.
    @Test(arguments: [0, 3, 7, 11, 19] as [UInt64])
    func randomSeedUnderEveryVariant(_ seed: UInt64) throws {
        try expectEveryVariantAgreesWithUpstream(seed: seed)
    }


    /// A 32-bit guest with a 4 MiB page shadowed by direct level-1 pages: recomputing the child role
    /// from the root role and the address creates exactly upstream's (gfn, role) pages.
    @Test func recomputedChildRolesMatchOnA32BitGuestWith4MiBPages() throws {
        let text = """
            set paging=32 nx=0
            map 0x400000 0x1000000 4m P,RW,US
            map 0x80000000 0x1400000 4m P,RW
            map 0x800000 0x1800000 4k P,RW
            map 0xa00000 0x1801000 4k P,RW
            access read 0x400000 cpl=3
            access write 0x600008 cpl=3 value=7
            access read 0x7ff000
            access read 0x80200000
            access write 0x803ff000 value=2
            access write 0x800000 value=1
            access read 0xa00000
            pte 0x800000 1 P
            access read 0x800000
            """
        let scenario = try Scenario.parse(text, name: "legacy32-4m")
        let upstream = try ScenarioRunner(scenario: scenario).run()
        let recomputed = try ScenarioRunner(scenario: scenario, variant: .recomputeChildRole).run()
        #expect(!upstream.shadowPageKeys.isEmpty)
        #expect(recomputed.shadowPageKeys == upstream.shadowPageKeys)
        #expect(recomputed.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result))
    }

    /// Under shadow paging the combined role decides exactly as the split one: the extended role
    /// is in both, and so are resets (the CR4 rules do not depend on the split).
    @Test func combinedRoleCountsTheSameUnderShadowPaging() throws {
        let text = """
            map 0x400000 0x1000000 4k P,RW
            access read 0x400000
            set smep=1
            access read 0x400000
            set smep=0 smap=1
            access write 0x400000 value=3
            set wp=0
            access write 0x400000 value=4
            """
        let scenario = try Scenario.parse(text, name: "smep-toggle")
        let upstream = try ScenarioRunner(scenario: scenario).run()
        let combined = try ScenarioRunner(scenario: scenario, variant: .combinedMMURole).run()
        #expect(upstream.contextResets == 3)
        #expect(combined.contextResets == upstream.contextResets)
        #expect(combined.roleReinitializations == upstream.roleReinitializations)
        #expect(combined.shadowPageKeys == upstream.shadowPageKeys)
    }

    /// Seed 1's variants on a 5-level host under a 4-level guest: the level-5 root is a passthrough
    /// page by the variant's helper, carried in its guest-level field, not in upstream's bit.
    @Test(arguments: [MMUVariant.upstream, .glevel, .passthroughDelta])
    func passthroughRootOnAFiveLevelHost(_ variant: MMUVariant) throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, hostLevels: 5, variant: variant)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        try kernel.map(GuestVirtualAddress(0x40_0000), to: GuestPhysicalAddress(0x100_0000), leafLevel: 1,
                       leafFlags: 0x7, tableFlags: { _ in 0x7 })
        let vcpu = try vm.addVCPU(registers: ControlState(pagingMode: .fourLevel).registers(cr3: kernel.root.rawValue))
        let outcome = try vcpu.access(GuestVirtualAddress(0x40_0000), Access(.write, .user), size: 8, value: 5)
        #expect(outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 5))
        #expect(vm.mmu.audit() == [])
        let root = try #require(vcpu.context.root)
        #expect(root.level == 5)
        #expect(root.isPassthrough)
        #expect(variant.isPassthrough(root.role))
        #expect(!root.hasGPTEs)
        let below = vm.mmu.shadowPages.filter { $0.level < 5 }
        #expect(below.allSatisfy { !$0.isPassthrough && $0.hasGPTEs })
        switch variant {
        case .glevel:
            #expect(!root.role.isPassthrough && root.role.guestLevel == 4)
            #expect(below.allSatisfy { $0.role.guestLevel == $0.level })
        case .passthroughDelta:
            #expect(!root.role.isPassthrough && root.role.passthroughDelta == 1)
            #expect(below.allSatisfy { $0.role.passthroughDelta == 0 })
        default:
            #expect(root.role.isPassthrough)
        }
    }
}

/// Seed 1's case 1 (RFC v3 "level expansion"): a 32-bit guest shadowed in a 4- or 5-level host
/// format gets passthrough pages above its page directory instead of upstream's special roots.
@Suite struct PassthroughAbove32BitGuestTests {
    @Test(arguments: [MMUVariant.glevel, .passthroughDelta], [4, 5])
    func passthroughChainOverTheGuestDirectory(_ variant: MMUVariant, _ hostLevels: Int) throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, hostLevels: hostLevels, variant: variant)
        let kernel = try GuestKernel(vm: vm, mode: .legacy32)
        for (gva, gpa) in [(0x40_0000, 0x100_0000), (0x8040_0000, 0x110_0000)] as [(UInt64, UInt64)] {
            try kernel.map(GuestVirtualAddress(gva), to: GuestPhysicalAddress(gpa), leafLevel: 1, leafFlags: 0x7,
                           tableFlags: { _ in 0x7 })
        }
        let vcpu = try vm.addVCPU(registers: ControlState(pagingMode: .legacy32).registers(cr3: kernel.root.rawValue))
        for gva in [0x40_0000, 0x8040_0000] as [UInt64] {
            let outcome = try vcpu.access(GuestVirtualAddress(gva), Access(.write, .user), size: 4, value: 9)
            guard case .completed = outcome.result else { Issue.record("\(hex(gva)): \(outcome)"); continue }
        }
        #expect(vm.mmu.audit() == [])
        let root = try #require(vcpu.context.root)
        #expect(root.level == hostLevels && root.isPassthrough && !root.hasGPTEs && root.rootCount == 1)
        #expect(vcpu.context.paeRoots.allSatisfy { $0 == nil })
        let directoryGFN = GuestFrameNumber(kernel.root.rawValue >> 12)
        let passthrough = vm.mmu.shadowPages.filter { $0.level >= 3 }
        #expect(passthrough.count == hostLevels - 2)
        #expect(passthrough.allSatisfy { $0.isPassthrough && $0.gfn == directoryGFN && variant.isPassthrough($0.role) })
        let directories = vm.mmu.shadowPages.filter { $0.level == 2 }
        #expect(Set(directories.map(\.role.quadrant)) == [0, 1, 2, 3])
        #expect(directories.allSatisfy { $0.hasGPTEs && !$0.isPassthrough && $0.rootCount == 0 && $0.gfn == directoryGFN })
        for page in vm.mmu.shadowPages {
            switch variant {
            case .glevel: #expect(page.role.guestLevel == (page.role.isDirect ? 0 : min(page.level, 2)))
            default: #expect(page.role.passthroughDelta == (page.role.isDirect ? 0 : max(0, page.level - 2)))
            }
        }
    }

    /// Passthrough roots are ordinary shadow pages, so a 32-bit guest's CR3 switches find them in
    /// `prev_roots`, where upstream's special roots are freed on every switch.
    @Test(arguments: [MMUVariant.upstream, .glevel, .passthroughDelta])
    func passthroughRootsAreCached(_ variant: MMUVariant) throws {
        let text = """
            host levels=4
            set paging=legacy32
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
            switch b
            access read 0x400000 cpl=3
            """
        let report = try ScenarioRunner(scenario: try Scenario.parse(text, name: "switch32"), variant: variant).run()
        #expect(report.accesses.map(\.outcome.result) == [0x100_0000, 0x110_0000, 0x100_0000, 0x110_0000].map {
            AccessResult.completed(gpa: GuestPhysicalAddress($0), value: 0)
        })
        #expect(report.rootCacheHits == (variant == .upstream ? 0 : 2))
    }
}

/// Every variant on many more randomized seeds, only with VIRTMMU_EXHAUSTIVE=1 (CI's release run).
@Suite("Exhaustive variant lockstep", .enabled(if: RandomLockstep.exhaustive))
struct ExhaustiveVariantLockstepTests {
    @Test("Exhaustive variant lockstep seed", arguments: Array(0..<200) as [UInt64])
    func everyVariantAgreesWithUpstream(_ seed: UInt64) throws {
        try expectEveryVariantAgreesWithUpstream(seed: seed)
    }
}

/// Runs the randomized lockstep seed under upstream and every other variant (each run checks
/// lockstep and the auditor): the guest must see the same outcomes and end with the same entries.
private func expectEveryVariantAgreesWithUpstream(seed: UInt64, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let (_, directives) = LockstepSeed.directives(seed)
    let scenario = try Scenario(name: "variant-lockstep-\(seed)", directives: directives)
    let upstream = try ScenarioRunner(scenario: scenario).run()
    for variant in runnableVariants where variant != .upstream {
        let report = try ScenarioRunner(scenario: scenario, variant: variant).run()
        #expect(report.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result), "\(variant)",
                sourceLocation: sourceLocation)
        #expect(report.entries.map(\.value) == upstream.entries.map(\.value), "\(variant)", sourceLocation: sourceLocation)
        if variant == .recomputeChildRole || variant == .combinedMMURole {
            // Same roles, so the very same pages.
            #expect(report.shadowPageKeys == upstream.shadowPageKeys, "\(variant)", sourceLocation: sourceLocation)
        }
    }
}
