// Typed addresses and frame numbers. A guest-virtual, guest-physical and host-physical address are
// different things; mixing them up is the classic MMU bug, so they do not convert implicitly and have
// no arithmetic across kinds.

/// The size of the base page, 4 KiB.
public let pageShift = 12
public let pageSize: UInt64 = 1 << 12
public let pageOffsetMask: UInt64 = pageSize - 1

/// A guest-virtual (linear) address.
@frozen
public struct GuestVirtualAddress: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// The byte offset inside the 4 KiB page.
    @inlinable public var pageOffset: UInt64 { rawValue & pageOffsetMask }

    /// The index into the page table at `level` (1 = PT) for tables of `1 << bitsPerLevel` entries.
    @inlinable
    public func tableIndex(level: Int, bitsPerLevel: Int) -> Int {
        Int(truncatingIfNeeded: (rawValue >> UInt64(pageShift + (level - 1) * bitsPerLevel))
            & ((1 << UInt64(bitsPerLevel)) - 1))
    }

    /// Whether bits 63:`width` all equal bit `width`-1 (the x86 canonical-address rule for a
    /// `width`-bit linear address space: 48 with 4-level paging, 57 with 5-level paging).
    @inlinable @inline(__always)
    public func isCanonical(width: Int) -> Bool {
        let shift = UInt64(64 - width)
        return UInt64(bitPattern: Int64(bitPattern: rawValue << shift) >> shift) == rawValue
    }
}

/// A guest-physical address.
@frozen
public struct GuestPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    @inlinable public var frame: GuestFrameNumber { GuestFrameNumber(rawValue >> UInt64(pageShift)) }
    @inlinable public var pageOffset: UInt64 { rawValue & pageOffsetMask }

    /// `self + bytes`, or nil when the sum wraps past 2^64.
    @inlinable
    public func adding(_ bytes: UInt64) -> GuestPhysicalAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(bytes)
        return overflow ? nil : GuestPhysicalAddress(sum)
    }
}

/// A host-physical address: what an SPTE or a TDP entry points at.
@frozen
public struct HostPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    @inlinable public var frame: HostFrameNumber { HostFrameNumber(rawValue >> UInt64(pageShift)) }
}

/// A guest frame number (gfn): a guest-physical address shifted right by 12.
@frozen
public struct GuestFrameNumber: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// The address of the frame's first byte. Frame numbers come from at most 52-bit addresses,
    /// so the shift cannot lose bits for any frame built from an address.
    @inlinable public var address: GuestPhysicalAddress { GuestPhysicalAddress(rawValue << UInt64(pageShift)) }
}

/// A host frame number (pfn).
@frozen
public struct HostFrameNumber: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    @inlinable public var address: HostPhysicalAddress { HostPhysicalAddress(rawValue << UInt64(pageShift)) }
}

extension GuestVirtualAddress: CustomStringConvertible {
    public var description: String { hex(rawValue) }
}
extension GuestPhysicalAddress: CustomStringConvertible {
    public var description: String { hex(rawValue) }
}
extension HostPhysicalAddress: CustomStringConvertible {
    public var description: String { hex(rawValue) }
}
extension GuestFrameNumber: CustomStringConvertible {
    public var description: String { "gfn " + hex(rawValue) }
}
extension HostFrameNumber: CustomStringConvertible {
    public var description: String { "pfn " + hex(rawValue) }
}

/// `0x`-prefixed lowercase hexadecimal, the form every report and JSON line uses.
public func hex<T: BinaryInteger>(_ value: T) -> String {
    "0x" + String(value, radix: 16)
}

/// The mask of bits `low` through `high` inclusive (KVM's `rsvd_bits`); 0 when `high < low`.
@inlinable @inline(__always)
public func bitRange(_ low: Int, _ high: Int) -> UInt64 {
    guard high >= low else { return 0 }
    let width = high - low + 1
    let ones: UInt64 = width >= 64 ? ~0 : (1 << UInt64(width)) - 1
    return ones << UInt64(low)
}
