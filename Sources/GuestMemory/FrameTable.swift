import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The guest frame -> host page table behind `GuestPhysicalMemory` and `MemslotSet`: one word per
/// 4 KiB guest frame, 0 when the frame has no memory. A nonzero word is a 4 KiB-aligned host page
/// pointer whose bit 0 is set when the page is read-only for the guest.
///
/// Lookups of the first 32 GiB index one flat array (one load); above that they go through a fixed
/// three-level radix tree over the 40-bit frame number (three dependent loads). No hashing, no
/// allocation. The flat array and the radix nodes are anonymous mappings, so only the parts that
/// cover used frames become resident.
///
/// A struct of two immutable pointers plus a reference to the bookkeeping, so that the owner's
/// inlined lookup reads `let` fields only (a class's `var` would cost an exclusivity check per
/// lookup). Thread safety: lookups may run concurrently with each other; `set` must not run
/// concurrently with anything.
@usableFromInline
struct FrameTable {
    /// Guest-physical addresses have at most 52 bits, so frame numbers have at most 40.
    static let frameBits = 40
    static let leafBits = 13
    static let middleBits = 13
    static let topBits = frameBits - leafBits - middleBits  // 14
    static let lowFrames: UInt64 = 1 << 23

    @usableFromInline typealias Leaf = UnsafeMutablePointer<UInt>
    @usableFromInline typealias Middle = UnsafeMutablePointer<Leaf?>
    @usableFromInline let top: UnsafeMutablePointer<Middle?>
    /// Entries for the low `lowFrames` frames in one flat array, so that the common case (page
    /// tables and RAM in the first 32 GiB) is one load instead of three dependent ones.
    @usableFromInline let low: UnsafeMutablePointer<UInt>
    let storage: Storage

    /// Owns the mappings (freed when the last copy of the table goes away) and the record of which
    /// parts of the flat array are in use.
    final class Storage {
        let low: UnsafeMutablePointer<UInt>
        let top: UnsafeMutablePointer<Middle?>
        /// Radix nodes to unmap.
        var nodes: [UnsafeMutableRawPointer] = []
        /// Which 512-frame chunks of `low` have ever held entries, so enumeration skips the rest.
        var lowChunksInUse = [UInt64](repeating: 0, count: Int(FrameTable.lowFrames) / 512 / 64)

        init(low: UnsafeMutablePointer<UInt>, top: UnsafeMutablePointer<Middle?>) {
            self.low = low
            self.top = top
        }

        deinit {
            for node in nodes { munmap(node, FrameTable.nodeBytes) }
            munmap(low, Int(FrameTable.lowFrames) * MemoryLayout<UInt>.stride)
            top.deallocate()
        }
    }

    /// Middle and leaf nodes are both 2^13 words.
    static let nodeBytes = MemoryLayout<UInt>.stride << 13

    init() {
        let count = 1 << Self.topBits
        let top = UnsafeMutablePointer<Middle?>.allocate(capacity: count)
        top.initialize(repeating: nil, count: count)
        let lowBytes = Int(Self.lowFrames) * MemoryLayout<UInt>.stride
        let mapping = mmap(nil, lowBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapping, mapping != MAP_FAILED else {
            fatalError("cannot reserve \(lowBytes) bytes of address space for the guest frame table")
        }
        let low = mapping.bindMemory(to: UInt.self, capacity: Int(Self.lowFrames))
        self.top = top
        self.low = low
        storage = Storage(low: low, top: top)
    }

    // MARK: Lookup (the hot path)

    /// The entry of `frame`: 0 when it has no memory (including frames beyond 40 bits).
    /// The geometry is written as literals (40-bit frames: 14 top, 13 middle, 13 leaf bits)
    /// because static constants read from inlined code cost an accessor call each.
    @inlinable @inline(__always)
    func entry(_ frame: UInt64) -> UInt {
        if frame < 1 << 23 { return low[Int(frame)] }
        guard frame >> 40 == 0 else { return 0 }
        guard let middle = top[Int(frame >> 26)] else { return 0 }
        guard let leaf = middle[Int((frame >> 13) & 0x1FFF)] else { return 0 }
        return leaf[Int(frame & 0x1FFF)]
    }

    /// The host page an entry describes, or nil for 0.
    @inlinable @inline(__always)
    static func hostPage(_ entry: UInt) -> HostPage? {
        guard entry != 0 else { return nil }
        return HostPage(bytes: UnsafeMutableRawPointer(bitPattern: entry & ~1)!, isWritable: entry & 1 == 0)
    }

    // MARK: Changing entries

    /// Sets the entry of `frame` (< 2^40), creating radix nodes as needed. Nodes come from
    /// anonymous mappings (all-zero bits are nil pointers and empty entries), so a sparse layout
    /// makes resident only the node pages it touches. Setting 0 never allocates.
    func set(_ frame: UInt64, _ value: UInt) -> Bool {
        precondition(frame >> UInt64(Self.frameBits) == 0, "frame \(hex(frame)) beyond 40 bits")
        if frame < Self.lowFrames {
            low[Int(frame)] = value
            let chunk = Int(frame >> 9)
            storage.lowChunksInUse[chunk >> 6] |= 1 << UInt64(chunk & 63)
            return true
        }
        let topIndex = Int(frame >> UInt64(Self.leafBits + Self.middleBits))
        let middle: Middle
        if let existing = top[topIndex] {
            middle = existing
        } else {
            guard value != 0 else { return true }
            guard let node = mapNode() else { return false }
            middle = node.bindMemory(to: Leaf?.self, capacity: 1 << Self.middleBits)
            top[topIndex] = middle
        }
        let middleIndex = Int((frame >> UInt64(Self.leafBits)) & ((1 << UInt64(Self.middleBits)) - 1))
        let leaf: Leaf
        if let existing = middle[middleIndex] {
            leaf = existing
        } else {
            guard value != 0 else { return true }
            guard let node = mapNode() else { return false }
            leaf = node.bindMemory(to: UInt.self, capacity: 1 << Self.leafBits)
            middle[middleIndex] = leaf
        }
        leaf[Int(frame & ((1 << UInt64(Self.leafBits)) - 1))] = value
        return true
    }

    /// Reserves the radix nodes `set` would need for every frame of `frames`, so that a caller can
    /// fail before changing anything. Returns false when a mapping fails.
    func reserveNodes(_ frames: Range<UInt64>) -> Bool {
        guard let last = frames.last, last >= Self.lowFrames else { return true }
        var frame = max(frames.lowerBound, Self.lowFrames)
        while frame <= last {
            let topIndex = Int(frame >> UInt64(Self.leafBits + Self.middleBits))
            if top[topIndex] == nil {
                guard let node = mapNode() else { return false }
                top[topIndex] = node.bindMemory(to: Leaf?.self, capacity: 1 << Self.middleBits)
            }
            let middleIndex = Int((frame >> UInt64(Self.leafBits)) & ((1 << UInt64(Self.middleBits)) - 1))
            if top[topIndex]![middleIndex] == nil {
                guard let node = mapNode() else { return false }
                top[topIndex]![middleIndex] = node.bindMemory(to: UInt.self, capacity: 1 << Self.leafBits)
            }
            frame = (frame | ((1 << UInt64(Self.leafBits)) - 1)) + 1
        }
        return true
    }

    private func mapNode() -> UnsafeMutableRawPointer? {
        let pointer = mmap(nil, Self.nodeBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let pointer, pointer != MAP_FAILED else { return nil }
        storage.nodes.append(pointer)
        return pointer
    }

    // MARK: Enumeration

    /// Calls `body` with every frame that has a nonzero entry, ascending.
    func forEachEntry(_ body: (UInt64, UInt) -> Void) {
        for (word, bits) in storage.lowChunksInUse.enumerated() where bits != 0 {
            for bit in 0..<64 where bits & (1 << UInt64(bit)) != 0 {
                let firstFrame = UInt64(word * 64 + bit) << 9
                for frame in firstFrame..<firstFrame + 512 where low[Int(frame)] != 0 { body(frame, low[Int(frame)]) }
            }
        }
        let middleCount = 1 << Self.middleBits, leafCount = 1 << Self.leafBits
        for topIndex in 0..<(1 << Self.topBits) {
            guard let middle = top[topIndex] else { continue }
            for middleIndex in 0..<middleCount {
                guard let leaf = middle[middleIndex] else { continue }
                for leafIndex in 0..<leafCount where leaf[leafIndex] != 0 {
                    body(UInt64(topIndex) << UInt64(Self.leafBits + Self.middleBits)
                        | UInt64(middleIndex) << UInt64(Self.leafBits) | UInt64(leafIndex), leaf[leafIndex])
                }
            }
        }
    }
}
