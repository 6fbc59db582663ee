// A harness-free timer for the shadow-MMU loops: best of several timed repetitions, in ns per
// operation. Fault kernels build a fresh VM per batch (its targets fault once each) and time only
// the accesses; fixture construction, warm-up, verification and teardown are outside the clock.
//   swift build -c release --scratch-path .build-bench --product shadow-timer
//   .build-bench/release/shadow-timer                      # every kernel, best of 5
//   .build-bench/release/shadow-timer fault-4k 200000 1    # one kernel: [count] [repetitions]
//   .build-bench/release/shadow-timer sizes                # sizes of the values the paths copy
// Profiling (a named kernel runs once after a warm-up run of min(count, 10000) operations):
//   perf record -e cpu-clock --call-graph dwarf .build-bench/release/shadow-timer fault-4k 200000 1
//   valgrind --tool=callgrind --toggle-collect='*runFaults*' .build-bench/release/shadow-timer fault-4k 2016 1
// (callgrind then counts 2 x 2016 faults: divide Ir by 4032; use '*runTLBHits*' for the TLB kernels.)
// Frame-pointer call graphs (-g) misattribute the callers of leaf functions such as memcpy.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PagingFixtures
import ShadowFixtures
import VirtualMachine
import X86Paging

func now() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

var sink: UInt64 = 0

struct Kernel {
    let name: String
    /// Operations a default run makes (faults are far slower than walks).
    let defaultCount: Int
    /// Runs `count` operations; returns the nanoseconds they took (timed inside, so fixture set-up
    /// can be excluded) and a checksum.
    let run: (_ count: Int) -> (nanoseconds: UInt64, checksum: UInt64)
}

/// A kernel timed around the whole call (the fixture is built once, before the first call).
func timed(_ name: String, count: Int = 5_000_000, _ body: @escaping (Int) -> UInt64) -> Kernel {
    Kernel(name: name, defaultCount: count) { count in
        let start = now()
        let checksum = body(count)
        return (now() - start, checksum)
    }
}

/// Shadow faults of `kind`: fresh fixtures batch after batch, only the accesses timed.
func faults(_ name: String, _ kind: FaultKind, access: Access = .read(.user), prefaultHost: Bool = true) -> Kernel {
    Kernel(name: name, defaultCount: 100_000) { count in
        var remaining = count
        var elapsed: UInt64 = 0
        var checksum: UInt64 = 0
        while remaining > 0 {
            let fixture = FaultFixture(kind, access: access, prefaultHost: prefaultHost)
            let batch = min(remaining, fixture.targets.count)
            let start = now()
            let (exits, sum) = runFaults(fixture, count: batch)
            elapsed += now() - start
            fixture.verify(count: batch, exits: exits)
            checksum &+= sum
            remaining -= batch
        }
        return (elapsed, checksum)
    }
}

/// The first-touch floor of `kind`'s targets: fresh fixtures as for `faults`, only the host loads timed.
func firstTouch(_ name: String, _ kind: FaultKind) -> Kernel {
    Kernel(name: name, defaultCount: 100_000) { count in
        var remaining = count
        var elapsed: UInt64 = 0
        var checksum: UInt64 = 0
        while remaining > 0 {
            let fixture = FaultFixture(kind)
            let addresses = fixture.hostAddresses()
            let batch = min(remaining, addresses.count)
            let start = now()
            checksum &+= runFirstTouch(addresses, count: batch)
            elapsed += now() - start
            remaining -= batch
        }
        return (elapsed, checksum)
    }
}

nonisolated(unsafe) var rootSwitchFixtures: [Bool: RootSwitchFixture] = [:]
func rootSwitch(pcid: Bool) -> RootSwitchFixture {
    if let fixture = rootSwitchFixtures[pcid] { return fixture }
    let fixture = RootSwitchFixture(pcid: pcid)
    rootSwitchFixtures[pcid] = fixture
    return fixture
}

nonisolated(unsafe) var syncFixtureInstance: SyncFixture?
func syncFixture() -> SyncFixture {
    if let syncFixtureInstance { return syncFixtureInstance }
    let fixture = SyncFixture()
    syncFixtureInstance = fixture
    return fixture
}

nonisolated(unsafe) var tlbFixture: TLBFixture?
func tlb() -> TLBFixture {
    if let tlbFixture { return tlbFixture }
    let fixture = TLBFixture()
    tlbFixture = fixture
    return fixture
}

nonisolated(unsafe) var breakdownFixture: WalkBreakdownFixture?
func breakdown() -> WalkBreakdownFixture {
    if let breakdownFixture { return breakdownFixture }
    let fixture = WalkBreakdownFixture()
    breakdownFixture = fixture
    return fixture
}

nonisolated(unsafe) var floorFixture: TLBFloorFixture?
func floor() -> TLBFloorFixture {
    if let floorFixture { return floorFixture }
    let fixture = TLBFloorFixture(tlb())
    floorFixture = fixture
    return fixture
}

/// 4 KiB faults at `MMUContext`'s handler, L1's own or L2's through shadow EPT: fresh fixtures
/// batch after batch, only the faults timed.
func nestedFaults(_ name: String, nested: Bool) -> Kernel {
    Kernel(name: name, defaultCount: 100_000) { count in
        var remaining = count
        var elapsed: UInt64 = 0
        var checksum: UInt64 = 0
        while remaining > 0 {
            let fixture = NestedFaultFixture(nested: nested)
            let batch = min(remaining, fixture.targets.count)
            let start = now()
            let fixed = runNestedFaults(fixture, count: batch)
            elapsed += now() - start
            fixture.verify(count: batch, fixed: fixed)
            checksum &+= UInt64(fixed)
            remaining -= batch
        }
        return (elapsed, checksum)
    }
}

/// Faults through a vCPU in batches, each on a fresh fixture (only the faults timed), each batch's
/// exits checked by `verify`.
func vcpuFaults<Fixture>(_ name: String, fixture make: @escaping () -> Fixture, targets: KeyPath<Fixture, Int>,
                         run: @escaping (Fixture, Int) -> (exits: Int, checksum: UInt64),
                         verify: @escaping (Fixture, Int, Int) -> Void) -> Kernel {
    Kernel(name: name, defaultCount: 100_000) { count in
        var remaining = count
        var elapsed: UInt64 = 0
        var checksum: UInt64 = 0
        while remaining > 0 {
            let fixture = make()
            let batch = min(remaining, fixture[keyPath: targets])
            let start = now()
            let (exits, sum) = run(fixture, batch)
            elapsed += now() - start
            verify(fixture, batch, exits)
            checksum &+= sum
            remaining -= batch
        }
        return (elapsed, checksum)
    }
}

func tlbHits(_ name: String, _ addresses: @escaping (TLBFixture) -> [GuestVirtualAddress], _ access: Access) -> Kernel {
    timed(name, count: 20_000_000) { count in
        let fixture = tlb()
        let (hits, checksum) = runTLBHits(fixture, addresses(fixture), access: access, count: count)
        precondition(hits == count, "\(name): \(count - hits) of \(count) accesses missed the TLB")
        return checksum
    }
}

/// Populating `count` pages (4 KiB each, about `count` / 2^18 GiB) with one fault each, on one
/// vCPU or on `vcpus` vCPU threads; a fresh guest per run, only the faults timed.
func population(_ name: String, tdp: Bool, vcpus: Int = 1) -> Kernel {
    Kernel(name: name, defaultCount: (1 << 20) - 3) { count in
        let gib = UInt64(max(1, (count + 3 + (1 << 18) - 1) >> 18))
        let fixture = PopulationFixture(bytes: gib << 30, tdp: tdp, vcpus: vcpus)
        let shares = fixture.targets.map { Array($0.prefix((count + vcpus - 1) / vcpus)) }
        let start = now()
        if vcpus == 1 {
            _ = runPopulation(fixture.vcpus[0], shares[0])
        } else {
            try! fixture.vm.runVCPUsOnThreads { vcpu in _ = runPopulation(vcpu, shares[vcpu.id]) }
        }
        let elapsed = now() - start
        if count + 3 == Int(gib << 18) { fixture.verify() }
        return (elapsed, UInt64(count))
    }
}

/// Populating `count` pages of a fresh TDP guest with KVM_PRE_FAULT_MEMORY (one call for the
/// whole range as a VMM makes before starting its vCPUs, or with `vcpus` threads one call each for
/// an equal share): one prefetch fault a page, no guest access; only the calls timed, ns per page.
func preFaultPopulation(_ name: String, vcpus: Int = 1) -> Kernel {
    Kernel(name: name, defaultCount: (1 << 20) - 3) { count in
        let gib = UInt64(max(1, (count + 3 + (1 << 18) - 1) >> 18))
        let fixture = PopulationFixture(bytes: gib << 30, tdp: true, vcpus: vcpus)
        let pagesBefore = fixture.vm.stats.pages4K
        let bytes = UInt64(count + 3) << 12
        let share = (bytes / UInt64(vcpus) + 0xFFF) & ~0xFFF
        let start = now()
        if vcpus == 1 {
            _ = runPreFault(fixture.vcpus[0], bytes: bytes, chunk: bytes)
        } else {
            try! fixture.vm.runVCPUsOnThreads { vcpu in
                let first = UInt64(vcpu.id) * share
                guard first < bytes else { return }
                _ = runPreFault(vcpu, from: first, bytes: min(share, bytes - first))
            }
        }
        let elapsed = now() - start
        let mapped = fixture.vm.stats.pages4K - pagesBefore
        // The fixture's two guest table pages and the page walked before the clock were mapped already.
        precondition(mapped + 3 >= UInt64(count), "\(name): \(mapped) pages mapped for \(count)")
        return (elapsed * UInt64(count) / max(1, mapped), mapped)
    }
}

/// Collecting and clearing the dirty log of a slot of `count` GiB whose every page was written
/// since logging began (4 GiB by default); a fresh guest, only the collection timed, reported per
/// collection.
func dirtyLogCollection(_ name: String, tdp: Bool) -> Kernel {
    Kernel(name: name, defaultCount: 4) { count in
        let fixture = PopulationFixture(bytes: UInt64(max(1, count)) << 30, tdp: tdp)
        let targets = fixture.targets[0]
        _ = runPopulation(fixture.vcpus[0], targets)
        try! fixture.vm.setDirtyLogProtocol(.manualProtect)
        try! fixture.vm.setDirtyLogging(slot: 0, true)
        _ = writeEveryPage(fixture.vcpus[0], targets)
        let start = now()
        let pages = collectAndClearDirtyLog(fixture.vm)
        let elapsed = now() - start
        precondition(pages >= targets.count, "\(name): \(pages) dirty pages for \(targets.count) written")
        // Reported per collection: `count` is the slot's size in GiB.
        return (elapsed * UInt64(max(1, count)), UInt64(pages))
    }
}

nonisolated(unsafe) var sppFixture: SPPTLBFixture?
func spp() -> SPPTLBFixture {
    if let sppFixture { return sppFixture }
    let fixture = SPPTLBFixture()
    sppFixture = fixture
    return fixture
}

/// Writes hitting the TLB under TDP with SPP on: ordinary pages, or pages whose writes SPP checks.
func tdpWriteHits(_ name: String, _ addresses: @escaping (SPPTLBFixture) -> [GuestVirtualAddress]) -> Kernel {
    timed(name, count: 20_000_000) { count in
        let fixture = spp()
        let (hits, checksum) = runTLBHits(on: fixture.guest.vcpu, addresses(fixture), access: .write(.user), count: count)
        precondition(hits == count, "\(name): \(count - hits) of \(count) writes missed the TLB")
        return checksum
    }
}

let kernels: [Kernel] = [
    // Baselines: the walker on the walk benchmarks' fixture (same numbers as walk-timer).
    timed("baseline-radix4") { radixChain64(Fixtures.fourLevel, levels: 4, count: $0) },
    timed("baseline-walk4-probe") { walkProbe(Fixtures.fourLevel, count: $0) },
    // The two walks inside a fault, on the fault fixture's own memory.
    timed("guest-walk-memslots") { runGuestWalks(breakdown(), count: $0) },
    timed("hw-walk-spte-miss") { runHardwareWalks(breakdown(), mapped: false, count: $0) },
    timed("hw-walk-spte-hit") { runHardwareWalks(breakdown(), mapped: true, count: $0) },
    // Shadow faults, and the cost of the first touch of the same pages without any MMU.
    firstTouch("baseline-first-touch", .warm),
    faults("fault-4k", .warm),
    faults("fault-4k-write", .warm, access: .write(.user)),
    faults("fault-4k-prefetch8", .warmPrefetch),
    faults("fault-cold-pt", .coldPT),
    // TDP (EPT) faults of 4 KiB pages whose guest tables are mapped already.
    vcpuFaults("tdp-fault-4k", fixture: TDPFaultFixture.init, targets: \.targets.count) { fixture, batch in
        let (exits, sum) = runTDPFaults(fixture, count: batch)
        return (exits, sum)
    } verify: { fixture, batch, exits in fixture.verify(count: batch, exits: exits) },
    // The same faults at KVM's handler alone: the exit's guest-physical address and error code into
    // `kvm_mmu_page_fault` (the TDP MMU's map), no hardware walk, exit or retried access.
    vcpuFaults("kvm-tdp-fault-4k", fixture: TDPFaultFixture.init, targets: \.targets.count) { fixture, batch in
        (runKVMTDPFaults(fixture, count: batch), 0)
    } verify: { fixture, batch, fixed in fixture.verify(count: batch, exits: fixed) },
    // A TLB miss under TDP with nothing to fault: tdp-fault-4k's guest with every target faulted in
    // beforehand, its 16,352 pages cycled through the 1,024-entry TLB: the two-dimensional walk
    // (from the PDE cache) and the TLB fill alone, no exit.
    vcpuFaults("tdp-tlb-miss-4k", fixture: {
        let fixture = TDPFaultFixture()
        _ = runTDPFaults(fixture, count: fixture.targets.count)
        return fixture
    }, targets: \.targets.count) { fixture, batch in
        runTDPWalks(fixture, count: batch)
    } verify: { _, batch, exits in precondition(exits == 0, "TDP TLB misses: \(exits) exits in \(batch) accesses") },
    // Populating 4 GiB with 4 KiB pages (1M faults), TDP on one and two vCPU threads, and shadow
    // paging on the same guest; ns per fault.
    population("tdp-populate-4g", tdp: true),
    population("tdp-populate-4g-2vcpus", tdp: true, vcpus: 2),
    population("shadow-populate-4g", tdp: false),
    // The same 4 GiB populated by the VMM before the guest runs: KVM_PRE_FAULT_MEMORY.
    preFaultPopulation("tdp-prefault-4g"),
    preFaultPopulation("tdp-prefault-4g-2vcpus", vcpus: 2),
    // KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG of a 4 GiB slot, every page dirty; ns per collection.
    dirtyLogCollection("tdp-dirty-log-4g", tdp: true),
    dirtyLogCollection("shadow-dirty-log-4g", tdp: false),
    // An L1 fault and an L2 fault through shadow EPT at KVM's fault handler (NestedFixtures.swift).
    nestedFaults("kvm-fault-4k", nested: false),
    // An L2 access through the L1 vCPU whose first touch of a page exits to KVM's guest_mmu
    // handler and is retried: the whole path, against tdp-fault-4k.
    vcpuFaults("l2-vcpu-fault-4k", fixture: L2FaultFixture.init, targets: \.targets.count) { fixture, batch in
        runL2Faults(fixture, count: batch)
    } verify: { _, batch, exits in precondition(exits == batch, "L2 faults: \(exits) exits for \(batch) accesses") },
    nestedFaults("kvm-shadow-ept-fault-4k", nested: true),
    faults("fault-cold-pd-pt", .coldPD),
    // As fault-cold-pt, but guest RAM and the pool's free frames are not pre-faulted: the host
    // kernel's own page faults on the anonymous mappings land inside the timed accesses.
    faults("fault-cold-pt-unbacked", .coldPT, prefaultHost: false),
    // CR3 loads between two cached roots (prev_roots hits), with and without PCIDs.
    timed("cr3-switch-cached", count: 1_000_000) { count in
        let hits = rootSwitch(pcid: false).run(count: count)
        precondition(hits == UInt64(count), "cr3-switch-cached: \(hits) of \(count) loads hit the root cache")
        return hits
    },
    timed("cr3-switch-pcid-noflush", count: 1_000_000) { count in
        let hits = rootSwitch(pcid: true).run(count: count)
        precondition(hits == UInt64(count), "cr3-switch-pcid-noflush: \(hits) of \(count) loads hit the root cache")
        return hits
    },
    // The sync of an unsync page table with 512 changed entries.
    Kernel(name: "sync-512", defaultCount: 2_000) { count in
        let fixture = syncFixture()
        var elapsed: UInt64 = 0
        for _ in 0..<count {
            fixture.prepare()
            precondition(fixture.unsyncPages == 1, "sync-512: the page table did not go unsync")
            let start = now()
            fixture.sync()
            elapsed += now() - start
            precondition(fixture.unsyncPages == 0, "sync-512: the CR3 load did not sync")
        }
        return (elapsed, UInt64(count))
    },
    // TLB hits.
    timed("baseline-tlb-floor-64", count: 20_000_000) { runTLBFloor(floor(), count: $0) },
    tlbHits("tlb-hit-read-1", \.one, .read(.user)),
    tlbHits("tlb-hit-read-64", \.sixtyFour, .read(.user)),
    tlbHits("tlb-hit-write-64", \.sixtyFour, .write(.user)),
    // Writes hitting the TLB under TDP (EPT) with SPP on: ordinary pages, then pages SPP checks
    // (issue 8: an allowed SPP-checked write under 2x an ordinary TLB-hit write).
    tdpWriteHits("tdp-tlb-hit-write-64", \.plain),
    tdpWriteHits("spp-write-allowed-64", \.protected),
]

let arguments = CommandLine.arguments.dropFirst()
if arguments.first == "sizes" {
    // Value sizes on the access and fault paths (copies of large values show up as memmove).
    print("PageWalker \(MemoryLayout<PageWalker>.size)  Translation \(MemoryLayout<Translation>.size)  "
          + "WalkFault \(MemoryLayout<WalkFault>.size)  Result<Translation, WalkFault> "
          + "\(MemoryLayout<Result<Translation, WalkFault>>.size)  PageFault \(MemoryLayout<PageFault>.size)  "
          + "AccessOutcome \(MemoryLayout<AccessOutcome>.size)  PagingRegisters \(MemoryLayout<PagingRegisters>.size)")
    exit(0)
}
let selected = arguments.first.map { name in kernels.filter { $0.name == name } } ?? kernels
if selected.isEmpty {
    print("kernels: " + kernels.map(\.name).joined(separator: " "))
    exit(2)
}
let countArgument = arguments.dropFirst().first.flatMap { Int($0) }
// A named kernel runs once by default (for profilers); otherwise the best of 5.
let repetitions = arguments.dropFirst(2).first.flatMap { Int($0) } ?? (arguments.isEmpty ? 5 : 1)

for kernel in selected {
    let count = countArgument ?? kernel.defaultCount
    let warm = kernel.run(min(count, 10_000))  // build the fixtures, warm the caches
    sink &+= warm.checksum
    var best = Double.infinity
    for _ in 0..<repetitions {
        let (elapsed, checksum) = kernel.run(count)
        sink &+= checksum
        best = min(best, Double(elapsed) / Double(count))
    }
    print(pad(kernel.name, 24) + "  " + pad(format2(best), 8, left: true) + " ns/op   "
          + pad(format2(1e3 / best), 8, left: true) + " M op/s   (\(count) ops)")
}
if sink == 42 { print("") }

func pad(_ text: String, _ width: Int, left: Bool = false) -> String {
    let padding = String(repeating: " ", count: max(0, width - text.count))
    return left ? padding + text : text + padding
}

func format2(_ value: Double) -> String {
    let scaled = (value * 100).rounded() / 100
    return "\(scaled)"
}
