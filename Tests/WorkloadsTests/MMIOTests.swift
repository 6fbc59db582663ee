import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// MMIO caching as KVM does it with shadow paging: a guest page that maps a GPA in no memslot gets
/// an MMIO SPTE (a reserved physical-address bit, the gfn, the access and the memslots
/// generation); the next access faults with RSVD and is emulated at once by
/// `handle_mmio_page_fault`, without walking the guest tables or counting `pf_taken`; a memslot
/// change makes the SPTE stale.
@Suite struct MMIOTests {
    @Test func mmioSPTEIsCreatedThenTakesTheFastPath() throws {
        let scenario = try Scenario.parse("""
        mem 64M
        map 0x400000 0x8000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        access read 0x400008 cpl=3
        access write 0x400010 cpl=3 value=5
        """, name: "mmio")
        let report = try ScenarioRunner(scenario: scenario, traceEvents: true).run()
        for (index, record) in report.accesses.enumerated() {
            guard case .mmio(let gpa, _) = record.outcome.result else {
                Issue.record("access \(index): \(record.outcome)")
                continue
            }
            #expect(gpa.rawValue == 0x800_0000 + UInt64(index) * 8)
            #expect(record.outcome.emulated && record.outcome.exits == 1)
        }
        let delta = report.statsAfter.delta(from: report.statsBefore)
        // Only the first access took the slow path: one fault, one MMIO SPTE, one pf_emulate.
        #expect(delta.pfTaken == 1)
        #expect(delta.pfMMIOSPTECreated == 1)
        #expect(delta.pfEmulate == 1)
        #expect(delta.mmioExits == 3)
        #expect(delta.insnEmulation == 3)
        let names = report.accesses.map { $0.events.map(\.event.name) }
        #expect(names[0].contains("mark_mmio_spte"))
        #expect(names[1].contains("handle_mmio_page_fault") && !names[1].contains("kvm_mmu_pagetable_walk"))
    }

    @Test func aMemslotChangeMakesMMIOSPTEsStale() throws {
        let vm = try VirtualMachine(memorySize: 64 << 20)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        try kernel.map(GuestVirtualAddress(0x40_0000), to: GuestPhysicalAddress(0x800_0000), leafLevel: 1, leafFlags: 0x67,
                       tableFlags: { _ in 0x7 })
        let vcpu = try vm.addVCPU(registers: ControlState.defaults.registers(cr3: kernel.root.rawValue))
        let first = try vcpu.access(GuestVirtualAddress(0x40_0000), .read(.user))
        #expect(first.result == .mmio(gpa: GuestPhysicalAddress(0x800_0000), value: ~0))
        #expect(vm.mmu.stats.pfMMIOSPTECreated == 1)
        // The VMM adds RAM there: the generation moves, the MMIO SPTE no longer holds.
        _ = try vm.memory.addSlot(id: 1, base: GuestPhysicalAddress(0x800_0000), size: 0x10_0000, flags: [])
        try vm.memory.store64(0x1234, at: GuestPhysicalAddress(0x800_0000))
        let taken = vm.mmu.stats.pfTaken
        let second = try vcpu.access(GuestVirtualAddress(0x40_0000), .read(.user))
        #expect(second.result == .completed(gpa: GuestPhysicalAddress(0x800_0000), value: 0x1234))
        #expect(vm.mmu.stats.pfTaken == taken + 1)  // the stale SPTE sent the fault down the slow path
        #expect(vm.mmu.stats.pfMMIOSPTECreated == 1)
        #expect(vm.mmu.audit().isEmpty)
    }
}
