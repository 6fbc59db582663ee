import GuestMemory
import X86Paging

// `guest_mmu` for an L1 that runs L2 with EPT or NPT: the shadow MMU over L1's EPT tables (or
// nested page tables, below). It is the same
// MMUContext as for a guest's own paging (KVM's `paging_tmpl.h` is compiled for EPT entries for
// the same reason): roots keyed by the EPTP with guest-mode roles, shadow pages for L1's EPT
// tables, write-tracked and unsynced like guest page tables, the same `FNAME(fetch)`, sync and
// prefetch, with the guest entry format EPT's. The guest walk is `NestedEPTContext.walk`, whose
// failures are reflected to L1 rather than injected into L2.

/// What KVM does with an L2 EPT violation, EPT misconfiguration or #NPF under shadow EPT or NPT.
public enum NestedTDPFaultResult: Equatable, Sendable {
    /// Handled in L0, as a fault on a guest's own tables is.
    case handled(PageFaultResult)
    /// L1's EPT refuses the access: the exit goes to L1 (`nested_ept_inject_page_fault`).
    case reflect(NestedVMExit)
}

extension MMUContext {
    /// `guest_mmu` as `nested_ept_init_mmu_context` sets it up for L1's EPTP. Its roots are built
    /// at the next `load()`. (The seed threads' variants change roles of a guest's own paging;
    /// shadow EPT roles are upstream's under every variant.)
    public convenience init(mmu: ShadowMMU, nestedEPT: NestedEPTContext, cpu: CPUModel = CPUModel()) {
        // Paging off never fails validation; the registers are unused by a shadow EPT context.
        try! self.init(mmu: mmu, registers: PagingRegisters(), cpu: cpu, variant: mmu.variant)
        setNestedEPT(nestedEPT)
        cpuRole = nestedEPT.cpuRole
        rootRole = nestedEPT.rootRole
    }

    /// A nested VM entry with `new` (`nested_ept_new_eptp`): `kvm_init_shadow_ept_mmu` takes the
    /// new roles when the level, A/D bit or capability changed, then `kvm_mmu_new_pgd` moves to
    /// the root for the EPTP (the current one, a cached one, or a new one at the next load).
    public func loadEPTP(_ new: NestedEPTContext) {
        precondition(nestedEPTBox != nil, "only guest_mmu has an EPTP")
        setNestedEPT(new)
        if new.cpuRole != cpuRole {
            cpuRole = new.cpuRole
            rootRole = new.rootRole
        }
        switchRoot(to: new.pointer.rawValue)
    }

    /// `kvm_mmu_page_fault` through `ept_page_fault` for an L2 EPT violation (or misconfiguration:
    /// `errorCode` has RSVD) at `gpa`, with the error code KVM made of the hardware's exit
    /// qualification. The shadow walk indexes L2's guest-physical address as shadow paging
    /// indexes a linear address.
    @inline(never)  // see `pageFault(at:access:errorCode:)`
    public func pageFault(atL2 gpa: GuestPhysicalAddress, errorCode: PageFaultErrorCode) throws(ShadowMMUError)
        -> NestedTDPFaultResult {
        let address = GuestVirtualAddress(gpa.rawValue)
        trace(.kvmPageFault(vcpuID: vcpuID, address: gpa.rawValue, errorCode: errorCode))
        if errorCode.contains(.reservedBit), handleMMIOPageFault(address) { return .handled(.emulate) }
        mmu.stats.pfTaken += 1
        if shadowsNestedPageTables { return try nestedPageTableFault(at: address, errorCode: errorCode) }
        guard let box = lentNestedEPTBox else { preconditionFailure("not a guest_mmu context") }
        let walk: GuestWalk
        // Unretained: nothing the walk does replaces the box.
        switch box._withUnsafeGuaranteedRef({ box in withMemslots { box.walk(gpa, errorCode: errorCode, in: $0) } }) {
        case .success(let result): walk = result
        case .failure(let exit): return .reflect(exit)
        }
        let result = try mapShadowEPT(walk, address: address, errorCode: errorCode)
        count(result)
        return .handled(result)
    }

    /// The rest of `FNAME(page_fault)` after a successful walk of L1's EPT.
    private func mapShadowEPT(_ walk: GuestWalk, address: GuestVirtualAddress,
                              errorCode: PageFaultErrorCode) throws(ShadowMMUError) -> PageFaultResult {
        let isWrite = errorCode.contains(.write)
        // L2 writing a frame of L1's that holds a shadowed table (L1's EPT or L1's own paging).
        if errorCode.contains(.present) && isWrite && mmu.isWriteTracked(walk.gfn) {
            clearFloodingAlongShadowPath(address)
            return .emulate
        }
        let backing = memslots.backing(of: walk.gfn)
        if backing == nil && !mmu.masks.isMMIOCachingEnabled { return .emulate }
        try mmu.makePagesAvailable()
        return try fetch(walk, address: address, hostFrame: backing?.frame, hostWritable: backing?.writable ?? false,
                         isWrite: isWrite, isFetch: errorCode.contains(.fetch))
    }
}

// MARK: - Shadow NPT

extension MMUContext {
    /// `guest_mmu` as `nested_svm_init_mmu_context` sets it up (`kvm_init_shadow_npt_mmu`): L1's
    /// nested page tables at `nestedCR3`, walked in the paging mode L1 ran VMRUN in (its CR4 and
    /// EFER; CR0 is PG alone, so CR0.WP is clear, which user accesses never consult), shadowed at
    /// the host's NPT depth `hostLevels`: a 4-level NPT under a 5-level host gets the passthrough
    /// root (seed 1), a 32-bit or PAE NPT KVM's special roots. Roles have guest mode set; CR4.PKE
    /// is dropped (NPT has no protection keys).
    public convenience init(mmu: ShadowMMU, nestedCR3: UInt64, l1CR4: CR4, l1EFER: EFER, hostLevels: Int,
                            cpu: CPUModel = CPUModel()) throws(ControlStateError) {
        let registers = PagingRegisters(cr0: [.paging, .protectionEnable], cr3: nestedCR3,
                                        cr4: l1CR4.subtracting(.protectionKeys), efer: l1EFER)
        try self.init(mmu: mmu, registers: registers, cpu: cpu, hostLevels: hostLevels, variant: mmu.variant)
        shadowsNestedPageTables = true
        cpuRole = shadowNPTCPURole(cr0: registers.cr0, cr4: registers.cr4, efer: registers.efer)
        rootRole = shadowNPTRootRole(for: cpuRole, tdpLevel: hostLevels)
    }

    /// A #NPF L2 caused at `gpa`, with the hardware's EXITINFO1 as `errorCode` (U always set: the
    /// nested walk's accesses are user accesses; GUEST_FINAL or GUEST_PAGE). A fault of L1's
    /// tables is reflected (`nested_svm_inject_npf_exit`): EXITINFO1 keeps the hardware's high
    /// bits and takes the walk's error code in its low 32, EXITINFO2 the address.
    private func nestedPageTableFault(at address: GuestVirtualAddress,
                                      errorCode: PageFaultErrorCode) throws(ShadowMMUError) -> NestedTDPFaultResult {
        let kind: AccessKind = errorCode.contains(.write) ? .write : errorCode.contains(.fetch) ? .fetch : .read
        let result = try shadowPageFault(address, access: Access(kind, .user), errorCode: errorCode.union(.user))
        let gpa = GuestPhysicalAddress(address.rawValue)
        let highBits = PageFaultErrorCode(rawValue: errorCode.rawValue & ~0xFFFF_FFFF)
        switch result {
        case .injectGuestFault(_, let walkCode):
            return .reflect(.nestedPageFault(gpa, errorCode: highBits.union(walkCode)))
        case .injectGeneralProtection:
            // An L2 address L1's NPT mode cannot hold (beyond its canonical width): reported as a
            // reserved-bit #NPF.
            return .reflect(.nestedPageFault(gpa, errorCode: highBits.union([.present, .user, .reservedBit])))
        default:
            count(result)
            return .handled(result)
        }
    }
}

// MARK: - INVEPT

/// The INVEPT types L1 can use (SDM 30.3, "INVEPT"; type 1 single-context, type 2 global).
public enum INVEPTType: Hashable, Sendable {
    /// Mappings derived from the given EPTP.
    case singleContext(EPTPointer)
    /// Every EPTP's mappings.
    case allContexts
}

extension MMUContext {
    /// `handle_invept` for `guest_mmu`: KVM does not sync on INVEPT, it frees every root, current
    /// or cached, whose EPTP names the same root table as the given one (`nested_ept_root_matches`
    /// compares the address bits only), or every root for a global INVEPT. The next nested entry
    /// builds the root anew from L1's tables. Returns whether the current root went.
    @discardableResult
    public func invalidateEPT(_ type: INVEPTType) -> Bool {
        precondition(nestedEPT != nil, "INVEPT applies to the shadow EPT context")
        func matches(_ pgd: UInt64) -> Bool {
            switch type {
            case .allContexts: true
            case .singleContext(let pointer): EPTPointer(pgd).rootAddress == pointer.rootAddress
            }
        }
        for index in previousRoots.indices {
            if let cached = previousRoots[index], matches(cached.pgd) { freePreviousRoot(at: index) }
        }
        guard rootsLoaded, matches(rootPGD) else { return false }
        freeCurrentRoot()
        return true
    }
}
