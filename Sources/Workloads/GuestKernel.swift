import GuestMemory
import VirtualMachine
import X86Paging

/// The guest kernel of a scenario: it owns the guest's page tables the way an OS does. Table pages
/// come from a pool of guest-physical memory below 16 MiB, and the kernel maps that pool into every
/// address space it builds (the window, in the kernel half), so once the guest runs, every change to
/// a table is an ordinary supervisor store through the MMU and meets KVM's write protection exactly
/// as a real guest's would. Before the first guest operation ("boot") the tables are written
/// directly, as boot code with paging off would.
///
/// Address spaces: each has a name and, per paging mode, its own root table, made when first
/// needed (a `space` line, a `map` into it, a mode switch while it is loaded). The window's tables
/// below the root are shared by every root of a mode, as an OS shares its kernel half, so a new root
/// costs one page and a few entries.
public final class GuestKernel {
    /// Guest-physical memory for page tables: [1 MiB, 16 MiB).
    public static let tablePoolStart: UInt64 = 0x10_0000
    public static let tablePoolEnd: UInt64 = 0x100_0000
    /// Where the kernel sees guest-physical memory [0, 16 MiB): in IA-32e modes at this address.
    public static let windowBase64: UInt64 = 0xffff_e000_0000_0000
    /// ... and in 32-bit and PAE paging here (the top quarter of the 4 GiB space).
    public static let windowBase32: UInt64 = 0xc000_0000

    public let vm: VirtualMachine
    /// The paging mode whose tables `map`, `entryAddress` and `path` work on.
    public private(set) var mode: PagingMode
    /// The address space `map`, `entryAddress` and `path` work on.
    public private(set) var editSpace: String = Scenario.kernelSpace
    /// Every address space, in creation order.
    public private(set) var spaces: [String] = []
    private var roots: [RootKey: GuestPhysicalAddress] = [:]
    /// Per mode, the root entries that map the window (index, value): copied into every new root.
    private var windowRootEntries: [PagingMode: [(index: UInt64, value: UInt64)]] = [:]
    private var nextTable: UInt64
    /// False until the first guest operation: table writes go straight to memory.
    public var booted = false
    /// Performs a guest store of the table entry at a pool address after boot (the runner routes
    /// it through the VM, at the address the kernel reaches it by in the mode in force, and checks
    /// it in lockstep).
    public var store: (_ entry: GuestPhysicalAddress, _ value: UInt64, _ size: Int) throws -> Void = { _, _, _ in }
    /// Reads a table entry of `size` bytes at a guest-physical address of the kernel's; nil: the
    /// VM's memory at that address (an L1 kernel's guest-physical addresses are the VM's).
    private let load: ((_ entry: GuestPhysicalAddress, _ size: Int) throws -> UInt64)?

    private struct RootKey: Hashable {
        var space: String
        var mode: PagingMode
    }

    /// The kernel space with its root for `mode`.
    public init(vm: VirtualMachine, mode: PagingMode) throws {
        guard mode != .disabled else { throw GuestKernelError("the guest kernel needs paging on") }
        self.vm = vm
        self.mode = mode
        load = nil
        nextTable = Self.tablePoolStart
        try selectSpace(Scenario.kernelSpace)
    }

    /// An L2 guest's kernel: the same pool and window, in L2's guest-physical memory, which only
    /// L1's tables place in the VM's. L2 already runs, so every table write is `store` (an L2
    /// store, through L2's paging and L1's EPT or NPT) from the first, root and window included;
    /// reads are `load`'s.
    public init(l2Of vm: VirtualMachine, mode: PagingMode,
                store: @escaping (_ entry: GuestPhysicalAddress, _ value: UInt64, _ size: Int) throws -> Void,
                load: @escaping (_ entry: GuestPhysicalAddress, _ size: Int) throws -> UInt64) throws {
        guard mode != .disabled else { throw GuestKernelError("the guest kernel needs paging on") }
        self.vm = vm
        self.mode = mode
        self.store = store
        self.load = load
        booted = true
        nextTable = Self.tablePoolStart
        try selectSpace(Scenario.kernelSpace)
    }

    // MARK: Spaces and modes

    /// The root table of the edit space in the edit mode (CR3's base; for PAE the 32-byte PDPT at
    /// the start of its page).
    public var root: GuestPhysicalAddress { roots[RootKey(space: editSpace, mode: mode)]! }

    /// Whether `name` is an address space.
    public func hasSpace(_ name: String) -> Bool { spaces.contains(name) }

    /// Makes `name` the edit space, creating it (with a root for the edit mode) when new.
    public func selectSpace(_ name: String) throws {
        if !spaces.contains(name) { spaces.append(name) }
        _ = try root(of: name, mode: mode)
        editSpace = name
    }

    /// Makes `mode` the edit mode, creating the edit space's root for it when missing.
    public func selectMode(_ mode: PagingMode) throws {
        guard mode != .disabled else { throw GuestKernelError("the guest kernel needs paging on") }
        _ = try root(of: editSpace, mode: mode)
        self.mode = mode
    }

    /// The root of `space` for `mode`, made (with the kernel's window mapped) when missing.
    public func root(of space: String, mode: PagingMode) throws -> GuestPhysicalAddress {
        let key = RootKey(space: space, mode: mode)
        if let root = roots[key] { return root }
        guard spaces.contains(space) else { throw GuestKernelError("no address space '\(space)'") }
        let root = try allocateTable()
        roots[key] = root
        let format = TableFormat(mode)
        if let entries = windowRootEntries[mode] {
            for entry in entries {
                try writeEntry(GuestPhysicalAddress(root.rawValue + entry.index * UInt64(format.entrySize)), entry.value,
                               format: format)
            }
        } else {
            try mapWindow(root: root, format: format)
            windowRootEntries[mode] = try Set(stride(from: UInt64(0), to: Self.tablePoolEnd, by: 1 << 21).map {
                format.index(GuestVirtualAddress(format.windowBase + $0), level: format.topLevel)
            }).sorted().map { index in
                (index, try readEntry(GuestPhysicalAddress(root.rawValue + index * UInt64(format.entrySize)), format: format))
            }
        }
        return root
    }

    /// The root of `space` for `mode` if it was made.
    public func existingRoot(of space: String, mode: PagingMode) -> GuestPhysicalAddress? {
        roots[RootKey(space: space, mode: mode)]
    }

    /// The space and mode whose root is at `address`, if any.
    public func space(withRoot address: GuestPhysicalAddress) -> (space: String, mode: PagingMode)? {
        roots.first { $0.value == address }.map { ($0.key.space, $0.key.mode) }
    }

    // MARK: Geometry

    public var entrySize: Int { TableFormat(mode).entrySize }
    public var windowBase: UInt64 { TableFormat(mode).windowBase }
    public var topLevel: Int { TableFormat(mode).topLevel }

    /// The kernel's view of a guest-physical address in the pool in the edit mode.
    public func windowAddress(_ gpa: GuestPhysicalAddress) -> GuestVirtualAddress {
        Self.linearAddress(of: gpa, in: mode)
    }

    /// Where the kernel reaches pool address `gpa` when the processor is in `mode`: through the
    /// window, or at `gpa` itself with paging off (linear addresses are physical).
    public static func linearAddress(of gpa: GuestPhysicalAddress, in mode: PagingMode) -> GuestVirtualAddress {
        mode == .disabled ? GuestVirtualAddress(gpa.rawValue) : GuestVirtualAddress(TableFormat(mode).windowBase + gpa.rawValue)
    }

    func allocateTable() throws -> GuestPhysicalAddress {
        guard nextTable < Self.tablePoolEnd else {
            throw GuestKernelError("the page-table pool below 16 MiB is exhausted (\((Self.tablePoolEnd - Self.tablePoolStart) >> 12) tables)")
        }
        let table = GuestPhysicalAddress(nextTable)
        nextTable += pageSize
        return table
    }

    /// Maps guest-physical [0, 16 MiB) at the window, supervisor-only and writable, A and D preset:
    /// with 2 MiB pages, but 4 KiB pages in 32-bit paging, where a 4 MiB page would need CR4.PSE,
    /// which a scenario may clear. Not marked NX: with EFER.NXE clear that bit is reserved, and the
    /// kernel must be able to write its tables whatever the scenario sets.
    private func mapWindow(root: GuestPhysicalAddress, format: TableFormat) throws {
        let leafLevel = format.mode == .legacy32 ? 1 : 2
        let step: UInt64 = leafLevel == 1 ? 4 << 10 : 2 << 20
        for offset in stride(from: UInt64(0), to: Self.tablePoolEnd, by: Int(step)) {
            try map(GuestVirtualAddress(format.windowBase + offset), to: GuestPhysicalAddress(offset), leafLevel: leafLevel,
                    leafFlags: 0x1 | 0x2 | 0x20 | 0x40, tableFlags: { _ in 0x3 }, root: root, format: format)
        }
    }

    // MARK: Entries

    func readEntry(_ address: GuestPhysicalAddress) throws -> UInt64 { try readEntry(address, format: TableFormat(mode)) }

    private func readEntry(_ address: GuestPhysicalAddress, format: TableFormat) throws -> UInt64 {
        if let load { return try load(address, format.entrySize) }
        return format.entrySize == 4 ? UInt64(try vm.memory.load32(address)) : try vm.memory.load64(address)
    }

    /// Writes a table entry: directly before boot, as a guest store through the window after.
    private func writeEntry(_ address: GuestPhysicalAddress, _ value: UInt64, format: TableFormat) throws {
        if booted {
            // The kernel reaches its tables only through the window onto the pool.
            guard address.rawValue < Self.tablePoolEnd else {
                throw GuestKernelError("the entry at \(address) lies in a table outside the page-table pool below 16 MiB "
                                       + "(a guest entry points there), which the kernel cannot write through its window")
            }
            try store(address, value, format.entrySize)
        } else if format.entrySize == 4 {
            try vm.memory.store32(UInt32(truncatingIfNeeded: value), at: address)
        } else {
            try vm.memory.store64(value, at: address)
        }
    }

    /// The address of the level-`level` entry for `gva` in the edit space's tables (creating
    /// tables when `create`), or nil when the walk ends above that level.
    public func entryAddress(_ gva: GuestVirtualAddress, level target: Int, create: Bool = false,
                             tableFlags: (Int) -> UInt64 = { _ in 0x7 }) throws -> GuestPhysicalAddress? {
        try entryAddress(gva, level: target, create: create, tableFlags: tableFlags, root: root, format: TableFormat(mode))
    }

    private func entryAddress(_ gva: GuestVirtualAddress, level target: Int, create: Bool, tableFlags: (Int) -> UInt64,
                              root: GuestPhysicalAddress, format: TableFormat) throws -> GuestPhysicalAddress? {
        var table = root.rawValue
        var level = format.topLevel
        while true {
            let address = GuestPhysicalAddress(table + format.index(gva, level: level) * UInt64(format.entrySize))
            if level == target { return address }
            let entry = try readEntry(address, format: format)
            if entry & 1 == 0 {
                guard create else { return nil }
                let newTable = try allocateTable()
                // PAE PDPTEs carry only P (their other low bits are reserved).
                let flags = format.mode == .pae && level == 3 ? 0x1 : tableFlags(level)
                try writeEntry(address, newTable.rawValue | flags, format: format)
                table = newTable.rawValue
            } else {
                if format.isLargeLeaf(entry, level: level) {
                    guard !create else {
                        throw GuestKernelError("\(gva) already lies in a large page mapped at level \(level)")
                    }
                    return nil
                }
                table = entry & format.addressMask
            }
            level -= 1
        }
    }

    /// Whether a present entry above level 1 maps a page (PS) rather than a table, in the edit mode.
    func isLargeLeaf(_ entry: UInt64, level: Int) -> Bool { TableFormat(mode).isLargeLeaf(entry, level: level) }

    /// Maps `gva` to `gpa` with a leaf at `leafLevel` (1 = 4 KiB) in the edit space's tables.
    public func map(_ gva: GuestVirtualAddress, to gpa: GuestPhysicalAddress, leafLevel: Int, leafFlags: UInt64,
                    tableFlags: (Int) -> UInt64) throws {
        try map(gva, to: gpa, leafLevel: leafLevel, leafFlags: leafFlags, tableFlags: tableFlags, root: root,
                format: TableFormat(mode))
    }

    private func map(_ gva: GuestVirtualAddress, to gpa: GuestPhysicalAddress, leafLevel: Int, leafFlags: UInt64,
                     tableFlags: (Int) -> UInt64, root: GuestPhysicalAddress, format: TableFormat) throws {
        guard let address = try entryAddress(gva, level: leafLevel, create: true, tableFlags: tableFlags, root: root,
                                             format: format) else {
            throw GuestKernelError("cannot reach the level-\(leafLevel) entry for \(gva)")
        }
        var value = gpa.rawValue | leafFlags
        if leafLevel > 1 { value |= 0x80 }
        if format.mode == .legacy32 && leafLevel == 2 {
            // PSE-36: physical bits 39:32 of a 4 MiB page go to PDE bits 20:13.
            value = (gpa.rawValue & 0xFFC0_0000) | ((gpa.rawValue >> 32) & 0xFF) << 13 | leafFlags | 0x80
        }
        try writeEntry(address, value, format: format)
    }

    /// The entries of the walk for `gva` in the edit space and mode, top first, as (level, entry
    /// address, value) while present.
    public func path(_ gva: GuestVirtualAddress) -> [(level: Int, address: GuestPhysicalAddress, value: UInt64)] {
        path(gva, space: editSpace, mode: mode)
    }

    /// The same in the tables of `space` for `mode` (none when that root was never made).
    public func path(_ gva: GuestVirtualAddress, space: String,
                     mode: PagingMode) -> [(level: Int, address: GuestPhysicalAddress, value: UInt64)] {
        guard let root = existingRoot(of: space, mode: mode) else { return [] }
        let format = TableFormat(mode)
        var result: [(Int, GuestPhysicalAddress, UInt64)] = []
        var level = format.topLevel
        while level >= 1,
              let address = try? entryAddress(gva, level: level, create: false, tableFlags: { _ in 0 }, root: root, format: format),
              let value = try? readEntry(address, format: format) {
            result.append((level, address, value))
            if value & 1 == 0 { break }
            if level == 1 || format.isLargeLeaf(value, level: level) { break }
            level -= 1
        }
        return result
    }
}

/// The shape of one paging mode's tables, as far as the kernel builds and walks them.
struct TableFormat {
    let mode: PagingMode

    init(_ mode: PagingMode) { self.mode = mode }

    var entrySize: Int { mode == .legacy32 ? 4 : 8 }
    /// The level of the root: PAE's is the PDPT (level 3).
    var topLevel: Int { mode == .pae ? 3 : mode.rootLevel }
    var windowBase: UInt64 { mode.isLongMode ? GuestKernel.windowBase64 : GuestKernel.windowBase32 }
    /// The bits of an entry that address the next table.
    var addressMask: UInt64 { mode == .legacy32 ? 0xFFFF_F000 : bitRange(12, 51) }

    func index(_ gva: GuestVirtualAddress, level: Int) -> UInt64 {
        if mode == .legacy32 { return (gva.rawValue >> UInt64(12 + 10 * (level - 1))) & 1023 }
        if mode == .pae && level == 3 { return (gva.rawValue >> 30) & 3 }
        return (gva.rawValue >> UInt64(12 + 9 * (level - 1))) & 511
    }

    /// Whether a present entry above level 1 maps a page (PS) rather than a table.
    func isLargeLeaf(_ entry: UInt64, level: Int) -> Bool {
        guard entry & 0x80 != 0 else { return false }
        switch mode {
        case .legacy32, .pae: return level == 2
        default: return level == 2 || level == 3
        }
    }
}

public struct GuestKernelError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
