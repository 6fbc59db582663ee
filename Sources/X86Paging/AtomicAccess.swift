// Memory that more than one processor touches at once. On x86 an aligned load or store of up to
// 8 bytes is single-copy atomic (SDM Vol. 3, 9.1.1), and the processor sets accessed and dirty
// bits with a locked read-modify-write (SDM Vol. 3, 4.8). The model's vCPUs run on threads, so the
// same words are read and written concurrently by walkers, guest stores and the VMM: these helpers
// give those accesses the architecture's atomicity (relaxed loads and stores compile to plain moves
// on x86; the compare-exchange is the `lock cmpxchg` the hardware does).

import Synchronization

/// Single-copy-atomic access to naturally aligned 1-, 2-, 4- and 8-byte words of guest memory.
public enum AtomicAccess {
    /// Loads the aligned word of `size` bytes at `pointer` (relaxed), zero-extended.
    @inlinable
    public static func load(_ pointer: UnsafeMutableRawPointer, size: Int) -> UInt64 {
        switch size {
        case 8: return pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
        case 4: return UInt64(pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.load(ordering: .relaxed))
        case 2: return UInt64(pointer.assumingMemoryBound(to: Atomic<UInt16>.self).pointee.load(ordering: .relaxed))
        default: return UInt64(pointer.assumingMemoryBound(to: Atomic<UInt8>.self).pointee.load(ordering: .relaxed))
        }
    }

    /// Stores the low `size` bytes of `value` to the aligned word at `pointer` (relaxed).
    @inlinable
    public static func store(_ value: UInt64, to pointer: UnsafeMutableRawPointer, size: Int) {
        switch size {
        case 8: pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.store(value, ordering: .relaxed)
        case 4: pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.store(UInt32(truncatingIfNeeded: value), ordering: .relaxed)
        case 2: pointer.assumingMemoryBound(to: Atomic<UInt16>.self).pointee.store(UInt16(truncatingIfNeeded: value), ordering: .relaxed)
        default: pointer.assumingMemoryBound(to: Atomic<UInt8>.self).pointee.store(UInt8(truncatingIfNeeded: value), ordering: .relaxed)
        }
    }

    /// Replaces the aligned 4- or 8-byte word at `pointer` with `desired` if it holds `expected`
    /// (`lock cmpxchg`); true when it did.
    @inlinable
    public static func compareExchange(_ pointer: UnsafeMutableRawPointer, expected: UInt64, desired: UInt64, size: Int) -> Bool {
        if size == 8 {
            return pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee
                .compareExchange(expected: expected, desired: desired, ordering: .acquiringAndReleasing).exchanged
        }
        return pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee
            .compareExchange(expected: UInt32(truncatingIfNeeded: expected), desired: UInt32(truncatingIfNeeded: desired),
                             ordering: .acquiringAndReleasing).exchanged
    }
}
