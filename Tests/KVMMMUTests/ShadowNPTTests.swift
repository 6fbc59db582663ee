// guest_mmu for L1's nested page tables (SVM): shadow NPT at the host's NPT depth, with seed 1's
// passthrough root when a 4-level NPT is shadowed by a 5-level host.

import GuestMemory
@testable import KVMMMU
import Testing
import X86Paging

/// L1's memory and a 4-level nested page table of L1's (x86 entries), shadowed at `hostLevels`.
final class ShadowNPTFixture {
    let pool: HostPagePool
    let memory: MemslotSet
    let mmu: ShadowMMU
    let nestedCR3: UInt64 = 0x10_0000
    private var nextTable: UInt64 = 0x10_1000

    init() throws {
        pool = try HostPagePool(capacityPages: 8192)
        memory = MemslotSet(pool: pool)
        try memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 16 << 20)
        mmu = ShadowMMU(memory: memory, pool: pool)
    }

    func load64(_ address: UInt64) -> UInt64 {
        memory.hostPage(GuestPhysicalAddress(address).frame)!.bytes.load(fromByteOffset: Int(address & 0xFFF), as: UInt64.self)
    }

    func store64(_ value: UInt64, at address: UInt64) {
        memory.hostPage(GuestPhysicalAddress(address).frame)!.bytes.storeBytes(of: value, toByteOffset: Int(address & 0xFFF),
                                                                                  as: UInt64.self)
    }

    /// Maps L2's page `gpa` to L1's `l1` with x86 `flags` (P, R/W, U/S, NX), tables fully permissive.
    func map(_ gpa: UInt64, to l1: UInt64, flags: UInt64) {
        var table = nestedCR3
        for level in stride(from: 4, to: 1, by: -1) {
            let entry = table + ((gpa >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
            var value = load64(entry)
            if value & 1 == 0 {
                value = nextTable | 7
                nextTable += 0x1000
                store64(value, at: entry)
            }
            table = value & bitRange(12, 51)
        }
        store64(l1 | flags, at: table + ((gpa >> 12) & 0x1FF) * 8)
    }

    func context(hostLevels: Int, cr4: CR4 = [.physicalAddressExtension]) throws -> MMUContext {
        let context = try MMUContext(mmu: mmu, nestedCR3: nestedCR3, l1CR4: cr4,
                                     l1EFER: [.noExecuteEnable, .longModeEnable, .longModeActive], hostLevels: hostLevels)
        _ = try context.load()
        return context
    }

    /// The hardware's walk of the shadow NPT for L2's `gpa` (every access a user access).
    func hardwareWalk(_ context: MMUContext, _ gpa: UInt64, _ kind: AccessKind) throws -> Result<Translation, WalkFault> {
        let (root, _) = try context.load()
        var cr4: CR4 = [.physicalAddressExtension]
        if root.mode == .fiveLevel { cr4.insert(.la57) }
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: root.rootFrame.address.rawValue,
                                        cr4: cr4, efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
        let view = PoolPhysicalView(pool: pool)
        return try PageWalker(registers: registers, memory: view)
            .translate(GuestVirtualAddress(gpa), Access(kind, .user), in: view, setAccessedDirty: false)
    }
}

@Suite("guest_mmu: shadow NPT")
struct ShadowNPTTests {
    let l2: UInt64 = 0x1234_5000
    let l1: UInt64 = 0x80_0000

    @Test("A 4-level NPT on a 5-level host: the passthrough root over the level-4 page of the same gfn", arguments: [4, 5])
    func passthroughRoot(hostLevels: Int) throws {
        let fixture = try ShadowNPTFixture()
        fixture.map(l2, to: l1, flags: 0x7)
        let context = try fixture.context(hostLevels: hostLevels, cr4: [.physicalAddressExtension, .protectionKeys])
        #expect(context.cpuRole.base.guestMode && context.cpuRole.base.level == 4 && !context.cpuRole.ext.cr4PKE)
        #expect(context.rootRole.level == hostLevels && context.rootRole.isPassthrough == (hostLevels == 5))
        let write: PageFaultErrorCode = [.write, .user, .guestFinal]
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2 | 8), errorCode: write) == .handled(.fixed))
        let root = try #require(context.root)
        #expect(root.gfn == GuestPhysicalAddress(fixture.nestedCR3).frame && root.role.guestMode)
        if hostLevels == 5 {
            // Not backed by L1's table: entry 0 leads to the level-4 shadow page of the same gfn.
            #expect(root.isPassthrough && !root.hasGPTEs)
            let child = try #require(fixture.mmu.child(of: SPTE(rawValue: root.spte(0).pointee)))
            #expect(child.gfn == root.gfn && child.level == 4 && !child.role.isPassthrough && child.hasGPTEs)
        }
        let translation = try fixture.hardwareWalk(context, l2 | 8, .write).get()
        let host = fixture.memory.hostFrame(of: GuestPhysicalAddress(l1).frame)!.rawValue
        #expect(translation.physicalAddress.rawValue == host << 12 | 8)
        // L1's nested page tables are write-tracked like any shadowed guest table.
        #expect(fixture.mmu.isWriteTracked(GuestPhysicalAddress(fixture.nestedCR3).frame))
        #expect(fixture.mmu.audit() == [], "\(fixture.mmu.audit())")
    }

    @Test("L1's NPT refuses: a #NPF to L1 with the walk's error code and the hardware's GUEST_FINAL/GUEST_PAGE")
    func reflects() throws {
        let fixture = try ShadowNPTFixture()
        fixture.map(l2, to: l1, flags: 0x5)  // read-only
        let context = try fixture.context(hostLevels: 5)
        let gpa = GuestPhysicalAddress(l2)
        #expect(try context.pageFault(atL2: gpa, errorCode: [.write, .user, .guestPage])
            == .reflect(.nestedPageFault(gpa, errorCode: [.present, .write, .user, .guestPage])))
        let absent = GuestPhysicalAddress(0x5555_5000)
        #expect(try context.pageFault(atL2: absent, errorCode: [.user, .guestFinal])
            == .reflect(.nestedPageFault(absent, errorCode: [.user, .guestFinal])))
        fixture.map(0x6000_0000, to: l1, flags: 0x7 | 1 << 63)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(0x6000_0000), errorCode: [.fetch, .user, .guestFinal])
            == .reflect(.nestedPageFault(GuestPhysicalAddress(0x6000_0000), errorCode: [.present, .fetch, .user, .guestFinal])))
        #expect(fixture.mmu.stats.pfTaken == 3 && fixture.mmu.stats.pfGuest == 0 && fixture.mmu.stats.pfFixed == 0)
    }
}

@Suite("guest_mmu: shadow NPT of a 32-bit or PAE L1 (KVM's special roots)")
struct ShadowLegacyNPTTests {
    /// L1's nested page tables in PAE (8-byte entries, a 4-entry PDPT at `nestedCR3`) or 32-bit
    /// format (4-byte entries), mapping L2's `gpa` to L1's `l1` with `flags`.
    func legacyNPT(pae: Bool, _ fixture: ShadowNPTFixture, _ gpa: UInt64, _ l1: UInt64, flags: UInt64) {
        let directory: UInt64 = 0x20_0000, pageTable: UInt64 = 0x20_1000
        if pae {
            // A PDPTE has P and the address only (its R/W and U/S bits are reserved).
            fixture.store64(directory | 1, at: fixture.nestedCR3 + ((gpa >> 30) & 3) * 8)
            fixture.store64(pageTable | 7, at: directory + ((gpa >> 21) & 0x1FF) * 8)
            fixture.store64(l1 | flags, at: pageTable + ((gpa >> 12) & 0x1FF) * 8)
        } else {
            let page = { (address: UInt64) in fixture.memory.hostPage(GuestPhysicalAddress(address).frame)!.bytes }
            page(fixture.nestedCR3).storeBytes(of: UInt32(pageTable | 7), toByteOffset: Int((gpa >> 22) * 4), as: UInt32.self)
            page(pageTable).storeBytes(of: UInt32(l1 | flags), toByteOffset: Int((gpa >> 12) & 0x3FF) * 4, as: UInt32.self)
        }
    }

    @Test("Special roots above the L1's top table; faults map through them; refusals are #NPFs",
          arguments: [(true, 4), (true, 5), (false, 4), (false, 5)])
    func specialRoots(pae: Bool, hostLevels: Int) throws {
        let fixture = try ShadowNPTFixture()
        let l2: UInt64 = 0x8040_3000, l1: UInt64 = 0x80_0000
        legacyNPT(pae: pae, fixture, l2, l1, flags: 0x7)
        legacyNPT(pae: pae, fixture, l2 + 0x1000, l1, flags: 0x5)
        let context = try MMUContext(mmu: fixture.mmu, nestedCR3: fixture.nestedCR3,
                                     l1CR4: pae ? [.physicalAddressExtension] : [],
                                     l1EFER: pae ? [.noExecuteEnable] : [], hostLevels: hostLevels)
        let (root, _) = try context.load()
        #expect(context.root == nil && root.mode == (hostLevels == 5 ? .fiveLevel : .fourLevel))
        #expect(context.cpuRole.base.level == (pae ? 3 : 2) && context.cpuRole.base.hasFourByteGPTE == !pae)
        #expect(context.rootRole.level == hostLevels && !context.rootRole.isPassthrough && context.rootRole.guestMode)
        // The level-2 root for L2's quarter holds its guest mode and (32-bit) quadrant.
        let quarter = Int(l2 >> 30) & 3
        let directoryRoot = try #require(context.paeRoots[quarter])
        #expect(directoryRoot.role.guestMode && directoryRoot.role.quadrant == (pae ? 0 : quarter))
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2 | 0x18), errorCode: [.write, .user, .guestFinal])
            == .handled(.fixed))
        let host = fixture.memory.hostFrame(of: GuestPhysicalAddress(l1).frame)!.rawValue
        #expect(try fixture.hardwareWalk(context, l2 | 0x18, .write).get().physicalAddress.rawValue == host << 12 | 0x18)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2 + 0x1000), errorCode: [.write, .user, .guestFinal])
            == .reflect(.nestedPageFault(GuestPhysicalAddress(l2 + 0x1000), errorCode: [.present, .write, .user, .guestFinal])))
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(0x4000_0000), errorCode: [.user, .guestPage])
            == .reflect(.nestedPageFault(GuestPhysicalAddress(0x4000_0000), errorCode: [.user, .guestPage])))
        #expect(fixture.mmu.audit() == [], "\(fixture.mmu.audit())")
    }
}
