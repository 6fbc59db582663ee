import Foundation
import GuestMemory
import Testing
import X86Paging

private func gpa(_ value: UInt64) -> GuestPhysicalAddress { GuestPhysicalAddress(value) }
private func gfn(_ value: UInt64) -> GuestFrameNumber { GuestFrameNumber(value) }

/// A memslot set over a fresh pool of `poolPages` pages.
private func makeSet(poolPages: Int = 4096) throws -> MemslotSet {
    MemslotSet(pool: try HostPagePool(capacityPages: poolPages))
}

/// The error `addSlot` throws, or nil.
private func addError(_ set: MemslotSet, id: Int, base: UInt64, size: UInt64, flags: MemslotFlags = []) -> MemslotError? {
    caught { () throws(MemslotError) in try set.addSlot(id: id, base: gpa(base), size: size, flags: flags) }
}

private func accessError(_ body: () throws(GuestAccessError) -> Void) -> GuestAccessError? { caught(body) }

/// 32 GiB: the first frame the radix tree (not the flat table) looks up.
private let radixBase: UInt64 = 32 << 30

@Suite("Memslots")
struct MemslotTests {
    // MARK: Layout

    @Test func addedSlotIsZeroedWritableAndBackedByPoolFrames() throws {
        let set = try makeSet()
        #expect(set.generation == 0 && set.totalPages == 0 && set.slots.isEmpty)
        let slot = try set.addSlot(id: 3, base: gpa(0x10_0000), size: 16 * pageSize)
        #expect(slot.id == 3 && slot.baseFrame == gfn(0x100) && slot.pageCount == 16 && slot.flags == [])
        #expect(slot.baseAddress == gpa(0x10_0000) && slot.size == 0x1_0000 && slot.endFrame == gfn(0x110))
        #expect(slot.hostBase == set.pool.firstFrame)
        #expect(set.generation == 1 && set.totalPages == 16 && set.pool.allocatedPages == 16)
        #expect(set.slots == [slot] && set.slot(id: 3) == slot && set.slot(id: 4) == nil)
        for page in UInt64(0)..<16 {
            let frame = gfn(0x100 + page)
            let host = HostFrameNumber(slot.hostBase.rawValue + page)
            #expect(set.slot(containing: frame) == slot)
            #expect(slot.contains(frame) && slot.hostFrame(for: frame) == host)
            #expect(set.hostFrame(of: frame) == host)
            let page = try #require(set.hostPage(frame))
            #expect(page.isWritable && page.bytes == set.pool.pointer(host))
            #expect(!set.isMMIO(frame))
        }
        #expect(try set.read(gpa(0x10_0000), count: 0x1_0000).allSatisfy { $0 == 0 })
        for outside in [gfn(0xFF), gfn(0x110), gfn(0)] {
            #expect(set.isMMIO(outside) && set.hostPage(outside) == nil && set.hostFrame(of: outside) == nil)
            #expect(set.slot(containing: outside) == nil && !slot.contains(outside) && slot.hostFrame(for: outside) == nil)
        }
        #expect(slot.description == "slot 3: 0x100000+0x10000 -> pfn 0x100000 []")
    }

    @Test func kvmSetUserMemoryRegionRules() throws {
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0x10000), size: 0x4000)  // frames 0x10..<0x14
        let existing = try #require(set.slot(id: 0))
        // Alignment, size, id, flags, range.
        #expect(addError(set, id: 1, base: 0x20800, size: 0x1000) == .misaligned(id: 1, gpa(0x20800), size: 0x1000))
        #expect(addError(set, id: 1, base: 0x20000, size: 0x1800) == .misaligned(id: 1, gpa(0x20000), size: 0x1800))
        #expect(addError(set, id: 1, base: 0x20000, size: 0) == .emptySlot(id: 1))
        #expect(addError(set, id: -1, base: 0x20000, size: 0x1000) == .invalidSlotID(-1))
        #expect(addError(set, id: MemslotSet.slotLimit, base: 0x20000, size: 0x1000) == .invalidSlotID(32764))
        #expect(addError(set, id: 0, base: 0x20000, size: 0x1000) == .duplicateSlotID(0))
        #expect(addError(set, id: 1, base: 0x20000, size: 0x1000, flags: MemslotFlags(rawValue: 0b110))
            == .invalidFlags(id: 1, MemslotFlags(rawValue: 0b100)))
        #expect(addError(set, id: 1, base: (1 << 52) - 0x1000, size: 0x2000)
            == .beyondPhysicalAddressSpace(id: 1, gpa((1 << 52) - 0x1000), size: 0x2000))
        #expect(addError(set, id: 1, base: 0xFFFF_FFFF_FFFF_F000, size: 0x2000)
            == .beyondPhysicalAddressSpace(id: 1, gpa(0xFFFF_FFFF_FFFF_F000), size: 0x2000))
        #expect(addError(set, id: 1, base: 0, size: 1 << 43)
            == .tooManyPages(id: 1, pages: 1 << 31, limit: (1 << 31) - 1))
        // Overlaps: inside, across either end, around, identical.
        for (base, size) in [(0x11000, 0x1000), (0xF000, 0x2000), (0x13000, 0x4000), (0x8000, 0x10000), (0x10000, 0x4000)] as [(UInt64, UInt64)] {
            #expect(addError(set, id: 1, base: base, size: size) == .overlap(id: 1, gpa(base), size: size, existing: existing))
        }
        // Nothing changed so far.
        #expect(set.generation == 1 && set.slots.count == 1 && set.pool.allocatedPages == 4)
        // Adjacent on both sides is fine, and the last page below 2^52 too.
        try set.addSlot(id: 1, base: gpa(0xF000), size: 0x1000)
        try set.addSlot(id: 2, base: gpa(0x14000), size: 0x1000)
        try set.addSlot(id: MemslotSet.slotLimit - 1, base: gpa((1 << 52) - 0x1000), size: 0x1000)
        #expect(set.slots.map(\.id) == [1, 0, 2, 32763])
        #expect(set.hostFrame(of: gfn((1 << 40) - 1)) != nil)
        #expect(set.generation == 4 && set.totalPages == 7)
        // The pool running out is an error of the slot, and changes nothing.
        let small = try makeSet(poolPages: 8)
        #expect(addError(small, id: 0, base: 0, size: 9 * pageSize)
            == .hostMemory(id: 0, .exhausted(requested: 9, capacity: 8, allocated: 0, largestFreeRun: 8)))
        #expect(small.generation == 0 && small.slots.isEmpty && small.isMMIO(gfn(0)))
        #expect(MemslotError.overlap(id: 1, gpa(0x11000), size: 0x1000, existing: existing).description
            == "memslot 1: 0x11000+0x1000 overlaps slot 0: 0x10000+0x4000 -> pfn 0x100000 []")
    }

    @Test func deleteReturnsFramesAndMakesMMIO() throws {
        let set = try makeSet(poolPages: 64)
        let a = try set.addSlot(id: 1, base: gpa(0), size: 8 * pageSize)
        try set.addSlot(id: 2, base: gpa(radixBase), size: 8 * pageSize)
        try set.store64(0x1122_3344_5566_7788, at: gpa(0x2000))
        #expect(set.pool.allocatedPages == 16 && set.generation == 2)
        try set.deleteSlot(id: 1)
        #expect(set.generation == 3 && set.totalPages == 8 && set.pool.allocatedPages == 8)
        #expect(set.isMMIO(gfn(2)) && set.slot(id: 1) == nil && set.slot(containing: gfn(2)) == nil)
        #expect(accessError { () throws(GuestAccessError) in _ = try set.load64(gpa(0x2000)) } == .mmio(gpa(0x2000)))
        #expect(caught { () throws(MemslotError) in try set.deleteSlot(id: 1) } == .noSuchSlot(1))
        #expect(set.generation == 3)
        // The same frames come back, zeroed.
        let again = try set.addSlot(id: 1, base: gpa(0x40_0000), size: 8 * pageSize)
        #expect(again.hostBase == a.hostBase)
        #expect(try set.load64(gpa(0x40_2000)) == 0)
        try set.deleteSlot(id: 2)
        #expect(set.isMMIO(gfn(radixBase >> 12)) && set.slots == [again])
    }

    @Test func mmioDetection() throws {
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0), size: 0xA0000)  // 640 KiB of low RAM
        try set.addSlot(id: 1, base: gpa(0x10_0000), size: 0x10_0000)
        try set.addSlot(id: 2, base: gpa(0xFFFF_0000), size: 0x1_0000, flags: .readOnly)  // the reset vector's ROM
        try set.addSlot(id: 3, base: gpa(radixBase + 0x20_0000), size: 0x4000)
        let mmio: [UInt64] = [0xA0, 0xB8, 0xFF, 0x200, 0xFEE00, 0xFEC00, 0xFFFEF, radixBase >> 12, (radixBase >> 12) + 0x204,
                              1 << 39, (1 << 40) - 1, 1 << 40, UInt64.max]
        for frame in mmio { #expect(set.isMMIO(gfn(frame)), "gfn \(hex(frame))") }
        let ram: [UInt64] = [0, 0x9F, 0x100, 0x1FF, 0xFFFF0, 0xFFFFF, (radixBase >> 12) + 0x200, (radixBase >> 12) + 0x203]
        for frame in ram { #expect(!set.isMMIO(gfn(frame)), "gfn \(hex(frame))") }
        #expect(accessError { () throws(GuestAccessError) in _ = try set.read(gpa(0x9F800), count: 0x1000) } == .mmio(gpa(0xA0000)))
        #expect(accessError { () throws(GuestAccessError) in _ = try set.load32(gpa(0xFEE0_0300)) } == .mmio(gpa(0xFEE0_0300)))
        #expect(accessError { () throws(GuestAccessError) in _ = try set.read(gpa(UInt64.max - 3), count: 8) }
            == .addressOverflow(gpa(UInt64.max - 3), count: 8))
    }

    /// Random adds and deletes, in the flat-table range and in the radix range, against a
    /// dictionary gfn -> (slot, host frame).
    @Test(arguments: [11, 12] as [UInt64])
    func randomLayoutsMatchADictionary(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let set = try makeSet(poolPages: 2048)
        var model: [UInt64: (slot: Int, host: HostFrameNumber)] = [:]
        var live: [Int: Memslot] = [:]
        // Two windows of 256 frames: below 32 GiB and above it (radix), plus one at the top.
        let windows: [UInt64] = [0x300, radixBase >> 12, (1 << 40) - 256]
        var generation: UInt64 = 0
        for _ in 0..<300 {
            if live.isEmpty || random.next() % 3 != 0 {
                let id = Int(random.next() % 12)
                let window = windows[Int(random.next() % 3)]
                let start = window + random.next() % 256
                let pages = min(random.next() % 24 + 1, window + 256 - start)
                let clash = (start..<start + pages).compactMap { model[$0]?.slot }.first
                do throws(MemslotError) {
                    let slot = try set.addSlot(id: id, base: gfn(start).address, size: pages << 12,
                                               flags: random.next() % 4 == 0 ? .readOnly : [])
                    #expect(live[id] == nil && clash == nil)
                    for page in 0..<pages { model[start + page] = (id, HostFrameNumber(slot.hostBase.rawValue + page)) }
                    live[id] = slot
                    generation += 1
                } catch {
                    switch error {
                    case .duplicateSlotID(let duplicate): #expect(duplicate == id && live[id] != nil)
                    case .overlap(_, _, _, let existing):
                        #expect(live[id] == nil && clash != nil && existing.id == clash)
                    default: Issue.record("unexpected \(error)")
                    }
                }
            } else {
                let id = live.keys.sorted()[Int(random.next() % UInt64(live.count))]
                let slot = live.removeValue(forKey: id)!
                try set.deleteSlot(id: id)
                for page in 0..<slot.pageCount { model[slot.baseFrame.rawValue + page] = nil }
                generation += 1
            }
            #expect(set.generation == generation)
            #expect(set.totalPages == UInt64(model.count) && set.pool.allocatedPages == model.count)
            #expect(set.slots.map(\.id).sorted() == live.keys.sorted())
            for window in windows {
                for frame in window..<window + 256 {
                    let expected = model[frame]
                    let gfn = gfn(frame)
                    guard set.hostFrame(of: gfn) == expected?.host, set.slot(containing: gfn)?.id == expected?.slot,
                          set.isMMIO(gfn) == (expected == nil)
                    else {
                        Issue.record("gfn \(hex(frame)): expected \(String(describing: expected)), got \(String(describing: set.hostFrame(of: gfn)))")
                        return
                    }
                    if let expected {
                        let page = set.hostPage(gfn)!
                        #expect(page.bytes == set.pool.pointer(expected.host))
                        #expect(page.isWritable == !live[expected.slot]!.isReadOnly)
                    }
                }
            }
        }
    }

    // MARK: Read-only slots

    @Test func readOnlySlotsRefuseGuestWrites() throws {
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0x1000), size: 0x2000)
        try set.addSlot(id: 1, base: gpa(0x3000), size: 0x2000, flags: .readOnly)
        #expect(set.hostPage(gfn(1))!.isWritable && !set.hostPage(gfn(3))!.isWritable)
        // The VMM fills the ROM through its own mapping; the guest may read it.
        try set.hostWrite(gpa(0x3FFC), bytes: [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(try set.load64(gpa(0x3FFC)) == 0x0807_0605_0403_0201)
        #expect(accessError { () throws(GuestAccessError) in try set.store32(7, at: gpa(0x3000)) } == .readOnly(gpa(0x3000), slot: 1))
        // A write straddling RAM and ROM fails as a whole, naming the first read-only byte.
        #expect(accessError { () throws(GuestAccessError) in try set.store64(~0, at: gpa(0x2FFC)) } == .readOnly(gpa(0x3000), slot: 1))
        #expect(try set.load32(gpa(0x2FFC)) == 0)
        #expect(try set.load64(gpa(0x3000)) == 0)  // nothing of the refused store landed
        #expect(try set.load32(gpa(0x4000)) == 0x0807_0605)
        // The walker's A/D update skips read-only memory, as KVM's does.
        #expect(set.compareExchangeEntry(at: gpa(0x3000), expected: Entry64(rawValue: 0), desired: Entry64(rawValue: 1)) == nil)
        #expect(set.compareExchangeEntry(at: gpa(0x1000), expected: Entry64(rawValue: 0), desired: Entry64(rawValue: 1)) == true)
        #expect(GuestAccessError.readOnly(gpa(0x3000), slot: 1).description == "0x3000 is in read-only memslot 1")
        #expect(accessError { () throws(GuestAccessError) in try set.hostWrite(gpa(0x4FFF), bytes: [1, 2]) } == .mmio(gpa(0x5000)))
    }

    @Test func readOnlyFlagCannotChange() throws {
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0), size: 0x1000)
        try set.addSlot(id: 1, base: gpa(0x1000), size: 0x1000, flags: .readOnly)
        #expect(caught { () throws(MemslotError) in try set.setFlags(id: 0, flags: .readOnly) } == .readOnlyChange(id: 0))
        #expect(caught { () throws(MemslotError) in try set.setFlags(id: 1, flags: []) } == .readOnlyChange(id: 1))
        #expect(caught { () throws(MemslotError) in try set.setFlags(id: 7, flags: []) } == .noSuchSlot(7))
        #expect(caught { () throws(MemslotError) in try set.setFlags(id: 0, flags: MemslotFlags(rawValue: 8)) }
            == .invalidFlags(id: 0, MemslotFlags(rawValue: 8)))
        #expect(set.generation == 2)
        // A read-only slot may log dirty pages (the guest just never dirties it).
        try set.setFlags(id: 1, flags: [.readOnly, .logDirtyPages])
        #expect(set.slot(id: 1)!.flags == [.readOnly, .logDirtyPages] && set.generation == 3)
        #expect(!set.hostPage(gfn(1))!.isWritable)
        #expect(MemslotFlags([.readOnly, .logDirtyPages]).description == "[log-dirty-pages, read-only]")
    }

    // MARK: Dirty logging

    @Test func dirtyLoggingRecordsOnlyWhenEnabled() throws {
        let set = try makeSet()
        try set.addSlot(id: 5, base: gpa(0x10_0000), size: 130 * pageSize)
        let frame = gfn(0x100 + 70)
        // Not logging: nothing is recorded and there is no bitmap.
        #expect(!set.markDirty(frame))
        try set.store64(1, at: gpa(0x10_0000))
        #expect(caught { () throws(MemslotError) in _ = try set.dirtyBitmap(slot: 5) } == .dirtyLoggingDisabled(id: 5))
        #expect(caught { () throws(MemslotError) in _ = try set.getAndClearDirtyLog(slot: 5) } == .dirtyLoggingDisabled(id: 5))
        #expect(caught { () throws(MemslotError) in _ = try set.dirtyBitmap(slot: 6) } == .noSuchSlot(6))
        // Turning logging on gives a clear bitmap of ceil(130 / 64) words.
        try set.setFlags(id: 5, flags: .logDirtyPages)
        #expect(set.generation == 2 && set.slot(id: 5)!.logsDirtyPages)
        #expect(try set.dirtyBitmap(slot: 5) == [0, 0, 0])
        #expect(set.markDirty(frame) && set.markDirty(gfn(0x100)) && set.markDirty(gfn(0x100 + 129)))
        #expect(!set.markDirty(gfn(0x100 + 130)) && !set.markDirty(gfn(0xFF)))
        #expect(try set.dirtyBitmap(slot: 5) == [1, 1 << 6, 2])
        // Writes KVM makes on the guest's behalf dirty every page they touch; host writes do not.
        try set.write(gpa(0x10_0000 + 3 * pageSize - 2), bytes: [1, 2, 3, 4])  // pages 2 and 3
        try set.hostWrite(gpa(0x10_0000 + 9 * pageSize), bytes: [1])
        #expect(try set.getAndClearDirtyLog(slot: 5) == [1 | 0b1100, 1 << 6, 2])
        #expect(try set.getAndClearDirtyLog(slot: 5) == [0, 0, 0])
        #expect(try set.dirtyBitmap(slot: 5) == [0, 0, 0])
        // Same flags again: no change, no generation bump; the bitmap survives.
        set.markDirty(frame)
        try set.setFlags(id: 5, flags: .logDirtyPages)
        #expect(set.generation == 2)
        #expect(try set.dirtyBitmap(slot: 5) == [0, 1 << 6, 0])
        // Off drops the bitmap; on again starts clear.
        try set.setFlags(id: 5, flags: [])
        #expect(set.generation == 3 && !set.markDirty(frame))
        #expect(caught { () throws(MemslotError) in _ = try set.dirtyBitmap(slot: 5) } == .dirtyLoggingDisabled(id: 5))
        try set.setFlags(id: 5, flags: .logDirtyPages)
        #expect(set.generation == 4)
        #expect(try set.dirtyBitmap(slot: 5) == [0, 0, 0])
        // A slot created logging has its bitmap from the start; each slot has its own.
        try set.addSlot(id: 6, base: gpa(radixBase), size: 64 * pageSize, flags: .logDirtyPages)
        #expect(set.markDirty(gfn((radixBase >> 12) + 63)))
        #expect(try set.dirtyBitmap(slot: 6) == [1 << 63] && (try set.dirtyBitmap(slot: 5)) == [0, 0, 0])
    }

    @Test func concurrentMarkDirtyLosesNothing() throws {
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0), size: 1024 * pageSize, flags: .logDirtyPages)
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            for page in stride(from: UInt64(thread), to: 1024, by: 2) {
                for _ in 0..<4 { set.markDirty(gfn(page)) }
            }
        }
        #expect(try set.getAndClearDirtyLog(slot: 0) == [UInt64](repeating: ~0, count: 16))
    }

    @Test func generationCountsEveryLayoutChange() throws {
        let set = try makeSet()
        var expected: UInt64 = 0
        for id in 0..<5 {
            try set.addSlot(id: id, base: gfn(UInt64(id) * 16).address, size: 8 * pageSize)
            expected += 1
            #expect(set.generation == expected)
        }
        try set.setFlags(id: 2, flags: .logDirtyPages)
        try set.deleteSlot(id: 0)
        try set.setFlags(id: 2, flags: [])
        expected += 3
        #expect(set.generation == expected)
        // Failures and no-op flag changes do not count.
        _ = addError(set, id: 9, base: 16 << 12, size: pageSize)
        _ = caught { () throws(MemslotError) in try set.deleteSlot(id: 0) }
        try set.setFlags(id: 3, flags: [])
        #expect(set.generation == expected)
    }

    // MARK: Guest bytes

    /// Random reads and writes, many across page and slot boundaries, against a byte-array model
    /// of a window with RAM, a read-only slot, gaps and slots that touch.
    @Test(arguments: [21, 22] as [UInt64])
    func randomReadsAndWritesMatchAModel(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let set = try makeSet()
        // Frames 0..<64 of the window: slots [2,10) [10,12) ro [12,20) gap [24,40) [40,41) gap [48,64).
        let window: UInt64 = radixBase - 32 * pageSize  // straddles the flat table and the radix
        let layout: [(first: UInt64, pages: UInt64, readOnly: Bool)] = [
            (2, 8, false), (10, 2, false), (12, 8, true), (24, 16, false), (40, 1, false), (48, 16, false),
        ]
        var model = [UInt8](repeating: 0, count: 64 * Int(pageSize))
        var backed = [Bool](repeating: false, count: 64), writable = [Bool](repeating: false, count: 64)
        for (id, slot) in layout.enumerated() {
            try set.addSlot(id: id, base: gpa(window + slot.first * pageSize), size: slot.pages * pageSize,
                            flags: slot.readOnly ? .readOnly : [])
            for page in slot.first..<slot.first + slot.pages {
                backed[Int(page)] = true
                writable[Int(page)] = !slot.readOnly
            }
        }
        func firstProblem(_ offset: Int, _ count: Int, writing: Bool) -> GuestAccessError? {
            // The first page with a problem decides.
            for page in offset >> 12...(offset + count - 1) >> 12 {
                let address = gpa(window + UInt64(max(page << 12, offset)))
                if !backed[page] { return .mmio(address) }
                if writing && !writable[page] { return .readOnly(address, slot: 2) }
            }
            return nil
        }
        for _ in 0..<600 {
            let count = random.next() % 4 == 0 ? Int(random.next() % 9000) + 1 : Int(random.next() % 16) + 1
            let offset = Int(random.next() % UInt64(model.count - count + 1))
            let address = gpa(window + UInt64(offset))
            switch random.next() % 4 {
            case 0, 1:
                let bytes = random.bytes(count)
                let host = random.next() % 3 == 0
                let expected = firstProblem(offset, count, writing: !host)
                let error = accessError { () throws(GuestAccessError) in
                    if host { try set.hostWrite(address, bytes: bytes) } else { try set.write(address, bytes: bytes) }
                }
                #expect(error == expected)
                if error == nil { model.replaceSubrange(offset..<offset + count, with: bytes) }
            case 2 where count >= 8:
                let value = random.next()
                let error = accessError { () throws(GuestAccessError) in try set.store64(value, at: address) }
                #expect(error == firstProblem(offset, 8, writing: true))
                if error == nil { model.setLE64(value, at: offset) }
                if let loaded = try? set.load32(address) { #expect(loaded == model.getLE32(offset)) }
            default:
                do throws(GuestAccessError) {
                    let bytes = try set.read(address, count: count)
                    #expect(firstProblem(offset, count, writing: false) == nil)
                    #expect(bytes[...] == model[offset..<offset + count])
                } catch {
                    #expect(error == firstProblem(offset, count, writing: false))
                }
            }
        }
        // Everything backed still matches the model, page by page, through the host pointers.
        for page in 0..<64 where backed[page] {
            let bytes = UnsafeRawBufferPointer(start: set.hostPage(gfn((window >> 12) + UInt64(page)))!.bytes, count: 4096)
            #expect(Array(bytes) == Array(model[page << 12..<(page + 1) << 12]))
        }
    }

    // MARK: Walking page tables that live in memslots

    /// Builds 4-level tables with plain stores into a RAM slot (the PML4 and PDPT below 32 GiB,
    /// the PD and PT in a slot above it) and walks them with the reference walker.
    @Test func pageWalkerWalksTablesInMemslots() throws {
        let set = try makeSet()
        let low: UInt64 = 0x10_0000, high = radixBase + 0x4000_0000
        try set.addSlot(id: 0, base: gpa(low), size: 0x10_0000)
        try set.addSlot(id: 1, base: gpa(high), size: 0x10_0000, flags: .logDirtyPages)
        try set.addSlot(id: 2, base: gpa(0xFFF0_0000), size: 0x1000, flags: .readOnly)
        let pml4 = low, pdpt = low + 0x1000, pd = high, pt = high + 0x1000
        let present: UInt64 = 0x1, writable: UInt64 = 0x2, user: UInt64 = 0x4, accessed: UInt64 = 0x20, dirty: UInt64 = 0x40
        let table = present | writable | user
        let gva: UInt64 = 0x7F12_3456_7000
        func index(_ level: Int) -> UInt64 { (gva >> UInt64(12 + 9 * (level - 1))) & 0x1FF }
        try set.store64(pdpt | table, at: gpa(pml4 + index(4) * 8))
        try set.store64(pd | table, at: gpa(pdpt + index(3) * 8))
        try set.store64(pt | table, at: gpa(pd + index(2) * 8))
        try set.store64((low + 0x8000) | table, at: gpa(pt + index(1) * 8))  // RAM
        try set.store64(0xFFF0_0000 | present | user, at: gpa(pt + (index(1) + 1) * 8))  // the ROM page, read-only
        try set.store64(0xFEE0_0000 | table, at: gpa(pt + (index(1) + 2) * 8))  // MMIO (a data page may be)
        try set.store64(0xFEC0_0000 | table, at: gpa(pd + (index(2) + 1) * 8))  // a page table in MMIO
        _ = try set.getAndClearDirtyLog(slot: 1)

        let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: pml4,
                                        cr4: [.physicalAddressExtension], efer: [.longModeEnable, .longModeActive, .noExecuteEnable])
        let walker = try PageWalker(registers: registers, memory: set)
        let ram = try walker.walk(GuestVirtualAddress(gva + 0x123), .write(.user), in: set)
        #expect(ram.physicalAddress == gpa(low + 0x8123) && ram.level == 1 && ram.isWritable)
        // The walk set A at every level and D in the leaf, through the hostPage pointers.
        #expect(try set.load64(gpa(pml4 + index(4) * 8)) == pdpt | table | accessed)
        #expect(try set.load64(gpa(pt + index(1) * 8)) == (low + 0x8000) | table | accessed | dirty)
        let rom = try walker.walk(GuestVirtualAddress(gva + 0x1000), .read(.user), in: set)
        #expect(rom.physicalAddress == gpa(0xFFF0_0000) && !rom.isWritable)
        let mmio = try walker.walk(GuestVirtualAddress(gva + 0x2008), .read(.supervisor), in: set)
        #expect(set.isMMIO(mmio.physicalAddress.frame))
        // A page-table entry in MMIO: the walk reports the missing memory and its level.
        let missing = walker.translate(GuestVirtualAddress(gva + 0x20_0000), .read(.user), in: set)
        guard case .failure(.noMemory(let address, let level, _)) = missing else {
            Issue.record("expected noMemory, got \(missing)")
            return
        }
        #expect(address == gpa(0xFEC0_0000 + index(1) * 8) && level == 1)
        // The walker's A/D updates are logged like any write to the tables (KVM's walker marks the
        // table's page dirty after its cmpxchg): slot 1 holds the PD (page 0) and the PT (page 1).
        #expect(try set.dirtyBitmap(slot: 1) == [0b11, 0, 0, 0])
    }

    /// A loaded image (here: tables built by PageTableBuilder in a GuestPhysicalMemory) copied
    /// into memslots walks exactly as it did.
    @Test func copiedImageWalksTheSame() throws {
        let image = GuestPhysicalMemory()
        try image.back(gpa(0), size: 0x20_0000)
        try image.back(gpa(radixBase), size: 0x8000)
        try image.back(gpa(0x30_0000), size: 0x3000, readOnly: true)  // ROM between RAM...
        try image.back(gpa(0x30_3000), size: 0x1000)  // ...and adjacent RAM
        let builder = try PageTableBuilder(memory: image, format: .fourLevel, tableArea: gpa(0x10_0000))
        var random = SplitMix64(seed: 5)
        var addresses: [GuestVirtualAddress] = []
        for page in 0..<200 as Range<UInt64> {
            let virtual = 0x4000_0000 + page * 0x5000
            let physical = [page * 0x1000 % 0x10_0000, radixBase + page % 8 * 0x1000, 0x30_0000 + page % 4 * 0x1000][Int(page % 3)]
            try builder.map(virtual, to: physical, leafFlags: 0b111)
            addresses.append(GuestVirtualAddress(virtual + random.next() % 4096))
        }
        try image.write(gpa(radixBase + 0x10), bytes: [9, 8, 7])
        let set = try makeSet()
        try set.addSlot(id: 0, base: gpa(0xE000_0000), size: 0x1000)  // id 0 is taken: copy skips it
        let slots = try set.copy(from: image)
        #expect(slots.map(\.id) == [1, 2, 3, 4])
        let layout: [String] = slots.map { "\($0.baseAddress.rawValue):\($0.size):\($0.isReadOnly)" }
        let expectedLayout: [String] = ["0:\(0x20_0000):false", "\(0x30_0000):\(0x3000):true",
                                        "\(0x30_3000):\(0x1000):false", "\(radixBase):\(0x8000):false"]
        #expect(layout == expectedLayout)
        #expect(try set.read(gpa(radixBase + 0x10), count: 3) == [9, 8, 7])
        for range in image.backedRanges {
            #expect(try set.read(range.start, count: Int(range.size)) == image.read(range.start, count: Int(range.size)))
        }
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable], cr3: builder.root.rawValue,
                                        cr4: [.physicalAddressExtension], efer: [.longModeEnable, .longModeActive])
        let walker = try PageWalker(registers: registers, memory: set)
        for address in addresses {
            let expected = walker.translate(address, .write(.user), in: image, setAccessedDirty: false)
            let actual = walker.translate(address, .write(.user), in: set, setAccessedDirty: false)
            #expect(actual == expected)
        }
        // Copying again overlaps everything: nothing is added, nothing leaks.
        let allocated = set.pool.allocatedPages, generation = set.generation
        let error = caught { () throws(MemslotError) in _ = try set.copy(from: image, firstSlotID: 10) }
        guard case .overlap(let id, _, _, _) = error else {
            Issue.record("expected an overlap, got \(String(describing: error))")
            return
        }
        #expect(id == 10)
        #expect(set.pool.allocatedPages == allocated && set.slots.count == 5 && set.generation == generation)
    }

    @Test func copyRollsBackWhenThePoolRunsOut() throws {
        let image = GuestPhysicalMemory()
        try image.back(gpa(0), size: 0x4000)
        try image.back(gpa(0x10_0000), size: 0x8000)
        let set = try makeSet(poolPages: 8)
        let error = caught { () throws(MemslotError) in _ = try set.copy(from: image, flags: .logDirtyPages) }
        #expect(error == .hostMemory(id: 1, .exhausted(requested: 8, capacity: 8, allocated: 4, largestFreeRun: 4)))
        #expect(set.slots.isEmpty && set.pool.allocatedPages == 0)
    }
}
