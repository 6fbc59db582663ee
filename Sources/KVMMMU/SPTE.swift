// The SPTE: one entry of KVM's own page tables (spte.h / spte.c). Its format is chosen at run time:
// x86 (shadow paging and NPT) or EPT, with or without hardware A/D bits. KVM keeps that choice in
// global masks set once by kvm_mmu_reset_all_pte_masks / kvm_mmu_set_ept_masks; the model passes
// them as a value, `SPTEMasks`, to every predicate and constructor that reads one.
//
// Bits common to every format: 1 = W, 7 = PS, 11 = MMU-present (software; ignored by hardware in every
// format), 12-51 = PFN, 52-53 = A/D type (software). See `SPTEMasks` for the rest.

import X86Paging

/// KVM's runtime SPTE masks (`shadow_*_mask`, `kvm_ad_enabled`, the MMIO value/mask).
@frozen
public struct SPTEMasks: Hashable, Sendable {
    /// `shadow_present_mask`: set in every present SPTE. x86: P (bit 0). EPT: R (bit 0) unless the CPU
    /// supports execute-only, plus suppress-#VE (bit 63).
    public var present: UInt64
    /// `shadow_user_mask`: set when the access includes ACC.user. x86: U/S (bit 2). EPT: R (bit 0).
    public var user: UInt64
    /// `shadow_x_mask`: set when executable. x86: 0. EPT: X (bit 2).
    public var x: UInt64
    /// `shadow_nx_mask`: set when not executable. x86: XD (bit 63). EPT: 0.
    public var nx: UInt64
    /// `shadow_accessed_mask`. x86: A (bit 5). EPT: bit 8 (hardware A with A/D on, software otherwise).
    public var accessed: UInt64
    /// `shadow_dirty_mask`. x86: D (bit 6). EPT: bit 9.
    public var dirty: UInt64
    /// `shadow_host_writable_mask`: the host mapping allows writes. x86: bit 9. EPT: bit 57.
    public var hostWritable: UInt64
    /// `shadow_mmu_writable_mask`: KVM is not write-protecting the gfn for shadow paging. x86: bit 10.
    /// EPT: bit 58.
    public var mmuWritable: UInt64
    /// `shadow_acc_track_mask`: bits cleared to make an A/D-disabled SPTE fault on access. x86: 0.
    /// EPT: RWX (bits 0-2).
    public var accTrack: UInt64
    /// What `get_mt_mask` contributes for guest RAM. x86: 0 (no EPT memory type). EPT: memory type WB
    /// (6 << 3) | IPAT (bit 6), VMX's answer without non-coherent DMA. The model maps no host MMIO.
    public var memoryType: UInt64
    /// `shadow_mmio_value`: what an MMIO SPTE's `mmioMask` bits equal. 0 disables MMIO caching.
    public var mmioValue: UInt64
    /// `shadow_mmio_mask`.
    public var mmioMask: UInt64
    /// `shadow_mmio_access_mask`: ACC bits an MMIO SPTE keeps. x86: W|U. EPT: none.
    public var mmioAccessMask: UInt64
    /// `kvm_ad_enabled`: hardware A/D bits are in use (always for x86; EPT with A/D support).
    public var accessedDirtyEnabled: Bool
    /// The host's MAXPHYADDR: bits 12..(this-1) of an MMIO SPTE hold its gfn
    /// (`shadow_nonpresent_or_rsvd_lower_gfn_mask`).
    public var hostPhysicalAddressBits: Int
    /// Whether this is the EPT format.
    public var isEPT: Bool

    @inlinable
    public init(present: UInt64, user: UInt64, x: UInt64, nx: UInt64, accessed: UInt64, dirty: UInt64,
                hostWritable: UInt64, mmuWritable: UInt64, accTrack: UInt64, memoryType: UInt64,
                mmioValue: UInt64, mmioMask: UInt64, mmioAccessMask: UInt64, accessedDirtyEnabled: Bool,
                hostPhysicalAddressBits: Int, isEPT: Bool) {
        self.present = present
        self.user = user
        self.x = x
        self.nx = nx
        self.accessed = accessed
        self.dirty = dirty
        self.hostWritable = hostWritable
        self.mmuWritable = mmuWritable
        self.accTrack = accTrack
        self.memoryType = memoryType
        self.mmioValue = mmioValue
        self.mmioMask = mmioMask
        self.mmioAccessMask = mmioAccessMask
        self.accessedDirtyEnabled = accessedDirtyEnabled
        self.hostPhysicalAddressBits = hostPhysicalAddressBits
        self.isEPT = isEPT
    }

    /// The x86 format KVM uses for shadow paging and NPT (`kvm_mmu_reset_all_pte_masks`) on a host
    /// with MAXPHYADDR 46: MMIO SPTEs are marked with reserved PA bit 51 plus P, so an access faults
    /// with PFEC.RSVD.
    @inlinable public static var shadowPaging: SPTEMasks { shadowPaging(hostPhysicalAddressBits: 46) }

    /// The x86 format for a host with the given MAXPHYADDR. With 52 bits there is no reserved PA bit
    /// to mark MMIO SPTEs with, so MMIO caching is off (`mmioValue == 0`).
    @inlinable
    public static func shadowPaging(hostPhysicalAddressBits: Int) -> SPTEMasks {
        let mmio: UInt64 = hostPhysicalAddressBits < 52 ? (1 << 51) | SPTE.x86PresentBit : 0
        return SPTEMasks(present: SPTE.x86PresentBit, user: 1 << 2, x: 0, nx: 1 << 63,
                         accessed: 1 << 5, dirty: 1 << 6, hostWritable: 1 << 9, mmuWritable: 1 << 10,
                         accTrack: 0, memoryType: 0,
                         mmioValue: mmio, mmioMask: mmio, mmioAccessMask: UInt64(ACC.write | ACC.user),
                         accessedDirtyEnabled: true, hostPhysicalAddressBits: hostPhysicalAddressBits,
                         isEPT: false)
    }

    /// The EPT format (`kvm_mmu_set_ept_masks`). MMIO SPTEs are W|X without R, an EPT
    /// misconfiguration, so they exit with EPT_MISCONFIG.
    /// - Parameters:
    ///   - accessedDirty: the CPU has EPT A/D bits and KVM uses them (`kvm_ad_enabled`). Bits 8/9 are
    ///     the accessed/dirty masks either way (v6.13+); without hardware A/D they are software bits
    ///     and SPTEs are access-tracked by clearing RWX.
    ///   - executeOnly: the CPU supports execute-only entries, so readability is not implied by
    ///     presence.
    @inlinable
    public static func ept(accessedDirty: Bool, executeOnly: Bool, hostPhysicalAddressBits: Int = 46) -> SPTEMasks {
        let readable: UInt64 = 1 << 0
        let executable: UInt64 = 1 << 2
        let suppressVE: UInt64 = 1 << 63
        let rwx: UInt64 = 0b111
        return SPTEMasks(present: (executeOnly ? 0 : readable) | suppressVE, user: readable, x: executable, nx: 0,
                         accessed: 1 << 8, dirty: 1 << 9, hostWritable: 1 << 57, mmuWritable: 1 << 58,
                         accTrack: rwx, memoryType: (6 << 3) | (1 << 6),
                         mmioValue: 0b110, mmioMask: rwx | suppressVE, mmioAccessMask: 0,
                         accessedDirtyEnabled: accessedDirty, hostPhysicalAddressBits: hostPhysicalAddressBits,
                         isEPT: true)
    }

    /// `enable_mmio_caching`: KVM installs MMIO SPTEs only when there is an MMIO value to mark them.
    @inlinable public var isMMIOCachingEnabled: Bool { mmioValue != 0 }

    /// `shadow_nonpresent_or_rsvd_lower_gfn_mask`: where an MMIO SPTE keeps its gfn. The model has no
    /// L1TF mitigation (`shadow_nonpresent_or_rsvd_mask` = 0), so the gfn is never split and relocated.
    @inlinable public var mmioGFNMask: UInt64 { bitRange(pageShift, hostPhysicalAddressBits - 1) }
}

/// The A/D type of a shadow-present SPTE (bits 52-53, `SPTE_TDP_AD_*`).
public enum SPTEADState: UInt64, Sendable, Hashable, CaseIterable {
    /// SPTE_TDP_AD_ENABLED (0): hardware maintains A and D. Always the case for x86 SPTEs, where bits
    /// 52-62 are reserved in PAE entries.
    case enabled = 0
    /// SPTE_TDP_AD_DISABLED (1): no hardware A/D; access is tracked by making the SPTE not present.
    case disabled = 1
    /// SPTE_TDP_AD_WRPROT_ONLY (2): A/D on but dirty logging must write-protect (L2 with PML).
    case wrprotOnly = 2
}

/// One shadow (or TDP) page-table entry.
@frozen
public struct SPTE: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    public typealias ADState = SPTEADState

    // Bits that mean the same in every format.
    @usableFromInline static var x86PresentBit: UInt64 { 1 << 0 }
    /// PT_WRITABLE_MASK, bit 1 (EPT's W is the same bit).
    @inlinable public static var writableBit: UInt64 { 1 << 1 }
    /// PT_PAGE_SIZE_MASK, bit 7 (EPT's PS is the same bit).
    @inlinable public static var pageSizeBit: UInt64 { 1 << 7 }
    /// SPTE_MMU_PRESENT_MASK, bit 11: ignored by hardware in every format, so KVM can mark SPTEs it
    /// considers present even when hardware does not (access-tracked SPTEs).
    @inlinable public static var mmuPresentBit: UInt64 { 1 << 11 }
    /// SPTE_BASE_ADDR_MASK, bits 12-51.
    @inlinable public static var baseAddressMask: UInt64 { bitRange(12, 51) }
    @usableFromInline static var adShift: UInt64 { 52 }
    /// SPTE_TDP_AD_MASK, bits 52-53.
    @inlinable public static var adMask: UInt64 { 3 << 52 }
    /// SHADOW_ACC_TRACK_SAVED_BITS_MASK (EPT R|X) and its shift: an access-tracked SPTE keeps R in
    /// bit 54 and X in bit 56.
    @usableFromInline static var accTrackSavedBits: UInt64 { 0b101 }
    @usableFromInline static var accTrackSavedShift: UInt64 { 54 }
    /// MMIO generation: generation bits 0-7 live in SPTE bits 3-10, bits 8-18 in SPTE bits 52-62.
    @usableFromInline static var mmioGenLowMask: UInt64 { bitRange(3, 10) }
    @usableFromInline static var mmioGenHighMask: UInt64 { bitRange(52, 62) }
    /// MMIO_SPTE_GEN_MASK: the 19 generation bits an MMIO SPTE can hold.
    @inlinable public static var mmioGenerationMask: UInt64 { bitRange(0, 18) }

    /// SHADOW_NONPRESENT_VALUE, the value of an empty SPTE. KVM (v6.10+) uses bit 63 on 64-bit hosts
    /// so that non-present EPT entries suppress #VE, which TDX needs; the model has neither #VE nor TDX,
    /// so it uses 0, KVM's value on 32-bit hosts and before v6.10. Nothing in this file depends on the
    /// choice: no predicate treats bit 63 of a non-present SPTE as meaningful.
    @inlinable public static var nonPresent: SPTE { SPTE(0) }

    /// FROZEN_SPTE (REMOVED_SPTE in older kernels): the TDP MMU's placeholder while one thread owns an
    /// entry. Not MMU-present, no RWX, no PFN.
    @inlinable public static var frozen: SPTE { SPTE(nonPresent.rawValue | 0x5a0) }

    // MARK: Predicates

    /// `is_shadow_present_pte`: KVM considers the SPTE present (bit 11), whether or not hardware does.
    @inlinable public var isShadowPresent: Bool { rawValue & Self.mmuPresentBit != 0 }

    /// `is_frozen_spte`.
    @inlinable public var isFrozen: Bool { self == Self.frozen }

    /// `is_large_pte`: PS is set.
    @inlinable public var isLarge: Bool { rawValue & Self.pageSizeBit != 0 }

    /// `is_last_spte`: the SPTE maps a page (every level-1 SPTE, or a huge page above).
    @inlinable public func isLast(level: Int) -> Bool { level == KVMLevel.pageTable || isLarge }

    /// `is_writable_pte`: hardware W.
    @inlinable public var isWritable: Bool { rawValue & Self.writableBit != 0 }

    /// `is_mmu_writable_spte`: KVM is not write-protecting the gfn for shadow paging.
    @inlinable public func isMMUWritable(_ masks: SPTEMasks) -> Bool { rawValue & masks.mmuWritable != 0 }

    /// The host mapping allows writes (set only when the SPTE is created, never changed after).
    @inlinable public func isHostWritable(_ masks: SPTEMasks) -> Bool { rawValue & masks.hostWritable != 0 }

    /// `is_accessed_spte`.
    @inlinable public func isAccessed(_ masks: SPTEMasks) -> Bool { rawValue & masks.accessed != 0 }

    /// The dirty bit (`shadow_dirty_mask`).
    @inlinable public func isDirty(_ masks: SPTEMasks) -> Bool { rawValue & masks.dirty != 0 }

    /// `is_executable_pte`: X set (EPT) or XD clear (x86).
    @inlinable public func isExecutable(_ masks: SPTEMasks) -> Bool {
        rawValue & (masks.x | masks.nx) == masks.x
    }

    /// `spte_to_pfn`.
    @inlinable public var pfn: HostFrameNumber { HostFrameNumber((rawValue & Self.baseAddressMask) >> UInt64(pageShift)) }

    /// The A/D type, bits 52-53; nil for the pattern 3, which KVM never writes. Meaningful only for
    /// shadow-present SPTEs (MMIO SPTEs keep generation bits there).
    @inlinable public var adState: ADState? { ADState(rawValue: (rawValue & Self.adMask) >> Self.adShift) }

    /// `spte_ad_enabled`: the A/D type is not "disabled".
    @inlinable public var isADEnabled: Bool { rawValue & Self.adMask != ADState.disabled.rawValue << Self.adShift }

    /// `spte_ad_need_write_protect`: the A/D type is not "enabled", so dirty tracking must
    /// write-protect.
    @inlinable public var needsADWriteProtect: Bool { rawValue & Self.adMask != 0 }

    /// `is_access_track_spte`: an A/D-disabled SPTE whose RWX bits were cleared to catch the next
    /// access.
    @inlinable public func isAccessTracked(_ masks: SPTEMasks) -> Bool {
        !isADEnabled && rawValue & masks.accTrack == 0
    }

    /// `is_mmio_spte`: the SPTE caches "this gfn is emulated MMIO".
    @inlinable public func isMMIO(_ masks: SPTEMasks) -> Bool {
        masks.isMMIOCachingEnabled && rawValue & masks.mmioMask == masks.mmioValue
    }

    /// `check_spte_writable_invariants`, for a shadow-present leaf: MMU-writable implies
    /// host-writable, and W implies MMU-writable (so W=1 always means all three, see spec 6.2).
    @inlinable public func checkWritableInvariants(_ masks: SPTEMasks) -> Bool {
        if isMMUWritable(masks) { return isHostWritable(masks) }
        return !isWritable
    }

    /// `spte_needs_atomic_update`: bits of this SPTE may change without mmu_lock (fast page fault may
    /// set W, aging may access-track, the CPU may set D), so an update must be a compare-exchange.
    @inlinable public func needsAtomicUpdate(_ masks: SPTEMasks) -> Bool {
        if !isWritable && isMMUWritable(masks) { return true }
        if !isADEnabled { return true }
        return isWritable && rawValue & masks.dirty == 0
    }

    /// `leaf_spte_change_needs_tlb_flush`: clearing MMU-writable must flush before mmu_lock is
    /// dropped, because KVM tolerates stale writable TLB entries only while the SPTE is MMU-writable.
    @inlinable
    public static func leafChangeNeedsTLBFlush(old: SPTE, new: SPTE, masks: SPTEMasks) -> Bool {
        old.isMMUWritable(masks) && !new.isMMUWritable(masks)
    }

    // MARK: Constructors

    /// `make_nonleaf_spte`: an entry pointing to a child table. Non-leaf SPTEs grant everything; the
    /// guest's restrictions live in the leaf and in the child's `role.access`.
    @inlinable
    public static func nonLeaf(child: HostFrameNumber, adDisabled: Bool, masks: SPTEMasks) -> SPTE {
        var bits = mmuPresentBit
        bits |= (child.rawValue << UInt64(pageShift)) & baseAddressMask
        bits |= masks.present | writableBit | masks.user | masks.x
        bits |= adDisabled ? ADState.disabled.rawValue << adShift : masks.accessed
        return SPTE(bits)
    }

    /// A PDPTE of a PAE root KVM builds itself (`pae_root` entries for a PAE-paging host): only P,
    /// plus the MMU-present bit so the MMU reads it as a present link (bit 11 is ignored by the
    /// PDPTE format).
    public static func pdpte(child: HostFrameNumber) -> SPTE {
        SPTE(mmuPresentBit | x86PresentBit | (child.rawValue << UInt64(pageShift)) & baseAddressMask)
    }

    /// The bit assembly of `make_spte`, once the fault path has made its decisions.
    ///
    /// Not decided here: dropping ACC.exec for the NX huge-page mitigation (pass `access` without it),
    /// the unsync attempt behind `writable`, the A/D type (`SPTE_TDP_AD_WRPROT_ONLY` for L2 with PML),
    /// and access-tracking a prefetched SPTE (KVM's `prefetch && !synchronizing` — call
    /// `markedForAccessTrack` on the result, which also clears A).
    ///
    /// - Parameters:
    ///   - level: the SPTE's level; above 1 it maps a huge page and gets PS.
    ///   - access: ACC bits: exec selects X or NX, user sets the user (EPT: readable) bit. ACC.write is
    ///     the caller's to act on through `writable`.
    ///   - hostWritable: the host page is writable (sets the host-writable bit).
    ///   - writable: the final write decision: sets W, MMU-writable and D together, as `make_spte`
    ///     does. Ignored without `hostWritable`, as `make_spte` strips ACC.write then.
    ///   - accessed: sets A (KVM: unless prefetching without synchronizing).
    ///   - dirty: sets D without W. `make_spte` never does this; it exists to rebuild observed SPTEs.
    public static func leaf(pfn: HostFrameNumber, level: Int, access: UInt8, hostWritable: Bool, writable: Bool,
                            accessed: Bool = true, dirty: Bool = false, adState: ADState,
                            masks: SPTEMasks) -> SPTE {
        var bits = mmuPresentBit
        bits |= adState.rawValue << adShift
        bits |= masks.present
        if accessed { bits |= masks.accessed }
        bits |= access & ACC.exec != 0 ? masks.x : masks.nx
        if access & ACC.user != 0 { bits |= masks.user }
        if level > KVMLevel.pageTable { bits |= pageSizeBit }
        bits |= masks.memoryType
        if hostWritable { bits |= masks.hostWritable }
        bits |= (pfn.rawValue << UInt64(pageShift)) & baseAddressMask
        if writable && hostWritable { bits |= writableBit | masks.mmuWritable | masks.dirty }
        if dirty { bits |= masks.dirty }
        return SPTE(bits)
    }

    /// `leaf(...)` with the A/D type KVM picks from `role.ad_disabled`: disabled or enabled.
    public static func leaf(pfn: HostFrameNumber, level: Int, access: UInt8, hostWritable: Bool, writable: Bool,
                            accessed: Bool = true, dirty: Bool = false, adDisabled: Bool = false,
                            masks: SPTEMasks) -> SPTE {
        leaf(pfn: pfn, level: level, access: access, hostWritable: hostWritable, writable: writable,
             accessed: accessed, dirty: dirty, adState: adDisabled ? .disabled : .enabled, masks: masks)
    }

    /// `make_mmio_spte`: a non-present SPTE that makes the next access to `gfn` exit straight to MMIO
    /// emulation (x86: a reserved-bit #PF; EPT: a misconfiguration).
    ///
    /// The generation is the memslots generation, of which the low 19 bits fit (bits 0-7 go to SPTE
    /// bits 3-10, bits 8-18 to SPTE bits 52-62); a stale generation makes the SPTE miss
    /// (`check_mmio_spte`). No L1TF gfn relocation: the model sets no `shadow_nonpresent_or_rsvd_mask`.
    /// - Precondition: `masks.isMMIOCachingEnabled` (KVM checks before calling), and the gfn fits below
    ///   the host's MAXPHYADDR.
    public static func mmio(gfn: GuestFrameNumber, access: UInt8, generation: UInt64, masks: SPTEMasks) -> SPTE {
        precondition(masks.isMMIOCachingEnabled, "MMIO SPTEs need MMIO caching")
        let gpa = gfn.rawValue << UInt64(pageShift)
        precondition(gpa & ~masks.mmioGFNMask == 0 && gfn.rawValue >> 52 == 0, "gfn beyond host MAXPHYADDR")
        var bits = generationBits(generation & mmioGenerationMask)
        bits |= masks.mmioValue | (UInt64(access) & masks.mmioAccessMask)
        bits |= gpa
        return SPTE(bits)
    }

    /// `generation_mmio_spte_mask`.
    @usableFromInline
    static func generationBits(_ generation: UInt64) -> UInt64 {
        ((generation << 3) & mmioGenLowMask) | ((generation << (52 - 8)) & mmioGenHighMask)
    }

    /// `get_mmio_spte_generation`.
    @inlinable public var mmioGeneration: UInt64 {
        ((rawValue & Self.mmioGenLowMask) >> 3) | ((rawValue & Self.mmioGenHighMask) >> (52 - 8))
    }

    /// `get_mmio_spte_gfn`.
    @inlinable public func mmioGFN(_ masks: SPTEMasks) -> GuestFrameNumber {
        GuestFrameNumber((rawValue & masks.mmioGFNMask) >> UInt64(pageShift))
    }

    /// `get_mmio_spte_access`.
    @inlinable public func mmioAccess(_ masks: SPTEMasks) -> UInt8 { UInt8(rawValue & masks.mmioAccessMask) }

    // MARK: Transformations

    /// `mark_spte_for_access_track`: make the next access observable. With A/D on, clearing A is
    /// enough. Without, save R and X in bits 54/56 and clear RWX and A: hardware sees the SPTE as not
    /// present while KVM still sees it MMU-present. Already-tracked SPTEs are unchanged.
    @inlinable public func markedForAccessTrack(_ masks: SPTEMasks) -> SPTE {
        if isADEnabled { return SPTE(rawValue & ~masks.accessed) }
        if isAccessTracked(masks) { return self }
        var bits = rawValue
        bits |= (bits & Self.accTrackSavedBits) << Self.accTrackSavedShift
        bits &= ~(masks.accTrack | masks.accessed)
        return SPTE(bits)
    }

    /// `restore_acc_track_spte`: put back the saved R and X. W is not saved: an access-tracked SPTE is
    /// also dirty-tracked, so W comes back only through a write fault.
    @inlinable public func restoredFromAccessTrack(_ masks: SPTEMasks) -> SPTE {
        let saved = (rawValue >> Self.accTrackSavedShift) & Self.accTrackSavedBits
        var bits = rawValue & ~masks.accTrack
        bits &= ~(Self.accTrackSavedBits << Self.accTrackSavedShift)
        return SPTE(bits | saved)
    }

    /// `modify_spte_protections`: sets and clears permission bits of a present SPTE, keeping an
    /// access-tracked SPTE tracked (its permissions live in the saved bits until it is restored).
    @inlinable
    public func withProtections(setting set: UInt64, clearing clear: UInt64, masks: SPTEMasks) -> SPTE {
        let tracked = isAccessTracked(masks)
        var spte = tracked ? restoredFromAccessTrack(masks) : self
        spte = SPTE((spte.rawValue | set) & ~clear)
        return tracked ? spte.markedForAccessTrack(masks) : spte
    }

    /// `make_spte_executable`.
    @inlinable public func madeExecutable(_ masks: SPTEMasks) -> SPTE {
        withProtections(setting: masks.x, clearing: masks.nx, masks: masks)
    }

    /// `make_spte_nonexecutable`.
    @inlinable public func madeNonExecutable(_ masks: SPTEMasks) -> SPTE {
        withProtections(setting: masks.nx, clearing: masks.x, masks: masks)
    }

    /// `make_small_spte`: entry `index` of the table that replaces this huge leaf, mapping the same
    /// memory with the same permissions and state one level down. At level 1 the entry loses PS, and
    /// becomes executable again when the NX huge-page mitigation (`nxHugePages`) was what took X away
    /// and the table's role grants exec.
    /// - Precondition: a shadow-present huge leaf, `childLevel` one below its level, `index < 512`.
    @inlinable
    public func smallSPTE(index: Int, childLevel: Int, roleAccess: UInt8, nxHugePages: Bool, masks: SPTEMasks) -> SPTE {
        precondition(isShadowPresent && isLarge && (0..<KVMLevel.entriesPerPage).contains(index),
                     "only a present huge leaf splits")
        // The huge page's frame is aligned to its size, so the child's offset ORs in.
        var child = SPTE(rawValue | UInt64(index) << UInt64(9 * (childLevel - 1) + pageShift))
        if childLevel == KVMLevel.pageTable {
            child.rawValue &= ~Self.pageSizeBit
            if roleAccess & ACC.exec != 0 && nxHugePages { child = child.madeExecutable(masks) }
        }
        return child
    }

    /// `make_huge_spte`: a huge leaf at `level` built from one of the small leaves it replaces: PS
    /// set, the frame rounded down to the huge page, and not executable under the NX huge-page
    /// mitigation.
    @inlinable
    public func hugeSPTE(level: Int, nxHugePages: Bool, masks: SPTEMasks) -> SPTE {
        precondition(isShadowPresent && level > KVMLevel.pageTable, "only a present SPTE becomes a huge leaf above 4K")
        let offsetBits = (UInt64(1) << UInt64(9 * (level - 1) + pageShift)) - 1
        var huge = SPTE((rawValue | Self.pageSizeBit) & ~(offsetBits & Self.baseAddressMask))
        if nxHugePages { huge = huge.madeNonExecutable(masks) }
        return huge
    }

    /// `spte_write_protect`: clear W; for a gfn KVM shadows as a guest page table (`forPageTable`), clear
    /// MMU-writable too so only an unsync can make it writable again. Nil when nothing would change.
    @inlinable public func writeProtected(forPageTable: Bool, masks: SPTEMasks) -> SPTE? {
        guard isWritable || (forPageTable && isMMUWritable(masks)) else { return nil }
        var bits = rawValue & ~Self.writableBit
        if forPageTable { bits &= ~masks.mmuWritable }
        return SPTE(bits)
    }
}

extension SPTE: CustomStringConvertible {
    /// Raw hex; use `describe(_:)` for a decoding, which needs the format.
    public var description: String { "spte " + hex(rawValue) }

    /// A decoding in the format `masks` describes: present/MMIO, `rwxu` the way KVM's `kvm_mmu_set_spte`
    /// tracepoint prints them, then pfn and software bits.
    public func describe(_ masks: SPTEMasks) -> String {
        if isMMIO(masks) {
            return "\(hex(rawValue)) mmio gfn \(hex(mmioGFN(masks).rawValue)) access \(ACC.traceString(mmioAccess(masks))) gen \(hex(mmioGeneration))"
        }
        guard isShadowPresent else { return "\(hex(rawValue)) not present" }
        // Bit 0 is P in the x86 format and R in EPT.
        var text = hex(rawValue) + " ("
        text += rawValue & SPTE.x86PresentBit != 0 ? "r" : "-"
        text += isWritable ? "w" : "-"
        text += isExecutable(masks) ? "x" : "-"
        if !masks.isEPT { text += rawValue & masks.user != 0 ? "u" : "-" }
        text += ") pfn \(hex(pfn.rawValue))"
        if isLarge { text += " PS" }
        if isAccessed(masks) { text += " A" }
        if isDirty(masks) { text += " D" }
        if isHostWritable(masks) { text += " host-writable" }
        if isMMUWritable(masks) { text += " mmu-writable" }
        switch adState {
        case .enabled?: break
        case .disabled?: text += isAccessTracked(masks) ? " ad-disabled access-tracked" : " ad-disabled"
        case .wrprotOnly?: text += " ad-wrprot-only"
        case nil: text += " ad=3"
        }
        return text
    }
}
