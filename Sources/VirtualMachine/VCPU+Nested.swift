import GuestMemory
import KVMMMU
import X86Paging

// An L1 vCPU under the TDP MMU entering L2 with its own EPT (or NPT). In L2 the hardware walks
// L2's paging over KVM's shadow of L1's tables (`guest_mmu`'s root): the two-dimensional walk's
// second dimension translates L2 guest-physical addresses straight to host frames. An EPT
// violation or misconfiguration (a #NPF under NPT) exits to KVM, which runs `guest_mmu`'s fault
// handler: it fixes the shadow and the access runs again, emulates it (through `nested_mmu`), or
// reflects the fault to L1, which ends the L2 access with a VM exit to L1.
//
// Its translations go in a TLB of their own (`L2TLB`), tagged as the hardware tags them while KVM runs L2: VPID (vpid02, or L1's
// vpid01 when L1 did not enable VPID), `guest_mmu`'s root and PCID; KVM's flushes at VM entry and
// exit, INVVPID and INVEPT follow `nested_vmx_transition_tlb_flush`, `handle_invvpid` and
// `handle_invept` (docs/NESTED.md).
//
// A vCPU on a thread of its own (`runVCPUsOnThreads`) may run L2: `enterL2`, `accessL2` and
// `invalidateEPT` leave guest mode before `mmu_lock`, and an access re-enters it under the lock.
// (L2's other instructions here are made from the scenario thread only.)

/// How L1 translates L2's guest-physical addresses: vmcs12's EPT pointer with the EPT
/// capabilities KVM advertises to L1, or the VMCB's nCR3 (walked in L1's paging mode at VMRUN).
public enum L1NestedPaging: Sendable {
    case ept(EPTPointer, capabilities: EPTCapabilities)
    case npt(nestedCR3: UInt64)
}

/// What one L2 access came to.
public enum L2AccessResult: Equatable, Sendable {
    /// Completed at L2's guest-physical address `gpa`, at host-physical `hostAddress`; for reads,
    /// the value read.
    case completed(gpa: GuestPhysicalAddress, hostAddress: UInt64, value: UInt64)
    /// L2's own #PF (delivered to L2 by the hardware: no exit).
    case pageFault(errorCode: PageFaultErrorCode, cr2: GuestVirtualAddress)
    /// L2's own #GP.
    case generalProtection
    /// The L1 guest-physical address behind it is in no memslot (or read-only for a write): KVM's
    /// emulator hands it to the VMM as MMIO.
    case mmio(l1GPA: GuestPhysicalAddress, value: UInt64)
    /// L1's tables refused it: the VM exit KVM reflected to L1.
    case exitToL1(NestedVMExit)
}

extension L2AccessResult {
    /// The access ended in a VM exit to L1.
    public var isExit: Bool {
        if case .exitToL1 = self { return true }
        return false
    }
}

/// One L2 access with how KVM handled it.
public struct L2AccessOutcome: Equatable, Sendable {
    public var result: L2AccessResult
    /// Exits to KVM (L0) on the way.
    public var exits: Int
    /// KVM's emulator finished the access.
    public var emulated: Bool
    /// For an exit to L1: the level of L2's paging-structure entry being accessed, 0 for the
    /// final translation.
    public var exitGuestLevel: Int?
    /// The access used an L2 TLB entry without a walk.
    public var tlbHit = false
}

/// INVVPID's types (SDM vol. 3, 31.3, INVVPID).
public enum INVVPIDType: Int, Hashable, Sendable, CaseIterable {
    /// Type 0: one linear address of one VPID, every PCID, global translations too.
    case individualAddress = 0
    /// Type 1: everything of one VPID.
    case singleContext = 1
    /// Type 2: everything of every VPID but 0.
    case allContexts = 2
    /// Type 3: everything of one VPID but the global translations.
    case singleContextRetainingGlobals = 3
}

/// L1's nested state on one vCPU (the parts of vmcs12/VMCB and `vcpu->arch` the model needs).
/// Only the thread running the vCPU touches it (its L2 accesses, or the scenario's instructions
/// while the vCPU is not on a thread of its own), so what an access reads is exempt from dynamic
/// exclusivity checks, each a runtime call on every try.
final class NestedVCPUState {
    @exclusivity(unchecked) var paging: L1NestedPaging
    /// L2's CR0/CR3/CR4/EFER (in hardware while L2 runs).
    @exclusivity(unchecked) var registers: PagingRegisters
    /// `vcpu->arch.guest_mmu`: kept across VM exits with its root and `prev_roots`.
    let guestMMU: MMUContext
    /// L1's CR4 and EFER the NPT context was built with (NPT only).
    var nptL1Control: (CR4, EFER)?
    /// L2's walker as the hardware runs it (PAE's PDPTEs loaded through L1's tables at entry).
    @exclusivity(unchecked) var guestWalker: PageWalker
    /// L1's tables as the architecture reads them from L1's memory.
    var l1Tables: NestedPagingTables
    @exclusivity(unchecked) var inL2 = false
    /// vmcs12's VPID for L2 when L1 enabled VPID ("enable VPID"), nil when it did not (L2 then
    /// shares L1's VPID 0).
    @exclusivity(unchecked) var vpid12: UInt16?
    /// KVM's `nested.last_vpid`: the vpid12 vpid02 last served (0 at first, so that the first
    /// entry with VPID flushes).
    var lastVPID: UInt16 = 0
    /// The hardware TLB's entries for L2.
    let tlb = L2TLB()
    /// What the architecture lets L2 still use from its TLB (the lockstep reference's side).
    let cachedReference = L2CachedTranslations()
    /// The hardware's walker for L2 and the `guest_mmu` root it walks, kept while both stay (an
    /// entry, which may change L2's registers, drops it).
    @exclusivity(unchecked) var hardware: L2HardwareWalker? {
        didSet { lentHardware = hardware.map { .passUnretained($0) } }
    }
    /// `hardware` for a try to borrow: reading the optional reference cost a retain and a release.
    @exclusivity(unchecked) private(set) var lentHardware: Unmanaged<L2HardwareWalker>?
    /// For the lockstep check: L1's last-level EPT tables as they were at each VM entry since
    /// the INVEPT that covers them (NestedReference.swift).
    var eptSnapshots: [EPTTableSnapshot] = []
    /// The VM's memslots srcu and `mmu_lock`, which every L2 access takes: reached through the
    /// vCPU's `unowned vm`, each cost an unowned retain and a release.
    let memslotsSRCU: MMULock
    let mmuLock: MMULock
    /// The vCPU's TDP state (it lives as long as the vCPU, which owns this state), read where a
    /// hardware walker is built without the retain and release of reading the vCPU's optional.
    unowned(unsafe) let tdpState: TDPVCPUState

    init(paging: L1NestedPaging, registers: PagingRegisters, guestMMU: MMUContext, guestWalker: PageWalker,
         l1Tables: NestedPagingTables, vm: VirtualMachine, tdpState: TDPVCPUState) {
        self.paging = paging
        self.registers = registers
        self.guestMMU = guestMMU
        self.guestWalker = guestWalker
        self.l1Tables = l1Tables
        memslotsSRCU = vm.memslotsSRCU
        mmuLock = vm.mmuLock
        self.tdpState = tdpState
    }
}

/// The hardware's walker for L2 over one `guest_mmu` root, boxed so that a walk borrows it in place:
/// returned or kept as a value, the walker (L2's `PageWalker` and the shadow tables' walker) was
/// copied on every access, with the reference counting of its parts.
final class L2HardwareWalker {
    let root: HostFrameNumber
    let walker: NestedPagingWalker

    init(root: HostFrameNumber, walker: NestedPagingWalker) {
        self.root = root
        self.walker = walker
    }

    /// What an L2 access's hardware walk gave, as much as `runL2` needs: small, where the walk's
    /// `Result` carries L2's translation and faults with their walk paths, which every pattern
    /// match copied.
    enum Outcome {
        /// With what the L2 TLB keeps of it: L2's combined ACC bits, whether L2's leaf is global,
        /// and the combined ACC bits of the shadow tables' walk.
        case translated(gpa: GuestPhysicalAddress, hostAddress: UInt64, guestPermissions: UInt8, isGlobal: Bool,
                        nestedPermissions: UInt8)
        case guestPageFault(PageFaultErrorCode)
        case generalProtection
        case noMemory
        /// A fault of `guest_mmu`'s tables: KVM's handler with the error code it derives.
        case exit(NestedFaultSite, PageFaultErrorCode)
    }

    @inline(never)
    func translate(_ address: GuestVirtualAddress, _ access: Access, in host: HostPhysicalView) -> Outcome {
        var exit = ExitSink()
        let walk = walker.translate(address, access, in: host, sink: &exit)
        if let outcome = exit.outcome { return outcome }
        return .translated(gpa: walk.guestPhysicalAddress, hostAddress: walk.outputAddress.rawValue,
                           guestPermissions: walk.guestPermissions, isGlobal: walk.isGlobal,
                           nestedPermissions: walk.nestedPermissions)
    }

    /// The walk's fault as the outcome `runL2` acts on.
    struct ExitSink: WalkFaultSink {
        var outcome: Outcome?

        @inline(__always)
        mutating func record(_ fault: NestedPagingFault) { outcome = Self.outcome(of: fault) }

        static func outcome(of fault: NestedPagingFault) -> Outcome {
            switch fault {
            case .guest(.pageFault(let pageFault)):
                return .guestPageFault(PageFaultErrorCode(rawValue: UInt64(pageFault.errorCode.architectural)))
            case .guest(.generalProtection), .guest(.addressTooWide):
                return .generalProtection
            case .guest(.noMemory), .noMemory:
                return .noMemory
            case .eptViolation(let site, var qualification):
                qualification.insert(.linearAddressValid)
                return .exit(site, TDPMMU.errorCode(forEPTViolation: qualification))
            case .nestedPageFault(let site, let code):
                return .exit(site, code)
            case .eptMisconfiguration(let site):
                // A misconfiguration of KVM's own shadow EPT: an MMIO SPTE.
                return .exit(site, [.reservedBit])
            }
        }
    }
}

extension VCPU {
    /// Whether the vCPU runs L2 now.
    public var isInL2: Bool { nested?.inL2 ?? false }

    /// L2's registers, while or since it last ran.
    public var l2Registers: PagingRegisters? { nested?.registers }

    /// L1's EPT tables changed while this vCPU runs L2 (another vCPU's L1 wrote them, or its VM
    /// entry loaded and synced `guest_mmu` pages this vCPU's root shares): the processor may cache
    /// guest-physical mappings from them as they are now and use them until its own INVEPT, so the
    /// lockstep check keeps them beside the tables of this vCPU's VM entries.
    public func noteL1EPTChangedWhileInL2() {
        guard let nested, nested.inL2, case .ept(let pointer, _) = nested.paging else { return }
        nested.recordEPTSnapshot(pointer, memory: vm.memory)
    }

    /// VMLAUNCH/VMRESUME (or VMRUN) of L1's: the checks a nested VM entry makes (a refused entry
    /// leaves L1 running and changes nothing), `guest_mmu` moved to L1's EPTP or nCR3 (its root
    /// cached or built at the first access), L2's registers in hardware. Counts `nested_run`.
    /// `vpid` is vmcs12's VPID with "enable VPID" set (nil: not set; 0 fails the entry, as the SDM's
    /// checks have it); EPT only.
    public func enterL2(_ paging: L1NestedPaging, registers l2: PagingRegisters, vpid: UInt16? = nil) throws(VirtualMachineError) {
        guard let tdpState else {
            // nested_vmx_setup_ctls_msrs offers L1 the "enable EPT" control only with enable_ept, and
            // SVM offers nested paging only with npt_enabled: under shadow paging L1's entry with an
            // EPTP or nCR3 fails its control checks.
            throw .unsupported("an L2 guest with EPT or NPT needs L1 under the TDP MMU: KVM offers L1 nested EPT/NPT only when it uses EPT/NPT itself")
        }
        if isInL2 { throw .invalidAccess("VM entry from L2: vCPU \(id) already runs L2 (vmexit first)") }
        let l1 = tdpState.registers
        if let vpid {
            guard case .ept = paging else { throw .unsupported("VPID is VMX's: L1 under NPT runs L2 by ASID") }
            if vpid == 0 { throw .invalidAccess("VM entry fails its checks: \"enable VPID\" with VPID 0") }
        }
        let tables: NestedPagingTables
        switch paging {
        case .ept(let pointer, let capabilities):
            guard tdpState.tdp.masks.isEPT else { throw .unsupported("L1 on an NPT host has no EPT to give L2") }
            // KVM offers L1 only what the host's EPT has (`nested_vmx_setup_ept_caps`).
            let host = tdpState.capabilities
            if capabilities.executeOnly && !host.executeOnly || capabilities.accessedDirty && !host.accessedDirty
                || capabilities.fiveLevel && !host.fiveLevel {
                throw .unsupported("L1's EPT capabilities exceed the host's (execute-only \(host.executeOnly), "
                                   + "A/D \(host.accessedDirty), 5-level \(host.fiveLevel))")
            }
            do {
                tables = .ept(try EPTWalker(pointer: pointer, capabilities: capabilities))
            } catch {
                throw .invalidAccess("VM entry fails its checks: \(error)")
            }
        case .npt(let nestedCR3):
            guard !tdpState.tdp.masks.isEPT else { throw .unsupported("L1 on an EPT host has no NPT to give L2") }
            let npt = PagingRegisters(cr0: [.paging, .protectionEnable], cr3: nestedCR3,
                                      cr4: l1.cr4.subtracting(.protectionKeys), efer: l1.efer)
            do {
                tables = .npt(try PageWalker(registers: npt, cpu: vm.cpu, memory: vm.memory))
            } catch {
                throw .invalidAccess("VMRUN fails its checks: L1's paging cannot walk nCR3 \(GuestPhysicalAddress(nestedCR3)): \(error)")
            }
        }
        let walker: PageWalker
        if case .ept = paging, let nested, nested.registers == l2, nested.guestWalker.registers == l2 {
            // Under EPT the exit stored L2's PDPTE registers in vmcs12 and this entry loads them
            // from there, not from L2's PDPT (a resume with L2's registers as they were).
            walker = nested.guestWalker
        } else {
            do {
                walker = try NestedPagingWalker.guestWalker(registers: l2, cpu: vm.cpu, tables: tables, memory: vm.memory)
            } catch {
                throw .invalidAccess("VM entry fails loading L2's registers: \(error)")
            }
        }
        // Out of guest mode before `mmu_lock` (see `accessL2`).
        leaveGuestMode()
        let state = try vm.withShadowMMULock { () throws(VirtualMachineError) -> NestedVCPUState in
            let state = try moveGuestMMU(to: paging, l1: l1, tables: tables, l2Walker: walker, tdpState)
            // KVM_REQ_MMU_SYNC on VMRUN (`nested_svm_transition_tlb_flush`: SVM's ASID handling
            // may invalidate nested NPT mappings at VMRUN). Nested EPT is never synced at VM entry:
            // L1 cannot rely on it to flush guest-physical mappings, only on INVEPT, after which
            // the root is loaded anew and synced (`kvm_mmu_load`).
            if case .npt = paging { state.guestMMU.syncRoots() }
            return state
        }
        state.paging = paging
        state.registers = l2
        state.guestWalker = walker
        state.l1Tables = tables
        state.hardware = nil
        if case .ept(let pointer, _) = paging { state.recordEPTSnapshot(pointer, memory: vm.memory) }
        state.inL2 = true
        state.vpid12 = vpid
        count(.nestedRun)
        stat.guestMode = 1
        transitionTLBFlush(state, isEntry: true)
    }

    /// `nested_vmx_transition_tlb_flush` (`nested_svm_transition_tlb_flush` under NPT) at a VM
    /// entry or exit. Without VPID in vmcs12, L2 runs on L1's vpid01 and VPID 0 is flushed both
    /// ways (KVM_REQ_TLB_FLUSH_GUEST: L1's entries and L2's that share the VPID); with VPID, an
    /// entry whose vpid12 differs from the last one flushes vpid02 (which serves every vpid12);
    /// otherwise L2's entries stay. Under NPT, L1 and L2 share the ASID and every VMRUN and #VMEXIT
    /// flushes it (KVM_REQ_TLB_FLUSH_CURRENT). Each flush counts in `tlb_flush`. The architecture
    /// flushes VPID 0 at every transition without VPID, which the reference follows.
    private func transitionTLBFlush(_ state: NestedVCPUState, isEntry: Bool) {
        if case .npt = state.paging {
            count(.tlbFlush)
            tlb.flush()
            state.tlb.flushAll()
            state.cachedReference.drop(vpid: 0)
            return
        }
        guard let vpid = state.vpid12 else {
            count(.tlbFlush)
            tlb.flush()
            state.tlb.flush(vpid: .vpid01)
            state.cachedReference.drop(vpid: 0)
            return
        }
        if isEntry && vpid != state.lastVPID {
            state.lastVPID = vpid
            count(.tlbFlush)
            state.tlb.flush(vpid: .vpid02)
        }
    }

    /// Whether L2 shares L1's VPID 0 (no VPID in vmcs12, or NPT's shared ASID): then every VM entry
    /// and exit flushes L1's translations too, as the architecture says for VPID 0.
    public var l2SharesL1TLBTag: Bool {
        guard let nested else { return true }
        if case .npt = nested.paging { return true }
        return nested.vpid12 == nil
    }

    /// `nested_ept_init_mmu_context` / `nested_svm_init_mmu_context` and `kvm_mmu_new_pgd`:
    /// `guest_mmu` re-initialised only when its role changes, its root switched by the EPTP (or
    /// nCR3) with the `prev_roots` cache.
    private func moveGuestMMU(to paging: L1NestedPaging, l1: PagingRegisters, tables: NestedPagingTables, l2Walker: PageWalker,
                              _ tdpState: TDPVCPUState) throws(VirtualMachineError) -> NestedVCPUState {
        switch paging {
        case .ept(let pointer, let capabilities):
            let context: NestedEPTContext
            do {
                context = try NestedEPTContext(pointer: pointer, capabilities: capabilities)
            } catch {
                throw .invalidAccess("VM entry fails its checks: \(error)")
            }
            if let nested {
                nested.guestMMU.loadEPTP(context)
                return nested
            }
            let guestMMU = MMUContext(mmu: vm.mmu, nestedEPT: context, cpu: vm.cpu)
            guestMMU.vcpuID = id
            let state = NestedVCPUState(paging: paging, registers: PagingRegisters(), guestMMU: guestMMU,
                                        guestWalker: l2Walker, l1Tables: tables, vm: vm, tdpState: tdpState)
            nested = state
            return state
        case .npt(let nestedCR3):
            let control = (l1.cr4.subtracting(.protectionKeys), l1.efer)
            if let nested, let old = nested.nptL1Control, old == control {
                do {
                    _ = try nested.guestMMU.loadCR3(nestedCR3)
                } catch {
                    throw .invalidAccess("VMRUN fails its checks: \(error)")
                }
                return nested
            }
            let guestMMU: MMUContext
            do {
                guestMMU = try MMUContext(mmu: vm.mmu, nestedCR3: nestedCR3, l1CR4: l1.cr4, l1EFER: l1.efer,
                                          hostLevels: tdpState.tdp.configuration.rootLevel, cpu: vm.cpu)
            } catch {
                throw .invalidAccess("VMRUN fails its checks: \(error)")
            }
            guestMMU.vcpuID = id
            // A new role: KVM's context reset frees the old roots.
            nested?.guestMMU.unload()
            let state = NestedVCPUState(paging: paging, registers: PagingRegisters(), guestMMU: guestMMU,
                                        guestWalker: l2Walker, l1Tables: tables, vm: vm, tdpState: tdpState)
            state.nptL1Control = control
            nested = state
            return state
        }
    }

    /// A VM exit from L2 to L1 (L1 intercepted something, or the exit an L2 access ended in):
    /// the vCPU runs L1 on its TDP root again. `guest_mmu` keeps its roots for the next entry;
    /// L2 left nothing in the TLB.
    public func exitToL1() throws(VirtualMachineError) {
        guard let nested, nested.inL2 else { throw .invalidAccess("VM exit without L2: vCPU \(id) runs L1") }
        nested.inL2 = false
        stat.guestMode = 0
        transitionTLBFlush(nested, isEntry: false)
    }

    /// INVVPID of L1's (`handle_invvpid`): a VPID above 0xFFFF cannot be given here; VPID 0 for the
    /// individual-address and single-context types and a non-canonical address for the
    /// individual one fail (VMfailValid: false). KVM then flushes vpid02, which serves every
    /// vpid12: the address of it for the individual type, all of it for the others (more than
    /// single-context retaining globals asks, or a single context naming a VPID L2 never had).
    /// The architecture's reference drops only what the type names.
    public func invalidateVPID(_ type: INVVPIDType, vpid: UInt16, address: GuestVirtualAddress) throws(VirtualMachineError) -> Bool {
        if isInL2 { throw .invalidAccess("INVVPID is L1's instruction: vmexit first") }
        guard let tdpState, tdpState.tdp.masks.isEPT else { throw .unsupported("INVVPID needs L1 under EPT") }
        switch type {
        case .individualAddress:
            let width = tdpState.registers.cr4.contains(.la57) ? 57 : 48
            if vpid == 0 || !address.isCanonical(width: width) { return false }
        case .singleContext, .singleContextRetainingGlobals:
            if vpid == 0 { return false }
        case .allContexts:
            break
        }
        guard let nested else { return true }
        switch type {
        case .individualAddress: nested.tlb.invalidate(address, vpid: .vpid02, pcid: nil)
        default: nested.tlb.flush(vpid: .vpid02)
        }
        nested.cachedReference.invalidateVPID(type, vpid: vpid, address: address)
        return true
    }

    /// INVEPT of L1's (`handle_invept`): single-context drops `guest_mmu`'s roots, current or
    /// cached, for the EPTP's root table; global all of them. The next L2 access builds anew from
    /// L1's tables. Returns whether the current root went.
    @discardableResult
    public func invalidateEPT(_ type: INVEPTType) throws(VirtualMachineError) -> Bool {
        if isInL2 { throw .invalidAccess("INVEPT is L1's instruction: vmexit first") }
        guard let tdpState, tdpState.tdp.masks.isEPT else { throw .unsupported("INVEPT needs L1 under EPT") }
        guard let nested else { return false }
        guard case .ept = nested.paging else { return false }
        nested.forgetEPTSnapshots(type)
        // The hardware's combined mappings of a freed root go at the root's next load (KVM
        // flushes a root it loads); the architecture drops those of the EP4TA now.
        switch type {
        case .singleContext(let pointer): nested.cachedReference.drop(eptRoot: pointer.rootAddress)
        case .allContexts: nested.cachedReference.dropAll()
        }
        leaveGuestMode()
        return vm.withShadowMMULock { nested.guestMMU.invalidateEPT(type) }
    }

    /// A MOV to CR0/CR3/CR4 or WRMSR to EFER in L2 (L1 exits on none of them: EPT without CR-load
    /// exiting, CR0/CR4 owned by L2, EFER not intercepted), so KVM is not involved: the hardware
    /// takes L2's new registers and, in PAE paging, loads L2's PDPTEs through L1's tables. A load
    /// L1's tables refuse is the exit this returns: the instruction does not complete, L2's
    /// registers stay, and the vCPU runs L1. Registers the processor refuses (#GP) are the caller's
    /// check (`PagingRegisters.transitionFault`); they throw here only when no walker takes them.
    /// `noFlush` is a MOV to CR3's bit 63 (which needs L2's CR4.PCIDE).
    /// `loadsCR3` says the write is a MOV to CR3 (which reloads PAE's PDPTEs and flushes the new
    /// PCID's non-global translations even with CR3's value unchanged).
    public func setL2Registers(_ new: PagingRegisters, loadsCR3: Bool = false,
                               noFlush: Bool = false) throws(VirtualMachineError) -> NestedVMExit? {
        if noFlush && !new.cr4.contains(.pcidEnable) { throw .invalidAccess("MOV to CR3 with bit 63 (no flush) needs CR4.PCIDE") }
        guard let nested, nested.inL2 else { throw .invalidAccess("vCPU \(id) runs no L2 (vmenter first)") }
        let old = nested.registers
        let walker: PageWalker
        do throws(NestedGuestSetupError) {
            if new.mode == .pae && !loadsCR3 && new.cr3 == old.cr3 && !new.reloadsPDPTEs(from: old) {
                // A MOV to CR0/CR4 that leaves PAE's PDPTE registers as they are.
                let kept = (0..<4).map { nested.guestWalker.pdpte($0).rawValue }
                do {
                    walker = try PageWalker(registers: new, cpu: vm.cpu, memory: vm.memory, pdpteValues: kept)
                } catch {
                    throw NestedGuestSetupError.registers(error)
                }
            } else {
                walker = try NestedPagingWalker.guestWalker(registers: new, cpu: vm.cpu, tables: nested.l1Tables, memory: vm.memory)
            }
        } catch {
            switch error {
            case .registers(let error):
                throw .impossibleRegisters(error)
            case .pdpteLoad(let fault):
                guard let exit = NestedVMExit(fault) else {
                    throw .invalidAccess("L2's PDPTE load at CR3 \(GuestPhysicalAddress(new.cr3)) leads outside L1's memory: \(fault)")
                }
                try exitToL1()
                return exit
            }
        }
        nested.registers = new
        nested.guestWalker = walker
        nested.hardware = nil
        // The hardware's invalidations for L2's current VPID (SDM 4.10.4.1), and the architecture's.
        let vpid = hardwareVPID(nested)
        if new.invalidatesAllTranslations(from: old) {
            nested.tlb.flush(vpid: vpid)
            nested.cachedReference.drop(vpid: nested.architecturalVPID)
        } else if (loadsCR3 || new.cr3 != old.cr3) && !noFlush {
            nested.tlb.flushNonGlobal(vpid: vpid, pcid: new.pcid)
            nested.cachedReference.dropNonGlobal(vpid: nested.architecturalVPID, pcid: new.pcid)
        }
        return nil
    }

    /// The VPID the hardware runs L2 under (`prepare_vmcs02_early_rare`).
    func hardwareVPID(_ nested: NestedVCPUState) -> L2HardwareVPID { nested.vpid12 == nil ? .vpid01 : .vpid02 }

    /// INVLPG in L2 (L1 does not intercept it under EPT, and KVM is not involved). L2's
    /// translations are cached nowhere in the model (no L2 TLB: every L2 access walks), so there
    /// is nothing it could drop; it is checked to come from L2.
    public func invalidateL2Page(_ address: GuestVirtualAddress) throws(VirtualMachineError) {
        guard let nested, nested.inL2 else { throw .invalidAccess("vCPU \(id) runs no L2 (vmenter first)") }
        nested.tlb.invalidate(address, vpid: hardwareVPID(nested), pcid: nested.registers.pcid)
        nested.cachedReference.invalidatePage(address, vpid: nested.architecturalVPID, pcid: nested.registers.pcid)
    }

    /// INVPCID in L2 ("enable INVPCID" set, INVLPG exiting clear: no exit, the hardware's), for
    /// L2's current VPID. The caller has checked the operand (`PagingRegisters.invpcidFaults`).
    public func invalidateL2PCID(_ type: INVPCIDType, pcid: UInt16, address: GuestVirtualAddress) throws(VirtualMachineError) {
        guard let nested, nested.inL2 else { throw .invalidAccess("vCPU \(id) runs no L2 (vmenter first)") }
        nested.tlb.invalidatePCID(type, pcid: pcid, address: address, vpid: hardwareVPID(nested))
        nested.cachedReference.invalidatePCID(type, pcid: pcid, address: address, vpid: nested.architecturalVPID)
    }

    /// `guest_mmu`, once L1 has entered L2.
    public var guestMMU: MMUContext? { nested?.guestMMU }

    // MARK: L2 accesses

    /// An access of L2's: the hardware's nested walk over `guest_mmu`'s root, KVM's handler at
    /// every EPT violation or misconfiguration (#NPF), until the access completes, faults in L2,
    /// or ends in an exit to L1 (the vCPU then runs L1: `exitToL1` has happened).
    public func accessL2(_ address: GuestVirtualAddress, _ access: Access, size: Int = 8,
                         value: UInt64 = 0) throws(VirtualMachineError) -> L2AccessOutcome {
        // (A vCPU in L2 is under TDP: `enterL2` refuses shadow paging.)
        guard let nested, nested.inL2 else { throw .invalidAccess("vCPU \(id) runs no L2 (vmenter first)") }
        switch size {
        case 1, 2, 4, 8: break
        default: throw .invalidAccess("size must be 1, 2, 4 or 8, not \(size)")
        }
        guard address.rawValue & pageOffsetMask <= pageSize - UInt64(size) else {
            throw .invalidAccess("\(size) bytes at \(address) cross a page boundary")
        }
        // On a thread of its own the vCPU leaves guest mode first: KVM's handling takes `mmu_lock`
        // for write, which another thread may hold while it waits for vCPUs in guest mode to take
        // a flush request.
        leaveGuestMode()
        // KVM_REQ_DIRTY_RING_SOFT_FULL at the entry, before KVM's locks are taken: the VMM
        // harvests and resets, which takes them. (The entries after exits inside the access are
        // not checked again: the ring's reserve covers the few pushes one access makes.)
        if hot.pointee.usesDirtyRing, dirtyRing?.isSoftFull == true { try exitForFullDirtyRing() }
        // The vCPU whose exits push onto its dirty ring (`kvm_running_vcpu`), kept opaque: the
        // previous one is only put back, and as a reference it cost a retain and a release.
        let running = VirtualMachine.running
        let wasRunning = running.opaqueVCPU
        let switchesRunning = wasRunning != Unmanaged.passUnretained(self).toOpaque()
        if switchesRunning { running.set(self) }
        defer { if switchesRunning { running.setOpaque(wasRunning) } }
        // Unretained (the VM outlives its vCPUs' accesses): held across the access, it was retained.
        let srcu = Unmanaged.passUnretained(nested.memslotsSRCU)
        srcu._withUnsafeGuaranteedRef { $0.lockShared() }
        defer { srcu._withUnsafeGuaranteedRef { $0.unlockShared() } }
        let outcome = try withMMULock(nested) { () throws(VirtualMachineError) -> L2AccessOutcome in
            let outcome = try runL2(address, access, size: size, value: value, nested)
            if case .exitToL1 = outcome.result { return outcome }
            // On a thread of its own, back into L2's guest mode before `mmu_lock` is let go (as
            // the shadow MMU's exits do): the model's hardware made L2's access under the lock,
            // and a remote flush must find the vCPU in guest mode from there until its next exit,
            // as it would find L2 running after KVM's entry. The requests are serviced first.
            while runsOnOwnThread {
                // A remote flush reaches L2's TLB too (as `runL2` services it at an entry).
                if hasRemoteRequests && checkRequest(.flushAll) {
                    count(.tlbFlush)
                    tlb.flush()
                    nested.tlb.flushAll()
                }
                serviceRequests()
                if tryEnterGuestMode() { break }
            }
            return outcome
        }
        if case .exitToL1 = outcome.result { try exitToL1() }
        return outcome
    }

    /// `mmu_lock` for write around `body` (`VirtualMachine.withShadowMMULock` with the lock held by
    /// the nested state).
    @inline(__always)
    private func withMMULock<Result>(_ nested: NestedVCPUState,
                                     _ body: () throws(VirtualMachineError) -> Result) throws(VirtualMachineError) -> Result {
        nested.mmuLock.lockExclusive()
        defer { nested.mmuLock.unlockExclusive() }
        return try body()
    }

    private func runL2(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                       _ nested: NestedVCPUState) throws(VirtualMachineError) -> L2AccessOutcome {
        var exits = 0
        let vpid = hardwareVPID(nested)
        let pcid = nested.registers.pcid
        // With L2's paging off the hardware caches guest-physical mappings only, which the model
        // does not keep; with protection keys every access walks (as for L1).
        let cachesTranslations = nested.registers.cr0.contains(.paging)
            && !nested.registers.cr4.contains(.protectionKeys) && !nested.registers.cr4.contains(.supervisorProtectionKeys)
        while exits <= Self.maxExitsPerAccess {
            // KVM_REQ_TLB_FLUSH (a zap of KVM's shadow of L1's tables) is serviced before entering L2.
            if hasRemoteRequests && checkRequest(.flushAll) {
                count(.tlbFlush)
                tlb.flush()
                nested.tlb.flushAll()
            }
            // Unretained: `nested` keeps the walker until a later try replaces it.
            let hardware = try nestedHardwareWalker(nested)
            let root = hardware._withUnsafeGuaranteedRef { $0.root.rawValue }
            if cachesTranslations, let entry = nested.tlb.lookup(address, root: root, vpid: vpid, pcid: pcid),
               allows(entry, access, nested) {
                let hostAddress = entry.hostFrame << 12 | address.rawValue & pageOffsetMask
                let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
                return L2AccessOutcome(result: .completed(gpa: GuestPhysicalAddress(entry.l2Frame << 12 | address.rawValue & pageOffsetMask),
                                                          hostAddress: hostAddress, value: result),
                                       exits: exits, emulated: false, tlbHit: true)
            }
            let site: NestedFaultSite
            let errorCode: PageFaultErrorCode
            switch hardware._withUnsafeGuaranteedRef({ $0.translate(address, access, in: host) }) {
            case .translated(let gpa, let hostAddress, let guestPermissions, let isGlobal, let nestedPermissions):
                let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
                if cachesTranslations {
                    nested.tlb.insert(address, root: root, vpid: vpid, pcid: pcid, isGlobal: isGlobal, hostFrame: hostAddress >> 12,
                                      l2Frame: gpa.frame.rawValue, guestPermissions: guestPermissions,
                                      nestedKinds: Self.nestedKinds(nestedPermissions, nested.paging), dirty: access.kind == .write)
                }
                return L2AccessOutcome(result: .completed(gpa: gpa, hostAddress: hostAddress, value: result),
                                       exits: exits, emulated: false)
            case .guestPageFault(let code):
                // A page fault invalidates the page's entries (SDM 4.10.4.1).
                nested.tlb.invalidate(address, vpid: vpid, pcid: pcid)
                return L2AccessOutcome(result: .pageFault(errorCode: code, cr2: address), exits: exits, emulated: false)
            case .generalProtection:
                return L2AccessOutcome(result: .generalProtection, exits: exits, emulated: false)
            case .noMemory:
                throw .corruptShadowTables("guest_mmu's tables lead outside host memory for \(address)")
            case .exit(let faultSite, let code):
                site = faultSite
                errorCode = code
            }
            exits += 1
            count(.exit)
            let decision: NestedTDPFaultResult
            do {
                decision = try nested.guestMMU.pageFault(atL2: site.address, errorCode: errorCode)
            } catch {
                throw .hostMemory("\(error)")
            }
            switch decision {
            case .handled(.fixed), .handled(.spurious), .handled(.retry):
                continue
            case .handled(.emulate):
                return try emulateL2(address, access, size: size, value: value, exits: exits, nested)
            case .reflect(let exit):
                return L2AccessOutcome(result: .exitToL1(exit), exits: exits, emulated: false, exitGuestLevel: site.guestLevel)
            case .handled(let other):
                throw .corruptShadowTables("guest_mmu answered an L2 fault with \(other)")
            }
        }
        throw .livelock(address, exits: exits)
    }

    /// Whether an L2 TLB entry serves the access: L2's rules in force now refuse none of its
    /// permissions, L1's tables (as KVM shadows them) allow the kind, and a write finds it dirty
    /// (else the hardware walks, to set D).
    @inline(__always)
    private func allows(_ entry: L2TLB.Entry, _ access: Access, _ nested: NestedVCPUState) -> Bool {
        if access.kind == .write && !entry.dirty { return false }
        guard entry.nestedKinds & (1 << access.kind.rawValue) != 0 else { return false }
        let refused = nested.guestWalker.rules.refusedPermissions(access,
                                                                 alignmentCheck: nested.registers.rflags.contains(.alignmentCheck))
        return (refused >> entry.guestPermissions) & 1 == 0
    }

    /// The access kinds (bit `AccessKind.rawValue`) a nested translation's combined ACC bits allow:
    /// EPT's R (4), W (2), X (1); NPT's user (4), writable (2) and executable (1) bits, every NPT
    /// access being a user one.
    static func nestedKinds(_ permissions: UInt8, _ paging: L1NestedPaging) -> UInt8 {
        let needed: (read: UInt8, write: UInt8, fetch: UInt8)
        switch paging {
        case .ept: needed = (4, 2, 1)
        case .npt: needed = (4, 6, 5)
        }
        var kinds: UInt8 = 0
        if permissions & needed.read == needed.read { kinds |= 1 << AccessKind.read.rawValue }
        if permissions & needed.write == needed.write { kinds |= 1 << AccessKind.write.rawValue }
        if permissions & needed.fetch == needed.fetch { kinds |= 1 << AccessKind.fetch.rawValue }
        return kinds
    }

    /// The hardware's walker for L2: L2's paging over the shadow root of `guest_mmu` (EPT with
    /// A/D as L1's EPTP has them, KVM's EPTP for L2 copying the bit; NPT in the host's depth).
    private func nestedHardwareWalker(_ nested: NestedVCPUState) throws(VirtualMachineError) -> Unmanaged<L2HardwareWalker> {
        let root: HardwareRoot
        do {
            // KVM_REQ_MMU_FREE_OBSOLETE_ROOTS for guest_mmu: a zap since the last access.
            nested.guestMMU.freeObsoleteRoots()
            // `kvm_mmu_reload` has nothing to do while the root stays loaded.
            if let hardware = nested.lentHardware,
               nested.guestMMU.loadedRootFrame == hardware._withUnsafeGuaranteedRef({ $0.root }) {
                return hardware
            }
            let loaded = try nested.guestMMU.load()
            root = loaded.root
            // `kvm_mmu_load` flushes the root it loads: stale entries of a page it had before
            // (ept_sync_context, every VPID).
            if loaded.allocated { nested.tlb.flush(root: root.rootFrame.rawValue) }
        } catch {
            throw .hostMemory("\(error)")
        }
        if let hardware = nested.lentHardware, hardware._withUnsafeGuaranteedRef({ $0.root }) == root.rootFrame { return hardware }
        // Read only here: passed to every try, the `unowned(unsafe)` reference was retained.
        let tdpState = nested.tdpState
        let tables: NestedPagingTables
        do {
            switch nested.paging {
            case .ept(let pointer, _):
                tables = .ept(try EPTWalker(pointer: EPTPointer(root: root.rootFrame.address.rawValue, levels: pointer.levels,
                                                                accessedDirty: pointer.accessedDirtyEnabled),
                                            capabilities: tdpState.capabilities))
            case .npt:
                var cr4: CR4 = [.physicalAddressExtension]
                if root.mode == .fiveLevel { cr4.insert(.la57) }
                let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: root.rootFrame.address.rawValue,
                                                cr4: cr4, efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
                tables = .npt(try PageWalker(registers: registers,
                                             cpu: CPUModel(maxPhysicalAddressBits: tdpState.tdp.masks.hostPhysicalAddressBits),
                                             memory: host))
            }
        } catch {
            throw .corruptShadowTables("the hardware refuses guest_mmu's root: \(error)")
        }
        let hardware = L2HardwareWalker(root: root.rootFrame, walker: NestedPagingWalker(guest: nested.guestWalker, tables: tables))
        nested.hardware = hardware
        return .passUnretained(hardware)
    }

    /// KVM's emulator for an L2 access (`nested_mmu`'s walk, L2 linear -> L2 physical -> L1
    /// physical), then the access on L1's memory; a write to a table `guest_mmu` shadows goes
    /// through `kvm_mmu_track_write`.
    private func emulateL2(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64, exits: Int,
                           _ nested: NestedVCPUState) throws(VirtualMachineError) -> L2AccessOutcome {
        count(.instructionEmulation)
        let nestedMMU = NestedMMU(l2Registers: nested.registers, loadedWalker: nested.guestWalker, tables: nested.l1Tables)
        switch nestedMMU.translate(address, access, in: vm.memory) {
        case .translated(let gpa, let l1GPA):
            guard let slot = vm.memory.slot(containing: l1GPA.frame), !(access.kind == .write && slot.flags.contains(.readOnly)) else {
                count(.mmioExit)
                let allOnes: UInt64 = size == 8 ? ~0 : (1 << UInt64(8 * size)) - 1
                return L2AccessOutcome(result: .mmio(l1GPA: l1GPA, value: access.kind == .write ? value : allOnes), exits: exits,
                                       emulated: true)
            }
            let hostAddress = vm.memory.hostFrame(of: l1GPA.frame)!.rawValue << 12 | l1GPA.pageOffset
            let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
            if access.kind == .write {
                _ = vm.memory.markDirty(l1GPA.frame)
                mmu.trackWrite(l1GPA, bytes: size, fourByteGuestEntries: false)
            }
            return L2AccessOutcome(result: .completed(gpa: gpa, hostAddress: hostAddress, value: result), exits: exits,
                                   emulated: true)
        case .injectGuestFault(let errorCode):
            count(.guestFault)
            return L2AccessOutcome(result: .pageFault(errorCode: errorCode, cr2: address), exits: exits, emulated: true)
        case .injectGeneralProtection:
            return L2AccessOutcome(result: .generalProtection, exits: exits, emulated: true)
        case .exit(let exit, let guestLevel):
            return L2AccessOutcome(result: .exitToL1(exit), exits: exits, emulated: true, exitGuestLevel: guestLevel)
        case .noMemory(let l1Address):
            throw .invalidAccess("L1's tables for L2 lead outside L1's memory at \(l1Address)")
        }
    }
}

extension NestedVMExit {
    /// The exit to L1 the architecture's nested fault makes (none for L2's own faults or missing
    /// memory).
    init?(_ fault: NestedPagingFault) {
        switch fault {
        case .eptViolation(let site, let qualification): self = .eptViolation(site.address, qualification: qualification)
        case .eptMisconfiguration(let site): self = .eptMisconfiguration(site.address)
        case .nestedPageFault(let site, let errorCode): self = .nestedPageFault(site.address, errorCode: errorCode)
        case .guest, .noMemory: return nil
        }
    }
}
