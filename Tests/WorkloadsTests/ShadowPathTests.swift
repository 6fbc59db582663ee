// Scenario tests for the paths of KVM's shadow MMU (issue 3): each runs scenario text through the
// ScenarioRunner (lockstep against the architecture and the auditor after every access, so any
// RunFailure is itself a failure) and checks the outcomes and the counter deltas KVM would show.
//
// The expected numbers are reasoned from arch/x86/kvm/mmu/mmu.c and paging_tmpl.h (spec sections
// 3, 5, 6, 10); each test says why in a short comment. Facts used throughout:
//
// * Guest kernel layout (GuestKernel.swift): 4/5-level: root table at GPA 0x100000; the window onto
//   [0, 16 MiB) at 0xffffe000_00000000 is mapped at boot with its own PDPT (0x101000) and PD
//   (0x102000) of 2 MiB leaves; user `map`s then allocate tables from 0x103000 on. 32-bit: the PD is at
//   0x100000, the window uses 4 MiB PDEs, user PTs from 0x101000. PAE: PDPT at 0x100000, the window's
//   PD (PDPTE 3) at 0x101000, user tables from 0x102000.
// * The guest boots (its vCPU loads CR3) at its first operation and statsBefore is taken before
//   that, so the first access also pays for the roots' lookups (kvm_mmu_load -> mmu_alloc_root:
//   a cache miss each).
// * kvm_mmu_find_shadow_page counts mmu_cache_miss once per shadow page created.
// * pf_taken counts every #PF exit; pf_fixed/pf_emulate/pf_spurious count RET_PF_FIXED/EMULATE/
//   SPURIOUS; a failed guest walk injects a #PF (pf_guest) and returns RET_PF_RETRY (uncounted).
// * A guest huge page is mapped through direct shadow pages of 4 KiB leaves (the host backs guest
//   memory with 4 KiB pages), so pages_2m and pages_1g stay 0.
// * FNAME(pte_prefetch) runs after every level-1 mmu_set_spte that is not RET_PF_SPURIOUS (also after
//   RET_PF_EMULATE): for an indirect page it walks the aligned group of 8 gptes and stops at the first
//   one that is not present, not accessed or has reserved bits; for a direct page
//   (__direct_pte_prefetch) it maps every empty SPTE of the group.
// * Baseline: the kernels of the spec (before v6.12), where a write fault on a write-protected
//   shadowed table returns RET_PF_EMULATE and counts pf_emulate (v6.12 added RET_PF_WRITE_PROTECTED,
//   which is not counted there).
// * Level-1 guest tables are never unsync here (unsync is a later issue); see the one test whose
//   counters depend on that.
// * tlb_flush is checked only in the dedicated tests at the end (KVM counts it when a vCPU services
//   KVM_REQ_TLB_FLUSH{,_CURRENT,_GUEST}, which includes every kvm_flush_remote_tlbs), so that the
//   other tests do not all fail for one counting rule.

import Testing
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

// MARK: Harness

/// A scenario run, with the counters after every guest operation available on demand.
private struct Trace {
    let text: String
    let report: RunReport

    init(_ text: String) throws {
        self.text = text
        report = try Self.run(text)
    }

    static func run(_ text: String) throws -> RunReport {
        let scenario = try Scenario.parse(text, name: "shadow-path")
        return try ScenarioRunner(scenario: scenario).run()
    }

    /// Counter deltas over the whole run.
    var delta: MMUStats { report.statsAfter.delta(from: report.statsBefore) }

    /// Counter deltas from the start through guest operation `index` (access/pte directives count
    /// from 0), by running the scenario up to that operation's line.
    func after(_ index: Int) throws -> MMUStats {
        var lines: [Substring] = []
        var seen = -1
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lines.append(line)
            let keyword = line.split(separator: " ").first ?? ""
            if keyword == "access" || keyword == "pte" {
                seen += 1
                if seen == index { break }
            }
        }
        let prefix = try Self.run(lines.joined(separator: "\n"))
        return prefix.statsAfter.delta(from: prefix.statsBefore)
    }

    func outcome(_ index: Int) -> AccessOutcome { report.accesses[index].outcome }

    /// The final value of the guest's level-`level` entry for `gva` (a mapped GVA).
    func entry(_ gva: UInt64, level: Int) -> UInt64? {
        report.entries.first { $0.gva.rawValue == gva && $0.level == level }?.value
    }
}

/// The counters these tests pin down. Every one not given in `expected` must be 0: a path that
/// counts something extra is as wrong as one that misses a count.
private let pinnedCounters = [
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_guest", "mmu_cache_miss", "mmu_pte_write",
    "mmu_shadow_zapped", "mmu_pde_zapped", "mmu_flooded", "mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "invlpg",
]

private func expectCounters(_ stats: MMUStats, _ expected: [String: UInt64], _ what: String = "",
                            sourceLocation: SourceLocation = #_sourceLocation) {
    for name in expected.keys where !pinnedCounters.contains(name) && name != "tlb_flush" {
        Issue.record("unknown counter \(name)", sourceLocation: sourceLocation)
    }
    for name in pinnedCounters {
        let want = expected[name] ?? 0
        let got = stats[kvmName: name] ?? 0
        #expect(got == want, "\(what) \(name): expected \(want), got \(got) [\(stats)]", sourceLocation: sourceLocation)
    }
    if let want = expected["tlb_flush"] {
        #expect(stats.tlbFlush == want, "\(what) tlb_flush: expected \(want), got \(stats.tlbFlush)",
                sourceLocation: sourceLocation)
    }
}

/// Only the counters named in `expected` (for checkpoints where the others are not the point).
private func expectSome(_ stats: MMUStats, _ expected: [String: UInt64], _ what: String = "",
                        sourceLocation: SourceLocation = #_sourceLocation) {
    for (name, want) in expected.sorted(by: { $0.key < $1.key }) {
        let got = stats[kvmName: name]
        #expect(got == want, "\(what) \(name): expected \(want), got \(got.map(String.init) ?? "nil") [\(stats)]",
                sourceLocation: sourceLocation)
    }
}

/// The access completed (by hardware or the emulator) at `gpa`, after `exits` #PF exits if given.
private func expectCompleted(_ outcome: AccessOutcome, gpa: UInt64, exits: Int? = nil, value: UInt64? = nil,
                             sourceLocation: SourceLocation = #_sourceLocation) {
    guard case .completed(let got, let read) = outcome.result else {
        Issue.record("expected completion at \(hex(gpa)), got \(outcome)", sourceLocation: sourceLocation)
        return
    }
    #expect(got.rawValue == gpa, "gpa", sourceLocation: sourceLocation)
    if let exits { #expect(outcome.exits == exits, "exits: \(outcome)", sourceLocation: sourceLocation) }
    if let value { #expect(read == value, "value read", sourceLocation: sourceLocation) }
}

/// The guest got #PF with exactly this architectural error code and CR2.
private func expectPageFault(_ outcome: AccessOutcome, code: UInt32, cr2: UInt64, exits: Int? = nil,
                             sourceLocation: SourceLocation = #_sourceLocation) {
    guard case .pageFault(let got, let address) = outcome.result else {
        Issue.record("expected #PF \(hex(UInt64(code))), got \(outcome)", sourceLocation: sourceLocation)
        return
    }
    #expect(got.architectural == code, "error code \(got)", sourceLocation: sourceLocation)
    #expect(got.rawValue >> 32 == 0, "no KVM-internal bits in the injected error code", sourceLocation: sourceLocation)
    #expect(address.rawValue == cr2, "CR2", sourceLocation: sourceLocation)
    if let exits { #expect(outcome.exits == exits, "exits: \(outcome)", sourceLocation: sourceLocation) }
}

private let flagA: UInt64 = 1 << 5
private let flagD: UInt64 = 1 << 6

@Suite struct ShadowPathTests {

    // MARK: Building the shadow path

    // First read of a 4-level mapping: kvm_mmu_load allocates the root (PML4 shadow, miss 1); the
    // #PF (pf_taken 1) walks the guest tables and FNAME(fetch) creates the PDPT, PD and PT shadow
    // pages (misses 2-4) and installs one 4 KiB leaf (pages_4k 1, pf_fixed 1). Prefetch stops at the
    // neighbouring gpte, whose A is clear. The neighbour in the same guest PT then faults once more
    // but reuses every shadow page (kvm_mmu_get_child_sp finds the SPTEs present: no lookup, no
    // miss). A page under another PDE of the same PD needs one new PT shadow page only.
    @Test func firstAccessBuildsTheShadowPathAndNeighboursReuseIt() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        map 0x401000 0x1001000 4k P,RW,US
        map 0x600000 0x1002000 4k P,RW,US
        access read 0x400000 cpl=3
        access read 0x401000 cpl=3
        access read 0x600000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_1000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_2000, exits: 1)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1], "first access")
        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 4, "pages_4k": 2], "neighbour")
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 5, "pages_4k": 3], "other PT")
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 1, 2: 1, 1: 2])
    }

    // protect_clean_gpte: the read walk sets A at every level (update_accessed_dirty_bits) but the
    // leaf's D is clear, so ACC_WRITE is dropped and the SPTE is read-only. The write then takes a
    // second (protection) #PF; the write walk sets D and mmu_set_spte makes the same SPTE writable
    // (was_rmapped: pages_4k stays 1, no new shadow page). The read afterwards hits the TLB.
    @Test func protectCleanGPTEMakesTheFirstWriteFaultAndSetsD() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        access write 0x400000 cpl=3 value=0x1234
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 0, value: 0x1234)
        #expect(t.outcome(2).tlbHit)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1], "read")
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 4, "pages_4k": 1], "write")

        // After the read only: A everywhere, D still clear.
        let afterRead = try Trace.run("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        """)
        for level in 1...4 {
            let value = afterRead.entries.first { $0.level == level }!.value
            #expect(value & flagA != 0, "A at level \(level) after the read")
        }
        #expect(afterRead.entries.first { $0.level == 1 }!.value & flagD == 0, "D clear after a read")
        // After the write: the leaf is P,RW,US,A,D.
        #expect(t.entry(0x400000, level: 1) == 0x100_0000 | 0x67)
        for level in 2...4 { #expect(t.entry(0x400000, level: level)! & 0xfff == 0x27, "level \(level): P,RW,US,A") }
    }

    // A write as the first access needs only one fault: the walk sets A and D together and the
    // SPTE is writable at once.
    @Test func firstWriteSetsAAndDInOneFault() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access write 0x400000 cpl=3 value=1
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 0, value: 1)
        expectCounters(t.delta, ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1])
        #expect(t.entry(0x400000, level: 1) == 0x100_0000 | 0x67)
    }

    // MARK: Guest faults

    // Every failed guest walk: pf_taken 1 (the SPTE is missing, so the hardware faults first),
    // FNAME(walk_addr) fails, kvm_inject_emulated_page_fault (pf_guest 1), RET_PF_RETRY; no shadow
    // page below the root is created (fetch never runs), so mmu_cache_miss is just the root.
    // Error codes: walk_addr_generic's errcode | W | U (| I/D for fetches when EFER.NX or SMEP).
    @Test(arguments: [
        // not present: PDE 4 empty -> U only
        ("map 0x400000 0x1000000 4k P,RW,US", "access read 0x800000 cpl=3", 0x4 as UInt32, 0x800000 as UInt64),
        // not present, supervisor write
        ("map 0x400000 0x1000000 4k P,RW,US", "access write 0x800ff8 cpl=0", 0x2, 0x800ff8),
        // not-present fetch with NX on: U | I/D
        ("map 0x400000 0x1000000 4k P,RW,US", "access exec 0x800000 cpl=3", 0x14, 0x800000),
        // user write to a read-only user page: P | W | U
        ("map 0x400000 0x1000000 4k P,US", "access write 0x400010 cpl=3", 0x7, 0x400010),
        // user read of a supervisor page: P | U
        ("map 0x400000 0x1000000 4k P,RW", "access read 0x400000 cpl=3", 0x5, 0x400000),
        // ... also when only an upper level is supervisor
        ("map 0x400000 0x1000000 4k P,RW,US l3=P,RW", "access read 0x400000 cpl=3", 0x5, 0x400000),
        // a read-only upper level refuses a user write: P | W | U
        ("map 0x400000 0x1000000 4k P,RW,US l2=P,US", "access write 0x400000 cpl=3", 0x7, 0x400000),
        // NX fetch, user: P | U | I/D
        ("map 0x400000 0x1000000 4k P,RW,US,NX", "access exec 0x400000 cpl=3", 0x15, 0x400000),
        // NX fetch, supervisor: P | I/D
        ("map 0x400000 0x1000000 4k P,RW,NX", "access exec 0x400000 cpl=0", 0x11, 0x400000),
        // reserved address bit (MAXPHYADDR 46) in the leaf: RSVD | P | U
        ("map 0x400000 0x1000000 4k P,RW,US,bit50", "access read 0x400000 cpl=3", 0xd, 0x400000),
        // PS in a PML4E is reserved: RSVD | P | W
        ("map 0x400000 0x1000000 4k P,RW,US l4=P,RW,US,PS", "access write 0x400000 cpl=0", 0xb, 0x400000),
        // reserved bits in a 2 MiB PDE (bits 20:13): RSVD | P | U | I/D
        ("map 0x400000 0x1000000 2m P,RW,US,bit13", "access exec 0x400000 cpl=3", 0x1d, 0x400000),
    ])
    func guestFaultsAreInjectedWithTheArchitecturalErrorCode(map: String, access: String, code: UInt32, cr2: UInt64) throws {
        let t = try Trace("\(map)\n\(access)")
        expectPageFault(t.outcome(0), code: code, cr2: cr2, exits: 1)
        expectCounters(t.delta, ["pf_taken": 1, "pf_guest": 1, "mmu_cache_miss": 1])
        #expect(t.report.shadowPagesByLevel == [4: 1])
    }

    // With EFER.NX=0 bit 63 is a reserved bit, and a fetch fault carries no I/D (walk_addr_generic
    // adds PFERR_FETCH_MASK only when EFER.NX or CR4.SMEP): RSVD | P | U for both accesses.
    @Test func nxBitWithoutEFERNXIsReservedAndFetchesCarryNoIDBit() throws {
        let t = try Trace("""
        set nx=0
        map 0x400000 0x1000000 4k P,RW,US,NX
        access read 0x400000 cpl=3
        access exec 0x400000 cpl=3
        """)
        expectPageFault(t.outcome(0), code: 0xd, cr2: 0x400000, exits: 1)
        expectPageFault(t.outcome(1), code: 0xd, cr2: 0x400000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 2, "pf_guest": 2, "mmu_cache_miss": 1])
    }

    // A fault after the page was mapped: the read installs a read-only SPTE (the guest leaf has no
    // RW), the write then takes a protection #PF from the hardware and the walk refuses it: P|W|U.
    @Test func writeToReadOnlyUserPageAfterItWasMapped() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,US,A,D
        access read 0x400000 cpl=3
        access write 0x400000 cpl=3 value=5
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectPageFault(t.outcome(1), code: 0x7, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 0, value: 0)
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 1, "pf_guest": 1, "mmu_cache_miss": 4, "pages_4k": 1])
    }

    // MARK: Write protection of shadowed guest tables

    // Rewriting a PDE (level 2; the PD's gfn is write-tracked). The `pte` store goes through the
    // kernel window, whose SPTE does not exist yet: a not-present #PF, the window walk, FNAME(fetch)
    // builds the window's PDPT and PD shadow pages and a direct level-1 page for its 2 MiB leaf
    // (misses 5-7); mmu_set_spte finds the target gfn write-tracked (mmu_try_to_unsync_pages ->
    // -EPERM), keeps the SPTE read-only and returns RET_PF_EMULATE (pf_emulate 1). The direct
    // prefetch maps the other 7 gfns of the 8-aligned group (0x100-0x107): pages_4k 1 + 8.
    // The emulated store calls kvm_mmu_track_write: mmu_pte_write 1; the PD shadow page's SPTE for
    // PDE 2 is zapped (drop_parent_pte: the PT shadow page stays, orphaned, with its leaf) and,
    // gentry being nonzero at level 2, mmu_pde_zapped 1. The user read then faults (pf_guest, 0x5).
    // Restoring US: the window SPTE is now present but read-only, so the #PF has P set and
    // page_fault_handle_page_track emulates at once (pf_emulate 2, no fetch); the written SPTE is
    // already gone but mmu_pde_zapped still counts it (it counts per written SPTE, present or not).
    // The last read relinks the orphaned PT shadow page (found by kvm_mmu_find_shadow_page: no miss)
    // and mmu_set_spte finds the leaf SPTE identical: RET_PF_SPURIOUS.
    @Test func pdeWriteIsEmulatedAndZapsTheShadowPDE() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        // The PD is at 0x104000; PDE 2 at 0x104010, seen through the window.
        #expect(t.report.accesses[1].operation == "pte")
        expectCompleted(t.outcome(1), gpa: 0x10_4010, exits: 1)
        #expect(t.outcome(1).emulated)
        expectPageFault(t.outcome(2), code: 0x5, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(3), gpa: 0x10_4010, exits: 1)
        #expect(t.outcome(3).emulated)
        expectCompleted(t.outcome(4), gpa: 0x100_0000, exits: 1)

        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 1, "pf_emulate": 1, "mmu_cache_miss": 7,
                                        "mmu_pte_write": 1, "mmu_pde_zapped": 1, "pages_4k": 9], "first pte")
        expectCounters(try t.after(2), ["pf_taken": 3, "pf_fixed": 1, "pf_emulate": 1, "pf_guest": 1, "mmu_cache_miss": 7,
                                        "mmu_pte_write": 1, "mmu_pde_zapped": 1, "pages_4k": 9], "read of the supervisor PDE")
        expectCounters(t.delta, ["pf_taken": 5, "pf_fixed": 1, "pf_emulate": 2, "pf_spurious": 1, "pf_guest": 1,
                                 "mmu_cache_miss": 7, "mmu_pte_write": 2, "mmu_pde_zapped": 2, "pages_4k": 9], "end")
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 2, 2: 2, 1: 2])
        // The walk of the last read set A in the rewritten PDE again.
        #expect(t.entry(0x400000, level: 2)! & 0xfff == 0x27)
    }

    // Writing zero to a PDE zaps the shadow PDE too, but mmu_pde_zapped counts only nonzero gentries.
    // A PDPTE (level 3) write counts like a PDE write.
    @Test func zeroPDEWriteDoesNotCountAsPDEZappedButLevel3WriteDoes() throws {
        let zero = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 raw=0
        access read 0x400000 cpl=3
        """)
        expectPageFault(zero.outcome(2), code: 0x4, cr2: 0x400000, exits: 1)
        expectCounters(zero.delta, ["pf_taken": 3, "pf_fixed": 1, "pf_emulate": 1, "pf_guest": 1, "mmu_cache_miss": 7,
                                    "mmu_pte_write": 1, "pages_4k": 9], "raw=0")

        // The PDPT is at 0x103000; rewriting PDPTE 0 read-only makes the user write fault (P|W|U).
        let level3 = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access write 0x400000 cpl=3 value=1
        pte 0x400000 3 P,US
        access write 0x400000 cpl=3 value=2
        access read 0x400000 cpl=3
        """)
        expectCompleted(level3.outcome(1), gpa: 0x10_3000, exits: 1)
        expectPageFault(level3.outcome(2), code: 0x7, cr2: 0x400000, exits: 1)
        // The read cannot relink the old PD shadow page: its role.access came from a writable
        // PDPTE, the new walk's pt_access lacks ACC_WRITE, so new PD and PT shadow pages are made
        // (misses 8, 9) and a new read-only leaf (pages_4k 10).
        expectCompleted(level3.outcome(3), gpa: 0x100_0000, exits: 1, value: 1)
        expectCounters(level3.delta, ["pf_taken": 4, "pf_fixed": 2, "pf_emulate": 1, "pf_guest": 1, "mmu_cache_miss": 9,
                                      "mmu_pte_write": 1, "mmu_pde_zapped": 1, "pages_4k": 10], "level 3")
    }

    // mmu_try_to_unsync_pages: the kernel's store to a PTE through its window faults (the window
    // is not mapped yet); the gfn holds only a last-level shadowed table, so KVM unsyncs that shadow
    // page (kvm_unsync_page, mmu_unsync 1) and maps the window writable: the store completes in
    // hardware, with no emulation and no mmu_pte_write. The shadow PTE for 0x401000 (prefetched by
    // the first read) is now stale, which the architecture allows until the guest invalidates.
    // INVLPG syncs the SPTE on the address's path (kvm_mmu_invalidate_addr -> sync_spte): the gfn
    // changed, so it is dropped (pages_4k -1) and the read faults it in again.
    @Test func pteWriteUnsyncsTheShadowPTAndINVLPGSyncsIt() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        map 0x401000 0x1001000 4k P,RW,US,A
        access read 0x400000 cpl=3
        pte 0x401000 1 raw=0x1002025
        invlpg 0x401000
        access read 0x401000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        // The PT is at 0x105000; PTE 1 at 0x105008.
        expectCompleted(t.outcome(1), gpa: 0x10_5008, exits: 1)
        #expect(t.outcome(1).emulated == false)
        expectCompleted(t.outcome(2), gpa: 0x100_2000, exits: 1)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 2], "prefetched")
        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 7, "mmu_unsync": 1,
                                        "pages_4k": 10], "pte write unsyncs")
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 7, "mmu_unsync": 1, "invlpg": 1,
                                 "pages_4k": 10], "end")
    }

    // MARK: Write flooding

    // detect_write_flooding: each emulated write to an upper-level shadowed table bumps its
    // write_flooding_count; the third write with no walk through the page in between zaps it
    // (mmu_flooded 1, mmu_shadow_zapped 1; no mmu_pde_zapped for that write). The user PD is not on
    // the window's shadow path, so nothing clears its count between the writes. Writes 2 and 3 hit
    // the present read-only window SPTE: page_fault_handle_page_track emulates them directly.
    // Zapping the PD shadow page unlinks it from the PDPT shadow page; the PT shadow page survives
    // (orphaned, leaf intact), so the next read creates only a new PD shadow page (1 miss), relinks
    // the PT page and finds the leaf identical (pf_spurious).
    @Test func repeatedPDEWritesFloodTheShadowPD() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        access read 0x400000 cpl=3
        """)
        expectCounters(try t.after(2), ["pf_taken": 3, "pf_fixed": 1, "pf_emulate": 2, "mmu_cache_miss": 7,
                                        "mmu_pte_write": 2, "mmu_pde_zapped": 2, "pages_4k": 9], "two writes")
        expectCounters(try t.after(3), ["pf_taken": 4, "pf_fixed": 1, "pf_emulate": 3, "mmu_cache_miss": 7,
                                        "mmu_pte_write": 3, "mmu_pde_zapped": 2, "mmu_flooded": 1, "mmu_shadow_zapped": 1,
                                        "pages_4k": 9], "third write floods")
        expectCompleted(t.outcome(4), gpa: 0x100_0000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 5, "pf_fixed": 1, "pf_emulate": 3, "pf_spurious": 1, "mmu_cache_miss": 8,
                                 "mmu_pte_write": 3, "mmu_pde_zapped": 2, "mmu_flooded": 1, "mmu_shadow_zapped": 1,
                                 "pages_4k": 9], "end")
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 2, 2: 2, 1: 2])
    }

    // A walk through the table between writes resets the count (FNAME(fetch) ->
    // clear_sp_write_flooding_count on every page of the shadow path), so alternating writes and
    // accesses never flood. Here each access re-faults because the write zapped its shadow PDE.
    @Test func aWalkBetweenWritesResetsTheFloodCount() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        access read 0x400000 cpl=3
        """)
        expectCounters(t.delta, ["pf_taken": 7, "pf_fixed": 1, "pf_emulate": 4, "pf_spurious": 2, "mmu_cache_miss": 7,
                                 "mmu_pte_write": 4, "mmu_pde_zapped": 4, "pages_4k": 9])
    }

    // Writes to the root table (PML4, gfn 0x100) never flood: the window's own shadow path starts
    // at that root, and every emulated store first clears the flood count of each page on the
    // faulting address's path (FNAME(fetch) for the first, not-present fault; then
    // page_fault_handle_page_track -> shadow_page_table_clear_flood for the protection faults).
    // Each write of PML4E 0 counts mmu_pde_zapped (nonzero gentry, level 4).
    @Test func writesToTheRootTableNeverFloodIt() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 4 P,RW,US
        pte 0x400000 4 P,RW,US
        pte 0x400000 4 P,RW,US
        pte 0x400000 4 P,RW,US
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(5), gpa: 0x100_0000, exits: 1)
        // The last read relinks the existing PDPT shadow page, whose path below is intact: the
        // leaf is found identical (pf_spurious).
        expectCounters(t.delta, ["pf_taken": 6, "pf_fixed": 1, "pf_emulate": 4, "pf_spurious": 1, "mmu_cache_miss": 7,
                                 "mmu_pte_write": 4, "mmu_pde_zapped": 4, "pages_4k": 9])
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 2, 2: 2, 1: 2])
    }

    // 32-bit guest: the one guest PD is shadowed by four roots (quadrants 0-3), and the window
    // (0xc0000000) runs through quadrant 3 only, so only quadrant 3's flood count is cleared by the
    // window stores; quadrants 0-2 flood on the third PDE write (mmu_flooded 3, mmu_shadow_zapped 3).
    // They are roots in use (root_count 1): __kvm_mmu_prepare_zap_page marks them invalid and raises
    // KVM_REQ_MMU_FREE_OBSOLETE_ROOTS. On the entry that resumes the guest, kvm_mmu_free_obsolete_roots
    // frees the PAE root (a special root without a shadow page is always "obsolete"):
    // mmu_free_root_page drops each root_count, and for the three invalid roots calls
    // kvm_mmu_prepare_zap_page again (mmu_shadow_zapped 6) and frees them. kvm_mmu_load then makes
    // quadrants 0-2 anew (misses 7-9) and finds quadrant 3. The read relinks the orphaned PT shadow
    // page (hit) and finds the leaf unchanged: pf_spurious.
    // PDE writes zap shadow PDEs 2 and 3 of quadrant 0 on writes 1 and 2: mmu_pde_zapped 4.
    @Test func legacy32PDEWritesFloodTheOtherQuadrantRootsWhichAreReloaded() throws {
        let t = try Trace("""
        set paging=32
        map 0x400000 0x1000000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        pte 0x400000 2 P,RW,US
        access read 0x400000 cpl=3
        """)
        expectSome(try t.after(2), ["mmu_pte_write": 2, "mmu_pde_zapped": 4, "mmu_flooded": 0], "two writes")
        expectSome(try t.after(3), ["mmu_pte_write": 3, "mmu_pde_zapped": 4, "mmu_flooded": 3], "third write")
        expectCompleted(t.outcome(4), gpa: 0x100_0000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 5, "pf_fixed": 1, "pf_emulate": 3, "pf_spurious": 1, "mmu_cache_miss": 9,
                                 "mmu_pte_write": 3, "mmu_pde_zapped": 4, "mmu_flooded": 3, "mmu_shadow_zapped": 6,
                                 "pages_4k": 9])
        #expect(t.report.shadowPagesByLevel == [2: 4, 1: 2])
    }

    // MARK: Guest huge pages

    // A 2 MiB guest page: the walk ends at level 2, so FNAME(fetch) shadows PML4/PDPT/PD and then
    // maps the page through a direct level-1 shadow page (role.access = the walk's pte_access,
    // base gfn = the 2 MiB frame). Every fault maps a 4 KiB leaf; __direct_pte_prefetch fills the
    // rest of its 8-group. The clean PDE gives a read-only direct page (access U|X); the write sets
    // D, so validate_direct_spte drops that child (its role.access differs) and a new direct page
    // with U|W|X is made (miss 5). The old one lives on with its 16 leaves, unlinked.
    @Test func twoMegabytePageIsMappedThroughDirectShadowPages() throws {
        let t = try Trace("""
        map 0x200000 0x1200000 2m P,RW,US
        access read 0x200000 cpl=3
        access read 0x201000 cpl=3
        access read 0x300000 cpl=3
        access write 0x3ff008 cpl=3 value=7
        access read 0x200000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x120_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x120_1000, exits: 0)  // prefetched
        expectCompleted(t.outcome(2), gpa: 0x130_0000, exits: 1)
        expectCompleted(t.outcome(3), gpa: 0x13f_f008, exits: 1)
        expectCompleted(t.outcome(4), gpa: 0x120_0000, exits: 1)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 8], "first")
        expectCounters(try t.after(2), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 4, "pages_4k": 16], "offset 1M")
        expectCounters(try t.after(3), ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 5, "pages_4k": 24], "write")
        expectCounters(t.delta, ["pf_taken": 4, "pf_fixed": 4, "mmu_cache_miss": 5, "pages_4k": 32], "end")
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 1, 2: 1, 1: 2])
        #expect(t.entry(0x200000, level: 2) == 0x120_0000 | 0xe7)  // P,RW,US,A,D,PS
    }

    // A 1 GiB guest page: the walk ends at level 3; a direct level-2 page and direct level-1 pages
    // below it (one per 2 MiB touched) map it with 4 KiB leaves.
    @Test func oneGigabytePageIsMappedThroughDirectShadowPages() throws {
        let t = try Trace("""
        mem 2G
        map 0x40000000 0x40000000 1g P,RW,US,A,D
        access read 0x40000000 cpl=3
        access write 0x52345678 cpl=3 value=3
        access read 0x7ffff000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x4000_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x5234_5678, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x7fff_f000, exits: 1)
        // Misses: root, PDPT (indirect), direct L2, direct L1 for each of 3 distinct 2 MiB regions.
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 6, "pages_4k": 24])
        #expect(t.report.shadowPagesByLevel == [4: 1, 3: 1, 2: 1, 1: 3])
    }

    // MARK: Prefetch

    // FNAME(pte_prefetch) after the fault on PTE 0 maps PTE 1 (A, clean: read-only) and PTE 2 (A, D:
    // writable), and stops at PTE 3 (A clear): PTE 4 is not reached. Accessing PTE 1 and PTE 2
    // (even writing it) needs no exit. PTE 3 faults; its prefetch then reaches PTE 4 (A set).
    @Test func prefetchMapsAccessedNeighboursAndStopsAtTheFirstUnaccessedOne() throws {
        let maps = """
        map 0x400000 0x1000000 4k P,RW,US,A
        map 0x401000 0x1001000 4k P,RW,US,A
        map 0x402000 0x1002000 4k P,RW,US,A,D
        map 0x403000 0x1003000 4k P,RW,US
        map 0x404000 0x1004000 4k P,RW,US,A
        access read 0x400000 cpl=3
        """
        let stopped = try Trace(maps + "\naccess read 0x404000 cpl=3")
        expectCounters(try stopped.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 3], "prefetch")
        expectCompleted(stopped.outcome(1), gpa: 0x100_4000, exits: 1)

        let t = try Trace(maps + """

        access read 0x401000 cpl=3
        access write 0x402000 cpl=3 value=2
        access read 0x403000 cpl=3
        access read 0x404000 cpl=3
        """)
        expectCompleted(t.outcome(1), gpa: 0x100_1000, exits: 0)
        expectCompleted(t.outcome(2), gpa: 0x100_2000, exits: 0)
        expectCompleted(t.outcome(3), gpa: 0x100_3000, exits: 1)
        expectCompleted(t.outcome(4), gpa: 0x100_4000, exits: 0)
        expectCounters(try t.after(2), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 3], "no exits")
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 4, "pages_4k": 5], "end")
        // Prefetch leaves the guest's entries alone: PTE 1 stays clean, PTE 3 got A from its walk.
        #expect(t.entry(0x401000, level: 1) == 0x100_1000 | 0x27)
        #expect(t.entry(0x403000, level: 1) == 0x100_3000 | 0x27)
    }

    // A prefetched clean neighbour is read-only (protect_clean_gpte in FNAME(prefetch_gpte)): the
    // first write to it faults once and sets D.
    @Test func prefetchedCleanNeighbourFaultsOnItsFirstWrite() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US,A
        map 0x401000 0x1001000 4k P,RW,US,A
        access read 0x400000 cpl=3
        access write 0x401000 cpl=3 value=9
        """)
        expectCompleted(t.outcome(1), gpa: 0x100_1000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 4, "pages_4k": 2])
        #expect(t.entry(0x401000, level: 1) == 0x100_1000 | 0x67)
    }

    // MARK: CR0.WP=0

    // Guest CR0.WP=0, supervisor write to a user read-only page: allowed by the architecture.
    // FNAME(page_fault) maps it ACC_WRITE and not ACC_USER (the hardware runs with WP=1). The user
    // read then takes a protection #PF (the SPTE is supervisor-only); the walk allows it and the
    // SPTE becomes user, read-only. A second supervisor write faults again and flips it back.
    @Test func cr0WPZeroMapsSupervisorWritesToUserPagesAsKernelPages() throws {
        let t = try Trace("""
        set wp=0
        map 0x400000 0x1000000 4k P,US,A,D
        access write 0x400000 cpl=0 value=7
        access read 0x400000 cpl=3
        access write 0x400000 cpl=0 value=8
        access read 0x400000 cpl=0
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 1, value: 7)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(3), gpa: 0x100_0000, exits: 0, value: 8)
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 4, "pages_4k": 1])
    }

    // With SMEP as well, the kernel copy also loses ACC_EXEC (smep_andnot_wp): a supervisor fetch
    // of the page must still fault as SMEP demands (the guest page is a user page), even though the
    // SPTE is now supervisor. The user fetch afterwards faults into KVM and completes.
    @Test func cr0WPZeroWithSMEPMakesTheKernelCopyNonExecutable() throws {
        let t = try Trace("""
        set wp=0 smep=1
        map 0x400000 0x1000000 4k P,US,A,D
        access write 0x400000 cpl=0 value=1
        access exec 0x400000 cpl=0
        access exec 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectPageFault(t.outcome(1), code: 0x11, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 2, "pf_guest": 1, "mmu_cache_miss": 4, "pages_4k": 1])
    }

    // MARK: 32-bit, PAE and 5-level guests

    // 32-bit paging: the shadow runs in PAE; mmu_alloc_shadow_roots makes four level-2 roots for
    // the one guest PD (quadrants 0-3: misses 1-4). A guest PT (4 MiB) is shadowed by two PAE PTs,
    // quadrant = bit 21 of the address: 0x400000 and 0x600000 share the guest PT but need two
    // shadow pages. Rewriting the 4-byte PDE 1 (at 0x100004): get_written_sptes doubles the offset
    // twice and zaps two 8-byte shadow PDEs (2 and 3) in the quadrant-0 root only: mmu_pde_zapped 2.
    // The window store maps gfn 0x100 through a new direct page (miss 7) + 7 prefetched neighbours.
    @Test func legacy32GuestUsesQuadrants() throws {
        let t = try Trace("""
        set paging=32
        map 0x400000 0x1000000 4k P,RW,US
        map 0x600000 0x1001000 4k P,RW,US
        access read 0x400000 cpl=3
        access read 0x600000 cpl=3
        pte 0x400000 2 P,RW
        access read 0x400000 cpl=3
        access read 0x600000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_1000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x10_0004, exits: 1)
        #expect(t.outcome(2).emulated)
        expectPageFault(t.outcome(3), code: 0x5, cr2: 0x400000, exits: 1)
        expectPageFault(t.outcome(4), code: 0x5, cr2: 0x600000, exits: 1)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 5, "pages_4k": 1], "first")
        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 6, "pages_4k": 2], "quadrant 1")
        expectCounters(t.delta, ["pf_taken": 5, "pf_fixed": 2, "pf_emulate": 1, "pf_guest": 2, "mmu_cache_miss": 7,
                                 "mmu_pte_write": 1, "mmu_pde_zapped": 2, "pages_4k": 10], "end")
        #expect(t.report.shadowPagesByLevel == [2: 4, 1: 3])
        // 4-byte entries: the PDE is the PT's address with P,RW (the pte write cleared US and A).
        // The PT is the pool's sixth page: after the root, the four PTs of the kernel's window.
        #expect(t.entry(0x400000, level: 2) == 0x10_5003)
        #expect(t.entry(0x400000, level: 1) == 0x100_0027)
    }

    // A 4 MiB page under 32-bit paging: the shadow's 8-byte PDEs map 2 MiB, so each half of the
    // guest page gets its own direct level-1 page (base gfns 0x1400 and 0x1600).
    @Test func legacy32FourMegabytePage() throws {
        let t = try Trace("""
        set paging=32
        map 0x800000 0x1400000 4m P,RW,US,A,D
        access read 0x800000 cpl=3
        access read 0x9ff000 cpl=3
        access read 0xa00000 cpl=3
        access write 0xbff008 cpl=3 value=1
        """)
        expectCompleted(t.outcome(0), gpa: 0x140_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x15f_f000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x160_0000, exits: 1)
        expectCompleted(t.outcome(3), gpa: 0x17f_f008, exits: 1)
        expectCounters(t.delta, ["pf_taken": 4, "pf_fixed": 4, "mmu_cache_miss": 6, "pages_4k": 32])
        #expect(t.report.shadowPagesByLevel == [2: 4, 1: 2])
    }

    // PAE: the guest boots (loads CR3, hence the four PDPTE registers) at its first operation, and
    // kvm_mmu_load makes one level-2 root per present PDPTR: the two user PDs and the window's PD
    // (misses 1-3); the first read adds the PT (miss 4). The PDPT page itself is not shadowed (its
    // entries are registers), so the `pte` store that clears PDPTE 1 is not emulated: the window's
    // 2 MiB page gets a direct shadow page (miss 5) and a writable SPTE for gfn 0x100 (pf_fixed),
    // and __direct_pte_prefetch maps gfns 0x101-0x107 (read-only where a shadowed table lives,
    // writable elsewhere, including 0x105, the PT of 0x40000000 that nothing shadows yet).
    // The guest still translates through its PDPTE register: the read of 0x40000000 completes and
    // shadows that PT (miss 6), write-protecting the window SPTE just prefetched for it.
    // reload-cr3 reloads the PDPTRs; they changed, so load_pdptrs frees the roots, kvm_mmu_load
    // finds the two still present ones again (no miss), and the read now takes the guest #PF of a
    // not-present PDPTE (error code U).
    @Test func paeGuestTranslatesThroughItsPDPTERegisters() throws {
        let t = try Trace("""
        set paging=pae
        map 0x400000 0x1000000 4k P,RW,US
        map 0x40000000 0x1001000 4k P,RW,US
        access read 0x400000 cpl=3
        pte 0x40000000 3 raw=0
        access read 0x40000000 cpl=3
        reload-cr3
        access read 0x40000000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        // PDPTE 1 lives at 0x100008.
        expectCompleted(t.outcome(1), gpa: 0x10_0008, exits: 1)
        #expect(!t.outcome(1).emulated)
        expectCompleted(t.outcome(2), gpa: 0x100_1000, exits: 1)
        expectPageFault(t.outcome(3), code: 0x4, cr2: 0x4000_0000, exits: 1)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1], "boot")
        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 5, "pages_4k": 9], "pte")
        expectCounters(try t.after(2), ["pf_taken": 3, "pf_fixed": 3, "mmu_cache_miss": 6, "pages_4k": 10], "register")
        expectCounters(t.delta, ["pf_taken": 4, "pf_fixed": 3, "pf_guest": 1, "mmu_cache_miss": 6, "pages_4k": 10], "end")
        #expect(t.report.shadowPagesByLevel == [2: 3, 1: 3])
        // PDPTEs have no A bit; the PDE and PTE of the first read do.
        #expect(t.entry(0x400000, level: 3)! & 0xfff == 0x1)
        #expect(t.entry(0x400000, level: 2)! & 0xfff == 0x27)
        #expect(t.entry(0x400000, level: 1)! & 0xfff == 0x27)
        #expect(t.entry(0x40000000, level: 3) == 0)
    }

    // A PAE mapping inside PDPTE 3 (above the window) needs no reload.
    @Test func paeMappingUnderAPresentPDPTE() throws {
        let t = try Trace("""
        set paging=pae
        map 0xc1000000 0x1000000 4k P,RW,US
        access read 0xc1000000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        // Root for PDPTE 3 (the window's PD, shared), then the user PT.
        expectCounters(t.delta, ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 2, "pages_4k": 1])
        #expect(t.report.shadowPagesByLevel == [2: 1, 1: 1])
    }

    // 5-level paging: the root shadows the PML5 (miss 1) and the walk adds PML4, PDPT, PD, PT.
    // A user address with PML5 index 1 needs a whole new branch below the root (4 misses).
    @Test func fiveLevelGuest() throws {
        let t = try Trace("""
        cpu la57=1
        set paging=5
        map 0x400000 0x1000000 4k P,RW,US
        map 0x1000000000000 0x1001000 4k P,RW,US
        access read 0x400000 cpl=3
        access write 0x1000000000000 cpl=3 value=6
        access read 0x1000000000000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_1000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_1000, exits: 0, value: 6)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 5, "pages_4k": 1], "first")
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 9, "pages_4k": 2], "end")
        #expect(t.report.shadowPagesByLevel == [5: 1, 4: 2, 3: 2, 2: 2, 1: 2])
        for level in 1...5 { #expect(t.entry(0x1000000000000, level: level)! & flagA != 0, "A at level \(level)") }
    }

    // MARK: SMEP / SMAP

    // SMEP: a supervisor fetch from a user page is refused (P | I/D) whether or not KVM has mapped
    // it yet; the second time the hardware itself faults on the user SPTE (host CR4.SMEP is the
    // guest's) and KVM's walk injects the same error code.
    @Test func smepRefusesSupervisorFetchesFromUserPages() throws {
        let t = try Trace("""
        set smep=1
        map 0x400000 0x1000000 4k P,RW,US,A,D
        map 0x500000 0x1001000 4k P,RW,A,D
        access exec 0x400000 cpl=0
        access exec 0x400000 cpl=3
        access exec 0x500000 cpl=0
        access exec 0x400000 cpl=0
        """)
        expectPageFault(t.outcome(0), code: 0x11, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_1000, exits: 1)
        expectPageFault(t.outcome(3), code: 0x11, cr2: 0x400000, exits: 1)
        expectCounters(t.delta, ["pf_taken": 4, "pf_fixed": 2, "pf_guest": 2, "mmu_cache_miss": 4, "pages_4k": 2])
    }

    // SMAP: with RFLAGS.AC=0 supervisor data accesses to user pages fault (P, P|W); with AC=1 they
    // go through, and the SPTE made by the read is writable (D was already set), so the write
    // needs no exit. Clearing AC again: the SPTE is present and user, the hardware faults and KVM
    // injects P. User accesses are unaffected.
    @Test func smapHonoursRFLAGSAC() throws {
        let t = try Trace("""
        set smap=1 ac=0
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=0
        access write 0x400000 cpl=0 value=1
        set ac=1
        access read 0x400000 cpl=0
        access write 0x400000 cpl=0 value=9
        set ac=0
        access read 0x400000 cpl=0
        access read 0x400000 cpl=3
        """)
        expectPageFault(t.outcome(0), code: 0x1, cr2: 0x400000, exits: 1)
        expectPageFault(t.outcome(1), code: 0x3, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 1, value: 0)
        expectCompleted(t.outcome(3), gpa: 0x100_0000, exits: 0)
        expectPageFault(t.outcome(4), code: 0x1, cr2: 0x400000, exits: 1)
        expectCompleted(t.outcome(5), gpa: 0x100_0000, exits: 0, value: 9)
        expectCounters(t.delta, ["pf_taken": 4, "pf_fixed": 1, "pf_guest": 3, "mmu_cache_miss": 4, "pages_4k": 1])
    }

    // MARK: INVLPG, CR3 reloads and register writes

    // INVLPG: kvm_mmu_invlpg counts invlpg and drops the hardware TLB entry; the SPTE stays (nothing
    // is unsync), so the next access walks the shadow tables without an exit. reload-cr3 with the
    // same CR3: kvm_set_cr3 skips kvm_mmu_new_pgd (not PAE) but kvm_invalidate_pcid requests
    // KVM_REQ_TLB_FLUSH_CURRENT, which kvm_vcpu_flush_tlb_current counts in tlb_flush; the root and
    // its SPTEs stay, so again no exit and no new shadow page. Nothing here needs a remote flush
    // (no SPTE ever loses MMU-writable), so tlb_flush counts only the CR3 load.
    @Test func invlpgAndCR3ReloadDropTLBEntriesButKeepSPTEs() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        access read 0x400000 cpl=3
        invlpg 0x400000
        access read 0x400000 cpl=3
        reload-cr3
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(0), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 0)
        #expect(t.outcome(1).tlbHit)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 0)
        #expect(!t.outcome(2).tlbHit)
        expectCompleted(t.outcome(3), gpa: 0x100_0000, exits: 0)
        #expect(!t.outcome(3).tlbHit)
        expectCounters(try t.after(2), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1, "invlpg": 1,
                                        "tlb_flush": 0], "invlpg")
        expectCounters(t.delta, ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1, "invlpg": 1,
                                 "tlb_flush": 1], "reload-cr3")
        // The MOV to CR3 is itself an exit; the flush request is serviced on the entry right after
        // it, whether or not another access follows.
        let reloadLast = try Trace.run("""
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        reload-cr3
        """)
        expectSome(reloadLast.statsAfter.delta(from: reloadLast.statsBefore), ["tlb_flush": 1], "reload-cr3 last")
    }

    // Every kvm_flush_remote_tlbs raises KVM_REQ_TLB_FLUSH on every vCPU (x86 has no
    // flush_remote_tlbs hook without Hyper-V), and the vCPU counts tlb_flush when it services the
    // request before re-entering the guest (kvm_vcpu_flush_tlb_all); requests made while handling
    // one exit are serviced once. Here the emulated PDE write zaps a present shadow PDE, so
    // kvm_mmu_track_write flushes: one tlb_flush for the `pte` operation.
    @Test func remoteFlushIsCountedAsAVCPUTLBFlush() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        pte 0x400000 2 P,RW,US,A
        access read 0x400000 cpl=3
        """)
        expectCounters(try t.after(0), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1,
                                        "tlb_flush": 0], "before")
        // Serviced on the entry that resumes the guest after the emulated store, i.e. by the end
        // of the `pte` operation, not only when the next access happens to enter.
        expectCounters(try t.after(1), ["pf_taken": 2, "pf_fixed": 1, "pf_emulate": 1, "mmu_cache_miss": 7,
                                        "mmu_pte_write": 1, "mmu_pde_zapped": 1, "pages_4k": 9, "tlb_flush": 1], "pte")
        // The read relinks the PT shadow page (spurious) and needs no further flush.
        expectCounters(t.delta, ["pf_taken": 3, "pf_fixed": 1, "pf_emulate": 1, "pf_spurious": 1, "mmu_cache_miss": 7,
                                 "mmu_pte_write": 1, "mmu_pde_zapped": 1, "pages_4k": 9, "tlb_flush": 1], "after")
    }

    // Register writes mid-run. CR4.SMAP with CR0.WP=1 changes only the extended role: the context
    // is reset (kvm_mmu_reset_context unloads the roots) but the root role is the same, so the old
    // root is found again and the page needs no exit. CR0.WP changes cr0_wp in every role: a whole
    // new shadow tree (4 misses); back to WP=1 the first tree is found intact (no miss, no exit).
    // tlb_flush: kvm_post_set_cr0/cr4 request a TLB flush only for CR4.SMEP 0->1 (and PGE/PCIDE/PAE
    // changes); the flush in kvm_mmu_load is a direct call, not counted.
    @Test func registerWritesResetTheContextByRole() throws {
        let t = try Trace("""
        map 0x400000 0x1000000 4k P,RW,US,A,D
        access read 0x400000 cpl=3
        set smap=1
        access read 0x400000 cpl=3
        set wp=0
        access read 0x400000 cpl=3
        set wp=1
        access read 0x400000 cpl=3
        set smep=1
        access read 0x400000 cpl=3
        """)
        expectCompleted(t.outcome(1), gpa: 0x100_0000, exits: 0)
        expectCompleted(t.outcome(2), gpa: 0x100_0000, exits: 1)
        expectCompleted(t.outcome(3), gpa: 0x100_0000, exits: 0)
        expectCompleted(t.outcome(4), gpa: 0x100_0000, exits: 0)
        expectCounters(try t.after(1), ["pf_taken": 1, "pf_fixed": 1, "mmu_cache_miss": 4, "pages_4k": 1,
                                        "tlb_flush": 0], "smap=1")
        expectCounters(try t.after(3), ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 8, "pages_4k": 2,
                                        "tlb_flush": 0], "wp=0, wp=1")
        expectCounters(t.delta, ["pf_taken": 2, "pf_fixed": 2, "mmu_cache_miss": 8, "pages_4k": 2, "tlb_flush": 1],
                       "smep=1")
        #expect(t.report.shadowPagesByLevel == [4: 2, 3: 2, 2: 2, 1: 2])
    }
}
