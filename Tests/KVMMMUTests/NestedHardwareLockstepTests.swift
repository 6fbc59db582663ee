// L2 running in hardware over KVM's shadow EPT, in lockstep with the architecture. The hardware is
// the nested walk itself: L2's page walker over host memory, every L2 guest-physical address
// translated through the shadow EPT root (with A/D as KVM's EPTP for L2 has them: L1's EPTP.AD).
// An EPT violation goes to KVM's handler; what it reflects, and every access that completes, must be
// what the architecture's nested walk over L1's own EPT gives: the same host page, the same L2
// fault, or the same exit with the same qualification reported at the same level of L2's walk.

import GuestMemory
@testable import KVMMMU
import Testing
import X86Paging

@Suite("L2 in hardware over shadow EPT, in lockstep with the architecture's nested walk")
struct NestedHardwareLockstepTests {
    /// L2's guest-physical space [0, 2 MiB) lives in L1 at +4 MiB; L2's tables from 1 MiB up.
    static let l1Offset: UInt64 = 0x40_0000
    static let l2Pages = 512
    static let l2TableBase: UInt64 = 0x10_0000

    @Test("Random L2 tables over random L1 EPT rights", arguments: [false, true])
    func lockstep(ad: Bool) throws {
        var counts: [String: Int] = [:]
        for seed in 0..<8 {
            try run(ad: ad, seed: UInt64(seed), counts: &counts)
        }
        for outcome in ["translated", "l2 fault", "violation on a table", "violation on the page", "misconfiguration"] {
            #expect(counts[outcome, default: 0] > 0, "no \(outcome) in \(counts)")
        }
    }

    func run(ad: Bool, seed: UInt64, counts: inout [String: Int]) throws {
        var random = TDPRandom(seed: seed &* 0x9E37 &+ (ad ? 1 : 0))
        let fixture = try ShadowEPTFixture()
        // L1's EPT for L2's pages: mostly full rights, some read-only, read/execute, absent,
        // execute-only and (misconfigured) write-only.
        for page in 0..<Self.l2Pages {
            let gpa = UInt64(page) << 12
            let rights: UInt64 = [7, 7, 7, 7, 7, 7, 5, 3, 1, 0, 4, 2][random.below(12)]
            fixture.map(gpa, to: gpa + Self.l1Offset, permissions: rights)
        }
        let context = try fixture.context(ad: ad)
        // L2's 4-level tables, written into L1's memory where L1's EPT puts them.
        var nextTable = Self.l2TableBase + 0x1000
        let root = Self.l2TableBase
        func l2Store(_ value: UInt64, at l2: UInt64) { fixture.store64(value, at: l2 + Self.l1Offset) }
        func l2Load(_ l2: UInt64) -> UInt64 { fixture.load64(l2 + Self.l1Offset) }
        var linears: [UInt64] = []
        for _ in 0..<24 {
            let linear = UInt64(random.below(4)) << 39 | UInt64(random.below(2)) << 30 | UInt64(random.below(2)) << 21
                | UInt64(random.below(16)) << 12
            var table = root
            for level in stride(from: 4, to: 1, by: -1) {
                let entry = table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
                if l2Load(entry) & 1 == 0 {
                    l2Store(nextTable | 0x7, at: entry)
                    nextTable += 0x1000
                }
                table = l2Load(entry) & 0x000F_FFFF_FFFF_F000
            }
            let data = UInt64(random.below(Int(Self.l2TableBase >> 12))) << 12
            let flags: UInt64 = [0x7, 0x7, 0x5, 0x3, 0x0][random.below(5)] | (random.below(4) == 0 ? 1 << 63 : 0)
                | (random.below(2) == 0 ? 0x60 : 0)
            l2Store(data | flags, at: table + ((linear >> 12) & 0x1FF) * 8)
            linears.append(linear)
        }
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: root,
                                        cr4: [.physicalAddressExtension],
                                        efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
        let l2 = try PageWalker(registers: registers, memory: fixture.memory)
        let nestedEPT = try #require(context.nestedEPT)
        let architecture = NestedPagingWalker(guest: l2, tables: .ept(nestedEPT.walker))
        let host = PoolPhysicalView(pool: fixture.pool)
        for step in 0..<120 {
            let linear = linears[random.below(linears.count)] | UInt64(random.below(512) * 8)
            let access = Access(AccessKind.allCases[random.below(3)], random.below(2) == 0 ? .user : .supervisor)
            let label = "ad \(ad) seed \(seed) step \(step): \(access) of \(String(linear, radix: 16))"
            // The architecture first (it sets the A/D bits the access sets; the hardware then finds them).
            let oracle = architecture.translate(GuestVirtualAddress(linear), access, in: fixture.memory)
            var settled = false
            for _ in 0..<6 where !settled {
                let (hardwareRoot, _) = try context.load()
                let shadow = try EPTWalker(pointer: EPTPointer(root: hardwareRoot.rootFrame.address.rawValue, levels: 4,
                                                               accessedDirty: ad))
                let hardware = NestedPagingWalker(guest: l2, tables: .ept(shadow))
                switch hardware.translate(GuestVirtualAddress(linear), access, in: host) {
                case .success(let translation):
                    guard case .success(let expected) = oracle else {
                        Issue.record("\(label): completed in hardware; the architecture says \(oracle)")
                        return
                    }
                    let frame = fixture.memory.hostFrame(of: expected.outputAddress.frame)!.rawValue
                    #expect(translation.outputAddress.rawValue == frame << 12 | linear & 0xFFF, "\(label)")
                    #expect(translation.guest.physicalAddress == expected.guest.physicalAddress, "\(label)")
                    counts["translated", default: 0] += 1
                    settled = true
                case .failure(.guest(let fault)):
                    #expect(oracle == .failure(.guest(fault)), "\(label)")
                    counts["l2 fault", default: 0] += 1
                    settled = true
                case .failure(.eptViolation(let site, var qualification)):
                    qualification.insert(.linearAddressValid)
                    let result = try context.pageFault(atL2: site.address,
                                                       errorCode: TDPMMU.errorCode(forEPTViolation: qualification))
                    switch result {
                    case .handled(.fixed), .handled(.spurious), .handled(.retry):
                        continue
                    case .handled(let other):
                        Issue.record("\(label): KVM answered \(other)")
                        return
                    case .reflect(.eptViolation(let address, let reflected)):
                        guard case .failure(.eptViolation(let expectedSite, let expected)) = oracle else {
                            Issue.record("\(label): reflected a violation; the architecture says \(oracle)")
                            return
                        }
                        #expect(address == expectedSite.address && site.guestLevel == expectedSite.guestLevel, "\(label)")
                        #expect(reflected == expected, "\(label)")
                        counts[site.isFinal ? "violation on the page" : "violation on a table", default: 0] += 1
                        settled = true
                    case .reflect(.eptMisconfiguration(let address)):
                        guard case .failure(.eptMisconfiguration(let expectedSite)) = oracle else {
                            Issue.record("\(label): reflected a misconfiguration; the architecture says \(oracle)")
                            return
                        }
                        #expect(address == expectedSite.address && site.guestLevel == expectedSite.guestLevel, "\(label)")
                        counts["misconfiguration", default: 0] += 1
                        settled = true
                    case .reflect(let other):
                        Issue.record("\(label): reflected \(other)")
                        return
                    }
                case .failure(let other):
                    Issue.record("\(label): the hardware walk failed with \(other)")
                    return
                }
            }
            #expect(settled, "\(label): still faulting after six rounds")
            let audit = fixture.mmu.audit()
            #expect(audit.isEmpty, "\(label): \(audit)")
            if !audit.isEmpty { return }
        }
    }
}
