// The two x86 guest table formats, with the reserved-bit masks of SDM 4.3-4.5 computed once per
// control-register state (KVM's `rsvd_bits_mask[2][5]`, indexed by bit 7 and level).

/// Reserved-bit masks indexed by (bit 7 of the entry, level 1...5).
///
/// The table lives in a class instance that owns a flat buffer: an element is then one load,
/// while a table stored inline in a struct (a tuple or an `InlineArray`) was copied onto the stack
/// at every level of a walk before being indexed (measured: an 80-byte copy per level).
@frozen
public struct ReservedBitMasks: @unchecked Sendable, Equatable {
    @usableFromInline
    final class Table: @unchecked Sendable {
        /// Ten masks: bit 7 clear at levels 1...5, then bit 7 set at levels 1...5. Written only
        /// while the owning `ReservedBitMasks` is being built (copy on write), then immutable.
        @usableFromInline let masks: UnsafeMutablePointer<UInt64>

        @usableFromInline init(copying source: UnsafePointer<UInt64>?) {
            masks = .allocate(capacity: 10)
            if let source { masks.initialize(from: source, count: 10) } else { masks.initialize(repeating: 0, count: 10) }
        }

        deinit { masks.deallocate() }
    }

    @usableFromInline var table = Table(copying: nil)
    /// `table.masks`, kept beside the reference so a lookup is one dependent load, not two.
    /// (Unchecked Sendable: the buffer is immutable once built, and owned by `table`.)
    @usableFromInline var masks: UnsafePointer<UInt64>

    public init() { masks = UnsafePointer(table.masks) }

    public static func == (a: Self, b: Self) -> Bool {
        (0..<10).allSatisfy { a.masks[$0] == b.masks[$0] }
    }

    @inlinable @inline(__always)
    public func mask(pageSize: Bool, level: Int) -> UInt64 {
        masks[(pageSize ? 5 : 0) &+ level &- 1]
    }

    /// The mask for an entry with bit 7 clear and one with bit 7 set.
    public mutating func set(level: Int, table tableMask: UInt64, page pageMask: UInt64) {
        if !isKnownUniquelyReferenced(&table) {
            table = Table(copying: table.masks)
            masks = UnsafePointer(table.masks)
        }
        table.masks[level - 1] = tableMask
        table.masks[5 + level - 1] = pageMask
    }

    /// The mask that applies to `bits` at `level`.
    @inlinable
    public func mask(for bits: UInt64, level: Int) -> UInt64 {
        mask(pageSize: bits & x86PageSizeBit != 0, level: level)
    }
}

/// 32-bit paging: 4-byte entries; PS honoured only in a PDE and only with CR4.PSE.
@frozen
public struct Legacy32Format: PagingFormat {
    public typealias Entry = Legacy32Entry
    public let pageSizeExtensions: Bool
    /// Physical-address bits above 31 that a 4 MiB PDE can carry (PSE-36/40).
    public let highAddressBits: Int
    @usableFromInline let largePageReserved: UInt64

    public init(cr4: CR4, cpu: CPUModel) {
        pageSizeExtensions = cr4.contains(.pageSizeExtensions)
        highAddressBits = cpu.pse36HighAddressBits
        // SDM Table 4-4: PDE bits 20:13 carry PA bits 39:32 up to MAXPHYADDR; bit 21 and the
        // address bits above MAXPHYADDR are reserved. (KVM reserves 21:17, modelling only
        // PSE-36; the SDM says more bits are addresses on wider CPUs, and the SDM wins.)
        largePageReserved = bitRange(13 + highAddressBits, 21)
    }

    @inlinable public func isPresent(_ entry: Entry) -> Bool { entry.isPresent }
    @inlinable public func hasReservedBits(_ entry: Entry, level: Int) -> Bool {
        isLeaf(entry, level: level) && level == 2 && entry.bits & largePageReserved != 0
    }
    @inlinable public func isLeaf(_ entry: Entry, level: Int) -> Bool {
        level == 1 || (pageSizeExtensions && entry.isPageSize)
    }
    /// 32-bit entries have no NX bit: every present entry is executable.
    @inlinable public func permissions(_ entry: Entry) -> UInt8 {
        UInt8(truncatingIfNeeded: entry.bits & (x86WritableBit | x86UserBit)) | accessExecute
    }
    @inlinable public func nextTableAddress(_ entry: Entry) -> UInt64 { entry.frameAddress }
    @inlinable public func pageBase(_ entry: Entry, level: Int) -> UInt64 {
        level == 1 ? entry.frameAddress : entry.largePageAddress(highAddressBits: highAddressBits)
    }
    @inlinable public var accessedBit: UInt64 { x86AccessedBit }
    @inlinable public var dirtyBit: UInt64 { x86DirtyBit }
}

/// PAE, 4-level and 5-level paging: 8-byte entries, PS terminating at any level above 1 (where
/// it is illegal the reserved masks catch it, as in KVM).
@frozen
public struct Long64Format: PagingFormat {
    public typealias Entry = Entry64
    public let reserved: ReservedBitMasks
    public let noExecuteEnabled: Bool

    public init(mode: PagingMode, efer: EFER, cpu: CPUModel) {
        noExecuteEnabled = efer.contains(.noExecuteEnable)
        var masks = ReservedBitMasks()
        // Address bits at or above MAXPHYADDR. PAE entries have no protection-key or ignored high
        // bits: 62:MAXPHYADDR are all reserved there (SDM Tables 4-8..4-11).
        var high = mode == .pae ? bitRange(cpu.maxPhysicalAddressBits, 62) : cpu.reservedPhysicalAddressBits
        if !noExecuteEnabled { high |= x86NoExecuteBit }
        let noGigabytePages = cpu.supports1GiBPages ? 0 : x86PageSizeBit
        // AMD reserves bit 8 of non-leaf PML4Es and PML5Es (KVM's `nonleaf_bit8_rsvd`).
        let amdBit8: UInt64 = cpu.vendor == .amd ? 1 << 8 : 0
        masks.set(level: 1, table: high, page: high)
        masks.set(level: 2, table: high, page: high | bitRange(13, 20))
        if mode == .pae {
            // PDPTEs are registers, checked when CR3 is loaded (`pdpteReservedBits`).
        } else {
            masks.set(level: 3, table: high | noGigabytePages, page: high | noGigabytePages | bitRange(13, 29))
            masks.set(level: 4, table: high | amdBit8 | x86PageSizeBit, page: high | amdBit8 | x86PageSizeBit)
            masks.set(level: 5, table: high | amdBit8 | x86PageSizeBit, page: high | amdBit8 | x86PageSizeBit)
        }
        reserved = masks
    }

    /// Reserved bits of a PAE PDPTE register (SDM Table 4-8): 2:1, 8:5 and 63:MAXPHYADDR.
    public static func pdpteReservedBits(cpu: CPUModel) -> UInt64 {
        bitRange(1, 2) | bitRange(5, 8) | bitRange(cpu.maxPhysicalAddressBits, 63)
    }

    @inlinable public func isPresent(_ entry: Entry) -> Bool { entry.isPresent }
    @inlinable public func hasReservedBits(_ entry: Entry, level: Int) -> Bool {
        entry.rawValue & reserved.mask(for: entry.rawValue, level: level) != 0
    }
    @inlinable public func isLeaf(_ entry: Entry, level: Int) -> Bool { level == 1 || entry.isPageSize }
    /// W and U as they are; execute is P xor NX, so that it ANDs like the other two.
    @inlinable public func permissions(_ entry: Entry) -> UInt8 {
        UInt8(truncatingIfNeeded: entry.rawValue & (x86WritableBit | x86UserBit))
            | (entry.isNoExecute ? 0 : accessExecute)
    }
    @inlinable public func nextTableAddress(_ entry: Entry) -> UInt64 { entry.frameAddress }
    // Forced inline, as EPT's: left to the optimizer, the two were merged into one called function.
    @inlinable @inline(__always) public func pageBase(_ entry: Entry, level: Int) -> UInt64 {
        // Bit 12 of a large leaf is PAT, and the reserved masks guarantee the bits between it
        // and the page's alignment are zero.
        entry.rawValue & bitRange(pageShift + (level - 1) * 9, 51)
    }
    @inlinable public var accessedBit: UInt64 { x86AccessedBit }
    @inlinable public var dirtyBit: UInt64 { x86DirtyBit }
}

/// KVM's ACC bits: the permissions an entry grants, ANDed across levels.
@usableFromInline let accessExecute: UInt8 = 1
@usableFromInline let accessWrite: UInt8 = 2
@usableFromInline let accessUser: UInt8 = 4
public let accessAll: UInt8 = 7
