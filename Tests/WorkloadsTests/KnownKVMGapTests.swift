import Testing
import VirtualMachine
import Workloads
import X86Paging

/// Places where KVM itself lets a guest see what the architecture forbids, reproduced faithfully:
/// the lockstep machine must catch each one (exit status 2), or the model has drifted from KVM or
/// the checker has gone blind.
@Suite struct KnownKVMGapTests {
    /// KVM's CR0.WP=0 trick maps a user read-only page that a supervisor write hit as a
    /// supervisor-writable page (paging_tmpl.h, FNAME(page_fault)); role.smap_andnot_wp keeps such
    /// pages from being reused when CR4.SMAP changes, and mmu.rst reasons that with SMAP on the
    /// write faults anyway. It does not when RFLAGS.AC=1: the write is allowed, and after CLAC
    /// (which does not exit) a supervisor read of the page must fault under SMAP, but the SPTE now
    /// says "supervisor page" and the hardware lets the read through.
    @Test func cr0WPTrickDefeatsSMAPAfterCLAC() throws {
        let scenario = try Scenario.parse("""
        set wp=0 smap=1 ac=1
        map 0x400000 0x1000000 4k P,US,A,D
        access write 0x400000 cpl=0 value=7
        set ac=0
        access read 0x400000 cpl=0
        """, name: "smap-gap")
        do {
            _ = try ScenarioRunner(scenario: scenario).run()
            Issue.record("the run finished: the lockstep machine missed KVM's SMAP gap")
        } catch .disagreement(let line, let disagreement, let partial) {
            #expect(line == 5)
            #expect(disagreement.expected.contains("#PF"))
            #expect(disagreement.actual.contains("completed"))
            // The write before CLAC was architecturally fine and KVM got it right.
            #expect(partial.accesses.count == 1)
        } catch {
            Issue.record("unexpected failure: \(error)")
        }
    }

    /// The same scenario with AC=0 throughout: the supervisor write faults under SMAP before
    /// KVM's trick applies, exactly as mmu.rst assumes, and everything agrees.
    @Test func withoutACTheTrickNeverApplies() throws {
        let report = try ScenarioRunner(scenario: try Scenario.parse("""
        set wp=0 smap=1 ac=0
        map 0x400000 0x1000000 4k P,US,A,D
        access write 0x400000 cpl=0 value=7
        access read 0x400000 cpl=0
        """, name: "smap-no-gap")).run()
        guard case .pageFault(let code, _) = report.accesses[0].outcome.result else {
            Issue.record("\(report.accesses[0])")
            return
        }
        #expect(code.architectural == 0x3)
        guard case .pageFault(let readCode, _) = report.accesses[1].outcome.result else {
            Issue.record("\(report.accesses[1])")
            return
        }
        #expect(readCode.architectural == 0x1)
    }
}
