// Enumerating an address space: every leaf a walk can reach, with permissions combined over the
// levels, coalesced into runs. The same formats and reserved-bit rules as the walker decide what is
// reachable, so `maps` and `walk` can never disagree.

/// A run of virtually and physically contiguous pages with equal attributes.
public struct Mapping: Sendable, Equatable {
    public var linearAddress: GuestVirtualAddress
    public var physicalAddress: GuestPhysicalAddress
    /// Bytes covered by the run.
    public var size: UInt64
    /// The size of each page in the run.
    public var pageSize: UInt64
    /// Combined ACC bits (1 execute, 2 write, 4 user).
    public var permissions: UInt8
    public var protectionKey: Int
    public var isGlobal: Bool

    @inlinable
    public init(linearAddress: GuestVirtualAddress, physicalAddress: GuestPhysicalAddress, size: UInt64, pageSize: UInt64,
                permissions: UInt8, protectionKey: Int, isGlobal: Bool) {
        self.linearAddress = linearAddress
        self.physicalAddress = physicalAddress
        self.size = size
        self.pageSize = pageSize
        self.permissions = permissions
        self.protectionKey = protectionKey
        self.isGlobal = isGlobal
    }

    public var isWritable: Bool { permissions & accessWrite != 0 }
    public var isUser: Bool { permissions & accessUser != 0 }
    public var isExecutable: Bool { permissions & accessExecute != 0 }

    /// Whether `next` continues this run.
    @inlinable
    func isContinued(by next: Mapping) -> Bool {
        linearAddress.rawValue &+ size == next.linearAddress.rawValue
            && physicalAddress.rawValue &+ size == next.physicalAddress.rawValue
            && pageSize == next.pageSize && permissions == next.permissions
            && protectionKey == next.protectionKey && isGlobal == next.isGlobal
    }
}

/// What an enumeration found besides mappings.
public struct AddressSpaceSummary: Sendable, Equatable {
    /// Leaf pages visited (before coalescing).
    public var leafPages: UInt64 = 0
    /// Present entries skipped because reserved bits are set (a walk through them faults).
    public var reservedEntries: UInt64 = 0
    /// Table pointers to guest-physical memory with nothing behind it.
    public var unbackedTables: UInt64 = 0
    /// True when the run or work limit stopped the enumeration early.
    public var truncated: Bool = false
}

extension PageWalker {
    /// Every present mapping, coalesced, in ascending linear-address order (the upper canonical
    /// half after the lower). Stops after `maxRuns` runs or `maxEntries` entries examined, so a
    /// hostile table layout (every entry aliasing the same tables) cannot make it run for hours.
    @inlinable
    public func mappings<Memory: PhysicalMemory>(in memory: Memory, maxRuns: Int = 1_000_000,
                                                 maxEntries: UInt64 = 1 << 31) -> (runs: [Mapping], summary: AddressSpaceSummary) {
        var enumerator = MappingEnumerator(walker: self, memory: memory, maxRuns: maxRuns, maxEntries: maxEntries)
        enumerator.run()
        enumerator.flush()
        return (enumerator.runs, enumerator.summary)
    }
}

@usableFromInline
struct MappingEnumerator<Memory: PhysicalMemory> {
    @usableFromInline let walker: PageWalker
    @usableFromInline let memory: Memory
    @usableFromInline let maxRuns: Int
    @usableFromInline let maxEntries: UInt64
    @usableFromInline var runs: [Mapping] = []
    @usableFromInline var pending: Mapping?
    @usableFromInline var summary = AddressSpaceSummary()
    @usableFromInline var entriesExamined: UInt64 = 0
    /// Tables (address and level) already found to hold no reachable leaf: aliases of them are
    /// skipped, which keeps aliased empty tables from costing 512^levels steps.
    @usableFromInline var emptyTables = Set<UInt64>()

    @inlinable init(walker: PageWalker, memory: Memory, maxRuns: Int, maxEntries: UInt64) {
        self.walker = walker
        self.memory = memory
        self.maxRuns = maxRuns
        self.maxEntries = maxEntries
    }

    @usableFromInline var isStopped: Bool { summary.truncated }

    @inlinable mutating func run() {
        switch walker.mode {
        case .disabled:
            emit(Mapping(linearAddress: GuestVirtualAddress(0), physicalAddress: GuestPhysicalAddress(0), size: 1 << 32,
                         pageSize: 1 << 32, permissions: accessAll, protectionKey: 0, isGlobal: false))
        case .legacy32:
            _ = visit(walker.legacy32, table: walker.rootTable, level: 2, base: 0, permissions: accessAll)
        case .pae:
            for index in 0..<4 where !isStopped {
                let pdpte = walker.pdpte(index)
                guard pdpte.isPresent else { continue }
                _ = visit(walker.long64, table: pdpte.frameAddress, level: 2, base: UInt64(index) << 30,
                          permissions: accessAll)
            }
        case .fourLevel, .fiveLevel:
            _ = visit(walker.long64, table: walker.rootTable, level: walker.mode.rootLevel, base: 0,
                      permissions: accessAll)
        }
    }

    /// Visits one table; returns whether it holds any reachable leaf.
    @inlinable mutating func visit<Format: PagingFormat>(_ format: Format, table: UInt64, level: Int, base: UInt64,
                                              permissions: UInt8) -> Bool {
        let key = table << 3 | UInt64(level)
        if emptyTables.contains(key) { return false }
        let bits = Format.Entry.indexBitsPerLevel
        let span = UInt64(1) << UInt64(pageShift + (level - 1) * bits)
        var found = false
        for index in 0..<(1 << bits) {
            if isStopped { return true }
            entriesExamined += 1
            if entriesExamined > maxEntries { summary.truncated = true; return true }
            let entryAddress = GuestPhysicalAddress(table + UInt64(index * Format.Entry.size))
            guard let entry = memory.readEntry(Format.Entry.self, at: entryAddress) else {
                summary.unbackedTables += 1
                return true  // not empty: unknown, so never memoised as empty
            }
            guard format.isPresent(entry) else { continue }
            if format.hasReservedBits(entry, level: level) { summary.reservedEntries += 1; continue }
            let combined = permissions & format.permissions(entry)
            let linear = base | UInt64(index) * span
            if format.isLeaf(entry, level: level) {
                found = true
                summary.leafPages += 1
                let leafBits = entry.bits
                emit(Mapping(linearAddress: GuestVirtualAddress(canonical(linear)),
                             physicalAddress: GuestPhysicalAddress(format.pageBase(entry, level: level)),
                             size: span, pageSize: span, permissions: combined,
                             protectionKey: walker.mode.isLongMode ? Int((leafBits >> 59) & 0xF) : 0,
                             isGlobal: walker.globalPagesEnabled && leafBits & x86GlobalBit != 0))
            } else if visit(format, table: format.nextTableAddress(entry), level: level - 1, base: linear,
                            permissions: combined) {
                found = true
            }
        }
        if !found { emptyTables.insert(key) }
        return found
    }

    @inlinable func canonical(_ linear: UInt64) -> UInt64 {
        guard walker.mode.isLongMode else { return linear }
        let shift = UInt64(64 - walker.mode.linearAddressWidth)
        return UInt64(bitPattern: Int64(bitPattern: linear << shift) >> shift)
    }

    @inlinable mutating func emit(_ mapping: Mapping) {
        if var current = pending, current.isContinued(by: mapping) {
            current.size += mapping.size
            pending = current
            return
        }
        flush()
        if runs.count >= maxRuns { summary.truncated = true; return }
        pending = mapping
    }

    @inlinable mutating func flush() {
        if let current = pending { runs.append(current) }
        pending = nil
    }
}
