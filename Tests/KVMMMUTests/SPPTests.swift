// KVM's management of sub-page write protection (SPP.swift): the SET/GET semantics and their
// validation, the SPP table built on misses from the stored bitmaps, zaps and memslot changes, the
// SPTE bits, the fault path's and the emulator's questions.

import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

private let ept = SPTEMasks.ept(accessedDirty: true, executeOnly: false)

/// The plain rule, byte by byte: a write is allowed when no byte lands in a protected sub-page.
private func plainPermits(_ masks: (UInt64) -> UInt32, address: UInt64, count: UInt64) -> Bool {
    for byte in address..<address + count {
        let mask = masks(byte >> 12)
        if (mask >> UInt32((byte & 0xFFF) / 128)) & 1 == 0 { return false }
    }
    return true
}

/// A VM's memory: slot 0 at 0..<4 MiB (two 2 MiB blocks), slot 1 right after it at 4..<6 MiB,
/// slot 2 read-only at 16 MiB, and the hooks' calls recorded.
private final class Fixture {
    let pool: HostPagePool
    let memory: MemslotSet
    let spp: SubPageProtection
    let events = MMUEventLog(capacity: 1 << 16, recording: true)
    var zapped: [UInt64] = []
    var arming: [(UInt64, Bool)] = []
    var flushes = 0

    init() throws {
        pool = try HostPagePool(capacityPages: 8192)
        memory = MemslotSet(pool: pool)
        try memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 4 << 20)
        try memory.addSlot(id: 1, base: GuestPhysicalAddress(4 << 20), size: 2 << 20)
        try memory.addSlot(id: 2, base: GuestPhysicalAddress(16 << 20), size: 1 << 20, flags: .readOnly)
        spp = try SubPageProtection(memory: memory, masks: ept, events: events)
        spp.splitOrZapHugeMapping = { [unowned self] gfn in zapped.append(gfn.rawValue) }
        spp.updateLeafArming = { [unowned self] gfn, armed in arming.append((gfn.rawValue, armed)) }
        spp.flushRemoteTLBs = { [unowned self] in flushes += 1 }
    }

    func set(_ gfn: UInt64, _ masks: [UInt32]) throws(SubPageProtectionError) {
        try spp.setSubpageAccess(gfn: GuestFrameNumber(gfn), count: masks.count, masks: masks.map { SubPageWriteMask($0) })
    }

    func get(_ gfn: UInt64, _ count: Int) throws(SubPageProtectionError) -> [UInt32] {
        try spp.getSubpageAccess(gfn: GuestFrameNumber(gfn), count: count).map(\.rawValue)
    }

    /// What the processor reads for `gfn`: the bitmap, or the fault.
    func hardware(_ gfn: UInt64) -> Result<UInt32, SPPTWalkFault> {
        do {
            return .success(try spp.hardwareLookUp(GuestFrameNumber(gfn).address).writeMask.rawValue)
        } catch {
            return .failure(error)
        }
    }

    func missLevel(_ gfn: UInt64) -> Int? {
        guard case .failure(.miss(_, let level, _)) = hardware(gfn) else { return nil }
        return level
    }
}

private func caught<T>(_ body: () throws(SubPageProtectionError) -> T) -> SubPageProtectionError? {
    do {
        _ = try body()
        return nil
    } catch {
        return error
    }
}

// MARK: Enabling, the role bit

@Suite("SPP enabling and role")
struct SPPEnablingTests {
    @Test func refusedWithoutEPTOrWithNesting() throws {
        let pool = try HostPagePool(capacityPages: 16)
        let memory = MemslotSet(pool: pool)
        #expect(caught { () throws(SubPageProtectionError) in try SubPageProtection(memory: memory, masks: .shadowPaging) }
                == .requiresEPT)
        #expect(caught { () throws(SubPageProtectionError) in
            try SubPageProtection(memory: memory, masks: ept, nestedVirtualization: true)
        } == .exclusiveWithNestedVirtualization)
        #expect(pool.allocatedPages == 0)
        do {
            let spp = try SubPageProtection(memory: memory, masks: ept)
            #expect(pool.allocatedPages == 1)
            #expect(spp.tablePointer.rawValue == spp.rootFrame.address.rawValue)
            #expect(spp.tablePages.map(\.level) == [4])
        }
        #expect(pool.allocatedPages == 0, "the root goes back to the pool with SPP")
    }

    /// A root the processor could not address, and a pool with no page left, are errors.
    @Test func hostMemoryProblemsAreErrors() throws {
        let highPool = try HostPagePool(capacityPages: 4, firstFrame: HostFrameNumber(1 << 34))
        let error = caught { () throws(SubPageProtectionError) in
            try SubPageProtection(memory: MemslotSet(pool: highPool), masks: ept)
        }
        #expect(error == .tablePointer(.beyondPhysicalAddressWidth(1 << 46, maxPhysicalAddressBits: 46)))
        #expect(highPool.allocatedPages == 0)

        let pool = try HostPagePool(capacityPages: 4)
        let memory = MemslotSet(pool: pool)
        try memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 0x2000)
        let spp = try SubPageProtection(memory: memory, masks: ept)
        try spp.setSubpageAccess(gfn: GuestFrameNumber(1), count: 1, masks: [0x1])
        guard case .hostMemory(.exhausted)? = caught({ () throws(SubPageProtectionError) in
            try spp.handleTableMiss(at: GuestPhysicalAddress(0x1000), vcpuID: 0)
        }) else {
            Issue.record("a miss without host memory did not report it")
            return
        }
        #expect(spp.audit().isEmpty, "a failed miss leaves a consistent table")
        #expect(try spp.getSubpageAccess(gfn: GuestFrameNumber(1), count: 1) == [0x1])
    }

    @Test func roleBitIsTwentyThreeAndCollidesWithNothing() {
        var role = PageRole()
        role.isSubPageProtectionTable = true
        #expect(role.word == 1 << 23)
        #expect(role.word & PageRole.unusedBits == role.word, "upstream leaves the bit unused")
        // Under the seed-1 variants the guest-level fields (19-22, 19-20) and spp are independent.
        var both = PageRole(level: 4, isDirect: false)
        both.guestLevel = 15
        both.isSubPageProtectionTable = true
        #expect(both.guestLevel == 15 && both.isSubPageProtectionTable)
        both.guestLevel = 0
        #expect(both.isSubPageProtectionTable)
        both.passthroughDelta = 3
        both.isSubPageProtectionTable = false
        #expect(both.passthroughDelta == 3)
        for variant in MMUVariant.allCases {
            let encoded = variant.encodingGuestLevel(PageRole.subPageProtectionTable(level: 2), guestRootLevel: 4)
            #expect(encoded.isSubPageProtectionTable, "\(variant)")
        }
        let table = PageRole.subPageProtectionTable(level: 3)
        #expect(table.level == 3 && table.isDirect && table.access == ACC.all)
        #expect(table.description == "l3 8-byte q0 direct wux !nxe ad !wp spp")
    }
}

// MARK: SET and GET

@Suite("SPP set and get")
struct SPPAccessTests {
    @Test func defaultsAreAllWritable() throws {
        let f = try Fixture()
        #expect(try f.get(0, 512) == [UInt32](repeating: 0xFFFF_FFFF, count: 512))
        #expect(try f.get(16 << 8, 4) == [UInt32](repeating: 0xFFFF_FFFF, count: 4), "read-only slots read all-writable")
        #expect(f.spp.protectedPageCount == 0)
        #expect(f.spp.audit().isEmpty)
    }

    @Test func setThenGetAcrossAdjacentSlots() throws {
        let f = try Fixture()
        var rng = TDPRandom(seed: 7)
        let first: UInt64 = (4 << 8) - 100  // 100 pages in slot 0, 412 in slot 1
        let masks = (0..<512).map { _ in UInt32(truncatingIfNeeded: rng.next()) | (rng.next() % 4 == 0 ? 0xFFFF_FFFF : 0) }
        try f.set(first, masks)
        #expect(try f.get(first, 512) == masks)
        #expect(try f.get(first - 1, 1) == [0xFFFF_FFFF])
        #expect(f.spp.protectedPageCount == masks.filter { $0 != 0xFFFF_FFFF }.count)
        // Setting the same bitmaps again changes nothing, so nothing is flushed.
        let flushes = f.flushes
        try f.set(first, masks)
        #expect(f.flushes == flushes)
        #expect(f.spp.audit().isEmpty)
    }

    @Test func validationErrors() throws {
        let f = try Fixture()
        let one: [SubPageWriteMask] = [0x0F]
        #expect(caught { () throws(SubPageProtectionError) in
            try f.spp.setSubpageAccess(gfn: GuestFrameNumber(0), count: 1, masks: one, flags: 1)
        } == .invalidFlags(1))
        #expect(caught { () throws(SubPageProtectionError) in
            try f.spp.getSubpageAccess(gfn: GuestFrameNumber(0), count: 1, flags: 4)
        } == .invalidFlags(4))
        #expect(caught { () throws(SubPageProtectionError) in try f.set(0, []) } == .invalidPageCount(0))
        #expect(caught { () throws(SubPageProtectionError) in try f.set(0, [UInt32](repeating: 0, count: 513)) }
                == .invalidPageCount(513))
        #expect(caught { () throws(SubPageProtectionError) in try f.get(0, 513) } == .invalidPageCount(513))
        #expect(caught { () throws(SubPageProtectionError) in try f.get(0, -1) } == .invalidPageCount(-1))
        #expect(caught { () throws(SubPageProtectionError) in
            try f.spp.setSubpageAccess(gfn: GuestFrameNumber(0), count: 2, masks: one)
        } == .maskCountMismatch(pages: 2, masks: 1))
        // Slot 1 ends at gfn 0x600; a range running past it is refused whole.
        #expect(caught { () throws(SubPageProtectionError) in try f.set(0x5FF, [0, 0]) } == .notInMemslot(GuestFrameNumber(0x600)))
        #expect(caught { () throws(SubPageProtectionError) in try f.get(0x5FF, 2) } == .notInMemslot(GuestFrameNumber(0x600)))
        #expect(caught { () throws(SubPageProtectionError) in try f.set(UInt64.max - 1, [0, 0, 0]) }
                == .notInMemslot(GuestFrameNumber(.max - 1)))
        #expect(caught { () throws(SubPageProtectionError) in try f.set(0x1000, [0]) } == .readOnlyMemslot(GuestFrameNumber(0x1000), slot: 2))
        #expect(try f.get(0x5FF, 1) == [0xFFFF_FFFF], "the refused SET changed nothing")
        #expect(f.spp.protectedPageCount == 0 && f.zapped.isEmpty && f.arming.isEmpty && f.flushes == 0)
        // 512 pages is the limit, not past it.
        try f.set(0, [UInt32](repeating: 1, count: 512))
        #expect(f.spp.protectedPageCount == 512)
    }

    /// Hooks: a page becoming protected loses its huge mapping and is armed; one becoming
    /// all-writable again is disarmed; a protected page whose bitmap changes keeps its leaf as is.
    @Test func hooksFollowTransitions() throws {
        let f = try Fixture()
        try f.set(0x10, [0xFFFF_FFFF, 0x1, 0x2])
        #expect(f.zapped == [0x11, 0x12])
        #expect(f.arming.map(\.0) == [0x11, 0x12] && f.arming.allSatisfy(\.1))
        #expect(f.flushes == 1)
        try f.set(0x11, [0x3, 0xFFFF_FFFF])
        #expect(f.zapped == [0x11, 0x12], "already protected pages are not zapped again")
        #expect(f.arming.count == 3 && f.arming[2] == (0x12, false))
        #expect(f.flushes == 2)
        #expect(f.spp.protectedPageCount == 1)
        let setEvents = f.events.events.filter { $0.event.name == "kvm_spp_set_subpages" }
        #expect(setEvents.count == 4)
        #expect(setEvents.last?.event == .kvmSPPSetSubpages(vcpuID: nil, gfn: GuestFrameNumber(0x12), access: .allWritable))
    }

    /// Huge mappings: a protected page forces 4 KiB mappings over its 2 MiB block, 2 MiB ones over
    /// its 1 GiB block, and nothing elsewhere; unprotecting lifts it.
    @Test func hugePageLimits() throws {
        let f = try Fixture()
        let gfn: UInt64 = 0x2_37
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(gfn), limit: 3) == 3)
        try f.set(gfn, [0x7FFF_FFFF])
        #expect(f.spp.requiresSmallPage(GuestFrameNumber(gfn)))
        #expect(!f.spp.requiresSmallPage(GuestFrameNumber(gfn + 1)))
        for other in [UInt64(0x200), 0x3FF, gfn] { #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(other), limit: 3) == 1) }
        for other in [UInt64(0x1FF), 0x400, 0x5FF] { #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(other), limit: 3) == 2) }
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(0x400), limit: 1) == 1)
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(1 << 18), limit: 3) == 3)
        try f.set(gfn, [0xFFFF_FFFF])
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(gfn), limit: 3) == 3)
        #expect(f.spp.audit().isEmpty)
    }

    /// The decision for 5-level EPT: pages at or above 2^48 cannot be protected (the 4-level table
    /// does not reach them), but their bitmap reads, and may be set to, all-writable.
    @Test func fiveLevelEPTSlotAboveTheTable() throws {
        let f = try Fixture()
        let high = GuestPhysicalAddress(1 << 48)
        try f.memory.addSlot(id: 3, base: high, size: 0x2000)
        let gfn = high.frame.rawValue
        #expect(caught { () throws(SubPageProtectionError) in try f.set(gfn, [0xFFFF_0000]) } == .beyondTableReach(GuestFrameNumber(gfn)))
        try f.set(gfn, [0xFFFF_FFFF, 0xFFFF_FFFF])
        #expect(try f.get(gfn, 2) == [0xFFFF_FFFF, 0xFFFF_FFFF])
        #expect(gfn == SubPageProtection.reachableFrameLimit)
        #expect(caught { () throws(SubPageProtectionError) in
            try f.spp.handleTableMiss(at: high, vcpuID: 0)
        } == .beyondTableReach(GuestFrameNumber(gfn)))
        // Just below 2^48 works: the root is level 4 whatever the EPT depth.
        try f.memory.addSlot(id: 4, base: GuestPhysicalAddress((1 << 48) - 0x1000), size: 0x1000)
        try f.set(gfn - 1, [0x55])
        try f.spp.handleTableMiss(at: GuestFrameNumber(gfn - 1).address, vcpuID: 0)
        #expect(f.hardware(gfn - 1) == .success(0x55))
        #expect(f.spp.tablePages.map(\.level) == [4, 3, 2, 1])
        #expect(f.spp.audit().isEmpty)
    }
}

// MARK: The table

@Suite("SPP table")
struct SPPTableTests {
    /// A miss rebuilds the whole 2 MiB block: every L1E from its stored bitmap (L1Es have no
    /// present bit), and nothing of the neighbouring blocks.
    @Test func missRebuildsTheWholeBlock() throws {
        let f = try Fixture()
        var rng = TDPRandom(seed: 11)
        let masks = (0..<512).map { _ in UInt32(truncatingIfNeeded: rng.next()) }
        try f.set(0x200, Array(masks[0..<256]))
        try f.set(0x300, Array(masks[256...]))
        #expect(f.missLevel(0x234) == 4)
        try f.spp.handleTableMiss(at: GuestPhysicalAddress(0x23_4567), vcpuID: 1)
        for index in 0..<512 { #expect(f.hardware(0x200 + UInt64(index)) == .success(masks[index])) }
        #expect(f.missLevel(0x1FF) == 2 && f.missLevel(0x400) == 2)
        #expect(f.spp.tablePages.map(\.level) == [4, 3, 2, 1])
        #expect(f.spp.tablePages.last?.gfn == GuestFrameNumber(0x200))
        #expect(f.spp.tablePages.allSatisfy { $0.role.isSubPageProtectionTable })
        #expect(f.events.count(of: "kvm_spp_induced_exit") == 1)
        #expect(f.events.events.last { $0.event.name == "kvm_spp_induced_exit" }?.event
                == .kvmSPPInducedExit(vcpuID: 1, gpa: GuestPhysicalAddress(0x23_4567), qualification: .sppTableMiss))
        #expect(f.events.count(of: "kvm_mmu_get_page") == 3)
        // The neighbouring block shares the upper tables.
        try f.spp.handleTableMiss(at: GuestPhysicalAddress(0x40_0000), vcpuID: 0)
        #expect(f.spp.tablePages.map(\.level) == [4, 3, 2, 1, 1])
        #expect(f.hardware(0x400) == .success(0xFFFF_FFFF))
        #expect(f.spp.audit().isEmpty)
    }

    /// A SET on a built block rewrites the L1E at once (a stale one would let refused writes
    /// through) and flushes; on an unbuilt block it leaves the table alone.
    @Test func setUpdatesBuiltLeavesOnly() throws {
        let f = try Fixture()
        try f.spp.handleTableMiss(at: GuestPhysicalAddress(0), vcpuID: 0)
        try f.set(0x5, [0xAAAA_0000])
        #expect(f.hardware(0x5) == .success(0xAAAA_0000))
        try f.set(0x205, [0x1])
        #expect(f.missLevel(0x205) == 2)
        #expect(f.spp.audit().isEmpty)
    }

    /// Zapping frees every table but the root; the bitmaps persist, and the next miss rebuilds.
    @Test func bitmapsPersistAcrossZaps() throws {
        let f = try Fixture()
        try f.set(0x10, [0x1, 0x2, 0x3])
        let before = f.pool.allocatedPages
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x10).address, vcpuID: 0)
        #expect(f.pool.allocatedPages == before + 3)
        f.spp.zapAllTables()
        #expect(f.pool.allocatedPages == before)
        #expect(f.spp.tablePages.count == 1)
        #expect(f.missLevel(0x10) == 4)
        #expect(try f.get(0x10, 3) == [0x1, 0x2, 0x3])
        #expect(f.events.count(of: "kvm_mmu_prepare_zap_page") == 3)
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x12).address, vcpuID: 0)
        #expect(f.hardware(0x11) == .success(0x2))
        #expect(f.spp.audit().isEmpty)
    }

    @Test func misconfigurationExitsToTheVMM() throws {
        let f = try Fixture()
        let exit = f.spp.handleTableMisconfiguration(at: GuestPhysicalAddress(0x1234), vcpuID: 3)
        #expect(exit.hardwareExitReason == 66 && exit.address == GuestPhysicalAddress(0x1234))
        #expect(f.events.events.last?.event == .kvmSPPInducedExit(vcpuID: 3, gpa: GuestPhysicalAddress(0x1234), qualification: []))
    }

    /// The auditor notices a corrupted L1E and a corrupted directory entry.
    @Test func auditorCatchesCorruption() throws {
        let f = try Fixture()
        try f.set(0x3, [0xF0])
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x3).address, vcpuID: 0)
        let leafTable = try #require(f.spp.tablePages.last)
        let entries = f.pool.pointer(leafTable.frame).assumingMemoryBound(to: UInt64.self)
        entries[3] = SPPLeafEntry(spreading: 0xFF).rawValue
        #expect(f.spp.audit().count == 1)
        entries[3] = SPPLeafEntry(spreading: 0xF0).rawValue
        let rootEntries = f.pool.pointer(f.spp.rootFrame).assumingMemoryBound(to: UInt64.self)
        rootEntries[0] |= 1 << 5
        #expect(f.spp.audit().contains { $0.contains("reserved") })
        guard case .failure(.misconfiguration(_, 4, _)) = f.hardware(0x3) else {
            Issue.record("a reserved bit in the root gave \(f.hardware(0x3))")
            return
        }
    }
}

// MARK: Memslot changes

@Suite("SPP and memslots")
struct SPPMemslotTests {
    /// Permissions belong to the slot's pages: a moved slot takes them along, the huge-page limits
    /// move with them, and the table (indexed by address) is zapped.
    @Test func permissionsMoveWithTheSlot() throws {
        let f = try Fixture()
        try f.set(0x400 + 7, [0x1234])
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x407).address, vcpuID: 0)
        let newBase = GuestPhysicalAddress(64 << 20)
        try f.spp.validateMemslotMove(id: 1, to: newBase)
        try f.memory.moveSlot(id: 1, to: newBase)
        f.spp.memslotMoved(id: 1)
        let moved = newBase.frame.rawValue + 7
        #expect(try f.get(moved, 1) == [0x1234])
        #expect(caught { () throws(SubPageProtectionError) in try f.get(0x407, 1) } == .notInMemslot(GuestFrameNumber(0x407)))
        // The old 2 MiB block is free again; it shares a 1 GiB block with the new one.
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(0x407), limit: 3) == 2)
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(moved), limit: 3) == 1)
        #expect(f.missLevel(0x407) == 4 && f.missLevel(moved) == 4)
        try f.spp.handleTableMiss(at: GuestFrameNumber(moved).address, vcpuID: 0)
        #expect(f.hardware(moved) == .success(0x1234))
        #expect(f.spp.audit().isEmpty)
    }

    @Test func moveBeyondTheTableIsRefused() throws {
        let f = try Fixture()
        try f.set(0x400, [0x0])
        let high = GuestPhysicalAddress(1 << 48)
        #expect(caught { () throws(SubPageProtectionError) in try f.spp.validateMemslotMove(id: 1, to: high) }
                == .moveBeyondTableReach(slot: 1, to: high))
        // A slot without protected pages may go there.
        try f.spp.validateMemslotMove(id: 0, to: high)
    }

    /// A deleted slot's permissions go with it; a new slot with the same id starts all-writable,
    /// even if nobody told SPP about the deletion.
    @Test func deletionDropsPermissions() throws {
        let f = try Fixture()
        try f.set(0x400, [0x0, 0x1])
        try f.memory.deleteSlot(id: 1)
        f.spp.memslotDeleted(id: 1)
        #expect(f.spp.protectedPageCount == 0)
        #expect(f.spp.maxMappingLevel(for: GuestFrameNumber(0x400), limit: 3) == 3)
        try f.memory.addSlot(id: 1, base: GuestPhysicalAddress(4 << 20), size: 2 << 20)
        #expect(try f.get(0x400, 2) == [0xFFFF_FFFF, 0xFFFF_FFFF])
        #expect(f.spp.audit().isEmpty)

        try f.set(0x0, [0x0])
        try f.memory.deleteSlot(id: 0)
        try f.memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 2 << 20)
        #expect(try f.get(0x0, 1) == [0xFFFF_FFFF], "a stale record is not inherited")
    }
}

// MARK: SPTEs, faults and the emulator

@Suite("SPP SPTEs and faults")
struct SPPFaultTests {
    let pfn = HostFrameNumber(0x12_3456)

    func leaf(writable: Bool = true, hostWritable: Bool = true, level: Int = 1, masks: SPTEMasks = ept) -> SPTE {
        SPTE.leaf(pfn: pfn, level: level, access: ACC.all, hostWritable: hostWritable, writable: writable, masks: masks)
    }

    @Test func bitsCollideWithNothingKVMUses() {
        #expect(SPTE.subPagePermissionBit == 1 << 61 && SPTE.savedSubPagePermissionBit == 1 << 55)
        for masks in [ept, SPTEMasks.ept(accessedDirty: false, executeOnly: true)] {
            let used = [SPTE.mmuPresentBit, masks.hostWritable, masks.mmuWritable, SPTE.adMask,
                        SPTE.accTrackSavedBits << SPTE.accTrackSavedShift, SPTE.baseAddressMask, SPTE.pageSizeBit,
                        SPTE.writableBit, masks.present, masks.user, masks.x, masks.nx, masks.accessed, masks.dirty,
                        masks.accTrack, masks.memoryType, masks.mmioMask].reduce(0, |)
            #expect(used & (SPTE.subPagePermissionBit | SPTE.savedSubPagePermissionBit) == 0)
        }
        // Only the MMIO generation shares them, and an MMIO SPTE is never shadow-present.
        #expect(SPTE.mmioGenHighMask & SPTE.savedSubPagePermissionBit != 0)
        let mmio = SPTE.mmio(gfn: GuestFrameNumber(0x10), access: 0, generation: 0x7_FFFF, masks: ept)
        #expect(!mmio.isShadowPresent && mmio.armedForSubPageProtection(level: 1, masks: ept) == nil)
    }

    @Test func armingRules() throws {
        let writable = leaf()
        let armed = try #require(writable.armedForSubPageProtection(level: 1, masks: ept))
        #expect(armed.isSubPageArmed && !armed.isWritable && armed.isMMUWritable(ept) && armed.isHostWritable(ept))
        #expect(armed.rawValue == (writable.rawValue & ~2) | 1 << 61)
        #expect(armed.consultsSubPagePermissions(level: 1) && !writable.consultsSubPagePermissions(level: 1))
        #expect(armed.armedForSubPageProtection(level: 1, masks: ept) == nil)
        // Write-protected for dirty logging: armed in waiting.
        let dirtyProtected = try #require(writable.writeProtected(forPageTable: false, masks: ept))
        let waiting = try #require(dirtyProtected.armedForSubPageProtection(level: 1, masks: ept))
        #expect(waiting.hasSavedSubPageArming && !waiting.isSubPageArmed)
        // Never where KVM would not grant W, never huge, never outside EPT.
        #expect(leaf(writable: false, hostWritable: false).armedForSubPageProtection(level: 1, masks: ept) == nil)
        #expect(try #require(writable.writeProtected(forPageTable: true, masks: ept)).armedForSubPageProtection(level: 1, masks: ept) == nil)
        #expect(leaf(level: 2).armedForSubPageProtection(level: 2, masks: ept) == nil)
        #expect(leaf(masks: .shadowPaging).armedForSubPageProtection(level: 1, masks: .shadowPaging) == nil)
        #expect(SPTE.nonPresent.armedForSubPageProtection(level: 1, masks: ept) == nil)
        // Disarming clears both bits and nothing else; W comes back through a write fault.
        #expect(armed.disarmedSubPageProtection() == SPTE(armed.rawValue & ~(1 << 61)))
        #expect(waiting.disarmedSubPageProtection() == dirtyProtected)
        #expect(writable.disarmedSubPageProtection() == nil)
    }

    /// Dirty logging must not let an armed leaf take writes unlogged: write protection moves bit 61
    /// aside, the write fault logs the page and arms it again, and the retried write meets the
    /// table.
    @Test func dirtyLoggingCycle() throws {
        let f = try Fixture()
        try f.set(0x20, [~UInt32(1 << 4)])
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x20).address, vcpuID: 0)
        let armed = f.spp.applyingProtection(to: leaf(), gfn: GuestFrameNumber(0x20), level: 1)
        #expect(armed.isSubPageArmed)
        #expect(f.spp.applyingProtection(to: leaf(), gfn: GuestFrameNumber(0x21), level: 1) == leaf())
        let address = GuestFrameNumber(0x20).address
        #expect(try f.spp.hardwareCheckWrite(at: address, byteCount: 8, leaf: armed, level: 1) == .permitted)
        #expect(try f.spp.hardwareCheckWrite(at: GuestPhysicalAddress(address.rawValue + 4 * 128), byteCount: 1,
                                             leaf: armed, level: 1) == .denied(subPage: 4))
        let logged = try #require(armed.writeProtectedForDirtyLogging())
        #expect(!logged.isSubPageArmed && logged.hasSavedSubPageArming && !logged.isWritable)
        #expect(try f.spp.hardwareCheckWrite(at: address, byteCount: 8, leaf: logged, level: 1) == .notApplicable,
                "the write faults as an ordinary EPT violation, so it is logged")
        #expect(f.spp.writeFaultAction(gfn: GuestFrameNumber(0x20), leaf: logged, level: 1) == .armAndRetry)
        let rearmed = try #require(logged.armedAfterWriteFault(masks: ept))
        #expect(rearmed == armed)
        #expect(leaf().writeProtectedForDirtyLogging() == leaf().writeProtected(forPageTable: false, masks: ept))
        #expect(logged.writeProtectedForDirtyLogging() == nil)
        // Access tracking leaves bit 61 alone, and restoring brings the armed leaf back whole.
        let noAD = SPTEMasks.ept(accessedDirty: false, executeOnly: false)
        let armedNoAD = try #require(SPTE.leaf(pfn: pfn, level: 1, access: ACC.all, hostWritable: true, writable: true,
                                               adDisabled: true, masks: noAD).armedForSubPageProtection(level: 1, masks: noAD))
        let tracked = armedNoAD.markedForAccessTrack(noAD)
        #expect(tracked.isSubPageArmed && tracked.isAccessTracked(noAD))
        #expect(tracked.restoredFromAccessTrack(noAD) == SPTE(armedNoAD.rawValue & ~noAD.accessed))
    }

    @Test func writeFaultActions() throws {
        let f = try Fixture()
        try f.set(0x30, [0xFF])
        let protected = GuestFrameNumber(0x30), free = GuestFrameNumber(0x31)
        let armed = try #require(leaf().armedForSubPageProtection(level: 1, masks: ept))
        let readOnlyHost = leaf(writable: false, hostWritable: false)
        #expect(f.spp.writeFaultAction(gfn: protected, leaf: armed, level: 1) == .exitToUserspace)
        #expect(f.spp.writeFaultAction(gfn: free, leaf: armed, level: 1) == .disarmStaleLeaf)
        #expect(f.spp.writeFaultAction(gfn: free, leaf: readOnlyHost, level: 1) == .notSubPageProtected)
        #expect(f.spp.writeFaultAction(gfn: protected, leaf: readOnlyHost, level: 1) == .notSubPageProtected)
        let dirtyProtected = try #require(leaf().writeProtected(forPageTable: false, masks: ept))
        #expect(f.spp.writeFaultAction(gfn: protected, leaf: dirtyProtected, level: 1) == .armAndRetry)
        #expect(f.spp.writeFaultAction(gfn: protected, leaf: leaf(level: 2), level: 2) == .notSubPageProtected)
        let exit = f.spp.subPageWriteExit(vcpuID: 2, address: GuestPhysicalAddress(0x30_040), instructionLength: 4)
        #expect(exit == SubPageWriteExit(address: GuestPhysicalAddress(0x30_040), instructionLength: 4))
        #expect(SubPageWriteExit.exitReason == 29)
        #expect(f.events.events.last?.event
                == .kvmSPPInducedPageFault(vcpuID: 2, gpa: GuestPhysicalAddress(0x30_040), instructionLength: 4))
    }

    @Test func leafAuditor() throws {
        let f = try Fixture()
        try f.set(0x40, [0x0])
        let protected = GuestFrameNumber(0x40), free = GuestFrameNumber(0x41)
        let armed = try #require(leaf().armedForSubPageProtection(level: 1, masks: ept))
        #expect(f.spp.auditLeaf(armed, gfn: protected, level: 1) == nil)
        #expect(f.spp.auditLeaf(leaf(), gfn: free, level: 1) == nil)
        #expect(f.spp.auditLeaf(leaf(writable: false, hostWritable: false), gfn: protected, level: 1) == nil)
        #expect(f.spp.auditLeaf(leaf(), gfn: protected, level: 1) != nil)
        #expect(f.spp.auditLeaf(leaf(level: 2), gfn: protected, level: 2) != nil)
        #expect(f.spp.auditLeaf(armed, gfn: free, level: 1) != nil)
        #expect(f.spp.auditLeaf(SPTE(armed.rawValue | 2), gfn: protected, level: 1) != nil)
        #expect(f.spp.auditLeaf(SPTE(armed.rawValue | 1 << 55), gfn: protected, level: 1) != nil)
    }

    /// The emulator's check, the processor's check over KVM's table, and the plain rule agree on
    /// random bitmaps and random writes, including writes across sub-page and page boundaries.
    @Test func emulatorHardwareAndPlainRuleAgree() throws {
        let f = try Fixture()
        var rng = TDPRandom(seed: 0x5EED)
        var masks = (0..<512).map { _ in UInt32(truncatingIfNeeded: rng.next()) }
        masks[17] = 0xFFFF_FFFF
        masks[18] = 0
        try f.set(0x200, masks)
        try f.spp.handleTableMiss(at: GuestFrameNumber(0x200).address, vcpuID: 0)
        let stored: (UInt64) -> UInt32 = { gfn in (0x200..<0x400).contains(gfn) ? masks[Int(gfn - 0x200)] : 0xFFFF_FFFF }
        let armed = try #require(leaf().armedForSubPageProtection(level: 1, masks: ept))
        let sizes: [UInt64] = [1, 2, 4, 8, 16, 64, 100, 128, 200, 4096, 5000]
        for _ in 0..<4000 {
            let size = sizes[Int(rng.next() % UInt64(sizes.count))]
            let address = 0x20_0000 + rng.next() % (0x20_0000 - size)
            let expected = plainPermits(stored, address: address, count: size)
            let emulated = try f.spp.checkEmulatedWrite(at: GuestPhysicalAddress(address), byteCount: size)
            #expect((emulated == .permitted) == expected, "write \(size) at \(hex(address))")
            if case .denied(let deniedAt, let subPage) = emulated {
                #expect(stored(deniedAt.frame.rawValue) >> UInt32(subPage) & 1 == 0)
            }
            var hardwareAllows = true
            for piece in try PageSplitWrite(address: GuestPhysicalAddress(address), byteCount: size) {
                switch try f.spp.hardwareCheckWrite(at: piece.address, byteCount: piece.byteCount, leaf: armed, level: 1) {
                case .permitted: break
                case .denied: hardwareAllows = false
                case let other: Issue.record("\(other)")
                }
            }
            #expect(hardwareAllows == expected, "write \(size) at \(hex(address))")
        }
        #expect(try f.spp.checkEmulatedWrite(at: GuestPhysicalAddress(0x21_1FFC), byteCount: 8)
                == .denied(address: GuestPhysicalAddress(0x21_2000), subPage: 0))
        #expect(throws: SubPageWriteError.addressOverflow(GuestPhysicalAddress(.max), byteCount: 2)) {
            try f.spp.checkEmulatedWrite(at: GuestPhysicalAddress(.max), byteCount: 2)
        }
    }
}
