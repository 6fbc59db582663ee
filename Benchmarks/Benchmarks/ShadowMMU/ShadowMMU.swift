// Shadow-MMU benchmarks (ordo-one/benchmark): the cost of a shadow page fault, from the exit to
// the retried access succeeding, and of an access that hits the TLB, on a VirtualMachine with a
// 4-level guest (no lockstep reference machine, no auditor). Baselines in the same run: the
// 4-level walk of the PageWalk benchmarks, the two walks a fault makes on the VM's own memory, and
// a bare direct-mapped probe + load for the TLB hit.
//
// Fault benchmarks make 1,000 faults per iteration (scalingFactor .kilo, so times are per fault):
// each iteration builds a fresh VM outside the measured region (startMeasurement/stopMeasurement),
// faults 1,000 of its targets, and checks afterwards that each took exactly one exit and
// installed what it should. The harness divides malloc counts by the scaling factor too, so
// they are per fault.
//
//   cd Benchmarks && swift package --scratch-path .build-bench benchmark --target ShadowMMU
//   swift package --scratch-path .build-bench benchmark --filter 'ShadowFault/.*'

import Benchmark
import PagingFixtures
import ShadowFixtures
import X86Paging

/// Fixtures built once per process (the harness runs each benchmark in its own process).
enum Shared {
    nonisolated(unsafe) static var tlb: TLBFixture?
    nonisolated(unsafe) static var breakdown: WalkBreakdownFixture?
    nonisolated(unsafe) static var floor: TLBFloorFixture?
    nonisolated(unsafe) static var spp: SPPTLBFixture?

    static func sppFixture() -> SPPTLBFixture {
        if let spp { return spp }
        let fixture = SPPTLBFixture()
        spp = fixture
        return fixture
    }

    static func tlbFixture() -> TLBFixture {
        if let tlb { return tlb }
        let fixture = TLBFixture()
        tlb = fixture
        return fixture
    }

    static func breakdownFixture() -> WalkBreakdownFixture {
        if let breakdown { return breakdown }
        let fixture = WalkBreakdownFixture()
        breakdown = fixture
        return fixture
    }

    static func floorFixture() -> TLBFloorFixture {
        if let floor { return floor }
        let fixture = TLBFloorFixture(tlbFixture())
        floor = fixture
        return fixture
    }
}

let benchmarks: @Sendable () -> Void = {
    let perOperation = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        timeUnits: .nanoseconds,
        warmupIterations: 2,
        scalingFactor: .mega,
        maxDuration: .seconds(2),
        maxIterations: 30
    )
    let perFault = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal, .mallocCountSmall, .mallocCountLarge],
        timeUnits: .nanoseconds,
        warmupIterations: 2,
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 50
    )

    /// A loop benchmark: `kernel` runs `count` operations and returns a checksum.
    func loop(_ name: String, _ setup: @escaping @Sendable () -> Void, _ kernel: @escaping @Sendable (Int) -> UInt64) {
        var configuration = perOperation
        configuration.setup = setup
        Benchmark(name, configuration: configuration) { benchmark in
            blackHole(kernel(benchmark.scaledIterations.count))
        }
    }

    // Baselines: the plain 4-level walk and its load chain (the PageWalk fixture).
    loop("Baseline/Radix chain x4 (4-level)", { _ = Fixtures.fourLevel }) {
        radixChain64(Fixtures.fourLevel, levels: 4, count: $0)
    }
    loop("Baseline/Walk4Level 4K probe", { _ = Fixtures.fourLevel }) { walkProbe(Fixtures.fourLevel, count: $0) }

    // The walks inside a warm fault, on the VM's own memory: the guest walk over the memslots,
    // and the hardware walk over the SPTEs (failing at the PTE, then succeeding).
    loop("FaultParts/guest walk (memslots, A-D)", { _ = Shared.breakdownFixture() }) {
        runGuestWalks(Shared.breakdownFixture(), count: $0)
    }
    loop("FaultParts/hardware walk, SPTE not present", { _ = Shared.breakdownFixture() }) {
        runHardwareWalks(Shared.breakdownFixture(), mapped: false, count: $0)
    }
    loop("FaultParts/hardware walk, SPTE present", { _ = Shared.breakdownFixture() }) {
        runHardwareWalks(Shared.breakdownFixture(), mapped: true, count: $0)
    }

    // Shadow faults, 1,000 per iteration on a fresh VM.
    func faults(_ name: String, _ kind: FaultKind, access: Access = .read(.user)) {
        precondition(FaultFixture.capacity(kind) >= 1000)
        Benchmark(name, configuration: perFault) { benchmark in
            let fixture = FaultFixture(kind, access: access)
            let count = benchmark.scaledIterations.count
            benchmark.startMeasurement()
            let (exits, checksum) = runFaults(fixture, count: count)
            benchmark.stopMeasurement()
            blackHole(checksum)
            fixture.verify(count: count, exits: exits)
        }
    }
    // The floor under the retried access: a dependent host load from each target page of a
    // fresh warm fixture (the memory cost of touching a new page, without any MMU).
    Benchmark("Baseline/first touch of the fault targets (dependent loads)", configuration: perFault) { benchmark in
        let fixture = FaultFixture(.warm)
        let addresses = fixture.hostAddresses()
        let count = benchmark.scaledIterations.count
        benchmark.startMeasurement()
        let checksum = runFirstTouch(addresses, count: count)
        benchmark.stopMeasurement()
        blackHole(checksum)
    }
    faults("ShadowFault/4K read, PT shadowed (1 exit, 1 SPTE)", .warm)
    faults("ShadowFault/4K write, PT shadowed (1 exit, 1 SPTE)", .warm, access: .write(.user))
    faults("ShadowFault/4K read + prefetch 7 (1 exit, 8 SPTEs)", .warmPrefetch)
    faults("ShadowFault/cold, new PT shadow page", .coldPT)
    faults("ShadowFault/cold, new PD + PT shadow pages", .coldPD)
    // KVM's fault handler alone (no vCPU): an L1 4 KiB fault and an L2 one through shadow EPT.
    func nestedFaults(_ name: String, nested: Bool) {
        precondition(NestedFaultFixture.capacity >= 1000)
        Benchmark(name, configuration: perFault) { benchmark in
            let fixture = NestedFaultFixture(nested: nested)
            let count = benchmark.scaledIterations.count
            benchmark.startMeasurement()
            let fixed = runNestedFaults(fixture, count: count)
            benchmark.stopMeasurement()
            fixture.verify(count: count, fixed: fixed)
        }
    }
    nestedFaults("NestedFault/L1 4K at KVM's handler (shadow paging)", nested: false)
    nestedFaults("NestedFault/L2 4K at KVM's handler (shadow EPT)", nested: true)

    // TLB hits, 1,000,000 accesses per iteration.
    loop("Baseline/TLB floor: probe + load (64 pages)", { _ = Shared.floorFixture() }) {
        runTLBFloor(Shared.floorFixture(), count: $0)
    }
    func hits(_ name: String, _ addresses: @escaping @Sendable (TLBFixture) -> [GuestVirtualAddress], _ access: Access) {
        loop(name, { _ = Shared.tlbFixture() }) { count in
            let fixture = Shared.tlbFixture()
            let (hits, checksum) = runTLBHits(fixture, addresses(fixture), access: access, count: count)
            precondition(hits == count, "\(count - hits) of \(count) accesses missed the TLB")
            return checksum
        }
    }
    hits("TLBHit/read, 1 page", { $0.one }, .read(.user))
    hits("TLBHit/read, 64 pages", { $0.sixtyFour }, .read(.user))
    hits("TLBHit/write, 64 pages", { $0.sixtyFour }, .write(.user))
    // Issue 8: a write SPP checks and allows, against an ordinary write, both TLB hits under TDP.
    func tdpWriteHits(_ name: String, _ addresses: @escaping @Sendable (SPPTLBFixture) -> [GuestVirtualAddress]) {
        loop(name, { _ = Shared.sppFixture() }) { count in
            let fixture = Shared.sppFixture()
            let (hits, checksum) = runTLBHits(on: fixture.guest.vcpu, addresses(fixture), access: .write(.user), count: count)
            precondition(hits == count, "\(count - hits) of \(count) writes missed the TLB")
            return checksum
        }
    }
    tdpWriteHits("TLBHit/TDP write, 64 pages", { $0.plain })
    tdpWriteHits("TLBHit/TDP write SPP-allowed, 64 pages", { $0.protected })
}
