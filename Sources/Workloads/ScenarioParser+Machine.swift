// The directives that drive the machine beyond one address space: the host's paging depth, address
// spaces and CR3 loads, INVPCID, and raw control-register writes; and `expect`, which states the
// counters a run must reach. Grammar in ScenarioParser.swift.

import GuestMemory
import VirtualMachine
import X86Paging

extension DirectiveArguments {
    mutating func parseHost() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let options = try options(["levels"])
        guard let token = options["levels"] else { throw error("expected levels=4|5 (usage: \(spec.usage))") }
        let levels = Int(try number(token, what: "levels", in: 4...5))
        return .host(levels: levels)
    }

    /// A space name: letters, digits, `_`, `-` and `.` (no `=`, so it is never taken for an option).
    private func spaceName(_ token: Token) throws(ScenarioError) -> String {
        let valid = token.text.unicodeScalars.allSatisfy { scalar in
            scalar.isASCII && (scalar.properties.isAlphabetic || ("0"..."9").contains(scalar) || "_-.".unicodeScalars.contains(scalar))
        }
        guard valid else {
            throw error("a space name is letters, digits, '_', '-' and '.', not '\(token.text)'", at: token)
        }
        return token.text
    }

    /// `vcpu N`: vCPUs are brought up in order, so N is one already up or the next one.
    mutating func parseVCPU() throws(ScenarioError) -> ScenarioDirective {
        let token = try positional(["N"])[0]
        try noOptions()
        let index = Int(try number(token, what: "vCPU", in: 0...UInt64(Scenario.maximumVCPUs - 1)))
        guard index <= state.vcpus.count else {
            throw error("vCPU \(index) cannot come up before vCPU \(state.vcpus.count) (vCPUs are brought up in order; "
                        + "\(state.vcpus.count) so far)", at: token)
        }
        return .vcpu(index)
    }

    mutating func parseSpace() throws(ScenarioError) -> ScenarioDirective {
        let name = try spaceName(try positional(["NAME"])[0])
        try noOptions()
        return .space(name)
    }

    mutating func parseSwitch() throws(ScenarioError) -> ScenarioDirective {
        let nameToken = try positional(["NAME"])[0]
        let name = try spaceName(nameToken)
        let options = try options(["pcid"], words: ["noflush"])
        guard state.spaces.contains(name) else {
            let known = state.spaces.sorted().joined(separator: ", ")
            throw error("no address space '\(name)' (spaces so far: \(known); `space NAME` creates one)", at: nameToken)
        }
        var pcid: UInt16 = 0
        if let token = options["pcid"] { pcid = UInt16(try number(token, what: "pcid", in: 0...4095)) }
        let noFlush = options["noflush"] != nil
        if (pcid != 0 || noFlush) && !state.registers.cr4.contains(.pcidEnable) {
            let what = pcid != 0 ? "pcid=\(pcid)" : "noflush"
            throw error("\(what) needs CR4.PCIDE (set pcid=1): without it CR3 has no PCID and bit 63 must be 0",
                        at: options["pcid"] ?? options["noflush"])
        }
        return .switchSpace(name: name, pcid: pcid, noFlush: noFlush)
    }

    mutating func parseINVPCID() throws(ScenarioError) -> ScenarioDirective {
        let typeToken = try positional(["TYPE"])[0]
        let options = try options(["pcid", "gva"])
        let word = asciiLowercased(typeToken.text)
        guard let type = INVPCIDType.allCases.first(where: { $0.scenarioName == word || "\($0.rawValue)" == word }) else {
            throw error("INVPCID type must be 0, 1, 2, 3, individual, single, all or all-nonglobal, not '\(typeToken.text)'",
                        at: typeToken)
        }
        // Any 64-bit PCID and address: values the instruction refuses are how a scenario asks for the #GP.
        let pcid = try options["pcid"].map { (token: Token) throws(ScenarioError) in try number(token, what: "pcid") } ?? 0
        var gva: UInt64 = 0
        if let token = options["gva"] {
            guard type == .individualAddress else {
                throw error("gva= is for an individual-address INVPCID (type 0) only", at: token)
            }
            gva = try operationAddress(token, what: "gva")
        }
        if options["pcid"] != nil && (type == .allContextsIncludingGlobal || type == .allContextsExceptGlobal) {
            throw error("pcid= is for the individual and single types; \(type.scenarioName) covers every PCID",
                        at: options["pcid"])
        }
        return .invpcid(type, pcid: pcid, gva: GuestVirtualAddress(gva))
    }

    mutating func parseZap() throws(ScenarioError) -> ScenarioDirective {
        guard let scopeToken = tokens.first else { throw error("missing all or gfn (usage: \(spec.usage))") }
        switch asciiLowercased(scopeToken.text) {
        case "all":
            _ = try positional(["all"])
            try noOptions()
            return .zap(.all)
        case "gfn":
            let (first, count) = try gfnRange(after: "gfn", firstName: "FIRST")
            return .zap(.gfns(first: first, count: count))
        default:
            throw error("zap takes all or gfn, not '\(scopeToken.text)' (usage: \(spec.usage))", at: scopeToken)
        }
    }

    mutating func parseAge() throws(ScenarioError) -> ScenarioDirective {
        guard let operation = tokens.first else { throw error("missing clear or test (usage: \(spec.usage))") }
        let testOnly: Bool
        switch asciiLowercased(operation.text) {
        case "clear": testOnly = false
        case "test": testOnly = true
        default: throw error("age takes clear or test, not '\(operation.text)' (usage: \(spec.usage))", at: operation)
        }
        let (first, count) = try gfnRange(after: "clear|test", firstName: "GFN")
        return .age(testOnly: testOnly, first: first, count: count)
    }

    /// `prefault GPA SIZE [flags=N]`. Any 64-bit values: an unaligned, empty or wrapping range and
    /// nonzero flags are KVM's to refuse (-EINVAL), which is what such a line is for.
    mutating func parsePreFault() throws(ScenarioError) -> ScenarioDirective {
        let arguments = try positional(["GPA", "SIZE"])
        let options = try options(["flags"])
        let gpa = try number(arguments[0], what: "GPA")
        let size = try byteSize(arguments[1])
        let flags = try options["flags"].map { (token: Token) throws(ScenarioError) in try number(token, what: "flags") } ?? 0
        return .preFault(gpa: GuestPhysicalAddress(gpa), size: size, flags: flags)
    }

    /// `WORD FIRST [COUNT]`: a range of gfns, one by default, that does not wrap.
    private mutating func gfnRange(after word: String, firstName: String) throws(ScenarioError) -> (first: UInt64, count: UInt64) {
        let hasCount = tokens.count > 2 && !tokens[2].text.contains("=")
        let arguments = try positional(hasCount ? [word, firstName, "COUNT"] : [word, firstName])
        try noOptions()
        let first = try number(arguments[1], what: firstName)
        let count = hasCount ? try number(arguments[2], what: "COUNT", in: 1...(1 << 40)) : 1
        guard first <= UInt64.max - count else { throw error("the gfn range overflows", at: arguments.last) }
        return (first, count)
    }

    /// A size in bytes: a number with an optional K, M or G suffix.
    private func byteSize(_ token: Token) throws(ScenarioError) -> UInt64 {
        switch parseSize(token.text) {
        case .value(let value): return value
        case .invalid: throw error("'\(token.text)' is not a size (a number with an optional K, M or G suffix)", at: token)
        case .overflow: throw error("'\(token.text)' does not fit in 64 bits", at: token)
        }
    }

    private func slotID(_ token: Token) throws(ScenarioError) -> Int {
        Int(try number(token, what: "SLOT", in: 0...UInt64(MemslotSet.slotLimit - 1)))
    }

    private func pageAligned(_ token: Token, what: String) throws(ScenarioError) -> UInt64 {
        let value = try number(token, what: what)
        guard value & 0xFFF == 0 else { throw error("\(what) \(hex(value)) is not a multiple of 4 KiB", at: token) }
        return value
    }

    mutating func parseMemslot() throws(ScenarioError) -> ScenarioDirective {
        guard let verb = tokens.first else { throw error("missing add, delete, move or flags (usage: \(spec.usage))") }
        switch asciiLowercased(verb.text) {
        case "add":
            let arguments = try positional(["add", "SLOT", "GPA", "SIZE"])
            let options = try options([], words: ["readonly"])
            let base = try pageAligned(arguments[2], what: "GPA")
            let size = try byteSize(arguments[3])
            guard size > 0, size & 0xFFF == 0 else {
                throw error("a memslot's size must be a positive multiple of 4 KiB, not '\(arguments[3].text)'", at: arguments[3])
            }
            return .memslot(.add(slot: try slotID(arguments[1]), base: GuestPhysicalAddress(base), size: size,
                                 readOnly: options["readonly"] != nil))
        case "delete":
            let arguments = try positional(["delete", "SLOT"])
            try noOptions()
            return .memslot(.delete(slot: try slotID(arguments[1])))
        case "move":
            let arguments = try positional(["move", "SLOT", "GPA"])
            try noOptions()
            return .memslot(.move(slot: try slotID(arguments[1]), base: GuestPhysicalAddress(try pageAligned(arguments[2], what: "GPA"))))
        case "flags":
            let arguments = try positional(["flags", "SLOT"])
            let options = try options(["log-dirty"])
            guard let token = options["log-dirty"] else { throw error("expected log-dirty=0|1 (usage: \(spec.usage))") }
            return .memslot(.flags(slot: try slotID(arguments[1]), logDirty: try bool(token, what: "log-dirty")))
        default:
            throw error("memslot takes add, delete, move or flags, not '\(verb.text)' (usage: \(spec.usage))", at: verb)
        }
    }

    mutating func parseDirtyLog() throws(ScenarioError) -> ScenarioDirective {
        guard let verb = tokens.first else { throw error("missing enable, disable, mode, get or clear (usage: \(spec.usage))") }
        switch asciiLowercased(verb.text) {
        case "enable", "disable":
            let arguments = try positional([verb.text, "SLOT"])
            try noOptions()
            return .dirtyLog(.setLogging(slot: try slotID(arguments[1]), enabled: asciiLowercased(verb.text) == "enable"))
        case "mode":
            let arguments = try positional(["mode", "PROTOCOL"])
            let options = try options(["entries"])
            guard let mode = DirtyLogProtocol(rawValue: asciiLowercased(arguments[1].text)) else {
                throw error("the dirty-log mode is reset, manual or ring, not '\(arguments[1].text)'", at: arguments[1])
            }
            var entries = 4096
            if let token = options["entries"] {
                guard mode == .ring else { throw error("entries= is for the ring mode", at: token) }
                let value = try number(token, what: "entries", in: 256...UInt64(DirtyRing.maximumEntries))
                guard value & (value - 1) == 0 else { throw error("entries must be a power of two, not \(value)", at: token) }
                entries = Int(value)
            }
            return .dirtyLog(.mode(mode, ringEntries: entries))
        case "get":
            let arguments = try positional(["get", "SLOT"])
            try noOptions()
            return .dirtyLog(.get(slot: try slotID(arguments[1])))
        case "clear":
            let arguments = try positional(["clear", "SLOT", "FIRST", "COUNT"])
            try noOptions()
            return .dirtyLog(.clear(slot: try slotID(arguments[1]), first: try number(arguments[2], what: "FIRST"),
                                    count: try number(arguments[3], what: "COUNT")))
        default:
            throw error("dirty-log takes enable, disable, mode, get or clear, not '\(verb.text)' (usage: \(spec.usage))", at: verb)
        }
    }

    mutating func parseRegisterWrite(_ register: ControlRegister) throws(ScenarioError) -> ScenarioDirective {
        let valueToken = try positional(["VALUE"])[0]
        try noOptions()
        let value = try number(valueToken, what: "VALUE")
        if register != .efer && value >> 32 != 0 {
            // Bits 63:32 of CR0 and CR4 are reserved (a MOV setting them faults).
            throw error("#GP: \(register.rawValue) bits 63:32 are reserved, not \(hex(value))", at: valueToken)
        }
        return .writeRegister(register, value: value)
    }

    mutating func parseCR3() throws(ScenarioError) -> ScenarioDirective {
        let valueToken = try positional(["VALUE"])[0]
        let options = try options([], words: ["noflush"])
        let value = try number(valueToken, what: "VALUE")
        let noFlush = options["noflush"] != nil
        if value & PagingRegisters.cr3NoFlushBit != 0 {
            throw error("bit 63 is the no-flush flag, not part of CR3: write `cr3 \(hex(value & ~PagingRegisters.cr3NoFlushBit)) noflush`",
                        at: valueToken)
        }
        if noFlush && !state.registers.cr4.contains(.pcidEnable) {
            throw error("noflush needs CR4.PCIDE (set pcid=1)", at: options["noflush"])
        }
        return .loadCR3(value: value, noFlush: noFlush)
    }
}

extension DirectiveArguments {
    /// `expect NAME=N...`: at least one counter, each named once, values in source order.
    mutating func parseExpect() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let names = ExpectedCounter.names
        var counters: [ExpectedCounter] = []
        var seen: [String: Token] = [:]
        for token in tokens {
            let parts = token.text.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else {
                throw error("expected NAME=N, not '\(token.text)' (usage: \(spec.usage))", at: token)
            }
            let name = asciiLowercased(String(parts[0]))
            guard names.contains(name) else {
                throw error("unknown counter '\(parts[0])' (counters: \(names.joined(separator: ", ")))", at: token)
            }
            if let first = seen[name] {
                throw error("counter '\(name)' given twice (first at column \(first.column))", at: token)
            }
            seen[name] = token
            let value = Token(text: String(parts[1]), column: token.column + parts[0].unicodeScalars.count + 1)
            guard !value.text.isEmpty else { throw error("\(name): missing value after '='", at: token) }
            counters.append(ExpectedCounter(name: name, value: try number(value, what: name)))
        }
        guard !counters.isEmpty else { throw error("expected at least one NAME=N (usage: \(spec.usage))") }
        return .expect(counters)
    }
}
