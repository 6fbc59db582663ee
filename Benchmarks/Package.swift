// swift-tools-version: 6.1
// Benchmarks for VirtMMU's page walkers and shadow MMU: a nested package so that the benchmark
// dependencies never reach the root package. Run from this folder:
//   swift package --scratch-path .build-bench benchmark
// or, for a quick number without the harness:
//   swift run -c release --scratch-path .build-bench walk-timer
//   swift run -c release --scratch-path .build-bench shadow-timer
import PackageDescription

// SwiftPM names a path dependency after its folder, so the root package's name is that of the
// folder the clone lives in ("main", "virtmmu", "ci-clone"...), not a fixed word.
let root = String(Context.packageDirectory.split(separator: "/").dropLast().last ?? "main").lowercased()

let package = Package(
    name: "VirtMMUBenchmarks",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(path: ".."),
        // The MallocInterposer trait only (not RuntimeInterposer) keeps the dependency graph to
        // packages that resolve offline.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // Table fixtures and the measured loops, shared by the harness and the quick timer.
        .target(
            name: "PagingFixtures",
            dependencies: [
                .product(name: "X86Paging", package: root),
                .product(name: "GuestMemory", package: root),
            ]
        ),
        .executableTarget(
            name: "PageWalk",
            dependencies: [
                "PagingFixtures",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/PageWalk",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // A harness-free timer for quick iteration and for profiling under callgrind/perf.
        .executableTarget(name: "walk-timer", dependencies: ["PagingFixtures"]),
        // Shadow-MMU fixtures (a VirtualMachine with a guest kernel's 4-level tables) and loops.
        .target(
            name: "ShadowFixtures",
            dependencies: [
                .product(name: "X86Paging", package: root),
                .product(name: "GuestMemory", package: root),
                .product(name: "KVMMMU", package: root),
                .product(name: "VirtualMachine", package: root),
                .product(name: "Workloads", package: root),
            ]
        ),
        .executableTarget(
            name: "ShadowMMU",
            dependencies: [
                "ShadowFixtures",
                "PagingFixtures",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/ShadowMMU",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // The quick timer for the shadow-MMU loops (fault, TLB hit, baselines).
        .executableTarget(
            name: "shadow-timer",
            dependencies: [
                "ShadowFixtures",
                "PagingFixtures",
                .product(name: "VirtualMachine", package: root),
                .product(name: "X86Paging", package: root),
            ]
        ),
    ]
)
