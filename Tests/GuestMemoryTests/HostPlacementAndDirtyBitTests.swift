import GuestMemory
import Testing
import X86Paging

/// Host-frame placement of memslots (what a VMM's mapping alignment decides) and the dirty-bit
/// operations KVM_CLEAR_DIRTY_LOG and KVM_DIRTY_LOG_INITIALLY_SET need.
@Suite struct HostPlacementAndDirtyBitTests {
    @Test func alignedAllocationsStartAtTheWantedRemainder() throws {
        let pool = try HostPagePool(capacityPages: 8192)
        let first = try pool.allocate(pages: 3)
        let aligned = try pool.allocate(pages: 10, alignment: 512, remainder: 0)
        #expect(aligned.rawValue % 512 == 0 && aligned.rawValue > first.rawValue)
        let skewed = try pool.allocate(pages: 2, alignment: 512, remainder: 7)
        #expect(skewed.rawValue % 512 == 7)
        // The hole below the aligned run is still used by plain allocations.
        #expect(try pool.allocate(pages: 1) == HostFrameNumber(first.rawValue + 3))
        #expect(throws: HostPagePoolError.invalidAlignment(0)) { _ = try pool.allocate(pages: 1, alignment: 0, remainder: 0) }
        #expect(throws: HostPagePoolError.self) { _ = try pool.allocate(pages: 5000, alignment: 4096, remainder: 1) }
    }

    @Test func memslotsPlaceTheirHostFramesRelativeToTheirGuestFrames() throws {
        let set = MemslotSet(pool: try HostPagePool(capacityPages: 1 << 14))
        _ = try set.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 5 << 12)
        let alike = try set.addSlot(id: 1, base: GuestPhysicalAddress(0x20_0000), size: 1 << 21, hostAlignment: 512)
        #expect((alike.hostBase.rawValue ^ alike.baseFrame.rawValue) % 512 == 0)
        let skewed = try set.addSlot(id: 2, base: GuestPhysicalAddress(0x60_0000), size: 1 << 21, hostAlignment: 512, hostSkew: 3)
        #expect((skewed.hostBase.rawValue + 512 - skewed.baseFrame.rawValue % 512) % 512 == 3)
        #expect(throws: MemslotError.self) {
            try set.addSlot(id: 3, base: GuestPhysicalAddress(0x100_0000), size: 1 << 12, hostAlignment: 0)
        }
    }

    @Test func dirtyBitsClearByMaskAndStartAllSet() throws {
        let set = MemslotSet(pool: try HostPagePool(capacityPages: 1024))
        _ = try set.addSlot(id: 0, base: GuestPhysicalAddress(0x1000), size: 100 << 12, flags: .logDirtyPages)
        set.markDirty(GuestFrameNumber(1 + 3))
        set.markDirty(GuestFrameNumber(1 + 70))
        #expect(set.isDirty(GuestFrameNumber(4)) && !set.isDirty(GuestFrameNumber(5)) && !set.isDirty(GuestFrameNumber(0)))
        #expect(try set.clearDirty(slot: 0, firstPage: 0, mask: 0b1100) == 0b1000)
        #expect(!set.isDirty(GuestFrameNumber(4)))
        #expect(try set.clearDirty(slot: 0, firstPage: 64, mask: ~0) == 1 << 6)
        #expect(try set.clearDirty(slot: 0, firstPage: 128, mask: ~0) == 0, "beyond the slot: nothing")
        try set.markAllDirty(slot: 0)
        #expect(try set.dirtyBitmap(slot: 0) == [~0, (1 << 36) - 1])
        try set.setFlags(id: 0, flags: [])
        #expect(throws: MemslotError.dirtyLoggingDisabled(id: 0)) { try set.markAllDirty(slot: 0) }
        #expect(throws: MemslotError.dirtyLoggingDisabled(id: 0)) { _ = try set.clearDirty(slot: 0, firstPage: 0, mask: 1) }
        #expect(throws: MemslotError.noSuchSlot(5)) { _ = try set.clearDirty(slot: 5, firstPage: 0, mask: 1) }
    }
}
