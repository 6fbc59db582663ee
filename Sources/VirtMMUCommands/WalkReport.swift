import Workloads
import X86Paging

/// The name of a paging-structure entry at `level` in `mode`.
func entryName(level: Int, mode: PagingMode) -> String {
    switch level {
    case 5: "PML5E"
    case 4: "PML4E"
    case 3: "PDPTE"
    case 2: "PDE"
    default: "PTE"
    }
}

func sizeName(_ bytes: UInt64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 { return "\(bytes >> 30) GiB" }
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 { return "\(bytes >> 20) MiB" }
    if bytes >= 1 << 10 && bytes % (1 << 10) == 0 { return "\(bytes >> 10) KiB" }
    return "\(bytes) bytes"
}

func accessDescription(_ access: Access, alignmentCheck: Bool) -> String {
    let who: String = switch access.privilege {
    case .user: "user (CPL 3)"
    case .supervisor: alignmentCheck ? "supervisor (RFLAGS.AC=1)" : "supervisor"
    case .implicitSupervisor: "implicit supervisor access"
    }
    return "\(access.kind.name) by \(who)"
}

func permissionsDescription(_ permissions: UInt8) -> String {
    [permissions & 4 != 0 ? "user" : "supervisor-only",
     permissions & 2 != 0 ? "writable" : "read-only",
     permissions & 1 != 0 ? "executable" : "not executable"].joined(separator: ", ")
}

/// Explains one walk: each level read, what it contributed, and the outcome with its reason.
struct WalkExplanation {
    let walker: PageWalker
    let address: GuestVirtualAddress
    let access: Access
    let result: Result<Translation, WalkFault>
    /// Whether A/D bits were written (false: a probe; the report says what a real walk would set).
    let accessedDirtyApplied: Bool
    /// Whether the translated address has memory behind it in the image (a dump may omit it).
    var finalPageBacked = true

    var mode: PagingMode { walker.mode }

    var path: WalkPath? {
        switch result {
        case .success(let translation): translation.path
        case .failure(.pageFault(let fault)): fault.path
        case .failure(.noMemory(_, _, let path)): path
        case .failure: nil
        }
    }

    func decode(_ value: UInt64, level: Int) -> String {
        if mode == .legacy32 { return Legacy32Entry(bits: value).description }
        return Entry64(rawValue: value).description
    }

    /// The entry's own permissions as a short phrase (what it contributes to the AND).
    func contribution(_ value: UInt64, level: Int, isLast: Bool) -> String {
        if level == 3 && mode == .pae { return "selects the page directory" }
        let writable = value & 2 != 0, user = value & 4 != 0
        let executable = mode == .legacy32 || value >> 63 == 0
        let own = [user ? "U" : "S", writable ? "RW" : "RO", executable ? "X" : "NX"].joined(separator: " ")
        return isLast ? "maps the page, allows \(own)" : "points to the next table, allows \(own)"
    }

    var text: String {
        var lines: [String] = []
        lines.append("walk \(address) — \(accessDescription(access, alignmentCheck: walker.registers.rflags.contains(.alignmentCheck)))")
        if let path, path.topLevel > 0 {
            for level in path.levels {
                let value = path.entryValue(level: level)
                let location = path.topIsRegister && level == path.topLevel
                    ? "register (loaded from \(path.entryAddress(level: level)))"
                    : "at \(path.entryAddress(level: level))"
                let width = mode == .legacy32 ? 8 : 16
                let raw = String(value, radix: 16)
                let padded = String(repeating: "0", count: max(0, width - raw.count)) + raw
                var line = "  \(leftAligned(entryName(level: level, mode: mode), to: 6)) \(location)  = 0x\(padded)  \(decode(value, level: level))"
                let isLast = level == path.bottomLevel
                if case .success = result {
                    line += "  -> " + contribution(value, level: level, isLast: isLast)
                }
                lines.append(line)
            }
        }
        lines.append("  " + outcome)
        if case .success(let translation) = result, let updates = accessedDirtyUpdates(translation.path) {
            lines.append("  " + updates)
        }
        return lines.joined(separator: "\n")
    }

    var outcome: String {
        switch result {
        case .success(let translation):
            var text = "ok: \(translation.physicalAddress) (\(sizeName(translation.pageSize)) page"
            text += translation.level > 0 ? " at level \(translation.level))" : ", paging disabled)"
            text += "; \(permissionsDescription(translation.permissions))"
            if mode.isLongMode { text += ", pkey \(translation.protectionKey)" }
            if translation.isGlobal { text += ", global" }
            if !finalPageBacked { text += "; the image holds no memory at \(translation.physicalAddress)" }
            return text
        case .failure(let fault):
            return "fault: " + Self.describe(fault, walker: walker, access: access)
        }
    }

    /// Which A and D bits the walk sets (or, for a probe, would set).
    func accessedDirtyUpdates(_ path: WalkPath) -> String? {
        guard path.topLevel > 0 else { return nil }
        var names: [String] = []
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        for level in stride(from: first, through: path.bottomLevel, by: -1) {
            let value = path.entryValue(level: level)
            if accessedDirtyApplied {
                // The path holds the values after the update; nothing says what was there before.
                continue
            }
            if value & (1 << 5) == 0 { names.append("A in the \(entryName(level: level, mode: mode))") }
            if level == path.bottomLevel && access.kind == .write && value & (1 << 6) == 0 {
                names.append("D in the \(entryName(level: level, mode: mode))")
            }
        }
        if accessedDirtyApplied { return "accessed/dirty bits updated in guest memory" }
        return names.isEmpty ? "A/D: already set; the walk writes nothing"
            : "A/D: the access sets " + names.joined(separator: ", ") + " (this report is a probe and wrote nothing)"
    }

    static func describe(_ fault: WalkFault, walker: PageWalker, access: Access) -> String {
        let mode = walker.mode
        switch fault {
        case .generalProtection(let address):
            return "#GP: \(address) is not canonical for \(mode.linearAddressWidth)-bit linear addresses (bits 63:\(mode.linearAddressWidth - 1) must be equal)"
        case .addressTooWide(let address, let width):
            return "invalid query: \(address) does not fit the \(width)-bit linear addresses of \(mode.displayName)"
        case .noMemory(let address, let level, _):
            return "no memory: the \(entryName(level: level, mode: mode)) would be read from \(address), where the image has no memory"
        case .pageFault(let pageFault):
            let head = "#PF error code \(pageFault.errorCode)"
            let name = entryName(level: pageFault.level, mode: mode)
            if !pageFault.errorCode.contains(.present) {
                return "\(head) — the \(name) is not present"
            }
            if pageFault.errorCode.contains(.reservedBit) {
                let value = pageFault.path.entryValue(level: pageFault.level)
                let bits = walker.reservedBitsSet(in: value, level: pageFault.level)
                return "\(head) — the \(name) sets reserved bits \(hex(bits))"
            }
            return "\(head) — " + reasons(pageFault, walker: walker, access: access).joined(separator: "; ")
        }
    }

    static func reasons(_ fault: PageFault, walker: PageWalker, access: Access) -> [String] {
        let mode = walker.mode
        let path = fault.path
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        let levels = Array(stride(from: first, through: path.bottomLevel, by: -1))
        func levelsWhere(_ predicate: (UInt64) -> Bool) -> String {
            let names = levels.filter { predicate(path.entryValue(level: $0)) }.map { entryName(level: $0, mode: mode) }
            return names.isEmpty ? "" : " (at the " + names.joined(separator: ", ") + ")"
        }
        let registers = walker.registers
        var reasons: [String] = []
        if fault.violations.contains(.readOnly) {
            let who = access.privilege == .user ? "user write" : "supervisor write with CR0.WP=1"
            reasons.append("\(who) to a read-only page\(levelsWhere { $0 & 2 == 0 })")
        }
        if fault.violations.contains(.supervisorOnly) {
            reasons.append("user access to a supervisor-only page\(levelsWhere { $0 & 4 == 0 })")
        }
        if fault.violations.contains(.noExecute) {
            reasons.append("fetch from a non-executable page\(levelsWhere { $0 >> 63 != 0 })")
        }
        if fault.violations.contains(.smep) {
            reasons.append("supervisor fetch from a user page with CR4.SMEP=1")
        }
        if fault.violations.contains(.smap) {
            let why = access.privilege == .implicitSupervisor ? "an implicit access, which RFLAGS.AC cannot exempt" : "RFLAGS.AC=0"
            reasons.append("supervisor data access to a user page with CR4.SMAP=1 (\(why))")
        }
        if fault.violations.contains(.protectionKey) {
            let key = Int((path.entryValue(level: path.bottomLevel) >> 59) & 0xF)
            let userPage = fault.violations.contains(.supervisorOnly) ? false : levels.allSatisfy { path.entryValue(level: $0) & 4 != 0 }
            let register = userPage ? "PKRU" : "PKRS"
            let rights = userPage ? registers.pkru.rights(forKey: key) : registers.pkrs.rights(forKey: key)
            let what = rights & 1 != 0 ? "AD=1 (access disabled)" : "WD=1 (write disabled)"
            reasons.append("protection key \(key): \(register) \(what)")
        }
        return reasons.isEmpty ? ["permission fault"] : reasons
    }

    var json: String {
        var object = JSONObject()
        object.add("gva", hex(address.rawValue))
        object.add("access", access.kind.name)
        object.add("privilege", access.privilege == .user ? "user" : access.privilege == .supervisor ? "supervisor" : "implicit")
        object.add("mode", mode.rawValue)
        switch result {
        case .success(let translation):
            object.add("ok", true)
            object.add("gpa", hex(translation.physicalAddress.rawValue))
            object.add("level", translation.level)
            object.add("page_size", Int(translation.pageSize))
            object.add("writable", translation.isWritable)
            object.add("user", translation.isUser)
            object.add("nx", !translation.isExecutable)
            object.add("pkey", translation.protectionKey)
            object.add("global", translation.isGlobal)
            object.add("gpa_in_image", finalPageBacked)
        case .failure(let fault):
            object.add("ok", false)
            switch fault {
            case .pageFault(let pageFault):
                object.add("fault", "pf")
                object.add("error_code", hex(pageFault.errorCode.architectural))
                object.add("level", pageFault.level)
            case .generalProtection:
                object.add("fault", "gp")
                object.add("error_code", "0x0")
            case .noMemory(let gpa, let level, _):
                object.add("fault", "no_memory")
                object.add("gpa", hex(gpa.rawValue))
                object.add("level", level)
            case .addressTooWide:
                object.add("fault", "invalid")
            }
            object.add("reason", Self.describe(fault, walker: walker, access: access))
        }
        if let path {
            let entries = path.levels.map { level -> String in
                var entry = JSONObject()
                entry.add("level", level)
                entry.add("name", entryName(level: level, mode: mode))
                entry.add("entry_gpa", hex(path.entryAddress(level: level).rawValue))
                entry.add("value", hex(path.entryValue(level: level)))
                return entry.text
            }
            object.addRaw("path", "[" + entries.joined(separator: ",") + "]")
        }
        return object.text
    }
}

/// The JSON writer the run reports use too.
typealias JSONObject = JSONLine

/// A JSON string literal.
func quoted(_ text: String) -> String { jsonString(text) }

/// `text` left-aligned in a field of `width` characters.
func leftAligned(_ text: String, to width: Int) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
}
