// Process-context identifiers (SDM vol. 3, 4.10.1 and 4.10.4.1): with CR4.PCIDE, CR3 bits 11:0
// name the PCID that tags the translations the processor caches, and MOV to CR3 may keep them.

extension PagingRegisters {
    /// The current PCID: CR3 bits 11:0 with CR4.PCIDE, else 0 (SDM 4.10.1).
    @inlinable public var pcid: UInt16 { pcid(ofCR3: cr3) }

    /// The PCID a CR3 value would load under these registers' CR4.PCIDE (KVM's `kvm_get_pcid`).
    @inlinable public func pcid(ofCR3 value: UInt64) -> UInt16 {
        cr4.contains(.pcidEnable) ? UInt16(truncatingIfNeeded: value & 0xFFF) : 0
    }

    /// Bit 63 of the source of MOV to CR3: with CR4.PCIDE, keep the new PCID's translations. It is
    /// an instruction flag, never stored in CR3.
    public static let cr3NoFlushBit: UInt64 = 1 << 63
}

/// The INVPCID types (SDM vol. 2, INVPCID).
public enum INVPCIDType: Int, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// Type 0: the non-global translations of one linear address for one PCID.
    case individualAddress = 0
    /// Type 1: the non-global translations of one PCID.
    case singleContext = 1
    /// Type 2: every translation, global ones included, of every PCID.
    case allContextsIncludingGlobal = 2
    /// Type 3: the non-global translations of every PCID.
    case allContextsExceptGlobal = 3

    public var description: String {
        switch self {
        case .individualAddress: "individual-address"
        case .singleContext: "single-context"
        case .allContextsIncludingGlobal: "all-contexts-including-global"
        case .allContextsExceptGlobal: "all-contexts-except-global"
        }
    }
}
