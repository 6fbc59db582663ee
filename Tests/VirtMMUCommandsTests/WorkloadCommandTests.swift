import ArgumentParser
import Foundation
import Testing
@testable import VirtMMUCommands
import Workloads

/// `run` without a file (the workloads), `--record`/`--replay`, `--report`, `dump --dot`, and the
/// errors bad flags get.
@Suite struct WorkloadCommandTests {
    static let small = ["--processes", "2", "--pages", "4", "--iterations", "2", "--seed", "5"]

    func command(_ arguments: [String]) throws -> RunCommand {
        try #require(try VirtMMU.parseAsRoot(["run"] + arguments) as? RunCommand)
    }

    func temporaryPath(_ name: String) -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("virtmmu-\(UUID().uuidString)-\(name)").path
    }

    @Test func aRecordingReplaysUnderNPTWithTheSameOutcomes() throws {
        let recording = temporaryPath("processes.vmm")
        defer { try? FileManager.default.removeItem(atPath: recording) }
        let original = try command(["--workload", "processes", "--mmu", "shadow", "--record", recording] + Self.small).workloadComparison()
        let text = try String(contentsOfFile: recording, encoding: .utf8)
        #expect(text.hasPrefix("# virtmmu run --workload processes --processes 2 --pages 4 --iterations 2 --vcpus 2 --seed 5"))
        let replay = try command(["--replay", recording, "--mmu", "npt"]).workloadComparison()
        #expect(replay.title == recording && replay.runs.map(\.mmu) == ["npt"])
        #expect(replay.succeeded && original.succeeded)
        #expect(replay.runs[0].report.accesses.map(\.outcome.result) == original.runs[0].report.accesses.map(\.outcome.result))
        // The recording is an ordinary scenario too.
        let asScenario = try command([recording, "--mmu", "tdp"]).perform()
        #expect(asScenario.status == 0 && asScenario.output.contains("all agree"))
    }

    @Test func theNestedWorkloadRunsUnderTDPOnlyAndRefusesShadowAndNPT() throws {
        let comparison = try command(["--workload", "nested"] + Self.small).workloadComparison()
        #expect(comparison.runs.map(\.mmu) == ["tdp"] && comparison.succeeded)
        #expect(comparison.text().contains("nested_run (VM entries)"))
        for mmu in ["shadow", "npt"] {
            do {
                _ = try command(["--workload", "nested", "--mmu", mmu] + Self.small).workloadComparison()
                Issue.record("nested ran under \(mmu)")
            } catch let failure as CommandFailure {
                #expect(failure.message.contains("runs L1 under TDP with EPT (--mmu tdp, its default)"), "\(failure.message)")
            }
        }
    }

    @Test func aWorkloadRunsUnderShadowAndTDPByDefaultAndWritesItsReport() throws {
        let report = temporaryPath("report.html")
        defer { try? FileManager.default.removeItem(atPath: report) }
        let run = try command(["--workload", "migration", "--report", report] + Self.small)
        let comparison = try run.workloadComparison()
        #expect(comparison.runs.map(\.mmu) == ["shadow", "tdp"])
        try run.runWorkload()
        let html = try String(contentsOfFile: report, encoding: .utf8)
        #expect(html.contains("<h2>Dirty pages per migration pass</h2>") && html.contains("data-chart=\"dirty-passes\""))
    }

    @Test func dumpWritesTheTreeOfARootForGraphviz() throws {
        let out = temporaryPath("tree.dot")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let dump = try #require(try VirtMMU.parseAsRoot(["dump", "--dot", "--workload", "processes", "--out", out] + Self.small)
                                    as? DumpCommand)
        try dump.execute()
        let dot = try String(contentsOfFile: out, encoding: .utf8)
        #expect(dot.hasPrefix("digraph \"workload processes under shadow, root 0\" {"))
        #expect(dot.contains("level 4 gfn") && dot.contains(" -> n") && dot.hasSuffix("}\n"))
        let tdp = try #require(try VirtMMU.parseAsRoot(["dump", "--dot", "--mmu", "tdp", "--root", "9", "--workload", "boot"]) as? DumpCommand)
        #expect(throws: CommandFailure.self) { try tdp.execute() }
    }

    /// Bad combinations are usage errors with a message saying what is wrong; under `run` and
    /// `dump` they exit with 1.
    @Test(arguments: [
        (["run", "--pages", "0"], "--pages must be in 1...256, not 0"),
        (["run", "--vcpus", "65"], "--vcpus must be in 1...64, not 65"),
        (["run", "x.vmm", "--workload", "boot"], "a scenario file runs on its own"),
        (["run", "x.vmm", "--seed", "3"], "shape a built-in workload"),
        (["run", "--replay", "r.vmm", "--workload", "mmap"], "give one of them"),
        (["run", "--replay", "r.vmm", "--record", "s.vmm"], "--record writes a built-in workload's operations"),
        (["run", "x.vmm", "--report", "r.html"], "--report is for workload runs"),
        (["run", "--trace"], "--trace lists the events of a scenario file's operations"),
        (["run", "--workload", "kernel"], "'kernel' is invalid for '--workload <name>'"),
        (["run", "--root=-1"], "--root counts roots from 0"),
        (["dump", "--workload", "boot"], "give --dot"),
        (["run", "--workload", "mmap", "--dirty-log", "ring"], "the mmap workload migrates nothing"),
        (["run", "--dirty-log", "sometimes"], "'sometimes' is invalid for '--dirty-log <mode>'"),
    ])
    func badFlagsAreClearErrors(arguments: [String], message: String) {
        do {
            _ = try VirtMMU.parseAsRoot(arguments)
            Issue.record("\(arguments) parsed")
        } catch {
            #expect(VirtMMU.fullMessage(for: error).contains(message), "\(VirtMMU.fullMessage(for: error))")
            #expect(VirtMMU.exitStatus(for: error, arguments: arguments) == 1)
        }
    }
}
