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
// L2's accesses use no TLB entries (a TLB may hold nothing): L1's and L2's translations never
// share one, and INVVPID has no cached L2 translation to drop (docs/NESTED.md). A vCPU on a
// thread of its own (`runVCPUsOnThreads`) runs L2 outside guest mode, each access under
// `mmu_lock` held for write as KVM's shadow MMU handles it.

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
}

/// L1's nested state on one vCPU (the parts of vmcs12/VMCB and `vcpu->arch` the model needs).
final class NestedVCPUState {
    var paging: L1NestedPaging
    /// L2's CR0/CR3/CR4/EFER (in hardware while L2 runs).
    var registers: PagingRegisters
    /// `vcpu->arch.guest_mmu`: kept across VM exits with its root and `prev_roots`.
    let guestMMU: MMUContext
    /// L1's CR4 and EFER the NPT context was built with (NPT only).
    var nptL1Control: (CR4, EFER)?
    /// L2's walker as the hardware runs it (PAE's PDPTEs loaded through L1's tables at entry).
    var guestWalker: PageWalker
    /// L1's tables as the architecture reads them from L1's memory.
    var l1Tables: NestedPagingTables
    var inL2 = false
    /// The hardware's walker for L2 and the `guest_mmu` root it walks, kept while both stay (an
    /// entry, which may change L2's registers, drops it).
    var hardware: L2HardwareWalker?
    /// For the lockstep check: L1's last-level EPT tables as they were at each VM entry since
    /// the INVEPT that covers them (NestedReference.swift).
    var eptSnapshots: [EPTTableSnapshot] = []

    init(paging: L1NestedPaging, registers: PagingRegisters, guestMMU: MMUContext, guestWalker: PageWalker,
         l1Tables: NestedPagingTables) {
        self.paging = paging
        self.registers = registers
        self.guestMMU = guestMMU
        self.guestWalker = guestWalker
        self.l1Tables = l1Tables
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
        case translated(gpa: GuestPhysicalAddress, hostAddress: UInt64)
        case guestPageFault(PageFaultErrorCode)
        case generalProtection
        case noMemory
        /// A fault of `guest_mmu`'s tables: KVM's handler with the error code it derives.
        case exit(NestedFaultSite, PageFaultErrorCode)
        /// A fault that names no site (never made by the walker).
        indirect case unexpected(NestedPagingFault)
    }

    @inline(never)
    func translate(_ address: GuestVirtualAddress, _ access: Access, in host: HostPhysicalView) -> Outcome {
        let fault: NestedPagingFault
        switch walker.translate(address, access, in: host) {
        case .success(let translation):
            return .translated(gpa: translation.guest.physicalAddress, hostAddress: translation.outputAddress.rawValue)
        case .failure(.guest(.pageFault(let pageFault))):
            return .guestPageFault(PageFaultErrorCode(rawValue: UInt64(pageFault.errorCode.architectural)))
        case .failure(.guest(.generalProtection)), .failure(.guest(.addressTooWide)):
            return .generalProtection
        case .failure(.guest(.noMemory)), .failure(.noMemory):
            return .noMemory
        case .failure(let other):
            fault = other
        }
        guard let site = fault.site else { return .unexpected(fault) }
        switch fault {
        case .eptViolation(_, var qualification):
            qualification.insert(.linearAddressValid)
            return .exit(site, TDPMMU.errorCode(forEPTViolation: qualification))
        case .nestedPageFault(_, let code):
            return .exit(site, code)
        default:
            // A misconfiguration of KVM's own shadow EPT: an MMIO SPTE.
            return .exit(site, [.reservedBit])
        }
    }
}

extension VCPU {
    /// Whether the vCPU runs L2 now.
    public var isInL2: Bool { nested?.inL2 ?? false }

    /// L2's registers, while or since it last ran.
    public var l2Registers: PagingRegisters? { nested?.registers }

    /// VMLAUNCH/VMRESUME (or VMRUN) of L1's: the checks a nested VM entry makes (a refused entry
    /// leaves L1 running and changes nothing), `guest_mmu` moved to L1's EPTP or nCR3 (its root
    /// cached or built at the first access), L2's registers in hardware. Counts `nested_run`.
    public func enterL2(_ paging: L1NestedPaging, registers l2: PagingRegisters) throws(VirtualMachineError) {
        guard let tdpState else {
            // nested_vmx_setup_ctls_msrs offers L1 the "enable EPT" control only with enable_ept, and
            // SVM offers nested paging only with npt_enabled: under shadow paging L1's entry with an
            // EPTP or nCR3 fails its control checks.
            throw .unsupported("an L2 guest with EPT or NPT needs L1 under the TDP MMU: KVM offers L1 nested EPT/NPT only when it uses EPT/NPT itself")
        }
        if isInL2 { throw .invalidAccess("VM entry from L2: vCPU \(id) already runs L2 (vmexit first)") }
        let l1 = tdpState.registers
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
        do {
            walker = try NestedPagingWalker.guestWalker(registers: l2, cpu: vm.cpu, tables: tables, memory: vm.memory)
        } catch {
            throw .invalidAccess("VM entry fails loading L2's registers: \(error)")
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
        count(.nestedRun)
        stat.guestMode = 1
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
                                        guestWalker: l2Walker, l1Tables: tables)
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
                                        guestWalker: l2Walker, l1Tables: tables)
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
        leaveGuestMode()
        return vm.withShadowMMULock { nested.guestMMU.invalidateEPT(type) }
    }

    /// `guest_mmu`, once L1 has entered L2.
    public var guestMMU: MMUContext? { nested?.guestMMU }

    // MARK: L2 accesses

    /// An access of L2's: the hardware's nested walk over `guest_mmu`'s root, KVM's handler at
    /// every EPT violation or misconfiguration (#NPF), until the access completes, faults in L2,
    /// or ends in an exit to L1 (the vCPU then runs L1: `exitToL1` has happened).
    public func accessL2(_ address: GuestVirtualAddress, _ access: Access, size: Int = 8,
                         value: UInt64 = 0) throws(VirtualMachineError) -> L2AccessOutcome {
        guard let nested, nested.inL2, let tdpState else { throw .invalidAccess("vCPU \(id) runs no L2 (vmenter first)") }
        switch size {
        case 1, 2, 4, 8: break
        default: throw .invalidAccess("size must be 1, 2, 4 or 8, not \(size)")
        }
        guard address.rawValue & pageOffsetMask <= pageSize - UInt64(size) else {
            throw .invalidAccess("\(size) bytes at \(address) cross a page boundary")
        }
        // On a thread of its own the vCPU leaves guest mode first: L2's accesses use no TLB entry,
        // and KVM's handling takes `mmu_lock` for write, which another thread may hold while it
        // waits for vCPUs in guest mode to take a flush request.
        leaveGuestMode()
        // KVM_REQ_DIRTY_RING_SOFT_FULL at the entry, before KVM's locks are taken: the VMM
        // harvests and resets, which takes them. (The entries after exits inside the access are
        // not checked again: the ring's reserve covers the few pushes one access makes.)
        if hot.pointee.usesDirtyRing, dirtyRing?.isSoftFull == true { try exitForFullDirtyRing() }
        // The vCPU whose exits push onto its dirty ring (`kvm_running_vcpu`).
        let wasRunning = VirtualMachine.running.vcpu
        VirtualMachine.running.set(self)
        defer { VirtualMachine.running.set(wasRunning) }
        let srcu = vm.memslotsSRCU
        srcu.lockShared()
        defer { srcu.unlockShared() }
        let outcome = try vm.withShadowMMULock { () throws(VirtualMachineError) -> L2AccessOutcome in
            let outcome = try runL2(address, access, size: size, value: value, nested, tdpState)
            if case .exitToL1 = outcome.result { return outcome }
            // On a thread of its own, back into L2's guest mode before `mmu_lock` is let go (as
            // the shadow MMU's exits do): the model's hardware made L2's access under the lock,
            // and a remote flush must find the vCPU in guest mode from there until its next exit,
            // as it would find L2 running after KVM's entry. The requests are serviced first.
            while runsOnOwnThread {
                serviceRequests()
                if tryEnterGuestMode() { break }
            }
            return outcome
        }
        if case .exitToL1 = outcome.result { try exitToL1() }
        return outcome
    }

    private func runL2(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                       _ nested: NestedVCPUState, _ tdpState: TDPVCPUState) throws(VirtualMachineError) -> L2AccessOutcome {
        var exits = 0
        while exits <= Self.maxExitsPerAccess {
            let hardware = try nestedHardwareWalker(nested, tdpState)
            let site: NestedFaultSite
            let errorCode: PageFaultErrorCode
            switch hardware.translate(address, access, in: host) {
            case .translated(let gpa, let hostAddress):
                let result = perform(hostAddress: hostAddress, access.kind, size: size, value: value)
                return L2AccessOutcome(result: .completed(gpa: gpa, hostAddress: hostAddress, value: result),
                                       exits: exits, emulated: false)
            case .guestPageFault(let code):
                return L2AccessOutcome(result: .pageFault(errorCode: code, cr2: address), exits: exits, emulated: false)
            case .generalProtection:
                return L2AccessOutcome(result: .generalProtection, exits: exits, emulated: false)
            case .noMemory:
                throw .corruptShadowTables("guest_mmu's tables lead outside host memory for \(address)")
            case .unexpected(let fault):
                exits += 1
                count(.exit)
                throw .corruptShadowTables("a nested fault without a site: \(fault)")
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

    /// The hardware's walker for L2: L2's paging over the shadow root of `guest_mmu` (EPT with
    /// A/D as L1's EPTP has them, KVM's EPTP for L2 copying the bit; NPT in the host's depth).
    private func nestedHardwareWalker(_ nested: NestedVCPUState,
                                      _ tdpState: TDPVCPUState) throws(VirtualMachineError) -> L2HardwareWalker {
        let root: HardwareRoot
        do {
            // KVM_REQ_MMU_FREE_OBSOLETE_ROOTS for guest_mmu: a zap since the last access.
            nested.guestMMU.freeObsoleteRoots()
            root = try nested.guestMMU.load().root
        } catch {
            throw .hostMemory("\(error)")
        }
        if let hardware = nested.hardware, hardware.root == root.rootFrame { return hardware }
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
        return hardware
    }

    /// KVM's emulator for an L2 access (`nested_mmu`'s walk, L2 linear -> L2 physical -> L1
    /// physical), then the access on L1's memory; a write to a table `guest_mmu` shadows goes
    /// through `kvm_mmu_track_write`.
    private func emulateL2(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64, exits: Int,
                           _ nested: NestedVCPUState) throws(VirtualMachineError) -> L2AccessOutcome {
        count(.instructionEmulation)
        let nestedMMU: NestedMMU
        do {
            nestedMMU = try NestedMMU(l2Registers: nested.registers, cpu: vm.cpu, tables: nested.l1Tables, memory: vm.memory)
        } catch {
            throw .invalidAccess("KVM's emulator cannot walk L2's tables: \(error)")
        }
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
        case .exit(let exit):
            return L2AccessOutcome(result: .exitToL1(exit), exits: exits, emulated: true, exitGuestLevel: nil)
        case .noMemory(let l1Address):
            throw .invalidAccess("L1's tables for L2 lead outside L1's memory at \(l1Address)")
        }
    }
}
