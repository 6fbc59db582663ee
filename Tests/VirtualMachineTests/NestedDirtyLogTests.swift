import GuestMemory
import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

// Dirty logging while L1 runs L2 over shadow EPT or NPT: KVM logs and re-protects through both
// MMUs (the TDP MMU's tables and the rmaps of `guest_mmu`'s shadow pages), so a VMM migrating the
// VM copies every page L2, L1 or KVM wrote. Every access is checked against the architecture and
// followed by both auditors, which hold "no writable SPTE for a logged gfn whose bit is clear".

/// A VMM migrating the VM with one of KVM's three dirty-log protocols: a destination copy of
/// slot 0, the gfns written since the last collection (each must be in the next one), and after
/// every collection and copy the destination must equal the guest's memory.
final class NestedMigration {
    let l1: L1Hypervisor
    let logProtocol: DirtyLogProtocol
    private(set) var destination: [[UInt64]]
    /// L1 gfns written by L1 or L2 since the last collection.
    private(set) var pending = Set<UInt64>()
    /// Every gfn a collection reported, and how many collections ran.
    private(set) var everCollected = Set<UInt64>()
    private(set) var collections = 0
    /// The gfns the last collection reported that L2 has not written since: KVM re-protected them.
    private var reprotected = Set<UInt64>()
    /// L2's first writes to a page after a collection reported it, and those that exited to KVM
    /// (the re-protected SPTE caught them; all must unless a fault mapped the page writable, and
    /// so logged it, in between).
    private(set) var rewrites = 0
    private(set) var rewriteExits = 0
    private var vm: VirtualMachine { l1.vm }
    private let pageCount: Int

    init(_ l1: L1Hypervisor, protocol logProtocol: DirtyLogProtocol) throws {
        self.l1 = l1
        self.logProtocol = logProtocol
        pageCount = Int(l1.vm.memory.slot(id: 0)!.pageCount)
        destination = []
        destination = (0..<pageCount).map { page(UInt64($0)) }
        try vm.setDirtyLogging(slot: 0, true)
        // A full ring exits to the VMM, which collects (and so resets) before the vCPU runs on.
        l1.vcpu.dirtyRingFullHandler = { [unowned self] in try? self.collect() }
    }

    func page(_ gfn: UInt64) -> [UInt64] {
        let bytes = vm.memory.hostPage(GuestFrameNumber(gfn))!.bytes
        return (0..<512).map { bytes.load(fromByteOffset: $0 * 8, as: UInt64.self) }
    }

    /// An L2 write, checked in lockstep; the L1 gfn it reached is pending.
    @discardableResult
    func l2Write(_ linear: UInt64, value: UInt64) throws -> L2AccessOutcome {
        let outcome = try l1.l2(linear, .write, .supervisor, value: value)
        if case .completed(_, let hostAddress, _) = outcome.result {
            let slot = vm.memory.slot(id: 0)!
            let gfn = (hostAddress >> 12) - slot.hostBase.rawValue
            if reprotected.remove(gfn) != nil {
                rewrites += 1
                if outcome.exits > 0 { rewriteExits += 1 }
            }
            pending.insert(gfn)
        }
        return outcome
    }

    /// An L1 store (L1 is identity-mapped), pending like L2's.
    func l1Store(_ value: UInt64, at address: UInt64) throws {
        try l1.store(value, at: address)
        pending.insert(address >> 12)
    }

    /// One collection as the protocol makes it, then the copy of what it reported.
    func collect() throws {
        var reported: [GuestFrameNumber]
        switch logProtocol {
        case .getAndReset:
            reported = try vm.getDirtyLog(slot: 0)
        case .manualProtect:
            reported = try vm.getDirtyLog(slot: 0)
            // Cleared (and re-protected) before the copy, as a VMM must.
            let cleared = try vm.clearDirtyLog(slot: 0, first: 0, count: UInt64(pageCount))
            #expect(cleared == reported)
        case .ring:
            reported = vm.harvestDirtyRings().map(\.gfn)
            vm.resetDirtyRings()
        }
        collections += 1
        let gfns = Set(reported.map(\.rawValue))
        let missed = pending.subtracting(gfns)
        #expect(missed.isEmpty, "collection \(collections) (\(logProtocol)) missed written gfns \(missed.sorted().map { hex($0) })")
        pending.removeAll()
        everCollected.formUnion(gfns)
        reprotected.formUnion(gfns)
        for gfn in gfns { destination[Int(gfn)] = page(gfn) }
        checkDestination()
    }

    /// Nothing was written between the collection and the copy: the destination is the guest.
    func checkDestination() {
        let stale = (0..<pageCount).filter { destination[$0] != page(UInt64($0)) }
        #expect(stale.isEmpty, "after collection \(collections) (\(logProtocol)) pages differ from the guest's: \(stale.prefix(8).map { hex(UInt64($0)) })")
    }
}

@Suite("Dirty logging with L2's shadow EPT/NPT pages alive: both MMUs logged and re-protected")
struct NestedDirtyLogTests {
    struct Configuration: Sendable, CustomStringConvertible {
        var npt = false
        var ad = false
        var pml = false
        var logProtocol = DirtyLogProtocol.getAndReset
        var description: String { "\(npt ? "npt" : "ept")\(ad ? " A/D" : "")\(pml ? " PML" : "") \(logProtocol)" }
    }

    static let configurations: [Configuration] = DirtyLogProtocol.allCases.flatMap { logProtocol in
        [Configuration(logProtocol: logProtocol), Configuration(ad: true, pml: true, logProtocol: logProtocol),
         Configuration(ad: true, logProtocol: logProtocol), Configuration(npt: true, logProtocol: logProtocol)]
    }

    /// L1 with L2's [0, 4 MiB) at L1 4 MiB in 4 KiB leaves, L2 in L2 with its paging off.
    func migrating(_ configuration: Configuration) throws -> NestedMigration {
        let l1 = try L1Hypervisor(npt: configuration.npt, pml: configuration.pml, dirtyLogProtocol: configuration.logProtocol)
        l1.ad = configuration.ad
        try l1.mapAllL2Memory(rights: 0x7)
        try l1.enter(registers: PagingRegisters())
        // Some shadow EPT before logging starts: enabling it must write-protect these.
        for page in stride(from: UInt64(0), to: 0x40_0000, by: 0x4_0000) { try l1.l2(page | 0x10, .write, .supervisor, value: page) }
        return try NestedMigration(l1, protocol: configuration.logProtocol)
    }

    @Test("A migration loop: random L2 writes over L1's EPT maps, L1 stores and L1 remapping L2's pages; every write in the next collection, the copy equal to the guest", arguments: configurations)
    func migrationLoop(_ configuration: Configuration) throws {
        let migration = try migrating(configuration)
        let l1 = migration.l1
        var random = SeededGenerator(seed: 0x5EED &+ UInt64(configuration.description.count))
        for pass in 0..<8 {
            for step in 0..<20 {
                if !l1.vcpu.isInL2 || random.below(16) == 0 {
                    if l1.vcpu.isInL2 { try l1.vcpu.exitToL1() }
                    // L1 at work: a store of its own, and L2's page moved to another L1 page.
                    try migration.l1Store(UInt64(step), at: 0x80_0000 + UInt64(random.below(1024)) << 12)
                    let page = UInt64(random.below(1024)) << 12
                    try l1.map(page, to: 0x40_0000 + UInt64(random.below(1024)) << 12, rights: 0x7)
                    if !configuration.npt { try l1.vcpu.invalidateEPT(.allContexts) }
                    try l1.enter(registers: PagingRegisters())
                }
                // Half the writes to a few hot pages, so that collected pages are written again.
                let page = random.below(2) == 0 ? UInt64(random.below(8)) : UInt64(random.below(1024))
                let outcome = try migration.l2Write(page << 12 | UInt64(random.below(512) * 8), value: UInt64(pass << 8 | step) | 1 << 40)
                guard case .completed = outcome.result else { Issue.record("\(configuration): \(outcome)"); return }
            }
            try migration.collect()
        }
        #expect(migration.rewrites > 0 && migration.rewriteExits == migration.rewrites,
                "\(configuration): \(migration.rewriteExits) of \(migration.rewrites) writes to collected pages exited")
        #expect(l1.vm.mmu.usedPages > 0)
    }

    @Test("guest_mmu's SPTEs step by step: write-protected when logging starts and at every collection, writable (and logged) after L2's write; L2's leaves write-protect-only under PML", arguments: configurations)
    func shadowSPTEsStepByStep(_ configuration: Configuration) throws {
        let migration = try migrating(configuration)
        let l1 = migration.l1, vm = l1.vm
        let gfn = GuestFrameNumber(0x400 + 0x40)  // L2's 0x40000, written before logging began
        func shadowLeaves() -> [SPTE] { vm.mmu.mappings(of: gfn).map { SPTE(rawValue: $0.pointee) } }
        #expect(!shadowLeaves().isEmpty && shadowLeaves().allSatisfy { !$0.isWritable && $0.isMMUWritable(vm.mmu.masks) },
                "\(configuration): logging on leaves MMU-writable, not writable: \(shadowLeaves())")
        if configuration.pml { #expect(shadowLeaves().allSatisfy { $0.adState == .wrprotOnly }, "\(configuration)") }
        for round in 0..<3 {
            let write = try migration.l2Write(0x40000 | 0x20, value: UInt64(round))
            #expect(write.exits == 1, "\(configuration) round \(round): the write-protected SPTE exits once")
            #expect(shadowLeaves().allSatisfy { $0.isWritable }, "\(configuration) round \(round)")
            try migration.collect()
            #expect(shadowLeaves().allSatisfy { !$0.isWritable }, "\(configuration) round \(round): the collection re-protects guest_mmu's SPTE")
        }
        // Logging off: the SPTEs stay as they are (made writable again by the next write, unlogged).
        try vm.setDirtyLogging(slot: 0, false)
        let unlogged = try migration.l2Write(0x40000 | 0x20, value: 9)
        #expect(unlogged.exits == 1)
        #expect(vm.audit().isEmpty)
    }

    @Test("Randomized: L2 with its own paging (the hardware's A/D updates of L2's tables are writes too), protocols, PML, A/D, L1 rewrites, zaps and collections at random", arguments: 0..<6)
    func randomized(seed: Int) throws {
        var random = SeededGenerator(seed: UInt64(seed) &* 0x9E37_79B9 &+ 17)
        var configuration = Configuration(logProtocol: DirtyLogProtocol.allCases[random.below(3)])
        configuration.npt = random.below(4) == 0
        configuration.ad = !configuration.npt && random.below(2) == 0
        configuration.pml = configuration.ad && random.below(2) == 0
        let l1 = try L1Hypervisor(npt: configuration.npt, pml: configuration.pml, dirtyLogProtocol: configuration.logProtocol)
        l1.ad = configuration.ad
        try l1.mapAllL2Memory(rights: 0x7)
        var linears: [UInt64] = []
        for _ in 0..<24 {
            let linear = UInt64(random.below(4)) << 39 | UInt64(random.below(2)) << 30 | UInt64(random.below(16)) << 12
            try l1.mapL2(linear, to: UInt64(random.below(256)) << 12, flags: 0x7)
            linears.append(linear)
        }
        try l1.enter()
        let migration = try NestedMigration(l1, protocol: configuration.logProtocol)
        for step in 0..<240 {
            switch random.below(40) {
            case 0:
                try migration.collect()
            case 1:
                l1.vm.zapAllFast()
            case 2:
                if l1.vcpu.isInL2 { try l1.vcpu.exitToL1() }
                try l1.map(UInt64(random.below(256)) << 12, to: 0x40_0000 + UInt64(random.below(256)) << 12, rights: 0x7)
                if case .ept(let pointer, _) = l1.paging {
                    try l1.vcpu.invalidateEPT(random.below(2) == 0 ? .allContexts : .singleContext(pointer))
                }
                try l1.enter()
            default:
                if !l1.vcpu.isInL2 { try l1.enter() }
                let linear = linears[random.below(linears.count)] | UInt64(random.below(512) * 8)
                if random.below(4) == 0 {
                    _ = try l1.l2(linear, .read, .supervisor)
                } else {
                    let outcome = try migration.l2Write(linear, value: UInt64(step) | 1 << 44)
                    guard case .completed = outcome.result else { Issue.record("\(configuration): \(outcome)"); return }
                }
            }
            if step % 40 == 39 { try migration.collect() }
        }
        try migration.collect()
        // Not every first write exits here: an L2 read of a page whose L1 EPT leaf is dirty (or
        // without EPT A/D) maps it writable, and KVM marks it dirty then (`make_spte`), so the
        // write needs no exit to be logged. The collections' checks hold either way.
        #expect(migration.rewrites > 0 && migration.rewriteExits > 0, "\(configuration)")
    }
}
