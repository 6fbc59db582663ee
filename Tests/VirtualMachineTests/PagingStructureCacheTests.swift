import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// The TDP vCPU's PDE cache (SDM 4.10.3, `TLB.PageDirectoryCacheEntry`): a walk under TDP starts,
// where it can, from the cached PDE of its 2 MiB region and reads only the PTE. These tests show the
// cache is used (a PDE the guest rewrites without invalidating keeps being used for pages the TLB
// never held, as the architecture allows), that every invalidation the architecture defines drops
// it (INVLPG of any address, a flushing CR3 load, INVPCID, a paging-mode change, a #PF or an EPT
// violation of an access to the address, KVM's flushes), that the cached permissions of the upper entries are enforced, and, in a
// seeded randomized run, that a guest which invalidates as the SDM requires always sees what a fresh
// walk of its tables gives.
@Suite("The TDP vCPU's paging-structure cache")
struct PagingStructureCacheTests {
    let vm: VirtualMachine
    let vcpu: VCPU

    // Guest-physical layout: PML4 0x1000, PDPT 0x2000, PD 0x3000; page tables from 0x10000, one
    // per `Self.tableCount`; PD[0] maps the first 2 MiB (the tables) 1:1 with a huge page, so the
    // guest can store to its own tables. PD[regionBase + r] maps region r (2 MiB at r << 21 past
    // `regionBase << 21`) through one of the page tables. PDPT[1] maps guest-physical memory 1:1
    // at 1 GiB, so that the guest can touch a data page (EPT maps 4 KiB pages only) without any
    // PDE cache entry.
    static let pml4: UInt64 = 0x1000
    static let pageDirectory: UInt64 = 0x3000
    static let firstTable: UInt64 = 0x10000
    static let tableCount = 4
    static let regionBase: UInt64 = 2
    static let regionCount: UInt64 = 3
    /// Page table t maps its entry i to data frame `dataBase + t * 512 + i` (distinct per table).
    static let dataBase: UInt64 = 0x400
    static let pcid: UInt64 = 5

    init() throws {
        let cpu = CPUModel()
        var configuration = TDPMMUConfiguration.ept(
            capabilities: EPTCapabilities(pages1GiB: cpu.supports1GiBPages, maxPhysicalAddressBits: cpu.maxPhysicalAddressBits),
            guestMaxPhysicalAddressBits: cpu.maxPhysicalAddressBits)
        configuration.maxHugePageLevel = 1  // a data page is mapped in EPT only once touched
        vm = try VirtualMachine(memorySize: 32 << 20, cpu: cpu, mmu: .tdp(configuration))
        let memory = vm.memory
        try memory.store64(0x2000 | 0x7, at: GuestPhysicalAddress(Self.pml4))
        try memory.store64(Self.pageDirectory | 0x7, at: GuestPhysicalAddress(0x2000))
        try memory.store64(0x83, at: GuestPhysicalAddress(0x2008))  // 1 GiB: guest-physical 0 1:1
        try memory.store64(0x83, at: GuestPhysicalAddress(Self.pageDirectory))  // 0-2 MiB, supervisor
        for table in 0..<Self.tableCount {
            for index in 0..<512 {
                let frame = Self.dataBase + UInt64(table * 512 + index)
                try memory.store64(frame << 12 | 0x7, at: GuestPhysicalAddress(Self.table(table) + UInt64(index) * 8))
            }
        }
        for region in 0..<Self.regionCount {
            try memory.store64(Self.table(Int(region)) | 0x7, at: GuestPhysicalAddress(Self.pdeAddress(region: region)))
        }
        vcpu = try vm.addVCPU(registers: PagingRegisters(
            cr0: [.protectionEnable, .writeProtect, .paging], cr3: Self.pml4 | Self.pcid,
            cr4: [.physicalAddressExtension, .pcidEnable],
            efer: [.noExecuteEnable, .longModeEnable, .longModeActive]))
    }

    static func table(_ index: Int) -> UInt64 { firstTable + UInt64(index) << 12 }
    static func pdeAddress(region: UInt64) -> UInt64 { pageDirectory + (regionBase + region) * 8 }
    static func address(region: UInt64, page: UInt64) -> GuestVirtualAddress {
        GuestVirtualAddress((regionBase + region) << 21 | page << 12 | 0x18)
    }
    /// The guest-physical address page `page` of a region maps to through page table `table`.
    static func expected(table: Int, page: UInt64) -> UInt64 {
        (dataBase + UInt64(table * 512) + page) << 12 | 0x18
    }

    /// The guest's store to its own PDE (through its 1:1 map of the tables).
    func rewritePDE(region: UInt64, _ value: UInt64) throws {
        let outcome = try vcpu.access(GuestVirtualAddress(Self.pdeAddress(region: region)), .write(.supervisor), size: 8,
                                      value: value)
        guard case .completed = outcome.result else {
            Issue.record("the PDE store did not complete: \(outcome.result)")
            return
        }
    }

    func read(_ address: GuestVirtualAddress, _ privilege: Privilege = .supervisor) throws -> AccessResult {
        try vcpu.access(address, .read(privilege), size: 8).result
    }

    /// Reads page `page` of region 0 and returns the guest-physical address it reached (nil for a fault).
    func gpa(page: UInt64) throws -> UInt64? {
        guard case .completed(let gpa, _) = try read(Self.address(region: 0, page: page)) else { return nil }
        return gpa.rawValue
    }

    /// The guest touches the data page that page table `table` maps page `page` to (through its
    /// 1 GiB map), so that EPT maps it.
    func touch(table: Int, page: UInt64) throws {
        let outcome = try vcpu.access(GuestVirtualAddress(1 << 30 | Self.expected(table: table, page: page)), .read(.supervisor),
                                      size: 8)
        guard case .completed = outcome.result else {
            Issue.record("touching table \(table)'s page \(page): \(outcome.result)")
            return
        }
    }

    /// Region 0 walked once (its PDE cached), then its PDE rewritten to page table 1 without any
    /// invalidation; page 7's data pages under both tables are mapped in EPT.
    func cacheThenRewrite() throws {
        #expect(try gpa(page: 0) == Self.expected(table: 0, page: 0))
        try touch(table: 0, page: 7)
        try touch(table: 1, page: 7)
        try rewritePDE(region: 0, Self.table(1) | 0x7)
    }

    @Test func aRewrittenPDEIsUsedUntilInvalidated() throws {
        try cacheThenRewrite()
        let hits = vcpu.tlb.pageDirectoryCacheHits
        // Page 7 was never in the TLB: only the cached PDE can still lead to table 0.
        #expect(try gpa(page: 7) == Self.expected(table: 0, page: 7))
        #expect(vcpu.tlb.pageDirectoryCacheHits > hits)
    }

    @Test func invlpgOfAnyAddressDropsIt() throws {
        try cacheThenRewrite()
        vcpu.invalidatePage(GuestVirtualAddress(0x7FFF_0000_0000))  // an address nowhere near region 0
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func aFlushingCR3LoadDropsIt() throws {
        try cacheThenRewrite()
        try vcpu.loadCR3(Self.pml4 | Self.pcid)
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func aNoFlushCR3LoadOfAnotherPCIDAndBackKeepsIt() throws {
        try cacheThenRewrite()
        try vcpu.loadCR3(Self.pml4 | 9)  // PCID 9 flushed, not PCID 5
        try vcpu.loadCR3(Self.pml4 | Self.pcid, noFlush: true)
        #expect(try gpa(page: 7) == Self.expected(table: 0, page: 7))
    }

    @Test(arguments: [INVPCIDType.individualAddress, .singleContext, .allContextsExceptGlobal, .allContextsIncludingGlobal])
    func invpcidDropsIt(type: INVPCIDType) throws {
        try cacheThenRewrite()
        // Individual address: one far from region 0; the PCID is the current one.
        #expect(vcpu.invalidatePCID(type, pcid: Self.pcid, address: GuestVirtualAddress(0x1234_5000)))
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func singleContextINVPCIDOfAnotherPCIDKeepsIt() throws {
        try cacheThenRewrite()
        #expect(vcpu.invalidatePCID(.singleContext, pcid: 9, address: GuestVirtualAddress(0)))
        #expect(try gpa(page: 7) == Self.expected(table: 0, page: 7))
    }

    @Test func aPagingModeChangeDropsIt() throws {
        try cacheThenRewrite()
        var registers = vcpu.registers
        registers.cr4.insert(.globalPages)
        try vcpu.setRegisters(registers)
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func aPageFaultDropsTheEntryForItsAddress() throws {
        try cacheThenRewrite()
        // Table 0's entry for page 7 cleared: the stale PDE leads to a not-present PTE, a #PF,
        // which drops the cached PDE; the access again walks the PDE as it is now.
        try vm.memory.store64(0, at: GuestPhysicalAddress(Self.table(0) + 7 * 8))
        guard case .pageFault(let code, _) = try read(Self.address(region: 0, page: 7)) else {
            Issue.record("the stale PDE should have led to table 0's cleared PTE")
            return
        }
        #expect(!code.contains(.present))
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func anEPTViolationDropsTheEntryForItsLinearAddress() throws {
        try cacheThenRewrite()
        // Page 9 under table 0 was never touched: the stale PDE leads the walk to a data page EPT
        // does not map yet. The EPT violation invalidates the combined mappings for the linear
        // address, its PDE-cache entry with them, so the retried walk reads the PDE as it is now.
        try touch(table: 1, page: 9)
        let outcome = try vcpu.access(Self.address(region: 0, page: 9), .read(.supervisor), size: 8)
        #expect(outcome.exits >= 1)  // (a second one maps table 1 itself in EPT)
        #expect(outcome.result == .completed(gpa: GuestPhysicalAddress(Self.expected(table: 1, page: 9)), value: 0))
    }

    @Test func kvmsFlushesDropIt() throws {
        try cacheThenRewrite()
        // Turning dirty logging on write-protects the slot's SPTEs and flushes every TLB.
        try vm.setDirtyLogging(slot: 0, true)
        #expect(try gpa(page: 7) == Self.expected(table: 1, page: 7))
    }

    @Test func theUpperEntriesPermissionsStillApply() throws {
        // Region 1's PDE is supervisor-only and read-only, XD: cached by a supervisor read, then a
        // user read, a supervisor write (CR0.WP) and a fetch of other pages must all fault.
        try rewritePDE(region: 1, Self.table(1) | 0x1 | 1 << 63)
        vcpu.invalidatePage(Self.address(region: 1, page: 0))
        for page in 0..<UInt64(4) { try touch(table: 1, page: page) }
        #expect(try read(Self.address(region: 1, page: 0)) == .completed(
            gpa: GuestPhysicalAddress(Self.expected(table: 1, page: 0)), value: 0))
        let hits = vcpu.tlb.pageDirectoryCacheHits
        for (page, access) in [(UInt64(1), Access.read(.user)), (2, .write(.supervisor)), (3, .fetch(.supervisor))] {
            guard case .pageFault(let code, _) = try vcpu.access(Self.address(region: 1, page: page), access, size: 8).result
            else {
                Issue.record("\(access) through a PDE that refuses it went through")
                continue
            }
            #expect(code.contains(.present))
        }
        #expect(vcpu.tlb.pageDirectoryCacheHits > hits)
    }

    /// A guest that follows the SDM — after rewriting a PDE, INVLPG of every page it used under it,
    /// or a flushing CR3 load, or INVPCID — sees exactly what a fresh walk of its tables gives, on
    /// every access; seeded, with the cache hit along the way.
    @Test(arguments: 0..<8)
    func aGuestThatInvalidatesAlwaysSeesItsTables(seed: UInt64) throws {
        var random = SeededGenerator(seed: seed)
        var tableOf = (0..<Self.regionCount).map { Int($0) }
        var used: [UInt64: Set<UInt64>] = [:]
        for _ in 0..<400 {
            let region = random.next() % Self.regionCount
            if random.next() % 6 == 0 {
                // Rewrite the region's PDE: another page table, or not present.
                let table = Int(random.next() % UInt64(Self.tableCount + 1))
                tableOf[Int(region)] = table
                try rewritePDE(region: region, table < Self.tableCount ? Self.table(table) | 0x7 : 0)
                switch random.next() % 4 {
                case 0:
                    for page in used[region, default: []] { vcpu.invalidatePage(Self.address(region: region, page: page)) }
                    // With no page used there, one INVLPG anywhere still drops the cached PDE.
                    if used[region, default: []].isEmpty { vcpu.invalidatePage(GuestVirtualAddress(0)) }
                case 1:
                    try vcpu.loadCR3(Self.pml4 | Self.pcid)
                case 2:
                    #expect(vcpu.invalidatePCID(.singleContext, pcid: Self.pcid, address: GuestVirtualAddress(0)))
                default:
                    #expect(vcpu.invalidatePCID(.allContextsExceptGlobal, pcid: 0, address: GuestVirtualAddress(0)))
                }
                used[region] = []
                continue
            }
            let page = random.next() % 512
            let address = Self.address(region: region, page: page)
            let result = try read(address)
            let table = tableOf[Int(region)]
            if table < Self.tableCount {
                #expect(result == .completed(gpa: GuestPhysicalAddress(Self.expected(table: table, page: page)), value: 0),
                        "seed \(seed): region \(region) page \(page) through table \(table)")
                used[region, default: []].insert(page)
            } else {
                guard case .pageFault(let code, _) = result else {
                    Issue.record("seed \(seed): region \(region) has no page table, yet \(result)")
                    continue
                }
                #expect(!code.contains(.present))
            }
        }
        #expect(vcpu.tlb.pageDirectoryCacheHits > 0)
    }
}
