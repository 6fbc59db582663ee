import GuestMemory
import KVMMMU
import VirtualMachine
import X86Paging

/// One guest operation of a run and what the guest saw.
public struct AccessRecord: Sendable {
    /// Counts `access` and `pte` directives from 0.
    public var index: Int
    public var line: Int
    /// "read", "write", "exec", "pte", or "invpcid" (an INVPCID that raised #GP).
    public var operation: String
    public var cpl: Int
    public var gva: GuestVirtualAddress
    public var outcome: AccessOutcome
    /// The access was L2's (between `vmenter` and `vmexit`): `gpa` is L2's guest-physical
    /// address (an MMIO access's is L1's).
    public var inL2 = false
    /// The VM exit to L1 an L2 access ended in (`outcome` then completes at the exit's L2 address).
    public var exitToL1: NestedVMExit?
    /// The MMU events (KVM's tracepoints) the operation caused, when the run traces them.
    public var events: [MMUEventRecord] = []
}

/// A guest entry the kernel built, as it is at the end of the run.
public struct EntryRecord: Sendable {
    public var gva: GuestVirtualAddress
    public var level: Int
    public var address: GuestPhysicalAddress
    public var value: UInt64
}

/// Everything a run produced.
public struct RunReport: Sendable {
    public var scenario: String
    /// The MMU the guest ran under: "shadow", "tdp" (EPT) or "npt".
    public var mmu = "shadow"
    public var accesses: [AccessRecord] = []
    public var entries: [EntryRecord] = []
    public var statsBefore = MMUStats()
    public var statsAfter = MMUStats()
    /// Shadow pages alive at the end, by level.
    public var shadowPagesByLevel: [Int: Int] = [:]
    public var lockstepChecks = 0
    /// Shadow pages alive at the end, by their role's description and level.
    public var shadowPagesByRole: [String: Int] = [:]
    /// Every live shadow page at the end as (gfn, role word), for comparing page sets.
    public var shadowPageKeys: Set<ShadowPageKey> = []
    /// The vCPU context's counters: register writes that reset or unloaded it, role
    /// re-initialisations, root pages created, and CR3 loads that did or did not find their root.
    public var contextResets: UInt64 = 0
    public var roleReinitializations: UInt64 = 0
    public var rootsCreated: UInt64 = 0
    public var rootCacheHits: UInt64 = 0
    public var rootCacheMisses: UInt64 = 0
    /// Every `dirty-log get`, in order.
    public var dirtyLogs: [DirtyLogRecord] = []
    /// KVM_EXIT_DIRTY_RING_FULL exits the vCPU took (the runner, as the VMM, harvested then).
    public var dirtyRingFullExits = 0
    /// The `expect` lines the run checked (all of them met, or the run failed).
    public var expectationsChecked = 0
    /// Every `spp get`, in order.
    public var subPageMasks: [SubPageMaskRecord] = []
    /// Every `age` line, in order.
    public var ages: [AgeRecord] = []
    /// Every page L1's exit handler mapped for an `ept-demand` range, in order.
    public var l1Maps: [L1MapRecord] = []
    /// Every `prefault` line, in order.
    public var preFaults: [PreFaultRecord] = []
    /// The vCPUs the run brought up.
    public var vcpuCount = 0
    /// The counters every `ScenarioRunner.timelineInterval` directives, and at the end.
    public var timeline: [TimelineSample] = []
    /// Table pages the MMU holds at the end: shadow pages, or the TDP MMU's tables.
    public var tablePages = 0
}

/// The counters of a run after `directives` directives: one point of the report's charts.
public struct TimelineSample: Sendable {
    public var directives: Int
    /// Guest operations recorded so far (`AccessRecord`s).
    public var operations: Int
    /// Guest accesses the reference machine checked so far.
    public var lockstepChecks: Int
    /// KVM's counters, cumulative from the start of the run.
    public var stats: MMUStats
    /// Shadow pages alive (`n_used_mmu_pages`); under TDP, the TDP MMU's table pages.
    public var tablePages: Int
    /// CR3 loads that found their root cached, and those that did not, over every vCPU.
    public var rootCacheHits: UInt64
    public var rootCacheMisses: UInt64
}

/// What one `spp get` returned.
public struct SubPageMaskRecord: Sendable, Equatable {
    public var line: Int
    public var gfn: GuestFrameNumber
    public var mask: SubPageWriteMask
    /// How many guest operations (`AccessRecord`s) came before it, to place it among them.
    public var precedingOperations: Int
}

/// What one `age clear` or `age test` found.
public struct AgeRecord: Sendable, Equatable {
    public var line: Int
    /// test_young (nothing changed) rather than clear_young.
    public var testOnly: Bool
    public var first: UInt64
    public var count: UInt64
    /// Some leaf mapping one of the gfns was accessed.
    public var young: Bool
    /// How many guest operations (`AccessRecord`s) came before it, to place it among them.
    public var precedingOperations: Int
}

/// What one `prefault` line's KVM_PRE_FAULT_MEMORY calls did.
public struct PreFaultRecord: Sendable, Equatable {
    public var line: Int
    /// The range as the line gave it.
    public var gpa: GuestPhysicalAddress
    public var size: UInt64
    /// Bytes of the range the calls mapped (or found mapped) before they stopped.
    public var mapped: UInt64
    /// How the last call returned: nil when the whole range was done, else its error.
    public var error: PreFaultError?
    /// How many guest operations (`AccessRecord`s) came before it, to place it among them.
    public var precedingOperations: Int
}

/// A page L1's exit handler mapped for L2 (an `ept-demand` range), then resuming L2.
public struct L1MapRecord: Sendable, Equatable {
    public var line: Int
    public var map: EPTMapDirective
    /// How many guest operations (`AccessRecord`s) came before it, to place it among them.
    public var precedingOperations: Int
}

/// What one `dirty-log get` returned.
public struct DirtyLogRecord: Sendable, Equatable {
    public var line: Int
    public var slot: Int
    /// The gfns reported dirty, ascending.
    public var gfns: [GuestFrameNumber]
    /// How many guest operations (`AccessRecord`s) came before it, to place it among them.
    public var precedingOperations: Int
}

/// A shadow page's identity: its gfn and role word.
public struct ShadowPageKey: Hashable, Sendable {
    public var gfn: UInt64
    public var role: UInt32
}

/// Why a run stopped early.
public enum RunFailure: Error, CustomStringConvertible {
    /// The scenario cannot run (bad directive for this machine, impossible registers...): exit 1.
    case badScenario(line: Int, message: String)
    /// The virtualized guest saw something the architecture does not allow: exit 2.
    case disagreement(line: Int, LockstepDisagreement, partial: RunReport)
    /// KVM's structures broke an invariant: exit 2.
    case brokenInvariant(line: Int, message: String, partial: RunReport)
    /// An `expect` line named a counter whose value differed: exit 3. The message lists every
    /// counter of the line that differed.
    case unmetExpectation(line: Int, message: String, partial: RunReport)

    public var description: String {
        switch self {
        case .badScenario(let line, let message): "line \(line): \(message)"
        case .disagreement(let line, let disagreement, _): "line \(line): \(disagreement)"
        case .brokenInvariant(let line, let message, _): "line \(line): broken invariant: \(message)"
        case .unmetExpectation(let line, let message, _): "line \(line): unmet expectation: \(message)"
        }
    }

    public var exitCode: Int32 {
        switch self {
        case .badScenario: 1
        case .disagreement, .brokenInvariant: 2
        case .unmetExpectation: 3
        }
    }
}

/// Runs a scenario on a VM under KVM's shadow MMU, with every guest access checked in lockstep
/// against the architecture.
public final class ScenarioRunner {
    public let scenario: Scenario
    public private(set) var vm: VirtualMachine!
    public private(set) var vcpu: VCPU!
    public private(set) var kernel: GuestKernel!
    public private(set) var reference: ReferenceMachine!
    /// The settings `set` lines chose (the paging mode a switch goes to, PSE's preference...).
    private var controls: ControlState
    /// The vCPU's registers (and the reference's): from `controls` until boot, then what every
    /// write left.
    private var registers: PagingRegisters
    /// The address space CR3 points at; nil after a `cr3` write that points at no space's root.
    private var loadedSpace: String? = Scenario.kernelSpace
    private var report: RunReport
    private var currentLine = 0
    private var operationIndex = 0
    /// Every `map`, with the tables it went into, for the entries reported at the end.
    private var mappings: [Mapping] = []
    /// The dirty-log check: for each logging slot, each page's contents when its dirty bit was last
    /// taken (logging turned on, a get-and-reset, a clear). A page whose contents differ at a
    /// `dirty-log get` must be reported: a page left out is memory a migration would lose.
    private var dirtyLogBaselines: [Int: [UInt64]] = [:]
    /// With dirty rings: gfns harvested from the rings, by slot, until that slot's `dirty-log get`.
    private var harvestedDirtyGFNs: [Int: Set<UInt64>] = [:]

    /// The vCPUs brought up, each with its reference processor and what its lines left; the
    /// current one's state is in `vcpu`, `reference`, `controls`, `registers` and `loadedSpace`
    /// (its entry here is stale until `vcpu N` switches away).
    private var processors: [ProcessorState] = []
    /// The index of the vCPU guest operations run on.
    public private(set) var currentVCPU = 0

    private struct ProcessorState {
        var vcpu: VCPU
        var reference: ReferenceMachine
        var controls: ControlState
        var registers: PagingRegisters
        var loadedSpace: String?
        /// While the vCPU runs L2: L1's state kept aside, and which L2 guest it runs.
        var suspendedL1: GuestLevelState? = nil
        var l2Guest = 0
    }

    private struct Mapping: Hashable {
        var gva: GuestVirtualAddress
        var space: String
        var mode: PagingMode
    }

    /// L1's paging for L2 (`l1`), its root table once allocated, and the L2 accesses checked.
    private var nestedSetting: NestedPagingSetting?
    /// What the directives of one guest level act on: `controls`, `registers`, `kernel` and
    /// `loadedSpace` are L1's, or L2's between `vmenter` and `vmexit`.
    private struct GuestLevelState {
        var controls: ControlState
        var registers: PagingRegisters
        /// L2's kernel is made when an L2 line first needs its tables.
        var kernel: GuestKernel?
        var loadedSpace: String?
    }
    /// L1's while the directives act on L2.
    private var suspendedL1: GuestLevelState?
    /// Each vCPU's L2 guests (by `vCPU * 16 + guest`) while L1 runs: L2's registers live on in
    /// vmcs12 across exits. (Their `kernel` is unused: see `l2Kernels`.)
    private var l2Levels: [Int: GuestLevelState] = [:]
    /// Each L2 guest's kernel, made when an L2 line first needs its tables and shared by every vCPU
    /// that runs the guest, as one OS's page tables are.
    private var l2Kernels: [Int: GuestKernel] = [:]
    /// Each vCPU's vmcs12 VPID for L2 as its last `vmenter` gave it (nil: VPID not enabled).
    private var l2VPIDs: [Int: UInt16?] = [:]
    /// Whether the directives act on L2 (the vCPU runs L2, or L1 handles an exit of L2's).
    private var directivesActOnL2: Bool { suspendedL1 != nil }
    /// L1's kernel, whichever level the directives act on.
    private var l1Kernel: GuestKernel { suspendedL1.map { $0.kernel! } ?? kernel }
    /// By L2 guest (`guest=`): L1's EPT or NPT root table for it.
    private var nestedRootTables: [Int: GuestPhysicalAddress] = [:]
    /// The `ept-demand` ranges, which L1's exit handler maps page by page.
    private var demandRanges: [EPTDemandDirective] = []
    /// The L2 guest the vCPU runs or last ran (`vmenter guest=`).
    private var currentL2Guest = 0
    private var l2Checks = 0

    /// Whether to keep the MMU events (KVM's tracepoints) each operation causes.
    public let tracesEvents: Bool
    /// Events from this sequence number on belong to the current directive.
    private var firstEventOfDirective: UInt64 = 0

    /// The shadow-page cache size (KVM_SET_NR_MMU_PAGES); nil for KVM's default from the memslots.
    public let shadowPageLimit: Int?
    /// The MMU design the VM runs.
    public let variant: MMUVariant
    /// Whether `expect` lines are checked (a comparison of variants, whose counters may differ by
    /// design, skips them).
    public let checksExpectations: Bool
    /// The MMU the guest runs under (shadow paging, or TDP with EPT).
    public let mmu: VirtualMachineMMU
    /// Take a `TimelineSample` every this many directives (0: none but the last).
    public var timelineInterval = 0
    /// Called every `progressInterval` directives with (directives done, directives in all).
    public var progress: ((Int, Int) -> Void)?
    public var progressInterval = 500

    public init(scenario: Scenario, traceEvents: Bool = false, shadowPageLimit: Int? = nil,
                variant: MMUVariant = .upstream, checksExpectations: Bool = true, mmu: VirtualMachineMMU = .shadow) {
        self.scenario = scenario
        self.mmu = mmu
        self.variant = variant
        self.checksExpectations = checksExpectations
        tracesEvents = traceEvents
        self.shadowPageLimit = shadowPageLimit
        controls = scenario.initialControls
        registers = scenario.initialControls.registers(cr3: 0)
        report = RunReport(scenario: scenario.name)
        report.mmu = mmu.name
    }

    public func run() throws(RunFailure) -> RunReport {
        do {
            try setUp()
        } catch let failure as RunFailure {
            throw failure
        } catch {
            throw .badScenario(line: 0, message: "\(error)")
        }
        report.statsBefore = vm.stats
        vm.mmu.events.isRecording = tracesEvents
        for (index, statement) in scenario.directives.enumerated() {
            if index > 0 && timelineInterval > 0 && index % timelineInterval == 0 { sampleTimeline(directives: index) }
            if index > 0 && index % progressInterval == 0 { progress?(index, scenario.directives.count) }
            currentLine = statement.line
            if tracesEvents { firstEventOfDirective = nextEventSequence() }
            do {
                try execute(statement.directive)
                // `map` and `pte` edit the tables of the mode the registers select (or prepare).
                let editMode = registers.modeWithPagingOn
                if let kernel, kernel.mode != editMode { try kernel.selectMode(editMode) }
            } catch let failure as RunFailure {
                throw failure
            } catch let disagreement as LockstepDisagreement {
                finish()
                throw .disagreement(line: statement.line, disagreement, partial: report)
            } catch {
                throw .badScenario(line: statement.line, message: "\(statement.directive.name): \(error)")
            }
        }
        finish()
        sampleTimeline(directives: scenario.directives.count)
        return report
    }

    private func sampleTimeline(directives: Int) {
        report.timeline.append(TimelineSample(
            directives: directives, operations: report.accesses.count, lockstepChecks: lockstepChecks,
            stats: vm.stats.delta(from: report.statsBefore), tablePages: tablePages,
            rootCacheHits: contextTotal(\.rootCacheHits), rootCacheMisses: contextTotal(\.rootCacheMisses)))
    }

    /// A context counter summed over the vCPUs (0 before boot). The processors' vCPU and
    /// reference objects are the current ones even while the current vCPU's entry is stale.
    private func contextTotal(_ counter: KeyPath<MMUContext, UInt64>) -> UInt64 {
        processors.reduce(0) { $0 + $1.vcpu.context[keyPath: counter] }
    }

    private var lockstepChecks: Int { processors.reduce(l2Checks) { $0 + $1.reference.checkedAccesses } }

    private var tablePages: Int { vm.tdp?.pageTableCount ?? vm.mmu.usedPages }

    /// The MMU for this scenario: under TDP, the EPT capabilities follow the scenario's CPU.
    private func mmuForScenario() -> VirtualMachineMMU {
        guard case .tdp(let defaults) = mmu else { return mmu }
        var configuration = scenario.kvmParameters.applied(to: defaults)
        if !scenario.cpuModel.supports1GiBPages { configuration.maxHugePageLevel = min(configuration.maxHugePageLevel, 2) }
        return .tdp(configuration)
    }

    private func setUp() throws {
        vm = try VirtualMachine(memorySize: scenario.memorySize, cpu: scenario.cpuModel, shadowPageLimit: shadowPageLimit,
                                hostLevels: mmu.isTDP ? nil : scenario.hostLevels, variant: variant,
                                mmu: mmuForScenario())
        kernel = try GuestKernel(vm: vm, mode: controls.pagingMode)
        kernel.store = { [unowned self] entry, value, size in
            // The kernel reaches its tables through the window of the mode in force (or, with paging
            // off, at their physical addresses).
            let gva = GuestKernel.linearAddress(of: entry, in: self.registers.mode)
            let outcome = try self.guestAccess(gva, Access(.write, .supervisor), size: size, value: value)
            guard case .completed = outcome.result else {
                throw RunFailure.badScenario(line: self.currentLine, message:
                    "the kernel's store to its table entry at \(entry) (through \(gva)) did not complete: "
                    + RunReport.outcomeText(outcome.result) + "; CR3 must point at a root with the kernel's window")
            }
        }
    }

    private func finish() {
        report.statsAfter = vm.stats
        report.dirtyRingFullExits = processors.reduce(0) { $0 + $1.vcpu.dirtyRingFullExits }
        report.lockstepChecks = lockstepChecks
        report.vcpuCount = processors.count
        report.tablePages = tablePages
        var seen = Set<Mapping>()
        let distinct = mappings.filter { seen.insert($0).inserted }
        report.entries = distinct.flatMap { mapping in
            l1Kernel.path(mapping.gva, space: mapping.space, mode: mapping.mode).map {
                EntryRecord(gva: mapping.gva, level: $0.level, address: $0.address, value: $0.value)
            }
        }
        let pages = vm.mmu.shadowPages
        report.shadowPagesByLevel = Dictionary(grouping: pages, by: \.level).mapValues(\.count)
        report.shadowPagesByRole = Dictionary(grouping: pages, by: { vm.variant.describe($0.role) }).mapValues(\.count)
        report.shadowPageKeys = Set(pages.map { ShadowPageKey(gfn: $0.gfn.rawValue, role: $0.role.word) })
        report.contextResets = contextTotal(\.contextResets)
        report.roleReinitializations = contextTotal(\.roleReinitializations)
        report.rootsCreated = contextTotal(\.rootsCreated)
        report.rootCacheHits = contextTotal(\.rootCacheHits)
        report.rootCacheMisses = contextTotal(\.rootCacheMisses)
    }

    /// The first guest operation: the kernel has built its tables with paging off and now turns
    /// paging on with CR3 pointing at them (which is when PAE loads its PDPTEs), on the vCPU and
    /// on the reference alike.
    private func boot() throws {
        guard !l1Kernel.booted else { return }
        let root = try kernel.root(of: Scenario.kernelSpace, mode: controls.pagingMode)
        registers = controls.registers(cr3: root.rawValue)
        vcpu = try vm.addVCPU(registers: registers)
        vcpu.dirtyRingFullHandler = { [unowned self] in self.harvestAndResetDirtyRings() }
        reference = try ReferenceMachine(memory: vm.memory, registers: registers, cpu: scenario.cpuModel)
        // Under TDP the guest's paging runs in hardware, whose paging-structure caches it can see.
        reference.cachesPagingStructures = vm.tdp != nil
        loadedSpace = Scenario.kernelSpace
        processors = [currentProcessor]
        kernel.booted = true
    }

    private var currentProcessor: ProcessorState {
        ProcessorState(vcpu: vcpu, reference: reference, controls: controls, registers: registers, loadedSpace: loadedSpace,
                       suspendedL1: suspendedL1, l2Guest: currentL2Guest)
    }

    /// `vcpu N`: the current vCPU's state is put away and vCPU `index`'s taken up; a new vCPU
    /// comes up in the current one's state (registers, loaded space) with its own empty TLB, in L1
    /// (the parser refuses one brought up from L2). A vCPU that runs L2 goes on running it: the
    /// directives act on its L2 guest, whose kernel its other vCPUs share.
    private func selectVCPU(_ index: Int) throws {
        let l1 = l1Kernel
        processors[currentVCPU] = currentProcessor
        if index == processors.count {
            guard suspendedL1 == nil else {
                throw RunFailure.badScenario(line: currentLine, message: "vcpu: a new vCPU comes up in L1, and vCPU \(currentVCPU) runs L2")
            }
            let new = try vm.addVCPU(registers: registers)
            new.dirtyRingFullHandler = { [unowned self] in self.harvestAndResetDirtyRings() }
            processors.append(ProcessorState(vcpu: new, reference: try reference.bringUpProcessor(registers: registers),
                                             controls: controls, registers: registers, loadedSpace: loadedSpace))
        }
        guard processors.indices.contains(index) else {
            throw RunFailure.badScenario(line: currentLine, message: "vcpu: vCPU \(index) is not up (\(processors.count) so far)")
        }
        let next = processors[index]
        (vcpu, reference, controls, registers, loadedSpace) = (next.vcpu, next.reference, next.controls, next.registers, next.loadedSpace)
        (suspendedL1, currentL2Guest) = (next.suspendedL1, next.l2Guest)
        kernel = suspendedL1 == nil ? l1 : l2Kernels[currentL2Guest]
        currentVCPU = index
    }

    private func execute(_ directive: ScenarioDirective) throws {
        if directive.runsGuest { try boot() }
        if directivesActOnL2, try executeInL2(directive) { return }
        switch directive {
        case .mem, .cpu, .host:
            break  // applied when the machine was built
        case .set(let changes):
            let new = controls.applying(changes)
            guard kernel.booted else {
                controls = new
                registers = controls.registers(cr3: 0)
                // Checked now so that an impossible combination names this line.
                let root = try kernel.root(of: Scenario.kernelSpace, mode: controls.pagingMode)
                let booting = controls.registers(cr3: root.rawValue)
                if !mmu.isTDP { try VCPU.checkSupported(booting) }
                _ = try PageWalker(registers: booting, cpu: scenario.cpuModel, memory: vm.memory)
                return
            }
            let target = changes.applied(to: registers, controls: new)
            controls = new
            if changes.pagingMode != nil && target.mode != registers.mode {
                try switchMode(to: target)
            } else {
                try write(target)
            }
        case .writeRegister(let register, let value):
            try write(register.writing(value, to: registers))
        case .loadCR3(let value, let noFlush):
            try loadCR3(value, noFlush: noFlush)
            loadedSpace = kernel.space(withRoot: GuestPhysicalAddress(value & ~0xFFF))?.space
        case .space(let name):
            try kernel.selectSpace(name)
        case .switchSpace(let name, let pcid, let noFlush):
            guard kernel.hasSpace(name) else {
                throw RunFailure.badScenario(line: currentLine, message: "switch: no address space '\(name)'")
            }
            if (pcid != 0 || noFlush) && !registers.cr4.contains(.pcidEnable) {
                throw RunFailure.badScenario(line: currentLine, message: "switch: pcid and noflush need CR4.PCIDE (set pcid=1)")
            }
            let root = try kernel.root(of: name, mode: registers.modeWithPagingOn)
            try loadCR3(root.rawValue | UInt64(pcid), noFlush: noFlush)
            loadedSpace = name
        case .invpcid(let type, let pcid, let gva):
            let architecturalFault = registers.invpcidFaults(type, pcid: pcid, address: gva)
            let completed = vcpu.invalidatePCID(type, pcid: pcid, address: gva)
            guard completed != architecturalFault else {
                finish()
                throw RunFailure.brokenInvariant(line: currentLine, message:
                    "INVPCID \(type) pcid \(hex(pcid)) at \(gva): the architecture "
                    + (architecturalFault ? "raises #GP" : "completes it") + ", KVM's emulation "
                    + (completed ? "completed it" : "raised #GP"), partial: report)
            }
            if completed {
                reference.invalidatePCID(type, pcid: UInt16(pcid), address: gva)
            } else {
                record("invpcid", cpl: 0, gva: gva, outcome: AccessOutcome(result: .generalProtection))
            }
        case .map(let map):
            try checkCollision(map)
            mappings.append(Mapping(gva: map.gva, space: kernel.editSpace, mode: kernel.mode))
            try kernel.map(map.gva, to: map.gpa, leafLevel: map.pageSize.leafLevel, leafFlags: map.leafFlagsWithKey,
                           tableFlags: { map.tableFlags(level: $0) })
        case .access(let kind, let gva, let cpl, let value):
            let outcome = try guestAccess(gva, Access(kind, cpl == 3 ? .user : .supervisor), size: 8, value: value ?? 0)
            record(kind == .fetch ? "exec" : kind == .write ? "write" : "read", cpl: cpl, gva: gva, outcome: outcome)
        case .pte(let gva, let level, let entryValue, let cpl):
            let (address, new) = try pteTarget(gva, level: level, entryValue, kernel)
            let outcome = try guestAccess(GuestKernel.linearAddress(of: address, in: registers.mode),
                                          Access(.write, cpl == 3 ? .user : .supervisor),
                                          size: kernel.entrySize, value: new)
            record("pte", cpl: cpl, gva: gva, outcome: outcome)
        case .memslot(let change):
            try apply(change)
        case .dirtyLog(let request):
            try apply(request)
        case .zap(.all):
            vm.zapAllFast()
        case .zap(.gfns(let first, let count)):
            vm.zapGFNRange(first..<first + count)
        case .invlpg(let gva):
            vcpu.invalidatePage(gva)
            reference.invalidatePage(gva)
        case .reloadCR3:
            try vcpu.loadCR3(vcpu.registers.cr3)
            reference.reloadCR3()
        case .expect(let counters):
            guard checksExpectations else { return }
            try check(counters)
        case .vcpu(let index):
            try selectVCPU(index)
        case .l1(let setting):
            nestedSetting = setting
        case .eptMap(let map):
            try writeNestedEntry(map)
        case .eptDemand(let demand):
            demandRanges.append(demand)
        case .vmenter(let vpid, let guest):
            currentL2Guest = guest
            switchLevel(toL2: true)
            l2VPIDs[currentVCPU] = vpid
            try enterL2()
        case .vmexit:
            try vcpu.exitToL1()
            noteL2Transition()
            switchLevel(toL2: false)
        case .invvpid(let type, let vpid, let gva):
            guard try vcpu.invalidateVPID(type, vpid: vpid, address: gva) else {
                throw RunFailure.badScenario(line: currentLine, message:
                    "invvpid \(type.scenarioName) VPID \(hex(vpid)) GVA \(gva) fails (VMfailValid, invalid operand): "
                    + "VPID 0 names no L2 context, and the individual address must be canonical")
            }
        case .invept(let scope, let guest):
            guard case .ept(let levels, let ad, _) = nestedSetting else { return }
            try vcpu.invalidateEPT(scope == .global ? .allContexts
                : .singleContext(EPTPointer(root: try nestedRoot(guest: guest).rawValue, levels: levels, accessedDirty: ad)))
        case .subPageProtection(let request):
            try apply(request)
        case .kvm:
            break  // applied when the VM was made
        case .nxRecover:
            vm.recoverNXHugePages()
        case .age(let testOnly, let first, let count):
            let gfns = first..<first + count
            let young = testOnly ? vm.testAgeGFNRange(gfns) : vm.ageGFNRange(gfns)
            report.ages.append(AgeRecord(line: currentLine, testOnly: testOnly, first: first, count: count, young: young,
                                         precedingOperations: operationIndex))
        case .preFault(let gpa, let size, let flags):
            try preFault(gpa, size: size, flags: flags)
        }
    }

    // MARK: KVM_PRE_FAULT_MEMORY

    /// A VMM's KVM_PRE_FAULT_MEMORY loop on the current vCPU: the ioctl again while it returns 0
    /// with the range not yet done, stopping at its first error. The guest sees nothing of it (the
    /// leaves are made without A, and its own tables are untouched), so the reference machine
    /// learns nothing.
    private func preFault(_ gpa: GuestPhysicalAddress, size: UInt64, flags: UInt64) throws {
        var range = PreFaultRange(gpa: gpa, size: size, flags: flags)
        var failure: PreFaultError?
        do {
            repeat {
                try vcpu.preFaultMemory(&range)
            } while range.size > 0
        } catch {
            // The model's own failure (host memory) stops the run as a failing access would.
            if case .model = error { throw error }
            failure = error
        }
        report.preFaults.append(PreFaultRecord(line: currentLine, gpa: gpa, size: size, mapped: size - range.size,
                                               error: failure, precedingOperations: operationIndex))
    }

    // MARK: Sub-page write protection

    /// `spp set` / `spp get` as the VMM makes them, enabling SPP (KVM_ENABLE_CAP) at the first.
    /// The reference machine learns every permission set, and every GET must give back what was set.
    private func apply(_ request: SubPageProtectionRequest) throws {
        guard vm.subPageProtectionCapability.isSupported else {
            throw RunFailure.badScenario(line: currentLine, message: "spp needs --mmu tdp (EPT)")
        }
        if vm.subPageProtection == nil { try vm.enableSubPageProtection() }
        switch request {
        case .set(let gfn, let mask):
            // The guest kernel's tables live there, and its walks and stores must not meet SPP.
            guard gfn.address.rawValue >= GuestKernel.tablePoolEnd else {
                throw RunFailure.badScenario(line: currentLine, message: "spp: \(gfn) lies below 16 MiB, which holds the "
                    + "guest kernel's page tables; protect pages from gfn 0x1000 up")
            }
            try vm.setSubpageAccess(gfn: gfn, masks: [mask])
            reference.setSubPageWriteMask(mask, for: gfn)
        case .get(let gfn):
            let mask = try vm.getSubpageAccess(gfn: gfn)[0]
            let set = reference.subPageWriteMask(for: gfn)
            guard mask == set else {
                finish()
                throw RunFailure.brokenInvariant(line: currentLine, message:
                    "KVM_SUBPAGES_GET_ACCESS gives \(mask) for \(gfn), but the VMM set \(set)", partial: report)
            }
            report.subPageMasks.append(SubPageMaskRecord(line: currentLine, gfn: gfn, mask: mask,
                                                          precedingOperations: operationIndex))
        }
    }

    // MARK: L1 and L2

    /// L1's EPT or NPT root table, from the kernel's table pool (its window reaches it).
    private func nestedRoot(guest: Int) throws -> GuestPhysicalAddress {
        if let root = nestedRootTables[guest] { return root }
        let root = try l1Kernel.allocateTable()
        nestedRootTables[guest] = root
        return root
    }

    /// `ept-map`: L1 writes its entry for the L2 page (and any table above it) with L1 stores.
    private func writeNestedEntry(_ map: EPTMapDirective) throws {
        guard let setting = nestedSetting else { return }
        let isEPT = if case .ept = setting { true } else { false }
        let leafLevel = map.pageSize.leafLevel
        var table = try nestedRoot(guest: map.guest).rawValue
        var level = setting.levels
        while true {
            let entry = GuestPhysicalAddress(table + ((map.l2GPA.rawValue >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8)
            if level == leafLevel {
                var value: UInt64 = 0
                if !map.permissions.isEmpty || !isEPT {
                    let bits = isEPT ? 6 << 3 | map.permissions.eptBits : map.permissions.nptBits
                    value = bits == 0 ? 0 : map.l1GPA.rawValue | bits | (leafLevel > 1 ? 0x80 : 0)
                }
                return try l1Store(value, at: entry)
            }
            var value = vm.memory.hostPage(entry.frame)!.bytes.load(fromByteOffset: Int(entry.pageOffset), as: UInt64.self)
            let present = isEPT ? value & 7 != 0 : value & 1 != 0
            if !present || value & 0x80 != 0 {
                // A new table (replacing a large leaf there, if any), every right in its entry.
                value = try kernel.allocateTable().rawValue | 0x7
                try l1Store(value, at: entry)
            }
            table = value & bitRange(12, 51)
            guard table < GuestKernel.tablePoolEnd else {
                throw RunFailure.badScenario(line: currentLine, message:
                    "ept-map: L1's table at \(hex(table)) is outside the kernel's table pool below 16 MiB")
            }
            level -= 1
        }
    }

    private func l1Store(_ value: UInt64, at entry: GuestPhysicalAddress) throws {
        let outcome = try guestAccess(GuestKernel.linearAddress(of: entry, in: registers.mode), Access(.write, .supervisor),
                                      size: 8, value: value)
        guard case .completed = outcome.result else {
            throw RunFailure.badScenario(line: currentLine, message:
                "L1's store to its table entry at \(entry) did not complete: " + RunReport.outcomeText(outcome.result))
        }
    }

    /// The other vCPUs that run L2 now may cache L1's EPT as this vCPU's L1 store or VM entry left
    /// it (see `VCPU.noteL1EPTChangedWhileInL2`).
    private func noteL1EPTChangeToOtherVCPUs() {
        guard nestedSetting != nil, processors.count > 1 else { return }
        for index in processors.indices where index != currentVCPU { processors[index].vcpu.noteL1EPTChangedWhileInL2() }
    }

    /// `vmenter`, or L1 resuming L2 after an exit: L1's EPTP (or nCR3) with the scenario's
    /// settings and L2's registers as L2 left them (paging off at the first entry).
    private func enterL2() throws {
        guard let setting = nestedSetting else { return }
        let paging: L1NestedPaging
        switch setting {
        case .ept(let levels, let ad, let executeOnly):
            guard vm.tdp?.masks.isEPT == true else {
                throw RunFailure.badScenario(line: currentLine, message: "vmenter: `l1 ept` needs L1 under EPT (run with --mmu tdp)")
            }
            paging = .ept(EPTPointer(root: try nestedRoot(guest: currentL2Guest).rawValue, levels: levels, accessedDirty: ad),
                          capabilities: EPTCapabilities(executeOnly: executeOnly, pages1GiB: scenario.cpuModel.supports1GiBPages,
                                                        maxPhysicalAddressBits: scenario.cpuModel.maxPhysicalAddressBits))
        case .npt(let levels):
            guard let tdp = vm.tdp, !tdp.masks.isEPT else {
                throw RunFailure.badScenario(line: currentLine, message: "vmenter: `l1 npt` needs L1 under NPT (run with --mmu npt)")
            }
            let l1Mode = (suspendedL1?.registers ?? registers).mode
            guard l1Mode.rootLevel == levels else {
                throw RunFailure.badScenario(line: currentLine, message:
                    "vmenter: L1's NPT is walked in L1's paging mode, \(l1Mode.displayName), not \(levels)-level")
            }
            paging = .npt(nestedCR3: try nestedRoot(guest: currentL2Guest).rawValue)
        }
        try vcpu.enterL2(paging, registers: registers, vpid: l2VPIDs[currentVCPU] ?? nil)
        noteL2Transition()
        noteL1EPTChangeToOtherVCPUs()
    }

    /// A VM entry or exit: without VPID for L2, the architecture flushes VPID 0, which is L1's
    /// too, so the reference drops what L1 may still use from its TLB.
    private func noteL2Transition() {
        if vcpu.l2SharesL1TLBTag { reference.invalidatePCID(.allContextsIncludingGlobal, pcid: 0, address: GuestVirtualAddress(0)) }
    }

    /// `vmenter` and `vmexit` as the directives see them: the registers, settings, kernel and
    /// loaded space they act on become L2's (kept per vCPU from its last `vmexit`) or L1's again.
    private func switchLevel(toL2: Bool) {
        let current = GuestLevelState(controls: controls, registers: registers, kernel: kernel, loadedSpace: loadedSpace)
        let next: GuestLevelState
        let key = currentVCPU * 16 + currentL2Guest
        if toL2 {
            suspendedL1 = current
            next = l2Levels[key]
                ?? GuestLevelState(controls: .defaults, registers: PagingRegisters(), kernel: nil, loadedSpace: Scenario.kernelSpace)
            (controls, registers, kernel, loadedSpace) = (next.controls, next.registers, l2Kernels[currentL2Guest], next.loadedSpace)
            return
        } else {
            l2Levels[key] = current
            next = suspendedL1!
            suspendedL1 = nil
        }
        (controls, registers, kernel, loadedSpace) = (next.controls, next.registers, next.kernel, next.loadedSpace)
    }

    /// A directive acting on L2 (true), or one that is not L2's to handle (false: `expect`,
    /// `vmexit`). L2's kernel owns L2's tables as L1's kernel owns L1's (its pool and window in L2's
    /// guest-physical memory), and every change it makes is an L2 store.
    private func executeInL2(_ directive: ScenarioDirective) throws -> Bool {
        switch directive {
        case .access(let kind, let gva, let cpl, let value):
            try l2Operation(kind == .fetch ? "exec" : kind == .write ? "write" : "read", kind, gva, cpl: cpl, size: 8,
                            value: value ?? 0, recordedAs: gva)
        case .set(let changes):
            let new = controls.applying(changes)
            let target = changes.applied(to: registers, controls: new)
            controls = new
            if changes.pagingMode != nil && target.mode != registers.mode {
                _ = try l2Kernel(mode: target.mode)
                try switchMode(to: target)
            } else {
                try write(target)
            }
        case .map(let map):
            try checkCollision(map)
            try l2Kernel(mode: registers.modeWithPagingOn).map(map.gva, to: map.gpa, leafLevel: map.pageSize.leafLevel,
                                                               leafFlags: map.leafFlagsWithKey, tableFlags: { map.tableFlags(level: $0) })
        case .pte(let gva, let level, let entryValue, let cpl):
            let kernel = try l2Kernel(mode: registers.modeWithPagingOn)
            let (address, new) = try pteTarget(gva, level: level, entryValue, kernel)
            try l2Operation("pte", .write, GuestKernel.linearAddress(of: address, in: registers.mode), cpl: cpl,
                            size: kernel.entrySize, value: new, recordedAs: gva)
        case .invlpg(let gva):
            try vcpu.invalidateL2Page(gva)
        case .reloadCR3:
            try loadCR3(registers.cr3, noFlush: false)
        case .invpcid(let type, let pcid, let gva):
            if registers.invpcidFaults(type, pcid: pcid, address: gva) {
                record("invpcid", cpl: 0, gva: gva, outcome: AccessOutcome(result: .generalProtection), inL2: true)
            } else {
                try vcpu.invalidateL2PCID(type, pcid: UInt16(pcid), address: gva)
            }
        case .space(let name):
            try l2Kernel(mode: registers.modeWithPagingOn).selectSpace(name)
        case .switchSpace(let name, let pcid, let noFlush):
            let kernel = try l2Kernel(mode: registers.modeWithPagingOn)
            guard kernel.hasSpace(name) else {
                throw RunFailure.badScenario(line: currentLine, message: "switch: no address space '\(name)' in L2")
            }
            if (pcid != 0 || noFlush) && !registers.cr4.contains(.pcidEnable) {
                throw RunFailure.badScenario(line: currentLine, message: "switch: pcid and noflush need L2's CR4.PCIDE (set pcid=1)")
            }
            try loadCR3(try kernel.root(of: name, mode: registers.modeWithPagingOn).rawValue | UInt64(pcid), noFlush: noFlush)
            loadedSpace = name
        default:
            return false
        }
        return true
    }

    /// L2's kernel, made at the first line that needs L2's tables, with the kernel space's root
    /// for `mode`: its table writes are L2 stores at the address L2 reaches them by (through the
    /// window, or at their guest-physical address with L2's paging off); its reads find L2's
    /// tables in L1's memory through L1's tables, as the software owning L2's memory does.
    private func l2Kernel(mode: PagingMode) throws -> GuestKernel {
        if let kernel { return kernel }
        // Made by the first vCPU that needs it, for all that run the guest.
        let made = try GuestKernel(l2Of: vm, mode: mode, store: { [unowned self] entry, value, size in
            try self.l2KernelStore(entry, value, size: size)
        }, load: { [unowned self] entry, size in
            try self.l2TableLoad(entry, size: size)
        })
        kernel = made
        l2Kernels[currentL2Guest] = made
        return made
    }

    private func l2KernelStore(_ entry: GuestPhysicalAddress, _ value: UInt64, size: Int) throws {
        let gva = GuestKernel.linearAddress(of: entry, in: registers.mode)
        let (outcome, exit) = try l2AccessResumedByL1(gva, Access(.write, .supervisor), size: size, value: value)
        if let exit {
            throw RunFailure.badScenario(line: currentLine, message:
                "L2's kernel's store to its table entry at L2 guest-physical \(entry) (through \(gva)): "
                + RunReport.exitText(exit) + "; L1 must map L2's table pool from 1 MiB with write permission "
                + "(ept-map, or ept-demand)")
        }
        guard case .completed = outcome.result else {
            throw RunFailure.badScenario(line: currentLine, message:
                "L2's kernel's store to its table entry at L2 guest-physical \(entry) (through \(gva)) did not complete: "
                + RunReport.outcomeText(outcome.result) + "; L2's CR3 must point at a root with the kernel's window")
        }
    }

    private func l2TableLoad(_ entry: GuestPhysicalAddress, size: Int) throws -> UInt64 {
        var result = try vcpu.l1Address(ofL2Physical: entry)
        if case .failure = result, demandRanges.contains(where: { $0.guest == currentL2Guest && $0.covers(entry) }) {
            // L2's kernel reads the entry: the read exits, L1 maps the page, and the read runs again.
            _ = try l2AccessResumedByL1(GuestKernel.linearAddress(of: entry, in: registers.mode), Access(.read, .supervisor),
                                        size: size, value: 0)
            result = try vcpu.l1Address(ofL2Physical: entry)
        }
        switch result {
        case .success(let l1Address):
            return size == 4 ? UInt64(try vm.memory.load32(l1Address)) : try vm.memory.load64(l1Address)
        case .failure(let fault):
            throw RunFailure.badScenario(line: currentLine, message:
                "L2's table entry at L2 guest-physical \(entry) cannot be read: L1's tables refuse it (\(fault)); "
                + "L1 must map L2's table pool from 1 MiB readable (ept-map, or ept-demand)")
        }
    }

    /// An access of L2's (`access`, or the store of a `pte`), recorded; an exit to L1 is taken by
    /// L1, which resumes L2 as it was (a scenario stays in L2 until `vmexit`).
    private func l2Operation(_ operation: String, _ kind: AccessKind, _ gva: GuestVirtualAddress, cpl: Int, size: Int,
                             value: UInt64, recordedAs recordedGVA: GuestVirtualAddress) throws {
        _ = try l2AccessResumedByL1(gva, Access(kind, cpl == 3 ? .user : .supervisor), size: size, value: value) { outcome, exit in
            record(operation, cpl: cpl, gva: recordedGVA, outcome: outcome, inL2: true, exit: exit)
        }
    }

    /// One L2 instruction's access. After an exit L1 resumes L2, and when its handler mapped a page
    /// for the exit (`ept-demand`), L2 executes the instruction again; `attempt` sees every try,
    /// before L1 handles its exit. The last try's outcome, and its exit if L1 left it unresolved.
    private func l2AccessResumedByL1(_ gva: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                                     attempt: (AccessOutcome, NestedVMExit?) -> Void = { _, _ in })
        throws -> (AccessOutcome, NestedVMExit?) {
        var tries = 0
        while true {
            let (outcome, exit) = try checkedL2Access(gva, access, size: size, value: value)
            attempt(outcome, exit)
            guard let exit else { return (outcome, nil) }
            let mapped = try l1HandleExit(exit)
            try enterL2()
            tries += 1
            // An exit L1 left as it was would only come again.
            if !mapped || tries == Self.demandRetries { return (outcome, exit) }
        }
    }

    /// An L2 instruction exits at most once for each of its table levels and its final address
    /// before L1 has mapped them all: more exits than that would be L1 mapping in vain.
    private static let demandRetries = 8

    /// L1's handler of an exit of L2's: an EPT violation (or #NPF) at an address of an `ept-demand`
    /// range of the guest whose L1 entry is not present maps the page that holds it (true). Any
    /// other exit it leaves as it is (false), and resumes L2 unchanged.
    private func l1HandleExit(_ exit: NestedVMExit) throws -> Bool {
        switch exit {
        case .eptViolation, .nestedPageFault: break
        case .eptMisconfiguration: return false
        }
        guard let demand = demandRanges.last(where: { $0.guest == currentL2Guest && $0.covers(exit.address) }),
              try !l1MapsPresent(exit.address, guest: currentL2Guest) else { return false }
        let map = demand.mapping(for: exit.address)
        // L1's code runs now: its registers, kernel and stores, with L2's state kept aside.
        switchLevel(toL2: false)
        defer { switchLevel(toL2: true) }
        try writeNestedEntry(map)
        report.l1Maps.append(L1MapRecord(line: currentLine, map: map, precedingOperations: operationIndex))
        return true
    }

    /// Whether L1's EPT (or NPT) tables for `guest` have a present leaf for `address`, read as L1's
    /// software reads them (its memory, no A/D update).
    private func l1MapsPresent(_ address: GuestPhysicalAddress, guest: Int) throws -> Bool {
        guard let setting = nestedSetting, let root = nestedRootTables[guest] else { return false }
        let isEPT = if case .ept = setting { true } else { false }
        var table = root.rawValue
        var level = setting.levels
        while true {
            let entry = GuestPhysicalAddress(table + ((address.rawValue >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8)
            guard let page = vm.memory.hostPage(entry.frame) else { return false }
            let value = page.bytes.load(fromByteOffset: Int(entry.pageOffset), as: UInt64.self)
            guard isEPT ? value & 7 != 0 : value & 1 != 0 else { return false }
            if level == 1 || value & 0x80 != 0 { return true }
            table = value & bitRange(12, 51)
            level -= 1
        }
    }

    /// One L2 access checked against the architecture's nested walk, the auditors after it. An
    /// exit to L1 comes back as the exit, with the outcome at the exit's L2 address.
    private func checkedL2Access(_ gva: GuestVirtualAddress, _ access: Access, size: Int,
                                 value: UInt64) throws -> (AccessOutcome, NestedVMExit?) {
        let outcome = try vcpu.accessL2(gva, access, size: size, value: value)
        if outcome.result.isExit { noteL2Transition() }
        try vcpu.checkL2(outcome, at: gva, access, expected: try vcpu.architecturalL2(gva, access, setAccessedDirty: !outcome.tlbHit))
        l2Checks += 1
        if let problem = vm.audit().first {
            finish()
            throw RunFailure.brokenInvariant(line: currentLine, message: problem, partial: report)
        }
        let result: AccessResult
        var exit: NestedVMExit?
        switch outcome.result {
        case .completed(let gpa, _, let value): result = .completed(gpa: gpa, value: value)
        case .pageFault(let errorCode, let cr2): result = .pageFault(errorCode: errorCode, cr2: cr2)
        case .generalProtection: result = .generalProtection
        case .mmio(let l1GPA, let value): result = .mmio(gpa: l1GPA, value: value)
        case .exitToL1(let reflected):
            exit = reflected
            result = .completed(gpa: reflected.address, value: 0)
        }
        return (AccessOutcome(result: result, exits: outcome.exits, emulated: outcome.emulated, tlbHit: outcome.tlbHit), exit)
    }

    /// The value of an `expect` line's counter now: a KVM statistic counted from the start of the
    /// run (instant and peak ones as they are), a context counter since the vCPU was made (0 before
    /// boot), or the shadow pages alive (KVM's `n_used_mmu_pages`).
    private func counterValue(_ name: String) -> UInt64? {
        if let value = vm.stats.delta(from: report.statsBefore)[kvmName: name] { return value }
        switch name {
        case "context_resets": return contextTotal(\.contextResets)
        case "role_reinitializations": return contextTotal(\.roleReinitializations)
        case "roots_created": return contextTotal(\.rootsCreated)
        case "root_cache_hits": return contextTotal(\.rootCacheHits)
        case "root_cache_misses": return contextTotal(\.rootCacheMisses)
        case "shadow_pages": return UInt64(vm.mmu.usedPages)
        default: return nil
        }
    }

    private func check(_ counters: [ExpectedCounter]) throws {
        report.expectationsChecked += 1
        let unmet = counters.compactMap { counter -> String? in
            let actual = counterValue(counter.name)
            return actual == counter.value ? nil : "\(counter.name) is \(actual.map(String.init) ?? "unknown"), expected \(counter.value)"
        }
        guard unmet.isEmpty else {
            finish()
            throw RunFailure.unmetExpectation(line: currentLine, message: unmet.joined(separator: "; "), partial: report)
        }
    }

    /// One write of CR0, CR4, EFER, PKRU or RFLAGS (or several at once, for a `set`), refused as
    /// the processor refuses it, on the vCPU and the reference alike.
    private func write(_ new: PagingRegisters) throws {
        let new = new.withComputedLongModeActive
        guard new != registers else { return }
        if let fault = registers.transitionFault(to: new, cpu: scenario.cpuModel) {
            throw RunFailure.badScenario(line: currentLine, message: (directivesActOnL2 ? "#GP in L2: " : "#GP: ") + "\(fault)")
        }
        if directivesActOnL2 {
            try writeL2(new)
            return
        }
        try vcpu.setRegisters(new)
        try reference.setRegisters(new)
        registers = new
    }

    /// MOV to CR3 of `value` (bit 63 of the source set with `noFlush`), on both machines.
    private func loadCR3(_ value: UInt64, noFlush: Bool) throws {
        if directivesActOnL2 {
            var new = registers
            new.cr3 = value
            try writeL2(new, loadsCR3: true, noFlush: noFlush)
            return
        }
        try vcpu.loadCR3(value, noFlush: noFlush)
        try reference.loadCR3(value, noFlush: noFlush)
        registers.cr3 = value
    }

    /// L2's register write (a MOV to CR or WRMSR in L2, which L1 does not intercept); a PAE PDPTE
    /// load L1's tables refuse is an exit to L1 that the instruction would meet again after every
    /// resume, so the scenario stops there.
    private func writeL2(_ new: PagingRegisters, loadsCR3: Bool = false, noFlush: Bool = false) throws {
        var tries = 0
        while let exit = try vcpu.setL2Registers(new, loadsCR3: loadsCR3, noFlush: noFlush) {
            noteL2Transition()
            let mapped = try l1HandleExit(exit)
            try enterL2()
            tries += 1
            guard mapped, tries < Self.demandRetries else {
                throw RunFailure.badScenario(line: currentLine, message:
                    "L2's PAE PDPTE load for CR3 \(GuestPhysicalAddress(new.cr3 & 0xFFFF_FFE0)): " + RunReport.exitText(exit)
                    + "; L1 must map L2's PDPT readable (ept-map, or ept-demand)")
            }
        }
        registers = new
    }

    /// A paging-mode switch the way an OS makes it, one legal register write at a time: PCIDE off
    /// (it must be 0 outside long mode), paging off, EFER.LME, then CR4's mode bits (PAE, LA57, PSE,
    /// which long mode freezes), CR3 at the loaded space's root for the new mode (built now, while
    /// the old mode still runs, through its window), paging on, and last the rest of `target`
    /// (PCIDE again, and whatever else the `set` changed).
    private func switchMode(to target: PagingRegisters) throws {
        let space = loadedSpace ?? Scenario.kernelSpace
        let root = try kernel.root(of: space, mode: target.mode)
        var step = registers
        func apply(_ change: (inout PagingRegisters) -> Void) throws {
            change(&step)
            try write(step)
            step = registers
        }
        try apply { $0.cr4.remove(.pcidEnable) }
        try apply { $0.cr0.remove(.paging) }
        try apply { $0.efer = $0.efer.subtracting(.longModeEnable).union(target.efer.intersection(.longModeEnable)) }
        let modeBits: CR4 = [.physicalAddressExtension, .la57, .pageSizeExtensions]
        try apply { $0.cr4 = $0.cr4.subtracting(modeBits).union(target.cr4.intersection(modeBits)) }
        try apply { $0.cr3 = root.rawValue }
        try apply { $0.cr0.formUnion([.paging, .protectionEnable]) }  // L2 may start with PE clear
        var final = target
        final.cr3 = root.rawValue
        try write(final)
        loadedSpace = space
    }

    private func nextEventSequence() -> UInt64 {
        (vm.mmu.events.events.last?.sequence).map { $0 + 1 } ?? 0
    }

    // MARK: Memslots and the dirty log

    private func apply(_ change: MemslotChange) throws {
        switch change {
        case .add(let slot, let base, let size, let readOnly):
            try vm.addMemslot(id: slot, base: base, size: size, readOnly: readOnly)
        case .delete(let slot):
            let pages = vm.memory.slot(id: slot).map { $0.baseFrame.rawValue..<$0.endFrame.rawValue }
            try vm.deleteMemslot(id: slot)
            dirtyLogBaselines[slot] = nil
            if let pages { reference?.subPageWriteMasksDeleted(pages) }
        case .move(let slot, let base):
            let pages = vm.memory.slot(id: slot).map { $0.baseFrame.rawValue..<$0.endFrame.rawValue }
            try vm.moveMemslot(id: slot, to: base)  // the same pages, so the baselines stand
            if let pages { reference?.subPageWriteMasksMoved(from: pages, to: base.frame.rawValue) }
        case .flags(let slot, let logDirty):
            try setDirtyLogging(slot: slot, logDirty)
        }
    }

    private func apply(_ request: DirtyLogRequest) throws {
        switch request {
        case .setLogging(let slot, let enabled):
            try setDirtyLogging(slot: slot, enabled)
        case .mode(let mode, let entries):
            try vm.setDirtyLogProtocol(mode, ringEntries: entries)
        case .get(let slot):
            let gfns: [GuestFrameNumber]
            if vm.dirtyLogProtocol == .ring {
                guard let logging = vm.memory.slot(id: slot), logging.logsDirtyPages else {
                    throw VirtualMachineError.memslot("memslot \(slot) does not log dirty pages")
                }
                harvestAndResetDirtyRings()
                gfns = (harvestedDirtyGFNs.removeValue(forKey: slot) ?? []).sorted().map { GuestFrameNumber($0) }
            } else {
                gfns = try vm.getDirtyLog(slot: slot)
            }
            try checkNoDirtyPageLost(slot: slot, reported: gfns)
            if vm.dirtyLogProtocol != .manualProtect { dirtyLogBaselines[slot] = pageDigests(slot: slot) }
            report.dirtyLogs.append(DirtyLogRecord(line: currentLine, slot: slot, gfns: gfns, precedingOperations: operationIndex))
        case .clear(let slot, let first, let count):
            try vm.clearDirtyLog(slot: slot, first: first, count: count)
            let digests = pageDigests(slot: slot)
            for page in first..<first + count { dirtyLogBaselines[slot]?[Int(page)] = digests[Int(page)] }
        }
    }

    /// The VMM's dirty-ring loop: harvest every ring (keeping what it found by slot), then
    /// KVM_RESET_DIRTY_RINGS. Also the answer to KVM_EXIT_DIRTY_RING_FULL.
    private func harvestAndResetDirtyRings() {
        for (slot, gfn) in vm.harvestDirtyRings() { harvestedDirtyGFNs[slot, default: []].insert(gfn.rawValue) }
        vm.resetDirtyRings()
    }

    private func setDirtyLogging(slot: Int, _ enabled: Bool) throws {
        try vm.setDirtyLogging(slot: slot, enabled)
        dirtyLogBaselines[slot] = enabled ? pageDigests(slot: slot) : nil
    }

    private func checkNoDirtyPageLost(slot id: Int, reported: [GuestFrameNumber]) throws {
        guard let baseline = dirtyLogBaselines[id], let slot = vm.memory.slot(id: id) else { return }
        let reportedSet = Set(reported.map(\.rawValue))
        let now = pageDigests(slot: id)
        for page in 0..<now.count where now[page] != baseline[page] {
            let gfn = slot.baseFrame.rawValue + UInt64(page)
            guard !reportedSet.contains(gfn) else { continue }
            finish()
            throw RunFailure.brokenInvariant(line: currentLine, message:
                "dirty log of memslot \(id) lost gfn \(hex(gfn)): its contents changed since its dirty bit was last taken, "
                + "but KVM does not report it", partial: report)
        }
    }

    /// A digest of each page of the slot's memory, read through the host's mapping.
    private func pageDigests(slot id: Int) -> [UInt64] {
        guard let slot = vm.memory.slot(id: id) else { return [] }
        return (0..<slot.pageCount).map { page in
            let words = vm.pool.pointer(HostFrameNumber(slot.hostBase.rawValue + page)).bindMemory(to: UInt64.self, capacity: 512)
            var digest: UInt64 = 0xCBF2_9CE4_8422_2325
            for index in 0..<512 { digest = (digest ^ words[index]) &* 0x0000_0100_0000_01B3 }
            return digest
        }
    }

    private func record(_ operation: String, cpl: Int, gva: GuestVirtualAddress, outcome: AccessOutcome, inL2: Bool = false,
                        exit: NestedVMExit? = nil) {
        var access = AccessRecord(index: operationIndex, line: currentLine, operation: operation, cpl: cpl, gva: gva,
                                  outcome: outcome, inL2: inL2, exitToL1: exit)
        if tracesEvents {
            access.events = vm.mmu.events.events.filter { $0.sequence >= firstEventOfDirective }
            // The ring keeps the last events; take them out so each operation costs only its own.
            vm.mmu.events.clear()
            firstEventOfDirective = 0
        }
        report.accesses.append(access)
        operationIndex += 1
    }

    /// One guest access through the VM, checked against the reference.
    private func guestAccess(_ gva: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64) throws -> AccessOutcome {
        let expected = reference.expect(gva, access)
        let outcome = try vcpu.access(gva, access, size: size, value: value)
        try reference.check(gva, access, size: size, value: value, expected: expected, actual: outcome.result)
        if let problem = vm.audit().first {
            finish()
            throw RunFailure.brokenInvariant(line: currentLine, message: problem, partial: report)
        }
        // Any L1 store may rewrite its EPT tables (an `ept-map`'s do).
        if access.kind == .write { noteL1EPTChangeToOtherVCPUs() }
        return outcome
    }

    /// A `pte` line's entry (in the kernel's pool, which its window reaches) and its new value.
    private func pteTarget(_ gva: GuestVirtualAddress, level: Int, _ entryValue: EntryValue,
                           _ kernel: GuestKernel) throws -> (GuestPhysicalAddress, UInt64) {
        guard let address = try kernel.entryAddress(gva, level: level) else {
            throw RunFailure.badScenario(line: currentLine, message: "pte: \(gva) has no level-\(level) entry (the walk ends above it)")
        }
        guard address.rawValue < GuestKernel.tablePoolEnd else {
            throw RunFailure.badScenario(line: currentLine, message:
                "pte: the level-\(level) entry for \(gva) is at \(address), in a table outside the page-table pool below "
                + "16 MiB (an entry above it points there), which the kernel cannot reach through its window")
        }
        let old = try kernel.readEntry(address)
        switch entryValue {
        case .raw(let value): return (address, value)
        case .flags(let flags):
            let addressBits = kernel.mode == .legacy32 ? old & 0xFFFF_F000 : old & bitRange(12, 51)
            return (address, addressBits | flags)
        }
    }

    private func checkCollision(_ map: MapDirective) throws {
        if map.gpa.rawValue < GuestKernel.tablePoolEnd {
            throw RunFailure.badScenario(line: currentLine, message:
                "map: guest-physical memory below 16 MiB holds the guest kernel's page tables; map GPAs from 0x1000000 up")
        }
        // A GPA beyond guest memory is in no memslot: emulated MMIO, which a guest may well map.
        let window = kernel.windowBase
        let gva = map.gva.rawValue
        if gva < window + GuestKernel.tablePoolEnd && gva + map.pageSize.bytes > window {
            throw RunFailure.badScenario(line: currentLine, message:
                "map: \(map.gva) collides with the kernel's window onto its page tables at \(hex(window))")
        }
    }
}
