// Memslot changes and dirty logging under the shadow MMU, through the scenario directives: each
// run checks lockstep, the auditor, and that no page whose contents changed is missing from a
// dirty-log read (the runner's own check, which fails the run).

import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

@Suite struct MemslotDirtyLogTests {
    private func run(_ text: String, variant: MMUVariant = .upstream) throws -> RunReport {
        try ScenarioRunner(scenario: try Scenario.parse(text, name: "dirty"), variant: variant).run()
    }

    private func gfns(_ values: [UInt64]) -> [GuestFrameNumber] { values.map { GuestFrameNumber($0) } }

    /// Get-and-reset: enabling logging write-protects what is mapped, so the first write to each
    /// page after it (and after each read) faults and is logged; a read reports exactly the pages
    /// written since the last read, including a guest 2 MiB page's 4 KiB pieces.
    @Test func getAndResetReportsEachPageWrittenSinceTheLastRead() throws {
        let report = try run("""
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
            """)
        #expect(report.dirtyLogs.map(\.gfns) == [gfns([0x4001]), gfns([0x4000, 0x4200, 0x43FF]), [], gfns([0x4001])])
        // The write after a read faults (write-protected again); the second write to the page does not.
        #expect(report.accesses.map(\.outcome.exits) == [1, 1, 0, 1, 0, 1, 1, 1])
        #expect(report.dirtyLogs.map(\.slot) == [1, 1, 1, 1])
    }

    /// Manual protection: a read only copies the bitmap; bits stay until cleared, and clearing
    /// write-protects the pages again so their next write is logged anew. KVM's alignment rules
    /// for a clear are enforced.
    @Test func manualProtectionKeepsBitsUntilCleared() throws {
        let report = try run("""
            mem 32M
            memslot add 1 0x4000000 1M
            dirty-log mode manual
            map 0x400000 0x4000000 4k P,RW,US
            map 0x440000 0x4040000 4k P,RW,US
            dirty-log enable 1
            access write 0x400000 cpl=3 value=1
            access write 0x440000 cpl=3 value=2
            dirty-log get 1
            dirty-log get 1
            dirty-log clear 1 0 64
            dirty-log get 1
            access write 0x400000 cpl=3 value=3
            access write 0x440000 cpl=3 value=4
            dirty-log get 1
            dirty-log clear 1 0 256
            dirty-log get 1
            """)
        #expect(report.dirtyLogs.map(\.gfns) == [gfns([0x4000, 0x4040]), gfns([0x4000, 0x4040]), gfns([0x4040]),
                                                 gfns([0x4000, 0x4040]), []])
        // After the clear of pages 0-63 the write to 0x4000 faults again; 0x4040 stayed writable.
        #expect(report.accesses.map(\.outcome.exits) == [1, 1, 1, 0])
        for bad in ["dirty-log clear 1 1 64", "dirty-log clear 1 0 65", "dirty-log clear 1 192 128", "dirty-log clear 7 0 64"] {
            #expect(throws: RunFailure.self, "\(bad)") {
                _ = try run("memslot add 1 0x4000000 1M\ndirty-log mode manual\ndirty-log enable 1\n" + bad)
            }
        }
        // The last partial run of a slot whose size is not a multiple of 64 pages may be cleared.
        _ = try run("memslot add 1 0x4000000 260K\ndirty-log mode manual\ndirty-log enable 1\ndirty-log clear 1 64 1")
        #expect(throws: RunFailure.self) { _ = try run("memslot add 1 0x4000000 1M\ndirty-log enable 1\ndirty-log clear 1 0 64") }
        #expect(throws: RunFailure.self) { _ = try run("memslot add 1 0x4000000 1M\ndirty-log enable 1\ndirty-log mode manual") }
    }

    /// KVM's walker sets the guest tables' accessed and dirty bits, and those writes are logged
    /// too (`mark_page_dirty_in_slot` after its cmpxchg): with slot 0, where the guest's tables
    /// are, logging, a read of a fresh mapping dirties the tables whose A bits it set.
    @Test func guestTableAccessedBitsAreLogged() throws {
        let report = try run("""
            map 0x400000 0x1000000 4k P,RW,US
            access read 0x400000 cpl=3
            dirty-log enable 0
            map 0x800000 0x1001000 4k P,RW,US
            dirty-log get 0
            access read 0x800000 cpl=3
            dirty-log get 0
            """)
        let afterMap = Set(report.dirtyLogs[0].gfns.map(\.rawValue))
        let afterRead = Set(report.dirtyLogs[1].gfns.map(\.rawValue))
        // The map's stores went into the page-table pool; the read set A in the tables of its walk.
        #expect(!afterMap.isEmpty && afterMap.allSatisfy { $0 >= 0x100 && $0 < 0x1000 })
        #expect(!afterRead.isEmpty && afterRead.allSatisfy { $0 >= 0x100 && $0 < 0x1000 })
    }

    /// A moved slot keeps its contents at the new address; the old range is MMIO. A deleted slot's
    /// range is MMIO. An MMIO SPTE made before a slot was added there is stale after it (the
    /// memslots generation moved on).
    @Test func moveDeleteAndAddChangeWhatTheGuestReaches() throws {
        let report = try run("""
            mem 32M
            memslot add 1 0x4000000 1M
            map 0x400000 0x4000000 4k P,RW,US
            map 0x500000 0x5000000 4k P,RW,US
            map 0x600000 0x6000000 4k P,RW,US
            access write 0x400000 cpl=3 value=0x1234
            access read 0x500000 cpl=3
            access read 0x600000 cpl=3
            memslot move 1 0x5000000
            access read 0x400000 cpl=3
            access read 0x500000 cpl=3
            memslot add 2 0x6000000 1M
            access read 0x600000 cpl=3
            memslot delete 2
            access read 0x600000 cpl=3
            """)
        let mmio = UInt64.max
        #expect(report.accesses.map(\.outcome.result) == [
            .completed(gpa: GuestPhysicalAddress(0x400_0000), value: 0x1234),
            .mmio(gpa: GuestPhysicalAddress(0x500_0000), value: mmio),
            .mmio(gpa: GuestPhysicalAddress(0x600_0000), value: mmio),
            .mmio(gpa: GuestPhysicalAddress(0x400_0000), value: mmio),
            .completed(gpa: GuestPhysicalAddress(0x500_0000), value: 0x1234),
            .completed(gpa: GuestPhysicalAddress(0x600_0000), value: 0),
            .mmio(gpa: GuestPhysicalAddress(0x600_0000), value: mmio),
        ])
        // A delete and a move each zap every shadow page at once.
        #expect(report.statsAfter.mmuShadowZapped > 0)
    }

    /// Dirty rings: each page dirtied is pushed onto the vCPU's ring; a read harvests the rings and
    /// resets them (re-protecting the pages). A ring reaching its soft limit (size - 64) makes the
    /// vCPU exit before it enters again, and the VMM (the runner) harvests then: nothing is lost.
    @Test func dirtyRingsHarvestEveryPageAndExitWhenFull() throws {
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
        let report = try run(lines.joined(separator: "\n"))
        #expect(report.dirtyLogs.map(\.gfns) == [gfns(Array(0x4000..<0x412C)), gfns([0x4000, 0x4001]), []])
        #expect(report.dirtyRingFullExits >= 1)
        #expect(throws: RunFailure.self) { _ = try run("access read 0x0\ndirty-log mode ring") }
        #expect(throws: ScenarioError.self) { _ = try Scenario.parse("dirty-log mode ring entries=300", name: "x") }
        #expect(throws: ScenarioError.self) { _ = try Scenario.parse("dirty-log mode reset entries=256", name: "x") }
    }

    /// Refused changes are bad scenarios with KVM's reasons.
    @Test(arguments: [
        "memslot add 0 0x100000 1M",              // slot 0 exists
        "memslot add 1 0x100000 1M",              // overlaps slot 0
        "memslot delete 3",
        "memslot move 3 0x8000000",
        "memslot add 1 0x8000000 1M\nmemslot move 1 0x100000",
        "dirty-log get 2",                        // no slot 2
        "memslot add 1 0x8000000 1M\ndirty-log get 1",  // slot 1 does not log dirty pages
    ])
    func refusedChanges(_ text: String) {
        #expect(throws: RunFailure.self) { _ = try run(text) }
    }

    @Test func directivesParseAndRender() throws {
        let text = """
            memslot add 1 0x4000000 4M readonly
            memslot move 1 0x8000000
            memslot flags 1 log-dirty=1
            memslot delete 1
            dirty-log mode ring entries=512
            dirty-log enable 2
            dirty-log get 2
            dirty-log clear 2 64 128
            dirty-log disable 2
            """
        let scenario = try Scenario.parse(text, name: "x")
        let rendered = scenario.directives.map(\.directive.rendered)
        #expect(rendered == ["memslot add 1 0x4000000 4M readonly", "memslot move 1 0x8000000", "memslot flags 1 log-dirty=1",
                             "memslot delete 1", "dirty-log mode ring entries=512", "dirty-log enable 2", "dirty-log get 2",
                             "dirty-log clear 2 64 128", "dirty-log disable 2"])
        #expect(try Scenario.parse(rendered.joined(separator: "\n"), name: "y").directives.map(\.directive)
                == scenario.directives.map(\.directive))
        for bad in ["memslot", "memslot add 1 0x1001 4K", "memslot add 1 0x1000 0", "memslot add 1 0x1000 5",
                    "memslot add 40000 0x1000 4K", "memslot flags 1", "memslot flags 1 log-dirty=2", "memslot grow 1",
                    "dirty-log", "dirty-log mode fast", "dirty-log get", "dirty-log clear 1 0", "dirty-log enable 1 2"] {
            #expect(throws: ScenarioError.self, "\(bad)") { _ = try Scenario.parse(bad, name: "bad") }
        }
    }

    /// Random writes over a logging slot with reads and clears in between, under both protocols
    /// and every variant: the runner's check fails the run if any changed page goes unreported,
    /// and the union of what was reported covers every page written.
    @Test(arguments: [DirtyLogProtocol.getAndReset, .manualProtect, .ring], [UInt64(1), 2, 3])
    func randomWritesAreNeverLost(_ mode: DirtyLogProtocol, _ seed: UInt64) throws {
        var generator = SplitMix64(seed: seed)
        var lines = ["mem 32M", "memslot add 1 0x4000000 1M", "dirty-log mode \(mode.rawValue)" + (mode == .ring ? " entries=256" : "")]
        for page in 0..<64 { lines.append("map \(hex(0x400000 + UInt64(page) << 12)) \(hex(0x4000000 + UInt64(page) << 12)) 4k P,RW,US") }
        lines.append("dirty-log enable 1")
        var written = Set<UInt64>()
        for step in 0..<120 {
            let page = generator.next() % 64
            switch generator.next() % 10 {
            case 0: lines.append("dirty-log get 1")
            case 1 where mode == .manualProtect:
                // A VMM clears what it has read (a clear without a read would drop bits unseen).
                lines.append("dirty-log get 1")
                lines.append("dirty-log clear 1 0 256")
            default:
                lines.append("access write \(hex(0x400000 + page << 12 + (generator.next() % 512) * 8)) cpl=3 value=\(step + 1)")
                written.insert(0x4000 + page)
            }
        }
        lines.append("dirty-log get 1")
        for variant in [MMUVariant.upstream, .localRoots] {
            let report = try run(lines.joined(separator: "\n"), variant: variant)
            let reported = Set(report.dirtyLogs.flatMap(\.gfns).map(\.rawValue))
            #expect(written.isSubset(of: reported))
            #expect(reported.isSubset(of: Set((0x4000..<0x4040) as Range<UInt64>)))
        }
    }
}
