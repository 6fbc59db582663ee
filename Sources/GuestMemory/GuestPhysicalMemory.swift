import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Errors of the guest-memory layer, each with the address or size that caused it.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The range does not fit in the 52-bit guest-physical address space.
    case beyondPhysicalAddressSpace(GuestPhysicalAddress, size: UInt64)
    /// Backing the range would take the memory past its size limit.
    case sizeLimitExceeded(requested: UInt64, limit: UInt64)
    /// Some byte of the range has no memory behind it.
    case unbacked(GuestPhysicalAddress)
    case allocationFailed(bytes: UInt64)

    public var description: String {
        switch self {
        case .beyondPhysicalAddressSpace(let address, let size):
            "range \(address)+\(hex(size)) lies beyond the 52-bit guest-physical address space"
        case .sizeLimitExceeded(let requested, let limit):
            "backing \(requested) more bytes would exceed the guest memory limit of \(limit) bytes"
        case .unbacked(let address): "no guest memory at \(address)"
        case .allocationFailed(let bytes): "could not allocate \(bytes) bytes of host memory"
        }
    }
}

/// Sparse, page-granular guest-physical memory: each 4 KiB guest frame either has a host page
/// behind it or does not. Lookups of the first 32 GiB index one flat array (one load); above that
/// they go through a fixed three-level radix tree over the 40-bit frame number (three dependent
/// loads). No hashing, no allocation, so a page walk stays in the tens of nanoseconds.
///
/// Thread safety: lookups and reads/writes of guest bytes may run concurrently with each other;
/// adding memory must not run concurrently with anything else.
public final class GuestPhysicalMemory: PhysicalMemory, @unchecked Sendable {
    /// Guest-physical addresses have at most 52 bits, so frame numbers have at most 40.
    public static let maxPhysicalAddressBits = 52
    static let frameBits = 40
    static let leafBits = 13
    static let middleBits = 13
    static let topBits = frameBits - leafBits - middleBits  // 14

    /// Entries of the leaf level: a page pointer whose bit 0 is set when the page is read-only
    /// (pages are 4 KiB aligned, so the low bits of the pointer are free).
    @usableFromInline typealias Leaf = UnsafeMutablePointer<UInt>
    @usableFromInline typealias Middle = UnsafeMutablePointer<Leaf?>
    @usableFromInline let top: UnsafeMutablePointer<Middle?>
    /// Leaf entries for the low `lowFrames` frames in one flat array, so that the common case
    /// (page tables and RAM in the first 32 GiB) is one load instead of three dependent ones. The
    /// array is an anonymous mapping: only the parts covering backed frames become resident.
    @usableFromInline let low: UnsafeMutablePointer<UInt>
    @usableFromInline static var lowFrames: UInt64 { 1 << 23 }
    /// Which 512-frame chunks of `low` hold entries, so enumeration skips the untouched rest.
    private var lowChunksInUse = [UInt64](repeating: 0, count: (1 << 23) / 512 / 64)
    /// Host mappings to unmap: page blocks and radix nodes.
    private var allocations: [(pointer: UnsafeMutableRawPointer, bytes: Int)] = []
    public private(set) var backedPageCount: UInt64 = 0
    /// The most bytes this memory will back; loaders of hostile files rely on it.
    public let sizeLimit: UInt64

    /// - Parameter sizeLimit: the most guest memory to back (default 64 GiB; host pages are
    ///   allocated lazily by the OS, so untouched guest memory costs little).
    public init(sizeLimit: UInt64 = 64 << 30) {
        self.sizeLimit = sizeLimit
        let count = 1 << Self.topBits
        top = UnsafeMutablePointer<Middle?>.allocate(capacity: count)
        top.initialize(repeating: nil, count: count)
        let lowBytes = Int(Self.lowFrames) * MemoryLayout<UInt>.stride
        let mapping = mmap(nil, lowBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapping, mapping != MAP_FAILED else {
            fatalError("cannot reserve \(lowBytes) bytes of address space for the guest frame table")
        }
        low = mapping.bindMemory(to: UInt.self, capacity: Int(Self.lowFrames))
    }

    deinit {
        for allocation in allocations { munmap(allocation.pointer, allocation.bytes) }
        munmap(low, Int(Self.lowFrames) * MemoryLayout<UInt>.stride)
        top.deallocate()
    }

    /// Zeroed host memory from an anonymous mapping: the kernel supplies zero pages on first touch,
    /// so backing a large guest (or a hostile core's sparse segments) costs only what is used.
    private func mapZeroed(_ bytes: Int) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        let pointer = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let pointer, pointer != MAP_FAILED else { throw .allocationFailed(bytes: UInt64(bytes)) }
        allocations.append((pointer, bytes))
        return pointer
    }

    // MARK: Lookup (the hot path)

    @inlinable
    public func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        guard let entry = leafEntry(frame.rawValue), entry != 0 else { return nil }
        return HostPage(bytes: UnsafeMutableRawPointer(bitPattern: entry & ~1)!, isWritable: entry & 1 == 0)
    }

    /// The radix walk, with the geometry as literals (40-bit frames: 14 top, 13 middle, 13 leaf
    /// bits) because static constants read from inlined code cost an accessor call each.
    @inlinable @inline(__always)
    func leafEntry(_ frame: UInt64) -> UInt? {
        if frame < 1 << 23 { return low[Int(frame)] }
        guard frame >> 40 == 0 else { return nil }
        guard let middle = top[Int(frame >> 26)] else { return nil }
        guard let leaf = middle[Int((frame >> 13) & 0x1FFF)] else { return nil }
        return leaf[Int(frame & 0x1FFF)]
    }

    /// Whether the frame has memory behind it.
    public func isBacked(_ frame: GuestFrameNumber) -> Bool { hostPage(frame) != nil }

    // MARK: Adding memory

    /// Backs every frame of `[address, address + size)` that has no memory yet with zeroed host
    /// pages. `readOnly` applies to the newly backed frames.
    public func back(_ address: GuestPhysicalAddress, size: UInt64, readOnly: Bool = false) throws(GuestMemoryError) {
        guard size > 0 else { return }
        let (end, overflow) = address.rawValue.addingReportingOverflow(size)
        guard !overflow, end <= 1 << UInt64(Self.maxPhysicalAddressBits) else {
            throw .beyondPhysicalAddressSpace(address, size: size)
        }
        let firstFrame = address.rawValue >> UInt64(pageShift)
        let endFrame = (end + pageOffsetMask) >> UInt64(pageShift)
        // Count what is missing. A huge range gives up as soon as it exceeds the budget (reporting
        // the whole range), so that an absurd request fails at once instead of after counting 2^40
        // frames; a modest one is counted through to report exactly how much it lacked.
        let budget = (sizeLimit >> UInt64(pageShift)) &- min(backedPageCount, sizeLimit >> UInt64(pageShift))
        let countsExactly = endFrame - firstFrame <= 1 << 21
        var missing: UInt64 = 0
        for frame in firstFrame..<endFrame where leafEntry(frame) ?? 0 == 0 {
            missing += 1
            if missing > budget && !countsExactly {
                throw .sizeLimitExceeded(requested: (endFrame - firstFrame) << UInt64(pageShift), limit: sizeLimit)
            }
        }
        guard missing <= budget else { throw .sizeLimitExceeded(requested: missing << UInt64(pageShift), limit: sizeLimit) }
        guard missing > 0 else { return }
        let block = try mapZeroed(Int(missing << UInt64(pageShift)))
        var next = block
        for frame in firstFrame..<endFrame where leafEntry(frame) ?? 0 == 0 {
            try setLeafEntry(frame, UInt(bitPattern: next) | (readOnly ? 1 : 0))
            next += Int(pageSize)
        }
        backedPageCount += missing
    }

    /// Radix nodes come from anonymous mappings too (all-zero bits are nil pointers and empty
    /// entries), so a sparse layout makes resident only the node pages it touches.
    private func setLeafEntry(_ frame: UInt64, _ value: UInt) throws(GuestMemoryError) {
        if frame < Self.lowFrames {
            low[Int(frame)] = value
            let chunk = Int(frame >> 9)
            lowChunksInUse[chunk >> 6] |= 1 << UInt64(chunk & 63)
            return
        }
        let topIndex = Int(frame >> UInt64(Self.leafBits + Self.middleBits))
        let middle: Middle
        if let existing = top[topIndex] {
            middle = existing
        } else {
            middle = try mapZeroed(MemoryLayout<Leaf?>.stride << Self.middleBits).bindMemory(
                to: Leaf?.self, capacity: 1 << Self.middleBits)
            top[topIndex] = middle
        }
        let middleIndex = Int((frame >> UInt64(Self.leafBits)) & ((1 << UInt64(Self.middleBits)) - 1))
        let leaf: Leaf
        if let existing = middle[middleIndex] {
            leaf = existing
        } else {
            leaf = try mapZeroed(MemoryLayout<UInt>.stride << Self.leafBits).bindMemory(to: UInt.self, capacity: 1 << Self.leafBits)
            middle[middleIndex] = leaf
        }
        leaf[Int(frame & ((1 << UInt64(Self.leafBits)) - 1))] = value
    }

    /// Marks already-backed frames of the range read-only or writable: all of them, or (when some
    /// frame is not backed) none.
    public func setReadOnly(_ address: GuestPhysicalAddress, size: UInt64, _ readOnly: Bool) throws(GuestMemoryError) {
        let range = try frames(address, size: size)
        for frame in range where leafEntry(frame) ?? 0 == 0 {
            throw .unbacked(GuestPhysicalAddress(max(frame << UInt64(pageShift), address.rawValue)))
        }
        for frame in range {
            let entry = leafEntry(frame)!
            try setLeafEntry(frame, (entry & ~1) | (readOnly ? 1 : 0))
        }
    }

    private func frames(_ address: GuestPhysicalAddress, size: UInt64) throws(GuestMemoryError) -> Range<UInt64> {
        guard size > 0 else { return 0..<0 }
        let (end, overflow) = address.rawValue.addingReportingOverflow(size)
        guard !overflow else { throw .beyondPhysicalAddressSpace(address, size: size) }
        return (address.rawValue >> UInt64(pageShift))..<((end + pageOffsetMask) >> UInt64(pageShift))
    }

    // MARK: Reading and writing guest bytes

    /// Copies bytes out of guest memory; every byte must be backed.
    public func read(_ address: GuestPhysicalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        try forEachChunk(address, count: UInt64(buffer.count)) { page, offset, done, length in
            buffer.baseAddress!.advanced(by: done).copyMemory(from: page + offset, byteCount: length)
        }
    }

    public func read(_ address: GuestPhysicalAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: GuestMemoryError?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(GuestMemoryError) { try read(address, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Copies bytes into guest memory, ignoring read-only marks (this is the host writing, as a
    /// loader or a test does, not the guest); every byte must be backed.
    public func write(_ address: GuestPhysicalAddress, from buffer: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        try forEachChunk(address, count: UInt64(buffer.count)) { page, offset, done, length in
            (page + offset).copyMemory(from: buffer.baseAddress!.advanced(by: done), byteCount: length)
        }
    }

    public func write(_ address: GuestPhysicalAddress, bytes: [UInt8]) throws(GuestMemoryError) {
        var failure: GuestMemoryError?
        bytes.withUnsafeBytes { buffer in
            do throws(GuestMemoryError) { try write(address, from: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    public func load64(_ address: GuestPhysicalAddress) throws(GuestMemoryError) -> UInt64 {
        try loadInteger(address, as: UInt64.self)
    }

    public func store64(_ value: UInt64, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        try storeInteger(value, at: address)
    }

    public func load32(_ address: GuestPhysicalAddress) throws(GuestMemoryError) -> UInt32 {
        try loadInteger(address, as: UInt32.self)
    }

    public func store32(_ value: UInt32, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        try storeInteger(value, at: address)
    }

    private func loadInteger<T: FixedWidthInteger>(_ address: GuestPhysicalAddress, as _: T.Type) throws(GuestMemoryError) -> T {
        var value: T = 0
        var failure: GuestMemoryError?
        withUnsafeMutableBytes(of: &value) { buffer in
            do throws(GuestMemoryError) { try read(address, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return T(littleEndian: value)
    }

    private func storeInteger<T: FixedWidthInteger>(_ value: T, at address: GuestPhysicalAddress) throws(GuestMemoryError) {
        var failure: GuestMemoryError?
        withUnsafeBytes(of: value.littleEndian) { buffer in
            do throws(GuestMemoryError) { try write(address, from: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    private func forEachChunk(
        _ address: GuestPhysicalAddress, count: UInt64,
        _ body: (UnsafeMutableRawPointer, Int, Int, Int) -> Void
    ) throws(GuestMemoryError) {
        guard count > 0 else { return }
        let (_, overflow) = address.rawValue.addingReportingOverflow(count)
        guard !overflow else { throw .beyondPhysicalAddressSpace(address, size: count) }
        // Check the whole range first so a failed copy changes nothing.
        var cursor = address.rawValue & ~pageOffsetMask
        while cursor < address.rawValue + count {
            guard hostPage(GuestPhysicalAddress(cursor).frame) != nil else {
                throw .unbacked(GuestPhysicalAddress(max(cursor, address.rawValue)))
            }
            cursor += pageSize
        }
        var done: UInt64 = 0
        while done < count {
            let current = GuestPhysicalAddress(address.rawValue + done)
            let page = hostPage(current.frame)!
            let length = min(count - done, pageSize - current.pageOffset)
            body(page.bytes, Int(current.pageOffset), Int(done), Int(length))
            done += length
        }
    }

    // MARK: Layout

    /// The backed memory as maximal runs of consecutive frames, ascending.
    public var backedRanges: [(start: GuestPhysicalAddress, size: UInt64)] {
        var ranges: [(start: GuestPhysicalAddress, size: UInt64)] = []
        func add(_ frame: UInt64) {
            let address = frame << UInt64(pageShift)
            if let last = ranges.last, last.start.rawValue + last.size == address {
                ranges[ranges.count - 1].size += pageSize
            } else {
                ranges.append((GuestPhysicalAddress(address), pageSize))
            }
        }
        for (word, bits) in lowChunksInUse.enumerated() where bits != 0 {
            for bit in 0..<64 where bits & (1 << UInt64(bit)) != 0 {
                let firstFrame = UInt64(word * 64 + bit) << 9
                for frame in firstFrame..<firstFrame + 512 where low[Int(frame)] != 0 { add(frame) }
            }
        }
        let middleCount = 1 << Self.middleBits, leafCount = 1 << Self.leafBits
        for topIndex in 0..<(1 << Self.topBits) {
            guard let middle = top[topIndex] else { continue }
            for middleIndex in 0..<middleCount {
                guard let leaf = middle[middleIndex] else { continue }
                for leafIndex in 0..<leafCount where leaf[leafIndex] != 0 {
                    add(UInt64(topIndex) << UInt64(Self.leafBits + Self.middleBits)
                        | UInt64(middleIndex) << UInt64(Self.leafBits) | UInt64(leafIndex))
                }
            }
        }
        return ranges
    }
}
