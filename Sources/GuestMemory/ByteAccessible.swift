import X86Paging

/// Guest-physical memory that copies bytes in and out; everything else a caller wants (whole
/// arrays, little-endian integers) is built on those two copies, once, here.
public protocol ByteAccessibleMemory: PhysicalMemory {
    associatedtype AccessFailure: Error
    func read(_ address: GuestPhysicalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(AccessFailure)
    func write(_ address: GuestPhysicalAddress, from buffer: UnsafeRawBufferPointer) throws(AccessFailure)
    /// The failure for `count` bytes at `address` when the range wraps around the address space.
    func overflowFailure(_ address: GuestPhysicalAddress, count: UInt64) -> AccessFailure
    /// Why the page at `address` (nil: no memory there) refuses the access, or nil if it does not.
    func refusal(of page: HostPage?, at address: GuestPhysicalAddress, writing: Bool) -> AccessFailure?
}

extension ByteAccessibleMemory {
    /// Checks the whole range first (every page backed, and acceptable to `refusal`), so that a
    /// failed access changes nothing, then calls `body(page, offset in page, bytes done, length)`
    /// for each page's part.
    @inlinable
    public func forEachChunk(
        _ address: GuestPhysicalAddress, count: UInt64, writing: Bool,
        _ body: (UnsafeMutableRawPointer, Int, Int, Int) -> Void
    ) throws(AccessFailure) {
        guard count > 0 else { return }
        let (_, overflow) = address.rawValue.addingReportingOverflow(count)
        guard !overflow else { throw overflowFailure(address, count: count) }
        var cursor = address.rawValue & ~pageOffsetMask
        while cursor < address.rawValue + count {
            let here = GuestPhysicalAddress(max(cursor, address.rawValue))
            if let failure = refusal(of: hostPage(GuestPhysicalAddress(cursor).frame), at: here, writing: writing) {
                throw failure
            }
            cursor += pageSize
        }
        var done: UInt64 = 0
        while done < count {
            let current = GuestPhysicalAddress(address.rawValue + done)
            let page = hostPage(current.frame)!
            let length = min(count - done, pageSize - current.pageOffset)
            body(page.bytes, Int(current.pageOffset), Int(done), Int(length))
            done += length
        }
    }
}

extension ByteAccessibleMemory {
    @inlinable
    public func read(_ address: GuestPhysicalAddress, count: Int) throws(AccessFailure) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: AccessFailure?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(AccessFailure) { try read(address, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    @inlinable
    public func write(_ address: GuestPhysicalAddress, bytes: [UInt8]) throws(AccessFailure) {
        var failure: AccessFailure?
        bytes.withUnsafeBytes { buffer in
            do throws(AccessFailure) { try write(address, from: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    @inlinable
    public func load64(_ address: GuestPhysicalAddress) throws(AccessFailure) -> UInt64 {
        try loadInteger(address, as: UInt64.self)
    }

    @inlinable
    public func store64(_ value: UInt64, at address: GuestPhysicalAddress) throws(AccessFailure) {
        try storeInteger(value, at: address)
    }

    @inlinable
    public func load32(_ address: GuestPhysicalAddress) throws(AccessFailure) -> UInt32 {
        try loadInteger(address, as: UInt32.self)
    }

    @inlinable
    public func store32(_ value: UInt32, at address: GuestPhysicalAddress) throws(AccessFailure) {
        try storeInteger(value, at: address)
    }

    @inlinable
    public func loadInteger<T: FixedWidthInteger>(_ address: GuestPhysicalAddress, as _: T.Type) throws(AccessFailure) -> T {
        var value: T = 0
        var failure: AccessFailure?
        withUnsafeMutableBytes(of: &value) { buffer in
            do throws(AccessFailure) { try read(address, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return T(littleEndian: value)
    }

    @inlinable
    public func storeInteger<T: FixedWidthInteger>(_ value: T, at address: GuestPhysicalAddress) throws(AccessFailure) {
        var failure: AccessFailure?
        withUnsafeBytes(of: value.littleEndian) { buffer in
            do throws(AccessFailure) { try write(address, from: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}
