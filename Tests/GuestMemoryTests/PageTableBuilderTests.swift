import GuestMemory
import Testing
import X86Paging

/// A page-table format with the walker registers that use it and addresses it can map.
struct FormatCase: CustomTestStringConvertible, Sendable {
    var format: TableFormat
    /// Linear addresses (guest-physical for EPT) to map with 4 KiB pages.
    var virtuals: [UInt64]
    var testDescription: String { "\(format)" }

    var registers: PagingRegisters? {
        let cr0: CR0 = [.paging, .protectionEnable]
        switch format {
        case .legacy32: return PagingRegisters(cr0: cr0, cr4: [.pageSizeExtensions])
        case .pae: return PagingRegisters(cr0: cr0, cr4: [.physicalAddressExtension, .pageSizeExtensions])
        case .fourLevel:
            return PagingRegisters(cr0: cr0, cr4: [.physicalAddressExtension], efer: [.longModeEnable, .longModeActive])
        case .fiveLevel:
            return PagingRegisters(cr0: cr0, cr4: [.physicalAddressExtension, .la57], efer: [.longModeEnable, .longModeActive])
        case .ept: return nil
        }
    }

    var entrySize: UInt64 { format == .legacy32 ? 4 : 8 }

    static let all: [FormatCase] = [
        FormatCase(format: .legacy32, virtuals: [0, 0x0040_1000, 0xFFFF_F000, 0x8000_3000]),
        FormatCase(format: .pae, virtuals: [0, 0x4000_1000, 0xFFFF_F000, 0xC020_0000]),
        FormatCase(format: .fourLevel, virtuals: [0, 0x7FAB_CDE0_1000, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_F000]),
        FormatCase(format: .fiveLevel, virtuals: [0x1000, 0x00AB_CDEF_1234_5000, 0xFF00_0000_0000_0000, 0xFFFF_FFFF_FFFF_F000]),
        FormatCase(format: .ept(levels: 4), virtuals: [0, 0x7FAB_CDE0_1000, 0xFFFF_FFFF_F000]),
        FormatCase(format: .ept(levels: 5), virtuals: [0x1000, 0x000F_ABCD_E012_3000, 0x000F_FFFF_FFFF_F000]),
    ]
}

/// Reads the entry at `address` with the format's entry size.
private func entry(_ memory: GuestPhysicalMemory, _ address: GuestPhysicalAddress, size: UInt64) throws -> UInt64 {
    size == 4 ? UInt64(try memory.load32(address)) : try memory.load64(address)
}

/// Walks `virtual` with the architecture's walker for `formatCase` and returns the translation's
/// physical address and page size.
private func walk(_ formatCase: FormatCase, _ builder: PageTableBuilder, _ virtual: UInt64) throws -> (UInt64, UInt64) {
    if let registers = formatCase.registers {
        var registers = registers
        registers.cr3 = builder.root.rawValue
        let walker = try PageWalker(registers: registers, memory: builder.memory)
        let translation = try walker.walk(GuestVirtualAddress(virtual), .read(.supervisor), in: builder.memory,
                                          setAccessedDirty: false)
        return (translation.physicalAddress.rawValue, translation.pageSize)
    }
    guard case .ept(let levels) = formatCase.format else { fatalError() }
    let walker = try EPTWalker(pointer: EPTPointer(root: builder.root.rawValue, levels: levels, accessedDirty: false))
    let translation = try walker.walk(GuestPhysicalAddress(virtual), .read, in: builder.memory, setAccessedDirty: false)
    return (translation.outputAddress.rawValue, translation.pageSize)
}

private func builderError(_ body: () throws(PageTableBuilderError) -> Void) -> PageTableBuilderError? {
    do throws(PageTableBuilderError) {
        try body()
        return nil
    } catch {
        return error
    }
}

@Suite("PageTableBuilder")
struct PageTableBuilderTests {
    @Test func tableFormatFromPagingMode() {
        #expect(TableFormat(.disabled) == nil)
        #expect(TableFormat(.legacy32) == .legacy32)
        #expect(TableFormat(.pae) == .pae)
        #expect(TableFormat(.fourLevel) == .fourLevel)
        #expect(TableFormat(.fiveLevel) == .fiveLevel)
        #expect(TableFormat.legacy32.pageSize(level: 2) == 4 << 20)
        #expect(TableFormat.pae.pageSize(level: 2) == 2 << 20)
        #expect(TableFormat.fourLevel.pageSize(level: 3) == 1 << 30)
        #expect(TableFormat.ept(levels: 4).pageSize(level: 1) == 4096)
        #expect(TableFormat.fourLevel.permissiveTableFlags == 0b111)
        #expect(TableFormat.ept(levels: 5).permissiveTableFlags == 0b111)
    }

    @Test func rootIsAZeroedPageInTheTableArea() throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x20_0800))
        // Rounded up to a page boundary and backed.
        #expect(builder.root == GuestPhysicalAddress(0x20_1000))
        #expect(memory.isBacked(GuestFrameNumber(0x201)))
        #expect(try memory.read(builder.root, count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(builder.memory === memory)
        #expect(builder.format == .fourLevel)
        // Further tables follow the root.
        #expect(try builder.allocateTable() == GuestPhysicalAddress(0x20_2000))
    }

    @Test(arguments: FormatCase.all)
    func fourKiBMappingsWriteLeafEntriesAtEntryAddress(_ formatCase: FormatCase) throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: formatCase.format, tableArea: GuestPhysicalAddress(0x100_0000))
        let leafFlags: UInt64 = 0b111
        for (index, virtual) in formatCase.virtuals.enumerated() {
            let physical = 0x5000 + UInt64(index) * 0x1_0000
            try builder.map(virtual, to: physical, leafFlags: leafFlags)
            let address = try #require(try builder.entryAddress(of: virtual, level: 1), "\(hex(virtual))")
            // The entry's index within its table comes from the address bits for level 1.
            let indexBits: UInt64 = formatCase.format == .legacy32 ? 10 : 9
            let expectedIndex = (virtual >> 12) & ((1 << indexBits) - 1)
            #expect(address.rawValue & pageOffsetMask == expectedIndex * formatCase.entrySize, "\(hex(virtual))")
            #expect(try entry(memory, address, size: formatCase.entrySize) == physical | leafFlags, "\(hex(virtual))")
        }
        // Every mapping translates, including the page offset.
        for (index, virtual) in formatCase.virtuals.enumerated() {
            let physical = 0x5000 + UInt64(index) * 0x1_0000
            let (translated, size) = try walk(formatCase, builder, virtual | 0xABC)
            #expect(translated == physical | 0xABC, "\(hex(virtual))")
            #expect(size == 4096)
        }
        // The top-level entry of the first mapping points at a table with the table flags (only P for PAE PDPTEs).
        let top = try #require(try builder.entryAddress(of: formatCase.virtuals[0], level: {
            switch formatCase.format {
            case .legacy32: 2
            case .pae: 3
            case .fourLevel: 4
            case .fiveLevel: 5
            case .ept(let levels): levels
            }
        }()))
        #expect(top.rawValue & ~pageOffsetMask == builder.root.rawValue)
        let topEntry = try entry(memory, top, size: formatCase.entrySize)
        #expect(topEntry & 0xFFF == (formatCase.format == .pae ? 1 : formatCase.format.permissiveTableFlags))
        #expect(memory.isBacked(GuestPhysicalAddress(topEntry & ~0xFFF & bitRange(0, 51)).frame))
        // An unmapped neighbour of a mapped page has its level-1 slot but a zero entry.
        let neighbour = formatCase.virtuals[0] ^ 0x1000
        let slot = try #require(try builder.entryAddress(of: neighbour, level: 1))
        #expect(try entry(memory, slot, size: formatCase.entrySize) == 0)
    }

    @Test(arguments: FormatCase.all)
    func neighbouringMappingsShareTables(_ formatCase: FormatCase) throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: formatCase.format, tableArea: GuestPhysicalAddress(0x100_0000))
        try builder.map(0x20_0000, to: 0x3000, leafFlags: 0b11)
        let pages = memory.backedPageCount
        try builder.map(0x20_1000, to: 0x4000, leafFlags: 0b11)
        #expect(memory.backedPageCount == pages)
        let first = try #require(try builder.entryAddress(of: 0x20_0000, level: 1))
        let second = try #require(try builder.entryAddress(of: 0x20_1000, level: 1))
        #expect(second.rawValue == first.rawValue + formatCase.entrySize)
        // Remapping overwrites the leaf in place.
        try builder.map(0x20_1000, to: 0x9000, leafFlags: 0b1)
        #expect(try entry(memory, second, size: formatCase.entrySize) == 0x9001)
        #expect(memory.backedPageCount == pages)
    }

    @Test func customTableFlags() throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x1000, to: 0x2000, leafFlags: 0b1, tableFlags: 0b101)
        for level in 2...4 {
            let address = try #require(try builder.entryAddress(of: 0x1000, level: level))
            #expect(try memory.load64(address) & 0xFFF == 0b101, "level \(level)")
        }
        #expect(try memory.load64(try #require(try builder.entryAddress(of: 0x1000, level: 1))) == 0x2001)
    }

    @Test(arguments: [TableFormat.fourLevel, .fiveLevel, .ept(levels: 4), .ept(levels: 5)])
    func largePages(_ format: TableFormat) throws {
        let formatCase = try #require(FormatCase.all.first { $0.format == format })
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: format, tableArea: GuestPhysicalAddress(0x100_0000))
        let flags: UInt64 = 0b111
        try builder.map(0x4000_0000, to: 0x1_8000_0000, size: 1 << 30, leafFlags: flags)
        try builder.map(0x20_0000, to: 0x7_0060_0000, size: 2 << 20, leafFlags: flags)
        let gigabyte = try #require(try builder.entryAddress(of: 0x4000_0000, level: 3))
        #expect(try memory.load64(gigabyte) == 0x1_8000_0000 | flags | 1 << 7)
        let twoMegabytes = try #require(try builder.entryAddress(of: 0x20_0000, level: 2))
        #expect(try memory.load64(twoMegabytes) == 0x7_0060_0000 | flags | 1 << 7)
        // No table below a large leaf.
        #expect(try builder.entryAddress(of: 0x4000_0000, level: 2) == nil)
        #expect(try builder.entryAddress(of: 0x20_0000, level: 1) == nil)
        #expect(try walk(formatCase, builder, 0x4123_4567) == (0x1_8123_4567, 1 << 30))
        #expect(try walk(formatCase, builder, 0x2F_FFFF) == (0x7_006F_FFFF, 2 << 20))
    }

    @Test func paeTwoMiBPagesButNoGiBPages() throws {
        let formatCase = FormatCase.all[1]
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .pae, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0xC000_0000, to: 0x2_0040_0000, size: 2 << 20, leafFlags: 0b11)
        let address = try #require(try builder.entryAddress(of: 0xC000_0000, level: 2))
        #expect(try memory.load64(address) == 0x2_0040_0000 | 0b11 | 1 << 7)
        #expect(try walk(formatCase, builder, 0xC001_2345) == (0x2_0041_2345, 2 << 20))
        // The PDPTE for 0xC0000000 is entry 3 of the 32-byte PDPT, with only P set.
        let pdpte = try #require(try builder.entryAddress(of: 0xC000_0000, level: 3))
        #expect(pdpte == GuestPhysicalAddress(builder.root.rawValue + 3 * 8))
        #expect(try memory.load64(pdpte) & 0xFFF == 1)
        #expect(builderError { () throws(PageTableBuilderError) in
            try builder.map(0x4000_0000, to: 0x4000_0000, size: 1 << 30, leafFlags: 1)
        } == .unsupportedPageSize(1 << 30))
    }

    @Test func legacy32FourMiBPagesUsePSE36() throws {
        let formatCase = FormatCase.all[0]
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .legacy32, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x8040_0000, to: 0x1_2340_0000, size: 4 << 20, leafFlags: 0b11)
        let address = try #require(try builder.entryAddress(of: 0x8040_0000, level: 2))
        // PDE index 0x201, 4-byte entries; physical bits 39:32 in PDE bits 20:13.
        #expect(address == GuestPhysicalAddress(builder.root.rawValue + 0x201 * 4))
        #expect(try memory.load32(address) == 0x2340_0000 | 1 << 13 | 1 << 7 | 0b11)
        #expect(try walk(formatCase, builder, 0x8055_5555) == (0x1_2355_5555, 4 << 20))
        #expect(builderError { () throws(PageTableBuilderError) in
            try builder.map(0, to: 0, size: 2 << 20, leafFlags: 1)
        } == .unsupportedPageSize(2 << 20))
    }

    @Test func unsupportedAndMisalignedMappings() throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        func mapError(_ virtual: UInt64, _ physical: UInt64, _ size: UInt64) -> PageTableBuilderError? {
            builderError { () throws(PageTableBuilderError) in try builder.map(virtual, to: physical, size: size, leafFlags: 1) }
        }
        #expect(mapError(0, 0, 1 << 39) == .unsupportedPageSize(1 << 39))
        #expect(mapError(0, 0, 8192) == .unsupportedPageSize(8192))
        #expect(mapError(0, 0, 0) == .unsupportedPageSize(0))
        #expect(mapError(0x1000, 0x20_0000, 2 << 20) == .misaligned(virtual: 0x1000, physical: 0x20_0000, pageSize: 2 << 20))
        #expect(mapError(0x20_0000, 0x1000, 2 << 20) == .misaligned(virtual: 0x20_0000, physical: 0x1000, pageSize: 2 << 20))
        #expect(mapError(0x1001, 0x1000, 4096) == .misaligned(virtual: 0x1001, physical: 0x1000, pageSize: 4096))
        #expect(mapError(0x1001, 0x1000, 4096)?.description.contains("not aligned") == true)
        // Nothing was allocated for refused mappings.
        #expect(memory.backedPageCount == 1)
        let fiveLevelMemory = GuestPhysicalMemory()
        let ept = try PageTableBuilder(memory: fiveLevelMemory, format: .ept(levels: 4), tableArea: GuestPhysicalAddress(0))
        #expect(builderError { () throws(PageTableBuilderError) in try ept.map(0, to: 0, size: 1 << 39, leafFlags: 7) }
            == .unsupportedPageSize(1 << 39))
    }

    @Test func smallMappingUnderALargePageIsRefused() throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000))
        try builder.map(0x20_0000, to: 0x40_0000, size: 2 << 20, leafFlags: 0b11)
        try builder.map(0x8000_0000, to: 0x8000_0000, size: 1 << 30, leafFlags: 0b11)
        #expect(builderError { () throws(PageTableBuilderError) in try builder.map(0x20_1000, to: 0x1000, leafFlags: 1) }
            == .conflictsWithLargePage(virtual: 0x20_1000, level: 2))
        #expect(builderError { () throws(PageTableBuilderError) in
            try builder.map(0x8020_0000, to: 0, size: 2 << 20, leafFlags: 1)
        } == .conflictsWithLargePage(virtual: 0x8020_0000, level: 3))
        // Replacing a large page with another of the same size is fine.
        try builder.map(0x20_0000, to: 0x60_0000, size: 2 << 20, leafFlags: 0b1)
        #expect(try memory.load64(try #require(try builder.entryAddress(of: 0x20_0000, level: 2))) == 0x60_0000 | 1 | 1 << 7)
    }

    @Test func tableSpaceRunsOut() throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x10_0000),
                                           tableAreaSize: 3 * pageSize)
        // The root plus a PDPT and a PD fit; the PT does not.
        let error = builderError { () throws(PageTableBuilderError) in try builder.map(0x1000, to: 0x1000, leafFlags: 1) }
        #expect(error == .tableSpaceExhausted)
        #expect(error?.description.contains("no room") == true)
        #expect(memory.backedPageCount == 3)
        // A table area smaller than a page cannot even hold the root.
        #expect(throws: PageTableBuilderError.tableSpaceExhausted) {
            try PageTableBuilder(memory: GuestPhysicalMemory(), format: .pae, tableArea: GuestPhysicalAddress(0), tableAreaSize: 4095)
        }
    }

    @Test func tableAllocationReportsMemoryErrors() throws {
        let memory = GuestPhysicalMemory(sizeLimit: 2 * pageSize)
        let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0))
        let error = builderError { () throws(PageTableBuilderError) in try builder.map(0x1000, to: 0x1000, leafFlags: 1) }
        #expect(error == .memory(.sizeLimitExceeded(requested: pageSize, limit: 2 * pageSize)))
        #expect(throws: PageTableBuilderError.memory(.beyondPhysicalAddressSpace(GuestPhysicalAddress(1 << 52), size: pageSize))) {
            try PageTableBuilder(memory: GuestPhysicalMemory(), format: .fourLevel, tableArea: GuestPhysicalAddress(1 << 52))
        }
    }

    @Test(arguments: FormatCase.all)
    func setEntryWritesRawValues(_ formatCase: FormatCase) throws {
        let memory = GuestPhysicalMemory()
        let builder = try PageTableBuilder(memory: memory, format: formatCase.format, tableArea: GuestPhysicalAddress(0x10_0000))
        let virtual = formatCase.virtuals[1]
        // An odd value the builder does not judge: reserved bits and all.
        let value: UInt64 = formatCase.format == .legacy32 ? 0xFFFF_F0FF : 0x8FF0_0000_0000_F0FF
        try builder.setEntry(virtual, level: 1, value: value)
        let address = try #require(try builder.entryAddress(of: virtual, level: 1))
        #expect(try entry(memory, address, size: formatCase.entrySize) == value)
        try builder.setEntry(virtual, level: 2, value: 0)
        #expect(try entry(memory, try #require(try builder.entryAddress(of: virtual, level: 2)), size: formatCase.entrySize) == 0)
        #expect(try builder.entryAddress(of: virtual, level: 1) == nil)
    }
}
