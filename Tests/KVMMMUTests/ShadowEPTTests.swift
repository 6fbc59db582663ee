// guest_mmu: KVM's shadow pages for L1's EPT tables. Each test builds L1's EPT in L1's memory,
// faults L2 guest-physical addresses through the context, and walks the shadow EPT tables as the
// hardware would (an EPTWalker over the host pool) to see what L2 gets.

import GuestMemory
@testable import KVMMMU
import Testing
import X86Paging

/// L1 (16 MiB of memory in one memslot), L1's EPT tables allocated from 1 MiB up, and KVM's
/// guest_mmu for them.
final class ShadowEPTFixture {
    let pool: HostPagePool
    let memory: MemslotSet
    let mmu: ShadowMMU
    let levels: Int
    let root: UInt64
    private var nextTable: UInt64 = 0x10_0000

    init(levels: Int = 4, masks: SPTEMasks = .ept(accessedDirty: true, executeOnly: true)) throws {
        pool = try HostPagePool(capacityPages: 8192)
        memory = MemslotSet(pool: pool)
        try memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: 16 << 20)
        mmu = ShadowMMU(memory: memory, pool: pool, masks: masks)
        self.levels = levels
        root = nextTable
        nextTable += 0x1000
    }

    func load64(_ address: UInt64) -> UInt64 {
        let page = memory.hostPage(GuestPhysicalAddress(address).frame)!
        return page.bytes.load(fromByteOffset: Int(address & 0xFFF), as: UInt64.self)
    }

    func store64(_ value: UInt64, at address: UInt64) {
        let page = memory.hostPage(GuestPhysicalAddress(address).frame)!
        page.bytes.storeBytes(of: value, toByteOffset: Int(address & 0xFFF), as: UInt64.self)
    }

    /// The address of L1's EPT entry for `gpa` at `level`, creating tables (RWX) above it.
    func entryAddress(_ gpa: UInt64, level target: Int) -> UInt64 {
        var table = root
        var level = levels
        while true {
            let entry = table + ((gpa >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
            if level == target { return entry }
            var value = load64(entry)
            if value & 7 == 0 {
                value = nextTable | 7
                nextTable += 0x1000
                store64(value, at: entry)
            }
            table = value & bitRange(12, 51)
            level -= 1
        }
    }

    /// Maps L2's 4 KiB page `gpa` to L1's `l1` with `permissions` (R 1, W 2, X 4, plus A/D bits).
    func map(_ gpa: UInt64, to l1: UInt64, permissions: UInt64) {
        store64(l1 | 6 << 3 | permissions, at: entryAddress(gpa, level: 1))
    }

    /// guest_mmu with its root loaded, as a nested VM entry leaves it.
    func context(ad: Bool = false, executeOnly: Bool = true) throws -> MMUContext {
        let context = MMUContext(mmu: mmu, nestedEPT: try nestedEPT(ad: ad, executeOnly: executeOnly))
        _ = try context.load()
        return context
    }

    func nestedEPT(root: UInt64? = nil, ad: Bool = false, executeOnly: Bool = true) throws -> NestedEPTContext {
        try NestedEPTContext(pointer: EPTPointer(root: root ?? self.root, levels: levels, accessedDirty: ad),
                             capabilities: EPTCapabilities(executeOnly: executeOnly))
    }

    /// The hardware's walk of the loaded shadow EPT root for L2's `gpa`.
    func hardwareWalk(_ context: MMUContext, _ gpa: UInt64, _ kind: AccessKind) throws -> Result<EPTTranslation, EPTWalkFault> {
        let (root, _) = try context.load()
        let walker = try EPTWalker(pointer: EPTPointer(root: root.rootFrame.address.rawValue, levels: context.rootRole.level,
                                                       accessedDirty: mmu.masks.accessedDirtyEnabled),
                                   capabilities: EPTCapabilities(executeOnly: true))
        return walker.translate(GuestPhysicalAddress(gpa), kind, in: PoolPhysicalView(pool: pool), setAccessedDirty: false)
    }

    func hostFrame(of l1: UInt64) -> UInt64 { memory.hostFrame(of: GuestPhysicalAddress(l1).frame)!.rawValue }
}

/// The error code KVM makes of a hardware EPT violation on L2's final access.
private func finalFault(_ kind: AccessKind, present: Bool = false) -> PageFaultErrorCode {
    var code: PageFaultErrorCode = [.guestFinal]
    switch kind {
    case .read: code.insert(.user)
    case .write: code.insert(.write)
    case .fetch: code.insert(.fetch)
    }
    if present { code.insert(.present) }
    return code
}

@Suite("guest_mmu: shadow EPT")
struct ShadowEPTTests {
    let l2: UInt64 = 0x1234_5000
    let l1: UInt64 = 0x80_0000

    @Test("A fault shadows L1's EPT: L2's address reaches the host frame behind L1's, with L1's rights", arguments: [4, 5])
    func mapsL2ToHost(levels: Int) throws {
        for permissions in [UInt64(1), 3, 5, 7, 4] {
            for kind in AccessKind.allCases {
                let fixture = try ShadowEPTFixture(levels: levels)
                fixture.map(l2, to: l1, permissions: permissions)
                let context = try fixture.context()
                let result = try context.pageFault(atL2: GuestPhysicalAddress(l2 | 0x10), errorCode: finalFault(kind))
                let allowed = switch kind {
                case .read: permissions & 1 != 0
                case .write: permissions & 2 != 0
                case .fetch: permissions & 4 != 0
                }
                guard allowed else {
                    guard case .reflect(.eptViolation(let gpa, _)) = result else {
                        Issue.record("\(permissions) \(kind): expected a reflected violation, got \(result)")
                        continue
                    }
                    #expect(gpa.rawValue == l2 | 0x10)
                    #expect(fixture.mmu.stats.pages4K == 0)
                    continue
                }
                #expect(result == .handled(.fixed), "\(permissions) \(kind)")
                let translation = try fixture.hardwareWalk(context, l2 | 0x10, kind).get()
                #expect(translation.outputAddress.rawValue == fixture.hostFrame(of: l1) << 12 | 0x10)
                #expect(translation.isReadable == (permissions & 1 != 0))
                #expect(translation.isWritable == (permissions & 2 != 0))
                #expect(translation.isExecutable == (permissions & 4 != 0))
                #expect(fixture.mmu.audit() == [], "\(fixture.mmu.audit())")
                // Every shadow page belongs to L2 (guest mode) and shadows one of L1's EPT tables.
                for page in fixture.mmu.shadowPages {
                    #expect(page.role.guestMode && !page.role.isDirect && page.role.adDisabled)
                }
                #expect(fixture.mmu.stats.pfTaken == 1 && fixture.mmu.stats.pfFixed == 1)
            }
        }
    }

    @Test("L1's EPT refuses: the exit goes to L1 and nothing is shadowed for the page")
    func reflects() throws {
        let fixture = try ShadowEPTFixture()
        fixture.map(l2, to: l1, permissions: 1)
        let context = try fixture.context()
        let result = try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.write, present: true))
        #expect(result == .reflect(.eptViolation(GuestPhysicalAddress(l2),
                                                 qualification: [.dataWrite, .readable, .linearAddressValid, .finalTranslation])))
        #expect(fixture.mmu.stats.pfTaken == 1 && fixture.mmu.stats.pfFixed == 0 && fixture.mmu.stats.pfGuest == 0)
        #expect(fixture.mmu.stats.pages4K == 0)
        // A misconfigured entry (write-only).
        fixture.map(l2, to: l1, permissions: 2)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.read))
            == .reflect(.eptMisconfiguration(GuestPhysicalAddress(l2))))
    }

    @Test("L1's EPT tables are protected like guest page tables: upper levels write-tracked, the last level unsyncs")
    func writeProtection() throws {
        let fixture = try ShadowEPTFixture()
        fixture.map(l2, to: l1, permissions: 7)
        let context = try fixture.context()
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.read)) == .handled(.fixed))
        let tables = (1...4).map { GuestPhysicalAddress(fixture.entryAddress(l2, level: $0)).frame }
        for level in 2...4 { #expect(fixture.mmu.isWriteTracked(tables[level - 1]), "level \(level)") }
        #expect(!fixture.mmu.isWriteTracked(tables[0]))

        // L2 writing L1's EPT page directory (L1 mapped it into L2): emulated.
        let pdAlias: UInt64 = 0x2000_0000
        fixture.map(pdAlias, to: tables[1].address.rawValue, permissions: 7)
        // Not present in the shadow yet: mapped read-only (`make_spte` write-protects), and emulated.
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(pdAlias), errorCode: finalFault(.write))
            == .handled(.emulate))
        #expect(try !fixture.hardwareWalk(context, pdAlias, .read).get().isWritable)
        // Present and read-only: the write-tracked gfn is emulated at once.
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(pdAlias), errorCode: finalFault(.write, present: true))
            == .handled(.emulate))
        #expect(fixture.mmu.stats.pfEmulate == 2)

        // L2 writing L1's EPT page table: the shadow page of that table goes unsync and the write
        // goes through.
        let ptAlias: UInt64 = 0x2000_1000
        fixture.map(ptAlias, to: tables[0].address.rawValue, permissions: 7)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(ptAlias), errorCode: finalFault(.write)) == .handled(.fixed))
        #expect(fixture.mmu.stats.mmuUnsync >= 1)
        #expect(try fixture.hardwareWalk(context, ptAlias, .write).get().isWritable)
        #expect(fixture.mmu.audit() == [], "\(fixture.mmu.audit())")
    }

    @Test("Sync of an unsync EPT page reads L1's entries in the EPT format (with and without EPT A/D)")
    func sync() throws {
        for ad in [false, true] {
            let fixture = try ShadowEPTFixture()
            let accessed: UInt64 = ad ? 1 << 8 | 1 << 9 : 0
            fixture.map(l2, to: l1, permissions: 7 | accessed)
            let context = try fixture.context(ad: ad)
            #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.write)) == .handled(.fixed))
            let pt = GuestPhysicalAddress(fixture.entryAddress(l2, level: 1)).frame
            let ptAlias: UInt64 = 0x2000_1000
            fixture.map(ptAlias, to: pt.address.rawValue, permissions: 7 | accessed)
            #expect(try context.pageFault(atL2: GuestPhysicalAddress(ptAlias), errorCode: finalFault(.write)) == .handled(.fixed))
            // L1 (through L2's writable alias, no exit) makes the page read-only, then flushes:
            // INVEPT syncs the unsync page, and the shadow entry follows.
            fixture.map(l2, to: l1, permissions: 1 | accessed)
            context.syncRoots()
            let translation = try fixture.hardwareWalk(context, l2, .read).get()
            #expect(!translation.isWritable && translation.isReadable, "ad \(ad)")
            // The sync write-protected the table again: L1's next write to it is emulated
            // (`kvm_mmu_track_write`), and the shadow entry goes.
            #expect(try !fixture.hardwareWalk(context, ptAlias, .read).get().isWritable)
            fixture.map(l2, to: l1, permissions: 0)
            fixture.mmu.trackWrite(GuestPhysicalAddress(fixture.entryAddress(l2, level: 1)), bytes: 8,
                                   fourByteGuestEntries: false)
            guard case .failure(.violation) = try fixture.hardwareWalk(context, l2, .read) else {
                Issue.record("ad \(ad): the shadow entry survived L1 removing it")
                continue
            }
            #expect(fixture.mmu.audit() == [], "\(fixture.mmu.audit())")
        }
    }

    @Test("Prefetch maps L1's neighbouring entries in the EPT format (with and without EPT A/D)")
    func prefetch() throws {
        for ad in [false, true] {
            let fixture = try ShadowEPTFixture()
            for page in 0..<8 {
                fixture.map(0x4000_0000 + UInt64(page) * 0x1000, to: l1 + UInt64(page) * 0x1000,
                            permissions: 5 | (ad ? 1 << 8 : 0))
            }
            let context = try fixture.context(ad: ad)
            #expect(try context.pageFault(atL2: GuestPhysicalAddress(0x4000_3000), errorCode: finalFault(.read))
                == .handled(.fixed))
            #expect(fixture.mmu.stats.pages4K == 8, "ad \(ad)")
            #expect(try fixture.hardwareWalk(context, 0x4000_7000, .fetch).get().outputAddress.rawValue
                == fixture.hostFrame(of: l1 + 0x7000) << 12)
        }
    }

    @Test("A/D: KVM sets L1's EPT A bits on a fault and D on a write; a clean page is shadowed read-only")
    func accessedDirty() throws {
        let fixture = try ShadowEPTFixture()
        fixture.map(l2, to: l1, permissions: 7)
        let context = try fixture.context(ad: true)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.read)) == .handled(.fixed))
        for level in 1...4 { #expect(fixture.load64(fixture.entryAddress(l2, level: level)) & 1 << 8 != 0) }
        #expect(fixture.load64(fixture.entryAddress(l2, level: 1)) & 1 << 9 == 0)
        #expect(try !fixture.hardwareWalk(context, l2, .read).get().isWritable)
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.write, present: true))
            == .handled(.fixed))
        #expect(fixture.load64(fixture.entryAddress(l2, level: 1)) & 1 << 9 != 0)
        #expect(try fixture.hardwareWalk(context, l2, .write).get().isWritable)
    }

    @Test("A new EPTP: a new root with the same roles; the old one comes back from prev_roots")
    func eptpSwitch() throws {
        let fixture = try ShadowEPTFixture()
        fixture.map(l2, to: l1, permissions: 7)
        let context = try fixture.context()
        _ = try context.pageFault(atL2: GuestPhysicalAddress(l2), errorCode: finalFault(.read))
        let first = try #require(context.root)
        // A second EPT for another L2: an empty root table.
        let otherRoot: UInt64 = 0xF0_0000
        context.loadEPTP(try fixture.nestedEPT(root: otherRoot))
        #expect(context.root == nil)  // a miss: the next entry builds the root
        _ = try context.load()
        #expect(context.root !== first && context.root?.gfn == GuestPhysicalAddress(otherRoot).frame)
        #expect(context.previousRoots.contains { $0?.page === first })
        context.loadEPTP(try fixture.nestedEPT())
        #expect(context.root === first)
        #expect(try fixture.hardwareWalk(context, l2, .read).get().outputAddress.rawValue == fixture.hostFrame(of: l1) << 12)
        // Turning EPT A/D on changes the roles: the cached root is not usable.
        context.loadEPTP(try fixture.nestedEPT(ad: true))
        _ = try context.load()
        #expect(context.root !== first && context.root?.role.adDisabled == false)
    }
}

@Suite("INVEPT on guest_mmu")
struct INVEPTTests {
    @Test("Single-context INVEPT frees the roots of that EPTP's table, current and cached; global frees all")
    func invept() throws {
        let fixture = try ShadowEPTFixture()
        fixture.map(0x1234_5000, to: 0x80_0000, permissions: 7)
        let context = try fixture.context()
        let first = try #require(context.root)
        context.loadEPTP(try fixture.nestedEPT(root: 0xF0_0000))
        _ = try context.load()
        let second = try #require(context.root)
        #expect(context.previousRoots.contains { $0?.page === first })
        // Another EPTP: nothing of these roots goes.
        #expect(!context.invalidateEPT(.singleContext(EPTPointer(root: 0xE0_0000, levels: 4, accessedDirty: false))))
        #expect(context.root === second && context.previousRoots.contains { $0?.page === first })
        // The first EPTP, named with other attribute bits (A/D): its cached root is freed.
        #expect(!context.invalidateEPT(.singleContext(EPTPointer(root: fixture.root, levels: 4, accessedDirty: true))))
        #expect(!context.previousRoots.contains { $0?.page === first } && context.root === second)
        #expect(context.invalidateEPT(.allContexts))
        #expect(context.root == nil && !context.rootsLoaded)
        // The next entry rebuilds from L1's tables.
        context.loadEPTP(try fixture.nestedEPT())
        _ = try context.load()
        #expect(try context.pageFault(atL2: GuestPhysicalAddress(0x1234_5000), errorCode: [.user, .guestFinal]) == .handled(.fixed))
        #expect(fixture.mmu.audit() == [])
    }
}
