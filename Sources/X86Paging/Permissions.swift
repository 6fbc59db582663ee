// The x86 permission model (SDM 4.6) as KVM evaluates it: a 16-entry table, indexed by the
// access's error-code bits, of 8-bit masks over the page's combined ACC bits (KVM's
// `update_permission_bitmask` / `permission_fault`), plus protection keys.

/// Why an access to a present, well-formed page faults. A fault can have several causes at once.
public struct PermissionViolation: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// A write to a page some level made read-only (for supervisor writes only with CR0.WP=1).
    public static let readOnly = PermissionViolation(rawValue: 1 << 0)
    /// A user-mode access to a page some level made supervisor-only.
    public static let supervisorOnly = PermissionViolation(rawValue: 1 << 1)
    /// A fetch from a page some level marked execute-disable.
    public static let noExecute = PermissionViolation(rawValue: 1 << 2)
    /// A supervisor fetch from a user page with CR4.SMEP.
    public static let smep = PermissionViolation(rawValue: 1 << 3)
    /// A supervisor data access to a user page with CR4.SMAP (RFLAGS.AC clear or implicit).
    public static let smap = PermissionViolation(rawValue: 1 << 4)
    /// A protection-key rights violation (PKRU for user pages, PKRS for supervisor pages).
    public static let protectionKey = PermissionViolation(rawValue: 1 << 5)
}

/// The permission state derived from CR0.WP, CR4.SMEP/SMAP/PKE/PKS, EFER.NXE and the mode.
@frozen
public struct PermissionRules: Sendable, Equatable {
    /// Bit `8 * index + acc` set: an access with table index `index` to a page with combined ACC
    /// bits `acc` faults. Index bits: 0 write, 1 user, 2 SMAP overridden (RFLAGS.AC=1 on an
    /// explicit supervisor access), 3 fetch.
    @usableFromInline var faults: UInt128 = 0
    // The same table split by cause, for explanations only (never on the hot path).
    var readOnlyFaults: UInt128 = 0
    var supervisorFaults: UInt128 = 0
    var noExecuteFaults: UInt128 = 0
    var smepFaults: UInt128 = 0
    var smapFaults: UInt128 = 0
    /// Protection keys for user pages (CR4.PKE in IA-32e mode).
    public let userKeysEnabled: Bool
    /// Protection keys for supervisor pages (CR4.PKS in IA-32e mode).
    public let supervisorKeysEnabled: Bool
    public let writeProtect: Bool

    public init(cr0: CR0, cr4: CR4, efer: EFER, mode: PagingMode) {
        let wp = cr0.contains(.writeProtect)
        let smep = cr4.contains(.smep)
        let smap = cr4.contains(.smap)
        // 32-bit entries have no XD bit; their ACC execute bit is always set, so NXE is moot there.
        let nx = efer.contains(.noExecuteEnable)
        writeProtect = wp
        userKeysEnabled = mode.isLongMode && cr4.contains(.protectionKeys)
        supervisorKeysEnabled = mode.isLongMode && cr4.contains(.supervisorProtectionKeys)
        for index in 0..<16 {
            let isWrite = index & 1 != 0, isUser = index & 2 != 0
            let smapOverridden = index & 4 != 0, isFetch = index & 8 != 0
            for acc in 0..<8 {
                let writable = acc & Int(accessWrite) != 0
                let userPage = acc & Int(accessUser) != 0
                let executable = acc & Int(accessExecute) != 0
                let bit = UInt128(1) << UInt128(8 * index + acc)
                // Supervisor writes ignore R/W when CR0.WP=0.
                if isWrite && !writable && (isUser || wp) { readOnlyFaults |= bit }
                if isUser && !userPage { supervisorFaults |= bit }
                if isFetch && !executable && nx { noExecuteFaults |= bit }
                let supervisorToUserPage = !isUser && userPage
                if smep && isFetch && supervisorToUserPage { smepFaults |= bit }
                if smap && !isFetch && !smapOverridden && supervisorToUserPage { smapFaults |= bit }
            }
        }
        faults = readOnlyFaults | supervisorFaults | noExecuteFaults | smepFaults | smapFaults
    }

    /// The table index of an access (KVM: `(pfec + (not_smap << 3)) >> 1`).
    @inlinable @inline(__always)
    static func index(_ access: Access, alignmentCheck: Bool) -> Int {
        var index = 0
        if access.kind == .write { index |= 1 }
        if access.privilege == .user { index |= 2 }
        if alignmentCheck && access.privilege == .supervisor { index |= 4 }
        if access.kind == .fetch { index |= 8 }
        return index
    }

    /// Whether an access to a page with combined ACC bits `acc` is refused by the U/S, R/W, XD,
    /// SMEP and SMAP rules.
    @inlinable @inline(__always)
    public func isRefused(_ access: Access, pagePermissions acc: UInt8, alignmentCheck: Bool) -> Bool {
        let index = Self.index(access, alignmentCheck: alignmentCheck)
        return (faults >> UInt128(8 * index + Int(acc))) & 1 != 0
    }

    /// The combined ACC values (bit `acc`) the access is refused for: a TLB hit is one shift of this.
    @inlinable
    public func refusedPermissions(_ access: Access, alignmentCheck: Bool) -> UInt8 {
        let index = Self.index(access, alignmentCheck: alignmentCheck)
        return UInt8(truncatingIfNeeded: faults >> UInt128(8 * index))
    }

    /// Whether the page's protection key refuses the access (SDM 4.6.2). Keys apply to data
    /// accesses only; write-disable binds supervisor writes only with CR0.WP=1.
    @inlinable
    public func isRefusedByKey(_ access: Access, pagePermissions acc: UInt8, key: Int,
                               pkru: PKRU, pkrs: PKRS) -> Bool {
        guard access.kind != .fetch else { return false }
        let rights: UInt32
        if acc & accessUser != 0 {
            guard userKeysEnabled else { return false }
            rights = pkru.rights(forKey: key)
        } else {
            guard supervisorKeysEnabled else { return false }
            rights = pkrs.rights(forKey: key)
        }
        if rights & 1 != 0 { return true }
        return rights & 2 != 0 && access.kind == .write && (access.privilege == .user || writeProtect)
    }

    /// Every rule the access breaks (out of line: for reports, not for walking).
    public func violations(_ access: Access, pagePermissions acc: UInt8, alignmentCheck: Bool,
                           key: Int, pkru: PKRU, pkrs: PKRS) -> PermissionViolation {
        let shift = UInt128(8 * Self.index(access, alignmentCheck: alignmentCheck) + Int(acc))
        var result = PermissionViolation()
        if (readOnlyFaults >> shift) & 1 != 0 { result.insert(.readOnly) }
        if (supervisorFaults >> shift) & 1 != 0 { result.insert(.supervisorOnly) }
        if (noExecuteFaults >> shift) & 1 != 0 { result.insert(.noExecute) }
        if (smepFaults >> shift) & 1 != 0 { result.insert(.smep) }
        if (smapFaults >> shift) & 1 != 0 { result.insert(.smap) }
        if isRefusedByKey(access, pagePermissions: acc, key: key, pkru: pkru, pkrs: pkrs) {
            result.insert(.protectionKey)
        }
        return result
    }
}
