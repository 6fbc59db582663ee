// The roles KVM keys its page tables by (kvm_host.h: union kvm_mmu_page_role, union
// kvm_mmu_extended_role, union kvm_cpu_role). A role is one packed word: two shadow pages with the
// same gfn are interchangeable exactly when their role words are equal, so the layout is KVM's, bit
// for bit, and every field is read and written through a named accessor.

import X86Paging

/// KVM's ACC_* bits: the access a guest translation grants, as carried in `PageRole.access`, in a
/// shadow page's per-entry translation cache and in `make_spte`'s `pte_access`.
///
/// For EPT, "user" means readable.
public enum ACC {
    /// ACC_EXEC_MASK.
    @inlinable public static var exec: UInt8 { 1 }
    /// ACC_WRITE_MASK, equal to the x86 R/W bit (bit 1).
    @inlinable public static var write: UInt8 { 2 }
    /// ACC_USER_MASK, equal to the x86 U/S bit (bit 2).
    @inlinable public static var user: UInt8 { 4 }
    /// ACC_ALL.
    @inlinable public static var all: UInt8 { 7 }

    /// KVM's tracepoint spelling of an ACC value, indexed by the value: `---`, `--x`, `w--`, ...,
    /// `wux` (write, user, exec).
    public static func traceString(_ access: UInt8) -> String {
        let a = access & all
        return (a & write != 0 ? "w" : "-") + (a & user != 0 ? "u" : "-") + (a & exec != 0 ? "x" : "-")
    }
}

/// Page-table levels as KVM numbers them (PG_LEVEL_*, PT*_ROOT_LEVEL).
public enum KVMLevel {
    /// PG_LEVEL_4K: a page table (PTE) level.
    @inlinable public static var pageTable: Int { 1 }
    /// PG_LEVEL_2M.
    @inlinable public static var pageDirectory: Int { 2 }
    /// PG_LEVEL_1G, also KVM_MAX_HUGEPAGE_LEVEL.
    @inlinable public static var pageDirectoryPointer: Int { 3 }
    /// PT32_ROOT_LEVEL: the root of 32-bit paging.
    @inlinable public static var pt32Root: Int { 2 }
    /// PT32E_ROOT_LEVEL: the PAE root (the four PDPTEs).
    @inlinable public static var pt32eRoot: Int { 3 }
    /// PT64_ROOT_4LEVEL.
    @inlinable public static var pt64Root4: Int { 4 }
    /// PT64_ROOT_5LEVEL, also PT64_ROOT_MAX_LEVEL.
    @inlinable public static var pt64Root5: Int { 5 }
    /// SPTE_ENT_PER_PAGE: entries in one shadow page table.
    @inlinable public static var entriesPerPage: Int { 512 }
}

/// union kvm_mmu_page_role: what a shadow page (or a TDP MMU page) translates and under which guest
/// state it is valid.
///
/// Layout (LSB first): level 0-3, has_4_byte_gpte 4, quadrant 5-6, direct 7, access 8-10, invalid 11,
/// efer_nx 12, cr0_wp 13, smep_andnot_wp 14, smap_andnot_wp 15, ad_disabled 16, guest_mode 17,
/// passthrough 18, unused 19-23, smm 24-31.
@frozen
public struct PageRole: Hashable, Sendable {
    /// The packed word; equality of words is KVM's shadow-page reuse criterion.
    public var word: UInt32

    @inlinable public init(word: UInt32) { self.word = word }

    /// The all-zero role. Set fields through the accessors, or use the full initialiser.
    @inlinable public init() { self.word = 0 }

    /// A role from named fields; every field defaults to its zero value.
    @inlinable
    public init(level: Int = 0, hasFourByteGPTE: Bool = false, quadrant: Int = 0, isDirect: Bool = false,
                access: UInt8 = 0, isInvalid: Bool = false, eferNX: Bool = false, cr0WP: Bool = false,
                smepAndNotWP: Bool = false, smapAndNotWP: Bool = false, adDisabled: Bool = false,
                guestMode: Bool = false, isPassthrough: Bool = false, smm: Bool = false) {
        self.word = 0
        self.level = level
        self.hasFourByteGPTE = hasFourByteGPTE
        self.quadrant = quadrant
        self.isDirect = isDirect
        self.access = access
        self.isInvalid = isInvalid
        self.eferNX = eferNX
        self.cr0WP = cr0WP
        self.smepAndNotWP = smepAndNotWP
        self.smapAndNotWP = smapAndNotWP
        self.adDisabled = adDisabled
        self.guestMode = guestMode
        self.isPassthrough = isPassthrough
        self.smm = smm
    }

    // Field positions. Internal so tests and descriptions share one statement of the layout.
    @usableFromInline static var levelShift: UInt32 { 0 }
    @usableFromInline static var levelMask: UInt32 { 0xF }
    @usableFromInline static var quadrantShift: UInt32 { 5 }
    @usableFromInline static var quadrantMask: UInt32 { 0x3 }
    @usableFromInline static var accessShift: UInt32 { 8 }
    @usableFromInline static var accessMask: UInt32 { 0x7 }
    @usableFromInline static var smmShift: UInt32 { 24 }
    @usableFromInline static var smmMask: UInt32 { 0xFF }
    /// Bits 19-23, unused upstream (TDX's is_mirror took bit 19 in v6.14; not modelled).
    @usableFromInline static var unusedBits: UInt32 { 0x1F << 19 }

    @inlinable @inline(__always)
    func flag(_ bit: UInt32) -> Bool { word & (1 << bit) != 0 }

    @inlinable @inline(__always)
    mutating func setFlag(_ bit: UInt32, _ value: Bool) {
        if value { word |= 1 << bit } else { word &= ~(1 << bit) }
    }

    /// `level`, bits 0-3: the page's level (1 = page table ... 5 = PML5); 0 only in a CPU role
    /// without paging.
    @inlinable public var level: Int {
        get { Int((word >> Self.levelShift) & Self.levelMask) }
        set {
            precondition(newValue >= 0 && newValue <= Int(Self.levelMask), "role level out of range")
            word = (word & ~(Self.levelMask << Self.levelShift)) | (UInt32(newValue) << Self.levelShift)
        }
    }

    /// `has_4_byte_gpte`, bit 4: the guest uses 32-bit (non-PAE) paging, so each page shadows part of
    /// a 4-byte-entry guest table. Always false for roles built from a direct root.
    @inlinable public var hasFourByteGPTE: Bool {
        get { flag(4) }
        set { setFlag(4, newValue) }
    }

    /// `quadrant`, bits 5-6: which part of a 4-byte guest table this page shadows (a root: which
    /// 1 GiB quarter of the guest PD; a level-1 page: which 2 MiB half of the guest PT). 0 unless
    /// `hasFourByteGPTE`.
    @inlinable public var quadrant: Int {
        get { Int((word >> Self.quadrantShift) & Self.quadrantMask) }
        set {
            precondition(newValue >= 0 && newValue <= Int(Self.quadrantMask), "role quadrant out of range")
            word = (word & ~(Self.quadrantMask << Self.quadrantShift)) | (UInt32(newValue) << Self.quadrantShift)
        }
    }

    /// `direct`, bit 7: the page maps a linear gfn range (TDP, a guest without paging, or a guest huge
    /// page shadowed by smaller pages) instead of shadowing a guest table.
    @inlinable public var isDirect: Bool {
        get { flag(7) }
        set { setFlag(7, newValue) }
    }

    /// `access`, bits 8-10: the ACC bits the guest's upper-level entries grant on the way here.
    @inlinable public var access: UInt8 {
        get { UInt8((word >> Self.accessShift) & Self.accessMask) }
        set {
            precondition(newValue <= UInt8(Self.accessMask), "role access out of range")
            word = (word & ~(Self.accessMask << Self.accessShift)) | (UInt32(newValue) << Self.accessShift)
        }
    }

    /// `invalid`, bit 11: the page was zapped while still in use as a root; it is freed when its
    /// last root reference goes.
    @inlinable public var isInvalid: Bool {
        get { flag(11) }
        set { setFlag(11, newValue) }
    }

    /// `efer_nx`, bit 12: EFER.NX for which the page is valid.
    @inlinable public var eferNX: Bool {
        get { flag(12) }
        set { setFlag(12, newValue) }
    }

    /// `cr0_wp`, bit 13: CR0.WP for which the page is valid.
    @inlinable public var cr0WP: Bool {
        get { flag(13) }
        set { setFlag(13, newValue) }
    }

    /// `smep_andnot_wp`, bit 14: CR4.SMEP && !CR0.WP.
    @inlinable public var smepAndNotWP: Bool {
        get { flag(14) }
        set { setFlag(14, newValue) }
    }

    /// `smap_andnot_wp`, bit 15: CR4.SMAP && !CR0.WP.
    @inlinable public var smapAndNotWP: Bool {
        get { flag(15) }
        set { setFlag(15, newValue) }
    }

    /// `ad_disabled`, bit 16: the page's SPTEs cannot use hardware A/D bits (EPT without A/D, or L1's
    /// EPTP.AD=0 for shadow EPT).
    @inlinable public var adDisabled: Bool {
        get { flag(16) }
        set { setFlag(16, newValue) }
    }

    /// `guest_mode`, bit 17: the page belongs to an L2 (nested) context.
    @inlinable public var guestMode: Bool {
        get { flag(17) }
        set { setFlag(17, newValue) }
    }

    /// `passthrough`, bit 18: a level-5 root over a 4-level nested NPT; it shadows no guest table.
    @inlinable public var isPassthrough: Bool {
        get { flag(18) }
        set { setFlag(18, newValue) }
    }

    /// `smm`, bits 24-31 (KVM writes only 0 or 1): the page translates the SMM address space.
    @inlinable public var smm: Bool {
        get { (word >> Self.smmShift) & Self.smmMask != 0 }
        set { word = (word & ~(Self.smmMask << Self.smmShift)) | ((newValue ? 1 : 0) << Self.smmShift) }
    }

    /// KVM's `kvm_mmu_role_as_id`: the memslot address space the page's gfns live in.
    @inlinable public var addressSpaceID: Int { smm ? 1 : 0 }

    /// KVM's `sp_has_gptes`: the page shadows a guest page table, so it is write-tracked, keeps a
    /// per-entry translation cache and can go unsync. Direct and passthrough pages do not.
    @inlinable public var hasGPTEs: Bool { !isDirect && !isPassthrough }

    /// Size of one guest entry this page shadows, as KVM's tracepoint prints it.
    @inlinable public var guestEntryBytes: Int { hasFourByteGPTE ? 4 : 8 }
}

extension PageRole: CustomStringConvertible {
    /// KVM's tracepoint rendering of a role (`l%u %u-byte q%u%s %s%s %snxe %sad`), followed by the
    /// bits that print omits: `[!]wp`, `smep_andnot_wp`, `smap_andnot_wp`, `guest_mode`,
    /// `passthrough`, `smm`, the SPP extension's `spp` (SPP.swift), and any other unused bit as raw
    /// hex.
    public var description: String {
        var text = "l\(level) \(guestEntryBytes)-byte q\(quadrant)"
        if isDirect { text += " direct" }
        text += " " + ACC.traceString(access)
        if isInvalid { text += " invalid" }
        text += " " + (eferNX ? "" : "!") + "nxe"
        text += " " + (adDisabled ? "!" : "") + "ad"
        text += " " + (cr0WP ? "" : "!") + "wp"
        if smepAndNotWP { text += " smep_andnot_wp" }
        if smapAndNotWP { text += " smap_andnot_wp" }
        if guestMode { text += " guest_mode" }
        if isPassthrough { text += " passthrough" }
        if smm { text += " smm" }
        if isSubPageProtectionTable { text += " spp" }
        let unused = word & Self.unusedBits & ~(1 << Self.subPageProtectionTableBit)
        if unused != 0 { text += " unused=" + hex(unused) }
        let smmByte = (word >> Self.smmShift) & Self.smmMask
        if smmByte > 1 { text += " smm_byte=" + hex(smmByte) }
        return text
    }
}

/// union kvm_mmu_extended_role: CPU state a guest walk depends on that is not part of a page's role.
///
/// Layout: valid 0, execonly 1, cr4_pse 2, cr4_pke 3, cr4_smap 4, cr4_smep 5, cr4_la57 6, efer_lma 7.
@frozen
public struct ExtendedRole: Hashable, Sendable {
    public var word: UInt32

    @inlinable public init(word: UInt32) { self.word = word }
    @inlinable public init() { self.word = 0 }

    @inlinable
    public init(valid: Bool = false, execOnly: Bool = false, cr4PSE: Bool = false, cr4PKE: Bool = false,
                cr4SMAP: Bool = false, cr4SMEP: Bool = false, cr4LA57: Bool = false, eferLMA: Bool = false) {
        self.word = 0
        self.valid = valid
        self.execOnly = execOnly
        self.cr4PSE = cr4PSE
        self.cr4PKE = cr4PKE
        self.cr4SMAP = cr4SMAP
        self.cr4SMEP = cr4SMEP
        self.cr4LA57 = cr4LA57
        self.eferLMA = eferLMA
    }

    @inlinable @inline(__always)
    func flag(_ bit: UInt32) -> Bool { word & (1 << bit) != 0 }

    @inlinable @inline(__always)
    mutating func setFlag(_ bit: UInt32, _ value: Bool) {
        if value { word |= 1 << bit } else { word &= ~(1 << bit) }
    }

    /// `valid`, bit 0: set on every computed role, so an all-zero CPU role means "not yet computed"
    /// and forces the next initialisation (KVM clears it after a CPUID change).
    @inlinable public var valid: Bool {
        get { flag(0) }
        set { setFlag(0, newValue) }
    }

    /// `execonly`, bit 1: shadow EPT where L1 may create execute-only entries.
    @inlinable public var execOnly: Bool {
        get { flag(1) }
        set { setFlag(1, newValue) }
    }

    /// `cr4_pse`, bit 2.
    @inlinable public var cr4PSE: Bool {
        get { flag(2) }
        set { setFlag(2, newValue) }
    }

    /// `cr4_pke`, bit 3: CR4.PKE && EFER.LMA (protection keys exist only in long mode).
    @inlinable public var cr4PKE: Bool {
        get { flag(3) }
        set { setFlag(3, newValue) }
    }

    /// `cr4_smap`, bit 4.
    @inlinable public var cr4SMAP: Bool {
        get { flag(4) }
        set { setFlag(4, newValue) }
    }

    /// `cr4_smep`, bit 5.
    @inlinable public var cr4SMEP: Bool {
        get { flag(5) }
        set { setFlag(5, newValue) }
    }

    /// `cr4_la57`, bit 6: CR4.LA57 && EFER.LMA.
    @inlinable public var cr4LA57: Bool {
        get { flag(6) }
        set { setFlag(6, newValue) }
    }

    /// `efer_lma`, bit 7.
    @inlinable public var eferLMA: Bool {
        get { flag(7) }
        set { setFlag(7, newValue) }
    }
}

extension ExtendedRole: CustomStringConvertible {
    public var description: String {
        var names: [String] = [valid ? "valid" : "!valid"]
        if execOnly { names.append("execonly") }
        if cr4PSE { names.append("pse") }
        if cr4PKE { names.append("pke") }
        if cr4SMAP { names.append("smap") }
        if cr4SMEP { names.append("smep") }
        if cr4LA57 { names.append("la57") }
        if eferLMA { names.append("lma") }
        let unknown = word & ~0xFF
        if unknown != 0 { names.append("unknown=" + hex(unknown)) }
        return names.joined(separator: " ")
    }
}

/// union kvm_cpu_role: the guest paging regime a context walks with. `base` is the low 32 bits of
/// `asUInt64`, `ext` the high 32 bits.
@frozen
public struct CPURole: Hashable, Sendable {
    public var base: PageRole
    public var ext: ExtendedRole

    @inlinable
    public init(base: PageRole = PageRole(), ext: ExtendedRole = ExtendedRole()) {
        self.base = base
        self.ext = ext
    }

    @inlinable
    public init(asUInt64 value: UInt64) {
        self.base = PageRole(word: UInt32(truncatingIfNeeded: value))
        self.ext = ExtendedRole(word: UInt32(truncatingIfNeeded: value >> 32))
    }

    /// `as_u64`: the value KVM compares to decide whether a context must be re-initialised.
    @inlinable public var asUInt64: UInt64 {
        get { UInt64(base.word) | (UInt64(ext.word) << 32) }
        set { self = CPURole(asUInt64: newValue) }
    }

    // mmu.c's is_cr0_pg / is_cr4_pae / is_cr0_wp ...: the only way the walker reads guest state.

    /// `is_cr0_pg`: paging is on exactly when the role has a level.
    @inlinable public var isCR0PG: Bool { base.level > 0 }
    /// `is_cr4_pae`: every paging mode but 32-bit paging uses 8-byte entries.
    @inlinable public var isCR4PAE: Bool { !base.hasFourByteGPTE }
    @inlinable public var isCR0WP: Bool { base.cr0WP }
    @inlinable public var isEFERNX: Bool { base.eferNX }
    @inlinable public var isCR4PSE: Bool { ext.cr4PSE }
    @inlinable public var isCR4SMEP: Bool { ext.cr4SMEP }
    @inlinable public var isCR4SMAP: Bool { ext.cr4SMAP }
    @inlinable public var isCR4PKE: Bool { ext.cr4PKE }
    @inlinable public var isCR4LA57: Bool { ext.cr4LA57 }
    @inlinable public var isEFERLMA: Bool { ext.eferLMA }

    /// The architectural paging mode this role walks with.
    @inlinable public var pagingMode: PagingMode {
        switch base.level {
        case 0: .disabled
        case 2: .legacy32
        case 3: .pae
        case 4: .fourLevel
        default: .fiveLevel
        }
    }

    /// KVM's `__kvm_mmu_refresh_passthrough_bits`: with TDP, CR0.WP may be owned by the guest (not
    /// intercepted), so before a permission check KVM copies the live CR0.WP into the role. Only
    /// `cr0_wp` moves; `smep_andnot_wp`/`smap_andnot_wp` stay stale, which is harmless because TDP
    /// permission checks read CR4.SMEP/SMAP from `ext`.
    @inlinable
    public func refreshingPassthroughBits(cr0: CR0) -> CPURole {
        var role = self
        role.base.cr0WP = cr0.contains(.writeProtect)
        return role
    }
}

extension CPURole: CustomStringConvertible {
    public var description: String { "base [\(base)] ext [\(ext)]" }
}
