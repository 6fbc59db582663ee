import Testing
import VirtualMachine
import Workloads
import X86Paging

/// Places where KVM itself lets a guest see what the architecture forbids, reproduced faithfully:
/// the lockstep machine must catch each one (exit status 2), or the model has drifted from KVM or
/// the checker has gone blind.
@Suite struct KnownKVMGapTests {
    /// KVM's emulator completes L2's MMIO accesses (after the first, the shadow EPT holds an MMIO
    /// SPTE: a misconfiguration to the hardware) and translates through `nested_mmu`, which asks
    /// L1's EPT for R with every final access. An L2 write L1's EPT refuses (R only) then exits to
    /// L1 with bit 0 (read) in the qualification besides bit 1; the hardware reports bit 1 only.
    @Test func nestedEmulatorReportsAReadWithAWriteToMMIO() throws {
        let scenario = try Scenario.parse("""
        l1 ept levels=4 ad=0
        ept-map 0x1000 0x100000000 4k R
        vmenter
        access read 0x1008
        access write 0x1008 value=1
        """, name: "nested-mmio-gap")
        do {
            _ = try ScenarioRunner(scenario: scenario, mmu: .ept()).run()
            Issue.record("the run finished: the lockstep machine missed KVM's emulator's qualification")
        } catch .disagreement(let line, let disagreement, let partial) {
            #expect(line == 5)
            #expect(disagreement.expected.contains("rawValue: 394"), "\(disagreement.expected)")  // 0x18a: W, R allowed, linear, final
            #expect(disagreement.actual.contains("rawValue: 395"), "\(disagreement.actual)")  // 0x18b: and R
            #expect(partial.accesses.first?.outcome.result == .mmio(gpa: GuestPhysicalAddress(0x1_0000_0008), value: ~0))
        } catch {
            Issue.record("unexpected failure: \(error)")
        }
    }

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

    /// Shadow pages are shared by every root that reaches the same guest table, whatever its
    /// PCID, and unsync pages are synced per page. Here spaces a (PCID 1) and b (PCID 2) share the
    /// kernel window's last-level table. Under PCID 2 the guest rewrites an entry (KVM unsyncs the
    /// page) and INVLPGs it, which syncs the shared shadow page; it rewrites the entry again (no
    /// exit: the page is unsync) and switches to PCID 1 without a flush, which does not sync. PCID
    /// 1 then sees the middle value, which was never in the entry while PCID 1 was current: the
    /// architecture allows only its own old translation or a fresh walk.
    @Test func unsyncSharedAcrossPCIDsLeaksAnotherPCIDsTranslation() throws {
        let scenario = try Scenario.parse("""
        set pcid=1
        space a
        space b
        map 0xffffe00040000000 0x1000000 4k P,RW,A,D
        switch a pcid=1
        access read 0xffffe00040000000
        switch b pcid=2
        pte 0xffffe00040000000 1 raw=0x1001063
        invlpg 0xffffe00040000000
        access read 0xffffe00040000000
        pte 0xffffe00040000000 1 raw=0x1002063
        switch a pcid=1 noflush
        access read 0xffffe00040000000
        """, name: "pcid-unsync-gap")
        do {
            _ = try ScenarioRunner(scenario: scenario).run()
            Issue.record("the run finished: the lockstep machine missed KVM's shared-unsync gap")
        } catch .disagreement(let line, let disagreement, _) {
            #expect(line == 13)
            #expect(disagreement.expected.contains("0x1002000"))
            #expect(disagreement.actual.contains("0x1001000"))
        } catch {
            Issue.record("unexpected failure: \(error)")
        }
        // Flushing on the switch back syncs (KVM_REQ_MMU_SYNC via kvm_invalidate_pcid): no gap.
        let flushed = try ScenarioRunner(scenario: try Scenario.parse(
            scenario.directives.map(\.directive.rendered).joined(separator: "\n")
                .replacingOccurrences(of: "switch a pcid=1 noflush", with: "switch a pcid=1"),
            name: "pcid-unsync-flushed")).run()
        #expect(flushed.accesses.last?.outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_2000), value: 0))
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

    /// A 32-bit guest with CR4.PSE maps a 4 MiB page; KVM shadows it with a direct page that splits
    /// it into 4 KiB SPTEs under the quadrant-0 root. The guest then clears CR4.PSE: the PDE's PS
    /// bit is ignored from now on and the PDE names a page table (here the page's own first 4 KiB,
    /// holding a PTE to 0x1800000). CR4.PSE is in KVM's CPU role (`ext.cr4_pse`) and among the CR4
    /// bits whose write resets the MMU context, but not in the shadow pages' role: the roots built
    /// after the reset are the very same pages, still linking the direct page, and INVLPG syncs
    /// only unsync pages. So KVM keeps serving the old large-page translation where the processor
    /// walks the new table.
    @Test func pseClearKeepsKVMsSplitLargePage() throws {
        let scenario = try Scenario.parse("""
        set paging=32 nx=0
        map 0x400000 0x1400000 4m P,RW,US,A,D
        access write 0x400000 cpl=3 value=0x1800067
        set pse=0
        invlpg 0x400000
        access read 0x400000 cpl=3
        """, name: "pse-gap")
        do {
            _ = try ScenarioRunner(scenario: scenario).run()
            Issue.record("the run finished: the lockstep machine missed KVM's CR4.PSE gap (or the model left KVM)")
        } catch .disagreement(let line, let disagreement, let partial) {
            #expect(line == 6)
            // The reference walks the PDE as a table pointer: its PTE 0 maps 0x1800000.
            #expect(disagreement.expected.contains("translation to 0x1800000"))
            // KVM: the split 4 MiB page's SPTE, still gpa 0x1400000 (whose first word is that PTE).
            #expect(disagreement.actual.contains("completed(gpa: 0x1400000"))
            // The model did what KVM does: one context reset with new roles, and not one shadow page
            // more than before it (the four quadrant roots and the direct page).
            #expect(partial.contextResets == 1 && partial.roleReinitializations == 1)
            #expect(partial.statsAfter.mmuCacheMiss == 5)
            #expect(partial.shadowPagesByLevel == [2: 4, 1: 1])
            #expect(partial.accesses.count == 1)
        } catch {
            Issue.record("unexpected failure: \(error)")
        }
    }

    /// The same guest rewriting its PDE after clearing CR4.PSE, as an OS that changes its paging
    /// would: the store to the write-tracked page directory is emulated and zaps both SPTEs that
    /// shadow the PDE, so KVM walks the PDE afresh and agrees with the processor.
    @Test func pseClearWithThePDERewrittenAgrees() throws {
        let report = try ScenarioRunner(scenario: try Scenario.parse("""
        set paging=32 nx=0
        map 0x400000 0x1400000 4m P,RW,US,A,D
        access write 0x400000 cpl=3 value=0x1800067
        set pse=0
        pte 0x400000 2 P,RW,US,A,D,PS
        expect mmu_pde_zapped=2
        access read 0x400000 cpl=3
        """, name: "pse-rewritten")).run()
        guard case .completed(let gpa, _) = report.accesses.last?.outcome.result else {
            Issue.record("\(String(describing: report.accesses.last))")
            return
        }
        #expect(gpa == GuestPhysicalAddress(0x180_0000))
    }
}
