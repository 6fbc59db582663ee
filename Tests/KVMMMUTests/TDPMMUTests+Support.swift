import GuestMemory
import Synchronization
import Testing
import X86Paging
@testable import KVMMMU

/// SplitMix64: deterministic for a seed, so a failing property prints a reproducible seed.
struct TDPRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ bound: UInt64) -> UInt64 { next() % bound }
    mutating func chance(_ numerator: UInt64, in denominator: UInt64) -> Bool { below(denominator) < numerator }
}

let pages2M: UInt64 = 512
let pages1G: UInt64 = 512 * 512

/// The host physical memory the hardware walks: the pool's frames.
struct PoolMemory: PhysicalMemory {
    let pool: HostPagePool
    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        let host = HostFrameNumber(frame.rawValue)
        guard pool.contains(host) else { return nil }
        return HostPage(bytes: pool.pointer(host), isWritable: true)
    }
}

/// A VM's worth of TDP MMU: memslots over a pool, the MMU, one root, and a processor that walks
/// the TDP tables with the architecture's EPT walker and exits to the MMU as a vCPU would.
final class TDPFixture: @unchecked Sendable {
    let pool: HostPagePool
    let memory: MemslotSet
    let mmu: TDPMMU
    var root: TDPRoot
    let flushCount = Atomic<Int>(0)
    let obsoleteRootRequestCount = Atomic<Int>(0)
    var flushes: Int { flushCount.load(ordering: .relaxed) }
    var obsoleteRootRequests: Int { obsoleteRootRequestCount.load(ordering: .relaxed) }

    init(configuration: TDPMMUConfiguration = .ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46),
         poolPages: Int = 1 << 22) throws {
        pool = try HostPagePool(capacityPages: poolPages)
        memory = MemslotSet(pool: pool)
        mmu = try TDPMMU(memory: memory, configuration: configuration, events: MMUEventLog(capacity: 64, recording: true))
        root = try mmu.allocateRoot()
        mmu.flushRemoteTLBs = { [unowned self] in self.flushCount.add(1, ordering: .relaxed) }
        mmu.freeObsoleteRoots = { [unowned self] in self.obsoleteRootRequestCount.add(1, ordering: .relaxed) }
    }

    var masks: SPTEMasks { mmu.masks }

    /// Adds a slot whose first host frame is its first gfn plus `hostSkew` modulo 1G (0: aligned
    /// alike for every huge page size).
    @discardableResult
    func addSlot(id: Int, baseGFN: UInt64, pages: UInt64, flags: MemslotFlags = [], hostSkew: UInt64 = 0,
                 hostMapping: HostMappingSize = .oneGiB) throws -> Memslot {
        try mmu.addMemslot(id: id, base: GuestFrameNumber(baseGFN).address, size: pages << 12, flags: flags,
                           hostMapping: hostMapping, hostAlignment: pages1G, hostSkew: hostSkew)
    }

    /// Reloads the root if it was invalidated (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS at entry).
    func reloadRootIfInvalid() throws {
        guard root.isInvalid else { return }
        try mmu.putRoot(root)
        root = try mmu.allocateRoot()
    }

    /// The EPT walker for the current root, as the processor is configured by the EPTP.
    func walker() throws -> EPTWalker {
        let caps = EPTCapabilities(executeOnly: mmu.masks.present & 1 == 0, fiveLevel: true,
                                   accessedDirty: mmu.masks.accessedDirtyEnabled,
                                   maxPhysicalAddressBits: mmu.masks.hostPhysicalAddressBits)
        return try EPTWalker(pointer: EPTPointer(root: root.frame.address.rawValue, levels: root.level,
                                                 accessedDirty: mmu.masks.accessedDirtyEnabled),
                             capabilities: caps)
    }

    enum Outcome: Equatable {
        /// The access completed at this host frame.
        case memory(HostFrameNumber)
        /// KVM emulates it (MMIO, read-only slot, write-tracked gfn).
        case emulated
    }

    /// One guest access to `gfn` as the hardware makes it: walk the TDP tables; on a violation or
    /// misconfiguration exit to the MMU and retry. With PML a write that sets D logs the gfn.
    @discardableResult
    func access(_ gfn: UInt64, _ kind: AccessKind) throws -> Outcome {
        guard masks.isEPT else { return try nptAccess(gfn, kind) }
        let memoryView = PoolMemory(pool: pool)
        for _ in 0..<8 {
            try reloadRootIfInvalid()
            let before = mmu.mapping(of: gfn, in: root)
            let address = GuestFrameNumber(gfn).address
            switch try walker().translate(address, kind, in: memoryView) {
            case .success(let translation):
                if kind == .write, mmu.configuration.dirtyLogging == .pml, let before,
                   before.spte.isShadowPresent, !before.spte.isDirty(masks) {
                    memory.markDirty(GuestFrameNumber(gfn))
                }
                return .memory(HostFrameNumber(translation.outputAddress.rawValue >> 12))
            case .failure(let fault):
                let errorCode: PageFaultErrorCode
                switch fault {
                case .violation(_, let qualification, _, _): errorCode = TDPMMU.errorCode(forEPTViolation: qualification)
                case .misconfiguration: errorCode = [.reservedBit]
                default: throw TestFailure("the walk found no memory: \(fault)")
                }
                let result = try mmu.pageFault(at: address, errorCode: errorCode, root: root)
                if result == .emulate { return .emulated }
            }
        }
        throw TestFailure("no progress on gfn \(hex(gfn)) \(kind)")
    }

    /// What an NPT walk of the x86-format tables decides, done on the SPTE the MMU's own walk
    /// finds: P, W and XD of a leaf (non-leaf entries grant everything); MMIO SPTEs have a reserved
    /// bit. Nested walks are user accesses, so the error code always has U.
    private func nptAccess(_ gfn: UInt64, _ kind: AccessKind) throws -> Outcome {
        for _ in 0..<8 {
            try reloadRootIfInvalid()
            let mapping = mmu.mapping(of: gfn, in: root)
            var code: PageFaultErrorCode = [.user]
            if let spte = mapping?.spte {
                if spte.isMMIO(masks) {
                    code.formUnion([.present, .reservedBit])
                } else if spte.isShadowPresent && spte.rawValue & 1 != 0 {
                    code.insert(.present)
                    let allowed = switch kind {
                    case .read: true
                    case .write: spte.isWritable
                    case .fetch: spte.isExecutable(masks)
                    }
                    if allowed {
                        let offset = gfn & (pagesPerHugePage(mapping!.level) - 1)
                        return .memory(HostFrameNumber(spte.pfn.rawValue + offset))
                    }
                }
            }
            if kind == .write { code.insert(.write) }
            if kind == .fetch { code.insert(.fetch) }
            if try mmu.pageFault(at: GuestFrameNumber(gfn).address, errorCode: code, root: root) == .emulate { return .emulated }
        }
        throw TestFailure("no progress on gfn \(hex(gfn)) \(kind)")
    }

    /// A fault on `gfn` straight into the MMU (not through the hardware), retried while the MMU
    /// asks for it.
    @discardableResult
    func fault(_ gfn: UInt64, _ kind: AccessKind, present: Bool = false) throws -> PageFaultResult {
        var code: PageFaultErrorCode = present ? [.present] : []
        switch kind {
        case .read: code.insert(.user)
        case .write: code.insert(.write)
        case .fetch: code.insert(.fetch)
        }
        for _ in 0..<8 {
            try reloadRootIfInvalid()
            let result = try mmu.pageFault(at: GuestFrameNumber(gfn).address, errorCode: code, root: root)
            if result != .retry { return result }
        }
        throw TestFailure("fault on gfn \(hex(gfn)) kept retrying")
    }

    /// The level of the present leaf mapping `gfn`, or nil.
    func leafLevel(_ gfn: UInt64) -> Int? {
        guard let mapping = mmu.mapping(of: gfn, in: root), mapping.spte.isShadowPresent else { return nil }
        return mapping.level
    }

    func expectClean(_ step: @autoclosure () -> String, sourceLocation: SourceLocation = #_sourceLocation) {
        let problems = mmu.audit()
        #expect(problems.isEmpty, "after \(step()): \(problems.prefix(5).joined(separator: "; "))",
                sourceLocation: sourceLocation)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The huge-page rules stated plainly (mmu.c kvm_mmu_hugepage_adjust, x86.c
/// kvm_alloc_memslot_metadata), as the oracle for the level a fault maps at.
struct HugePageRules {
    var maxHugePageLevel: Int
    var nxHugePages: Bool
    var writeTracked: Set<UInt64> = []

    /// The level a fault on `gfn` must map at in a fresh state, nil for MMIO.
    func expectedLevel(_ gfn: UInt64, _ kind: AccessKind, slots: [Memslot], hostMapping: [Int: HostMappingSize]) -> Int? {
        guard let slot = slots.first(where: { $0.contains(GuestFrameNumber(gfn)) }) else { return nil }
        if slot.logsDirtyPages { return 1 }
        if nxHugePages && kind == .fetch { return 1 }
        var level = maxHugePageLevel
        while level > 1 {
            let pages = UInt64(1) << UInt64(9 * (level - 1))
            let start = gfn & ~(pages - 1)
            let insideSlot = start >= slot.baseFrame.rawValue && start + pages <= slot.endFrame.rawValue
            let alignedAlike = (slot.baseFrame.rawValue ^ slot.hostBase.rawValue) & (pages - 1) == 0
            let hostMapsIt = (hostMapping[slot.id] ?? .oneGiB).level >= level
            let untracked = !writeTracked.contains { $0 >= start && $0 < start + pages }
            if insideSlot && alignedAlike && hostMapsIt && untracked { return level }
            level -= 1
        }
        return 1
    }
}
