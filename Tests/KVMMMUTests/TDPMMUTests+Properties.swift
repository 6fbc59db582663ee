import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

/// Random memslot layouts and random operations, each followed by the auditor; faults checked
/// against the huge-page rules stated plainly (`HugePageRules`).
@Suite struct TDPMMUPropertyTests {
    static let seeds: [UInt64] = Array(1...30)

    @Test(arguments: seeds)
    func randomLayoutsAndOperationsKeepEveryInvariant(seed: UInt64) throws {
        var random = TDPRandom(seed: seed &* 0x9E37_79B9)
        let configurations: [TDPMMUConfiguration] = [
            .ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46),
            .ept(capabilities: EPTCapabilities(accessedDirty: false), guestMaxPhysicalAddressBits: 46),
            .ept(capabilities: EPTCapabilities(pages1GiB: false), guestMaxPhysicalAddressBits: 46),
            .npt(hostLevels: 4),
            .ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46, pml: true),
        ]
        var configuration = configurations[Int(random.below(UInt64(configurations.count)))]
        configuration.zapAllOnMemslotDeletion = random.chance(1, in: 2)
        let fixture = try TDPFixture(configuration: configuration)
        var rules = HugePageRules(maxHugePageLevel: configuration.maxHugePageLevel, nxHugePages: false)
        var hostMapping: [Int: HostMappingSize] = [:]
        let trace = "seed \(seed), \(configuration.masks.isEPT ? "EPT" : "NPT") A/D \(configuration.masks.accessedDirtyEnabled)"

        // Up to three slots, one per 2 GiB window so they cannot overlap.
        for window in 0..<UInt64(1 + random.below(3)) {
            let windowStart = window * 2 * pages1G
            let big = random.chance(1, in: 3)
            let offset = random.chance(1, in: 2) ? random.below(4) * pages2M : random.below(pages1G / 2)
            let pages = big ? pages1G + random.below(3) * pages2M : 1 + random.below(6 * pages2M)
            let skew: UInt64 = [0, 0, pages2M, random.below(pages1G)][Int(random.below(4))]
            let mapping = HostMappingSize.allCases[Int(random.below(3))]
            let flags: MemslotFlags = random.chance(1, in: 6) ? .readOnly : []
            let slot = try fixture.addSlot(id: Int(window), baseGFN: windowStart + offset, pages: pages, flags: flags,
                                           hostSkew: skew, hostMapping: mapping)
            hostMapping[slot.id] = mapping
        }
        fixture.expectClean("\(trace): layout \(fixture.memory.slots)")

        for step in 0..<80 {
            let slots = fixture.memory.slots
            let slot = slots[Int(random.below(UInt64(slots.count)))]
            let gfn = slot.baseFrame.rawValue + random.below(slot.pageCount)
            let what: String
            switch random.below(20) {
            case 0..<11:
                let kind = AccessKind.allCases[Int(random.below(3))]
                let mmio = random.chance(1, in: 10)
                let target = mmio ? 7 * pages1G + random.below(1024) : gfn
                what = "fault \(kind) at \(hex(target))"
                let fastBefore = fixture.mmu.stats.pfFast
                let result = try fixture.fault(target, kind)
                if mmio {
                    #expect(result == .emulate, "\(trace) step \(step): \(what)")
                    #expect(fixture.mmu.mapping(of: target, in: fixture.root)?.spte.isMMIO(fixture.masks) == true)
                } else if slot.isReadOnly && kind == .write {
                    #expect(result == .emulate, "\(trace) step \(step): \(what)")
                } else if fixture.mmu.stats.pfFast == fastBefore {
                    let expected = rules.expectedLevel(target, kind, slots: slots, hostMapping: hostMapping)
                    #expect(fixture.leafLevel(target) == expected, "\(trace) step \(step): \(what) in \(slot)")
                }
            case 11:
                let start = slot.baseFrame.rawValue + random.below(slot.pageCount)
                let end = min(slot.endFrame.rawValue, start + 1 + random.below(3 * pages2M))
                what = "zap \(hex(start))..<\(hex(end))"
                fixture.mmu.zapGFNRange(start..<end)
                for probe in [start, end - 1, (start + end) / 2] {
                    #expect(fixture.leafLevel(probe) == nil, "\(trace) step \(step): \(what) left \(hex(probe))")
                }
            case 12:
                let target = 1 + Int(random.below(2))
                let start = slot.baseFrame.rawValue + random.below(slot.pageCount)
                let range = start..<min(slot.endFrame.rawValue, start + 1 + random.below(2 * pages2M))
                what = "split \(range) of slot \(slot.id) to level \(target)"
                let translation = fixture.mmu.mapping(of: range.lowerBound, in: fixture.root)
                try fixture.mmu.splitHugePages(slot: slot.id, gfns: range, targetLevel: target)
                if let level = fixture.leafLevel(range.lowerBound) {
                    #expect(level <= target, "\(trace) step \(step): \(what)")
                    #expect(translation?.spte.isShadowPresent == true, "a split maps nothing new")
                }
            case 13:
                what = "write-track \(hex(gfn))"
                if rules.writeTracked.contains(gfn) {
                    try fixture.mmu.removeWriteTrack(gfn)
                    rules.writeTracked.remove(gfn)
                } else {
                    try fixture.mmu.addWriteTrack(gfn)
                    rules.writeTracked.insert(gfn)
                    if let mapping = fixture.mmu.mapping(of: gfn, in: fixture.root), mapping.spte.isShadowPresent {
                        #expect(!mapping.spte.isMMUWritable(fixture.masks), "\(trace) step \(step): \(what)")
                    }
                }
            case 14 where slot.pageCount < pages1G && !slot.isReadOnly:
                let flags: MemslotFlags = slot.logsDirtyPages ? [] : .logDirtyPages
                what = "flags \(flags) on slot \(slot.id)"
                try fixture.mmu.setMemslotFlags(id: slot.id, flags: flags)
            case 15:
                what = "age \(hex(gfn))"
                fixture.mmu.ageGFNRange(gfn..<gfn + pages2M)
            case 16:
                what = "recover huge pages of slot \(slot.id)"
                try fixture.mmu.recoverHugePages(slot: slot.id)
            case 17 where random.chance(1, in: 3):
                what = "zap all fast"
                fixture.mmu.zapAllFast()
                #expect(fixture.mmu.stats.pages4K + fixture.mmu.stats.pages2M + fixture.mmu.stats.pages1G == 0)
            case 18 where slot.logsDirtyPages:
                what = "get dirty log of slot \(slot.id)"
                _ = try fixture.mmu.getDirtyLog(slot: slot.id)
            default:
                what = "hardware read of \(hex(gfn))"
                try fixture.access(gfn, .read)
            }
            fixture.expectClean("\(trace) step \(step): \(what)")
        }
        // Deleting every slot leaves nothing mapped (and nothing leaked once roots are reloaded).
        for slot in fixture.memory.slots { try fixture.mmu.deleteMemslot(id: slot.id) }
        try fixture.reloadRootIfInvalid()
        #expect(fixture.mmu.stats.pages4K + fixture.mmu.stats.pages2M + fixture.mmu.stats.pages1G == 0)
        fixture.expectClean("\(trace): every slot deleted")
    }
}
