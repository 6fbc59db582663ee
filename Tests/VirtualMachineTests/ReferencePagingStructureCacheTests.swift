import GuestMemory
import Testing
import VirtualMachine
import X86Paging

/// The lockstep reference with paging-structure caches (SDM 4.10.3): a page directory entry the
/// guest rewrote without invalidating may still be used through its older value, for pages no TLB
/// entry held, until an invalidation drops the PCID's caches; without them, only the fresh walk.
@Suite struct ReferencePagingStructureCacheTests {
    /// A 4-level guest: VA 0x400000 through PD[2] -> table A (pages 0x100000 + i * 4 KiB), table B
    /// ready beside it (pages 0x200000 + ...); A[2] maps the page directory itself at 0x402000 so
    /// the guest can rewrite PD[2] with a store. A[10] is not present, B[10] is.
    private struct Guest {
        let vm: VirtualMachine
        let reference: ReferenceMachine
        static let root: UInt64 = 0x10000, pdpt: UInt64 = 0x11000, directory: UInt64 = 0x12000
        static let tableA: UInt64 = 0x13000, tableB: UInt64 = 0x14000
        static let table: UInt64 = 0x27, page: UInt64 = 0x67  // P RW US A (D for pages)

        init(cachesPagingStructures: Bool) throws {
            vm = try VirtualMachine(memorySize: 64 << 20, mmu: .ept())
            let memory = vm.memory
            try memory.store64(Self.pdpt | Self.table, at: GuestPhysicalAddress(Self.root))
            try memory.store64(Self.directory | Self.table, at: GuestPhysicalAddress(Self.pdpt))
            try memory.store64(Self.tableA | Self.table, at: GuestPhysicalAddress(Self.directory + 2 * 8))
            for index in UInt64(0)..<16 where index != 10 {
                try memory.store64((0x100 + index) << 12 | Self.page, at: GuestPhysicalAddress(Self.tableA + index * 8))
            }
            try memory.store64(Self.directory | Self.page, at: GuestPhysicalAddress(Self.tableA + 2 * 8))
            for index in UInt64(0)..<16 {
                try memory.store64((0x200 + index) << 12 | Self.page, at: GuestPhysicalAddress(Self.tableB + index * 8))
            }
            let registers = PagingRegisters(cr0: [.protectionEnable, .paging, .writeProtect], cr3: Self.root,
                                            cr4: [.physicalAddressExtension], efer: [.longModeEnable, .longModeActive, .noExecuteEnable])
            reference = try ReferenceMachine(memory: memory, registers: registers)
            reference.cachesPagingStructures = cachesPagingStructures
        }

        /// Whether the reference accepts `actual` for a user access to `address`.
        func accepts(_ address: UInt64, _ actual: AccessResult, kind: AccessKind = .read, value: UInt64 = 0) -> Bool {
            let access = Access(kind, .user)
            let expected = reference.expect(GuestVirtualAddress(address), access)
            if kind == .write, case .completed(let gpa, _) = actual {
                try? vm.memory.store64(value, at: gpa)
            }
            return (try? reference.check(GuestVirtualAddress(address), access, size: 8, value: value, expected: expected,
                                         actual: actual)) != nil
        }

        func completed(_ gpa: UInt64) -> AccessResult { .completed(gpa: GuestPhysicalAddress(gpa), value: 0) }

        /// The guest walks through PD[2], then points it at table B with a store.
        func repointDirectoryEntry() {
            #expect(accepts(0x400000, completed(0x100000)))
            #expect(accepts(0x402010, completed(Self.directory + 2 * 8), kind: .write, value: Self.tableB | Self.table))
        }
    }

    @Test func aRewrittenDirectoryEntryMayStillBeUsedUntilAnInvalidation() throws {
        let guest = try Guest(cachesPagingStructures: true)
        guest.repointDirectoryEntry()
        // Page 9 was never used nor cached speculatively (it is outside the group of eight).
        #expect(guest.accepts(0x409000, guest.completed(0x209000)), "the fresh walk")
        #expect(guest.accepts(0x409000, guest.completed(0x109000)), "the cached directory entry")
        #expect(!guest.accepts(0x409000, guest.completed(0x309000)), "neither")
        // Through the cached entry, A[10] is not present: a not-present #PF is allowed too.
        #expect(guest.accepts(0x40a000, .pageFault(errorCode: [.user], cr2: GuestVirtualAddress(0x40a000))))
        // INVLPG of any address drops the PCID's paging-structure caches.
        guest.reference.invalidatePage(GuestVirtualAddress(0x7000_0000))
        #expect(!guest.accepts(0x40b000, guest.completed(0x10b000)), "after INVLPG")
        #expect(guest.accepts(0x40b000, guest.completed(0x20b000)))
    }

    @Test func aFlushingCR3LoadOrINVPCIDDropsTheCachedEntries() throws {
        for invalidate in [{ (reference: ReferenceMachine) in reference.reloadCR3() },
                           { $0.invalidatePCID(.singleContext, pcid: 0, address: GuestVirtualAddress(0)) },
                           { $0.invalidatePCID(.individualAddress, pcid: 0, address: GuestVirtualAddress(0x7000_0000)) }] {
            let guest = try Guest(cachesPagingStructures: true)
            guest.repointDirectoryEntry()
            invalidate(guest.reference)
            #expect(!guest.accepts(0x409000, guest.completed(0x109000)))
        }
    }

    @Test func withoutPagingStructureCachesOnlyTheFreshWalkCounts() throws {
        let guest = try Guest(cachesPagingStructures: false)
        guest.repointDirectoryEntry()
        #expect(!guest.accepts(0x409000, guest.completed(0x109000)))
        #expect(!guest.accepts(0x40a000, .pageFault(errorCode: [.user], cr2: GuestVirtualAddress(0x40a000))))
        #expect(guest.accepts(0x409000, guest.completed(0x209000)))
    }
}
