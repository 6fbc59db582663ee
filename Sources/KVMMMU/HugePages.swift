// Where KVM may map a guest page huge (mmu.c `kvm_mmu_hugepage_adjust`, `__kvm_mmu_max_mapping_level`,
// `host_pfn_mapping_level`; x86.c `kvm_alloc_memslot_metadata`): the x86 half of a memslot's
// metadata, KVM's `slot->arch.lpage_info` and `gfn_write_track`.

import GuestMemory
import X86Paging

/// The largest page the host maps a memslot's memory with (what `host_pfn_mapping_level` finds in
/// the host's page tables: 4 KiB pages, transparent huge pages, hugetlbfs 1 GiB pages).
public enum HostMappingSize: Int, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case fourKiB = 1
    case twoMiB = 2
    case oneGiB = 3

    /// The page-table level of a leaf of this size.
    @inlinable public var level: Int { rawValue }

    public var description: String {
        switch self {
        case .fourKiB: "4K"
        case .twoMiB: "2M"
        case .oneGiB: "1G"
        }
    }
}

/// The number of 4 KiB pages a leaf at `level` maps (KVM_PAGES_PER_HPAGE).
@inlinable @inline(__always) func pagesPerHugePage(_ level: Int) -> UInt64 { 1 << UInt64(9 * (level - 1)) }

/// One memslot's huge-page and write-tracking state.
///
/// `disallow_lpage` counts, per 2 MiB and per 1 GiB region the slot touches, the reasons a huge
/// page may not map it: 1 for a region the slot only partly covers (its first and last, when the
/// slot's edges are unaligned), 1 everywhere when the slot's guest frames and host frames disagree
/// modulo the huge page (a huge mapping needs both aligned alike), plus one per write-tracked gfn
/// inside. The host's mapping size is an input: the model's host maps a slot with the largest page
/// (up to `hostMapping`) that fits inside the slot's contiguous run of host frames, which is what a
/// host with transparent huge pages (`.twoMiB`) or hugetlbfs (`.oneGiB`) gives a VMA.
///
/// Changed only with mmu_lock held for write; read by faults holding it for read.
final class MemslotMetadata {
    /// The slot as it is now (flags change in place).
    @exclusivity(unchecked) var slot: Memslot
    let hostMapping: HostMappingSize
    /// `lpage_info[0]` (2 MiB) and `lpage_info[1]` (1 GiB): one count per huge region.
    let disallow2M: UnsafeMutablePointer<Int32>
    let disallow1G: UnsafeMutablePointer<Int32>
    let regions2M: Int
    let regions1G: Int
    /// `gfn_write_track`: per gfn, how many users want its writes intercepted. Allocated on the
    /// first tracked gfn, as KVM allocates write tracking only once something needs it.
    @exclusivity(unchecked) private(set) var writeTrack: UnsafeMutablePointer<UInt16>?
    /// The gfns whose write-track count is not zero, for the auditor.
    @exclusivity(unchecked) private(set) var writeTrackedGFNs = Set<UInt64>()

    init(slot: Memslot, hostMapping: HostMappingSize) {
        self.slot = slot
        self.hostMapping = hostMapping
        regions2M = Self.regionCount(slot, level: 2)
        regions1G = Self.regionCount(slot, level: 3)
        disallow2M = .allocate(capacity: regions2M)
        disallow1G = .allocate(capacity: regions1G)
        for (level, counts, count) in [(2, disallow2M, regions2M), (3, disallow1G, regions1G)] {
            let pages = pagesPerHugePage(level)
            let mask = pages - 1
            let misaligned = (slot.baseFrame.rawValue ^ slot.hostBase.rawValue) & mask != 0
            counts.initialize(repeating: misaligned ? 1 : 0, count: count)
            if !misaligned {
                if slot.baseFrame.rawValue & mask != 0 { counts[0] = 1 }
                if slot.endFrame.rawValue & mask != 0 { counts[count - 1] = 1 }
            }
        }
    }

    deinit {
        disallow2M.deallocate()
        disallow1G.deallocate()
        writeTrack?.deallocate()
    }

    /// `__kvm_mmu_slot_lpages`: the huge regions at `level` the slot touches.
    static func regionCount(_ slot: Memslot, level: Int) -> Int {
        let shift = UInt64(9 * (level - 1))
        let last = slot.baseFrame.rawValue + slot.pageCount - 1
        return Int((last >> shift) - (slot.baseFrame.rawValue >> shift)) + 1
    }

    @inline(__always)
    private func regionIndex(_ gfn: UInt64, level: Int) -> Int {
        let shift = UInt64(9 * (level - 1))
        return Int((gfn >> shift) - (slot.baseFrame.rawValue >> shift))
    }

    /// `lpage_info_slot(gfn, slot, level)->disallow_lpage`.
    @inline(__always)
    func disallowCount(_ gfn: UInt64, level: Int) -> Int32 {
        level == 2 ? disallow2M[regionIndex(gfn, level: 2)] : disallow1G[regionIndex(gfn, level: 3)]
    }

    /// `update_gfn_disallow_lpage_count`: both huge levels at once. False (and nothing changed) when
    /// a count would go negative.
    func updateDisallowCount(_ gfn: UInt64, delta: Int32) -> Bool {
        let index2M = regionIndex(gfn, level: 2), index1G = regionIndex(gfn, level: 3)
        guard disallow2M[index2M] + delta >= 0, disallow1G[index1G] + delta >= 0 else { return false }
        disallow2M[index2M] += delta
        disallow1G[index1G] += delta
        return true
    }

    /// `kvm_gfn_is_write_tracked`.
    @inline(__always)
    func isWriteTracked(_ gfn: UInt64) -> Bool {
        guard let writeTrack else { return false }
        return writeTrack[Int(gfn - slot.baseFrame.rawValue)] != 0
    }

    /// The write-track count of `gfn`.
    func writeTrackCount(_ gfn: UInt64) -> Int {
        guard let writeTrack else { return 0 }
        return Int(writeTrack[Int(gfn - slot.baseFrame.rawValue)])
    }

    /// `update_gfn_write_track`: false (nothing changed) on overflow or underflow.
    func updateWriteTrack(_ gfn: UInt64, delta: Int) -> Bool {
        if writeTrack == nil {
            guard delta > 0 else { return false }
            let counts = UnsafeMutablePointer<UInt16>.allocate(capacity: Int(slot.pageCount))
            counts.initialize(repeating: 0, count: Int(slot.pageCount))
            writeTrack = counts
        }
        let index = Int(gfn - slot.baseFrame.rawValue)
        let new = Int(writeTrack![index]) + delta
        guard new >= 0, new <= Int(UInt16.max) else { return false }
        if new > 0 { writeTrackedGFNs.insert(gfn) } else { writeTrackedGFNs.remove(gfn) }
        writeTrack![index] = UInt16(new)
        return true
    }

    /// `host_pfn_mapping_level`: the largest leaf, up to `hostMapping`, whose aligned run of host
    /// frames around `gfn`'s frame lies inside the slot's host frames.
    @inline(__always)
    func hostMappingLevel(_ gfn: UInt64) -> Int {
        let offset = gfn - slot.baseFrame.rawValue
        let hostFrame = slot.hostBase.rawValue + offset
        var level = hostMapping.level
        while level > KVMLevel.pageTable {
            let pages = pagesPerHugePage(level)
            let start = hostFrame & ~(pages - 1)
            if start >= slot.hostBase.rawValue && start + pages <= slot.hostBase.rawValue + slot.pageCount { return level }
            level -= 1
        }
        return KVMLevel.pageTable
    }

    /// `__kvm_mmu_max_mapping_level` for a shared (non-private) gfn of this slot: the largest level,
    /// up to `maxLevel`, that no disallow count forbids and the host maps at least as large.
    @inline(__always)
    func maxMappingLevel(_ gfn: UInt64, maxLevel: Int) -> Int {
        var level = maxLevel
        while level > KVMLevel.pageTable && disallowCount(gfn, level: level) != 0 { level -= 1 }
        if level == KVMLevel.pageTable { return level }
        return min(hostMappingLevel(gfn), level)
    }
}
