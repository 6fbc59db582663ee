import Foundation
import GuestMemory
import Synchronization
import Testing
import X86Paging
@testable import KVMMMU

extension TDPMMUConcurrencyTests {
    /// Sub-page write protection under real threads: vCPUs taking write faults on protected pages
    /// (the SPP step before the fast path, its compare-and-exchange re-arming leaves dirty logging
    /// set aside), SPPT misses under the lock for write and hardware A/D updates, against a thread
    /// that changes permissions, toggles dirty logging, reads the log, splits, recovers and zaps.
    /// Afterwards every invariant holds (SPP's auditor included), no protected page is mapped huge
    /// or writable, and GET returns the last bitmaps set.
    @Test func subPageProtectionRacesFaultsAndDirtyLogging() throws {
        let fixture = try TDPFixture()
        let slot = try fixture.addSlot(id: 0, baseGFN: 4 * pages1G, pages: 4 * pages2M)
        let mmu = fixture.mmu
        try mmu.enableSubPageProtection()
        mmu.events.isRecording = false
        let base = slot.baseFrame.rawValue
        let vcpus = 3
        let failures = Mutex<[String]>([])
        let vcpusRunning = Atomic<Int>(vcpus)
        let mutatorOperations = Atomic<Int>(0)
        let arrived = Atomic<Int>(0)
        @Sendable func startTogether() {
            arrived.add(1, ordering: .acquiringAndReleasing)
            while arrived.load(ordering: .acquiring) < vcpus + 1 { sched_yield() }
        }
        /// A few hot gfns in each 2 MiB block, sometimes any gfn of the slot.
        @Sendable func pick(_ random: inout TDPRandom) -> UInt64 {
            random.chance(7, in: 8) ? base + random.below(4) * pages2M + random.below(16) : base + random.below(slot.pageCount)
        }
        let group = DispatchGroup()
        for vcpu in 0..<vcpus {
            group.enter()
            Thread {
                defer { group.leave() }
                do {
                    var random = TDPRandom(seed: UInt64(vcpu) &+ 0x5B5)
                    defer { vcpusRunning.subtract(1, ordering: .releasing) }
                    startTogether()
                    try Self.vcpuSteps(mmu, mutatorOperations: mutatorOperations) { root, _ in
                        let gfn = pick(&random)
                        switch random.below(8) {
                        case 0: Self.hardwareAccess(mmu, root: root, gfn: gfn, write: random.chance(1, in: 2))
                        case 1: try mmu.handleSubPageTableMiss(at: GuestFrameNumber(gfn).address, vcpuID: vcpu)
                        default:
                            var code: PageFaultErrorCode = random.chance(3, in: 4) ? [.write] : [.user]
                            if random.chance(2, in: 3) { code.insert(.present) }
                            _ = try mmu.pageFault(at: GuestFrameNumber(gfn).address, errorCode: code, root: root, vcpuID: vcpu)
                        }
                    }
                } catch {
                    failures.withLock { $0.append("vCPU \(vcpu): \(error)") }
                }
            }.start()
        }
        let lastSet = Mutex<[UInt64: SubPageWriteMask]>([:])
        group.enter()
        Thread {
            defer { group.leave() }
            do {
                var random = TDPRandom(seed: 0x5EED)
                var logging = false
                startTogether()
                while mutatorOperations.load(ordering: .relaxed) < 3000 && vcpusRunning.load(ordering: .acquiring) > 0 {
                    mutatorOperations.add(1, ordering: .relaxed)
                    let gfn = pick(&random)
                    switch random.below(10) {
                    case 0, 1, 2, 3:
                        let count = Int(min(1 + random.below(8), slot.endFrame.rawValue - gfn))
                        let masks = (0..<count).map { _ in
                            random.chance(1, in: 4) ? SubPageWriteMask.allWritable : SubPageWriteMask(UInt32(truncatingIfNeeded: random.next()))
                        }
                        try mmu.setSubpageAccess(gfn: GuestFrameNumber(gfn), count: count, masks: masks)
                        lastSet.withLock { for (offset, mask) in masks.enumerated() { $0[gfn + UInt64(offset)] = mask } }
                    case 4:
                        logging.toggle()
                        try mmu.setMemslotFlags(id: 0, flags: logging ? .logDirtyPages : [])
                    case 5 where logging: _ = try mmu.getDirtyLog(slot: 0)
                    case 6: try mmu.splitHugePages(slot: 0, targetLevel: 1)
                    case 7: try mmu.recoverHugePages(slot: 0)
                    case 8: mmu.zapGFNRange(gfn..<gfn + 1 + random.below(pages2M))
                    default: if random.chance(1, in: 4) { mmu.zapAllFast() } else { try mmu.writeProtectSlot(0, minLevel: 1) }
                    }
                }
            } catch {
                failures.withLock { $0.append("mutator: \(error)") }
            }
        }.start()
        group.wait()

        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        fixture.expectClean("SPP: the race")
        try fixture.reloadRootIfInvalid()
        for (gfn, mask) in lastSet.withLock({ $0 }) {
            #expect(try mmu.getSubpageAccess(gfn: GuestFrameNumber(gfn), count: 1) == [mask], "gfn \(hex(gfn))")
            guard mask != .allWritable, let mapping = mmu.mapping(of: gfn, in: fixture.root), mapping.spte.isShadowPresent
            else { continue }
            #expect(mapping.level == 1 && !mapping.spte.isWritable, "protected gfn \(hex(gfn)) mapped \(mapping)")
        }
    }
}
