// Mode-specific rules, each checked against numbers derived by hand from the SDM: PSE-36, the PAE
// PDPTE registers, canonical addresses under LA57, 1 GiB pages, MAXPHYADDR, and EPT.

import GuestMemory
import Testing
import X86Paging

private let pe: CR0 = [.paging, .protectionEnable]
private let longMode: EFER = [.longModeEnable, .longModeActive, .noExecuteEnable]

/// Memory with the first 16 MiB backed.
private func makeMemory() throws -> GuestPhysicalMemory {
    let memory = GuestPhysicalMemory()
    try memory.back(GuestPhysicalAddress(0), size: 16 << 20)
    return memory
}

private func expectPageFault(_ walker: PageWalker, _ va: UInt64, _ access: Access, in memory: GuestPhysicalMemory,
                             code: UInt32, level: Int, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        let t = try walker.walk(GuestVirtualAddress(va), access, in: memory)
        Issue.record("expected #PF \(hex(code)) at level \(level), got a translation to \(t.physicalAddress)",
                     sourceLocation: sourceLocation)
    } catch {
        guard case .pageFault(let fault) = error else {
            Issue.record("expected #PF, got \(error)", sourceLocation: sourceLocation)
            return
        }
        #expect(fault.errorCode.rawValue == UInt64(code), "error code \(fault.errorCode)", sourceLocation: sourceLocation)
        #expect(fault.level == level, sourceLocation: sourceLocation)
    }
}

private func translate(_ walker: PageWalker, _ va: UInt64, _ access: Access = .read(.supervisor),
                       in memory: GuestPhysicalMemory) throws -> Translation {
    try walker.walk(GuestVirtualAddress(va), access, in: memory)
}

// MARK: - 32-bit paging and PSE-36

@Suite("32-bit paging: PSE and PSE-36")
struct PSE36Tests {
    /// A 32-bit table with one PDE at index 0x123 set to `pde`.
    func setUp(pde: UInt32) throws -> (GuestPhysicalMemory, UInt64) {
        let memory = try makeMemory()
        let root: UInt64 = 0x1000
        try memory.store32(pde, at: GuestPhysicalAddress(root + 0x123 * 4))
        return (memory, root)
    }

    func walker(pse: Bool, maxPhys: Int, memory: GuestPhysicalMemory, root: UInt64) throws -> PageWalker {
        try PageWalker(registers: PagingRegisters(cr0: pe, cr3: root, cr4: pse ? [.pageSizeExtensions] : []),
                       cpu: CPUModel(maxPhysicalAddressBits: maxPhys), memory: memory)
    }

    static let va: UInt64 = 0x123 << 22 | 0x2_ABCD

    @Test("PDE bits 20:13 supply PA bits 39:32 up to MAXPHYADDR", arguments: [36, 39, 40, 46, 52])
    func highAddressBits(maxPhys: Int) throws {
        let usable = min(maxPhys, 40) - 32  // PA bits 32..(31+usable)
        for bit in 0..<8 {
            let pde = UInt32(0x8040_0000) | UInt32(1) << UInt32(13 + bit) | 0x87  // P RW US PS
            let (memory, root) = try setUp(pde: pde)
            let w = try walker(pse: true, maxPhys: maxPhys, memory: memory, root: root)
            if bit < usable {
                let t = try translate(w, Self.va, in: memory)
                #expect(t.physicalAddress.rawValue == (1 << UInt64(32 + bit)) | 0x8040_0000 | 0x2_ABCD)
                #expect(t.level == 2 && t.pageSize == 4 << 20)
            } else {
                // Address bits beyond MAXPHYADDR are reserved (SDM Table 4-4).
                expectPageFault(w, Self.va, .write(.user), in: memory, code: 0b1111, level: 2)
            }
        }
    }

    @Test("PDE bit 21 is reserved in a 4 MiB PDE; PAT (bit 12) is not")
    func bit21Reserved() throws {
        let (memory, root) = try setUp(pde: 0x8040_0000 | 1 << 21 | 0x83)
        let w = try walker(pse: true, maxPhys: 46, memory: memory, root: root)
        expectPageFault(w, Self.va, .read(.supervisor), in: memory, code: 0b1001, level: 2)
        // Fetch: I/D only with SMEP under 32-bit paging, even with EFER.NXE=1.
        let nx = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: root, cr4: [.pageSizeExtensions],
                                                           efer: [.noExecuteEnable]), memory: memory)
        expectPageFault(nx, Self.va, .fetch(.supervisor), in: memory, code: 0b1001, level: 2)
        let smep = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: root, cr4: [.pageSizeExtensions, .smep]),
                                  memory: memory)
        expectPageFault(smep, Self.va, .fetch(.supervisor), in: memory, code: 0b1_1001, level: 2)

        let (memory2, root2) = try setUp(pde: 0x8040_0000 | 1 << 12 | 0x83)
        let t = try translate(try walker(pse: true, maxPhys: 46, memory: memory2, root: root2), Self.va, in: memory2)
        #expect(t.physicalAddress.rawValue == 0x8040_0000 | 0x2_ABCD)
    }

    @Test("Without CR4.PSE the PS bit is ignored and reserved bits do not matter")
    func psIgnoredWithoutPSE() throws {
        // The PDE points at a page table at 0x4_0000 (with PS and "reserved" bit 21 set, both ignored).
        let (memory, root) = try setUp(pde: 0x0020_0000 | 0x4_0000 | 0x87)
        try memory.back(GuestPhysicalAddress(0x20_0000 | 0x4_0000), size: 0x1000)
        try memory.store32(0x0077_7000 | 0x7, at: GuestPhysicalAddress(0x24_0000 + 0x2A * 4))
        let w = try walker(pse: false, maxPhys: 46, memory: memory, root: root)
        let t = try translate(w, Self.va, .write(.user), in: memory)
        #expect(t.level == 1 && t.pageSize == 0x1000)
        #expect(t.physicalAddress.rawValue == 0x77_7BCD)
        // The ignored PS bit is not a dirty bit: only the PTE gets D.
        #expect(try memory.load32(GuestPhysicalAddress(root + 0x123 * 4)) & 0x60 == 0x20)
        #expect(try memory.load32(GuestPhysicalAddress(0x24_0000 + 0x2A * 4)) & 0x60 == 0x60)
    }

    @Test("PageTableBuilder 4 MiB mappings above 4 GiB round-trip through the walker")
    func builderRoundTrip() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .legacy32, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0xC000_0000, to: 0xAB_FFC0_0000, size: 4 << 20, leafFlags: 0x3)
        let w = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: builder.root.rawValue, cr4: [.pageSizeExtensions]),
                               cpu: CPUModel(maxPhysicalAddressBits: 40), memory: memory)
        #expect(try translate(w, 0xC012_3456, in: memory).physicalAddress.rawValue == 0xAB_FFD2_3456)
        // With MAXPHYADDR 36, PA bits 39:36 are reserved.
        let narrow = try PageWalker(registers: w.registers, cpu: CPUModel(maxPhysicalAddressBits: 36), memory: memory)
        expectPageFault(narrow, 0xC012_3456, .read(.supervisor), in: memory, code: 0b1001, level: 2)
    }
}

// MARK: - PAE PDPTE registers

@Suite("PAE paging: PDPTE registers")
struct PAETests {
    static let cr3: UInt64 = 0x2060  // the PDPT need only be 32-byte aligned

    /// PDPTE 2 -> PD at 0x3000 -> PT at 0x4000 -> page 0x9000 for va 0x8000_0000 + (5 << 21) + (7 << 12).
    func setUp() throws -> GuestPhysicalMemory {
        let memory = try makeMemory()
        try memory.store64(0x3000 | 1, at: GuestPhysicalAddress(Self.cr3 + 2 * 8))
        try memory.store64(0x4000 | 7, at: GuestPhysicalAddress(0x3000 + 5 * 8))
        try memory.store64(0x9000 | 7, at: GuestPhysicalAddress(0x4000 + 7 * 8))
        return memory
    }
    static let va: UInt64 = 0x8000_0000 | 5 << 21 | 7 << 12 | 0x123
    static let registers = PagingRegisters(cr0: pe, cr3: cr3, cr4: [.physicalAddressExtension])

    @Test("The PDPTEs are loaded with CR3: later PDPT writes do not change the walk")
    func loadedAtConstruction() throws {
        let memory = try setUp()
        let walker = try PageWalker(registers: Self.registers, memory: memory)
        #expect(walker.pdpte(2).rawValue == 0x3001)
        try memory.store64(0, at: GuestPhysicalAddress(Self.cr3 + 2 * 8))
        #expect(try translate(walker, Self.va, in: memory).physicalAddress.rawValue == 0x9123)
        // A walker built now (a CR3 reload) sees the not-present PDPTE.
        let reloaded = try PageWalker(registers: Self.registers, memory: memory)
        expectPageFault(reloaded, Self.va, .write(.user), in: memory, code: 0b110, level: 3)
    }

    @Test("pdpteValues override what memory holds")
    func overrideValues() throws {
        let memory = try setUp()
        let absent = try PageWalker(registers: Self.registers, memory: memory, pdpteValues: [0, 0, 0, 0])
        expectPageFault(absent, Self.va, .read(.user), in: memory, code: 0b100, level: 3)
        // Point PDPTE 2 at a different PD (0x5000) whose entry maps a 2 MiB page.
        try memory.store64(0x60_0000 | 0x87, at: GuestPhysicalAddress(0x5000 + 5 * 8))
        let other = try PageWalker(registers: Self.registers, memory: memory, pdpteValues: [0, 0, 0x5001])
        let t = try translate(other, Self.va, in: memory)
        #expect(t.physicalAddress.rawValue == 0x60_0000 | 7 << 12 | 0x123)
        #expect(t.level == 2 && t.path.topIsRegister && t.path.entryValue(level: 3) == 0x5001)
    }

    @Test("A present PDPTE with a reserved bit makes the CR3 load fail", arguments: [1, 2, 5, 6, 7, 8, 40, 52, 59, 63])
    func reservedBits(bit: Int) throws {
        let memory = try setUp()
        let value: UInt64 = 0x3000 | 1 | 1 << UInt64(bit)
        try memory.store64(value, at: GuestPhysicalAddress(Self.cr3 + 2 * 8))
        #expect(throws: ControlStateError.pdpteReservedBits(index: 2, value: value)) {
            try PageWalker(registers: Self.registers, cpu: CPUModel(maxPhysicalAddressBits: 40), memory: memory)
        }
        // Not present: its other bits are not checked.
        try memory.store64(value & ~1, at: GuestPhysicalAddress(Self.cr3 + 2 * 8))
        #expect(throws: Never.self) {
            try PageWalker(registers: Self.registers, cpu: CPUModel(maxPhysicalAddressBits: 40), memory: memory)
        }
        // PWT, PCD (3, 4) and the ignored bits 11:9 are fine.
        try memory.store64(0x3000 | 1 | 0x18 | 0xE00, at: GuestPhysicalAddress(Self.cr3 + 2 * 8))
        #expect(throws: Never.self) { try PageWalker(registers: Self.registers, memory: memory) }
        // The override is checked the same way.
        #expect(throws: ControlStateError.pdpteReservedBits(index: 1, value: value)) {
            try PageWalker(registers: Self.registers, cpu: CPUModel(maxPhysicalAddressBits: 40), memory: memory,
                           pdpteValues: [0, value])
        }
    }

    @Test("An unbacked PDPT fails the CR3 load")
    func unreadable() throws {
        let memory = GuestPhysicalMemory()
        #expect(throws: ControlStateError.pdpteUnreadable(GuestPhysicalAddress(0x7000_0000))) {
            try PageWalker(registers: PagingRegisters(cr0: pe, cr3: 0x7000_0000, cr4: [.physicalAddressExtension]),
                           memory: memory)
        }
    }

    @Test("PAE: A is never written into the PDPT; bits 62:MAXPHYADDR of a PDE/PTE are reserved")
    func paeEntries() throws {
        let memory = try setUp()
        let walker = try PageWalker(registers: Self.registers, memory: memory)
        _ = try translate(walker, Self.va, .write(.supervisor), in: memory)
        #expect(try memory.load64(GuestPhysicalAddress(Self.cr3 + 2 * 8)) == 0x3001)
        #expect(try memory.load64(GuestPhysicalAddress(0x3000 + 5 * 8)) == 0x4000 | 7 | 0x20)
        #expect(try memory.load64(GuestPhysicalAddress(0x4000 + 7 * 8)) == 0x9000 | 7 | 0x60)
        // Bit 59 (a protection-key bit under 4-level paging) is reserved under PAE.
        try memory.store64(0x9000 | 7 | 1 << 59, at: GuestPhysicalAddress(0x4000 + 7 * 8))
        expectPageFault(walker, Self.va, .read(.user), in: memory, code: 0b1101, level: 1)
        // XD with NXE=0 is reserved too.
        try memory.store64(0x4000 | 7 | 1 << 63, at: GuestPhysicalAddress(0x3000 + 5 * 8))
        expectPageFault(walker, Self.va, .fetch(.user), in: memory, code: 0b1101, level: 2)
        // Addresses wider than 32 bits are not PAE linear addresses.
        #expect(throws: WalkFault.addressTooWide(GuestVirtualAddress(1 << 32), width: 32)) {
            try walker.walk(GuestVirtualAddress(1 << 32), .read(.user), in: memory)
        }
    }
}

// MARK: - 4/5-level paging

@Suite("IA-32e paging: canonical addresses, 1 GiB pages, MAXPHYADDR")
struct LongModeTests {
    func fourLevel(_ builder: PageTableBuilder, la57: Bool = false, cpu: CPUModel = CPUModel()) throws -> PageWalker {
        try PageWalker(registers: PagingRegisters(cr0: pe.union(.writeProtect), cr3: builder.root.rawValue,
                                                  cr4: la57 ? [.physicalAddressExtension, .la57] : [.physicalAddressExtension],
                                                  efer: longMode),
                       cpu: cpu, memory: builder.memory)
    }

    @Test("4-level: 48-bit canonical addresses; a non-canonical one is #GP, not #PF")
    func canonical48() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x7FFF_FFFF_F000, to: 0x5000, leafFlags: 0x7)
        try builder.map(0xFFFF_8000_0000_0000, to: 0x6000, leafFlags: 0x7)
        let w = try fourLevel(builder)
        #expect(try translate(w, 0x7FFF_FFFF_F123, in: memory).physicalAddress.rawValue == 0x5123)
        #expect(try translate(w, 0xFFFF_8000_0000_0456, in: memory).physicalAddress.rawValue == 0x6456)
        for bad: UInt64 in [0x8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x0001_0000_0000_0000, 0x00FF_8000_0000_0000] {
            #expect(throws: WalkFault.generalProtection(GuestVirtualAddress(bad))) {
                try w.walk(GuestVirtualAddress(bad), .read(.user), in: memory)
            }
        }
    }

    @Test("5-level: 57-bit canonical addresses")
    func canonical57() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fiveLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        // Non-canonical under 4-level paging, canonical under 5-level.
        try builder.map(0x0000_8000_0000_0000, to: 0x5000, leafFlags: 0x7)
        try builder.map(0x00FF_FFFF_FFFF_F000, to: 0x6000, leafFlags: 0x7)
        try builder.map(0xFF00_0000_0000_0000, to: 0x7000, leafFlags: 0x7)
        let w = try fourLevel(builder, la57: true)
        #expect(w.mode == .fiveLevel)
        #expect(try translate(w, 0x0000_8000_0000_0010, in: memory).physicalAddress.rawValue == 0x5010)
        #expect(try translate(w, 0x00FF_FFFF_FFFF_F020, in: memory).physicalAddress.rawValue == 0x6020)
        #expect(try translate(w, 0xFF00_0000_0000_0030, in: memory).physicalAddress.rawValue == 0x7030)
        #expect(try translate(w, 0xFF00_0000_0000_0030, in: memory).path.topLevel == 5)
        for bad: UInt64 in [0x0100_0000_0000_0000, 0xFEFF_FFFF_FFFF_F000, 0x8000_0000_0000_0000] {
            #expect(throws: WalkFault.generalProtection(GuestVirtualAddress(bad))) {
                try w.walk(GuestVirtualAddress(bad), .read(.user), in: memory)
            }
        }
        // A canonical address without a mapping is a #PF (at the PML5E), not a #GP.
        expectPageFault(w, 0xFF80_0000_0000_0000, .read(.user), in: memory, code: 0b100, level: 5)
        #expect(throws: ControlStateError.la57Unsupported) {
            try fourLevel(builder, la57: true, cpu: CPUModel(supportsLA57: false))
        }
    }

    @Test("1 GiB pages: translated when supported, RSVD otherwise")
    func gigabytePages() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x40_0000_0000, to: 0x1_4000_0000, size: 1 << 30, leafFlags: 0x7)
        let w = try fourLevel(builder)
        let t = try translate(w, 0x40_1234_5678, in: memory)
        #expect(t.level == 3 && t.pageSize == 1 << 30)
        #expect(t.physicalAddress.rawValue == 0x1_5234_5678)
        let no1G = try fourLevel(builder, cpu: CPUModel(supports1GiBPages: false))
        expectPageFault(no1G, 0x40_1234_5678, .write(.user), in: memory, code: 0b1111, level: 3)
        // PAT (bit 12) is fine; bits 29:13 are reserved.
        let pdpte = try #require(try builder.entryAddress(of: 0x40_0000_0000, level: 3))
        let leaf = try memory.load64(pdpte)
        try memory.store64(leaf | 1 << 12, at: pdpte)
        #expect(try translate(w, 0x40_1234_5678, in: memory).physicalAddress.rawValue == 0x1_5234_5678)
        for bit in 13...29 {
            try memory.store64(leaf | 1 << UInt64(bit), at: pdpte)
            expectPageFault(w, 0x40_1234_5678, .read(.supervisor), in: memory, code: 0b1001, level: 3)
        }
    }

    @Test("MAXPHYADDR: address bits at or above it are reserved at every level", arguments: [36, 40, 46, 51])
    func maxPhysicalAddress(maxPhys: Int) throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        let va: UInt64 = 0x1234_5678_9000
        try builder.map(va, to: 0x7000, leafFlags: 0x7)
        let cpu = CPUModel(maxPhysicalAddressBits: maxPhys)
        let w = try fourLevel(builder, cpu: cpu)
        for level in 1...4 {
            let address = try #require(try builder.entryAddress(of: va, level: level))
            let original = try memory.load64(address)
            for bit in [maxPhys, 51] {
                try memory.store64(original | 1 << UInt64(bit), at: address)
                expectPageFault(w, va, .read(.user), in: memory, code: 0b1101, level: level)
            }
            // Bits 58:52 are ignored (62:59 are the protection key) under IA-32e paging.
            try memory.store64(original | 0x07F0_0000_0000_0000, at: address)
            #expect(throws: Never.self) { try w.walk(GuestVirtualAddress(va), .read(.user), in: memory) }
            try memory.store64(original, at: address)
        }
        // The highest address bit below MAXPHYADDR is an address bit in a leaf.
        let pte = try #require(try builder.entryAddress(of: va, level: 1))
        try memory.store64(0x7000 | 7 | 1 << UInt64(maxPhys - 1), at: pte)
        #expect(try translate(w, va, in: memory).physicalAddress.rawValue == 0x7000 | 1 << UInt64(maxPhys - 1))
        // CR3 with bits beyond MAXPHYADDR cannot be loaded.
        if maxPhys < 52 {
            var registers = w.registers
            registers.cr3 |= 1 << UInt64(maxPhys)
            #expect(throws: ControlStateError.cr3ReservedBits(1 << UInt64(maxPhys))) {
                try PageWalker(registers: registers, cpu: cpu, memory: memory)
            }
        }
    }

    @Test("PS in a PML4E or PML5E is reserved; PS in a PTE is PAT")
    func pageSizeBits() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fiveLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        let va: UInt64 = 0x1234_5678_9000
        try builder.map(va, to: 0x7000, leafFlags: 0x7 | 0x80)
        let w = try fourLevel(builder, la57: true)
        #expect(try translate(w, va, in: memory).physicalAddress.rawValue == 0x7000)
        for level in [5, 4] {
            let address = try #require(try builder.entryAddress(of: va, level: level))
            let original = try memory.load64(address)
            try memory.store64(original | 0x80, at: address)
            expectPageFault(w, va, .fetch(.user), in: memory, code: 0b1_1101, level: level)
            try memory.store64(original, at: address)
        }
    }

    @Test("A self-referencing PML4E used at three levels: the A/D update restarts and still translates")
    func selfMap() throws {
        let memory = try makeMemory()
        let root: UInt64 = 0x1000
        try memory.store64(root | 7, at: GuestPhysicalAddress(root + 0x1ED * 8))   // PML4[0x1ED] -> PML4
        try memory.store64(0x7000 | 7, at: GuestPhysicalAddress(root + 5 * 8))     // PML4[5] as a PTE
        let va: UInt64 = 0xFFFF_0000_0000_0000 | 0x1ED << 39 | 0x1ED << 30 | 0x1ED << 21 | 5 << 12 | 0x321
        let walker = try PageWalker(registers: PagingRegisters(cr0: pe.union(.writeProtect), cr3: root,
                                                               cr4: [.physicalAddressExtension], efer: longMode),
                                    memory: memory)
        let probe = try walker.walk(GuestVirtualAddress(va), .write(.user), in: memory, setAccessedDirty: false)
        #expect(probe.physicalAddress.rawValue == 0x7321)
        #expect(try memory.load64(GuestPhysicalAddress(root + 0x1ED * 8)) == root | 7)
        let t = try walker.walk(GuestVirtualAddress(va), .write(.user), in: memory)
        #expect(t.physicalAddress.rawValue == 0x7321 && t.level == 1)
        #expect(try memory.load64(GuestPhysicalAddress(root + 0x1ED * 8)) == root | 7 | 0x20)
        #expect(try memory.load64(GuestPhysicalAddress(root + 5 * 8)) == 0x7000 | 7 | 0x60)
        // The path shows the entries as they are after the update, each read once per level.
        #expect(t.path.levels == [4, 3, 2, 1])
        for level in [4, 3, 2] {
            #expect(t.path.entryAddress(level: level).rawValue == root + 0x1ED * 8)
            #expect(t.path.entryValue(level: level) == root | 7 | 0x20)
        }
        #expect(t.path.entryValue(level: 1) == 0x7000 | 7 | 0x60)
    }

    @Test("A root table with no memory behind it: noMemory at the top level, empty path")
    func unbackedRoot() throws {
        let memory = GuestPhysicalMemory()
        let walker = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: 0x8000_0000, cr4: [.physicalAddressExtension],
                                                               efer: longMode), memory: memory)
        let va: UInt64 = 0x0000_0123_4567_8000
        #expect(throws: WalkFault.noMemory(GuestPhysicalAddress(0x8000_0000 + ((va >> 39) & 0x1FF) * 8), level: 4,
                                           path: WalkPath())) {
            try walker.walk(GuestVirtualAddress(va), .read(.user), in: memory)
        }
    }

    @Test("EFER.NXE needs NX support; XD with NXE=0 is a reserved bit")
    func noExecute() throws {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x4000_0000, to: 0x7000, leafFlags: 0x7 | 1 << 63)
        #expect(throws: ControlStateError.noExecuteUnsupported) {
            try fourLevel(builder, cpu: CPUModel(supportsNX: false))
        }
        let noNXE = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: builder.root.rawValue,
                                                              cr4: [.physicalAddressExtension],
                                                              efer: [.longModeEnable, .longModeActive]),
                                   memory: memory)
        // I/D is not reported without NXE or SMEP.
        expectPageFault(noNXE, 0x4000_0000, .fetch(.user), in: memory, code: 0b1101, level: 1)
        let withNXE = try fourLevel(builder)
        expectPageFault(withNXE, 0x4000_0000, .fetch(.user), in: memory, code: 0b1_0101, level: 1)
        #expect(try translate(withNXE, 0x4000_0000, .write(.user), in: memory).isExecutable == false)
    }
}

// MARK: - Register states

@Suite("Register-state validation and paging disabled")
struct RegisterStateTests {
    @Test("States the processor refuses")
    func refused() throws {
        let memory = try makeMemory()
        #expect(throws: ControlStateError.pagingWithoutProtection) {
            try PageWalker(registers: PagingRegisters(cr0: [.paging]), memory: memory)
        }
        #expect(throws: ControlStateError.longModeWithoutPAE) {
            try PageWalker(registers: PagingRegisters(cr0: pe, efer: [.longModeEnable, .longModeActive]), memory: memory)
        }
        #expect(throws: ControlStateError.inconsistentLongModeActive) {
            try PageWalker(registers: PagingRegisters(cr0: [.protectionEnable], cr4: [.physicalAddressExtension],
                                                      efer: [.longModeEnable, .longModeActive]), memory: memory)
        }
        // CR4.LA57 outside IA-32e mode does nothing: PAE paging.
        let pae = try PageWalker(registers: PagingRegisters(cr0: pe, cr3: 0x1000, cr4: [.physicalAddressExtension, .la57]),
                                 cpu: CPUModel(supportsLA57: false), memory: memory)
        #expect(pae.mode == .pae)
    }

    @Test("Paging disabled: identity over 32 bits, every access allowed")
    func disabled() throws {
        let memory = GuestPhysicalMemory()
        let walker = try PageWalker(registers: PagingRegisters(cr0: [.protectionEnable], cr4: [.smep, .smap],
                                                               efer: [.noExecuteEnable]), memory: memory)
        #expect(walker.mode == .disabled)
        for access in [Access.read(.user), .write(.user), .fetch(.supervisor), .write(.implicitSupervisor)] {
            let t = try walker.walk(GuestVirtualAddress(0xFFFF_F123), access, in: memory)
            #expect(t.physicalAddress.rawValue == 0xFFFF_F123 && t.level == 0)
        }
        #expect(throws: WalkFault.addressTooWide(GuestVirtualAddress(1 << 32), width: 32)) {
            try walker.walk(GuestVirtualAddress(1 << 32), .read(.user), in: memory)
        }
    }
}

// MARK: - EPT

@Suite("EPT walks")
struct EPTTests {
    static let wb: UInt64 = 6 << 3

    func setUp(levels: Int = 4, leaf: UInt64, size: UInt64 = 0x1000, gpa: UInt64 = 0x12_3456_7000,
               hpa: UInt64 = 0xAB_C000_0000) throws -> (GuestPhysicalMemory, PageTableBuilder) {
        let memory = try makeMemory()
        let builder = try PageTableBuilder(memory: memory, format: .ept(levels: levels), tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(gpa, to: hpa, size: size, leafFlags: leaf)
        return (memory, builder)
    }

    func walker(_ builder: PageTableBuilder, levels: Int = 4, ad: Bool = false,
                capabilities: EPTCapabilities = EPTCapabilities()) throws -> EPTWalker {
        try EPTWalker(pointer: EPTPointer(root: builder.root.rawValue, levels: levels, accessedDirty: ad),
                      capabilities: capabilities)
    }

    enum Expected: Equatable { case ok, violation, misconfig, other }

    func outcome(_ w: EPTWalker, _ gpa: UInt64, _ kind: AccessKind, _ memory: GuestPhysicalMemory) -> Expected {
        do {
            _ = try w.walk(GuestPhysicalAddress(gpa), kind, in: memory)
            return .ok
        } catch {
            switch error {
            case .violation: return .violation
            case .misconfiguration: return .misconfig
            default: return .other
            }
        }
    }

    @Test("Leaf XWR combinations (SDM 29.3.3: W without R is a misconfiguration)", arguments: 0..<8)
    func permissions(xwr: Int) throws {
        for executeOnly in [true, false] {
            let (memory, builder) = try setUp(leaf: UInt64(xwr) | Self.wb)
            let w = try walker(builder, capabilities: EPTCapabilities(executeOnly: executeOnly))
            let r = xwr & 1 != 0, wr = xwr & 2 != 0, x = xwr & 4 != 0
            let misconfig = (wr && !r) || (xwr == 4 && !executeOnly)
            for kind in AccessKind.allCases {
                let allowed = switch kind {
                case .read: r
                case .write: wr
                case .fetch: x
                }
                let want: Expected = xwr == 0 ? .violation : misconfig ? .misconfig : allowed ? .ok : .violation
                #expect(outcome(w, 0x12_3456_7ABC, kind, memory) == want,
                        "XWR \(String(xwr, radix: 2)) executeOnly \(executeOnly) \(kind)")
            }
        }
    }

    @Test("Translation output, memory type and IPAT")
    func translation() throws {
        let (memory, builder) = try setUp(leaf: 0x7 | Self.wb | 1 << 6)
        let t = try walker(builder).walk(GuestPhysicalAddress(0x12_3456_7ABC), .write, in: memory)
        #expect(t.outputAddress.rawValue == 0xAB_C000_0ABC)
        #expect(t.memoryType == 6 && t.ignoresPAT && t.level == 1 && t.pageSize == 0x1000)
        for type in 0..<8 {
            let (memory, builder) = try setUp(leaf: 0x7 | UInt64(type) << 3)
            let bad = [2, 3, 7].contains(type)
            #expect(outcome(try walker(builder), 0x12_3456_7ABC, .read, memory) == (bad ? .misconfig : .ok), "type \(type)")
        }
    }

    @Test("Violation qualification: access bit and the AND of R/W/X over every level")
    func qualification() throws {
        let (memory, builder) = try setUp(leaf: 0x7 | Self.wb)
        // Make the PDE read+execute only.
        let pde = try #require(try builder.entryAddress(of: 0x12_3456_7000, level: 2))
        try memory.store64(try memory.load64(pde) & ~2, at: pde)
        let w = try walker(builder)
        do {
            _ = try w.walk(GuestPhysicalAddress(0x12_3456_7ABC), .write, in: memory)
            Issue.record("expected a violation")
        } catch {
            guard case .violation(let gpa, let q, let level, _) = error else { Issue.record("\(error)"); return }
            #expect(gpa.rawValue == 0x12_3456_7ABC)
            #expect(q == [.dataWrite, .readable, .executable])
            #expect(level == 1)
        }
        // Not present at the PTE: R/W/X all clear in the qualification, level 1.
        let pte = try #require(try builder.entryAddress(of: 0x12_3456_7000, level: 1))
        try memory.store64(0, at: pte)
        do {
            _ = try w.walk(GuestPhysicalAddress(0x12_3456_7ABC), .fetch, in: memory)
            Issue.record("expected a violation")
        } catch {
            guard case .violation(_, let q, let level, _) = error else { Issue.record("\(error)"); return }
            #expect(q == [.instructionFetch])
            #expect(level == 1)
        }
        #expect(throws: EPTWalkFault.addressTooWide(GuestPhysicalAddress(1 << 52))) {
            try w.walk(GuestPhysicalAddress(1 << 52), .read, in: memory)
        }
    }

    @Test("Reserved bits are misconfigurations")
    func reservedBits() throws {
        let gpa: UInt64 = 0x12_3456_7000
        let cases: [(level: Int, bit: Int)] = [
            (4, 3), (4, 6), (4, 7), (3, 3), (3, 6), (2, 4), (1, 46), (2, 51), (4, 46),
        ]
        for (level, bit) in cases {
            let (memory, builder) = try setUp(leaf: 0x7 | Self.wb)
            let address = try #require(try builder.entryAddress(of: gpa, level: level))
            try memory.store64(try memory.load64(address) | 1 << UInt64(bit), at: address)
            #expect(outcome(try walker(builder), gpa, .read, memory) == .misconfig, "level \(level) bit \(bit)")
        }
        // Bit 7 of a PTE is ignored; so are bits 8/9 with A/D disabled.
        let (memory, builder) = try setUp(leaf: 0x7 | Self.wb | 1 << 7 | 3 << 8)
        #expect(outcome(try walker(builder), gpa, .read, memory) == .ok)
    }

    @Test("Large pages: 2 MiB and 1 GiB leaves, alignment bits and capabilities")
    func largePages() throws {
        let (memory, builder) = try setUp(leaf: 0x7 | Self.wb, size: 1 << 21, gpa: 0x12_3440_0000, hpa: 0xAB_C020_0000)
        let t = try walker(builder).walk(GuestPhysicalAddress(0x12_3456_789A), .read, in: memory)
        #expect(t.level == 2 && t.outputAddress.rawValue == 0xAB_C036_789A)
        #expect(outcome(try walker(builder, capabilities: EPTCapabilities(pages2MiB: false)), 0x12_3456_789A, .read, memory) == .misconfig)
        let pde = try #require(try builder.entryAddress(of: 0x12_3440_0000, level: 2))
        try memory.store64(try memory.load64(pde) | 1 << 12, at: pde)  // EPT has no PAT bit: 20:12 reserved
        #expect(outcome(try walker(builder), 0x12_3456_789A, .read, memory) == .misconfig)

        let (m1, b1) = try setUp(leaf: 0x5 | Self.wb, size: 1 << 30, gpa: 0x12_4000_0000, hpa: 0x80_4000_0000)
        let g = try walker(b1).walk(GuestPhysicalAddress(0x12_5234_5678), .fetch, in: m1)
        #expect(g.level == 3 && g.outputAddress.rawValue == 0x80_5234_5678)
        #expect(outcome(try walker(b1, capabilities: EPTCapabilities(pages1GiB: false)), 0x12_5234_5678, .read, m1) == .misconfig)
    }

    @Test("A/D flags only with EPTP bit 6", arguments: [4, 5])
    func accessedDirty(levels: Int) throws {
        let gpa: UInt64 = 0x12_3456_7000
        for ad in [false, true] {
            for kind in AccessKind.allCases {
                let (memory, builder) = try setUp(levels: levels, leaf: 0x7 | Self.wb)
                let w = try walker(builder, levels: levels, ad: ad)
                #expect(w.pointer.accessedDirtyEnabled == ad)
                let t = try w.walk(GuestPhysicalAddress(gpa), kind, in: memory)
                #expect(t.path.topLevel == levels)
                for level in 1...levels {
                    let value = try memory.load64(try #require(try builder.entryAddress(of: gpa, level: level)))
                    #expect((value & 1 << 8 != 0) == ad, "level \(level) A, ad \(ad)")
                    #expect((value & 1 << 9 != 0) == (ad && level == 1 && kind == .write), "level \(level) D")
                }
                // setAccessedDirty: false never writes.
                let (m2, b2) = try setUp(levels: levels, leaf: 0x7 | Self.wb)
                _ = try walker(b2, levels: levels, ad: ad).walk(GuestPhysicalAddress(gpa), kind, in: m2, setAccessedDirty: false)
                for level in 1...levels {
                    let value = try m2.load64(try #require(try b2.entryAddress(of: gpa, level: level)))
                    #expect(value & 0x300 == 0)
                }
            }
        }
    }

    @Test("EPTP validation")
    func pointerValidation() throws {
        #expect(throws: EPTPointerError.badMemoryType(1)) { try EPTWalker(pointer: EPTPointer(0x1000 | 3 << 3 | 1)) }
        #expect(throws: EPTPointerError.badWalkLength(3)) { try EPTWalker(pointer: EPTPointer(0x1000 | 2 << 3 | 6)) }
        #expect(throws: EPTPointerError.badWalkLength(5)) {
            try EPTWalker(pointer: EPTPointer(0x1000 | 4 << 3 | 6), capabilities: EPTCapabilities(fiveLevel: false))
        }
        #expect(throws: EPTPointerError.accessedDirtyUnsupported) {
            try EPTWalker(pointer: EPTPointer(root: 0x1000, levels: 4, accessedDirty: true),
                          capabilities: EPTCapabilities(accessedDirty: false))
        }
        #expect(throws: EPTPointerError.reservedBits(1 << 7)) { try EPTWalker(pointer: EPTPointer(0x1000 | 1 << 7 | 3 << 3 | 6)) }
        #expect(throws: EPTPointerError.reservedBits(1 << 46)) { try EPTWalker(pointer: EPTPointer(1 << 46 | 3 << 3 | 6)) }
        #expect(throws: Never.self) { try EPTWalker(pointer: EPTPointer(0x1000 | 3 << 3 | 0)) }  // UC
    }

    @Test("5-level EPT walks five levels")
    func fiveLevel() throws {
        let gpa: UInt64 = 0x000F_1234_5678_9000  // needs PML5 index 0xF... beyond 48 bits
        let (memory, builder) = try setUp(levels: 5, leaf: 0x3 | Self.wb, gpa: gpa, hpa: 0x7000)
        let t = try walker(builder, levels: 5).walk(GuestPhysicalAddress(gpa | 0x123), .write, in: memory)
        #expect(t.outputAddress.rawValue == 0x7123 && t.path.topLevel == 5)
        // The same tables as 4-level ignore bits 51:48 (a different walk from the PML5 as PML4).
        let w4 = try walker(builder, levels: 4)
        #expect(outcome(w4, gpa, .read, memory) != .ok)
    }
}
