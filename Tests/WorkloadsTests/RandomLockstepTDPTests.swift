import Testing
import VirtualMachine
import Workloads

/// The randomized lockstep scenarios (RandomLockstepTests) with the guest's paging in hardware over
/// KVM's TDP MMU, EPT and NPT: the same guests, the same architecture to agree with, but the
/// hardware's own TLB and paging-structure caches instead of KVM's shadow pages (`host levels=`
/// is the shadow MMU's and has no effect here). Seeds: the default ones under EPT and NPT;
/// `VIRTMMU_EXHAUSTIVE=1` adds the exhaustive seeds under EPT.
@Suite struct RandomLockstepTDPTests {
    static let cases: [(seed: UInt64, mmu: String)] =
        RandomLockstep.seeds.flatMap { [($0, "ept"), ($0, "npt")] }

    static func machine(_ name: String) -> VirtualMachineMMU { name == "ept" ? .ept() : .npt() }

    /// The seed's scenario under `mmu`: nil when it runs in lockstep to the end (or is one the
    /// generator itself rejects), else the failure.
    static func failure(seed: UInt64, mmu: String) -> String? {
        let (_, directives) = LockstepSeed.directives(seed)
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
        let failure = RandomLockstepTDPTests.failure(seed: seed, mmu: "ept")
        #expect(failure == nil, "seed \(seed) under EPT: \(failure ?? "")")
    }
}
