import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import X86Paging

// Under TDP the guest's MOV to CR3 and INVPCID reach the vCPU's TLB without an exit, so the TLB
// does what the processor does: a flushing CR3 load drops the new PCID's translations and keeps
// the other PCIDs', single-context INVPCID drops one PCID's.
@Suite("The TDP vCPU's TLB and PCIDs")
struct TDPTLBTests {
    let vm: VirtualMachine
    let vcpu: VCPU
    static let address = GuestVirtualAddress(0x40_0123)

    init() throws {
        let cpu = CPUModel()
        vm = try VirtualMachine(memorySize: 16 << 20, cpu: cpu, mmu: .ept(cpu: cpu))
        try ConcurrentVCPUStressTests.buildIdentityMap(vm.memory)
        vcpu = try vm.addVCPU(registers: PagingRegisters(
            cr0: [.protectionEnable, .writeProtect, .paging], cr3: 0x1000 | 1, cr4: [.physicalAddressExtension, .pcidEnable],
            efer: [.noExecuteEnable, .longModeEnable, .longModeActive]))
    }

    /// Reads the test address, returning whether the TLB answered.
    func read() throws -> Bool {
        let outcome = try vcpu.access(Self.address, .read(.supervisor), size: 8)
        guard case .completed(let gpa, _) = outcome.result else {
            Issue.record("\(outcome.result)")
            return false
        }
        #expect(gpa.rawValue == Self.address.rawValue)
        return outcome.tlbHit
    }

    @Test func aFlushingCR3LoadDropsOnlyItsOwnPCID() throws {
        _ = try read()  // PCID 1 cached
        try vcpu.loadCR3(0x1000 | 2)
        #expect(try !read())  // PCID 2 has nothing yet
        try vcpu.loadCR3(0x1000 | 1, noFlush: true)
        #expect(try read())  // PCID 1's translation survived PCID 2's flushing load
        try vcpu.loadCR3(0x1000 | 1)
        #expect(try !read())  // its own flushing load drops it
        try vcpu.loadCR3(0x1000 | 2, noFlush: true)
        #expect(try read())  // and PCID 2's stays
    }

    @Test func singleContextINVPCIDDropsOnePCID() throws {
        _ = try read()
        try vcpu.loadCR3(0x1000 | 2)
        _ = try read()
        #expect(vcpu.invalidatePCID(.singleContext, pcid: 1, address: GuestVirtualAddress(0)))
        #expect(try read())  // PCID 2, current, untouched
        try vcpu.loadCR3(0x1000 | 1, noFlush: true)
        #expect(try !read())  // PCID 1 was invalidated
        #expect(vcpu.invalidatePCID(.allContextsExceptGlobal, pcid: 0, address: GuestVirtualAddress(0)))
        #expect(try !read())
    }

    /// The guest-physical mappings the hardware keeps for the guest's tables go with KVM's TLB
    /// flushes: once KVM write-protects a table page again for dirty logging, the walk's next A/D
    /// write to that table must fault and be logged, not go through a kept writable mapping.
    @Test func tableWritesAfterAWriteProtectingCollectionAreLogged() throws {
        try vm.setDirtyLogging(slot: 0, true)
        let pde = GuestVirtualAddress(0x3000 + (Self.address.rawValue >> 21) * 8)  // the PD maps itself 1:1
        _ = try vcpu.access(Self.address, .write(.supervisor), size: 8, value: 1)  // sets the PDE's A and D
        #expect(try vm.getDirtyLog(slot: 0).contains(GuestFrameNumber(3)))
        // The guest clears A and D in its PDE, and invalidates the translation.
        _ = try vcpu.access(pde, .write(.supervisor), size: 8, value: (Self.address.rawValue & ~0x1F_FFFF) | 0x83)
        vcpu.invalidatePage(Self.address)
        #expect(try vm.getDirtyLog(slot: 0).contains(GuestFrameNumber(3)))  // the store; page 3 protected again
        _ = try read()  // the walk sets A in the PDE again: a write to page 3
        #expect(try vm.getDirtyLog(slot: 0).contains(GuestFrameNumber(3)))
    }
}
