// The nested walk: L2's paging over L1's EPT or NPT, with L2's tables living in L1's memory at
// addresses L1's tables choose. Each test builds L2's tables in a scratch memory (at L2
// guest-physical addresses), copies them into L1's memory at L2 address + `l1Offset`, and has
// L1's tables map them there.

import GuestMemory
import Testing
import X86Paging

struct NestedFixture {
    static let l1Offset: UInt64 = 0x100_0000
    /// L2's tables are allocated here (L2 guest-physical).
    static let l2TableArea: UInt64 = 0x20_0000
    static let l2TablePages = 16
    static let linear: UInt64 = 0x7F12_3456_7000
    static let l2Page: UInt64 = 0x50_0000
    static let l1Page: UInt64 = 0x90_0000
    static let wb: UInt64 = 6 << 3

    let l1 = GuestPhysicalMemory()
    let l2Tables: PageTableBuilder
    let registers: PagingRegisters
    let scratch: GuestPhysicalMemory

    /// L2 in 4-level paging (or `mode`) mapping `linear` to `l2Page` with `l2Leaf` flags.
    init(mode: PagingMode = .fourLevel, l2Leaf: UInt64 = 0x7, linear: UInt64 = NestedFixture.linear) throws {
        try l1.back(GuestPhysicalAddress(0), size: 32 << 20)
        scratch = GuestPhysicalMemory()
        try scratch.back(GuestPhysicalAddress(0), size: 8 << 20)
        l2Tables = try PageTableBuilder(memory: scratch, format: TableFormat(mode)!,
                                        tableArea: GuestPhysicalAddress(Self.l2TableArea), tableAreaSize: 64 << 10)
        try l2Tables.map(linear, to: Self.l2Page, leafFlags: l2Leaf)
        var cr4: CR4 = [.physicalAddressExtension]
        var efer: EFER = [.noExecuteEnable]
        switch mode {
        case .fourLevel: efer.formUnion([.longModeEnable, .longModeActive])
        case .fiveLevel:
            efer.formUnion([.longModeEnable, .longModeActive])
            cr4.insert(.la57)
        case .legacy32: cr4 = []
        default: break
        }
        registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: l2Tables.root.rawValue,
                                    cr4: cr4, efer: efer)
    }

    /// Copies L2's tables into L1's memory.
    func install() throws {
        for page in 0..<Self.l2TablePages {
            let l2 = Self.l2TableArea + UInt64(page) * 0x1000
            for offset in stride(from: UInt64(0), to: 0x1000, by: 8) {
                try l1.store64(try scratch.load64(GuestPhysicalAddress(l2 + offset)),
                               at: GuestPhysicalAddress(l2 + offset + Self.l1Offset))
            }
        }
    }

    /// L2's entry for `linear` at `level`, as it now is in L1's memory.
    func l2Entry(level: Int, linear: UInt64 = NestedFixture.linear) throws -> UInt64 {
        let address = try #require(try l2Tables.entryAddress(of: linear, level: level))
        return try l1.load64(GuestPhysicalAddress(address.rawValue + Self.l1Offset))
    }

    /// L1's EPT: L2's table pages (with `tablePermissions`) and L2's data page (with `pagePermissions`).
    func ept(levels: Int = 4, ad: Bool = false, tablePermissions: UInt64 = 7, pagePermissions: UInt64 = 7,
             capabilities: EPTCapabilities = EPTCapabilities(), modeBasedExecute: Bool = false)
        throws -> (EPTWalker, PageTableBuilder) {
        let builder = try PageTableBuilder(memory: l1, format: .ept(levels: levels),
                                           tableArea: GuestPhysicalAddress(0x40_0000), tableAreaSize: 1 << 20)
        // Under mode-based execute control the upper entries grant user-mode execute too.
        let tableFlags: UInt64 = modeBasedExecute ? 7 | 1 << 10 : 7
        for page in 0..<Self.l2TablePages {
            let l2 = Self.l2TableArea + UInt64(page) * 0x1000
            try builder.map(l2, to: l2 + Self.l1Offset, leafFlags: tablePermissions | Self.wb, tableFlags: tableFlags)
        }
        try builder.map(Self.l2Page, to: Self.l1Page, leafFlags: pagePermissions | Self.wb, tableFlags: tableFlags)
        let walker = try EPTWalker(pointer: EPTPointer(root: builder.root.rawValue, levels: levels, accessedDirty: ad),
                                   capabilities: capabilities, modeBasedExecute: modeBasedExecute)
        return (walker, builder)
    }

    func walker(_ tables: NestedPagingTables, rule: GuestTableAccessRule = .architectural) throws -> NestedPagingWalker {
        let guest = try NestedPagingWalker.guestWalker(registers: registers, cpu: CPUModel(), tables: tables, memory: l1)
        return NestedPagingWalker(guest: guest, tables: tables, rule: rule)
    }

    /// The L2 guest-physical address of L2's entry for `linear` at `level`.
    func l2EntryAddress(level: Int, linear: UInt64 = NestedFixture.linear) throws -> GuestPhysicalAddress {
        try #require(try l2Tables.entryAddress(of: linear, level: level))
    }
}

@Suite("Nested walk: L2 paging through L1's EPT or NPT")
struct NestedPagingWalkerTests {
    let va = GuestVirtualAddress(NestedFixture.linear | 0x123)

    @Test("Translates L2 GVA -> L2 GPA -> L1 GPA and sets both dimensions' A/D bits", arguments: [false, true])
    func translation(ad: Bool) throws {
        for kind in AccessKind.allCases {
            let fixture = try NestedFixture()
            try fixture.install()
            let (ept, eptTables) = try fixture.ept(ad: ad)
            let result = try fixture.walker(.ept(ept)).translate(va, Access(kind, .user), in: fixture.l1)
            let translation = try result.get()
            #expect(translation.guest.physicalAddress.rawValue == NestedFixture.l2Page | 0x123)
            #expect(translation.outputAddress.rawValue == NestedFixture.l1Page | 0x123)
            #expect(translation.nestedLevel == 1)
            for level in 1...4 {
                let entry = try fixture.l2Entry(level: level)
                #expect(entry & 0x20 != 0, "L2 A at level \(level)")
                #expect((entry & 0x40 != 0) == (level == 1 && kind == .write), "L2 D at level \(level)")
            }
            // EPT: the leaf mapping each L2 table used is accessed, and dirty under EPT A/D (table
            // accesses are writes then); the data page's leaf is dirty only for a write.
            for level in 1...4 {
                let table = try fixture.l2EntryAddress(level: level)
                let leaf = try fixture.l1.load64(try #require(try eptTables.entryAddress(of: table.rawValue & ~0xFFF, level: 1)))
                #expect((leaf & 1 << 8 != 0) == ad && (leaf & 1 << 9 != 0) == ad, "EPT leaf of L2's level-\(level) table")
            }
            let dataLeaf = try fixture.l1.load64(try #require(try eptTables.entryAddress(of: NestedFixture.l2Page, level: 1)))
            #expect((dataLeaf & 1 << 8 != 0) == ad)
            #expect((dataLeaf & 1 << 9 != 0) == (ad && kind == .write))
        }
    }

    @Test("An EPT violation on one of L2's tables names the guest level and reports a paging-structure access")
    func tableViolation() throws {
        for ad in [false, true] {
            for guestLevel in 1...4 {
                let fixture = try NestedFixture()
                try fixture.install()
                let (ept, eptTables) = try fixture.ept(ad: ad)
                let table = try fixture.l2EntryAddress(level: guestLevel)
                try eptTables.setEntry(table.rawValue & ~0xFFF, level: 1, value: 0)
                let result = try fixture.walker(.ept(ept)).translate(va, Access(.read, .user), in: fixture.l1)
                var want: EPTViolationQualification = ad ? [.dataRead, .dataWrite] : [.dataRead]
                want.insert(.linearAddressValid)
                #expect(result == .failure(.eptViolation(NestedFaultSite(address: table, guestLevel: guestLevel, nestedLevel: 1),
                                                         qualification: want)), "ad \(ad) level \(guestLevel)")
                // A faulting walk leaves L2's A bits alone.
                #expect(try fixture.l2Entry(level: 4) & 0x20 == 0)
            }
        }
    }

    @Test("An EPT violation on the final address reports a final translation and what the entries allowed")
    func finalViolation() throws {
        for (permissions, kind) in [(UInt64(0), AccessKind.read), (1, .write), (3, .fetch), (5, .write)] {
            let fixture = try NestedFixture()
            try fixture.install()
            let (ept, _) = try fixture.ept(pagePermissions: permissions)
            let result = try fixture.walker(.ept(ept)).translate(va, Access(kind, .supervisor), in: fixture.l1)
            var want: EPTViolationQualification = [.linearAddressValid, .finalTranslation]
            switch kind {
            case .read: want.insert(.dataRead)
            case .write: want.insert(.dataWrite)
            case .fetch: want.insert(.instructionFetch)
            }
            if permissions & 1 != 0 { want.insert(.readable) }
            if permissions & 2 != 0 { want.insert(.writable) }
            if permissions & 4 != 0 { want.insert(.executable) }
            let site = NestedFaultSite(address: GuestPhysicalAddress(NestedFixture.l2Page | 0x123), guestLevel: 0, nestedLevel: 1)
            #expect(result == .failure(.eptViolation(site, qualification: want)), "perms \(permissions) \(kind)")
            // L2's own walk succeeded before the final access: its A bits are set.
            #expect(try fixture.l2Entry(level: 1) & 0x20 != 0)
        }
    }

    @Test("Misconfigurations on tables and on the final address")
    func misconfiguration() throws {
        let fixture = try NestedFixture()
        try fixture.install()
        let (ept, eptTables) = try fixture.ept(capabilities: EPTCapabilities(executeOnly: false))
        // Write-only leaf for the PDPT page: misconfigured whatever the access.
        let pdpt = try fixture.l2EntryAddress(level: 3)
        let leaf = try #require(try eptTables.entryAddress(of: pdpt.rawValue & ~0xFFF, level: 1))
        try fixture.l1.store64(try fixture.l1.load64(leaf) & ~1, at: leaf)
        #expect(try fixture.walker(.ept(ept)).translate(va, Access(.read, .user), in: fixture.l1)
            == .failure(.eptMisconfiguration(NestedFaultSite(address: pdpt, guestLevel: 3, nestedLevel: 1))))
        // Execute-only data page without the capability.
        let other = try NestedFixture()
        try other.install()
        let (ept2, _) = try other.ept(pagePermissions: 4, capabilities: EPTCapabilities(executeOnly: false))
        #expect(try other.walker(.ept(ept2)).translate(va, Access(.fetch, .user), in: other.l1)
            == .failure(.eptMisconfiguration(NestedFaultSite(address: GuestPhysicalAddress(NestedFixture.l2Page | 0x123),
                                                             guestLevel: 0, nestedLevel: 1))))
    }

    @Test("L2's own faults go to L2, even where L1's EPT would refuse the page")
    func guestFault() throws {
        let fixture = try NestedFixture(l2Leaf: 0x5)  // read-only user page
        try fixture.install()
        let (ept, _) = try fixture.ept(pagePermissions: 0)
        let result = try fixture.walker(.ept(ept)).translate(va, Access(.write, .user), in: fixture.l1)
        guard case .failure(.guest(.pageFault(let fault))) = result else {
            Issue.record("expected L2's #PF, got \(result)")
            return
        }
        #expect(fault.errorCode == [.present, .write, .user])
        #expect(fault.level == 1)
    }

    @Test("Without EPT A/D: read-only L2 tables are walkable, but the walk's A/D update is an EPT write violation")
    func readOnlyTables() throws {
        let fixture = try NestedFixture()
        try fixture.install()
        let (ept, _) = try fixture.ept(tablePermissions: 5)  // R-X: no writes to L2's tables
        let result = try fixture.walker(.ept(ept)).translate(va, Access(.read, .user), in: fixture.l1)
        let pml4e = try fixture.l2EntryAddress(level: 4)
        #expect(result == .failure(.eptViolation(NestedFaultSite(address: pml4e, guestLevel: 4, nestedLevel: 1),
                                                 qualification: [.dataRead, .dataWrite, .readable, .executable,
                                                                 .linearAddressValid])))
        // With every A bit already set there is nothing to write: the architecture walks on, while
        // KVM's nested walk (every table access a write) still reports a violation.
        let preset = try NestedFixture(l2Leaf: 0x7 | 0x20)
        for level in 2...4 {
            let address = try preset.l2EntryAddress(level: level)
            try preset.scratch.store64(try preset.scratch.load64(address) | 0x20, at: address)
        }
        try preset.install()
        let (ept2, _) = try preset.ept(tablePermissions: 5)
        #expect(try preset.walker(.ept(ept2)).translate(va, Access(.read, .user), in: preset.l1).get()
            .outputAddress.rawValue == NestedFixture.l1Page | 0x123)
        guard case .failure(.eptViolation(let site, let qualification)) =
            try preset.walker(.ept(ept2), rule: .alwaysWrite).translate(va, Access(.read, .user), in: preset.l1) else {
            Issue.record("expected a violation under KVM's rule")
            return
        }
        #expect(site.guestLevel == 4 && qualification.contains([.dataRead, .dataWrite, .linearAddressValid]))
    }

    @Test("Mode-based execute control: user-mode linear addresses need bit 10, supervisor-mode ones bit 2")
    func modeBasedExecute() throws {
        for l2User in [false, true] {
            for (xs, xu) in [(false, true), (true, false), (true, true)] {
                let fixture = try NestedFixture(l2Leaf: l2User ? 0x7 : 0x3)
                try fixture.install()
                let permissions: UInt64 = 1 | (xs ? 4 : 0) | (xu ? 1 << 10 : 0)
                let (ept, _) = try fixture.ept(tablePermissions: 7 | 1 << 10, pagePermissions: permissions,
                                               capabilities: EPTCapabilities(modeBasedExecute: true), modeBasedExecute: true)
                let result = try fixture.walker(.ept(ept)).translate(va, Access(.fetch, .supervisor), in: fixture.l1)
                let allowed = l2User ? xu : xs
                switch result {
                case .success: #expect(allowed, "user \(l2User) xs \(xs) xu \(xu)")
                case .failure(.eptViolation(_, let qualification)):
                    #expect(!allowed, "user \(l2User) xs \(xs) xu \(xu)")
                    #expect(qualification.contains(.executable) == xs && qualification.contains(.userExecutable) == xu)
                default: Issue.record("\(result)")
                }
            }
        }
    }

    @Test("5-level EPT under a 5-level L2")
    func fiveLevels() throws {
        let linear: UInt64 = 0x00AB_CDEF_1234_5000
        let fixture = try NestedFixture(mode: .fiveLevel, linear: linear)
        try fixture.install()
        let (ept, _) = try fixture.ept(levels: 5, ad: true)
        let result = try fixture.walker(.ept(ept)).translate(GuestVirtualAddress(linear | 0x10), Access(.write, .supervisor),
                                                             in: fixture.l1)
        #expect(try result.get().outputAddress.rawValue == NestedFixture.l1Page | 0x10)
        #expect(try result.get().guest.path.topLevel == 5)
    }

    @Test("PAE L2: the PDPTEs are loaded through L1's EPT, without a linear address")
    func paePDPTEs() throws {
        let fixture = try NestedFixture(mode: .pae, linear: 0x8040_1000)
        try fixture.install()
        let (ept, eptTables) = try fixture.ept()
        let pdpt = fixture.registers.cr3 & ~0x1F
        let walker = try fixture.walker(.ept(ept))
        #expect(try walker.translate(GuestVirtualAddress(0x8040_1008), Access(.read, .supervisor), in: fixture.l1).get()
            .outputAddress.rawValue == NestedFixture.l1Page | 0x8)
        try eptTables.setEntry(pdpt & ~0xFFF, level: 1, value: 0)
        let site = NestedFaultSite(address: GuestPhysicalAddress(pdpt), guestLevel: 3, nestedLevel: 1)
        #expect(throws: NestedGuestSetupError.pdpteLoad(.eptViolation(site, qualification: [.dataRead]))) {
            try fixture.walker(.ept(ept))
        }
    }

    @Test("Hostile L1 tables: an L2 table mapped beyond L1's memory is no memory, not a crash")
    func beyondMemory() throws {
        let fixture = try NestedFixture()
        try fixture.install()
        let (ept, eptTables) = try fixture.ept()
        let pd = try fixture.l2EntryAddress(level: 2)
        try eptTables.setEntry(pd.rawValue & ~0xFFF, level: 1, value: 0x7_0000_0000 | 7 | NestedFixture.wb)
        #expect(try fixture.walker(.ept(ept)).translate(va, Access(.read, .user), in: fixture.l1)
            == .failure(.noMemory(GuestPhysicalAddress(0x7_0000_0000))))
    }

    // MARK: NPT

    func npt(_ fixture: NestedFixture, tableFlags: UInt64 = 0x7, pageFlags: UInt64 = 0x7) throws -> PageWalker {
        let builder = try PageTableBuilder(memory: fixture.l1, format: .fourLevel,
                                           tableArea: GuestPhysicalAddress(0x40_0000), tableAreaSize: 1 << 20)
        for page in 0..<NestedFixture.l2TablePages {
            let l2 = NestedFixture.l2TableArea + UInt64(page) * 0x1000
            try builder.map(l2, to: l2 + NestedFixture.l1Offset, leafFlags: tableFlags)
        }
        try builder.map(NestedFixture.l2Page, to: NestedFixture.l1Page, leafFlags: pageFlags)
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable], cr3: builder.root.rawValue,
                                        cr4: [.physicalAddressExtension],
                                        efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
        return try PageWalker(registers: registers, memory: fixture.l1)
    }

    @Test("NPT: translations, and #NPF with GUEST_PAGE or GUEST_FINAL")
    func nestedPageTables() throws {
        let fixture = try NestedFixture()
        try fixture.install()
        let walker = try fixture.walker(.npt(try npt(fixture)))
        #expect(try walker.translate(va, Access(.write, .user), in: fixture.l1).get().outputAddress.rawValue
            == NestedFixture.l1Page | 0x123)

        // A read-only L2 table: guest table accesses are user writes at the nested level.
        let readOnly = try NestedFixture()
        try readOnly.install()
        let result = try readOnly.walker(.npt(try npt(readOnly, tableFlags: 0x5)))
            .translate(va, Access(.read, .supervisor), in: readOnly.l1)
        let pml4e = try readOnly.l2EntryAddress(level: 4)
        #expect(result == .failure(.nestedPageFault(NestedFaultSite(address: pml4e, guestLevel: 4, nestedLevel: 1),
                                                    errorCode: [.present, .write, .user, .guestPage])))

        // An NX data page: the fetch's #NPF is final, with I/D (L1 runs with EFER.NXE).
        let noExecute = try NestedFixture()
        try noExecute.install()
        let fetch = try noExecute.walker(.npt(try npt(noExecute, pageFlags: 0x7 | 1 << 63)))
            .translate(va, Access(.fetch, .user), in: noExecute.l1)
        #expect(fetch == .failure(.nestedPageFault(
            NestedFaultSite(address: GuestPhysicalAddress(NestedFixture.l2Page | 0x123), guestLevel: 0, nestedLevel: 1),
            errorCode: [.present, .user, .fetch, .guestFinal])))
    }
}
