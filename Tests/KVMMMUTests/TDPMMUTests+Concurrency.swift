import Foundation
import GuestMemory
import Synchronization
import Testing
import X86Paging
@testable import KVMMMU

/// Real threads: vCPUs faulting (lock held for read, compare-and-exchange) and setting A/D bits as
/// hardware does, against a thread that zaps, write-protects, splits, ages, toggles dirty logging and
/// recovers huge pages. Bounded by operation counts, not time; afterwards every invariant must hold
/// and every gfn must map what its memslot says.
@Suite(.serialized) struct TDPMMUConcurrencyTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var vcpus: Int
        var nxHugePages: Bool
        var pml: Bool
        var testDescription: String { "\(vcpus) vCPUs\(nxHugePages ? ", NX huge pages" : "")\(pml ? ", PML" : "")" }
    }

    static let cases = [Case(vcpus: 2, nxHugePages: false, pml: false), Case(vcpus: 3, nxHugePages: true, pml: true),
                        Case(vcpus: 4, nxHugePages: true, pml: false)]

    @Test(arguments: cases)
    func faultingVCPUsRaceZapsAndMemslotWideOperations(_ testCase: Case) throws {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46,
                                                    pml: testCase.pml, nxHugePages: testCase.nxHugePages)
        configuration.nxHugePagesRecoveryRatio = 4
        let fixture = try TDPFixture(configuration: configuration)
        let big = try fixture.addSlot(id: 0, baseGFN: pages1G, pages: pages1G)
        let logged = try fixture.addSlot(id: 1, baseGFN: 4 * pages1G, pages: 8 * pages2M + 100)
        let skewed = try fixture.addSlot(id: 2, baseGFN: 6 * pages1G, pages: 4 * pages2M, hostSkew: 5)
        let slots = [big, logged, skewed]
        let mmu = fixture.mmu
        mmu.events.isRecording = false
        let failures = Mutex<[String]>([])
        let vcpusRunning = Atomic<Int>(testCase.vcpus)
        let mutatorOperations = Atomic<Int>(0)
        // Every thread waits for the others before it starts, so the work overlaps.
        let arrived = Atomic<Int>(0)
        let threads = testCase.vcpus + 1
        @Sendable func startTogether() {
            arrived.add(1, ordering: .acquiringAndReleasing)
            while arrived.load(ordering: .acquiring) < threads { sched_yield() }
        }
        let group = DispatchGroup()

        for vcpu in 0..<testCase.vcpus {
            group.enter()
            let thread = Thread {
                defer { group.leave() }
                do {
                    var random = TDPRandom(seed: UInt64(vcpu) &+ 0xC0FFEE)
                    defer { vcpusRunning.subtract(1, ordering: .releasing) }
                    startTogether()
                    try Self.vcpuSteps(mmu, mutatorOperations: mutatorOperations) { root, done in
                        let slot = slots[Int(random.below(3))]
                        // Half the time every vCPU sweeps the 4K-only slot in the same order, so they
                        // reach the same unmapped gfns together; otherwise a few hot gfns per slot.
                        let sweeping = done % 2 == 0
                        let offset = random.chance(7, in: 8) ? random.below(4) * pages2M + random.below(8) : random.below(slot.pageCount)
                        let gfn = sweeping
                            ? skewed.baseFrame.rawValue + UInt64(done / 2) % skewed.pageCount
                            : (random.chance(1, in: 40) ? 7 * pages1G + random.below(64) : slot.baseFrame.rawValue + min(offset, slot.pageCount - 1))
                        if !sweeping && random.chance(1, in: 3) {
                            Self.hardwareAccess(mmu, root: root, gfn: gfn, write: random.chance(1, in: 2))
                            return
                        }
                        var code: PageFaultErrorCode = [[.user], [.write], [.fetch]][Int(random.below(3))]
                        if random.chance(1, in: 2) { code.insert(.present) }
                        _ = try mmu.pageFault(at: GuestFrameNumber(gfn).address, errorCode: code, root: root, vcpuID: vcpu)
                    }
                } catch {
                    failures.withLock { $0.append("vCPU \(vcpu): \(error)") }
                }
            }
            thread.start()
        }

        group.enter()
        let mutator = Thread {
            defer { group.leave() }
            do {
                var random = TDPRandom(seed: 0xBADC0DE)
                var logging = false
                startTogether()
                // Until the vCPUs are done, at most a fixed number of operations.
                while mutatorOperations.load(ordering: .relaxed) < 4000 && vcpusRunning.load(ordering: .acquiring) > 0 {
                    mutatorOperations.add(1, ordering: .relaxed)
                    let slot = slots[Int(random.below(3))]
                    let hot = random.chance(3, in: 4)
                    let start = slot.baseFrame.rawValue + (hot ? random.below(4) * pages2M : random.below(slot.pageCount))
                    let range = start..<min(slot.endFrame.rawValue, start + 1 + random.below(2 * pages2M))
                    switch random.below(12) {
                    case 0, 1: mmu.zapGFNRange(range)
                    case 2: try mmu.writeProtectSlot(slot.id, minLevel: 1 + Int(random.below(2)))
                    case 3: try mmu.clearDirtySlot(slot.id)
                    case 4: try mmu.splitHugePages(slot: slot.id, gfns: range, targetLevel: 1 + Int(random.below(2)))
                    case 5: try mmu.recoverHugePages(slot: slot.id)
                    case 6: mmu.ageGFNRange(range)
                    case 7:
                        logging.toggle()
                        try mmu.setMemslotFlags(id: 1, flags: logging ? .logDirtyPages : [])
                    case 8 where logging: _ = try mmu.getDirtyLog(slot: 1)
                    case 9: mmu.recoverNXHugePages()
                    case 10 where random.chance(1, in: 8): mmu.zapAllFast()
                    default: mmu.unmapGFNRange(range)
                    }
                }
            } catch {
                failures.withLock { $0.append("mutator: \(error)") }
            }
        }
        mutator.start()
        group.wait()

        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        fixture.expectClean("\(testCase.testDescription): the race")
        try fixture.reloadRootIfInvalid()
        // Every gfn faults in to the frame its memslot puts there.
        var random = TDPRandom(seed: 7)
        for _ in 0..<300 {
            let slot = slots[Int(random.below(3))]
            let gfn = slot.baseFrame.rawValue + random.below(slot.pageCount)
            #expect(try fixture.access(gfn, .read) == .memory(HostFrameNumber(slot.hostBase.rawValue + gfn - slot.baseFrame.rawValue)))
        }
        fixture.expectClean("\(testCase.testDescription): after the race")
        #expect(mmu.roots.allSatisfy { !$0.isInvalid || $0.referenceCount > 0 })
    }

    /// A vCPU thread's loop: `step` runs 3000 times, more while the mutator has done fewer than
    /// 300 operations (at most 100000), each time on a valid root (an invalid one is put and
    /// replaced, as a vCPU drops an obsolete root at its next entry).
    static func vcpuSteps(_ mmu: TDPMMU, mutatorOperations: borrowing Atomic<Int>,
                          _ step: (_ root: TDPRoot, _ done: Int) throws -> Void) throws {
        var root = try mmu.allocateRoot()
        var done = 0
        while done < 3000 || (mutatorOperations.load(ordering: .relaxed) < 300 && done < 100_000) {
            done += 1
            if root.isInvalid {
                try mmu.putRoot(root)
                root = try mmu.allocateRoot()
            }
            try step(root, done)
        }
        try mmu.putRoot(root)
    }

    /// What a processor does on a guest access through TDP tables it can use: set A (and D for a
    /// write through a writable leaf) in the leaf with a locked update; with PML, log a write that
    /// sets D.
    /// Holds the lock for read, as a vCPU in guest mode keeps page tables from being freed.
    static func hardwareAccess(_ mmu: TDPMMU, root: TDPRoot, gfn: UInt64, write: Bool) {
        mmu.lock.withReadLock {
            var iterator = TDPIterator(root: root.table, rootLevel: root.level, minLevel: 1, start: gfn, end: gfn + 1,
                                       pool: mmu.pool)
            var leaf: SPTESlot?
            var level = 0
            while iterator.isValid {
                leaf = iterator.slot
                level = iterator.level
                iterator.next()
            }
            guard let leaf else { return }
            let spte = leaf.load()
            guard spte.isShadowPresent, spte.isLast(level: level), spte.rawValue & 1 != 0 else { return }
            guard !write || spte.isWritable else { return }
            let bits = mmu.masks.accessedDirtyEnabled ? mmu.masks.accessed | (write ? mmu.masks.dirty : 0) : 0
            guard bits != 0 else { return }
            // A locked update of the entry the walk used: if it changed meanwhile, the processor
            // walks again (here: gives up), it never sets bits in an entry it did not use.
            var expected = spte
            guard leaf.compareExchange(expected: &expected, desired: SPTE(spte.rawValue | bits)) else { return }
            if write && mmu.configuration.dirtyLogging == .pml && !spte.isDirty(mmu.masks) {
                mmu.memory.markDirty(GuestFrameNumber(gfn))
            }
        }
    }
}

/// The lost-race paths, made deterministic: `beforeAtomicUpdate` changes the SPTE in the window
/// between an operation's read and its compare-and-exchange, as another thread or the processor
/// would.
@Suite struct TDPMMULostRaceTests {
    @Test func aFaultThatLosesTheLinkRaceRetriesAndFreesItsTable() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 16)
        let pages = fixture.pool.allocatedPages
        var frozenSlot: SPTESlot?
        fixture.mmu.beforeAtomicUpdate = { slot, level in
            guard frozenSlot == nil, level == 4 else { return }
            // Another thread is zapping this entry.
            slot.store(.frozen)
            frozenSlot = slot
        }
        #expect(try fixture.mmu.pageFault(at: GuestPhysicalAddress(0x3000), errorCode: [.write], root: fixture.root) == .retry)
        fixture.mmu.beforeAtomicUpdate = nil
        #expect(fixture.pool.allocatedPages == pages, "the table made for the lost link went back")
        // Meanwhile the entry is frozen: a fault backs off, and the auditor sees it.
        #expect(try fixture.mmu.pageFault(at: GuestPhysicalAddress(0x3000), errorCode: [.write], root: fixture.root) == .retry)
        #expect(fixture.mmu.audit().contains { $0.contains("frozen") })
        // The other thread finishes its zap; the fault goes through.
        frozenSlot?.store(.nonPresent)
        #expect(try fixture.fault(3, .write) == .fixed)
        #expect(fixture.mmu.lostRaces == 1)
        fixture.expectClean("lost link")
    }

    @Test func aSplitThatLosesToTheProcessorSettingAccessedRetriesWithTheNewValue() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 2 * pages2M)
        try fixture.fault(5, .read)
        fixture.mmu.ageGFNRange(0..<pages2M)
        try fixture.mmu.addWriteTrack(300)
        #expect(try #require(fixture.mmu.mapping(of: 5, in: fixture.root)).spte.isAccessed(fixture.masks) == false)
        var injected = false
        fixture.mmu.beforeAtomicUpdate = { slot, level in
            guard !injected, level == 2 else { return }
            injected = true
            _ = slot.setBits(fixture.masks.accessed)
        }
        #expect(try fixture.mmu.pageFault(at: GuestPhysicalAddress(7 << 12), errorCode: [.user, .present],
                                          root: fixture.root) == .retry)
        #expect(fixture.leafLevel(7) == 2, "the huge leaf is still there")
        fixture.expectClean("split lost")
        #expect(try fixture.fault(7, .read, present: true) == .fixed)
        let child = try #require(fixture.mmu.mapping(of: 8, in: fixture.root))
        #expect(child.level == 1 && child.spte.isAccessed(fixture.masks), "the retry split the leaf as it was then")
        fixture.mmu.beforeAtomicUpdate = nil
        fixture.expectClean("split retried")
    }

    @Test func eagerSplittingWriteProtectionAndRecoveryLookAgainAfterALostRace() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 4 * pages2M)
        for region in 0..<UInt64(4) { try fixture.fault(region * pages2M, .write) }
        var injections = 0
        fixture.mmu.beforeAtomicUpdate = { slot, _ in
            // Every other update first loses to an aging thread clearing A, or to the processor
            // setting it.
            injections += 1
            guard injections % 2 == 1 else { return }
            let accessed = fixture.masks.accessed
            _ = slot.load().rawValue & accessed != 0 ? slot.clearBits(accessed) : slot.setBits(accessed)
        }
        try fixture.mmu.splitHugePages(slot: 0, targetLevel: 1)
        #expect(fixture.mmu.stats.pages2M == 0 && fixture.mmu.stats.pages4K == 4 * 512)
        #expect(fixture.mmu.events.count(of: "kvm_mmu_split_huge_page") == 8, "four failed tries, four splits")
        fixture.expectClean("eager split with lost races")
        try fixture.mmu.writeProtectSlot(0, minLevel: 1)
        let leaf = try #require(fixture.mmu.mapping(of: 9, in: fixture.root)).spte
        #expect(!leaf.isWritable && leaf.isDirty(fixture.masks) && leaf.isMMUWritable(fixture.masks) && !leaf.isLarge)
        fixture.expectClean("write protection with lost races")
        try fixture.mmu.recoverHugePages(slot: 0)
        #expect(fixture.mmu.stats.pages4K == 0 && fixture.mmu.pageTableCount == 2)
        #expect(fixture.mmu.lostRaces >= 4 * 3)
        fixture.mmu.beforeAtomicUpdate = nil
        fixture.expectClean("recovery with lost races")
    }

    /// `fast_page_fault` tries at most five times, then the slow path runs; losing there too is
    /// `RET_PF_RETRY` with nothing changed.
    @Test func aFaultThatKeepsLosingGivesUpAndRetries() throws {
        let fixture = try TDPFixture()
        try fixture.addSlot(id: 0, baseGFN: 0, pages: 16, flags: .logDirtyPages)
        try fixture.fault(2, .write)
        _ = try fixture.mmu.getDirtyLog(slot: 0)
        var attempts = 0
        fixture.mmu.beforeAtomicUpdate = { slot, _ in
            attempts += 1
            _ = slot.exchange(SPTE(slot.load().rawValue ^ fixture.masks.accessed))
        }
        let fast = fixture.mmu.stats.pfFast
        #expect(try fixture.mmu.pageFault(at: GuestPhysicalAddress(2 << 12), errorCode: [.write, .present],
                                          root: fixture.root) == .retry)
        #expect(attempts == 5 + 1 && fixture.mmu.stats.pfFast == fast)
        fixture.mmu.beforeAtomicUpdate = nil
        #expect(try fixture.fault(2, .write, present: true) == .fixed)
        #expect(fixture.mmu.stats.pfFast == fast + 1)
        fixture.expectClean("fast path")
    }
}
