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

/// The MMU a scenario runs under.
enum MMUChoice: String, ExpressibleByArgument, CaseIterable, Sendable {
    /// KVM's shadow MMU: the guest's page tables shadowed, write-protected and kept in sync.
    case shadow
    /// KVM's TDP MMU with EPT: the guest's paging in hardware over KVM's EPT tables.
    case tdp
    /// KVM's TDP MMU with AMD's NPT.
    case npt
}

struct RunCommand: FailureReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a built-in guest workload under KVM's shadow MMU and TDP MMU side by side, or a scenario file, every guest access checked in lockstep against the architecture.",
        discussion: """
        Without a file, a built-in workload (--workload boot, processes, mmap, migration or mixed, the \
        default) runs under shadow paging and TDP (or the --mmu given) and the report compares them: \
        faults, shadow pages, roots, TLB flushes, exits, the MMU's table pages, wall time and the lockstep \
        verdict; --json for JSON Lines, --report FILE.html for a page with charts, --record FILE to write \
        the operations as a scenario and --replay FILE to run such a recording. A workload run exits 1 \
        for bad parameters and 2 when a run failed its checks.

        A scenario is a text file with one directive per line (mem, cpu, set, map, access, pte, invlpg, \
        reload-cr3, host, space, switch, invpcid, cr0, cr4, efer, cr3, zap, memslot, dirty-log, expect, vcpu); docs/SCENARIOS.md describes the language and examples/ holds samples. The report \
        gives each access's outcome (GPA and value, or the #PF error code and CR2), the final value and \
        A/D bits of every guest entry the scenario mapped, and KVM's MMU counters before and after the \
        run and their difference. With --json the same as JSON Lines, the last line a "result" object.

        Exit status: 0 the run finished and every outcome agreed with the reference machine; 1 a bad \
        scenario, an unreadable file or bad arguments; 2 a lockstep disagreement or a broken MMU \
        invariant; 3 an expect line whose counters the run did not reach (for 2 and 3 the report up to \
        that point is still printed, then the error).
        """)

    /// The exit statuses `run` documents (not the sysexits codes the other subcommands use).
    enum Status {
        static let ok: Int32 = 0
        /// A bad scenario, an unreadable file, bad arguments.
        static let badInput: Int32 = 1
        /// A lockstep disagreement or a broken invariant.
        static let failed: Int32 = 2
        /// An `expect` line whose counters the run did not reach.
        static let unmetExpectation: Int32 = 3
    }

    @Argument(help: "The scenario file, or - for standard input; without one, the built-in workload (--workload).")
    var file: String?

    @Option(name: .customLong("mmu"), help: "The MMU that virtualizes the guest's paging: shadow, tdp (EPT) or npt (`expect` lines pin shadow counters). A scenario file runs under shadow by default; a workload under shadow and tdp side by side.")
    var mmuOption: MMUChoice?

    @OptionGroup var workloadOptions: WorkloadOptions

    /// The MMU a scenario file runs under.
    var mmu: MMUChoice { mmuOption ?? .shadow }

    @Option(help: ArgumentHelp("The MMU design to run (\(MMUVariant.names.joined(separator: ", "))); docs/VARIANTS.md.",
                               valueName: "name"))
    var variant: MMUVariant = .upstream

    @Flag(help: "Print JSON Lines instead of the readable report.")
    var json = false

    @Flag(help: "Also report the MMU events each guest operation caused, named after KVM's tracepoints.")
    var trace = false

    /// What a run prints and how it ends.
    struct Outcome {
        /// Standard output: the report (readable or JSON Lines).
        var output: String
        /// The line for standard error when the run did not succeed.
        var message: String?
        var status: Int32
    }

    func validate() throws {
        try workloadOptions.validate(file: file, trace: trace)
    }

    func execute() throws {
        if file == nil || workloadOptions.replay != nil {
            try runWorkload()
            return
        }
        let outcome = perform()
        var output = ByteWriter(fileDescriptor: 1)
        output.append(outcome.output)
        output.flush()
        if let message = outcome.message {
            throw CommandFailure(message: message, code: outcome.status)
        }
    }

    /// Reads, parses and runs the scenario; `standardInput` supplies the text for `-`.
    func perform(standardInput: () throws(ScenarioError) -> String = readStandardInput) -> Outcome {
        let name = file.map { $0 == "-" ? "<stdin>" : $0 } ?? BuiltInScenario.tourName
        let scenario: Scenario
        do {
            switch file {
            // The command runs a workload without a file; a caller of `perform` gets the tour.
            case nil: scenario = try Scenario.parse(BuiltInScenario.tour, name: name)
            case "-": scenario = try Scenario.parse(standardInput(), name: name)
            case let path?: scenario = try Scenario.parse(contentsOfFile: path)
            }
        } catch {
            let message = [error.directive, error.message].compactMap { $0 }.joined(separator: ": ")
            return outcome(of: .badScenario(line: error.line ?? 0, message: message), name: name, pagingMode: nil)
        }
        let machineMMU: VirtualMachineMMU = switch mmu {
        case .shadow: .shadow
        case .tdp: .ept(cpu: scenario.cpuModel)
        case .npt: .npt(cpu: scenario.cpuModel)
        }
        let report: RunReport
        do {
            // `expect` lines pin the shadow MMU's counters: under TDP they are not checked.
            report = try ScenarioRunner(scenario: scenario, traceEvents: trace, variant: variant,
                                        checksExpectations: mmu == .shadow, mmu: machineMMU).run()
        } catch {
            return outcome(of: error, name: name, pagingMode: scenario.pagingMode)
        }
        let output = json ? report.jsonLines() : report.text(pagingMode: scenario.pagingMode)
        return Outcome(output: output, message: nil, status: Status.ok)
    }

    /// What a failed run prints: with --json the partial report's lines (if any), the error line
    /// and the result line; otherwise the partial report with the failure (nothing for a bad
    /// scenario). The message for standard error names the scenario and the line.
    func outcome(of failure: RunFailure, name: String, pagingMode: PagingMode?) -> Outcome {
        let output: String
        if json {
            output = failure.jsonLines(scenario: name)
        } else if let partial = failure.partialReport {
            output = partial.text(failure: failure, pagingMode: pagingMode)
        } else {
            output = ""
        }
        let location: String = switch failure {
        case .badScenario(let line, let message): (line > 0 ? "line \(line): " : "") + message
        default: failure.description
        }
        return Outcome(output: output, message: "error: \(name): \(location)", status: failure.exitCode)
    }
}

/// Standard input as text (at most 64 MiB, invalid UTF-8 repaired), for `run -`.
func readStandardInput() throws(ScenarioError) -> String {
    let limit = 64 << 20
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
        if count < 0 {
            if errno == EINTR { continue }
            throw ScenarioError(source: "<stdin>", text: "-",
                                message: "cannot read standard input: \(String(cString: strerror(errno)))")
        }
        if count == 0 { break }
        bytes.append(contentsOf: chunk[0..<count])
        if bytes.count > limit {
            throw ScenarioError(source: "<stdin>", text: "-", message: "standard input is larger than 64 MiB; not a scenario")
        }
    }
    return String(decoding: bytes, as: UTF8.self)
}

extension VirtMMU {
    /// ArgumentParser's `main()`, except that a command-line error under `run` exits with 1, the
    /// status `run` documents for bad arguments, instead of 64.
    public static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
        } catch {
            let status = exitStatus(for: error, arguments: arguments)
            guard status == exitCode(for: error).rawValue else {
                var standardError = StandardError()
                print(fullMessage(for: error), to: &standardError)
                exit(withError: ExitCode(status))
            }
            exit(withError: error)
        }
    }

    /// The exit status for `error` raised while parsing or running `arguments`: ArgumentParser's,
    /// but 1 instead of 64 for a command-line error under `run`.
    static func exitStatus(for error: any Error, arguments: [String]) -> Int32 {
        let code = exitCode(for: error)
        let documentsOwnStatuses = [RunCommand.configuration.commandName, CompareCommand.configuration.commandName,
                                    DumpCommand.configuration.commandName]
        if code == .validationFailure && documentsOwnStatuses.contains(arguments.first ?? "") {
            return RunCommand.Status.badInput
        }
        return code.rawValue
    }
}

/// `--variant NAME`: an unknown name is a usage error that lists the names.
extension MMUVariant: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
    public static var allValueStrings: [String] { names }
}
