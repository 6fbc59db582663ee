import ArgumentParser
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// `virtmmu compare`: one scenario under two MMU variants, the "no functional change" check.
struct CompareCommand: FailureReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Run a scenario under two MMU variants and compare what the guest saw and what KVM did.",
        discussion: """
        Runs the scenario once per variant, each on a fresh VM with every access checked in lockstep, \
        then compares per guest operation the outcome the guest saw (GPA and value, #PF error code and \
        CR2, #GP, MMIO) and the final value of every guest entry the scenario mapped. Side by side it \
        shows the counters that differ, the shadow pages by level and by role, the root pages created, \
        context resets and role re-initialisations, and root cache hits. docs/VARIANTS.md describes \
        the variants.

        Exit status: 0 the guest-visible outcomes are identical; 4 they differ; 2 either run failed its \
        lockstep check or broke an MMU invariant; 1 a bad scenario, an unreadable file or bad arguments.
        """)

    enum Status {
        static let identical: Int32 = 0
        static let badInput: Int32 = 1
        static let runFailed: Int32 = 2
        static let different: Int32 = 4
    }

    @Argument(help: "The scenario file, or - for standard input.")
    var file: String

    @Option(name: .customLong("variant"), help: ArgumentHelp(
        "A variant to run, given twice (\(MMUVariant.names.joined(separator: ", "))).", valueName: "name"))
    var variants: [MMUVariant] = []

    @Flag(help: "Print one JSON object instead of the readable report.")
    var json = false

    func validate() throws {
        guard variants.count == 2 else {
            throw ValidationError("give exactly two variants (--variant A --variant B), not \(variants.count)")
        }
    }

    func execute() throws {
        let outcome = perform()
        var output = ByteWriter(fileDescriptor: 1)
        output.append(outcome.output)
        output.flush()
        if let message = outcome.message { throw CommandFailure(message: message, code: outcome.status) }
    }

    func perform(standardInput: () throws(ScenarioError) -> String = readStandardInput) -> RunCommand.Outcome {
        let name = file == "-" ? "<stdin>" : file
        let scenario: Scenario
        do {
            scenario = file == "-" ? try Scenario.parse(standardInput(), name: name) : try Scenario.parse(contentsOfFile: file)
        } catch {
            let message = [error.directive, error.message].compactMap { $0 }.joined(separator: ": ")
            return RunCommand.Outcome(output: "", message: "error: \(name): \(message)", status: Status.badInput)
        }
        var reports: [RunReport] = []
        for variant in variants {
            do {
                // The expectations state one design's counters; the comparison reports the differences.
                reports.append(try ScenarioRunner(scenario: scenario, variant: variant, checksExpectations: false).run())
            } catch {
                let status = error.exitCode == 1 ? Status.badInput : Status.runFailed
                return RunCommand.Outcome(output: "", message: "error: \(name): \(variant): \(error.description)", status: status)
            }
        }
        let comparison = VariantComparison(scenario: name, variants: (variants[0], variants[1]),
                                           reports: (reports[0], reports[1]))
        let output = json ? comparison.json + "\n" : comparison.text
        return RunCommand.Outcome(output: output, message: nil,
                                  status: comparison.identical ? Status.identical : Status.different)
    }
}

/// Two runs of one scenario side by side.
struct VariantComparison {
    let scenario: String
    let variants: (MMUVariant, MMUVariant)
    let reports: (RunReport, RunReport)

    /// Operations whose guest-visible outcome differs: (index, line, left, right).
    var outcomeDifferences: [(index: Int, line: Int, left: String, right: String)] {
        let left = reports.0.accesses, right = reports.1.accesses
        var differences: [(Int, Int, String, String)] = []
        for index in 0..<max(left.count, right.count) {
            let a = index < left.count ? left[index] : nil
            let b = index < right.count ? right[index] : nil
            if a?.outcome.result != b?.outcome.result {
                differences.append((index, a?.line ?? b?.line ?? 0, a.map { describe($0.outcome.result) } ?? "-",
                                    b.map { describe($0.outcome.result) } ?? "-"))
            }
        }
        return differences
    }

    /// Guest entries whose final value differs: (gva, level, left, right).
    var entryDifferences: [(gva: UInt64, level: Int, left: String, right: String)] {
        let left = reports.0.entries, right = reports.1.entries
        var differences: [(UInt64, Int, String, String)] = []
        for index in 0..<max(left.count, right.count) {
            let a = index < left.count ? left[index] : nil
            let b = index < right.count ? right[index] : nil
            if a?.value != b?.value || a?.address != b?.address {
                differences.append((a?.gva.rawValue ?? b?.gva.rawValue ?? 0, a?.level ?? b?.level ?? 0,
                                    a.map { hex($0.value) } ?? "-", b.map { hex($0.value) } ?? "-"))
            }
        }
        return differences
    }

    /// The "no functional change" verdict: every operation and every listed entry the same.
    var identical: Bool { outcomeDifferences.isEmpty && entryDifferences.isEmpty }

    /// The model's own counters, then KVM's statistics: (name, left, right).
    var counters: [(name: String, left: UInt64, right: UInt64)] {
        let model: [(String, UInt64, UInt64)] = [
            ("context_resets", reports.0.contextResets, reports.1.contextResets),
            ("role_reinitializations", reports.0.roleReinitializations, reports.1.roleReinitializations),
            ("roots_created", reports.0.rootsCreated, reports.1.rootsCreated),
            ("root_cache_hits", reports.0.rootCacheHits, reports.1.rootCacheHits),
            ("root_cache_misses", reports.0.rootCacheMisses, reports.1.rootCacheMisses),
        ]
        let left = reports.0.statsAfter.values, right = reports.1.statsAfter.values
        return model + zip(left, right).map { ($0.name, $0.value, $1.value) }
    }

    /// The shadow pages alive at the end by level, 1 to 5.
    var pagesByLevel: [(level: Int, left: Int, right: Int)] {
        (1...5).map { ($0, reports.0.shadowPagesByLevel[$0] ?? 0, reports.1.shadowPagesByLevel[$0] ?? 0) }
            .filter { $0.1 != 0 || $0.2 != 0 }
    }

    /// The shadow pages alive at the end by role, sorted by role text.
    var pagesByRole: [(role: String, left: Int, right: Int)] {
        Set(reports.0.shadowPagesByRole.keys).union(reports.1.shadowPagesByRole.keys).sorted()
            .map { ($0, reports.0.shadowPagesByRole[$0] ?? 0, reports.1.shadowPagesByRole[$0] ?? 0) }
    }

    private func describe(_ result: AccessResult) -> String {
        switch result {
        case .completed(let gpa, let value): "gpa \(hex(gpa.rawValue)) value \(hex(value))"
        case .pageFault(let errorCode, let cr2): "#PF error \(hex(errorCode.rawValue)) cr2 \(hex(cr2.rawValue))"
        case .generalProtection: "#GP"
        case .mmio(let gpa, let value): "mmio gpa \(hex(gpa.rawValue)) value \(hex(value))"
        case .subPageWriteExit(let gpa): "spp exit gpa \(hex(gpa.rawValue))"
        }
    }

    var text: String {
        let (a, b) = (variants.0.rawValue, variants.1.rawValue)
        var lines = ["compare \(scenario): \(a) vs \(b)", ""]
        let width = max(24, counters.map(\.name.count).max() ?? 0, pagesByRole.map(\.role.count).max() ?? 0)
        func padded(_ text: String, _ length: Int) -> String { text + String(repeating: " ", count: max(0, length - text.count)) }
        func row(_ name: String, _ left: String, _ right: String) -> String {
            padded(name, width) + "  " + padded(left, max(a.count, 12)) + "  " + right
        }
        lines.append(row("", a, b))
        let differing = counters.filter { $0.left != $0.right }
        let model = counters.prefix(5)
        lines.append("context and roots:")
        for counter in model { lines.append(row("  " + counter.name, "\(counter.left)", "\(counter.right)")) }
        // The context counters are shown above whether or not they differ.
        let differingKVMCounters = differing.filter { counter in !model.contains { $0.name == counter.name } }
        lines.append("counters that differ:" + (differingKVMCounters.isEmpty ? " none" : ""))
        for counter in differingKVMCounters {
            lines.append(row("  " + counter.name, "\(counter.left)", "\(counter.right)"))
        }
        lines.append("shadow pages by level:")
        for entry in pagesByLevel { lines.append(row("  level \(entry.level)", "\(entry.left)", "\(entry.right)")) }
        lines.append("shadow pages by role:")
        for entry in pagesByRole { lines.append(row("  " + entry.role, "\(entry.left)", "\(entry.right)")) }
        lines.append("")
        let operations = outcomeDifferences, entries = entryDifferences
        for difference in operations {
            lines.append("operation \(difference.index) (line \(difference.line)): \(a): \(difference.left); \(b): \(difference.right)")
        }
        for difference in entries {
            lines.append("entry \(hex(difference.gva)) level \(difference.level): \(a): \(difference.left); \(b): \(difference.right)")
        }
        let verdict = identical
            ? "identical: \(reports.0.accesses.count) guest operations and \(reports.0.entries.count) guest entries agree"
            : "different: \(operations.count) guest operations and \(entries.count) guest entries differ"
        lines.append("verdict: " + verdict)
        return lines.joined(separator: "\n") + "\n"
    }

    var json: String {
        func pair(_ left: some BinaryInteger, _ right: some BinaryInteger) -> String { "[\(left),\(right)]" }
        var object = JSONLine()
        object.add("scenario", scenario)
        object.addRaw("variants", "[\(jsonString(variants.0.rawValue)),\(jsonString(variants.1.rawValue))]")
        object.add("identical", identical)
        object.add("operations", reports.0.accesses.count)
        /// A JSON array of one object per item.
        func array<Item>(_ items: [Item], _ fill: (inout JSONLine, Item) -> Void) -> String {
            "[" + items.map { item in
                var line = JSONLine()
                fill(&line, item)
                return line.text
            }.joined(separator: ",") + "]"
        }
        object.addRaw("outcome_differences", array(outcomeDifferences) { item, difference in
            item.add("index", difference.index)
            item.add("line", difference.line)
            item.add("left", difference.left)
            item.add("right", difference.right)
        })
        object.addRaw("entry_differences", array(entryDifferences) { item, difference in
            item.addHex("gva", difference.gva)
            item.add("level", difference.level)
            item.add("left", difference.left)
            item.add("right", difference.right)
        })
        var counterObject = JSONLine()
        for counter in counters { counterObject.addRaw(counter.name, pair(counter.left, counter.right)) }
        object.addRaw("counters", counterObject.text)
        var levels = JSONLine()
        for entry in pagesByLevel { levels.addRaw("\(entry.level)", pair(entry.left, entry.right)) }
        object.addRaw("shadow_pages_by_level", levels.text)
        var roles = JSONLine()
        for entry in pagesByRole { roles.addRaw(entry.role, pair(entry.left, entry.right)) }
        object.addRaw("shadow_pages_by_role", roles.text)
        return object.text
    }
}
