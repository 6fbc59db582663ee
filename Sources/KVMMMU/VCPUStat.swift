// KVM's per-vCPU fault counters (`vcpu->stat`: pf_taken, pf_fixed, pf_emulate, pf_spurious,
// pf_fast, pf_mmio_spte_created). KVM bumps them with plain increments from the vCPU's own thread,
// so two vCPUs faulting at once never write the same cache line for them; only the VM-wide counts
// (pages_4k/2m/1g, nx_lpage_splits) are shared atomics. A reader sums the vCPUs' blocks, as KVM's
// stats interface does for its VM-wide view.

import Synchronization

/// The fault counters of every vCPU that faulted on one TDP MMU, a block of its own per vCPU id.
///
/// Blocks are made on a vCPU id's first fault, 64 ids at a time, and live as long as the MMU (KVM
/// frees `vcpu->stat` with the vCPU; a reader here must still see a destroyed vCPU's faults, which
/// KVM's VM-wide sums lose, and which the counters always showed).
final class VCPUFaultStats: @unchecked Sendable {
    /// A counter's word in a vCPU's block.
    enum Counter: Int {
        case pfTaken, pfFixed, pfEmulate, pfSpurious, pfFast, pfMMIOSPTECreated
    }

    /// Two cache lines a vCPU: the adjacent-line prefetcher moves lines in pairs, so a block that
    /// shared a pair with another vCPU's would still bounce between their cores.
    static let blockBytes = 128
    static let vcpusPerChunk = 64
    /// KVM_MAX_VCPUS on x86. Ids beyond it share blocks with lower ones: the sums stay exact (the
    /// increments are atomic), only the lines are shared.
    static let maxVCPUs = 4096
    private static var chunkBytes: Int { vcpusPerChunk * blockBytes }
    private static var chunkCount: Int { maxVCPUs / vcpusPerChunk }

    private let chunks: UnsafeMutablePointer<Atomic<UnsafeMutableRawPointer?>>

    init() {
        chunks = .allocate(capacity: Self.chunkCount)
        for index in 0..<Self.chunkCount { (chunks + index).initialize(to: Atomic(nil)) }
    }

    deinit {
        for index in 0..<Self.chunkCount {
            chunks[index].load(ordering: .acquiring)?.deallocate()
        }
        chunks.deinitialize(count: Self.chunkCount)
        chunks.deallocate()
    }

    /// The block of `vcpuID`, made on its first use.
    @inline(__always)
    func stat(forVCPU vcpuID: Int) -> VCPUStat {
        let index = Int(UInt(bitPattern: vcpuID) % UInt(Self.maxVCPUs))
        let chunkIndex = index / Self.vcpusPerChunk
        let chunk = chunks[chunkIndex].load(ordering: .acquiring) ?? makeChunk(chunkIndex)
        return VCPUStat(block: chunk + (index % Self.vcpusPerChunk) * Self.blockBytes)
    }

    /// Installs a zeroed chunk of blocks, or takes the one another thread installed first.
    @inline(never)
    private func makeChunk(_ chunkIndex: Int) -> UnsafeMutableRawPointer {
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: Self.chunkBytes, alignment: Self.blockBytes)
        let words = chunk.bindMemory(to: Atomic<UInt64>.self, capacity: Self.chunkBytes / 8)
        for word in 0..<Self.chunkBytes / 8 { (words + word).initialize(to: Atomic(0)) }
        let (installed, winner) = chunks[chunkIndex].compareExchange(expected: nil, desired: chunk,
                                                                     ordering: .acquiringAndReleasing)
        if installed { return chunk }
        chunk.deallocate()
        return winner!
    }

    /// Adds every vCPU's counters into `stats` (their `pf_*` fields).
    func addTotals(to stats: inout MMUStats) {
        for chunkIndex in 0..<Self.chunkCount {
            guard let chunk = chunks[chunkIndex].load(ordering: .acquiring) else { continue }
            for vcpu in 0..<Self.vcpusPerChunk {
                let stat = VCPUStat(block: chunk + vcpu * Self.blockBytes)
                stats.pfTaken &+= stat.value(.pfTaken)
                stats.pfFixed &+= stat.value(.pfFixed)
                stats.pfEmulate &+= stat.value(.pfEmulate)
                stats.pfSpurious &+= stat.value(.pfSpurious)
                stats.pfFast &+= stat.value(.pfFast)
                stats.pfMMIOSPTECreated &+= stat.value(.pfMMIOSPTECreated)
            }
        }
    }
}

/// One vCPU's `vcpu->stat` fault counters.
struct VCPUStat {
    let block: UnsafeMutableRawPointer

    /// KVM's `++vcpu->stat.x`. Atomic rather than a plain increment because callers of the fault
    /// API may share a vCPU id between threads; on a line no other vCPU writes, that costs no line
    /// transfer.
    @inline(__always)
    func increment(_ counter: VCPUFaultStats.Counter) {
        (block + counter.rawValue * 8).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.add(1, ordering: .relaxed)
    }

    func value(_ counter: VCPUFaultStats.Counter) -> UInt64 {
        (block + counter.rawValue * 8).assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
    }
}
