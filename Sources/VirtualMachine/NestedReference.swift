import GuestMemory
import KVMMMU
import X86Paging

// The lockstep reference for L2: what the architecture allows an L2 access for the composed
// translation (L2's paging, then L1's EPT or NPT, both read from L1's memory): the same host page,
// the same L2 fault, or the same exit to L1 with the same qualification (or #NPF error code) for
// the same L2 guest-physical address, reported at the same level of L2's walk. The architecture's
// side is X86Paging's `NestedPagingWalker`, never KVM's walk.
//
// The model's L2 caches no translation (no TLB entries, and KVM's write tracking makes every
// change of L1's tables visible at once), so the newest walk is the only answer allowed: a stale
// translation L1 has not yet invalidated with INVEPT would be allowed too, but never arises.

extension VCPU {
    /// The architecture's answer for L2's access at `address` now. Its walk sets the A/D bits the
    /// access sets (in L2's tables and, with EPTP.AD, in L1's EPT), as the processor would.
    public func architecturalL2(_ address: GuestVirtualAddress,
                                _ access: Access) throws(VirtualMachineError) -> Result<NestedPagingTranslation, NestedPagingFault> {
        guard let nested else { throw .invalidAccess("vCPU \(id) has never entered L2") }
        // L2's walker as VM entry or L2's last MOV to CR3 loaded it: in PAE paging its PDPTE
        // registers hold what L2's PDPT had then, whatever L2 has written there since.
        return NestedPagingWalker(guest: nested.guestWalker, tables: nested.l1Tables).translate(address, access, in: vm.memory)
    }

    /// The L1 guest-physical address L1's tables give L2's guest-physical `address` for a read,
    /// as the architecture reads them, setting no A/D bit: how the software that owns L2's memory
    /// (L2's kernel reading its own tables in a scenario) finds it without an access. The fault
    /// when L1's tables refuse the read.
    public func l1Address(ofL2Physical address: GuestPhysicalAddress) throws(VirtualMachineError) -> Result<GuestPhysicalAddress, NestedPagingFault> {
        guard let nested else { throw .invalidAccess("vCPU \(id) has never entered L2") }
        let pagingOff: PageWalker
        do {
            pagingOff = try PageWalker(registers: PagingRegisters(), cpu: vm.cpu, memory: vm.memory)
        } catch {
            throw .impossibleRegisters(error)
        }
        return NestedPagingWalker(guest: pagingOff, tables: nested.l1Tables)
            .translate(GuestVirtualAddress(address.rawValue), Access(.read, .supervisor), in: vm.memory, setAccessedDirty: false)
            .map(\.outputAddress)
    }

    /// Checks an L2 access's outcome against the architecture's answer `expected` (from
    /// `architecturalL2`, asked after the access: the access's own A/D updates leave the answer
    /// unchanged). Throws the disagreement.
    public func checkL2(_ outcome: L2AccessOutcome, at address: GuestVirtualAddress, _ access: Access,
                        expected: Result<NestedPagingTranslation, NestedPagingFault>) throws(LockstepDisagreement) {
        if Self.l2OutcomeAgrees(outcome, expected, memory: vm.memory) { return }
        throw LockstepDisagreement(address: address, access: access, expected: "\(expected)",
                                   actual: "\(outcome.result) (level \(outcome.exitGuestLevel.map(String.init) ?? "-"))",
                                   entries: [])
    }

    static func l2OutcomeAgrees(_ outcome: L2AccessOutcome, _ expected: Result<NestedPagingTranslation, NestedPagingFault>,
                                memory: MemslotSet) -> Bool {
        switch (expected, outcome.result) {
        case (.success(let translation), .completed(let gpa, let hostAddress, _)):
            guard let frame = memory.hostFrame(of: translation.outputAddress.frame) else { return false }
            return gpa == translation.guest.physicalAddress
                && hostAddress == frame.rawValue << 12 | translation.outputAddress.pageOffset
        case (.success(let translation), .mmio(let l1GPA, _)):
            // KVM's emulator sends to the VMM what no writable memslot holds.
            let slot = memory.slot(containing: l1GPA.frame)
            return l1GPA == translation.outputAddress && (slot == nil || slot?.flags.contains(.readOnly) == true)
        case (.failure(.guest(.pageFault(let fault))), .pageFault(let errorCode, _)):
            return errorCode.rawValue == UInt64(fault.errorCode.architectural)
        case (.failure(.guest(.generalProtection)), .generalProtection), (.failure(.guest(.addressTooWide)), .generalProtection):
            return true
        case (.failure(.eptViolation(let site, let qualification)), .exitToL1(.eptViolation(let address, let reflected))):
            return address == site.address && reflected == qualification && outcome.exitGuestLevel == site.guestLevel
        case (.failure(.eptMisconfiguration(let site)), .exitToL1(.eptMisconfiguration(let address))):
            return address == site.address && outcome.exitGuestLevel == site.guestLevel
        case (.failure(.nestedPageFault(let site, let code)), .exitToL1(.nestedPageFault(let address, let reflected))):
            return address == site.address && reflected == code && outcome.exitGuestLevel == site.guestLevel
        default:
            return false
        }
    }
}
