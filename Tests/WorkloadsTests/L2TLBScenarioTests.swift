import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// The L2 TLB: what KVM's nested VMX keeps and flushes of L2's (and L1's) translations at VM entry
// and exit, INVVPID, INVEPT, and L2's INVLPG and MOV to CR3. Each case makes L2 change a PTE
// without invalidating it and then asks which page an access reaches: the stale one the TLB still
// holds, or the new one. A missed flush and an extra one both change the value read. Every access
// is also checked in lockstep (the reference allows a stale translation only until an
// invalidation the architecture defines names it).

@Suite("The L2 TLB: KVM's nested flush rules, INVVPID, INVEPT")
struct L2TLBScenarioTests {
    /// L2 (4-level paging) writes 0xA to L2 page 0x400000 (L2 gpa 0x1000000) and 0xB to 0x600000
    /// (L2 gpa 0x1001000), then points 0x400000 at 0x1001000 without invalidating. `then` follows;
    /// the scenario's last access reads 0x400000.
    func staleOrNew(vmenter: String = "vmenter vpid=1", _ then: String) throws -> (value: UInt64, tlbHit: Bool, report: RunReport) {
        let text = """
            l1 ept levels=4 ad=1
            \(l2TablePoolMaps())
            ept-map 0x1000000 0x1400000 2m RWX
            \(vmenter)
            set paging=4 wp=1
            map 0x400000 0x1000000 4k P|RW|US
            map 0x600000 0x1001000 4k P|RW|US
            access write 0x400000 value=0xa
            access write 0x600000 value=0xb
            pte 0x400000 1 raw=0x1001067
            \(then)
            access read 0x400000
            """
        let report = try ScenarioRunner(scenario: try Scenario.parse(text, name: "l2-tlb"), mmu: .ept()).run()
        let last = report.accesses.last!
        guard case .completed(_, let value) = last.outcome.result else {
            Issue.record("\(last.outcome.result)")
            return (0, false, report)
        }
        return (value, last.outcome.tlbHit, report)
    }

    @Test("Without an invalidation L2 keeps using its cached translation; INVLPG and MOV to CR3 drop it")
    func l2Invalidations() throws {
        let stale = try staleOrNew("")
        #expect(stale.value == 0xa && stale.tlbHit)
        #expect(try staleOrNew("invlpg 0x400000").value == 0xb)
        #expect(try staleOrNew("invlpg 0x500000").value == 0xa, "INVLPG of another page")
        #expect(try staleOrNew("reload-cr3").value == 0xb)
    }

    @Test("With VPID, KVM keeps L2's entries across vmexit and vmenter with the same vpid12 and flushes them when vpid12 changes")
    func vpidTransitions() throws {
        #expect(try staleOrNew("vmexit\nvmenter vpid=1").value == 0xa, "same vpid12: no flush")
        #expect(try staleOrNew("vmexit\nvmenter vpid=1\nvmexit\nvmenter vpid=1").value == 0xa)
        #expect(try staleOrNew("vmexit\nvmenter vpid=2").value == 0xb, "vpid12 changed: vpid02 flushed")
        #expect(try staleOrNew("vmexit\nvmenter").value == 0xb, "VPID disabled: VPID 0 flushed at entry")
        // Without VPID in vmcs12 every transition flushes.
        #expect(try staleOrNew(vmenter: "vmenter", "vmexit\nvmenter").value == 0xb)
        // Within one run of L2 without VPID, the entries stay.
        #expect(try staleOrNew(vmenter: "vmenter", "").value == 0xa)
    }

    @Test("INVVPID: individual-address drops that address of vpid02 only; the context types drop all of vpid02")
    func invvpid() throws {
        #expect(try staleOrNew("vmexit\ninvvpid individual 1 0x400000\nvmenter vpid=1").value == 0xb)
        #expect(try staleOrNew("vmexit\ninvvpid individual 1 0x500000\nvmenter vpid=1").value == 0xa, "another address stays")
        #expect(try staleOrNew("vmexit\ninvvpid single 1\nvmenter vpid=1").value == 0xb)
        #expect(try staleOrNew("vmexit\ninvvpid all\nvmenter vpid=1").value == 0xb)
        #expect(try staleOrNew("vmexit\ninvvpid single-globals 1\nvmenter vpid=1").value == 0xb)
        // KVM flushes vpid02 whatever VPID the operand names (every vpid12 shares vpid02).
        #expect(try staleOrNew("vmexit\ninvvpid single 7\nvmenter vpid=1").value == 0xb)
        #expect(try staleOrNew("vmexit\ninvvpid individual 7 0x400000\nvmenter vpid=1").value == 0xb)
    }

    @Test("INVEPT drops the combined mappings of the EPTP: KVM frees the root and flushes it when it loads it again")
    func invept() throws {
        #expect(try staleOrNew("vmexit\ninvept single\nvmenter vpid=1").value == 0xb)
        #expect(try staleOrNew("vmexit\ninvept global\nvmenter vpid=1").value == 0xb)
    }

    @Test("INVVPID operands KVM fails, VPID 0 in an entry with VPID, INVVPID under NPT")
    func badOperands() throws {
        for line in ["invvpid individual 0 0x1000", "invvpid individual 1 0x800000000000", "invvpid single 0", "invvpid single-globals 0"] {
            do {
                _ = try staleOrNew("vmexit\n\(line)\nvmenter vpid=1")
                Issue.record("\(line) succeeded")
            } catch let failure as RunFailure {
                guard case .badScenario(_, let message) = failure else { Issue.record("\(failure)"); continue }
                #expect(message.contains("VMfailValid"), "\(message)")
            }
        }
        #expect(throws: RunFailure.self) { try staleOrNew(vmenter: "vmenter vpid=0", "") }
        #expect(throws: ScenarioError.self) { try Scenario.parse("l1 npt\ninvvpid all\n", name: "npt") }
        #expect(throws: ScenarioError.self) { try Scenario.parse("l1 npt\nvmenter vpid=1\n", name: "npt") }
        #expect(throws: ScenarioError.self) { try Scenario.parse("l1 ept\nvmenter\ninvvpid all\n", name: "in L2") }
        #expect(throws: ScenarioError.self) { try Scenario.parse("l1 ept\ninvvpid sometimes\n", name: "type") }
    }

    @Test("L1's TLB: flushed at every transition without VPID for L2, kept with it; tlb_flush counts KVM's flushes")
    func l1Entries() throws {
        func run(_ vmenter: String, cycles: Int) throws -> (value: UInt64, flushes: UInt64) {
            let text = """
                l1 ept levels=4 ad=1
                ept-map 0x0 0x1000000 4k RWX
                map 0x2000000 0x2000000 4k P|RW
                map 0x2200000 0x2001000 4k P|RW
                \(vmenter)
                access read 0x0
                vmexit
                access write 0x2000000 value=0xa
                access write 0x2200000 value=0xb
                pte 0x2000000 1 raw=0x2001063
                \(String(repeating: "\(vmenter)\naccess read 0x0\nvmexit\n", count: cycles))
                access read 0x2000000
                """
            let report = try ScenarioRunner(scenario: try Scenario.parse(text, name: "l1-tlb"), mmu: .ept()).run()
            guard case .completed(_, let value) = report.accesses.last!.outcome.result else { return (0, 0) }
            return (value, report.statsAfter.tlbFlush - report.statsBefore.tlbFlush)
        }
        let withVPID = try run("vmenter vpid=3", cycles: 3)
        #expect(withVPID.value == 0xa, "L1's stale entry survives L2 with its own VPID")
        let withoutVPID = try run("vmenter", cycles: 3)
        #expect(withoutVPID.value == 0xb, "VPID 0 is flushed at every entry and exit")
        // KVM_REQ_TLB_FLUSH_GUEST twice a cycle without VPID; once in all (the first entry, last_vpid 0 -> 3) with it;
        // a warm-up cycle, whose first L2 access makes KVM shadow L1's EPT (and flush), and three more.
        #expect(withoutVPID.flushes - withVPID.flushes == 4 * 2 - 1)
        #expect(try run("vmenter vpid=3", cycles: 5).flushes == withVPID.flushes)
    }

    @Test("vmenter vpid= and invvpid render to what parses back the same")
    func roundTrip() throws {
        let scenario = try Scenario.parse("l1 ept\nvmenter vpid=5\nvmexit\ninvvpid individual 5 0x1000\ninvvpid all\nvmenter\n", name: "r")
        let again = try Scenario.parse(scenario.render(), name: "r")
        #expect(again.directives.map(\.directive) == scenario.directives.map(\.directive))
    }
}
