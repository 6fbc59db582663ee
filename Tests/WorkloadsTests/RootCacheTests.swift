import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// KVM's root cache (`prev_roots`, `fast_pgd_switch`), PCIDs and INVPCID, special, passthrough and
/// dummy roots, and unsync pages synced on a CR3 load: driven through the library with real guest
/// tables, each access's outcome checked.
@Suite struct RootCacheTests {
    /// A 4-level guest with user pages at 0x400000..0x407000 in its first space, and further
    /// spaces that are copies of its root table (sharing every lower table), so each has its own
    /// CR3 and KVM its own root page.
    struct Machine {
        let vm: VirtualMachine
        let kernel: GuestKernel
        let vcpu: VCPU
        /// The root tables: index 0 is the kernel's.
        let spaces: [UInt64]
    }

    static let extraRootBase: UInt64 = 0xF0_0000

    func machine(spaces count: Int = 5, mode: PagingMode = .fourLevel, hostLevels: Int? = nil,
                 pcid: Bool = false) throws -> Machine {
        let vm = try VirtualMachine(memorySize: 64 << 20, hostLevels: hostLevels)
        let kernel = try GuestKernel(vm: vm, mode: mode)
        for page in 0..<8 as Range<UInt64> {
            try kernel.map(GuestVirtualAddress(0x40_0000 + page << 12), to: GuestPhysicalAddress(0x100_0000 + page << 12),
                           leafLevel: 1, leafFlags: 0x67, tableFlags: { _ in 0x7 })
        }
        var spaces = [kernel.root.rawValue]
        for index in 1..<count {
            let root = Self.extraRootBase + UInt64(index) << 12
            for offset in stride(from: UInt64(0), to: 4096, by: 8) {
                try vm.memory.store64(try vm.memory.load64(GuestPhysicalAddress(kernel.root.rawValue + offset)),
                                      at: GuestPhysicalAddress(root + offset))
            }
            spaces.append(root)
        }
        var state = ControlState.defaults
        state.pagingMode = mode
        var registers = state.registers(cr3: kernel.root.rawValue)
        if pcid { registers.cr4.insert(.pcidEnable) }
        let vcpu = try vm.addVCPU(registers: registers)
        return Machine(vm: vm, kernel: kernel, vcpu: vcpu, spaces: spaces)
    }

    func read(_ m: Machine, _ address: UInt64) throws -> AccessOutcome {
        let outcome = try m.vcpu.access(GuestVirtualAddress(address), .read(.user), size: 8)
        guard case .completed(let gpa, _) = outcome.result else {
            Issue.record("read of \(hex(address)): \(outcome.result)")
            return outcome
        }
        #expect(gpa.rawValue == 0x100_0000 + (address - 0x40_0000))
        return outcome
    }

    @Test func switchingBackToACachedRootReusesIt() throws {
        let m = try machine()
        _ = try read(m, 0x40_0000)
        let rootA = try #require(m.vcpu.context.root)
        try m.vcpu.loadCR3(m.spaces[1])
        _ = try read(m, 0x40_0000)
        let rootB = try #require(m.vcpu.context.root)
        #expect(rootA !== rootB)
        let pagesBefore = m.vm.mmu.stats.mmuCacheMiss
        let hitsBefore = m.vcpu.context.rootCacheHits
        try m.vcpu.loadCR3(m.spaces[0])
        #expect(m.vcpu.context.rootCacheHits == hitsBefore + 1)
        #expect(m.vcpu.context.root === rootA)
        #expect(m.vcpu.context.previousRoots.first??.page === rootB)
        // The root's SPTEs are still there: the access walks them without an exit (the CR3 load
        // without PCIDs flushed the TLB).
        let again = try read(m, 0x40_0000)
        #expect(again.exits == 0 && !again.tlbHit)
        #expect(m.vm.mmu.stats.mmuCacheMiss == pagesBefore)
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func theCacheKeepsThreeRootsMostRecentFirst() throws {
        let m = try machine()
        var roots: [ShadowPage] = []
        for space in m.spaces {
            try m.vcpu.loadCR3(space)
            _ = try read(m, 0x40_0000)
            roots.append(try #require(m.vcpu.context.root))
        }
        // Current: space 4; cached: 3, 2, 1; space 0's root fell off the end and was freed.
        #expect(m.vcpu.context.previousRoots.map { $0?.pgd } == [m.spaces[3], m.spaces[2], m.spaces[1]])
        #expect(roots[0].rootCount == 0)
        #expect(roots[1...].allSatisfy { $0.rootCount == 1 })
        // Loading space 2 takes it from the middle: C 0 1 2 -> ... the current moves to the front.
        try m.vcpu.loadCR3(m.spaces[2])
        #expect(m.vcpu.context.root === roots[2])
        #expect(m.vcpu.context.previousRoots.map { $0?.pgd } == [m.spaces[4], m.spaces[3], m.spaces[1]])
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func pcidNoFlushKeepsTheTLBAndAFlushingLoadDoesNot() throws {
        let m = try machine(pcid: true)
        // Both roots built first: building a root flushes the TLB (kvm_mmu_load).
        try m.vcpu.loadCR3(m.spaces[0] | 1)
        _ = try read(m, 0x40_0000)
        try m.vcpu.loadCR3(m.spaces[1] | 2)
        _ = try read(m, 0x40_0000)
        try m.vcpu.loadCR3(m.spaces[0] | 1, noFlush: true)
        #expect(m.vcpu.context.rootCacheHits >= 1)
        _ = try read(m, 0x40_0000)
        #expect(try read(m, 0x40_0000).tlbHit)
        try m.vcpu.loadCR3(m.spaces[1] | 2, noFlush: true)
        #expect(try read(m, 0x40_0000).tlbHit)
        try m.vcpu.loadCR3(m.spaces[0] | 1, noFlush: true)
        // Back on PCID 1 without a flush: the translation cached under its root is used.
        #expect(try read(m, 0x40_0000).tlbHit)
        try m.vcpu.loadCR3(m.spaces[1] | 2)
        try m.vcpu.loadCR3(m.spaces[0] | 1)
        #expect(try !read(m, 0x40_0000).tlbHit)
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func aFlushingLoadFreesTheCachedRootsOfItsPCID() throws {
        let m = try machine(pcid: true)
        // The same tables under two PCIDs are two cache entries (KVM's pgd has the PCID bits).
        try m.vcpu.loadCR3(m.spaces[0] | 1)
        _ = try read(m, 0x40_0000)
        try m.vcpu.loadCR3(m.spaces[1] | 2, noFlush: true)
        _ = try read(m, 0x40_0000)
        try m.vcpu.loadCR3(m.spaces[2] | 3, noFlush: true)
        _ = try read(m, 0x40_0000)
        #expect(m.vcpu.context.previousRoots.compactMap { $0?.pgd } == [m.spaces[1] | 2, m.spaces[0] | 1])
        // kvm_invalidate_pcid(1) from INVPCID single-context: the cached root of PCID 1 goes.
        #expect(m.vcpu.invalidatePCID(.singleContext, pcid: 1, address: GuestVirtualAddress(0)))
        #expect(m.vcpu.context.previousRoots.compactMap { $0?.pgd } == [m.spaces[1] | 2])
        // A non-zero PCID above 4095 is #GP, as is a non-canonical individual address.
        #expect(!m.vcpu.invalidatePCID(.singleContext, pcid: 4096, address: GuestVirtualAddress(0)))
        #expect(!m.vcpu.invalidatePCID(.individualAddress, pcid: 2, address: GuestVirtualAddress(0x8000_0000_0000)))
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func aCR3LoadSyncsUnsyncPagesFromTheGuestEntries() throws {
        let m = try machine()
        _ = try read(m, 0x40_1000)
        let pt = try #require(m.vm.mmu.shadowPages.first { $0.level == 1 && $0.role.hasGPTEs })
        // The kernel remaps 0x401000 to 0x1005000 through its window: the PT's shadow page goes
        // unsync and the store is not emulated.
        let entry = try #require(try m.kernel.entryAddress(GuestVirtualAddress(0x40_1000), level: 1))
        let store = try m.vcpu.access(m.kernel.windowAddress(entry), .write(.supervisor), size: 8, value: 0x100_5067)
        #expect(!store.emulated && pt.unsync && m.vm.mmu.stats.mmuUnsync == 1)
        // MOV CR3 of the same value: KVM_REQ_MMU_SYNC brings the shadow PTE up to date.
        try m.vcpu.loadCR3(m.spaces[0])
        #expect(!pt.unsync && m.vm.mmu.stats.mmuUnsync == 0)
        let after = try m.vcpu.access(GuestVirtualAddress(0x40_1000), .read(.user), size: 8)
        #expect(after.result == .completed(gpa: GuestPhysicalAddress(0x100_5000), value: 0))
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test(arguments: [PagingMode.legacy32, .pae, .fourLevel])
    func guestsShallowerThanTheHostUseSpecialOrPassthroughRoots(mode: PagingMode) throws {
        for hostLevels in [4, 5] {
            let m = try machine(spaces: 2, mode: mode, hostLevels: hostLevels)
            _ = try read(m, 0x40_0000)
            _ = try read(m, 0x40_7000)
            let kernelWindow = m.kernel.windowAddress(GuestPhysicalAddress(0x10_0000))
            let window = try m.vcpu.access(kernelWindow, .read(.supervisor), size: 8)
            #expect(window.result != .generalProtection)
            let context = m.vcpu.context
            #expect(context.rootRole.level == hostLevels)
            if mode == .fourLevel {
                let root = try #require(context.root)
                #expect(root.level == hostLevels)
                #expect(root.role.isPassthrough == (hostLevels == 5))
                if hostLevels == 5 {
                    // Lower and upper halves lead to the same level-4 page, which shadows CR3's table.
                    let low = SPTE(rawValue: root.spte(0).pointee)
                    let high = SPTE(rawValue: root.spte(511).pointee)
                    #expect(low.isShadowPresent && low.pfn == high.pfn)
                    #expect(!m.vm.mmu.shadowPages.contains { $0.role.isPassthrough && $0.role.hasGPTEs })
                }
            } else {
                // KVM's special roots: no shadow page for the root, four level-2 roots behind it.
                #expect(context.root == nil)
                #expect(context.paeRoots.contains { $0 != nil })
            }
            // Switching CR3 frees special roots (never cached) and caches real ones.
            try m.vcpu.loadCR3(m.spaces[1])
            _ = try read(m, 0x40_0000)
            #expect(context.previousRoots.compactMap { $0 }.count == (mode == .fourLevel ? 1 : 0))
            #expect(m.vm.mmu.audit().isEmpty)
        }
    }

    @Test func aRootTableOutsideMemoryUsesTheDummyRoot() throws {
        let m = try machine()
        try m.vcpu.loadCR3(0x800_0000)  // 128 MiB: beyond the 64 MiB of guest memory
        let outcome = try m.vcpu.access(GuestVirtualAddress(0x40_0000), .read(.user), size: 8)
        #expect(m.vcpu.context.usesDummyRoot)
        guard case .pageFault(let code, _) = outcome.result else {
            Issue.record("\(outcome.result)")
            return
        }
        #expect(code == [.user])
        // KVM's walk error path: W and U from the access, I/D for a fetch when EFER.NX (set
        // here) or CR4.SMEP is.
        for (access, expected) in [(Access.write(.user), PageFaultErrorCode([.write, .user])),
                                   (.fetch(.user), [.user, .fetch]), (.fetch(.supervisor), [.fetch])] {
            let result = try m.vcpu.access(GuestVirtualAddress(0x40_0000), access, size: 8).result
            #expect(result == .pageFault(errorCode: expected, cr2: GuestVirtualAddress(0x40_0000)), "\(access)")
        }
        try m.vcpu.loadCR3(m.spaces[0])
        _ = try read(m, 0x40_0000)
        #expect(!m.vcpu.context.usesDummyRoot)
        #expect(m.vm.mmu.audit().isEmpty)
    }

    @Test func aFiveLevelGuestNeedsAFiveLevelHost() throws {
        #expect(throws: VirtualMachineError.self) { try machine(mode: .fiveLevel, hostLevels: 4) }
    }
}
