// The level loop shared by every walker: x86 32-bit, x86 64-bit and EPT tables are walked by this
// one generic function (KVM's paging_tmpl.h is a template for the same reason); the formats differ
// only in the questions a `PagingFormat` answers.

/// The entries a walk read, by level, in flat inline storage (a walk allocates nothing).
@frozen
public struct WalkPath: Sendable, Equatable {
    @usableFromInline var addresses = InlineArray<5, UInt64>(repeating: 0)
    @usableFromInline var values = InlineArray<5, UInt64>(repeating: 0)
    @usableFromInline var top: Int = 0
    @usableFromInline var bottom: Int = 0
    /// Nonzero when the top entry is a register. A full word rather than a Bool: a struct with a
    /// one-byte tail gets its neighbours packed into the tail padding, and copying such results
    /// out of a walk stalled on store forwarding.
    @usableFromInline var registerTop: Int = 0

    @inlinable var topFromRegister: Bool {
        get { registerTop != 0 }
        set { registerTop = newValue ? 1 : 0 }
    }

    /// The level of the first entry read (the root table's level), 0 when nothing was read.
    @inlinable public var topLevel: Int { top }
    /// The level of the last entry read.
    @inlinable public var bottomLevel: Int { bottom }
    /// True when the top entry is a PAE PDPTE register rather than an entry read from memory.
    @inlinable public var topIsRegister: Bool { topFromRegister }

    @inlinable public init() {}

    public static func == (a: WalkPath, b: WalkPath) -> Bool {
        guard a.topLevel == b.topLevel, a.bottomLevel == b.bottomLevel, a.topIsRegister == b.topIsRegister
        else { return false }
        return a.levels.allSatisfy { a.entryAddress(level: $0) == b.entryAddress(level: $0)
            && a.entryValue(level: $0) == b.entryValue(level: $0) }
    }

    @inlinable @inline(__always)
    mutating func record(level: Int, address: UInt64, value: UInt64) {
        if top == 0 { top = level }
        bottom = level
        addresses[level - 1] = address
        values[level - 1] = value
    }

    @inlinable
    mutating func updateValue(level: Int, _ value: UInt64) {
        values[level - 1] = value
    }

    /// The levels read, top first.
    public var levels: [Int] {
        topLevel == 0 ? [] : Array(stride(from: topLevel, through: bottomLevel, by: -1))
    }

    /// Where the entry at `level` was read from (for a PDPTE register: where it was loaded from).
    @inlinable
    public func entryAddress(level: Int) -> GuestPhysicalAddress {
        GuestPhysicalAddress(addresses[level - 1])
    }

    /// The raw entry at `level`, widened to 64 bits.
    @inlinable
    public func entryValue(level: Int) -> UInt64 {
        values[level - 1]
    }
}

/// What a table format answers for the shared level loop. Implementations are tiny and
/// `@inlinable` so the loop specialises into straight-line code per format.
public protocol PagingFormat {
    associatedtype Entry: PageTableEntry
    func isPresent(_ entry: Entry) -> Bool
    /// Reserved bits set (x86: a RSVD page fault; EPT: a misconfiguration).
    func hasReservedBits(_ entry: Entry, level: Int) -> Bool
    /// The entry maps a page rather than pointing at a table.
    func isLeaf(_ entry: Entry, level: Int) -> Bool
    /// The entry's permissions as KVM's ACC bits (1 exec, 2 write, 4 user or, for EPT, read),
    /// which AND together across levels.
    func permissions(_ entry: Entry) -> UInt8
    func nextTableAddress(_ entry: Entry) -> UInt64
    /// The physical base of the page a leaf at `level` maps.
    func pageBase(_ entry: Entry, level: Int) -> UInt64
    /// The accessed and dirty bits, or 0 when the format does not use them.
    var accessedBit: UInt64 { get }
    var dirtyBit: UInt64 { get }
}

extension PagingFormat {
    /// Bytes of address covered by a leaf at `level`.
    @inlinable @inline(__always)
    public static func pageSize(level: Int) -> UInt64 {
        1 << UInt64(pageShift + (level - 1) * Entry.indexBitsPerLevel)
    }
}

/// Where the level loop stopped.
@usableFromInline
enum TableWalkStop: Equatable {
    case leaf(level: Int)
    case notPresent(level: Int)
    case reservedBits(level: Int)
    /// The table entry at this address has no memory behind it.
    case noMemory(address: UInt64, level: Int)
}

/// Walks from the table at `table` (level `level`) down to a leaf, recording every entry read in
/// `path` and ANDing the entries' permissions into `permissions`.
@inlinable @inline(__always)
func walkTables<Format: PagingFormat, Memory: PhysicalMemory>(
    _ format: Format, table rootTable: UInt64, level startLevel: Int, address: UInt64,
    memory: Memory, path: inout WalkPath, permissions: inout UInt8
) -> TableWalkStop {
    let bitsPerLevel = Format.Entry.indexBitsPerLevel
    let indexMask: UInt64 = (1 << UInt64(bitsPerLevel)) - 1
    var table = rootTable
    var level = startLevel
    while true {
        let index = (address >> UInt64(pageShift + (level - 1) * bitsPerLevel)) & indexMask
        // Table addresses are page aligned and below 2^52, so adding an index < 1024 entries of
        // at most 8 bytes stays inside the table's page and cannot overflow.
        let entryAddress = table &+ index &* UInt64(Format.Entry.size)
        guard let entry = memory.readEntry(Format.Entry.self, at: GuestPhysicalAddress(entryAddress)) else {
            return .noMemory(address: entryAddress, level: level)
        }
        path.record(level: level, address: entryAddress, value: entry.bits)
        permissions &= format.permissions(entry)
        if !format.isPresent(entry) { return .notPresent(level: level) }
        if format.hasReservedBits(entry, level: level) { return .reservedBits(level: level) }
        if format.isLeaf(entry, level: level) { return .leaf(level: level) }
        table = format.nextTableAddress(entry)
        level -= 1
    }
}

/// Sets A on every entry of a successful walk and D on the leaf of a write, as KVM's
/// `update_accessed_dirty_bits` does. Returns false when an entry changed under the walk, in which
/// case the caller walks again. Entries in read-only memory are left alone.
@inlinable
func setAccessedDirty<Format: PagingFormat, Memory: PhysicalMemory>(
    _ format: Format, path: inout WalkPath, isWrite: Bool, memory: Memory
) -> Bool {
    let accessed = format.accessedBit
    guard accessed != 0 else { return true }
    let firstMemoryLevel = path.topIsRegister ? path.topLevel - 1 : path.topLevel
    var level = firstMemoryLevel
    while level >= path.bottomLevel {
        let old = path.entryValue(level: level)
        var new = old | accessed
        if level == path.bottomLevel && isWrite { new |= format.dirtyBit }
        if new != old {
            let exchanged = memory.compareExchangeEntry(
                at: path.entryAddress(level: level),
                expected: Format.Entry(bits: old), desired: Format.Entry(bits: new))
            if exchanged == false { return false }
            if exchanged == true { path.updateValue(level: level, new) }
        }
        level -= 1
    }
    return true
}

/// Whether `setAccessedDirty` would change an entry of `path`: an entry read from memory lacks A,
/// or the leaf of a write lacks D (never for a format without them). A walk that finds nothing
/// to set skips the call.
@inlinable @inline(__always)
func hasAccessedDirtyToSet<Format: PagingFormat>(_ format: Format, path: WalkPath, isWrite: Bool) -> Bool {
    let accessed = format.accessedBit
    guard accessed != 0 else { return false }
    var all = UInt64.max
    var level = path.topIsRegister ? path.topLevel - 1 : path.topLevel
    while level >= path.bottomLevel {
        all &= path.entryValue(level: level)
        level -= 1
    }
    if all & accessed == 0 { return true }
    return isWrite && path.entryValue(level: path.bottomLevel) & format.dirtyBit == 0
}
