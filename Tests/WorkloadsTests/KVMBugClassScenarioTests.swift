import Testing
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// Regressions for bugs KVM's shadow MMU has had (docs/BUG-CLASSES.md), as scenarios run in
/// lockstep with the architecture's reference machine: the bug, reintroduced, makes the guest see
/// something the architecture forbids (the run stops with a disagreement) or breaks the counters
/// pinned here.
@Suite struct KVMBugClassScenarioTests {
    private func run(_ text: String) throws -> RunReport {
        try ScenarioRunner(scenario: Scenario.parse(text, name: "bug-class")).run()
    }

    /// The guest-physical address of the table a level-`level` entry on `gva`'s walk points at.
    private func table(below gva: UInt64, level: Int, in report: RunReport) throws -> UInt64 {
        let entry = try #require(report.entries.first { $0.gva.rawValue == gva && $0.level == level })
        return entry.value & 0x000F_FFFF_FFFF_F000
    }

    private func completedGPA(_ record: AccessRecord) -> UInt64? {
        if case .completed(let gpa, _) = record.outcome.result { return gpa.rawValue }
        return nil
    }

    private func pageFaultCode(_ record: AccessRecord) -> UInt32? {
        if case .pageFault(let code, _) = record.outcome.result { return code.architectural }
        return nil
    }

    // MARK: Class 1: permissions inherited into shadow-page roles

    /// "Use the correct inherited permissions to get shadow page" (Lai Jiangshan, 2021; access.c
    /// sub-test 6): one guest page table reached through two PDEs that grant different rights
    /// needs two shadow pages, since a shadow PTE holds the AND of the rights on the way to it
    /// (role.access). Sharing one lets a write through the read-only PDE (or a user read through
    /// the supervisor PDE) go through on the SPTE made for the other path.
    /// Arguments: the alias PDE's rights (P+US: read-only; P+RW: supervisor), the access through
    /// it and the #PF error code the architecture gives it.
    @Test(arguments: [(UInt64(0x5), "write", UInt32(0x7)), (UInt64(0x3), "read", UInt32(0x5))])
    func aliasedTableUnderDifferentRightsGetsAShadowPagePerPath(pdeFlags: UInt64, access: String, errorCode: UInt32) throws {
        let setup = """
        map 0x400000 0x1000000 4k P,RW,US,A,D
        map 0x401000 0x1002000 4k P,RW,US,A,D
        map 0x600000 0x1001000 4k P,RW,US,A,D
        """
        let table = try table(below: 0x400000, level: 2, in: run(setup))
        let pde = table | pdeFlags | 0x20
        // The alias's first access links its shadow PDE; the second reaches the entry the first
        // path made writable and user-accessible, in the hardware if the shadow page were shared.
        let report = try run("""
        \(setup)
        access write 0x401000 cpl=3 value=5
        pte 0x600000 2 raw=\(hex(pde))
        access read 0x600000 cpl=0
        access \(access) 0x601000 cpl=3 value=6
        access read 0x601000 cpl=0
        """)
        #expect(completedGPA(report.accesses[0]) == 0x100_2000)
        #expect(completedGPA(report.accesses[2]) == 0x100_0000)
        #expect(pageFaultCode(report.accesses[3]) == errorCode, "\(report.accesses[3].outcome)")
        #expect(completedGPA(report.accesses[4]) == 0x100_2000, "a supervisor read through the alias is allowed")
        let shadowsOfTable = report.shadowPageKeys.filter { $0.gfn == table >> 12 }
        #expect(shadowsOfTable.count == 2, "one shadow page per inherited access: \(shadowsOfTable)")
    }

    // MARK: Class 6: TLB flushes the guest asks for sync unsync pages

    /// "Unload MMU on guest TLB flush if TDP disabled to force MMU sync" (2021): a guest TLB flush
    /// KVM performs for the guest (KVM_REQ_TLB_FLUSH_GUEST: INVPCID of all contexts) must sync the
    /// unsync shadow pages of the current root and of the cached ones, as a hardware TLB flush
    /// drops every stale translation. Here the guest changes a PTE of a space that is not loaded,
    /// flushes every context, and switches back without a flush (PCID, bit 63): the new PTE must
    /// be the one used; then it changes the PTE again in the loaded space and flushes.
    @Test func invpcidOfAllContextsSyncsTheCachedRootsToo() throws {
        let report = try run("""
        set pcid=1
        space a
        map 0x400000 0x1000000 4k P,RW,US,A,D
        space b
        map 0x400000 0x1002000 4k P,RW,US,A,D
        switch a pcid=1
        access read 0x400000 cpl=3
        switch b pcid=2
        access read 0x400000 cpl=3
        space a
        pte 0x400000 1 raw=0x1001067
        invpcid all
        switch a pcid=1 noflush
        access read 0x400000 cpl=3
        pte 0x400000 1 raw=0x1003067
        invpcid all
        access read 0x400000 cpl=3
        """)
        let gpas = report.accesses.compactMap { $0.operation == "read" ? completedGPA($0) : nil }
        #expect(gpas == [0x100_0000, 0x100_2000, 0x100_1000, 0x100_3000], "\(report.accesses.map(\.outcome))")
    }

    // MARK: Class 7: write tracking and unsync of a table shadowed at two levels

    /// A gfn shadowed as an upper-level table is write-tracked, and a write-tracked gfn's
    /// last-level shadow page is never unsynced ("Check write tracking in all address spaces",
    /// 2026: a gfn that looked untracked let an upper-level page go unsync). Here the guest's page
    /// directory also serves as a page table (a recursive PDE), so one gfn has a level-2 and a
    /// level-1 shadow page; the guest's store to it through the recursive mapping must be emulated
    /// with both shadow pages kept in sync, and nothing unsynced.
    @Test func aTableShadowedAsDirectoryAndPageTableIsNeverUnsynced() throws {
        let setup = """
        map 0x400000 0x1000000 4k P,RW,US,A,D
        """
        let directory = try table(below: 0x400000, level: 3, in: run(setup))
        // PDE 3 (0x600000) points back at the directory: 0x600000 + i * 4 KiB maps what PDE i
        // points at, and 0x603000 maps the directory itself.
        let recursive = directory | 0x67
        let report = try run("""
        \(setup)
        pte 0x600000 2 raw=\(hex(recursive))
        access read 0x400000 cpl=3
        access read 0x603000 cpl=0
        access write 0x603018 cpl=0 value=\(hex(recursive))
        access read 0x603018 cpl=0
        access read 0x400000 cpl=3
        """)
        let shadows = report.shadowPageKeys.filter { $0.gfn == directory >> 12 }
        #expect(shadows.count == 2, "the directory is shadowed at two levels: \(shadows)")
        let delta = report.statsAfter.delta(from: report.statsBefore)
        #expect(delta.mmuUnsync == 0, "nothing unsynced: \(delta)")
        #expect(delta.mmuPTEWrite >= 1, "the store to the tracked table was emulated: \(delta)")
        let write = report.accesses[3]
        #expect(write.outcome.emulated && completedGPA(write) == directory + 0x18)
        if case .completed(_, let value) = report.accesses[4].outcome.result {
            #expect(value == recursive)
        } else {
            Issue.record("the read back failed: \(report.accesses[4].outcome)")
        }
        #expect(completedGPA(report.accesses[5]) == 0x100_0000)
    }
}
