import GuestMemory
import KVMMMU
import X86Paging

// A vCPU under the TDP MMU (EPT or NPT): the guest's CR0/CR3/CR4/EFER run in hardware, so register
// writes, CR3 loads, INVLPG and INVPCID take no exit; the hardware walks the guest's tables at
// guest-physical addresses it translates through KVM's EPT or NPT tables (the two-dimensional
// walk), and only an EPT violation or misconfiguration, or a #NPF, exits to `TDPMMU.pageFault`.

/// The hardware's walker of KVM's TDP tables: EPT's, or NPT's (x86 64-bit tables walked as the
/// host's paging mode does, every access a user access). The walkers live in boxes, so that a
/// walk borrows them in place instead of copying them; the vCPU's state keeps the box
/// (`TDPVCPUState.hardwareWalker`) and this value borrows it without counting references, so that
/// handing it to every walk and every guest-table read retains and releases nothing.
/// (`unowned(unsafe)` references still retained each binding of them; `Unmanaged` lends them.)
struct NestedWalker {
    let eptBox: Unmanaged<EPTHardwareWalker>?
    let nptBox: Unmanaged<NPTHardwareWalker>?

    /// The walker in `box`, an `EPTHardwareWalker` or an `NPTHardwareWalker`; nil for anything else.
    init?(borrowing box: AnyObject?) {
        if let ept = box as? EPTHardwareWalker {
            eptBox = .passUnretained(ept)
            nptBox = nil
        } else if let npt = box as? NPTHardwareWalker {
            eptBox = nil
            nptBox = .passUnretained(npt)
        } else {
            return nil
        }
    }

    /// The EPT walker, if the tables are EPT's (off the hot path: the reference is counted).
    var ept: EPTHardwareWalker? { eptBox?.takeUnretainedValue() }

    /// A TDP walk; on a fault, nil with the fault kept.
    @inline(__always)
    func translate(_ gpa: GuestPhysicalAddress, _ kind: AccessKind, pml: Bool,
                   faults: TwoDimensionalMemory.Faults) -> NestedTranslation? {
        if let eptBox { return eptBox._withUnsafeGuaranteedRef { $0.translate(gpa, kind, pml: pml, faults: faults) } }
        return nptBox?._withUnsafeGuaranteedRef { $0.translate(gpa, kind, faults: faults) }
    }
}

final class EPTHardwareWalker {
    let walker: EPTWalker
    /// The host memory KVM's tables live in.
    let host: HostPhysicalView
    init(_ walker: EPTWalker, host: HostPhysicalView) {
        self.walker = walker
        self.host = host
    }

    /// The walk, setting A/D; on a fault, nil with the fault kept. With PML, a walk that sets a
    /// leaf's D logs the gfn.
    func translate(_ gpa: GuestPhysicalAddress, _ kind: AccessKind, pml: Bool,
                   faults: TwoDimensionalMemory.Faults) -> NestedTranslation? {
        // The fault lands in the vCPU's summary, without the walk's path.
        let leaf = walker.translateLeaf(gpa, EPTAccess(kind), in: host, sink: &faults.fault)
        if faults.hasFault { return nil }
        if pml && leaf.dirtiedLeaf { faults.logInPMLBuffer(gpa.frame) }
        return NestedTranslation(host: leaf.outputAddress.rawValue, readable: leaf.isReadable, writable: leaf.isWritable,
                                 executable: leaf.isExecutable,
                                 leafDirty: !walker.pointer.accessedDirtyEnabled || leaf.entry & (1 << 9) != 0)
    }
}

final class NPTHardwareWalker {
    let walker: PageWalker
    /// The host memory KVM's tables live in.
    let host: HostPhysicalView
    init(_ walker: PageWalker, host: HostPhysicalView) {
        self.walker = walker
        self.host = host
    }

    func translate(_ gpa: GuestPhysicalAddress, _ kind: AccessKind,
                   faults: TwoDimensionalMemory.Faults) -> NestedTranslation? {
        var fault = WalkFaultSummary()
        let translation = walker.translate(GuestVirtualAddress(gpa.rawValue), Access(kind, .user), in: host,
                                           setAccessedDirty: true, sink: &fault)
        guard fault.kind == .none else {
            faults.fault = TDPTableFault(npt: fault)
            return nil
        }
        return NestedTranslation(host: translation.physicalAddress.rawValue, readable: true,
                                 writable: translation.isWritable, executable: translation.isExecutable,
                                 leafDirty: translation.path.entryValue(level: translation.level) & 0x40 != 0)
    }
}

/// A guest-physical address translated through the TDP tables.
struct NestedTranslation {
    var host: UInt64
    var readable: Bool
    var writable: Bool
    var executable: Bool
    /// The leaf's D bit is set (or the tables have no D bit).
    var leafDirty: Bool
}

/// Why the TDP walk gave no translation, as much of it as the exit needs: the fault's kind, the
/// EPT violation's qualification or the #NPF's error code, and for an EPT violation the level that
/// refused and that level's entry (SPP looks at a refusing 4 KiB leaf). The walk's path stays
/// behind: copying faults that carried it cost several `memcpy`s a TDP fault.
struct TDPTableFault: WalkFaultSink {
    enum Kind: UInt8 {
        case none
        case eptViolation
        case eptMisconfiguration
        case nptPageFault
        /// The table walk reached no memory, or the address was too wide for it.
        case unreachable
    }
    var kind = Kind.none
    /// An EPT violation's exit qualification; an NPT fault's architectural #PF error code.
    var code: UInt64 = 0
    /// The level of the EPT entry that refused the access (EPT violations).
    var level = 0
    /// That entry's value.
    var entry: UInt64 = 0

    init() {}

    /// The summary of an NPT walk's fault.
    init(npt fault: WalkFaultSummary) {
        if fault.kind == .pageFault {
            kind = .nptPageFault
            code = UInt64(fault.errorCode.architectural)
        } else {
            kind = .unreachable
        }
    }

    @inline(__always)
    mutating func record(_ fault: EPTWalkFault) {
        switch fault {
        case .violation(_, let qualification, let level, let path):
            kind = .eptViolation
            code = qualification.rawValue
            self.level = level
            entry = path.entryValue(level: level)
        case .misconfiguration:
            kind = .eptMisconfiguration
        case .noMemory, .addressTooWide:
            kind = .unreachable
        }
    }
}

/// What a vCPU keeps under TDP.
final class TDPVCPUState {
    let tdp: TDPMMU
    /// The guest's own paging registers (in hardware: no KVM context involved). This state's
    /// `var`s are the vCPU thread's own, read on every walk: exempt from dynamic exclusivity checks.
    @exclusivity(unchecked) var registers: PagingRegisters
    /// The guest's walker, as the hardware runs it (PAE's PDPTE registers loaded with CR3), boxed
    /// so that a walk borrows it in place.
    @exclusivity(unchecked) var guestWalkerBox: WalkerBox {
        didSet { lentGuestWalker = .passUnretained(guestWalkerBox) }
    }
    var guestWalker: PageWalker { guestWalkerBox.walker }
    /// `guestWalkerBox`, lent to every walk: the box holds the reference, and reading the class
    /// property for each walk retained and released it.
    @exclusivity(unchecked) private(set) var lentGuestWalker: Unmanaged<WalkerBox>
    /// The root this vCPU runs on (the EPTP), with its reference; nil until the next entry loads one.
    @exclusivity(unchecked) var root: TDPRoot? {
        didSet {
            rootFrame = root?.frame.rawValue ?? VCPU.noRoot
            lentRoot = root.map { .passUnretained($0) }
        }
    }
    /// `root`, lent to the entry's validity check and to KVM's fault, which run while `root` holds
    /// the reference (only this vCPU's thread changes it): copying the optional retained it.
    @exclusivity(unchecked) private(set) var lentRoot: Unmanaged<TDPRoot>?
    /// The root was invalidated (`is_obsolete_root`); false without one.
    var rootIsInvalid: Bool { lentRoot?._withUnsafeGuaranteedRef { $0.isInvalid } ?? false }
    /// `root`'s frame (`VCPU.noRoot` without one), read by every walk without retaining the root.
    @exclusivity(unchecked) private(set) var rootFrame = VCPU.noRoot
    /// The hardware's walker of `root`'s tables (an `EPTHardwareWalker` or `NPTHardwareWalker`).
    @exclusivity(unchecked) var hardwareWalker: AnyObject? {
        didSet { ept = NestedWalker(borrowing: hardwareWalker) }
    }
    /// `hardwareWalker`, borrowed.
    @exclusivity(unchecked) private(set) var ept: NestedWalker?
    /// The EPT capabilities the EPTP is walked with (EPT only).
    let capabilities: EPTCapabilities
    let cpu: CPUModel
    /// With EPT A/D bits, the processor's accesses to guest paging structures are writes as far as
    /// EPT is concerned (SDM 29.3.3.2): they need W and set D.
    let tableAccess: AccessKind
    /// PML: the hardware logs the gfn of a write that sets an EPT leaf's D bit.
    let pml: Bool
    /// What the walks leave behind, and the PML buffer.
    let walkFaults = TwoDimensionalMemory.Faults()
    /// The VM's memslots srcu, held here: reaching it through the vCPU's unowned `vm` cost an
    /// unowned retain and a retain at every exit.
    let memslotsSRCU: MMULock

    init(tdp: TDPMMU, registers: PagingRegisters, cpu: CPUModel, memory: MemslotSet,
         memslotsSRCU: MMULock) throws(VirtualMachineError) {
        self.tdp = tdp
        self.memslotsSRCU = memslotsSRCU
        self.registers = registers
        self.cpu = cpu
        let masks = tdp.masks
        capabilities = EPTCapabilities(executeOnly: masks.present & 1 == 0, fiveLevel: true,
                                       accessedDirty: masks.accessedDirtyEnabled,
                                       maxPhysicalAddressBits: masks.hostPhysicalAddressBits)
        // NPT: KVM's own model of the nested walk treats guest table accesses as writes too
        // (`nested_access` in `FNAME(walk_addr_generic)`, the x86 tables having A/D bits).
        tableAccess = masks.accessedDirtyEnabled || !masks.isEPT ? .write : .read
        pml = tdp.configuration.dirtyLogging == .pml
        do {
            guestWalkerBox = WalkerBox(try PageWalker(registers: registers, cpu: cpu, memory: memory))
        } catch {
            throw .impossibleRegisters(error)
        }
        lentGuestWalker = .passUnretained(guestWalkerBox)
    }

    /// The TLB tag of the current root and PCID.
    var tag: UInt64 {
        tag(pcid: registers.cr4.contains(.pcidEnable) ? registers.cr3 & 0xFFF : 0)
    }

    /// The TLB tag of the current root and `pcid`.
    func tag(pcid: UInt64) -> UInt64 {
        guard let root else { return VCPU.noRoot }
        return root.frame.rawValue | pcid << 48
    }
}

/// The memory the guest walker reads its tables from: guest-physical frames translated through
/// EPT as the hardware does (with the EPT A/D updates it makes). A frame EPT refuses reads as no
/// memory, with the EPT fault kept for the exit.
struct TwoDimensionalMemory: PhysicalMemory {
    /// One vCPU's, reused by every walk.
    /// Its `var`s are exempt from dynamic exclusivity checks (as the vCPU's `hot` state is): only
    /// the vCPU's own thread touches them, and every walk touches them several times.
    final class Faults {
        @exclusivity(unchecked) var fault = TDPTableFault()
        /// Every read of a guest table tests this.
        var hasFault: Bool { fault.kind != .none }
        /// Guest frames whose EPT leaf refused writes (the guest's A/D updates there were skipped).
        @exclusivity(unchecked) var readOnlyFrames: [UInt64] = []
        /// The PML buffer: gfns whose EPT leaf the hardware set D in, logged in guest mode and
        /// drained into the dirty log at the next exit (`vmx_flush_pml_buffer`). Locked so that
        /// the auditor can count its entries as logged.
        let pmlBuffer = LockedValue<[GuestFrameNumber]>([])
        /// Entries in `pmlBuffer`, kept by the vCPU's own thread.
        @exclusivity(unchecked) var pmlLogged = 0

        /// The PML buffer's entries (PML_LOG_NR_ENTRIES); a full buffer exits.
        static let pmlEntries = 512

        init() {
            readOnlyFrames.reserveCapacity(8)
            pmlBuffer.withLock { $0.reserveCapacity(Self.pmlEntries) }
        }

        func logInPMLBuffer(_ gfn: GuestFrameNumber) {
            pmlBuffer.withLock { $0.append(gfn) }
            pmlLogged += 1
        }

        func startWalk() {
            fault.kind = .none
            if !readOnlyFrames.isEmpty { readOnlyFrames.removeAll(keepingCapacity: true) }
        }
    }
    // Unretained: a walk's memory lives only during the walk, whose caller holds them all (the
    // walker copies this value into every level's read, and each copy would retain them).
    let ept: NestedWalker
    unowned(unsafe) let pool: HostPagePool
    let kind: AccessKind
    let pml: Bool
    unowned(unsafe) let faults: Faults
    /// Where the hardware keeps the guest-physical mappings it used (lent: each use of an
    /// `unowned(unsafe)` reference retained it), and the root they are of.
    let lentTLB: Unmanaged<TLB>
    let root: UInt64

    @inline(__always)
    func withTLB<Result>(_ body: (TLB) -> Result) -> Result { lentTLB._withUnsafeGuaranteedRef(body) }

    // The guest-physical mapping's hit inline in every table read; the EPT walk of a miss apart.
    @inline(__always)
    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        guard !faults.hasFault else { return nil }
        if let cached = withTLB({ $0.lookupGuestPhysical(frame.rawValue, root: root) }) {
            if !cached.writable { faults.readOnlyFrames.append(frame.rawValue) }
            return HostPage(bytes: pool.pointer(HostFrameNumber(cached.hostFrame)), isWritable: cached.writable)
        }
        return translateTableFrame(frame)
    }

    /// A table frame without a guest-physical mapping: translated through EPT and, once that
    /// went through, kept.
    @inline(never)
    private func translateTableFrame(_ frame: GuestFrameNumber) -> HostPage? {
        guard let translation = ept.translate(frame.address, kind, pml: pml, faults: faults) else {
            return nil
        }
        // Kept only once the walk set the EPT entries' A (and, for a write, D): a later use of the
        // mapping has nothing left to set until KVM clears them, which it follows with a flush.
        withTLB { $0.insertGuestPhysical(frame.rawValue, root: root, hostFrame: translation.host >> 12, writable: translation.writable) }
        if !translation.writable { faults.readOnlyFrames.append(frame.rawValue) }
        return HostPage(bytes: pool.pointer(HostFrameNumber(translation.host >> 12)), isWritable: translation.writable)
    }
}

/// One hardware access's two-dimensional walk.
enum TDPWalkOutcome {
    /// `subPageWriteMask`: the sub-page permissions the SPP-table walk gave a write it let through
    /// (all ones when SPP did not check the access), cached with the translation.
    case translated(host: UInt64, gpa: GuestPhysicalAddress, permissions: UInt8, dirty: Bool, cacheable: Bool,
                    subPageWriteMask: UInt32)
    /// The SPP-table walk for a write through an armed leaf failed: an SPPT miss (KVM builds the
    /// table and the write is retried) or a table KVM should never have built.
    /// (Indirect: the fault carries the SPP walk's path, and the outcome, copied on every walk,
    /// would be as large.)
    indirect case subPageTableFault(GuestPhysicalAddress, SPPTWalkFault)
    case guestFault(PageFaultErrorCode)
    case generalProtection
    /// An EPT violation or misconfiguration: KVM's fault handler with this error code.
    case exit(GuestPhysicalAddress, PageFaultErrorCode)
    /// A writer holds mmu_lock (or waits for it): the walk did not start.
    case mmuLockBusy
}

/// What the TDP walk needs of the guest's walk: small enough to come back in registers (the
/// `Translation`, with its path, was copied out of the walk by `memcpy`).
struct GuestWalkOutcome {
    var physicalAddress: GuestPhysicalAddress
    var permissions: UInt8
    /// The guest leaf's D bit is set (with paging off there is no guest entry: true).
    var leafDirty: Bool
    /// A guest paging-structure entry whose A/D update was skipped because the TDP leaf of its
    /// table refused writes (possible only without EPT A/D): the hardware's write there is an EPT
    /// violation.
    var refusedEntry: GuestPhysicalAddress?
    /// A walk from CR3 that reached a PTE through entries all with A set: the page table's
    /// guest-physical address and the upper entries' combined permissions, for a PDE-cache entry
    /// once the access's translation completes (0: none to make).
    var pageTable: UInt64 = 0
    var upperPermissions: UInt8 = 0

    /// A faulting walk's outcome (the fault is the walk's sink's): nothing to use.
    static func failed(_ physicalAddress: GuestPhysicalAddress) -> GuestWalkOutcome {
        GuestWalkOutcome(physicalAddress: physicalAddress, permissions: 0, leafDirty: false, refusedEntry: nil)
    }
}

extension WalkerBox {
    /// The guest's walk under TDP, its tables read through the TDP tables, with the walker borrowed
    /// in place (see `WalkerBox`). In IA-32e paging it starts, where it can, from the TLB's
    /// PDE-cache entry for the address (`TLB.PageDirectoryCacheEntry`), reading only the PTE; a
    /// walk from CR3 that reached a PTE with A set in every entry above it says what entry to make
    /// (`GuestWalkOutcome.pageTable`), which the caller makes once the final translation went
    /// through (an EPT fault for the address would drop it at once).
    @inline(never)
    func walkTwoDimensional(_ address: GuestVirtualAddress, _ access: Access, in memory: TwoDimensionalMemory,
                            tag: UInt64, fault: inout WalkFaultSummary) -> GuestWalkOutcome {
        guard walker.mode.isLongMode else { return walkOutsideLongMode(address, access, in: memory, fault: &fault) }
        if let cached = memory.withTLB({ $0.lookupPageDirectory(address, root: tag, guestRoot: walker.registers.cr3) }) {
            return walkPageTable(address, access, in: memory, from: cached, fault: &fault)
        }
        return walkFromRoot(address, access, in: memory, fault: &fault)
    }

    // The walks are apart, each with its own copy of the level loop: in one function the two
    // translations' bookkeeping cost more than the cache saved. In IA-32e paging they are the lean
    // walks, which leave the entries read in a path of this frame rather than copying a
    // `Translation` out.

    /// The walk outside IA-32e paging (no PDE cache there).
    @inline(never)
    private func walkOutsideLongMode(_ address: GuestVirtualAddress, _ access: Access, in memory: TwoDimensionalMemory,
                                     fault: inout WalkFaultSummary) -> GuestWalkOutcome {
        let translation = walker.translate(address, access, in: memory, setAccessedDirty: true, sink: &fault)
        guard fault.kind == .none else { return .failed(translation.physicalAddress) }
        return outcome(physicalAddress: translation.physicalAddress, permissions: translation.permissions,
                       leafDirty: translation.level == 0 || translation.path.entryValue(level: translation.level) & 0x40 != 0,
                       path: translation.path, access, in: memory)
    }

    /// The walk from CR3 in IA-32e paging.
    @inline(never)
    private func walkFromRoot(_ address: GuestVirtualAddress, _ access: Access, in memory: TwoDimensionalMemory,
                              fault: inout WalkFaultSummary) -> GuestWalkOutcome {
        var path = WalkPath()
        let leaf = walker.translateLongMode(address, access, in: memory, path: &path, sink: &fault)
        guard fault.kind == .none else { return .failed(leaf.physicalAddress) }
        var outcome = outcome(physicalAddress: leaf.physicalAddress, permissions: leaf.permissions,
                              leafDirty: leaf.entry & 0x40 != 0, path: path, access, in: memory)
        if leaf.level == 1 && outcome.refusedEntry == nil {
            // Only entries whose A the processor has set are cached (SDM 4.10.3.1); an update the
            // TDP tables refused left A clear.
            var accessed = true
            var level = path.topLevel
            while level >= 2 {
                accessed = accessed && path.entryValue(level: level) & 0x20 != 0
                level -= 1
            }
            if accessed {
                outcome.pageTable = path.entryAddress(level: 1).rawValue & ~0xFFF
                outcome.upperPermissions = walker.combinedPermissions(of: path, downTo: 2)
            }
        }
        return outcome
    }

    /// The walk from the page table a PDE-cache entry names.
    @inline(never)
    private func walkPageTable(_ address: GuestVirtualAddress, _ access: Access, in memory: TwoDimensionalMemory,
                               from cached: TLB.PageDirectoryCacheEntry, fault: inout WalkFaultSummary) -> GuestWalkOutcome {
        var path = WalkPath()
        let leaf = walker.translateLongMode(address, access, in: memory, resumingAt: cached.pageTable, level: 1,
                                            permissions: cached.permissions, path: &path, sink: &fault)
        guard fault.kind == .none else { return .failed(leaf.physicalAddress) }
        return outcome(physicalAddress: leaf.physicalAddress, permissions: leaf.permissions,
                       leafDirty: leaf.entry & 0x40 != 0, path: path, access, in: memory)
    }

    @inline(__always)
    private func outcome(physicalAddress: GuestPhysicalAddress, permissions: UInt8, leafDirty: Bool, path: WalkPath,
                         _ access: Access, in memory: TwoDimensionalMemory) -> GuestWalkOutcome {
        var outcome = GuestWalkOutcome(physicalAddress: physicalAddress, permissions: permissions, leafDirty: leafDirty,
                                       refusedEntry: nil)
        guard !memory.faults.readOnlyFrames.isEmpty else { return outcome }
        // Without EPT A/D the guest's tables were read with reads; an A/D update the TDP leaf did
        // not allow was skipped.
        var level = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        while level >= path.bottomLevel {
            let entryAddress = path.entryAddress(level: level)
            let needs: UInt64 = level == path.bottomLevel && access.kind == .write ? 0x60 : 0x20
            if path.entryValue(level: level) & needs != needs
                && memory.faults.readOnlyFrames.contains(entryAddress.frame.rawValue) {
                outcome.refusedEntry = entryAddress
                break
            }
            level -= 1
        }
        return outcome
    }
}

extension VCPU {
    // MARK: Registers

    func tdpSetRegisters(_ new: PagingRegisters, _ state: TDPVCPUState) throws(VirtualMachineError) {
        let old = state.registers
        let walker: PageWalker
        do {
            if new.reloadsPDPTEs(from: old) || new.mode != .pae || old.mode != .pae {
                walker = try PageWalker(registers: new, cpu: state.cpu, memory: vm.memory)
            } else {
                let pdptes = (0..<4).map { state.guestWalker.pdpte($0).rawValue }
                walker = try PageWalker(registers: new, cpu: state.cpu, memory: vm.memory, pdpteValues: pdptes)
            }
        } catch {
            throw .impossibleRegisters(error)
        }
        state.registers = new
        state.guestWalkerBox = WalkerBox(walker)
        // The architecture flushes what CR0/CR4/EFER changes require; flushing everything on any
        // change of them is allowed (a TLB may drop entries at any time).
        if new.cr0 != old.cr0 || new.cr4 != old.cr4 || new.efer != old.efer { tlb.flush() }
        tdpRetag(state)
    }

    func tdpLoadCR3(_ value: UInt64, noFlush: Bool, _ state: TDPVCPUState) throws(VirtualMachineError) {
        var new = state.registers
        new.cr3 = value
        let walker: PageWalker
        do {
            walker = try state.guestWalker.loadingCR3(value, memory: vm.memory)
        } catch {
            throw .impossibleRegisters(error)
        }
        state.registers = new
        state.guestWalkerBox = WalkerBox(walker)
        // A MOV to CR3 invalidates the new PCID's non-global translations (without PCIDs, every
        // non-global one: PCID 0's) unless bit 63 keeps them. The TLB does not record G, so the
        // PCID's global translations go too (a TLB may drop any entry); other PCIDs' stay, and
        // so do the guest-physical mappings, which only INVEPT and KVM's flushes touch.
        tdpRetag(state)
        if !noFlush { tlb.flush(root: hot.pointee.rootFrame) }
    }

    func tdpInvalidatePCID(_ type: INVPCIDType, pcid: UInt64, address: GuestVirtualAddress,
                           _ state: TDPVCPUState) -> Bool {
        guard !state.registers.invpcidFaults(type, pcid: pcid, address: address) else { return false }
        switch type {
        case .individualAddress:
            tlb.invalidate(address)  // every PCID's entry for the address: more than asked, allowed
        case .singleContext:
            tlb.flush(root: state.tag(pcid: pcid))
        case .allContextsIncludingGlobal, .allContextsExceptGlobal:
            tlb.flush()
        }
        return true
    }

    /// The TLB tag, the address checks and the permission refusals of the guest's registers.
    func tdpRetag(_ state: TDPVCPUState) {
        let registers = state.registers
        hot.pointee.narrowLinearAddresses = !registers.mode.isLongMode
        hot.pointee.canonicalWidth = registers.mode.isLongMode ? registers.mode.linearAddressWidth : 64
        hot.pointee.rootFrame = state.tag
        // Protection keys are checked on every access, which the TLB fast path does not do: with
        // them on, every access walks.
        if registers.cr4.contains(.protectionKeys) || registers.cr4.contains(.supervisorProtectionKeys) {
            hot.pointee.refusals = ~0
            return
        }
        var refusals: UInt128 = 0
        let rules = state.guestWalker.rules
        for kind in AccessKind.allCases {
            for privilege in Privilege.allCases {
                let refused = rules.refusedPermissions(Access(kind, privilege),
                                                       alignmentCheck: registers.rflags.contains(.alignmentCheck))
                refusals |= UInt128(refused) << UInt128(8 * (3 * Int(kind.rawValue) + Int(privilege.rawValue)))
            }
        }
        hot.pointee.refusals = refusals
    }

    // MARK: Entry

    /// The requests a VM entry services under TDP: a remote TLB flush (KVM_REQ_TLB_FLUSH), and
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (an invalid root is put; the entry loads a new one).
    func tdpServiceRequests(_ state: TDPVCPUState) {
        if checkRequest(.freeObsoleteRoots) {
            if let root = state.root, root.isInvalid {
                try? state.tdp.putRoot(root)
                state.root = nil
                state.hardwareWalker = nil
                hot.pointee.rootFrame = Self.noRoot
            }
        }
        if checkRequest(.flushAll) || !hot.pointee.requests.isEmpty {
            count(.tlbFlush)
            tlb.flush()
        }
        hot.pointee.requests = []
    }

    /// `kvm_mmu_load` under TDP: a root (and the EPTP) for the next entry.
    func tdpLoadRoot(_ state: TDPVCPUState) throws(VirtualMachineError) -> NestedWalker {
        if state.rootIsInvalid, let root = state.root {
            try? state.tdp.putRoot(root)
            state.root = nil
            state.hardwareWalker = nil
        }
        if let ept = state.ept { return ept }
        let root: TDPRoot
        do {
            root = try state.tdp.allocateRoot()
        } catch {
            throw .hostMemory("\(error)")
        }
        let walker: AnyObject
        if state.tdp.masks.isEPT {
            do {
                walker = EPTHardwareWalker(try EPTWalker(pointer: EPTPointer(root: root.frame.address.rawValue, levels: root.level,
                                                                             accessedDirty: state.tdp.masks.accessedDirtyEnabled),
                                                         capabilities: state.capabilities),
                                           host: host)
            } catch {
                throw .corruptShadowTables("the hardware refuses KVM's EPTP: \(error)")
            }
        } else {
            // nCR3 walked in the host's paging mode (64-bit, NX on).
            var cr4: CR4 = [.physicalAddressExtension]
            if root.level == 5 { cr4.insert(.la57) }
            let registers = PagingRegisters(cr0: [.protectionEnable, .writeProtect, .paging], cr3: root.frame.address.rawValue,
                                            cr4: cr4, efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
            do {
                walker = NPTHardwareWalker(try PageWalker(registers: registers,
                                                          cpu: CPUModel(maxPhysicalAddressBits: state.tdp.masks.hostPhysicalAddressBits),
                                                          memory: host),
                                           host: host)
            } catch {
                throw .corruptShadowTables("the hardware refuses KVM's nCR3: \(error)")
            }
        }
        state.root = root
        state.hardwareWalker = walker
        // A new root's frame may have been another root's: flush what is tagged with it.
        tlb.flush()
        tdpRetag(state)
        guard let ept = state.ept else { preconditionFailure("a hardware walker was just loaded") }
        return ept
    }

    // MARK: Accesses

    func tdpRun(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                _ state: TDPVCPUState) throws(VirtualMachineError) -> AccessOutcome {
        var exits = 0
        var firstTry = true
        while exits <= Self.maxExitsPerAccess {
            let ept = try tdpEnterGuest(state)
            let tag = hot.pointee.rootFrame
            if let entry = tlb.lookup(address, root: tag) {
                if allows(entry, access, at: address, size: size) {
                    let offset = address.rawValue & pageOffsetMask
                    let result = perform(hostAddress: entry.hostFrame << 12 | offset, access.kind, size: size, value: value)
                    return AccessOutcome(result: .completed(gpa: GuestPhysicalAddress(entry.guestFrame << 12 | offset), value: result),
                                         exits: exits, emulated: false, tlbHit: firstTry)
                }
                // The walk replaces the entry that refused the access; a miss has no entry to drop.
                tlb.invalidate(address, root: tag)
            }
            firstTry = false
            let outcome = tdpWalk(address, access, size: size, ept: ept, state)
            if state.walkFaults.pmlLogged >= TwoDimensionalMemory.Faults.pmlEntries {
                // EXIT_REASON_PML_FULL.
                leaveGuestMode()
                count(.exit)
                tdpDrainPML(state)
            }
            switch outcome {
            case .translated(let hostAddress, let gpa, let permissions, let dirty, let cacheable, let subPageWriteMask):
                if cacheable {
                    tlb.insert(address, root: tag, hostFrame: hostAddress >> 12, permissions: permissions, dirty: dirty,
                               guestFrame: gpa.rawValue >> 12, subPageWriteMask: subPageWriteMask)
                }
                let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
                return AccessOutcome(result: .completed(gpa: gpa, value: result), exits: exits, emulated: false, tlbHit: false)
            case .guestFault(let errorCode):
                // Delivered by the hardware straight to the guest: no exit. The fault drops what
                // the paging-structure caches held for the address.
                tlb.invalidatePageDirectory(address, root: tag)
                return AccessOutcome(result: .pageFault(errorCode: errorCode, cr2: address), exits: exits, emulated: false,
                                     tlbHit: false)
            case .generalProtection:
                return AccessOutcome(result: .generalProtection, exits: exits, emulated: false, tlbHit: false)
            case .subPageTableFault(let gpa, let fault):
                leaveGuestMode()
                exits += 1
                count(.exit)
                // `handle_spp` reads the memslots for the bitmaps (KVM's srcu read side).
                let srcu = state.memslotsSRCU
                srcu.lockShared()
                defer { srcu.unlockShared() }
                try handleSubPageTableFault(fault, at: gpa, state)
            case .mmuLockBusy:
                // The hardware cannot wait for a lock: the vCPU exits (as a kick would make it),
                // and waits for the writer outside guest mode.
                waitOutsideGuestMode(for: state.tdp.lock)
            case .exit(let gpa, let errorCode):
                // An EPT violation or misconfiguration (a #NPF alike) also invalidates the combined
                // mappings for the linear address whose translation faulted: its PDE-cache entry.
                tlb.invalidatePageDirectory(address, root: tag)
                leaveGuestMode()
                exits += 1
                count(.exit)
                tdpDrainPML(state)
                guard let root = state.lentRoot else { continue }
                // The exit's handling reads the memslots (KVM's srcu read side).
                let srcu = state.memslotsSRCU
                srcu.lockShared()
                defer { srcu.unlockShared() }
                let decision: PageFaultResult
                do {
                    decision = try root._withUnsafeGuaranteedRef { root in
                        try state.tdp.pageFault(at: gpa, errorCode: errorCode, root: root, vcpuID: id)
                    }
                } catch {
                    throw .hostMemory("\(error)")
                }
                if let outcome = try ending(after: decision, address, access, size: size, value: value, exits: exits,
                                            guestWalker: state.guestWalkerBox,
                                            subPageWriteExit: { self.subPageWriteExit(at: gpa, state) }) {
                    return outcome
                }
            }
        }
        throw .livelock(address, exits: exits)
    }

    /// VM entry under TDP (`vcpu_enter_guest`): requests serviced and a root loaded outside guest
    /// mode, then guest mode, retried while requests arrive; a vCPU already in guest mode with
    /// nothing pending runs on.
    private func tdpEnterGuest(_ state: TDPVCPUState) throws(VirtualMachineError) -> NestedWalker {
        while true {
            if staysInGuestMode, let ept = state.ept { return ept }
            leaveGuestMode()
            serviceRequests()
            if hot.pointee.usesDirtyRing, dirtyRingIsSoftFull { try exitForFullDirtyRing() }
            let ept = try tdpLoadRoot(state)
            if tryEnterGuestMode() { return ept }
        }
    }

    /// Drains the PML buffer into the dirty log (`vmx_flush_pml_buffer`, at every exit), outside
    /// guest mode and under the memslots' srcu.
    /// The test inline: every exit asks, and without PML (or with nothing logged) that is all.
    @inline(__always)
    func tdpDrainPML(_ state: TDPVCPUState) {
        if state.walkFaults.pmlLogged > 0 { drainPMLBuffer(state) }
    }

    @inline(never)
    private func drainPMLBuffer(_ state: TDPVCPUState) {
        let faults = state.walkFaults
        let srcu = state.memslotsSRCU
        srcu.lockShared()
        // Marked before they leave the buffer (see `TDPMMU.pmlBufferedGFNs`).
        faults.pmlBuffer.withLock { buffer in
            for gfn in buffer { _ = vm.memory.markDirty(gfn) }
            buffer.removeAll(keepingCapacity: true)
        }
        srcu.unlockShared()
        faults.pmlLogged = 0
    }

    /// The hardware's two-dimensional walk, under the MMU lock held for read (as KVM's vCPUs in
    /// guest mode keep page tables from being freed): the guest's tables read at guest-physical
    /// addresses translated through EPT, the guest's A/D bits set (EPT writes), then the final
    /// guest-physical address translated for the access.
    private func tdpWalk(_ address: GuestVirtualAddress, _ access: Access, size: Int, ept: NestedWalker,
                         _ state: TDPVCPUState) -> TDPWalkOutcome {
        let lock = state.tdp.lock
        if runsOnOwnThread {
            guard lock.tryLockShared() else { return .mmuLockBusy }
        } else {
            lock.lockShared()
        }
        let faults = state.walkFaults
        faults.startWalk()
        let outcome = tdpWalkLocked(address, access, size: size, ept: ept, state, faults)
        lock.unlockShared()
        return outcome
    }

    private func tdpWalkLocked(_ address: GuestVirtualAddress, _ access: Access, size: Int, ept: NestedWalker,
                               _ state: TDPVCPUState, _ faults: TwoDimensionalMemory.Faults) -> TDPWalkOutcome {
        let memory = TwoDimensionalMemory(ept: ept, pool: pool, kind: state.tableAccess, pml: state.pml, faults: faults,
                                          lentTLB: .passUnretained(tlb), root: state.rootFrame)
        var walkFault = WalkFaultSummary()
        let tag = hot.pointee.rootFrame
        let translation = state.lentGuestWalker._withUnsafeGuaranteedRef {
            $0.walkTwoDimensional(address, access, in: memory, tag: tag, fault: &walkFault)
        }
        switch walkFault.kind {
        case .none:
            break
        case .pageFault:
            return .guestFault(PageFaultErrorCode(rawValue: UInt64(walkFault.errorCode.architectural)))
        case .generalProtection, .addressTooWide:
            return .generalProtection
        case .noMemory:
            return tdpExit(faults.fault, gpa: walkFault.unbackedEntry, final: false)
        }
        if let entryAddress = translation.refusedEntry {
            // The skipped A/D update is an EPT violation of a write to that table.
            faults.fault = TDPTableFault()
            _ = ept.translate(entryAddress, .write, pml: false, faults: faults)
            return tdpExit(faults.fault, gpa: entryAddress, final: false)
        }
        let gpa = translation.physicalAddress
        let guestDirty = translation.leafDirty
        guard let final = ept.translate(gpa, access.kind, pml: state.pml, faults: faults) else {
            let fault = faults.fault
            if access.kind == .write, let protection = state.tdp.subPageProtection, let hardware = ept.ept,
               fault.kind == .eptViolation, fault.level == 1,  // SPP applies to 4 KiB leaves only
               let checked = subPageCheckedWrite(at: gpa, size: size, leaf: SPTE(fault.entry), level: fault.level,
                                                 guestPermissions: translation.permissions, guestDirty: guestDirty,
                                                 walker: hardware.walker, protection: protection) {
                return checked
            }
            return tdpExit(fault, gpa: gpa, final: true)
        }
        if translation.pageTable != 0 {
            tlb.insertPageDirectory(address, root: hot.pointee.rootFrame, guestRoot: state.registers.cr3,
                                    pageTable: translation.pageTable, permissions: translation.upperPermissions)
        }
        return .translated(host: final.host, gpa: gpa, permissions: translation.permissions,
                           dirty: guestDirty && final.leafDirty && final.writable,
                           cacheable: final.readable && final.executable, subPageWriteMask: UInt32.max)
    }

    /// The processor's SPP check of a write EPT refused at a leaf: a 4 KiB leaf with bit 61 set
    /// and W clear sends the write through the SPP table. The write goes through when every
    /// sub-page it touches is writable (EPT's A bits set as for the read it also is; D is left
    /// alone, see docs/SPP.md); nil when EPT's violation stands — SPP does not apply, or it
    /// refused the write (an SPP-induced EPT violation, which KVM turns into KVM_EXIT_SPP).
    private func subPageCheckedWrite(at gpa: GuestPhysicalAddress, size: Int, leaf: SPTE, level: Int,
                                     guestPermissions: UInt8, guestDirty: Bool, walker: EPTWalker,
                                     protection: SubPageProtection) -> TDPWalkOutcome? {
        let verdict: SubPageWriteVerdict
        do {
            verdict = try protection.hardwareCheckWrite(at: gpa, byteCount: UInt64(size), leaf: leaf, level: level)
        } catch {
            return nil  // an access never crosses its page (`run` refuses those first)
        }
        switch verdict {
        case .notApplicable, .denied:
            return nil
        case .tableFault(let fault):
            return .subPageTableFault(gpa, fault)
        case .permitted:
            guard case .success(let read) = walker.translate(gpa, .read, in: host, setAccessedDirty: true),
                  let lookup = try? protection.hardwareLookUp(gpa)
            else { return nil }
            return .translated(host: read.outputAddress.rawValue, gpa: gpa, permissions: guestPermissions, dirty: guestDirty,
                               cacheable: read.isReadable && read.isExecutable, subPageWriteMask: lookup.writeMask.rawValue)
        }
    }

    /// An SPP-table exit: a miss makes KVM build the table (`handle_spp`) and the write is retried;
    /// anything else is a table KVM built wrong, which it cannot repair (KVM_EXIT_UNKNOWN).
    private func handleSubPageTableFault(_ fault: SPPTWalkFault, at gpa: GuestPhysicalAddress,
                                         _ state: TDPVCPUState) throws(VirtualMachineError) {
        if case .miss = fault {
            do {
                try state.tdp.handleSubPageTableMiss(at: gpa, vcpuID: id)
            } catch .subPageProtection(.hostMemory(let shortage)) {
                throw .hostMemory("no host page for the SPP table: \(shortage)")
            } catch {
                // A miss KVM cannot build (beyond the table's reach) means it armed a leaf it must not.
                throw .corruptShadowTables("the SPP-table miss at \(gpa) cannot be handled: \(error)")
            }
            return
        }
        if let protection = state.tdp.subPageProtection { _ = protection.handleTableMisconfiguration(at: gpa, vcpuID: id) }
        throw .corruptShadowTables("the SPP table walk for \(gpa) failed (\(fault)): KVM_EXIT_UNKNOWN, hardware exit reason "
            + "\(SPPExitQualification.exitReason)")
    }

    /// KVM_EXIT_SPP for a write KVM's fault path refused for sub-page permissions: traced, and the
    /// refused address for the VMM. The model's accesses have no instruction bytes, so the exit's
    /// `insn_len` is 0.
    private func subPageWriteExit(at gpa: GuestPhysicalAddress, _ state: TDPVCPUState) -> GuestPhysicalAddress {
        guard let protection = state.tdp.subPageProtection else { return gpa }
        return protection.subPageWriteExit(vcpuID: id, address: gpa, instructionLength: 0).address
    }

    /// The exit an EPT fault makes: a violation's error code from its qualification (the guest
    /// linear address valid; a guest table or the final translation), RSVD for a misconfiguration.
    /// An NPT fault's #NPF error code is the nested walk's #PF error code with GUEST_FINAL or
    /// GUEST_PAGE (bits 32, 33).
    private func tdpExit(_ fault: TDPTableFault, gpa: GuestPhysicalAddress, final: Bool) -> TDPWalkOutcome {
        switch fault.kind {
        case .eptViolation:
            var qualification = EPTViolationQualification(rawValue: fault.code)
            qualification.insert(.linearAddressValid)
            if final { qualification.insert(.finalTranslation) }
            return .exit(gpa, TDPMMU.errorCode(forEPTViolation: qualification))
        case .eptMisconfiguration:
            return .exit(gpa, [.reservedBit])
        case .nptPageFault:
            var code = PageFaultErrorCode(rawValue: fault.code)
            code.insert(final ? .guestFinal : .guestPage)
            return .exit(gpa, code)
        case .unreachable, .none:
            // No EPT fault recorded: the guest's table is beyond what the EPT walk can reach.
            return .exit(gpa, [.reservedBit])
        }
    }
}
