import GuestMemory
import VirtualMachine
import X86Paging

/// The guest kernel of a scenario: it owns the guest's page tables the way an OS does. Table pages
/// come from a pool of guest-physical memory below 16 MiB, and the kernel maps that pool into its
/// own address space (the window, in the kernel half), so once the guest runs, every change to a
/// table is an ordinary supervisor store through the MMU and meets KVM's write protection exactly
/// as a real guest's would. Before the first guest operation ("boot") the tables are written
/// directly, as boot code with paging off would.
public final class GuestKernel {
    /// Guest-physical memory for page tables: [1 MiB, 16 MiB).
    public static let tablePoolStart: UInt64 = 0x10_0000
    public static let tablePoolEnd: UInt64 = 0x100_0000
    /// Where the kernel sees guest-physical memory [0, 16 MiB): in IA-32e modes at this address.
    public static let windowBase64: UInt64 = 0xffff_e000_0000_0000
    /// ... and in 32-bit and PAE paging here (the top quarter of the 4 GiB space).
    public static let windowBase32: UInt64 = 0xc000_0000

    public let vm: VirtualMachine
    public let mode: PagingMode
    /// The root table (CR3's base; for PAE the 32-byte PDPT at the start of its page).
    public let root: GuestPhysicalAddress
    private var nextTable: UInt64
    /// False until the first guest operation: table writes go straight to memory.
    public var booted = false
    /// Performs a guest store after boot (the runner routes it through the VM and lockstep).
    public var store: (_ gva: GuestVirtualAddress, _ value: UInt64, _ size: Int) throws -> Void = { _, _, _ in }

    public var entrySize: Int { mode == .legacy32 ? 4 : 8 }
    public var windowBase: UInt64 { mode.isLongMode ? Self.windowBase64 : Self.windowBase32 }
    public var topLevel: Int { mode == .pae ? 3 : mode.rootLevel }

    public init(vm: VirtualMachine, mode: PagingMode) throws {
        guard mode != .disabled else { throw GuestKernelError("the guest kernel needs paging on") }
        self.vm = vm
        self.mode = mode
        nextTable = Self.tablePoolStart
        root = GuestPhysicalAddress(Self.tablePoolStart)
        nextTable += pageSize
        try mapWindow()
    }

    /// The kernel's view of a guest-physical address in the pool.
    public func windowAddress(_ gpa: GuestPhysicalAddress) -> GuestVirtualAddress {
        GuestVirtualAddress(windowBase + gpa.rawValue)
    }

    private func allocateTable() throws -> GuestPhysicalAddress {
        guard nextTable < Self.tablePoolEnd else {
            throw GuestKernelError("the page-table pool below 16 MiB is exhausted (\((Self.tablePoolEnd - Self.tablePoolStart) >> 12) tables)")
        }
        let table = GuestPhysicalAddress(nextTable)
        nextTable += pageSize
        return table
    }

    /// Maps guest-physical [0, 16 MiB) at the window with 2 MiB pages (4 MiB with 32-bit paging),
    /// supervisor-only and writable. Not marked NX: with EFER.NXE clear that bit is reserved, and
    /// the kernel must be able to write its tables whatever the scenario sets.
    private func mapWindow() throws {
        let large: UInt64 = mode == .legacy32 ? 4 << 20 : 2 << 20
        for offset in stride(from: UInt64(0), to: Self.tablePoolEnd, by: Int(large)) {
            try map(GuestVirtualAddress(windowBase + offset), to: GuestPhysicalAddress(offset), leafLevel: 2,
                    leafFlags: 0x1 | 0x2 | 0x20 | 0x40 | 0x80, tableFlags: { _ in 0x3 })
        }
    }

    func index(_ gva: GuestVirtualAddress, level: Int) -> UInt64 {
        if mode == .legacy32 { return (gva.rawValue >> UInt64(12 + 10 * (level - 1))) & 1023 }
        if mode == .pae && level == 3 { return (gva.rawValue >> 30) & 3 }
        return (gva.rawValue >> UInt64(12 + 9 * (level - 1))) & 511
    }

    func readEntry(_ address: GuestPhysicalAddress) throws -> UInt64 {
        entrySize == 4 ? UInt64(try vm.memory.load32(address)) : try vm.memory.load64(address)
    }

    /// Writes a table entry: directly before boot, as a guest store through the window after.
    func writeEntry(_ address: GuestPhysicalAddress, _ value: UInt64) throws {
        if booted {
            // The kernel reaches its tables only through the window onto the pool.
            guard address.rawValue < Self.tablePoolEnd else {
                throw GuestKernelError("the entry at \(address) lies in a table outside the page-table pool below 16 MiB "
                                       + "(a guest entry points there), which the kernel cannot write through its window")
            }
            try store(windowAddress(address), value, entrySize)
        } else if entrySize == 4 {
            try vm.memory.store32(UInt32(truncatingIfNeeded: value), at: address)
        } else {
            try vm.memory.store64(value, at: address)
        }
    }

    /// The address of the level-`level` entry for `gva` (creating tables when `create`), or nil
    /// when the walk ends above that level.
    public func entryAddress(_ gva: GuestVirtualAddress, level target: Int, create: Bool = false,
                             tableFlags: (Int) -> UInt64 = { _ in 0x7 }) throws -> GuestPhysicalAddress? {
        var table = root.rawValue
        var level = topLevel
        while true {
            let address = GuestPhysicalAddress(table + index(gva, level: level) * UInt64(entrySize))
            if level == target { return address }
            let entry = try readEntry(address)
            if entry & 1 == 0 {
                guard create else { return nil }
                let newTable = try allocateTable()
                // PAE PDPTEs carry only P (their other low bits are reserved).
                let flags = mode == .pae && level == 3 ? 0x1 : tableFlags(level)
                try writeEntry(address, newTable.rawValue | flags)
                table = newTable.rawValue
            } else {
                if isLargeLeaf(entry, level: level) {
                    guard !create else {
                        throw GuestKernelError("\(gva) already lies in a large page mapped at level \(level)")
                    }
                    return nil
                }
                table = mode == .legacy32 ? entry & 0xFFFF_F000 : entry & bitRange(12, 51)
            }
            level -= 1
        }
    }

    /// Whether a present entry above level 1 maps a page (PS) rather than a table.
    func isLargeLeaf(_ entry: UInt64, level: Int) -> Bool {
        guard entry & 0x80 != 0 else { return false }
        switch mode {
        case .legacy32, .pae: return level == 2
        default: return level == 2 || level == 3
        }
    }

    /// Maps `gva` to `gpa` with a leaf at `leafLevel` (1 = 4 KiB).
    public func map(_ gva: GuestVirtualAddress, to gpa: GuestPhysicalAddress, leafLevel: Int, leafFlags: UInt64,
                    tableFlags: (Int) -> UInt64) throws {
        guard let address = try entryAddress(gva, level: leafLevel, create: true, tableFlags: tableFlags) else {
            throw GuestKernelError("cannot reach the level-\(leafLevel) entry for \(gva)")
        }
        var value = gpa.rawValue | leafFlags
        if leafLevel > 1 { value |= 0x80 }
        if mode == .legacy32 && leafLevel == 2 {
            // PSE-36: physical bits 39:32 of a 4 MiB page go to PDE bits 20:13.
            value = (gpa.rawValue & 0xFFC0_0000) | ((gpa.rawValue >> 32) & 0xFF) << 13 | leafFlags | 0x80
        }
        try writeEntry(address, value)
    }

    /// The entries of the walk for `gva`, top first, as (level, entry address, value) while present.
    public func path(_ gva: GuestVirtualAddress) -> [(level: Int, address: GuestPhysicalAddress, value: UInt64)] {
        var result: [(Int, GuestPhysicalAddress, UInt64)] = []
        var level = topLevel
        while level >= 1, let address = try? entryAddress(gva, level: level), let value = try? readEntry(address) {
            result.append((level, address, value))
            if value & 1 == 0 { break }
            if level == 1 || isLargeLeaf(value, level: level) { break }
            level -= 1
        }
        return result
    }
}

public struct GuestKernelError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
