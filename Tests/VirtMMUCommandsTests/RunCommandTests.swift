import Foundation
import Testing
import ArgumentParser
@testable import VirtMMUCommands
import KVMMMU
import Workloads
import X86Paging

/// `virtmmu run` parsed from `arguments` (after `run`), run in-process; `-` reads `input`.
func runCommand(_ arguments: [String], input: String = "") throws -> RunCommand.Outcome {
    let command = try #require(try VirtMMU.parseAsRoot(["run"] + arguments) as? RunCommand)
    return command.perform(standardInput: { input })
}

/// Every line of JSON Lines output as a dictionary; fails the test on a line that is not a JSON object.
func jsonObjects(_ output: String) throws -> [[String: Any]] {
    #expect(output.hasSuffix("\n"))
    return try output.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map { line in
        try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "not an object: \(line)")
    }
}

/// The examples/ directory of the package.
/// The nested examples (`nested-*.vmm`) need L1 under TDP: they run with `--mmu tdp` only.
func isNestedExample(_ file: String) -> Bool { file.hasPrefix("nested-") }

let examplesDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("examples")

@Suite struct RunCommandTests {
    /// Line numbers matter: the JSON names them.
    static let scenario = """
        # run command test
        map 0x400000 0x1000000 4k P,RW,US
        map 0x401000 0x1001000 4k P,US
        map 0x403000 0x1003000 4k P,RW,US
        access write 0x400008 cpl=3 value=0x1234
        access read  0x400008 cpl=3
        access read  0x401000 cpl=3
        access write 0x401000 cpl=3 value=1
        access read  0x402000 cpl=3
        access write 0x403000 cpl=3 value=9
        pte 0x400000 1 P,US
        access write 0x400000 cpl=3 value=5
        access read  0x800000000000
        """

    @Test func jsonLinesReportEveryAccessEntryAndCounter() throws {
        let outcome = try runCommand(["-", "--json"], input: Self.scenario)
        #expect(outcome.status == 0)
        #expect(outcome.message == nil)
        let objects = try jsonObjects(outcome.output)
        let types = objects.map { $0["type"] as? String ?? "?" }
        // Accesses, then entries, then three stats lines, then the result.
        #expect(types == Array(repeating: "access", count: 9) + Array(repeating: "pte", count: 12)
                + ["stats", "stats", "stats", "result"])

        let accesses = objects.filter { $0["type"] as? String == "access" }
        #expect(accesses.map { $0["i"] as? Int } == Array(0..<9))
        #expect(accesses.map { $0["line"] as? Int } == [5, 6, 7, 8, 9, 10, 11, 12, 13])
        #expect(accesses.map { $0["op"] as? String } == ["write", "read", "read", "write", "read", "write", "pte", "write", "read"])
        #expect(accesses.map { $0["cpl"] as? Int } == [3, 3, 3, 3, 3, 3, 0, 3, 0])
        for access in accesses {
            #expect(Set(access.keys) == ["type", "i", "line", "op", "cpl", "gva", "fault", "error_code", "cr2", "gpa", "value",
                                         "exception", "mmio", "exits", "emulated", "tlb_hit", "exit"])
        }

        // A write, then a read of the same bytes through the TLB entry the write filled.
        #expect(accesses[0]["fault"] as? Bool == false)
        #expect(accesses[0]["gpa"] as? String == "0x1000008")
        #expect(accesses[0]["value"] as? String == "0x1234")
        #expect(accesses[0]["error_code"] as? String == "0x0")
        #expect(accesses[0]["cr2"] as? String == "0x0")
        #expect(accesses[1]["value"] as? String == "0x1234")
        #expect(accesses[1]["tlb_hit"] as? Bool == true)
        #expect(accesses[1]["exits"] as? Int == 0)
        // A user write to a present, read-only user page: #PF with P|W|U, CR2 the address.
        #expect(accesses[3]["fault"] as? Bool == true)
        #expect(accesses[3]["exception"] as? String == "pf")
        #expect(accesses[3]["error_code"] as? String == "0x7")
        #expect(accesses[3]["cr2"] as? String == "0x401000")
        #expect(accesses[3]["gpa"] as? String == "0x0")
        // Not present: U only.
        #expect(accesses[4]["error_code"] as? String == "0x4")
        #expect(accesses[4]["cr2"] as? String == "0x402000")
        // The guest's store to its own PTE unsyncs the PT's shadow page (it is not emulated) and
        // writes the entry's address with the new flags.
        #expect(accesses[6]["emulated"] as? Bool == false)
        #expect(accesses[6]["fault"] as? Bool == false)
        #expect(accesses[6]["value"] as? String == "0x1000005")
        // The guest did not invalidate: the writable translation it had stands, as the
        // architecture allows (KVM syncs the shadow entry at the guest's next INVLPG or flush).
        #expect(accesses[7]["fault"] as? Bool == false)
        #expect(accesses[7]["gpa"] as? String == "0x1000000")
        // A non-canonical address: #GP, no error code, no CR2.
        #expect(accesses[8]["fault"] as? Bool == true)
        #expect(accesses[8]["exception"] as? String == "gp")
        #expect(accesses[8]["error_code"] as? String == "0x0")

        let entries = objects.filter { $0["type"] as? String == "pte" }
        for entry in entries {
            #expect(Set(entry.keys) == ["type", "gva", "level", "entry_gpa", "value", "A", "D", "P", "leaf"])
        }
        #expect(entries.map { $0["gva"] as? String } == Array(repeating: "0x400000", count: 4)
                + Array(repeating: "0x401000", count: 4) + Array(repeating: "0x403000", count: 4))
        #expect(entries.map { $0["level"] as? Int } == [4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1])
        #expect(entries.map { $0["leaf"] as? Bool } == [false, false, false, true, false, false, false, true,
                                                         false, false, false, true])
        // Every table entry was used by a successful walk: A set.
        for entry in entries where entry["leaf"] as? Bool == false {
            #expect(entry["A"] as? Int == 1)
            #expect(entry["P"] as? Int == 1)
        }
        // Leaves: rewritten by the guest without A (and faulted on since); read only; written.
        #expect(entries[3]["value"] as? String == "0x1000005")
        #expect(entries[3]["A"] as? Int == 0)
        #expect(entries[7]["value"] as? String == "0x1001025")
        #expect(entries[7]["A"] as? Int == 1)
        #expect(entries[7]["D"] as? Int == 0)
        #expect(entries[11]["value"] as? String == "0x1003067")
        #expect(entries[11]["A"] as? Int == 1)
        #expect(entries[11]["D"] as? Int == 1)
        // The PTE store went to the leaf entry's guest-physical address.
        #expect(accesses[6]["gpa"] as? String == entries[3]["entry_gpa"] as? String)
        // All three leaves sit in one page table, at indices 0, 1 and 3.
        let leafAddresses = [3, 7, 11].compactMap { (entries[$0]["entry_gpa"] as? String).flatMap(parseNumber) }
        #expect(leafAddresses.count == 3)
        #expect(leafAddresses[1] == leafAddresses[0] + 8 && leafAddresses[2] == leafAddresses[0] + 24)

        let stats = objects.filter { $0["type"] as? String == "stats" }
        #expect(stats.map { $0["phase"] as? String } == ["before", "after", "delta"])
        let values = try stats.map { try #require($0["values"] as? [String: Int]) }
        for phase in values { #expect(Set(phase.keys) == Set(MMUStats.counterNames)) }
        let (before, after, delta) = (values[0], values[1], values[2])
        for name in MMUStats.counterNames {
            if MMUStats.kind(ofKVMName: name) == .cumulative {
                #expect(delta[name] == after[name]! - before[name]!, "\(name)")
            } else {
                #expect(delta[name] == after[name], "\(name)")
            }
        }
        #expect(delta["pf_fixed"]! >= 1)
        #expect(delta["pf_taken"]! >= delta["pf_fixed"]!)
        #expect(delta["pf_guest"] == 2)          // two #PFs injected; the #GP is not one
        #expect(delta["mmu_unsync"] == 1)        // the PT's shadow page, unsynced by the PTE store
        #expect(delta["mmu_pte_write"] == 0)
        #expect(after["pages_4k"]! >= 3)
        // Key order in the text is KVM's order.
        let statsLine = try #require(outcome.output.split(separator: "\n").first { $0.contains("\"phase\":\"after\"") })
        let positions = MMUStats.counterNames.map { statsLine.range(of: "\"\($0)\":")!.lowerBound }
        #expect(positions == positions.sorted())

        let result = try #require(objects.last)
        #expect(result["status"] as? String == "ok")
        #expect(result["scenario"] as? String == "<stdin>")
        #expect(result["operations"] as? Int == 9)
        #expect((result["lockstep_checks"] as? Int ?? 0) >= 9)
        let shadowPages = try #require(result["shadow_pages"] as? [String: Int])
        #expect(shadowPages["4"] == 1)
        #expect(shadowPages["1", default: 0] >= 1)
    }

    /// The first line, byte for byte: keys in the pinned order, hex strings lowercase.
    @Test func accessLineFormatIsPinned() throws {
        let outcome = try runCommand(["-", "--json"], input: """
            map 0xffffffff81000000 0x1abc000 4k P,RW
            access write 0xffffffff81000ff8 value=0xABCDEF
            """)
        let first = try #require(outcome.output.split(separator: "\n").first)
        #expect(first == """
            {"type":"access","i":0,"line":2,"op":"write","cpl":0,"gva":"0xffffffff81000ff8","fault":false,\
            "error_code":"0x0","cr2":"0x0","gpa":"0x1abcff8","value":"0xabcdef","exception":"none","mmio":false,\
            "exits":1,"emulated":false,"tlb_hit":false,"exit":"none"}
            """)
        let leaf = try #require(outcome.output.split(separator: "\n").first { $0.contains("\"leaf\":true") })
        #expect(leaf.hasPrefix("{\"type\":\"pte\",\"gva\":\"0xffffffff81000000\",\"level\":1,\"entry_gpa\":\"0x"))
        #expect(leaf.hasSuffix(",\"value\":\"0x1abc063\",\"A\":1,\"D\":1,\"P\":1,\"leaf\":true}"))
    }

    @Test func textReportShowsOutcomesEntriesStatsAndVerdict() throws {
        let outcome = try runCommand(["-"], input: Self.scenario)
        #expect(outcome.status == 0)
        let text = outcome.output
        #expect(text.contains("#PF error code 0x7 (P|W|U) cr2 0x401000"))
        #expect(text.contains("#PF error code 0x4 (!P|U) cr2 0x402000"))
        #expect(text.contains("gpa 0x1000008 value 0x1234"))
        #expect(text.contains("#GP"))
        #expect(text.contains("TLB hit"))
        // The entries table: the written leaf with A and D set.
        let leafRow = try #require(text.split(separator: "\n").first { $0.contains("0x1003067") })
        #expect(leafRow.split(separator: " ").suffix(3) == ["1", "1", "leaf"])
        // Non-zero counters only, with before, after and delta.
        let unsyncRow = try #require(text.split(separator: "\n").first { $0.contains("mmu_unsync") })
        #expect(unsyncRow.split(separator: " ").first == "mmu_unsync")
        #expect(!text.contains("insn_emulation_fail"))
        #expect(text.contains("Shadow pages at the end: 1 at level 4"))
        #expect(text.contains("accesses checked in lockstep: all agree"))
    }

    @Test func badScenarioLineExitsOneNamingTheLine() throws {
        let text = """
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            map 0x401000 0x1001000 3m P
            """
        let plain = try runCommand(["-"], input: text)
        #expect(plain.status == 1)
        #expect(plain.output.isEmpty)
        let message = try #require(plain.message)
        #expect(message.contains("line 3"))
        #expect(message.contains("3m"))

        let json = try runCommand(["-", "--json"], input: text)
        #expect(json.status == 1)
        let objects = try jsonObjects(json.output)
        #expect(objects.count == 2)
        #expect(objects[0]["type"] as? String == "error")
        #expect(objects[0]["status"] as? String == "bad_scenario")
        #expect(objects[0]["line"] as? Int == 3)
        #expect((objects[0]["message"] as? String ?? "").contains("page size"))
        #expect(objects[1]["type"] as? String == "result")
        #expect(objects[1]["status"] as? String == "bad_scenario")
    }

    /// A directive the parser accepts but the machine refuses (a map over the guest kernel's
    /// page-table pool) is a bad scenario too, with its line.
    @Test func refusedMapExitsOneNamingTheLine() throws {
        let outcome = try runCommand(["-"], input: "# pool\n\nmap 0x400000 0x200000 4k P,RW,US\n")
        #expect(outcome.status == 1)
        let message = try #require(outcome.message)
        #expect(message.contains("line 3"))
        #expect(message.contains("16 MiB"))
        let window = try runCommand(["-"], input: "map 0xffffe00000000000 0x1000000 4k P,RW\n")
        #expect(window.status == 1)
        #expect(window.message?.contains("window") == true)
    }

    @Test func missingFileExitsOne() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("virtmmu-missing-\(UUID().uuidString).vmm").path
        let outcome = try runCommand([path])
        #expect(outcome.status == 1)
        #expect(outcome.message?.contains(path) == true)
        #expect(outcome.message?.contains("cannot open") == true)
        // Through the subcommand's own run(): the same exit status, thrown as ArgumentParser's ExitCode.
        let command = try #require(try VirtMMU.parseAsRoot(["run", path]) as? RunCommand)
        do {
            try command.run()
            Issue.record("run() succeeded on a missing file")
        } catch let exit as ExitCode {
            #expect(exit.rawValue == 1)
        }
    }

    /// The built-in tour (the scenario `run` ran without a file before the workloads) exercises
    /// every shadow path and agrees with the architecture throughout.
    @Test func builtInTour() throws {
        let outcome = try runCommand(["-"], input: BuiltInScenario.tour)
        #expect(outcome.status == 0)
        #expect(outcome.output.contains("all agree"))
        let json = try runCommand(["-", "--json"], input: BuiltInScenario.tour)
        #expect(json.status == 0)
        let stats = json.output.split(separator: "\n").filter { $0.contains("\"phase\":\"delta\"") }
        #expect(stats.count == 1)
        for counter in ["pf_fixed", "pf_emulate", "pf_guest", "mmu_pte_write", "mmu_flooded", "mmu_shadow_zapped"] {
            #expect(stats.first?.contains("\"\(counter)\":0,") == false, "\(counter) should be non-zero in the tour")
        }
    }

    /// With --trace, every operation's MMU events follow its access line, named after KVM's
    /// tracepoints: the first touch of a page faults into KVM, walks the guest tables, creates the
    /// shadow pages and sets the SPTE; a TLB hit causes no event.
    @Test func traceListsKVMsTracepointsPerOperation() throws {
        let outcome = try runCommand(["-", "--json", "--trace"], input: """
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        access read 0x400008 cpl=3
        """)
        #expect(outcome.status == 0)
        let objects = try jsonObjects(outcome.output)
        let events = objects.filter { $0["type"] as? String == "event" }
        let first = events.filter { $0["i"] as? Int == 0 }.compactMap { $0["name"] as? String }
        for name in ["kvm_page_fault", "kvm_mmu_pagetable_walk", "kvm_mmu_paging_element", "kvm_mmu_get_page",
                     "kvm_mmu_spte_requested", "kvm_mmu_set_spte"] {
            #expect(first.contains(name), "operation 0 has no \(name) event: \(first)")
        }
        #expect(first.filter { $0 == "kvm_mmu_paging_element" }.count == 4)
        #expect(events.filter { $0["i"] as? Int == 1 }.isEmpty, "a TLB hit caused MMU events")
        // Event lines come right after their access line.
        let types = objects.compactMap { $0["type"] as? String }
        #expect(types.first == "access" && types[1] == "event")
        let text = try runCommand(["-", "--trace"], input: "map 0x400000 0x1000000 4k P,RW,US\naccess read 0x400000 cpl=3\n")
        #expect(text.output.contains("kvm_mmu_set_spte: gfn 1000"))
    }

    @Test func badArgumentsExitOne() {
        for arguments in [["run", "x.vmm", "--mmu", "vmx"], ["run", "x.vmm", "--bogus"], ["run", "a", "b"]] {
            do {
                _ = try VirtMMU.parseAsRoot(arguments)
                Issue.record("\(arguments) parsed")
            } catch {
                #expect(VirtMMU.exitStatus(for: error, arguments: arguments) == 1, "\(arguments)")
            }
        }
        // The other subcommands keep sysexits' 64.
        do {
            _ = try VirtMMU.parseAsRoot(["walk", "--cpl", "9"])
            Issue.record("walk --cpl 9 parsed")
        } catch {
            #expect(VirtMMU.exitStatus(for: error, arguments: ["walk", "--cpl", "9"]) == 64)
        }
        // Help is not an error.
        do {
            _ = try VirtMMU.parseAsRoot(["run", "--help"])
        } catch {
            #expect(VirtMMU.exitStatus(for: error, arguments: ["run", "--help"]) == 0)
        }
        #expect((try? VirtMMU.parseAsRoot(["run", "x.vmm", "--mmu", "shadow", "--json"])) is RunCommand)
    }

    /// `--mmu tdp` (and `npt`) runs every example under the TDP MMU (EPT, NPT), skipping `expect` lines (they pin
    /// the shadow MMU's counters); the report names the MMU.
    @Test func everyExampleRunsUnderTDP() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: examplesDirectory.path)
            .filter { $0.hasSuffix(".vmm") && !isNestedExample($0) }.sorted()
        for file in files {
            for (mmu, header) in [("tdp", "TDP MMU (EPT)"), ("npt", "TDP MMU (NPT)")] {
                let path = examplesDirectory.appendingPathComponent(file).path
                let outcome = try runCommand([path, "--mmu", mmu, "--json"])
                #expect(outcome.status == 0, "\(file): \(outcome.message ?? "")")
                let objects = try jsonObjects(outcome.output)
                #expect(objects.last?["status"] as? String == "ok", "\(file)")
                #expect(objects.last?["mmu"] as? String == mmu, "\(file)")
                let text = try runCommand([path, "--mmu", mmu])
                #expect(text.output.contains(header), "\(file)")
                #expect(text.output.contains("checked in lockstep: all agree"), "\(file)")
            }
        }
    }

    /// Protection keys need TDP: refused under shadow paging, run under TDP.
    @Test func protectionKeysRunUnderTDP() throws {
        let scenario = """
            mem 64M
            set pke=1 wp=1 nx=1
            map 0x600000 0x1000000 4k P,RW,US pkey=3
            access write 0x600000 cpl=3 value=7
            set pkru=0xc0
            access read 0x600000 cpl=3
            """
        #expect(try runCommand(["-"], input: scenario).status == 1)
        let outcome = try runCommand(["-", "--mmu", "tdp", "--json"], input: scenario)
        #expect(outcome.status == 0, "\(outcome.message ?? "")")
        let accesses = try jsonObjects(outcome.output).filter { $0["type"] as? String == "access" }
        #expect(accesses.map { $0["error_code"] as? String } == ["0x0", "0x25"])
    }

    @Test func everyExampleRunsCleanly() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: examplesDirectory.path)
            .filter { $0.hasSuffix(".vmm") && !isNestedExample($0) }.sorted()
        #expect(files.count >= 5)
        for file in files {
            let path = examplesDirectory.appendingPathComponent(file).path
            let outcome = try runCommand([path, "--json"])
            #expect(outcome.status == 0, "\(file): \(outcome.message ?? "")")
            let objects = try jsonObjects(outcome.output)
            #expect(objects.last?["status"] as? String == "ok", "\(file)")
            #expect(objects.contains { $0["type"] as? String == "access" }, "\(file)")
            let text = try runCommand([path])
            #expect(text.status == 0, "\(file)")
            #expect(text.output.contains("checked in lockstep: all agree"), "\(file)")
        }
    }

    /// An `expect` line the run does not meet stops it with status 3, naming the line and every
    /// counter of it that differed; `compare` leaves expectations to `run` (they state one
    /// design's counters).
    @Test func unmetExpectationExitsThree() throws {
        let scenario = """
            map 0x400000 0x1000000 4k P,RW,US,A,D
            access read 0x400000 cpl=3
            expect pf_fixed=1 mmu_cache_miss=4
            expect pf_fixed=2 mmu_cache_miss=4 pf_guest=1
            access read 0x400000 cpl=3
            """
        let outcome = try runCommand(["-", "--json"], input: scenario)
        #expect(outcome.status == 3)
        #expect(outcome.message?.contains("line 4: unmet expectation: pf_fixed is 1, expected 2; pf_guest is 0, expected 1") == true)
        let objects = try jsonObjects(outcome.output)
        #expect(objects.filter { $0["type"] as? String == "access" }.count == 1)
        let error = objects[objects.count - 2], result = objects[objects.count - 1]
        #expect(error["status"] as? String == "unmet_expectation")
        #expect(error["line"] as? Int == 4)
        #expect(result["status"] as? String == "unmet_expectation")
        let text = try runCommand(["-"], input: scenario)
        #expect(text.status == 3)
        #expect(text.output.contains("UNMET EXPECTATION at line 4: pf_fixed is 1, expected 2"))

        let met = try runCommand(["-"], input: scenario.replacingOccurrences(of: "expect pf_fixed=2 mmu_cache_miss=4 pf_guest=1\n", with: ""))
        #expect(met.status == 0)
        #expect(met.output.contains("1 expect line met"))
        let compared = try compareCommand(["-", "--variant", "upstream", "--variant", "glevel"], input: scenario)
        #expect(compared.status == 0)
    }

    /// A failed run still prints the report it has, then the error line and the result line, and
    /// exits with 2.
    @Test func failedRunPrintsThePartialReportThenTheError() throws {
        let scenario = try Scenario.parse(Self.scenario, name: "partial")
        let report = try ScenarioRunner(scenario: scenario).run()
        let failure = RunFailure.brokenInvariant(line: 12, message: "rmap of gfn 0x105 misses an SPTE", partial: report)
        let command = try #require(try VirtMMU.parseAsRoot(["run", "partial", "--json"]) as? RunCommand)
        let outcome = command.outcome(of: failure, name: "partial", pagingMode: .fourLevel)
        #expect(outcome.status == 2)
        #expect(outcome.message?.contains("line 12") == true)
        let objects = try jsonObjects(outcome.output)
        #expect(objects.filter { $0["type"] as? String == "access" }.count == 9)
        #expect(objects.filter { $0["type"] as? String == "stats" }.count == 3)
        let error = objects[objects.count - 2], result = objects[objects.count - 1]
        #expect(error["type"] as? String == "error")
        #expect(error["status"] as? String == "broken_invariant")
        #expect(error["line"] as? Int == 12)
        #expect((error["message"] as? String ?? "").contains("misses an SPTE"))
        #expect(result["type"] as? String == "result")
        #expect(result["status"] as? String == "broken_invariant")

        let textCommand = try #require(try VirtMMU.parseAsRoot(["run", "partial"]) as? RunCommand)
        let text = textCommand.outcome(of: failure, name: "partial", pagingMode: .fourLevel)
        #expect(text.status == 2)
        #expect(text.output.contains("#PF error code 0x7 (P|W|U) cr2 0x401000"))
        #expect(text.output.contains("BROKEN INVARIANT at line 12: rmap of gfn 0x105 misses an SPTE"))
        #expect(!text.output.contains("all agree"))
    }

    /// Strings in the JSON are escaped: a scenario name with quotes, a backslash and a tab.
    @Test func scenarioNamesAreEscaped() throws {
        let directory = FileManager.default.temporaryDirectory
        let name = "virtmmu \"run\" \\ \t\(UUID().uuidString).vmm"
        let path = directory.appendingPathComponent(name).path
        try "map 0x400000 0x1000000 4k P,US\naccess read 0x400000 cpl=3\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let outcome = try runCommand([path, "--json"])
        #expect(outcome.status == 0)
        let objects = try jsonObjects(outcome.output)
        #expect(objects.last?["scenario"] as? String == path)
    }

    /// A leaf the guest points past its memory makes the page MMIO: reads return all ones, writes
    /// report the value written, both with the GPA.
    @Test func mmioAccessesAreReported() throws {
        let outcome = try runCommand(["-", "--json"], input: """
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            pte 0x400000 1 raw=0x10000000067
            invlpg 0x400000
            access read 0x400010 cpl=3
            access write 0x400018 cpl=3 value=0x55
            """)
        #expect(outcome.status == 0, "\(outcome.message ?? "")")
        let accesses = try jsonObjects(outcome.output).filter { $0["type"] as? String == "access" }
        #expect(accesses.count == 4)
        #expect(accesses[2]["mmio"] as? Bool == true)
        #expect(accesses[2]["fault"] as? Bool == false)
        #expect(accesses[2]["gpa"] as? String == "0x10000000010")
        #expect(accesses[2]["value"] as? String == "0xffffffffffffffff")
        #expect(accesses[3]["mmio"] as? Bool == true)
        #expect(accesses[3]["gpa"] as? String == "0x10000000018")
        #expect(accesses[3]["value"] as? String == "0x55")
        #expect(accesses[0]["mmio"] as? Bool == false)
    }

    /// 32-bit paging: 4-byte entries (the entry addresses step by 4) and a 4 MiB page.
    @Test func legacy32EntriesAreFourBytes() throws {
        let outcome = try runCommand(["-", "--json"], input: """
            set paging=32 nx=0
            map 0x08048000 0x1000000 4k P,US
            map 0x08049000 0x1001000 4k P,RW,US
            map 0x80000000 0x1400000 4m P,RW
            access read  0x08048000 cpl=3
            access write 0x08049000 cpl=3 value=0xffffffff
            access write 0x80000000 cpl=3 value=1
            """)
        #expect(outcome.status == 0, "\(outcome.message ?? "")")
        let objects = try jsonObjects(outcome.output)
        let accesses = objects.filter { $0["type"] as? String == "access" }
        #expect(accesses[2]["error_code"] as? String == "0x7")
        let entries = objects.filter { $0["type"] as? String == "pte" }
        #expect(entries.map { $0["level"] as? Int } == [2, 1, 2, 1, 2])
        let leaves = entries.filter { $0["leaf"] as? Bool == true }
        #expect(leaves.count == 3)
        let first = try #require((leaves[0]["entry_gpa"] as? String).flatMap(parseNumber))
        let second = try #require((leaves[1]["entry_gpa"] as? String).flatMap(parseNumber))
        #expect(second == first + 4)
        #expect(leaves[1]["D"] as? Int == 1)
        let large = try #require((leaves[2]["value"] as? String).flatMap(parseNumber))
        #expect(large & ~0x60 == 0x1400083)   // the 4 MiB page: address, PS, RW, P
    }
}
