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
public final class GuestPhysicalMemory: PhysicalMemory, ByteAccessibleMemory, @unchecked Sendable {
    /// Guest-physical addresses have at most 52 bits, so frame numbers have at most 40.
    public static let maxPhysicalAddressBits = 52

    /// Frame -> host page pointer, bit 0 set for read-only pages (see `FrameTable`).
    @usableFromInline let table = FrameTable()
    /// Host mappings of page blocks to unmap.
    private var allocations: [(pointer: UnsafeMutableRawPointer, bytes: Int)] = []
    public private(set) var backedPageCount: UInt64 = 0
    /// The most bytes this memory will back; loaders of hostile files rely on it.
    public let sizeLimit: UInt64

    /// - Parameter sizeLimit: the most guest memory to back (default 64 GiB; host pages are
    ///   allocated lazily by the OS, so untouched guest memory costs little).
    public init(sizeLimit: UInt64 = 64 << 30) {
        self.sizeLimit = sizeLimit
    }

    deinit {
        for allocation in allocations { munmap(allocation.pointer, allocation.bytes) }
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
        FrameTable.hostPage(table.entry(frame.rawValue))
    }

    /// The table entry of `frame` (0 when unbacked).
    @inlinable @inline(__always)
    func leafEntry(_ frame: UInt64) -> UInt { table.entry(frame) }

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
        for frame in firstFrame..<endFrame where leafEntry(frame) == 0 {
            missing += 1
            if missing > budget && !countsExactly {
                throw .sizeLimitExceeded(requested: (endFrame - firstFrame) << UInt64(pageShift), limit: sizeLimit)
            }
        }
        guard missing <= budget else { throw .sizeLimitExceeded(requested: missing << UInt64(pageShift), limit: sizeLimit) }
        guard missing > 0 else { return }
        let block = try mapZeroed(Int(missing << UInt64(pageShift)))
        var next = block
        for frame in firstFrame..<endFrame where leafEntry(frame) == 0 {
            try setLeafEntry(frame, UInt(bitPattern: next) | (readOnly ? 1 : 0))
            next += Int(pageSize)
        }
        backedPageCount += missing
    }

    private func setLeafEntry(_ frame: UInt64, _ value: UInt) throws(GuestMemoryError) {
        guard table.set(frame, value) else { throw .allocationFailed(bytes: UInt64(FrameTable.nodeBytes)) }
    }

    /// Marks already-backed frames of the range read-only or writable: all of them, or (when some
    /// frame is not backed) none.
    public func setReadOnly(_ address: GuestPhysicalAddress, size: UInt64, _ readOnly: Bool) throws(GuestMemoryError) {
        let range = try frames(address, size: size)
        for frame in range where leafEntry(frame) == 0 {
            throw .unbacked(GuestPhysicalAddress(max(frame << UInt64(pageShift), address.rawValue)))
        }
        for frame in range {
            let entry = leafEntry(frame)
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

    public func overflowFailure(_ address: GuestPhysicalAddress, count: UInt64) -> GuestMemoryError {
        .beyondPhysicalAddressSpace(address, size: count)
    }

    /// Only unbacked bytes are refused: this memory is written by the host (loaders, tests), which
    /// ignores read-only marks.
    public func refusal(of page: HostPage?, at address: GuestPhysicalAddress, writing: Bool) -> GuestMemoryError? {
        page == nil ? .unbacked(address) : nil
    }

    /// Copies bytes out of guest memory; every byte must be backed.
    public func read(_ address: GuestPhysicalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        try forEachChunk(address, count: UInt64(buffer.count), writing: false) { page, offset, done, length in
            buffer.baseAddress!.advanced(by: done).copyMemory(from: page + offset, byteCount: length)
        }
    }


    /// Copies bytes into guest memory, ignoring read-only marks (this is the host writing, as a
    /// loader or a test does, not the guest); every byte must be backed.
    public func write(_ address: GuestPhysicalAddress, from buffer: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        try forEachChunk(address, count: UInt64(buffer.count), writing: false) { page, offset, done, length in
            (page + offset).copyMemory(from: buffer.baseAddress!.advanced(by: done), byteCount: length)
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
        table.forEachEntry { frame, _ in add(frame) }
        return ranges
    }
}
