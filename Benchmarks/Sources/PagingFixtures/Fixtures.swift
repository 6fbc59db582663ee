// Page-table fixtures for the walker benchmarks. Each fixture builds its tables once, with the
// root package's own PageTableBuilder, into its own GuestPhysicalMemory, and keeps a permuted list
// of addresses to walk so that consecutive walks use different entries (a fixed stride would let
// every walk hit the same cache lines as the last one).

import GuestMemory
import X86Paging

/// Pages per fixture: 4096 4 KiB pages (16 MiB) in four regions of 1024, i.e. 8 page tables,
/// which together with the upper levels and the radix nodes of GuestPhysicalMemory stay in L1/L2.
public let pagesPerFixture = 4096
let pagesPerRegion = 1024
let tableArea = GuestPhysicalAddress(0x0010_0000)

/// A deterministic permutation of `0..<count` (xorshift-driven Fisher-Yates; no Foundation).
func permutation(_ count: Int, seed: UInt64 = 0x9E37_79B9_7F4A_7C15) -> [Int] {
    var state = seed
    var result = Array(0..<count)
    for index in stride(from: count - 1, to: 0, by: -1) {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        result.swapAt(index, Int(state % UInt64(index + 1)))
    }
    return result
}

/// Four region bases per mode, each aligned to the region size so that a region fills whole tables.
func regionBases(_ format: TableFormat, pageSize: UInt64) -> [UInt64] {
    switch format {
    case .legacy32, .pae:
        // 32-bit linear addresses: user code, user heap, kernel low map, kernel high.
        return [0x0040_0000, 0x0800_0000, 0xC000_0000, 0xF000_0000]
    case .ept:
        // Guest-physical: low RAM, 1 GiB, 4 GiB, 64 GiB.
        return [0x0, 0x4000_0000, 0x1_0000_0000, 0x10_0000_0000]
    default:
        // User text, user mmap area, kernel direct map, kernel vmalloc (canonical for 48 and 57 bits).
        if pageSize == 4096 {
            return [0x0000_0000_0040_0000, 0x0000_7F12_3440_0000, 0xFFFF_8880_0000_0000, 0xFFFF_C900_0000_0000]
        }
        return [0x0000_0001_0000_0000, 0x0000_7F00_0000_0000, 0xFFFF_8880_0000_0000, 0xFFFF_C900_0000_0000]
    }
}

/// A page-table fixture for the x86 walker.
public final class WalkFixture: @unchecked Sendable {
    public let name: String
    public let memory: GuestPhysicalMemory
    public let walker: PageWalker
    public let format: TableFormat
    /// The root table (CR3's table address), for the hand-written baseline chain.
    public let root: UInt64
    /// Addresses that translate, in walk order (`count` is a power of two).
    public let addresses: [GuestVirtualAddress]
    /// Addresses whose PTE is not present (the tables above exist).
    public let notPresent: [GuestVirtualAddress]
    /// Addresses of present supervisor read-only pages (a user write faults at the leaf).
    public let protected: [GuestVirtualAddress]
    /// The number of tables the builder allocated.
    public let tableCount: Int

    public init(_ format: TableFormat, pageSize: UInt64 = 4096, withFaults: Bool = false) {
        let memory = GuestPhysicalMemory()
        let builder = try! PageTableBuilder(memory: memory, format: format, tableArea: tableArea)
        var registers = PagingRegisters(cr0: [.protectionEnable, .paging, .writeProtect])
        switch format {
        case .legacy32:
            registers.cr4 = [.pageSizeExtensions]
        case .pae:
            registers.cr4 = [.physicalAddressExtension]
        case .fourLevel:
            registers.cr4 = [.physicalAddressExtension]
            registers.efer = [.longModeEnable, .longModeActive, .noExecuteEnable]
        case .fiveLevel:
            registers.cr4 = [.physicalAddressExtension, .la57]
            registers.efer = [.longModeEnable, .longModeActive, .noExecuteEnable]
        case .ept:
            fatalError("use EPTFixture")
        }
        registers.cr3 = builder.root.rawValue
        let bases = regionBases(format, pageSize: pageSize)
        let physicalBase: UInt64 = pageSize == 4096 ? 0x0100_0000 : 0x1_0000_0000
        var mapped: [GuestVirtualAddress] = []
        var absent: [GuestVirtualAddress] = []
        var readOnly: [GuestVirtualAddress] = []
        let regionSpan = UInt64(pagesPerRegion) * pageSize
        for (region, base) in bases.enumerated() {
            // Regions 0 and 1 are user pages, 2 and 3 supervisor pages; all writable.
            let flags: UInt64 = region < 2 ? 0x7 : 0x3
            for page in 0..<pagesPerRegion {
                let virtual = base + UInt64(page) * pageSize
                let physical = physicalBase + UInt64(region * pagesPerRegion + page) * pageSize
                try! builder.map(virtual, to: physical, size: pageSize, leafFlags: flags)
                // Offsets inside the page vary so the page-offset arithmetic is exercised.
                mapped.append(GuestVirtualAddress(virtual | (UInt64(page) * 8) & (pageSize - 1)))
            }
            if withFaults {
                for page in 0..<pagesPerRegion {
                    // Not present: the PTE of an existing table is zero.
                    let hole = base + regionSpan + UInt64(page) * pageSize
                    try! builder.setEntry(hole, level: 1, value: 0)
                    absent.append(GuestVirtualAddress(hole))
                    // Supervisor, read-only: present, but a user write faults (U/S and R/W).
                    let guarded = base + 2 * regionSpan + UInt64(page) * pageSize
                    try! builder.map(guarded, to: physicalBase + UInt64(page) * pageSize, size: pageSize, leafFlags: 0x1)
                    readOnly.append(GuestVirtualAddress(guarded))
                }
            }
        }
        let order = permutation(mapped.count)
        self.name = "\(format)"
        self.memory = memory
        self.format = format
        self.root = builder.root.rawValue
        self.walker = try! PageWalker(registers: registers, memory: memory)
        self.addresses = order.map { mapped[$0] }
        self.notPresent = withFaults ? order.map { absent[$0] } : []
        self.protected = withFaults ? order.map { readOnly[$0] } : []
        self.tableCount = Int(memory.backedPageCount)
        precondition(addresses.count.nonzeroBitCount == 1)
        // Check the fixture: every address translates, every fault faults.
        for address in addresses { _ = try! walker.walk(address, .read(.supervisor), in: memory, setAccessedDirty: false) }
        for address in notPresent + protected {
            do {
                _ = try walker.walk(address, .write(.user), in: memory, setAccessedDirty: false)
                fatalError("\(address) should fault")
            } catch {}
        }
    }
}

/// An EPT fixture: 4096 4 KiB guest-physical pages, RWX, write-back.
public final class EPTFixture: @unchecked Sendable {
    public let memory: GuestPhysicalMemory
    public let walker: EPTWalker
    public let addresses: [GuestPhysicalAddress]
    public let root: UInt64

    public init(levels: Int = 4) {
        let memory = GuestPhysicalMemory()
        let builder = try! PageTableBuilder(memory: memory, format: .ept(levels: levels), tableArea: tableArea)
        var mapped: [GuestPhysicalAddress] = []
        for (region, base) in regionBases(.ept(levels: levels), pageSize: 4096).enumerated() {
            for page in 0..<pagesPerRegion {
                let gpa = base + UInt64(page) * 4096
                try! builder.map(gpa, to: 0x1_0000_0000 + UInt64(region * pagesPerRegion + page) * 4096,
                                 leafFlags: 0x7 | 6 << 3)
                mapped.append(GuestPhysicalAddress(gpa | UInt64(page * 8) & 0xFFF))
            }
        }
        self.memory = memory
        self.root = builder.root.rawValue
        self.walker = try! EPTWalker(pointer: EPTPointer(root: builder.root.rawValue, levels: levels, accessedDirty: true))
        self.addresses = permutation(mapped.count).map { mapped[$0] }
        for address in addresses { _ = try! walker.walk(address, .read, in: memory, setAccessedDirty: false) }
    }
}

/// A 4-level address space with 1 GiB of 4 KiB pages (262,144 PTEs in 512 page tables), for
/// `PageWalker.mappings(in:)`. `fragmented` alternates R/W so that no two pages coalesce.
public final class MappingFixture: @unchecked Sendable {
    public static let regionBase: UInt64 = 0x0000_0040_0000_0000
    public static let pageCount = (1 << 30) / 4096
    public let memory: GuestPhysicalMemory
    public let walker: PageWalker
    public let fragmented: Bool
    /// The page tables' guest-physical addresses, for the raw scan baseline.
    public let pageTables: [UInt64]

    public init(fragmented: Bool) {
        let memory = GuestPhysicalMemory()
        let builder = try! PageTableBuilder(memory: memory, format: .fourLevel, tableArea: tableArea)
        for page in 0..<Self.pageCount {
            let flags: UInt64 = fragmented && page & 1 == 1 ? 0x5 : 0x7
            try! builder.map(Self.regionBase + UInt64(page) << 12, to: 0x1_0000_0000 + UInt64(page) << 12,
                             leafFlags: flags)
        }
        var tables: [UInt64] = []
        for table in 0..<(Self.pageCount / 512) {
            let entry = try! builder.entryAddress(of: Self.regionBase + UInt64(table) << 21, level: 1)!
            tables.append(entry.rawValue)
        }
        let registers = PagingRegisters(cr0: [.protectionEnable, .paging, .writeProtect], cr3: builder.root.rawValue,
                                        cr4: [.physicalAddressExtension],
                                        efer: [.longModeEnable, .longModeActive, .noExecuteEnable])
        self.memory = memory
        self.walker = try! PageWalker(registers: registers, memory: memory)
        self.fragmented = fragmented
        self.pageTables = tables
        let (runs, summary) = walker.mappings(in: memory)
        precondition(summary.leafPages == UInt64(Self.pageCount) && !summary.truncated)
        precondition(runs.count == (fragmented ? Self.pageCount : 1), "runs: \(runs.count)")
    }
}

/// The fixtures, built on first use.
public enum Fixtures {
    public static let fourLevel = WalkFixture(.fourLevel)
    public static let fourLevel2M = WalkFixture(.fourLevel, pageSize: 2 << 20)
    public static let fiveLevel = WalkFixture(.fiveLevel)
    public static let pae = WalkFixture(.pae)
    public static let legacy32 = WalkFixture(.legacy32)
    public static let faults = WalkFixture(.fourLevel, withFaults: true)
    public static let ept4 = EPTFixture(levels: 4)
    public static let mappingsContiguous = MappingFixture(fragmented: false)
    public static let mappingsFragmented = MappingFixture(fragmented: true)
}
