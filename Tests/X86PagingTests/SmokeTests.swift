import Testing
import X86Paging
import GuestMemory

@Test func fourLevelSmoke() throws {
    let memory = GuestPhysicalMemory()
    try memory.back(GuestPhysicalAddress(0), size: 1 << 20)
    let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x100000))
    try builder.map(0x7000_0000_1000, to: 0x5000, leafFlags: 0b111)
    let regs = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: builder.root.rawValue,
                               cr4: [.physicalAddressExtension], efer: [.longModeEnable, .longModeActive, .noExecuteEnable])
    let walker = try PageWalker(registers: regs, memory: memory)
    let t = try walker.walk(GuestVirtualAddress(0x7000_0000_1234), .write(.user), in: memory)
    #expect(t.physicalAddress == GuestPhysicalAddress(0x5234))
    #expect(t.level == 1)
}
