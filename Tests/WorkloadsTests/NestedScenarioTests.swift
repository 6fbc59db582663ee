import Foundation
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// Nested scenarios: `l1`, `ept-map`, `vmenter`, `vmexit`, `invept`, and L2's accesses in lockstep
// with the architecture's nested walk, reported with their exits to L1.

private let nestedExample = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("examples/nested-ept.vmm").path

@Suite("Nested scenarios: L1 under TDP running L2")
struct NestedScenarioTests {
    func run(_ text: String, mmu: VirtualMachineMMU = .ept()) throws -> RunReport {
        try ScenarioRunner(scenario: try Scenario.parse(text, name: "nested"), mmu: mmu).run()
    }

    @Test("examples/nested-dirty-log.vmm: L2's writes logged through guest_mmu, its 2 MiB leaf split eagerly, every get re-protecting both MMUs")
    func dirtyLogExample() throws {
        let path = URL(fileURLWithPath: nestedExample).deletingLastPathComponent().appendingPathComponent("nested-dirty-log.vmm").path
        let report = try ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: path), mmu: .ept()).run()
        #expect(report.dirtyLogs.map { $0.gfns.map(\.rawValue) } == [[0x1000, 0x1234], [0x1000, 0x1001]])
        // Every write after logging began exited once (its leaf was write-protected); the read did not.
        #expect(report.accesses.map(\.outcome.exits) == [1, 1, 1, 1, 0, 1, 1, 1])
        #expect(report.statsAfter.pages4K == 514 && report.statsAfter.pages2M == 0, "the 2 MiB leaf split into 512")
    }

    @Test("examples/nested-nx-huge-pages.vmm: L2's fetches split guest_mmu's 2 MiB leaves through counted direct pages, nx-recover brings them back")
    func nxHugePagesExample() throws {
        let path = URL(fileURLWithPath: nestedExample).deletingLastPathComponent().appendingPathComponent("nested-nx-huge-pages.vmm").path
        let runner = ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: path), mmu: .ept())
        let report = try runner.run()
        #expect(report.accesses.map(\.outcome.exits) == [1, 1, 1, 1, 1, 1])
        // Both split tables went at the recovery, and both regions are 2 MiB leaves again.
        #expect(runner.vm.mmu.stats.pages2M == 2 && runner.vm.mmu.stats.nxLpageSplits == 0)
        #expect(runner.vm.mmu.shadowPages.allSatisfy { !$0.role.isDirect })
        #expect(report.statsAfter.mmuShadowZapped - report.statsBefore.mmuShadowZapped == 2)
        // Cut before the recovery, the two direct pages are there and counted.
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let beforeRecovery = String(text[..<text.range(of: "nx-recover")!.lowerBound])
        let split = ScenarioRunner(scenario: try Scenario.parse(beforeRecovery, name: "split"), mmu: .ept())
        _ = try split.run()
        #expect(split.vm.mmu.stats.nxLpageSplits == 2 && split.vm.mmu.possibleNXHugePages.count == 2)
        #expect(split.vm.mmu.stats.pages2M == 0)
    }

    @Test("examples/nested-ept.vmm: completions, violations with their qualification, a misconfiguration, INVEPT")
    func example() throws {
        let report = try ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: nestedExample), mmu: .ept()).run()
        let l2 = report.accesses.filter(\.inL2)
        #expect(l2.count == report.accesses.count)
        let exits = l2.compactMap(\.exitToL1)
        #expect(exits == [
            .eptViolation(GuestPhysicalAddress(0x1008), qualification: [.dataWrite, .readable, .linearAddressValid, .finalTranslation]),
            .eptViolation(GuestPhysicalAddress(0x2000), qualification: [.dataRead, .executable, .linearAddressValid, .finalTranslation]),
            .eptMisconfiguration(GuestPhysicalAddress(0x3000)),
            .eptViolation(GuestPhysicalAddress(0x40_0000), qualification: [.dataRead, .linearAddressValid, .finalTranslation]),
        ])
        #expect(l2[1].outcome.result == .completed(gpa: GuestPhysicalAddress(0x10), value: 0x1234))
        #expect(l2.last?.outcome.result == .completed(gpa: GuestPhysicalAddress(0x1008), value: 2))
        // L1's store to its shadowed last-level EPT table unsynced the page (the TDP MMU's
        // make_spte) instead of being emulated; the INVEPT's reload synced it.
        #expect(report.statsAfter.mmuPTEWrite == report.statsBefore.mmuPTEWrite && report.statsAfter.mmuUnsync == 0)
        let json = RunReport.accessJSON(l2[2])
        #expect(json.contains("\"gpa\":\"0x1008\""))
        #expect(json.contains("\"l2\":true,\"exit\":\"ept_violation\",\"exit_qualification\":\"0x18a\""))
        #expect(RunReport.accessJSON(l2[5]).contains("\"exit\":\"ept_misconfig\""))
        // An access that completes without an exit to L1 says so as every access line does.
        #expect(RunReport.accessJSON(l2[0]).contains("\"exit\":\"none\""))
        #expect(!RunReport.accessJSON(l2[0]).contains("exit_qualification"))
    }

    @Test("A nested scenario needs L1 under TDP: a clear error under shadow paging and under NPT for `l1 ept`")
    func needsTDP() throws {
        let scenario = try Scenario.parse(contentsOfFile: nestedExample)
        for mmu in [VirtualMachineMMU.shadow, .npt()] {
            do {
                _ = try ScenarioRunner(scenario: scenario, mmu: mmu).run()
                Issue.record("ran under \(mmu.name)")
            } catch {
                guard case .badScenario(_, let message) = error else { Issue.record("\(error)"); continue }
                #expect(message.contains("--mmu tdp"), "\(message)")
            }
        }
    }

    @Test("L1 under NPT: a #NPF exit with the error code, 5-level EPT without A/D or execute-only")
    func nptAndFiveLevelEPT() throws {
        let npt = try run("""
            l1 npt levels=4
            ept-map 0x0    0x1000000 4k RWX
            ept-map 0x1000 0x1001000 4k RX
            vmenter
            access write 0x8 value=7
            access write 0x1008 value=7
            access exec 0x1000
            vmexit
            """, mmu: .npt())
        guard case .nestedPageFault(let address, let errorCode)? = npt.accesses[1].exitToL1 else {
            Issue.record("\(npt.accesses.map(\.exitToL1))")
            return
        }
        #expect(address.rawValue == 0x1008 && errorCode.contains(.write) && errorCode.contains(.guestFinal))
        #expect(RunReport.accessJSON(npt.accesses[1]).contains("\"exit\":\"npf\",\"exit_info1\":"))
        #expect(npt.accesses[2].exitToL1 == nil)

        let ept = try run("""
            l1 ept levels=5 ad=0 execonly=0
            ept-map 0x0 0x1000000 4k X
            ept-map 0x1000 0x1001000 4k RWXAD
            vmenter
            access exec 0x0
            access write 0x1000 value=3
            access read 0x1000
            vmexit
            invept global
            vmenter
            access read 0x1000
            """)
        #expect(ept.accesses[0].exitToL1 == .eptMisconfiguration(GuestPhysicalAddress(0)), "execute-only without the capability")
        #expect(ept.accesses[2].outcome.result == .completed(gpa: GuestPhysicalAddress(0x1000), value: 3))
        #expect(ept.accesses[3].outcome.result == .completed(gpa: GuestPhysicalAddress(0x1000), value: 3))
        #expect(ept.statsAfter.nestedRun == 3)
    }

    @Test("examples/nested-demand.vmm: L1 maps L2's pages at its exits, L2 executes the instruction again")
    func demandExample() throws {
        let path = URL(fileURLWithPath: nestedExample).deletingLastPathComponent().appendingPathComponent("nested-demand.vmm").path
        let report = try ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: path), mmu: .ept()).run()
        let exits = report.accesses.map(\.exitToL1)
        #expect(exits.map { $0?.address.rawValue } == [0x100_0008, nil, nil, nil, 0x180_0010, nil, 0x180_0010, nil])
        // Each resolved exit is followed by the same line again, completing.
        #expect(report.accesses[1].line == report.accesses[0].line && report.accesses[5].line == report.accesses[4].line)
        #expect(report.accesses[1].outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x1111))
        #expect(report.accesses[2].outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x1111))
        #expect(report.accesses[5].outcome.result == .completed(gpa: GuestPhysicalAddress(0x180_0010), value: 0))
        // The write to the page L1 maps read-only: a violation with the entry's R in the
        // qualification, which L1 leaves as it is (the line is not run again).
        guard case .eptViolation(_, let qualification)? = exits[6] else {
            Issue.record("\(exits)")
            return
        }
        #expect(qualification.contains(.dataWrite) && qualification.contains(.readable))
        #expect(report.accesses[7].line == report.accesses[6].line + 1)
        // L2's kernel's table pages one 4 KiB page each, then the 2 MiB page and the read-only 4 KiB one.
        let maps = report.l1Maps.map(\.map)
        #expect(maps.dropLast(2).allSatisfy { $0.pageSize == .size4K && $0.l2GPA.rawValue >= 0x10_0000 && $0.l2GPA.rawValue < 0x100_0000
            && $0.l1GPA.rawValue == $0.l2GPA.rawValue + 0x100_0000 })
        #expect(maps.suffix(2) == [
            EPTMapDirective(l2GPA: GuestPhysicalAddress(0x100_0000), l1GPA: GuestPhysicalAddress(0x200_0000), pageSize: .size2M,
                            permissions: [.read, .write, .execute]),
            EPTMapDirective(l2GPA: GuestPhysicalAddress(0x180_0000), l1GPA: GuestPhysicalAddress(0x280_0000), pageSize: .size4K,
                            permissions: [.read]),
        ])
        // Every exit but the last was resolved by a map and resumed: nested_run counts the first
        // entry and one resume per exit.
        #expect(report.statsAfter.nestedRun == 1 + UInt64(maps.count) + 1)
        // The JSON places each map after the exit it resolved and before the instruction's next try.
        let lines = report.jsonLines().split(separator: "\n").map(String.init)
        let firstMap = try #require(lines.firstIndex { $0.contains("\"l2gpa\":\"0x1000000\"") })
        #expect(lines[firstMap] == #"{"type":"l1_map","guest":0,"l2gpa":"0x1000000","l1gpa":"0x2000000","size":"2m","perms":"RWX"}"#)
        #expect(lines[firstMap - 1].contains("\"i\":0,") && lines[firstMap - 1].contains("\"exit\":\"ept_violation\""))
        #expect(lines[firstMap + 1].contains("\"i\":1,") && lines[firstMap + 1].contains("\"exit\":\"none\""))
    }

    @Test("On-demand maps under NPT, a walk's table pages mapped one exit at a time, and exits outside every range left alone")
    func demandUnderNPTAndNestedTables() throws {
        let npt = try run("""
            l1 npt levels=4
            ept-demand 0x0 0x1000000 16m 4k RWX
            ept-demand 0x1000000 0x2000000 2m 2m RW guest=1
            vmenter
            set paging=4
            map 0x400000 0x1000000 4k P|RW
            access write 0x400000 value=5
            access read 0x400000
            vmexit
            vmenter guest=1
            access write 0x1000010 value=9
            access read 0x1000010
            access read 0x1200000
            access exec 0x1000000
            """, mmu: .npt())
        // Guest 0's 0x1000000 is in no range of guest 0: the #NPF stays; guest 1 maps it, RW only.
        let exits = npt.accesses.map(\.exitToL1)
        guard case .nestedPageFault(let address, _)? = exits[0] else {
            Issue.record("\(exits)")
            return
        }
        #expect(address.rawValue == 0x100_0000 && npt.accesses[1].exitToL1 != nil)
        #expect(npt.accesses[2].exitToL1 != nil && npt.accesses[3].outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0010), value: 9))
        #expect(npt.accesses[4].outcome.result == .completed(gpa: GuestPhysicalAddress(0x100_0010), value: 9))
        #expect(npt.accesses[5].exitToL1 != nil, "0x1200000 is outside guest 1's range")
        #expect(npt.accesses[6].exitToL1 != nil && npt.accesses.count == 7, "a fetch from a page L1 maps NX")
        #expect(npt.l1Maps.last?.map == EPTMapDirective(l2GPA: GuestPhysicalAddress(0x100_0000), l1GPA: GuestPhysicalAddress(0x200_0000),
                                                         pageSize: .size2M, permissions: [.read, .write], guest: 1))

        // L2 paging with its tables on demand too: the first access's walk meets each unmapped table
        // page in turn (nothing was stored there yet by an access: the kernel's stores mapped them).
        let ept = try run("""
            l1 ept levels=4 ad=1
            ept-demand 0x0 0x1000000 32m 4k RW
            vmenter
            set paging=4 nx=1
            map 0x400000 0x1800000 4k P|RW
            access write 0x400000 value=0x77
            access read 0x400000
            """)
        #expect(ept.accesses.last?.outcome.result == .completed(gpa: GuestPhysicalAddress(0x180_0000), value: 0x77))
        #expect(ept.l1Maps.contains { $0.map.l2GPA.rawValue == 0x180_0000 })
        #expect(ept.statsAfter.nestedRun == 1 + UInt64(ept.l1Maps.count))
    }

    @Test("examples/nested-smp.vmm: one L2 guest on two vCPUs, its kernel shared, each vCPU's TLB its own until its INVLPG")
    func smpExample() throws {
        let path = URL(fileURLWithPath: nestedExample).deletingLastPathComponent().appendingPathComponent("nested-smp.vmm").path
        let runner = ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: path), mmu: .ept())
        let report = try runner.run()
        #expect(report.vcpuCount == 2)
        let results = report.accesses.map(\.outcome.result)
        let protection: PageFaultErrorCode = [.present, .write, .user]
        // vCPU 1 reads what vCPU 0's L2 wrote through the same guest tables.
        #expect(results[2] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 0x11))
        #expect(results[4] == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x22))
        // W taken away by vCPU 0's kernel: vCPU 0 faults after its INVLPG, vCPU 1's cached
        // translation still writes (a TLB hit) until its own INVLPG.
        #expect(results[6] == .pageFault(errorCode: protection, cr2: GuestVirtualAddress(0x40_0000)))
        #expect(results[7] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 2) && report.accesses[7].outcome.tlbHit)
        #expect(results[8] == .pageFault(errorCode: protection, cr2: GuestVirtualAddress(0x40_0000)))
        // vCPU 1 stayed in L2 while vCPU 0 left it.
        #expect(results[9] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 2))
        #expect(report.statsAfter.nestedRun == 2 + UInt64(report.l1Maps.count))
    }

    @Test("Nested directives render to what parses back the same")
    func roundTrip() throws {
        for name in ["nested-ept.vmm", "nested-demand.vmm", "nested-smp.vmm"] {
            let path = URL(fileURLWithPath: nestedExample).deletingLastPathComponent().appendingPathComponent(name).path
            let scenario = try Scenario.parse(contentsOfFile: path)
            let again = try Scenario.parse(scenario.render(), name: scenario.name)
            #expect(again.directives.map(\.directive) == scenario.directives.map(\.directive))
        }
    }
}
