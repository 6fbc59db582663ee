import Foundation
import Testing
@testable import KVMMMU

@Suite struct MMUStatsTests {
    /// x86.c's kvm_vm_stats_desc (with KVM_GENERIC_VM_STATS) then the MMU part of
    /// kvm_vcpu_stats_desc, in descriptor order.
    static let kvmOrder = [
        "remote_tlb_flush", "remote_tlb_flush_requests",
        "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss",
        "mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
        "max_mmu_rmap_size", "max_mmu_page_hash_collisions",
        "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created", "pf_guest",
        "tlb_flush", "invlpg", "exits", "mmio_exits", "insn_emulation", "insn_emulation_fail",
        "nested_run", "guest_mode",
    ]

    @Test func namesAreKVMsInKVMsOrder() {
        #expect(MMUStats.counterNames == Self.kvmOrder)
        #expect(Set(MMUStats.counterNames).count == MMUStats.counterNames.count)
    }

    /// Every stored field has exactly one name: set each by name to a distinct value and read the
    /// struct back through reflection.
    @Test func everyFieldHasExactlyOneName() {
        var stats = MMUStats()
        for (i, name) in MMUStats.counterNames.enumerated() {
            stats[kvmName: name] = UInt64(100 + i)
        }
        let stored = Mirror(reflecting: stats).children.compactMap { $0.value as? UInt64 }
        #expect(stored.count == MMUStats.counterNames.count)
        #expect(stored.sorted() == (0..<MMUStats.counterNames.count).map { UInt64(100 + $0) })
        #expect(stats.values.map(\.value) == (0..<MMUStats.counterNames.count).map { UInt64(100 + $0) })
        #expect(stats.values.map(\.name) == Self.kvmOrder)
        #expect(stats[kvmName: "pf_fixed"] == 116)
        #expect(stats.pfFixed == 116)
        #expect(stats[kvmName: "lpages"] == nil && stats[kvmName: "no_such_stat"] == nil)
    }

    @Test func kinds() {
        #expect(MMUStats.kind(ofKVMName: "pf_taken") == .cumulative)
        #expect(MMUStats.kind(ofKVMName: "pages_2m") == .instant)
        #expect(MMUStats.kind(ofKVMName: "mmu_unsync") == .instant)
        #expect(MMUStats.kind(ofKVMName: "max_mmu_rmap_size") == .peak)
        #expect(MMUStats.kind(ofKVMName: "nope") == nil)
    }

    @Test func deltaSubtractsCountersAndKeepsLevelsAndPeaks() {
        var before = MMUStats()
        before.pfTaken = 10
        before.mmuCacheMiss = 3
        before.pages4K = 50
        before.maxMMURmapSize = 7
        var after = before
        after.pfTaken = 25
        after.mmuCacheMiss = 3
        after.pages4K = 40
        after.maxMMURmapSize = 9
        after.remoteTLBFlush = 2
        let delta = after.delta(from: before)
        #expect(delta.pfTaken == 15 && delta.mmuCacheMiss == 0 && delta.remoteTLBFlush == 2)
        #expect(delta.pages4K == 40, "instant counters keep the later value")
        #expect(delta.maxMMURmapSize == 9, "peak counters keep the later value")
        #expect(before.delta(from: after).pfTaken == 0, "a counter that went backwards gives 0")
        #expect(after.delta(from: MMUStats()) == after)
    }

    @Test func jsonObjectIsKVMNamesInOrder() throws {
        var stats = MMUStats()
        stats.pfFixed = 3
        stats.maxMMUPageHashCollisions = 12
        let json = stats.jsonObject
        #expect(json.hasPrefix("{\"remote_tlb_flush\":0,\"remote_tlb_flush_requests\":0,\"mmu_shadow_zapped\":0,"))
        #expect(json.contains("\"max_mmu_page_hash_collisions\":12,\"pf_taken\":0,\"pf_fixed\":3,"))
        #expect(json.hasSuffix("\"insn_emulation_fail\":0,\"nested_run\":0,\"guest_mode\":0}"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Int])
        #expect(object.count == MMUStats.counterNames.count)
        #expect(object["pf_fixed"] == 3)
    }

    @Test func pageStatsAndPeaks() {
        var stats = MMUStats()
        stats.updatePageStats(level: 1, delta: 512)
        stats.updatePageStats(level: 2, delta: 3)
        stats.updatePageStats(level: 3, delta: 1)
        stats.updatePageStats(level: 1, delta: -12)
        #expect(stats.pages4K == 500 && stats.pages2M == 3 && stats.pages1G == 1 && stats.lpages == 4)
        stats.recordPeak(\.maxMMURmapSize, 5)
        stats.recordPeak(\.maxMMURmapSize, 2)
        #expect(stats.maxMMURmapSize == 5)
        #expect(stats.description.hasPrefix("pages_4k=500 pages_2m=3 pages_1g=1 max_mmu_rmap_size=5"))
        #expect(MMUStats().description == "(all zero)")
    }
}
