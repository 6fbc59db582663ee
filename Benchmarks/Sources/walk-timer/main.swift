// A harness-free timer for the walker kernels: best of several timed repetitions, in ns per
// operation. Quick to build and run, and small enough to profile:
//   swift run -c release --scratch-path .build-bench walk-timer            # every kernel
//   swift run -c release --scratch-path .build-bench walk-timer walk4-probe # one kernel
//   valgrind --tool=callgrind .build-bench/release/walk-timer walk4-probe 2000000   # [count] [repetitions]

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PagingFixtures

func now() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

var sink: UInt64 = 0

struct Kernel {
    let name: String
    /// Operations per call (walks, or PTEs for the enumeration kernels, which ignore `count`).
    let run: (_ count: Int) -> (operations: Int, checksum: UInt64)
}

func walks(_ name: String, _ body: @escaping (Int) -> UInt64) -> Kernel {
    Kernel(name: name) { count in (count, body(count)) }
}

let kernels: [Kernel] = [
    walks("baseline-radix4") { radixChain64(Fixtures.fourLevel, levels: 4, count: $0) },
    walks("walk4-probe") { walkProbe(Fixtures.fourLevel, count: $0) },
    walks("walk4-ad") { walkAccessedDirty(Fixtures.fourLevel, count: $0) },
    walks("baseline-radix3") { radixChain64(Fixtures.fourLevel2M, levels: 3, count: $0) },
    walks("walk4-2m-probe") { walkProbe(Fixtures.fourLevel2M, count: $0) },
    walks("baseline-radix5") { radixChain64(Fixtures.fiveLevel, levels: 5, count: $0) },
    walks("walk5-probe") { walkProbe(Fixtures.fiveLevel, count: $0) },
    walks("baseline-pae") { radixChainPAE(Fixtures.pae, count: $0) },
    walks("walkpae-probe") { walkProbe(Fixtures.pae, count: $0) },
    walks("baseline-legacy32") { radixChain32(Fixtures.legacy32, count: $0) },
    walks("walk32-probe") { walkProbe(Fixtures.legacy32, count: $0) },
    walks("baseline-ept4") { radixChainEPT(Fixtures.ept4, count: $0) },
    walks("ept4-probe") { eptProbe(Fixtures.ept4, count: $0) },
    walks("ept4-ad") { eptAccessedDirty(Fixtures.ept4, count: $0) },
    walks("fault-notpresent") { walkNotPresent(Fixtures.faults, count: $0) },
    walks("fault-permission") { walkPermissionFault(Fixtures.faults, count: $0) },
    // One enumeration per timed call: the kernels are read-only, so a loop of calls here would
    // let the optimiser fold them into one.
    Kernel(name: "mappings-1g-contiguous") { _ in
        (MappingFixture.pageCount, enumerateMappings(Fixtures.mappingsContiguous))
    },
    Kernel(name: "mappings-1g-fragmented") { _ in
        (MappingFixture.pageCount, enumerateMappings(Fixtures.mappingsFragmented))
    },
    Kernel(name: "baseline-pte-scan-1g") { _ in
        (MappingFixture.pageCount, scanPageTables(Fixtures.mappingsContiguous))
    },
]

let arguments = CommandLine.arguments.dropFirst()
let selected = arguments.first.map { name in kernels.filter { $0.name == name } } ?? kernels
if selected.isEmpty {
    print("kernels: " + kernels.map(\.name).joined(separator: " "))
    exit(2)
}
let count = arguments.dropFirst().first.flatMap { Int($0) } ?? 5_000_000
// A named kernel runs once by default (for profilers); otherwise the best of 5.
let repetitions = arguments.dropFirst(2).first.flatMap { Int($0) } ?? (arguments.isEmpty ? 5 : 1)

for kernel in selected {
    _ = kernel.run(min(count, 100_000))  // build the fixture, warm the caches
    var best = Double.infinity
    var operations = 0
    for _ in 0..<repetitions {
        let start = now()
        let (done, checksum) = kernel.run(count)
        let elapsed = now() - start
        sink &+= checksum
        operations = done
        best = min(best, Double(elapsed) / Double(done))
    }
    let perSecond = 1e9 / best
    print(pad(kernel.name, 26)
          + "  " + String(format3(best)) + " ns/op   " + String(format3(perSecond / 1e6)) + " M op/s   (\(operations) ops)")
}
if sink == 42 { print("") }

func pad(_ text: String, _ width: Int) -> String {
    text + String(repeating: " ", count: max(0, width - text.count))
}

func format3(_ value: Double) -> String {
    let scaled = (value * 100).rounded() / 100
    return "\(scaled)"
}
