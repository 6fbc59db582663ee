import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// An L1 vCPU under the TDP MMU entering L2: L1 writes its EPT or NPT tables and L2's tables with ordinary L1 stores, enters
// L2, and every L2 access is checked against the architecture's nested walk over L1's memory.

extension SeededGenerator {
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
}

/// L1 as a hypervisor (identity-mapped: its linear addresses are its guest-physical ones): its
/// EPT (or NPT) tables from L1 2 MiB up, L2's guest-physical
/// [0, 4 MiB) at L1 4 MiB up (L2's own tables from L2 1 MiB up).
final class L1Hypervisor {
    static let tableBase: UInt64 = 0x20_0000
    static let l2Offset: UInt64 = 0x40_0000
    static let l2TableBase: UInt64 = 0x10_0000
    static let l2Registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: l2TableBase,
                                             cr4: [.physicalAddressExtension],
                                             efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
    let vm: VirtualMachine
    let vcpu: VCPU
    let npt: Bool
    let levels: Int
    let root: UInt64
    private var nextTable: UInt64
    private var nextL2Table = L1Hypervisor.l2TableBase + 0x1000

    init(npt: Bool = false, levels: Int = 4, nptHostLevels: Int = 4, pml: Bool = false,
         dirtyLogProtocol: DirtyLogProtocol = .getAndReset, eagerPageSplit: Bool = true, nxHugePages: Bool = false,
         nxRecoveryRatio: Int = 60) throws {
        self.npt = npt
        self.levels = levels
        var configuration: TDPMMUConfiguration = npt ? .npt(hostLevels: nptHostLevels) : {
            guard case .tdp(let ept) = VirtualMachineMMU.ept(pml: pml) else { preconditionFailure("EPT is TDP") }
            return ept
        }()
        configuration.eagerPageSplit = eagerPageSplit
        configuration.nxHugePages = nxHugePages
        configuration.nxHugePagesRecoveryRatio = nxRecoveryRatio
        let vm = try VirtualMachine(memorySize: 16 << 20, mmu: .tdp(configuration))
        try vm.setDirtyLogProtocol(dirtyLogProtocol, ringEntries: 256)
        self.vm = vm
        // L1's own identity map of its 16 MiB in 2 MiB pages, as its boot code left it (NPT is
        // walked in L1's paging mode: L1 runs in long mode).
        let pml4: UInt64 = 0xF0_0000, pdpt: UInt64 = 0xF0_1000, directory: UInt64 = 0xF0_2000
        func boot(_ value: UInt64, at address: UInt64) {
            vm.memory.hostPage(GuestPhysicalAddress(address).frame)!.bytes
                .storeBytes(of: value, toByteOffset: Int(address & 0xFFF), as: UInt64.self)
        }
        boot(pdpt | 0x3, at: pml4)
        boot(directory | 0x3, at: pdpt)
        for index in 0..<UInt64(8) { boot(index << 21 | 0x83, at: directory + index * 8) }
        root = Self.tableBase
        nextTable = Self.tableBase + 0x1000
        vcpu = try vm.addVCPU(registers: PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: pml4,
                                                         cr4: [.physicalAddressExtension],
                                                         efer: [.noExecuteEnable, .longModeEnable, .longModeActive]))
    }

    func store(_ value: UInt64, at address: UInt64) throws {
        let outcome = try vcpu.access(GuestVirtualAddress(address), Access(.write, .supervisor), size: 8, value: value)
        guard case .completed = outcome.result else { throw VirtualMachineError.invalidAccess("L1 store: \(outcome)") }
    }

    func load(_ address: UInt64) throws -> UInt64 {
        let outcome = try vcpu.access(GuestVirtualAddress(address), Access(.read, .supervisor), size: 8)
        guard case .completed(_, let value) = outcome.result else { throw VirtualMachineError.invalidAccess("L1 load: \(outcome)") }
        return value
    }

    /// The address of L1's entry for L2 guest-physical `gpa` at `level`, creating tables above it
    /// with every right.
    func entryAddress(_ gpa: UInt64, level target: Int) throws -> UInt64 {
        var table = root
        var level = levels
        let tableRights: UInt64 = npt ? 0x7 : 0x7
        while true {
            let entry = table + ((gpa >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
            if level == target { return entry }
            var value = try load(entry)
            if value & (npt ? 1 : 7) == 0 {
                value = nextTable | tableRights
                nextTable += 0x1000
                try store(value, at: entry)
            }
            table = value & 0x000F_FFFF_FFFF_F000
            level -= 1
        }
    }

    /// Maps L2's `gpa` to L1's `l1` at `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB) with `rights`
    /// (EPT: R 1, W 2, X 4, A 0x100, D 0x200, write-back memory type added; NPT: x86 flags).
    func map(_ gpa: UInt64, to l1: UInt64, level: Int = 1, rights: UInt64) throws {
        let large: UInt64 = level > 1 ? 0x80 : 0
        let type: UInt64 = npt ? 0 : 6 << 3
        try store(l1 | type | large | rights, at: try entryAddress(gpa, level: level))
    }

    var paging: L1NestedPaging {
        npt ? .npt(nestedCR3: root)
            : .ept(EPTPointer(root: root, levels: levels, accessedDirty: ad), capabilities: EPTCapabilities(executeOnly: executeOnly))
    }
    var ad = false
    var executeOnly = true

    /// Maps L2's linear `linear` to L2's `gpa` with `flags` in L2's 4-level tables, which L1
    /// writes into L2's memory.
    func mapL2(_ linear: UInt64, to gpa: UInt64, flags: UInt64) throws {
        var table = Self.l2TableBase
        for level in stride(from: 4, to: 1, by: -1) {
            let entry = table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
            var value = try load(entry + Self.l2Offset)
            if value & 1 == 0 {
                value = nextL2Table | 0x7
                nextL2Table += 0x1000
                try store(value, at: entry + Self.l2Offset)
            }
            table = value & 0x000F_FFFF_FFFF_F000
        }
        try store(gpa | flags, at: table + ((linear >> 12) & 0x1FF) * 8 + Self.l2Offset)
    }

    /// The L2 guest-physical address of L2's entry for `linear` at `level` (the tables exist).
    func l2EntryAddress(_ linear: UInt64, level target: Int) throws -> UInt64 {
        var table = Self.l2TableBase
        for level in stride(from: 4, through: target, by: -1) {
            let entry = table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
            if level == target { return entry }
            table = try load(entry + Self.l2Offset) & 0x000F_FFFF_FFFF_F000
        }
        return table
    }

    /// Maps L2's [0, 4 MiB) with two RWX 2 MiB leaves at L1 4 MiB (or at L1 2 MiB, over L1's own
    /// EPT tables, which KVM write-tracks) and enters L2 with its paging off.
    func enterOverTwoHugeLeaves(overL1Tables: Bool = false) throws {
        let base: UInt64 = overL1Tables ? 0x20_0000 : 0x40_0000
        try map(0, to: base, level: 2, rights: 0x7)
        try map(0x20_0000, to: base + 0x20_0000, level: 2, rights: 0x7)
        try enter(registers: PagingRegisters())
    }

    /// Identity rights for L2's [0, 4 MiB): every page RWX at L1 +4 MiB.
    func mapAllL2Memory(rights: UInt64) throws {
        for page in 0..<1024 {
            let gpa = UInt64(page) << 12
            try map(gpa, to: gpa + Self.l2Offset, rights: rights)
        }
    }

    func enter(registers: PagingRegisters = L1Hypervisor.l2Registers) throws { try vcpu.enterL2(paging, registers: registers) }

    /// An L2 access checked against the architecture; the auditor after it.
    @discardableResult
    func l2(_ linear: UInt64, _ kind: AccessKind, _ privilege: Privilege = .user, value: UInt64 = 0) throws -> L2AccessOutcome {
        let address = GuestVirtualAddress(linear)
        let access = Access(kind, privilege)
        let outcome = try vcpu.accessL2(address, access, value: value)
        let expected = try vcpu.architecturalL2(address, access)
        try vcpu.checkL2(outcome, at: address, access, expected: expected)
        let audit = vm.audit()
        #expect(audit.isEmpty, "\(audit)")
        return outcome
    }
}

@Suite("An L1 vCPU under TDP running L2 over shadow EPT and shadow NPT")
struct NestedVCPUTests {
    let fullRights: UInt64 = 0x7
    let linear: UInt64 = 0x7F_8040_3000

    func booted(npt: Bool = false, levels: Int = 4, ad: Bool = false, executeOnly: Bool = true) throws -> L1Hypervisor {
        let l1 = try L1Hypervisor(npt: npt, levels: levels)
        l1.ad = ad
        l1.executeOnly = executeOnly
        try l1.mapAllL2Memory(rights: npt ? 0x7 : fullRights)
        try l1.mapL2(linear, to: 0x5000, flags: 0x7)
        return l1
    }

    @Test("A write and a read of L2 reach the host page L1's EPT names, under each EPT mode", arguments: [(4, false), (4, true), (5, false), (5, true)])
    func completes(levels: Int, ad: Bool) throws {
        let l1 = try booted(levels: levels, ad: ad)
        try l1.enter()
        let write = try l1.l2(linear | 0x18, .write, value: 0xCAFE)
        guard case .completed(let gpa, _, _) = write.result else { Issue.record("\(write)"); return }
        #expect(gpa.rawValue == 0x5018)
        #expect(write.exits > 0)
        let read = try l1.l2(linear | 0x18, .read)
        #expect(read.result == .completed(gpa: gpa, hostAddress: try #require({ () -> UInt64? in
            if case .completed(_, let host, _) = write.result { return host } else { return nil } }()), value: 0xCAFE))
        #expect(read.exits == 0, "the shadow EPT is built")
        try l1.vcpu.exitToL1()
        // L1 sees L2's write in its own memory.
        #expect(try l1.load(0x5018 + L1Hypervisor.l2Offset) == 0xCAFE)
        if ad {
            // KVM's walk of L1's EPT set A and D in L1's leaf for the page.
            #expect(try l1.load(try l1.entryAddress(0x5000, level: 1)) & 0x300 == 0x300)
        }
    }

    @Test("An EPT violation at each level of L2's walk and at the final address exits to L1 with the architecture's qualification")
    func violationAtEachLevel() throws {
        for guestLevel in [4, 3, 2, 1, 0] {
            let l1 = try booted()
            let gpa = guestLevel == 0 ? UInt64(0x5000) : try l1.l2EntryAddress(linear, level: guestLevel)
            try l1.map(gpa & ~0xFFF, to: (gpa & ~0xFFF) + L1Hypervisor.l2Offset, rights: 0)
            try l1.enter()
            let outcome = try l1.l2(linear, .read)
            guard case .exitToL1(.eptViolation(let address, let qualification)) = outcome.result else {
                Issue.record("level \(guestLevel): \(outcome)")
                continue
            }
            #expect(address.rawValue == gpa, "level \(guestLevel)")
            #expect(outcome.exitGuestLevel == guestLevel)
            #expect(qualification.contains(.linearAddressValid))
            #expect(qualification.contains(.finalTranslation) == (guestLevel == 0))
            #expect(!l1.vcpu.isInL2, "the exit returns to L1")
        }
    }

    @Test("W without R is an EPT misconfiguration; execute-only pages fetch but do not read, and are misconfigured without the capability")
    func misconfigurationAndExecuteOnly() throws {
        let l1 = try booted()
        try l1.map(0x5000, to: 0x5000 + L1Hypervisor.l2Offset, rights: 0x2)
        try l1.enter()
        #expect(try l1.l2(linear, .read).result == .exitToL1(.eptMisconfiguration(GuestPhysicalAddress(0x5000))))

        for executeOnly in [true, false] {
            let l1 = try booted(executeOnly: executeOnly)
            try l1.map(0x5000, to: 0x5000 + L1Hypervisor.l2Offset, rights: 0x4)
            try l1.enter()
            let fetch = try l1.l2(linear, .fetch)
            let read: L2AccessOutcome
            if l1.vcpu.isInL2 { read = try l1.l2(linear, .read) } else {
                try l1.enter()
                read = try l1.l2(linear, .read)
            }
            if executeOnly {
                guard case .completed = fetch.result else { Issue.record("fetch: \(fetch)"); continue }
                guard case .exitToL1(.eptViolation(_, let qualification)) = read.result else { Issue.record("read: \(read)"); continue }
                #expect(qualification.contains(.executable) && !qualification.contains(.readable))
            } else {
                #expect(fetch.result == .exitToL1(.eptMisconfiguration(GuestPhysicalAddress(0x5000))))
            }
        }
    }

    @Test("L1 changing its EPT with L1 stores: a last-level table goes unsync (stale for L2 until INVEPT, which drops the roots; the reload syncs), an upper-level one is write-tracked")
    func l1ChangesItsEPT() throws {
        let l1 = try booted()
        try l1.enter()
        guard case .completed = try l1.l2(linear, .write, value: 1).result else { Issue.record("first write"); return }
        try l1.vcpu.exitToL1()
        let before = l1.vm.stats
        // L1 takes W away: its store to the last-level table guest_mmu shadows faults in the TDP
        // MMU, whose make_spte unsyncs the shadow page and maps the table writable (no emulation).
        try l1.map(0x5000, to: 0x5000 + L1Hypervisor.l2Offset, rights: 0x5)
        #expect(l1.vm.stats.mmuPTEWrite == before.mmuPTEWrite && l1.vm.stats.mmuUnsync == before.mmuUnsync + 1)
        try l1.enter()
        // No INVEPT yet: the old translation may still be used (SDM 29.4), and KVM's unsync page
        // still maps the page writable. The check accepts it as the tables were at the VM entry.
        let stale = try l1.l2(linear, .write, value: 2)
        guard case .completed = stale.result else { Issue.record("\(stale)"); return }
        #expect(!VCPU.l2OutcomeAgrees(stale, try l1.vcpu.architecturalL2(GuestVirtualAddress(linear), Access(.write, .user)),
                                      memory: l1.vm.memory), "a stale translation")
        try l1.vcpu.exitToL1()
        // INVEPT single-context for the EPTP drops the current root; global drops every root.
        #expect(try l1.vcpu.invalidateEPT(.singleContext(EPTPointer(root: l1.root, levels: 4, accessedDirty: false))))
        #expect(l1.vcpu.guestMMU?.rootsLoaded == false, "the root went")
        try l1.enter()
        guard case .exitToL1(.eptViolation(_, let qualification)) = try l1.l2(linear, .write, value: 3).result else {
            Issue.record("the write went through after L1 took W away and invalidated")
            return
        }
        #expect(qualification.contains(.dataWrite) && qualification.contains(.readable) && !qualification.contains(.writable))
        #expect(l1.vm.stats.mmuUnsync == before.mmuUnsync, "the reloaded root synced the page")
        try l1.enter()
        guard case .completed = try l1.l2(linear, .read).result else { Issue.record("read after INVEPT"); return }
        #expect(l1.vcpu.guestMMU?.rootsLoaded == true, "loaded again for the access")
        try l1.vcpu.exitToL1()
        // Another EPTP's INVEPT leaves this one's root.
        #expect(try !l1.vcpu.invalidateEPT(.singleContext(EPTPointer(root: 0x3F_F000, levels: 4, accessedDirty: false))))
        try l1.enter()
        try l1.vcpu.exitToL1()
        #expect(try l1.vcpu.invalidateEPT(.allContexts))
        #expect(try !l1.vcpu.invalidateEPT(.allContexts), "nothing left")
    }

    @Test("vmexit and vmenter keep guest_mmu's root; another EPTP and back finds it in prev_roots; nested_run and guest_mode")
    func rootsKeptAcrossEntries() throws {
        let l1 = try booted()
        try l1.enter()
        #expect(l1.vm.stats.nestedRun == 1 && l1.vm.stats.guestMode == 1)
        _ = try l1.l2(linear, .read)
        try l1.vcpu.exitToL1()
        #expect(l1.vm.stats.guestMode == 0)
        let misses = l1.vm.stats.mmuCacheMiss
        try l1.enter()
        #expect(try l1.l2(linear, .read).exits == 0, "the same root, still mapped")
        try l1.vcpu.exitToL1()
        // A second EPT hierarchy for another L2 (an empty root: everything violates), then back.
        try l1.store(0, at: 0x3F_F000)
        try l1.vcpu.enterL2(.ept(EPTPointer(root: 0x3F_F000, levels: 4, accessedDirty: false), capabilities: EPTCapabilities()),
                            registers: L1Hypervisor.l2Registers)
        guard case .exitToL1 = try l1.l2(linear, .read).result else { Issue.record("an empty EPT let L2 through"); return }
        try l1.enter()
        #expect(try l1.l2(linear, .read).exits == 0, "the first root came back from prev_roots")
        #expect(l1.vm.stats.nestedRun == 4)
        #expect(l1.vm.stats.mmuCacheMiss == misses + 1, "only the second root's page was new")
    }

    @Test("Bad input: a bad EPTP, entries in the wrong state, L2 under shadow paging")
    func badInput() throws {
        let l1 = try booted()
        #expect(throws: VirtualMachineError.self) {
            try l1.vcpu.enterL2(.ept(EPTPointer(root: l1.root, levels: 3, accessedDirty: false), capabilities: EPTCapabilities()),
                                registers: L1Hypervisor.l2Registers)
        }
        #expect(!l1.vcpu.isInL2)
        #expect(throws: VirtualMachineError.self) { try l1.vcpu.accessL2(GuestVirtualAddress(0), Access(.read, .user)) }
        #expect(throws: VirtualMachineError.self) { try l1.vcpu.exitToL1() }
        try l1.enter()
        #expect(throws: VirtualMachineError.self) { try l1.enter() }
        #expect(throws: VirtualMachineError.self) { try l1.vcpu.invalidateEPT(.allContexts) }
        #expect(throws: VirtualMachineError.self) { try l1.vcpu.enterL2(.npt(nestedCR3: 0), registers: L1Hypervisor.l2Registers) }
        // Capabilities the host's EPT lacks are not L1's to have.
        let noExecuteOnly = try VirtualMachine(memorySize: 16 << 20, mmu: .tdp(.ept(capabilities: EPTCapabilities(executeOnly: false),
                                                                                            guestMaxPhysicalAddressBits: 46)))
        let l1WithoutExecuteOnly = try noExecuteOnly.addVCPU(registers: PagingRegisters())
        #expect(throws: VirtualMachineError.self) {
            try l1WithoutExecuteOnly.enterL2(.ept(EPTPointer(root: 0x20_0000, levels: 4, accessedDirty: false),
                                                  capabilities: EPTCapabilities(executeOnly: true)),
                                             registers: L1Hypervisor.l2Registers)
        }
        #expect(!l1WithoutExecuteOnly.isInL2)
        let shadow = try VirtualMachine(memorySize: 16 << 20)
        let vcpu = try shadow.addVCPU(registers: PagingRegisters())
        #expect(throws: VirtualMachineError.self) {
            try vcpu.enterL2(.ept(EPTPointer(root: 0x20_0000, levels: 4, accessedDirty: false), capabilities: EPTCapabilities()),
                             registers: L1Hypervisor.l2Registers)
        }
    }

    @Test("Hostile L1 EPT: entries naming memory L1 does not have, aliases of L1's own tables")
    func hostileEPT() throws {
        let l1 = try booted()
        // The L2 page at 0x5000 backed by an L1 address beyond L1's memory: KVM emulates it as MMIO.
        try l1.map(0x5000, to: 0x1_0000_0000, rights: 0x7)
        // The L2 page at 0x6000 backed by L1's EPT root itself.
        try l1.map(0x6000, to: l1.root, rights: 0x7)
        try l1.mapL2(0x40_0000, to: 0x6000, flags: 0x7)
        try l1.enter()
        let mmio = try l1.l2(linear, .read)
        guard case .mmio = mmio.result else { Issue.record("\(mmio)"); return }
        // L2 reads and writes L1's EPT root: the write is emulated and tracked.
        _ = try l1.l2(0x40_0000, .read)
        _ = try l1.l2(0x40_0000 | 0x800, .write, value: 0)
    }

    @Test("L1's 2 MiB and 1 GiB EPT leaves, and L2 with its paging off (its linear addresses are its physical ones)")
    func largeEPTLeavesAndL2PagingOff() throws {
        for level in [2, 3] {
            let l1 = try L1Hypervisor()
            // L2's [0, 2 MiB) or [0, 1 GiB) in one leaf at L1 0 (L1's own memory: L2 sees L1's).
            try l1.map(0, to: 0, level: level, rights: 0x7)
            try l1.store(0x1234, at: 0x3008)
            try l1.enter(registers: PagingRegisters())
            let read = try l1.l2(0x3008, .read)
            #expect(read.result == .completed(gpa: GuestPhysicalAddress(0x3008),
                                              hostAddress: l1.vm.memory.hostFrame(of: GuestFrameNumber(3))!.rawValue << 12 | 8,
                                              value: 0x1234), "level \(level)")
            // Beyond L1's 16 MiB inside the 1 GiB leaf: MMIO, as the architecture's walk agrees.
            if level == 3 {
                guard case .mmio = try l1.l2(0x200_0000, .read).result else { Issue.record("beyond memory"); continue }
            }
            // Beyond the leaf: a violation at the final address (no L2 walk: level 0).
            let beyond: UInt64 = level == 2 ? 0x20_0000 : 0x4000_0000
            let exit = try l1.l2(beyond, .write)
            guard case .exitToL1(.eptViolation(let address, _)) = exit.result else { Issue.record("\(exit)"); continue }
            #expect(address.rawValue == beyond && exit.exitGuestLevel == 0)
        }
    }

    @Test("A 4-level L1 NPT on a 5-level NPT host: the passthrough root")
    func passthroughRoot() throws {
        let l1 = try L1Hypervisor(npt: true, nptHostLevels: 5)
        try l1.mapAllL2Memory(rights: 0x7)
        try l1.mapL2(linear, to: 0x5000, flags: 0x7)
        try l1.map(0x6000, to: 0x6000 + L1Hypervisor.l2Offset, rights: 0x5)
        try l1.mapL2(linear + 0x1000, to: 0x6000, flags: 0x7)
        try l1.enter()
        guard case .completed = try l1.l2(linear, .write, value: 5).result else { Issue.record("write"); return }
        let refused = try l1.l2(linear + 0x1000, .write, value: 5)
        guard case .exitToL1(.nestedPageFault(let address, let errorCode)) = refused.result else { Issue.record("\(refused)"); return }
        #expect(address.rawValue == 0x6000 && errorCode.contains(.guestFinal) && errorCode.contains(.write))
        #expect(l1.vm.stats.nestedRun == 1)
    }

    @Test("The VMM's zaps reach guest_mmu's pages too; a memslot deletion zaps them")
    func vmmOperationsWithL2Pages() throws {
        let l1 = try booted()
        try l1.enter()
        _ = try l1.l2(linear | 8, .write, value: 9)
        #expect(l1.vm.mmu.usedPages > 0)
        l1.vm.zapAllFast()
        #expect(l1.vm.audit().isEmpty)
        let again = try l1.l2(linear | 8, .read)
        #expect(again.exits > 0, "the zapped shadow EPT is built again")
        guard case .completed(_, _, 9) = again.result else { Issue.record("\(again)"); return }
        try l1.vcpu.exitToL1()
        try l1.vm.addMemslot(id: 1, base: GuestPhysicalAddress(0x4000_0000), size: 1 << 20)
        try l1.vm.deleteMemslot(id: 1)
        // What is left is guest_mmu's invalid root, freed at the next entry's load (as KVM's
        // obsolete roots are), with nothing under it.
        #expect(l1.vm.mmu.shadowPages.allSatisfy { $0.role.isInvalid }, "\(l1.vm.mmu.shadowPages.map(\.role))")
        #expect(l1.vm.audit().isEmpty)
        try l1.enter()
        guard case .completed(_, _, 9) = try l1.l2(linear | 8, .read).result else { Issue.record("after the deletion"); return }
    }

    @Test("Random L2 tables, random L1 rights and L1 rewrites, in lockstep", arguments: [(false, 4, false), (false, 4, true), (false, 5, true), (true, 4, false)])
    func randomLockstep(npt: Bool, levels: Int, ad: Bool) throws {
        var counts: [String: Int] = [:]
        for seed in 0..<3 {
            var random = SeededGenerator(seed: UInt64(seed) &* 0x9E37 &+ UInt64(levels) &+ (ad ? 7 : 0) &+ (npt ? 99 : 0))
            let l1 = try L1Hypervisor(npt: npt, levels: levels)
            l1.ad = ad
            let eptRights: [UInt64] = [7, 7, 7, 7, 7, 7, 5, 3, 1, 0, 4, 2]
            let nptRights: [UInt64] = [0x7, 0x7, 0x7, 0x7, 0x27, 0x67, 0x5, 0x3, 0x0, 0x7 | 1 << 63]
            func rights() -> UInt64 { npt ? nptRights[random.below(nptRights.count)] : eptRights[random.below(eptRights.count)] }
            for page in 0..<512 {
                let gpa = UInt64(page) << 12
                // L2's tables (from 1 MiB) mostly fully accessible, so that walks reach the pages.
                let full: UInt64 = npt ? 0x7 : 7
                try l1.map(gpa, to: gpa + L1Hypervisor.l2Offset, rights: page >= 256 && random.below(4) != 0 ? full : rights())
            }
            var linears: [UInt64] = []
            for _ in 0..<20 {
                let linear = UInt64(random.below(4)) << 39 | UInt64(random.below(2)) << 30 | UInt64(random.below(2)) << 21
                    | UInt64(random.below(16)) << 12
                let flags: UInt64 = [0x7, 0x7, 0x5, 0x3, 0x0][random.below(5)] | (random.below(4) == 0 ? 1 << 63 : 0)
                    | (random.below(2) == 0 ? 0x60 : 0)
                try l1.mapL2(linear, to: UInt64(random.below(256)) << 12, flags: flags)
                linears.append(linear)
            }
            try l1.enter()
            for step in 0..<150 {
                if !l1.vcpu.isInL2 || random.below(25) == 0 {
                    if l1.vcpu.isInL2 { try l1.vcpu.exitToL1() }
                    // L1 handles the exit: new rights for a random page, sometimes INVEPT.
                    let page = UInt64(random.below(512)) << 12
                    try l1.map(page, to: page + L1Hypervisor.l2Offset, rights: rights())
                    if !npt && random.below(3) == 0 { try l1.vcpu.invalidateEPT(.allContexts) }
                    try l1.enter()
                }
                let linear = linears[random.below(linears.count)] | UInt64(random.below(512) * 8)
                let kind = AccessKind.allCases[random.below(3)]
                let outcome = try l1.l2(linear, kind, random.below(2) == 0 ? .user : .supervisor, value: UInt64(step))
                switch outcome.result {
                case .completed: counts["completed", default: 0] += 1
                case .pageFault: counts["l2 fault", default: 0] += 1
                case .exitToL1: counts[outcome.exitGuestLevel == 0 ? "exit on the page" : "exit on a table", default: 0] += 1
                default: counts["other", default: 0] += 1
                }
            }
        }
        for outcome in ["completed", "l2 fault", "exit on the page", "exit on a table"] {
            #expect(counts[outcome, default: 0] > 0, "no \(outcome) in \(counts)")
        }
    }
}
