import GuestMemory
import KVMMMU
import VirtualMachine
import X86Paging

/// One guest operation of a run and what the guest saw.
public struct AccessRecord: Sendable {
    /// Counts `access` and `pte` directives from 0.
    public var index: Int
    public var line: Int
    /// "read", "write", "exec" or "pte".
    public var operation: String
    public var cpl: Int
    public var gva: GuestVirtualAddress
    public var outcome: AccessOutcome
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

    public var description: String {
        switch self {
        case .badScenario(let line, let message): "line \(line): \(message)"
        case .disagreement(let line, let disagreement, _): "line \(line): \(disagreement)"
        case .brokenInvariant(let line, let message, _): "line \(line): broken invariant: \(message)"
        }
    }

    public var exitCode: Int32 {
        switch self {
        case .badScenario: 1
        case .disagreement, .brokenInvariant: 2
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
    private var controls: ControlState
    private var report: RunReport
    private var currentLine = 0
    private var operationIndex = 0
    private var mappedAddresses: [GuestVirtualAddress] = []

    /// Whether to keep the MMU events (KVM's tracepoints) each operation causes.
    public let tracesEvents: Bool
    /// Events from this sequence number on belong to the current directive.
    private var firstEventOfDirective: UInt64 = 0

    /// The shadow-page cache size (KVM_SET_NR_MMU_PAGES); nil for KVM's default from the memslots.
    public let shadowPageLimit: Int?
    /// The MMU design the VM runs.
    public let variant: MMUVariant

    public init(scenario: Scenario, traceEvents: Bool = false, shadowPageLimit: Int? = nil,
                variant: MMUVariant = .upstream) {
        self.scenario = scenario
        self.variant = variant
        tracesEvents = traceEvents
        self.shadowPageLimit = shadowPageLimit
        controls = scenario.initialControls
        report = RunReport(scenario: scenario.name)
    }

    public func run() throws(RunFailure) -> RunReport {
        do {
            try setUp()
        } catch let failure as RunFailure {
            throw failure
        } catch {
            throw .badScenario(line: 0, message: "\(error)")
        }
        report.statsBefore = vm.mmu.stats
        vm.mmu.events.isRecording = tracesEvents
        for statement in scenario.directives {
            currentLine = statement.line
            if tracesEvents { firstEventOfDirective = nextEventSequence() }
            do {
                try execute(statement.directive)
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
        return report
    }

    private func setUp() throws {
        vm = try VirtualMachine(memorySize: scenario.memorySize, cpu: scenario.cpuModel, shadowPageLimit: shadowPageLimit,
                                variant: variant)
        kernel = try GuestKernel(vm: vm, mode: controls.pagingMode)
        kernel.store = { [unowned self] gva, value, size in
            _ = try self.guestAccess(gva, Access(.write, .supervisor), size: size, value: value)
        }
    }

    private func finish() {
        report.statsAfter = vm.mmu.stats
        report.lockstepChecks = reference?.checkedAccesses ?? 0
        var seen = Set<UInt64>()
        let distinct = mappedAddresses.filter { seen.insert($0.rawValue).inserted }
        report.entries = distinct.flatMap { gva in
            kernel.path(gva).map { EntryRecord(gva: gva, level: $0.level, address: $0.address, value: $0.value) }
        }
        let pages = vm.mmu.shadowPages
        report.shadowPagesByLevel = Dictionary(grouping: pages, by: \.level).mapValues(\.count)
        report.shadowPagesByRole = Dictionary(grouping: pages, by: { vm.variant.describe($0.role) }).mapValues(\.count)
        report.shadowPageKeys = Set(pages.map { ShadowPageKey(gfn: $0.gfn.rawValue, role: $0.role.word) })
        if let context = vcpu?.context {
            report.contextResets = context.contextResets
            report.roleReinitializations = context.roleReinitializations
            report.rootsCreated = context.rootsCreated
            report.rootCacheHits = context.rootCacheHits
            report.rootCacheMisses = context.rootCacheMisses
        }
    }

    /// The first guest operation: the kernel has built its tables with paging off and now turns
    /// paging on with CR3 pointing at them (which is when PAE loads its PDPTEs), on the vCPU and
    /// on the reference alike.
    private func boot() throws {
        guard !kernel.booted else { return }
        let registers = controls.registers(cr3: kernel.root.rawValue)
        vcpu = try vm.addVCPU(registers: registers)
        reference = try ReferenceMachine(memory: vm.memory, registers: registers, cpu: scenario.cpuModel)
        kernel.booted = true
    }

    private func execute(_ directive: ScenarioDirective) throws {
        switch directive {
        case .mem, .cpu:
            break  // applied when the machine was built
        case .set(let changes):
            let new = controls.applying(changes)
            if new.pagingMode != controls.pagingMode && kernel.booted {
                throw RunFailure.badScenario(line: currentLine, message: "set: the paging mode cannot change after the first guest operation")
            }
            controls = new
            let registers = controls.registers(cr3: kernel.root.rawValue)
            guard kernel.booted else {
                // Checked now so that an impossible combination names this line.
                try VCPU.checkSupported(registers)
                _ = try PageWalker(registers: registers, cpu: scenario.cpuModel, memory: vm.memory)
                return
            }
            try vcpu.setRegisters(registers)
            try reference.setRegisters(registers)
        case .map(let map):
            try checkCollision(map)
            mappedAddresses.append(map.gva)
            try kernel.map(map.gva, to: map.gpa, leafLevel: map.pageSize.leafLevel, leafFlags: map.leafFlagsWithKey,
                           tableFlags: { map.tableFlags(level: $0) })
        case .access(let kind, let gva, let cpl, let value):
            try boot()
            let outcome = try guestAccess(gva, Access(kind, cpl == 3 ? .user : .supervisor), size: 8, value: value ?? 0)
            record(kind == .fetch ? "exec" : kind == .write ? "write" : "read", cpl: cpl, gva: gva, outcome: outcome)
        case .pte(let gva, let level, let entryValue, let cpl):
            try boot()
            guard let address = try kernel.entryAddress(gva, level: level) else {
                throw RunFailure.badScenario(line: currentLine, message: "pte: \(gva) has no level-\(level) entry (the walk ends above it)")
            }
            guard address.rawValue < GuestKernel.tablePoolEnd else {
                throw RunFailure.badScenario(line: currentLine, message:
                    "pte: the level-\(level) entry for \(gva) is at \(address), in a table outside the page-table pool below "
                    + "16 MiB (an entry above it points there), which the kernel cannot reach through its window")
            }
            let old = try kernel.readEntry(address)
            let new: UInt64
            switch entryValue {
            case .raw(let value): new = value
            case .flags(let flags):
                let addressBits = kernel.mode == .legacy32 ? old & 0xFFFF_F000 : old & bitRange(12, 51)
                new = addressBits | flags
            }
            let outcome = try guestAccess(kernel.windowAddress(address), Access(.write, cpl == 3 ? .user : .supervisor),
                                          size: kernel.entrySize, value: new)
            record("pte", cpl: cpl, gva: gva, outcome: outcome)
        case .invlpg(let gva):
            try boot()
            vcpu.invalidatePage(gva)
            reference.invalidatePage(gva)
        case .reloadCR3:
            try boot()
            try vcpu.loadCR3(vcpu.registers.cr3)
            reference.reloadCR3()
        }
    }

    private func nextEventSequence() -> UInt64 {
        (vm.mmu.events.events.last?.sequence).map { $0 + 1 } ?? 0
    }

    private func record(_ operation: String, cpl: Int, gva: GuestVirtualAddress, outcome: AccessOutcome) {
        var access = AccessRecord(index: operationIndex, line: currentLine, operation: operation, cpl: cpl, gva: gva,
                                  outcome: outcome)
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
        if let problem = vm.mmu.audit().first {
            finish()
            throw RunFailure.brokenInvariant(line: currentLine, message: problem, partial: report)
        }
        return outcome
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
