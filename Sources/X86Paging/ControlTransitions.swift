// The architecture's rules for changing the paging controls (SDM vol. 2, MOV to CR0/CR4 and WRMSR
// IA32_EFER; vol. 3, 4.1.2 and 9.8.5): which register writes raise #GP because of the state they
// leave or the state they leave from. `PageWalker.init` checks that a register state can be walked;
// these rules are about the step from one state to the next, which is how a guest switches modes.

/// Why the processor refuses a write to CR0, CR4 or EFER (a #GP on the instruction).
public enum ControlTransitionFault: Error, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// MOV to CR0 setting PG while PE is clear.
    case pagingWithoutProtection
    /// MOV to CR0 setting NW while CD is clear.
    case notWriteThroughWithoutCacheDisable
    /// MOV to CR0 setting PG while EFER.LME=1 and CR4.PAE=0 (IA-32e mode needs PAE).
    case longModeWithoutPAE
    /// MOV to CR4 clearing PAE while IA-32e mode is active.
    case paeClearedInLongMode
    /// MOV to CR4 changing LA57 while IA-32e mode is active.
    case la57ChangedInLongMode
    /// WRMSR to EFER changing LME while CR0.PG=1.
    case longModeEnableChangedWithPaging
    /// CR4.PCIDE=1 outside IA-32e mode: setting it with EFER.LMA=0, or leaving IA-32e mode (clearing
    /// CR0.PG) with it set.
    case pcidOutsideLongMode
    /// MOV to CR4 setting PCIDE while CR3[11:0] is not 0.
    case pcidEnabledWithNonZeroCR3Low
    /// CR4.LA57 set on a CPU without 5-level paging (a reserved bit).
    case la57Unsupported
    /// EFER.NXE set on a CPU without NX (a reserved bit).
    case noExecuteUnsupported

    public var description: String {
        switch self {
        case .pagingWithoutProtection: "CR0.PG cannot be set while CR0.PE=0"
        case .notWriteThroughWithoutCacheDisable: "CR0.NW cannot be set while CR0.CD=0"
        case .longModeWithoutPAE: "CR0.PG cannot be set with EFER.LME=1 while CR4.PAE=0 (IA-32e mode needs PAE)"
        case .paeClearedInLongMode: "CR4.PAE cannot be cleared while long mode is active"
        case .la57ChangedInLongMode: "CR4.LA57 cannot change while long mode is active"
        case .longModeEnableChangedWithPaging: "EFER.LME cannot change while CR0.PG=1"
        case .pcidOutsideLongMode:
            "CR4.PCIDE must be 0 outside long mode (it cannot be set while EFER.LMA=0, and CR0.PG cannot be "
                + "cleared while it is set)"
        case .pcidEnabledWithNonZeroCR3Low: "CR4.PCIDE cannot be set while CR3[11:0] is not 0"
        case .la57Unsupported: "CR4.LA57 is reserved: the CPU model has no 5-level paging"
        case .noExecuteUnsupported: "EFER.NXE is reserved: the CPU model has no NX"
        }
    }
}

extension PagingRegisters {
    /// These registers with EFER.LMA as the processor keeps it: set exactly when EFER.LME and
    /// CR0.PG are both set. Software cannot write LMA; whatever a written value says is replaced.
    public var withComputedLongModeActive: PagingRegisters {
        var registers = self
        if isLongModeActive { registers.efer.insert(.longModeActive) } else { registers.efer.remove(.longModeActive) }
        return registers
    }

    /// The mode paging would be in with CR0.PG set and the rest as it is: what the registers
    /// prepare while paging is off (an OS loads CR3 with that mode's root before it sets PG).
    public var modeWithPagingOn: PagingMode {
        var registers = self
        registers.cr0.insert(.paging)
        return registers.mode
    }

    /// Why the processor would refuse the write that takes these registers to `new`, or nil if it
    /// allows it. LMA is taken as computed (see `withComputedLongModeActive`), whatever either
    /// state says. A real instruction changes one register; when `new` differs in several (the
    /// scenario language's `set`), every rule must hold on both sides of the change, so a step
    /// the hardware would need two instructions for in a particular order is judged strictly.
    public func transitionFault(to new: PagingRegisters, cpu: CPUModel) -> ControlTransitionFault? {
        let old = self
        let oldLongMode = old.isLongModeActive, newLongMode = new.isLongModeActive
        let cr0CD = CR0(rawValue: 1 << 30), cr0NW = CR0(rawValue: 1 << 29)
        // Reserved bits first: no state with them set is reachable.
        if new.cr4.contains(.la57) && !cpu.supportsLA57 { return .la57Unsupported }
        if new.efer.contains(.noExecuteEnable) && !cpu.supportsNX { return .noExecuteUnsupported }
        // MOV to CR0.
        if new.cr0.contains(.paging) && !new.cr0.contains(.protectionEnable) { return .pagingWithoutProtection }
        if new.cr0.contains(cr0NW) && !new.cr0.contains(cr0CD) { return .notWriteThroughWithoutCacheDisable }
        // WRMSR EFER: LME is frozen while paging is on.
        if old.efer.contains(.longModeEnable) != new.efer.contains(.longModeEnable)
            && (old.cr0.contains(.paging) || new.cr0.contains(.paging)) {
            return .longModeEnableChangedWithPaging
        }
        // MOV to CR4 in IA-32e mode: PAE stays set and LA57 stays as it is.
        if (oldLongMode || newLongMode) && old.cr4.contains(.physicalAddressExtension)
            && !new.cr4.contains(.physicalAddressExtension) {
            return .paeClearedInLongMode
        }
        if (oldLongMode || newLongMode) && old.cr4.contains(.la57) != new.cr4.contains(.la57) {
            return .la57ChangedInLongMode
        }
        // Entering IA-32e mode needs PAE (MOV to CR0 setting PG with LME=1).
        if newLongMode && !new.cr4.contains(.physicalAddressExtension) { return .longModeWithoutPAE }
        // PCIDs exist only in IA-32e mode, and are switched on only from PCID 0.
        if new.cr4.contains(.pcidEnable) && !newLongMode { return .pcidOutsideLongMode }
        if new.cr4.contains(.pcidEnable) && !old.cr4.contains(.pcidEnable) && old.cr3 & 0xFFF != 0 {
            return .pcidEnabledWithNonZeroCR3Low
        }
        return nil
    }
}

extension PagingRegisters {
    /// Whether INVPCID of `type` for `pcid` (and `address`, for an individual address) raises #GP
    /// under these registers (SDM vol. 2, INVPCID): a PCID above 4095 (descriptor bits 63:12 not 0);
    /// a non-zero PCID for the types that name one while CR4.PCIDE=0; a non-canonical address for
    /// an individual-address invalidation in IA-32e mode.
    public func invpcidFaults(_ type: INVPCIDType, pcid: UInt64, address: GuestVirtualAddress) -> Bool {
        if pcid > 0xFFF { return true }
        switch type {
        case .individualAddress, .singleContext:
            if !cr4.contains(.pcidEnable) && pcid != 0 { return true }
        case .allContextsIncludingGlobal, .allContextsExceptGlobal:
            break
        }
        return type == .individualAddress && mode.isLongMode && !address.isCanonical(width: mode.linearAddressWidth)
    }
}
