import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The VM's guest-physical address space as KVM sees it: memory slots, each a run of guest frames
// backed by a run of host frames, and MMIO everywhere else.

/// A memslot's flags, with KVM's `KVM_MEM_*` bit values.
public struct MemslotFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `KVM_MEM_LOG_DIRTY_PAGES`: record guest writes in a dirty bitmap.
    public static let logDirtyPages = MemslotFlags(rawValue: 1 << 0)
    /// `KVM_MEM_READONLY`: the guest may read and execute but not write (a write exits as MMIO).
    public static let readOnly = MemslotFlags(rawValue: 1 << 1)

    /// Every flag the model knows.
    public static let all: MemslotFlags = [.logDirtyPages, .readOnly]

    public var description: String {
        var names: [String] = []
        if contains(.logDirtyPages) { names.append("log-dirty-pages") }
        if contains(.readOnly) { names.append("read-only") }
        let unknown = subtracting(.all)
        if !unknown.isEmpty { names.append(hex(unknown.rawValue)) }
        return "[" + names.joined(separator: ", ") + "]"
    }
}

/// One memory slot: `pageCount` guest frames from `baseFrame`, backed by as many contiguous host
/// frames from `hostBase`.
public struct Memslot: Hashable, Sendable, CustomStringConvertible {
    public let id: Int
    public let baseFrame: GuestFrameNumber
    public let pageCount: UInt64
    public let flags: MemslotFlags
    /// The host frame behind `baseFrame`; frame `baseFrame + i` is backed by `hostBase + i`.
    public let hostBase: HostFrameNumber

    @inlinable
    public init(id: Int, baseFrame: GuestFrameNumber, pageCount: UInt64, flags: MemslotFlags, hostBase: HostFrameNumber) {
        self.id = id
        self.baseFrame = baseFrame
        self.pageCount = pageCount
        self.flags = flags
        self.hostBase = hostBase
    }

    /// The guest-physical address of the first byte.
    @inlinable public var baseAddress: GuestPhysicalAddress { baseFrame.address }
    /// The size in bytes.
    @inlinable public var size: UInt64 { pageCount << UInt64(pageShift) }
    /// One past the last frame.
    @inlinable public var endFrame: GuestFrameNumber { GuestFrameNumber(baseFrame.rawValue + pageCount) }
    @inlinable public var isReadOnly: Bool { flags.contains(.readOnly) }
    @inlinable public var logsDirtyPages: Bool { flags.contains(.logDirtyPages) }

    @inlinable
    public func contains(_ frame: GuestFrameNumber) -> Bool {
        frame.rawValue &- baseFrame.rawValue < pageCount
    }

    /// The host frame behind `frame`, or nil when the slot does not contain it.
    @inlinable
    public func hostFrame(for frame: GuestFrameNumber) -> HostFrameNumber? {
        guard contains(frame) else { return nil }
        return HostFrameNumber(hostBase.rawValue + (frame.rawValue - baseFrame.rawValue))
    }

    public var description: String {
        "slot \(id): \(baseAddress)+\(hex(size)) -> \(hostBase) \(flags)"
    }
}

/// Errors of changing the memslot layout (KVM_SET_USER_MEMORY_REGION's rules and more).
public enum MemslotError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The id is outside `0..<MemslotSet.slotLimit`.
    case invalidSlotID(Int)
    case duplicateSlotID(Int)
    case noSuchSlot(Int)
    /// The base address or the size is not a multiple of 4 KiB.
    case misaligned(id: Int, GuestPhysicalAddress, size: UInt64)
    /// A slot of size 0 (to KVM, a size of 0 means "delete the slot").
    case emptySlot(id: Int)
    /// The slot does not fit the 52-bit guest-physical address space.
    case beyondPhysicalAddressSpace(id: Int, GuestPhysicalAddress, size: UInt64)
    /// More pages than one slot can hold (KVM_MEM_MAX_NR_PAGES).
    case tooManyPages(id: Int, pages: UInt64, limit: UInt64)
    /// The new slot would share guest frames with `existing`.
    case overlap(id: Int, GuestPhysicalAddress, size: UInt64, existing: Memslot)
    /// Flags the model does not know.
    case invalidFlags(id: Int, MemslotFlags)
    /// KVM refuses to change KVM_MEM_READONLY on an existing slot (delete and re-add it).
    case readOnlyChange(id: Int)
    /// The slot does not log dirty pages, so it has no dirty bitmap (KVM: -ENOENT).
    case dirtyLoggingDisabled(id: Int)
    /// The host page pool could not back the slot.
    case hostMemory(id: Int, HostPagePoolError)
    /// The frame table could not grow.
    case allocationFailed(bytes: UInt64)

    public var description: String {
        switch self {
        case .invalidSlotID(let id): "memslot id \(id) is outside 0..<\(MemslotSet.slotLimit)"
        case .duplicateSlotID(let id): "memslot \(id) already exists"
        case .noSuchSlot(let id): "there is no memslot \(id)"
        case .misaligned(let id, let address, let size):
            "memslot \(id): base \(address) and size \(hex(size)) must both be multiples of 4 KiB"
        case .emptySlot(let id): "memslot \(id) has size 0 (use deleteSlot to delete a slot)"
        case .beyondPhysicalAddressSpace(let id, let address, let size):
            "memslot \(id): \(address)+\(hex(size)) lies beyond the 52-bit guest-physical address space"
        case .tooManyPages(let id, let pages, let limit): "memslot \(id): \(pages) pages exceed the limit of \(limit) a slot"
        case .overlap(let id, let address, let size, let existing):
            "memslot \(id): \(address)+\(hex(size)) overlaps \(existing)"
        case .invalidFlags(let id, let flags): "memslot \(id): unknown flags \(flags)"
        case .readOnlyChange(let id): "memslot \(id): the read-only flag of an existing slot cannot change"
        case .dirtyLoggingDisabled(let id): "memslot \(id) does not log dirty pages"
        case .hostMemory(let id, let error): "memslot \(id): \(error)"
        case .allocationFailed(let bytes): "could not allocate \(bytes) bytes of host memory for the frame table"
        }
    }
}

/// Errors of reading or writing guest memory through a `MemslotSet`.
public enum GuestAccessError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No memslot holds the address: it is MMIO.
    case mmio(GuestPhysicalAddress)
    /// A write to a read-only memslot.
    case readOnly(GuestPhysicalAddress, slot: Int)
    /// The range wraps past 2^64.
    case addressOverflow(GuestPhysicalAddress, count: UInt64)

    public var description: String {
        switch self {
        case .mmio(let address): "no memslot holds \(address) (MMIO)"
        case .readOnly(let address, let slot): "\(address) is in read-only memslot \(slot)"
        case .addressOverflow(let address, let count): "\(address)+\(hex(count)) wraps past the end of the address space"
        }
    }
}

/// The guest-physical address space of one VM: memslots backed by frames of a `HostPagePool`,
/// MMIO everywhere else, and each slot's dirty bitmap while it logs dirty pages.
///
/// `hostPage(_:)` is the same flat-table-plus-radix lookup as `GuestPhysicalMemory`'s (one load
/// below 32 GiB, three above; no hashing, no allocation), so page walks over a VM's memory cost
/// what they cost over a loaded image.
///
/// `generation` counts layout changes, as KVM's memslots generation does (the model has one
/// address space, so it steps by 1); MMIO SPTEs record it to notice that a layout changed.
///
/// Thread safety: lookups, reads and writes of guest bytes and `markDirty` may run concurrently
/// (dirty bits are set under a lock); adding, deleting or reflagging slots must not run
/// concurrently with anything else (KVM's SRCU plays that part in the kernel). Deleting a slot
/// returns its host frames to the pool at once, so whoever maps them (SPTEs) must drop those
/// mappings first, as KVM zaps a deleted slot's SPTEs.
public final class MemslotSet: PhysicalMemory, ByteAccessibleMemory, @unchecked Sendable {
    /// Slot ids are `0..<slotLimit` (x86 KVM_USER_MEM_SLOTS).
    public static let slotLimit = 32764
    /// The most pages one slot holds (KVM_MEM_MAX_NR_PAGES).
    public static let maxPagesPerSlot: UInt64 = (1 << 31) - 1

    public let pool: HostPagePool
    /// Guest frame -> host page pointer, bit 0 set in read-only slots (see `FrameTable`).
    @usableFromInline let table = FrameTable()

    /// A slot and its dirty bitmap (present while the slot logs dirty pages; guarded by
    /// `dirtyLock`).
    final class Record {
        var slot: Memslot
        var dirty: [UInt64]?
        init(_ slot: Memslot) { self.slot = slot }
        var bitmapWords: Int { Int((slot.pageCount + 63) / 64) }
    }

    /// Sorted by base frame.
    private var records: [Record] = []
    private var recordsByID: [Int: Record] = [:]
    private let dirtyLock = Lock()

    /// Bumped by every add, delete and flag change. Exempt from dynamic exclusivity checks: every
    /// TDP fault reads it (a checked read across modules cost a `swift_beginAccess`), and the
    /// changes that write it are serialised against the faults by mmu_lock and the memslots' srcu.
    @exclusivity(unchecked) public private(set) var generation: UInt64 = 0
    /// `generation` for the fault paths of other modules: read there, the property still cost a
    /// `swift_beginAccess` (measured, a TDP fault's 76 instructions); read in this module it is
    /// as unchecked as its attribute says.
    public var uncheckedGeneration: UInt64 { generation }
    /// Some slot logs dirty pages: without one, marking a page dirty is a single test. Kept up to
    /// date by every slot change (which callers serialise against everything else).
    @exclusivity(unchecked) public private(set) var isLoggingDirtyPages = false
    /// Pages in all slots.
    public private(set) var totalPages: UInt64 = 0

    public init(pool: HostPagePool) {
        self.pool = pool
    }

    deinit {
        for record in records { try? pool.free(record.slot.hostBase, pages: Int(record.slot.pageCount)) }
    }

    // MARK: Lookup (the hot path)

    @inlinable
    public func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        FrameTable.hostPage(table.entry(frame.rawValue))
    }

    /// The host frame behind `frame`, or nil when it is MMIO. O(1).
    @inlinable
    public func hostFrame(of frame: GuestFrameNumber) -> HostFrameNumber? {
        let entry = table.entry(frame.rawValue)
        guard entry != 0 else { return nil }
        return pool.frame(of: UnsafeRawPointer(bitPattern: entry & ~1)!)
    }

    /// The host frame behind `frame` and whether the guest may write it (not a read-only slot),
    /// or nil when it is MMIO. O(1): what KVM's fault path asks of `__gfn_to_pfn_memslot`.
    @inlinable
    public func backing(of frame: GuestFrameNumber) -> (frame: HostFrameNumber, writable: Bool)? {
        let entry = table.entry(frame.rawValue)
        guard entry != 0 else { return nil }
        return (pool.frame(of: UnsafeRawPointer(bitPattern: entry & ~1)!)!, entry & 1 == 0)
    }

    /// Whether no memslot holds `frame`. O(1).
    @inlinable
    public func isMMIO(_ frame: GuestFrameNumber) -> Bool {
        table.entry(frame.rawValue) == 0
    }

    /// The slot holding `frame` (a binary search over the slots).
    public func slot(containing frame: GuestFrameNumber) -> Memslot? {
        record(containing: frame)?.slot
    }

    public func slot(id: Int) -> Memslot? { recordsByID[id]?.slot }

    /// Every slot, by base address.
    public var slots: [Memslot] { records.map(\.slot) }

    private func record(containing frame: GuestFrameNumber) -> Record? {
        let index = firstIndex(endingAfter: frame.rawValue)
        guard index < records.count, records[index].slot.contains(frame) else { return nil }
        return records[index]
    }

    /// The index of the first slot whose end lies above `frame` (slots do not overlap, so their
    /// ends ascend with their bases).
    private func firstIndex(endingAfter frame: UInt64) -> Int {
        var low = 0, high = records.count
        while low < high {
            let middle = (low + high) / 2
            if records[middle].slot.endFrame.rawValue <= frame { low = middle + 1 } else { high = middle }
        }
        return low
    }

    // MARK: Changing the layout

    /// Adds a slot of zeroed memory at `base` (KVM_SET_USER_MEMORY_REGION creating a slot): base and
    /// size page-aligned, size > 0, the range inside 52 bits, no overlap with another slot, a new
    /// id. Its host frames come from the pool as one contiguous run, placed so that its first host
    /// frame is the slot's first guest frame plus `hostSkew` modulo `hostAlignment` frames (KVM's
    /// huge pages need the two aligned alike: a VMM aligns its mapping, `userspace_addr`, for
    /// that). The default places the run anywhere.
    @discardableResult
    public func addSlot(id: Int, base: GuestPhysicalAddress, size: UInt64, flags: MemslotFlags = [],
                        hostAlignment: UInt64 = 1, hostSkew: UInt64 = 0) throws(MemslotError) -> Memslot {
        guard flags.isSubset(of: .all) else { throw .invalidFlags(id: id, flags.subtracting(.all)) }
        guard (0..<Self.slotLimit).contains(id) else { throw .invalidSlotID(id) }
        guard size > 0 else { throw .emptySlot(id: id) }
        guard base.rawValue & pageOffsetMask == 0, size & pageOffsetMask == 0 else {
            throw .misaligned(id: id, base, size: size)
        }
        let (end, overflow) = base.rawValue.addingReportingOverflow(size)
        guard !overflow, end <= 1 << 52 else { throw .beyondPhysicalAddressSpace(id: id, base, size: size) }
        let pages = size >> UInt64(pageShift)
        guard pages <= Self.maxPagesPerSlot else { throw .tooManyPages(id: id, pages: pages, limit: Self.maxPagesPerSlot) }
        guard recordsByID[id] == nil else { throw .duplicateSlotID(id) }
        let baseFrame = base.frame.rawValue, endFrame = baseFrame + pages
        let index = firstIndex(endingAfter: baseFrame)
        if index < records.count, records[index].slot.baseFrame.rawValue < endFrame {
            throw .overlap(id: id, base, size: size, existing: records[index].slot)
        }
        guard table.reserveNodes(baseFrame..<endFrame) else {
            throw .allocationFailed(bytes: UInt64(FrameTable.nodeBytes))
        }
        let hostBase: HostFrameNumber
        do throws(HostPagePoolError) {
            hostBase = try pool.allocate(pages: Int(pages), alignment: hostAlignment,
                                         remainder: (baseFrame % max(hostAlignment, 1) + hostSkew % max(hostAlignment, 1)))
        } catch {
            throw .hostMemory(id: id, error)
        }
        let slot = Memslot(id: id, baseFrame: base.frame, pageCount: pages, flags: flags, hostBase: hostBase)
        let readOnlyBit: UInt = flags.contains(.readOnly) ? 1 : 0
        let firstPage = UInt(bitPattern: pool.pointer(hostBase))
        for page in 0..<pages {
            let stored = table.set(baseFrame + page, (firstPage + UInt(page) << UInt(pageShift)) | readOnlyBit)
            precondition(stored, "frame table nodes were reserved")
        }
        let record = Record(slot)
        if flags.contains(.logDirtyPages) { record.dirty = [UInt64](repeating: 0, count: record.bitmapWords) }
        records.insert(record, at: index)
        recordsByID[id] = record
        totalPages += pages
        generation += 1
        isLoggingDirtyPages = records.contains { $0.slot.logsDirtyPages }
        return slot
    }

    /// Deletes a slot; its frames become MMIO and its host frames go back to the pool.
    public func deleteSlot(id: Int) throws(MemslotError) {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        let slot = record.slot
        for page in 0..<slot.pageCount { _ = table.set(slot.baseFrame.rawValue + page, 0) }
        do throws(HostPagePoolError) {
            try pool.free(slot.hostBase, pages: Int(slot.pageCount))
        } catch {
            preconditionFailure("memslot \(id)'s host frames were not allocated: \(error)")
        }
        records.remove(at: firstIndex(endingAfter: slot.baseFrame.rawValue))
        recordsByID[id] = nil
        totalPages -= slot.pageCount
        generation += 1
        isLoggingDirtyPages = records.contains { $0.slot.logsDirtyPages }
    }

    /// Moves a slot to `base` (KVM_MR_MOVE: the same host memory, so the same contents, at another
    /// guest-physical address). Its flags and dirty bitmap go with it; the old range becomes MMIO.
    @discardableResult
    public func moveSlot(id: Int, to base: GuestPhysicalAddress) throws(MemslotError) -> Memslot {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        let old = record.slot
        guard base.rawValue & pageOffsetMask == 0 else { throw .misaligned(id: id, base, size: old.size) }
        let (end, overflow) = base.rawValue.addingReportingOverflow(old.size)
        guard !overflow, end <= 1 << 52 else { throw .beyondPhysicalAddressSpace(id: id, base, size: old.size) }
        let baseFrame = base.frame.rawValue, endFrame = baseFrame + old.pageCount
        for other in records where other !== record
            && other.slot.baseFrame.rawValue < endFrame && baseFrame < other.slot.endFrame.rawValue {
            throw .overlap(id: id, base, size: old.size, existing: other.slot)
        }
        guard table.reserveNodes(baseFrame..<endFrame) else {
            throw .allocationFailed(bytes: UInt64(FrameTable.nodeBytes))
        }
        for page in 0..<old.pageCount { _ = table.set(old.baseFrame.rawValue + page, 0) }
        let readOnlyBit: UInt = old.isReadOnly ? 1 : 0
        let firstPage = UInt(bitPattern: pool.pointer(old.hostBase))
        for page in 0..<old.pageCount {
            let stored = table.set(baseFrame + page, (firstPage + UInt(page) << UInt(pageShift)) | readOnlyBit)
            precondition(stored, "frame table nodes were reserved")
        }
        let moved = Memslot(id: id, baseFrame: base.frame, pageCount: old.pageCount, flags: old.flags, hostBase: old.hostBase)
        dirtyLock.withLock { record.slot = moved }
        records.removeAll { $0 === record }
        records.insert(record, at: firstIndex(endingAfter: baseFrame))
        generation += 1
        return moved
    }

    /// Changes a slot's flags (KVM_SET_USER_MEMORY_REGION on an existing slot with new flags).
    /// Turning dirty logging on gives the slot a clear dirty bitmap; turning it off drops it.
    /// The read-only flag cannot change, as in KVM. Setting the flags a slot already has changes
    /// nothing (not even the generation).
    public func setFlags(id: Int, flags: MemslotFlags) throws(MemslotError) {
        guard flags.isSubset(of: .all) else { throw .invalidFlags(id: id, flags.subtracting(.all)) }
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        guard flags != record.slot.flags else { return }
        guard flags.contains(.readOnly) == record.slot.isReadOnly else { throw .readOnlyChange(id: id) }
        dirtyLock.withLock {
            let old = record.slot
            record.slot = Memslot(id: old.id, baseFrame: old.baseFrame, pageCount: old.pageCount, flags: flags, hostBase: old.hostBase)
            if flags.contains(.logDirtyPages) {
                if record.dirty == nil { record.dirty = [UInt64](repeating: 0, count: record.bitmapWords) }
            } else {
                record.dirty = nil
            }
        }
        generation += 1
        isLoggingDirtyPages = records.contains { $0.slot.logsDirtyPages }
    }

    // MARK: Dirty logging

    /// Whether the slot holding `frame` logs dirty pages. A method rather than a property test for
    /// callers in other modules: read from there, the slot state costs a dynamic exclusivity check.
    public func logsDirtyPages(_ frame: GuestFrameNumber) -> Bool {
        isLoggingDirtyPages && record(containing: frame)?.slot.logsDirtyPages == true
    }

    /// The page walker set accessed/dirty bits in a guest table here: a write like any other.
    public func didWriteEntry(in frame: GuestFrameNumber) { markDirty(frame) }

    /// With a dirty ring (KVM_CAP_DIRTY_LOG_RING), where a logged write goes instead of the
    /// bitmap: the running vCPU's ring, given the slot and the page's offset in it.
    @exclusivity(unchecked) public var dirtyRingSink: ((_ slot: Int, _ offset: UInt64) -> Void)?

    /// Records a write to `frame` when its slot logs dirty pages (KVM's mark_page_dirty): in the
    /// slot's dirty bitmap, or with a dirty ring in the running vCPU's ring. Returns whether it
    /// was recorded.
    @discardableResult
    public func markDirty(_ frame: GuestFrameNumber) -> Bool {
        guard isLoggingDirtyPages else { return false }
        guard let record = record(containing: frame), record.slot.logsDirtyPages else { return false }
        let page = frame.rawValue - record.slot.baseFrame.rawValue
        if let dirtyRingSink {
            dirtyRingSink(record.slot.id, page)
            return true
        }
        return dirtyLock.withLock {
            guard record.dirty != nil else { return false }
            record.dirty![Int(page >> 6)] |= 1 << (page & 63)
            return true
        }
    }

    /// A copy of the slot's dirty bitmap: bit `i` of word `i / 64` for frame `baseFrame + i`.
    public func dirtyBitmap(slot id: Int) throws(MemslotError) -> [UInt64] {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        guard let bitmap = dirtyLock.withLock({ record.dirty }) else { throw .dirtyLoggingDisabled(id: id) }
        return bitmap
    }

    /// Copies the page at `frame` into `buffer` (512 words) with 8-byte single-copy-atomic loads:
    /// how a VMM reads guest memory while vCPUs write it (a live migration's page copy). False
    /// when no memslot holds `frame`.
    public func copyPageWhileRunning(_ frame: GuestFrameNumber, into buffer: UnsafeMutableBufferPointer<UInt64>) -> Bool {
        precondition(buffer.count >= 512, "a page is 512 words")
        guard let page = hostPage(frame) else { return false }
        for word in 0..<512 { buffer[word] = AtomicAccess.load(page.bytes + 8 * word, size: 8) }
        return true
    }

    /// The slot's dirty bitmap, cleared in the same step (KVM_GET_DIRTY_LOG without manual
    /// protection; write-protecting the pages again is the MMU's part).
    public func getAndClearDirtyLog(slot id: Int) throws(MemslotError) -> [UInt64] {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        let bitmap: [UInt64]? = dirtyLock.withLock {
            guard let bitmap = record.dirty else { return nil }
            record.dirty = [UInt64](repeating: 0, count: bitmap.count)
            return bitmap
        }
        guard let bitmap else { throw .dirtyLoggingDisabled(id: id) }
        return bitmap
    }

    /// Clears the bits of `mask` in the 64 dirty bits of pages `firstPage..<firstPage + 64` of the
    /// slot, and returns the ones that were set (KVM_CLEAR_DIRTY_LOG's `atomic_long_fetch_andnot`).
    /// `firstPage` must be a multiple of 64; bits past the slot's end are ignored.
    public func clearDirty(slot id: Int, firstPage: UInt64, mask: UInt64) throws(MemslotError) -> UInt64 {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        precondition(firstPage % 64 == 0, "dirty bits are cleared a word at a time")
        let cleared: UInt64? = dirtyLock.withLock {
            guard record.dirty != nil else { return nil }
            let word = Int(firstPage / 64)
            guard word < record.dirty!.count else { return 0 }
            let set = record.dirty![word] & mask
            record.dirty![word] &= ~mask
            return set
        }
        guard let cleared else { throw .dirtyLoggingDisabled(id: id) }
        return cleared
    }

    /// Sets every dirty bit of the slot (KVM_DIRTY_LOG_INITIALLY_SET when logging starts).
    public func markAllDirty(slot id: Int) throws(MemslotError) {
        guard let record = recordsByID[id] else { throw .noSuchSlot(id) }
        let done: Bool = dirtyLock.withLock {
            guard record.dirty != nil else { return false }
            let pages = record.slot.pageCount
            for word in record.dirty!.indices {
                let first = UInt64(word) * 64
                record.dirty![word] = pages - first >= 64 ? ~0 : (UInt64(1) << (pages - first)) - 1
            }
            return true
        }
        guard done else { throw .dirtyLoggingDisabled(id: id) }
    }

    /// Whether `frame` is marked dirty in its slot's bitmap (false when the slot does not log).
    public func isDirty(_ frame: GuestFrameNumber) -> Bool {
        guard let record = record(containing: frame) else { return false }
        let page = frame.rawValue - record.slot.baseFrame.rawValue
        return dirtyLock.withLock {
            guard let bitmap = record.dirty else { return false }
            return bitmap[Int(page >> 6)] & (1 << (page & 63)) != 0
        }
    }

    // MARK: Reading and writing guest bytes

    public func overflowFailure(_ address: GuestPhysicalAddress, count: UInt64) -> GuestAccessError {
        .addressOverflow(address, count: count)
    }

    /// Bytes outside every slot are MMIO; a write to a read-only slot is refused.
    public func refusal(of page: HostPage?, at address: GuestPhysicalAddress, writing: Bool) -> GuestAccessError? {
        guard let page else { return .mmio(address) }
        if writing && !page.isWritable { return .readOnly(address, slot: record(containing: address.frame)?.slot.id ?? -1) }
        return nil
    }

    /// Copies bytes out of guest memory; every byte must lie in a memslot.
    public func read(_ address: GuestPhysicalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(GuestAccessError) {
        try forEachChunk(address, count: UInt64(buffer.count), writing: false) { page, offset, done, length in
            buffer.baseAddress!.advanced(by: done).copyMemory(from: page + offset, byteCount: length)
        }
    }


    /// Writes guest memory as KVM does on the guest's behalf (kvm_write_guest): every byte must lie
    /// in a writable memslot, and the pages written are marked dirty in slots that log them. A
    /// failed write changes nothing.
    public func write(_ address: GuestPhysicalAddress, from buffer: UnsafeRawBufferPointer) throws(GuestAccessError) {
        try forEachChunk(address, count: UInt64(buffer.count), writing: true) { page, offset, done, length in
            (page + offset).copyMemory(from: buffer.baseAddress!.advanced(by: done), byteCount: length)
        }
        guard buffer.count > 0 else { return }
        let last = (address.rawValue + UInt64(buffer.count) - 1) >> UInt64(pageShift)
        for frame in address.frame.rawValue...last { markDirty(GuestFrameNumber(frame)) }
    }


    /// Writes guest memory as the VMM does through its own mapping of the slots (loading firmware
    /// into a ROM slot, say): read-only slots are written too, and nothing is marked dirty.
    public func hostWrite(_ address: GuestPhysicalAddress, bytes: [UInt8]) throws(GuestAccessError) {
        var failure: GuestAccessError?
        bytes.withUnsafeBytes { buffer in
            do throws(GuestAccessError) {
                try forEachChunk(address, count: UInt64(buffer.count), writing: false) { page, offset, done, length in
                    (page + offset).copyMemory(from: buffer.baseAddress!.advanced(by: done), byteCount: length)
                }
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }







    // MARK: Loading an image

    /// Creates slots covering the backed memory of `memory` (one per run of consecutive frames of
    /// equal writability; read-only frames get read-only slots) and copies its bytes in, so that a
    /// loaded image or ELF core can run in a VM. Slot ids are the lowest unused ones from
    /// `firstSlotID`; `flags` are added to every new slot. Either every slot is added or none.
    @discardableResult
    public func copy(from memory: GuestPhysicalMemory, firstSlotID: Int = 0, flags: MemslotFlags = []) throws(MemslotError) -> [Memslot] {
        guard flags.isSubset(of: .all) else { throw .invalidFlags(id: firstSlotID, flags.subtracting(.all)) }
        // Plan: runs of frames with equal writability, each at most a slot's worth of pages.
        var runs: [(base: UInt64, pages: UInt64, readOnly: Bool)] = []
        for range in memory.backedRanges {
            let first = range.start.frame.rawValue
            for frame in first..<first + range.size >> UInt64(pageShift) {
                let readOnly = !memory.hostPage(GuestFrameNumber(frame))!.isWritable
                if let last = runs.last, last.base + last.pages == frame, last.readOnly == readOnly,
                   last.pages < Self.maxPagesPerSlot {
                    runs[runs.count - 1].pages += 1
                } else {
                    runs.append((frame, 1, readOnly))
                }
            }
        }
        // Check the layout first, so that only running out of host memory needs a rollback.
        var nextID = firstSlotID
        var plannedIDs: [Int] = []
        for run in runs {
            while recordsByID[nextID] != nil { nextID += 1 }
            plannedIDs.append(nextID)
            let index = firstIndex(endingAfter: run.base)
            if index < records.count, records[index].slot.baseFrame.rawValue < run.base + run.pages {
                throw .overlap(id: nextID, GuestFrameNumber(run.base).address, size: run.pages << UInt64(pageShift),
                               existing: records[index].slot)
            }
            nextID += 1
        }
        var added: [Memslot] = []
        do throws(MemslotError) {
            for (run, id) in zip(runs, plannedIDs) {
                let slotFlags = flags.union(run.readOnly ? .readOnly : [])
                added.append(try addSlot(id: id, base: GuestFrameNumber(run.base).address,
                                         size: run.pages << UInt64(pageShift), flags: slotFlags))
            }
        } catch {
            for slot in added { try? deleteSlot(id: slot.id) }
            throw error
        }
        // Slots start zeroed, so only pages with a nonzero byte need copying (and committing).
        for slot in added {
            for page in 0..<slot.pageCount {
                let source = memory.hostPage(GuestFrameNumber(slot.baseFrame.rawValue + page))!.bytes
                guard (0..<512).contains(where: { source.load(fromByteOffset: $0 * 8, as: UInt64.self) != 0 }) else { continue }
                pool.pointer(HostFrameNumber(slot.hostBase.rawValue + page)).copyMemory(from: source, byteCount: Int(pageSize))
            }
        }
        return added
    }
}
