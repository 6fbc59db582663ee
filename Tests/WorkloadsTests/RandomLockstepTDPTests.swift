import Testing
import VirtualMachine
import Workloads

/// The randomized lockstep scenarios (RandomLockstepTests) with the guest's paging in hardware over
/// KVM's TDP MMU, EPT and NPT: the same guests, the same architecture to agree with, but the
/// hardware's own TLB and paging-structure caches instead of KVM's shadow pages (`host levels=`
/// is the shadow MMU's and has no effect here). Seeds: the default ones under EPT and NPT;
/// `VIRTMMU_EXHAUSTIVE=1` adds the exhaustive seeds under EPT. `ept-nx` runs them with KVM's NX
/// huge-page mitigation on and a recovery pass every few operations: executable accesses split huge
/// leaves, recovery zaps the splits, and the guest must see exactly the same.
@Suite struct RandomLockstepTDPTests {
    static let cases: [(seed: UInt64, mmu: String)] =
        RandomLockstep.seeds.flatMap { [($0, "ept"), ($0, "npt"), ($0, "ept-nx")] }

    static func machine(_ name: String) -> VirtualMachineMMU {
        switch name {
        case "npt": return .npt()
        case "ept-nx":
            guard case .tdp(var configuration) = VirtualMachineMMU.ept() else { preconditionFailure("EPT is TDP") }
            configuration.nxHugePages = true
            configuration.nxHugePagesRecoveryRatio = 2
            return .tdp(configuration)
        default: return .ept()
        }
    }

    /// The seed's directives, with a recovery pass after every fifth directive from the first
    /// guest operation on under `ept-nx`.
    static func directives(seed: UInt64, mmu: String) -> [ScenarioDirective] {
        let (_, directives) = LockstepSeed.directives(seed)
        guard mmu == "ept-nx", let start = directives.firstIndex(where: \.isGuestOperation) else { return directives }
        var spliced = Array(directives[..<start])
        for (offset, directive) in directives[start...].enumerated() {
            spliced.append(directive)
            if offset % 5 == 4 { spliced.append(.nxRecover) }
        }
        return spliced
    }

    /// The seed's scenario under `mmu`: nil when it runs in lockstep to the end (or is one the
    /// generator itself rejects), else the failure.
    static func failure(seed: UInt64, mmu: String) -> String? {
        let directives = Self.directives(seed: seed, mmu: mmu)
        guard let scenario = try? Scenario(name: "random-lockstep-\(seed)-\(mmu)", directives: directives) else {
            return "the generated scenario does not parse"
        }
        do {
            _ = try ScenarioRunner(scenario: scenario, mmu: machine(mmu)).run()
            return nil
        } catch {
            if case .badScenario(let line, let message) = error, message.contains("has no level-") {
                _ = line
                return nil
            }
            return "\(error)"
        }
    }

    @Test(arguments: cases)
    func seedAgreesWithTheArchitecture(seed: UInt64, mmu: String) {
        let failure = Self.failure(seed: seed, mmu: mmu)
        #expect(failure == nil, "seed \(seed) under \(mmu): \(failure ?? "")")
    }
}

@Suite struct ExhaustiveRandomLockstepTDPTests {
    @Test(.enabled(if: RandomLockstep.exhaustive), arguments: RandomLockstep.exhaustiveSeeds)
    func seedAgreesWithTheArchitectureUnderEPT(seed: UInt64) {
        // Every fourth seed with the NX huge-page mitigation and its recovery.
        let mmu = seed % 4 == 3 ? "ept-nx" : "ept"
        let failure = RandomLockstepTDPTests.failure(seed: seed, mmu: mmu)
        #expect(failure == nil, "seed \(seed) under \(mmu): \(failure ?? "")")
    }
}
