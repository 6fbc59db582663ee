// How KVM derives roles from guest state (mmu.c: kvm_calc_cpu_role, kvm_init_shadow_mmu,
// kvm_calc_tdp_mmu_root_page_role, kvm_init_shadow_npt_mmu, kvm_calc_shadow_ept_root_page_role,
// kvm_mmu_child_role, mmu_alloc_root) and when a register write invalidates them (x86.c:
// kvm_post_set_cr0, kvm_post_set_cr4, set_efer).
//
// Two roles per context, as in KVM since v5.19: the CPU role is the guest's paging regime (it drives
// the guest walk and permission checks); the root role is the format of KVM's own tables and the key
// shadow pages are reused by.

import X86Paging

extension CR0 {
    /// KVM_MMU_CR0_ROLE_BITS: the CR0 bits a CPU role depends on (PG, WP).
    @inlinable public static var kvmMMURoleBits: CR0 { [.paging, .writeProtect] }
}

extension CR4 {
    /// KVM_MMU_CR4_ROLE_BITS: the CR4 bits a CPU role depends on (PSE, PAE, LA57, SMEP, SMAP, PKE).
    @inlinable public static var kvmMMURoleBits: CR4 {
        [.pageSizeExtensions, .physicalAddressExtension, .la57, .smep, .smap, .protectionKeys]
    }
}

extension EFER {
    /// KVM_MMU_EFER_ROLE_BITS: the EFER bits whose write resets the MMU context (LME, NX). The CPU
    /// role reads LMA too, but LMA only changes together with CR0.PG, whose write resets anyway.
    @inlinable public static var kvmMMURoleBits: EFER { [.longModeEnable, .noExecuteEnable] }
}

// MARK: - CPU role

/// KVM's `kvm_calc_cpu_role`: the guest paging regime for the given registers.
///
/// Without paging the role is direct with level 0 and every CR4/EFER bit is ignored. Only the role
/// bits of each register are read (KVM masks them with the KVM_MMU_*_ROLE_BITS before computing), plus
/// EFER.NX and EFER.LMA.
public func calcCPURole(cr0: CR0, cr4: CR4, efer: EFER, smm: Bool = false, guestMode: Bool = false) -> CPURole {
    var role = CPURole()
    role.base.access = ACC.all
    role.base.smm = smm
    role.base.guestMode = guestMode
    role.ext.valid = true

    guard cr0.contains(.paging) else {
        role.base.isDirect = true
        return role
    }

    let wp = cr0.contains(.writeProtect)
    let pae = cr4.contains(.physicalAddressExtension)
    let longMode = efer.contains(.longModeActive)

    role.base.eferNX = efer.contains(.noExecuteEnable)
    role.base.cr0WP = wp
    role.base.smepAndNotWP = cr4.contains(.smep) && !wp
    role.base.smapAndNotWP = cr4.contains(.smap) && !wp
    role.base.hasFourByteGPTE = !pae
    role.base.level = guestRootLevel(pae: pae, longMode: longMode, la57: cr4.contains(.la57))

    role.ext.cr4SMEP = cr4.contains(.smep)
    role.ext.cr4SMAP = cr4.contains(.smap)
    role.ext.cr4PSE = cr4.contains(.pageSizeExtensions)
    // Protection keys and 5-level paging exist only in long mode.
    role.ext.cr4PKE = longMode && cr4.contains(.protectionKeys)
    role.ext.cr4LA57 = longMode && cr4.contains(.la57)
    role.ext.eferLMA = longMode
    return role
}

/// KVM's `role_regs_to_root_level` for a guest with paging on.
private func guestRootLevel(pae: Bool, longMode: Bool, la57: Bool) -> Int {
    if longMode { return la57 ? KVMLevel.pt64Root5 : KVMLevel.pt64Root4 }
    return pae ? KVMLevel.pt32eRoot : KVMLevel.pt32Root
}

// MARK: - Root roles

/// The root role of the shadow MMU for a non-nested guest without TDP (`kvm_init_shadow_mmu`).
///
/// It is the CPU role's base with two changes: KVM shadows every guest that is not in long mode with
/// PAE tables, so the level is at least 3 (a 32-bit guest keeps `hasFourByteGPTE` and gets four
/// level-2 roots with quadrants 0-3; a guest without paging stays direct and gets four direct
/// level-2 roots); and KVM runs such guests with EFER.NX forced on (it needs NX for huge-page
/// mitigation and for CR0.WP=0 emulation), so `eferNX` is 1 whatever the guest's EFER says.
public func shadowRootRole(for cpu: CPURole) -> PageRole {
    var root = cpu.base
    root.level = max(root.level, KVMLevel.pt32eRoot)
    root.eferNX = true
    return root
}

/// The root role of the TDP MMU for L1 with EPT or NPT (`kvm_calc_tdp_mmu_root_page_role`).
///
/// TDP tables do not depend on guest paging, so only SMM and guest mode carry over from the CPU role;
/// `cr0_wp` and `efer_nx` are fixed at 1 and the level is the host's TDP level.
/// - Parameters:
///   - tdpLevel: `kvm_mmu_get_tdp_level` (see `tdpLevel(...)`), 4 or 5.
///   - accessedDirtyEnabled: KVM's `kvm_ad_enabled` (EPT A/D supported and on; always true for NPT).
public func tdpRootRole(for cpu: CPURole, tdpLevel: Int, accessedDirtyEnabled: Bool) -> PageRole {
    var root = PageRole()
    root.access = ACC.all
    root.cr0WP = true
    root.eferNX = true
    root.smm = cpu.base.smm
    root.guestMode = cpu.base.guestMode
    root.adDisabled = !accessedDirtyEnabled
    root.level = tdpLevel
    root.isDirect = true
    root.hasFourByteGPTE = false
    return root
}

/// KVM's `kvm_mmu_get_tdp_level`: a forced root level wins (SVM forces the host's paging level);
/// otherwise 5-level EPT is skipped when the guest cannot address more than 48 bits.
public func tdpLevel(forcedRootLevel: Int = 0, maxTDPLevel: Int, guestMaxPhysicalAddressBits: Int) -> Int {
    if forcedRootLevel != 0 { return forcedRootLevel }
    if maxTDPLevel == KVMLevel.pt64Root5 && guestMaxPhysicalAddressBits <= 48 { return KVMLevel.pt64Root4 }
    return maxTDPLevel
}

/// The CPU role for shadowing L1's nested page tables on SVM (`kvm_init_shadow_npt_mmu`): L1's CR0,
/// CR4 and EFER with CR4.PKE dropped (NPT has no protection keys). `guestMode` is true because the vCPU
/// runs L2 when this context is built.
public func shadowNPTCPURole(cr0: CR0, cr4: CR4, efer: EFER, smm: Bool = false) -> CPURole {
    calcCPURole(cr0: cr0, cr4: cr4.subtracting(.protectionKeys), efer: efer, smm: smm, guestMode: true)
}

/// The root role for shadowing L1's NPT (`kvm_init_shadow_npt_mmu`): the CPU role's base at the host's
/// NPT level. A 4-level NPT shadowed by a 5-level host root makes that root a passthrough page: it
/// shadows no guest table, its entry 0 points to the level-4 page of the same gfn.
public func shadowNPTRootRole(for cpu: CPURole, tdpLevel: Int) -> PageRole {
    var root = cpu.base
    root.level = tdpLevel
    if tdpLevel == KVMLevel.pt64Root5 && cpu.base.level == KVMLevel.pt64Root4 {
        root.isPassthrough = true
    }
    return root
}

/// The role of shadow EPT, the context that shadows L1's EPT for L2
/// (`kvm_calc_shadow_ept_root_page_role`). EPT reads no CR0, CR4 or EFER, so the role is built from
/// scratch; the root role is `.base` unchanged.
/// - Parameters:
///   - level: the EPTP's page-walk level, 4 or 5.
///   - accessedDirty: EPTP bit 6 (A/D enabled by L1).
///   - executeOnly: L1 may create execute-only entries.
public func shadowEPTRootRole(level: Int, accessedDirty: Bool, executeOnly: Bool) -> CPURole {
    var role = CPURole()
    role.base.level = level
    role.base.hasFourByteGPTE = false
    role.base.isDirect = false
    role.base.adDisabled = !accessedDirty
    role.base.guestMode = true
    role.base.access = ACC.all
    role.ext.execOnly = executeOnly
    role.ext.valid = true
    return role
}

// MARK: - Child and root page roles

/// KVM's `kvm_mmu_child_role`: the role of the page a parent's entry points to, derived from the
/// parent so that every way of creating a child (fault, prefetch, eager split) agrees.
///
/// The child is one level down, takes the caller's `direct` and `access`, and is never passthrough.
/// For a 32-bit guest the child is a level-1 page shadowing half of a 4 MiB guest page table: a
/// 4-byte guest PDE covers VA[31:22], an 8-byte shadow PDE VA[29:21], so the half is VA[21], the parity
/// of the parent entry's index.
///
/// - Precondition: `parent.level >= 2` and `0 <= parentIndex < 512`; with `hasFourByteGPTE`, the parent
///   is at level 2 (the only level 32-bit paging is shadowed at above page tables). Violations are
///   programming errors in the caller, not guest-reachable states.
public func childRole(of parent: PageRole, parentIndex: Int, direct: Bool, access: UInt8) -> PageRole {
    precondition(parent.level >= 2, "a level-\(parent.level) page has no child pages")
    precondition(parentIndex >= 0 && parentIndex < KVMLevel.entriesPerPage, "SPTE index out of range")
    var role = parent
    role.level -= 1
    role.access = access
    role.isDirect = direct
    role.isPassthrough = false
    if role.hasFourByteGPTE {
        precondition(role.level == KVMLevel.pageTable, "4-byte-GPTE pages exist only at levels 1 and 2")
        role.quadrant = parentIndex & 1
    }
    return role
}

/// The child role as KVM computed it before seed 3 (`kvm_mmu_get_page` up to v5.19): from the
/// vCPU's root role rather than from the parent page, with the level, `direct` and `access` the
/// caller asks for, and for a 4-byte-GPTE guest the quadrant from the faulting address: a level-1
/// page shadows half of a 4 MiB guest page table, the half VA[21] selects.
///
/// The `recompute-child-role` variant uses it to show it agrees with `childRole(of:...)` on every
/// page the fault path creates (the auditor checks the parent-derived role on every link).
/// - Precondition: `1 <= level < rootRole.level`.
public func childRoleFromRootRole(_ rootRole: PageRole, level: Int, direct: Bool, access: UInt8,
                                  address: UInt64) -> PageRole {
    precondition(level >= 1 && level < rootRole.level, "a child is below the root")
    var role = rootRole
    role.level = level
    role.isDirect = direct
    role.access = access
    role.isPassthrough = false
    role.quadrant = 0
    if role.hasFourByteGPTE {
        // `gaddr >> (PAGE_SHIFT + PT64_PT_BITS * level)`, masked to the quadrant bits a level has
        // (one at level 1: 4-byte and 8-byte tables differ by one index bit per level).
        precondition(level == KVMLevel.pageTable, "4-byte-GPTE pages exist only at levels 1 and 2")
        role.quadrant = Int((address >> 21) & 1)
    }
    return role
}

/// The quadrant of PAE root `index` (0-3) when KVM shadows a guest whose root level is
/// `guestRootLevel` (`mmu_alloc_shadow_roots`): a 32-bit guest's 4 KiB page directory is shadowed by
/// four PAE page directories, root i covering VA[31:30] = i, so root i has quadrant i. A PAE guest's
/// four roots shadow four distinct guest tables and have quadrant 0.
@inlinable
public func rootQuadrant(forPAERoot index: Int, guestRootLevel: Int) -> Int {
    precondition(index >= 0 && index < 4, "there are four PAE roots")
    return guestRootLevel == KVMLevel.pt32Root ? index : 0
}

/// The role of one root page (`mmu_alloc_root`): the context's root role at `level`, with `quadrant`.
///
/// - Precondition: a nonzero quadrant only with `hasFourByteGPTE`, and never a direct root with
///   `hasFourByteGPTE` (KVM WARNs on both; they cannot arise from roles computed by this file).
public func rootPageRole(rootRole: PageRole, level: Int, quadrant: Int) -> PageRole {
    precondition(quadrant == 0 || rootRole.hasFourByteGPTE, "quadrant without 4-byte GPTEs")
    precondition(!(rootRole.isDirect && rootRole.hasFourByteGPTE), "direct root with 4-byte GPTEs")
    var role = rootRole
    role.level = level
    role.quadrant = quadrant
    return role
}

/// The roles of the four level-2 roots KVM allocates when the root role's level is 3 (shadow paging
/// of a 32-bit, PAE or non-paging guest), indexed by PAE root 0-3.
///
/// Shadow of a paging guest: quadrant per `rootQuadrant`. Direct (guest without paging): quadrant 0,
/// root i mapping gfns from `i << 18` (1 GiB each). The caller skips roots whose guest PDPTE is not
/// present.
public func paeRootRoles(rootRole: PageRole, cpuRole: CPURole) -> [PageRole] {
    (0..<4).map { index in
        let quadrant = rootRole.isDirect ? 0 : rootQuadrant(forPAERoot: index, guestRootLevel: cpuRole.base.level)
        return rootPageRole(rootRole: rootRole, level: KVMLevel.pt32Root, quadrant: quadrant)
    }
}

// MARK: - Context resets on register writes

/// What a control-register or EFER write does to the vCPU's MMU context.
public enum ContextReset: Sendable, Hashable, CaseIterable {
    /// Nothing: the write does not touch the roles.
    case none
    /// `kvm_init_mmu` only: recompute the CPU role (and the metadata derived from it); the roots stay.
    case reinitializeRoles
    /// `kvm_mmu_unload`: free the current and cached previous roots; the roles stay.
    case unload
    /// `kvm_mmu_reset_context`: unload, then re-initialise.
    case reset

    /// Whether the roots (current and cached) are freed.
    @inlinable public var unloadsRoots: Bool { self == .unload || self == .reset }
    /// Whether the roles are recomputed.
    @inlinable public var recomputesRoles: Bool { self == .reinitializeRoles || self == .reset }

    /// The effect of doing `self` and then `other`.
    @inlinable
    public func combined(with other: ContextReset) -> ContextReset {
        let unload = unloadsRoots || other.unloadsRoots
        let recompute = recomputesRoles || other.recomputesRoles
        switch (unload, recompute) {
        case (false, false): return .none
        case (false, true): return .reinitializeRoles
        case (true, false): return .unload
        case (true, true): return .reset
        }
    }
}

/// TLB-flush requests a register write raises.
public struct TLBFlushRequests: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    @inlinable public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// KVM_REQ_TLB_FLUSH_GUEST: flush every translation the guest may use (all PCIDs).
    @inlinable public static var flushGuest: TLBFlushRequests { TLBFlushRequests(rawValue: 1 << 0) }
    /// KVM_REQ_TLB_FLUSH_CURRENT: flush the translations of the current root / PCID.
    @inlinable public static var flushCurrent: TLBFlushRequests { TLBFlushRequests(rawValue: 1 << 1) }
    /// KVM_REQ_MMU_SYNC: sync the current roots' unsync pages before the guest runs again.
    @inlinable public static var syncRoots: TLBFlushRequests { TLBFlushRequests(rawValue: 1 << 2) }
}

/// Everything KVM does to the MMU after a CR0, CR4 or EFER write.
public struct MMUContextUpdate: Hashable, Sendable, CustomStringConvertible {
    public var context: ContextReset
    public var flushes: TLBFlushRequests
    /// CR0.PG toggled: KVM drops the async page-fault completion queue and hash.
    public var resetsAsyncPageFaults: Bool

    @inlinable
    public init(context: ContextReset = .none, flushes: TLBFlushRequests = [], resetsAsyncPageFaults: Bool = false) {
        self.context = context
        self.flushes = flushes
        self.resetsAsyncPageFaults = resetsAsyncPageFaults
    }

    public var description: String {
        var parts = ["\(context)"]
        if flushes.contains(.flushGuest) { parts.append("flushGuest") }
        if flushes.contains(.flushCurrent) { parts.append("flushCurrent") }
        if resetsAsyncPageFaults { parts.append("resetAsyncPF") }
        return parts.joined(separator: "+")
    }
}

/// KVM's `kvm_post_set_cr0`.
///
/// - A write that changes only CR0.WP does nothing while paging is off (no permissions to emulate),
///   and with TDP only re-initialises the roles: WP is in the CPU role but not in TDP root roles.
/// - CR0.PG toggling resets async page faults; clearing it is architecturally a TLB flush.
/// - Any other change of PG or WP resets the context.
/// - Parameter paging: whether paging is on after the write (KVM's `is_paging`, normally
///   `new.contains(.paging)`).
public func contextResetForCR0(old: CR0, new: CR0, tdp: Bool, paging: Bool) -> MMUContextUpdate {
    let changed = CR0(rawValue: old.rawValue ^ new.rawValue)
    if changed == .writeProtect {
        if !paging { return MMUContextUpdate() }
        if tdp { return MMUContextUpdate(context: .reinitializeRoles) }
    }
    var update = MMUContextUpdate()
    if changed.contains(.paging) {
        update.resetsAsyncPageFaults = true
        if !new.contains(.paging) { update.flushes.insert(.flushGuest) }
    }
    if !changed.isDisjoint(with: CR0.kvmMMURoleBits) {
        update.context = .reset
    }
    return update
}

/// `kvm_post_set_cr0` before seed 4 split `cpu_role` from `mmu_role` (the `combined-mmu-role`
/// variant): CR0.WP was part of the one role, so any change of PG or WP reset the context, also
/// under TDP, where the split lets a WP-only toggle merely re-initialise the roles (the TDP root
/// role has no WP). Without TDP the two rules agree.
public func contextResetForCR0WithCombinedRole(old: CR0, new: CR0, tdp: Bool, paging: Bool) -> MMUContextUpdate {
    let changed = CR0(rawValue: old.rawValue ^ new.rawValue)
    if changed == .writeProtect && !paging { return MMUContextUpdate() }
    var update = contextResetForCR0(old: old, new: new, tdp: false, paging: paging)
    if !changed.isDisjoint(with: CR0.kvmMMURoleBits) { update.context = .reset }
    return update
}

/// `contextResetForCR0(old:new:tdp:paging:)` with paging read from `new`.
public func contextResetForCR0(old: CR0, new: CR0, tdp: Bool) -> MMUContextUpdate {
    contextResetForCR0(old: old, new: new, tdp: tdp, paging: new.contains(.paging))
}

/// KVM's `kvm_post_set_cr4`.
///
/// - A change of any CR4 role bit resets the context.
/// - Without TDP, CR4.PCIDE 0->1 unloads the roots: cached previous roots were keyed without PCIDs and
///   could be reused wrongly by a later CR3 load with NOFLUSH. (No TLB flush is architecturally due.)
/// - CR4.PGE toggling or CR4.PCIDE 1->0 flushes every guest translation; otherwise CR4.PAE toggling
///   or CR4.SMEP 0->1 flushes the current translations.
public func contextResetForCR4(old: CR4, new: CR4, tdp: Bool) -> MMUContextUpdate {
    let changed = CR4(rawValue: old.rawValue ^ new.rawValue)
    var update = MMUContextUpdate()
    if !changed.isDisjoint(with: CR4.kvmMMURoleBits) {
        update.context = .reset
    }
    let pcidTurnedOn = new.contains(.pcidEnable) && !old.contains(.pcidEnable)
    let pcidTurnedOff = !new.contains(.pcidEnable) && old.contains(.pcidEnable)
    if !tdp && pcidTurnedOn {
        update.context = update.context.combined(with: .unload)
    }
    if changed.contains(.globalPages) || pcidTurnedOff {
        update.flushes.insert(.flushGuest)
    } else if changed.contains(.physicalAddressExtension) || (new.contains(.smep) && !old.contains(.smep)) {
        update.flushes.insert(.flushCurrent)
    }
    return update
}

/// KVM's `set_efer`: a change of LME or NX resets the context. EFER.LMA is not writable by the guest
/// (it follows CR0.PG), and the other bits do not affect paging.
public func contextResetForEFER(old: EFER, new: EFER) -> MMUContextUpdate {
    let changed = EFER(rawValue: old.rawValue ^ new.rawValue)
    return MMUContextUpdate(context: changed.isDisjoint(with: EFER.kvmMMURoleBits) ? .none : .reset)
}
