// Guests under the TDP MMU (EPT): every example and library scenario, randomized lockstep seeds,
// dirty logging and huge pages, each run with the lockstep reference and both auditors after every
// access, and with guest-visible outcomes identical to the shadow MMU's. `expect` lines pin shadow
// counters, so both runs skip them (as `virtmmu compare` does).

import Foundation
import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// The examples/ directory of the package.
private let examplesDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("examples")

/// What the guest saw in a run: each operation's result, the final guest entries, the dirty logs.
private struct GuestView: Equatable {
    var results: [String]
    var entries: [String]
    var dirtyLogs: [[GuestFrameNumber]]

    init(_ report: RunReport) {
        results = report.accesses.map { "\($0.line) \($0.operation) \($0.gva): \($0.outcome.result)" }
        entries = report.entries.map { "\($0.gva) L\($0.level) \($0.address) = \(hex($0.value))" }
        dirtyLogs = report.dirtyLogs.map(\.gfns)
    }
}

private func run(_ scenario: Scenario, mmu: VirtualMachineMMU) throws -> RunReport {
    try ScenarioRunner(scenario: scenario, checksExpectations: false, mmu: mmu).run()
}

private func tdp(_ scenario: Scenario, pml: Bool = false, npt: Bool = false) -> VirtualMachineMMU {
    npt ? .npt(cpu: scenario.cpuModel) : .ept(cpu: scenario.cpuModel, pml: pml)
}

/// Runs `scenario` under both MMUs and checks that the guest saw the same. Returns the TDP report.
@discardableResult
private func runBoth(_ scenario: Scenario, pml: Bool = false, npt: Bool = false, dirtySuperset: Bool = false,
                     sourceLocation: SourceLocation = #_sourceLocation) throws -> RunReport {
    let shadow = try run(scenario, mmu: .shadow)
    let report = try run(scenario, mmu: tdp(scenario, pml: pml, npt: npt))
    let expected = GuestView(shadow)
    let actual = GuestView(report)
    #expect(actual.results == expected.results, "\(scenario.name): operation results differ", sourceLocation: sourceLocation)
    #expect(actual.entries == expected.entries, "\(scenario.name): final guest entries differ", sourceLocation: sourceLocation)
    if dirtySuperset {
        #expect(actual.dirtyLogs.count == expected.dirtyLogs.count, sourceLocation: sourceLocation)
        for (tdpLog, shadowLog) in zip(actual.dirtyLogs, expected.dirtyLogs) {
            #expect(Set(shadowLog).isSubset(of: Set(tdpLog)), "\(scenario.name): TDP's log misses pages", sourceLocation: sourceLocation)
        }
    } else {
        #expect(actual.dirtyLogs == expected.dirtyLogs, "\(scenario.name): dirty logs differ", sourceLocation: sourceLocation)
    }
    #expect(report.mmu == (npt ? "npt" : "tdp"))
    #expect(report.lockstepChecks == shadow.lockstepChecks)
    return report
}

// The nested examples (`nested-*.vmm`) need L1 under TDP and have no shadow run to compare with
// (NestedScenarioTests runs them).
private let exampleFiles: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: examplesDirectory.path)) ?? [])
    .filter { $0.hasSuffix(".vmm") && !$0.hasPrefix("nested-") }.sorted()

@Suite("TDP MMU: guests run under EPT with the same outcomes as under shadow paging")
struct TDPRunTests {
    @Test("Example scenario under TDP (EPT, NPT)", arguments: exampleFiles, [false, true])
    func example(_ file: String, npt: Bool) throws {
        try runBoth(try Scenario.parse(contentsOfFile: examplesDirectory.appendingPathComponent(file).path), npt: npt)
    }

    @Test("Library scenario under TDP (EPT, NPT)", arguments: scenarioLibraryFiles, [false, true])
    func library(_ file: String, npt: Bool) throws {
        try runBoth(try Scenario.parse(contentsOfFile: scenarioLibraryDirectory.appendingPathComponent(file).path), npt: npt)
    }

    @Test func theFilesAreFound() {
        #expect(exampleFiles.count >= 5)
        #expect(scenarioLibraryFiles.count >= 5)
    }

    /// Seeds whose guests invalidate what they change: a guest that rewrites an entry without
    /// INVLPG may see its old translation from the TLB under TDP where the shadow MMU (which
    /// write-protects guest tables) already applies the change, or the reverse with unsync pages;
    /// both are allowed and checked by the reference (seeds 10, 27 and 29 are such cases).
    @Test("Random lockstep seed under TDP", arguments: Array(UInt64(0)..<8), [false, true])
    func randomSeed(_ seed: UInt64, npt: Bool) throws {
        let (_, directives) = LockstepSeed.directives(seed)
        guard let scenario = try? Scenario(name: "random-lockstep-\(seed)", directives: directives) else { return }
        do {
            _ = try run(scenario, mmu: .shadow)
        } catch let failure as RunFailure {
            // The generator asked for an entry the walk does not reach (as the shadow suite allows).
            if case .badScenario = failure { return }
            throw failure
        }
        let report = try runBoth(scenario, npt: npt)
        #expect(report.lockstepChecks > 0)
    }

    /// KVM_PRE_FAULT_MEMORY changes nothing the guest sees: a random lockstep seed with `prefault`
    /// lines of random ranges (some unaligned, some beyond memory) inserted at random places gives
    /// the operations and final guest entries of the seed without them, under EPT and NPT, with
    /// the reference checking every access; and each line maps its whole range, or stops at the
    /// first page outside every memslot, or is refused as unaligned.
    @Test("Random lockstep seed with prefaults under TDP", arguments: Array(UInt64(0)..<8), [false, true])
    func randomSeedWithPreFaults(_ seed: UInt64, npt: Bool) throws {
        let (_, directives) = LockstepSeed.directives(seed)
        guard let plain = try? Scenario(name: "random-lockstep-\(seed)", directives: directives) else { return }
        var rng = SplitMix64(seed: 0x9F_A017 &+ seed)
        var withPreFaults: [ScenarioDirective] = []
        for directive in directives {
            if directive.runsGuest && rng.chance(15) {
                let page = UInt64.random(in: 0..<(plain.memorySize >> 12) + 64, using: &rng)
                let pages = UInt64.random(in: 1...1024, using: &rng)
                let misaligned: UInt64 = rng.chance(10) ? 0x800 : 0
                withPreFaults.append(.preFault(gpa: GuestPhysicalAddress(page << 12 | misaligned), size: pages << 12, flags: 0))
            }
            withPreFaults.append(directive)
        }
        let scenario = try Scenario(name: "random-lockstep-\(seed)-prefault", directives: withPreFaults)
        let mmu = tdp(scenario, npt: npt)
        let expected: RunReport
        do {
            expected = try run(plain, mmu: mmu)
        } catch let failure as RunFailure {
            if case .badScenario = failure { return }  // as `randomSeed`: an entry the walk does not reach
            throw failure
        }
        let report = try run(scenario, mmu: mmu)
        // The inserted lines move the line numbers GuestView shows: compare without them.
        func results(_ report: RunReport) -> [String] { report.accesses.map { "\($0.operation) \($0.gva): \($0.outcome.result)" } }
        #expect(results(report) == results(expected), "seed \(seed): operation results differ")
        #expect(GuestView(report).entries == GuestView(expected).entries, "seed \(seed): final guest entries differ")
        #expect(report.lockstepChecks == expected.lockstepChecks)
        #expect(report.preFaults.count == withPreFaults.count - directives.count)
        for record in report.preFaults {
            if record.gpa.rawValue & 0xFFF != 0 {
                #expect(record.error == .invalidRange("\(record.gpa) + \(hex(record.size)) is not page-aligned") && record.mapped == 0)
            } else if record.error == nil {
                #expect(record.mapped == record.size)
            } else {
                #expect(record.mapped < record.size)
                guard case .noMemslot = record.error else { Issue.record("seed \(seed): \(record)"); continue }
            }
        }
    }

    /// `prefault` (examples/tdp-only/prefault.vmm): what each KVM_PRE_FAULT_MEMORY loop mapped and
    /// how it ended, the guest's first accesses without exits, and under shadow paging EOPNOTSUPP
    /// (after the ioctl's own argument checks) with the guest seeing the same.
    @Test func preFaultDirective() throws {
        let scenario = try Scenario.parse(contentsOfFile: examplesDirectory.appendingPathComponent("tdp-only/prefault.vmm").path)
        let results: [(String, UInt64)] = [("ok", 0x100_0000), ("ok", 0x40_0000), ("ok", 0x10_0000), ("ENOENT", 0x2000),
                                           ("EINVAL", 0), ("EINVAL", 0), ("ENOENT", 0)]
        for npt in [false, true] {
            let report = try runBoth(scenario, npt: npt)
            #expect(report.preFaults.map { ($0.error?.errnoName ?? "ok") } == results.map(\.0))
            #expect(report.preFaults.map(\.mapped) == results.map(\.1))
            #expect(report.accesses.map(\.outcome.exits) == [0, 0], "the prefaulted pages and tables take no exit")
            #expect(report.preFaults.map(\.precedingOperations) == [0, 0, 2, 2, 2, 2, 2])
            let json = report.jsonLines()
            #expect(json.contains(#"{"type":"prefault","gpa":"0x40600000","size":"0x4000","mapped":"0x2000","result":"ENOENT"}"#))
            #expect(report.text().contains("line 19, 0x40600000 + 0x4000: 0x2000 bytes mapped, then ENOENT"))
            // With expectations checked, the example's counters hold.
            _ = try ScenarioRunner(scenario: scenario, mmu: tdp(scenario, npt: npt)).run()
        }
        let shadow = try run(scenario, mmu: .shadow)
        #expect(shadow.preFaults.map { $0.error?.errnoName ?? "ok" }
                == ["EOPNOTSUPP", "EOPNOTSUPP", "EOPNOTSUPP", "EOPNOTSUPP", "EINVAL", "EINVAL", "EOPNOTSUPP"])
        #expect(shadow.preFaults.allSatisfy { $0.mapped == 0 })
    }

    /// In L2 the vCPU's MMU is `guest_mmu`, not the TDP MMU: KVM_PRE_FAULT_MEMORY is EOPNOTSUPP there
    /// and works again once L2 has exited.
    @Test func preFaultWhileTheVCPURunsL2IsNotSupported() throws {
        let scenario = try Scenario.parse("""
            l1 ept
            ept-map 0 0x2000000 2m RWX
            vmenter
            prefault 0x2000000 4K
            vmexit
            prefault 0x2000000 4K
            """, name: "prefault in L2")
        let report = try run(scenario, mmu: .ept(cpu: scenario.cpuModel))
        #expect(report.preFaults.map { $0.error?.errnoName ?? "ok" } == ["EOPNOTSUPP", "ok"])
        #expect(report.preFaults.map(\.mapped) == [0, 0x1000])
    }

    /// Register writes, CR3 loads, INVLPG and INVPCID run in hardware: no exit.
    @Test func controlRegisterWritesAndInvalidationsDoNotExit() throws {
        let scenario = try Scenario.parse("""
            mem 32M
            set pcid=1
            map 0x400000 0x1000000 4k P,RW,US
            access write 0x400000 cpl=3 value=1
            expect exits=0
            invlpg 0x400000
            reload-cr3
            set smep=1
            invpcid 1 pcid=0
            access read 0x400000 cpl=3
            """, name: "no-exits")
        let report = try runBoth(scenario)
        let delta = report.statsAfter.delta(from: report.statsBefore)
        // The only exits are EPT violations: the tables' pages and the data page, once each.
        #expect(delta.exits == delta.pfTaken)
        #expect(report.accesses.last?.outcome.exits == 0)
    }

    /// The exits carry the EPT violation's qualification as KVM turns it into an error code: a
    /// write to a page write-protected for dirty logging is the final translation (GUEST_FINAL,
    /// W, P), the hardware's A/D-setting access to a guest table in that slot a guest-page access
    /// (GUEST_PAGE, W: with EPT A/D, table accesses are writes). Both take the fast path.
    @Test func eptViolationsCarryGuestFinalOrGuestPage() throws {
        let scenario = try Scenario.parse("""
            mem 32M
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            dirty-log enable 0
            access write 0x400000 cpl=3 value=1
            """, name: "qualification")
        let report = try ScenarioRunner(scenario: scenario, traceEvents: true, checksExpectations: false, mmu: .ept()).run()
        let codes: [PageFaultErrorCode] = report.accesses.last!.events.compactMap {
            if case .fastPageFault(_, _, let errorCode, _, _, _, _) = $0.event { errorCode } else { nil }
        }
        #expect(codes.contains { $0.isSuperset(of: [.guestPage, .write, .present]) && !$0.contains(.guestFinal) })
        #expect(codes.contains { $0.isSuperset(of: [.guestFinal, .write, .present]) && !$0.contains(.guestPage) })
    }

    /// A 2 MiB guest page over a 2 MiB-aligned memslot maps with one 2 MiB TDP leaf.
    @Test func aGuestHugePageOverAnAlignedSlotMapsHuge() throws {
        let scenario = try Scenario.parse("""
            mem 32M
            memslot add 1 0x4000000 4M
            map 0x600000 0x4200000 2m P,RW,US
            access write 0x600000 cpl=3 value=5
            access read 0x7ff000 cpl=3
            """, name: "huge")
        try runBoth(scenario)
        let runner = ScenarioRunner(scenario: scenario, checksExpectations: false, mmu: .ept())
        let report = try runner.run()
        let tdp = try #require(runner.vm.tdp)
        let root = try #require(tdp.roots.first { !$0.isInvalid })
        // Slot 1's 2 MiB page is one 2M leaf; the 4K-mapped page below it is not.
        #expect(tdp.mapping(of: 0x4200, in: root)?.level == 2)
        #expect(tdp.mapping(of: 0x43FF, in: root)?.level == 2)
        // Slot 0 (the guest's tables, touched in 2 MiB-aligned regions) maps huge too; every
        // 2M leaf is counted.
        #expect(report.statsAfter.pages2M >= 1)
        #expect(report.statsAfter.pages2M == UInt64(tdp.audit().isEmpty ? report.statsAfter.pages2M : 0))
    }

    @Test("examples/nx-huge-pages.vmm under TDP: executable accesses split, reads under a split table stay 4 KiB, nx-recover zaps the oldest share", arguments: [false, true])
    func nxHugePagesExample(npt: Bool) throws {
        let path = examplesDirectory.appendingPathComponent("nx-huge-pages.vmm").path
        let scenario = try Scenario.parse(contentsOfFile: path)
        let report = try runBoth(scenario, npt: npt)
        // The first read also maps the kernel's tables (two exits); the fetch under the split
        // table and the one under the table the first recovery left complete without an exit.
        #expect(report.accesses.map(\.outcome.exits) == [2, 1, 1, 1, 0, 1, 0, 1])
        #expect(report.statsAfter.nxLpageSplits == 0)
    }

    /// `age clear|test`: the MMU notifiers' clear_young and test_young. Every MMU reports the page
    /// young after the fault that mapped it, idle once aged; an access the TLB serves leaves it
    /// idle (no flush, as in KVM), one that walks the tables makes it young again. With EPT A/D off
    /// aging access-tracks the leaf instead, so that walk exits once to restore it.
    @Test func agingAcrossMMUs() throws {
        let scenario = try Scenario.parse("""
            mem 32M
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            age test 0x1000
            age clear 0x1000
            age test 0x1000
            age clear 0xf00 512
            access read 0x400000 cpl=3
            age test 0x1000
            invlpg 0x400000
            access read 0x400000 cpl=3
            age test 0xff0 32
            """, name: "aging")
        let withoutAD = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(accessedDirty: false), guestMaxPhysicalAddressBits: 46)
        for (name, mmu) in [("shadow", VirtualMachineMMU.shadow), ("tdp", tdp(scenario)), ("npt", tdp(scenario, npt: true)),
                            ("tdp without A/D", .tdp(withoutAD))] {
            let report = try run(scenario, mmu: mmu)
            #expect(report.ages.map(\.young) == [true, true, false, false, false, true], "\(name)")
            #expect(report.ages.map(\.precedingOperations) == [1, 1, 1, 1, 2, 3], "\(name)")
            let exits = report.accesses.map(\.outcome.exits)
            #expect(exits[1] == 0, "\(name): the TLB serves the second read")
            if name == "tdp without A/D" {
                #expect(exits[2] == 1 && report.statsAfter.pfFast > 0, "the access-tracked leaf is restored by the fast path")
            } else {
                #expect(exits[2] == 0, "\(name): the walk sets A in the leaf")
            }
            let json = report.jsonLines()
            #expect(json.contains(#"{"type":"age","op":"clear","gfn":"0xf00","count":512,"young":false}"#), "\(name)")
            #expect(report.text().contains("clear gfns 0xf00..0x10ff: idle"), "\(name)")
        }
    }

    /// The largest ranges a line can give (2^40 gfns, at the top of the gfn space too) are walked
    /// only where memslots are: they finish at once and find what is mapped.
    @Test func agingHugeRangesIsBoundedByTheMemslots() throws {
        let scenario = try Scenario.parse("""
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000
            age clear 0 1099511627776
            age test 0x10000000000 1099511627776
            age clear 0xfffffeffffffffff 1099511627776
            """, name: "hostile aging")
        for mmu in [VirtualMachineMMU.shadow, tdp(scenario), tdp(scenario, npt: true)] {
            #expect(try run(scenario, mmu: mmu).ages.map(\.young) == [true, false, false], "\(mmu.name)")
        }
    }

    /// `kvm nx_huge_pages=1`: an executable access splits the 2 MiB leaf it would have had
    /// (`nx_lpage_splits`), reads there stay 4 KiB, and `nx-recover` zaps the split table so that
    /// the next read maps 2 MiB again; the guest sees what it sees under shadow paging.
    @Test(arguments: [false, true])
    func nxHugePagesSplitAndRecover(npt: Bool) throws {
        let split = """
            kvm nx_huge_pages=1 nx_huge_pages_recovery_ratio=1
            mem 32M
            memslot add 1 0x4000000 4M
            map 0x600000 0x4200000 2m P,RW,US
            access exec 0x600000 cpl=3
            access read 0x7ff000 cpl=3
            """
        let recovered = split + "\nnx-recover\naccess read 0x7fe000 cpl=3\n"
        func tdpRun(_ text: String) throws -> (RunReport, TDPMMU) {
            let scenario = try Scenario.parse(text, name: "nx")
            try runBoth(scenario, npt: npt)
            let runner = ScenarioRunner(scenario: scenario, checksExpectations: false, mmu: tdp(scenario, npt: npt))
            let report = try runner.run()
            return (report, try #require(runner.vm.tdp))
        }
        let (splitReport, splitMMU) = try tdpRun(split)
        #expect(splitMMU.configuration.nxHugePages && splitMMU.configuration.nxHugePagesRecoveryRatio == 1)
        let root = try #require(splitMMU.roots.first { !$0.isInvalid })
        #expect(splitMMU.mapping(of: 0x4200, in: root)?.level == 1 && splitMMU.mapping(of: 0x43FF, in: root)?.level == 1)
        #expect(splitReport.statsAfter.nxLpageSplits == 1)
        let (recoveredReport, recoveredMMU) = try tdpRun(recovered)
        let recoveredRoot = try #require(recoveredMMU.roots.first { !$0.isInvalid })
        #expect(recoveredMMU.mapping(of: 0x43FE, in: recoveredRoot)?.level == 2)
        #expect(recoveredReport.statsAfter.nxLpageSplits == 0)
        // Without the parameter nothing splits.
        let (plainReport, plainMMU) = try tdpRun(split.replacingOccurrences(of: "nx_huge_pages=1", with: "nx_huge_pages=0"))
        #expect(plainMMU.mapping(of: 0x4200, in: try #require(plainMMU.roots.first { !$0.isInvalid }))?.level == 2)
        #expect(plainReport.statsAfter.nxLpageSplits == 0)
    }

    /// Dirty logging under TDP (write protection, and PML): every page whose contents changed is
    /// reported (the runner fails a run that loses one), and the logs are shadow's.
    @Test(arguments: [(false, false), (true, false), (false, true)])
    func dirtyLoggingReportsEveryChangedPage(pml: Bool, npt: Bool) throws {
        let scenario = try Scenario.parse("""
            mem 32M
            memslot add 1 0x4000000 4M
            map 0x400000 0x4000000 4k P,RW,US
            map 0x401000 0x4001000 4k P,RW,US
            map 0x600000 0x4200000 2m P,RW,US
            access write 0x400000 cpl=3 value=1
            dirty-log enable 1
            access write 0x401000 cpl=3 value=2
            access read 0x400000 cpl=3
            dirty-log get 1
            access write 0x400000 cpl=3 value=3
            access write 0x400008 cpl=3 value=4
            access write 0x600000 cpl=3 value=5
            access write 0x7ff000 cpl=3 value=6
            dirty-log get 1
            dirty-log get 1
            access write 0x401000 cpl=3 value=7
            dirty-log get 1
            dirty-log disable 1
            access write 0x600008 cpl=3 value=8
            """, name: "dirty")
        let report = try runBoth(scenario, pml: pml, npt: npt)
        #expect(report.dirtyLogs.map(\.gfns) == [[0x4001], [0x4000, 0x4200, 0x43FF], [], [0x4001]].map { $0.map { GuestFrameNumber($0) } })
    }

    /// With the guest's tables in the logging slot, TDP logs more than shadow paging: with EPT A/D
    /// bits the hardware's accesses to guest tables are EPT writes, so every table page it walks is
    /// dirtied (and logged), where the shadow MMU logs a table page only when a guest A/D bit in it
    /// changes. Never fewer pages: the runner fails a run whose log misses a changed page.
    @Test(arguments: [false, true])
    func guestTablesInALoggingSlotAreLoggedWhenWalked(pml: Bool) throws {
        let scenario = try Scenario.parse("""
            mem 32M
            map 0x400000 0x1000000 4k P,RW,US
            map 0x401000 0x1001000 4k P,RW,US
            access write 0x400000 cpl=3 value=1
            dirty-log enable 0
            access read 0x400000 cpl=3
            access write 0x401000 cpl=3 value=2
            dirty-log get 0
            map 0x800000 0x1100000 4k P,RW,US
            access write 0x800000 cpl=3 value=3
            dirty-log get 0
            dirty-log get 0
            """, name: "tables-dirty")
        let shadow = try run(scenario, mmu: .shadow)
        let report = try run(scenario, mmu: tdp(scenario, pml: pml))
        #expect(GuestView(report).results == GuestView(shadow).results)
        #expect(GuestView(report).entries == GuestView(shadow).entries)
        #expect(report.dirtyLogs.count == shadow.dirtyLogs.count)
        for (tdpLog, shadowLog) in zip(report.dirtyLogs, shadow.dirtyLogs) {
            #expect(Set(shadowLog.gfns).isSubset(of: Set(tdpLog.gfns)))
        }
        // The first read: the four table pages walked and the data page written.
        #expect(report.dirtyLogs.first?.gfns == [0x100, 0x103, 0x104, 0x105, 0x1001].map { GuestFrameNumber($0) })
    }

    @Test func manualDirtyLogProtectionUnderTDP() throws {
        try runBoth(try Scenario.parse("""
            mem 32M
            memslot add 1 0x4000000 1M
            dirty-log mode manual
            map 0x400000 0x4000000 4k P,RW,US
            map 0x440000 0x4040000 4k P,RW,US
            dirty-log enable 1
            access write 0x400000 cpl=3 value=1
            access write 0x440000 cpl=3 value=2
            dirty-log get 1
            dirty-log clear 1 0 64
            dirty-log get 1
            access write 0x400000 cpl=3 value=3
            dirty-log get 1
            dirty-log clear 1 0 256
            dirty-log get 1
            """, name: "manual"))
    }

    /// Dirty rings under TDP: every page dirtied is pushed on the vCPU's ring; a full ring exits and
    /// the runner harvests; resetting re-protects (or, with PML, clears D) so the next write is
    /// pushed anew.
    @Test(arguments: [(false, false), (true, false), (false, true)])
    func dirtyRingsUnderTDP(pml: Bool, npt: Bool) throws {
        var lines = ["mem 32M", "memslot add 1 0x4000000 2M", "dirty-log mode ring entries=256"]
        for page in 0..<300 as Range<UInt64> {
            lines.append("map \(hex(0x40000000 + page << 12)) \(hex(0x4000000 + page << 12)) 4k P,RW,US")
        }
        lines.append("dirty-log enable 1")
        for page in 0..<300 as Range<UInt64> { lines.append("access write \(hex(0x40000000 + page << 12)) cpl=3 value=1") }
        lines.append("dirty-log get 1")
        lines.append("access write 0x40000000 cpl=3 value=2")
        lines.append("access write 0x40001000 cpl=3 value=2")
        lines.append("dirty-log get 1")
        lines.append("dirty-log get 1")
        let report = try runBoth(try Scenario.parse(lines.joined(separator: "\n"), name: "ring"), pml: pml, npt: npt)
        #expect(report.dirtyLogs.map(\.gfns) == [Array(0x4000..<0x412C), [0x4000, 0x4001], []].map { $0.map { GuestFrameNumber($0) } })
        #expect(report.dirtyRingFullExits >= 1)
    }

    @Test func memslotDeleteAndZapsUnderTDP() throws {
        try runBoth(try Scenario.parse("""
            mem 32M
            memslot add 1 0x4000000 1M
            map 0x400000 0x4000000 4k P,RW,US
            access write 0x400000 cpl=3 value=1
            zap all
            access read 0x400000 cpl=3
            zap gfn 0x4000 1
            access write 0x400000 cpl=3 value=2
            memslot delete 1
            access read 0x400000 cpl=3
            access write 0x400000 cpl=3 value=3
            """, name: "delete"))
    }

    /// KVM_MR_MOVE under TDP: the old range is zapped and its gfns become MMIO; the same memory
    /// (its contents kept) appears at the new base; a logging slot keeps logging. Nothing is
    /// write-protected after a move (`kvm_mmu_slot_apply_flags` does nothing for MOVE), so a read
    /// fault maps the page writable and `make_spte` logs it at once: TDP logs the pages read too,
    /// where the shadow MMU maps a clean guest PTE read-only (more pages, never fewer).
    @Test(arguments: [false, true])
    func memslotMoveUnderTDP(npt: Bool) throws {
        let report = try runBoth(try Scenario.parse("""
            mem 32M
            memslot add 1 0x4000000 4M
            map 0x400000 0x4000000 4k P,RW,US
            map 0x600000 0x4200000 2m P,RW,US
            map 0x800000 0x8000000 4k P,RW,US
            map 0xa00000 0x8200000 2m P,RW,US
            access write 0x400000 cpl=3 value=0x1234
            access write 0x600008 cpl=3 value=0x5678
            dirty-log enable 1
            memslot move 1 0x8000000
            access read 0x400000 cpl=3
            access read 0x800000 cpl=3
            access read 0xa00008 cpl=3
            access write 0xa01000 cpl=3 value=9
            dirty-log get 1
            memslot move 1 0x4000000
            access read 0x601000 cpl=3
            access read 0x800000 cpl=3
            """, name: "move"), npt: npt, dirtySuperset: true)
        #expect(report.dirtyLogs.first?.gfns == [0x8000, 0x8200, 0x8201].map { GuestFrameNumber($0) })
        #expect(report.accesses.map(\.outcome.result).contains(.completed(gpa: GuestPhysicalAddress(0x820_0008), value: 0x5678)))
    }

    /// What TDP cannot run is refused with a clear error, not run wrongly.
    @Test func unmodelledRequestsAreRefused() throws {
        #expect(throws: VirtualMachineError.self) {
            _ = try VirtualMachine(memorySize: 32 << 20, hostLevels: 5, mmu: .ept())
        }
    }
}
