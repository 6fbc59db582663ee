import X86Paging

/// The VPID the hardware tags L2's translations with while KVM runs L2 (`prepare_vmcs02_early_rare`):
/// vpid02 when L1 enabled VPID in vmcs12, whatever vpid12 is (KVM gives every vpid12 the same
/// vpid02), and L1's own vpid01 when it did not (L2 then shares L1's VPID 0, as the architecture
/// has it).
public enum L2HardwareVPID: UInt8, Sendable {
    case vpid01 = 0
    case vpid02 = 1
}

/// The hardware TLB's combined mappings for L2 (SDM 29.4.1): an L2 linear page translated
/// through L2's paging and `guest_mmu`'s shadow EPT (or NPT) to a host frame, tagged with the VPID
/// the hardware ran L2 under, the root of the EPT it walked (the EP4TA: `guest_mmu`'s root, one
/// per L1 EPTP) and the PCID. Bounded and direct-mapped (one entry per page, VPID and root: two
/// PCIDs of a page evict each other); invalidation is by clearing entries, so nothing allocates
/// after `init`.
public final class L2TLB {
    public struct Entry: Equatable, Sendable {
        var page: UInt64
        var root: UInt64
        var vpid: L2HardwareVPID
        var pcid: UInt16
        var isGlobal: Bool
        var valid: Bool
        public var hostFrame: UInt64
        /// L2's guest-physical frame, for reports.
        public var l2Frame: UInt64
        /// L2's combined ACC bits (1 execute, 2 write, 4 user).
        public var guestPermissions: UInt8
        /// The access kinds L1's tables allow (bit `AccessKind.rawValue`).
        public var nestedKinds: UInt8
        /// Cached by a write: L2's leaf and (with EPT A/D) L1's leaf are dirty, so a write may use
        /// the entry without walking.
        public var dirty: Bool

        static let empty = Entry(page: 0, root: 0, vpid: .vpid01, pcid: 0, isGlobal: false, valid: false, hostFrame: 0,
                                 l2Frame: 0, guestPermissions: 0, nestedKinds: 0, dirty: false)
    }

    private let entries: UnsafeMutablePointer<Entry>
    public let capacity: Int

    /// - Parameter capacity: a power of two.
    public init(capacity: Int = 256) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0, "L2 TLB capacity must be a power of two")
        self.capacity = capacity
        entries = .allocate(capacity: capacity)
        entries.initialize(repeating: .empty, count: capacity)
    }

    deinit { entries.deallocate() }

    @inline(__always)
    private func slot(_ page: UInt64, _ root: UInt64, _ vpid: L2HardwareVPID) -> Int {
        Int(truncatingIfNeeded: (page ^ (page >> 9) ^ (root &* 0x9E37_79B9) ^ UInt64(vpid.rawValue) << 7)
            & UInt64(capacity - 1))
    }

    /// The entry for the page of `address` under these tags: one of PCID `pcid`, or a global one.
    @inline(__always)
    public func lookup(_ address: GuestVirtualAddress, root: UInt64, vpid: L2HardwareVPID, pcid: UInt16) -> Entry? {
        let page = address.rawValue >> 12
        let entry = entries[slot(page, root, vpid)]
        guard entry.valid, entry.page == page, entry.root == root, entry.vpid == vpid,
              entry.isGlobal || entry.pcid == pcid else { return nil }
        return entry
    }

    public func insert(_ address: GuestVirtualAddress, root: UInt64, vpid: L2HardwareVPID, pcid: UInt16, isGlobal: Bool,
                       hostFrame: UInt64, l2Frame: UInt64, guestPermissions: UInt8, nestedKinds: UInt8, dirty: Bool) {
        let page = address.rawValue >> 12
        entries[slot(page, root, vpid)] = Entry(page: page, root: root, vpid: vpid, pcid: pcid, isGlobal: isGlobal, valid: true,
                                                hostFrame: hostFrame, l2Frame: l2Frame, guestPermissions: guestPermissions,
                                                nestedKinds: nestedKinds, dirty: dirty)
    }

    /// Drops the entries matching `shouldDrop`.
    @inline(__always)
    func invalidate(where shouldDrop: (Entry) -> Bool) {
        for index in 0..<capacity where entries[index].valid && shouldDrop(entries[index]) { entries[index].valid = false }
    }

    /// Every entry (KVM_REQ_TLB_FLUSH's `flush_tlb_all`).
    public func flushAll() { invalidate { _ in true } }

    /// The entries of one VPID (INVVPID single-context or all-context of vpid02, or a flush of
    /// vpid01 at a transition without VPID), every root and PCID.
    public func flush(vpid: L2HardwareVPID) { invalidate { $0.vpid == vpid } }

    /// The entries walked from `root`, every VPID (`ept_sync_context` of the root KVM loads).
    public func flush(root: UInt64) { invalidate { $0.root == root } }

    /// The non-global entries of one VPID and PCID, every root (a MOV to CR3).
    public func flushNonGlobal(vpid: L2HardwareVPID, pcid: UInt16) {
        invalidate { $0.vpid == vpid && $0.pcid == pcid && !$0.isGlobal }
    }

    /// The entries for the page of `address` of one VPID, every root: of PCID `pcid` and the
    /// global ones (INVLPG), or with `pcid` nil of every PCID (INVVPID individual-address).
    public func invalidate(_ address: GuestVirtualAddress, vpid: L2HardwareVPID, pcid: UInt16?) {
        let page = address.rawValue >> 12
        invalidate { $0.page == page && $0.vpid == vpid && (pcid == nil || $0.isGlobal || $0.pcid == pcid) }
    }

    /// INVPCID of `type` in L2 for one VPID, every root (SDM vol. 2, INVPCID).
    public func invalidatePCID(_ type: INVPCIDType, pcid: UInt16, address: GuestVirtualAddress, vpid: L2HardwareVPID) {
        let page = address.rawValue >> 12
        invalidate { entry in
            guard entry.vpid == vpid else { return false }
            switch type {
            case .individualAddress: return entry.page == page && entry.pcid == pcid && !entry.isGlobal
            case .singleContext: return entry.pcid == pcid && !entry.isGlobal
            case .allContextsIncludingGlobal: return true
            case .allContextsExceptGlobal: return !entry.isGlobal
            }
        }
    }

    /// The valid entries, for reports and tests.
    public var validEntries: Int { (0..<capacity).count { entries[$0].valid } }
}
