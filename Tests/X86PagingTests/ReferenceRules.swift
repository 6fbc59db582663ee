// A deliberately plain, independent restatement of the x86 paging rules, written from the Intel SDM
// vol. 3: 4.3-4.5 (entry formats and reserved bits), 4.6.1 (access rights), 4.6.2 (protection keys)
// and 4.7 (the #PF error code). It shares no code with the walker: only Bools, Ints and UInt64s.
// Readability beats speed here, except that nothing allocates on the per-access path, so the
// exhaustive tests can call it tens of millions of times.

/// The three families of entry formats.
enum RefPaging: Equatable, Sendable {
    /// 32-bit paging (CR4.PAE=0): 4-byte entries, no XD bit, no protection keys.
    case bits32
    /// PAE paging: 8-byte entries, PDPTE registers, no protection keys.
    case pae
    /// 4-level or 5-level paging (IA-32e): protection keys available.
    case ia32e
}

enum RefAccessKind: Equatable, Sendable, CaseIterable { case read, write, fetch }
enum RefPrivilege: Equatable, Sendable, CaseIterable {
    /// CPL 3, explicit.
    case user
    /// CPL < 3, explicit.
    case supervisor
    /// A supervisor-mode access the processor makes on its own (GDT, IDT, TSS...), at any CPL.
    case implicitSupervisor
}

/// Every control bit the rules consult.
struct RefControls: Equatable, Sendable {
    var wp = false      // CR0.WP
    var pse = false     // CR4.PSE
    var smep = false    // CR4.SMEP
    var smap = false    // CR4.SMAP
    var pke = false     // CR4.PKE
    var pks = false     // CR4.PKS
    var nxe = false     // EFER.NXE
    var ac = false      // RFLAGS.AC
    var pkru: UInt32 = 0
    var pkrs: UInt32 = 0
    /// CPUID.80000001H:EDX.Page1GB.
    var supports1GiB = true
}

/// One paging-structure entry as the permission rules see it. `otherReservedBits` carries the
/// address-field reserved bits (beyond MAXPHYADDR, large-page alignment, PSE-36 bit 21) that the
/// caller decoded from the raw entry.
struct RefEntryBits: Equatable, Sendable {
    var present = true
    var writable = true
    var user = true
    var noExecute = false
    var pageSize = false
    var otherReservedBits = false
}

/// What an entry makes the walk do.
enum RefEntryClass: Equatable, Sendable { case notPresent, reserved, leaf, table }

/// Where the structural part of a walk stopped, with the permissions combined over the levels used.
enum RefStop: Equatable, Sendable {
    case notPresent(level: Int)
    case reserved(level: Int)
    case leaf(level: Int, writable: Bool, user: Bool, executable: Bool)
}

/// The answer for one access.
enum RefOutcome: Equatable, Sendable, CustomStringConvertible {
    case translated(leafLevel: Int, writable: Bool, user: Bool, executable: Bool)
    case pageFault(errorCode: UInt32, level: Int)

    var description: String {
        switch self {
        case .translated(let level, let w, let u, let x):
            "translated(level \(level), \(w ? "W" : "-")\(u ? "U" : "S")\(x ? "X" : "-"))"
        case .pageFault(let code, let level): "#PF(\(RefErrorCode.describe(code)), level \(level))"
        }
    }
}

/// #PF error-code bits (SDM 4.7, Figure 4-12).
enum RefErrorCode {
    static let present: UInt32 = 1 << 0
    static let write: UInt32 = 1 << 1
    static let user: UInt32 = 1 << 2
    static let reserved: UInt32 = 1 << 3
    static let fetch: UInt32 = 1 << 4
    static let protectionKey: UInt32 = 1 << 5

    static func describe(_ code: UInt32) -> String {
        var parts = [code & present != 0 ? "P" : "!P"]
        if code & write != 0 { parts.append("W") }
        if code & user != 0 { parts.append("U") }
        if code & reserved != 0 { parts.append("RSVD") }
        if code & fetch != 0 { parts.append("I/D") }
        if code & protectionKey != 0 { parts.append("PK") }
        return "0x" + String(code, radix: 16) + " " + parts.joined(separator: "|")
    }
}

enum ReferenceRules {
    // MARK: Entry classification (SDM 4.3, 4.4.2, 4.5.4)

    /// What the entry at `level` (1 = PTE ... 5 = PML5E) does to the walk.
    static func classify(_ entry: RefEntryBits, level: Int, paging: RefPaging, controls: RefControls) -> RefEntryClass {
        if !entry.present { return .notPresent }
        switch paging {
        case .bits32:
            // No XD bit and no reserved bits at all, except in a PDE that maps a 4 MiB page.
            if level == 1 { return .leaf }
            // PS in a PDE is honoured only with CR4.PSE=1; otherwise it is ignored.
            if entry.pageSize && controls.pse {
                return entry.otherReservedBits ? .reserved : .leaf
            }
            return .table
        case .pae, .ia32e:
            if paging == .pae && level == 3 {
                // A PDPTE register: only P matters during the walk (its reserved bits are checked
                // when CR3 is loaded, and it has no R/W, U/S or XD bits).
                return .table
            }
            if entry.otherReservedBits { return .reserved }
            // XD (bit 63) is reserved when EFER.NXE=0.
            if entry.noExecute && !controls.nxe { return .reserved }
            switch level {
            case 1:
                return .leaf  // bit 7 of a PTE is PAT, never reserved
            case 2:
                return entry.pageSize ? .leaf : .table
            case 3:
                if entry.pageSize { return controls.supports1GiB ? .leaf : .reserved }
                return .table
            default:
                // Bit 7 of a PML4E or PML5E is reserved.
                return entry.pageSize ? .reserved : .table
            }
        }
    }

    /// Walks a list of entries, top level first, and reports where the walk stops.
    static func stop(_ entries: [(level: Int, bits: RefEntryBits)], paging: RefPaging, controls: RefControls) -> RefStop {
        var writable = true, user = true, executable = true
        for (level, bits) in entries {
            switch classify(bits, level: level, paging: paging, controls: controls) {
            case .notPresent: return .notPresent(level: level)
            case .reserved: return .reserved(level: level)
            case .leaf, .table:
                if !(paging == .pae && level == 3) {
                    writable = writable && bits.writable
                    user = user && bits.user
                    if paging != .bits32 && bits.noExecute { executable = false }
                }
                if classify(bits, level: level, paging: paging, controls: controls) == .leaf {
                    return .leaf(level: level, writable: writable, user: user, executable: executable)
                }
            }
        }
        fatalError("entry list ended without a leaf")
    }

    // MARK: The error code (SDM 4.7)

    /// W, U/S and I/D: the bits that describe the access rather than the cause.
    static func accessBits(_ kind: RefAccessKind, _ privilege: RefPrivilege, paging: RefPaging,
                           controls: RefControls) -> UInt32 {
        var code: UInt32 = 0
        if kind == .write { code |= RefErrorCode.write }
        // Implicit supervisor-mode accesses are supervisor-mode accesses even at CPL 3.
        if privilege == .user { code |= RefErrorCode.user }
        // I/D is reported only with SMEP, or with NXE under PAE-based (PAE, 4/5-level) paging.
        if kind == .fetch && (controls.smep || (controls.nxe && paging != .bits32)) { code |= RefErrorCode.fetch }
        return code
    }

    // MARK: Access rights (SDM 4.6.1)

    /// Whether the U/S, R/W, XD, SMEP and SMAP rules allow the access.
    static func rightsAllow(writable: Bool, user: Bool, executable: Bool, paging: RefPaging, controls: RefControls,
                            _ kind: RefAccessKind, _ privilege: RefPrivilege) -> Bool {
        // A user-mode address has U/S=1 in every entry; otherwise it is a supervisor-mode address.
        let userAddress = user
        // XD blocks fetches only under PAE/IA-32e paging with EFER.NXE=1.
        let executeDisabled = paging != .bits32 && controls.nxe && !executable
        switch privilege {
        case .user:
            switch kind {
            case .read: return userAddress
            case .write: return userAddress && writable
            case .fetch: return userAddress && !executeDisabled
            }
        case .supervisor, .implicitSupervisor:
            let implicit = privilege == .implicitSupervisor
            // SMAP: supervisor data accesses to user-mode addresses are refused unless the access is
            // explicit and RFLAGS.AC=1.
            let smapRefuses = userAddress && controls.smap && (implicit || !controls.ac)
            switch kind {
            case .read:
                return !smapRefuses
            case .write:
                if smapRefuses { return false }
                // With CR0.WP=0 supervisor writes ignore R/W.
                return !controls.wp || writable
            case .fetch:
                if userAddress && controls.smep { return false }
                return !executeDisabled
            }
        }
    }

    // MARK: Protection keys (SDM 4.6.2)

    /// Whether the page's protection key refuses the access (IA-32e paging only).
    static func keyRefuses(user: Bool, key: Int, paging: RefPaging, controls: RefControls,
                           _ kind: RefAccessKind, _ privilege: RefPrivilege) -> Bool {
        guard paging == .ia32e else { return false }
        // Keys govern data accesses only.
        if kind == .fetch { return false }
        let register: UInt32
        if user {
            guard controls.pke else { return false }
            register = controls.pkru
        } else {
            guard controls.pks else { return false }
            register = controls.pkrs
        }
        let accessDisable = (register >> UInt32(2 * key)) & 1 == 1
        let writeDisable = (register >> UInt32(2 * key + 1)) & 1 == 1
        // AD: no data access at all, by anyone.
        if accessDisable { return true }
        // WD: user-mode writes always; supervisor-mode writes only with CR0.WP=1.
        if writeDisable && kind == .write {
            return privilege == .user || controls.wp
        }
        return false
    }

    // MARK: The whole decision

    /// The outcome of one access given where the structural walk stopped.
    static func outcome(_ stop: RefStop, key: Int, paging: RefPaging, controls: RefControls,
                        _ kind: RefAccessKind, _ privilege: RefPrivilege) -> RefOutcome {
        let bits = accessBits(kind, privilege, paging: paging, controls: controls)
        switch stop {
        case .notPresent(let level):
            return .pageFault(errorCode: bits, level: level)
        case .reserved(let level):
            // Reserved bits are checked only in present entries, so RSVD comes with P.
            return .pageFault(errorCode: bits | RefErrorCode.present | RefErrorCode.reserved, level: level)
        case .leaf(let level, let writable, let user, let executable):
            let allowed = rightsAllow(writable: writable, user: user, executable: executable, paging: paging,
                                      controls: controls, kind, privilege)
            let keyFault = keyRefuses(user: user, key: key, paging: paging, controls: controls, kind, privilege)
            if allowed && !keyFault {
                return .translated(leafLevel: level, writable: writable, user: user, executable: executable)
            }
            // PK is reported whenever the key disallows the access, whatever else also does (4.7).
            return .pageFault(errorCode: bits | RefErrorCode.present | (keyFault ? RefErrorCode.protectionKey : 0),
                              level: level)
        }
    }

    /// Convenience: entries top first, to an outcome.
    static func evaluate(_ entries: [(level: Int, bits: RefEntryBits)], key: Int, paging: RefPaging,
                         controls: RefControls, _ kind: RefAccessKind, _ privilege: RefPrivilege) -> RefOutcome {
        outcome(stop(entries, paging: paging, controls: controls), key: key, paging: paging, controls: controls,
                kind, privilege)
    }
}

// MARK: - A plain reference walk over memory

/// The paging modes, as the reference walk knows them.
enum RefMode: Equatable, Sendable, CaseIterable {
    case bits32, pae, fourLevel, fiveLevel

    var paging: RefPaging {
        switch self {
        case .bits32: .bits32
        case .pae: .pae
        case .fourLevel, .fiveLevel: .ia32e
        }
    }
}

struct RefPathEntry: Equatable, Sendable, CustomStringConvertible {
    var level: Int
    var address: UInt64
    var value: UInt64
    var description: String { "L\(level)@0x\(String(address, radix: 16))=0x\(String(value, radix: 16))" }
}

/// Everything a reference walk answers.
enum RefWalkResult: Equatable, Sendable, CustomStringConvertible {
    case translated(physical: UInt64, level: Int, pageSize: UInt64, writable: Bool, user: Bool, executable: Bool,
                    key: Int, global: Bool)
    case pageFault(errorCode: UInt32, level: Int)
    case generalProtection
    case noMemory(address: UInt64, level: Int)
    case tooWide

    var description: String {
        switch self {
        case .translated(let pa, let level, let size, let w, let u, let x, let key, let global):
            "translated(pa 0x\(String(pa, radix: 16)), level \(level), size 0x\(String(size, radix: 16)), "
                + "\(w ? "W" : "-")\(u ? "U" : "S")\(x ? "X" : "-"), key \(key)\(global ? ", G" : ""))"
        case .pageFault(let code, let level): "#PF(\(RefErrorCode.describe(code)), level \(level))"
        case .generalProtection: "#GP"
        case .noMemory(let address, let level): "noMemory(0x\(String(address, radix: 16)), level \(level))"
        case .tooWide: "tooWide"
        }
    }
}

/// The machine state a reference walk needs.
struct RefMachine: Sendable {
    var mode: RefMode
    var cr3: UInt64
    var controls: RefControls
    var pge = false
    var maxPhysicalAddressBits = 46
    /// The PAE PDPTE registers (loaded at CR3 load).
    var pdptes: [UInt64] = [0, 0, 0, 0]
}

enum ReferenceWalk {
    /// Bits `low...high` set.
    static func bits(_ low: Int, _ high: Int) -> UInt64 {
        var mask: UInt64 = 0
        if high >= low { for bit in low...high { mask |= 1 << UInt64(bit) } }
        return mask
    }

    /// Reserved bits of a PAE PDPTE (SDM Table 4-8): 2:1, 8:5, 63:MAXPHYADDR.
    static func pdpteReserved(maxPhysicalAddressBits m: Int) -> UInt64 {
        bits(1, 2) | bits(5, 8) | bits(m, 63)
    }

    /// Walks `address` for one access. `read(address, size)` returns the little-endian entry of
    /// `size` bytes, or nil when no memory is there.
    static func walk(_ address: UInt64, _ kind: RefAccessKind, _ privilege: RefPrivilege, machine: RefMachine,
                     read: (UInt64, Int) -> UInt64?) -> (result: RefWalkResult, path: [RefPathEntry]) {
        let (shape, path) = structure(address, machine: machine, read: read)
        return (result(shape, machine: machine, kind, privilege), path)
    }

    /// The access-dependent half: the outcome of one access over a walk's structure.
    static func result(_ shape: RefStructure, machine: RefMachine, _ kind: RefAccessKind,
                       _ privilege: RefPrivilege) -> RefWalkResult {
        switch shape {
        case .generalProtection: return .generalProtection
        case .tooWide: return .tooWide
        case .noMemory(let address, let level): return .noMemory(address: address, level: level)
        case .stop(let stop, let leafValue, let base, let size, let linearAddress):
            let key = machine.mode.paging == .ia32e ? Int((leafValue >> 59) & 0xF) : 0
            switch ReferenceRules.outcome(stop, key: key, paging: machine.mode.paging, controls: machine.controls,
                                          kind, privilege) {
            case .pageFault(let code, let level):
                return .pageFault(errorCode: code, level: level)
            case .translated(let level, let w, let u, let x):
                return .translated(physical: base | (linearAddress & (size - 1)), level: level, pageSize: size,
                                   writable: w, user: u, executable: x, key: key,
                                   global: machine.pge && leafValue & (1 << 8) != 0)
            }
        }
    }

    /// The access-independent half: where the walk stops and what it read. Depends on the mode,
    /// CR3, CR4.PSE, EFER.NXE, 1 GiB support and MAXPHYADDR only.
    static func structure(_ address: UInt64, machine: RefMachine,
                          read: (UInt64, Int) -> UInt64?) -> (RefStructure, [RefPathEntry]) {
        let controls = machine.controls
        let m = machine.maxPhysicalAddressBits
        var path: [RefPathEntry] = []
        var entries: [(level: Int, bits: RefEntryBits)] = []

        func stopHere(leafValue: UInt64 = 0, base: UInt64 = 0, size: UInt64 = 0) -> (RefStructure, [RefPathEntry]) {
            let stop = ReferenceRules.stop(entries, paging: machine.mode.paging, controls: controls)
            return (.stop(stop, leafValue: leafValue, base: base, size: size, linearAddress: address), path)
        }

        switch machine.mode {
        case .bits32:
            guard address < 1 << 32 else { return (.tooWide, []) }
            // PSE-36: a 4 MiB PDE carries PA bits (M'-1):32 in bits (M'-20):13, M' = min(MAXPHYADDR, 40).
            let highBits = min(m, 40) - 32
            var table = machine.cr3 & 0xFFFF_F000
            var level = 2
            while true {
                let shift = UInt64(12 + 10 * (level - 1))
                let entryAddress = table + ((address >> shift) & 0x3FF) * 4
                guard let value = read(entryAddress, 4) else { return (.noMemory(address: entryAddress, level: level), path) }
                path.append(RefPathEntry(level: level, address: entryAddress, value: value))
                var entry = RefEntryBits(present: value & 1 != 0, writable: value & 2 != 0, user: value & 4 != 0,
                                         noExecute: false, pageSize: value & 0x80 != 0)
                if level == 2 && entry.pageSize && controls.pse {
                    entry.otherReservedBits = value & bits(13 + highBits, 21) != 0
                }
                entries.append((level, entry))
                switch ReferenceRules.classify(entry, level: level, paging: .bits32, controls: controls) {
                case .notPresent, .reserved: return stopHere()
                case .leaf:
                    if level == 1 {
                        return stopHere(leafValue: value, base: value & 0xFFFF_F000, size: 1 << 12)
                    }
                    let high = (value >> 13) & ((1 << UInt64(highBits)) - 1)
                    return stopHere(leafValue: value, base: (value & 0xFFC0_0000) | high << 32, size: 1 << 22)
                case .table:
                    table = value & 0xFFFF_F000
                    level -= 1
                }
            }

        case .pae, .fourLevel, .fiveLevel:
            var table: UInt64
            var level: Int
            // Address-field reserved bits: 62:M under PAE (no ignored high bits there), M..51 otherwise.
            let addressReserved = machine.mode == .pae ? bits(m, 62) : bits(m, 51)
            if machine.mode == .pae {
                guard address < 1 << 32 else { return (.tooWide, []) }
                let index = Int(address >> 30)
                let value = machine.pdptes[index]
                path.append(RefPathEntry(level: 3, address: (machine.cr3 & 0xFFFF_FFE0) + UInt64(index) * 8,
                                         value: value))
                let entry = RefEntryBits(present: value & 1 != 0)
                entries.append((3, entry))
                if !entry.present { return stopHere() }
                table = value & bits(12, m - 1)
                level = 2
            } else {
                // Canonical: bits 63:(W-1) all equal.
                let width: UInt64 = machine.mode == .fourLevel ? 48 : 57
                let top = address >> (width - 1)
                guard top == 0 || top == (UInt64.max >> (width - 1)) else { return (.generalProtection, []) }
                table = machine.cr3 & bits(12, m - 1)
                level = machine.mode == .fourLevel ? 4 : 5
            }
            while true {
                let shift = UInt64(12 + 9 * (level - 1))
                let entryAddress = table + ((address >> shift) & 0x1FF) * 8
                guard let value = read(entryAddress, 8) else { return (.noMemory(address: entryAddress, level: level), path) }
                path.append(RefPathEntry(level: level, address: entryAddress, value: value))
                let pageSize = value & 0x80 != 0
                var reserved = value & addressReserved != 0
                // A large page's address must be aligned: PAT is bit 12, bits up to the alignment are reserved.
                if pageSize && level == 2 && value & bits(13, 20) != 0 { reserved = true }
                if pageSize && level == 3 && value & bits(13, 29) != 0 { reserved = true }
                let entry = RefEntryBits(present: value & 1 != 0, writable: value & 2 != 0, user: value & 4 != 0,
                                         noExecute: value >> 63 == 1, pageSize: pageSize, otherReservedBits: reserved)
                entries.append((level, entry))
                switch ReferenceRules.classify(entry, level: level, paging: machine.mode.paging, controls: controls) {
                case .notPresent, .reserved: return stopHere()
                case .leaf:
                    let size: UInt64 = 1 << UInt64(12 + 9 * (level - 1))
                    return stopHere(leafValue: value, base: value & bits(12 + 9 * (level - 1), m - 1), size: size)
                case .table:
                    table = value & bits(12, m - 1)
                    level -= 1
                }
            }
        }
    }
}

/// Where a reference walk ended, before the access is considered.
enum RefStructure: Equatable, Sendable {
    /// `leafValue`, `base` and `size` are meaningful only for a `.leaf` stop.
    case stop(RefStop, leafValue: UInt64, base: UInt64, size: UInt64, linearAddress: UInt64)
    case generalProtection
    case noMemory(address: UInt64, level: Int)
    case tooWide

    var linearAddress: UInt64 {
        if case .stop(_, _, _, _, let address) = self { return address }
        return 0
    }
}
