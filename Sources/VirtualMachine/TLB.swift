import X86Paging

/// The host TLB: translations of 4 KiB guest-virtual pages to host frames as the hardware walk of
/// the SPTEs produced them, with the combined permissions and whether the leaf was dirty. Bounded
/// and direct-mapped, flushed in O(1) by bumping a generation.
public struct TLB {
    public struct Entry {
        var tag: UInt64
        var generation: UInt64
        public var hostFrame: UInt64
        /// Combined ACC bits of the walk (1 execute, 2 write, 4 user).
        public var permissions: UInt8
        /// The leaf SPTE was dirty: a write may use the entry without walking.
        public var dirty: Bool
        /// The guest frame the leaf maps, kept for reports.
        public var guestFrame: UInt64
    }

    private var entries: [Entry]
    private var generation: UInt64 = 1
    private let mask: Int
    public private(set) var hits: UInt64 = 0
    public private(set) var misses: UInt64 = 0
    public private(set) var flushes: UInt64 = 0

    /// - Parameter capacity: a power of two.
    public init(capacity: Int = 1024) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0, "TLB capacity must be a power of two")
        entries = Array(repeating: Entry(tag: 0, generation: 0, hostFrame: 0, permissions: 0, dirty: false, guestFrame: 0),
                        count: capacity)
        mask = capacity - 1
    }

    @inline(__always)
    private func slot(_ page: UInt64) -> Int { Int(truncatingIfNeeded: (page ^ (page >> 11)) & UInt64(mask)) }

    /// The entry for the page of `address`, if cached.
    @inline(__always)
    public mutating func lookup(_ address: GuestVirtualAddress) -> Entry? {
        let page = address.rawValue >> 12
        let entry = entries[slot(page)]
        if entry.generation == generation && entry.tag == page {
            hits += 1
            return entry
        }
        misses += 1
        return nil
    }

    public mutating func insert(_ address: GuestVirtualAddress, hostFrame: UInt64, permissions: UInt8, dirty: Bool,
                                guestFrame: UInt64) {
        let page = address.rawValue >> 12
        entries[slot(page)] = Entry(tag: page, generation: generation, hostFrame: hostFrame, permissions: permissions,
                                    dirty: dirty, guestFrame: guestFrame)
    }

    /// Drops the entry for the page of `address` (INVLPG, or a fault on it).
    public mutating func invalidate(_ address: GuestVirtualAddress) {
        let page = address.rawValue >> 12
        let index = slot(page)
        if entries[index].tag == page { entries[index].generation = 0 }
    }

    /// Drops every entry.
    public mutating func flush() {
        generation += 1
        flushes += 1
    }
}
