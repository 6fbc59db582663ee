// Sub-page write protection wired into a VM under the TDP MMU (EPT): the processor's check on every
// write, the TLB, the SPP table built on misses, KVM's fault path, the emulator, the interactions
// docs/SPP.md decides (huge pages, dirty logging, zaps, memslot moves and deletes), and the `spp`
// directives. Every outcome is compared with a byte-by-byte restatement of the rule written here.

import Foundation
import Synchronization
import Testing
import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// The rule, restated as plainly as it can be: a write goes through when every byte it writes lies
/// in a writable 128-byte sub-page of its page.
private func ruleAllows(_ mask: UInt32, offset: Int, size: Int) -> Bool {
    for byte in offset..<offset + size where mask & (1 << UInt32(byte / 128)) == 0 { return false }
    return true
}

/// A VM under the TDP MMU with EPT and SPP enabled, and one vCPU with paging off (so a guest
/// virtual address is the guest-physical address: every access reaches SPP as it is).
private struct SPPMachine {
    let vm: VirtualMachine
    let vcpu: VCPU
    var tdp: TDPMMU { vm.tdp! }
    var protection: SubPageProtection { vm.subPageProtection! }

    init(memory: UInt64 = 64 << 20) throws {
        vm = try VirtualMachine(memorySize: memory, mmu: .ept())
        try vm.enableSubPageProtection()
        vcpu = try vm.addVCPU(registers: PagingRegisters(cr0: [.protectionEnable]))
    }

    @discardableResult
    func write(_ gpa: UInt64, size: Int = 8, value: UInt64 = 0x1122_3344_5566_7788) throws -> AccessOutcome {
        try vcpu.access(GuestVirtualAddress(gpa), Access(.write, .supervisor), size: size, value: value)
    }

    func set(_ gfn: UInt64, _ mask: UInt32) throws {
        try vm.setSubpageAccess(gfn: GuestFrameNumber(gfn), masks: [SubPageWriteMask(mask)])
    }

    func byte(_ gpa: UInt64) throws -> UInt8 {
        var value: UInt8 = 0
        try withUnsafeMutableBytes(of: &value) { try vm.memory.read(GuestPhysicalAddress(gpa), into: $0) }
        return value
    }

    func fill(_ gpa: UInt64, count: Int, with byte: UInt8) throws {
        let bytes = [UInt8](repeating: byte, count: count)
        try bytes.withUnsafeBytes { try vm.memory.write(GuestPhysicalAddress(gpa), from: $0) }
    }

    /// The leaf EPT entry mapping `gfn` in the vCPU's root, and its level.
    func leaf(_ gfn: UInt64) -> TDPMapping? {
        guard let root = tdp.roots.first(where: { !$0.isInvalid }) else { return nil }
        return tdp.mapping(of: gfn, in: root)
    }

    func expectAuditClean(sourceLocation: SourceLocation = #_sourceLocation) {
        let problems = vm.audit()
        #expect(problems.isEmpty, "\(problems)", sourceLocation: sourceLocation)
    }
}

/// Whether `outcome` is what the rule says for a write of `size` bytes at `gpa` under `mask`.
private func matchesRule(_ outcome: AccessOutcome, gpa: UInt64, size: Int, mask: UInt32) -> Bool {
    if ruleAllows(mask, offset: Int(gpa & 0xFFF), size: size) {
        return outcome.result == .completed(gpa: GuestPhysicalAddress(gpa), value: outcome.valueWritten)
    }
    return outcome.result == .subPageWriteExit(gpa: GuestPhysicalAddress(gpa))
}

extension AccessOutcome {
    fileprivate var valueWritten: UInt64 {
        if case .completed(_, let value) = result { return value }
        return 0
    }
}

@Suite("SPP under the TDP MMU: the processor's check")
struct SPPHardwareTests {
    static let page: UInt64 = 0x200_0000

    /// Sub-page i alone protected, for every i: the first and the last byte of sub-page i are
    /// refused, the bytes just outside it go through, and a write across either of its edges is
    /// refused. A refused write leaves memory as it was.
    @Test func everySubPageAndBothEdges() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        for subPage in 0..<32 {
            let mask = ~(UInt32(1) << UInt32(subPage))
            try machine.set(gfn, mask)
            try machine.fill(Self.page, count: 4096, with: 0xAA)
            let first = Self.page + UInt64(subPage * 128)
            var writes: [(UInt64, Int)] = [(first, 1), (first + 127, 1), (first, 8), (first + 120, 8)]
            if subPage > 0 { writes += [(first - 1, 1), (first - 4, 8), (first - 2, 4)] }
            if subPage < 31 { writes += [(first + 128, 1), (first + 124, 8), (first + 126, 2)] }
            for (gpa, size) in writes {
                let outcome = try machine.write(gpa, size: size, value: 0x55)
                #expect(matchesRule(outcome, gpa: gpa, size: size, mask: mask), "sub-page \(subPage): \(size) bytes at \(hex(gpa)): \(outcome.result)")
                if case .subPageWriteExit = outcome.result {
                    #expect(try machine.byte(gpa) == 0xAA, "a refused write changed memory at \(hex(gpa))")
                } else {
                    #expect(try machine.byte(gpa) == 0x55)
                    try machine.fill(gpa, count: size, with: 0xAA)
                }
            }
        }
        machine.expectAuditClean()
    }

    /// Random bitmaps on eight pages, random writes of 1, 2, 4 and 8 bytes anywhere in them
    /// (aligned or not, across sub-pages or not), permissions changed as the writes go: every
    /// outcome and every byte of memory as the plain rule says.
    @Test(arguments: [1, 2, 3, 4] as [UInt64])
    func randomBitmapsAndWritesInLockstep(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let machine = try SPPMachine()
        let firstGFN = Self.page >> 12
        var masks = [UInt32](repeating: UInt32.max, count: 8)
        var memory = [UInt8](repeating: 0, count: 8 * 4096)
        try machine.fill(Self.page, count: memory.count, with: 0)
        for step in 0..<600 {
            if rng.chance(8) {
                let page = Int.random(in: 0..<8, using: &rng)
                // Sparse, dense and random bitmaps, all-writable among them.
                let choice = Int.random(in: 0..<4, using: &rng)
                masks[page] = choice == 0 ? UInt32.max : choice == 1 ? UInt32.random(in: 0...UInt32.max, using: &rng)
                    : choice == 2 ? ~(UInt32(1) << UInt32.random(in: 0..<32, using: &rng)) : 0
                try machine.set(firstGFN + UInt64(page), masks[page])
            }
            let size = [1, 2, 4, 8].randomElement(using: &rng)!
            let page = Int.random(in: 0..<8, using: &rng)
            let offset = Int.random(in: 0...(4096 - size), using: &rng)
            let value = rng.next()
            let gpa = Self.page + UInt64(page * 4096 + offset)
            let outcome = try machine.write(gpa, size: size, value: value)
            #expect(matchesRule(outcome, gpa: gpa, size: size, mask: masks[page]),
                    "seed \(seed) step \(step): \(size) bytes at \(hex(gpa)) under \(hex(masks[page])): \(outcome.result)")
            if ruleAllows(masks[page], offset: offset, size: size) {
                for index in 0..<size { memory[page * 4096 + offset + index] = UInt8(truncatingIfNeeded: value >> UInt64(8 * index)) }
            }
            if step % 50 == 0 {
                for index in stride(from: 0, to: memory.count, by: 61) {
                    #expect(try machine.byte(Self.page + UInt64(index)) == memory[index], "seed \(seed) byte \(index)")
                }
                machine.expectAuditClean()
            }
        }
        var all = [UInt8](repeating: 0, count: memory.count)
        try all.withUnsafeMutableBytes { try machine.vm.memory.read(GuestPhysicalAddress(Self.page), into: $0) }
        #expect(all == memory, "seed \(seed): memory differs from what the rule allows")
    }

    /// A write across a 4 KiB boundary is two accesses, each checked against its own page's
    /// bitmap: the refused part exits and leaves its page alone, the other part is written.
    @Test func writesAcrossAPageBoundaryAreTwoAccesses() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        try machine.set(gfn, 0x7FFF_FFFF)          // the first page's last sub-page refused
        try machine.set(gfn + 1, UInt32.max)
        for (offset, size) in [(4092, 8), (4094, 4), (4095, 2)] as [(UInt64, UInt64)] {
            try machine.fill(Self.page, count: 8192, with: 0)
            let write = try PageSplitWrite(address: GuestPhysicalAddress(Self.page + offset), byteCount: size)
            let pieces = Array(write)
            #expect(pieces.count == 2)
            var outcomes: [AccessResult] = []
            for piece in pieces {
                outcomes.append(try machine.write(piece.address.rawValue, size: Int(piece.byteCount), value: ~0).result)
            }
            #expect(outcomes[0] == .subPageWriteExit(gpa: pieces[0].address))
            #expect(outcomes[1] == .completed(gpa: pieces[1].address, value: ~0))
            #expect(try machine.byte(Self.page + 4095) == 0)
            #expect(try machine.byte(Self.page + 4096) == 0xFF)
        }
        // The access itself never crosses: the vCPU refuses one that would.
        #expect(throws: VirtualMachineError.self) { try machine.write(Self.page + 4092, size: 8) }
    }

    /// The first write after SET misses in the SPP table (KVM builds its 2 MiB block), later
    /// writes do not; a permitted write fills the TLB with the bitmap, so the next permitted write
    /// hits it, and a refused write never completes from the TLB; a SET flushes the TLB, so a
    /// sub-page that became protected is refused at once.
    @Test func sppTableMissesTheTLBAndRemoteFlushes() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        try machine.write(Self.page)                      // mapped before protection, by a 2 MiB leaf
        machine.vm.mmu.events.isRecording = true
        try machine.set(gfn, 0xFFFF_FFFE)
        let miss = try machine.write(Self.page + 0x80)
        #expect(miss.result == .completed(gpa: GuestPhysicalAddress(Self.page + 0x80), value: 0x1122_3344_5566_7788))
        // The zapped huge leaf's fault maps the page at 4 KiB, armed; then the SPPT miss.
        #expect(miss.exits == 2)
        #expect(machine.vm.mmu.events.events.filter { $0.event.name == "kvm_spp_induced_exit" }.count == 1)
        #expect(machine.protection.tablePages.count == 4)

        let hit = try machine.write(Self.page + 0x100)
        #expect(hit.tlbHit && hit.exits == 0)
        let refused = try machine.write(Self.page + 0x10)
        #expect(refused.result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page + 0x10)))
        #expect(!refused.tlbHit)
        #expect(machine.vm.mmu.events.events.contains { $0.event.name == "kvm_spp_induced_page_fault" })

        _ = try machine.write(Self.page + 0x200)          // the TLB holds the page again
        try machine.set(gfn, 0xFFFF_FBFF)                 // sub-page 10 (0x500) refused now
        let afterSet = try machine.write(Self.page + 0x500)
        #expect(afterSet.result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page + 0x500)))
        #expect(try machine.write(Self.page).result == .completed(gpa: GuestPhysicalAddress(Self.page), value: 0x1122_3344_5566_7788))
        machine.expectAuditClean()
    }

    /// Reads and fetches are never refused by SPP, and the leaf of a protected page is armed:
    /// bit 61 set, W clear, at level 1.
    @Test func readsGoThroughAndTheLeafIsArmed() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        try machine.set(gfn, 0)
        let read = try machine.vcpu.access(GuestVirtualAddress(Self.page), Access(.read, .supervisor))
        #expect(read.result == .completed(gpa: GuestPhysicalAddress(Self.page), value: 0))
        let leaf = try #require(machine.leaf(gfn))
        #expect(leaf.level == 1 && leaf.spte.isSubPageArmed && !leaf.spte.isWritable)
        #expect(try machine.write(Self.page + 0xFF0).result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page + 0xFF0)))
        try machine.set(gfn, UInt32.max)
        let disarmed = try #require(machine.leaf(gfn))
        #expect(!disarmed.spte.isSubPageArmed)
        #expect(try machine.write(Self.page + 0xFF0).result == .completed(gpa: GuestPhysicalAddress(Self.page + 0xFF0),
                                                                            value: 0x1122_3344_5566_7788))
        machine.expectAuditClean()
    }
}

@Suite("SPP with vCPUs on threads")
struct SPPThreadedTests {
    /// Three vCPUs on threads of their own write at random into pages of their own whose bitmaps
    /// stay fixed, while the VMM's thread changes other pages' bitmaps (remote TLB flushes that
    /// kick the vCPUs), toggles and reads the dirty log and zaps: every write's outcome is the
    /// rule's, and the auditor finds nothing afterwards.
    @Test func writersAgainstTheVMM() throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, mmu: .ept())
        try vm.enableSubPageProtection()
        let vcpus = 3, pagesEach: UInt64 = 4
        let base: UInt64 = 0x200_0000
        var masks: [UInt32] = []
        var rng = SplitMix64(seed: 77)
        for page in 0..<UInt64(vcpus) * pagesEach {
            let mask = UInt32.random(in: 0...UInt32.max, using: &rng)
            masks.append(mask)
            try vm.setSubpageAccess(gfn: GuestFrameNumber((base >> 12) + page), masks: [SubPageWriteMask(mask)])
        }
        for _ in 0..<vcpus { try vm.addVCPU(registers: PagingRegisters(cr0: [.protectionEnable])) }
        let fixedMasks = masks
        let mismatches = Mutex<[String]>([])
        let running = Atomic<Int>(vcpus)
        let vmmDone = DispatchSemaphore(value: 0)
        let vmm = Thread {
            defer { vmmDone.signal() }
            var random = SplitMix64(seed: 78)
            var logging = false
            var rounds = 0
            while running.load(ordering: .acquiring) > 0 || rounds < 50 {
                rounds += 1
                let spare = GuestFrameNumber((base >> 12) + 64 + UInt64.random(in: 0..<8, using: &random))
                do {
                    switch Int.random(in: 0..<4, using: &random) {
                    case 0, 1: try vm.setSubpageAccess(gfn: spare, masks: [SubPageWriteMask(UInt32.random(in: 0...UInt32.max, using: &random))])
                    case 2:
                        logging.toggle()
                        try vm.setDirtyLogging(slot: 0, logging)
                    default:
                        if logging { _ = try vm.getDirtyLog(slot: 0) } else { vm.zapGFNRange((base >> 12)..<(base >> 12) + 16) }
                    }
                } catch {
                    mismatches.withLock { $0.append("VMM: \(error)") }
                }
            }
        }
        vmm.start()
        try vm.runVCPUsOnThreads { vcpu in
            defer { running.subtract(1, ordering: .releasing) }
            var random = SplitMix64(seed: UInt64(vcpu.id) &+ 100)
            for _ in 0..<400 {
                let page = UInt64(vcpu.id) * pagesEach + UInt64.random(in: 0..<pagesEach, using: &random)
                let size = [1, 2, 4, 8].randomElement(using: &random)!
                let offset = Int.random(in: 0...(4096 / size - 1), using: &random) * size  // aligned: single-copy atomic
                let gpa = base + page << 12 + UInt64(offset)
                let outcome = try vcpu.access(GuestVirtualAddress(gpa), Access(.write, .supervisor), size: size, value: 0x5A)
                if !matchesRule(outcome, gpa: gpa, size: size, mask: fixedMasks[Int(page)]) {
                    mismatches.withLock { $0.append("vCPU \(vcpu.id): \(size) bytes at \(hex(gpa)): \(outcome.result)") }
                }
            }
        }
        vmmDone.wait()
        #expect(mismatches.withLock { $0 }.isEmpty, "\(mismatches.withLock { $0 }.prefix(5))")
        #expect(vm.audit().isEmpty, "\(vm.audit().prefix(5))")
    }
}

@Suite("SPP under the TDP MMU: KVM's interactions")
struct SPPInteractionTests {
    static let page = SPPHardwareTests.page

    /// A page mapped by a 2 MiB EPT leaf: protecting it zaps the huge leaf; the next faults map the
    /// block's pages with 4 KiB leaves (the protected one armed); lifting the protection lets the
    /// block map huge again once its table is recovered or zapped.
    @Test func hugePageSplitOnSet() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12 + 5
        try machine.write(Self.page)
        #expect(machine.leaf(gfn)?.level == 2)
        try machine.set(gfn, 0xFFFF_0000)
        #expect(machine.leaf(gfn)?.spte.isShadowPresent != true)
        #expect(try machine.write(Self.page).exits >= 1)
        #expect(machine.leaf(Self.page >> 12)?.level == 1)
        #expect(try machine.write((gfn << 12) + 0x10).result == .subPageWriteExit(gpa: GuestPhysicalAddress((gfn << 12) + 0x10)))
        #expect(machine.leaf(gfn)?.level == 1)
        #expect(machine.leaf(gfn)?.spte.isSubPageArmed == true)
        #expect(machine.vm.stats.pages2M == 0 || machine.leaf(Self.page >> 12)?.level == 1)
        machine.expectAuditClean()
        try machine.set(gfn, UInt32.max)
        machine.vm.zapAllFast()
        try machine.write(Self.page)
        #expect(machine.leaf(gfn)?.level == 2, "with nothing protected in the block it maps huge again")
        machine.expectAuditClean()
    }

    /// Dirty logging on a protected page: a write SPP lets through takes no fault, so enabling the
    /// log (and every log read) sets the arming aside (bit 55); the next write faults, is logged,
    /// re-arms the leaf (bit 61, W still clear) and goes through the SPP table; a refused write is
    /// not logged and changes nothing.
    @Test func dirtyLoggingOnAnSPPPage() throws {
        let machine = try SPPMachine()
        let slot = try machine.vm.addMemslot(id: 1, base: GuestPhysicalAddress(0x800_0000), size: 2 << 20)
        let gfn = slot.baseFrame.rawValue
        try machine.set(gfn, 0xFFFF_0000)
        try machine.write(slot.baseAddress.rawValue + 0x800)
        #expect(machine.leaf(gfn)?.spte.isSubPageArmed == true)
        try machine.vm.setDirtyLogging(slot: 1, true)
        let saved = try #require(machine.leaf(gfn)?.spte)
        #expect(!saved.isSubPageArmed && saved.hasSavedSubPageArming && !saved.isWritable)
        machine.expectAuditClean()
        for round in 0..<3 {
            let outcome = try machine.write(slot.baseAddress.rawValue + 0x800 + UInt64(round * 8), value: UInt64(round))
            #expect(outcome.exits == 1, "round \(round): the write faults once to be logged")
            let armed = try #require(machine.leaf(gfn)?.spte)
            #expect(armed.isSubPageArmed && !armed.hasSavedSubPageArming && !armed.isWritable)
            #expect(try machine.vm.getDirtyLog(slot: 1) == [GuestFrameNumber(gfn)], "round \(round)")
            #expect(machine.leaf(gfn)?.spte.hasSavedSubPageArming == true)
        }
        // The log read set the arming aside again: a refused write faults, is logged (before the
        // SPP table refuses it, as `restore_spp_bit` logs: the log may over-report, never lose),
        // and changes nothing.
        let refused = try machine.write(slot.baseAddress.rawValue, value: 0x77)
        #expect(refused.result == .subPageWriteExit(gpa: slot.baseAddress))
        #expect(refused.exits == 2)
        #expect(try machine.byte(slot.baseAddress.rawValue) == 0)
        #expect(try machine.vm.getDirtyLog(slot: 1) == [GuestFrameNumber(gfn)])
        // With logging off the leaf is armed for good: refused writes cost one exit each.
        try machine.vm.setDirtyLogging(slot: 1, false)
        try machine.write(slot.baseAddress.rawValue + 0x800)
        #expect(try machine.write(slot.baseAddress.rawValue).exits == 1)
        machine.expectAuditClean()
    }

    /// Zaps leave the permissions: after `zap all` or a gfn-range zap the re-fault arms the leaf
    /// again and the SPP table is rebuilt on a miss.
    @Test func zapThenRefaultKeepsProtection() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        try machine.set(gfn, 0xFFFF_FFFE)
        #expect(try machine.write(Self.page).result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page)))
        machine.vm.zapAllFast()
        #expect(try machine.write(Self.page).result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page)))
        machine.vm.zapGFNRange(gfn..<gfn + 1)
        machine.protection.zapAllTables()
        #expect(try machine.write(Self.page + 0x80).result == .completed(gpa: GuestPhysicalAddress(Self.page + 0x80),
                                                                            value: 0x1122_3344_5566_7788))
        #expect(try machine.write(Self.page).result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page)))
        machine.expectAuditClean()
    }

    /// A moved memslot's pages keep their permissions at the new address; the old address is in
    /// no slot; a deleted slot's permissions go, and a new slot with its id starts all-writable.
    @Test func memslotMoveAndDelete() throws {
        let machine = try SPPMachine()
        let slot = try machine.vm.addMemslot(id: 1, base: GuestPhysicalAddress(0x800_0000), size: 2 << 20)
        let gfn = slot.baseFrame.rawValue + 3
        try machine.set(gfn, 0x0000_FFFF)
        #expect(try machine.write((gfn << 12) + 0x800).result == .subPageWriteExit(gpa: GuestPhysicalAddress((gfn << 12) + 0x800)))
        let moved = try machine.vm.moveMemslot(id: 1, to: GuestPhysicalAddress(0xA00_0000))
        let newGFN = moved.baseFrame.rawValue + 3
        #expect(try machine.vm.getSubpageAccess(gfn: GuestFrameNumber(newGFN)) == [SubPageWriteMask(0x0000_FFFF)])
        #expect(throws: VirtualMachineError.subPageProtection(.notInMemslot(GuestFrameNumber(gfn)))) {
            try machine.vm.getSubpageAccess(gfn: GuestFrameNumber(gfn))
        }
        #expect(try machine.write((newGFN << 12) + 0x800).result == .subPageWriteExit(gpa: GuestPhysicalAddress((newGFN << 12) + 0x800)))
        #expect(try machine.write(newGFN << 12).result == .completed(gpa: GuestPhysicalAddress(newGFN << 12), value: 0x1122_3344_5566_7788))
        machine.expectAuditClean()
        try machine.vm.deleteMemslot(id: 1)
        _ = try machine.vm.addMemslot(id: 1, base: GuestPhysicalAddress(0xA00_0000), size: 2 << 20)
        #expect(try machine.vm.getSubpageAccess(gfn: GuestFrameNumber(newGFN)) == [.allWritable])
        #expect(try machine.write((newGFN << 12) + 0x800).result == .completed(gpa: GuestPhysicalAddress((newGFN << 12) + 0x800),
                                                                                 value: 0x1122_3344_5566_7788))
        machine.expectAuditClean()
    }

    /// A write KVM emulates obeys SPP as the processor would: a write-tracked gfn (its leaf loses
    /// MMU-writable, and so its arming) faults to the emulator, which refuses the protected
    /// sub-pages with the same exit and writes the others.
    @Test func emulatedWritesObeySPP() throws {
        let machine = try SPPMachine()
        let gfn = Self.page >> 12
        try machine.write(Self.page)
        try machine.set(gfn, 0xFFFF_FFF0)                  // sub-pages 0-3 protected
        try machine.tdp.addWriteTrack(gfn)
        let refused = try machine.write(Self.page + 0x100)
        #expect(refused.emulated && refused.result == .subPageWriteExit(gpa: GuestPhysicalAddress(Self.page + 0x100)))
        #expect(try machine.byte(Self.page + 0x100) == 0)
        let permitted = try machine.write(Self.page + 0x200, value: 0x42)
        #expect(permitted.emulated && permitted.result == .completed(gpa: GuestPhysicalAddress(Self.page + 0x200), value: 0x42))
        #expect(try machine.byte(Self.page + 0x200) == 0x42)
        let leaf = try #require(machine.leaf(gfn)?.spte)
        #expect(!leaf.isSubPageArmed && !leaf.hasSavedSubPageArming)
        machine.expectAuditClean()
    }

    /// With 5-level EPT (guest MAXPHYADDR 52) the SPP table stays 4-level: pages below 2^48 are
    /// protected as with 4-level EPT, a page at 2^48 cannot be.
    @Test func fiveLevelEPT() throws {
        let cpu = CPUModel(maxPhysicalAddressBits: 52)
        let vm = try VirtualMachine(memorySize: 64 << 20, cpu: cpu, mmu: .ept(cpu: cpu))
        #expect(vm.tdp?.configuration.rootLevel == 5)
        try vm.enableSubPageProtection()
        let vcpu = try vm.addVCPU(registers: PagingRegisters(cr0: [.protectionEnable]))
        try vm.setSubpageAccess(gfn: GuestFrameNumber(0x2000), masks: [0xFFFF_FFFE])
        #expect(try vcpu.access(GuestVirtualAddress(0x200_0000), Access(.write, .supervisor)).result
                == .subPageWriteExit(gpa: GuestPhysicalAddress(0x200_0000)))
        #expect(try vcpu.access(GuestVirtualAddress(0x200_0080), Access(.write, .supervisor), value: 9).result
                == .completed(gpa: GuestPhysicalAddress(0x200_0080), value: 9))
        let high = GuestFrameNumber(UInt64(1) << 36)
        _ = try vm.addMemslot(id: 1, base: high.address, size: 2 << 20)
        #expect(throws: VirtualMachineError.subPageProtection(.beyondTableReach(high))) {
            try vm.setSubpageAccess(gfn: high, masks: [0])
        }
        #expect(vm.audit().isEmpty, "\(vm.audit())")
    }

    /// The processor's own A/D writes to a guest page table in a protected page are not SPP's to
    /// grant: the walk meets the armed leaf's W=0, and KVM exits to the VMM with KVM_EXIT_SPP at the
    /// table (docs/SPP.md) — even for a read. Lifting the protection lets the walk through.
    @Test func guestTablesInAProtectedPage() throws {
        let machine = try SPPMachine()
        // 4-level tables at 0x100000..0x103fff mapping 0x400000 -> 0x2000000, A bits clear.
        let tables: [(UInt64, UInt64)] = [(0x10_0000, 0x10_1007), (0x10_1000, 0x10_2007), (0x10_2010, 0x10_3007),
                                          (0x10_3000, 0x200_0007)]
        for (address, value) in tables {
            try withUnsafeBytes(of: value.littleEndian) { try machine.vm.memory.write(GuestPhysicalAddress(address), from: $0) }
        }
        let vcpu = try machine.vm.addVCPU(registers: PagingRegisters(
            cr0: [.protectionEnable, .paging, .writeProtect], cr3: 0x10_0000, cr4: [.physicalAddressExtension],
            efer: [.longModeEnable, .longModeActive, .noExecuteEnable]))
        try machine.set(0x103, 0xFFFF_FFFE)                // the page table's page, PTE 0 in sub-page 0
        let read = try vcpu.access(GuestVirtualAddress(0x40_0000), Access(.read, .supervisor))
        guard case .subPageWriteExit(let gpa) = read.result else {
            Issue.record("a walk through a protected table page completed: \(read.result)")
            return
        }
        #expect(gpa.frame == GuestFrameNumber(0x103))
        machine.expectAuditClean()
        try machine.set(0x103, UInt32.max)
        #expect(try vcpu.access(GuestVirtualAddress(0x40_0000), Access(.read, .supervisor)).result
                == .completed(gpa: GuestPhysicalAddress(0x200_0000), value: 0))
        machine.expectAuditClean()
    }

    /// The requests KVM refuses, and the VMs that cannot have SPP.
    @Test func refusals() throws {
        let machine = try SPPMachine()
        _ = try machine.vm.addMemslot(id: 2, base: GuestPhysicalAddress(0x800_0000), size: 1 << 20, readOnly: true)
        #expect(throws: VirtualMachineError.subPageProtection(.readOnlyMemslot(GuestFrameNumber(0x8000), slot: 2))) {
            try machine.set(0x8000, 0)
        }
        #expect(throws: VirtualMachineError.subPageProtection(.notInMemslot(GuestFrameNumber(0x9000)))) {
            try machine.set(0x9000, 0)
        }
        #expect(throws: VirtualMachineError.subPageProtection(.invalidPageCount(0))) {
            try machine.vm.setSubpageAccess(gfn: GuestFrameNumber(0x2000), masks: [])
        }
        let shadow = try VirtualMachine(memorySize: 16 << 20)
        #expect(throws: VirtualMachineError.self) { try shadow.enableSubPageProtection() }
        #expect(throws: VirtualMachineError.subPageProtection(.notEnabled)) {
            try shadow.setSubpageAccess(gfn: GuestFrameNumber(0x100), masks: [0])
        }
        let npt = try VirtualMachine(memorySize: 16 << 20, mmu: .npt())
        #expect(throws: VirtualMachineError.self) { try npt.enableSubPageProtection() }
        let pml = try VirtualMachine(memorySize: 16 << 20, mmu: .ept(pml: true))
        #expect(throws: VirtualMachineError.self) { try pml.enableSubPageProtection() }
        #expect(shadow.subPageProtectionCapability == SubPageProtectionCapability(maxPagesPerRequest: 0, exposedToL1: false))
        #expect(npt.subPageProtectionCapability.maxPagesPerRequest == 0)
        #expect(machine.vm.subPageProtectionCapability == SubPageProtectionCapability(maxPagesPerRequest: 512, exposedToL1: false))
    }
}

@Suite("SPP in scenarios")
struct SPPScenarioTests {
    static let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("examples/tdp-only/spp.vmm").path

    private func run(_ text: String, mmu: VirtualMachineMMU = .ept()) throws -> RunReport {
        try ScenarioRunner(scenario: try Scenario.parse(text, name: "spp"), mmu: mmu).run()
    }

    /// The example runs cleanly under `--mmu tdp`, its outcomes those its comments give, and
    /// every `spp get` reports what was set.
    @Test func exampleRunsUnderTDP() throws {
        let scenario = try Scenario.parse(contentsOfFile: Self.example)
        let report = try ScenarioRunner(scenario: scenario, mmu: .ept(cpu: scenario.cpuModel)).run()
        let exits = report.accesses.filter { if case .subPageWriteExit = $0.outcome.result { true } else { false } }
        #expect(exits.map(\.line) == [14, 17, 21, 25, 32, 35, 41])
        #expect(report.subPageMasks.map(\.mask) == [0xFFFF_FFFE, 0xFFFF_0000, 0xFFFF_FFFF])
        #expect(report.dirtyLogs.map(\.gfns) == [[GuestFrameNumber(0x8000)]])
        let json = report.jsonLines()
        #expect(json.contains("{\"type\":\"spp\",\"gfn\":\"0x2000\",\"mask\":\"0xfffffffe\"}"))
        #expect(json.components(separatedBy: "\"exit\":\"spp\"}").count - 1 == 7)
    }

    /// Under shadow paging and NPT the first `spp` line is a bad scenario, never a crash.
    @Test func needsEPT() throws {
        let text = "map 0x400000 0x2000000 4k P,RW,US\nspp set 0x2000 0\n"
        for mmu in [VirtualMachineMMU.shadow, .npt()] {
            #expect {
                try run(text, mmu: mmu)
            } throws: { error in
                guard case RunFailure.badScenario(let line, let message) = error else { return false }
                return line == 2 && message == "spp needs --mmu tdp (EPT)"
            }
        }
    }

    /// Bad lines are refused by the parser with their column; requests KVM refuses fail the run
    /// at their line.
    @Test func badLines() throws {
        let cases: [(String, Int, String)] = [
            ("spp set 0x2000 0x1_0000_0000", 16, "MASK must be 0...4294967295"),
            ("spp set 0x2000", 0, "missing MASK"),
            ("spp get", 0, "missing GFN"),
            ("spp clear 0x2000", 5, "spp takes set or get"),
            ("spp get 0x2000 extra", 16, "unexpected 'extra'"),
            ("spp set zz 0", 9, "GFN: 'zz' is not a number"),
        ]
        for (line, column, message) in cases {
            #expect {
                _ = try Scenario.parse(line, name: "bad")
            } throws: { error in
                guard let error = error as? ScenarioError else { return false }
                return error.message.contains(message) && (column == 0 || error.column == column)
            }
        }
        for (text, message) in [("spp set 0x9000 0", "lies in no memslot"),
                                ("memslot add 1 0x8000000 1M readonly\nspp set 0x8000 0", "read-only memslot 1"),
                                ("spp set 0x100 0", "below 16 MiB"),
                                ("spp get 0x9000", "lies in no memslot")] {
            #expect {
                try run(text)
            } throws: { error in
                guard case RunFailure.badScenario(_, let text) = error else { return false }
                return text.contains(message)
            }
        }
    }

    /// Random scenarios: four user pages (one inside a 2 MiB mapping), random bitmaps set as the
    /// guest writes at random offsets, reads between them, zaps now and then. The runner checks
    /// every access against the reference machine and audits after each; the test checks each
    /// write's outcome against the byte rule too.
    @Test(arguments: [11, 12, 13] as [UInt64])
    func randomScenariosInLockstep(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        var lines = ["map 0x400000 0x2000000 4k P,RW,US", "map 0x401000 0x2001000 4k P,RW,US",
                     "map 0x402000 0x2002000 4k P,RW,US", "map 0x600000 0x2200000 2m P,RW,US"]
        let pages: [(gva: UInt64, gfn: UInt64)] = [(0x400000, 0x2000), (0x401000, 0x2001), (0x402000, 0x2002), (0x603000, 0x2203)]
        var masks = [UInt32](repeating: UInt32.max, count: pages.count)
        var expected: [(line: Int, refused: Bool)] = []
        for _ in 0..<150 {
            let page = Int.random(in: 0..<pages.count, using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0, 1:
                masks[page] = rng.chance(20) ? UInt32.max : UInt32.random(in: 0...UInt32.max, using: &rng)
                lines.append("spp set \(hex(pages[page].gfn)) \(hex(masks[page]))")
            case 2:
                lines.append("access read \(hex(pages[page].gva + UInt64.random(in: 0...4088, using: &rng))) cpl=3")
            case 3 where rng.chance(30):
                lines.append("zap all")
            default:
                let offset = Int.random(in: 0...4088, using: &rng)
                lines.append("access write \(hex(pages[page].gva + UInt64(offset))) cpl=3 value=\(hex(rng.next()))")
                expected.append((lines.count, !ruleAllows(masks[page], offset: offset, size: 8)))
            }
        }
        let report = try run(lines.joined(separator: "\n"))
        let refusedLines = Set(report.accesses.compactMap { access -> Int? in
            if case .subPageWriteExit = access.outcome.result { return access.line }
            return nil
        })
        for (line, refused) in expected {
            #expect(refusedLines.contains(line) == refused, "seed \(seed) line \(line): \(lines[line - 1])")
        }
        #expect(report.lockstepChecks >= expected.count)
    }

    /// `spp` lines render back to themselves.
    @Test func roundTrip() throws {
        let scenario = try Scenario.parse("spp set 0x2000 0xffff0000\nspp get 0x2000", name: "rt")
        #expect(scenario.render().contains("spp set 0x2000 0xffff0000"))
        #expect(try Scenario.parse(scenario.render(), name: "rt").directives.map(\.directive) == scenario.directives.map(\.directive))
    }

    /// The reference machine holds the rule on its own: a completed write to a refused sub-page,
    /// or an SPP exit for a write the permissions allow, is a disagreement.
    @Test func referenceFlagsEitherMistake() throws {
        let vm = try VirtualMachine(memorySize: 64 << 20, mmu: .ept())
        let reference = try ReferenceMachine(memory: vm.memory, registers: PagingRegisters(cr0: [.protectionEnable]))
        reference.setSubPageWriteMask(0xFFFF_FFFE, for: GuestFrameNumber(0x2000))
        let access = Access(.write, .supervisor)
        for (address, actual, disagrees) in [
            (0x200_0000, AccessResult.completed(gpa: GuestPhysicalAddress(0x200_0000), value: 1), true),
            (0x200_0080, AccessResult.subPageWriteExit(gpa: GuestPhysicalAddress(0x200_0080)), true),
            (0x200_0000, AccessResult.subPageWriteExit(gpa: GuestPhysicalAddress(0x200_0000)), false),
            (0x200_0080, AccessResult.completed(gpa: GuestPhysicalAddress(0x200_0080), value: 1), false),
        ] as [(UInt64, AccessResult, Bool)] {
            let gva = GuestVirtualAddress(address)
            let expected = reference.expect(gva, access)
            let threw = (try? reference.check(gva, access, size: 8, value: 1, expected: expected, actual: actual)) == nil
            #expect(threw == disagrees, "\(actual)")
        }
    }
}
