import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Errors of the host page pool, each with the frames or sizes that caused it.
public enum HostPagePoolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The pool's capacity must be at least one page and keep host-physical addresses in 52 bits.
    case invalidCapacity(pages: Int)
    /// The host refused to reserve the arena.
    case reservationFailed(bytes: Int)
    /// An allocation or free of zero or a negative number of pages.
    case invalidPageCount(Int)
    /// No run of `requested` free contiguous pages is left.
    case exhausted(requested: Int, capacity: Int, allocated: Int, largestFreeRun: Int)
    /// Some frame of the range does not belong to the pool at all.
    case notInPool(HostFrameNumber, pages: Int, pool: ClosedRange<HostFrameNumber>)
    /// `frame` was allocated once but is already free.
    case doubleFree(HostFrameNumber)
    /// `frame` lies in the pool but was never handed out.
    case neverAllocated(HostFrameNumber)
    /// An allocation aligned to 0 frames.
    case invalidAlignment(UInt64)

    public var description: String {
        switch self {
        case .invalidCapacity(let pages):
            "a host page pool of \(pages) pages is impossible (at least 1, and host-physical addresses must fit 52 bits)"
        case .reservationFailed(let bytes): "could not reserve \(bytes) bytes of address space for the host page pool"
        case .invalidPageCount(let pages): "cannot allocate or free \(pages) pages; the count must be positive"
        case .exhausted(let requested, let capacity, let allocated, let largestFreeRun):
            "host page pool exhausted: \(requested) contiguous pages requested, \(allocated) of \(capacity) in use, "
                + "largest free run \(largestFreeRun) pages"
        case .notInPool(let frame, let pages, let pool):
            "\(frame) (+\(pages) pages) is outside the host page pool (\(pool.lowerBound) through \(pool.upperBound))"
        case .doubleFree(let frame): "double free of \(frame): it is already free"
        case .neverAllocated(let frame): "cannot free \(frame): it was never allocated"
        case .invalidAlignment(let alignment): "cannot align an allocation to \(alignment) frames"
        }
    }
}

/// Host "physical" memory: the frames that back guest RAM (memslots) and shadow/TDP page tables
/// alike, so that an SPTE holds a real host frame number and the hardware walker can follow it.
///
/// The pool is one anonymous mapping of `capacityPages` 4 KiB pages (reserved, not committed: the
/// OS supplies zero pages on first touch). Host frame number `firstFrame + n` is the arena's page
/// `n`. Numbering starts at `defaultFirstFrame` (pfn 0x100000, host-physical 4 GiB, where a PC's
/// RAM resumes above the PCI hole), so frame numbers look like real ones and pfn 0 is never valid.
///
/// Allocation is first-fit over a bitmap of the pages in use (one bit a page), searching from the
/// lowest page that may be free; freed pages are zeroed at once (large runs are handed back to the
/// OS, which zero-fills them on the next touch), so every free page is zero and allocation never
/// has to clear anything.
///
/// Thread safety: `allocate`, `free` and the counters take a lock; `pointer(_:)`, `frame(of:)`
/// and `contains(_:)` are arithmetic on immutable fields and never lock.
public final class HostPagePool: @unchecked Sendable {
    /// The first frame number of a pool (pfn 0x100000 = host-physical 4 GiB).
    public static let defaultFirstFrame = HostFrameNumber(0x10_0000)

    /// The arena's first byte: the page of `firstFrame`.
    @usableFromInline let base: UnsafeMutableRawPointer
    /// `firstFrame.rawValue`, for inlined arithmetic.
    @usableFromInline let firstFrameNumber: UInt64
    public let capacityPages: Int
    public var firstFrame: HostFrameNumber { HostFrameNumber(firstFrameNumber) }
    /// The last frame of the pool.
    public var lastFrame: HostFrameNumber { HostFrameNumber(firstFrameNumber + UInt64(capacityPages) - 1) }

    private let lock = Lock()
    /// One bit per page, set while the page is allocated. Bits past `capacityPages` in the last
    /// word are set, so searches stop at the end of the pool without a bound check.
    private let used: UnsafeMutablePointer<UInt64>
    private let wordCount: Int
    /// Every page below this index is in use.
    private var searchStart = 0
    /// One past the highest page ever allocated: a free page below it was freed (so freeing it
    /// again is a double free), one at or above it was never handed out.
    private var highWater = 0
    private var allocatedCount = 0
    private let hostPageSize: Int

    /// - Parameters:
    ///   - capacityPages: the pool's size in 4 KiB pages (address space is reserved, memory is not).
    ///   - firstFrame: the frame number of the arena's first page.
    public init(capacityPages: Int, firstFrame: HostFrameNumber = HostPagePool.defaultFirstFrame) throws(HostPagePoolError) {
        let frameLimit: UInt64 = 1 << 40  // host-physical addresses have at most 52 bits
        guard capacityPages > 0, firstFrame.rawValue > 0, firstFrame.rawValue < frameLimit,
              UInt64(capacityPages) <= frameLimit - firstFrame.rawValue,
              capacityPages <= Int.max >> pageShift
        else { throw .invalidCapacity(pages: capacityPages) }
        let bytes = capacityPages << pageShift
        let mapping = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapping, mapping != MAP_FAILED else { throw .reservationFailed(bytes: bytes) }
        base = mapping
        firstFrameNumber = firstFrame.rawValue
        self.capacityPages = capacityPages
        wordCount = (capacityPages + 63) / 64
        used = .allocate(capacity: wordCount)
        used.initialize(repeating: 0, count: wordCount)
        if capacityPages % 64 != 0 { used[wordCount - 1] = ~0 << UInt64(capacityPages % 64) }
        hostPageSize = max(Int(sysconf(Int32(_SC_PAGESIZE))), 1)
    }

    deinit {
        munmap(base, capacityPages << pageShift)
        used.deallocate()
    }

    // MARK: Frames and pointers (lock-free)

    /// Whether `frame` belongs to the pool (allocated or not).
    @inlinable @inline(__always)
    public func contains(_ frame: HostFrameNumber) -> Bool {
        frame.rawValue &- firstFrameNumber < UInt64(capacityPages)
    }

    /// The host page of `frame`, which must belong to the pool (checked in debug builds only).
    @inlinable @inline(__always)
    public func pointer(_ frame: HostFrameNumber) -> UnsafeMutableRawPointer {
        assert(contains(frame), "\(frame) is not in the host page pool")
        return base + Int(truncatingIfNeeded: (frame.rawValue &- firstFrameNumber) << 12)
    }

    /// The frame holding the byte `pointer` points at, or nil when it is outside the pool.
    @inlinable
    public func frame(of pointer: UnsafeRawPointer) -> HostFrameNumber? {
        let offset = UInt(bitPattern: pointer - UnsafeRawPointer(base))
        let page = UInt64(offset >> 12)
        guard page < UInt64(capacityPages) else { return nil }
        return HostFrameNumber(firstFrameNumber + page)
    }

    // MARK: Counters

    /// Pages currently allocated.
    public var allocatedPages: Int { lock.withLock { allocatedCount } }
    public var freePages: Int { capacityPages - allocatedPages }

    /// Whether `frame` is currently allocated.
    public func isAllocated(_ frame: HostFrameNumber) -> Bool {
        guard contains(frame) else { return false }
        let index = Int(frame.rawValue - firstFrameNumber)
        return lock.withLock { used[index >> 6] & (1 << UInt64(index & 63)) != 0 }
    }

    /// The longest run of free contiguous pages.
    public var largestFreeRun: Int { lock.withLock { largestRun() } }

    // MARK: Allocation

    /// A run of `pages` contiguous zeroed frames (the lowest run that fits); its first frame.
    public func allocate(pages: Int) throws(HostPagePoolError) -> HostFrameNumber {
        try allocate(pages: pages, alignment: 1, remainder: 0)
    }

    /// The lowest run of `pages` contiguous zeroed frames whose first frame number is `remainder`
    /// modulo `alignment` (how a VMM aligns a mapping of guest memory for huge host pages).
    public func allocate(pages: Int, alignment: UInt64, remainder: UInt64) throws(HostPagePoolError) -> HostFrameNumber {
        guard pages > 0 else { throw .invalidPageCount(pages) }
        guard alignment > 0 else { throw .invalidAlignment(alignment) }
        return try lock.withLock { () throws(HostPagePoolError) -> HostFrameNumber in
            guard pages <= capacityPages - allocatedCount, let start = findRun(pages, alignment: alignment, remainder: remainder) else {
                throw .exhausted(requested: pages, capacity: capacityPages, allocated: allocatedCount,
                                 largestFreeRun: largestRun())
            }
            setBits(start..<start + pages, true)
            if start == searchStart { searchStart = start + pages }
            highWater = max(highWater, start + pages)
            allocatedCount += pages
            return HostFrameNumber(firstFrameNumber + UInt64(start))
        }
    }

    /// One zeroed frame.
    public func allocatePage() throws(HostPagePoolError) -> HostFrameNumber {
        try allocate(pages: 1)
    }

    /// Returns `pages` frames from `first` to the pool, zeroing them. Every frame of the range must
    /// be allocated (any part of an allocation may be freed); otherwise nothing changes.
    public func free(_ first: HostFrameNumber, pages: Int) throws(HostPagePoolError) {
        guard pages > 0 else { throw .invalidPageCount(pages) }
        let start = first.rawValue &- firstFrameNumber
        guard start < UInt64(capacityPages), UInt64(pages) <= UInt64(capacityPages) - start else {
            throw .notInPool(first, pages: pages, pool: firstFrame...lastFrame)
        }
        let range = Int(start)..<Int(start) + pages
        try lock.withLock { () throws(HostPagePoolError) -> Void in
            if let free = firstClear(range) {
                let frame = HostFrameNumber(firstFrameNumber + UInt64(free))
                throw free < highWater ? .doubleFree(frame) : .neverAllocated(frame)
            }
            zero(range)
            setBits(range, false)
            searchStart = min(searchStart, range.lowerBound)
            allocatedCount -= pages
        }
    }

    /// Returns one frame to the pool.
    public func freePage(_ frame: HostFrameNumber) throws(HostPagePoolError) {
        try free(frame, pages: 1)
    }

    // MARK: The bitmap (lock held)

    /// The lowest index of a run of `count` clear bits whose frame number is `remainder` modulo
    /// `alignment`, or nil.
    private func findRun(_ count: Int, alignment: UInt64, remainder: UInt64) -> Int? {
        var start = searchStart
        while let free = nextClear(from: start) {
            // The first index at or after `free` with the wanted frame number modulo `alignment`.
            let frame = firstFrameNumber + UInt64(free)
            let skip = (remainder % alignment + alignment - frame % alignment) % alignment
            guard skip < UInt64(capacityPages - free) else { return nil }
            let candidate = free + Int(skip)
            guard candidate + count <= capacityPages else { return nil }
            let end = nextSet(from: candidate, limit: candidate + count)
            if end - candidate >= count { return candidate }
            start = max(end, candidate + 1)
        }
        return nil
    }

    /// The first clear bit at or after `index`, or nil when there is none in the pool.
    private func nextClear(from index: Int) -> Int? {
        var word = index >> 6
        guard word < wordCount else { return nil }
        var bits = ~used[word] & (~0 << UInt64(index & 63))
        while bits == 0 {
            word += 1
            guard word < wordCount else { return nil }
            bits = ~used[word]
        }
        return word << 6 + bits.trailingZeroBitCount
    }

    /// The first set bit in `index..<limit`, or `limit` (at most the pool's end).
    private func nextSet(from index: Int, limit: Int) -> Int {
        var word = index >> 6
        var bits = used[word] & (~0 << UInt64(index & 63))
        while bits == 0 {
            word += 1
            guard word < wordCount, word << 6 < limit else { return min(limit, capacityPages) }
            bits = used[word]
        }
        return min(word << 6 + bits.trailingZeroBitCount, limit)
    }

    /// The first clear bit in `range`, or nil when all are set.
    private func firstClear(_ range: Range<Int>) -> Int? {
        var index = range.lowerBound
        while index < range.upperBound {
            let word = index >> 6, bit = index & 63
            let width = min(64 - bit, range.upperBound - index)
            let mask: UInt64 = (width == 64 ? ~0 : (1 << UInt64(width)) - 1) << UInt64(bit)
            let clear = ~used[word] & mask
            if clear != 0 { return word << 6 + clear.trailingZeroBitCount }
            index += width
        }
        return nil
    }

    private func setBits(_ range: Range<Int>, _ value: Bool) {
        var index = range.lowerBound
        while index < range.upperBound {
            let word = index >> 6, bit = index & 63
            let width = min(64 - bit, range.upperBound - index)
            let mask: UInt64 = (width == 64 ? ~0 : (1 << UInt64(width)) - 1) << UInt64(bit)
            if value { used[word] |= mask } else { used[word] &= ~mask }
            index += width
        }
    }

    private func largestRun() -> Int {
        var best = 0, start = 0
        while let candidate = nextClear(from: start) {
            let end = nextSet(from: candidate, limit: capacityPages)
            best = max(best, end - candidate)
            start = end
        }
        return best
    }

    /// Zeroes the pages of `range`. Runs of 16 pages or more give their whole host pages back to
    /// the OS instead (Linux zero-fills private anonymous memory after MADV_DONTNEED), which also
    /// returns the memory; the partial host pages at either end are cleared by hand.
    private func zero(_ range: Range<Int>) {
        let start = base + range.lowerBound << pageShift
        let bytes = range.count << pageShift
        #if os(Linux)
        if range.count >= 16 {
            let first = (UInt(bitPattern: start) + UInt(hostPageSize) - 1) / UInt(hostPageSize) * UInt(hostPageSize)
            let end = (UInt(bitPattern: start) + UInt(bytes)) / UInt(hostPageSize) * UInt(hostPageSize)
            if end > first, madvise(UnsafeMutableRawPointer(bitPattern: first), Int(end - first), MADV_DONTNEED) == 0 {
                let head = Int(first - UInt(bitPattern: start))
                memset(start, 0, head)
                memset(start + Int(end - UInt(bitPattern: start)), 0, bytes - Int(end - UInt(bitPattern: start)))
                return
            }
        }
        #endif
        memset(start, 0, bytes)
    }
}

/// A mutex (pthread, so it needs no newer OS than the rest of the package).
final class Lock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}
