import X86Paging

/// The table format a `PageTableBuilder` writes.
public enum TableFormat: Hashable, Sendable {
    case legacy32
    case pae
    case fourLevel
    case fiveLevel
    /// EPT tables of 4 or 5 levels.
    case ept(levels: Int)

    public init?(_ mode: PagingMode) {
        switch mode {
        case .disabled: return nil
        case .legacy32: self = .legacy32
        case .pae: self = .pae
        case .fourLevel: self = .fourLevel
        case .fiveLevel: self = .fiveLevel
        }
    }

    var entrySize: UInt64 { self == .legacy32 ? 4 : 8 }
    var indexBits: Int { self == .legacy32 ? 10 : 9 }
    var topLevel: Int {
        switch self {
        case .legacy32: 2
        case .pae: 3
        case .fourLevel: 4
        case .fiveLevel: 5
        case .ept(let levels): levels
        }
    }

    /// Bits of a non-leaf entry that grant everything, so the leaf alone decides permissions.
    public var permissiveTableFlags: UInt64 {
        switch self {
        case .ept: 0b111
        default: 0b111  // P | R/W | U/S
        }
    }

    /// The page sizes a leaf can have, by level.
    public func pageSize(level: Int) -> UInt64 { 1 << UInt64(pageShift + (level - 1) * indexBits) }
}

public enum PageTableBuilderError: Error, Equatable, Sendable, CustomStringConvertible {
    case unsupportedPageSize(UInt64)
    case misaligned(virtual: UInt64, physical: UInt64, pageSize: UInt64)
    /// A large page already maps part of the range, so no table can be placed under it.
    case conflictsWithLargePage(virtual: UInt64, level: Int)
    case tableSpaceExhausted
    case memory(GuestMemoryError)

    public var description: String {
        switch self {
        case .unsupportedPageSize(let size): "page size \(hex(size)) is not supported by this table format"
        case .misaligned(let virtual, let physical, let size):
            "mapping \(hex(virtual)) -> \(hex(physical)) is not aligned to its page size \(hex(size))"
        case .conflictsWithLargePage(let virtual, let level):
            "\(hex(virtual)) is already mapped by a large page at level \(level)"
        case .tableSpaceExhausted: "no room left in the table area for another page table"
        case .memory(let error): error.description
        }
    }
}

/// Builds page tables (x86 or EPT) in guest memory: the tool behind the sample image, the
/// scenario language's `map`, tests and benchmarks. It writes entries with plain stores, exactly as
/// a guest kernel would, and never checks them: hostile layouts are the point of some callers.
public final class PageTableBuilder {
    public let memory: GuestPhysicalMemory
    public let format: TableFormat
    /// The root table: CR3's address (for PAE, the 32-byte PDPT) or the EPTP's.
    public private(set) var root: GuestPhysicalAddress
    private var nextTable: UInt64
    private let tableAreaEnd: UInt64

    /// Tables are allocated from `[tableArea, tableArea + tableAreaSize)`, backed on demand.
    public init(memory: GuestPhysicalMemory, format: TableFormat, tableArea: GuestPhysicalAddress,
                tableAreaSize: UInt64 = 16 << 20) throws(PageTableBuilderError) {
        self.memory = memory
        self.format = format
        nextTable = (tableArea.rawValue + pageOffsetMask) & ~pageOffsetMask
        tableAreaEnd = tableArea.rawValue + tableAreaSize
        root = GuestPhysicalAddress(0)
        root = try allocateTable()
    }

    /// Allocates a zeroed table page.
    public func allocateTable() throws(PageTableBuilderError) -> GuestPhysicalAddress {
        guard nextTable + pageSize <= tableAreaEnd else { throw .tableSpaceExhausted }
        let address = GuestPhysicalAddress(nextTable)
        do throws(GuestMemoryError) {
            try memory.back(address, size: pageSize)
            try memory.write(address, bytes: [UInt8](repeating: 0, count: Int(pageSize)))
        } catch {
            throw .memory(error)
        }
        nextTable += pageSize
        return address
    }

    /// Maps `virtual` (a linear address, or a guest-physical one for EPT) to `physical` with a page
    /// of `size`. `leafFlags` are the leaf's low and high flag bits (the builder adds the address
    /// and, for large pages, PS); `tableFlags` go into every table entry it creates.
    public func map(_ virtual: UInt64, to physical: UInt64, size: UInt64 = pageSize, leafFlags: UInt64,
                    tableFlags: UInt64? = nil) throws(PageTableBuilderError) {
        let leafLevel = try level(forPageSize: size)
        guard virtual & (size - 1) == 0, physical & (size - 1) == 0 else {
            throw .misaligned(virtual: virtual, physical: physical, pageSize: size)
        }
        let tableEntryFlags = tableFlags ?? format.permissiveTableFlags
        var table = root.rawValue
        var level = format.topLevel
        while level > leafLevel {
            let entryAddress = try entryAddress(table: table, level: level, virtual: virtual)
            let entry = try read(entryAddress)
            if isPresent(entry) {
                if isLargeLeaf(entry, level: level) {
                    throw .conflictsWithLargePage(virtual: virtual, level: level)
                }
                table = tableAddress(entry)
            } else {
                let newTable = try allocateTable()
                // PAE PDPTEs have no R/W or U/S bits (they are reserved there): only P.
                let flags = format == .pae && level == 3 ? 1 : tableEntryFlags
                try write(newTable.rawValue | flags, at: entryAddress)
                table = newTable.rawValue
            }
            level -= 1
        }
        let entryAddress = try entryAddress(table: table, level: leafLevel, virtual: virtual)
        try write(leafValue(physical: physical, level: leafLevel, flags: leafFlags), at: entryAddress)
    }

    /// Writes `value` into the entry that translates `virtual` at `level`, creating the tables
    /// above it as `map` does. For building deliberately odd entries.
    public func setEntry(_ virtual: UInt64, level targetLevel: Int, value: UInt64) throws(PageTableBuilderError) {
        var table = root.rawValue
        var level = format.topLevel
        while level > targetLevel {
            let entryAddress = try entryAddress(table: table, level: level, virtual: virtual)
            let entry = try read(entryAddress)
            if isPresent(entry) && !isLargeLeaf(entry, level: level) {
                table = tableAddress(entry)
            } else {
                let newTable = try allocateTable()
                let flags = format == .pae && level == 3 ? 1 : format.permissiveTableFlags
                try write(newTable.rawValue | flags, at: entryAddress)
                table = newTable.rawValue
            }
            level -= 1
        }
        try write(value, at: try entryAddress(table: table, level: targetLevel, virtual: virtual))
    }

    /// The address of the entry that translates `virtual` at `level`, if the tables above exist.
    public func entryAddress(of virtual: UInt64, level targetLevel: Int) throws(PageTableBuilderError) -> GuestPhysicalAddress? {
        var table = root.rawValue
        var level = format.topLevel
        while level > targetLevel {
            let entry = try read(try entryAddress(table: table, level: level, virtual: virtual))
            guard isPresent(entry), !isLargeLeaf(entry, level: level) else { return nil }
            table = tableAddress(entry)
            level -= 1
        }
        return try entryAddress(table: table, level: targetLevel, virtual: virtual)
    }

    // MARK: Format details

    private func level(forPageSize size: UInt64) throws(PageTableBuilderError) -> Int {
        let maxLeafLevel = format == .legacy32 ? 2 : min(3, format.topLevel)
        for level in 1...maxLeafLevel where format.pageSize(level: level) == size {
            // PAE has no 1 GiB pages (its level-3 entries are PDPTE registers).
            if format == .pae && level == 3 { break }
            return level
        }
        throw .unsupportedPageSize(size)
    }

    private func entryAddress(table: UInt64, level: Int, virtual: UInt64) throws(PageTableBuilderError) -> GuestPhysicalAddress {
        if format == .pae && level == 3 {
            return GuestPhysicalAddress(table + ((virtual >> 30) & 3) * 8)
        }
        let index = (virtual >> UInt64(pageShift + (level - 1) * format.indexBits)) & ((1 << UInt64(format.indexBits)) - 1)
        return GuestPhysicalAddress(table + index * format.entrySize)
    }

    private func isPresent(_ entry: UInt64) -> Bool {
        if case .ept = format { return entry & 7 != 0 }
        return entry & 1 != 0
    }

    /// PS (bit 7) above level 1; never in a PAE PDPTE, where bit 7 is reserved.
    private func isLargeLeaf(_ entry: UInt64, level: Int) -> Bool {
        level > 1 && !(format == .pae && level == 3) && entry & (1 << 7) != 0
    }

    private func tableAddress(_ entry: UInt64) -> UInt64 {
        format == .legacy32 ? entry & 0xFFFF_F000 : entry & bitRange(12, 51)
    }

    private func leafValue(physical: UInt64, level: Int, flags: UInt64) -> UInt64 {
        guard level > 1 else { return physical | flags }
        if format == .legacy32 {
            // PSE-36/40: physical bits 39:32 of a 4 MiB page go into PDE bits 20:13.
            return (physical & 0xFFC0_0000) | ((physical >> 32) & 0xFF) << 13 | flags | 1 << 7
        }
        return physical | flags | 1 << 7
    }

    private func read(_ address: GuestPhysicalAddress) throws(PageTableBuilderError) -> UInt64 {
        do throws(GuestMemoryError) {
            return format == .legacy32 ? UInt64(try memory.load32(address)) : try memory.load64(address)
        } catch {
            throw .memory(error)
        }
    }

    private func write(_ value: UInt64, at address: GuestPhysicalAddress) throws(PageTableBuilderError) {
        do throws(GuestMemoryError) {
            if format == .legacy32 {
                try memory.store32(UInt32(truncatingIfNeeded: value), at: address)
            } else {
                try memory.store64(value, at: address)
            }
        } catch {
            throw .memory(error)
        }
    }
}
