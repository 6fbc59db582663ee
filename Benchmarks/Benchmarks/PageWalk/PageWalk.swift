// Page-walk benchmarks (ordo-one/benchmark). Walk benchmarks run 1,000,000 walks per iteration
// (scalingFactor .mega), so the harness reports time per walk; each family has a `Baseline/`
// benchmark measured in the same run: the same chain of dependent `GuestPhysicalMemory.hostPage`
// lookups + entry loads the walk makes, with no checks, so PERFORMANCE.md can give ratios.
//
//   cd Benchmarks && swift package --scratch-path .build-bench benchmark
//   swift package --scratch-path .build-bench benchmark --filter 'Walk4Level.*'

import Benchmark
import PagingFixtures

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        timeUnits: .nanoseconds,
        warmupIterations: 2,
        scalingFactor: .mega,
        maxDuration: .seconds(2),
        maxIterations: 30
    )

    /// A walk benchmark over `fixture`: `kernel` runs `count` walks and returns a checksum.
    func walks(_ name: String, _ fixture: @escaping @Sendable () -> Void, _ kernel: @escaping @Sendable (Int) -> UInt64) {
        Benchmark(name, configuration: .init(setup: fixture)) { benchmark in
            blackHole(kernel(benchmark.scaledIterations.count))
        }
    }

    // 4-level paging, 4 KiB pages: 4096 pages in 8 page tables under 4 PDs (all in cache).
    walks("Baseline/Radix chain x4 (4-level)", { _ = Fixtures.fourLevel }) {
        radixChain64(Fixtures.fourLevel, levels: 4, count: $0)
    }
    walks("Walk4Level/4K probe", { _ = Fixtures.fourLevel }) { walkProbe(Fixtures.fourLevel, count: $0) }
    walks("Walk4Level/4K A-D", { _ = Fixtures.fourLevel }) { walkAccessedDirty(Fixtures.fourLevel, count: $0) }

    // 4-level paging, 2 MiB leaves (3 entries read).
    walks("Baseline/Radix chain x3 (2M leaf)", { _ = Fixtures.fourLevel2M }) {
        radixChain64(Fixtures.fourLevel2M, levels: 3, count: $0)
    }
    walks("Walk4Level/2M probe", { _ = Fixtures.fourLevel2M }) { walkProbe(Fixtures.fourLevel2M, count: $0) }
    walks("Walk4Level/2M A-D", { _ = Fixtures.fourLevel2M }) { walkAccessedDirty(Fixtures.fourLevel2M, count: $0) }

    // 5-level paging, 4 KiB pages.
    walks("Baseline/Radix chain x5 (5-level)", { _ = Fixtures.fiveLevel }) {
        radixChain64(Fixtures.fiveLevel, levels: 5, count: $0)
    }
    walks("Walk5Level/4K probe", { _ = Fixtures.fiveLevel }) { walkProbe(Fixtures.fiveLevel, count: $0) }
    walks("Walk5Level/4K A-D", { _ = Fixtures.fiveLevel }) { walkAccessedDirty(Fixtures.fiveLevel, count: $0) }

    // PAE: PDPTE register + 2 table levels.
    walks("Baseline/Radix chain x2 (PAE)", { _ = Fixtures.pae }) { radixChainPAE(Fixtures.pae, count: $0) }
    walks("WalkPAE/4K probe", { _ = Fixtures.pae }) { walkProbe(Fixtures.pae, count: $0) }
    walks("WalkPAE/4K A-D", { _ = Fixtures.pae }) { walkAccessedDirty(Fixtures.pae, count: $0) }

    // 32-bit paging: 2 levels of 4-byte entries.
    walks("Baseline/Radix chain x2 (32-bit)", { _ = Fixtures.legacy32 }) { radixChain32(Fixtures.legacy32, count: $0) }
    walks("Walk32Bit/4K probe", { _ = Fixtures.legacy32 }) { walkProbe(Fixtures.legacy32, count: $0) }
    walks("Walk32Bit/4K A-D", { _ = Fixtures.legacy32 }) { walkAccessedDirty(Fixtures.legacy32, count: $0) }

    // EPT, 4 levels, 4 KiB pages.
    walks("Baseline/Radix chain x4 (EPT)", { _ = Fixtures.ept4 }) { radixChainEPT(Fixtures.ept4, count: $0) }
    walks("WalkEPT4/4K probe", { _ = Fixtures.ept4 }) { eptProbe(Fixtures.ept4, count: $0) }
    walks("WalkEPT4/4K A-D", { _ = Fixtures.ept4 }) { eptAccessedDirty(Fixtures.ept4, count: $0) }

    // Faulting 4-level walks: all four levels are read before the fault.
    walks("WalkFault/not present at PTE", { _ = Fixtures.faults }) { walkNotPresent(Fixtures.faults, count: $0) }
    walks("WalkFault/permission (user write, S RO)", { _ = Fixtures.faults }) {
        walkPermissionFault(Fixtures.faults, count: $0)
    }

    // Enumeration of 1 GiB of 4 KiB pages (262,144 PTEs in 512 tables): one enumeration per
    // iteration, so times are per 1 GiB.
    let enumeration = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal, .peakMemoryResidentDelta],
        timeUnits: .microseconds, warmupIterations: 1, scalingFactor: .one, maxDuration: .seconds(3), maxIterations: 50
    )
    func enumerate(_ name: String, _ fixture: @escaping @Sendable () -> MappingFixture,
                   _ kernel: @escaping @Sendable (MappingFixture) -> UInt64) {
        var configuration = enumeration
        configuration.setup = { _ = fixture() }
        Benchmark(name, configuration: configuration) { _ in
            blackHole(kernel(fixture()))
        }
    }
    enumerate("Baseline/PTE scan 1 GiB (hostPage+load per PTE)", { Fixtures.mappingsContiguous }, scanPageTables)
    enumerate("Mappings/1 GiB 4K contiguous (1 run)", { Fixtures.mappingsContiguous }, enumerateMappings)
    enumerate("Mappings/1 GiB 4K fragmented (262144 runs)", { Fixtures.mappingsFragmented }, enumerateMappings)
}
