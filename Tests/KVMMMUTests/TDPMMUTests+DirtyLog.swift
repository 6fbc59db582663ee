import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

/// Dirty logging with the TDP MMU: every written gfn is reported, in every dirty-logging mode.
@Suite struct TDPMMUDirtyLogTests {
    struct Mode: CustomTestStringConvertible, Sendable {
        var name: String
        var configuration: TDPMMUConfiguration
        var testDescription: String { name }
    }

    static let modes: [Mode] = {
        let ept = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        var pml = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46, pml: true)
        var noAD = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(accessedDirty: false), guestMaxPhysicalAddressBits: 46)
        var noEagerSplit = ept
        noEagerSplit.eagerPageSplit = false
        var manual = pml
        manual.dirtyLogProtection = .manual
        var initiallySet = ept
        initiallySet.dirtyLogProtection = .manualInitiallySet
        var initiallySetNoSplit = pml
        initiallySetNoSplit.dirtyLogProtection = .manualInitiallySet
        initiallySetNoSplit.eagerPageSplit = false
        noAD.dirtyLogProtection = .automatic
        pml.eagerPageSplit = true
        return [
            Mode(name: "write-protect", configuration: ept),
            Mode(name: "PML", configuration: pml),
            Mode(name: "no A/D bits", configuration: noAD),
            Mode(name: "no eager split", configuration: noEagerSplit),
            Mode(name: "manual protect, PML", configuration: manual),
            Mode(name: "initially set", configuration: initiallySet),
            Mode(name: "initially set, PML, no eager split", configuration: initiallySetNoSplit),
            Mode(name: "NPT", configuration: .npt(hostLevels: 4)),
        ]
    }()

    /// Rounds of random writes and reads, each ended by harvesting the log (GET, or GET + CLEAR with
    /// manual protection): the bitmap holds every gfn written in the round, and nothing but those
    /// and gfns a read found unmapped (KVM maps them writable and logs them).
    @Test(arguments: modes)
    func everyWrittenGFNIsReported(mode: Mode) throws {
        let fixture = try TDPFixture(configuration: mode.configuration)
        let slot = try fixture.addSlot(id: 0, baseGFN: 6 * pages2M, pages: 3 * pages2M + 77)
        var random = TDPRandom(seed: 42)
        // Huge mappings over part of the slot before logging starts.
        for gfn in stride(from: slot.baseFrame.rawValue, to: slot.endFrame.rawValue, by: 301) where random.chance(2, in: 3) {
            try fixture.access(gfn, .write)
        }
        #expect(fixture.mmu.stats.pages2M > 0)
        try fixture.mmu.setMemslotFlags(id: 0, flags: .logDirtyPages)
        fixture.expectClean("\(mode.name): logging on")
        let manual = mode.configuration.dirtyLogProtection != .automatic
        var firstRound = mode.configuration.dirtyLogProtection == .manualInitiallySet
        for round in 0..<6 {
            var written = Set<UInt64>()
            var mappedByReads = Set<UInt64>()
            for _ in 0..<60 {
                let gfn = slot.baseFrame.rawValue + random.below(slot.pageCount)
                if random.chance(2, in: 3) {
                    try fixture.access(gfn, .write)
                    written.insert(gfn)
                } else {
                    if fixture.leafLevel(gfn) == nil { mappedByReads.insert(gfn) }
                    try fixture.access(gfn, .read)
                }
            }
            fixture.expectClean("\(mode.name) round \(round): writes")
            let bitmap = try fixture.mmu.getDirtyLog(slot: 0)
            if manual { try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap) }
            let reported = Set((0..<slot.pageCount).filter { bitmap[Int($0 / 64)] & (1 << ($0 % 64)) != 0 }
                .map { $0 + slot.baseFrame.rawValue })
            if firstRound {
                #expect(reported.count == Int(slot.pageCount), "\(mode.name): initially set")
                firstRound = false
            } else {
                #expect(written.isSubset(of: reported), "\(mode.name) round \(round): unreported \(written.subtracting(reported).sorted().prefix(4))")
                #expect(reported.isSubset(of: written.union(mappedByReads)),
                        "\(mode.name) round \(round): reported unwritten \(reported.subtracting(written.union(mappedByReads)).sorted().prefix(4))")
            }
            fixture.expectClean("\(mode.name) round \(round): harvested")
            // Nothing written since: the next harvest is empty.
            let again = try fixture.mmu.getDirtyLog(slot: 0)
            #expect(again.allSatisfy { $0 == 0 }, "\(mode.name) round \(round): clean log after a harvest")
        }
        // While logging, nothing in the slot is mapped huge (huge leaves left from before are
        // write-protected: written pages were split out of them).
        #expect(fixture.mmu.stats.pages4K > 0)
        // Logging off: huge pages come back on the next faults.
        try fixture.mmu.setMemslotFlags(id: 0, flags: [])
        fixture.expectClean("\(mode.name): logging off")
        try fixture.fault(slot.baseFrame.rawValue + 5, .read)
        #expect(fixture.leafLevel(slot.baseFrame.rawValue + 5) == 2, "\(mode.name): huge page recovered")
        fixture.expectClean("\(mode.name): recovered")
    }

    @Test func enablingLoggingWithEagerSplittingLeavesNoHugeLeafAndFlushes() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: pages1G)
        try fixture.access(5, .write)
        #expect(fixture.mmu.stats.pages1G == 1)
        let flushes = fixture.flushes
        try fixture.mmu.setMemslotFlags(id: 0, flags: .logDirtyPages)
        #expect(fixture.mmu.stats.pages1G == 0 && fixture.mmu.stats.pages2M == 0 && fixture.mmu.stats.pages4K == pages1G)
        #expect(fixture.flushes == flushes + 1, "splitting needs no flush; write protection one")
        let spte = try #require(fixture.mmu.mapping(of: 77, in: fixture.root)).spte
        #expect(!spte.isWritable && spte.isMMUWritable(fixture.masks))
        // The fast path makes it writable again and logs the gfn.
        try fixture.access(77, .write)
        #expect(fixture.mmu.stats.pfFast == 1 && fixture.memory.isDirty(GuestFrameNumber(77)))
        fixture.expectClean("eager split")
    }

    @Test func pmlClearsDirtyBitsAndWriteProtectsOnlyHugeLeaves() throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46, pml: true)
        configuration.eagerPageSplit = false
        let fixture = try TDPFixture(configuration: configuration)
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        try fixture.access(3, .write)
        try fixture.mmu.addWriteTrack(pages2M + 1)
        try fixture.mmu.removeWriteTrack(pages2M + 1)
        try fixture.mmu.updateGFNDisallowLpageCount(pages2M + 1, delta: 1)
        try fixture.access(pages2M + 9, .write)
        #expect(fixture.leafLevel(3) == 2 && fixture.leafLevel(pages2M + 9) == 1)
        try fixture.mmu.setMemslotFlags(id: 0, flags: .logDirtyPages)
        let huge = try #require(fixture.mmu.mapping(of: 3, in: fixture.root)).spte
        let small = try #require(fixture.mmu.mapping(of: pages2M + 9, in: fixture.root)).spte
        #expect(!huge.isWritable && huge.isMMUWritable(fixture.masks))
        #expect(small.isWritable && !small.isDirty(fixture.masks))
        // A write through the small leaf sets D without a fault; the hardware logs it (PML).
        let taken = fixture.mmu.stats.pfTaken
        try fixture.access(pages2M + 9, .write)
        #expect(fixture.mmu.stats.pfTaken == taken && fixture.memory.isDirty(GuestFrameNumber(pages2M + 9)))
        // A write through the huge leaf faults; the fast path must not make it writable: it splits.
        try fixture.access(4, .write)
        #expect(fixture.leafLevel(4) == 1 && fixture.memory.isDirty(GuestFrameNumber(4)))
        fixture.expectClean("PML")
        #expect(throws: TDPMMUError.self) { try fixture.mmu.updateGFNDisallowLpageCount(pages2M + 1, delta: -2) }
        #expect(throws: TDPMMUError.invalidDirtyLogRange(slot: 0, firstPage: 1000, pages: 64)) {
            try fixture.mmu.clearDirtyMasked(slot: 0, gfnOffset: 1000, mask: 1 << 63)
        }
        #expect(throws: TDPMMUError.self) { try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: [1]) }
    }

    @Test func clearDirtyLogRefusesRangesKVMRefuses() throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.dirtyLogProtection = .manual
        let fixture = try TDPFixture(configuration: configuration)
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 100, flags: .logDirtyPages)
        #expect(throws: TDPMMUError.invalidDirtyLogRange(slot: 0, firstPage: 3, pages: 64)) {
            try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 3, bitmap: [1])
        }
        #expect(throws: TDPMMUError.invalidDirtyLogRange(slot: 0, firstPage: 0, pages: 192)) {
            try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: [1, 1, 1])
        }
        // The last word may run past the slot's end.
        try fixture.mmu.clearDirtyLog(slot: 0, firstPage: 64, bitmap: [~0])
        #expect(throws: TDPMMUError.noSuchMemslot(9)) { _ = try fixture.mmu.getDirtyLog(slot: 9) }
        try fixture.mmu.setMemslotFlags(id: 0, flags: [])
        #expect(throws: TDPMMUError.memslot(.dirtyLoggingDisabled(id: 0))) { _ = try fixture.mmu.getDirtyLog(slot: 0) }
    }
}
