// How a scenario run is shown: JSON Lines that other tools read, and a readable text report. Both
// are what `virtmmu run` prints; docs/SCENARIOS.md describes the JSON Lines format for users.
//
// JSON LINES (one object per line; keys always present and in this order; addresses, values and
// error codes as lowercase "0x..." hex strings; numbers that count things as JSON integers)
//
//   {"type":"access","i":0,"line":2,"op":"read","cpl":3,"gva":"0x400000","fault":false,
//    "error_code":"0x0","cr2":"0x0","gpa":"0x1000000","value":"0x0",
//    "exception":"none","mmio":false,"exits":1,"emulated":false,"tlb_hit":false,"exit":"none"}
//       one per `access` and `pte` directive, in order (`i` counts them from 0; `op` is read, write,
//       exec or pte). A completed access: fault false, error_code and cr2 "0x0", gpa and value those
//       of the access (the value read, or the value written; for `pte` the new entry). A #PF: fault
//       true, exception "pf", the architectural error code and CR2, gpa and value "0x0". A #GP (a
//       non-canonical address): fault true, exception "gp", error_code "0x0", cr2 "0x0" (a #GP does
//       not write CR2), gpa and value "0x0". An access to a GPA outside every memslot: fault false,
//       mmio true, gpa the MMIO address, value the value written or read (all ones). A write sub-page
//       write protection refused (KVM_EXIT_SPP; memory unchanged): fault false, exit "spp", gpa the
//       refused address, value "0x0"; exit is "none" for everything else.
//   {"type":"spp","gfn":"0x1000","mask":"0xffff00ff"}
//       one per `spp get`, placed among the access lines where it ran.
//   {"type":"dirty","slot":1,"gfns":["0x10000","0x10003"]}
//       one per `dirty-log get`, placed among the access lines where it ran: the gfns reported,
//       ascending.
//   {"type":"age","op":"clear","gfn":"0x4000","count":16,"young":true}
//       one per `age` line (op clear or test), placed among the access lines where it ran: whether
//       any leaf SPTE mapping the gfns was accessed.
//   {"type":"prefault","gpa":"0x1000000","size":"0x200000","mapped":"0x200000","result":"ok"}
//       one per `prefault` line, placed among the access lines where it ran: the range given, the
//       bytes mapped (or found mapped) from its start, and how the last KVM_PRE_FAULT_MEMORY call
//       returned: ok, or its errno (EINVAL, EOPNOTSUPP, ENOENT, EBUSY).
//   {"type":"l1_map","guest":0,"l2gpa":"0x200000","l1gpa":"0x2200000","size":"4k","perms":"RWX"}
//       one per page L1's exit handler mapped for an `ept-demand` range, after the access line of
//       the exit it handled (and before the access line of the instruction executed again).
//   {"type":"pte","gva":"0x400000","level":4,"entry_gpa":"0x100000","value":"0x101067","A":1,"D":0,
//    "P":1,"leaf":false}
//       every entry of every mapped translation at the end of the run, top level first per mapping
//       (`map` order); "A" and "D" are bits 5 and 6 of the entry as it stands (bit 6 of a table entry
//       is ignored by the processor), "leaf" marks the entry that maps the page.
//   {"type":"stats","phase":"before","values":{"remote_tlb_flush":0,...}}
//       three lines, phases before, after and delta; every counter, KVM's names in MMUStats order.
//       delta is after minus before for cumulative counters, and the final value for instant
//       counters (mmu_unsync, pages_*, nx_lpage_splits) and peak counters (max_*).
//   {"type":"error","status":"disagreement","line":9,"message":"...", ...}
//       only when the run failed (see `errorJSON`).
//   {"type":"result","status":"ok","scenario":"x.vmm","operations":4,"lockstep_checks":5,
//    "shadow_pages":{"1":1,"2":1,"3":1,"4":1}}
//       always last: status ok, disagreement, broken_invariant or bad_scenario; shadow pages alive
//       at the end by level.

import KVMMMU
import VirtualMachine
import X86Paging

// MARK: JSON Lines

extension RunReport {
    /// The whole report as JSON Lines, each line ending in a newline: accesses, guest entries, the
    /// three stats lines, then (when `failure` is given) an error line, and a result line last.
    public func jsonLines(failure: RunFailure? = nil) -> String {
        var text = ""
        var dirtyLogs = self.dirtyLogs[...]
        var subPageMasks = self.subPageMasks[...]
        var ages = self.ages[...]
        var l1Maps = self.l1Maps[...]
        var preFaults = self.preFaults[...]
        for access in accesses {
            while let record = preFaults.first, record.precedingOperations <= access.index {
                text += Self.preFaultJSON(record) + "\n"
                preFaults = preFaults.dropFirst()
            }
            while let record = l1Maps.first, record.precedingOperations <= access.index {
                text += Self.l1MapJSON(record) + "\n"
                l1Maps = l1Maps.dropFirst()
            }
            while let record = ages.first, record.precedingOperations <= access.index {
                text += Self.ageJSON(record) + "\n"
                ages = ages.dropFirst()
            }
            while let log = dirtyLogs.first, log.precedingOperations <= access.index {
                text += Self.dirtyJSON(log) + "\n"
                dirtyLogs = dirtyLogs.dropFirst()
            }
            while let record = subPageMasks.first, record.precedingOperations <= access.index {
                text += Self.subPageMaskJSON(record) + "\n"
                subPageMasks = subPageMasks.dropFirst()
            }
            text += Self.accessJSON(access) + "\n"
            for event in access.events { text += Self.eventJSON(event, operation: access.index) + "\n" }
        }
        for log in dirtyLogs { text += Self.dirtyJSON(log) + "\n" }
        for record in subPageMasks { text += Self.subPageMaskJSON(record) + "\n" }
        for record in ages { text += Self.ageJSON(record) + "\n" }
        for record in l1Maps { text += Self.l1MapJSON(record) + "\n" }
        for record in preFaults { text += Self.preFaultJSON(record) + "\n" }
        for (index, entry) in entries.enumerated() { text += Self.entryJSON(entry, isLeaf: isLeaf(entryAt: index)) + "\n" }
        text += Self.statsJSON(phase: "before", statsBefore) + "\n"
        text += Self.statsJSON(phase: "after", statsAfter) + "\n"
        text += Self.statsJSON(phase: "delta", statsAfter.delta(from: statsBefore)) + "\n"
        if let failure { text += Self.errorJSON(failure) + "\n" }
        text += resultJSON(status: failure.map { Self.status(of: $0) } ?? "ok") + "\n"
        return text
    }

    /// The `"type":"dirty"` line of one `dirty-log get`.
    public static func dirtyJSON(_ log: DirtyLogRecord) -> String {
        var object = JSONLine()
        object.add("type", "dirty")
        object.add("slot", log.slot)
        object.addRaw("gfns", "[" + log.gfns.map { jsonString(hex($0.rawValue)) }.joined(separator: ",") + "]")
        return object.text
    }

    /// The `"type":"age"` line of one `age clear` or `age test`.
    public static func ageJSON(_ record: AgeRecord) -> String {
        var object = JSONLine()
        object.add("type", "age")
        object.add("op", record.testOnly ? "test" : "clear")
        object.addHex("gfn", record.first)
        object.add("count", Int(record.count))
        object.add("young", record.young)
        return object.text
    }

    /// The `"type":"prefault"` line of one `prefault`.
    public static func preFaultJSON(_ record: PreFaultRecord) -> String {
        var object = JSONLine()
        object.add("type", "prefault")
        object.addHex("gpa", record.gpa.rawValue)
        object.addHex("size", record.size)
        object.addHex("mapped", record.mapped)
        object.add("result", record.error?.errnoName ?? "ok")
        return object.text
    }

    /// The `"type":"l1_map"` line of a page L1's exit handler mapped for an `ept-demand` range.
    public static func l1MapJSON(_ record: L1MapRecord) -> String {
        var object = JSONLine()
        object.add("type", "l1_map")
        object.add("guest", record.map.guest)
        object.addHex("l2gpa", record.map.l2GPA.rawValue)
        object.addHex("l1gpa", record.map.l1GPA.rawValue)
        object.add("size", record.map.pageSize.name)
        object.add("perms", record.map.permissions.rendered)
        return object.text
    }

    /// The `"type":"spp"` line of one `spp get`.
    public static func subPageMaskJSON(_ record: SubPageMaskRecord) -> String {
        var object = JSONLine()
        object.add("type", "spp")
        object.addHex("gfn", record.gfn.rawValue)
        object.addHex("mask", UInt64(record.mask.rawValue))
        return object.text
    }

    /// The `"type":"access"` line of one guest operation.
    public static func accessJSON(_ record: AccessRecord) -> String {
        var fault = false, exception = "none", mmio = false, exit = "none"
        var errorCode: UInt64 = 0, cr2: UInt64 = 0, gpa: UInt64 = 0, value: UInt64 = 0
        switch record.outcome.result {
        case .completed(let address, let data):
            gpa = address.rawValue
            value = data
        case .pageFault(let code, let faultAddress):
            fault = true
            exception = "pf"
            errorCode = UInt64(code.architectural)
            cr2 = faultAddress.rawValue
        case .generalProtection:
            fault = true
            exception = "gp"
        case .mmio(let address, let data):
            mmio = true
            gpa = address.rawValue
            value = data
        case .subPageWriteExit(let address):
            exit = "spp"
            gpa = address.rawValue
        }
        var object = JSONLine()
        object.add("type", "access")
        object.add("i", record.index)
        object.add("line", record.line)
        object.add("op", record.operation)
        object.add("cpl", record.cpl)
        object.addHex("gva", record.gva.rawValue)
        object.add("fault", fault)
        object.addHex("error_code", errorCode)
        object.addHex("cr2", cr2)
        object.addHex("gpa", gpa)
        object.addHex("value", value)
        object.add("exception", exception)
        object.add("mmio", mmio)
        object.add("exits", record.outcome.exits)
        object.add("emulated", record.outcome.emulated)
        object.add("tlb_hit", record.outcome.tlbHit)
        if record.inL2 { object.add("l2", true) }
        switch record.exitToL1 {
        case .eptViolation(_, let qualification)?:
            object.add("exit", "ept_violation")
            object.addHex("exit_qualification", qualification.rawValue)
        case .eptMisconfiguration?:
            object.add("exit", "ept_misconfig")
            object.addHex("exit_qualification", 0)
        case .nestedPageFault(_, let errorCode)?:
            object.add("exit", "npf")
            object.addHex("exit_info1", errorCode.rawValue)
        case nil:
            object.add("exit", exit)
        }
        return object.text
    }

    /// An operation's outcome for the terminal: an L2 access's exit to L1, or the guest's outcome.
    static func outcomeText(_ record: AccessRecord) -> String {
        guard let exit = record.exitToL1 else { return (record.inL2 ? "L2 " : "") + outcomeText(record.outcome.result) }
        return exitText(exit)
    }

    /// An L2 VM exit to L1 for the terminal.
    static func exitText(_ exit: NestedVMExit) -> String {
        switch exit {
        case .eptViolation(let gpa, let qualification):
            "exit to L1: EPT violation at L2 gpa \(hex(gpa.rawValue)), qualification \(hex(qualification.rawValue))"
        case .eptMisconfiguration(let gpa): "exit to L1: EPT misconfiguration at L2 gpa \(hex(gpa.rawValue))"
        case .nestedPageFault(let gpa, let errorCode):
            "exit to L1: #NPF at L2 gpa \(hex(gpa.rawValue)), EXITINFO1 \(hex(errorCode.rawValue))"
        }
    }

    /// The `"type":"pte"` line of one guest entry.
    public static func entryJSON(_ entry: EntryRecord, isLeaf: Bool) -> String {
        var object = JSONLine()
        object.add("type", "pte")
        object.addHex("gva", entry.gva.rawValue)
        object.add("level", entry.level)
        object.addHex("entry_gpa", entry.address.rawValue)
        object.addHex("value", entry.value)
        object.add("A", Int((entry.value >> 5) & 1))
        object.add("D", Int((entry.value >> 6) & 1))
        object.add("P", Int(entry.value & 1))
        object.add("leaf", isLeaf)
        return object.text
    }

    /// A `"type":"stats"` line: every counter under KVM's name, in `MMUStats.values` order.
    public static func statsJSON(phase: String, _ stats: MMUStats) -> String {
        var object = JSONLine()
        object.add("type", "stats")
        object.add("phase", phase)
        object.addRaw("values", stats.jsonObject)
        return object.text
    }

    /// The `"type":"error"` line of a failed run: its status, the line of the directive that failed
    /// and the message. A disagreement adds what was accessed, both outcomes and the guest entries
    /// involved: `"gva"`, `"access"` (read, write or exec), `"privilege"` (user, supervisor or
    /// implicit), `"expected"` (what the architecture allows), `"actual"` (what the virtualized guest
    /// saw), `"entries":[{"level":N,"entry_gpa":"0x..","value":"0x.."},...]`.
    public static func errorJSON(_ failure: RunFailure) -> String {
        var object = JSONLine()
        object.add("type", "error")
        object.add("status", status(of: failure))
        switch failure {
        case .badScenario(let line, let message):
            object.add("line", line)
            object.add("message", message)
        case .brokenInvariant(let line, let message, _):
            object.add("line", line)
            object.add("message", "broken invariant: " + message)
        case .unmetExpectation(let line, let message, _):
            object.add("line", line)
            object.add("message", "unmet expectation: " + message)
        case .disagreement(let line, let disagreement, _):
            object.add("line", line)
            object.add("message", disagreement.description)
            object.addHex("gva", disagreement.address.rawValue)
            object.add("access", disagreement.access.kind.scenarioName)
            object.add("privilege", privilegeName(disagreement.access.privilege))
            object.add("expected", disagreement.expected)
            object.add("actual", disagreement.actual)
            let entries = disagreement.entries.map { entry in
                var item = JSONLine()
                item.add("level", entry.level)
                item.addHex("entry_gpa", entry.gpa.rawValue)
                item.addHex("value", entry.value)
                return item.text
            }
            object.addRaw("entries", "[" + entries.joined(separator: ",") + "]")
        }
        return object.text
    }

    /// The `"type":"result"` line, always the last: the status, the scenario's name, how many guest
    /// operations were recorded, how many accesses the reference machine checked, and the shadow
    /// pages alive at the end by level.
    public func resultJSON(status: String) -> String {
        var object = JSONLine()
        object.add("type", "result")
        object.add("status", status)
        object.add("scenario", scenario)
        if mmu != "shadow" { object.add("mmu", mmu) }
        object.add("operations", accesses.count)
        object.add("lockstep_checks", lockstepChecks)
        let pages = shadowPagesByLevel.keys.sorted().map { "\"\($0)\":\(shadowPagesByLevel[$0]!)" }
        object.addRaw("shadow_pages", "{" + pages.joined(separator: ",") + "}")
        return object.text
    }

    /// The status word of a failure: `bad_scenario`, `disagreement`, `broken_invariant` or
    /// `unmet_expectation`.
    public static func status(of failure: RunFailure) -> String {
        switch failure {
        case .badScenario: "bad_scenario"
        case .disagreement: "disagreement"
        case .brokenInvariant: "broken_invariant"
        case .unmetExpectation: "unmet_expectation"
        }
    }

    private static func privilegeName(_ privilege: Privilege) -> String {
        switch privilege {
        case .user: "user"
        case .supervisor: "supervisor"
        case .implicitSupervisor: "implicit"
        }
    }

    /// Whether `entries[index]` maps its page: it is present and it is the last entry of its
    /// mapping's walk (the next entry belongs to another mapping: another GVA, or a walk that starts
    /// again at the top).
    public func isLeaf(entryAt index: Int) -> Bool {
        let entry = entries[index]
        guard entry.value & 1 != 0 else { return false }
        guard index + 1 < entries.count else { return true }
        let next = entries[index + 1]
        return next.gva != entry.gva || next.level >= entry.level
    }
}

/// A flat JSON object written key by key, in insertion order, with strings escaped.
/// A flat JSON object written field by field, keys in insertion order (the order the JSON formats
/// pin, which a dictionary-based encoder would not keep). Shared by every JSON Lines output.
public struct JSONLine {
    private var fields: [String] = []

    public init() {}

    public mutating func add(_ key: String, _ value: String) { fields.append(jsonString(key) + ":" + jsonString(value)) }
    public mutating func add(_ key: String, _ value: Int) { fields.append(jsonString(key) + ":" + String(value)) }
    public mutating func add(_ key: String, _ value: Bool) { fields.append(jsonString(key) + ":" + (value ? "true" : "false")) }
    public mutating func addHex(_ key: String, _ value: UInt64) { add(key, hex(value)) }
    /// `json` must already be valid JSON.
    public mutating func addRaw(_ key: String, _ json: String) { fields.append(jsonString(key) + ":" + json) }

    public var text: String { "{" + fields.joined(separator: ",") + "}" }
}

/// `text` as a JSON string literal: quotes, backslashes and control characters escaped.
public func jsonString(_ text: String) -> String {
    var result = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": result += "\\\""
        case "\\": result += "\\\\"
        case "\n": result += "\\n"
        case "\r": result += "\\r"
        case "\t": result += "\\t"
        default:
            if scalar.value < 0x20 || scalar.value == 0x7F {
                let digits = String(scalar.value, radix: 16)
                result += "\\u" + String(repeating: "0", count: 4 - digits.count) + digits
            } else {
                result.unicodeScalars.append(scalar)
            }
        }
    }
    return result + "\""
}

extension RunReport {
    /// `{"type":"event","i":N,"seq":N,"name":"kvm_mmu_get_page","text":"..."}`: one MMU event
    /// (named after KVM's tracepoint, printed as its TP_printk does) of operation `i`, with `--trace`.
    static func eventJSON(_ record: MMUEventRecord, operation: Int) -> String {
        var object = JSONLine()
        object.add("type", "event")
        object.add("i", operation)
        object.add("seq", Int(record.sequence))
        object.add("name", record.event.name)
        object.add("text", record.event.description)
        return object.text
    }
}

// MARK: Text

extension RunReport {
    /// The readable report: one line per guest operation, the guest's entries at the end, the
    /// statistics that are not zero (before, after, delta), the shadow pages alive at the end, and
    /// the lockstep verdict (or, when `failure` is given, what went wrong).
    public func text(failure: RunFailure? = nil, pagingMode: PagingMode? = nil) -> String {
        var out = "Scenario \(scenario)"
        if let pagingMode { out += " (\(pagingMode.displayName), \(mmu == "tdp" ? "TDP MMU (EPT)" : mmu == "npt" ? "TDP MMU (NPT)" : "shadow MMU"))" }
        out += "\n\n"

        out += "Guest operations (\(accesses.count)):\n"
        if accesses.isEmpty {
            out += "  (none)\n"
        } else {
            var table = TextTable(header: ["#", "line", "op", "cpl", "gva", "outcome", "exits", "notes"])
            for access in accesses {
                table.add([String(access.index), String(access.line), access.operation, String(access.cpl),
                           hex(access.gva.rawValue), Self.outcomeText(access),
                           String(access.outcome.exits), Self.notes(access.outcome)])
            }
            out += table.render(indent: "  ")
        }
        let traced = accesses.filter { !$0.events.isEmpty }
        if !traced.isEmpty {
            out += "\nMMU events per operation (KVM's tracepoints):\n"
            for access in traced {
                out += "  #\(access.index) line \(access.line) \(access.operation) \(hex(access.gva.rawValue)):\n"
                for record in access.events { out += "    \(record.event.name): \(record.event.description)\n" }
            }
        }

        if !dirtyLogs.isEmpty || dirtyRingFullExits > 0 {
            out += "\nDirty logs read (dirty-log get)"
            out += dirtyRingFullExits > 0 ? ", with \(dirtyRingFullExits) dirty-ring-full exit\(dirtyRingFullExits == 1 ? "" : "s"):\n" : ":\n"
            for log in dirtyLogs {
                let gfns = log.gfns.isEmpty ? "none" : log.gfns.map { hex($0.rawValue) }.joined(separator: " ")
                out += "  line \(log.line), memslot \(log.slot), \(log.gfns.count) gfn\(log.gfns.count == 1 ? "" : "s"): \(gfns)\n"
            }
        }

        if !ages.isEmpty {
            out += "\nAging (the MMU notifiers' clear_young and test_young):\n"
            for record in ages {
                let range = record.count == 1 ? "gfn \(hex(record.first))" : "gfns \(hex(record.first))..\(hex(record.first + record.count - 1))"
                out += "  line \(record.line), \(record.testOnly ? "test" : "clear") \(range): " + (record.young ? "young" : "idle") + "\n"
            }
        }

        if !preFaults.isEmpty {
            out += "\nKVM_PRE_FAULT_MEMORY (prefault):\n"
            for record in preFaults {
                out += "  line \(record.line), \(hex(record.gpa.rawValue)) + \(hex(record.size)): \(hex(record.mapped)) bytes mapped"
                out += record.error.map { ", then \($0.errnoName): \($0)" } ?? ""
                out += "\n"
            }
        }

        if !subPageMasks.isEmpty {
            out += "\nSub-page write permissions read (spp get; bit i: sub-page i writable):\n"
            for record in subPageMasks {
                out += "  line \(record.line), gfn \(hex(record.gfn.rawValue)): mask \(record.mask)"
                    + " (\(record.mask.rawValue.nonzeroBitCount) of 32 sub-pages writable)\n"
            }
        }

        out += "\nGuest entries at the end (every entry of every mapped translation):\n"
        if entries.isEmpty {
            out += "  (none)\n"
        } else {
            var table = TextTable(header: ["gva", "level", "entry gpa", "value", "A", "D", "kind"])
            for (index, entry) in entries.enumerated() {
                let kind = entry.value & 1 == 0 ? "not present" : isLeaf(entryAt: index) ? "leaf" : "table"
                table.add([hex(entry.gva.rawValue), String(entry.level), hex(entry.address.rawValue), hex(entry.value),
                           String((entry.value >> 5) & 1), String((entry.value >> 6) & 1), kind])
            }
            out += table.render(indent: "  ")
        }

        let delta = statsAfter.delta(from: statsBefore)
        let rows = zip(zip(statsBefore.values, statsAfter.values), delta.values).filter { pair, change in
            pair.0.value != 0 || pair.1.value != 0 || change.value != 0
        }
        out += "\nMMU statistics (non-zero counters; delta is after - before for cumulative counters, "
            + "the final value for instant and peak ones):\n"
        if rows.isEmpty {
            out += "  (all zero)\n"
        } else {
            var table = TextTable(header: ["counter", "before", "after", "delta"], rightAligned: [1, 2, 3])
            for (pair, change) in rows {
                table.add([pair.0.name, String(pair.0.value), String(pair.1.value), String(change.value)])
            }
            out += table.render(indent: "  ")
        }

        let levels = shadowPagesByLevel.keys.sorted(by: >)
        let total = shadowPagesByLevel.values.reduce(0, +)
        out += "\nShadow pages at the end: "
        out += total == 0 ? "none\n" : levels.map { "\(shadowPagesByLevel[$0]!) at level \($0)" }.joined(separator: ", ")
            + " (\(total) in all)\n"

        out += "\n"
        switch failure {
        case nil:
            out += "\(lockstepChecks) \(lockstepChecks == 1 ? "access" : "accesses") checked in lockstep: all agree\n"
            if expectationsChecked > 0 {
                out += "\(expectationsChecked) expect \(expectationsChecked == 1 ? "line" : "lines") met\n"
            }
        case .badScenario(let line, let message)?:
            out += "BAD SCENARIO" + (line > 0 ? " at line \(line)" : "") + ": \(message)\n"
        case .brokenInvariant(let line, let message, _)?:
            out += "BROKEN INVARIANT at line \(line): \(message)\n"
        case .unmetExpectation(let line, let message, _)?:
            out += "UNMET EXPECTATION at line \(line): \(message)\n"
        case .disagreement(let line, let disagreement, _)?:
            out += "LOCKSTEP DISAGREEMENT at line \(line) (\(lockstepChecks) accesses checked, the last one disagreeing):\n"
            out += disagreement.description + "\n"
        }
        return out
    }

    /// `ok gpa 0x.. value 0x..`, `#PF 0x7 (P|W|U) cr2 0x..`, `#GP`, or `MMIO gpa 0x.. value 0x..`.
    static func outcomeText(_ result: AccessResult) -> String {
        switch result {
        case .completed(let gpa, let value): "gpa \(hex(gpa.rawValue)) value \(hex(value))"
        case .pageFault(let code, let cr2): "#PF error code \(code) cr2 \(hex(cr2.rawValue))"
        case .generalProtection: "#GP (error code 0x0)"
        case .mmio(let gpa, let value): "MMIO gpa \(hex(gpa.rawValue)) value \(hex(value))"
        case .subPageWriteExit(let gpa): "SPP exit gpa \(hex(gpa.rawValue)) (sub-page write-protected)"
        }
    }

    static func notes(_ outcome: AccessOutcome) -> String {
        var notes: [String] = []
        if outcome.tlbHit { notes.append("TLB hit") }
        if outcome.emulated { notes.append("emulated") }
        return notes.joined(separator: ", ")
    }
}

/// Columns padded to their widest cell.
struct TextTable {
    var header: [String]
    var rightAligned: Set<Int> = []
    private var rows: [[String]] = []

    init(header: [String], rightAligned: Set<Int> = []) {
        self.header = header
        self.rightAligned = rightAligned
    }

    mutating func add(_ row: [String]) { rows.append(row) }

    func render(indent: String) -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        var out = ""
        for row in all {
            var cells: [String] = []
            for (column, cell) in row.enumerated() {
                let padding = String(repeating: " ", count: widths[column] - cell.count)
                cells.append(rightAligned.contains(column) ? padding + cell : cell + padding)
            }
            var line = indent + cells.joined(separator: "  ")
            while line.last == " " { line.removeLast() }
            out += line + "\n"
        }
        return out
    }
}

// MARK: Failures

extension RunFailure {
    /// The report as far as the run got: present for a disagreement, a broken invariant and an unmet
    /// expectation, nil for a bad scenario (which stops the run before or instead of a guest
    /// operation).
    public var partialReport: RunReport? {
        switch self {
        case .badScenario: nil
        case .disagreement(_, _, let partial), .brokenInvariant(_, _, let partial),
             .unmetExpectation(_, _, let partial): partial
        }
    }

    /// The JSON Lines of a failed run of the scenario named `scenario`: the partial report's lines
    /// when there is one, then the error line and the result line; for a bad scenario just those two.
    public func jsonLines(scenario: String) -> String {
        if let partial = partialReport { return partial.jsonLines(failure: self) }
        return RunReport.errorJSON(self) + "\n" + RunReport(scenario: scenario).resultJSON(status: RunReport.status(of: self)) + "\n"
    }
}
