// Sub-page write protection (SPP) at the VM's level (docs/SPP.md): KVM_CHECK_EXTENSION and
// KVM_ENABLE_CAP of KVM_CAP_X86_SPP, the VMM's KVM_SUBPAGES_SET_ACCESS / GET_ACCESS, and the
// emulator's check. The processor's side lives in VCPU+TDP.swift, KVM's in KVMMMU.

import GuestMemory
import KVMMMU
import X86Paging

/// What KVM_CHECK_EXTENSION(KVM_CAP_X86_SPP) tells a VMM about this VM, and what L1 sees of it.
public struct SubPageProtectionCapability: Equatable, Sendable {
    /// KVM_CHECK_EXTENSION's answer: the most pages one SET or GET covers
    /// (`KVM_SUBPAGE_MAX_PAGES`), 0 when SPP cannot be enabled (no TDP, or NPT).
    public var maxPagesPerRequest: Int
    /// Whether an L1 hypervisor sees SPP (the SPP secondary control in its VMX capabilities, an
    /// SPPTP to set): never. SPP is hidden from L1 and excludes nested virtualization, as the
    /// series decided (docs/SPP.md, "Nested virtualization").
    public var exposedToL1: Bool

    public var isSupported: Bool { maxPagesPerRequest > 0 }

    public init(maxPagesPerRequest: Int, exposedToL1: Bool) {
        self.maxPagesPerRequest = maxPagesPerRequest
        self.exposedToL1 = exposedToL1
    }
}

extension VirtualMachine {
    /// KVM_CHECK_EXTENSION(KVM_CAP_X86_SPP).
    public var subPageProtectionCapability: SubPageProtectionCapability {
        let supported = tdp?.masks.isEPT == true
        return SubPageProtectionCapability(maxPagesPerRequest: supported ? SubPageProtection.maxPagesPerRequest : 0,
                                           exposedToL1: false)
    }

    /// SPP's manager, once enabled.
    public var subPageProtection: SubPageProtection? { tdp?.subPageProtection }

    /// KVM_ENABLE_CAP(KVM_CAP_X86_SPP): SPP for this VM from now on (again: nothing changes).
    /// Refused unless the VM runs under TDP with EPT and write-protection dirty logging.
    public func enableSubPageProtection() throws(VirtualMachineError) {
        guard let tdp, tdp.masks.isEPT else {
            throw .unsupported("sub-page write protection needs the TDP MMU with EPT")
        }
        do {
            try tdp.enableSubPageProtection()
        } catch {
            throw .unsupported("\(error)")
        }
    }

    /// KVM_SUBPAGES_SET_ACCESS: page `gfn + i` gets `masks[i]` (bit j: sub-page j writable).
    public func setSubpageAccess(gfn: GuestFrameNumber, masks: [SubPageWriteMask]) throws(VirtualMachineError) {
        guard let tdp, tdp.subPageProtection != nil else { throw .subPageProtection(.notEnabled) }
        do {
            try tdp.setSubpageAccess(gfn: gfn, count: masks.count, masks: masks)
        } catch {
            throw Self.vmError(error)
        }
    }

    /// KVM_SUBPAGES_GET_ACCESS of `count` pages from `gfn`.
    public func getSubpageAccess(gfn: GuestFrameNumber, count: Int = 1) throws(VirtualMachineError) -> [SubPageWriteMask] {
        guard let tdp, tdp.subPageProtection != nil else { throw .subPageProtection(.notEnabled) }
        do {
            return try tdp.getSubpageAccess(gfn: gfn, count: count)
        } catch {
            throw Self.vmError(error)
        }
    }

    /// SPP's refusal as itself; anything else the TDP MMU refused (memslots changed behind it).
    private static func vmError(_ error: TDPMMUError) -> VirtualMachineError {
        if case .subPageProtection(let refusal) = error { return .subPageProtection(refusal) }
        return .memslot("\(error)")
    }
}

extension VCPU {
    /// The emulator's SPP check of a write of `size` bytes at `gpa` (Jim Mattson's point): the
    /// refused address, after tracing the exit, or nil when the write may go on.
    func emulatedWriteRefusal(at gpa: GuestPhysicalAddress, size: Int) -> GuestPhysicalAddress? {
        guard let protection = vm.subPageProtection,
              case .denied(let address, _)? = try? protection.checkEmulatedWrite(at: gpa, byteCount: UInt64(size))
        else { return nil }
        // The model's accesses have no instruction bytes: `insn_len` 0.
        return protection.subPageWriteExit(vcpuID: id, address: address, instructionLength: 0).address
    }
}
