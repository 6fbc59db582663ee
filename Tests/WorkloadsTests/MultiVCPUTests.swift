import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// Two vCPUs of one VM share KVM's shadow pages: same CR3 and roles, same root. What one vCPU's
/// fault or zap does reaches the other through KVM's requests, serviced at its next entry.
@Suite struct MultiVCPUTests {
    struct Machine {
        let vm: VirtualMachine
        let vcpus: [VCPU]
    }

    func machine() throws -> Machine {
        let vm = try VirtualMachine(memorySize: 64 << 20)
        let kernel = try GuestKernel(vm: vm, mode: .fourLevel)
        for page in 0..<8 as Range<UInt64> {
            try kernel.map(GuestVirtualAddress(0x40_0000 + page << 12), to: GuestPhysicalAddress(0x100_0000 + page << 12),
                           leafLevel: 1, leafFlags: 0x67, tableFlags: { _ in 0x7 })
        }
        let registers = ControlState.defaults.registers(cr3: kernel.root.rawValue)
        let vcpus = [try vm.addVCPU(registers: registers), try vm.addVCPU(registers: registers)]
        return Machine(vm: vm, vcpus: vcpus)
    }

    func read(_ vcpu: VCPU, _ address: UInt64) throws -> AccessOutcome {
        try vcpu.access(GuestVirtualAddress(address), .read(.user), size: 8)
    }

    @Test func vcpusShareRootsAndSPTEs() throws {
        let m = try machine()
        let first = try read(m.vcpus[0], 0x40_0000)
        #expect(first.exits == 1)
        // The second vCPU finds the root and the SPTE the first one's fault built: no exit.
        let second = try read(m.vcpus[1], 0x40_0000)
        #expect(second.exits == 0 && !second.tlbHit)
        let roots = m.vm.mmu.shadowPages.filter { $0.rootCount > 0 }
        #expect(roots.count == 1 && roots.first?.rootCount == 2)
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func zappingASharedRootReachesEveryVCPU() throws {
        let m = try machine()
        for vcpu in m.vcpus { _ = try read(vcpu, 0x40_1000) }
        let flushesBefore = m.vm.stats.tlbFlush
        let root = try #require(m.vm.mmu.shadowPages.first { $0.rootCount > 0 })
        m.vm.mmu.zap(root)
        // Still in use: only marked invalid, freed when both vCPUs have dropped it.
        #expect(root.role.isInvalid)
        #expect(m.vm.mmu.audit().isEmpty)
        // Each vCPU frees the obsolete root at its next entry, flushes its TLB, builds a new root.
        for vcpu in m.vcpus {
            let outcome = try read(vcpu, 0x40_1008)
            guard case .completed(let gpa, _) = outcome.result else {
                Issue.record("\(outcome)")
                continue
            }
            #expect(gpa == GuestPhysicalAddress(0x100_1008))
            #expect(!outcome.tlbHit)
        }
        #expect(!m.vm.mmu.shadowPages.contains { $0 === root })
        let roots = m.vm.mmu.shadowPages.filter { $0.rootCount > 0 }
        #expect(roots.count == 1 && roots.first?.rootCount == 2 && roots.first?.role.isInvalid == false)
        // One remote flush request, serviced once by each vCPU.
        #expect(m.vm.stats.tlbFlush - flushesBefore == 2)
        // The invalid root was zapped twice (once in use, once when freed), as KVM counts it.
        #expect(m.vm.mmu.stats.mmuShadowZapped == 2)
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func aGuestTableWriteOnOneVCPUIsSeenByTheOther() throws {
        let m = try machine()
        let kernelWindow = GuestKernel.windowBase64
        for vcpu in m.vcpus { _ = try read(vcpu, 0x40_2000) }
        // vCPU 0 (the kernel) makes the page read-only through its window onto the PT; KVM unsyncs
        // the PT's shadow page, so the store goes straight to memory and vCPU 1's SPTE is stale
        // until it invalidates.
        let leafAddress = try #require(m.vm.mmu.shadowPages.first { $0.level == 1 && $0.role.hasGPTEs })
        let ptGPA = leafAddress.gfn.rawValue << 12
        let store = try m.vcpus[0].access(GuestVirtualAddress(kernelWindow + ptGPA + 2 * 8), .write(.supervisor), size: 8,
                                          value: 0x100_2000 | 0x65)
        #expect(!store.emulated)
        #expect(leafAddress.unsync)
        // vCPU 1 invalidates as the architecture requires, then sees the read-only page.
        m.vcpus[1].invalidatePage(GuestVirtualAddress(0x40_2000))
        let write = try m.vcpus[1].access(GuestVirtualAddress(0x40_2000), .write(.user), size: 8, value: 1)
        guard case .pageFault(let code, _) = write.result else {
            Issue.record("\(write)")
            return
        }
        #expect(code.architectural == 0x7)
        #expect(m.vm.mmu.audit().isEmpty)
    }
}
