// The nested-virtualization directives: L1's EPT or NPT for L2 (`l1`), L1's entries for L2's
// guest-physical pages (`ept-map`), VM entry and exit (`vmenter`, `vmexit`) and INVEPT. Between
// `vmenter` and `vmexit` the vCPU runs L2 (with its paging off: L2's linear addresses are its
// guest-physical ones) and `access` is L2's. Grammar in ScenarioParser.swift.

import VirtualMachine
import X86Paging

/// L1's paging for L2 (`l1 ept ...` or `l1 npt ...`).
public enum NestedPagingSetting: Hashable, Sendable {
    /// `l1 ept levels=4|5 ad=0|1 execonly=0|1`: the EPTP's levels and A/D enable, and whether the
    /// EPT capabilities KVM gives L1 include execute-only pages.
    case ept(levels: Int, accessedDirty: Bool, executeOnly: Bool)
    /// `l1 npt levels=4|5`: L1's nested page tables, walked in L1's paging mode (which must have
    /// as many levels).
    case npt(levels: Int)

    public var levels: Int {
        switch self {
        case .ept(let levels, _, _), .npt(let levels): levels
        }
    }
}

/// `ept-map L2GPA L1GPA 4k|2m|1g PERMS [guest=N]`.
public struct EPTMapDirective: Hashable, Sendable {
    public var l2GPA: GuestPhysicalAddress
    public var l1GPA: GuestPhysicalAddress
    public var pageSize: PageSize
    public var permissions: EPTMapPermissions
    /// Which L2 guest's tables (each guest has its own EPTP or nCR3; 0 by default).
    public var guest = 0

    public init(l2GPA: GuestPhysicalAddress, l1GPA: GuestPhysicalAddress, pageSize: PageSize, permissions: EPTMapPermissions,
                guest: Int = 0) {
        (self.l2GPA, self.l1GPA, self.pageSize, self.permissions, self.guest) = (l2GPA, l1GPA, pageSize, permissions, guest)
    }
}

/// `ept-demand L2GPA L1GPA SIZE 4k|2m|1g PERMS [guest=N]`: L1 backs L2's [L2GPA, L2GPA + SIZE)
/// with its own memory from L1GPA but maps nothing yet. An EPT violation (or #NPF) at an address of
/// the range whose L1 entry is not present is taken by L1's exit handler, which maps the page that
/// holds it (`pageSize`, `permissions`, as `ept-map` would) and resumes L2, which executes the
/// instruction again: how a hypervisor gives a guest memory it touches.
public struct EPTDemandDirective: Hashable, Sendable {
    public var l2GPA: GuestPhysicalAddress
    public var l1GPA: GuestPhysicalAddress
    public var size: UInt64
    public var pageSize: PageSize
    public var permissions: EPTMapPermissions
    public var guest = 0

    /// Whether `address` is in the range.
    public func covers(_ address: GuestPhysicalAddress) -> Bool {
        address.rawValue >= l2GPA.rawValue && address.rawValue - l2GPA.rawValue < size
    }

    /// The `ept-map` L1's handler makes for an exit at `address` (in the range).
    public func mapping(for address: GuestPhysicalAddress) -> EPTMapDirective {
        let page = address.rawValue & ~(pageSize.bytes - 1)
        return EPTMapDirective(l2GPA: GuestPhysicalAddress(page), l1GPA: GuestPhysicalAddress(l1GPA.rawValue + (page - l2GPA.rawValue)),
                               pageSize: pageSize, permissions: permissions, guest: guest)
    }
}

/// L2 guests a scenario may run (`guest=0` ... `guest=15`).
public let nestedGuestLimit = 0...15

/// `R W X A D` of an `ept-map` (in NPT terms: present and user, writable, executable, accessed,
/// dirty).
public struct EPTMapPermissions: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = EPTMapPermissions(rawValue: 1)
    public static let write = EPTMapPermissions(rawValue: 2)
    public static let execute = EPTMapPermissions(rawValue: 4)
    public static let accessed = EPTMapPermissions(rawValue: 8)
    public static let dirty = EPTMapPermissions(rawValue: 16)

    static let letters: [(Character, EPTMapPermissions)] = [("R", .read), ("W", .write), ("X", .execute),
                                                            ("A", .accessed), ("D", .dirty)]

    /// `RWXAD` letters in that order, or `0`.
    public var rendered: String {
        let text = String(Self.letters.filter { contains($0.1) }.map(\.0))
        return text.isEmpty ? "0" : text
    }

    /// The EPT entry bits: R 0, W 1, X 2, A 8, D 9.
    public var eptBits: UInt64 {
        var bits = UInt64(rawValue & 7)
        if contains(.accessed) { bits |= 1 << 8 }
        if contains(.dirty) { bits |= 1 << 9 }
        return bits
    }

    /// The NPT (x86) entry bits: R is P and U/S, W is R/W, no X is NX, A and D.
    public var nptBits: UInt64 {
        guard contains(.read) else { return 0 }
        var bits: UInt64 = 0x5
        if contains(.write) { bits |= 0x2 }
        if !contains(.execute) { bits |= 1 << 63 }
        if contains(.accessed) { bits |= 0x20 }
        if contains(.dirty) { bits |= 0x40 }
        return bits
    }
}

/// INVEPT's types (`invept single|global`).
public enum INVEPTScope: String, Hashable, Sendable {
    case single, global
}

extension DirectiveArguments {
    mutating func parseL1() throws(ScenarioError) -> ScenarioDirective {
        let kindToken = try positional(["ept|npt"])[0]
        switch asciiLowercased(kindToken.text) {
        case "ept":
            let options = try options(["levels", "ad", "execonly"])
            let levels = try options["levels"].map { (token: Token) throws(ScenarioError) in Int(try number(token, what: "levels", in: 4...5)) } ?? 4
            let ad = try options["ad"].map { (token: Token) throws(ScenarioError) in try number(token, what: "ad", in: 0...1) == 1 } ?? false
            let executeOnly = try options["execonly"].map { (token: Token) throws(ScenarioError) in
                try number(token, what: "execonly", in: 0...1) == 1
            } ?? false
            return .l1(.ept(levels: levels, accessedDirty: ad, executeOnly: executeOnly))
        case "npt":
            let options = try options(["levels"])
            let levels = try options["levels"].map { (token: Token) throws(ScenarioError) in Int(try number(token, what: "levels", in: 4...5)) } ?? 4
            return .l1(.npt(levels: levels))
        default:
            throw error("L1's paging for L2 is ept or npt, not '\(kindToken.text)'", at: kindToken)
        }
    }

    mutating func parseEPTMap() throws(ScenarioError) -> ScenarioDirective {
        let args = try positional(["L2GPA", "L1GPA", "4k|2m|1g", "PERMS"])
        let guest = try guestOption()
        guard case .value(let bytes) = parseSize(args[2].text), let size = PageSize(rawValue: bytes), size != .size4M else {
            throw error("page size must be 4k, 2m or 1g, not '\(args[2].text)'", at: args[2])
        }
        let l2 = try number(args[0], what: "L2GPA")
        let l1 = try number(args[1], what: "L1GPA")
        for (value, token, what) in [(l2, args[0], "L2GPA"), (l1, args[1], "L1GPA")] {
            guard value & (size.bytes - 1) == 0 else { throw error("\(what) \(hex(value)) is not aligned to \(size.name)", at: token) }
            guard value < 1 << 52 else { throw error("\(what) \(hex(value)) does not fit in an entry's 52-bit address", at: token) }
        }
        return .eptMap(EPTMapDirective(l2GPA: GuestPhysicalAddress(l2), l1GPA: GuestPhysicalAddress(l1), pageSize: size,
                                       permissions: try eptPermissions(args[3]), guest: guest))
    }

    mutating func parseEPTDemand() throws(ScenarioError) -> ScenarioDirective {
        let args = try positional(["L2GPA", "L1GPA", "SIZE", "4k|2m|1g", "PERMS"])
        let guest = try guestOption()
        guard case .value(let bytes) = parseSize(args[3].text), let pageSize = PageSize(rawValue: bytes), pageSize != .size4M else {
            throw error("page size must be 4k, 2m or 1g, not '\(args[3].text)'", at: args[3])
        }
        guard case .value(let size) = parseSize(args[2].text), size > 0, size % pageSize.bytes == 0 else {
            throw error("SIZE must be a positive multiple of the page size (\(pageSize.name)), not '\(args[2].text)'", at: args[2])
        }
        let l2 = try number(args[0], what: "L2GPA")
        let l1 = try number(args[1], what: "L1GPA")
        for (value, token, what) in [(l2, args[0], "L2GPA"), (l1, args[1], "L1GPA")] {
            guard value & (pageSize.bytes - 1) == 0 else {
                throw error("\(what) \(hex(value)) is not aligned to \(pageSize.name)", at: token)
            }
            // The range's last page must fit in an entry's 52-bit address too.
            guard value < 1 << 52, size <= (1 << 52) - value else {
                throw error("\(what) \(hex(value)) + SIZE \(hex(size)) does not fit in an entry's 52-bit address", at: token)
            }
        }
        let permissions = try eptPermissions(args[4])
        guard !permissions.isEmpty else {
            throw error("PERMS of an on-demand range must map the pages (letters of R W X A D, not 0)", at: args[4])
        }
        return .eptDemand(EPTDemandDirective(l2GPA: GuestPhysicalAddress(l2), l1GPA: GuestPhysicalAddress(l1), size: size,
                                             pageSize: pageSize, permissions: permissions, guest: guest))
    }

    /// `guest=N` (0 when absent), the only option of the line.
    private func guestOption() throws(ScenarioError) -> Int {
        try options(["guest"])["guest"].map { (token: Token) throws(ScenarioError) in
            Int(try number(token, what: "guest", in: UInt64(nestedGuestLimit.lowerBound)...UInt64(nestedGuestLimit.upperBound)))
        } ?? 0
    }

    private func eptPermissions(_ token: Token) throws(ScenarioError) -> EPTMapPermissions {
        if token.text == "0" { return [] }
        var permissions: EPTMapPermissions = []
        for character in token.text.uppercased() where character != "," && character != "|" {
            guard let (_, permission) = EPTMapPermissions.letters.first(where: { $0.0 == character }) else {
                throw error("PERMS are letters from R W X A D (or 0 alone), not '\(token.text)'", at: token)
            }
            permissions.insert(permission)
        }
        guard !permissions.isEmpty else { throw error("PERMS are letters from R W X A D (or 0 alone), not '\(token.text)'", at: token) }
        return permissions
    }

    mutating func parseINVEPT() throws(ScenarioError) -> ScenarioDirective {
        let token = try positional(["single|global"])[0]
        let guest = try guestOption()
        guard let scope = INVEPTScope(rawValue: asciiLowercased(token.text)) else {
            throw error("INVEPT type must be single or global, not '\(token.text)'", at: token)
        }
        if scope == .global && guest != 0 { throw error("guest= names the EPTP of a single-context INVEPT; global covers every EPTP") }
        return .invept(scope, guest: guest)
    }

    mutating func parseVMEnter() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let options = try options(["vpid", "guest"])
        // VPID 0 with "enable VPID" is a VM entry its checks refuse: parsed, refused by the run.
        let vpid = try options["vpid"].map { (token: Token) throws(ScenarioError) in UInt16(try number(token, what: "vpid", in: 0...0xFFFF)) }
        let guest = try options["guest"].map { (token: Token) throws(ScenarioError) in
            Int(try number(token, what: "guest", in: UInt64(nestedGuestLimit.lowerBound)...UInt64(nestedGuestLimit.upperBound)))
        } ?? 0
        return .vmenter(vpid: vpid, guest: guest)
    }

    mutating func parseINVVPID() throws(ScenarioError) -> ScenarioDirective {
        let names = ["individual|single|all|single-globals", "VPID", "GVA"]
        let args = try positional(Array(names.prefix(min(max(tokens.count, 1), 3))))
        try noOptions()
        let word = asciiLowercased(args[0].text)
        guard let type = INVVPIDType.allCases.first(where: { $0.scenarioName == word || "\($0.rawValue)" == word }) else {
            throw error("INVVPID type must be individual, single, all or single-globals (or 0...3), not '\(args[0].text)'", at: args[0])
        }
        let vpid = args.count > 1 ? UInt16(try number(args[1], what: "VPID", in: 0...0xFFFF)) : 0
        let gva = args.count > 2 ? try number(args[2], what: "GVA") : 0
        return .invvpid(type, vpid: vpid, gva: GuestVirtualAddress(gva))
    }

    mutating func parseNoArguments(_ directive: ScenarioDirective) throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        try noOptions()
        return directive
    }
}

extension INVVPIDType {
    /// The type's name in the scenario language.
    public var scenarioName: String {
        switch self {
        case .individualAddress: "individual"
        case .singleContext: "single"
        case .allContexts: "all"
        case .singleContextRetainingGlobals: "single-globals"
        }
    }
}
