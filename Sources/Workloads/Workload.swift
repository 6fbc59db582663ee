// Built-in workloads: a guest operating system's life (boot, processes, memory mappings, a live
// migration) written as the scenario operations it performs. A workload is a generator of scenario
// directives, so it runs through `ScenarioRunner` with every access checked in lockstep, renders to a
// scenario file (`--record`) and replays from one under any MMU (`--replay`).

import VirtualMachine
import X86Paging

/// The built-in workloads by name.
public enum WorkloadKind: String, CaseIterable, Sendable, Hashable {
    /// Firmware to kernel: paging off, 32-bit paging, PAE, 4-level (and 5-level with LA57), the
    /// kernel's direct map built in each, the application processors brought up.
    case boot
    /// fork with copy-on-write, exec, demand paging, exit; context switches by CR3 loads without
    /// and then with PCIDs, KPTI-style separate user and kernel roots.
    case processes
    /// mmap, munmap and mprotect with INVLPG and TLB shootdowns across vCPUs; transparent huge
    /// pages (2 MiB), faulted in and collapsed from 4 KiB pages.
    case mmap
    /// The pre-copy loop of a live migration: dirty logging while vCPUs write, rounds of
    /// get-and-reset and "send", a final round with the vCPUs stopped.
    case migration
    /// `boot`, `processes`, `mmap`, then a live migration of the VM: what `virtmmu run` runs with
    /// no argument.
    case mixed
    /// An L1 hypervisor running two L2 guests, each with its own EPTP, VPID and processes
    /// (`processes`' guest OS on one vCPU), L1 switching between them and changing its EPT with
    /// INVEPT. L1 must run under TDP with EPT (docs/NESTED.md).
    case nested

    /// Whether the workload ends with a live migration (and so reads the dirty log).
    public var migrates: Bool { self == .migration || self == .mixed }

    /// One line on what the workload exercises.
    public var summary: String {
        switch self {
        case .boot: "paging off -> 32-bit -> PAE -> 4-level (-> 5-level), the kernel's direct map, APs brought up"
        case .processes: "fork (copy-on-write), exec, demand paging, exit, context switches with and without PCID, KPTI"
        case .mmap: "mmap/munmap/mprotect with INVLPG and TLB shootdowns, transparent huge pages"
        case .migration: "dirty logging while vCPUs write, the pre-copy loop of a live migration"
        case .mixed: "boot, processes, mmap, then a live migration of the VM"
        case .nested: "an L1 hypervisor running two L2 guests with processes over its EPT (one vCPU; --mmu tdp only)"
        }
    }
}

/// The size of a workload run and its seed: the same parameters give the same operations.
public struct WorkloadParameters: Sendable, Hashable {
    /// Processes alive at once before one exits to make room for the next fork (`processes`,
    /// `mixed`; at least one per vCPU, and `migration` runs one per vCPU).
    public var processes: Int
    /// Pages each process (or mapping) touches.
    public var pages: Int
    /// Rounds of the workload's main loop (forks, mmap cycles, migration passes).
    public var iterations: Int
    /// vCPUs the guest runs on.
    public var vcpus: Int
    /// The seed of every random choice.
    public var seed: UInt64
    /// Whether the CPU model has 5-level paging (`boot` then goes on to 5-level paging).
    public var la57: Bool
    /// How the migration reads the dirty log: KVM_GET_DIRTY_LOG alone, get then
    /// KVM_CLEAR_DIRTY_LOG (manual protection, as QEMU does), or per-vCPU dirty rings.
    public var dirtyLog: DirtyLogProtocol

    public init(processes: Int = 4, pages: Int = 12, iterations: Int = 4, vcpus: Int = 2, seed: UInt64 = 1, la57: Bool = true,
                dirtyLog: DirtyLogProtocol = .getAndReset) {
        self.dirtyLog = dirtyLog
        self.processes = processes
        self.pages = pages
        self.iterations = iterations
        self.vcpus = vcpus
        self.seed = seed
        self.la57 = la57
    }

    /// The limits `validate` enforces, which keep every workload inside the guest kernel's table
    /// pool and the guest's memory.
    public static let processLimit = 1...64
    public static let pageLimit = 1...256
    public static let iterationLimit = 1...1000
    public static let vcpuLimit = 1...Scenario.maximumVCPUs

    /// Why these parameters cannot run, or nil when they can.
    public func problem() -> String? {
        func outside(_ name: String, _ value: Int, _ range: ClosedRange<Int>) -> String? {
            range.contains(value) ? nil : "--\(name) must be in \(range.lowerBound)...\(range.upperBound), not \(value)"
        }
        return outside("processes", processes, Self.processLimit) ?? outside("pages", pages, Self.pageLimit)
            ?? outside("iterations", iterations, Self.iterationLimit) ?? outside("vcpus", vcpus, Self.vcpuLimit)
    }
}

/// A named stretch of a workload's operations (for the report's charts): it starts at directive
/// `firstDirective` of the scenario.
public struct WorkloadPhase: Sendable, Hashable {
    public var name: String
    public var firstDirective: Int
}

/// A workload made into scenario directives.
public struct GeneratedWorkload: Sendable {
    public var kind: WorkloadKind
    public var parameters: WorkloadParameters
    public var scenario: Scenario
    public var phases: [WorkloadPhase]
    /// By directive index: the value each of the guest's loads must return, what its OS last
    /// stored there (the test of copy-on-write copies, huge-page collapses, cleared frames).
    public var expectedLoads: [Int: UInt64]
}

/// Why a workload could not be generated.
public struct WorkloadError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension WorkloadKind {
    /// The workload's operations for `parameters`, as a scenario named `<workload NAME>`.
    public func generate(_ parameters: WorkloadParameters) throws(WorkloadError) -> GeneratedWorkload {
        if let problem = parameters.problem() { throw WorkloadError(problem) }
        if self == .nested { return try generateNested(parameters) }
        var os = GuestOS(parameters: parameters, memorySize: memorySize(parameters))
        os.migrates = migrates
        if self == .mmap || self == .mixed { os.reserveHugePool(pages: Self.hugePoolPages) }
        switch self {
        case .boot:
            try os.boot()
        case .processes:
            try os.quickBoot()
            try os.runProcesses()
        case .mmap:
            try os.quickBoot()
            try os.runMappings()
        case .migration:
            try os.quickBoot()
            try os.runMigration()
        case .nested:
            preconditionFailure("generated by generateNested")
        case .mixed:
            try os.boot()
            try os.runProcesses()
            try os.runMappings()
            try os.runMigration()
        }
        let scenario: Scenario
        do {
            scenario = try Scenario(name: "<workload \(rawValue)>", directives: os.directives)
        } catch {
            throw WorkloadError("\(rawValue): the generated operations do not parse (a bug in the generator): \(error)")
        }
        return GeneratedWorkload(kind: self, parameters: parameters, scenario: scenario, phases: os.phases,
                                 expectedLoads: os.expectedLoads)
    }

    /// 2 MiB frames for transparent huge pages: mmap holds two at a time.
    static let hugePoolPages = 4

    /// Guest memory: the kernel's table pool and image below 24 MiB, then room for every page the
    /// workload may hold at once, and the huge-page pool (`mmap`, `mixed`).
    func memorySize(_ parameters: WorkloadParameters) -> UInt64 {
        let pagesHeld = UInt64(parameters.pages) * UInt64(max(parameters.processes, parameters.vcpus) + 2) * 3
        let hugePool: UInt64 = self == .mmap || self == .mixed ? UInt64(Self.hugePoolPages) << 21 : 0
        let total = GuestOS.firstUserFrame + pagesHeld * 4096 + hugePool + (4 << 20)
        return (total + (2 << 20) - 1) & ~((2 << 20) - 1)
    }
}
