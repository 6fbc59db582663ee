import ArgumentParser
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension WorkloadKind: ExpressibleByArgument {}
extension DirtyLogProtocol: ExpressibleByArgument {}

/// The workload to run and its size: `run`'s and `dump`'s.
struct WorkloadSizeOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The built-in workload to run when no scenario file is given: "
                                + WorkloadKind.allCases.map(\.rawValue).joined(separator: ", ") + " (default mixed).",
                               valueName: "name"))
    var workload: WorkloadKind?

    @Option(help: "Processes alive at once before one exits to make room for the next fork (default 4).")
    var processes: Int?
    @Option(help: "Pages each process or mapping touches (default 12).")
    var pages: Int?
    @Option(help: "Rounds of the workload's main loop: forks, mmap cycles, migration passes (default 4).")
    var iterations: Int?
    @Option(help: "vCPUs the guest runs on (default 2).")
    var vcpus: Int?
    @Option(help: "The seed of the workload's random choices: the same seed gives the same run (default 1).")
    var seed: UInt64?
    @Flag(name: .customLong("no-la57"), help: "A CPU without 5-level paging (boot stops at 4-level paging).")
    var noLA57 = false
    @Option(help: ArgumentHelp("How the migration reads the dirty log: reset (KVM_GET_DIRTY_LOG), manual (get, then "
                                + "KVM_CLEAR_DIRTY_LOG) or ring (per-vCPU dirty rings); default reset.", valueName: "mode"))
    var dirtyLog: DirtyLogProtocol?

    var parameters: WorkloadParameters {
        let defaults = WorkloadParameters()
        return WorkloadParameters(processes: processes ?? defaults.processes, pages: pages ?? defaults.pages,
                                  iterations: iterations ?? defaults.iterations, vcpus: vcpus ?? defaults.vcpus,
                                  seed: seed ?? defaults.seed, la57: !noLA57, dirtyLog: dirtyLog ?? defaults.dirtyLog)
    }

    var sizeGiven: Bool {
        processes != nil || pages != nil || iterations != nil || vcpus != nil || seed != nil || noLA57 || dirtyLog != nil
    }

    /// The workload asked for (the mix by default), generated.
    func generate() throws -> GeneratedWorkload {
        let kind = workload ?? .mixed
        do {
            return try kind.generate(parameters)
        } catch {
            throw CommandFailure(message: "error: workload \(kind.rawValue): \(error)", code: RunCommand.Status.badInput)
        }
    }

    /// A scenario file (or a replay) has its operations already: no workload or size with it.
    func validate(scenarioFile: String?) throws {
        if scenarioFile != nil && workload != nil {
            throw ValidationError("a scenario file runs on its own: --workload generates operations without one")
        }
        if sizeGiven && scenarioFile != nil {
            throw ValidationError("--processes, --pages, --iterations, --vcpus, --seed, --no-la57 and --dirty-log shape a built-in "
                                  + "workload; a scenario file or a replay has its operations already")
        }
        if dirtyLog != nil && !(workload ?? .mixed).migrates {
            throw ValidationError("--dirty-log chooses how a migration reads the dirty log; the \((workload ?? .mixed).rawValue) workload migrates nothing")
        }
        if let problem = parameters.problem() { throw ValidationError(problem) }
    }
}

/// `run`'s options for the built-in workloads and for recording and replaying them.
struct WorkloadOptions: ParsableArguments {
    @OptionGroup var size: WorkloadSizeOptions

    @Option(help: ArgumentHelp("Write the workload's guest operations to FILE as a scenario (docs/SCENARIOS.md).", valueName: "FILE"))
    var record: String?
    @Option(help: ArgumentHelp("Run the operations recorded in FILE (by --record) with the workload report, under any --mmu and --variant.",
                               valueName: "FILE"))
    var replay: String?
    @Option(help: ArgumentHelp("Also write the workload report as one self-contained HTML page with charts.", valueName: "FILE.html"))
    var report: String?

    @Option(help: ArgumentHelp("Which root's page tree the HTML report shows: 0 the largest, 1 the next...", valueName: "N"))
    var root = 0

    func validate(file: String?, trace: Bool) throws {
        if file != nil && replay != nil {
            throw ValidationError("a scenario file runs on its own: --replay runs a recording without one")
        }
        if size.workload != nil && replay != nil {
            throw ValidationError("--workload generates a workload and --replay runs a recorded one: give one of them")
        }
        try size.validate(scenarioFile: file ?? replay)
        if record != nil && (file != nil || replay != nil) {
            throw ValidationError("--record writes a built-in workload's operations; a scenario file is already one")
        }
        if report != nil && file != nil {
            throw ValidationError("--report is for workload runs (--workload, --replay, or no file)")
        }
        if trace && file == nil {
            throw ValidationError("--trace lists the events of a scenario file's operations; a workload reports counters")
        }
        if record != nil && record == report {
            throw ValidationError("--record and --report name the same file")
        }
        if root < 0 { throw ValidationError("--root counts roots from 0 (the largest), not \(root)") }
    }
}

extension RunCommand {
    /// The machine MMU for a choice, for a guest of `cpu`.
    static func machineMMU(_ choice: MMUChoice, cpu: CPUModel) -> VirtualMachineMMU {
        switch choice {
        case .shadow: .shadow
        case .tdp: .ept(cpu: cpu)
        case .npt: .npt(cpu: cpu)
        }
    }

    /// The workload (generated, or replayed from a recording), run under each MMU asked for.
    func workloadComparison() throws -> WorkloadComparison {
        let title: String
        let scenario: Scenario
        let phases: [WorkloadPhase]
        let parameters: WorkloadParameters?
        var expectedLoads: [Int: UInt64] = [:]
        if let path = workloadOptions.replay {
            do {
                scenario = try Scenario.parse(contentsOfFile: path)
            } catch {
                throw CommandFailure(message: "error: \(path): \(error)", code: Status.badInput)
            }
            title = path
            phases = []
            parameters = nil
        } else {
            let generated = try workloadOptions.size.generate()
            let kind = generated.kind
            title = kind.rawValue
            scenario = generated.scenario
            phases = generated.phases
            parameters = generated.parameters
            expectedLoads = generated.expectedLoads
            if let path = workloadOptions.record {
                let header = "# virtmmu run --workload \(kind.rawValue) --processes \(parameters!.processes) --pages \(parameters!.pages) "
                    + "--iterations \(parameters!.iterations) --vcpus \(parameters!.vcpus) --seed \(parameters!.seed)"
                    + (parameters!.la57 ? "" : " --no-la57")
                    + (parameters!.dirtyLog == .getAndReset ? "" : " --dirty-log \(parameters!.dirtyLog.rawValue)") + "\n# replay: virtmmu run --replay FILE [--mmu shadow|tdp|npt] [--variant NAME]\n"
                try writeFile(path, header + scenario.render())
            }
        }
        let choices = try Self.workloadMMUs(asked: mmuOption, nested: scenario.directives.contains { $0.directive.name == "l1" })
        let mmus = choices.map { Self.machineMMU($0, cpu: scenario.cpuModel) }
        let progress = isatty(2) == 1 ? ProgressLine() : nil
        defer { progress?.finish() }
        return WorkloadComparison.run(title: title, parameters: parameters, scenario: scenario, phases: phases,
                                      expectedLoads: expectedLoads, mmus: mmus,
                                      variant: variant, progress: progress.map { line in { line.show($0, $1, $2) } })
    }

    /// The MMUs a workload runs under: the one asked for, or shadow paging and TDP side by side. A
    /// nested workload (its L1 gives L2 EPT) runs under TDP with EPT only: KVM offers nested EPT
    /// only with enable_ept, and the model runs no L1 under shadow paging with an L2.
    static func workloadMMUs(asked: MMUChoice?, nested: Bool) throws -> [MMUChoice] {
        guard nested else { return asked.map { [$0] } ?? [.shadow, .tdp] }
        switch asked {
        case nil, .tdp?:
            return [.tdp]
        case .shadow?, .npt?:
            throw CommandFailure(message: "error: the nested workload runs L1 under TDP with EPT (--mmu tdp, its default): KVM "
                                     + "offers nested EPT only with enable_ept, and its L1 gives its L2 guests EPT, not NPT",
                                 code: Status.badInput)
        }
    }

    func runWorkload() throws {
        let comparison = try workloadComparison()
        var output = ByteWriter(fileDescriptor: 1)
        output.append(json ? comparison.jsonLines() : comparison.text())
        output.flush()
        if let path = workloadOptions.report {
            try writeFile(path, comparison.html(treeRoot: workloadOptions.root))
        }
        if let run = comparison.runs.first(where: { $0.failure != nil }), let failure = run.failure {
            throw CommandFailure(message: "error: workload \(comparison.title) under \(run.mmu): \(failure)", code: failure.exitCode)
        }
        if let run = comparison.runs.first(where: { !comparison.loadMismatches($0).isEmpty }),
           let mismatch = comparison.loadMismatches(run).first {
            throw CommandFailure(message: "error: workload \(comparison.title) under \(run.mmu): the load of directive "
                                    + "\(mismatch.directive + 1) returned \(hex(mismatch.read)), the guest had stored \(hex(mismatch.expected))",
                                 code: RunCommand.Status.failed)
        }
    }
}

/// Writes `text` to `path` (created or truncated); a failure is a clear error with exit status 1.
func writeFile(_ path: String, _ text: String) throws {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard descriptor >= 0 else {
        throw CommandFailure(message: "error: \(path): cannot create: \(String(cString: strerror(errno)))", code: RunCommand.Status.badInput)
    }
    var writer = ByteWriter(fileDescriptor: descriptor)
    writer.append(text)
    writer.flush()
    _ = close(descriptor)
}

/// Progress of a long run on a terminal's standard error, rewritten in place.
final class ProgressLine {
    private var shown = false

    func show(_ mmu: String, _ done: Int, _ total: Int) {
        var standardError = StandardError()
        print("\r\u{1B}[K\(mmu): \(done * 100 / max(1, total))% of \(total) operations", terminator: "", to: &standardError)
        shown = true
    }

    func finish() {
        guard shown else { return }
        var standardError = StandardError()
        print("\r\u{1B}[K", terminator: "", to: &standardError)
    }
}
