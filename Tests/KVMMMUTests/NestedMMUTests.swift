// KVM's guest side of nested EPT: guest_mmu's roles and its walk of L1's EPT with the exits it
// reflects to L1, and nested_mmu's walk of L2's linear addresses.

import GuestMemory
@testable import KVMMMU
import Testing
import X86Paging

private let wb: UInt64 = 6 << 3

extension Result where Failure == NestedVMExit {
    /// The exit a walk reflected, if it did.
    var exit: NestedVMExit? {
        if case .failure(let exit) = self { return exit }
        return nil
    }
}

/// L1's memory with L1's EPT at 1 MiB mapping `gpa` to `output`.
private func eptFixture(levels: Int = 4, ad: Bool = false, leaf: UInt64 = 7, gpa: UInt64 = 0x12_3456_7000,
                        output: UInt64 = 0x9000) throws -> (GuestPhysicalMemory, PageTableBuilder, EPTPointer) {
    let memory = GuestPhysicalMemory()
    try memory.back(GuestPhysicalAddress(0), size: 16 << 20)
    let builder = try PageTableBuilder(memory: memory, format: .ept(levels: levels), tableArea: GuestPhysicalAddress(0x10_0000),
                                       tableAreaSize: 1 << 20)
    try builder.map(gpa, to: output, leafFlags: leaf | wb)
    return (memory, builder, EPTPointer(root: builder.root.rawValue, levels: levels, accessedDirty: ad))
}

@Suite("guest_mmu for L1's EPT: roles, walk and reflected exits")
struct NestedEPTContextTests {
    @Test("kvm_init_shadow_ept_mmu's roles, and when they change", arguments: [4, 5])
    func roles(levels: Int) throws {
        for ad in [false, true] {
            for executeOnly in [false, true] {
                let context = try NestedEPTContext(pointer: EPTPointer(root: 0x10_0000, levels: levels, accessedDirty: ad),
                                                   capabilities: EPTCapabilities(executeOnly: executeOnly))
                let role = context.rootRole
                #expect(role.level == levels && !role.isDirect && role.guestMode && role.adDisabled == !ad)
                #expect(!role.hasFourByteGPTE && role.access == ACC.all && !role.isPassthrough)
                #expect(context.cpuRole.ext.execOnly == executeOnly && context.cpuRole.ext.valid)
                // Another EPTP with the same level and A/D bit keeps the context; a new A/D bit does not.
                let moved = try NestedEPTContext(pointer: EPTPointer(root: 0x20_0000, levels: levels, accessedDirty: ad),
                                                 capabilities: EPTCapabilities(executeOnly: executeOnly))
                #expect(!moved.reinitializes(from: context))
                let flipped = try NestedEPTContext(pointer: EPTPointer(root: 0x10_0000, levels: levels, accessedDirty: !ad),
                                                   capabilities: EPTCapabilities(executeOnly: executeOnly))
                #expect(flipped.reinitializes(from: context))
            }
        }
        #expect(throws: EPTPointerError.badWalkLength(3)) {
            try NestedEPTContext(pointer: EPTPointer(0x10_0000 | 2 << 3 | 6), capabilities: EPTCapabilities())
        }
    }

    @Test("A walk gives FNAME(fetch) the L1 frame, the access of every level and the tables", arguments: [false, true])
    func walk(ad: Bool) throws {
        for kind in AccessKind.allCases {
            let (memory, builder, pointer) = try eptFixture(ad: ad, leaf: 7)
            let context = try NestedEPTContext(pointer: pointer, capabilities: EPTCapabilities())
            let errorCode: PageFaultErrorCode = switch kind {
            case .read: [.user, .guestFinal]
            case .write: [.write, .guestFinal]
            case .fetch: [.fetch, .guestFinal]
            }
            let walk = try context.walk(GuestPhysicalAddress(0x12_3456_7ABC), errorCode: errorCode, in: memory).get()
            #expect(walk.gfn == GuestFrameNumber(9) && walk.level == 1)
            // protect_clean_gpte: with A/D on, a clean leaf is shadowed read-only until a write.
            #expect(walk.pteAccess == (ad && kind != .write ? ACC.all & ~ACC.write : ACC.all))
            for level in 1...4 {
                #expect(walk.ptAccess(level: level) == ACC.all)
                let entry = try #require(try builder.entryAddress(of: 0x12_3456_7000, level: level))
                #expect(walk.tableGFN(level: level) == entry.frame)
                let value = try memory.load64(entry)
                #expect((value & 1 << 8 != 0) == ad && (value & 1 << 9 != 0) == (ad && level == 1 && kind == .write))
            }
        }
    }

    @Test("EPT A/D off: no A/D written, the leaf's access as L1 gave it")
    func accessPerLevel() throws {
        let (memory, builder, pointer) = try eptFixture(leaf: 5)  // R-X
        // The PDE: read and write only.
        let pde = try #require(try builder.entryAddress(of: 0x12_3456_7000, level: 2))
        try memory.store64(try memory.load64(pde) & ~4, at: pde)
        let context = try NestedEPTContext(pointer: pointer, capabilities: EPTCapabilities())
        let walk = try context.walk(GuestPhysicalAddress(0x12_3456_7000), errorCode: [.user, .guestFinal], in: memory).get()
        #expect(walk.ptAccess(level: 2) == ACC.all && walk.ptAccess(level: 1) == ACC.user | ACC.write)
        #expect(walk.pteAccess == ACC.user)
    }

    @Test("Violations are reflected with KVM's qualification: the access, what L1 allowed, bits 8:7 from the hardware")
    func violations() throws {
        let (memory, builder, pointer) = try eptFixture(leaf: 1)  // read-only
        let context = try NestedEPTContext(pointer: pointer, capabilities: EPTCapabilities())
        let gpa = GuestPhysicalAddress(0x12_3456_7ABC)
        // L2's walk setting an A bit in its table (the hardware reports a read and a write).
        #expect(context.walk(gpa, errorCode: [.user, .write, .present, .guestPage], in: memory).exit
            == .eptViolation(gpa, qualification: [.dataRead, .dataWrite, .readable, .linearAddressValid]))
        #expect(context.walk(gpa, errorCode: [.fetch, .present, .guestFinal], in: memory).exit
            == .eptViolation(gpa, qualification: [.instructionFetch, .readable, .linearAddressValid,
                                                           .finalTranslation]))
        // Not present at the PDE: nothing allowed.
        let pde = try #require(try builder.entryAddress(of: 0x12_3456_7000, level: 2))
        try memory.store64(0, at: pde)
        #expect(context.walk(gpa, errorCode: [.user, .guestFinal], in: memory).exit
            == .eptViolation(gpa, qualification: [.dataRead, .linearAddressValid, .finalTranslation]))
        // A table outside L1's memory: what the entries above allowed.
        try memory.store64(0x7_0000_0000 | 7, at: pde)
        #expect(context.walk(gpa, errorCode: [.user, .guestFinal], in: memory).exit
            == .eptViolation(gpa, qualification: [.dataRead, .readable, .writable, .executable,
                                                           .linearAddressValid, .finalTranslation]))
    }

    @Test("Misconfigurations are reflected as EPT_MISCONFIG")
    func misconfigurations() throws {
        let gpa = GuestPhysicalAddress(0x12_3456_7000)
        for (leaf, executeOnly) in [(UInt64(2), true), (4, false), (6, true), (7 | 1 << 7, true)] {
            // 7 | 1 << 7: bit 7 in a 4 KiB EPT PTE is ignored, so that one translates (checked below).
            if leaf & 1 << 7 != 0 {
                let (memory, _, pointer) = try eptFixture(leaf: leaf)
                let context = try NestedEPTContext(pointer: pointer, capabilities: EPTCapabilities())
                #expect(throws: Never.self) { try context.walk(gpa, errorCode: [.user, .guestFinal], in: memory).get() }
                continue
            }
            let (memory, _, pointer) = try eptFixture(leaf: leaf)
            let context = try NestedEPTContext(pointer: pointer, capabilities: EPTCapabilities(executeOnly: executeOnly))
            #expect(context.walk(gpa, errorCode: [.user, .guestFinal], in: memory).exit == .eptMisconfiguration(gpa),
                    "leaf \(String(leaf, radix: 16)) execonly \(executeOnly)")
        }
    }
}

@Suite("nested_mmu: L2 linear addresses for the emulator")
struct NestedMMUTests {
    static let linear: UInt64 = 0x7F00_0040_1000
    static let l2Page: UInt64 = 0x50_0000
    static let l1Page: UInt64 = 0x90_0000

    /// L2's 4-level tables at L2 = L1 addresses [2 MiB, 2 MiB + 64 KiB), mapped 1:1 by L1's EPT with
    /// `tablePermissions`; L2's page mapped to `l1Page` with `pagePermissions`.
    func fixture(l2Leaf: UInt64 = 0x7, tablePermissions: UInt64 = 7, pagePermissions: UInt64 = 7, presetAccessed: Bool = false)
        throws -> (GuestPhysicalMemory, NestedMMU, PageTableBuilder) {
        let memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: 16 << 20)
        let l2 = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x20_0000),
                                      tableAreaSize: 64 << 10)
        try l2.map(Self.linear, to: Self.l2Page, leafFlags: l2Leaf | (presetAccessed ? 0x20 : 0),
                   tableFlags: presetAccessed ? 0x27 : nil)
        let ept = try PageTableBuilder(memory: memory, format: .ept(levels: 4), tableArea: GuestPhysicalAddress(0x40_0000),
                                       tableAreaSize: 1 << 20)
        for page in 0..<16 {
            let address = 0x20_0000 + UInt64(page) * 0x1000
            try ept.map(address, to: address, leafFlags: tablePermissions | wb)
        }
        try ept.map(Self.l2Page, to: Self.l1Page, leafFlags: pagePermissions | wb)
        let walker = try EPTWalker(pointer: EPTPointer(root: ept.root.rawValue, levels: 4, accessedDirty: false))
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: l2.root.rawValue,
                                        cr4: [.physicalAddressExtension],
                                        efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
        let mmu = try NestedMMU(l2Registers: registers, cpu: CPUModel(), tables: .ept(walker), memory: memory)
        return (memory, mmu, l2)
    }

    @Test("L2's role has guest mode; translations give L2's and L1's addresses")
    func translates() throws {
        let (memory, mmu, _) = try fixture()
        #expect(mmu.cpuRole.base.guestMode && mmu.cpuRole.base.level == 4 && !mmu.cpuRole.base.isDirect)
        #expect(mmu.translate(GuestVirtualAddress(Self.linear | 0x44), Access(.write, .user), in: memory)
            == .translated(guest: GuestPhysicalAddress(Self.l2Page | 0x44), l1: GuestPhysicalAddress(Self.l1Page | 0x44)))
    }

    @Test("L2's own #PF is injected into L2")
    func guestFault() throws {
        let (memory, mmu, _) = try fixture(l2Leaf: 0x5)
        #expect(mmu.translate(GuestVirtualAddress(Self.linear), Access(.write, .user), in: memory)
            == .injectGuestFault(errorCode: [.present, .write, .user]))
    }

    @Test("KVM reads L2's tables as writes: a read-only L2 table exits even with every A bit set")
    func tablesAsWrites() throws {
        let (memory, mmu, l2) = try fixture(tablePermissions: 5, presetAccessed: true)
        let pml4e = try #require(try l2.entryAddress(of: Self.linear, level: 4))
        #expect(mmu.translate(GuestVirtualAddress(Self.linear), Access(.read, .user), in: memory)
            == .exit(.eptViolation(pml4e, qualification: [.dataRead, .dataWrite, .readable, .executable, .linearAddressValid]), guestLevel: 4))
    }

    @Test("KVM's final access carries PFERR_USER: an execute-only page is not fetchable through nested_mmu")
    func executeOnlyFetch() throws {
        let (memory, mmu, _) = try fixture(pagePermissions: 4)
        #expect(mmu.translate(GuestVirtualAddress(Self.linear | 8), Access(.fetch, .supervisor), in: memory)
            == .exit(.eptViolation(GuestPhysicalAddress(Self.l2Page | 8),
                                   qualification: [.dataRead, .instructionFetch, .executable, .linearAddressValid,
                                                   .finalTranslation]), guestLevel: 0))
        // Not present at all: the fetch's violation reports the read too.
        let (memory2, mmu2, _) = try fixture(pagePermissions: 0)
        #expect(mmu2.translate(GuestVirtualAddress(Self.linear), Access(.fetch, .supervisor), in: memory2)
            == .exit(.eptViolation(GuestPhysicalAddress(Self.l2Page),
                                   qualification: [.dataRead, .instructionFetch, .linearAddressValid, .finalTranslation]),
                  guestLevel: 0))
    }
}
