import Testing
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

func run(_ text: String) throws -> RunReport {
    let scenario = try Scenario.parse(text, name: "test")
    return try ScenarioRunner(scenario: scenario).run()
}

@Suite struct ScenarioRunTests {
    @Test func firstAccessShadowsTheWalk() throws {
        let report = try run("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        access write 0x400008 cpl=3 value=0x1234
        access read 0x400008 cpl=3
        """)
        #expect(report.accesses.count == 3)
        guard case .completed(let gpa, _) = report.accesses[0].outcome.result else { Issue.record("\(report.accesses[0])"); return }
        #expect(gpa == GuestPhysicalAddress(0x100_0000))
        guard case .completed(_, let value) = report.accesses[2].outcome.result else { Issue.record("\(report.accesses[2])"); return }
        #expect(value == 0x1234)
        let delta = report.statsAfter.delta(from: report.statsBefore)
        #expect(delta.pfTaken >= 1)
        #expect(delta.pfFixed >= 1)
        print(report.statsAfter.values.filter { $0.value != 0 })
        for access in report.accesses { print(access.operation, access.gva, access.outcome) }
    }

    @Test func guestFaultsAreInjected() throws {
        let report = try run("""
        map 0x400000 0x1000000 4k P,US
        access write 0x400000 cpl=3 value=1
        access read 0x800000 cpl=3
        """)
        guard case .pageFault(let code, let cr2) = report.accesses[0].outcome.result else { Issue.record("\(report.accesses[0])"); return }
        #expect(code.architectural == 0x7)
        #expect(cr2 == GuestVirtualAddress(0x400000))
        guard case .pageFault(let code2, _) = report.accesses[1].outcome.result else { Issue.record("\(report.accesses[1])"); return }
        #expect(code2.architectural == 0x4)
    }

    /// The kernel's store to a last-level table unsyncs its shadow page rather than being
    /// emulated; the user's write then faults on the read-only SPTE and KVM's fresh walk finds the
    /// new, read-only entry.
    @Test func pteWritesUnsyncAndTheNextFaultSeesThem() throws {
        let report = try run("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 1 P,US
        access write 0x400000 cpl=3 value=5
        """)
        guard case .pageFault(let code, _) = report.accesses[2].outcome.result else { Issue.record("\(report.accesses[2])"); return }
        #expect(code.architectural == 0x7)
        #expect(report.statsAfter.mmuPTEWrite == 0)
        #expect(report.statsAfter.mmuUnsync == 1)
        #expect(!report.accesses[1].outcome.emulated)
    }
}
