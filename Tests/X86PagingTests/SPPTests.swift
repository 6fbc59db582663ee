// The SPP format and the processor's check (SPPTable.swift) against a plain restatement of the rules
// written here, byte by byte and bit by bit, with nothing shared with the code under test.

import GuestMemory
import Testing
import X86Paging

// MARK: The plain rules

/// A write is allowed when every byte it writes lies in a writable sub-page.
private func plainPermits(_ mask: UInt32, offset: Int, count: Int) -> Bool {
    var byte = offset
    while byte < offset + count {
        let subPage = byte / 128
        if (mask >> UInt32(subPage)) & 1 == 0 { return false }
        byte += 1
    }
    return true
}

/// The first byte of the write that lies in a protected sub-page, as a sub-page index.
private func plainFirstDenied(_ mask: UInt32, offset: Int, count: Int) -> Int? {
    for byte in offset..<offset + count where (mask >> UInt32(byte / 128)) & 1 == 0 { return byte / 128 }
    return nil
}

/// The L1E of a bitmap, built with arithmetic rather than shifts: sub-page i's bit is worth 4^i.
private func plainL1E(_ mask: UInt32) -> UInt64 {
    var entry: UInt64 = 0
    var weight: UInt64 = 1
    var rest = mask
    for _ in 0..<32 {
        if rest % 2 == 1 { entry += weight }
        rest /= 2
        weight = weight &* 4
    }
    return entry
}

private let edgeMasks: [UInt32] = [0, 0xFFFF_FFFF, 0x5555_5555, 0xAAAA_AAAA, 0x0000_FFFF, 0xFFFF_0000, 1, 0x8000_0000,
                                   0x7FFF_FFFF, 0xFFFF_FFFE, 0x0F0F_0F0F, 0x8000_0001]

private func randomMasks(_ count: Int, seed: UInt64) -> [UInt32] {
    var rng = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt32(truncatingIfNeeded: rng.next()) }
}

// MARK: Sub-page geometry and the write check

@Suite("SPP write check")
struct SubPageWriteCheckTests {
    @Test func geometry() {
        #expect(SubPageWriteMask.subPageSize == 128)
        #expect(SubPageWriteMask.subPagesPerPage * Int(SubPageWriteMask.subPageSize) == 4096)
        for offset in stride(from: 0, to: 4096, by: 1) {
            #expect(SubPageWriteMask.subPage(containing: UInt64(offset)) == offset / 128)
        }
        #expect(!SubPageWriteMask.allWritable.isWritable(subPage: 32))
        #expect(!SubPageWriteMask.allWritable.isWritable(subPage: -1))
    }

    /// For each sub-page i, a bitmap with only i writable and one with only i protected; one-byte
    /// writes at both edges of every sub-page j.
    @Test func everySubPageAndBothEdges() throws {
        for i in 0..<32 {
            let onlyI = SubPageWriteMask(1 << UInt32(i))
            let allButI = SubPageWriteMask(~(1 << UInt32(i)))
            for j in 0..<32 {
                for edge in [UInt64(j * 128), UInt64(j * 128 + 127)] {
                    #expect(try onlyI.permitsWrite(atPageOffset: edge, byteCount: 1) == (i == j), "i \(i) offset \(edge)")
                    #expect(try allButI.permitsWrite(atPageOffset: edge, byteCount: 1) == (i != j), "i \(i) offset \(edge)")
                    #expect(try allButI.firstDeniedSubPage(forWriteAt: edge, byteCount: 1) == (i == j ? i : nil))
                }
            }
            #expect(onlyI.isWritable(subPage: i) && !allButI.isWritable(subPage: i))
        }
    }

    /// A write across a 128-byte boundary needs both sides, whichever one is protected.
    @Test func crossingWritesNeedEverySubPage() throws {
        for boundary in 1..<32 {
            let offset = UInt64(boundary * 128 - 4)
            let left = SubPageWriteMask(~(1 << UInt32(boundary - 1)))
            let right = SubPageWriteMask(~(1 << UInt32(boundary)))
            #expect(try !left.permitsWrite(atPageOffset: offset, byteCount: 8))
            #expect(try !right.permitsWrite(atPageOffset: offset, byteCount: 8))
            #expect(try left.firstDeniedSubPage(forWriteAt: offset, byteCount: 8) == boundary - 1)
            #expect(try right.firstDeniedSubPage(forWriteAt: offset, byteCount: 8) == boundary)
            // Stopping one byte short of the boundary touches only the left sub-page.
            #expect(try right.permitsWrite(atPageOffset: offset, byteCount: 4))
            #expect(try !right.permitsWrite(atPageOffset: offset, byteCount: 5))
        }
        // A write spanning three sub-pages is refused for the middle one alone.
        let middle = SubPageWriteMask(~(1 << 5))
        #expect(try middle.firstDeniedSubPage(forWriteAt: 4 * 128 + 100, byteCount: 200) == 5)
        #expect(try SubPageWriteMask.subPagesTouched(byWriteAt: 4 * 128 + 100, byteCount: 200).rawValue == 0b111 << 4)
    }

    /// Sizes 1, 2, 4 and 8 at every page offset they fit, under edge and random bitmaps.
    @Test func smallWritesAtEveryOffset() throws {
        var checked = 0
        for mask in edgeMasks + randomMasks(24, seed: 0x5BB) {
            let bitmap = SubPageWriteMask(mask)
            for size in [1, 2, 4, 8] {
                for offset in 0...(4096 - size) {
                    let got = try bitmap.permitsWrite(atPageOffset: UInt64(offset), byteCount: UInt64(size))
                    if got != plainPermits(mask, offset: offset, count: size) {
                        Issue.record("mask \(hex(mask)) offset \(offset) size \(size): \(got)")
                    }
                    checked += 1
                }
            }
        }
        #expect(checked > 400_000)
    }

    /// Larger and odd sizes at offsets around every sub-page edge and at random offsets.
    @Test func largerWritesAgainstThePlainRule() throws {
        var rng = SplitMix64(seed: 0xC0FFEE)
        let sizes = [3, 5, 7, 15, 16, 17, 64, 100, 127, 128, 129, 255, 256, 257, 1000, 2048, 4095, 4096]
        for mask in edgeMasks + randomMasks(24, seed: 0x7A) {
            let bitmap = SubPageWriteMask(mask)
            for size in sizes {
                var offsets = Set<Int>()
                for subPage in 0..<32 { offsets.formUnion([subPage * 128, subPage * 128 + 1, subPage * 128 + 127]) }
                for _ in 0..<16 { offsets.insert(rng.below(4096)) }
                for offset in offsets where offset + size <= 4096 {
                    let got = try bitmap.firstDeniedSubPage(forWriteAt: UInt64(offset), byteCount: UInt64(size))
                    #expect(got == plainFirstDenied(mask, offset: offset, count: size),
                            "mask \(hex(mask)) offset \(offset) size \(size)")
                }
            }
        }
    }

    @Test func badWritesAreErrorsNotCrashes() throws {
        let mask = SubPageWriteMask.allWritable
        #expect(throws: SubPageWriteError.offsetOutsidePage(4096)) { try mask.permitsWrite(atPageOffset: 4096, byteCount: 1) }
        #expect(throws: SubPageWriteError.crossesPageBoundary(pageOffset: 4090, byteCount: 8)) {
            try mask.permitsWrite(atPageOffset: 4090, byteCount: 8)
        }
        #expect(throws: SubPageWriteError.crossesPageBoundary(pageOffset: 0, byteCount: .max)) {
            try mask.permitsWrite(atPageOffset: 0, byteCount: .max)
        }
        // Nothing written, nothing refused, even with every sub-page protected.
        #expect(try SubPageWriteMask.noneWritable.permitsWrite(atPageOffset: 17, byteCount: 0))
        #expect(try SubPageWriteMask.noneWritable.permitsWrite(atPageOffset: 4095, byteCount: 1) == false)
    }

    @Test func pageSplitWrites() throws {
        let write = try PageSplitWrite(address: GuestPhysicalAddress(0x1FFC), byteCount: 8)
        #expect(Array(write) == [
            PageWritePiece(frame: GuestFrameNumber(1), pageOffset: 0xFFC, byteCount: 4),
            PageWritePiece(frame: GuestFrameNumber(2), pageOffset: 0, byteCount: 4),
        ])
        let long = try PageSplitWrite(address: GuestPhysicalAddress(0x10_0800), byteCount: 3 * 4096)
        #expect(long.map(\.byteCount) == [0x800, 0x1000, 0x1000, 0x800])
        #expect(long.map(\.address.rawValue) == [0x10_0800, 0x10_1000, 0x10_2000, 0x10_3000])
        #expect(Array(try PageSplitWrite(address: GuestPhysicalAddress(0x5000), byteCount: 0)).isEmpty)
        #expect(throws: SubPageWriteError.addressOverflow(GuestPhysicalAddress(.max - 1), byteCount: 4)) {
            try PageSplitWrite(address: GuestPhysicalAddress(.max - 1), byteCount: 4)
        }
    }
}

// MARK: The bitmap <-> L1E conversion

@Suite("SPP L1E conversion")
struct SPPLeafConversionTests {
    @Test func spreadingMatchesThePlainRule() {
        for mask in edgeMasks + randomMasks(4096, seed: 0x1E) {
            let entry = SPPLeafEntry(spreading: SubPageWriteMask(mask))
            #expect(entry.rawValue == plainL1E(mask), "\(hex(mask))")
            #expect(!entry.hasReservedBits)
            #expect(entry.gatheredWriteMask.rawValue == mask)
        }
        #expect(SPPLeafEntry(spreading: .allWritable).rawValue == SPPLeafEntry.writePermissionBits)
        #expect(SPPLeafEntry(spreading: .noneWritable).rawValue == 0)
        for subPage in 0..<32 {
            let entry = SPPLeafEntry(spreading: SubPageWriteMask(1 << UInt32(subPage)))
            #expect(entry.rawValue == 1 << UInt64(2 * subPage))
            #expect(entry.allowsWrite(subPage: subPage) && entry.gatheredWriteMask.isWritable(subPage: subPage))
        }
    }

    /// Gathering reads only the even bits; spreading the result gives back exactly those bits.
    @Test func gatheringRoundTrip() {
        var rng = SplitMix64(seed: 0x9A7)
        for _ in 0..<4096 {
            let raw = rng.next()
            let entry = SPPLeafEntry(rawValue: raw)
            #expect(SPPLeafEntry(spreading: entry.gatheredWriteMask).rawValue == raw & SPPLeafEntry.writePermissionBits)
            #expect(entry.hasReservedBits == (raw & 0xAAAA_AAAA_AAAA_AAAA != 0))
        }
        #expect(SPPLeafEntry(rawValue: SPPLeafEntry.reservedBits).gatheredWriteMask == .noneWritable)
    }
}

// MARK: The SPP-table walk

/// An SPP table built by hand in guest memory (standing in for host memory): root at 0x1000, and
/// for `address` one table per level below it.
private struct HandBuiltTable {
    let memory: GuestPhysicalMemory
    let address: UInt64
    /// Where the entry of each level for `address` lives (index 0 unused, 1 = the L1E).
    var entryAddress: [UInt64] = [0, 0, 0, 0, 0]

    init(address: UInt64, mask: UInt32) throws {
        memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: 1 << 20)
        self.address = address
        var table: UInt64 = 0x1000
        for level in stride(from: 4, through: 1, by: -1) {
            let index = (address >> UInt64(12 + 9 * (level - 1))) & 511
            entryAddress[level] = table + index * 8
            if level == 1 {
                try memory.store64(plainL1E(mask), at: GuestPhysicalAddress(entryAddress[level]))
            } else {
                let next = UInt64(0x1000 * (6 - level))  // 0x2000, 0x3000, 0x4000
                try memory.store64(next | 1, at: GuestPhysicalAddress(entryAddress[level]))
                table = next
            }
        }
    }

    func set(level: Int, _ value: UInt64) throws { try memory.store64(value, at: GuestPhysicalAddress(entryAddress[level])) }
    func entry(level: Int) throws -> UInt64 { try memory.load64(GuestPhysicalAddress(entryAddress[level])) }

    var walker: SPPTWalker { get throws { try SPPTWalker(pointer: SPPTablePointer(0x1000), maxPhysicalAddressBits: 40) } }

    /// The walk's outcome for `address` over `memory` (this table's by default).
    func lookUp(_ address: UInt64, in memory: (any PhysicalMemory)? = nil) throws -> Result<SPPTLookup, SPPTWalkFault> {
        let walker = try self.walker
        do {
            if let memory { return .success(try walker.lookUp(GuestPhysicalAddress(address), in: memory)) }
            return .success(try walker.lookUp(GuestPhysicalAddress(address), in: self.memory))
        } catch {
            return .failure(error)
        }
    }
}

/// Memory that counts the pages asked for, to show a walk that reads nothing.
private final class CountingMemory: PhysicalMemory {
    let inner: GuestPhysicalMemory
    var lookups = 0
    init(_ inner: GuestPhysicalMemory) { self.inner = inner }
    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        lookups += 1
        return inner.hostPage(frame)
    }
}

@Suite("SPP table walk")
struct SPPTableWalkTests {
    static let address: UInt64 = 0x12_3456_7000 | 0x345

    @Test func walkFindsTheBitmap() throws {
        let table = try HandBuiltTable(address: Self.address, mask: 0xDEAD_BEEF)
        let lookup = try table.lookUp(Self.address).get()
        #expect(lookup.writeMask == SubPageWriteMask(0xDEAD_BEEF))
        #expect(lookup.path.levels == [4, 3, 2, 1])
        for level in 1...4 {
            #expect(lookup.path.entryAddress(level: level).rawValue == table.entryAddress[level])
        }
        // The other 511 L1Es of the table are zero: every sub-page of those pages protected.
        #expect(try table.lookUp(Self.address + 0x1000).get().writeMask == .noneWritable)
    }

    @Test func missAtEachNonLeafLevel() throws {
        for level in 2...4 {
            let table = try HandBuiltTable(address: Self.address, mask: 0xFFFF_FFFF)
            // Not present, with every other bit set: a clear present bit makes the rest ignored.
            try table.set(level: level, ~UInt64(1))
            let outcome = try table.lookUp(Self.address)
            guard case .failure(let fault) = outcome, case .miss(_, let faultLevel, let path) = fault else {
                Issue.record("level \(level): \(outcome)")
                continue
            }
            #expect(faultLevel == level)
            #expect(path.bottomLevel == level)
            #expect(fault.exitQualification == .sppTableMiss)
        }
    }

    @Test func misconfigurationForEveryReservedBitOfEachLevel() throws {
        let maxPhysicalAddressBits = 40
        var cases = 0
        for level in 2...4 {
            for bit in Array(1...11) + Array(maxPhysicalAddressBits...63) {
                let table = try HandBuiltTable(address: Self.address, mask: 0xFFFF_FFFF)
                try table.set(level: level, try table.entry(level: level) | 1 << UInt64(bit))
                let outcome = try table.lookUp(Self.address)
                guard case .failure(let fault) = outcome, case .misconfiguration(_, let faultLevel, _) = fault else {
                    Issue.record("level \(level) bit \(bit): \(outcome)")
                    continue
                }
                #expect(faultLevel == level, "bit \(bit)")
                #expect(fault.exitQualification == [])
                cases += 1
            }
        }
        for subPage in 0..<32 {
            let table = try HandBuiltTable(address: Self.address, mask: 0xFFFF_FFFF)
            try table.set(level: 1, try table.entry(level: 1) | 1 << UInt64(2 * subPage + 1))
            let outcome = try table.lookUp(Self.address)
            guard case .failure(.misconfiguration(_, 1, let path)) = outcome else {
                Issue.record("L1E bit \(2 * subPage + 1): \(outcome)")
                continue
            }
            #expect(path.bottomLevel == 1)
            cases += 1
        }
        #expect(cases == 3 * (11 + 24) + 32)
        // Address bits below MAXPHYADDR are not reserved.
        #expect(SPPDirectoryEntry.reservedBits(maxPhysicalAddressBits: maxPhysicalAddressBits) & bitRange(12, 39) == 0)
        #expect(try table(Self.address).lookUp(Self.address).get().writeMask == .allWritable)
    }

    private func table(_ address: UInt64) throws -> HandBuiltTable { try HandBuiltTable(address: address, mask: 0xFFFF_FFFF) }

    @Test func tablesOutsideMemory() throws {
        let table = try HandBuiltTable(address: Self.address, mask: 0)
        try table.set(level: 3, 0x7_0000_0000 | 1)
        let entry = 0x7_0000_0000 + ((Self.address >> 21) & 511) * 8
        #expect(try table.lookUp(Self.address)
                == .failure(.noMemory(GuestPhysicalAddress(Self.address), entryAddress: entry, level: 2)))
    }

    @Test func pointerValidation() {
        #expect(throws: SPPTablePointerError.misaligned(0x1008)) { try SPPTWalker(pointer: SPPTablePointer(0x1008)) }
        #expect(throws: SPPTablePointerError.beyondPhysicalAddressWidth(1 << 46, maxPhysicalAddressBits: 46)) {
            try SPPTWalker(pointer: SPPTablePointer(1 << 46), maxPhysicalAddressBits: 46)
        }
        #expect(throws: Never.self) { try SPPTWalker(pointer: SPPTablePointer(1 << 46), maxPhysicalAddressBits: 52) }
    }

    /// The decision for 5-level EPT: the table keeps four levels, indexed by bits 47:12; an
    /// address at or above 2^48 has no L1E and the walk reads nothing rather than alias it.
    @Test func fiveLevelEPTAddressesBeyondTheTable() throws {
        #expect(SPPTWalker.levels == 4 && SPPTWalker.reachableAddressBits == 48)
        let top = (UInt64(1) << 48) - 0x1000
        let table = try HandBuiltTable(address: top, mask: 0x1234_5678)
        #expect(try table.lookUp(top).get().writeMask == SubPageWriteMask(0x1234_5678))
        let counting = CountingMemory(table.memory)
        for address in [UInt64(1) << 48, (UInt64(1) << 48) | top, (UInt64(1) << 52) - 1] {
            #expect(try table.lookUp(address, in: counting) == .failure(.beyondReach(GuestPhysicalAddress(address))))
        }
        #expect(counting.lookups == 0)
    }
}

// MARK: SPP in an EPT walk

@Suite("SPP with EPT leaves")
struct SPPWithEPTTests {
    static let rwx: UInt64 = 0b111, readExec: UInt64 = 0b101, wb: UInt64 = 6 << 3

    @Test func whenTheLeafConsultsTheTable() {
        let armed = EPTEntry(rawValue: Self.readExec | Self.wb | EPTEntry.subPagePermissionBit)
        #expect(armed.consultsSubPagePermissions(level: 1))
        #expect(!armed.consultsSubPagePermissions(level: 2) && !armed.consultsSubPagePermissions(level: 3))
        #expect(!EPTEntry(rawValue: armed.rawValue | 2).consultsSubPagePermissions(level: 1))
        #expect(!EPTEntry(rawValue: Self.readExec | Self.wb).consultsSubPagePermissions(level: 1))
    }

    @Test func checkWriteVerdicts() throws {
        let address = SPPTableWalkTests.address & ~0xFFF
        let table = try HandBuiltTable(address: address, mask: ~(1 << 3))
        let walker = try table.walker
        let armed = EPTEntry(rawValue: Self.readExec | Self.wb | EPTEntry.subPagePermissionBit)
        func check(_ offset: UInt64, _ size: UInt64, _ leaf: EPTEntry = armed, level: Int = 1) throws -> SubPageWriteVerdict {
            try walker.checkWrite(at: GuestPhysicalAddress(address + offset), byteCount: size, leaf: leaf, level: level,
                                  in: table.memory)
        }
        #expect(try check(0, 8) == .permitted)
        #expect(try check(3 * 128 + 5, 1) == .denied(subPage: 3))
        #expect(try check(2 * 128 + 124, 8) == .denied(subPage: 3))
        #expect(try check(3 * 128 - 8, 8) == .permitted)
        #expect(try check(3 * 128 + 5, 1, EPTEntry(rawValue: armed.rawValue | 2)) == .notApplicable)
        #expect(try check(3 * 128 + 5, 1, level: 2) == .notApplicable)
        try table.set(level: 2, 0)
        let verdict = try check(0, 8)
        guard case .tableFault(.miss(_, 2, _)) = verdict else {
            Issue.record("a missing L2E gave \(verdict)")
            return
        }
        #expect(throws: SubPageWriteError.crossesPageBoundary(pageOffset: 0xFFC, byteCount: 8)) { try check(0xFFC, 8) }
    }

    /// A 5-level EPT maps a page above 2^48 with an armed 4 KiB leaf; the SPP check cannot reach
    /// it and says so (KVM never arms such a leaf: docs/SPP.md).
    @Test func fiveLevelEPTLeafAboveTheTable() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: 16 << 20)
        let builder = try PageTableBuilder(memory: memory, format: .ept(levels: 5), tableArea: GuestPhysicalAddress(0x10_0000))
        let high: UInt64 = (1 << 50) | 0x7000
        try builder.map(high, to: 0x20_0000, leafFlags: Self.readExec | Self.wb | EPTEntry.subPagePermissionBit)
        let ept = try EPTWalker(pointer: EPTPointer(root: builder.root.rawValue, levels: 5, accessedDirty: false))
        let fault: EPTWalkFault
        do {
            _ = try ept.walk(GuestPhysicalAddress(high), .write, in: memory)
            Issue.record("an armed leaf without W let a write through")
            return
        } catch {
            fault = error
        }
        guard case .violation(_, _, let level, let path) = fault else { Issue.record("\(fault)"); return }
        let leaf = EPTEntry(rawValue: path.entryValue(level: level))
        #expect(level == 1 && leaf.consultsSubPagePermissions(level: level))
        let spp = try SPPTWalker(pointer: SPPTablePointer(0x80_0000))
        #expect(try spp.checkWrite(at: GuestPhysicalAddress(high), byteCount: 4, leaf: leaf, level: level, in: memory)
                == .tableFault(.beyondReach(GuestPhysicalAddress(high))))
    }
}
