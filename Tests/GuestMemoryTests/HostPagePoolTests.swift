import Foundation
import GuestMemory
import Testing
import X86Paging

/// Runs `body` and returns the error it threw, or nil.
func caught<Failure: Error>(_ body: () throws(Failure) -> Void) -> Failure? {
    do throws(Failure) {
        try body()
        return nil
    } catch {
        return error
    }
}

private func hfn(_ value: UInt64) -> HostFrameNumber { HostFrameNumber(value) }

/// Fills the frame's page with `byte`.
private func fill(_ pool: HostPagePool, _ frame: HostFrameNumber, pages: Int = 1, with byte: UInt8) {
    pool.pointer(frame).initializeMemory(as: UInt8.self, repeating: byte, count: pages * Int(pageSize))
}

private func isZero(_ pool: HostPagePool, _ frame: HostFrameNumber, pages: Int = 1) -> Bool {
    let bytes = UnsafeRawBufferPointer(start: pool.pointer(frame), count: pages * Int(pageSize))
    return bytes.allSatisfy { $0 == 0 }
}

@Suite("HostPagePool")
struct HostPagePoolTests {
    @Test func freshPoolNumbersFramesFromFourGiB() throws {
        let pool = try HostPagePool(capacityPages: 100)
        #expect(pool.capacityPages == 100)
        #expect(pool.allocatedPages == 0)
        #expect(pool.freePages == 100)
        #expect(pool.largestFreeRun == 100)
        #expect(pool.firstFrame == HostPagePool.defaultFirstFrame)
        #expect(pool.firstFrame == hfn(0x10_0000))
        #expect(pool.firstFrame.address == HostPhysicalAddress(1 << 32))
        #expect(pool.lastFrame == hfn(0x10_0000 + 99))
        #expect(pool.contains(pool.firstFrame) && pool.contains(pool.lastFrame))
        #expect(!pool.contains(hfn(0)) && !pool.contains(hfn(0xFFFFF)) && !pool.contains(hfn(0x10_0000 + 100)))
        #expect(!pool.isAllocated(pool.firstFrame))
    }

    @Test func pointersAndFramesRoundTrip() throws {
        let pool = try HostPagePool(capacityPages: 16, firstFrame: hfn(0x200))
        let base = pool.pointer(hfn(0x200))
        for page in 0..<16 {
            let frame = hfn(0x200 + UInt64(page))
            #expect(pool.pointer(frame) == base + page * 4096)
            #expect(pool.frame(of: pool.pointer(frame)) == frame)
            #expect(pool.frame(of: pool.pointer(frame) + 4095) == frame)
        }
        #expect(pool.frame(of: base - 1) == nil)
        #expect(pool.frame(of: base + 16 * 4096) == nil)
        #expect(Int(bitPattern: base) % 4096 == 0)
    }

    @Test func invalidCapacities() {
        #expect(caught { () throws(HostPagePoolError) in _ = try HostPagePool(capacityPages: 0) } == .invalidCapacity(pages: 0))
        #expect(caught { () throws(HostPagePoolError) in _ = try HostPagePool(capacityPages: -3) } == .invalidCapacity(pages: -3))
        #expect(caught { () throws(HostPagePoolError) in _ = try HostPagePool(capacityPages: 1, firstFrame: hfn(0)) }
            == .invalidCapacity(pages: 1))
        #expect(caught { () throws(HostPagePoolError) in _ = try HostPagePool(capacityPages: 2, firstFrame: hfn((1 << 40) - 1)) }
            == .invalidCapacity(pages: 2))
    }

    @Test func allocationIsContiguousAndFirstFit() throws {
        let pool = try HostPagePool(capacityPages: 64)
        let first = pool.firstFrame.rawValue
        let a = try pool.allocate(pages: 3)
        let b = try pool.allocate(pages: 2)
        let c = try pool.allocatePage()
        #expect(a == hfn(first) && b == hfn(first + 3) && c == hfn(first + 5))
        #expect(pool.allocatedPages == 6)
        try pool.free(a, pages: 3)
        #expect(pool.allocatedPages == 3)
        // First fit: a 2-page run goes into the hole left by `a`, the next one does not fit there.
        #expect(try pool.allocate(pages: 2) == hfn(first))
        #expect(try pool.allocate(pages: 2) == hfn(first + 6))
        #expect(try pool.allocatePage() == hfn(first + 2))
        #expect(pool.isAllocated(hfn(first + 2)) && !pool.isAllocated(hfn(first + 8)))
    }

    @Test func reusedPagesAreZeroed() throws {
        let pool = try HostPagePool(capacityPages: 256)
        // Small runs are cleared by hand, runs of 16+ pages are handed back to the OS.
        for pages in [1, 3, 16, 40] {
            let frame = try pool.allocate(pages: pages)
            #expect(isZero(pool, frame, pages: pages))
            fill(pool, frame, pages: pages, with: 0xA5)
            try pool.free(frame, pages: pages)
            let again = try pool.allocate(pages: pages)
            #expect(again == frame)
            #expect(isZero(pool, again, pages: pages), "\(pages) pages")
            try pool.free(again, pages: pages)
        }
        // A partial free of a larger allocation zeroes exactly the freed part.
        let run = try pool.allocate(pages: 20)
        fill(pool, run, pages: 20, with: 0x5A)
        try pool.free(HostFrameNumber(run.rawValue + 2), pages: 17)
        #expect(pool.pointer(run).load(fromByteOffset: 8191, as: UInt8.self) == 0x5A)
        #expect(isZero(pool, HostFrameNumber(run.rawValue + 2), pages: 17))
        #expect(pool.pointer(HostFrameNumber(run.rawValue + 19)).load(as: UInt8.self) == 0x5A)
    }

    @Test func exhaustionReportsSizes() throws {
        let pool = try HostPagePool(capacityPages: 8)
        var frames: [HostFrameNumber] = []
        for _ in 0..<8 { frames.append(try pool.allocatePage()) }
        #expect(caught { () throws(HostPagePoolError) in _ = try pool.allocatePage() }
            == .exhausted(requested: 1, capacity: 8, allocated: 8, largestFreeRun: 0))
        for index in [1, 3, 4, 6] { try pool.freePage(frames[index]) }
        // Four pages free, but no three of them contiguous.
        let error = caught { () throws(HostPagePoolError) in _ = try pool.allocate(pages: 3) }
        #expect(error == .exhausted(requested: 3, capacity: 8, allocated: 4, largestFreeRun: 2))
        #expect(error?.description == "host page pool exhausted: 3 contiguous pages requested, 4 of 8 in use, largest free run 2 pages")
        #expect(try pool.allocate(pages: 2) == frames[3])
        #expect(caught { () throws(HostPagePoolError) in _ = try pool.allocate(pages: 9) }
            == .exhausted(requested: 9, capacity: 8, allocated: 6, largestFreeRun: 1))
        #expect(caught { () throws(HostPagePoolError) in _ = try pool.allocate(pages: 0) } == .invalidPageCount(0))
    }

    @Test func badFreesAreDetectedAndChangeNothing() throws {
        let pool = try HostPagePool(capacityPages: 32)
        let first = pool.firstFrame.rawValue
        let run = try pool.allocate(pages: 4)
        try pool.free(HostFrameNumber(first + 1), pages: 2)
        // Freeing the whole run again: frame +1 is already free. Frame +0 stays allocated.
        #expect(caught { () throws(HostPagePoolError) in try pool.free(run, pages: 4) } == .doubleFree(hfn(first + 1)))
        #expect(pool.isAllocated(run) && pool.allocatedPages == 2)
        #expect(caught { () throws(HostPagePoolError) in try pool.freePage(hfn(first + 2)) } == .doubleFree(hfn(first + 2)))
        // Never handed out.
        let never = caught { () throws(HostPagePoolError) in try pool.freePage(hfn(first + 10)) }
        #expect(never == .neverAllocated(hfn(first + 10)))
        #expect(never?.description == "cannot free pfn 0x10000a: it was never allocated")
        #expect(caught { () throws(HostPagePoolError) in try pool.free(hfn(first + 3), pages: 2) } == .neverAllocated(hfn(first + 4)))
        #expect(pool.isAllocated(hfn(first + 3)))
        // Outside the pool, or running off its end.
        #expect(caught { () throws(HostPagePoolError) in try pool.freePage(hfn(5)) }
            == .notInPool(hfn(5), pages: 1, pool: pool.firstFrame...pool.lastFrame))
        #expect(caught { () throws(HostPagePoolError) in try pool.free(pool.lastFrame, pages: 2) }
            == .notInPool(pool.lastFrame, pages: 2, pool: pool.firstFrame...pool.lastFrame))
        #expect(caught { () throws(HostPagePoolError) in try pool.free(run, pages: 0) } == .invalidPageCount(0))
        #expect(pool.allocatedPages == 2)
        try pool.freePage(run)
        try pool.freePage(hfn(first + 3))
        #expect(pool.allocatedPages == 0)
        #expect(pool.largestFreeRun == 32)
    }

    /// Random allocations and frees against a model of which pages are in use: the pool must give
    /// out the lowest fitting run, never overlap, zero every page it hands out, and reject bad frees.
    @Test(arguments: [1, 2, 3] as [UInt64])
    func randomAgainstModel(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let capacity = 61 + Int(seed) * 50  // not a multiple of 64
        let pool = try HostPagePool(capacityPages: capacity)
        let first = pool.firstFrame.rawValue
        var inUse = [Bool](repeating: false, count: capacity)
        var everUsed = [Bool](repeating: false, count: capacity)
        var runs: [(start: Int, pages: Int)] = []
        func modelFirstFit(_ pages: Int) -> Int? {
            var start = 0
            while start + pages <= capacity {
                if let busy = (start..<start + pages).last(where: { inUse[$0] }) { start = busy + 1 } else { return start }
            }
            return nil
        }
        for _ in 0..<1500 {
            switch random.next() % 8 {
            case 0...3:
                let pages = random.next() % 4 == 0 ? Int(random.next() % 24) + 1 : 1
                let expected = modelFirstFit(pages)
                do throws(HostPagePoolError) {
                    let frame = try pool.allocate(pages: pages)
                    let start = Int(frame.rawValue - first)
                    #expect(start == expected)
                    #expect(isZero(pool, frame, pages: pages))
                    fill(pool, frame, pages: pages, with: UInt8(truncatingIfNeeded: random.next() | 1))
                    for page in start..<start + pages { inUse[page] = true; everUsed[page] = true }
                    runs.append((start, pages))
                } catch {
                    #expect(expected == nil, "\(error)")
                    guard case .exhausted(let requested, _, let allocated, _) = error else {
                        Issue.record("unexpected \(error)")
                        continue
                    }
                    #expect(requested == pages && allocated == inUse.count(where: { $0 }))
                }
            case 4...6 where !runs.isEmpty:
                // Free a whole run or a piece of one.
                let index = Int(random.next() % UInt64(runs.count))
                let run = runs.remove(at: index)
                let skip = random.next() % 3 == 0 ? Int(random.next() % UInt64(run.pages)) : 0
                let count = run.pages - skip
                try pool.free(HostFrameNumber(first + UInt64(run.start + skip)), pages: count)
                for page in run.start + skip..<run.start + run.pages { inUse[page] = false }
                if skip > 0 { runs.append((run.start, skip)) }
            default:
                // A bad free: a page not in use.
                guard let page = (0..<capacity).filter({ !inUse[$0] }).randomElement(using: &random) else { continue }
                let error = caught { () throws(HostPagePoolError) in try pool.freePage(HostFrameNumber(first + UInt64(page))) }
                let frame = HostFrameNumber(first + UInt64(page))
                let highWater = (everUsed.lastIndex(of: true) ?? -1) + 1
                #expect(error == (page < highWater ? .doubleFree(frame) : .neverAllocated(frame)))
            }
            #expect(pool.allocatedPages == inUse.count(where: { $0 }))
        }
        for page in 0..<capacity { #expect(pool.isAllocated(HostFrameNumber(first + UInt64(page))) == inUse[page]) }
    }

    @Test func concurrentAllocationsNeverShareFrames() throws {
        let pool = try HostPagePool(capacityPages: 4096)
        let threads = 2, perThread = 1000
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var held: [HostFrameNumber] = []
            for index in 0..<perThread {
                let frame = try! pool.allocatePage()
                pool.pointer(frame).storeBytes(of: UInt64(thread), as: UInt64.self)
                held.append(frame)
                // Free every other page again; the rest stay allocated until the end.
                if index % 2 == 1 {
                    let victim = held.removeFirst()
                    #expect(pool.pointer(victim).load(as: UInt64.self) == UInt64(thread))
                    try! pool.freePage(victim)
                }
            }
            for frame in held {
                #expect(pool.pointer(frame).load(as: UInt64.self) == UInt64(thread))
            }
        }
        #expect(pool.allocatedPages == threads * perThread / 2)
    }
}
