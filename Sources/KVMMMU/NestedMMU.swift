import GuestMemory
import X86Paging

// KVM's two MMUs for an L1 that runs an L2 with EPT or NPT, on the guest side: `guest_mmu`'s
// roles and its walk of L1's EPT (`kvm_init_shadow_ept_mmu`, `ept_page_fault`'s
// `FNAME(walk_addr)` for PTTYPE_EPT, `nested_ept_inject_page_fault`), and `nested_mmu`, the
// walk-only MMU that translates L2's linear addresses for the emulator (`init_kvm_nested_mmu`,
// `translate_nested_gpa`). The architecture's walks are X86Paging's (`EPTWalker`,
// `NestedPagingWalker`); what is here is what KVM decides on top of them.

/// An exit KVM reflects to L1 for L2.
public enum NestedVMExit: Error, Hashable, Sendable {
    /// EXIT_REASON_EPT_VIOLATION with the exit qualification and the L2 guest-physical address.
    case eptViolation(GuestPhysicalAddress, qualification: EPTViolationQualification)
    /// EXIT_REASON_EPT_MISCONFIG (exit qualification 0) for the L2 guest-physical address.
    case eptMisconfiguration(GuestPhysicalAddress)
    /// SVM_EXIT_NPF: EXITINFO1 the error code (GUEST_FINAL or GUEST_PAGE set), EXITINFO2 the address.
    case nestedPageFault(GuestPhysicalAddress, errorCode: PageFaultErrorCode)

    /// The L2 guest-physical address the exit reports.
    public var address: GuestPhysicalAddress {
        switch self {
        case .eptViolation(let address, _), .eptMisconfiguration(let address), .nestedPageFault(let address, _): address
        }
    }
}

/// `guest_mmu` for L1's EPT: the roles `kvm_init_shadow_ept_mmu` computes from L1's EPTP and the
/// EPT capabilities KVM gives L1, and `ept_page_fault`'s walk of L1's tables.
public struct NestedEPTContext: Sendable {
    /// L1's EPTP (vmcs12's EPT_POINTER).
    public let pointer: EPTPointer
    /// The capabilities L1 sees (execute-only, 2 MiB / 1 GiB pages, A/D, 5-level; the physical
    /// address width is L1's MAXPHYADDR, which bounds L1's EPT entries as KVM's
    /// `reserved_gpa_bits` does).
    public let capabilities: EPTCapabilities
    /// EPT, and thus nested EPT, consumes no CR0/CR4/EFER: the CPU role is the root role plus the
    /// execute-only bit, and both change only with the EPTP's level or A/D bit or the capability.
    public let cpuRole: CPURole
    /// The walker of L1's EPT with KVM's checks (`reset_rsvds_bits_mask_ept`). KVM gives nested
    /// VMX no mode-based execute control, so bit 10 is ignored.
    public let walker: EPTWalker

    public var rootRole: PageRole { cpuRole.base }

    /// `kvm_init_shadow_ept_mmu`; an EPTP VM entry would refuse throws (nested VM entry fails its
    /// checks before any MMU is set up).
    public init(pointer: EPTPointer, capabilities: EPTCapabilities) throws(EPTPointerError) {
        walker = try EPTWalker(pointer: pointer, capabilities: capabilities)
        self.pointer = pointer
        self.capabilities = capabilities
        cpuRole = shadowEPTRootRole(level: pointer.levels, accessedDirty: pointer.accessedDirtyEnabled,
                                    executeOnly: capabilities.executeOnly)
    }

    /// KVM re-initialises `guest_mmu` only when the role changes (a new EPTP with the same level
    /// and A/D bit keeps the context; `kvm_mmu_new_pgd` switches the root).
    public func reinitializes(from old: NestedEPTContext) -> Bool { cpuRole != old.cpuRole }

    /// What `ept_page_fault`'s walk of L1's EPT makes of an L2 fault at `address` that the
    /// hardware reported with `errorCode` (`__vmx_handle_ept_violation`'s: U for a read, W, I/D,
    /// and GUEST_FINAL or GUEST_PAGE): the L1 translation to shadow, or the exit to reflect.
    /// With EPT A/D on, a successful walk sets A in every entry of L1's it used and D in the leaf
    /// for a write.
    func walk<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, errorCode: PageFaultErrorCode, in memory: Memory
    ) -> Result<MMUContext.GuestWalk, NestedVMExit> {
        // KVM's EPT permission check wants every bit of the access: a read and write needs R and W
        // (W without R is a misconfiguration, so W alone decides), a fetch needs X.
        let kind: AccessKind = errorCode.contains(.write) ? .write : errorCode.contains(.fetch) ? .fetch : .read
        var fault = ReflectedEPTFault()
        let translation = walker.translate(address, EPTAccess(kind), in: memory, setAccessedDirty: true, sink: &fault)
        switch fault.kind {
        case .none:
            break
        case .violation:
            return .failure(.eptViolation(address, qualification: reflectedQualification(errorCode, fault.walked)))
        case .misconfiguration:
            return .failure(.eptMisconfiguration(address))
        }
        return .success(guestWalk(translation, isWrite: kind == .write))
    }

    /// What `walk` keeps of a fault of L1's EPT: the exit it makes and what L1's entries allowed
    /// (the fault itself carries the walk's path, which copying out of the walk cost a `memcpy`).
    struct ReflectedEPTFault: WalkFaultSink {
        enum Kind { case none, violation, misconfiguration }
        var kind = Kind.none
        /// Bits 5:3 of the walk's qualification.
        var walked: EPTViolationQualification = []

        @inline(__always)
        mutating func record(_ fault: EPTWalkFault) {
            switch fault {
            case .violation(_, let qualification, _, _):
                kind = .violation
                walked = qualification
            case .noMemory(_, _, let path):
                // A table of L1's in no memslot: KVM's walk takes its error path as for an entry
                // that is not present, with what the entries above allowed.
                kind = .violation
                walked = NestedEPTContext.permissionBits(path)
            case .misconfiguration, .addressTooWide:
                kind = .misconfiguration
            }
        }
    }

    /// `nested_ept_inject_page_fault`'s exit qualification: bits 2:0 from the access, 5:3 what L1's
    /// entries allowed, 8:7 as the hardware reported them; every other bit clear.
    func reflectedQualification(_ errorCode: PageFaultErrorCode,
                                _ walked: EPTViolationQualification) -> EPTViolationQualification {
        var qualification = walked.intersection([.readable, .writable, .executable])
        if errorCode.contains(.user) { qualification.insert(.dataRead) }
        if errorCode.contains(.write) { qualification.insert(.dataWrite) }
        if errorCode.contains(.fetch) { qualification.insert(.instructionFetch) }
        if errorCode.contains(.guestFinal) { qualification.formUnion([.linearAddressValid, .finalTranslation]) }
        if errorCode.contains(.guestPage) { qualification.insert(.linearAddressValid) }
        return qualification
    }

    /// Bits 5:3 for the entries `path` read (all three set when it read none).
    static func permissionBits(_ path: WalkPath) -> EPTViolationQualification {
        var readable = true, writable = true, executable = true
        if path.topLevel > 0 {
            for entryLevel in stride(from: path.topLevel, through: path.bottomLevel, by: -1) {
                let entry = EPTEntry(rawValue: path.entryValue(level: entryLevel))
                readable = readable && entry.isReadable
                writable = writable && entry.isWritable
                executable = executable && entry.isExecutable
            }
        }
        var bits: EPTViolationQualification = []
        if readable { bits.insert(.readable) }
        if writable { bits.insert(.writable) }
        if executable { bits.insert(.executable) }
        return bits
    }

    /// The walk in the form `FNAME(fetch)` consumes: the L1 frame, the leaf level, the access of
    /// every level (EPT: R -> ACC_USER, W -> ACC_WRITE, X -> ACC_EXEC) and the tables it went
    /// through. `protect_clean_gpte`: with A/D on, a clean leaf is shadowed read-only for a
    /// non-write, so the first write faults and KVM sets D.
    @inline(__always)
    func guestWalk(_ translation: borrowing EPTTranslation, isWrite: Bool) -> MMUContext.GuestWalk {
        let path = translation.path
        let leafLevel = translation.level
        var walk = MMUContext.GuestWalk(gfn: translation.outputAddress.frame, level: leafLevel, pteAccess: 0)
        var above = ACC.all
        var level = path.topLevel
        var entry = EPTEntry(rawValue: 0)
        // Each entry read once, top down: the path's accessors copy its storage at every call.
        while level >= leafLevel {
            entry = EPTEntry(rawValue: path.entryValue(level: level))
            walk.setPTAccess(above, level: level)
            walk.setTableGFN(path.entryAddress(level: level).frame, level: level)
            above &= walker.format.permissions(entry) & ACC.all
            level &-= 1
        }
        // `entry` is the leaf now.
        walk.pteAccess = translation.permissions & ACC.all
        if !isWrite && pointer.accessedDirtyEnabled && !entry.isDirty { walk.pteAccess &= ~ACC.write }
        return walk
    }
}

/// What `nested_mmu` made of an L2 linear address.
public enum NestedWalkOutcome: Hashable, Sendable {
    /// L2's guest-physical address and the L1 guest-physical address behind it.
    case translated(guest: GuestPhysicalAddress, l1: GuestPhysicalAddress)
    /// L2's own #PF (`kvm_inject_emulated_page_fault` into L2).
    case injectGuestFault(errorCode: PageFaultErrorCode)
    /// L2's own #GP (a non-canonical address).
    case injectGeneralProtection
    /// A nested fault: KVM's `inject_page_fault` of `guest_mmu` exits to L1; met at the level of
    /// L2's entry being read (0: the final translation).
    case exit(NestedVMExit, guestLevel: Int)
    /// L1's tables lead outside L1's memory (KVM: the hva lookup fails and the walk errors out;
    /// nothing in L1 can be mapped there).
    case noMemory(GuestPhysicalAddress)
}

/// `nested_mmu`: walk-only, L2's paging (its CPU role from L2's CR0/CR4/EFER, guest mode set) over
/// L1's EPT or NPT, for the emulator's `gva_to_gpa`. It has no roots and no shadow pages.
public struct NestedMMU: Sendable {
    public let cpuRole: CPURole
    public let walker: NestedPagingWalker

    /// `init_kvm_nested_mmu`. L2's tables are read as KVM's `translate_nested_gpa` reads them:
    /// every access a user write for L1's tables (`nested_access`).
    public init<Memory: PhysicalMemory>(l2Registers: PagingRegisters, cpu: CPUModel, tables: NestedPagingTables,
                                        memory: Memory) throws(NestedGuestSetupError) {
        cpuRole = calcCPURole(cr0: l2Registers.cr0, cr4: l2Registers.cr4, efer: l2Registers.efer, guestMode: true)
        let guest = try NestedPagingWalker.guestWalker(registers: l2Registers, cpu: cpu, tables: tables, memory: memory)
        walker = NestedPagingWalker(guest: guest, tables: tables, rule: .alwaysWrite)
    }

    /// The same over L2's walker as the vCPU holds it: in PAE paging with the PDPTE registers the
    /// last VM entry or MOV to CR3 in L2 loaded (KVM's `kvm_pdptr_read` of the cached PDPTRs),
    /// not what L2's PDPT holds now.
    public init(l2Registers: PagingRegisters, loadedWalker: PageWalker, tables: NestedPagingTables) {
        cpuRole = calcCPURole(cr0: l2Registers.cr0, cr4: l2Registers.cr4, efer: l2Registers.efer, guestMode: true)
        walker = NestedPagingWalker(guest: loadedWalker, tables: tables, rule: .alwaysWrite)
    }

    /// `gva_to_gpa` through `nested_mmu`. KVM asks L1's tables for the final address with the
    /// access plus PFERR_USER_MASK: under EPT "user" means readable, so a fetch also needs R (an
    /// execute-only page is not fetchable by the emulator), and a violation then reports a read
    /// with the fetch.
    public func translate<Memory: PhysicalMemory>(_ address: GuestVirtualAddress, _ access: Access,
                                                  in memory: Memory) -> NestedWalkOutcome {
        switch walker.translate(address, access, in: memory) {
        case .success(let translation):
            if case .ept = walker.tables, access.kind == .fetch, translation.nestedPermissions & ACC.user == 0 {
                var qualification = qualificationOfFinal(translation.nestedPermissions)
                qualification.formUnion([.dataRead, .instructionFetch, .linearAddressValid, .finalTranslation])
                return .exit(.eptViolation(translation.guest.physicalAddress, qualification: qualification), guestLevel: 0)
            }
            return .translated(guest: translation.guest.physicalAddress, l1: translation.outputAddress)
        case .failure(let fault):
            return outcome(of: fault, access)
        }
    }

    /// Bits 5:3 from the final translation's combined EPT permissions.
    func qualificationOfFinal(_ permissions: UInt8) -> EPTViolationQualification {
        var bits: EPTViolationQualification = []
        if permissions & ACC.user != 0 { bits.insert(.readable) }
        if permissions & ACC.write != 0 { bits.insert(.writable) }
        if permissions & ACC.exec != 0 { bits.insert(.executable) }
        return bits
    }

    func outcome(of fault: NestedPagingFault, _ access: Access) -> NestedWalkOutcome {
        switch fault {
        case .guest(.pageFault(let pageFault)):
            return .injectGuestFault(errorCode: PageFaultErrorCode(rawValue: UInt64(pageFault.errorCode.architectural)))
        case .guest(.generalProtection), .guest(.addressTooWide):
            return .injectGeneralProtection
        case .guest(.noMemory(let address, _, _)), .noMemory(let address):
            return .noMemory(address)
        case .eptViolation(let site, var qualification):
            // The final access carries PFERR_USER too: a read beside whatever the access was.
            if site.isFinal { qualification.insert(.dataRead) }
            return .exit(.eptViolation(site.address, qualification: qualification), guestLevel: site.guestLevel)
        case .eptMisconfiguration(let site):
            return .exit(.eptMisconfiguration(site.address), guestLevel: site.guestLevel)
        case .nestedPageFault(let site, let errorCode):
            return .exit(.nestedPageFault(site.address, errorCode: errorCode), guestLevel: site.guestLevel)
        }
    }
}
