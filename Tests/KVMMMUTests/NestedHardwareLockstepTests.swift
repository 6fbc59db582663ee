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

/// What KVM made of one fault of the hardware's walk.
enum KVMAnswer {
    /// Fixed (or nothing to do): the access runs again.
    case retry
    /// Reflected to L1, as the architecture has it (the outcome's name for the tally).
    case reflected(String)
    /// Anything else, with what went wrong.
    case wrong(String)
}

/// The parts both lockstep suites share: L2's tables, and one access run to its end.
enum NestedLockstep {
    /// L2's guest-physical space [0, 2 MiB) lives in L1 at +4 MiB; L2's tables from 1 MiB up.
    static let l1Offset: UInt64 = 0x40_0000
    static let l2Pages = 512
    static let l2TableBase: UInt64 = 0x10_0000
    static let l2Registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: l2TableBase,
                                             cr4: [.physicalAddressExtension],
                                             efer: [.noExecuteEnable, .longModeEnable, .longModeActive])

    /// Writes 24 random 4-level mappings of L2's (rights, NX, A/D at random; data below the
    /// tables) through `store`/`load` at L2 guest-physical addresses; returns their linear addresses.
    static func buildL2Tables(_ random: inout TDPRandom, store: (UInt64, UInt64) -> Void,
                              load: (UInt64) -> UInt64) -> [UInt64] {
        var nextTable = l2TableBase + 0x1000
        var linears: [UInt64] = []
        for _ in 0..<24 {
            let linear = UInt64(random.below(4)) << 39 | UInt64(random.below(2)) << 30 | UInt64(random.below(2)) << 21
                | UInt64(random.below(16)) << 12
            var table = l2TableBase
            for level in stride(from: 4, to: 1, by: -1) {
                let entry = table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8
                if load(entry) & 1 == 0 {
                    store(nextTable | 0x7, entry)
                    nextTable += 0x1000
                }
                table = load(entry) & 0x000F_FFFF_FFFF_F000
            }
            let data = UInt64(random.below(Int(l2TableBase >> 12))) << 12
            let flags: UInt64 = [0x7, 0x7, 0x5, 0x3, 0x0][random.below(5)] | (random.below(4) == 0 ? 1 << 63 : 0)
                | (random.below(2) == 0 ? 0x60 : 0)
            store(data | flags, table + ((linear >> 12) & 0x1FF) * 8)
            linears.append(linear)
        }
        return linears
    }

    /// Runs an access on `hardware` until it completes, faults in L2, or KVM reflects it, and checks
    /// the end against `oracle`. Returns the outcome's name, or nil after recording what went wrong.
    static func run(_ label: String, oracle: Result<NestedPagingTranslation, NestedPagingFault>,
                    hostFrame: (GuestFrameNumber) -> UInt64,
                    hardware: () throws -> Result<NestedPagingTranslation, NestedPagingFault>,
                    kvm: (NestedPagingFault) throws -> KVMAnswer) throws -> String? {
        for _ in 0..<6 {
            switch try hardware() {
            case .success(let translation):
                guard case .success(let expected) = oracle else {
                    Issue.record("\(label): completed in hardware; the architecture says \(oracle)")
                    return nil
                }
                let frame = hostFrame(expected.outputAddress.frame)
                #expect(translation.outputAddress.rawValue == frame << 12 | translation.guest.physicalAddress.rawValue & 0xFFF,
                        "\(label)")
                #expect(translation.guest.physicalAddress == expected.guest.physicalAddress, "\(label)")
                return "translated"
            case .failure(.guest(let fault)):
                #expect(oracle == .failure(.guest(fault)), "\(label)")
                return "l2 fault"
            case .failure(let fault):
                switch try kvm(fault) {
                case .retry: continue
                case .reflected(let name): return name
                case .wrong(let what):
                    Issue.record("\(label): \(what)")
                    return nil
                }
            }
        }
        Issue.record("\(label): still faulting after six rounds")
        return nil
    }

    /// 120 random accesses to the pages at `linears`, each checked by `run` (the architecture's
    /// walk over L1's memory first: it sets the A/D bits the access sets, which the hardware then
    /// finds), the auditor after each; the outcomes tallied in `counts`.
    static func accesses(_ random: inout TDPRandom, _ linears: [UInt64], label: String, architecture: NestedPagingWalker,
                         memory: MemslotSet, mmu: ShadowMMU, counts: inout [String: Int],
                         hardware: (GuestVirtualAddress, Access) throws -> Result<NestedPagingTranslation, NestedPagingFault>,
                         kvm: (NestedPagingFault, Result<NestedPagingTranslation, NestedPagingFault>) throws -> KVMAnswer)
        throws {
        for step in 0..<120 {
            let linear = GuestVirtualAddress(linears[random.below(linears.count)] | UInt64(random.below(512) * 8))
            let access = Access(AccessKind.allCases[random.below(3)], random.below(2) == 0 ? .user : .supervisor)
            let stepLabel = "\(label) step \(step): \(access) of \(linear)"
            let oracle = architecture.translate(linear, access, in: memory)
            guard let outcome = try run(stepLabel, oracle: oracle, hostFrame: { memory.hostFrame(of: $0)!.rawValue },
                                        hardware: { try hardware(linear, access) }, kvm: { try kvm($0, oracle) })
            else { return }
            counts[outcome, default: 0] += 1
            let audit = mmu.audit()
            #expect(audit.isEmpty, "\(stepLabel): \(audit)")
            if !audit.isEmpty { return }
        }
    }
}

@Suite("L2 in hardware over shadow EPT, in lockstep with the architecture's nested walk")
struct NestedHardwareLockstepTests {
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
        for page in 0..<NestedLockstep.l2Pages {
            let gpa = UInt64(page) << 12
            let rights: UInt64 = [7, 7, 7, 7, 7, 7, 5, 3, 1, 0, 4, 2][random.below(12)]
            fixture.map(gpa, to: gpa + NestedLockstep.l1Offset, permissions: rights)
        }
        let context = try fixture.context(ad: ad)
        let linears = NestedLockstep.buildL2Tables(&random, store: { fixture.store64($0, at: $1 + NestedLockstep.l1Offset) },
                                                   load: { fixture.load64($0 + NestedLockstep.l1Offset) })
        let l2 = try PageWalker(registers: NestedLockstep.l2Registers, memory: fixture.memory)
        let architecture = NestedPagingWalker(guest: l2, tables: .ept(try #require(context.nestedEPT).walker))
        let host = PoolPhysicalView(pool: fixture.pool)
        try NestedLockstep.accesses(&random, linears, label: "ad \(ad) seed \(seed)", architecture: architecture,
                                    memory: fixture.memory, mmu: fixture.mmu, counts: &counts, hardware: { linear, access in
            let (root, _) = try context.load()
            let shadow = try EPTWalker(pointer: EPTPointer(root: root.rootFrame.address.rawValue, levels: 4, accessedDirty: ad))
            return NestedPagingWalker(guest: l2, tables: .ept(shadow)).translate(linear, access, in: host)
        }, kvm: { fault, oracle in
            guard case .eptViolation(let site, var qualification) = fault else { return .wrong("hardware fault \(fault)") }
            qualification.insert(.linearAddressValid)
            switch try context.pageFault(atL2: site.address, errorCode: TDPMMU.errorCode(forEPTViolation: qualification)) {
            case .handled(.fixed), .handled(.spurious), .handled(.retry):
                return .retry
            case .reflect(.eptViolation(let address, let reflected)):
                guard case .failure(.eptViolation(let expectedSite, let expected)) = oracle,
                      address == expectedSite.address, site.guestLevel == expectedSite.guestLevel, reflected == expected
                else { return .wrong("reflected a violation at \(address) (\(reflected)); the architecture says \(oracle)") }
                return .reflected(site.isFinal ? "violation on the page" : "violation on a table")
            case .reflect(.eptMisconfiguration(let address)):
                guard case .failure(.eptMisconfiguration(let expectedSite)) = oracle,
                      address == expectedSite.address, site.guestLevel == expectedSite.guestLevel
                else { return .wrong("reflected a misconfiguration at \(address); the architecture says \(oracle)") }
                return .reflected("misconfiguration")
            case let other:
                return .wrong("KVM answered \(other)")
            }
        })
    }
}

@Suite("L2 in hardware over shadow NPT, in lockstep with the architecture's nested walk")
struct NestedNPTHardwareLockstepTests {
    @Test("Random L2 tables over random L1 NPT rights, on a 4- and a 5-level host", arguments: [4, 5])
    func lockstep(hostLevels: Int) throws {
        var counts: [String: Int] = [:]
        for seed in 0..<8 {
            try run(hostLevels: hostLevels, seed: UInt64(seed), counts: &counts)
        }
        for outcome in ["translated", "l2 fault", "#NPF on a table", "#NPF on the page"] {
            #expect(counts[outcome, default: 0] > 0, "no \(outcome) in \(counts)")
        }
    }

    func run(hostLevels: Int, seed: UInt64, counts: inout [String: Int]) throws {
        var random = TDPRandom(seed: seed &* 0x51ED &+ UInt64(hostLevels))
        let fixture = try ShadowNPTFixture()
        for page in 0..<NestedLockstep.l2Pages {
            let gpa = UInt64(page) << 12
            let flags: UInt64 = [0x7, 0x7, 0x7, 0x7, 0x27, 0x67, 0x5, 0x3, 0x0, 0x7 | 1 << 63][random.below(10)]
            fixture.map(gpa, to: gpa + NestedLockstep.l1Offset, flags: flags)
        }
        let context = try fixture.context(hostLevels: hostLevels)
        let linears = NestedLockstep.buildL2Tables(&random, store: { fixture.store64($0, at: $1 + NestedLockstep.l1Offset) },
                                                   load: { fixture.load64($0 + NestedLockstep.l1Offset) })
        let efer: EFER = [.noExecuteEnable, .longModeEnable, .longModeActive]
        let l2 = try PageWalker(registers: NestedLockstep.l2Registers, memory: fixture.memory)
        let l1NPT = try PageWalker(registers: PagingRegisters(cr0: [.paging, .protectionEnable], cr3: fixture.nestedCR3,
                                                              cr4: [.physicalAddressExtension], efer: efer),
                                   memory: fixture.memory)
        let architecture = NestedPagingWalker(guest: l2, tables: .npt(l1NPT))
        let host = PoolPhysicalView(pool: fixture.pool)
        try NestedLockstep.accesses(&random, linears, label: "host \(hostLevels) seed \(seed)", architecture: architecture,
                                    memory: fixture.memory, mmu: fixture.mmu, counts: &counts, hardware: { linear, access in
            let (root, _) = try context.load()
            var cr4: CR4 = [.physicalAddressExtension]
            if root.mode == .fiveLevel { cr4.insert(.la57) }
            let shadow = try PageWalker(registers: PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect],
                                                                   cr3: root.rootFrame.address.rawValue, cr4: cr4, efer: efer),
                                        memory: host)
            return NestedPagingWalker(guest: l2, tables: .npt(shadow)).translate(linear, access, in: host)
        }, kvm: { fault, oracle in
            guard case .nestedPageFault(let site, let errorCode) = fault else { return .wrong("hardware fault \(fault)") }
            switch try context.pageFault(atL2: site.address, errorCode: errorCode) {
            case .handled(.fixed), .handled(.spurious), .handled(.retry):
                return .retry
            case .reflect(.nestedPageFault(let address, let reflected)):
                guard case .failure(.nestedPageFault(let expectedSite, let expected)) = oracle,
                      address == expectedSite.address, site.guestLevel == expectedSite.guestLevel, reflected == expected
                else { return .wrong("reflected a #NPF at \(address) (\(reflected)); the architecture says \(oracle)") }
                return .reflected(site.isFinal ? "#NPF on the page" : "#NPF on a table")
            case let other:
                return .wrong("KVM answered \(other)")
            }
        })
    }
}
