// The directives that drive the machine beyond one address space in one mode: `host`, `space`,
// `switch`, `invpcid`, the raw `cr0`/`cr4`/`efer`/`cr3` writes, `set pse=`/`pcid=` and mode
// switches with `set paging=` after boot. Parsing, errors and rendering first, then runs.

import Testing
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

@Suite("Scenario language: spaces, PCIDs, mode switches, raw register writes")
struct ScenarioMachineTests {
    // MARK: Parsing

    @Test func newDirectivesParse() throws {
        #expect(single("host levels=5") == .host(levels: 5))
        #expect(single("space proc-1.a") == .space("proc-1.a"))
        let scenario = try #require(parseOK("""
            set pcid=1
            space a
            switch a pcid=42 noflush
            switch kernel
            invpcid 0 pcid=3 gva=0x400000
            invpcid single pcid=3
            invpcid 2
            invpcid all-nonglobal
            cr0 0x80010011
            cr4 0x20020
            efer 0xd00
            cr3 0x100000 noflush
            """))
        #expect(scenario.directives.map(\.directive) == [
            .set(ControlSettings(pcidEnable: true)),
            .space("a"),
            .switchSpace(name: "a", pcid: 42, noFlush: true),
            .switchSpace(name: "kernel", pcid: 0, noFlush: false),
            .invpcid(.individualAddress, pcid: 3, gva: GuestVirtualAddress(0x400000)),
            .invpcid(.singleContext, pcid: 3, gva: GuestVirtualAddress(0)),
            .invpcid(.allContextsIncludingGlobal, pcid: 0, gva: GuestVirtualAddress(0)),
            .invpcid(.allContextsExceptGlobal, pcid: 0, gva: GuestVirtualAddress(0)),
            .writeRegister(.cr0, value: 0x8001_0011),
            .writeRegister(.cr4, value: 0x20020),
            .writeRegister(.efer, value: 0xd00),
            .loadCR3(value: 0x100000, noFlush: true),
        ])
        #expect(scenario.hostLevels == nil)
        #expect(try Scenario.parse("host levels=4\nmap 0x1000 0x1000000 4k P", name: "h").hostLevels == 4)
    }

    @Test func pagingSpellingsPSEAndPCID() {
        for (word, mode) in [("legacy32", PagingMode.legacy32), ("32", .legacy32), ("pae", .pae), ("4level", .fourLevel),
                             ("4", .fourLevel), ("5level", .fiveLevel), ("5", .fiveLevel)] {
            #expect(single("set paging=\(word)") == .set(ControlSettings(pagingMode: mode)), "\(word)")
        }
        #expect(single("set pse=0") == .set(ControlSettings(pageSizeExtensions: false)))
        // PSE is on by default with 32-bit paging only; pse=0 turns it off.
        #expect(parseOK("set paging=legacy32")?.initialControls.cr4.contains(.pageSizeExtensions) == true)
        #expect(parseOK("set paging=legacy32 pse=0")?.initialControls.cr4.contains(.pageSizeExtensions) == false)
        #expect(parseOK("set pcid=1")?.initialControls.cr4.contains(.pcidEnable) == true)
        // A mode switch after the first guest operation parses, and map then checks the new mode.
        #expect(parseOK("map 0x1000 0x1000000 4k P\nset paging=legacy32\nmap 0x400000 0x1400000 4m P") != nil)
        #expect(parseOK("set paging=pae\naccess read 0x0\nset paging=5level\nmap 0xff000000000000 0x1000000 4k P") != nil)
    }

    static let errors: [BadCase] = [
        BadCase("host", line: 1, "host: expected levels=4|5"),
        BadCase("host levels=3", line: 1, column: 13, "levels must be 4...5, not '3'"),
        BadCase("access read 0x0\nhost levels=5", line: 2, "host must come before the first guest operation (the access on line 1)"),
        BadCase("host levels=5\nhost levels=4", line: 2, "host levels given twice (first on line 1)"),
        BadCase("host levels=4\nset paging=5", line: 2, "5-level paging needs a 5-level host"),
        BadCase("set paging=5\nhost levels=4", line: 2, "5-level paging needs a 5-level host"),
        BadCase("set paging=6", line: 1, "paging must be legacy32, pae, 4level or 5level"),
        BadCase("set pse=2", line: 1, "pse must be 0 or 1, not '2'"),
        BadCase("set paging=pae pcid=1", line: 1, "#GP: pcid=1 (CR4.PCIDE) needs 4- or 5-level paging, not PAE paging"),
        BadCase("set paging=legacy32 pse=0\nmap 0x400000 0x1400000 4m P", line: 2, "a 4m page needs CR4.PSE"),
        BadCase("space", line: 1, "space: missing NAME"),
        BadCase("space a=b", line: 1, "space: missing NAME"),
        BadCase("space a/b", line: 1, "a space name is letters, digits"),
        BadCase("space a b", line: 1, "space: unexpected 'b'"),
        BadCase("switch nowhere", line: 1, column: 8, "no address space 'nowhere' (spaces so far: kernel"),
        BadCase("switch kernel pcid=5", line: 1, "pcid=5 needs CR4.PCIDE (set pcid=1)"),
        BadCase("switch kernel noflush", line: 1, "noflush needs CR4.PCIDE"),
        BadCase("set pcid=1\nswitch kernel pcid=4096", line: 2, "pcid must be 0...4095, not '4096'"),
        BadCase("set pcid=1\nswitch kernel flush", line: 2, "expected key=value, not 'flush'"),
        BadCase("set pcid=1\nswitch kernel noflush noflush", line: 2, "'noflush' given twice"),
        BadCase("invpcid 4", line: 1, "INVPCID type must be 0, 1, 2, 3, individual, single, all or all-nonglobal, not '4'"),
        BadCase("invpcid", line: 1, "invpcid: missing TYPE"),
        BadCase("invpcid single gva=0x1000", line: 1, "gva= is for an individual-address INVPCID (type 0) only"),
        BadCase("invpcid all pcid=1", line: 1, "pcid= is for the individual and single types"),
        BadCase("invpcid 0 pcid=x", line: 1, "pcid: 'x' is not a number"),
        BadCase("cr0", line: 1, "cr0: missing VALUE"),
        BadCase("cr0 0x1_0000_0000", line: 1, "#GP: cr0 bits 63:32 are reserved"),
        BadCase("cr4 0x0", line: 1, "#GP: CR4.PAE cannot be cleared while long mode is active"),
        BadCase("cr4 0x1020", line: 1, "#GP: CR4.LA57 cannot change while long mode is active"),
        BadCase("efer 0x800", line: 1, "#GP: EFER.LME cannot change while CR0.PG=1"),
        BadCase("cr0 0x80000000", line: 1, "#GP: CR0.PG cannot be set while CR0.PE=0"),
        BadCase("set pcid=1\ncr0 0x11", line: 2, "#GP: CR4.PCIDE must be 0 outside long mode"),
        BadCase("cr3 0x100005\nset pcid=1", line: 2, "#GP: CR4.PCIDE cannot be set while CR3[11:0] is not 0"),
        BadCase("cr3 0x8000000000100000", line: 1, "bit 63 is the no-flush flag"),
        BadCase("cr3 0x100000 noflush", line: 1, "noflush needs CR4.PCIDE"),
        BadCase("cr0 0x11\nefer 0x0\ncr0 0x80000011\naccess read 0x100000000", line: 4,
                "does not fit in the 32-bit linear addresses of PAE paging"),
    ]

    @Test(arguments: errors)
    func badLinesAreRefused(_ bad: BadCase) throws {
        let error = try #require(parseError(bad.text))
        #expect(error.line == bad.line, "\(error)")
        if let column = bad.column { #expect(error.column == column, "\(error)") }
        #expect(error.description.contains(bad.message), "\(error)")
    }

    @Test func everyNewDirectiveRendersAndParsesBack() throws {
        let text = """
            host levels=5
            set paging=5level pse=1 pcid=1
            space user
            map 0x400000 0x1000000 4k P,RW,US
            switch user pcid=7 noflush
            switch kernel
            invpcid individual pcid=7 gva=0x400000
            invpcid single pcid=0x1000
            invpcid all
            invpcid all-nonglobal
            set pcid=0
            cr3 0x100000
            cr0 0x11
            cr4 0x1020
            efer 0xd00
            cr0 0x80010011
            set paging=legacy32 pse=0
            """
        let scenario = try Scenario.parse(text, name: "r")
        let rendered = scenario.render()
        let again = try Scenario.parse(rendered, name: "r")
        #expect(again.directives.map(\.directive) == scenario.directives.map(\.directive))
        #expect(again.hostLevels == 5)
        #expect(try Scenario.parse(again.render(), name: "r") == again)
        #expect(rendered.contains("switch user pcid=7 noflush\n"))
        #expect(rendered.contains("invpcid single pcid=0x1000\n"))
        #expect(rendered.contains("cr0 0x80010011\n"))
        #expect(rendered.contains("set paging=32 pse=0\n"))
    }

    // MARK: Runs

    func outcomes(_ text: String, hostLevels: Int? = nil) throws -> [AccessResult] {
        try run(text).accesses.map(\.outcome.result)
    }

    func completed(_ result: AccessResult, gpa: UInt64, value: UInt64? = nil) -> Bool {
        guard case .completed(let address, let data) = result else { return false }
        return address.rawValue == gpa && (value == nil || data == value)
    }

    func pageFault(_ result: AccessResult, _ code: UInt32) -> Bool {
        guard case .pageFault(let error, _) = result else { return false }
        return error.architectural == code
    }

    @Test func spacesHaveTheirOwnTablesAndShareTheKernelWindow() throws {
        let results = try outcomes("""
            space a
            map 0x400000 0x1000000 4k P,RW,US
            space b
            map 0x400000 0x1100000 4k P,RW,US
            access read 0x400000 cpl=3
            switch a
            access write 0x400000 cpl=3 value=0xa
            switch b
            access write 0x400000 cpl=3 value=0xb
            map 0x401000 0x1101000 4k P,RW,US
            access read 0x401000 cpl=3
            switch a
            access read 0x400000 cpl=3
            access read 0x401000 cpl=3
            """)
        #expect(pageFault(results[0], 0x4))  // the kernel space maps nothing there
        #expect(completed(results[1], gpa: 0x100_0000))
        #expect(completed(results[2], gpa: 0x110_0000))
        #expect(completed(results[3], gpa: 0x110_1000))  // a map after boot, through the window, in b
        #expect(completed(results[4], gpa: 0x100_0000, value: 0xa))
        #expect(pageFault(results[5], 0x4))
    }

    @Test func switchesWithAndWithoutNoFlushAgreeWithTheArchitecture() throws {
        let report = try run("""
            set pcid=1
            space a
            map 0x400000 0x1000000 4k P,RW,US
            space b
            map 0x400000 0x1100000 4k P,RW,US
            switch a pcid=1
            access read 0x400000 cpl=3
            switch b pcid=2
            access read 0x400000 cpl=3
            switch a pcid=1 noflush
            space a
            pte 0x400000 1 P,US
            access write 0x400000 cpl=3
            switch a pcid=1
            access write 0x400000 cpl=3
            switch b pcid=2 noflush
            access write 0x400000 cpl=3 value=2
            """)
        let results = report.accesses.map(\.outcome.result)
        #expect(completed(results[0], gpa: 0x100_0000))
        #expect(completed(results[1], gpa: 0x110_0000))
        // After the pte: the old writable translation may serve the write, or not; both agree with
        // the reference. After a flushing switch the write must fault.
        #expect(pageFault(results[4], 0x7))
        #expect(completed(results[5], gpa: 0x110_0000, value: 2))
        #expect(report.lockstepChecks > 0)
    }

    @Test func invpcidOfEachTypeAndItsGeneralProtection() throws {
        let report = try run("""
            set pcid=1
            space a
            map 0x400000 0x1000000 4k P,RW,US
            switch a pcid=3
            access read 0x400000 cpl=3
            pte 0x400000 1 0
            invpcid individual pcid=3 gva=0x400000
            access read 0x400000 cpl=3
            pte 0x400000 1 P,RW,US
            access read 0x400000 cpl=3
            pte 0x400000 1 0
            invpcid single pcid=3
            access read 0x400000 cpl=3
            invpcid all
            invpcid all-nonglobal
            invpcid single pcid=4096
            invpcid 0 pcid=3 gva=0x800000000000
            set pcid=0
            invpcid single pcid=1
            invpcid all
            """)
        let ops = report.accesses
        #expect(ops.map(\.operation) == ["read", "pte", "read", "pte", "read", "pte", "read", "invpcid", "invpcid", "invpcid"])
        #expect(pageFault(ops[2].outcome.result, 0x4))
        #expect(pageFault(ops[6].outcome.result, 0x4))
        for gp in ops[7...9] { #expect(gp.outcome.result == .generalProtection, "\(gp.line)") }
        #expect(ops[7].line == 16 && ops[8].line == 17 && ops[9].line == 19)
        let json = report.jsonLines()
        #expect(json.contains("\"op\":\"invpcid\""))
        #expect(json.contains("\"exception\":\"gp\""))
    }

    @Test func modeSwitchesInBothDirections() throws {
        // 32-bit -> PAE -> 4-level -> 5-level -> 4-level -> PAE -> 32-bit, a page mapped in each.
        let results = try outcomes("""
            set paging=legacy32
            map 0x400000 0x1000000 4k P,RW,US
            access write 0x400000 cpl=3 value=0x32
            set paging=pae
            map 0x400000 0x1000000 4k P,RW,US
            reload-cr3
            access read 0x400000 cpl=3
            set paging=4level pcid=1
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            set paging=5level
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            set paging=4level
            access read 0x400000 cpl=3
            set paging=pae
            access read 0x400000 cpl=3
            set paging=legacy32
            access read 0x400000 cpl=3
            """)
        #expect(results.count == 7)
        for (index, result) in results.enumerated() {
            #expect(completed(result, gpa: 0x100_0000, value: 0x32), "access \(index): \(result)")
        }
    }

    @Test func aModeSwitchKeepsPCIDEOnlyInLongModeAndBuildsTablesOnDemand() throws {
        let scenario = try Scenario.parse("""
            set pcid=1
            access read 0x0
            set paging=pae
            set paging=4level pcid=1
            space other
            set paging=5level
            switch other
            access read 0x0
            """, name: "s")
        let runner = ScenarioRunner(scenario: scenario)
        _ = try runner.run()
        let registers = runner.vcpu.registers
        #expect(registers.mode == .fiveLevel)
        #expect(registers.cr4.contains(.pcidEnable))
        #expect(registers == runner.reference.registers)
        #expect(runner.kernel.existingRoot(of: "other", mode: .fiveLevel) != nil)
        #expect(runner.kernel.existingRoot(of: "other", mode: .pae) == nil)
        #expect(registers.cr3 == runner.kernel.existingRoot(of: "other", mode: .fiveLevel)!.rawValue)
    }

    @Test func rawRegisterWritesSwitchModesAndToggleWP() throws {
        // 4-level -> PAE by hand: PG off, LME off, CR3 at the PAE root (`switch` picks the root of
        // the mode the registers prepare), PG on.
        let results = try outcomes("""
            map 0xffffffff81000000 0x1000000 4k P
            access write 0xffffffff81000000 value=1
            cr0 0x80000011
            access write 0xffffffff81000000 value=2
            cr0 0x80010011
            cr0 0x00010011
            efer 0x800
            map 0x400000 0x1100000 4k P,RW,US
            switch kernel
            cr0 0x80010011
            access write 0x400000 cpl=3 value=3
            """)
        #expect(pageFault(results[0], 0x3))
        #expect(completed(results[1], gpa: 0x100_0000, value: 2))
        #expect(completed(results[2], gpa: 0x110_0000, value: 3))
    }

    @Test func illegalRawWritesAreBadScenarios() throws {
        // Parse-time for what the lines alone decide; the runner refuses the same way.
        #expect(parseError("access read 0x0\ncr4 0x1020")?.message.contains("LA57 cannot change") == true)
        // CR3 may point at any page (here an empty one, not a root of the kernel's): the load is
        // legal, but the kernel cannot then reach its tables, and says so.
        let scenario = try Scenario.parse("""
            access read 0x0
            cr3 0x2000000
            map 0x400000 0x1000000 4k P
            """, name: "dummy")
        do {
            _ = try ScenarioRunner(scenario: scenario).run()
            Issue.record("expected a bad scenario")
        } catch {
            guard case .badScenario(let line, let message) = error else { Issue.record("\(error)"); return }
            #expect(line == 3)
            #expect(message.contains("CR3 must point at a root with the kernel's window"), "\(message)")
        }
    }

    @Test func hostLevelsReachTheVM() throws {
        for levels in [4, 5] {
            let scenario = try Scenario.parse("""
                host levels=\(levels)
                set paging=pae
                map 0x400000 0x1000000 4k P,RW,US
                access write 0x400000 cpl=3 value=1
                access read 0x400000 cpl=3
                """, name: "h")
            let runner = ScenarioRunner(scenario: scenario)
            let report = try runner.run()
            #expect(runner.vm.hostLevels == levels)
            #expect(completed(report.accesses[1].outcome.result, gpa: 0x100_0000, value: 1))
        }
    }
}
