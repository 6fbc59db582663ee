import Foundation
import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import X86Paging

/// KVM_PRE_FAULT_MEMORY (`VCPU.preFaultMemory`): the range mapped as KVM's prefetch faults map
/// it, the ioctl's partial-progress and error rules, and a memslot deletion racing it.
@Suite struct PreFaultMemoryTests {
    static let memorySize: UInt64 = 64 << 20

    static func machine(_ mmu: VirtualMachineMMU = .ept()) throws -> (VirtualMachine, VCPU) {
        let vm = try VirtualMachine(memorySize: memorySize, mmu: mmu)
        try ConcurrentVCPUStressTests.buildIdentityMap(vm.memory)
        let vcpu = try vm.addVCPU(registers: PagingRegisters(
            cr0: [.protectionEnable, .writeProtect, .paging], cr3: 0x1000, cr4: [.physicalAddressExtension],
            efer: [.noExecuteEnable, .longModeEnable, .longModeActive]))
        return (vm, vcpu)
    }

    /// The leaf mapping `gfn` in the valid root, and its level; nil without one (a memslot
    /// deletion invalidated every root).
    static func leaf(_ vm: VirtualMachine, _ gfn: UInt64) throws -> TDPMapping? {
        let tdp = try #require(vm.tdp)
        guard let root = tdp.roots.first(where: { !$0.isInvalid }) else { return nil }
        return tdp.mapping(of: gfn, in: root).flatMap { $0.spte.isShadowPresent ? $0 : nil }
    }

    @Test(arguments: ["ept", "npt"])
    func mapsHugeWhereTheSlotAllowsWithoutAccessedBits(mmu: String) throws {
        let (vm, vcpu) = try Self.machine(mmu == "ept" ? .ept() : .npt())
        let tdp = try #require(vm.tdp)
        // The guest's page tables first (the first 2 MiB), so that its first touch below needs
        // no exit for them.
        var tables = PreFaultRange(gpa: GuestPhysicalAddress(0), size: 0x1000)
        try vcpu.preFaultMemory(&tables)
        #expect(tables == PreFaultRange(gpa: GuestPhysicalAddress(0x1000), size: 0), "a 4 KiB range, done")
        // From the middle of a 2 MiB page: its huge leaf covers more than asked for.
        var range = PreFaultRange(gpa: GuestPhysicalAddress(0x30_0000), size: 0x50_0000)
        let fixed = tdp.stats.pfFixed, taken = tdp.stats.pfTaken
        try vcpu.preFaultMemory(&range)
        #expect(range == PreFaultRange(gpa: GuestPhysicalAddress(0x80_0000), size: 0))
        for gfn: UInt64 in [0x200, 0x300, 0x400, 0x600, 0x7ff] {
            let leaf = try #require(try Self.leaf(vm, gfn), "gfn \(hex(gfn))")
            #expect(leaf.level == 2 && !leaf.spte.isAccessed(tdp.masks), "\(leaf.spte.describe(tdp.masks))")
        }
        #expect(try Self.leaf(vm, 0x800) == nil, "nothing past the range's last huge page")
        #expect(tdp.stats.pfFixed == fixed + 3 && tdp.stats.pfTaken == taken, "three fixed prefetches, none taken")
        // The guest's first touch needs no exit; the hardware sets A.
        let outcome = try vcpu.access(GuestVirtualAddress(0x40_1000), .write(.supervisor), size: 8, value: 7)
        #expect(outcome.exits == 0, "\(outcome)")
        #expect(try #require(try Self.leaf(vm, 0x401)).spte.isAccessed(tdp.masks))
        #expect(tdp.audit().isEmpty)
    }

    @Test func aPresentSPTEIsLeftAloneAndCountsNothing() throws {
        let (vm, vcpu) = try Self.machine()
        let tdp = try #require(vm.tdp)
        _ = try vcpu.access(GuestVirtualAddress(0x20_0000), .read(.supervisor), size: 8)
        let before = try #require(try Self.leaf(vm, 0x200)).spte
        #expect(before.isAccessed(tdp.masks))
        let stats = tdp.stats
        var range = PreFaultRange(gpa: GuestPhysicalAddress(0x20_0000), size: 0x1000)
        try vcpu.preFaultMemory(&range)
        #expect(range.size == 0)
        #expect(try #require(try Self.leaf(vm, 0x200)).spte == before)
        #expect(tdp.stats.pfFixed == stats.pfFixed && tdp.stats.pfSpurious == stats.pfSpurious)
    }

    @Test func aDirtyLoggingSlotGetsWritable4KLeavesMarkedDirty() throws {
        let (vm, vcpu) = try Self.machine()
        try vm.setDirtyLogging(slot: 0, true)
        _ = try vm.getDirtyLog(slot: 0)
        var range = PreFaultRange(gpa: GuestPhysicalAddress(0x20_0000), size: 0x3000)
        try vcpu.preFaultMemory(&range)
        for gfn: UInt64 in 0x200..<0x203 {
            let leaf = try #require(try Self.leaf(vm, gfn))
            #expect(leaf.level == 1 && leaf.spte.isWritable)
        }
        #expect(try vm.getDirtyLog(slot: 0).map(\.rawValue) == [0x200, 0x201, 0x202],
                "KVM marks a gfn dirty when it maps it writable")
    }

    @Test func stopsAtTheFirstPageWithoutAMemslot() throws {
        let (vm, vcpu) = try Self.machine()
        defer { withExtendedLifetime(vm) {} }
        // The last 8 KiB of guest memory and 8 KiB beyond it.
        var range = PreFaultRange(gpa: GuestPhysicalAddress(Self.memorySize - 0x2000), size: 0x4000)
        try vcpu.preFaultMemory(&range)
        #expect(range == PreFaultRange(gpa: GuestPhysicalAddress(Self.memorySize), size: 0x2000), "partial progress is success")
        #expect(throws: PreFaultError.noMemslot(GuestPhysicalAddress(Self.memorySize))) { try vcpu.preFaultMemory(&range) }
        #expect(range.size == 0x2000, "nothing mapped: the range is unchanged")
    }

    @Test func refusesWhatKVMRefuses() throws {
        let (vm, vcpu) = try Self.machine()
        defer { withExtendedLifetime(vm) {} }
        for bad in [PreFaultRange(gpa: GuestPhysicalAddress(0x1000), size: 0x1000, flags: 1),
                    PreFaultRange(gpa: GuestPhysicalAddress(0x1800), size: 0x1000),
                    PreFaultRange(gpa: GuestPhysicalAddress(0x1000), size: 0x800),
                    PreFaultRange(gpa: GuestPhysicalAddress(0x1000), size: 0),
                    PreFaultRange(gpa: GuestPhysicalAddress(~UInt64(0xFFF)), size: 0x2000)] {
            var range = bad
            #expect(throws: PreFaultError.self) { try vcpu.preFaultMemory(&range) }
            #expect(range == bad)
        }
        let (shadowVM, shadowVCPU) = try Self.machine(.shadow)
        var range = PreFaultRange(gpa: GuestPhysicalAddress(0x1000), size: 0x1000)
        #expect(throws: PreFaultError.self) { try shadowVCPU.preFaultMemory(&range) }
        withExtendedLifetime(shadowVM) {}
    }

    /// The 6.18 deadlock's test: a memslot deleted (and added back) while the range is prefaulted.
    /// Here the prefault holds the memslots' srcu for its whole call, so the deletion waits for it
    /// and both finish: the range is either all mapped before the deletion (then zapped by it) or
    /// stops at the missing slot; never a hang, never an SPTE left for a deleted slot.
    @Test func aMemslotDeletionRacingAPrefaultCompletes() throws {
        for round in 0..<20 {
            let (vm, vcpu) = try Self.machine()
            _ = try vm.addMemslot(id: 1, base: GuestPhysicalAddress(0x1_0000_0000), size: 16 << 20)
            let deleted = DispatchSemaphore(value: 0)
            DispatchQueue.global().async {
                if round % 2 == 0 { usleep(UInt32(round * 20)) }
                try? vm.deleteMemslot(id: 1)
                deleted.signal()
            }
            var range = PreFaultRange(gpa: GuestPhysicalAddress(0x1_0000_0000), size: 16 << 20)
            var failure: PreFaultError?
            do { try vcpu.preFaultMemory(&range) } catch { failure = error }
            deleted.wait()
            if let failure { #expect(failure == .noMemslot(GuestPhysicalAddress(0x1_0000_0000))) } else { #expect(range.size == 0) }
            for gfn in stride(from: UInt64(0x10_0000), to: 0x10_1000, by: 0x200) {
                #expect(try Self.leaf(vm, gfn) == nil, "round \(round): gfn \(hex(gfn)) still mapped after its slot went")
            }
            #expect(try #require(vm.tdp).audit().isEmpty)
        }
    }
}
