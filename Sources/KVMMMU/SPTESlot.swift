// Atomic access to one SPTE in a page table (kvm_tdp_mmu_read_spte, kvm_tdp_mmu_write_spte_atomic,
// try_cmpxchg64 on an sptep). The TDP MMU changes SPTEs under mmu_lock held for read, racing other
// faults, and hardware (a vCPU's walker) sets A/D bits in the same words at any time, so every access
// to a live TDP page table goes through these.

import Synchronization

/// One SPTE's 64-bit slot, read and written atomically.
///
/// Loads acquire and successful updates release, so that a thread which reads a non-leaf SPTE sees
/// the child table's entries as they were filled before the link was published. A value type over
/// the pointer: making one costs nothing.
@frozen
public struct SPTESlot {
    public let pointer: SPTEPointer

    @inlinable public init(_ pointer: SPTEPointer) { self.pointer = pointer }

    /// The slot as an `Atomic`, which has the layout of the `UInt64` it wraps.
    @inlinable
    var atomic: UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutableRawPointer(pointer).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// `kvm_tdp_mmu_read_spte`.
    @inlinable public func load() -> SPTE { SPTE(atomic.pointee.load(ordering: .acquiring)) }

    /// A plain store: for entries of a table no other thread can reach yet, and for writing
    /// non-present over an entry this thread froze (no one else may change a frozen entry).
    @inlinable public func store(_ value: SPTE) { atomic.pointee.store(value.rawValue, ordering: .releasing) }

    /// `try_cmpxchg64`: replaces `expected` with `desired`; on failure `expected` becomes the value
    /// found, as the kernel's try_cmpxchg refreshes `iter->old_spte`.
    @inlinable
    public func compareExchange(expected: inout SPTE, desired: SPTE) -> Bool {
        let (exchanged, original) = atomic.pointee.compareExchange(expected: expected.rawValue, desired: desired.rawValue,
                                                                   ordering: .acquiringAndReleasing)
        if !exchanged { expected = SPTE(original) }
        return exchanged
    }

    /// `xchg`: the value replaced.
    @inlinable
    public func exchange(_ value: SPTE) -> SPTE {
        SPTE(atomic.pointee.exchange(value.rawValue, ordering: .acquiringAndReleasing))
    }

    /// Clears `mask` atomically (`tdp_mmu_clear_spte_bits`); the value before.
    @inlinable
    public func clearBits(_ mask: UInt64) -> SPTE {
        SPTE(atomic.pointee.bitwiseAnd(~mask, ordering: .acquiringAndReleasing).oldValue)
    }

    /// Sets `mask` atomically, as a processor sets A/D bits in an entry it walked; the value before.
    @inlinable
    public func setBits(_ mask: UInt64) -> SPTE {
        SPTE(atomic.pointee.bitwiseOr(mask, ordering: .acquiringAndReleasing).oldValue)
    }
}
