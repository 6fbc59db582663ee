// Sub-page write permissions for EPT (SPP): Intel's format for write permissions finer than a page,
// as the ISE and the unmerged KVM series describe it (spec section 12.1; docs/SPP.md).
//
// Words used throughout: a *page* is a 4 KiB guest-physical page, the unit one EPT PTE maps; a
// *sub-page* is one of its 32 aligned 128-byte pieces, sub-page i holding page offsets
// 128*i ... 128*i + 127. SPP gives each sub-page its own write permission.
//
// How the processor uses it: a write through an EPT PTE (a 4 KiB leaf) whose bit 61 is set and whose
// W bit is clear does not fault at once; the processor walks the SPP table (SPPT) with the write's
// guest-physical address and lets the write through if every sub-page it touches is writable there.
// SPP only ever *adds* write permission to a page EPT made read-only; it never takes any away.

// MARK: The permission bitmap

/// The write permissions of the 32 sub-pages of one page: bit i set means sub-page i (page offsets
/// 128*i through 128*i + 127) is writable. This is the 32-bit form KVM's interface and storage use;
/// `SPPLeafEntry` is the form the hardware reads.
@frozen
public struct SubPageWriteMask: RawRepresentable, Hashable, Sendable, ExpressibleByIntegerLiteral {
    public var rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    @inlinable public init(integerLiteral value: UInt32) { self.rawValue = value }

    /// Bytes in a sub-page.
    @inlinable public static var subPageSize: UInt64 { 128 }
    /// log2 of `subPageSize`: a page offset shifted right by this is its sub-page index.
    @inlinable public static var subPageShift: UInt64 { 7 }
    /// Sub-pages in a page (4096 / 128).
    @inlinable public static var subPagesPerPage: Int { 32 }

    /// Every sub-page writable: what KVM stores for a page nobody protected (`FULL_SPP_ACCESS`).
    @inlinable public static var allWritable: SubPageWriteMask { SubPageWriteMask(0xFFFF_FFFF) }
    /// No sub-page writable: every write to the page is refused.
    @inlinable public static var noneWritable: SubPageWriteMask { SubPageWriteMask(0) }

    /// The sub-page holding `pageOffset` (taken modulo the page size).
    @inlinable
    public static func subPage(containing pageOffset: UInt64) -> Int {
        Int((pageOffset & pageOffsetMask) >> subPageShift)
    }

    /// Whether sub-page `subPage` is writable. There is no sub-page outside 0..<32, and so no
    /// permission: false.
    @inlinable
    public func isWritable(subPage: Int) -> Bool {
        guard subPage >= 0 && subPage < Self.subPagesPerPage else { return false }
        return rawValue & (1 << UInt32(subPage)) != 0
    }

    /// The sub-pages a write of `byteCount` bytes at `pageOffset` touches: every sub-page from the
    /// one holding its first byte to the one holding its last. A write of 0 bytes touches none.
    /// Allocation-free; the check of every SPP-armed write goes through here.
    @inlinable
    public static func subPagesTouched(byWriteAt pageOffset: UInt64, byteCount: UInt64)
        throws(SubPageWriteError) -> SubPageWriteMask {
        guard pageOffset < pageSize else { throw .offsetOutsidePage(pageOffset) }
        guard byteCount <= pageSize - pageOffset else {
            throw .crossesPageBoundary(pageOffset: pageOffset, byteCount: byteCount)
        }
        return subPagesTouched(byWriteWithinPageAt: pageOffset, byteCount: byteCount)
    }

    /// `subPagesTouched(byWriteAt:byteCount:)` for a write its caller knows lies in the page
    /// (`pageOffset + byteCount <= 4096`), without the checks: the TLB's hot path.
    @inlinable @inline(__always)
    static func subPagesTouched(byWriteWithinPageAt pageOffset: UInt64, byteCount: UInt64) -> SubPageWriteMask {
        guard byteCount > 0 else { return .noneWritable }
        // Masked to the page so that a caller's broken promise gives a wrong answer, never a trap:
        // the last byte's offset is then below 4096 and both sub-page indexes below 32, so both
        // shifts stay in range.
        let first = UInt32((pageOffset & pageOffsetMask) >> subPageShift)
        let last = UInt32(((pageOffset &+ byteCount &- 1) & pageOffsetMask) >> subPageShift)
        return SubPageWriteMask((UInt32.max >> (31 - last)) & (UInt32.max << first))
    }

    /// Whether this bitmap lets through a write its caller knows lies in the page
    /// (`pageOffset + byteCount <= 4096`): allocation- and check-free, for a TLB hit.
    @inlinable @inline(__always)
    public func permitsWriteWithinPage(atPageOffset pageOffset: UInt64, byteCount: UInt64) -> Bool {
        Self.subPagesTouched(byWriteWithinPageAt: pageOffset, byteCount: byteCount).rawValue & ~rawValue == 0
    }

    /// Whether this bitmap lets through a write of `byteCount` bytes at `pageOffset`: every
    /// sub-page the write touches must be writable (a write crossing a 128-byte boundary needs
    /// both sides).
    @inlinable
    public func permitsWrite(atPageOffset pageOffset: UInt64, byteCount: UInt64) throws(SubPageWriteError) -> Bool {
        try firstDeniedSubPage(forWriteAt: pageOffset, byteCount: byteCount) == nil
    }

    /// The lowest sub-page the write touches that is not writable, or nil when the write is
    /// allowed.
    @inlinable
    public func firstDeniedSubPage(forWriteAt pageOffset: UInt64, byteCount: UInt64) throws(SubPageWriteError) -> Int? {
        let denied = try Self.subPagesTouched(byWriteAt: pageOffset, byteCount: byteCount).rawValue & ~rawValue
        return denied == 0 ? nil : denied.trailingZeroBitCount
    }
}

extension SubPageWriteMask: CustomStringConvertible {
    public var description: String { hex(rawValue) }
}

/// A write an SPP check cannot take as given.
public enum SubPageWriteError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A page offset of 4096 or more.
    case offsetOutsidePage(UInt64)
    /// The write runs past the end of its page. Each page has its own EPT leaf and its own
    /// bitmap, so the write must be checked a page at a time (`PageSplitWrite`), as the processor
    /// splits it.
    case crossesPageBoundary(pageOffset: UInt64, byteCount: UInt64)
    /// The write would run past the top of the 64-bit address space.
    case addressOverflow(GuestPhysicalAddress, byteCount: UInt64)

    public var description: String {
        switch self {
        case .offsetOutsidePage(let offset): "page offset \(hex(offset)) lies outside a 4 KiB page"
        case .crossesPageBoundary(let offset, let count):
            "a write of \(count) bytes at page offset \(hex(offset)) crosses into the next page; check each page's part on its own"
        case .addressOverflow(let address, let count): "a write of \(count) bytes at \(address) wraps past 2^64"
        }
    }
}

/// One page's part of a guest-physical write.
public struct PageWritePiece: Hashable, Sendable {
    public var frame: GuestFrameNumber
    public var pageOffset: UInt64
    public var byteCount: UInt64

    @inlinable
    public init(frame: GuestFrameNumber, pageOffset: UInt64, byteCount: UInt64) {
        self.frame = frame
        self.pageOffset = pageOffset
        self.byteCount = byteCount
    }

    /// The guest-physical address of the piece's first byte.
    @inlinable public var address: GuestPhysicalAddress {
        GuestPhysicalAddress(frame.address.rawValue | pageOffset)
    }
}

/// A write of `byteCount` bytes at `address`, cut where it crosses a page boundary: the pieces SPP
/// checks one at a time, each against its own page's bitmap. Iterating allocates nothing.
public struct PageSplitWrite: Sequence, Sendable {
    public let address: GuestPhysicalAddress
    public let byteCount: UInt64

    /// - Throws: `.addressOverflow` when the write would wrap past 2^64.
    public init(address: GuestPhysicalAddress, byteCount: UInt64) throws(SubPageWriteError) {
        guard address.adding(byteCount) != nil else { throw .addressOverflow(address, byteCount: byteCount) }
        self.address = address
        self.byteCount = byteCount
    }

    public struct Iterator: IteratorProtocol, Sendable {
        var cursor: UInt64
        var remaining: UInt64

        public mutating func next() -> PageWritePiece? {
            guard remaining > 0 else { return nil }
            let offset = cursor & pageOffsetMask
            let count = Swift.min(remaining, pageSize - offset)
            let piece = PageWritePiece(frame: GuestPhysicalAddress(cursor).frame, pageOffset: offset, byteCount: count)
            // The constructor checked that address + byteCount does not wrap.
            cursor += count
            remaining -= count
            return piece
        }
    }

    public func makeIterator() -> Iterator { Iterator(cursor: address.rawValue, remaining: byteCount) }
}

// MARK: Table entries

/// An L1E, the leaf of the SPP table: the write permissions of one page's 32 sub-pages, sub-page i
/// at bit 2i. The odd bits are reserved and there is no present bit (every L1E is a leaf), which is
/// why KVM has to fill all 512 L1Es of a table at once.
@frozen
public struct SPPLeafEntry: PageTableEntry {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static var indexBitsPerLevel: Int { 9 }

    /// Bits 2i (i = 0..31): write permission of sub-page i.
    @inlinable public static var writePermissionBits: UInt64 { 0x5555_5555_5555_5555 }
    /// Bits 2i+1: reserved; one set makes the walk an SPPT misconfiguration.
    @inlinable public static var reservedBits: UInt64 { 0xAAAA_AAAA_AAAA_AAAA }

    @inlinable public var hasReservedBits: Bool { rawValue & Self.reservedBits != 0 }

    /// Whether the entry lets sub-page `subPage` be written (bit 2*subPage); false outside 0..<32.
    @inlinable
    public func allowsWrite(subPage: Int) -> Bool {
        guard subPage >= 0 && subPage < SubPageWriteMask.subPagesPerPage else { return false }
        return rawValue & (1 << UInt64(2 * subPage)) != 0
    }

    /// The bitmap-to-L1E conversion: bit i of `mask` becomes bit 2i of the entry, so the reserved
    /// odd bits stay clear. (The series' `format_spp_spte`.)
    @inlinable
    public init(spreading mask: SubPageWriteMask) {
        var bits: UInt64 = 0
        for subPage in 0..<SubPageWriteMask.subPagesPerPage where mask.isWritable(subPage: subPage) {
            bits |= 1 << UInt64(2 * subPage)
        }
        rawValue = bits
    }

    /// The L1E-to-bitmap conversion: bit 2i of the entry becomes bit i of the bitmap. The reserved
    /// odd bits are not permissions and are dropped; check `hasReservedBits` first.
    @inlinable
    public var gatheredWriteMask: SubPageWriteMask {
        var mask: UInt32 = 0
        for subPage in 0..<SubPageWriteMask.subPagesPerPage where allowsWrite(subPage: subPage) {
            mask |= 1 << UInt32(subPage)
        }
        return SubPageWriteMask(mask)
    }
}

/// An L4E, L3E or L2E of the SPP table: a pointer to the next table.
///
/// Bit 0: present. Bits 11:1: reserved. Bits MAXPHYADDR-1:12: the next table's physical address.
/// Bits 63:MAXPHYADDR: reserved.
@frozen
public struct SPPDirectoryEntry: PageTableEntry {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static var indexBitsPerLevel: Int { 9 }

    /// An entry pointing at the table at `nextTable` (4 KiB aligned).
    @inlinable
    public init(nextTable: UInt64) { rawValue = (nextTable & bitRange(12, 51)) | 1 }

    /// Bit 0. A walk that meets a clear one ends in an SPPT miss.
    @inlinable public var isPresent: Bool { rawValue & 1 != 0 }
    /// Bits 51:12 (bits at or above MAXPHYADDR are reserved, see `reservedBits`).
    @inlinable public var nextTableAddress: UInt64 { rawValue & bitRange(12, 51) }

    /// The reserved bits of a non-leaf entry on a processor with `maxPhysicalAddressBits`.
    @inlinable
    public static func reservedBits(maxPhysicalAddressBits: Int) -> UInt64 {
        bitRange(1, 11) | bitRange(maxPhysicalAddressBits, 63)
    }
}

extension SPPLeafEntry {
    /// The write mask in hex, then any reserved bits.
    public var description: String {
        var text = "L1E write " + gatheredWriteMask.description
        if hasReservedBits { text += " reserved=" + hex(rawValue & Self.reservedBits) }
        return text
    }
}

extension SPPDirectoryEntry {
    public var description: String {
        guard isPresent else { return "not present" }
        var text = "P next=" + hex(nextTableAddress)
        let low = rawValue & bitRange(1, 11), high = rawValue & bitRange(52, 63)
        if low | high != 0 { text += " reserved=" + hex(low | high) }
        return text
    }
}

// MARK: The pointer, the walk and the exits

/// SPPTP, the VMCS field SPPT_POINTER (encoding 0x2030): the physical address of the SPP table's
/// root, 4 KiB aligned.
@frozen
public struct SPPTablePointer: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    /// VMCS field encoding of SPPT_POINTER (the high half is 0x2031).
    public static let vmcsEncoding = 0x2030

    @inlinable public var rootAddress: UInt64 { rawValue & ~pageOffsetMask }
}

/// An SPPTP that VM entry would refuse.
public enum SPPTablePointerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Bits 11:0 set: the root must be 4 KiB aligned.
    case misaligned(UInt64)
    /// Bits at or above MAXPHYADDR set.
    case beyondPhysicalAddressWidth(UInt64, maxPhysicalAddressBits: Int)

    public var description: String {
        switch self {
        case .misaligned(let value): "SPPTP \(hex(value)) is not 4 KiB aligned"
        case .beyondPhysicalAddressWidth(let value, let bits):
            "SPPTP \(hex(value)) has bits set at or above MAXPHYADDR (\(bits))"
        }
    }
}

/// `EXIT_REASON_SPP` (66) and its exit qualification, for the two SPP-table exits.
@frozen
public struct SPPExitQualification: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The basic exit reason of an SPPT miss or an SPPT misconfiguration.
    @inlinable public static var exitReason: Int { 66 }

    /// Bit 11: set for an SPPT miss, clear for an SPPT misconfiguration.
    @inlinable public static var sppTableMiss: Self { Self(rawValue: 1 << 11) }
    /// Bit 12: NMI unblocking due to IRET (as for EPT violations).
    @inlinable public static var nmiUnblockingDueToIRET: Self { Self(rawValue: 1 << 12) }
}

/// Why an SPP-table walk gave no permissions.
public enum SPPTWalkFault: Error, Equatable, Sendable {
    /// A non-leaf entry (L4E, L3E or L2E, `level` 4, 3 or 2) was not present: an SPPT-miss VM exit.
    case miss(GuestPhysicalAddress, level: Int, path: WalkPath)
    /// A reserved bit was set in a present non-leaf entry or in the L1E (`level` 1): an
    /// SPPT-misconfiguration VM exit.
    case misconfiguration(GuestPhysicalAddress, level: Int, path: WalkPath)
    /// The table entry at `entryAddress` has no memory behind it.
    case noMemory(GuestPhysicalAddress, entryAddress: UInt64, level: Int)
    /// The address lies at or above 2^48, beyond what a 4-level SPP table indexes (only reachable
    /// with 5-level EPT). The model does not guess what a processor would do; KVM never arms SPP
    /// there (docs/SPP.md, "5-level EPT").
    case beyondReach(GuestPhysicalAddress)

    /// The exit qualification of the VM exit the fault is, or nil when it is none of the two SPP
    /// exits.
    @inlinable public var exitQualification: SPPExitQualification? {
        switch self {
        case .miss: .sppTableMiss
        case .misconfiguration: []
        case .noMemory, .beyondReach: nil
        }
    }
}

/// A successful SPP-table walk: the page's write bitmap and the entries read.
public struct SPPTLookup: Equatable, Sendable {
    public var writeMask: SubPageWriteMask
    public var leaf: SPPLeafEntry
    /// The entries read, level 4 down to the L1E at level 1.
    public var path: WalkPath

    @inlinable
    public init(writeMask: SubPageWriteMask, leaf: SPPLeafEntry, path: WalkPath) {
        self.writeMask = writeMask
        self.leaf = leaf
        self.path = path
    }
}

/// What the processor's SPP check decides for a write through an EPT leaf.
public enum SubPageWriteVerdict: Equatable, Sendable {
    /// SPP does not apply (not a 4 KiB leaf, bit 61 clear, or W set): EPT alone decides.
    case notApplicable
    /// Every sub-page the write touches is writable: the write goes through without an exit.
    case permitted
    /// A touched sub-page is write-protected (the lowest such one is given): an SPP-induced EPT
    /// violation.
    case denied(subPage: Int)
    /// The SPP-table walk failed: an SPPT-miss or -misconfiguration VM exit (or a model-only fault).
    case tableFault(SPPTWalkFault)
}

extension EPTEntry {
    /// Bit 61 (KVM's proposed `PT_SPP_MASK`): writes through this 4 KiB leaf consult the SPP table.
    @inlinable public static var subPagePermissionBit: UInt64 { 1 << 61 }

    /// Whether a write through this entry, the leaf of a walk at `level`, consults the SPP table:
    /// only a 4 KiB leaf (level 1) with bit 61 set and W clear. With W set the write is allowed
    /// anyway; in a 2 MiB or 1 GiB leaf bit 61 means nothing.
    @inlinable
    public func consultsSubPagePermissions(level: Int) -> Bool {
        level == 1 && isSubPageWritable && !isWritable
    }
}

/// Walks an SPP table: four levels, indexed like EPT by guest-physical address bits 47:39 (L4E),
/// 38:30 (L3E), 29:21 (L2E) and 20:12 (L1E).
///
/// The walk has its own short loop rather than the shared `walkTables`: its leaf level is fixed
/// and the leaf has no present bit, which the shared loop's questions do not fit.
public struct SPPTWalker: Sendable {
    public let pointer: SPPTablePointer
    public let maxPhysicalAddressBits: Int

    /// The number of levels. The SPPTP has no walk-length field, so the table has four levels
    /// whatever the EPT's depth.
    @inlinable public static var levels: Int { 4 }
    /// Guest-physical addresses below 2^`reachableAddressBits` have an L1E.
    @inlinable public static var reachableAddressBits: Int { 48 }

    /// - Throws: when VM entry would refuse `pointer` on a processor with `maxPhysicalAddressBits`
    ///   (clamped to 36...52).
    public init(pointer: SPPTablePointer, maxPhysicalAddressBits: Int = 46) throws(SPPTablePointerError) {
        let bits = min(max(maxPhysicalAddressBits, 36), 52)
        guard pointer.rawValue & pageOffsetMask == 0 else { throw .misaligned(pointer.rawValue) }
        guard pointer.rawValue & bitRange(bits, 63) == 0 else {
            throw .beyondPhysicalAddressWidth(pointer.rawValue, maxPhysicalAddressBits: bits)
        }
        self.pointer = pointer
        self.maxPhysicalAddressBits = bits
    }

    /// The write bitmap the table holds for the page of `address`.
    @inlinable
    public func lookUp<Memory: PhysicalMemory>(_ address: GuestPhysicalAddress, in memory: Memory)
        throws(SPPTWalkFault) -> SPPTLookup {
        guard address.rawValue >> UInt64(Self.reachableAddressBits) == 0 else { throw .beyondReach(address) }
        let directoryReserved = SPPDirectoryEntry.reservedBits(maxPhysicalAddressBits: maxPhysicalAddressBits)
        var path = WalkPath()
        var table = pointer.rootAddress
        var level = Self.levels
        while level > 1 {
            let entryAddress = table &+ Self.index(address, level: level) &* 8
            guard let entry = memory.readEntry(SPPDirectoryEntry.self, at: GuestPhysicalAddress(entryAddress)) else {
                throw .noMemory(address, entryAddress: entryAddress, level: level)
            }
            path.record(level: level, address: entryAddress, value: entry.rawValue)
            // Like every x86 table format, a clear present bit makes the other bits ignored.
            guard entry.isPresent else { throw .miss(address, level: level, path: path) }
            guard entry.rawValue & directoryReserved == 0 else {
                throw .misconfiguration(address, level: level, path: path)
            }
            table = entry.nextTableAddress
            level -= 1
        }
        // Tables are page aligned and below 2^52; an index below 512 of 8-byte entries stays inside
        // the table's page.
        let leafAddress = table &+ Self.index(address, level: 1) &* 8
        guard let leaf = memory.readEntry(SPPLeafEntry.self, at: GuestPhysicalAddress(leafAddress)) else {
            throw .noMemory(address, entryAddress: leafAddress, level: 1)
        }
        path.record(level: 1, address: leafAddress, value: leaf.rawValue)
        guard !leaf.hasReservedBits else { throw .misconfiguration(address, level: 1, path: path) }
        return SPPTLookup(writeMask: leaf.gatheredWriteMask, leaf: leaf, path: path)
    }

    /// The processor's SPP check of a write of `byteCount` bytes at `address` whose EPT walk ended
    /// at `leaf` at `level`. The write must lie in one page (split others with `PageSplitWrite`).
    @inlinable
    public func checkWrite<Memory: PhysicalMemory>(
        at address: GuestPhysicalAddress, byteCount: UInt64, leaf: EPTEntry, level: Int, in memory: Memory
    ) throws(SubPageWriteError) -> SubPageWriteVerdict {
        let touched = try SubPageWriteMask.subPagesTouched(byWriteAt: address.pageOffset, byteCount: byteCount)
        guard leaf.consultsSubPagePermissions(level: level) else { return .notApplicable }
        let lookup: SPPTLookup
        do {
            lookup = try lookUp(address, in: memory)
        } catch {
            return .tableFault(error)
        }
        let denied = touched.rawValue & ~lookup.writeMask.rawValue
        return denied == 0 ? .permitted : .denied(subPage: denied.trailingZeroBitCount)
    }

    /// The entry index at `level` for `address`: 9 bits a level above the 12-bit page offset.
    @inlinable
    static func index(_ address: GuestPhysicalAddress, level: Int) -> UInt64 {
        (address.rawValue >> UInt64(pageShift + (level - 1) * 9)) & 0x1FF
    }
}
