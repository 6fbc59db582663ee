/// One 4 KiB page of host memory that backs a guest frame.
@frozen
public struct HostPage {
    /// The page's first byte; 4096 bytes are readable from here.
    public var bytes: UnsafeMutableRawPointer
    /// False for memory the guest cannot write (a read-only memslot, ROM): the walker reads such
    /// tables but, like KVM, leaves their accessed and dirty bits alone.
    public var isWritable: Bool

    @inlinable
    public init(bytes: UnsafeMutableRawPointer, isWritable: Bool) {
        self.bytes = bytes
        self.isWritable = isWritable
    }
}

/// Physical memory as a page walker sees it: guest frame -> host page. The lookup is the walker's
/// innermost operation, so conformers keep it allocation-free and O(1).
public protocol PhysicalMemory {
    /// The host page behind `frame`, or nil when no memory is there.
    func hostPage(_ frame: GuestFrameNumber) -> HostPage?
    /// The walker changed an entry in `frame` (its accessed and dirty bits). Memory that logs
    /// dirty pages records the frame, as KVM's walker does after its cmpxchg
    /// (`mark_page_dirty_in_slot` in `FNAME(update_accessed_dirty_bits)`).
    func didWriteEntry(in frame: GuestFrameNumber)
}

extension PhysicalMemory {
    /// Memory without dirty logging has nothing to record.
    @inlinable public func didWriteEntry(in frame: GuestFrameNumber) {}

    /// Reads the little-endian entry at `address`, which must be aligned to the entry's size
    /// (table bases are 4 KiB aligned and indices scale by the entry size, so walks always are).
    @inlinable
    public func readEntry<E: PageTableEntry>(_: E.Type, at address: GuestPhysicalAddress) -> E? {
        guard let page = hostPage(address.frame) else { return nil }
        // Atomic: another vCPU's walker may be setting A/D in the same entry.
        let raw = AtomicAccess.load(page.bytes + Int(address.pageOffset), size: E.size)
        return E(rawValue: E.RawValue(littleEndian: E.RawValue(truncatingIfNeeded: raw)))
    }

    /// Replaces the entry at `address` with `desired` if it still holds `expected`. Returns false
    /// when the entry changed under the walker (the walk must restart, as KVM's cmpxchg path
    /// does) and nil when there is no writable memory there (the update is skipped, as KVM does
    /// for tables in read-only memslots).
    @inlinable
    public func compareExchangeEntry<E: PageTableEntry>(
        at address: GuestPhysicalAddress, expected: E, desired: E
    ) -> Bool? {
        guard let page = hostPage(address.frame), page.isWritable else { return nil }
        // The processor's locked update: it fails if another processor (or the guest) changed the
        // entry since the walk read it.
        guard AtomicAccess.compareExchange(page.bytes + Int(address.pageOffset),
                                           expected: UInt64(expected.rawValue.littleEndian),
                                           desired: UInt64(desired.rawValue.littleEndian), size: E.size)
        else { return false }
        didWriteEntry(in: address.frame)
        return true
    }
}
