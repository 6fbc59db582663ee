// The scenario library (scenarios/): each file pins a case the KVM review seeds argue about, with
// `expect` lines stating the counters KVM would show at that point. Every file runs here under
// the upstream MMU with the lockstep reference and the auditor after every access, its
// expectations checked; then under every variant a VM can be built with, whose guest must see
// exactly what upstream's saw.

import Foundation
import Testing
import KVMMMU
import VirtualMachine
import Workloads

/// The scenarios/ directory of the package.
let scenarioLibraryDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("scenarios")

/// The library's scenario files, by name.
let scenarioLibraryFiles: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: scenarioLibraryDirectory.path)) ?? [])
    .filter { $0.hasSuffix(".vmm") }.sorted()

@Suite("Scenario library: the seeds' cases in scenarios/, with KVM's counters")
struct ScenarioLibraryTests {
    func scenario(_ file: String) throws -> Scenario {
        try Scenario.parse(contentsOfFile: scenarioLibraryDirectory.appendingPathComponent(file).path)
    }

    /// The cases issue 4 asks for, each in a file, and each file described in the README.
    @Test func theLibraryHoldsEveryCaseAndDescribesIt() throws {
        let required = ["five-level-host-passthrough.vmm", "pae-cr3-switch.vmm", "legacy32-4m-pages.vmm",
                        "cr0-wp-toggle-roles.vmm", "pcid-root-cache.vmm", "unsync-invlpg.vmm", "write-flooding.vmm",
                        "dummy-root.vmm"]
        #expect(Set(required).isSubset(of: Set(scenarioLibraryFiles)), "\(scenarioLibraryFiles)")
        let readme = try String(contentsOf: scenarioLibraryDirectory.appendingPathComponent("README.md"), encoding: .utf8)
        for file in scenarioLibraryFiles {
            #expect(readme.contains("`\(file)`"), "scenarios/README.md does not describe \(file)")
        }
    }

    /// Lockstep and auditor (the runner throws on a disagreement or a broken invariant) and every
    /// `expect` line met.
    @Test(arguments: scenarioLibraryFiles)
    func runsWithTheCountersKVMWouldShow(_ file: String) throws {
        let scenario = try scenario(file)
        let expectLines = scenario.directives.filter { if case .expect = $0.directive { true } else { false } }.count
        #expect(expectLines >= 2, "\(file) pins too little")
        let report: RunReport
        do {
            report = try ScenarioRunner(scenario: scenario).run()
        } catch {
            Issue.record("\(file): \(error)")
            return
        }
        #expect(report.expectationsChecked == expectLines)
        #expect(report.lockstepChecks > 0)
    }

    /// Every variant passes lockstep and auditor too, and its guest sees what upstream's saw: the
    /// same outcome for every operation and the same final guest entries. Expectations are
    /// upstream's counters and are not checked (a variant may count otherwise by design).
    @Test(arguments: scenarioLibraryFiles)
    func everyVariantSeesWhatUpstreamSees(_ file: String) throws {
        let scenario = try scenario(file)
        let upstream = try ScenarioRunner(scenario: scenario, checksExpectations: false).run()
        for variant in MMUVariant.allCases where variant != .upstream {
            let report: RunReport
            do {
                report = try ScenarioRunner(scenario: scenario, variant: variant, checksExpectations: false).run()
            } catch {
                Issue.record("\(file) under \(variant): \(error)")
                continue
            }
            #expect(report.accesses.map(\.outcome.result) == upstream.accesses.map(\.outcome.result), "\(file) under \(variant)")
            #expect(report.accesses.map(\.line) == upstream.accesses.map(\.line), "\(file) under \(variant)")
            #expect(report.entries.map(\.value) == upstream.entries.map(\.value), "\(file) under \(variant)")
        }
    }
}

/// What `expect` checks, and when.
@Suite struct ExpectDirectiveTests {
    /// Cumulative counters count from the start of the run, instant ones are their value now, the
    /// context counters are the vCPU's (zero before boot), and `shadow_pages` is KVM's
    /// n_used_mmu_pages.
    @Test func countersAtThePointOfTheLine() throws {
        let report = try run("""
            expect pf_taken=0 root_cache_misses=0 shadow_pages=0
            map 0x400000 0x1000000 4k P,RW,US,A,D
            access read 0x400000 cpl=3
            expect pf_taken=1 pf_fixed=1 mmu_cache_miss=4 shadow_pages=4 roots_created=1 pages_4k=1
            reload-cr3
            expect tlb_flush=1 root_cache_hits=0 root_cache_misses=0 pages_4k=1
            """)
        #expect(report.expectationsChecked == 3)
    }

    /// A line that is not met stops the run there, naming every counter of the line that differs;
    /// a runner told not to check expectations runs on.
    @Test func anUnmetLineStopsTheRun() throws {
        let scenario = try Scenario.parse("""
            map 0x400000 0x1000000 4k P,RW,US,A,D
            access read 0x400000 cpl=3
            expect pf_fixed=2 mmu_cache_miss=4 mmu_unsync=1
            access read 0x400000 cpl=3
            """, name: "unmet")
        do {
            _ = try ScenarioRunner(scenario: scenario).run()
            Issue.record("the unmet expectation was not reported")
        } catch .unmetExpectation(let line, let message, let partial) {
            #expect(line == 3)
            #expect(message == "pf_fixed is 1, expected 2; mmu_unsync is 0, expected 1")
            #expect(partial.accesses.count == 1)
        } catch {
            Issue.record("unexpected failure: \(error)")
        }
        let unchecked = try ScenarioRunner(scenario: scenario, checksExpectations: false).run()
        #expect(unchecked.accesses.count == 2 && unchecked.expectationsChecked == 0)
    }
}
