import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// L1's last-level EPT (or NPT) tables under a TDP L1: L1's first store to one that `guest_mmu`
// shadows faults in the TDP MMU, whose make_spte unsyncs the shadow page (mmu_try_to_unsync_pages)
// and maps the table writable; upper-level tables stay write-tracked (their stores emulated,
// mmu_pte_write). Nested EPT is synced when a root is loaded anew, after INVEPT; nested NPT at
// every VMRUN. Every L2 access is checked against the architecture, which allows a stale
// translation only from L1's tables as they were at a VM entry since the covering INVEPT.

@Suite("Unsync of L1's last-level EPT/NPT tables under a TDP L1: KVM's counters, INVEPT, and stale data only where the SDM allows it")
struct NestedEPTUnsyncTests {
    let linear: UInt64 = 0x7F_8040_3000

    func booted(npt: Bool = false, levels: Int = 4, ad: Bool = false) throws -> L1Hypervisor {
        let l1 = try L1Hypervisor(npt: npt, levels: levels)
        l1.ad = ad
        try l1.mapAllL2Memory(rights: 0x7)
        try l1.mapL2(linear, to: 0x5000, flags: 0x7)
        return l1
    }

    @Test("Counters: a store to a shadowed last-level table unsyncs (mmu_unsync, no emulation, the table writable for L1 afterwards); a store to an upper-level one is emulated (mmu_pte_write)", arguments: [false, true])
    func counters(npt: Bool) throws {
        let l1 = try booted(npt: npt)
        try l1.enter()
        try l1.l2(linear, .write, value: 1)
        try l1.vcpu.exitToL1()
        var before = l1.vm.stats
        let leafEntry = try l1.entryAddress(0x6000, level: 1)
        try l1.store(0x6000 + L1Hypervisor.l2Offset | (npt ? 0x5 : 0x5 | 6 << 3), at: leafEntry)
        var after = l1.vm.stats
        #expect(after.mmuUnsync == before.mmuUnsync + 1 && after.mmuPTEWrite == before.mmuPTEWrite
                && after.pfEmulate == before.pfEmulate, "\(after.delta(from: before))")
        // The table is now writable for L1: its next store takes no exit at all.
        before = after
        try l1.store(0x7000 + L1Hypervisor.l2Offset | (npt ? 0x7 : 0x7 | 6 << 3), at: leafEntry + 8)
        after = l1.vm.stats
        #expect(after.exits == before.exits && after.mmuUnsync == before.mmuUnsync)
        // An upper-level table (L1's level-2 table for L2's page) is write-tracked: emulated.
        before = after
        let upperEntry = try l1.entryAddress(0x4000_0000, level: 2)
        try l1.store(0, at: upperEntry)
        after = l1.vm.stats
        #expect(after.mmuPTEWrite == before.mmuPTEWrite + 1 && after.pfEmulate > before.pfEmulate)
        #expect(l1.vm.audit().isEmpty)
    }

    @Test("Randomized: L1 rewrites last-level entries between L2 runs; L2 may see a stale translation only from a VM entry since the last INVEPT, and exactly the architecture's after it", arguments: [(4, false), (4, true), (5, false), (5, true)])
    func randomizedEPT(levels: Int, ad: Bool) throws {
        var stale = 0, exactAfterINVEPT = 0
        for seed in 0..<3 {
            var random = SeededGenerator(seed: UInt64(seed * 31 + levels) &+ (ad ? 1000 : 0))
            let l1 = try booted(levels: levels, ad: ad)
            var linears: [UInt64] = [linear]
            for _ in 0..<12 {
                let linear = UInt64(random.below(4)) << 39 | UInt64(random.below(16)) << 12
                try l1.mapL2(linear, to: UInt64(random.below(64)) << 12, flags: 0x7)
                linears.append(linear)
            }
            let rights: [UInt64] = [7, 7, 5, 3, 1, 4, 0]
            let pointer = EPTPointer(root: l1.root, levels: levels, accessedDirty: ad)
            var invalidated = false
            try l1.enter()
            for step in 0..<120 {
                if random.below(6) == 0 {
                    if l1.vcpu.isInL2 { try l1.vcpu.exitToL1() }
                    // L1 rewrites a few of L2's data pages: new rights, sometimes another frame.
                    for _ in 0..<random.below(3) + 1 {
                        let page = UInt64(random.below(64)) << 12
                        let target = random.below(4) == 0 ? UInt64(random.below(64)) << 12 : page
                        try l1.map(page, to: target + L1Hypervisor.l2Offset, rights: rights[random.below(rights.count)])
                    }
                    invalidated = random.below(2) == 0
                    if invalidated { try l1.vcpu.invalidateEPT(random.below(2) == 0 ? .allContexts : .singleContext(pointer)) }
                }
                if !l1.vcpu.isInL2 { try l1.enter() }
                let address = GuestVirtualAddress(linears[random.below(linears.count)] | UInt64(random.below(512) * 8))
                let access = Access(AccessKind.allCases[random.below(3)], .user)
                let outcome = try l1.l2(address.rawValue, access.kind, .user, value: UInt64(step))
                let exact = VCPU.l2OutcomeAgrees(outcome, try l1.vcpu.architecturalL2(address, access), memory: l1.vm.memory)
                if !exact { stale += 1 }
                if invalidated {
                    #expect(exact, "seed \(seed) step \(step): after INVEPT L2 must see L1's tables as they are: \(outcome)")
                    exactAfterINVEPT += 1
                }
                if case .exitToL1 = outcome.result { invalidated = false }
            }
        }
        #expect(stale > 0, "no stale translation arose (the test would not show the checker accepting one)")
        #expect(exactAfterINVEPT > 0)
    }

    @Test("Nested NPT is synced at every VMRUN: L2 sees L1's rewritten NPT at once")
    func nptSyncedAtVMRUN() throws {
        let l1 = try booted(npt: true)
        try l1.enter()
        try l1.l2(linear, .write, value: 1)
        for round in 0..<4 {
            try l1.vcpu.exitToL1()
            try l1.map(0x5000, to: 0x5000 + L1Hypervisor.l2Offset, rights: round % 2 == 0 ? 0x5 : 0x7)
            #expect(l1.vm.stats.mmuUnsync <= 1)
            try l1.enter()
            #expect(l1.vm.stats.mmuUnsync == 0, "VMRUN synced")
            let outcome = try l1.l2(linear, .write, value: UInt64(round))
            let expected = try l1.vcpu.architecturalL2(GuestVirtualAddress(linear), Access(.write, .user))
            #expect(VCPU.l2OutcomeAgrees(outcome, expected, memory: l1.vm.memory), "round \(round): \(outcome)")
            if case .exitToL1 = outcome.result { try l1.enter() }
        }
    }

    @Test("The check refuses a stale translation once INVEPT has covered it")
    func staleRefusedAfterINVEPT() throws {
        let l1 = try booted()
        try l1.enter()
        try l1.l2(linear, .write, value: 1)
        try l1.vcpu.exitToL1()
        try l1.map(0x5000, to: 0x5000 + L1Hypervisor.l2Offset, rights: 0x5)
        try l1.enter()
        let stale = try l1.l2(linear, .write, value: 2)
        guard case .completed = stale.result else { Issue.record("\(stale)"); return }
        try l1.vcpu.exitToL1()
        try l1.vcpu.invalidateEPT(.allContexts)
        try l1.enter()
        let address = GuestVirtualAddress(linear), access = Access(.write, .user)
        let expected = try l1.vcpu.architecturalL2(address, access)
        #expect(throws: LockstepDisagreement.self) { try l1.vcpu.checkL2(stale, at: address, access, expected: expected) }
    }
}
