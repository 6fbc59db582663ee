// A workload (or a recorded one) run under one or more MMUs, each run checked in lockstep, with
// what the report needs: the run's report and timeline, KVM's tables at the end, the wall time.

import KVMMMU
import VirtualMachine

/// One MMU's run of a workload.
public struct WorkloadMMURun {
    /// "shadow", "tdp" (EPT) or "npt".
    public var mmu: String
    public var variant: MMUVariant
    /// The run's report: complete, or as far as the run got when it failed.
    public var report: RunReport
    public var failure: RunFailure?
    public var wallSeconds: Double
    /// KVM's roots at the end, largest first.
    public var roots: [PageTreeNode]

    /// Guest accesses the reference machine checked per second of wall time.
    public var checksPerSecond: Double { wallSeconds > 0 ? Double(report.lockstepChecks) / wallSeconds : 0 }
    /// The most table pages the MMU held at a sample.
    public var peakTablePages: Int { report.timeline.map(\.tablePages).max() ?? report.tablePages }
}

/// A workload's runs side by side.
public struct WorkloadComparison {
    /// What ran: a workload's name and parameters, or a replayed file.
    public var title: String
    /// The parameters, for a generated workload.
    public var parameters: WorkloadParameters?
    public var scenario: Scenario
    public var phases: [WorkloadPhase]
    /// By directive index, what each of the guest's loads must return (empty for a replay).
    public var expectedLoads: [Int: UInt64]
    public var runs: [WorkloadMMURun]

    /// Whether every run finished, agreed with the reference machine, and every load returned
    /// what the guest last stored.
    public var succeeded: Bool { runs.allSatisfy { $0.failure == nil && loadMismatches($0).isEmpty } }

    /// The loads of `run` that returned something other than what the guest last stored there:
    /// (directive index, value read, value expected).
    public func loadMismatches(_ run: WorkloadMMURun) -> [(directive: Int, read: UInt64, expected: UInt64)] {
        run.report.accesses.compactMap { access in
            // A generated scenario's directive i is on line i + 1. An L2 load that exited to L1 read
            // nothing: the try after L1's handler is the load.
            guard access.exitToL1 == nil, let expected = expectedLoads[access.line - 1],
                  case .completed(_, let value) = access.outcome.result, value != expected else { return nil }
            return (access.line - 1, value, expected)
        }
    }

    /// How many of `run`'s loads had an expected value and returned it.
    public func loadsChecked(_ run: WorkloadMMURun) -> Int {
        run.report.accesses.filter { access in
            guard access.exitToL1 == nil, expectedLoads[access.line - 1] != nil, case .completed = access.outcome.result else {
                return false
            }
            return true
        }.count - loadMismatches(run).count
    }

    /// Whether the guest saw the same in every run: each operation's outcome (completed at the
    /// same GPA with the same value, the same fault, MMIO) and every dirty log.
    public var sameGuestOutcomes: Bool {
        guard let first = runs.first else { return true }
        return runs.dropFirst().allSatisfy { run in
            run.report.accesses.map(\.outcome.result) == first.report.accesses.map(\.outcome.result)
        }
    }

    /// Runs `scenario` under each of `mmus`, one after the other. `progress` hears (MMU name,
    /// directives done, directives in all) now and then.
    public static func run(title: String, parameters: WorkloadParameters?, scenario: Scenario, phases: [WorkloadPhase],
                           expectedLoads: [Int: UInt64] = [:], mmus: [VirtualMachineMMU], variant: MMUVariant = .upstream, timelinePoints: Int = 120,
                           progress: ((String, Int, Int) -> Void)? = nil) -> WorkloadComparison {
        let runs = mmus.map { mmu in
            let runner = ScenarioRunner(scenario: scenario, variant: variant, checksExpectations: !mmu.isTDP, mmu: mmu)
            runner.timelineInterval = max(1, scenario.directives.count / max(1, timelinePoints))
            if let progress { runner.progress = { progress(mmu.name, $0, $1) } }
            let clock = ContinuousClock()
            let start = clock.now
            var report: RunReport
            var failure: RunFailure?
            do throws(RunFailure) {
                report = try runner.run()
            } catch {
                failure = error
                report = error.partialReport ?? RunReport(scenario: scenario.name)
                report.mmu = mmu.name
            }
            let elapsed = start.duration(to: clock.now)
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let roots = runner.vm.map { PageTree.roots(of: $0) } ?? []
            return WorkloadMMURun(mmu: mmu.name, variant: variant, report: report, failure: failure, wallSeconds: seconds, roots: roots)
        }
        return WorkloadComparison(title: title, parameters: parameters, scenario: scenario, phases: phases,
                                  expectedLoads: expectedLoads, runs: runs)
    }
}
