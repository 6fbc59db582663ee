// Switchable configurations of the one shadow MMU, each standing for a design the seeds discuss
// (docs/VARIANTS.md). The upstream path is the default and the others branch from it only where
// they differ, so that `virtmmu compare` can check that a refactoring changed nothing a guest sees.

/// A configuration of the shadow MMU: what landed upstream, or a design from one of the seed
/// threads that did not land (or that landed in another form).
public enum MMUVariant: String, CaseIterable, Sendable, CustomStringConvertible {
    /// What landed upstream: `role.passthrough` only for a 4-level guest on a 5-level host, special
    /// roots for 32-bit, PAE and non-paging guests, child roles derived from the parent
    /// (`kvm_mmu_child_role`), and separate `cpu_role` / `root_role`.
    case upstream
    /// Seed 1, RFC v3: a 4-bit `glevel` role field (bits 19-22) holding the guest paging level
    /// (clamped to the page's level, 0 for direct pages); a page is passthrough when
    /// `glevel < level`. Replaces the upstream `passthrough` bit.
    case glevel
    /// Seed 1, Sean's counter-proposal: a 2-bit `passthrough_delta` role field (bits 19-20) holding
    /// `level - guest root level` for a page above the guest's top level, 0 otherwise and for
    /// direct pages. Replaces the upstream `passthrough` bit.
    case passthroughDelta = "passthrough-delta"
    /// Seed 2 (v3, "Use one-off local shadow page for special roots"): per-vCPU root pages in place
    /// of the special roots, linked to the page directories below them like any parent page, made
    /// at each root load and freed with the root, never cached in `prev_roots`.
    case localRoots = "local-roots"
    /// Before seed 3 (v5.19 and earlier): a child page's role is computed from the vCPU's root role
    /// and the faulting address (`kvm_mmu_get_page`), not from its parent's role.
    case recomputeChildRole = "recompute-child-role"
    /// Before seed 4 (v5.18 and earlier): one `mmu_role` (root-role base plus the extended role)
    /// compared as a whole to decide whether the context changed, and CR0.WP toggles resetting the
    /// context even under TDP.
    case combinedMMURole = "combined-mmu-role"

    public var description: String { rawValue }

    /// The names `--variant` accepts, in declaration order.
    public static var names: [String] { allCases.map(\.rawValue) }

    /// Whether shadow-page roles carry a guest-level field (seed 1) instead of the upstream
    /// `passthrough` bit.
    @inlinable public var encodesGuestLevel: Bool { self == .glevel || self == .passthroughDelta }

    /// KVM's `is_passthrough_sp` for a role made under this variant: the page sits above the
    /// guest's top paging level and shadows no guest table.
    @inlinable
    public func isPassthrough(_ role: PageRole) -> Bool {
        switch self {
        case .glevel: !role.isDirect && role.guestLevel != 0 && role.guestLevel < role.level
        case .passthroughDelta: !role.isDirect && role.passthroughDelta != 0
        default: role.isPassthrough
        }
    }

    /// `role` with this variant's guest-level field for a guest whose root level is
    /// `guestRootLevel` (the upstream `passthrough` bit is dropped: the field replaces it).
    /// Unchanged for the variants without one.
    @inlinable
    public func encodingGuestLevel(_ role: PageRole, guestRootLevel: Int) -> PageRole {
        var role = role
        switch self {
        case .glevel:
            role.isPassthrough = false
            role.guestLevel = role.isDirect ? 0 : min(role.level, guestRootLevel)
        case .passthroughDelta:
            role.isPassthrough = false
            role.passthroughDelta = role.isDirect ? 0 : max(0, role.level - guestRootLevel)
        default:
            break
        }
        return role
    }

    /// `role` as the tracepoints print it, with this variant's guest-level field named instead of
    /// shown as unused bits, and `passthrough` when the variant's helper says so.
    public func describe(_ role: PageRole) -> String {
        guard encodesGuestLevel else { return role.description }
        var plain = role
        plain.word &= ~PageRole.unusedBits
        let field = self == .glevel ? "glevel=\(role.guestLevel)" : "passthrough_delta=\(role.passthroughDelta)"
        return plain.description + " " + field + (isPassthrough(role) ? " passthrough" : "")
    }

    /// The role of the child under `parent`'s SPTE `parentIndex` (`kvm_mmu_child_role`), with the
    /// guest-level field carried down for the seed-1 variants: a child is one level nearer the
    /// guest's tables, so `glevel` is clamped to its level (RFC v3's `kvm_mmu_get_page`) and the
    /// delta drops by one.
    ///
    /// Under `local-roots` and the seed-1 variants a 32-bit guest's page directories are children
    /// of a level-3 page (a per-vCPU root page, or a passthrough page), not special roots, and
    /// each covers a quarter of the guest's one directory: the quadrant is the PDPTE index (the
    /// `index % 4` Lai pointed out in the seed-3 thread), where upstream's special root sets it in
    /// `mmu_alloc_shadow_roots`. Above level 3 a 32-bit guest has only passthrough pages.
    @inlinable
    public func childRole(of parent: PageRole, parentIndex: Int, direct: Bool, access: UInt8) -> PageRole {
        var role: PageRole
        if self != .upstream && parent.hasFourByteGPTE && parent.level >= 3 {
            role = parent
            role.level -= 1
            role.access = access
            role.isDirect = direct
            role.isPassthrough = false
            role.quadrant = role.level == 2 && !direct ? parentIndex & 3 : 0
        } else {
            role = KVMMMU.childRole(of: parent, parentIndex: parentIndex, direct: direct, access: access)
        }
        switch self {
        case .glevel: role.guestLevel = direct ? 0 : min(role.level, parent.guestLevel)
        case .passthroughDelta: role.passthroughDelta = direct ? 0 : max(0, parent.passthroughDelta - 1)
        default: break
        }
        return role
    }
}

extension PageRole {
    // The seed-1 fields live in bits 19-23, unused upstream: the RFC put `glevel` at bit 18, where
    // upstream's `passthrough` bit now is, and both variants keep that bit clear.
    @usableFromInline static var guestLevelShift: UInt32 { 19 }
    @usableFromInline static var guestLevelMask: UInt32 { 0xF }
    @usableFromInline static var passthroughDeltaShift: UInt32 { 19 }
    @usableFromInline static var passthroughDeltaMask: UInt32 { 0x3 }

    /// Seed 1 RFC v3's `glevel:4` (the `glevel` variant only), bits 19-22: the guest paging level
    /// clamped to the page's level, 0 for direct pages.
    @inlinable public var guestLevel: Int {
        get { Int((word >> Self.guestLevelShift) & Self.guestLevelMask) }
        set {
            precondition(newValue >= 0 && newValue <= Int(Self.guestLevelMask), "glevel out of range")
            word = (word & ~(Self.guestLevelMask << Self.guestLevelShift)) | (UInt32(newValue) << Self.guestLevelShift)
        }
    }

    /// Sean's `passthrough_delta:2` (the `passthrough-delta` variant only), bits 19-20: levels
    /// between this page and the guest's top table, 0 when the page shadows a guest table.
    @inlinable public var passthroughDelta: Int {
        get { Int((word >> Self.passthroughDeltaShift) & Self.passthroughDeltaMask) }
        set {
            precondition(newValue >= 0 && newValue <= Int(Self.passthroughDeltaMask), "passthrough_delta out of range")
            word = (word & ~(Self.passthroughDeltaMask << Self.passthroughDeltaShift))
                | (UInt32(newValue) << Self.passthroughDeltaShift)
        }
    }
}
