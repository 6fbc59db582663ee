import GuestMemory
import Testing
import X86Paging
@testable import KVMMMU

@Suite struct TDPMMUSetupTests {
    @Test func configurationsKVMWouldRefuseAreRefused() throws {
        let pool = try HostPagePool(capacityPages: 1024)
        let memory = MemslotSet(pool: pool)
        let ept = SPTEMasks.ept(accessedDirty: true, executeOnly: false)
        let bad: [(TDPMMUConfiguration, String)] = [
            (TDPMMUConfiguration(masks: ept, rootLevel: 3), "root level"),
            (TDPMMUConfiguration(masks: ept, rootLevel: 4, maxHugePageLevel: 4), "huge page level"),
            (TDPMMUConfiguration(masks: ept, rootLevel: 4, nxHugePagesRecoveryRatio: -1), "ratio"),
            (TDPMMUConfiguration(masks: .ept(accessedDirty: false, executeOnly: false), rootLevel: 4, dirtyLogging: .pml), "PML"),
            (TDPMMUConfiguration(masks: .shadowPaging, rootLevel: 4, dirtyLogging: .pml), "PML on NPT"),
        ]
        for (configuration, what) in bad {
            #expect(throws: TDPMMUError.self, "\(what)") { _ = try TDPMMU(memory: memory, configuration: configuration) }
        }
    }

    @Test func eptAndNPTConfigurationsFollowTheHardware() {
        let narrow = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        #expect(narrow.rootLevel == 4 && narrow.maxHugePageLevel == 3 && narrow.masks.isEPT)
        let wide = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 52)
        #expect(wide.rootLevel == 5)
        let no1G = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(pages1GiB: false), guestMaxPhysicalAddressBits: 46)
        #expect(no1G.maxHugePageLevel == 2)
        let npt = TDPMMUConfiguration.npt(hostLevels: 5, supports1GiBPages: false)
        #expect(npt.rootLevel == 5 && npt.maxHugePageLevel == 2 && !npt.masks.isEPT)
    }

    @Test func rootsAreSharedByRoleAndCounted() throws {
        let fixture = try TDPFixture()
        let again = try fixture.mmu.allocateRoot()
        #expect(again === fixture.root && again.referenceCount == 3)
        let nested = try fixture.mmu.allocateRoot(guestMode: true)
        #expect(nested !== fixture.root && nested.role.guestMode && nested.referenceCount == 2)
        #expect(fixture.root.role.isDirect && fixture.root.role.access == ACC.all && fixture.root.level == 4)
        try fixture.mmu.putRoot(again)
        #expect(fixture.root.referenceCount == 2)
        // The MMU's own reference cannot be put while the root is valid.
        try fixture.mmu.putRoot(nested)
        #expect(throws: TDPMMUError.rootOverReleased(nested.role)) { try fixture.mmu.putRoot(nested) }
        #expect(nested.referenceCount == 1)
        var smm = fixture.mmu.rootRole()
        smm.smm = true
        #expect(throws: TDPMMUError.smmAddressSpaceNotModelled) { _ = try fixture.mmu.allocateRoot(role: smm) }
        var indirect = fixture.mmu.rootRole()
        indirect.isDirect = false
        #expect(throws: TDPMMUError.self) { _ = try fixture.mmu.allocateRoot(role: indirect) }
        let other = try TDPFixture()
        #expect(throws: TDPMMUError.foreignRoot) { try fixture.mmu.putRoot(other.root) }
        fixture.expectClean("root references")
    }

    @Test func invalidatedRootsAreZappedAndFreedByTheLastPut() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 4096)
        for gfn in stride(from: UInt64(0), to: 4096, by: 97) { try fixture.fault(gfn, .write) }
        let old = fixture.root
        let tablesBefore = fixture.pool.allocatedPages
        fixture.mmu.zapAllFast()
        #expect(old.isInvalid && fixture.obsoleteRootRequests == 1)
        #expect(fixture.mmu.stats.pages4K == 0 && fixture.mmu.stats.pages2M == 0 && fixture.mmu.pageTableCount == 0)
        #expect(old.referenceCount == 1, "only the vCPU's reference is left")
        fixture.expectClean("zap all fast")
        try fixture.reloadRootIfInvalid()
        #expect(fixture.root !== old && !fixture.root.isInvalid)
        #expect(!fixture.mmu.roots.contains { $0 === old })
        fixture.expectClean("reload")
        // Everything but the new root's table went back to the pool once no reader could be in it.
        #expect(fixture.pool.allocatedPages < tablesBefore)
    }

    @Test func faultsBeyondTheRootOrWithForeignRootsAreErrors() throws {
        let fixture = try TDPFixture()
        let other = try TDPFixture()
        #expect(throws: TDPMMUError.addressBeyondRoot(GuestPhysicalAddress(1 << 48), rootLevel: 4)) {
            _ = try fixture.mmu.pageFault(at: GuestPhysicalAddress(1 << 48), errorCode: [.write], root: fixture.root)
        }
        #expect(throws: TDPMMUError.foreignRoot) {
            _ = try fixture.mmu.pageFault(at: GuestPhysicalAddress(0), errorCode: [], root: other.root)
        }
    }

    @Test(arguments: [true, false])
    func deletingAMemslotZapsItsMappingsBeforeItsFramesGoBack(zapAll: Bool) throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.zapAllOnMemslotDeletion = zapAll
        let fixture = try TDPFixture(configuration: configuration)
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        let kept = try fixture.addSlot(id: 1, baseGFN: pages1G, pages: 64)
        for gfn: UInt64 in [5, pages2M + 1, pages1G + 3] { try fixture.access(gfn, .write) }
        let otherVCPU = try fixture.mmu.allocateRoot()
        let flushes = fixture.flushes
        try fixture.mmu.deleteMemslot(id: 0)
        #expect(fixture.root.isInvalid == zapAll && fixture.obsoleteRootRequests == (zapAll ? 1 : 0))
        #expect(fixture.mmu.stats.pages2M == 0 && fixture.mmu.stats.pages4K == (zapAll ? 0 : 1))
        if !zapAll {
            #expect(fixture.flushes == flushes + 1 && fixture.leafLevel(pages1G + 3) == 1)
        }
        fixture.expectClean("slot deleted, zap all \(zapAll)")
        try fixture.mmu.putRoot(otherVCPU)
        try fixture.reloadRootIfInvalid()
        #expect(try fixture.access(5, .read) == .emulated, "the gfn is MMIO now")
        #expect(try fixture.access(pages1G + 3, .read) == .memory(HostFrameNumber(kept.hostBase.rawValue + 3)))
        fixture.expectClean("after the deletion, zap all \(zapAll)")
        #expect(throws: TDPMMUError.noSuchMemslot(0)) { try fixture.mmu.deleteMemslot(id: 0) }
        #expect(throws: TDPMMUError.self) { try fixture.addSlot(id: 2, baseGFN: pages1G + 60, pages: 8) }
        #expect(throws: TDPMMUError.noSuchMemslot(3)) { try fixture.mmu.setMemslotFlags(id: 3, flags: []) }
    }

    @Test func memslotsChangedBehindTheMMUsBackAreAnError() throws {
        let fixture = try TDPFixture()
        try fixture.memory.addSlot(id: 7, base: GuestPhysicalAddress(0), size: 1 << 20)
        #expect(throws: TDPMMUError.self) { try fixture.fault(1, .read) }
        #expect(fixture.mmu.audit().contains { $0.contains("generation") })
    }
}

@Suite struct TDPMMUFaultTests {
    @Test func aFaultMapsTheLargestPageTheRulesAllowAndTheHardwareUsesIt() throws {
        let fixture = try TDPFixture()
        // 1 GiB slot aligned in guest and host: 1G pages.
        let big = try fixture.addSlot(id: 0, baseGFN: pages1G, pages: pages1G)
        #expect(try fixture.access(pages1G + 5, .read) == .memory(HostFrameNumber(big.hostBase.rawValue + 5)))
        #expect(fixture.leafLevel(pages1G + 5) == 3)
        #expect(fixture.mmu.stats.pages1G == 1 && fixture.mmu.pageTableCount == 1)
        // A 2M-aligned slot whose host frames are 2M- but not 1G-aligned alike: 2M pages.
        let mid = try fixture.addSlot(id: 1, baseGFN: 4 * pages1G, pages: pages1G, hostSkew: pages2M)
        #expect(try fixture.access(4 * pages1G + 700, .write) == .memory(HostFrameNumber(mid.hostBase.rawValue + 700)))
        #expect(fixture.leafLevel(4 * pages1G + 700) == 2)
        // Guest and host frames disagreeing modulo 2M: 4K only.
        let skewed = try fixture.addSlot(id: 2, baseGFN: 8 * pages1G, pages: 4 * pages2M, hostSkew: 3)
        #expect(try fixture.access(8 * pages1G + 1, .fetch) == .memory(HostFrameNumber(skewed.hostBase.rawValue + 1)))
        #expect(fixture.leafLevel(8 * pages1G + 1) == 1)
        #expect(fixture.mmu.stats.pages4K == 1 && fixture.mmu.stats.pages2M == 1)
        let stats = fixture.mmu.stats
        #expect(stats.pfTaken == 3 && stats.pfFixed == 3)
        fixture.expectClean("three mappings")
    }

    @Test func readFaultsGetWritableDirtyLeavesAsMakeSPTEGrantsThem() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 16)
        try fixture.fault(3, .read)
        let spte = try #require(fixture.mmu.mapping(of: 3, in: fixture.root)).spte
        #expect(spte.isWritable && spte.isMMUWritable(fixture.masks) && spte.isHostWritable(fixture.masks))
        #expect(spte.isDirty(fixture.masks) && spte.isAccessed(fixture.masks) && spte.isExecutable(fixture.masks))
        #expect(spte.adState == .enabled)
        // The same fault again changes nothing.
        #expect(try fixture.fault(3, .read) == .spurious)
        #expect(fixture.mmu.stats.pfSpurious == 1)
    }

    @Test func readOnlySlotsMapReadOnlyAndWritesAreEmulated() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M, flags: .readOnly)
        #expect(try fixture.access(10, .write) == .emulated)
        #expect(fixture.leafLevel(10) == nil)
        #expect(try fixture.access(10, .read) != .emulated)
        let spte = try #require(fixture.mmu.mapping(of: 10, in: fixture.root))
        #expect(spte.level == 2 && !spte.spte.isWritable && !spte.spte.isHostWritable(fixture.masks))
        #expect(try fixture.access(11, .write) == .emulated)
        #expect(fixture.mmu.stats.pfEmulate == 2)
        fixture.expectClean("read-only slot")
    }

    @Test func mmioGetsAnMMIOSPTEThatTheFastPathUsesUntilTheMemslotsChange() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 16)
        let gfn: UInt64 = 0x1000
        #expect(try fixture.access(gfn, .read) == .emulated)
        let mapping = try #require(fixture.mmu.mapping(of: gfn, in: fixture.root))
        #expect(mapping.spte.isMMIO(fixture.masks) && mapping.spte.mmioGFN(fixture.masks).rawValue == gfn && mapping.level == 1)
        #expect(fixture.mmu.stats.pfMMIOSPTECreated == 1 && fixture.mmu.stats.pfTaken == 1)
        // The next access is an EPT misconfiguration settled without pf_taken.
        #expect(try fixture.access(gfn, .write) == .emulated)
        #expect(fixture.mmu.stats.pfTaken == 1 && fixture.mmu.stats.pfMMIOSPTECreated == 1)
        fixture.expectClean("MMIO SPTE")
        // A memslot appears there: the MMIO SPTE is stale and the slow path maps memory.
        let slot = try fixture.addSlot(id: 1, baseGFN: gfn, pages: 16)
        #expect(try fixture.access(gfn, .read) == .memory(slot.hostBase))
        #expect(fixture.mmu.stats.pfTaken == 2)
        fixture.expectClean("slot over an MMIO SPTE")
    }

    @Test func gfnsBeyondTheHostsMaximumPhysicalAddressAreEmulatedWithoutAnSPTE() throws {
        let fixture = try TDPFixture(configuration: .ept(capabilities: EPTCapabilities(maxPhysicalAddressBits: 39),
                                                         guestMaxPhysicalAddressBits: 46))
        let gfn = UInt64(1) << 30
        #expect(try fixture.fault(gfn, .read) == .emulate)
        #expect(fixture.mmu.mapping(of: gfn, in: fixture.root)?.spte.isMMIO(fixture.masks) != true)
        #expect(fixture.mmu.stats.pfMMIOSPTECreated == 0)
    }

    @Test func aSmallerMappingSplitsAPresentHugeLeafAndABiggerOneReplacesATable() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        try fixture.fault(5, .read)
        #expect(fixture.leafLevel(5) == 2)
        // Write-tracking a gfn in that 2M region: the fault on another gfn maps 4K, splitting.
        try fixture.mmu.addWriteTrack(100)
        try fixture.fault(7, .write, present: true)
        #expect(fixture.leafLevel(7) == 1 && fixture.leafLevel(100) == 1)
        #expect(fixture.mmu.stats.pages4K == 512 && fixture.mmu.stats.pages2M == 0)
        // The tracked gfn stays read-only; a write to it is emulated.
        let tracked = try #require(fixture.mmu.mapping(of: 100, in: fixture.root)).spte
        #expect(!tracked.isWritable && !tracked.isMMUWritable(fixture.masks))
        #expect(try fixture.fault(100, .write, present: true) == .emulate)
        fixture.expectClean("write tracking")
        // Untracked again: a fault maps 2M over the table, which goes (with a TLB flush).
        try fixture.mmu.removeWriteTrack(100)
        let flushes = fixture.flushes
        try fixture.fault(9, .read, present: true)
        #expect(fixture.leafLevel(9) == 2 && fixture.leafLevel(100) == 2)
        #expect(fixture.flushes > flushes)
        #expect(fixture.mmu.stats.pages4K == 0 && fixture.mmu.stats.pages2M == 1 && fixture.mmu.pageTableCount == 2)
        fixture.expectClean("table replaced by a huge leaf")
        #expect(throws: TDPMMUError.self) { try fixture.mmu.removeWriteTrack(100) }
        #expect(throws: TDPMMUError.gfnNotInMemslot(1 << 30)) { try fixture.mmu.addWriteTrack(1 << 30) }
    }

    @Test func hostMappingSizeAndCPUSupportLimitHugePages() throws {
        let fixture = try TDPFixture(configuration: .ept(capabilities: EPTCapabilities(pages1GiB: false),
                                                         guestMaxPhysicalAddressBits: 46))
        try fixture.addSlot(id: 0, baseGFN: 0, pages: pages1G)
        try fixture.addSlot(id: 1, baseGFN: pages1G, pages: pages1G, hostMapping: .fourKiB)
        try fixture.fault(3, .read)
        try fixture.fault(pages1G + 3, .read)
        #expect(fixture.leafLevel(3) == 2 && fixture.leafLevel(pages1G + 3) == 1)
        #expect(fixture.mmu.hostMapping(ofSlot: 1) == .fourKiB && fixture.mmu.maxMappingLevel(pages1G) == 1)
        fixture.expectClean("limits")
    }

    @Test func accessTrackingWithoutADBitsGoesThroughTheFastPath() throws {
        let fixture = try TDPFixture(configuration: .ept(capabilities: EPTCapabilities(accessedDirty: false),
                                                         guestMaxPhysicalAddressBits: 46))
        #expect(fixture.root.role.adDisabled)
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 64)
        try fixture.access(1, .read)
        let made = try #require(fixture.mmu.mapping(of: 1, in: fixture.root)).spte
        #expect(made.adState == .disabled && made.isAccessed(fixture.masks))
        #expect(fixture.mmu.testAgeGFNRange(0..<64))
        #expect(fixture.mmu.ageGFNRange(0..<64))
        let tracked = try #require(fixture.mmu.mapping(of: 1, in: fixture.root)).spte
        #expect(tracked.isAccessTracked(fixture.masks) && tracked.isShadowPresent && !tracked.isAccessed(fixture.masks))
        #expect(!fixture.mmu.testAgeGFNRange(0..<64))
        fixture.expectClean("aged")
        // The next access faults as not present and the fast path restores the SPTE.
        let before = fixture.mmu.stats.pfFast
        try fixture.access(1, .read)
        #expect(fixture.mmu.stats.pfFast == before + 1)
        let restored = try #require(fixture.mmu.mapping(of: 1, in: fixture.root)).spte
        #expect(!restored.isAccessTracked(fixture.masks) && restored.isAccessed(fixture.masks))
        #expect(fixture.mmu.testAgeGFNRange(0..<64))
        fixture.expectClean("restored")
    }

    @Test func agingWithADBitsClearsAAndTheHardwareSetsItAgain() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        try fixture.access(3, .read)
        #expect(fixture.mmu.ageGFNRange(0..<pages2M))
        #expect(!fixture.mmu.ageGFNRange(0..<pages2M))
        #expect(!fixture.mmu.testAgeGFNRange(0..<(2 * pages2M)))
        let flushes = fixture.flushes
        try fixture.access(4, .read)  // no fault: the hardware sets A
        #expect(fixture.flushes == flushes && fixture.mmu.stats.pfTaken == 1)
        #expect(fixture.mmu.testAgeGFNRange(0..<pages2M) && !fixture.mmu.testAgeGFNRange(pages2M..<(2 * pages2M)))
        fixture.expectClean("aging")
    }

    @Test func nptUsesTheX86FormatAndFiveLevels() throws {
        let fixture = try TDPFixture(configuration: .npt(hostLevels: 5))
        #expect(fixture.root.level == 5)
        try fixture.addSlot(id: 0, baseGFN: 1 << 37, pages: 4 * pages2M)
        try fixture.fault((1 << 37) + 9, .fetch)
        let spte = try #require(fixture.mmu.mapping(of: (1 << 37) + 9, in: fixture.root))
        #expect(spte.level == 2 && spte.spte.rawValue & 1 == 1 && spte.spte.isExecutable(fixture.masks))
        // NPT MMIO SPTEs use a reserved physical-address bit.
        #expect(try fixture.fault(3, .read) == .emulate)
        let mmio = try #require(fixture.mmu.mapping(of: 3, in: fixture.root)).spte
        #expect(mmio.isMMIO(fixture.masks) && mmio.rawValue & (1 << 51) != 0)
        #expect(try fixture.mmu.pageFault(at: GuestPhysicalAddress(3 << 12), errorCode: [.present, .reservedBit],
                                          root: fixture.root) == .emulate)
        fixture.expectClean("NPT")
    }

    @Test func eptViolationQualificationsBecomeKVMErrorCodes() {
        let read = TDPMMU.errorCode(forEPTViolation: [.dataRead])
        #expect(read == [.user])
        let write = TDPMMU.errorCode(forEPTViolation: [.dataWrite, .readable, .executable, .linearAddressValid, .finalTranslation])
        #expect(write == [.write, .present, .guestFinal])
        let fetch = TDPMMU.errorCode(forEPTViolation: [.instructionFetch, .linearAddressValid])
        #expect(fetch == [.fetch, .guestPage])
    }

    @Test func tracepointsNameWhatTheFaultDid() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 16)
        fixture.mmu.events.clear()
        try fixture.fault(2, .write)
        let names = fixture.mmu.events.events.map(\.event.name)
        #expect(names.contains("kvm_mmu_spte_requested") && names.contains("kvm_mmu_get_page"))
        #expect(names.contains("kvm_tdp_mmu_spte_changed") && names.contains("kvm_mmu_set_spte"))
        fixture.mmu.zapGFNRange(0..<16)
        #expect(fixture.mmu.events.count(of: "kvm_tdp_mmu_spte_changed") >= 4)
    }
}

@Suite struct TDPIteratorTests {
    /// The walk visits SPTEs in pre-order, inside the range, never below the minimum level and only
    /// into present tables.
    @Test func preOrderOverARangeDownToTheMinimumLevel() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 4 * pages2M, hostSkew: 1)
        for gfn: UInt64 in [0, 1, 511, 512, 1500] { try fixture.fault(gfn, .read) }
        var visited: [(level: Int, gfn: UInt64)] = []
        fixture.mmu.lock.withReadLock {
            var iterator = TDPIterator(root: fixture.root.table, rootLevel: 4, minLevel: 1, start: 1, end: 513,
                                       pool: fixture.pool)
            while iterator.isValid {
                visited.append((iterator.level, iterator.gfn))
                iterator.next()
            }
        }
        // Root entry, PDPTE, the PDE of [0, 512) and its PTEs 1...511, then the PDE of [512, 1024)
        // and its PTE 512.
        #expect(visited.prefix(3).map { $0.level } == [4, 3, 2])
        #expect(visited[3].level == 1 && visited[3].gfn == 1)
        #expect(visited.filter { $0.level == 1 }.count == 511 + 1)
        #expect(visited.filter { $0.level == 2 }.map(\.gfn) == [0, 512])
        #expect(visited.last! == (1, 512))
        var coarse = 0
        fixture.mmu.lock.withReadLock {
            var iterator = TDPIterator(root: fixture.root.table, rootLevel: 4, minLevel: 2, start: 0, end: 4 * pages2M,
                                       pool: fixture.pool)
            while iterator.isValid {
                #expect(iterator.level >= 2)
                coarse += 1
                iterator.next()
            }
        }
        #expect(coarse == 2 + 4)
    }
}
