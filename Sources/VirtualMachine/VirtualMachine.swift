import GuestMemory
import Synchronization
import KVMMMU
import X86Paging

/// The host-physical address space as the hardware walker sees it: the host page pool.
typealias HostPhysicalView = PoolPhysicalView

extension WalkerBox {
    /// The hardware's walk of KVM's SPTEs (setting their A/D bits as the processor does), with the
    /// walker borrowed in place (see `WalkerBox`).
    @inline(never)
    func walkHardware(_ address: GuestVirtualAddress, _ access: Access, in memory: HostPhysicalView,
                      fault: inout WalkFaultSummary) -> Translation {
        walker.translate(address, access, in: memory, setAccessedDirty: true, sink: &fault)
    }
}

/// Why a VM operation could not be carried out (as opposed to a guest-visible fault).
public enum VirtualMachineError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidAccess(String)
    case impossibleRegisters(ControlStateError)
    case unsupported(String)
    case hostMemory(String)
    /// The vCPU's dirty ring is full and nobody harvested it (KVM_EXIT_DIRTY_RING_FULL, with no
    /// VMM to answer it).
    case dirtyRingFull(vcpu: Int)
    /// KVM kept refusing to make progress on one access (a model bug if it ever happens).
    case livelock(GuestVirtualAddress, exits: Int)
    /// The hardware walked into a host frame outside the pool: an SPTE points nowhere.
    case corruptShadowTables(String)
    /// A memslot change or dirty-log request KVM refuses (its ioctl's -EINVAL, -ENOENT...).
    case memslot(String)
    /// A sub-page write protection request KVM refuses (KVM_SUBPAGES_SET_ACCESS / GET_ACCESS).
    case subPageProtection(SubPageProtectionError)

    public var description: String {
        switch self {
        case .invalidAccess(let why): "invalid access: \(why)"
        case .impossibleRegisters(let error): "impossible register state: \(error)"
        case .unsupported(let why): "unsupported: \(why)"
        case .hostMemory(let why): "host memory: \(why)"
        case .livelock(let address, let exits): "no progress on \(address) after \(exits) exits"
        case .corruptShadowTables(let why): "corrupt shadow tables: \(why)"
        case .memslot(let why): "memslot: \(why)"
        case .subPageProtection(let error): "\(error)"
        case .dirtyRingFull(let vcpu): "vCPU \(vcpu) exited with its dirty ring full (KVM_EXIT_DIRTY_RING_FULL) and nothing harvested it"
        }
    }
}

/// Which MMU runs the guest's paging.
public enum VirtualMachineMMU: Sendable {
    /// KVM's shadow MMU: the guest's tables shadowed, CR3 loads, INVLPG and INVPCID intercepted.
    case shadow
    /// The TDP MMU with EPT (`TDPMMUConfiguration.ept(...)`) or NPT (`.npt(...)`): the guest's own
    /// paging runs in hardware over KVM's EPT/NPT tables; only EPT violations and
    /// misconfigurations (or #NPF) exit.
    case tdp(TDPMMUConfiguration)

    /// TDP with EPT as a VMX host of `cpu` offers it (A/D bits, 2M and 1G pages, write-protect
    /// dirty logging unless `pml`).
    public static func ept(cpu: CPUModel = CPUModel(), pml: Bool = false) -> VirtualMachineMMU {
        .tdp(.ept(capabilities: EPTCapabilities(pages1GiB: cpu.supports1GiBPages,
                                                maxPhysicalAddressBits: cpu.maxPhysicalAddressBits),
                  guestMaxPhysicalAddressBits: cpu.maxPhysicalAddressBits, pml: pml))
    }

    /// TDP with NPT as an SVM host of `cpu` offers it (4-level nCR3, 1G pages if the host has them).
    public static func npt(cpu: CPUModel = CPUModel()) -> VirtualMachineMMU {
        .tdp(.npt(hostLevels: 4, hostPhysicalAddressBits: cpu.maxPhysicalAddressBits,
                  supports1GiBPages: cpu.supports1GiBPages))
    }

    public var isTDP: Bool { if case .tdp = self { true } else { false } }
    /// The name reports give it: "shadow", "tdp" (EPT) or "npt".
    public var name: String {
        switch self {
        case .shadow: "shadow"
        case .tdp(let configuration): configuration.masks.isEPT ? "tdp" : "npt"
        }
    }
}

/// The VM, unowned, for the TDP MMU's `@Sendable` callbacks (the VM runs its vCPUs on one thread).
private final class UnownedVM: @unchecked Sendable {
    unowned let vm: VirtualMachine
    init(_ vm: VirtualMachine) { self.vm = vm }
}

/// A virtual machine under KVM's shadow MMU or its TDP MMU: guest memory in memslots, the MMU,
/// and vCPUs.
///
/// Threads: the vCPUs may run on threads of their own (`runVCPUsOnThreads`, under TDP) while one
/// VMM thread calls the VM's memslot, dirty-log and zap operations; everything else (adding vCPUs,
/// scenario-style use of `VCPU.access`) runs on one thread at a time.
public final class VirtualMachine: @unchecked Sendable {
    public let pool: HostPagePool
    public let memory: MemslotSet
    /// The shadow MMU. Under TDP it maps nothing (KVM keeps it for nested guests); the VM keeps
    /// its own counters (exits, TLB flushes, emulation) in it either way.
    public let mmu: ShadowMMU
    /// The TDP MMU, when the VM runs under TDP (`VirtualMachineMMU.tdp`).
    public let tdp: TDPMMU?
    public let cpu: CPUModel
    public private(set) var vcpus: [VCPU] = []

    /// The paging depth (4 or 5) of the host format KVM builds shadow tables in, or nil for the
    /// guest's own mode (KVM's shadow paging: the hardware runs the guest's paging mode).
    public let hostLevels: Int?
    /// The MMU design every vCPU runs (docs/VARIANTS.md).
    public var variant: MMUVariant { mmu.variant }
    /// How the dirty log is read: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 off (get-and-reset) or on
    /// (get, then clear). Fixed once a slot logs dirty pages.
    public internal(set) var dirtyLogProtocol = DirtyLogProtocol.getAndReset
    /// Each vCPU's dirty-ring size, with the `ring` protocol.
    public internal(set) var dirtyRingEntries = 0
    /// The vCPU whose access the calling thread is handling: where a dirty page is pushed with
    /// dirty rings.
    static let running = RunningVCPU()
    /// KVM's `kvm->srcu` for the memslots: a vCPU's exit handling reads them under it, and a
    /// memslot change holds it for write (`synchronize_srcu`: no exit still reads the old layout).
    let memslotsSRCU = MMULock()
    /// KVM's `kvm->slots_lock`: the VMM's memslot and dirty-log operations, one at a time.
    let slotsLock = MMULock()
    /// KVM's `mmu_lock`: the TDP MMU's own, or for the shadow MMU one held for write around every
    /// exit and every VMM operation that changes shadow pages or SPTEs.
    let mmuLock: MMULock
    /// `remote_tlb_flush_requests` and `remote_tlb_flush`, counted by whichever thread flushes.
    private let remoteFlushRequests = Atomic<UInt64>(0)
    private let remoteFlushes = Atomic<UInt64>(0)

    /// A VM with `memorySize` bytes of guest RAM in memslot 0 at GPA 0. The shadow-page cache holds
    /// `shadowPageLimit` pages (KVM_SET_NR_MMU_PAGES), by default what KVM derives from the
    /// memslots; the host pool has room for it and for `shadowPageBudget` pages in all.
    /// `hostLevels` 4 or 5 builds every shadow table in that host depth, as KVM does for a
    /// nested NPT guest (special roots for 32-bit and PAE guests, a passthrough root for a 4-level
    /// guest on a 5-level host). `variant` chooses the MMU design (upstream's by default).
    /// `hotplugPages`: room in the host pool for memslots added later (reserved address space,
    /// committed only when used).
    public init(memorySize: UInt64, cpu: CPUModel = CPUModel(), shadowPageLimit: Int? = nil,
                shadowPageBudget: Int = 1 << 16, hostLevels: Int? = nil,
                variant: MMUVariant = .upstream, hotplugPages: Int = 1 << 20,
                mmu choice: VirtualMachineMMU = .shadow) throws(VirtualMachineError) {
        if let hostLevels, hostLevels != 4 && hostLevels != 5 {
            throw .unsupported("the host pages with 4 or 5 levels, not \(hostLevels)")
        }
        self.hostLevels = hostLevels
        self.cpu = cpu
        let limit = shadowPageLimit ?? ShadowMMU.defaultMaxPages(memslotPages: memorySize >> 12)
        guard limit >= 1 else { throw .invalidAccess("the shadow-page limit must be at least 1, not \(limit)") }
        // The limit is soft (a fault may allocate a few pages past it), hence the margin.
        let budget = max(shadowPageBudget, limit + 1024)
        do {
            pool = try HostPagePool(capacityPages: Int(memorySize >> 12) + budget + max(0, hotplugPages))
        } catch {
            throw .hostMemory("\(error)")
        }
        memory = MemslotSet(pool: pool)
        do {
            _ = try memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: memorySize, flags: [])
        } catch {
            throw .hostMemory("\(error)")
        }
        // KVM sets one SPTE format for both MMUs (`kvm_mmu_set_ept_masks` under EPT): under TDP
        // the shadow MMU's pages are `guest_mmu`'s, which the hardware walks as EPT (or NPT).
        var shadowMasks = SPTEMasks.shadowPaging
        if case .tdp(let configuration) = choice { shadowMasks = configuration.masks }
        mmu = ShadowMMU(memory: memory, pool: pool, masks: shadowMasks, variant: variant)
        mmu.setMaxPages(limit)
        if case .tdp(let configuration) = choice {
            if hostLevels != nil { throw .unsupported("a host paging depth (`host`) is for shadow paging; TDP chooses its own") }
            do {
                tdp = try TDPMMU(memory: memory, configuration: configuration, events: mmu.events)
            } catch {
                throw .unsupported("\(error)")
            }
        } else {
            tdp = nil
        }
        mmuLock = tdp?.lock ?? MMULock()
        mmu.flushRemoteTLBs = { [unowned self] in
            // kvm_flush_remote_tlbs counts every call, and a flush only when the request had to
            // kick a vCPU running the guest: the vCPU whose exit KVM is handling is not, the
            // others are.
            self.remoteFlushRequests.add(1, ordering: .relaxed)
            if self.vcpus.count > 1 { self.remoteFlushes.add(1, ordering: .relaxed) }
            for vcpu in self.vcpus { vcpu.makeRequest(.flushAll, wait: true) }
        }
        mmu.freeObsoleteRoots = { [unowned self] in
            for vcpu in self.vcpus { vcpu.makeRequest(.freeObsoleteRoots, wait: false) }
        }
        mmu.dirtyRingGFNs = { [unowned self] in self.unresetDirtyRingGFNs() }
        guard let tdp = self.tdp else { return }
        mmu.tdpSharingWriteTracking = tdp
        tdp.shadowRmaps = mmu
        mmu.cpuDirtyLogging = tdp.configuration.dirtyLogging == .pml
        let unowned = UnownedVM(self)
        // The TDP MMU counts its remote flushes itself.
        tdp.flushRemoteTLBs = { for vcpu in unowned.vm.vcpus { vcpu.makeRequest(.flushAll, wait: true) } }
        tdp.pmlBufferedGFNs = {
            var gfns = Set<UInt64>()
            for vcpu in unowned.vm.vcpus {
                vcpu.tdpState?.walkFaults.pmlBuffer.withLock { for gfn in $0 { gfns.insert(gfn.rawValue) } }
            }
            return gfns
        }
        tdp.freeObsoleteRoots = { for vcpu in unowned.vm.vcpus { vcpu.makeRequest(.freeObsoleteRoots, wait: false) } }
        tdp.dirtyRingGFNs = { unowned.vm.unresetDirtyRingGFNs() }
    }

    /// Every counter: the VM's, every vCPU's and the shadow MMU's, plus the TDP MMU's under TDP.
    /// Read it when no vCPU thread runs.
    public var stats: MMUStats {
        var stats = mmu.stats
        stats.remoteTLBFlushRequests &+= remoteFlushRequests.load(ordering: .relaxed)
        stats.remoteTLBFlush &+= remoteFlushes.load(ordering: .relaxed)
        for vcpu in vcpus { stats = stats.merged(with: vcpu.stat) }
        guard let tdp else { return stats }
        return stats.merged(with: tdp.stats)
    }

    /// Every broken invariant the MMU's auditor finds (empty when all hold).
    public func audit() -> [String] {
        guard let tdp else { return withShadowMMULock { mmu.audit() } }
        // `guest_mmu`'s pages change under the lock held for write (L2's vCPU may be running).
        return withShadowMMULock { mmu.audit() } + tdp.audit()
    }

    /// `kvm_mmu_zap_all_fast`: the MMU the VM runs, and under TDP the shadow pages of L2's
    /// `guest_mmu` too (KVM zaps both MMUs).
    public func zapAllFast() {
        if let tdp {
            tdp.zapAllFast()
            // `guest_mmu`'s pages come and go under the lock (L2's vCPU may be running).
            withShadowMMULock { if mmu.usedPages > 0 { mmu.zapAllFast() } }
        } else {
            withShadowMMULock { mmu.zapAllFast() }
        }
    }

    /// One period of KVM's NX huge-page recovery worker (`kvm_nx_huge_page_recovery_worker`), which
    /// recovers each MMU's list on its own (`kvm_recover_nx_huge_pages` for `KVM_TDP_MMU`, then for
    /// `KVM_SHADOW_MMU`, where `guest_mmu`'s pages for L2 live): of each, the oldest
    /// ceil(count / `nx_huge_pages_recovery_ratio`) tables split for an executable access are
    /// zapped. Returns how many tables were taken off the lists. Nothing under shadow paging: the
    /// model maps an L1 guest's own pages 4 KiB there, so nothing is ever split for the mitigation.
    @discardableResult
    public func recoverNXHugePages() -> Int {
        guard let tdp else { return 0 }
        let recovered = tdp.recoverNXHugePages()
        return recovered + withShadowMMULock { mmu.recoverNXHugePages(ratio: tdp.configuration.nxHugePagesRecoveryRatio) }
    }

    /// The MMU notifiers' clear_young (`kvm_age_gfn`, for idle-page tracking and reclaim): every
    /// leaf mapping a gfn of `gfns` in either MMU loses its accessed state (the TDP MMU's SPTEs, and
    /// the shadow MMU's: the guest's own under shadow paging, `guest_mmu`'s for L2 under TDP).
    /// Whether any was accessed ("young"). No TLB flush, as in KVM.
    @discardableResult
    public func ageGFNRange(_ gfns: Range<UInt64>) -> Bool {
        let shadowYoung = withShadowMMULock { mmu.usedPages > 0 && mmu.ageGFNRange(gfns) }
        return (tdp?.ageGFNRange(gfns) ?? false) || shadowYoung
    }

    /// The MMU notifiers' test_young (`kvm_test_age_gfn`): whether any leaf mapping a gfn of
    /// `gfns` in either MMU is accessed; nothing changes.
    public func testAgeGFNRange(_ gfns: Range<UInt64>) -> Bool {
        if tdp?.testAgeGFNRange(gfns) == true { return true }
        return withShadowMMULock { mmu.usedPages > 0 && mmu.ageGFNRange(gfns, testOnly: true) }
    }

    /// `kvm_zap_gfn_range`, of both MMUs as for `zapAllFast`.
    public func zapGFNRange(_ gfns: Range<UInt64>) {
        if let tdp {
            tdp.zapGFNRange(gfns)
            withShadowMMULock { if mmu.usedPages > 0 { _ = mmu.zapGFNRange(gfns) } }
        } else {
            _ = withShadowMMULock { mmu.zapGFNRange(gfns) }
        }
    }

    /// Under TDP, whether L2's `guest_mmu` has shadow pages (the only ones the shadow MMU then has).
    /// Read under `mmu_lock`, or with the memslots' srcu held for write (no L2 access runs then).
    var hasNestedShadowPages: Bool { tdp != nil && mmu.usedPages > 0 }

    /// A VMM operation on the shadow MMU: `mmu_lock` held for write (vCPUs may be running).
    func withShadowMMULock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        mmuLock.lockExclusive()
        defer { mmuLock.unlockExclusive() }
        return try body()
    }

    /// A vCPU's exit under shadow paging: the memslots' srcu, then `mmu_lock` held for write.
    func lockForShadowExit() {
        memslotsSRCU.lockShared()
        mmuLock.lockExclusive()
    }

    func unlockAfterShadowExit() {
        mmuLock.unlockExclusive()
        memslotsSRCU.unlockShared()
    }

    /// Adds a vCPU with the given registers.
    @discardableResult
    public func addVCPU(registers: PagingRegisters) throws(VirtualMachineError) -> VCPU {
        let vcpu = try VCPU(vm: self, id: vcpus.count, registers: registers)
        vcpus.append(vcpu)
        return vcpu
    }
}

/// What one guest access came to, as the guest sees it.
public enum AccessResult: Equatable, Sendable {
    /// The access went through: the guest-physical address and, for reads, the value read.
    case completed(gpa: GuestPhysicalAddress, value: UInt64)
    /// A #PF delivered to the guest (CR2 is the address).
    case pageFault(errorCode: PageFaultErrorCode, cr2: GuestVirtualAddress)
    /// A #GP (a non-canonical address).
    case generalProtection
    /// The address is emulated MMIO (no memslot): reads give all ones, writes go nowhere.
    case mmio(gpa: GuestPhysicalAddress, value: UInt64)
    /// A write sub-page write protection refused (an SPP-induced EPT violation, or the emulator's
    /// check): KVM_EXIT_SPP to the VMM with the refused write's guest-physical address (for a write
    /// cut at a page boundary, the start of the refused page's part). Memory is unchanged.
    case subPageWriteExit(gpa: GuestPhysicalAddress)
}

/// One access with how the VM handled it.
public struct AccessOutcome: Equatable, Sendable {
    public var result: AccessResult
    /// #PF exits to KVM taken on the way.
    public var exits: Int
    /// The access was completed by KVM's emulator rather than by the hardware.
    public var emulated: Bool
    /// The access hit the TLB without a hardware walk.
    public var tlbHit: Bool
    public init(result: AccessResult, exits: Int = 0, emulated: Bool = false, tlbHit: Bool = false) {
        self.result = result
        self.exits = exits
        self.emulated = emulated
        self.tlbHit = tlbHit
    }
}

/// A vCPU: the guest's registers, KVM's MMU context for it, and the host hardware (TLB and the
/// page walker over KVM's SPTEs) that runs its accesses. One thread at a time runs it; other
/// threads reach it only through its requests (`makeRequest`).
public final class VCPU: @unchecked Sendable {
    public unowned let vm: VirtualMachine
    public let id: Int
    public let context: MMUContext
    public let tlb = TLB()
    public var registers: PagingRegisters { tdpState?.registers ?? context.registers }
    /// Under TDP: the guest's registers, KVM's root and the hardware's EPT walker (VCPU+TDP.swift).
    let tdpState: TDPVCPUState?
    @exclusivity(unchecked) private var hardware: WalkerBox?
    /// The hardware walkers of the roots CR3 loads left (see `retargetHardwareWalker`), as many as
    /// the context caches roots.
    @exclusivity(unchecked) private var recentHardwareWalkers = RecentWalkers(count: MMUContext.previousRootCount)
    let host: HostPhysicalView
    let pool: HostPagePool
    /// The VM's MMU, held directly: reaching it through `unowned vm` costs an unowned retain.
    let mmu: ShadowMMU
    private let hostLevels: Int?
    /// With dirty rings, this vCPU's (`kvm_dirty_ring`).
    public private(set) var dirtyRing: DirtyRing?
    /// The VMM's answer to KVM_EXIT_DIRTY_RING_FULL: harvest the rings and reset them, so that
    /// the vCPU can enter again. Without one, a full ring stops the vCPU with an error.
    public var dirtyRingFullHandler: (() -> Void)?
    /// KVM_EXIT_DIRTY_RING_FULL exits taken.
    public private(set) var dirtyRingFullExits = 0
    /// This vCPU's counters (KVM's `vcpu->stat`: `exits`, `tlb_flush`, `insn_emulation`,
    /// `pf_guest`, `mmio_exits`), written only by the thread running it.
    @exclusivity(unchecked) public internal(set) var stat = MMUStats()
    /// Other threads' requests and this vCPU's mode (VCPU+GuestMode.swift).
    let signals = VCPUSignals()
    /// L1's nested state once it has entered L2 (VCPU+Nested.swift): `guest_mmu`, L2's registers,
    /// and whether the vCPU runs L2 now.
    var nested: NestedVCPUState?

    /// What every access reads, behind a pointer: a class's `var`s would cost an exclusivity
    /// check each, and a TLB hit must cost a few loads.
    struct HotState {
        /// TLB flushes this vCPU's own exits requested, serviced at the next entry (other threads'
        /// requests are in `signals`).
        var requests: TLBFlushRequests = []
        /// The vCPU runs on a thread of its own (`VirtualMachine.runVCPUsOnThreads`).
        var runsOnOwnThread = false
        /// In guest mode (only with a thread of its own), and the entries made.
        var inGuestMode = false
        var guestEntries: UInt64 = 0
        /// The VM has dirty rings (`dirtyRing` is set): reading the ring costs a copy.
        var usesDirtyRing = false
        /// The guest's linear addresses are 32 bits wide (not IA-32e).
        var narrowLinearAddresses: Bool
        /// The width an IA-32e guest's addresses must be canonical in (48 or 57): the hardware may
        /// walk KVM's tables in a deeper mode than the guest's.
        var canonicalWidth = 64
        /// The root frame TLB entries are tagged with.
        var rootFrame: UInt64 = 0
        /// Byte `3 * kind + privilege`: the combined ACC values the hardware refuses that access
        /// (its rules with the guest's SMEP, SMAP and RFLAGS.AC). All ones until the hardware
        /// walker is set up, so no TLB entry is used before.
        var refusals: UInt128 = ~0
    }
    let hot: UnsafeMutablePointer<HotState>
    /// Counts one of this vCPU's events. Out of line: see `ShadowMMU.count`.
    @inline(never)
    func count(_ counter: MMUStats.VCPUCounter) { stat.count(counter) }

    /// A bound on exits for one access: each exit must make progress.
    public static let maxExitsPerAccess = 64

    init(vm: VirtualMachine, id: Int, registers: PagingRegisters) throws(VirtualMachineError) {
        self.vm = vm
        self.id = id
        host = HostPhysicalView(pool: vm.pool)
        pool = vm.pool
        mmu = vm.mmu
        hot = .allocate(capacity: 1)
        hot.initialize(to: HotState(narrowLinearAddresses: !registers.mode.isLongMode,
                                    canonicalWidth: registers.mode.isLongMode ? registers.mode.linearAddressWidth : 64))
        hostLevels = vm.hostLevels
        if vm.dirtyLogProtocol == .ring {
            dirtyRing = DirtyRing(size: vm.dirtyRingEntries)
            hot.pointee.usesDirtyRing = true
        }
        if let tdp = vm.tdp {
            tdpState = try TDPVCPUState(tdp: tdp, registers: registers, cpu: vm.cpu, memory: vm.memory)
        } else {
            tdpState = nil
            try Self.checkSupported(registers, hostLevels: vm.hostLevels)
        }
        do {
            context = try MMUContext(mmu: vm.mmu, registers: registers, cpu: vm.cpu, hostLevels: vm.hostLevels,
                                     variant: vm.variant)
        } catch {
            throw .impossibleRegisters(error)
        }
        context.vcpuID = id
    }

    deinit { hot.deallocate() }

    /// Register states the shadow MMU cannot run (as KVM refuses them).
    public static func checkSupported(_ registers: PagingRegisters, hostLevels: Int? = nil) throws(VirtualMachineError) {
        if registers.cr4.contains(.protectionKeys) || registers.cr4.contains(.supervisorProtectionKeys) {
            throw .unsupported("protection keys need TDP: KVM does not expose PKU or PKS with shadow paging")
        }
        if hostLevels == 4 && registers.mode == .fiveLevel {
            throw .unsupported("a 5-level guest cannot be shadowed in 4-level host tables")
        }
    }

    // MARK: Register writes

    /// A write to the control registers (MOV to CR0/CR3/CR4, WRMSR EFER, WRPKRU, STAC/CLAC),
    /// through KVM's context rules; the TLB flushes it requests happen at the next entry.
    public func setRegisters(_ new: PagingRegisters) throws(VirtualMachineError) {
        if let tdpState { return try tdpSetRegisters(new, tdpState) }
        try Self.checkSupported(new, hostLevels: hostLevels)
        leaveGuestMode()
        vm.lockForShadowExit()
        defer { vm.unlockAfterShadowExit() }
        countRegisterWriteExits(from: registers, to: new)
        do {
            hot.pointee.requests.formUnion(try context.setRegisters(new))
        } catch {
            throw .impossibleRegisters(error)
        }
        dropHardwareWalker()  // the hardware runs with the guest's SMEP, SMAP and RFLAGS.AC
        hot.pointee.narrowLinearAddresses = !new.mode.isLongMode
        hot.pointee.canonicalWidth = new.mode.isLongMode ? new.mode.linearAddressWidth : 64
        serviceRequests()
    }

    /// The exits a register write takes under shadow paging: a MOV to CR0 or CR4 exits when it
    /// changes a bit the guest does not own (KVM leaves the guest only CR0.TS; the model's
    /// registers hold no TS), a MOV to CR3 always, and WRMSR to EFER always (intercepted). One
    /// exit for each register the write changes; RFLAGS.AC and PKRU are the guest's own.
    private func countRegisterWriteExits(from old: PagingRegisters, to new: PagingRegisters) {
        if new.cr0 != old.cr0 { count(.exit) }
        if new.cr3 != old.cr3 { count(.exit) }
        if new.cr4 != old.cr4 { count(.exit) }
        if new.efer != old.efer { count(.exit) }
    }

    /// Until the next entry loads a root, no TLB entry matches: entries stay tagged with the
    /// root they were walked from, which a later switch back to it (a cached root) may use.
    private func dropHardwareWalker() {
        hardware = nil
        recentHardwareWalkers.removeAll()
        hot.pointee.refusals = ~0
        hot.pointee.rootFrame = Self.noRoot
    }

    /// After a MOV to CR3 the next entry loads another root, but the guest's SMEP, SMAP and
    /// RFLAGS.AC (all the hardware walker's rules depend on) are unchanged: the walker is kept, to
    /// be pointed at that root or used again on a switch back. No TLB entry matches until then.
    private func retargetHardwareWalker() {
        if let hardware = hardware.take() { recentHardwareWalkers.keep(hardware) }
        hot.pointee.rootFrame = Self.noRoot
    }

    /// A root tag no host frame has.
    static let noRoot = UInt64.max

    /// MOV to CR3, also of the value it already holds. `value` carries the PCID in bits 11:0 with
    /// CR4.PCIDE; `noFlush` is the source's bit 63 (keep the PCID's translations), which needs
    /// CR4.PCIDE.
    public func loadCR3(_ value: UInt64, noFlush: Bool = false) throws(VirtualMachineError) {
        if noFlush && !registers.cr4.contains(.pcidEnable) {
            throw .invalidAccess("MOV to CR3 with bit 63 (no flush) needs CR4.PCIDE")
        }
        if let tdpState { return try tdpLoadCR3(value, noFlush: noFlush, tdpState) }
        leaveGuestMode()
        vm.lockForShadowExit()
        defer { vm.unlockAfterShadowExit() }
        count(.exit)  // CR3-load exiting: shadow paging intercepts every MOV to CR3
        do {
            hot.pointee.requests.formUnion(try context.loadCR3(value, noFlush: noFlush))
        } catch {
            throw .impossibleRegisters(error)
        }
        retargetHardwareWalker()  // the next entry loads the (new or cached) root
        serviceRequests()
    }

    /// INVPCID of `type` for `pcid` (and `address` for an individual address), as KVM emulates it
    /// (`kvm_handle_invpcid`). False when the instruction raises #GP instead: a PCID above 4095, a
    /// non-zero PCID for the types that name one while CR4.PCIDE is clear, or a non-canonical
    /// address for an individual-address invalidation.
    public func invalidatePCID(_ type: INVPCIDType, pcid: UInt64, address: GuestVirtualAddress) -> Bool {
        if let tdpState { return tdpInvalidatePCID(type, pcid: pcid, address: address, tdpState) }
        leaveGuestMode()
        vm.lockForShadowExit()
        defer { vm.unlockAfterShadowExit() }
        // With INVLPG exiting (shadow paging) INVPCID exits too, before its operand checks.
        count(.exit)
        guard !registers.invpcidFaults(type, pcid: pcid, address: address) else { return false }
        let outcome = context.invalidatePCID(type, pcid: UInt16(pcid), address: address)
        if outcome.flushesAddressInCurrent { tlb.invalidate(address) }
        hot.pointee.requests.formUnion(outcome.requests)
        if !context.rootsLoaded { dropHardwareWalker() }
        serviceRequests()
        return true
    }

    /// KVM_REQ_TLB_FLUSH, raised on every vCPU by `kvm_flush_remote_tlbs`.
    /// The TLB-flush requests a VM entry services (`kvm_vcpu_flush_tlb_all`, then
    /// `kvm_service_local_tlb_flush_requests`), each counted in `tlb_flush`.
    @inline(__always)
    func serviceRequests() {
        guard hasRemoteRequests || !hot.pointee.requests.isEmpty else { return }
        servicePendingRequests()
    }

    /// Out of line, so that the check above is all an access pays (and no read of the context's
    /// state, with its cross-module exclusivity check, is hoisted into every access).
    @inline(never)
    private func servicePendingRequests() {
        if let tdpState { return tdpServiceRequests(tdpState) }
        if checkRequest(.freeObsoleteRoots) {
            context.freeObsoleteRoots()
            if !context.rootsLoaded { dropHardwareWalker() }
        }
        serviceFlushRequests()
    }

    private func serviceFlushRequests() {
        var requests = hot.pointee.requests
        if requests.contains(.syncRoots) { context.syncRoots() }  // KVM_REQ_MMU_SYNC
        if checkRequest(.flushAll) {
            count(.tlbFlush)
            tlb.flush()
            requests.remove(.flushCurrent)  // flushing everything flushed the current root too
        }
        if requests.contains(.flushCurrent) {
            count(.tlbFlush)
            tlb.flush()
        }
        if requests.contains(.flushGuest) {
            // `kvm_vcpu_flush_tlb_guest`: without TDP the guest's flush syncs the current roots and
            // frees the cached ones that are unsync.
            count(.tlbFlush)
            context.syncRoots()
            context.syncPreviousRoots()
            tlb.flush()
        }
        hot.pointee.requests = []
    }

    /// INVLPG.
    public func invalidatePage(_ address: GuestVirtualAddress) {
        if tdpState != nil {
            tlb.invalidate(address)  // no exit: the hardware invalidates (INVLPG is not intercepted)
            return
        }
        leaveGuestMode()
        vm.lockForShadowExit()
        defer { vm.unlockAfterShadowExit() }
        count(.exit)  // INVLPG exiting
        context.invalidatePage(address)
        tlb.invalidate(address)
        serviceRequests()
    }

    // MARK: Accesses

    private func hardwareWalker() throws(VirtualMachineError) -> WalkerBox {
        // The walker is dropped whenever the context unloads its roots (register writes, CR3
        // loads, obsolete roots), so one that exists walks loaded roots. (Reading the context's
        // state here would cost a cross-module exclusivity check on every access.)
        if let hardware { return hardware }
        let root: HardwareRoot
        let allocated: Bool
        do {
            (root, allocated) = try context.load()
        } catch {
            throw .hostMemory("\(error)")
        }
        // kvm_mmu_load flushes the current root's translations when it built roots: a root's
        // frame may have been another root's before (uncounted: KVM calls the flush directly, not
        // as a request). A cached root (`fast_pgd_switch`) keeps the translations tagged with it.
        if allocated { tlb.flush() }
        // After CR3 loads only the root changed: the walker kept for the new root, or the last
        // one pointed at it, keeps the permission rules and the refusals derived from them.
        if let latest = recentHardwareWalkers.mostRecent, latest.walker.mode == root.mode, root.mode != .pae {
            let cr3 = root.rootFrame.rawValue << 12
            let box: WalkerBox
            if let kept = recentHardwareWalkers.take(cr3: cr3) {
                box = kept
            } else {
                do {
                    box = WalkerBox(try latest.walker.loadingCR3(cr3, memory: host))
                } catch {
                    throw .corruptShadowTables("the hardware refuses KVM's root: \(error)")
                }
            }
            hardware = box
            hot.pointee.rootFrame = root.rootFrame.rawValue
            return box
        }
        recentHardwareWalkers.removeAll()
        let guest = context.registers
        // KVM runs shadow-paging guests with CR0.WP=1 and EFER.NX=1 in hardware, in PAE or
        // long mode; SMEP and SMAP stay the guest's.
        var cr4: CR4 = [.physicalAddressExtension]
        if guest.cr4.contains(.smep) { cr4.insert(.smep) }
        if guest.cr4.contains(.smap) { cr4.insert(.smap) }
        var efer: EFER = [.noExecuteEnable]
        if root.mode != .pae {
            efer.formUnion([.longModeEnable, .longModeActive])
            if root.mode == .fiveLevel { cr4.insert(.la57) }
        }
        let registers = PagingRegisters(cr0: [.protectionEnable, .writeProtect, .paging], cr3: root.rootFrame.rawValue << 12,
                                        cr4: cr4, efer: efer, rflags: guest.rflags)
        let walker: PageWalker
        do {
            walker = try PageWalker(registers: registers, cpu: CPUModel(), memory: host,
                                    pdpteValues: root.mode == .pae ? root.pdptes : nil)
        } catch {
            throw .corruptShadowTables("the hardware refuses KVM's root: \(error)")
        }
        let box = WalkerBox(walker)
        hardware = box
        var refusals: UInt128 = 0
        for kind in AccessKind.allCases {
            for privilege in Privilege.allCases {
                let refused = walker.rules.refusedPermissions(Access(kind, privilege),
                                                              alignmentCheck: guest.rflags.contains(.alignmentCheck))
                refusals |= UInt128(refused) << UInt128(8 * (3 * Int(kind.rawValue) + Int(privilege.rawValue)))
            }
        }
        hot.pointee.refusals = refusals
        hot.pointee.rootFrame = root.rootFrame.rawValue
        return box
    }

    /// One guest access of `size` bytes (1, 2, 4 or 8, within one page) at `address`.
    public func access(_ address: GuestVirtualAddress, _ access: Access, size: Int = 8,
                       value: UInt64 = 0) throws(VirtualMachineError) -> AccessOutcome {
        if let outcome = tlbHit(address, access, size: size, value: value) { return outcome }
        return try slowAccess(address, access, size: size, value: value)
    }

    /// The access as the hardware completes it from the TLB with nothing pending, or nil for
    /// everything else (a miss, a refusal, an odd size, a request to service).
    @inline(__always)
    private func tlbHit(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64) -> AccessOutcome? {
        guard size & (size - 1) == 0, size <= 8, address.rawValue & pageOffsetMask <= pageSize - UInt64(size),
              !(hot.pointee.narrowLinearAddresses && address.rawValue >> 32 != 0),
              !hasRemoteRequests, hot.pointee.requests.isEmpty, mayRunGuest,
              let entry = tlb.lookup(address, root: hot.pointee.rootFrame), allows(entry, access, at: address, size: size)
        else { return nil }
        let offset = address.rawValue & pageOffsetMask
        let result = perform(hostAddress: entry.hostFrame << 12 | offset, access.kind, size: size, value: value)
        return AccessOutcome(result: .completed(gpa: GuestPhysicalAddress(entry.guestFrame << 12 | offset), value: result),
                             exits: 0, emulated: false, tlbHit: true)
    }

    @inline(never)
    private func slowAccess(_ address: GuestVirtualAddress, _ access: Access, size: Int,
                            value: UInt64) throws(VirtualMachineError) -> AccessOutcome {
        // A vCPU on its own thread is that thread's running vCPU already: two thread-specific
        // stores an access saved.
        let wasRunning = VirtualMachine.running.vcpu
        let switchesRunning = wasRunning !== self
        if switchesRunning { VirtualMachine.running.set(self) }
        defer { if switchesRunning { VirtualMachine.running.set(wasRunning) } }
        if tdpState == nil {
            // Under shadow paging the access's exits, and the hardware's walks of shadow tables
            // between them, run with mmu_lock held for write; the guest mode the access ends in
            // only uses the TLB.
            leaveGuestMode()
            vm.lockForShadowExit()
            defer { vm.unlockAfterShadowExit() }
            let outcome = try run(address, access, size: size, value: value)
            serviceRequests()
            if runsOnOwnThread { _ = tryEnterGuestMode() }
            return outcome
        }
        let outcome = try run(address, access, size: size, value: value)
        // The entry that resumes the guest after any exit the access took (a vCPU on its own
        // thread makes it before its next access). Without a thread of its own the vCPU exits to
        // the VMM after each access, which drains the PML buffer.
        if !runsOnOwnThread {
            if let tdpState { tdpDrainPML(tdpState) }
            serviceRequests()
        }
        return outcome
    }

    private func run(_ address: GuestVirtualAddress, _ access: Access, size: Int,
                     value: UInt64) throws(VirtualMachineError) -> AccessOutcome {
        switch size {
        case 1, 2, 4, 8: break
        default: throw .invalidAccess("size must be 1, 2, 4 or 8, not \(size)")
        }
        guard address.rawValue & pageOffsetMask <= pageSize - UInt64(size) else {
            throw .invalidAccess("\(size) bytes at \(address) cross a page boundary")
        }
        if hot.pointee.narrowLinearAddresses && address.rawValue >> 32 != 0 {
            throw tooWide(address)
        }
        if !address.isCanonical(width: hot.pointee.canonicalWidth) {
            return AccessOutcome(result: .generalProtection, exits: 0, emulated: false, tlbHit: false)
        }
        if let tdpState { return try tdpRun(address, access, size: size, value: value, tdpState) }
        var exits = 0
        var firstTry = true
        while exits <= Self.maxExitsPerAccess {
            serviceRequests()  // VM entry, which loads the roots (kvm_mmu_reload) before the guest runs
            if hot.pointee.usesDirtyRing, dirtyRing?.isSoftFull == true { try exitForFullDirtyRing() }
            reloadPDPTEsIfChanged()
            if hardware == nil { _ = try hardwareWalker() }
            if let entry = tlb.lookup(address, root: hot.pointee.rootFrame), allows(entry, access, at: address, size: size) {
                let hostAddress = entry.hostFrame << 12 | (address.rawValue & pageOffsetMask)
                let value = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
                return AccessOutcome(result: .completed(gpa: GuestPhysicalAddress(entry.guestFrame << 12 | (address.rawValue & pageOffsetMask)),
                                                        value: value),
                                     exits: exits, emulated: false, tlbHit: firstTry)
            }
            firstTry = false
            let walker = try hardwareWalker()
            tlb.invalidate(address, root: hot.pointee.rootFrame)
            var fault = WalkFaultSummary()
            let translation = walker.walkHardware(address, access, in: host, fault: &fault)
            guard fault.kind != .none else {
                let leafAddress = translation.path.entryAddress(level: translation.level)
                let guestFrame = guestFrame(ofLeafAt: leafAddress.rawValue)
                let leaf = translation.path.entryValue(level: translation.level)
                tlb.insert(address, root: hot.pointee.rootFrame, hostFrame: translation.physicalAddress.rawValue >> 12, permissions: translation.permissions,
                           dirty: leaf & (1 << 6) != 0, guestFrame: guestFrame)
                continue  // the access completes through the TLB entry just filled
            }
            switch fault.kind {
            case .none:
                continue
            case .pageFault:
                exits += 1
                count(.exit)
                let decision: PageFaultResult
                do {
                    decision = try context.pageFault(at: address, access: access, errorCode: fault.errorCode)
                } catch {
                    throw .hostMemory("\(error)")
                }
                if let outcome = try ending(after: decision, address, access, size: size, value: value, exits: exits,
                                            guestWalker: context.guestWalkerBox, subPageWriteExit: nil) {
                    return outcome
                }
            case .generalProtection:
                return AccessOutcome(result: .generalProtection, exits: exits, emulated: false, tlbHit: false)
            case .noMemory:
                throw .corruptShadowTables("a level-\(fault.level) SPTE points at host frame \(fault.unbackedEntry.frame.rawValue), outside the pool")
            case .addressTooWide:
                throw .invalidAccess("\(address) is wider than \(fault.level) bits")
            }
        }
        throw .livelock(address, exits: exits)
    }

    /// How an access ends after KVM's fault handler decided `decision`, or nil when the access
    /// retries (the fault was fixed, was spurious, or lost a race). `subPageWriteExit` gives the
    /// address an SPP exit reports; an MMU without SPP passes nil and never decides one. The
    /// guest's walker is read only for an emulation: reading the shadow context's costs an
    /// exclusivity check and a retain, which no other fault should pay.
    @inline(__always)
    func ending(after decision: PageFaultResult, _ address: GuestVirtualAddress, _ access: Access, size: Int,
                value: UInt64, exits: Int, guestWalker: @autoclosure () -> WalkerBox,
                subPageWriteExit: (() -> GuestPhysicalAddress)?) throws(VirtualMachineError) -> AccessOutcome? {
        switch decision {
        case .fixed, .spurious, .retry:
            return nil
        case .emulate:
            return try emulate(address, access, size: size, value: value, exits: exits, guestWalker: guestWalker())
        case .injectGuestFault(let cr2, let errorCode):
            return AccessOutcome(result: .pageFault(errorCode: errorCode, cr2: cr2), exits: exits, emulated: false, tlbHit: false)
        case .injectGeneralProtection:
            return AccessOutcome(result: .generalProtection, exits: exits, emulated: false, tlbHit: false)
        case .subPageWriteExit:
            guard let subPageWriteExit else {
                throw .corruptShadowTables("the shadow MMU answered a fault with an SPP exit; SPP needs TDP with EPT")
            }
            return AccessOutcome(result: .subPageWriteExit(gpa: subPageWriteExit()), exits: exits, emulated: false,
                                 tlbHit: false)
        }
    }

    /// Out of line: reading the context's registers on the hot path would cost a cross-module
    /// exclusivity check on every access, hoisted there by the optimiser.
    @inline(never)
    func tooWide(_ address: GuestVirtualAddress) -> VirtualMachineError {
        .invalidAccess("\(address) is wider than the 32-bit linear addresses of \(registers.mode.displayName)")
    }

    /// The dirty ring is soft-full. Out of line: the optimiser hoisted the ring's exclusivity check
    /// out of the entry loop, into every access that exits.
    var dirtyRingIsSoftFull: Bool {
        @inline(never) get { dirtyRing?.isSoftFull == true }
    }

    /// KVM_REQ_DIRTY_RING_SOFT_FULL: instead of entering, the vCPU exits to the VMM, which must
    /// harvest and reset the rings before it can run again.
    func exitForFullDirtyRing() throws(VirtualMachineError) {
        leaveGuestMode()
        dirtyRingFullExits += 1
        guard let dirtyRingFullHandler else { throw .dirtyRingFull(vcpu: id) }
        // The exit to the VMM leaves KVM: a shadow-paging exit lets go of its locks meanwhile.
        if tdpState == nil { vm.unlockAfterShadowExit() }
        dirtyRingFullHandler()
        if tdpState == nil { vm.lockForShadowExit() }
        if dirtyRing?.isSoftFull == true { throw .dirtyRingFull(vcpu: id) }
    }

    func pushDirty(_ entry: DirtyRing.Entry) -> Bool { dirtyRing?.push(entry) ?? false }
    func harvestDirtyRing() -> [DirtyRing.Entry] { dirtyRing?.harvest() ?? [] }
    func takeHarvestedDirtyEntries() -> [DirtyRing.Entry] { dirtyRing?.takeHarvested() ?? [] }

    /// A VM entry in PAE paging loads the four PDPTEs from the root anew. Upstream KVM changes its
    /// PAE root's entries only when it loads or frees roots, which drops the walker anyway; the
    /// `local-roots` variant links and unlinks page directories under a loaded per-vCPU PAE root.
    private func reloadPDPTEsIfChanged() {
        guard let hardware, hardware.walker.mode == .pae else { return }
        if (0..<4).contains(where: { index in
            context.changeablePDPTE(index).map { $0 != hardware.walker.pdpte(index).rawValue } ?? false
        }) { dropHardwareWalker() }
    }

    /// Whether a TLB entry's permissions let the access of `size` bytes at `address` through under
    /// the hardware's rules: a write needs the entry dirty too (else the hardware walks to set D),
    /// and every sub-page it touches writable when the entry carries SPP's bitmap (else it walks,
    /// and the walk gives the SPP exit).
    @inline(__always)
    func allows(_ entry: TLB.Entry, _ access: Access, at address: GuestVirtualAddress, size: Int) -> Bool {
        if access.kind == .write {
            guard entry.dirty else { return false }
            if entry.subPageWriteMask != UInt32.max
                && !entry.permitsSubPageWrite(atPageOffset: address.rawValue & pageOffsetMask, size: size) { return false }
        }
        let refused = hot.pointee.refusals >> UInt128(8 * (3 * Int(access.kind.rawValue) + Int(access.privilege.rawValue)))
        return (UInt8(truncatingIfNeeded: refused) >> entry.permissions) & 1 == 0
    }

    /// The guest frame a leaf SPTE maps, from its shadow page's record of it.
    private func guestFrame(ofLeafAt hostAddress: UInt64) -> UInt64 {
        guard let page = mmu.shadowPage(containingHostAddress: hostAddress) else { return 0 }
        return page.mappedGFN(at: Int((hostAddress & pageOffsetMask) >> 3)).rawValue
    }

    @inline(__always)
    func perform(hostAddress: UInt64, _ kind: AccessKind, size: Int, value: UInt64) -> UInt64 {
        let pointer = pool.pointer(HostFrameNumber(hostAddress >> 12)) + Int(hostAddress & pageOffsetMask)
        // An aligned access is single-copy atomic on x86: other vCPUs' threads and the VMM (a
        // dirty-log copy) may touch the same word at once. Unaligned ones are not atomic on x86
        // either. (x86 is little-endian, as is every host we build for.)
        if hostAddress & UInt64(size - 1) == 0 {
            if kind == .write {
                AtomicAccess.store(value, to: pointer, size: size)
                return value
            }
            return AtomicAccess.load(pointer, size: size)
        }
        if kind == .write {
            switch size {
            case 8: pointer.storeBytes(of: value.littleEndian, as: UInt64.self)
            case 4: pointer.storeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, as: UInt32.self)
            default: pointer.storeBytes(of: UInt16(truncatingIfNeeded: value).littleEndian, as: UInt16.self)
            }
            return value
        }
        switch size {
        case 8: return UInt64(littleEndian: pointer.loadUnaligned(as: UInt64.self))
        case 4: return UInt64(UInt32(littleEndian: pointer.loadUnaligned(as: UInt32.self)))
        default: return UInt64(UInt16(littleEndian: pointer.loadUnaligned(as: UInt16.self)))
        }
    }

    /// The #PF KVM's emulator injects when a guest table lies where no memory is (see
    /// `MMUContext.unreadableTableErrorCode`).
    private func unreadableTableErrorCode(_ access: Access) -> PageFaultErrorCode {
        MMUContext.unreadableTableErrorCode(access, registers: registers)
    }

    /// KVM's emulator: the guest walk (with A/D updates and fault injection), then the access on
    /// guest memory; a write to a shadowed table goes through `kvm_mmu_track_write`.
    @inline(never)  // the slow path; see `tooWide`
    func emulate(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                 exits: Int, guestWalker: WalkerBox) throws(VirtualMachineError) -> AccessOutcome {
        // KVM emulates with the guest's own walk; no TLB entry is used or filled.
        count(.instructionEmulation)
        let translation: Translation
        switch guestWalker.walker.translate(address, access, in: vm.memory, setAccessedDirty: true) {
        case .success(let result):
            translation = result
        case .failure(.pageFault(let fault)):
            count(.guestFault)
            return AccessOutcome(result: .pageFault(errorCode: PageFaultErrorCode(rawValue: UInt64(fault.errorCode.architectural)),
                                                    cr2: address),
                                 exits: exits, emulated: true, tlbHit: false)
        case .failure(.generalProtection), .failure(.addressTooWide):
            return AccessOutcome(result: .generalProtection, exits: exits, emulated: true, tlbHit: false)
        case .failure(.noMemory):
            count(.guestFault)
            return AccessOutcome(result: .pageFault(errorCode: unreadableTableErrorCode(access), cr2: address),
                                 exits: exits, emulated: true, tlbHit: false)
        }
        let gpa = translation.physicalAddress
        guard let slot = vm.memory.slot(containing: gpa.frame), !(access.kind == .write && slot.flags.contains(.readOnly)) else {
            count(.mmioExit)  // the access goes to the VMM's device model
            let allOnes: UInt64 = size == 8 ? ~0 : (1 << UInt64(8 * size)) - 1
            return AccessOutcome(result: .mmio(gpa: gpa, value: access.kind == .write ? value : allOnes), exits: exits,
                                 emulated: true, tlbHit: false)
        }
        if access.kind == .write, let refused = emulatedWriteRefusal(at: gpa, size: size) {
            return AccessOutcome(result: .subPageWriteExit(gpa: refused), exits: exits, emulated: true, tlbHit: false)
        }
        let hostAddress = vm.memory.hostFrame(of: gpa.frame)!.rawValue << 12 | gpa.pageOffset
        let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
        if access.kind == .write {
            _ = vm.memory.markDirty(gpa.frame)
            if tdpState == nil {
                mmu.trackWrite(gpa, bytes: size, fourByteGuestEntries: registers.mode == .legacy32)
            } else if mmu.indirectShadowPages > 0 {
                // Under TDP only `guest_mmu` shadows tables (L1's EPT or NPT, in EPT's or x86's
                // format, never 32-bit).
                vm.withShadowMMULock { mmu.trackWrite(gpa, bytes: size, fourByteGuestEntries: false) }
            }
        }
        return AccessOutcome(result: .completed(gpa: gpa, value: result), exits: exits, emulated: true, tlbHit: false)
    }
}
