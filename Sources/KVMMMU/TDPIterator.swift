// The walk every TDP MMU operation makes (tdp_iter.[ch]): a pre-order traversal of one root's SPTEs
// that map gfns in [start, end), from the root level down to a minimum level, entering only present
// non-leaf SPTEs.

import GuestMemory
import X86Paging

/// KVM's `struct tdp_iter`, over flat storage: the path of tables from the root is five words, so a
/// walk allocates nothing.
///
/// After `next()`, `sptep`, `level` and `gfn` name the current SPTE and `oldSPTE` holds the value
/// read from it. A caller that changes the SPTE through the MMU's atomic helpers gets `oldSPTE`
/// refreshed on a lost race, so it can look at the same SPTE again; `next()` re-reads the SPTE before
/// stepping down into it, so a table linked or zapped since it was read is seen as it is now.
///
/// Every read is atomic, and walking under mmu_lock (either mode) is what keeps the tables it steps
/// into from being freed under it (see `TDPMMU`, "Freeing page tables").
struct TDPIterator {
    /// The table at each level on the path, by level - 1 (KVM's `pt_path`), as addresses.
    private var path: (UInt, UInt, UInt, UInt, UInt) = (0, 0, 0, 0, 0)
    let rootLevel: Int
    let minLevel: Int
    /// One past the last gfn to visit (clamped to what the root maps).
    let endGFN: UInt64
    /// The lowest gfn the walk still has to visit (KVM's `next_last_level_gfn`); where a step down
    /// lands.
    private var nextLastLevelGFN: UInt64
    private(set) var level: Int
    /// The lowest gfn the current SPTE maps.
    private(set) var gfn: UInt64
    private(set) var sptep: SPTEPointer
    /// The value of `sptep` when it was last read.
    var oldSPTE: SPTE
    private var walking: Bool
    unowned(unsafe) let pool: HostPagePool

    /// Starts at the root entry covering `start` (KVM's `tdp_iter_start`).
    /// - Precondition: `root` is a table of `pool` at `rootLevel` (4 or 5), `minLevel` in 1...rootLevel.
    init(root: SPTEPointer, rootLevel: Int, minLevel: Int, start: UInt64, end: UInt64, pool: HostPagePool) {
        precondition((KVMLevel.pageTable...KVMLevel.pt64Root5).contains(rootLevel) && (1...rootLevel).contains(minLevel),
                     "TDP walks are 1-5 levels deep")
        self.rootLevel = rootLevel
        self.minLevel = minLevel
        self.pool = pool
        let rootSpan = UInt64(1) << UInt64(9 * rootLevel)
        endGFN = min(end, rootSpan)
        nextLastLevelGFN = start
        level = rootLevel
        gfn = Self.round(start, level: rootLevel)
        sptep = root
        oldSPTE = .nonPresent
        walking = start < endGFN
        setTable(root, level: rootLevel)
        if walking { refreshSPTE() }
    }

    /// KVM's loop condition: the walk goes on while it is inside the range.
    @inline(__always) var isValid: Bool { walking && gfn < endGFN }

    /// The slot of the current SPTE.
    @inline(__always) var slot: SPTESlot { SPTESlot(sptep) }

    /// `SPTE_INDEX`.
    @inline(__always)
    static func index(_ gfn: UInt64, level: Int) -> Int { Int((gfn >> UInt64(9 * (level - 1))) & 511) }

    /// `gfn_round_for_level`.
    @inline(__always)
    static func round(_ gfn: UInt64, level: Int) -> UInt64 { gfn & ~(pagesPerHugePage(level) - 1) }

    @inline(__always)
    private func table(level: Int) -> SPTEPointer {
        var copy = path
        let address = withUnsafeBytes(of: &copy) { $0.load(fromByteOffset: (level - 1) * MemoryLayout<UInt>.stride, as: UInt.self) }
        return SPTEPointer(bitPattern: address)!
    }

    @inline(__always)
    private mutating func setTable(_ table: SPTEPointer, level: Int) {
        withUnsafeMutableBytes(of: &path) {
            $0.storeBytes(of: UInt(bitPattern: table), toByteOffset: (level - 1) * MemoryLayout<UInt>.stride, as: UInt.self)
        }
    }

    @inline(__always)
    private mutating func refreshSPTE() {
        sptep = table(level: level) + Self.index(gfn, level: level)
        oldSPTE = SPTESlot(sptep).load()
    }

    /// `tdp_iter_next`: down into the current SPTE's table if it has one, else to the next SPTE of
    /// this table, else up and across; the walk ends past the root's last entry.
    mutating func next() {
        if stepDown() { return }
        repeat {
            if stepSide() { return }
        } while stepUp()
        walking = false
    }

    private mutating func stepDown() -> Bool {
        guard level > minLevel else { return false }
        // Re-read: the caller may have changed the SPTE, or lost it to another thread.
        let spte = SPTESlot(sptep).load()
        oldSPTE = spte
        guard spte.isShadowPresent && !spte.isLast(level: level) else { return false }
        level -= 1
        setTable(pool.pointer(spte.pfn).assumingMemoryBound(to: UInt64.self), level: level)
        gfn = Self.round(nextLastLevelGFN, level: level)
        refreshSPTE()
        return true
    }

    private mutating func stepSide() -> Bool {
        guard Self.index(gfn, level: level) != KVMLevel.entriesPerPage - 1 else { return false }
        gfn += pagesPerHugePage(level)
        nextLastLevelGFN = gfn
        sptep += 1
        oldSPTE = SPTESlot(sptep).load()
        return true
    }

    private mutating func stepUp() -> Bool {
        guard level < rootLevel else { return false }
        level += 1
        gfn = Self.round(gfn, level: level)
        refreshSPTE()
        return true
    }
}
