// Shadow EPT in lockstep with the architecture: L1 rewrites random entries of its EPT (any R/W/X,
// misconfigurations included, any output page, A/D bits), invalidates with INVEPT as the
// architecture requires, and L2 makes random accesses. Each access runs as the hardware would: a
// walk of the shadow EPT tables, and on a violation KVM's fault handler, until the access goes
// through, is emulated, or an exit is reflected to L1. The outcome must be the one an EPT walk of
// L1's own tables gives: the same host page with the access allowed, or the same exit with the same
// qualification. The structural auditor runs after every step.

import GuestMemory
@testable import KVMMMU
import Testing
import X86Paging

/// The test's choices: the target's SplitMix64, with an `Int` bound.
typealias Choices = TDPRandom

extension TDPRandom {
    mutating func below(_ bound: Int) -> Int { Int(below(UInt64(bound))) }
}

@Suite("Shadow EPT in lockstep with the architecture")
struct ShadowEPTLockstepTests {
    /// L2 pages: 48 sharing two L1 page tables, and 16 each under its own page directory entry.
    static let l2Pages: [UInt64] = (0..<48).map { 0x1000_0000 + UInt64($0) * 0x1000 + ($0 >= 24 ? 0x20_0000 : 0) }
        + (0..<16).map { 0x4000_0000 + UInt64($0) * 0x4000_0000 / 8 }
    /// L1 pages L1's EPT may point at (data, and one of L1's own EPT tables now and then).
    static let l1Pages: [UInt64] = (0..<16).map { 0x80_0000 + UInt64($0) * 0x1000 }

    @Test("Random L1 EPT rewrites and L2 accesses", arguments: [(4, false), (4, true), (5, false), (5, true)])
    func lockstep(levels: Int, ad: Bool) throws {
        var outcomes: [Outcome: Int] = [:]
        for seed in 0..<6 {
            try run(levels: levels, ad: ad, seed: UInt64(seed), steps: 150, outcomes: &outcomes)
        }
        // The runs reach every kind of outcome.
        for outcome in [Outcome.translated, .violation, .misconfiguration, .emulated] {
            #expect(outcomes[outcome, default: 0] > 0, "no \(outcome) in \(outcomes)")
        }
    }

    enum Outcome: Hashable { case translated, violation, misconfiguration, emulated, failed }

    func run(levels: Int, ad: Bool, seed: UInt64, steps: Int, outcomes: inout [Outcome: Int]) throws {
        var choices = Choices(seed: seed &* 7919 &+ UInt64(levels) &+ (ad ? 1 << 32 : 0))
        let fixture = try ShadowEPTFixture(levels: levels)
        let context = try fixture.context(ad: ad)
        for page in Self.l2Pages { fixture.map(page, to: Self.l1Pages[choices.below(Self.l1Pages.count)], permissions: 7) }
        let label = "levels \(levels) ad \(ad) seed \(seed)"
        var recent = Self.l2Pages[0]
        for step in 0..<steps {
            // Half the accesses go to the page L1 rewrote last, so that rewrites are seen.
            let page = choices.below(2) == 0 ? recent : Self.l2Pages[choices.below(Self.l2Pages.count)]
            if choices.below(3) == 0 {
                rewrite(page, fixture, context, &choices, ad: ad)
                recent = page
            } else {
                let kind = AccessKind.allCases[choices.below(3)]
                let address = page | UInt64(choices.below(512) * 8)
                outcomes[try access(address, kind, fixture, context, "\(label) step \(step)"), default: 0] += 1
            }
            let audit = fixture.mmu.audit()
            #expect(audit.isEmpty, "\(label) step \(step): \(audit)")
            if !audit.isEmpty { return }
        }
    }

    /// L1 rewrites the leaf (or, one time in eight, the page-directory entry) for `page`, through
    /// the emulator if KVM write-protects that table, then invalidates (INVEPT) and re-enters L2.
    func rewrite(_ page: UInt64, _ fixture: ShadowEPTFixture, _ context: MMUContext, _ choices: inout Choices, ad: Bool) {
        let level = choices.below(8) == 0 ? 2 : 1
        let entry = fixture.entryAddress(page, level: level)
        var value: UInt64
        if level == 1 {
            var output = Self.l1Pages[choices.below(Self.l1Pages.count)]
            if choices.below(6) == 0 { output = fixture.entryAddress(page, level: 2) & ~0xFFF }  // an alias of L1's PD
            value = output | 6 << 3 | UInt64(choices.below(8))
            if output & 0xFFF == 0 && output == fixture.entryAddress(page, level: 2) & ~0xFFF { value |= 3 }
            if ad { value |= UInt64(choices.below(4)) << 8 }
        } else {
            // Only the rights of the PDE change; its table stays.
            value = fixture.load64(entry) & ~7 | UInt64([7, 7, 5, 3, 1, 0][choices.below(6)])
        }
        fixture.store64(value, at: entry)
        let gfn = GuestPhysicalAddress(entry).frame
        let tablePages = fixture.mmu.shadowPages.filter { $0.gfn == gfn && $0.hasGPTEs }
        // L1's write traps unless the only shadow pages of that table are unsync last-level ones.
        if tablePages.contains(where: { $0.level > 1 || !$0.unsync }) {
            fixture.mmu.trackWrite(GuestPhysicalAddress(entry), bytes: 8, fourByteGuestEntries: false)
        }
        if choices.below(2) == 0 {
            context.invalidateEPT(.allContexts)
        } else {
            context.invalidateEPT(.singleContext(context.nestedEPT!.pointer))
        }
        context.loadEPTP(context.nestedEPT!)
    }

    func access(_ address: UInt64, _ kind: AccessKind, _ fixture: ShadowEPTFixture, _ context: MMUContext,
                _ label: String) throws -> Outcome {
        let gpa = GuestPhysicalAddress(address)
        let oracle = context.nestedEPT!.walker.translate(gpa, EPTAccess(kind, origin: .finalTranslation), in: fixture.memory,
                                                         setAccessedDirty: false)
        for _ in 0..<4 {
            let hardware = try fixture.hardwareWalk(context, address, kind)
            switch hardware {
            case .success(let translation):
                // The shadow entry may never give more than L1's tables do.
                guard case .success(let architectural) = oracle else {
                    Issue.record("\(label): \(kind) of \(gpa) went through the shadow EPT; L1's EPT says \(oracle)")
                    return .failed
                }
                let host = fixture.memory.hostFrame(of: architectural.outputAddress.frame)!.rawValue
                #expect(translation.outputAddress.rawValue == host << 12 | address & 0xFFF, "\(label)")
                #expect(translation.permissions & ~architectural.permissions & 7 == 0, "\(label): rights beyond L1's")
                return .translated
            case .failure(.violation(_, var qualification, _, _)):
                qualification.formUnion([.linearAddressValid, .finalTranslation])
                let result = try context.pageFault(atL2: gpa, errorCode: TDPMMU.errorCode(forEPTViolation: qualification))
                switch result {
                case .handled(.fixed), .handled(.spurious), .handled(.retry):
                    continue
                case .handled(.emulate):
                    // A write to a page holding one of L1's shadowed tables: emulated, which the
                    // architecture must allow.
                    guard case .success(let architectural) = oracle, architectural.permissions & 2 != 0 || kind != .write
                    else {
                        Issue.record("\(label): \(kind) of \(gpa) emulated; L1's EPT says \(oracle)")
                        return .failed
                    }
                    return .emulated
                case .handled(let other):
                    Issue.record("\(label): unexpected \(other)")
                    return .failed
                case .reflect(let exit):
                    switch (exit, oracle) {
                    case (.eptViolation(let address, let reflected), .failure(.violation(_, let architectural, _, _))):
                        #expect(address == gpa)
                        #expect(reflected == architectural, "\(label): \(kind) of \(gpa)")
                        return .violation
                    case (.eptMisconfiguration(let address), .failure(.misconfiguration)):
                        #expect(address == gpa)
                        return .misconfiguration
                    default:
                        Issue.record("\(label): \(kind) of \(gpa) reflected \(exit); L1's EPT says \(oracle)")
                        return .failed
                    }
                }
            case .failure(let other):
                Issue.record("\(label): the shadow EPT walk failed with \(other)")
                return .failed
            }
        }
        Issue.record("\(label): \(kind) of \(gpa) still faulting after four rounds")
        return .failed
    }
}
