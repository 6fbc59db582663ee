// Paging-structure entry formats (SDM vol. 3, 4.3-4.5 and 29.3.2), each a struct over its raw bits.

/// A paging-structure entry: one raw word of a format's width with named accessors.
public protocol PageTableEntry: Hashable, Sendable, CustomStringConvertible {
    associatedtype RawValue: FixedWidthInteger & UnsignedInteger & Sendable
    init(rawValue: RawValue)
    var rawValue: RawValue { get }
    /// Entries per table is `1 << indexBitsPerLevel`.
    static var indexBitsPerLevel: Int { get }
}

extension PageTableEntry {
    /// The entry's width in bytes.
    @inlinable public static var size: Int { MemoryLayout<RawValue>.size }
    /// The raw value widened to 64 bits.
    @inlinable public var bits: UInt64 { UInt64(truncatingIfNeeded: rawValue) }
    @inlinable public init(bits: UInt64) { self.init(rawValue: RawValue(truncatingIfNeeded: bits)) }
}

// Bit positions shared by the x86 formats (KVM's PT_*_MASK).
@usableFromInline let x86PresentBit: UInt64 = 1 << 0
@usableFromInline let x86WritableBit: UInt64 = 1 << 1
@usableFromInline let x86UserBit: UInt64 = 1 << 2
@usableFromInline let x86AccessedBit: UInt64 = 1 << 5
@usableFromInline let x86DirtyBit: UInt64 = 1 << 6
@usableFromInline let x86PageSizeBit: UInt64 = 1 << 7
@usableFromInline let x86GlobalBit: UInt64 = 1 << 8
@usableFromInline let x86NoExecuteBit: UInt64 = 1 << 63

/// A 32-bit paging entry (4 bytes, 1024 per table).
@frozen
public struct Legacy32Entry: PageTableEntry {
    public var rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    @inlinable public static var indexBitsPerLevel: Int { 10 }

    /// P, bit 0.
    @inlinable public var isPresent: Bool { bits & x86PresentBit != 0 }
    /// R/W, bit 1.
    @inlinable public var isWritable: Bool { bits & x86WritableBit != 0 }
    /// U/S, bit 2.
    @inlinable public var isUser: Bool { bits & x86UserBit != 0 }
    /// A, bit 5.
    @inlinable public var isAccessed: Bool { bits & x86AccessedBit != 0 }
    /// D, bit 6 (leaf entries).
    @inlinable public var isDirty: Bool { bits & x86DirtyBit != 0 }
    /// PS, bit 7, in a PDE (a 4 MiB page when CR4.PSE=1); PAT in a PTE.
    @inlinable public var isPageSize: Bool { bits & x86PageSizeBit != 0 }
    /// G, bit 8 (leaf entries).
    @inlinable public var isGlobal: Bool { bits & x86GlobalBit != 0 }
    /// Bits 31:12: the next table or the 4 KiB frame.
    @inlinable public var frameAddress: UInt64 { bits & 0xFFFF_F000 }
    /// PSE-36/40: PDE bits 20:13 hold physical-address bits 39:32 of a 4 MiB page.
    @inlinable public func largePageAddress(highAddressBits: Int) -> UInt64 {
        let high = (bits >> 13) & ((1 << UInt64(highAddressBits)) - 1)
        return (bits & 0xFFC0_0000) | (high << 32)
    }
}

/// A 64-bit entry of PAE, 4-level or 5-level paging (8 bytes, 512 per table).
@frozen
public struct Entry64: PageTableEntry {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static var indexBitsPerLevel: Int { 9 }

    @inlinable public var isPresent: Bool { rawValue & x86PresentBit != 0 }
    @inlinable public var isWritable: Bool { rawValue & x86WritableBit != 0 }
    @inlinable public var isUser: Bool { rawValue & x86UserBit != 0 }
    @inlinable public var isAccessed: Bool { rawValue & x86AccessedBit != 0 }
    @inlinable public var isDirty: Bool { rawValue & x86DirtyBit != 0 }
    /// PS, bit 7: a 2 MiB (PDE) or 1 GiB (PDPTE) page; PAT in a 4 KiB PTE.
    @inlinable public var isPageSize: Bool { rawValue & x86PageSizeBit != 0 }
    @inlinable public var isGlobal: Bool { rawValue & x86GlobalBit != 0 }
    /// XD, bit 63 (reserved unless EFER.NXE).
    @inlinable public var isNoExecute: Bool { rawValue & x86NoExecuteBit != 0 }
    /// Bits 62:59, the protection key of a leaf in IA-32e paging.
    @inlinable public var protectionKey: Int { Int((rawValue >> 59) & 0xF) }
    /// Bits 51:12.
    @inlinable public var frameAddress: UInt64 { rawValue & bitRange(12, 51) }
}

/// An EPT paging-structure entry (SDM 29.3.2; 8 bytes, 512 per table).
@frozen
public struct EPTEntry: PageTableEntry {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static var indexBitsPerLevel: Int { 9 }

    /// Bit 0: read access.
    @inlinable public var isReadable: Bool { rawValue & 1 != 0 }
    /// Bit 1: write access.
    @inlinable public var isWritable: Bool { rawValue & 2 != 0 }
    /// Bit 2: execute access (supervisor-mode execute with mode-based execute control).
    @inlinable public var isExecutable: Bool { rawValue & 4 != 0 }
    /// An entry is present when any of bits 2:0 is set.
    @inlinable public var isPresent: Bool { rawValue & 7 != 0 }
    /// Bits 5:3 of a leaf: the EPT memory type (0 UC, 1 WC, 4 WT, 5 WP, 6 WB; 2, 3, 7 reserved).
    @inlinable public var memoryType: Int { Int((rawValue >> 3) & 7) }
    /// Bit 6 of a leaf: ignore PAT.
    @inlinable public var ignoresPAT: Bool { rawValue & (1 << 6) != 0 }
    /// Bit 7: the entry maps a 2 MiB (PDE) or 1 GiB (PDPTE) page.
    @inlinable public var isPageSize: Bool { rawValue & (1 << 7) != 0 }
    /// Bit 8: accessed (with EPTP bit 6 set).
    @inlinable public var isAccessed: Bool { rawValue & (1 << 8) != 0 }
    /// Bit 9: dirty, leaf only (with EPTP bit 6 set).
    @inlinable public var isDirty: Bool { rawValue & (1 << 9) != 0 }
    /// Bit 10: user-mode execute with mode-based execute control.
    @inlinable public var isUserExecutable: Bool { rawValue & (1 << 10) != 0 }
    /// Bit 61: sub-page write permissions apply (SPP; never merged upstream).
    @inlinable public var isSubPageWritable: Bool { rawValue & (1 << 61) != 0 }
    /// Bit 63: suppress #VE.
    @inlinable public var suppressesVE: Bool { rawValue & (1 << 63) != 0 }
    /// Bits 51:12.
    @inlinable public var frameAddress: UInt64 { rawValue & bitRange(12, 51) }
}

extension Legacy32Entry {
    public var description: String {
        guard isPresent else { return "not present" }
        var flags = ["P", isWritable ? "RW" : "RO", isUser ? "U" : "S"]
        if bits & (1 << 3) != 0 { flags.append("PWT") }
        if bits & (1 << 4) != 0 { flags.append("PCD") }
        if isAccessed { flags.append("A") }
        if isDirty { flags.append("D") }
        if isPageSize { flags.append("PS") }
        if isGlobal { flags.append("G") }
        return flags.joined(separator: " ") + " addr=" + hex(frameAddress)
    }
}

extension Entry64 {
    public var description: String {
        guard isPresent else { return "not present" }
        var flags = ["P", isWritable ? "RW" : "RO", isUser ? "U" : "S"]
        if rawValue & (1 << 3) != 0 { flags.append("PWT") }
        if rawValue & (1 << 4) != 0 { flags.append("PCD") }
        if isAccessed { flags.append("A") }
        if isDirty { flags.append("D") }
        if isPageSize { flags.append("PS") }
        if isGlobal { flags.append("G") }
        if isNoExecute { flags.append("NX") }
        if protectionKey != 0 { flags.append("PKEY=\(protectionKey)") }
        return flags.joined(separator: " ") + " addr=" + hex(frameAddress)
    }
}

extension EPTEntry {
    public var description: String {
        guard isPresent else { return "not present" }
        var flags = [
            (isReadable ? "R" : "-") + (isWritable ? "W" : "-") + (isExecutable ? "X" : "-"),
            "MT=\(memoryType)",
        ]
        if ignoresPAT { flags.append("IPAT") }
        if isPageSize { flags.append("PS") }
        if isAccessed { flags.append("A") }
        if isDirty { flags.append("D") }
        if isUserExecutable { flags.append("UX") }
        if isSubPageWritable { flags.append("SPP") }
        if suppressesVE { flags.append("SVE") }
        return flags.joined(separator: " ") + " addr=" + hex(frameAddress)
    }
}
