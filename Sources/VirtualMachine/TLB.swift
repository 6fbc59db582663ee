import X86Paging

/// The host TLB: translations of 4 KiB guest-virtual pages to host frames as the hardware walk of
/// KVM's SPTEs produced them, tagged with the root they came from, with the combined permissions
/// and whether the leaf was dirty. Bounded and direct-mapped; a flush is O(1) (a generation bump).
/// A class over flat storage so that a lookup is a load and two compares.
public final class TLB {
    public struct Entry {
        /// The guest-virtual page number.
        var tag: UInt64
        /// The host frame of the root table the translation was walked from.
        var root: UInt64
        var generation: UInt64
        public var hostFrame: UInt64
        /// The guest frame the leaf maps, kept for reports.
        public var guestFrame: UInt64
        /// Combined ACC bits of the walk (1 execute, 2 write, 4 user).
        public var permissions: UInt8
        /// The leaf SPTE was dirty: a write may use the entry without walking.
        public var dirty: Bool
        /// The page's sub-page write permissions as the SPP-table walk gave them (bit i: sub-page i
        /// writable), all ones for a page SPP does not check. Cached with the translation, as a
        /// processor may cache them, so a write hitting the TLB is still checked sub-page by
        /// sub-page; an SPP change flushes every TLB.
        public var subPageWriteMask: UInt32

        /// Whether the cached sub-page permissions let through a write of `size` bytes at
        /// `pageOffset` (the write lies in the page: the callers check that first).
        @inline(__always)
        public func permitsSubPageWrite(atPageOffset pageOffset: UInt64, size: Int) -> Bool {
            subPageWriteMask == UInt32.max
                || SubPageWriteMask(subPageWriteMask).permitsWriteWithinPage(atPageOffset: pageOffset, byteCount: UInt64(size))
        }
    }

    /// A guest-physical mapping (SDM Vol. 3, 29.4.1): a guest frame translated through the EPT
    /// (or NPT) tables of `root`, which the hardware keeps for its accesses to the guest's paging
    /// structures. Flushed with everything else; INVLPG leaves it.
    public struct GuestPhysicalEntry {
        var guestFrame: UInt64
        var root: UInt64
        var generation: UInt64
        public var hostFrame: UInt64
        /// The EPT leaf lets the guest's table be written (its A/D updates).
        public var writable: Bool
    }

    /// A PDE-cache entry of the paging-structure caches (SDM 4.10.3.1), for the two-dimensional
    /// walk under TDP in IA-32e paging: for the linear addresses sharing bits 63:21, the
    /// guest-physical address of the page table their PDE pointed to, and the combined permissions
    /// of the PML5E/PML4E/PDPTE/PDE above it. Made only from a walk that completed with A set in
    /// each of those entries; dropped by every flush of the TLB entries of its tag (a flushing MOV to
    /// CR3, single-context INVPCID, a paging-mode change, KVM's flushes), by any INVLPG or
    /// individual-address INVPCID (the architecture drops the current PCID's whole paging-structure
    /// caches there; this drops every PCID's), and by a #PF, an EPT violation or misconfiguration or
    /// a #NPF of an access to an address it covers (under EPT these entries are combined mappings,
    /// which an EPT fault for their linear address invalidates). Tagged, besides
    /// the TLB tag (TDP root and PCID), with the guest's CR3: the architecture would let a no-flush
    /// CR3 load keep using another address space's entries of the same PCID, which a processor
    /// need not do, and this one does not. The page table's guest-physical address is translated
    /// through the TDP tables (or the guest-physical mappings) on every use.
    public struct PageDirectoryCacheEntry {
        var prefix: UInt64
        var root: UInt64
        var guestRoot: UInt64
        var generation: UInt64
        /// The guest-physical address of the page table.
        public var pageTable: UInt64
        /// Combined ACC bits of the entries above the page table (1 execute, 2 write, 4 user).
        public var permissions: UInt8
    }

    private let entries: UnsafeMutablePointer<Entry>
    private let guestPhysicalEntries: UnsafeMutablePointer<GuestPhysicalEntry>
    private static let guestPhysicalCapacity = 64
    private let pageDirectoryEntries: UnsafeMutablePointer<PageDirectoryCacheEntry>
    private static let pageDirectoryCapacity = 64
    private let mask: Int
    public let capacity: Int
    /// The mutable counters, behind a pointer: a class's `var` would cost an exclusivity check
    /// on every lookup.
    private struct Counters {
        var generation: UInt64 = 1
        var hits: UInt64 = 0
        var misses: UInt64 = 0
        var flushes: UInt64 = 0
        var pageDirectoryHits: UInt64 = 0
    }
    private let counters: UnsafeMutablePointer<Counters>
    private var generation: UInt64 { counters.pointee.generation }
    public var hits: UInt64 { counters.pointee.hits }
    public var misses: UInt64 { counters.pointee.misses }
    public var flushes: UInt64 { counters.pointee.flushes }
    /// Walks that started from a PDE-cache entry.
    public var pageDirectoryCacheHits: UInt64 { counters.pointee.pageDirectoryHits }

    /// - Parameter capacity: a power of two.
    public init(capacity: Int = 1024) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0, "TLB capacity must be a power of two")
        self.capacity = capacity
        entries = .allocate(capacity: capacity)
        entries.initialize(repeating: Entry(tag: 0, root: 0, generation: 0, hostFrame: 0, guestFrame: 0, permissions: 0,
                                            dirty: false, subPageWriteMask: UInt32.max),
                           count: capacity)
        mask = capacity - 1
        guestPhysicalEntries = .allocate(capacity: Self.guestPhysicalCapacity)
        guestPhysicalEntries.initialize(repeating: GuestPhysicalEntry(guestFrame: 0, root: 0, generation: 0, hostFrame: 0,
                                                                      writable: false),
                                        count: Self.guestPhysicalCapacity)
        pageDirectoryEntries = .allocate(capacity: Self.pageDirectoryCapacity)
        pageDirectoryEntries.initialize(repeating: PageDirectoryCacheEntry(prefix: 0, root: 0, guestRoot: 0, generation: 0,
                                                                           pageTable: 0, permissions: 0),
                                        count: Self.pageDirectoryCapacity)
        counters = .allocate(capacity: 1)
        counters.initialize(to: Counters())
    }

    deinit {
        entries.deallocate()
        guestPhysicalEntries.deallocate()
        pageDirectoryEntries.deallocate()
        counters.deallocate()
    }

    /// The slot of a page under a root: the root takes part, so that the same page under two
    /// roots (two PCIDs) can be cached at once. Under TDP the PCID is in the tag's bits 48 and up,
    /// folded down so that it reaches the slot.
    @inline(__always)
    private func slot(_ page: UInt64, _ root: UInt64) -> Int {
        Int(truncatingIfNeeded: (page ^ (page >> 11) ^ ((root ^ root >> 40) &* 0x9E37_79B9)) & UInt64(mask))
    }

    /// The entry for the page of `address` walked from `root`, if cached.
    @inline(__always)
    public func lookup(_ address: GuestVirtualAddress, root: UInt64) -> Entry? {
        let page = address.rawValue >> 12
        let entry = entries[slot(page, root)]
        if entry.generation == generation && entry.tag == page && entry.root == root {
            counters.pointee.hits &+= 1
            return entry
        }
        counters.pointee.misses &+= 1
        return nil
    }

    public func insert(_ address: GuestVirtualAddress, root: UInt64, hostFrame: UInt64, permissions: UInt8, dirty: Bool,
                       guestFrame: UInt64, subPageWriteMask: UInt32 = UInt32.max) {
        let page = address.rawValue >> 12
        entries[slot(page, root)] = Entry(tag: page, root: root, generation: generation, hostFrame: hostFrame,
                                    guestFrame: guestFrame, permissions: permissions, dirty: dirty,
                                    subPageWriteMask: subPageWriteMask)
    }

    /// The cached guest-physical mapping of `guestFrame` under the TDP root `root`.
    @inline(__always)
    public func lookupGuestPhysical(_ guestFrame: UInt64, root: UInt64) -> GuestPhysicalEntry? {
        let entry = guestPhysicalEntries[Int(truncatingIfNeeded: guestFrame) & (Self.guestPhysicalCapacity - 1)]
        guard entry.generation == generation, entry.guestFrame == guestFrame, entry.root == root else { return nil }
        return entry
    }

    public func insertGuestPhysical(_ guestFrame: UInt64, root: UInt64, hostFrame: UInt64, writable: Bool) {
        guestPhysicalEntries[Int(truncatingIfNeeded: guestFrame) & (Self.guestPhysicalCapacity - 1)] =
            GuestPhysicalEntry(guestFrame: guestFrame, root: root, generation: generation, hostFrame: hostFrame,
                               writable: writable)
    }

    @inline(__always)
    private func pageDirectorySlot(_ prefix: UInt64) -> Int {
        Int(truncatingIfNeeded: prefix) & (Self.pageDirectoryCapacity - 1)
    }

    /// The PDE-cache entry for `address` under the TLB tag `root` and the guest's `guestRoot` (its
    /// CR3), if cached.
    @inline(__always)
    public func lookupPageDirectory(_ address: GuestVirtualAddress, root: UInt64, guestRoot: UInt64) -> PageDirectoryCacheEntry? {
        let prefix = address.rawValue >> 21
        let entry = pageDirectoryEntries[pageDirectorySlot(prefix)]
        guard entry.generation == generation, entry.prefix == prefix, entry.root == root, entry.guestRoot == guestRoot
        else { return nil }
        counters.pointee.pageDirectoryHits &+= 1
        return entry
    }

    @inline(__always)
    public func insertPageDirectory(_ address: GuestVirtualAddress, root: UInt64, guestRoot: UInt64, pageTable: UInt64,
                                    permissions: UInt8) {
        let prefix = address.rawValue >> 21
        pageDirectoryEntries[pageDirectorySlot(prefix)] =
            PageDirectoryCacheEntry(prefix: prefix, root: root, guestRoot: guestRoot, generation: generation,
                                    pageTable: pageTable, permissions: permissions)
    }

    /// Drops the PDE-cache entry that would translate `address` under `root` (a #PF on it: SDM
    /// 4.10.4.1, a page fault invalidates the paging-structure-cache entries for its address).
    @inline(__always)
    public func invalidatePageDirectory(_ address: GuestVirtualAddress, root: UInt64) {
        let prefix = address.rawValue >> 21
        let index = pageDirectorySlot(prefix)
        if pageDirectoryEntries[index].prefix == prefix && pageDirectoryEntries[index].root == root {
            pageDirectoryEntries[index].generation = 0
        }
    }

    /// Drops the entry for the page of `address` under `root` (a fault on it).
    public func invalidate(_ address: GuestVirtualAddress, root: UInt64) {
        let page = address.rawValue >> 12
        let index = slot(page, root)
        if entries[index].tag == page && entries[index].root == root { entries[index].generation = 0 }
    }

    /// Drops the entries for the page of `address` under every root (INVLPG as the hardware does
    /// it for KVM: INVVPID of one address, every PCID).
    public func invalidate(_ address: GuestVirtualAddress) {
        let page = address.rawValue >> 12
        for index in 0..<capacity where entries[index].tag == page { entries[index].generation = 0 }
        // INVLPG also drops every paging-structure-cache entry of the current PCID, whatever its
        // address (SDM 4.10.4.1); every PCID's here.
        for index in 0..<Self.pageDirectoryCapacity { pageDirectoryEntries[index].generation = 0 }
    }

    /// Drops the entries walked from `root` (under TDP, one PCID of the current EPT root), and the
    /// PDE-cache entries of that tag; the guest-physical mappings stay.
    public func flush(root: UInt64) {
        for index in 0..<capacity where entries[index].root == root { entries[index].generation = 0 }
        for index in 0..<Self.pageDirectoryCapacity where pageDirectoryEntries[index].root == root {
            pageDirectoryEntries[index].generation = 0
        }
    }

    /// Drops every entry.
    public func flush() {
        counters.pointee.generation &+= 1
        counters.pointee.flushes &+= 1
    }

    /// The valid entries, for reports.
    public var validEntries: Int {
        (0..<capacity).count { entries[$0].generation == generation }
    }
}
