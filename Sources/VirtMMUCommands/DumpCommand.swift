import ArgumentParser
import KVMMMU
import VirtualMachine
import Workloads

/// `virtmmu dump --dot`: the tables KVM built for a guest, as a Graphviz graph.
struct DumpCommand: FailureReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Run a scenario or a built-in workload, then write one root's shadow (or TDP) page tree for Graphviz.",
        discussion: """
        The guest runs as under `run` (checked in lockstep); at the end the tables under one root are \
        written in DOT: a box per table page (level, the gfn it shadows or maps, its entries, its role \
        under shadow paging; dashed when unsync) and an edge to each table below it. \
        Render with `dot -Tsvg tree.dot > tree.svg`. Exit status as for `run`.
        """)

    @Argument(help: "A scenario file; without one, the built-in workload (--workload).")
    var file: String?

    @OptionGroup var size: WorkloadSizeOptions

    @Option(help: "The MMU whose tables to dump: shadow, tdp (EPT) or npt.")
    var mmu: MMUChoice = .shadow

    @Option(help: ArgumentHelp("The MMU design (\(MMUVariant.names.joined(separator: ", "))).", valueName: "name"))
    var variant: MMUVariant = .upstream

    @Flag(help: "Write Graphviz DOT (the format dump writes).")
    var dot = false

    @Option(help: ArgumentHelp("Which root: 0 the largest (most tables), 1 the next...", valueName: "N"))
    var root = 0

    @Option(help: ArgumentHelp("Write to FILE instead of standard output.", valueName: "FILE"))
    var out: String?

    func validate() throws {
        guard dot else { throw ValidationError("dump writes Graphviz DOT: give --dot") }
        if root < 0 { throw ValidationError("--root counts roots from 0 (the largest), not \(root)") }
        try size.validate(scenarioFile: file)
    }

    func execute() throws {
        let title: String
        let scenario: Scenario
        if let file {
            do {
                scenario = try Scenario.parse(contentsOfFile: file)
            } catch {
                throw CommandFailure(message: "error: \(file): \(error)", code: RunCommand.Status.badInput)
            }
            title = file
        } else {
            let generated = try size.generate()
            title = "workload \(generated.kind.rawValue)"
            scenario = generated.scenario
        }
        let comparison = WorkloadComparison.run(title: title, parameters: nil, scenario: scenario, phases: [],
                                                mmus: [RunCommand.machineMMU(mmu, cpu: scenario.cpuModel)], variant: variant)
        let run = comparison.runs[0]
        if let failure = run.failure {
            throw CommandFailure(message: "error: \(title): \(failure)", code: failure.exitCode)
        }
        guard root < run.roots.count else {
            throw CommandFailure(message: "error: \(title): --root \(root), but the run ends with \(run.roots.count) root"
                                    + (run.roots.count == 1 ? "" : "s"), code: RunCommand.Status.badInput)
        }
        let graph = PageTree.dot(run.roots[root], title: "\(title) under \(run.mmu), root \(root)")
        if let out {
            try writeFile(out, graph)
        } else {
            var output = ByteWriter(fileDescriptor: 1)
            output.append(graph)
            output.flush()
        }
    }
}
