import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// The `nested` workload: an L1 hypervisor running two L2 guests with processes, switching between
/// them and changing its EPT with INVEPT, every access in lockstep.
@Suite struct NestedWorkloadTests {
    static let small = WorkloadParameters(processes: 2, pages: 4, iterations: 2, vcpus: 1, seed: 3)

    @Test("Two L2 guests with processes run in lockstep under TDP, each load returning what its OS stored")
    func runs() throws {
        let workload = try WorkloadKind.nested.generate(Self.small)
        let comparison = WorkloadComparison.run(title: "nested", parameters: workload.parameters, scenario: workload.scenario,
                                                phases: workload.phases, expectedLoads: workload.expectedLoads, mmus: [.ept()])
        let run = try #require(comparison.runs.first)
        #expect(run.failure == nil, "\(String(describing: run.failure))")
        #expect(comparison.loadMismatches(run).isEmpty)
        #expect(comparison.loadsChecked(run) > 0, "the guests' loads are checked against what their OS stored")
        let directives = workload.scenario.directives.map(\.directive)
        // Both guests ran, under their own EPTP and VPID, with processes (CR3 switches) in each.
        for guest in 0..<2 {
            #expect(directives.contains(.vmenter(vpid: UInt16(guest + 1), guest: guest)))
            #expect(directives.contains(.invept(.single, guest: guest)), "L1 changed guest \(guest)'s EPT with INVEPT")
        }
        #expect(directives.contains { if case .switchSpace = $0 { return true } else { return false } })
        let delta = run.report.statsAfter.delta(from: run.report.statsBefore)
        // L1 maps the guests' memory at their exits and resumes them: every exit was resolved so.
        let vmenters = directives.filter { if case .vmenter = $0 { return true } else { return false } }.count
        #expect(delta.nestedRun == UInt64(vmenters + run.report.l1Maps.count))
        #expect(run.report.l1Maps.contains { $0.map.pageSize == .size4K } && run.report.l1Maps.contains { $0.map.pageSize == .size2M })
        #expect(Set(run.report.l1Maps.map { "\($0.map.guest) \($0.map.l2GPA)" }).count == run.report.l1Maps.count,
                "each page mapped once")
        for (index, access) in run.report.accesses.enumerated() where access.exitToL1 != nil {
            #expect(run.report.accesses[index + 1].line == access.line, "the instruction runs again after L1's handler")
        }
        #expect(run.report.accesses.allSatisfy { $0.inL2 }, "every guest operation is an L2 one")
        #expect(run.report.accesses.contains { $0.outcome.tlbHit }, "the L2 TLB serves accesses")
        #expect(run.report.accesses.contains { $0.outcome.result.isPageFault }, "demand paging and copy-on-write in L2")
        #expect(run.report.shadowPagesByRole.contains { $0.key.contains("guest_mode") }, "guest_mmu's pages have guest_mode roles")
        #expect(comparison.text().contains("nested_run (VM entries)"))
        #expect(try WorkloadKind.nested.generate(Self.small).scenario.render() == workload.scenario.render(), "the same seed, the same run")
    }

    @Test("With two vCPUs each L2 guest runs on its own L1 vCPU, every access in lockstep")
    func twoVCPUs() throws {
        var parameters = Self.small
        parameters.vcpus = 2
        let workload = try WorkloadKind.nested.generate(parameters)
        #expect(workload.parameters.vcpus == 2)
        let comparison = WorkloadComparison.run(title: "nested", parameters: workload.parameters, scenario: workload.scenario,
                                                phases: workload.phases, expectedLoads: workload.expectedLoads, mmus: [.ept()])
        let run = try #require(comparison.runs.first)
        #expect(run.failure == nil, "\(String(describing: run.failure))")
        #expect(comparison.loadMismatches(run).isEmpty && comparison.loadsChecked(run) > 0)
        #expect(run.report.vcpuCount == 2)
        // Each vmenter of guest N comes on vCPU N.
        var current = 0
        for directive in workload.scenario.directives.map(\.directive) {
            if case .vcpu(let index) = directive { current = index }
            if case .vmenter(_, let guest) = directive { #expect(guest == current) }
        }
        // More vCPUs than guests: one per guest.
        parameters.vcpus = 4
        #expect(try WorkloadKind.nested.generate(parameters).parameters.vcpus == 2)
    }

    @Test("A report without L2 has no Nested section")
    func otherReportsUnchanged() throws {
        let workload = try WorkloadKind.boot.generate(WorkloadParameters(processes: 1, pages: 2, iterations: 1, vcpus: 1, seed: 1))
        let comparison = WorkloadComparison.run(title: "boot", parameters: workload.parameters, scenario: workload.scenario,
                                                phases: workload.phases, expectedLoads: workload.expectedLoads, mmus: [.shadow])
        #expect(!comparison.text().contains("Nested"))
    }
}
