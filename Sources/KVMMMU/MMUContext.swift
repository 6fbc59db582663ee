import GuestMemory
import X86Paging

/// What KVM's page-fault handler decided (KVM's `RET_PF_*`, with the injected fault spelled out).
public enum PageFaultResult: Equatable, Sendable {
    /// The SPTE was installed or changed (`RET_PF_FIXED`): retry the access.
    case fixed
    /// Nothing needed changing (`RET_PF_SPURIOUS`): a stale TLB entry; retry.
    case spurious
    /// Retry without having changed anything (`RET_PF_RETRY`).
    case retry
    /// The access must be emulated (`RET_PF_EMULATE`): a write to a shadowed guest table, or MMIO.
    case emulate
    /// The guest's own tables refuse the access: KVM injects this #PF (then `RET_PF_RETRY`).
    case injectGuestFault(address: GuestVirtualAddress, errorCode: PageFaultErrorCode)
    /// The guest's tables point at a non-canonical address or the walk was impossible.
    case injectGeneralProtection
    /// A write sub-page write protection refuses: the VMM gets KVM_EXIT_SPP (the SPP series'
    /// RET_PF_USERSPACE; TDP with EPT only, docs/SPP.md).
    case subPageWriteExit
}

/// What the host hardware walks: the root KVM loaded and the paging mode it runs the guest in.
public struct HardwareRoot: Equatable, Sendable {
    public var mode: PagingMode
    /// The host-physical root table (the PAE root's page for `.pae`).
    public var rootFrame: HostFrameNumber
    /// For `.pae`: the four PDPTE values of the PAE root.
    public var pdptes: [UInt64]
}

/// A root kept in the cache (KVM's `struct kvm_mmu_root_info` of `prev_roots`): the guest pgd it
/// was built for and its shadow page.
public struct CachedRoot {
    public let pgd: UInt64
    public let page: ShadowPage
}

/// One vCPU's shadow MMU (KVM's `root_mmu` with the shadow-paging callbacks): its roles, its
/// roots, and the page-fault handler.
public final class MMUContext {
    public let mmu: ShadowMMU
    /// `mmu`'s event log and memslots, which `mmu` owns as long as this context holds it, lent
    /// unretained: read through `mmu` (or held `unowned(unsafe)`) on a fault path, each use cost a
    /// retain and a release.
    private let lentEvents: Unmanaged<MMUEventLog>
    private let lentMemslots: Unmanaged<MemslotSet>
    var events: MMUEventLog { lentEvents._withUnsafeGuaranteedRef { $0 } }
    var memslots: MemslotSet { lentMemslots._withUnsafeGuaranteedRef { $0 } }

    /// Records `event` in `mmu`'s log when it records, borrowing the log where `events` returns it
    /// retained.
    @inline(__always)
    func trace(_ event: @autoclosure () -> MMUEvent) {
        lentEvents._withUnsafeGuaranteedRef { $0.record(event()) }
    }

    /// `body` with `mmu`'s memslots borrowed (see `trace`).
    @inline(__always)
    func withMemslots<Result>(_ body: (MemslotSet) -> Result) -> Result {
        lentMemslots._withUnsafeGuaranteedRef(body)
    }
    public let cpu: CPUModel
    /// The vCPU this context belongs to, for tracepoints.
    @exclusivity(unchecked) public var vcpuID = 0
    @exclusivity(unchecked) public private(set) var registers: PagingRegisters
    @exclusivity(unchecked) public internal(set) var cpuRole: CPURole
    @exclusivity(unchecked) public internal(set) var rootRole: PageRole
    /// For `guest_mmu`, the context of L1's EPT whose tables it shadows (MMUContext+NestedTDP.swift);
    /// nil for the MMU of the guest's own paging.
    public var nestedEPT: NestedEPTContext? { nestedEPTBox?.context }
    /// `nestedEPT` in a box, so that a fault borrows it in place: read out of a `var`, the context
    /// (with its EPT walker) was copied at every L2 fault, with the reference counting of its parts.
    @exclusivity(unchecked) private(set) var nestedEPTBox: NestedEPTContextBox?
    /// `nestedEPTBox` for a fault to borrow: reading the optional reference cost a retain and a
    /// release. Set with it by `setNestedEPT` (a `didSet` would not run in this class's initializers).
    @exclusivity(unchecked) private(set) var lentNestedEPTBox: Unmanaged<NestedEPTContextBox>?
    /// This context is `guest_mmu` for L1's nested page tables (SVM): its "CR3" is L1's nCR3.
    @exclusivity(unchecked) public internal(set) var shadowsNestedPageTables = false
    /// The guest-table walker for the current registers (KVM's `gva_to_gpa` / `walk_addr`).
    public var guestWalker: PageWalker { guestWalkerBox.walker }
    /// The walker in a box: a `let` of a class is borrowed in place, where a `var` walker (a
    /// large struct) would be copied on every fault.
    @exclusivity(unchecked) public private(set) var guestWalkerBox: WalkerBox
    /// The root shadow page: the guest's top table for a 4- or 5-level guest, a passthrough page
    /// above it on a deeper host, or a direct root; nil for KVM's special roots (the PAE root, and
    /// `pml4_root`/`pml5_root` above it on a 4- or 5-level host) and for the dummy root.
    @exclusivity(unchecked) public private(set) var root: ShadowPage?
    /// The four level-2 roots behind the PAE root (32-bit, PAE and non-paging guests).
    @exclusivity(unchecked) public private(set) var paeRoots: [ShadowPage?] = [nil, nil, nil, nil]
    /// KVM's special root pages, allocated when first needed and kept for the vCPU's life:
    /// `pae_root`, and `pml4_root` / `pml5_root` when a 32-bit or PAE guest's tables are shadowed
    /// in a 4- or 5-level host format.
    @exclusivity(unchecked) private var paeRootFrame: HostFrameNumber?
    @exclusivity(unchecked) private var pml4RootFrame: HostFrameNumber?
    @exclusivity(unchecked) private var pml5RootFrame: HostFrameNumber?
    /// The `local-roots` variant's per-vCPU root pages for the current root, top first: the root,
    /// then (on a 4- or 5-level host) one page per level down to the level-3 page whose first four
    /// entries are the PAE root. Empty otherwise.
    @exclusivity(unchecked) public private(set) var perVCPURootPages: [ShadowPage] = []
    /// The current root is KVM's dummy root: the guest's root table is in no memslot.
    @exclusivity(unchecked) public private(set) var usesDummyRoot = false
    /// The CR3 the roots were built for (KVM's `root.pgd`, PCID bits included).
    @exclusivity(unchecked) public private(set) var rootPGD: UInt64 = 0
    @exclusivity(unchecked) public private(set) var rootsLoaded = false
    /// `mmu.rootObsoletions` at the last pass of `freeObsoleteRoots` (none yet: the first one runs).
    @exclusivity(unchecked) private var rootObsoletionsSeen = UInt64.max
    /// KVM's `prev_roots`: roots kept for a later CR3 load of the same pgd, most recent first.
    /// Only roots with a shadow page are cached (never special or dummy roots).
    @exclusivity(unchecked) public private(set) var previousRoots = [CachedRoot?](repeating: nil, count: previousRootCount)
    /// KVM_MMU_NUM_PREV_ROOTS.
    public static let previousRootCount = 3
    /// The guest walkers of the address spaces CR3 loads left, as many as there are cached roots.
    /// They are for the current registers but CR3: a register write other than a CR3 load
    /// empties the list.
    @exclusivity(unchecked) private var recentGuestWalkers = RecentWalkers(count: previousRootCount)
    /// CR3 loads that found their root cached (current or previous) and ones that did not; not
    /// KVM counters, the model's view of `fast_pgd_switch`.
    @exclusivity(unchecked) public private(set) var rootCacheHits: UInt64 = 0
    @exclusivity(unchecked) public private(set) var rootCacheMisses: UInt64 = 0
    /// The paging depth of the host format the shadow tables are built in, or nil to follow the
    /// guest (see `VirtualMachine.hostLevels`).
    public let hostLevels: Int?
    /// The MMU design this context runs (docs/VARIANTS.md); the same as its `mmu`'s.
    public let variant: MMUVariant
    /// Register writes that reset the context or unloaded its roots (`kvm_mmu_reset_context`,
    /// `kvm_mmu_unload` from `kvm_post_set_cr0/cr4` and `set_efer`); not a KVM counter.
    public private(set) var contextResets: UInt64 = 0
    /// `kvm_init_mmu` calls that found the roles changed and re-initialised the context.
    public private(set) var roleReinitializations: UInt64 = 0
    /// Root shadow pages this context allocated (a root lookup that missed the hash), special
    /// roots not included.
    public private(set) var rootsCreated: UInt64 = 0
    /// The guest's entry formats under the current registers (the guest walker's rules).
    @exclusivity(unchecked) private(set) var long64: Long64Format
    @exclusivity(unchecked) private(set) var legacy32: Legacy32Format

    public init(mmu: ShadowMMU, registers: PagingRegisters, cpu: CPUModel = CPUModel(),
                hostLevels: Int? = nil, variant: MMUVariant = .upstream) throws(ControlStateError) {
        precondition(variant == mmu.variant, "a context runs the variant of the MMU it belongs to")
        self.mmu = mmu
        lentEvents = .passUnretained(mmu.events)
        lentMemslots = .passUnretained(mmu.memory)
        self.variant = variant
        self.cpu = cpu
        self.registers = registers
        self.hostLevels = hostLevels
        guestWalkerBox = WalkerBox(try PageWalker(registers: registers, cpu: cpu, memory: mmu.memory))
        cpuRole = calcCPURole(cr0: registers.cr0, cr4: registers.cr4, efer: registers.efer)
        rootRole = Self.rootRole(for: cpuRole, hostLevels: hostLevels, variant: variant)
        long64 = Long64Format(mode: guestWalkerBox.walker.mode, efer: registers.efer, cpu: cpu)
        legacy32 = Legacy32Format(cr4: registers.cr4, cpu: cpu)
    }

    deinit {
        for page in perVCPURootPages { mmu.freePerVCPURootPage(page) }
        for frame in [paeRootFrame, pml4RootFrame, pml5RootFrame].compactMap({ $0 }) { try? mmu.pool.freePage(frame) }
    }

    /// The shadow root role (`kvm_init_shadow_mmu`), or with a fixed host depth the role KVM gives
    /// a nested NPT root (`kvm_init_shadow_npt_mmu`): the host's level, and `passthrough` for a
    /// 4-level guest on a 5-level host.
    /// The seed-1 variants say "passthrough" with their guest-level field instead.
    static func rootRole(for cpuRole: CPURole, hostLevels: Int?, variant: MMUVariant = .upstream) -> PageRole {
        var role = shadowRootRole(for: cpuRole)
        if let hostLevels {
            role.level = hostLevels
            if !role.isDirect && hostLevels == 5 && cpuRole.base.level == 4 { role.isPassthrough = true }
        }
        return variant.encodingGuestLevel(role, guestRootLevel: cpuRole.base.level)
    }

    // MARK: Registers

    /// A write to CR0, CR3, CR4, EFER, PKRU or RFLAGS.AC, with KVM's rules for what it does to the
    /// context (`kvm_post_set_cr0`, `kvm_post_set_cr4`, `set_efer`: reset, unload or only
    /// re-initialise the roles) and, when CR3 changed, a CR3 load. Returns the TLB flushes the write
    /// requested of the vCPU.
    public func setRegisters(_ new: PagingRegisters) throws(ControlStateError) -> TLBFlushRequests {
        let old = registers
        let oldWalker = guestWalkerBox.walker
        // The PDPTE registers are reloaded only by the writes the architecture names (KVM's
        // load_pdptrs from kvm_set_cr0/cr4); any other write keeps the values loaded before.
        let reloadsPDPTEs = new.reloadsPDPTEs(from: old)
        let keptPDPTEs = new.mode == .pae && !reloadsPDPTEs && new.cr3 == old.cr3
            ? (0..<4).map { oldWalker.pdpte($0).rawValue } : nil
        let walker = try PageWalker(registers: new, cpu: cpu, memory: memslots, pdpteValues: keptPDPTEs)
        let pdptesChanged = reloadsPDPTEs && oldWalker.mode == .pae
            && (0..<4).contains { walker.pdpte($0) != oldWalker.pdpte($0) }
        // Without TDP the pre-split rule is the same; the variant keeps its own to say so.
        let cr0 = variant == .combinedMMURole
            ? contextResetForCR0WithCombinedRole(old: old.cr0, new: new.cr0, tdp: false, paging: new.cr0.contains(.paging))
            : contextResetForCR0(old: old.cr0, new: new.cr0, tdp: false)
        let cr4 = contextResetForCR4(old: old.cr4, new: new.cr4, tdp: false)
        let efer = contextResetForEFER(old: old.efer, new: new.efer)
        let reset = cr0.context.combined(with: cr4.context).combined(with: efer.context)
        var flushes = cr0.flushes.union(cr4.flushes)
        install(new, walker)
        if reset.unloadsRoots {
            contextResets += 1
            unload()
        } else if pdptesChanged {
            freeCurrentRoot()
        }
        if reset.recomputesRoles { initializeRoles() }
        if new.cr3 != old.cr3 {
            flushes.formUnion(try loadCR3(new.cr3))
        }
        return flushes
    }

    /// MOV to CR3 (KVM's `kvm_set_cr3`), also of the value CR3 already holds. `value` has the
    /// PCID in bits 11:0 under CR4.PCIDE; `noFlush` is bit 63 of the source. PAE paging reloads
    /// the PDPTEs from memory and frees the current roots when they changed; a new value moves to
    /// the root for it (`kvm_mmu_new_pgd`: the current root or a cached one when usable, else a
    /// new one at the next entry). Then, unless `noFlush`, the PCID's translations go
    /// (`kvm_invalidate_pcid`).
    public func loadCR3(_ value: UInt64, noFlush: Bool = false) throws(ControlStateError) -> TLBFlushRequests {
        let changed = value != registers.cr3
        if changed || registers.mode == .pae {
            var new = registers
            new.cr3 = value
            // The walker kept from an earlier load of this CR3, else the current one pointed at the
            // new root. In 4- and 5-level paging a walker is a function of the registers (and of the
            // CPU model, the same for all of the context's); a PAE walker also holds the PDPTEs it
            // loaded, which every CR3 load reloads from memory.
            let reusable = guestWalkerBox.walker.mode.isLongMode
            var box: WalkerBox
            if reusable, let kept = recentGuestWalkers.take(cr3: value) {
                assert(kept.walker.registers == new, "a walker kept for other registers")
                box = kept
            } else {
                box = WalkerBox(try guestWalker.loadingCR3(value, memory: memslots))
            }
            let pdptesChanged = box.walker.mode == .pae
                && (0..<4).contains { box.walker.pdpte($0) != guestWalkerBox.walker.pdpte($0) }
            // Only CR3 changed: the formats derived from CR4 and EFER stay.
            registers = new
            swap(&box, &guestWalkerBox)
            if reusable { recentGuestWalkers.keep(consume box) }  // the walker of the address space left
            if pdptesChanged { freeCurrentRoot() }
            if changed { switchRoot(to: value) }
        }
        return noFlush ? [] : invalidatePCID(registers.pcid)
    }

    /// `kvm_invalidate_pcid` under shadow paging: the active PCID is synced and flushed at the next
    /// entry; with CR4.PCIDE, cached roots of that PCID are freed (a later switch to them must not
    /// find stale entries).
    private func invalidatePCID(_ pcid: UInt16) -> TLBFlushRequests {
        var requests: TLBFlushRequests = []
        if registers.pcid == pcid { requests = [.syncRoots, .flushCurrent] }
        guard registers.cr4.contains(.pcidEnable) else { return requests }
        for index in previousRoots.indices {
            if let cached = previousRoots[index], registers.pcid(ofCR3: cached.pgd) == pcid { freePreviousRoot(at: index) }
        }
        return requests
    }

    // MARK: The root cache

    /// KVM's `is_root_usable`: the cached root was built for this pgd (indirect roots) and for
    /// the current root role (an invalid page's role never matches).
    private func isUsable(_ cached: CachedRoot?, pgd: UInt64) -> Bool {
        guard let cached else { return false }
        return (rootRole.isDirect || cached.pgd == pgd) && cached.page.role == rootRole
    }

    /// `kvm_mmu_new_pgd` with `fast_pgd_switch`: keep the current root if it is for `pgd`, else
    /// take a usable cached one (the current root becomes the most recent cached one, the least
    /// recent is freed); special and dummy roots are freed, never cached. Without a hit the next
    /// entry allocates a root.
    func switchRoot(to pgd: UInt64) {
        // Under local-roots a per-vCPU root cannot be cached or kept either: its PAE root would be
        // shared by two roots (seed 2; the variant asks of the root what Lai's
        // `using_local_root_page` asks of the roles, which is the same while they are unchanged).
        if rootsLoaded && (root == nil || root!.isPerVCPURoot) { freeCurrentRoot() }
        let hit = rootsLoaded ? findCachedRootKeepingCurrent(pgd) : findCachedRootWithoutCurrent(pgd)
        guard hit, root != nil else {
            rootCacheMisses += 1
            return
        }
        rootCacheHits += 1
        if !rootRole.isDirect { root?.writeFloodingCount = 0 }
    }

    /// `cached_root_find_and_keep_current`: rotates the current root through the cache until a
    /// usable one is current (C 0 1 2 -> 0 C 1 2 -> 1 C 0 2 -> 2 C 0 1); with none, the root that
    /// fell off the end is freed. The roots are moved, not copied, so a switch pays no reference
    /// counting for them.
    private func findCachedRootKeepingCurrent(_ pgd: UInt64) -> Bool {
        var current: CachedRoot?
        switch root.take() {
        case .some(let page): current = CachedRoot(pgd: rootPGD, page: page)
        case .none: current = nil
        }
        var found = isUsable(current, pgd: pgd)
        for index in previousRoots.indices where !found {
            swap(&current, &previousRoots[index])
            found = isUsable(current, pgd: pgd)
        }
        setCurrentRoot(consume current)
        if !found { freeCurrentRoot() }
        return found
    }

    /// `cached_root_find_without_current`: the first usable cached root becomes current and the
    /// ones after it move up.
    private func findCachedRootWithoutCurrent(_ pgd: UInt64) -> Bool {
        guard let index = previousRoots.firstIndex(where: { isUsable($0, pgd: pgd) }) else { return false }
        setCurrentRoot(previousRoots[index]!)
        previousRoots.remove(at: index)
        previousRoots.append(nil)
        return true
    }

    private func setCurrentRoot(_ cached: consuming CachedRoot?) {
        rootsLoaded = cached != nil
        usesDummyRoot = false
        switch consume cached {
        case .some(let entry):
            rootPGD = entry.pgd
            root = entry.page
        case .none:
            rootPGD = 0
            root = nil
        }
    }

    func freePreviousRoot(at index: Int) {
        guard let cached = previousRoots[index] else { return }
        previousRoots[index] = nil
        mmu.releaseRoot(cached.page)
    }

    private func install(_ new: PagingRegisters, _ walker: PageWalker) {
        registers = new
        guestWalkerBox = WalkerBox(walker)
        recentGuestWalkers.removeAll()
        long64 = Long64Format(mode: walker.mode, efer: new.efer, cpu: cpu)
        legacy32 = Legacy32Format(cr4: new.cr4, cpu: cpu)
    }

    /// `kvm_init_mmu` for shadow paging: recompute the roles; nothing else changes when they are
    /// the same as before.
    private func initializeRoles() {
        let newCPURole = calcCPURole(cr0: registers.cr0, cr4: registers.cr4, efer: registers.efer)
        let newRootRole = Self.rootRole(for: newCPURole, hostLevels: hostLevels, variant: variant)
        if variant == .combinedMMURole {
            guard Self.combinedMMURole(cpu: newCPURole, root: newRootRole) != Self.combinedMMURole(cpu: cpuRole, root: rootRole)
            else { return }
        } else {
            guard newCPURole != cpuRole || newRootRole != rootRole else { return }
        }
        roleReinitializations += 1
        cpuRole = newCPURole
        rootRole = newRootRole
    }

    /// The pre-seed-4 `mmu_role` for shadow paging: the shadow page role (this tree's root role,
    /// with the guest's EFER.NX, which KVM put in the role before it forced `efer_nx` for shadow
    /// roots) and the extended role, compared as one word pair by `shadow_mmu_init_context`.
    static func combinedMMURole(cpu: CPURole, root: PageRole) -> CPURole {
        var base = root
        base.eferNX = cpu.base.eferNX
        return CPURole(base: base, ext: cpu.ext)
    }

    /// `shadow_page_table_clear_flood`: the guest is using every shadow page on the path of
    /// `address`, so none of them is flooded.
    func clearFloodingAlongShadowPath(_ address: GuestVirtualAddress) {
        guard rootsLoaded, var (page, level) = shadowWalkStart(address) else { return }
        while true {
            page.writeFloodingCount = 0
            let spte = SPTE(rawValue: page.spte(Self.index(address.rawValue, level: level)).pointee)
            guard level > 1, spte.isShadowPresent, !spte.isLast(level: level), let child = mmu.child(of: spte) else { return }
            page = child
            level -= 1
        }
    }

    /// `kvm_mmu_free_obsolete_roots`: frees the current and cached roots a zap made obsolete. A
    /// root without a shadow page (special, dummy) cannot be told fresh from stale, so KVM treats it
    /// as obsolete.
    public func freeObsoleteRoots() {
        // Every vCPU entry asks (an L2 one at every try): the pass is skipped while no root has
        // become obsolete since the last one, unless the current root is a special one.
        if mmu.rootObsoletions == rootObsoletionsSeen && (root != nil || !rootsLoaded) { return }
        rootObsoletionsSeen = mmu.rootObsoletions
        if rootsLoaded && (root.map { mmu.isObsolete($0) } ?? true) { freeCurrentRoot() }
        for index in previousRoots.indices {
            if let cached = previousRoots[index], mmu.isObsolete(cached.page) { freePreviousRoot(at: index) }
        }
    }

    /// KVM's `kvm_mmu_unload`: frees the current root and every cached one.
    public func unload() {
        freeCurrentRoot()
        for index in previousRoots.indices { freePreviousRoot(at: index) }
    }

    /// `kvm_mmu_free_roots` of the current root: its page's root reference, or each PAE root's.
    public func freeCurrentRoot() {
        if let root {
            if root.isPerVCPURoot {
                root.rootCount -= 1
                for page in perVCPURootPages { mmu.freePerVCPURootPage(page) }
                perVCPURootPages = []
            } else {
                mmu.releaseRoot(root)
            }
        }
        root = nil
        for case let page? in paeRoots { mmu.releaseRoot(page) }
        paeRoots = [nil, nil, nil, nil]
        usesDummyRoot = false
        rootsLoaded = false
    }

    /// `kvm_mmu_load`: builds the roots if there are none (then syncs them, and the caller
    /// flushes the TLB: `allocated`), and says what the hardware is to walk.
    @inline(never)  // see `pageFault`
    public func load() throws(ShadowMMUError) -> (root: HardwareRoot, allocated: Bool) {
        var allocated = false
        if !rootsLoaded {
            try allocateRoots()
            syncRoots()
            allocated = true
        }
        return (hardwareRoot, allocated)
    }

    /// The root table while the roots stay loaded (`kvm_mmu_reload` then has nothing to do); nil
    /// when `load()` has work to do, or for KVM's special roots. (Read here, where the fields are
    /// exempt from exclusivity checks: from another module each read was a runtime call.)
    public var loadedRootFrame: HostFrameNumber? { rootsLoaded ? root?.frame : nil }

    /// What the hardware walks for the loaded roots.
    private var hardwareRoot: HardwareRoot {
        if let root {
            // A per-vCPU PAE root (local-roots on a PAE-paging host): its four entries are the PDPTEs.
            if root.level == 3 { return HardwareRoot(mode: .pae, rootFrame: root.frame, pdptes: (0..<4).map { root.spte($0).pointee }) }
            return HardwareRoot(mode: Self.hostMode(levels: root.level), rootFrame: root.frame, pdptes: [])
        }
        if usesDummyRoot {
            let frame = mmu.dummyRootFrame!
            if rootRole.level >= 4 { return HardwareRoot(mode: Self.hostMode(levels: rootRole.level), rootFrame: frame, pdptes: []) }
            return HardwareRoot(mode: .pae, rootFrame: frame, pdptes: [0, 0, 0, 0])
        }
        switch rootRole.level {
        case 5: return HardwareRoot(mode: .fiveLevel, rootFrame: pml5RootFrame!, pdptes: [])
        case 4: return HardwareRoot(mode: .fourLevel, rootFrame: pml4RootFrame!, pdptes: [])
        default:
            let entries = mmu.pool.pointer(paeRootFrame!).bindMemory(to: UInt64.self, capacity: 4)
            return HardwareRoot(mode: .pae, rootFrame: paeRootFrame!, pdptes: (0..<4).map { entries[$0] })
        }
    }

    private static func hostMode(levels: Int) -> PagingMode { levels == 5 ? .fiveLevel : .fourLevel }

    /// PDPTE `index` of a loaded per-vCPU PAE root (local-roots on a PAE-paging host), the only
    /// PAE root whose entries change while it stays loaded; nil for every other root (upstream's
    /// special PAE root changes only when roots are loaded, which gives the hardware a new walker).
    public func changeablePDPTE(_ index: Int) -> UInt64? {
        guard rootsLoaded, let root, root.isPerVCPURoot, root.level == 3 else { return nil }
        return root.spte(index).pointee
    }

    /// Seed 2's `using_local_root_page` (Sean's name: `kvm_mmu_has_per_vcpu_root_page`): under the
    /// `local-roots` variant, where upstream uses special roots: a PAE-format root, or a guest
    /// whose top table is a 32-bit or PAE one shadowed in a deeper host format.
    var hasPerVCPURootPage: Bool {
        variant == .localRoots && (rootRole.level == 3 || (!rootRole.isDirect && cpuRole.base.level <= 3))
    }

    private func allocateRoots() throws(ShadowMMUError) {
        try mmu.makePagesAvailable()
        if hasPerVCPURootPage {
            try allocatePerVCPURoots()
        } else if hasPassthroughPagesAbove32BitGuest {
            try allocatePassthroughRoots()
        } else if rootRole.isDirect {
            try allocateDirectRoots()
        } else {
            try allocateShadowRoots()
        }
        rootsLoaded = true
    }

    /// A special root page, allocated once and zeroed.
    private func specialRootPage(_ frame: inout HostFrameNumber?) throws(ShadowMMUError) -> UnsafeMutablePointer<UInt64> {
        if frame == nil {
            do { frame = try mmu.pool.allocatePage() } catch { throw .outOfHostMemory("\(error)") }
        }
        let entries = mmu.pool.pointer(frame!).bindMemory(to: UInt64.self, capacity: 512)
        entries.initialize(repeating: 0, count: 512)
        return entries
    }

    private func takeRoot(_ gfn: GuestFrameNumber, _ role: PageRole) throws(ShadowMMUError) -> ShadowPage {
        let (page, created) = try mmu.getShadowPage(gfn, role, for: self)
        if created { rootsCreated += 1 }
        page.rootCount += 1
        return page
    }

    /// `mmu_alloc_direct_roots` (paging off): one direct root on a 4- or 5-level host, else four
    /// level-2 direct roots over 1 GiB each behind the PAE root.
    private func allocateDirectRoots() throws(ShadowMMUError) {
        rootPGD = 0
        if rootRole.level >= 4 {
            root = try takeRoot(GuestFrameNumber(0), rootRole)
            return
        }
        let entries = try specialRootPage(&paeRootFrame)
        for index in 0..<4 {
            var role = rootRole
            role.level = 2
            role.quadrant = 0
            role = variant.encodingGuestLevel(role, guestRootLevel: cpuRole.base.level)
            let page = try takeRoot(GuestFrameNumber(UInt64(index) << 18), role)
            paeRoots[index] = page
            entries[index] = page.frame.rawValue << 12 | 1
        }
    }

    /// The guest's root table: CR3's frame (a 32-bit guest's CR3 holds a 20-bit frame number).
    private var guestRootGFN: GuestFrameNumber {
        GuestFrameNumber((registers.cr3 & (cpuRole.base.level == 2 ? 0xFFFF_F000 : bitRange(12, 51))) >> 12)
    }

    /// Seed 2's root allocation: per-vCPU pages from the host's top level down to level 3, each
    /// linked to the next through entry 0, and under the level-3 page the four page directories
    /// upstream makes as PAE roots, here linked as its children (parent links, no root
    /// references). A PAE guest's PDPTE that is not present, or names memory outside every
    /// memslot, leaves its entry empty, as upstream does.
    private func allocatePerVCPURoots() throws(ShadowMMUError) {
        rootPGD = rootRole.isDirect ? 0 : registers.cr3
        let rootGFN = guestRootGFN
        if !rootRole.isDirect && memslots.hostFrame(of: rootGFN) == nil {
            _ = try mmu.allocateDummyRoot()
            usesDummyRoot = true
            return
        }
        var chain: [ShadowPage] = []
        for level in stride(from: rootRole.level, through: 3, by: -1) {
            var role = rootRole
            role.level = level
            role.quadrant = 0
            let page = try mmu.allocatePerVCPURootPage(role)
            if let parent = chain.last { mmu.link(parent.spte(0), to: page) }
            chain.append(page)
        }
        rootsCreated += UInt64(chain.count)
        perVCPURootPages = chain
        chain[0].rootCount += 1
        root = chain[0]
        let paeRoot = chain[chain.count - 1]
        for index in 0..<4 {
            let gfn: GuestFrameNumber
            if rootRole.isDirect {
                gfn = GuestFrameNumber(UInt64(index) << 18)
            } else {
                guard let table = guestDirectoryGFN(forPAERoot: index, rootGFN: rootGFN) else { continue }
                gfn = table
            }
            let role = variant.childRole(of: paeRoot.role, parentIndex: index, direct: rootRole.isDirect, access: rootRole.access)
            let page = try mmu.getShadowPage(gfn, role, for: self).page
            mmu.link(paeRoot.spte(index), to: page, asPDPTE: rootRole.level == 3)
        }
    }

    /// Under the seed-1 variants a 32-bit guest shadowed in a 4- or 5-level host format gets
    /// passthrough pages above its page directory (RFC v3's "level expansion", case 1) instead
    /// of the special `pml4_root`/`pml5_root` and `pae_root`. Not for PAE guests: their PDPTEs
    /// live in per-vCPU registers and their PDPT is only 32-byte aligned, so a level-3 page keyed
    /// by gfn cannot stand for it (Sean's objection in the thread); they keep the special roots,
    /// as does a PAE-format host root.
    var hasPassthroughPagesAbove32BitGuest: Bool {
        variant.encodesGuestLevel && !rootRole.isDirect && cpuRole.base.level == 2 && rootRole.level >= 4
    }

    /// The seed-1 roots of a 32-bit guest: a passthrough root at the host's level over the guest's
    /// page directory's gfn, passthrough pages under it through entry 0 down to level 3, and
    /// under that the four quarter directories (quadrants 0-3) as children. All are ordinary
    /// hashed pages, so the root can be cached in `prev_roots` like a 64-bit guest's.
    private func allocatePassthroughRoots() throws(ShadowMMUError) {
        rootPGD = registers.cr3
        let rootGFN = guestRootGFN
        guard memslots.hostFrame(of: rootGFN) != nil else {
            _ = try mmu.allocateDummyRoot()
            usesDummyRoot = true
            return
        }
        var role = rootRole
        role.quadrant = 0
        let top = try takeRoot(rootGFN, role)
        root = top
        var parent = top
        while true {
            // Above level 3 only entry 0 leads anywhere (a 32-bit address is below 4 GiB); the
            // level-3 page holds the four quarter directories. A page found in the hash may
            // still have its links.
            let linked = parent.level == 3 ? 4 : 1
            for index in 0..<linked where !SPTE(rawValue: parent.spte(index).pointee).isShadowPresent {
                let role = variant.childRole(of: parent.role, parentIndex: index, direct: false, access: rootRole.access)
                mmu.link(parent.spte(index), to: try mmu.getShadowPage(rootGFN, role, for: self).page)
            }
            guard parent.level > 3, let next = mmu.child(of: SPTE(rawValue: parent.spte(0).pointee)) else { return }
            parent = next
        }
    }

    /// The guest page directory behind PAE root `index` of a 32-bit or PAE guest: the one
    /// directory at CR3 for 4-byte entries (each root shadows a quarter of it), else the table
    /// PDPTE `index` names; nil when that PDPTE is not present or names memory outside every
    /// memslot, which KVM treats alike.
    private func guestDirectoryGFN(forPAERoot index: Int, rootGFN: GuestFrameNumber) -> GuestFrameNumber? {
        if rootRole.hasFourByteGPTE { return rootGFN }
        let pdpte = guestWalker.pdpte(index)
        let table = GuestFrameNumber(pdpte.frameAddress >> 12)
        guard pdpte.isPresent, memslots.hostFrame(of: table) != nil else { return nil }
        return table
    }

    /// `mmu_alloc_shadow_roots`.
    private func allocateShadowRoots() throws(ShadowMMUError) {
        rootPGD = nestedEPT?.pointer.rawValue ?? registers.cr3
        let guestLevel = cpuRole.base.level
        // guest_mmu's root table is the EPTP's.
        let rootGFN = nestedEPT.map { GuestFrameNumber($0.pointer.rootAddress >> 12) } ?? guestRootGFN
        // A root table in no memslot: the hardware walks KVM's dummy root (every access faults).
        guard memslots.hostFrame(of: rootGFN) != nil else {
            _ = try mmu.allocateDummyRoot()
            usesDummyRoot = true
            return
        }
        if guestLevel >= 4 {
            var role = rootRole
            role.quadrant = 0
            root = try takeRoot(rootGFN, role)
            return
        }
        // A 32-bit or PAE guest: four level-2 roots behind the PAE root; on a 4- or 5-level host,
        // `pml4_root` (and `pml5_root`) above it, whose entries carry full rights.
        let presentMask: UInt64 = rootRole.level >= 4 ? 1 | 2 | 4 | 1 << 5 : 1
        let entries = try specialRootPage(&paeRootFrame)
        for index in 0..<4 {
            var role = rootRole
            role.level = 2
            guard let gfn = guestDirectoryGFN(forPAERoot: index, rootGFN: rootGFN) else { continue }
            // The four roots of a 32-bit guest shadow quarters of its one page directory.
            role.quadrant = rootRole.hasFourByteGPTE ? index : 0
            role = variant.encodingGuestLevel(role, guestRootLevel: guestLevel)
            let page = try takeRoot(gfn, role)
            paeRoots[index] = page
            entries[index] = page.frame.rawValue << 12 | presentMask
        }
        if rootRole.level >= 4 {
            let pml4 = try specialRootPage(&pml4RootFrame)
            pml4[0] = paeRootFrame!.rawValue << 12 | presentMask
        }
        if rootRole.level == 5 {
            let pml5 = try specialRootPage(&pml5RootFrame)
            pml5[0] = pml4RootFrame!.rawValue << 12 | presentMask
        }
    }

    // MARK: The page-fault handler

    /// KVM's `kvm_mmu_page_fault` for a #PF exit at `address` with the hardware's `errorCode`.
    /// `access` is the access that faulted (it carries the implicit-supervisor distinction,
    /// which the error code cannot).
    @inline(never)  // keeps the context's state behind this module's exclusivity exemptions
    public func pageFault(at address: GuestVirtualAddress, access: Access,
                          errorCode: PageFaultErrorCode) throws(ShadowMMUError) -> PageFaultResult {
        trace(.kvmPageFault(vcpuID: vcpuID, address: address.rawValue, errorCode: errorCode))
        // A reserved-bit fault is how the hardware reports an MMIO SPTE: KVM's fast path emulates
        // without walking the guest tables (and before counting the fault as taken).
        if errorCode.contains(.reservedBit), handleMMIOPageFault(address) { return .emulate }
        mmu.stats.pfTaken += 1
        let result: PageFaultResult
        if rootRole.isDirect {
            result = try directPageFault(address, errorCode: errorCode)
        } else {
            result = try shadowPageFault(address, access: access, errorCode: errorCode)
        }
        count(result)
        return result
    }

    /// `kvm_mmu_do_page_fault`'s counters for a fault's outcome.
    @inline(__always)
    func count(_ result: PageFaultResult) {
        switch result {
        case .fixed: mmu.stats.pfFixed += 1
        case .emulate: mmu.stats.pfEmulate += 1
        case .spurious: mmu.stats.pfSpurious += 1
        case .injectGuestFault, .injectGeneralProtection: mmu.stats.pfGuest += 1
        case .retry, .subPageWriteExit: break
        }
    }

    /// The #PF KVM injects when the guest walk cannot read a table (outside every memslot):
    /// `FNAME(walk_addr_generic)`'s error path, not present, with the access's W and U bits and
    /// I/D for a fetch when EFER.NX or CR4.SMEP is set (KVM's rule, which unlike the SDM's also
    /// reports it under 32-bit paging with EFER.NXE).
    public func unreadableTableErrorCode(_ access: Access) -> PageFaultErrorCode {
        Self.unreadableTableErrorCode(access, registers: registers)
    }

    /// `unreadableTableErrorCode` for a vCPU in the given register state (under TDP the registers
    /// are the guest's own, with no shadow context).
    public static func unreadableTableErrorCode(_ access: Access, registers: PagingRegisters) -> PageFaultErrorCode {
        var code = PageFaultErrorCode()
        if access.kind == .write { code.insert(.write) }
        if access.privilege == .user { code.insert(.user) }
        if access.kind == .fetch && (registers.efer.contains(.noExecuteEnable) || registers.cr4.contains(.smep)) {
            code.insert(.fetch)
        }
        return code
    }

    /// The guest walk's answer, in the form `FNAME(fetch)` consumes (KVM's `struct guest_walker`).
    /// Fixed-size fields, no arrays: it lives on the fault path.
    struct GuestWalk {
        var gfn: GuestFrameNumber
        var level: Int
        /// The access granted by every level (after `protect_clean_gpte` and the CR0.WP trick).
        var pteAccess: UInt8
        /// Byte `l - 1`: the access granted by the levels above level `l`.
        private var packedPTAccess: UInt64 = ~0
        /// The guest tables holding the level-1...5 entries.
        private var tableFrames: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)

        init(gfn: GuestFrameNumber, level: Int, pteAccess: UInt8) {
            self.gfn = gfn
            self.level = level
            self.pteAccess = pteAccess
        }

        /// The access granted by the levels above level `level`.
        @inline(__always)
        func ptAccess(level: Int) -> UInt8 { UInt8(truncatingIfNeeded: packedPTAccess >> UInt64(8 * (level - 1))) }

        mutating func setPTAccess(_ access: UInt8, level: Int) {
            let shift = UInt64(8 * (level - 1))
            packedPTAccess = packedPTAccess & ~(0xFF << shift) | UInt64(access) << shift
        }

        /// The guest table holding the level-`level` entry.
        func tableGFN(level: Int) -> GuestFrameNumber {
            switch level {
            case 1: GuestFrameNumber(tableFrames.0)
            case 2: GuestFrameNumber(tableFrames.1)
            case 3: GuestFrameNumber(tableFrames.2)
            case 4: GuestFrameNumber(tableFrames.3)
            default: GuestFrameNumber(tableFrames.4)
            }
        }

        mutating func setTableGFN(_ gfn: GuestFrameNumber, level: Int) {
            switch level {
            case 1: tableFrames.0 = gfn.rawValue
            case 2: tableFrames.1 = gfn.rawValue
            case 3: tableFrames.2 = gfn.rawValue
            case 4: tableFrames.3 = gfn.rawValue
            default: tableFrames.4 = gfn.rawValue
            }
        }
    }

    func shadowPageFault(_ address: GuestVirtualAddress, access: Access,
                         errorCode: PageFaultErrorCode) throws(ShadowMMUError) -> PageFaultResult {
        let isWrite = errorCode.contains(.write)
        let box = guestWalkerBox
        var fault = WalkFaultSummary(keepsPath: events.isRecording)
        let translation = box.walkGuest(address, access, in: memslots, fault: &fault)
        if events.isRecording { traceGuestWalk(address, errorCode, translation: translation, fault: fault) }
        switch fault.kind {
        case .none:
            break
        case .pageFault:
            return .injectGuestFault(address: address, errorCode: PageFaultErrorCode(rawValue: UInt64(fault.errorCode.architectural)))
        case .noMemory:
            return .injectGuestFault(address: address, errorCode: unreadableTableErrorCode(access))
        case .generalProtection, .addressTooWide:
            return .injectGeneralProtection
        }
        var walk = makeGuestWalk(translation)
        if !isWrite {
            // `protect_clean_gpte`: a clean page is mapped read-only so the first write faults
            // and the walker sets D.
            let leaf = translation.path.entryValue(level: translation.level)
            if leaf & (1 << 6) == 0 { walk.pteAccess &= ~ACC.write }
        }
        // Writes to a gfn holding an upper-level guest table are always emulated.
        if errorCode.contains(.present) && isWrite && mmu.isWriteTracked(walk.gfn) {
            clearFloodingAlongShadowPath(address)
            return .emulate
        }
        guard let backing = memslots.backing(of: walk.gfn) else {
            // No memslot: emulated MMIO. With MMIO caching on, KVM still builds the shadow path and
            // marks the leaf as an MMIO SPTE, so the next access faults straight into the fast path.
            guard mmu.masks.isMMIOCachingEnabled else { return .emulate }
            try mmu.makePagesAvailable()
            return try fetch(walk, address: address, hostFrame: nil, hostWritable: false, isWrite: isWrite)
        }
        // CR0.WP=0: a supervisor write to a read-only page is allowed by the architecture; KVM
        // maps the page writable but supervisor-only (and not executable under SMEP) so the
        // hardware, which always runs with WP=1, lets the write through.
        if isWrite && walk.pteAccess & ACC.write == 0 && !registers.cr0.contains(.writeProtect)
            && access.privilege != .user {
            walk.pteAccess |= ACC.write
            walk.pteAccess &= ~ACC.user
            if registers.cr4.contains(.smep) { walk.pteAccess &= ~ACC.exec }
        }
        try mmu.makePagesAvailable()
        return try fetch(walk, address: address, hostFrame: backing.frame, hostWritable: backing.writable, isWrite: isWrite,
                         isFetch: access.kind == .fetch)
    }

    /// `FNAME(walk_addr)`'s tracepoints: the walk, each entry it read, and its error.
    private func traceGuestWalk(_ address: GuestVirtualAddress, _ errorCode: PageFaultErrorCode, translation: Translation,
                                fault: WalkFaultSummary) {
        trace(.kvmMMUPagetableWalk(address: address.rawValue, pferr: errorCode))
        let path: WalkPath
        switch fault.kind {
        case .none: path = translation.path
        case .pageFault, .noMemory: path = fault.path
        case .generalProtection, .addressTooWide: return
        }
        for level in path.levels { trace(.kvmMMUPagingElement(pte: path.entryValue(level: level), level: level)) }
        if fault.kind == .pageFault {
            trace(.kvmMMUWalkerError(pferr: PageFaultErrorCode(rawValue: UInt64(fault.errorCode.architectural))))
        }
    }

    private func makeGuestWalk(_ translation: Translation) -> GuestWalk {
        var walk = GuestWalk(gfn: translation.physicalAddress.frame, level: translation.level,
                             pteAccess: translation.permissions)
        var above = accessAll
        let topLevel = translation.path.topLevel
        let topIsRegister = translation.path.topIsRegister
        let firstTableLevel = topIsRegister ? topLevel - 1 : topLevel
        if topIsRegister { walk.setTableGFN(translation.path.entryAddress(level: topLevel).frame, level: topLevel) }
        guard firstTableLevel >= translation.level else { return walk }
        // The format's rules read once, not per level (the context's properties are class state).
        let fourByteEntries = rootRole.hasFourByteGPTE
        let format64 = long64
        let format32 = legacy32
        for level in stride(from: firstTableLevel, through: translation.level, by: -1) {
            walk.setPTAccess(above, level: level)
            walk.setTableGFN(translation.path.entryAddress(level: level).frame, level: level)
            let gpte = translation.path.entryValue(level: level)
            above &= fourByteEntries ? format32.permissions(Legacy32Entry(bits: gpte)) : format64.permissions(Entry64(rawValue: gpte))
        }
        return walk
    }

    /// The shadow table for the top of a shadow walk of `address`, and its level.
    func shadowWalkStart(_ address: GuestVirtualAddress) -> (page: ShadowPage, level: Int)? {
        guard let (page, level) = unretainedShadowWalkStart(address) else { return nil }
        return (page.takeUnretainedValue(), level)
    }

    /// `shadowWalkStart` for `FNAME(fetch)`, which borrows the page (the context keeps its roots
    /// for the fault): returned as a reference, it was retained and released around every fault.
    @inline(__always)
    private func unretainedShadowWalkStart(_ address: GuestVirtualAddress) -> (page: Unmanaged<ShadowPage>, level: Int)? {
        if let root {
            // Per-vCPU pages above level 3 only lead to the PAE root (a 32-bit address is below 4 GiB).
            if root.isPerVCPURoot { return (.passUnretained(perVCPURootPages[perVCPURootPages.count - 1]), 3) }
            return (.passUnretained(root), root.level)
        }
        // Special roots: the walk starts at the PAE root's entry (pml4_root and pml5_root above
        // it only lead there: a 32-bit address is below 4 GiB).
        guard let page = paeRoots[Int(address.rawValue >> 30) & 3] else { return nil }
        return (.passUnretained(page), 2)
    }

    // Forced inline: a call from each level of `FNAME(fetch)` and its neighbours cost more than the shift.
    @inline(__always)
    static func index(_ address: UInt64, level: Int) -> Int {
        Int((address >> UInt64(12 + 9 * (level - 1))) & 511)
    }

    /// The shadow page a present, non-leaf SPTE links to (unretained, see `childPage`).
    @inline(__always)
    private func presentChild(at pointer: SPTEPointer) -> Unmanaged<ShadowPage>? {
        let spte = SPTE(rawValue: pointer.pointee)
        guard spte.isShadowPresent && !spte.isLarge else { return nil }
        return mmu.directory.unretainedPage(spte.pfn.rawValue)
    }

    /// `kvm_mmu_get_child_sp`: the page an SPTE leads to, creating and linking it if need be.
    /// Unretained: the hash owns every shadow page, and nothing on the fault path frees one (zaps
    /// that free pages happen only from guest writes and register changes, never inside a fetch),
    /// so the walk down the tables needs no atomic retain and release per level.
    private func childPage(at pointer: SPTEPointer, in parent: ShadowPage, gfn: GuestFrameNumber, direct: Bool,
                           access: UInt8, address: UInt64) throws(ShadowMMUError) -> Unmanaged<ShadowPage> {
        if let existing = presentChild(at: pointer) { return existing }
        let role = variant == .upstream
            ? childRole(of: parent.role, parentIndex: parent.index(of: pointer), direct: direct, access: access)
            : variantChildRole(of: parent, at: pointer, direct: direct, access: access, address: address)
        let page = try mmu.getShadowPage(gfn, role, for: self).page
        // The hardware will walk the new link at once: unsync pages below must be current first.
        if !direct && page.unsyncChildren > 0 { syncChildren(of: page) }
        mmu.link(pointer, to: page, asPDPTE: parent.isPerVCPURoot && rootRole.level == 3)
        return Unmanaged.passUnretained(page)
    }

    /// The child role under the variants: recompute-child-role's from the root role and the
    /// address (pre-v6.0), the seed-1 variants' with their guest-level field carried down.
    private func variantChildRole(of parent: ShadowPage, at pointer: SPTEPointer, direct: Bool, access: UInt8,
                                  address: UInt64) -> PageRole {
        if variant == .recomputeChildRole {
            return childRoleFromRootRole(rootRole, level: parent.level - 1, direct: direct, access: access, address: address)
        }
        return variant.childRole(of: parent.role, parentIndex: parent.index(of: pointer), direct: direct, access: access)
    }

    /// `FNAME(fetch)`: builds the shadow path for the walk and installs the leaf.
    /// `hostFrame` nil: the gfn is in no memslot (KVM's `KVM_PFN_NOSLOT`), and the leaf becomes an
    /// MMIO SPTE.
    func fetch(_ walk: GuestWalk, address: GuestVirtualAddress, hostFrame: HostFrameNumber?, hostWritable: Bool,
               isWrite: Bool, isFetch: Bool = false) throws(ShadowMMUError) -> PageFaultResult {
        guard let (start, startLevel) = unretainedShadowWalkStart(address),
              !start._withUnsafeGuaranteedRef({ isFaultStale($0) }) else { return .retry }
        var page = start
        var level = startLevel
        page._withUnsafeGuaranteedRef { $0.writeFloodingCount = 0 }
        // Levels the guest has tables for: shadow them. (Under the seed-1 variants a 32-bit guest
        // has passthrough pages above its directory, over the directory's gfn with full rights.)
        let guestTopLevel = cpuRole.base.level
        while level > walk.level {
            let link = page._withUnsafeGuaranteedRef { $0.spte(Self.index(address.rawValue, level: level)) }
            if let present = presentChild(at: link) {
                // The common case, a table shadowed already: nothing of the walk's to look up.
                page = present
                page._withUnsafeGuaranteedRef { $0.writeFloodingCount = 0 }
                level -= 1
                continue
            }
            page = try page._withUnsafeGuaranteedRef { parent in
                Result { () throws(ShadowMMUError) in
                    let pointer = parent.spte(Self.index(address.rawValue, level: level))
                    let isAboveGuest = level - 1 > guestTopLevel
                    return try childPage(at: pointer, in: parent,
                                         gfn: isAboveGuest ? guestRootGFN : walk.tableGFN(level: level - 1), direct: false,
                                         access: isAboveGuest ? rootRole.access : walk.ptAccess(level: level - 1),
                                         address: address.rawValue)
                }
            }.get()
            page._withUnsafeGuaranteedRef { $0.writeFloodingCount = 0 }
            level -= 1
        }
        // A guest huge page mapped smaller than the guest's leaf: direct pages split it.
        let mapping = hugePageDecision(walk, isFetch: isFetch, inMemslot: hostFrame != nil)
        var goalLevel = mapping.goalLevel
        if let hostFrame { trace(.kvmMMUSPTERequested(gfn: walk.gfn, pfn: hostFrame, level: goalLevel)) }
        while true {
            // `disallowed_hugepage_adjust`: a table the mitigation made stays, one level down.
            if mapping.nxWorkaround && level == goalLevel && level > 1 {
                let spte = SPTE(rawValue: page._withUnsafeGuaranteedRef { $0.spte(Self.index(address.rawValue, level: level)).pointee })
                if spte.isShadowPresent && !spte.isLarge, mmu.child(of: spte)?.nxHugePageDisallowed == true {
                    goalLevel -= 1
                }
            }
            guard level > goalLevel else { break }
            page = try page._withUnsafeGuaranteedRef { parent in
                Result { () throws(ShadowMMUError) in
                    let pointer = parent.spte(Self.index(address.rawValue, level: level))
                    let baseGFN = GuestFrameNumber(walk.gfn.rawValue & ~((1 << UInt64(9 * (level - 1))) - 1))
                    validateDirectSPTE(pointer, access: walk.pteAccess)
                    let existing = SPTE(rawValue: pointer.pointee)
                    let linksPage = !existing.isShadowPresent || existing.isLarge
                    let child = try childPage(at: pointer, in: parent, gfn: baseGFN, direct: true, access: walk.pteAccess,
                                              address: address.rawValue)
                    if linksPage && mapping.hugePageDisallowed {
                        child._withUnsafeGuaranteedRef { mmu.accountNXHugePage($0, possible: mapping.requestedLevel >= level) }
                    }
                    return child
                }
            }.get()
            level -= 1
        }
        return page._withUnsafeGuaranteedRef { page in
            let pointer = page.spte(Self.index(address.rawValue, level: goalLevel))
            guard let hostFrame else {
                markMMIOSPTE(pointer, in: page, gfn: walk.gfn, access: walk.pteAccess)
                prefetchNeighbours(of: pointer, in: page)
                return .emulate
            }
            // A huge leaf maps from the start of its region, in guest and host frames alike.
            let offset = walk.gfn.rawValue & (pagesPerHugePage(goalLevel) - 1)
            let result = setSPTE(pointer, in: page, access: walk.pteAccess, gfn: GuestFrameNumber(walk.gfn.rawValue - offset),
                                 hostFrame: HostFrameNumber(hostFrame.rawValue - offset),
                                 prefetch: false, isWrite: isWrite, hostWritable: hostWritable)
            if result != .spurious { prefetchNeighbours(of: pointer, in: page) }
            return result
        }
    }

    /// `kvm_mmu_hugepage_adjust` for `guest_mmu` under a TDP L1: the level to map L2's page at,
    /// at most L1's leaf level, as the memslot's `lpage_info` (its alignment, the host's mapping
    /// size, write-tracked gfns: shadowed tables) allows; 4 KiB in a dirty-logging slot and for a
    /// fetch under the NX huge-page mitigation (`huge_page_disallowed`, keeping the level that
    /// would have been allowed: the direct pages made then are recovery candidates only if a huge
    /// leaf was possible). The shadow paging of a guest's own tables (no TDP MMU, no `lpage_info`
    /// in the model) maps 4 KiB pages only.
    private func hugePageDecision(_ walk: GuestWalk, isFetch: Bool, inMemslot: Bool) -> HugePageDecision {
        var decision = HugePageDecision()
        // A 4 KiB guest leaf leaves nothing to decide (and the common case stays one compare).
        guard walk.level > 1, let tdp = mmu.tdpSharingWriteTracking else { return decision }
        decision.nxWorkaround = tdp.configuration.nxHugePages
        decision.hugePageDisallowed = isFetch && decision.nxWorkaround
        guard inMemslot, let metadata = tdp.slotMetadata(containing: walk.gfn.rawValue), !metadata.slot.logsDirtyPages
        else { return decision }
        decision.requestedLevel = metadata.maxMappingLevel(walk.gfn.rawValue,
                                                           maxLevel: min(walk.level, tdp.configuration.maxHugePageLevel))
        if !decision.hugePageDisallowed { decision.goalLevel = decision.requestedLevel }
        return decision
    }

    /// The part of KVM's `struct kvm_page_fault` that `kvm_mmu_hugepage_adjust` fills.
    struct HugePageDecision {
        /// `req_level`: the largest leaf the memslot and L1's leaf allow.
        var requestedLevel = 1
        /// `goal_level`: the leaf's level.
        var goalLevel = 1
        /// `nx_huge_page_workaround_enabled`.
        var nxWorkaround = false
        /// `huge_page_disallowed`: an executable fault under the mitigation.
        var hugePageDisallowed = false
    }

    /// `mmu_set_spte` for a gfn in no memslot (`mark_mmio_spte`): whatever the SPTE held goes, and
    /// it becomes an MMIO SPTE carrying the gfn, the access and the memslots generation.
    private func markMMIOSPTE(_ pointer: SPTEPointer, in page: ShadowPage, gfn: GuestFrameNumber, access: UInt8) {
        let old = SPTE(rawValue: pointer.pointee)
        if old.isShadowPresent {
            if old.isLast(level: page.level) {
                mmu.dropSPTE(pointer)
            } else if let child = mmu.child(of: old) {
                mmu.dropParentPTE(child, pointer)
            }
            mmu.flushRemoteTLBs()
        }
        let generation = memslots.generation
        pointer.pointee = SPTE.mmio(gfn: gfn, access: access, generation: generation, masks: mmu.masks).rawValue
        mmu.stats.pfMMIOSPTECreated += 1
        trace(.markMMIOSPTE(gfn: gfn, access: access, generation: generation))
    }

    /// `handle_mmio_page_fault`: the SPTE for `address` is an MMIO SPTE of the current memslots
    /// generation, so the access is emulated at once. False sends the fault down the slow path (a
    /// stale generation, or no MMIO SPTE after all).
    func handleMMIOPageFault(_ address: GuestVirtualAddress) -> Bool {
        guard rootsLoaded, var (page, level) = shadowWalkStart(address) else { return false }
        while true {
            let spte = SPTE(rawValue: page.spte(Self.index(address.rawValue, level: level)).pointee)
            if spte.isMMIO(mmu.masks) {
                let current = memslots.generation & SPTE.mmioGenerationMask
                trace(.checkMMIOSPTE(spte: spte, kvmGeneration: current, spteGeneration: spte.mmioGeneration))
                guard spte.mmioGeneration == current else { return false }
                trace(.handleMMIOPageFault(address: address.rawValue, gfn: spte.mmioGFN(mmu.masks),
                                                       access: spte.mmioAccess(mmu.masks)))
                return true
            }
            guard level > 1, spte.isShadowPresent, !spte.isLast(level: level), let child = mmu.child(of: spte) else {
                return false
            }
            page = child
            level -= 1
        }
    }

    /// `is_page_fault_stale`: the root was zapped while the fault was handled.
    private func isFaultStale(_ root: ShadowPage) -> Bool { mmu.isObsolete(root) }

    /// `validate_direct_spte`: a direct child made for other access rights is dropped.
    private func validateDirectSPTE(_ pointer: SPTEPointer, access: UInt8) {
        let spte = SPTE(rawValue: pointer.pointee)
        guard spte.isShadowPresent && !spte.isLarge, let child = mmu.child(of: spte), child.role.access != access else { return }
        mmu.dropParentPTE(child, pointer)
        mmu.flushRemoteTLBs()
    }

    /// The non-paging and direct path (`nonpaging_page_fault` / `direct_page_fault`): gfn = address.
    private func directPageFault(_ address: GuestVirtualAddress, errorCode: PageFaultErrorCode) throws(ShadowMMUError) -> PageFaultResult {
        let gfn = GuestFrameNumber(address.rawValue >> 12)
        if errorCode.contains(.present) && errorCode.contains(.write) && mmu.isWriteTracked(gfn) { return .emulate }
        guard let backing = memslots.backing(of: gfn) else { return .emulate }  // MMIO, not cached on this path
        try mmu.makePagesAvailable()
        guard var (page, level) = shadowWalkStart(address) else { return .retry }
        while level > 1 {
            let pointer = page.spte(Self.index(address.rawValue, level: level))
            let baseGFN = GuestFrameNumber(gfn.rawValue & ~((1 << UInt64(9 * (level - 1))) - 1))
            page = try childPage(at: pointer, in: page, gfn: baseGFN, direct: true, access: accessAll,
                                 address: address.rawValue).takeUnretainedValue()
            level -= 1
        }
        let pointer = page.spte(Self.index(address.rawValue, level: 1))
        let result = setSPTE(pointer, in: page, access: accessAll, gfn: gfn, hostFrame: backing.frame, prefetch: false,
                             isWrite: errorCode.contains(.write), hostWritable: backing.writable)
        if result != .spurious { prefetchNeighbours(of: pointer, in: page) }
        return result
    }

    // MARK: Installing SPTEs

    /// `mmu_set_spte`.
    func setSPTE(_ pointer: SPTEPointer, in page: ShadowPage, access: UInt8, gfn: GuestFrameNumber, hostFrame: HostFrameNumber,
                 prefetch: Bool, isWrite: Bool, hostWritable: Bool) -> PageFaultResult {
        let level = page.level
        var old = SPTE(rawValue: pointer.pointee)
        var flush = false
        var wasRmapped = false
        if old.isShadowPresent {
            if level > 1 && !old.isLarge, let child = mmu.child(of: old) {
                mmu.dropParentPTE(child, pointer)
                flush = true
            } else if old.pfn != hostFrame {
                mmu.dropSPTE(pointer)
                flush = true
            } else {
                wasRmapped = true
            }
            old = SPTE(rawValue: pointer.pointee)
        }
        let (new, writeProtected) = makeSPTE(page, access: access, gfn: gfn, hostFrame: hostFrame, old: old,
                                            prefetch: prefetch, synchronizing: false, hostWritable: hostWritable)
        var result = PageFaultResult.fixed
        if old == new {
            result = .spurious
        } else {
            // Losing MMU-writable must reach every TLB before the lock is dropped.
            if old.isMMUWritable(mmu.masks) && !new.isMMUWritable(mmu.masks) { flush = true }
            pointer.pointee = new.rawValue
            trace(.kvmMMUSetSPTE(level: level, gfn: gfn, spte: new))
        }
        if writeProtected && isWrite { result = .emulate }
        if flush { mmu.flushRemoteTLBs() }
        if !wasRmapped {
            mmu.rmapAdd(pointer, in: page, gfn: gfn, access: access)
        } else {
            page.setTranslation(at: page.index(of: pointer), gfn: gfn, access: access)
        }
        return result
    }

    /// `make_spte`: the SPTE for a guest translation, and whether it had to stay read-only
    /// because the gfn holds a shadowed guest table.
    func makeSPTE(_ page: ShadowPage, access pteAccess: UInt8, gfn: GuestFrameNumber, hostFrame: HostFrameNumber, old: SPTE,
                  prefetch: Bool, synchronizing: Bool, hostWritable: Bool) -> (SPTE, Bool) {
        let level = page.level
        var access = pteAccess
        if !hostWritable { access &= ~ACC.write }
        // The NX huge-page mitigation: a huge leaf is never executable (`guest_mmu`'s, under TDP).
        if level > 1 && mmu.tdpSharingWriteTracking?.configuration.nxHugePages == true { access &= ~ACC.exec }
        var writable = false
        var writeProtected = false
        if access & ACC.write != 0 {
            if (!old.isLast(level: level) || !old.isWritable)
                && mmu.mustWriteProtect(gfn, canUnsync: !synchronizing, prefetch: prefetch) {
                writeProtected = true
                access &= ~ACC.write
            } else {
                writable = true
            }
        }
        let spte = SPTE.leaf(pfn: hostFrame, level: level, access: access, hostWritable: hostWritable, writable: writable,
                             accessed: !prefetch || synchronizing, dirty: writable, adState: mmu.leafADState(page.role),
                             masks: mmu.masks)
        if writable { _ = memslots.markDirty(gfn) }
        return (spte, writeProtected)
    }

    // MARK: Prefetch

    /// `FNAME(pte_prefetch)` / `__direct_pte_prefetch`: maps the not-yet-present neighbours in
    /// the aligned group of 8 around a level-1 fault, stopping at the first guest PTE that is not
    /// present, has reserved bits or is not accessed.
    private func prefetchNeighbours(of faulting: SPTEPointer, in page: ShadowPage) {
        guard page.level == 1 else { return }
        let first = page.index(of: faulting) & ~(ShadowMMU.prefetchCount - 1)
        let group = first..<first + ShadowMMU.prefetchCount
        if !page.role.isDirect {
            // Only L2's pages (guest mode) can shadow L1's EPT: the role bit, already at hand, keeps
            // the shadow paging of a guest's own tables from reading the context's EPT state.
            // The box, not `nestedEPT`: that copies the context, with a retain of its masks; lent,
            // as the box and its format were retained around the prefetch.
            if page.role.guestMode, let box = lentNestedEPTBox {
                box._withUnsafeGuaranteedRef {
                    prefetchGuestPTEs(group, around: faulting, in: page, format: $0.context.walker.format)
                }
            } else if page.role.hasFourByteGPTE {
                prefetchGuestPTEs(group, around: faulting, in: page, format: legacy32)
            } else {
                prefetchGuestPTEs(group, around: faulting, in: page, format: long64)
            }
            return
        }
        for index in group {
            let pointer = page.spte(index)
            if pointer == faulting || SPTE(rawValue: pointer.pointee).isShadowPresent { continue }
            let gfn = GuestFrameNumber(page.gfn.rawValue + UInt64(index))
            guard let backing = memslots.backing(of: gfn), !(page.role.access & ACC.write != 0 && logsDirtyPages(gfn))
            else { continue }
            _ = setSPTE(pointer, in: page, access: page.role.access, gfn: gfn, hostFrame: backing.frame, prefetch: true,
                        isWrite: false, hostWritable: backing.writable)
        }
    }

    /// `FNAME(pte_prefetch)` over a page with guest PTEs in `format`.
    private func prefetchGuestPTEs<Format: PagingFormat>(_ group: Range<Int>, around faulting: SPTEPointer, in page: ShadowPage,
                                                         format: Format) {
        let entries = ShadowedGuestEntries(of: page, in: memslots)
        for index in group {
            let pointer = page.spte(index)
            if pointer == faulting || SPTE(rawValue: pointer.pointee).isShadowPresent { continue }
            // `FNAME(prefetch_gpte)`.
            guard let gpte = entries.entry(Format.Entry.self, at: index), !format.isPrefetchInvalid(gpte) else { return }
            let (gfn, access) = format.leafTranslation(gpte, pageAccess: page.role.access)
            guard let backing = memslots.backing(of: gfn), !(access & ACC.write != 0 && logsDirtyPages(gfn)) else { return }
            _ = setSPTE(pointer, in: page, access: access, gfn: gfn, hostFrame: backing.frame, prefetch: true, isWrite: false,
                        hostWritable: backing.writable)
        }
    }

    /// KVM does not prefetch writable mappings of pages whose writes it logs (the prefetched
    /// SPTE would let a write through unlogged).
    private func logsDirtyPages(_ gfn: GuestFrameNumber) -> Bool { memslots.logsDirtyPages(gfn) }

    // MARK: Invalidation

    /// INVLPG (KVM's `kvm_mmu_invlpg`): the SPTEs of unsync pages on the address's path, in the
    /// current and every cached root, are synced from the guest; the caller drops the TLB entry.
    public func invalidatePage(_ address: GuestVirtualAddress) {
        mmu.stats.invlpg += 1
        invalidateAddress(address, current: true, previous: Array(previousRoots.indices))
    }

    /// `kvm_mmu_invalidate_addr` for the chosen roots.
    private func invalidateAddress(_ address: GuestVirtualAddress, current: Bool, previous: [Int]) {
        guard !rootRole.isDirect else { return }
        if registers.mode.isLongMode && !address.isCanonical(width: registers.mode.linearAddressWidth) { return }
        if current, rootsLoaded, let (start, _) = shadowWalkStart(address) { invalidateAddress(address, from: start) }
        for index in previous {
            if let cached = previousRoots[index] { invalidateAddress(address, from: cached.page) }
        }
    }

    /// What an INVPCID asks of the vCPU: whether the address's translation in the current root
    /// goes (`flush_tlb_gva`), and the TLB-flush requests raised.
    public struct InvalidationOutcome: Equatable, Sendable {
        public var flushesAddressInCurrent = false
        public var requests: TLBFlushRequests = []
    }

    /// INVPCID as KVM emulates it (`kvm_handle_invpcid`); the caller has checked for #GP.
    public func invalidatePCID(_ type: INVPCIDType, pcid: UInt16, address: GuestVirtualAddress) -> InvalidationOutcome {
        var outcome = InvalidationOutcome()
        switch type {
        case .individualAddress:
            // `kvm_mmu_invpcid_gva`: the current root if the PCID is active, and the cached roots
            // of that PCID.
            let current = pcid == registers.pcid
            let previous = previousRoots.indices.filter { previousRoots[$0].map { registers.pcid(ofCR3: $0.pgd) == pcid } ?? false }
            if current || !previous.isEmpty { invalidateAddress(address, current: current, previous: previous) }
            outcome.flushesAddressInCurrent = current
            mmu.stats.invlpg += 1
        case .singleContext:
            outcome.requests = invalidatePCID(pcid)
        case .allContextsIncludingGlobal, .allContextsExceptGlobal:
            // KVM does not track global entries in shadow tables: a non-global flush is a full one.
            outcome.requests = .flushGuest
        }
        return outcome
    }
}

/// Where the guest entries a shadow page shadows lie in host memory, for a pass over the page's
/// SPTEs (sync, prefetch): looked up once per pass, as a table is one guest frame and nothing a pass
/// does changes the memslots. The entries themselves are read afresh each time, so a pass sees every
/// write to the table.
struct ShadowedGuestEntries {
    /// The host address of the page's first guest entry; nil when the table is in no memslot.
    let first: UnsafeRawPointer?

    // Borrowing: an initializer takes its arguments owned, a retain and release of each per pass.
    init(of page: borrowing ShadowPage, in memory: borrowing MemslotSet) {
        let address = page.firstGuestEntryAddress
        first = memory.hostPage(address.frame).map { UnsafeRawPointer($0.bytes) + Int(address.pageOffset) }
    }

    /// The guest entry shadowed by SPTE `index`, nil when the table is in no memslot.
    @inline(__always)
    func entry<Entry: PageTableEntry>(_: Entry.Type, at index: Int) -> UInt64? {
        guard let first else { return nil }
        // Atomic: another vCPU's guest may be writing the (unsync) table.
        let raw = AtomicAccess.load(UnsafeMutableRawPointer(mutating: first) + index &* Entry.size, size: Entry.size)
        return UInt64(truncatingIfNeeded: Entry.RawValue(littleEndian: Entry.RawValue(truncatingIfNeeded: raw)))
    }
}

// What sync (`FNAME(sync_spte)`) and prefetch (`FNAME(prefetch_gpte)`) ask of a guest leaf, in the
// guest's entry format.
extension PagingFormat {
    /// `FNAME(prefetch_invalid_gpte)`: a guest leaf that is not present, has reserved bits set, or
    /// was never accessed is not mapped ahead of a fault (and a synced SPTE for it is dropped).
    @inline(__always)
    func isPrefetchInvalid(_ gpte: UInt64) -> Bool {
        let entry = Entry(bits: gpte)
        // Only a format with A/D bits (x86 always, EPT when L1's EPTP enables them) can say "never
        // accessed".
        return !isPresent(entry) || (accessedBit != 0 && gpte & accessedBit == 0) || hasReservedBits(entry, level: 1)
    }

    /// The gfn a guest leaf maps and the access it grants under a page made for `pageAccess`
    /// (`gpte_to_gfn`, `gpte_access`, `protect_clean_gpte`: a clean page is mapped read-only).
    @inline(__always)
    func leafTranslation(_ gpte: UInt64, pageAccess: UInt8) -> (gfn: GuestFrameNumber, access: UInt8) {
        let entry = Entry(bits: gpte)
        var access = pageAccess & permissions(entry)
        if dirtyBit != 0 && gpte & dirtyBit == 0 { access &= ~ACC.write }
        return (GuestFrameNumber(pageBase(entry, level: 1) >> 12), access)
    }
}

extension MMUContext {
    /// Makes `context` the EPT context of L1's that this `guest_mmu` shadows.
    func setNestedEPT(_ context: NestedEPTContext) {
        let box = NestedEPTContextBox(context)
        nestedEPTBox = box
        lentNestedEPTBox = .passUnretained(box)
    }
}

/// A `NestedEPTContext` borrowed in place (see `MMUContext.nestedEPTBox`).
final class NestedEPTContextBox {
    let context: NestedEPTContext
    init(_ context: NestedEPTContext) { self.context = context }

    /// `ept_page_fault`'s walk of L1's EPT, from a method so that the context (its walker, with
    /// the reference of its reserved-bit masks) is used where it lies rather than copied.
    @inline(never)
    func walk(_ address: GuestPhysicalAddress, errorCode: PageFaultErrorCode,
              in memory: MemslotSet) -> Result<MMUContext.GuestWalk, NestedVMExit> {
        context.walk(address, errorCode: errorCode, in: memory)
    }
}

/// A page walker held by reference, so that hot paths walk with it in place: a walker is a large
/// struct, and calling it from a class property or through a pointer copied it (267 bytes, with
/// retains) on every walk. Called from a method of the box, whose `walker` is an immutable stored
/// property of a guaranteed `self`, it is borrowed where it lies.
public final class WalkerBox {
    public let walker: PageWalker

    public init(_ walker: PageWalker) { self.walker = walker }

    /// The guest walk of the fault path (KVM's `FNAME(walk_addr)`): over guest memory, setting A/D.
    @inline(never)
    public func walkGuest(_ address: GuestVirtualAddress, _ access: Access, in memory: MemslotSet,
                          fault: inout WalkFaultSummary) -> Translation {
        walker.translate(address, access, in: memory, setAccessedDirty: true, sink: &fault)
    }
}

/// Walkers kept for the address spaces (CR3 values) left most recently, for a switch back to one:
/// a guest switching between a few address spaces (the switches `fast_pgd_switch` serves from the
/// cached roots) reuses their walkers rather than building and boxing one per switch. The owner
/// keeps only walkers that differ from its current one in CR3 alone, and empties the list when
/// anything else changes. Walkers are moved in and out with swaps: a switch pays no reference
/// counting for them.
public struct RecentWalkers {
    /// Most recent first; a walker taken out leaves a hole until the next one is kept.
    private var boxes: [WalkerBox?]

    public init(count: Int) { boxes = [WalkerBox?](repeating: nil, count: count) }

    /// The most recent walker kept.
    public var mostRecent: WalkerBox? {
        for case let box? in boxes { return box }
        return nil
    }

    /// Takes out the walker kept for `cr3`, if there is one.
    public mutating func take(cr3: UInt64) -> WalkerBox? {
        guard let index = boxes.firstIndex(where: { $0?.walker.registers.cr3 == cr3 }) else { return nil }
        return boxes[index].take()
    }

    /// Keeps `box` as the most recent; the ones before the first hole move back a place (with no
    /// hole, all of them, and the least recent goes): C 0 1 2 -> C 0 1, or C 0 _ 2 -> C 0 2.
    public mutating func keep(_ box: consuming WalkerBox) {
        var carried: WalkerBox? = consume box
        for index in boxes.indices where carried != nil { swap(&carried, &boxes[index]) }
    }

    public mutating func removeAll() {
        for index in boxes.indices { boxes[index] = nil }
    }
}

/// What the fault path keeps of a walk's fault: its kind, the #PF error code, and the entries read
/// (for tracepoints). Copying a whole `WalkFault` out of every faulting walk cost more than the
/// walk's own checks.
public struct WalkFaultSummary: WalkFaultSink {
    public enum Kind: UInt8, Sendable { case none, pageFault, generalProtection, noMemory, addressTooWide }
    public var kind = Kind.none
    /// The #PF error code as the walk computed it (KVM's synthetic bits included).
    public var errorCode = PageFaultErrorCode()
    /// For `.noMemory`, the entry address outside memory and its level; for `.addressTooWide`,
    /// the width the address exceeded.
    public var unbackedEntry = GuestPhysicalAddress(0)
    public var level = 0
    /// The entries the walk read, kept only when `keepsPath`.
    public var path = WalkPath()
    public let keepsPath: Bool

    @inlinable public init(keepsPath: Bool = false) { self.keepsPath = keepsPath }

    @inlinable @inline(__always)
    public mutating func record(_ fault: WalkFault) {
        switch fault {
        case .pageFault(let pageFault):
            kind = .pageFault
            errorCode = pageFault.errorCode
            if keepsPath { path = pageFault.path }
        case .noMemory(let entry, let entryLevel, let walked):
            kind = .noMemory
            unbackedEntry = entry
            level = entryLevel
            if keepsPath { path = walked }
        case .generalProtection:
            kind = .generalProtection
        case .addressTooWide(_, let width):
            kind = .addressTooWide
            level = width
        }
    }
}
