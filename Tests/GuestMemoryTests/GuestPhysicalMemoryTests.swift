import GuestMemory
#if canImport(Glibc)
import Glibc
#endif
import Testing
import X86Paging

private func gpa(_ value: UInt64) -> GuestPhysicalAddress { GuestPhysicalAddress(value) }

/// Runs `body` and returns its `GuestMemoryError`, or nil when it did not throw.
private func memoryError(_ body: () throws(GuestMemoryError) -> Void) -> GuestMemoryError? {
    do throws(GuestMemoryError) {
        try body()
        return nil
    } catch {
        return error
    }
}

@Suite("GuestPhysicalMemory")
struct GuestPhysicalMemoryTests {
    @Test func freshMemoryIsEmpty() {
        let memory = GuestPhysicalMemory()
        #expect(memory.backedPageCount == 0)
        #expect(memory.backedRanges.isEmpty)
        #expect(memory.hostPage(GuestFrameNumber(0)) == nil)
        #expect(!memory.isBacked(GuestFrameNumber(0)))
        #expect(memory.sizeLimit == 64 << 30)
    }

    @Test func backedMemoryIsZeroAndWritable() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x4000), size: 2 * pageSize)
        #expect(memory.backedPageCount == 2)
        #expect(try memory.read(gpa(0x4000), count: Int(2 * pageSize)) == [UInt8](repeating: 0, count: Int(2 * pageSize)))
        let page = try #require(memory.hostPage(GuestFrameNumber(4)))
        #expect(page.isWritable)
        #expect(memory.isBacked(GuestFrameNumber(5)))
        #expect(!memory.isBacked(GuestFrameNumber(3)))
        #expect(!memory.isBacked(GuestFrameNumber(6)))
    }

    @Test func unalignedBackCoversEveryTouchedFrame() throws {
        let memory = GuestPhysicalMemory()
        // 0x1800..<0x2801 touches frames 1, 2 and 0x2800 is in frame 2; one more byte touches nothing new.
        try memory.back(gpa(0x1800), size: 0x1001)
        #expect(memory.backedPageCount == 2)
        #expect(rangesAre(memory.backedRanges, (0x1000, 0x2000)))
        try memory.back(gpa(0x2FFF), size: 2)
        #expect(rangesAre(memory.backedRanges, (0x1000, 0x3000)))
        // Size 0 backs nothing, wherever it points.
        try memory.back(gpa(0x9000), size: 0)
        try memory.back(gpa(UInt64.max), size: 0)
        #expect(memory.backedPageCount == 3)
    }

    @Test func readWriteAcrossPageBoundaries() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x1000), size: 3 * pageSize)
        let data = (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7 + 1) }
        try memory.write(gpa(0x1F80), bytes: data)  // crosses 0x2000
        #expect(try memory.read(gpa(0x1F80), count: data.count) == data)
        // Every piece read separately agrees, on both sides of the boundary.
        #expect(try memory.read(gpa(0x1F80), count: 0x80) == Array(data[0..<0x80]))
        #expect(try memory.read(gpa(0x2000), count: 300 - 0x80) == Array(data[0x80...]))
        #expect(try memory.read(gpa(0x1F7F), count: 1) == [0])
        #expect(try memory.read(gpa(0x1F80 + 300), count: 1) == [0])
        // A write spanning all three pages.
        let big = (0..<Int(2 * pageSize + 1)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try memory.write(gpa(0x1FFF), bytes: big)
        #expect(try memory.read(gpa(0x1FFF), count: big.count) == big)
        // Integers straddling a boundary, little-endian.
        try memory.store64(0x1122_3344_5566_7788, at: gpa(0x2FFC))
        #expect(try memory.load64(gpa(0x2FFC)) == 0x1122_3344_5566_7788)
        #expect(try memory.read(gpa(0x2FFC), count: 8) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(try memory.load32(gpa(0x3000)) == 0x1122_3344)
        try memory.store32(0xDEAD_BEEF, at: gpa(0x1FFE))
        #expect(try memory.load32(gpa(0x1FFE)) == 0xDEAD_BEEF)
        #expect(try memory.read(gpa(0x1FFE), count: 4) == [0xEF, 0xBE, 0xAD, 0xDE])
        // Zero-length accesses succeed anywhere.
        #expect(try memory.read(gpa(0xFFFF_0000), count: 0) == [])
        try memory.write(gpa(0xFFFF_0000), bytes: [])
    }

    @Test func hostPagesAreTheBytesReadAndWritten() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x7000), size: pageSize)
        try memory.store32(0xCAFE_F00D, at: gpa(0x7010))
        let page = try #require(memory.hostPage(GuestFrameNumber(7)))
        #expect(page.bytes.load(fromByteOffset: 0x10, as: UInt32.self) == UInt32(0xCAFE_F00D).littleEndian)
        page.bytes.storeBytes(of: UInt8(0xAB), toByteOffset: 0xFFF, as: UInt8.self)
        #expect(try memory.read(gpa(0x7FFF), count: 1) == [0xAB])
        #expect(Int(bitPattern: page.bytes) % Int(pageSize) == 0)
    }

    @Test func rebackingKeepsContents() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x2000), size: pageSize)
        try memory.write(gpa(0x2100), bytes: [1, 2, 3])
        try memory.back(gpa(0x1000), size: 3 * pageSize)
        #expect(memory.backedPageCount == 3)
        #expect(try memory.read(gpa(0x2100), count: 3) == [1, 2, 3])
        #expect(try memory.read(gpa(0x1000), count: 4) == [0, 0, 0, 0])
    }

    @Test func unbackedReadsNameTheFirstUnbackedAddress() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x1000), size: 2 * pageSize)  // 0x1000..<0x3000
        try memory.back(gpa(0x5000), size: pageSize)  // 0x5000..<0x6000
        func readError(_ address: UInt64, _ count: Int) -> GuestMemoryError? {
            memoryError { () throws(GuestMemoryError) in _ = try memory.read(gpa(address), count: count) }
        }
        // Running off the end of a backed run.
        #expect(readError(0x2F00, 0x200) == .unbacked(gpa(0x3000)))
        // Starting in a hole: the start itself, not its page's base.
        #expect(readError(0x0800, 0x1000) == .unbacked(gpa(0x0800)))
        #expect(readError(0x3ABC, 1) == .unbacked(gpa(0x3ABC)))
        // A hole in the middle of the range.
        #expect(readError(0x2000, 0x3800) == .unbacked(gpa(0x3000)))
        // The integer accessors throw the same way.
        #expect(memoryError { () throws(GuestMemoryError) in _ = try memory.load64(gpa(0x2FFC)) } == .unbacked(gpa(0x3000)))
        #expect(memoryError { () throws(GuestMemoryError) in _ = try memory.load32(gpa(0x6000)) } == .unbacked(gpa(0x6000)))
        #expect(memoryError { () throws(GuestMemoryError) in try memory.store64(1, at: gpa(0x5FFF)) } == .unbacked(gpa(0x6000)))
        #expect(memoryError { () throws(GuestMemoryError) in try memory.store32(1, at: gpa(0x4FFE)) } == .unbacked(gpa(0x4FFE)))
        // The typed throw works with #expect(throws:).
        #expect(throws: GuestMemoryError.unbacked(gpa(0))) { try memory.read(gpa(0), count: 1) }
        #expect(GuestMemoryError.unbacked(gpa(0x3000)).description.contains("0x3000"))
    }

    @Test func failedWritesChangeNothing() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x1000), size: pageSize)
        try memory.write(gpa(0x1FF0), bytes: [UInt8](repeating: 0x55, count: 16))
        let error = memoryError { () throws(GuestMemoryError) in
            try memory.write(gpa(0x1FF0), bytes: [UInt8](repeating: 0xAA, count: 32))
        }
        #expect(error == .unbacked(gpa(0x2000)))
        #expect(try memory.read(gpa(0x1FF0), count: 16) == [UInt8](repeating: 0x55, count: 16))
        #expect(memoryError { () throws(GuestMemoryError) in try memory.store64(~0, at: gpa(0x1FFC)) } == .unbacked(gpa(0x2000)))
        #expect(try memory.read(gpa(0x1FFC), count: 4) == [0x55, 0x55, 0x55, 0x55])
    }

    @Test func readOnlyPages() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x10000), size: 2 * pageSize, readOnly: true)
        let page = try #require(memory.hostPage(GuestFrameNumber(0x10)))
        #expect(!page.isWritable)
        #expect(memory.hostPage(GuestFrameNumber(0x11))?.isWritable == false)
        // The host (a loader, a test) still writes read-only pages.
        try memory.write(gpa(0x10FFE), bytes: [9, 8, 7, 6])
        #expect(try memory.read(gpa(0x10FFE), count: 4) == [9, 8, 7, 6])
        // The flag does not disturb the page pointer.
        #expect(page.bytes.load(fromByteOffset: 0xFFE, as: UInt8.self) == 9)

        // readOnly applies only to newly backed frames.
        try memory.back(gpa(0x11000), size: 2 * pageSize, readOnly: false)
        #expect(memory.hostPage(GuestFrameNumber(0x11))?.isWritable == false)
        #expect(memory.hostPage(GuestFrameNumber(0x12))?.isWritable == true)
        try memory.back(gpa(0x12000), size: 2 * pageSize, readOnly: true)
        #expect(memory.hostPage(GuestFrameNumber(0x12))?.isWritable == true)
        #expect(memory.hostPage(GuestFrameNumber(0x13))?.isWritable == false)

        // setReadOnly flips existing frames and keeps their contents.
        try memory.setReadOnly(gpa(0x10800), size: 0x1000, false)  // touches frames 0x10 and 0x11
        #expect(memory.hostPage(GuestFrameNumber(0x10))?.isWritable == true)
        #expect(memory.hostPage(GuestFrameNumber(0x11))?.isWritable == true)
        #expect(memory.hostPage(GuestFrameNumber(0x10))?.bytes == page.bytes)
        try memory.setReadOnly(gpa(0x12000), size: 1, true)
        #expect(memory.hostPage(GuestFrameNumber(0x12))?.isWritable == false)
        #expect(try memory.read(gpa(0x10FFE), count: 4) == [9, 8, 7, 6])
        // Read-only pages still appear in the layout.
        #expect(rangesAre(memory.backedRanges, (UInt64(0x10000), 4 * pageSize)))
    }

    @Test func setReadOnlyOnUnbackedMemoryThrows() throws {
        let memory = GuestPhysicalMemory()
        try memory.back(gpa(0x1000), size: pageSize)
        let error = memoryError { () throws(GuestMemoryError) in try memory.setReadOnly(gpa(0x1000), size: 0x1800, true) }
        #expect(error == .unbacked(gpa(0x2000)))
        // Like a failed write, a failed setReadOnly should leave every frame as it was.
        #expect(memory.hostPage(GuestFrameNumber(1))?.isWritable == true)
        #expect(memoryError { () throws(GuestMemoryError) in try memory.setReadOnly(gpa(0x1000), size: 0, true) } == nil)
        #expect(memoryError { () throws(GuestMemoryError) in try memory.setReadOnly(gpa(UInt64.max), size: 2, true) }
            == .beyondPhysicalAddressSpace(gpa(UInt64.max), size: 2))
    }

    @Test func sizeLimitIsEnforced() throws {
        let memory = GuestPhysicalMemory(sizeLimit: 4 * pageSize)
        #expect(memory.sizeLimit == 4 * pageSize)
        try memory.back(gpa(0), size: 3 * pageSize)
        // Only the one new frame counts against the limit.
        try memory.back(gpa(0x2000), size: 2 * pageSize)
        #expect(memory.backedPageCount == 4)
        // Backing what is already backed is free even at the limit.
        try memory.back(gpa(0), size: 4 * pageSize)
        let error = memoryError { () throws(GuestMemoryError) in try memory.back(gpa(0x10000), size: 1) }
        #expect(error == .sizeLimitExceeded(requested: pageSize, limit: 4 * pageSize))
        #expect(error?.description.contains("\(4 * pageSize)") == true)
        // A refused back changes nothing.
        #expect(memory.backedPageCount == 4)
        #expect(!memory.isBacked(GuestFrameNumber(0x10)))
        // A range that is mostly backed still needs its new frames to fit.
        let partial = memoryError { () throws(GuestMemoryError) in try memory.back(gpa(0x3000), size: 3 * pageSize) }
        #expect(partial == .sizeLimitExceeded(requested: 2 * pageSize, limit: 4 * pageSize))
        #expect(rangesAre(memory.backedRanges, (UInt64(0), 4 * pageSize)))
    }

    @Test func zeroSizeLimitBacksNothing() {
        let memory = GuestPhysicalMemory(sizeLimit: 0)
        #expect(memoryError { () throws(GuestMemoryError) in try memory.back(gpa(0), size: 1) }
            == .sizeLimitExceeded(requested: pageSize, limit: 0))
        #expect(memory.backedPageCount == 0)
    }

    /// Backing far more than the limit is refused without visiting every requested frame: a 2^38-frame
    /// request would take hours if it did (the time limit turns that hang into a failure).
    @Test(.timeLimit(.minutes(1))) func hugeBackIsRefusedWithoutCountingEveryFrame() {
        let memory = GuestPhysicalMemory(sizeLimit: 64 << 20)
        let error = memoryError { () throws(GuestMemoryError) in try memory.back(gpa(0), size: 1 << 50) }
        #expect(error == .sizeLimitExceeded(requested: 1 << 50, limit: 64 << 20))
        #expect(memory.backedPageCount == 0)
    }

    /// Backing is lazy: a large back should not make every host page resident (the loader backs
    /// whatever p_memsz a core claims, up to the size limit, 64 GiB by default).
    @Test func backingDoesNotTouchEveryHostPage() throws {
        let size: UInt64 = 64 << 20
        let memory = GuestPhysicalMemory(sizeLimit: size)
        try memory.back(gpa(0), size: size)
        let base = try #require(memory.hostPage(GuestFrameNumber(0))).bytes
        // One block backs the whole run.
        #expect(memory.hostPage(GuestFrameNumber(size / pageSize - 1))?.bytes == base + Int(size - pageSize))
        let pages = Int(size / pageSize)
        var residency = [UInt8](repeating: 0, count: pages)
        #expect(mincore(base, Int(size), &residency) == 0)
        let resident = residency.filter { $0 & 1 != 0 }.count
        #expect(resident < pages / 4, "\(resident) of \(pages) host pages resident right after back()")
        // Still reads as zero either way.
        #expect(try memory.read(gpa(size / 2), count: 16) == [UInt8](repeating: 0, count: 16))
    }

    @Test func rangesBeyondFiftyTwoBitsAreRejected() throws {
        let memory = GuestPhysicalMemory()
        let top: UInt64 = 1 << 52
        // The very last frame is fine.
        try memory.back(gpa(top - pageSize), size: pageSize)
        try memory.write(gpa(top - 4), bytes: [1, 2, 3, 4])
        #expect(try memory.read(gpa(top - 4), count: 4) == [1, 2, 3, 4])
        #expect(memory.isBacked(GuestFrameNumber((top >> 12) - 1)))
        #expect(rangesAre(memory.backedRanges, (top - pageSize, pageSize)))

        func backError(_ address: UInt64, _ size: UInt64) -> GuestMemoryError? {
            memoryError { () throws(GuestMemoryError) in try memory.back(gpa(address), size: size) }
        }
        #expect(backError(top - pageSize, pageSize + 1) == .beyondPhysicalAddressSpace(gpa(top - pageSize), size: pageSize + 1))
        #expect(backError(top, 1) == .beyondPhysicalAddressSpace(gpa(top), size: 1))
        #expect(backError(top - 1, 2) == .beyondPhysicalAddressSpace(gpa(top - 1), size: 2))
        #expect(backError(1 << 63, pageSize) == .beyondPhysicalAddressSpace(gpa(1 << 63), size: pageSize))
        // The end wraps past 2^64.
        #expect(backError(UInt64.max - 10, 100) == .beyondPhysicalAddressSpace(gpa(UInt64.max - 10), size: 100))
        #expect(backError(0, UInt64.max) == .beyondPhysicalAddressSpace(gpa(0), size: UInt64.max))
        #expect(backError(top - pageSize, pageSize + 1)?.description.contains("52-bit") == true)
        #expect(memory.backedPageCount == 1)

        // Reads and writes past the top find nothing there; wrapping ranges are refused.
        #expect(memoryError { () throws(GuestMemoryError) in _ = try memory.read(gpa(top - 2), count: 4) } == .unbacked(gpa(top)))
        #expect(memoryError { () throws(GuestMemoryError) in _ = try memory.read(gpa(top), count: 1) } == .unbacked(gpa(top)))
        #expect(memoryError { () throws(GuestMemoryError) in _ = try memory.read(gpa(UInt64.max - 1), count: 4) }
            == .beyondPhysicalAddressSpace(gpa(UInt64.max - 1), size: 4))
        #expect(memoryError { () throws(GuestMemoryError) in try memory.write(gpa(UInt64.max), bytes: [1, 2]) }
            == .beyondPhysicalAddressSpace(gpa(UInt64.max), size: 2))
        #expect(memory.hostPage(GuestFrameNumber(top >> 12)) == nil)
        #expect(memory.hostPage(GuestFrameNumber(UInt64.max)) == nil)
    }

    @Test func backedRangesCoalesceAdjacentFrames() throws {
        let memory = GuestPhysicalMemory()
        // Backed out of order, one page at a time.
        for frame: UInt64 in [5, 3, 4, 9, 7] { try memory.back(GuestFrameNumber(frame).address, size: pageSize) }
        #expect(rangesAre(memory.backedRanges, (0x3000, 0x3000), (0x7000, 0x1000), (0x9000, 0x1000)),
                "\(describe(memory.backedRanges))")
        try memory.back(gpa(0x8000), size: pageSize)
        #expect(rangesAre(memory.backedRanges, (0x3000, 0x3000), (0x7000, 0x3000)))
        try memory.back(gpa(0x6000), size: pageSize)
        #expect(rangesAre(memory.backedRanges, (0x3000, 0x7000)))
    }

    @Test func backedRangesCoalesceAcrossRadixNodes() throws {
        let memory = GuestPhysicalMemory()
        // Across a leaf-node boundary (frame 0x2000 starts the second leaf) ...
        try memory.back(gpa(0x1FFF000), size: pageSize)
        try memory.back(gpa(0x2000000), size: pageSize)
        // ... and across a top-level boundary (frame 1 << 26), backed in one call.
        try memory.back(gpa((1 << 38) - 2 * pageSize), size: 4 * pageSize)
        // A lone frame near the top of the address space.
        try memory.back(gpa((1 << 52) - pageSize), size: pageSize)
        let expected: [(UInt64, UInt64)] = [
            (0x1FFF000, 2 * pageSize), ((1 << 38) - 2 * pageSize, 4 * pageSize), ((1 << 52) - pageSize, pageSize),
        ]
        #expect(rangesEqual(memory.backedRanges, expected), "\(describe(memory.backedRanges))")
        #expect(memory.backedPageCount == 7)
        // Data written across those boundaries reads back.
        let data = (0..<64).map { UInt8($0) }
        try memory.write(gpa(0x1FFFFE0), bytes: data)
        try memory.write(gpa((1 << 38) - 32), bytes: data)
        #expect(try memory.read(gpa(0x1FFFFE0), count: 64) == data)
        #expect(try memory.read(gpa((1 << 38) - 32), count: 64) == data)
    }

    /// Random backs, writes and reads against a model: a set of backed frames and a dictionary of
    /// non-zero bytes.
    @Test(arguments: [UInt64(1), 2, 0xDEAD_BEEF])
    func randomOperationsMatchAModel(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let memory = GuestPhysicalMemory(sizeLimit: 96 * pageSize)
        var backedFrames = Set<UInt64>()
        var model: [UInt64: UInt8] = [:]
        // Windows of 16 pages around interesting places: zero, a leaf-node boundary, a top-level
        // boundary and the very top of the 52-bit space.
        let windows: [UInt64] = [0, 0x2000000 - 8 * pageSize, (1 << 38) - 8 * pageSize, (1 << 52) - 12 * pageSize]
        let windowSize = 16 * pageSize
        func randomAddress() -> UInt64 { windows[Int(random.next() % 4)] + random.next() % windowSize }
        func randomLength() -> UInt64 {
            switch random.next() % 4 {
            case 0: 1 + random.next() % 8
            case 1: 1 + random.next() % 64
            case 2: 1 + random.next() % (2 * pageSize)
            default: random.next() % (3 * pageSize)
            }
        }
        /// The first byte of `[address, address + length)` with no frame behind it.
        func firstUnbacked(_ address: UInt64, _ length: UInt64) -> UInt64? {
            var cursor = address
            while cursor < address + length {
                if !backedFrames.contains(cursor >> 12) { return cursor }
                cursor = (cursor & ~pageOffsetMask) + pageSize
            }
            return nil
        }
        func modelRanges() -> [(UInt64, UInt64)] {
            var ranges: [(UInt64, UInt64)] = []
            for frame in backedFrames.sorted() {
                if let last = ranges.last, last.0 + last.1 == frame << 12 {
                    ranges[ranges.count - 1].1 += pageSize
                } else {
                    ranges.append((frame << 12, pageSize))
                }
            }
            return ranges
        }

        let operations = 1000
        for step in 0..<operations {
            let address = randomAddress()
            let length = randomLength()
            switch random.next() % 10 {
            case 0, 1:
                // back
                let end = address + length
                let newFrames = length == 0 ? [] : (address >> 12...(end - 1) >> 12).filter { !backedFrames.contains($0) }
                let error = memoryError { () throws(GuestMemoryError) in try memory.back(gpa(address), size: length) }
                if length == 0 {
                    #expect(error == nil)
                } else if end > 1 << 52 {
                    #expect(error == .beyondPhysicalAddressSpace(gpa(address), size: length), "step \(step)")
                } else if UInt64(backedFrames.count + newFrames.count) * pageSize > memory.sizeLimit {
                    #expect(error == .sizeLimitExceeded(requested: UInt64(newFrames.count) * pageSize, limit: memory.sizeLimit),
                            "step \(step)")
                } else {
                    #expect(error == nil, "step \(step)")
                    backedFrames.formUnion(newFrames)
                }
            case 2, 3, 4, 5:
                // write
                let data = random.bytes(Int(length))
                let error = memoryError { () throws(GuestMemoryError) in try memory.write(gpa(address), bytes: data) }
                if let unbacked = firstUnbacked(address, length) {
                    #expect(error == .unbacked(gpa(unbacked)), "step \(step)")
                } else {
                    #expect(error == nil, "step \(step)")
                    for (index, byte) in data.enumerated() { model[address + UInt64(index)] = byte }
                }
            default:
                // read
                var bytes: [UInt8] = []
                let error = memoryError { () throws(GuestMemoryError) in bytes = try memory.read(gpa(address), count: Int(length)) }
                if let unbacked = firstUnbacked(address, length) {
                    #expect(error == .unbacked(gpa(unbacked)), "step \(step)")
                } else {
                    #expect(error == nil, "step \(step)")
                    let expected = (0..<length).map { model[address + $0] ?? 0 }
                    #expect(bytes == expected, "step \(step): read \(hex(address))+\(hex(length)) differs")
                    if bytes != expected { return }
                }
            }
            if step % 100 == 0 {
                #expect(rangesEqual(memory.backedRanges, modelRanges()), "step \(step)")
            }
        }
        #expect(memory.backedPageCount == UInt64(backedFrames.count))
        #expect(rangesEqual(memory.backedRanges, modelRanges()),
                "\(describe(memory.backedRanges)) vs \(modelRanges().map { "\(hex($0.0))+\(hex($0.1))" })")
        // Every backed byte, checked at the end.
        for frame in backedFrames {
            let bytes = try memory.read(GuestFrameNumber(frame).address, count: Int(pageSize))
            let expected = (0..<pageSize).map { model[(frame << 12) + $0] ?? 0 }
            #expect(bytes == expected, "frame \(hex(frame))")
        }
    }
}
