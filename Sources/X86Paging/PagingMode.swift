/// The paging mode selected by CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57 (SDM 4.1.1).
public enum PagingMode: String, Sendable, Hashable, CaseIterable {
    case disabled
    /// 32-bit paging: 4-byte entries, 2 levels, 4 MiB pages with CR4.PSE.
    case legacy32
    /// PAE paging: 8-byte entries, 4 PDPTE registers and 2 levels of tables.
    case pae
    case fourLevel
    case fiveLevel

    /// The level of the root table (KVM's `cpu_role.base.level`): 0 without paging, 2 for 32-bit, 3
    /// for PAE (the PDPTE registers), 4 or 5.
    @inlinable
    public var rootLevel: Int {
        switch self {
        case .disabled: 0
        case .legacy32: 2
        case .pae: 3
        case .fourLevel: 4
        case .fiveLevel: 5
        }
    }

    /// The width of a linear address: 32 outside IA-32e mode, 48 or 57 in it.
    @inlinable
    public var linearAddressWidth: Int {
        switch self {
        case .disabled, .legacy32, .pae: 32
        case .fourLevel: 48
        case .fiveLevel: 57
        }
    }

    /// IA-32e paging (4- or 5-level): the only modes with protection keys and canonical addresses.
    @inlinable @inline(__always) public var isLongMode: Bool { self == .fourLevel || self == .fiveLevel }

    public var displayName: String {
        switch self {
        case .disabled: "paging disabled"
        case .legacy32: "32-bit paging"
        case .pae: "PAE paging"
        case .fourLevel: "4-level paging"
        case .fiveLevel: "5-level paging"
        }
    }
}

/// What an access does.
public enum AccessKind: UInt8, Sendable, Hashable, CaseIterable {
    case read, write, fetch
}

/// Who makes an access. An implicit supervisor access is one the processor makes on its own behalf
/// (descriptor tables, the TSS...) even at CPL 3; RFLAGS.AC cannot lift SMAP for it.
public enum Privilege: UInt8, Sendable, Hashable, CaseIterable {
    case user, supervisor, implicitSupervisor

    @inlinable public var isUser: Bool { self == .user }
}

/// One memory access: what it does and who does it.
@frozen
public struct Access: Hashable, Sendable {
    public var kind: AccessKind
    public var privilege: Privilege

    @inlinable
    public init(_ kind: AccessKind, _ privilege: Privilege) {
        self.kind = kind
        self.privilege = privilege
    }

    @inlinable public static func read(_ privilege: Privilege) -> Access { Access(.read, privilege) }
    @inlinable public static func write(_ privilege: Privilege) -> Access { Access(.write, privilege) }
    @inlinable public static func fetch(_ privilege: Privilege) -> Access { Access(.fetch, privilege) }

    @inlinable public var isWrite: Bool { kind == .write }
    @inlinable public var isFetch: Bool { kind == .fetch }

    /// The access as #PF error-code bits (W, U, I/D) plus KVM's synthetic implicit-access bit, the
    /// form KVM passes around as `access`.
    @inlinable
    public var errorCodeBits: PageFaultErrorCode {
        var bits = PageFaultErrorCode()
        if kind == .write { bits.insert(.write) }
        if kind == .fetch { bits.insert(.fetch) }
        if privilege == .user { bits.insert(.user) }
        if privilege == .implicitSupervisor { bits.insert(.implicitAccess) }
        return bits
    }
}

/// The #PF error code (SDM 4.7) with KVM's extra bits above 31.
@frozen
public struct PageFaultErrorCode: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// P, bit 0: a protection violation on a present page (clear: not present).
    @inlinable public static var present: Self { Self(rawValue: 1 << 0) }
    /// W/R, bit 1.
    @inlinable public static var write: Self { Self(rawValue: 1 << 1) }
    /// U/S, bit 2: the access was a user-mode access.
    @inlinable public static var user: Self { Self(rawValue: 1 << 2) }
    /// RSVD, bit 3: a reserved bit was set in a paging-structure entry.
    @inlinable public static var reservedBit: Self { Self(rawValue: 1 << 3) }
    /// I/D, bit 4: instruction fetch (reported only when NX is in use or SMEP is on).
    @inlinable public static var fetch: Self { Self(rawValue: 1 << 4) }
    /// PK, bit 5: a protection-key violation.
    @inlinable public static var protectionKey: Self { Self(rawValue: 1 << 5) }
    /// KVM's PFERR_GUEST_FINAL_MASK, bit 32: a nested fault on the final guest-physical address.
    @inlinable public static var guestFinal: Self { Self(rawValue: 1 << 32) }
    /// KVM's PFERR_GUEST_PAGE_MASK, bit 33: a nested fault while walking guest page tables.
    @inlinable public static var guestPage: Self { Self(rawValue: 1 << 33) }
    /// KVM's synthetic PFERR_IMPLICIT_ACCESS, bit 48; never part of an architectural error code.
    @inlinable public static var implicitAccess: Self { Self(rawValue: 1 << 48) }

    /// The 32 bits the processor pushes.
    @inlinable public var architectural: UInt32 { UInt32(truncatingIfNeeded: rawValue) }
}

extension PageFaultErrorCode: CustomStringConvertible {
    public var description: String {
        var names: [String] = []
        names.append(contains(.present) ? "P" : "!P")
        if contains(.write) { names.append("W") }
        if contains(.user) { names.append("U") }
        if contains(.reservedBit) { names.append("RSVD") }
        if contains(.fetch) { names.append("I/D") }
        if contains(.protectionKey) { names.append("PK") }
        if contains(.guestFinal) { names.append("GUEST_FINAL") }
        if contains(.guestPage) { names.append("GUEST_PAGE") }
        return "\(hex(architectural)) (\(names.joined(separator: "|")))"
    }
}
