// Control registers and the CPU model. Constants are computed `static var`s on purpose: measured on
// this toolchain, `static let` option constants made a cross-module walker 2.5x slower.

/// CR0 (Intel SDM vol. 3, 2.5).
@frozen
public struct CR0: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// CR0.PE, bit 0: protected mode.
    @inlinable public static var protectionEnable: CR0 { CR0(rawValue: 1 << 0) }
    /// CR0.WP, bit 16: supervisor writes honour R/W.
    @inlinable public static var writeProtect: CR0 { CR0(rawValue: 1 << 16) }
    /// CR0.PG, bit 31: paging.
    @inlinable public static var paging: CR0 { CR0(rawValue: 1 << 31) }
}

/// CR4 (Intel SDM vol. 3, 2.5).
@frozen
public struct CR4: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// CR4.PSE, bit 4: 4 MiB pages with 32-bit paging.
    @inlinable public static var pageSizeExtensions: CR4 { CR4(rawValue: 1 << 4) }
    /// CR4.PAE, bit 5.
    @inlinable public static var physicalAddressExtension: CR4 { CR4(rawValue: 1 << 5) }
    /// CR4.PGE, bit 7: global pages.
    @inlinable public static var globalPages: CR4 { CR4(rawValue: 1 << 7) }
    /// CR4.LA57, bit 12: 5-level paging.
    @inlinable public static var la57: CR4 { CR4(rawValue: 1 << 12) }
    /// CR4.PCIDE, bit 17.
    @inlinable public static var pcidEnable: CR4 { CR4(rawValue: 1 << 17) }
    /// CR4.SMEP, bit 20.
    @inlinable public static var smep: CR4 { CR4(rawValue: 1 << 20) }
    /// CR4.SMAP, bit 21.
    @inlinable public static var smap: CR4 { CR4(rawValue: 1 << 21) }
    /// CR4.PKE, bit 22: protection keys for user-mode pages (PKRU).
    @inlinable public static var protectionKeys: CR4 { CR4(rawValue: 1 << 22) }
    /// CR4.PKS, bit 24: protection keys for supervisor-mode pages (IA32_PKRS).
    @inlinable public static var supervisorProtectionKeys: CR4 { CR4(rawValue: 1 << 24) }
}

/// IA32_EFER (MSR 0xC0000080).
@frozen
public struct EFER: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// EFER.SCE, bit 0.
    @inlinable public static var syscallEnable: EFER { EFER(rawValue: 1 << 0) }
    /// EFER.LME, bit 8: long mode enable.
    @inlinable public static var longModeEnable: EFER { EFER(rawValue: 1 << 8) }
    /// EFER.LMA, bit 10: long mode active (LME && CR0.PG).
    @inlinable public static var longModeActive: EFER { EFER(rawValue: 1 << 10) }
    /// EFER.NXE, bit 11: execute-disable bit enable.
    @inlinable public static var noExecuteEnable: EFER { EFER(rawValue: 1 << 11) }
}

/// RFLAGS; only AC matters to paging.
@frozen
public struct RFLAGS: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// RFLAGS.AC, bit 18: with CR4.SMAP, lets explicit supervisor accesses reach user pages.
    @inlinable public static var alignmentCheck: RFLAGS { RFLAGS(rawValue: 1 << 18) }
}

/// A protection-key rights register: PKRU for user-mode pages, IA32_PKRS for supervisor-mode pages.
/// Two bits per key: AD (access disable) at 2*key, WD (write disable) at 2*key+1.
@frozen
public struct ProtectionKeyRights: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt32) { self.rawValue = rawValue }

    /// Every key allows everything.
    @inlinable public static var allowAll: ProtectionKeyRights { ProtectionKeyRights(0) }

    /// The two rights bits of `key` (bit 0 AD, bit 1 WD).
    @inlinable @inline(__always) public func rights(forKey key: Int) -> UInt32 { (rawValue >> UInt32(2 * (key & 15))) & 3 }
    @inlinable public func accessDisabled(key: Int) -> Bool { rights(forKey: key) & 1 != 0 }
    @inlinable public func writeDisabled(key: Int) -> Bool { rights(forKey: key) & 2 != 0 }
}

/// PKRU governs user-mode pages.
public typealias PKRU = ProtectionKeyRights
/// IA32_PKRS governs supervisor-mode pages.
public typealias PKRS = ProtectionKeyRights

/// Which vendor's reserved-bit rules apply where the two differ.
public enum CPUVendor: String, Sendable, Hashable, CaseIterable {
    /// Intel.
    case intel
    /// AMD: bit 8 of a non-leaf PML4E/PML5E is reserved (KVM's `guest_cpuid_is_amd_or_hygon`).
    case amd
}

/// What the modelled CPU supports: the CPUID bits that change what a page walk does.
public struct CPUModel: Hashable, Sendable {
    /// CPUID.80000008H:EAX[7:0]. Physical-address bits 51:maxPhysicalAddressBits are reserved.
    public var maxPhysicalAddressBits: Int
    /// CPUID.80000001H:EDX.Page1GB[26]: 1 GiB pages with 4/5-level paging.
    public var supports1GiBPages: Bool
    /// CPUID.(EAX=07H,ECX=0):ECX.LA57[16].
    public var supportsLA57: Bool
    /// CPUID.80000001H:EDX.NX[20]: EFER.NXE may be set.
    public var supportsNX: Bool
    public var vendor: CPUVendor

    public init(maxPhysicalAddressBits: Int = 46, supports1GiBPages: Bool = true, supportsLA57: Bool = true,
                supportsNX: Bool = true, vendor: CPUVendor = .intel) {
        // MAXPHYADDR is architecturally at most 52 and PSE-36 needs at least 36.
        self.maxPhysicalAddressBits = min(max(maxPhysicalAddressBits, 36), 52)
        self.supports1GiBPages = supports1GiBPages
        self.supportsLA57 = supportsLA57
        self.supportsNX = supportsNX
        self.vendor = vendor
    }

    /// Bits maxPhysicalAddressBits..51: set in an address field they are reserved.
    @inlinable public var reservedPhysicalAddressBits: UInt64 { bitRange(maxPhysicalAddressBits, 51) }

    /// How many physical-address bits above 31 a 4 MiB PDE can hold with 32-bit paging:
    /// PDE bits (M-19):13 are PA bits (M-1):32 where M = min(MAXPHYADDR, 40) (SDM 4.3, Table 4-4).
    @inlinable public var pse36HighAddressBits: Int { min(maxPhysicalAddressBits, 40) - 32 }
}
