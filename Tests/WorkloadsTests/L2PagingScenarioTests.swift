import Foundation
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// L2 with its own paging in scenarios: between `vmenter` and `vmexit`, `set`, `map`, `pte`,
// `space`, `switch` and `invlpg` act on L2, whose kernel writes its tables with L2 stores through
// L1's EPT (or NPT); every L2 access is checked in lockstep by the runner.

private let l2PagingExample = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("examples/nested-l2-paging.vmm").path

/// `ept-map` lines giving L2's table pool [1 MiB, 1 MiB + tables * 4 KiB) every right, 4 KiB each.
func l2TablePoolMaps(tables: Int = 12, l1Base: UInt64 = 0x110_0000, permissions: String = "RWX") -> String {
    (0..<UInt64(tables)).map { "ept-map \(hex(0x10_0000 + $0 * 0x1000)) \(hex(l1Base + $0 * 0x1000)) 4k \(permissions)" }
        .joined(separator: "\n")
}

@Suite("L2's own paging in nested scenarios")
struct L2PagingScenarioTests {
    func run(_ text: String, mmu: VirtualMachineMMU = .ept()) throws -> RunReport {
        try ScenarioRunner(scenario: try Scenario.parse(text, name: "l2-paging"), mmu: mmu).run()
    }

    /// The message of a run that must stop as a bad scenario.
    func badScenarioMessage(_ text: String, mmu: VirtualMachineMMU = .ept()) throws -> String? {
        do {
            _ = try run(text, mmu: mmu)
        } catch let failure as RunFailure {
            if case .badScenario(_, let message) = failure { return message }
            Issue.record("\(failure)")
        }
        return nil
    }

    @Test("examples/nested-l2-paging.vmm: L2's 4 KiB and 2 MiB pages over 4 KiB, 2 MiB and 1 GiB EPT pages, L2's faults, exits at the final translation and in L2's walk")
    func example() throws {
        let report = try ScenarioRunner(scenario: try Scenario.parse(contentsOfFile: l2PagingExample), mmu: .ept()).run()
        #expect(report.accesses.allSatisfy { $0.inL2 })
        #expect(report.expectationsChecked == 1)
        let walkViolation: EPTViolationQualification = [.dataRead, .dataWrite, .readable, .linearAddressValid]
        let expectedExits: [NestedVMExit] = [
            .eptViolation(GuestPhysicalAddress(0x120_1010), qualification: [.dataWrite, .readable, .linearAddressValid, .finalTranslation]),
            .eptViolation(GuestPhysicalAddress(0x120_2000), qualification: [.dataRead, .linearAddressValid, .finalTranslation]),
            // L2's PT for 0x400000, read-only in L1's EPT: under EPT A/D the walk's access is a write.
            .eptViolation(GuestPhysicalAddress(0x10_5000), qualification: walkViolation),
        ]
        #expect(report.accesses.compactMap(\.exitToL1) == expectedExits)
        let results = report.accesses.map(\.outcome.result)
        #expect(results[1] == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x1111))
        #expect(results[6] == .completed(gpa: GuestPhysicalAddress(0x4200_0100), value: 0x3333), "inside the 1 GiB EPT page")
        #expect(results[7] == .pageFault(errorCode: [.present, .user], cr2: GuestVirtualAddress(0x80_0100)))
        #expect(results[8] == .pageFault(errorCode: [], cr2: GuestVirtualAddress(0xa0_0000)))
        #expect(results[9] == .pageFault(errorCode: [.present, .fetch], cr2: GuestVirtualAddress(0x60_0000)))
        #expect(results[11] == .pageFault(errorCode: [.present, .write], cr2: GuestVirtualAddress(0x40_0008)), "after L2's pte took W away")
        #expect(results[13] == .completed(gpa: GuestPhysicalAddress(0x100_1000), value: 0x4444), "in L2's second space")
        #expect(results[14] == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x1111), "back in the kernel space")
        #expect(report.accesses[15].operation == "read" && report.accesses[16].outcome.result
                    == .completed(gpa: GuestPhysicalAddress(0x100_0008), value: 0x1111), "after L1 gave the table back")
        // The exit in L2's walk reports the level of L2's entry: qualification bit 8 clear.
        #expect(RunReport.accessJSON(report.accesses[15]).contains("\"exit_qualification\":\"0x8b\""))
        #expect(report.statsAfter.nestedRun == 6)
        // Every table store of L2's kernel is an L2 access checked in lockstep too.
        #expect(report.lockstepChecks > report.accesses.count + 10)
    }

    @Test("L2's registers live on across vmexit and vmenter; L1's `set` and `map` stay L1's")
    func levelsKeepTheirRegisters() throws {
        let report = try run("""
            l1 ept levels=4 ad=0
            \(l2TablePoolMaps())
            ept-map 0x1000000 0x1400000 2m RWX
            vmenter
            set paging=5 wp=1
            map 0x7f0000400000 0x1000000 4k P|RW|US
            access write 0x7f0000400000 value=5
            vmexit
            map 0x2000000 0x2000000 4k P|RW
            access write 0x2000000 value=6
            vmenter
            access read 0x7f0000400000
            access read 0x2000000
            vmexit
            access read 0x2000000
            """)
        let results = report.accesses.map(\.outcome.result)
        #expect(results[0] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 5))
        #expect(!report.accesses[1].inL2 && results[1] == .completed(gpa: GuestPhysicalAddress(0x200_0000), value: 6))
        #expect(results[2] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 5), "L2 still runs 5-level paging")
        #expect(results[3] == .pageFault(errorCode: [], cr2: GuestVirtualAddress(0x200_0000)), "L1's mapping is not L2's")
        #expect(results[4] == .completed(gpa: GuestPhysicalAddress(0x200_0000), value: 6))
    }

    @Test("L2 in PAE paging: PDPTEs loaded through L1's EPT; a refused load is an exit to L1 and a clear error")
    func paePDPTEs() throws {
        let base = """
            l1 ept levels=4 ad=1
            \(l2TablePoolMaps())
            ept-map 0x1000000 0x1400000 2m RWX
            vmenter
            set paging=pae
            map 0x400000 0x1000000 4k P|RW|US
            access write 0x400000 value=9       # the PDPTE registers hold what the PDPT had at the last CR3 load: #PF
            reload-cr3
            access write 0x400000 value=9
            access read 0x400000 cpl=3
            """
        let report = try run(base)
        #expect(report.accesses.map(\.outcome.result).last == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 9))
        // L1 takes the PDPT's page away; L2's next MOV to CR3 loads the PDPTEs through it.
        let message = try badScenarioMessage(base + """

            vmexit
            ept-map 0x100000 0x1100000 4k 0
            invept single
            vmenter
            switch kernel
            """)
        #expect(message?.contains("PDPTE load") == true, "\(message ?? "ran")")
        #expect(message?.contains("EPT violation at L2 gpa 0x100000, qualification 0x1") == true, "a read, no linear address: \(message ?? "")")
    }

    @Test("L2 over L1's NPT: a #NPF in L2's walk carries GUEST_PAGE, at the final translation GUEST_FINAL")
    func npt() throws {
        let report = try run("""
            l1 npt levels=4
            \(l2TablePoolMaps())
            ept-map 0x1000000 0x1400000 4k RX
            vmenter
            set paging=4 wp=1
            map 0x400000 0x1000000 4k P|RW|US
            access read 0x400000
            access write 0x400000 value=1
            vmexit
            ept-map 0x105000 0x1105000 4k 0
            vmenter
            access read 0x400000
            """, mmu: .npt())
        let exits = report.accesses.compactMap(\.exitToL1)
        guard exits.count == 2, case .nestedPageFault(let final, let finalCode) = exits[0],
              case .nestedPageFault(let table, let tableCode) = exits[1] else {
            Issue.record("\(exits)")
            return
        }
        #expect(final.rawValue == 0x100_0000 && finalCode.contains(.guestFinal) && finalCode.contains(.write))
        #expect(table.rawValue == 0x10_5000 && tableCode.contains(.guestPage) && !tableCode.contains(.present))
    }

    @Test("Bad L2 lines: an unmapped table pool, a #GP register write, directives L2 has not")
    func errors() throws {
        let unmapped = try badScenarioMessage("""
            l1 ept
            vmenter
            set paging=4
            """)
        #expect(unmapped?.contains("L1 must map L2's table pool") == true, "\(unmapped ?? "ran")")
        let readOnlyPool = try badScenarioMessage("""
            l1 ept ad=0
            \(l2TablePoolMaps(permissions: "R"))
            vmenter
            set paging=4
            """)
        #expect(readOnlyPool?.contains("(through 0x100e00): exit to L1: EPT violation at L2 gpa 0x100e00, qualification 0x18a") == true,
                "\(readOnlyPool ?? "ran")")
        // L2's registers are its own: PCIDE needs long mode, which L2 is not in.
        do {
            _ = try Scenario.parse("l1 ept\nset pcid=1\nvmenter\nset pcid=1\n", name: "gp")
            Issue.record("parsed")
        } catch {
            #expect(error.line == 4 && error.message.contains("#GP"), "\(error)")
        }
        // (`vcpu` to a vCPU already up is allowed in L2; a new one is refused: ScenarioErrorTests.)
        for line in ["cr3 0x1000", "dirty-log get 0", "cr0 0x80000011", "zap all"] {
            do {
                _ = try Scenario.parse("l1 ept\nvmenter\n\(line)\n", name: "bad")
                Issue.record("\(line) parsed in L2")
            } catch {
                #expect(error.line == 3 && error.message.contains("in L2 is not modelled"), "\(error)")
            }
        }
    }

    @Test("L2's legacy 32-bit paging and 4 MiB pages run in lockstep")
    func legacy32() throws {
        let report = try run("""
            l1 ept levels=4 ad=1 execonly=1
            \(l2TablePoolMaps(tables: 8))
            ept-map 0x1000000 0x1400000 2m RWX
            ept-map 0x1400000 0x1600000 2m X
            vmenter
            set paging=32 pse=1 wp=1
            map 0x400000 0x1000000 4k P|RW|US
            map 0x1400000 0x1400000 4m P|RW
            access write 0x400000 value=3 cpl=3
            access exec 0x1400000
            access read 0x1400000
            """)
        let results = report.accesses.map(\.outcome.result)
        #expect(results[0] == .completed(gpa: GuestPhysicalAddress(0x100_0000), value: 3))
        #expect(results[1] == .completed(gpa: GuestPhysicalAddress(0x140_0000), value: 0), "execute-only EPT page")
        #expect(report.accesses[2].exitToL1 == .eptViolation(GuestPhysicalAddress(0x140_0000),
                                                             qualification: [.dataRead, .executable, .linearAddressValid, .finalTranslation]))
    }
}
