import Foundation
import GuestMemory
import KVMMMU
import Synchronization
import Testing
import VirtualMachine
import Workloads
import X86Paging

// vCPUs on threads of their own under the TDP MMU and the shadow MMU, with the VMM's threads working at the same time:
// the migration loop (a thread collecting and clearing the dirty log and copying the pages it
// names) and a thread that toggles another memslot's dirty logging (eager splitting, huge-page
// recovery), zaps gfn ranges, zaps everything at once and runs the auditor. Bounded by counts,
// not time. Run it under ThreadSanitizer with
// `swift test --sanitize=thread --scratch-path .build-tsan --filter ConcurrentVCPUStressTests`.
//
// What must hold at the end:
// - no lost dirty page: every write a vCPU completed appears in a collection that ended after the
//   write completed (so the copy made after that collection saw it), and the destination built
//   from the copies equals guest memory, byte for byte, page-table pages (A/D bits) included;
// - every access completed at the guest-physical address the guest's tables give, and each vCPU
//   read back what it last wrote (its words are its own);
// - the auditor finds nothing, during the run or after.

@Suite("vCPUs on threads: the dirty log under concurrent writers, collectors and memslot changes")
struct ConcurrentVCPUStressTests {
    struct Case: CustomStringConvertible, Sendable {
        var shadow = false
        var pml: Bool
        var dirtyLogProtocol: DirtyLogProtocol
        var vcpus: Int
        /// The last vCPU runs L2 (paging off) over L1's EPT instead of L1's own code (TDP only).
        var l2Writer = false
        var description: String {
            "\(shadow ? "shadow paging" : "TDP"), \(pml ? "PML" : "write protection"), \(dirtyLogProtocol.rawValue), \(vcpus) vCPUs"
                + (l2Writer ? ", one in L2" : "")
        }
    }

    static let cases = [
        Case(pml: false, dirtyLogProtocol: .getAndReset, vcpus: 3),
        Case(pml: true, dirtyLogProtocol: .manualProtect, vcpus: 3),
        Case(pml: false, dirtyLogProtocol: .manualProtect, vcpus: 2),
        Case(shadow: true, pml: false, dirtyLogProtocol: .getAndReset, vcpus: 3),
        Case(shadow: true, pml: false, dirtyLogProtocol: .manualProtect, vcpus: 2),
        Case(pml: false, dirtyLogProtocol: .getAndReset, vcpus: 3, l2Writer: true),
        Case(pml: true, dirtyLogProtocol: .manualProtect, vcpus: 2, l2Writer: true),
    ]

    /// Guest-physical layout: tables below 1 MiB, memslot 0 (logged) is 32 MiB at 0, memslot 1
    /// (whose logging the toggler flips) is 8 MiB at 256 MiB. The guest maps the first GiB 1:1
    /// with 2 MiB pages.
    static let slot0Size: UInt64 = 32 << 20
    static let slot1Base: UInt64 = 256 << 20
    static let slot1Size: UInt64 = 8 << 20
    /// Where the toggler moves memslot 1 now and then (KVM_MR_MOVE), and memslot 2, which it
    /// deletes and creates again.
    static let slot1MovedBase: UInt64 = 512 << 20
    static let slot2Base: UInt64 = 384 << 20
    static let slot2Size: UInt64 = 2 << 20
    static let dataFirstPage: UInt64 = 256  // 1 MiB
    static let dataPages: UInt64 = 2048  // the pages the writers use in memslot 0 (8 MiB)
    static let writesPerVCPU = 3000

    @Test(arguments: cases)
    func noDirtyPageIsLost(_ testCase: Case) throws {
        let cpu = CPUModel()
        let vm = try VirtualMachine(memorySize: Self.slot0Size, cpu: cpu,
                                    mmu: testCase.shadow ? .shadow : .ept(cpu: cpu, pml: testCase.pml))
        try vm.addMemslot(id: 1, base: GuestPhysicalAddress(Self.slot1Base), size: Self.slot1Size)
        try vm.addMemslot(id: 2, base: GuestPhysicalAddress(Self.slot2Base), size: Self.slot2Size)
        try Self.buildIdentityMap(vm.memory)
        if testCase.l2Writer { try Self.buildL2EPT(vm.memory) }
        try vm.setDirtyLogProtocol(testCase.dirtyLogProtocol)
        try vm.setDirtyLogging(slot: 0, true)
        let registers = PagingRegisters(cr0: [.protectionEnable, .writeProtect, .paging], cr3: 0x1000,
                                        cr4: [.physicalAddressExtension],
                                        efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
        for _ in 0..<testCase.vcpus { try vm.addVCPU(registers: registers) }

        let shared = Shared()
        let collector = Collector(vm: vm, manual: testCase.dirtyLogProtocol == .manualProtect)

        let vmmThreads = DispatchGroup()
        vmmThreads.enter()
        Thread {
            defer { vmmThreads.leave() }
            do {
                while !shared.stop.load(ordering: .acquiring) { try collector.round(clock: shared.clock) }
            } catch {
                shared.failures.withLock { $0.append("collector: \(error)") }
            }
        }.start()
        vmmThreads.enter()
        Thread {
            defer { vmmThreads.leave() }
            var random = SeededGenerator(seed: 99)
            var round = 0
            do {
                while !shared.stop.load(ordering: .acquiring) {
                    round += 1
                    try vm.setDirtyLogging(slot: 1, round % 2 == 1)
                    let first = random.next() % Self.dataPages + Self.dataFirstPage
                    vm.zapGFNRange(first..<(first + random.next() % 64 + 1))
                    // Idle-page tracking clearing A bits (or access-tracking leaves) under the vCPUs.
                    let aged = random.next() % Self.dataPages + Self.dataFirstPage
                    vm.ageGFNRange(aged..<(aged + random.next() % 256 + 1))
                    if round % 16 == 0 { vm.zapAllFast() }
                    if round % 24 == 0 {
                        // Memory the vCPUs are writing comes and goes: where it is not, their
                        // accesses are MMIO.
                        let moved = round % 48 == 0
                        try vm.moveMemslot(id: 1, to: GuestPhysicalAddress(moved ? Self.slot1MovedBase : Self.slot1Base))
                        try vm.deleteMemslot(id: 2)
                        try vm.addMemslot(id: 2, base: GuestPhysicalAddress(Self.slot2Base), size: Self.slot2Size)
                    }
                    if round % 8 == 0 {
                        let problems = vm.audit()
                        if !problems.isEmpty { shared.failures.withLock { $0.append("auditor, round \(round): \(problems)") } }
                    }
                }
            } catch {
                shared.failures.withLock { $0.append("toggler: \(error)") }
            }
        }.start()

        try vm.runVCPUsOnThreads { vcpu in
            let inL2 = testCase.l2Writer && vcpu.id == testCase.vcpus - 1
            let log = inL2 ? Self.runL2Writer(vcpu, vcpus: testCase.vcpus, shared: shared)
                : Self.runWriter(vcpu, vcpus: testCase.vcpus, shared: shared)
            shared.writeLogs.withLock { $0.append(log) }
        }
        shared.stop.store(true, ordering: .releasing)
        vmmThreads.wait()
        // The last round: the vCPUs have stopped (and drained their PML buffers).
        try collector.round(clock: shared.clock)

        let problems = shared.failures.withLock { $0 }
        #expect(problems.isEmpty, "\(problems.prefix(10))")
        var lost: [String] = []
        for log in shared.writeLogs.withLock({ $0 }) {
            for write in log where collector.lastReported[write.gfn, default: 0] <= write.ticket {
                lost.append("gfn \(hex(write.gfn)) written at \(write.ticket), last reported at \(collector.lastReported[write.gfn, default: 0])")
            }
        }
        #expect(lost.isEmpty, "lost dirty pages: \(lost.prefix(10))")
        #expect(shared.writeLogs.withLock { $0.count } == testCase.vcpus)
        let mismatched = collector.pagesDifferingFromGuestMemory()
        #expect(mismatched.isEmpty, "destination pages differ from the guest's: \(mismatched.prefix(10).map { hex($0) })")
        #expect(vm.audit().isEmpty)
        #expect(collector.rounds > 1)
        let stats = vm.stats
        #expect(stats.remoteTLBFlush > 0 && stats.tlbFlush > 0)
        if testCase.l2Writer { #expect(stats.nestedRun == 1 && stats.mmuCacheMiss > 0, "L2 ran over guest_mmu") }
    }

    /// L1's EPT for L2 (4-level, with A/D: KVM's walk sets them, so the tables' pages are logged
    /// too), below 1 MiB: L2's [0, 8 MiB) at L1's [2 MiB, 10 MiB) in 2 MiB leaves, which
    /// `guest_mmu` maps 4 KiB in the logging memslot 0.
    static let l2EPTRoot: UInt64 = 0x8_0000
    static let l2Offset: UInt64 = 2 << 20
    static func buildL2EPT(_ memory: MemslotSet) throws {
        try memory.store64(0x8_1000 | 0x7, at: GuestPhysicalAddress(l2EPTRoot))  // PML4[0] -> PDPT
        try memory.store64(0x8_2000 | 0x7, at: GuestPhysicalAddress(0x8_1000))   // PDPT[0] -> PD
        for index in 0..<UInt64(4) {
            try memory.store64((l2Offset + index << 21) | 0x80 | 6 << 3 | 0x7, at: GuestPhysicalAddress(0x8_2000 + index * 8))
        }
    }

    /// The L2 vCPU's code: L1 enters L2 (paging off) on this vCPU's thread, then L2 writes its own
    /// words of random pages, reading some back; each write logged at the L1 gfn it reached.
    static func runL2Writer(_ vcpu: VCPU, vcpus: Int, shared: Shared) -> [(gfn: UInt64, ticket: UInt64)] {
        var random = SeededGenerator(seed: UInt64(vcpu.id) &* 104_729 &+ 3)
        var log: [(gfn: UInt64, ticket: UInt64)] = []
        var mine: [UInt64: UInt64] = [:]
        func fail(_ message: String) { shared.failures.withLock { $0.append("vCPU \(vcpu.id) in L2: \(message)") } }
        do {
            try vcpu.enterL2(.ept(EPTPointer(root: l2EPTRoot, levels: 4, accessedDirty: true),
                                  capabilities: EPTCapabilities(accessedDirty: true)),
                             registers: PagingRegisters())
            for sequence in 0..<writesPerVCPU {
                let word = (random.next() % UInt64(512 / vcpus)) * UInt64(vcpus) + UInt64(vcpu.id)
                let address = (random.next() % 2048) << 12 + word * 8
                let value = UInt64(vcpu.id) << 56 | UInt64(sequence + 1)
                let outcome = try vcpu.accessL2(GuestVirtualAddress(address), .write(.supervisor), value: value)
                guard case .completed(let gpa, _, _) = outcome.result, gpa.rawValue == address else {
                    fail("write to \(hex(address)) came to \(outcome.result)")
                    return log
                }
                mine[address] = value
                log.append(((address + l2Offset) >> 12, shared.clock.add(1, ordering: .sequentiallyConsistent).newValue))
                // Every L2 access takes mmu_lock for write (the model's hardware walks guest_mmu's
                // tables under it); L2's code between accesses gives the other threads the core, or
                // on two cores an L1 vCPU whose fault the collector keeps re-protecting could run
                // out of its 64 exits waiting for the lock (a starvation KVM has no bound for).
                sched_yield()
                if sequence % 4 == 0, let (check, expected) = mine.randomElement(using: &random) {
                    let read = try vcpu.accessL2(GuestVirtualAddress(check), .read(.supervisor))
                    guard case .completed(_, _, let found) = read.result, found == expected else {
                        fail("read of \(hex(check)) came to \(read.result), expected \(hex(expected))")
                        return log
                    }
                }
            }
            try vcpu.exitToL1()
        } catch {
            fail("\(error)")
        }
        return log
    }

    /// One vCPU's guest code: writes to its own words of random pages, reading some back.
    static func runWriter(_ vcpu: VCPU, vcpus: Int, shared: Shared) -> [(gfn: UInt64, ticket: UInt64)] {
        var random = SeededGenerator(seed: UInt64(vcpu.id) &* 7919 &+ 1)
        var log: [(gfn: UInt64, ticket: UInt64)] = []
        var mine: [UInt64: UInt64] = [:]  // address -> the value this vCPU last wrote there
        func fail(_ message: String) { shared.failures.withLock { $0.append("vCPU \(vcpu.id): \(message)") } }
        for sequence in 0..<writesPerVCPU {
            // Mostly memslot 0 (logged), sometimes memslot 1 (whose logging flips and which moves)
            // or memslot 2 (deleted and created again).
            let address: UInt64
            let page = random.next() % dataPages
            let word = (random.next() % UInt64(512 / vcpus)) * UInt64(vcpus) + UInt64(vcpu.id)
            if sequence % 8 == 7 {
                address = slot1Base + (page % (slot1Size >> 12)) << 12 + word * 8
            } else if sequence % 16 == 3 {
                address = slot2Base + (page % (slot2Size >> 12)) << 12 + word * 8
            } else {
                address = (dataFirstPage + page) << 12 + word * 8
            }
            let comesAndGoes = address >= slot1Base
            let value = UInt64(vcpu.id) << 56 | UInt64(sequence + 1)
            do {
                let outcome = try vcpu.access(GuestVirtualAddress(address), .write(.supervisor), size: 8, value: value)
                switch outcome.result {
                case .completed(let gpa, _) where gpa.rawValue == address:
                    // A slot that comes and goes loses what was written while it was elsewhere.
                    if comesAndGoes { mine[address] = nil } else { mine[address] = value }
                case .mmio(let gpa, _) where gpa.rawValue == address && comesAndGoes:
                    mine[address] = nil
                default:
                    fail("write to \(hex(address)) came to \(outcome.result)")
                    return log
                }
                if address < slot0Size { log.append((address >> 12, shared.clock.add(1, ordering: .sequentiallyConsistent).newValue)) }
                if sequence % 4 == 0, let (check, expected) = mine.randomElement(using: &random) {
                    let read = try vcpu.access(GuestVirtualAddress(check), .read(.supervisor), size: 8)
                    guard case .completed(let gpa, let found) = read.result, gpa.rawValue == check, found == expected else {
                        fail("read of \(hex(check)) came to \(read.result), expected \(hex(expected))")
                        return log
                    }
                }
            } catch {
                fail("\(error)")
                return log
            }
        }
        return log
    }

    /// The guest's page tables: the first GiB mapped 1:1 with 2 MiB supervisor-writable pages.
    static func buildIdentityMap(_ memory: MemslotSet) throws {
        try memory.store64(0x2000 | 0x3, at: GuestPhysicalAddress(0x1000))  // PML4[0] -> PDPT
        try memory.store64(0x3000 | 0x3, at: GuestPhysicalAddress(0x2000))  // PDPT[0] -> PD
        for index in 0..<512 {
            try memory.store64(UInt64(index) << 21 | 0x83, at: GuestPhysicalAddress(0x3000 + UInt64(index) * 8))
        }
    }
}

/// What the test's threads share.
final class Shared: @unchecked Sendable {
    /// Tickets ordering the vCPUs' completed writes against the collections.
    let clock = Atomic<UInt64>(1)
    let stop = Atomic<Bool>(false)
    // pthread-based locks (ThreadSanitizer does not see `Synchronization.Mutex` on Linux).
    let failures = LockedValue<[String]>([])
    let writeLogs = LockedValue<[[(gfn: UInt64, ticket: UInt64)]]>([])
}

/// The VMM's migration loop over memslot 0: collect the dirty log (and, with manual protection,
/// clear what it returned), then copy the pages it named to the destination.
final class Collector: @unchecked Sendable {
    let vm: VirtualMachine
    let manual: Bool
    /// The destination's copy of memslot 0, a page per gfn.
    private(set) var destination: [UInt64: [UInt64]] = [:]
    /// For each gfn, the ticket of the last collection that named it.
    private(set) var lastReported: [UInt64: UInt64] = [:]
    private(set) var rounds = 0
    private var page = [UInt64](repeating: 0, count: 512)

    init(vm: VirtualMachine, manual: Bool) {
        self.vm = vm
        self.manual = manual
    }

    func round(clock: borrowing Atomic<UInt64>) throws {
        rounds += 1
        let frames: [GuestFrameNumber]
        if manual {
            // As a migrating VMM does: KVM_GET_DIRTY_LOG's bitmap handed back to KVM_CLEAR_DIRTY_LOG.
            let (bitmap, base) = try vm.getDirtyLogBitmap(slot: 0)
            #expect(bitmap.count == Int(((ConcurrentVCPUStressTests.slot0Size >> 12) + 63) / 64))
            frames = bitmap.enumerated().flatMap { word, mask in
                (0..<64).filter { mask >> UInt64($0) & 1 != 0 }.map { GuestFrameNumber(base.rawValue + UInt64(word * 64 + $0)) }
            }
            if !frames.isEmpty { try vm.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap) }
        } else {
            frames = try vm.getDirtyLog(slot: 0)
        }
        // Every write completed before this ticket is in guest memory for the copies below.
        let ticket = clock.add(1, ordering: .sequentiallyConsistent).newValue
        for frame in frames {
            lastReported[frame.rawValue] = ticket
            page.withUnsafeMutableBufferPointer { _ = vm.memory.copyPageWhileRunning(frame, into: $0) }
            destination[frame.rawValue] = page
        }
    }

    /// The gfns of memslot 0 whose destination copy differs from guest memory (a page never
    /// reported must still be all zeros, as it was when logging began).
    func pagesDifferingFromGuestMemory() -> [UInt64] {
        var differing: [UInt64] = []
        let zero = [UInt64](repeating: 0, count: 512)
        for gfn in 0..<(ConcurrentVCPUStressTests.slot0Size >> 12) {
            page.withUnsafeMutableBufferPointer { _ = vm.memory.copyPageWhileRunning(GuestFrameNumber(gfn), into: $0) }
            if page != destination[gfn] ?? zero { differing.append(gfn) }
        }
        return differing
    }
}

func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
