import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A table of one word per frame of the host page pool, zero until written: an anonymous mapping,
/// so only the parts covering frames in use become resident. The flat storage behind the shadow
/// MMU's per-frame lookups (KVM keeps the same information in `struct page` and in per-memslot
/// arrays; one load here, no hashing).
struct FrameWordTable {
    let words: UnsafeMutablePointer<UInt>
    let firstFrame: UInt64
    let count: Int

    init(pool: HostPagePool) {
        firstFrame = pool.firstFrame.rawValue
        count = pool.capacityPages
        let bytes = count * MemoryLayout<UInt>.stride
        guard let mapping = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              mapping != MAP_FAILED
        else { fatalError("cannot reserve \(bytes) bytes of address space for a frame table") }
        words = mapping.bindMemory(to: UInt.self, capacity: count)
    }

    func release() { munmap(words, count * MemoryLayout<UInt>.stride) }

    /// The slot of `frame`, or nil outside the pool.
    @inline(__always)
    func index(_ frame: UInt64) -> Int? {
        let index = frame &- firstFrame
        return index < UInt64(count) ? Int(index) : nil
    }

    @inline(__always)
    subscript(frame: UInt64) -> UInt {
        get { index(frame).map { words[$0] } ?? 0 }
        nonmutating set { words[index(frame)!] = newValue }
    }
}

/// Host frame -> the shadow page whose table lives there (KVM's `page_private` of the page).
/// Holds no reference: the hash owns the pages.
struct ShadowPageDirectory {
    private let table: FrameWordTable

    init(pool: HostPagePool) { table = FrameWordTable(pool: pool) }
    func release() { table.release() }

    @inline(__always)
    func page(_ frame: UInt64) -> ShadowPage? {
        let bits = table[frame]
        guard bits != 0 else { return nil }
        return Unmanaged<ShadowPage>.fromOpaque(UnsafeRawPointer(bitPattern: bits)!).takeUnretainedValue()
    }

    /// The page as an unretained reference, for walks down the shadow tables that must not pay
    /// an atomic retain and release per level (the hash owns every page; see `MMUContext.fetch`).
    @inline(__always)
    func unretainedPage(_ frame: UInt64) -> Unmanaged<ShadowPage>? {
        let bits = table[frame]
        guard bits != 0 else { return nil }
        return Unmanaged<ShadowPage>.fromOpaque(UnsafeRawPointer(bitPattern: bits)!)
    }

    func set(_ page: ShadowPage?, at frame: UInt64) {
        table[frame] = page.map { UInt(bitPattern: Unmanaged.passUnretained($0).toOpaque()) } ?? 0
    }
}

/// The reverse maps from a mapped page to the leaf SPTEs that map it, one per mapping level, as
/// KVM keeps them (`kvm_rmap_head`): a head is empty, one SPTE pointer, or (low bit set) a list
/// of them, so that the usual single mapping costs no allocation. Indexed by the host frame the
/// SPTEs map, which stands for the gfn one to one while its memslot lives.
struct RmapTables {
    private let heads: [FrameWordTable]
    private var lists: [[SPTEPointer]] = []
    private var freeLists: [Int] = []
    /// SPTEs in all the maps together (the auditor compares it with the leaves it finds).
    private(set) var total = 0

    init(pool: HostPagePool) { heads = (1...3).map { _ in FrameWordTable(pool: pool) } }
    func release() { for table in heads { table.release() } }

    /// The number of SPTEs mapping `frame` at `level`.
    func count(_ frame: UInt64, level: Int) -> Int {
        let head = heads[level - 1][frame]
        if head == 0 { return 0 }
        return head & 1 == 0 ? 1 : lists[Int(head >> 1)].count
    }

    /// Adds `pointer`; returns the new count.
    @discardableResult
    mutating func add(_ pointer: SPTEPointer, frame: UInt64, level: Int) -> Int {
        let table = heads[level - 1]
        let head = table[frame]
        let bits = UInt(bitPattern: pointer)
        total += 1
        if head == 0 {
            table[frame] = bits
            return 1
        }
        if head & 1 == 0 {
            let first = SPTEPointer(bitPattern: head)!
            let index: Int
            if let reused = freeLists.popLast() {
                index = reused
                lists[index] = [first, pointer]
            } else {
                index = lists.count
                lists.append([first, pointer])
            }
            table[frame] = UInt(index) << 1 | 1
            return 2
        }
        let index = Int(head >> 1)
        lists[index].append(pointer)
        return lists[index].count
    }

    /// Removes `pointer`; false when it was not there.
    @discardableResult
    mutating func remove(_ pointer: SPTEPointer, frame: UInt64, level: Int) -> Bool {
        let table = heads[level - 1]
        let head = table[frame]
        if head == 0 { return false }
        if head & 1 == 0 {
            guard head == UInt(bitPattern: pointer) else { return false }
            table[frame] = 0
            total -= 1
            return true
        }
        let index = Int(head >> 1)
        guard let position = lists[index].firstIndex(of: pointer) else { return false }
        lists[index].swapAt(position, lists[index].count - 1)
        lists[index].removeLast()
        total -= 1
        if lists[index].count == 1 {
            table[frame] = UInt(bitPattern: lists[index][0])
            lists[index] = []
            freeLists.append(index)
        }
        return true
    }

    /// Calls `body` with every SPTE mapping `frame` at `level`, without building a list; `body`
    /// must not change the map.
    func forEachSPTE(_ frame: UInt64, level: Int, _ body: (SPTEPointer) -> Void) {
        let head = heads[level - 1][frame]
        if head == 0 { return }
        if head & 1 == 0 { return body(SPTEPointer(bitPattern: head)!) }
        for pointer in lists[Int(head >> 1)] { body(pointer) }
    }

    /// Every SPTE mapping `frame` at `level`.
    func sptes(_ frame: UInt64, level: Int) -> [SPTEPointer] {
        let head = heads[level - 1][frame]
        if head == 0 { return [] }
        if head & 1 == 0 { return [SPTEPointer(bitPattern: head)!] }
        return lists[Int(head >> 1)]
    }
}
