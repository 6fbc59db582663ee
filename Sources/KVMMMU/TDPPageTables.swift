// The TDP MMU's per-page-table bookkeeping (the TDP half of `struct kvm_mmu_page`: gfn, role, ptep,
// nx_huge_page_disallowed, possible_nx_huge_page_link), kept flat by host frame so that finding a
// table's record from an SPTE is arithmetic and creating a table allocates nothing but its frame.

import GuestMemory
import Synchronization
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One record of eight words per frame of the host page pool, zero until the frame holds a TDP
/// page table. An anonymous mapping: only records of frames in use become resident.
struct TDPPageRecords {
    static let wordsPerRecord = 8
    let words: UnsafeMutablePointer<UInt64>
    let firstFrame: UInt64
    let count: Int

    init(pool: HostPagePool) {
        firstFrame = pool.firstFrame.rawValue
        count = pool.capacityPages
        let bytes = count * Self.wordsPerRecord * MemoryLayout<UInt64>.stride
        guard let mapping = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              mapping != MAP_FAILED
        else { fatalError("cannot reserve \(bytes) bytes of address space for the TDP page records") }
        words = mapping.bindMemory(to: UInt64.self, capacity: count * Self.wordsPerRecord)
    }

    func release() { munmap(words, count * Self.wordsPerRecord * MemoryLayout<UInt64>.stride) }

    /// The page table in `frame`, or nil when the frame is outside the pool.
    @inline(__always)
    func page(_ frame: HostFrameNumber) -> TDPPage? {
        let index = frame.rawValue &- firstFrame
        guard index < UInt64(count) else { return nil }
        return TDPPage(frame: frame, record: words + Int(index) * Self.wordsPerRecord)
    }
}

/// A view of one page table's record. The state word is read and changed atomically (a fault reads
/// `nxHugePageDisallowed` while another thread unlinks the page); the other words are written before
/// the table is published by the SPTE that links it, or under `tdp_mmu_pages_lock`.
struct TDPPage {
    let frame: HostFrameNumber
    let record: UnsafeMutablePointer<UInt64>

    // Words of the record.
    private static var stateWord: Int { 0 }
    private static var gfnWord: Int { 1 }
    private static var parentWord: Int { 2 }
    private static var nxPreviousWord: Int { 3 }
    private static var nxNextWord: Int { 4 }
    private static var freeNextWord: Int { 5 }

    // Bits of the state word: flags in 0-7, the level in 8-11, the role word in 32-63.
    static var liveFlag: UInt64 { 1 << 0 }
    static var removedFlag: UInt64 { 1 << 1 }
    static var nxHugePageDisallowedFlag: UInt64 { 1 << 2 }
    static var possibleNXHugePageFlag: UInt64 { 1 << 3 }

    private var state: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutableRawPointer(record + Self.stateWord).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    @inline(__always) var stateBits: UInt64 { state.pointee.load(ordering: .acquiring) }

    /// The frame holds a page table of the TDP MMU (reachable, or removed and waiting to be freed).
    var isLive: Bool { stateBits & Self.liveFlag != 0 }
    /// Unlinked from its parent: no new walk can reach it; it is freed once no reader holds
    /// mmu_lock (KVM's RCU grace period).
    var isRemoved: Bool { stateBits & Self.removedFlag != 0 }
    /// `nx_huge_page_disallowed`: the table exists because the NX huge-page mitigation refused a
    /// huge mapping for an executable access.
    var nxHugePageDisallowed: Bool { stateBits & Self.nxHugePageDisallowedFlag != 0 }
    /// On `possible_nx_huge_pages` (counted by `nx_lpage_splits`).
    var isPossibleNXHugePage: Bool { stateBits & Self.possibleNXHugePageFlag != 0 }
    var level: Int { Int((stateBits >> 8) & 0xF) }
    var role: PageRole { PageRole(word: UInt32(truncatingIfNeeded: stateBits >> 32)) }
    /// `sp->gfn`: the first gfn the table maps.
    var gfn: UInt64 { record[Self.gfnWord] }
    /// `sp->ptep`: the SPTE that links the table; nil for a root.
    var parentSPTE: SPTEPointer? { SPTEPointer(bitPattern: UInt(record[Self.parentWord])) }

    /// Starts the record of a new table (not yet reachable by any other thread).
    func initialize(role: PageRole, gfn: UInt64, parent: SPTEPointer?, nxHugePageDisallowed: Bool) {
        var bits = Self.liveFlag | UInt64(role.level) << 8 | UInt64(role.word) << 32
        if nxHugePageDisallowed { bits |= Self.nxHugePageDisallowedFlag }
        record[Self.gfnWord] = gfn
        record[Self.parentWord] = UInt64(UInt(bitPattern: parent))
        record[Self.nxPreviousWord] = 0
        record[Self.nxNextWord] = 0
        record[Self.freeNextWord] = 0
        state.pointee.store(bits, ordering: .releasing)
    }

    /// Forgets the table (its frame goes back to the pool).
    func clear() {
        for word in 1..<TDPPageRecords.wordsPerRecord { record[word] = 0 }
        state.pointee.store(0, ordering: .releasing)
    }

    func setFlags(_ flags: UInt64) { state.pointee.bitwiseOr(flags, ordering: .acquiringAndReleasing) }
    func clearFlags(_ flags: UInt64) { state.pointee.bitwiseAnd(~flags, ordering: .acquiringAndReleasing) }

    // Links, changed only under `tdp_mmu_pages_lock`.
    var nxPrevious: UInt64 {
        get { record[Self.nxPreviousWord] }
        nonmutating set { record[Self.nxPreviousWord] = newValue }
    }
    var nxNext: UInt64 {
        get { record[Self.nxNextWord] }
        nonmutating set { record[Self.nxNextWord] = newValue }
    }
    var freeNext: UInt64 {
        get { record[Self.freeNextWord] }
        nonmutating set { record[Self.freeNextWord] = newValue }
    }
}
