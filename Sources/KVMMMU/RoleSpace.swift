// The role space of one gfn. KVM's comment above `union kvm_mmu_page_role` bounds the number of
// upper-level shadow pages one gfn can have ("a bit less than 2^13"; seed 1's RFC v3 raised it to
// 2^15 when it added a 4-bit `glevel`) by counting role bits and the combinations it knows to be
// impossible. This file counts instead: it enumerates every guest register state that feeds the
// role computation, in every host configuration, runs them through the same root-role and
// child-role functions the shadow MMU uses (RoleComputation.swift), follows children level by
// level down to page tables, and collects the role words. The numbers are the sizes of those sets.
//
// It then re-encodes the reachable roles under alternative layouts of the role word (the seed's
// `glevel`, Sean's `passthrough_delta`, and the layout before `passthrough` existed), each given as
// a list of fields, so the bit budget is summed from the fields and a layout that merges two roles
// KVM must keep apart shows up as a collision.

import X86Paging

// MARK: - Host configurations

/// A VM's MMU set-up. One VM's shadow pages share one hash keyed by (gfn, role word), so the roles
/// that can coexist at one gfn are those one configuration can create; two configurations are two
/// VMs (or two hosts) and never share a hash.
public enum HostMMUConfiguration: Hashable, Sendable, CustomStringConvertible {
    /// TDP off (`tdp_enabled == false`): root_mmu shadows L1, and L2 as well when L1 runs a nested
    /// guest (nested without nested paging), then with `guest_mode` set.
    case shadowPaging
    /// VMX with EPT. TDP roots for L1 (and for L2 when L1 does not use EPT); shadow EPT (guest_mmu)
    /// for L2 when L1 uses EPT.
    /// - maxLevel: `vmx_get_max_ept_level`, 4 or 5. With 5, a vCPU whose MAXPHYADDR is at most 48
    ///   still gets 4-level TDP roots, and L1 may pick either EPTP walk level.
    /// - accessedDirty: `enable_ept_ad_bits`: TDP roots then use A/D bits, and L1 may enable them in
    ///   its EPTP (only then can a shadow EPT page have `ad_disabled` = 0).
    /// - executeOnly: the CPU supports execute-only EPT entries, so L1 may create them.
    case ept(maxLevel: Int, accessedDirty: Bool, executeOnly: Bool)
    /// SVM with NPT at the host's paging level (`get_npt_level`: 4 or 5 on a 64-bit host, 3 on a
    /// 32-bit one). TDP roots for L1 (and L2 when L1 does not use NPT); shadow NPT for L2 when it does.
    case npt(hostLevel: Int)

    /// Every configuration KVM supports, as far as the role computation can tell them apart.
    public static var all: [HostMMUConfiguration] {
        var configurations: [HostMMUConfiguration] = [.shadowPaging]
        for level in [KVMLevel.pt64Root4, KVMLevel.pt64Root5] {
            for accessedDirty in [true, false] {
                for executeOnly in [true, false] {
                    configurations.append(.ept(maxLevel: level, accessedDirty: accessedDirty, executeOnly: executeOnly))
                }
            }
        }
        for level in [KVMLevel.pt32eRoot, KVMLevel.pt64Root4, KVMLevel.pt64Root5] {
            configurations.append(.npt(hostLevel: level))
        }
        return configurations
    }

    public var description: String {
        switch self {
        case .shadowPaging:
            return "shadow paging (TDP off)"
        case .ept(let maxLevel, let accessedDirty, let executeOnly):
            return "EPT \(maxLevel)-level" + (accessedDirty ? " A/D" : " no-A/D") + (executeOnly ? " exec-only" : "")
        case .npt(let hostLevel):
            return "NPT \(hostLevel)-level" + (hostLevel == KVMLevel.pt32eRoot ? " (32-bit host)" : "")
        }
    }
}

// MARK: - Register states

/// The guest state a role is computed from: the register bits KVM's role computation reads, plus
/// SMM and guest (L2) mode.
public struct RoleRegisterState: Hashable, Sendable {
    public var cr0: CR0
    public var cr4: CR4
    public var efer: EFER
    public var smm: Bool
    public var guestMode: Bool

    public init(cr0: CR0, cr4: CR4, efer: EFER, smm: Bool, guestMode: Bool) {
        self.cr0 = cr0
        self.cr4 = cr4
        self.efer = efer
        self.smm = smm
        self.guestMode = guestMode
    }

    /// Every architecturally valid combination of the role bits (KVM_MMU_CR0_ROLE_BITS,
    /// KVM_MMU_CR4_ROLE_BITS, KVM_MMU_EFER_ROLE_BITS), with EFER.LMA derived, in and out of SMM and
    /// guest mode.
    ///
    /// Two kinds of state are left out because no vCPU can be in them:
    /// - EFER.LME with CR0.PG and without CR4.PAE: setting CR0.PG then is a #GP, and clearing
    ///   CR4.PAE in long mode is too. EFER.LMA is set exactly when LME and PG are.
    /// - SMM in guest mode: an SMI taken in L2 first exits to L1 (`vmx_enter_smm` and
    ///   `svm_enter_smm` do a nested VM-exit), and RSM leaves SMM before re-entering L2
    ///   (`emulator_leave_smm` calls `kvm_smm_changed(vcpu, false)` before `leave_smm`).
    public static var all: [RoleRegisterState] {
        var states: [RoleRegisterState] = []
        for cr0 in allSubsets(of: CR0.kvmMMURoleBits) {
            for cr4 in allSubsets(of: CR4.kvmMMURoleBits) {
                for roleEFER in allSubsets(of: EFER.kvmMMURoleBits) {
                    let paging = cr0.contains(.paging)
                    let longModeEnabled = roleEFER.contains(.longModeEnable)
                    if paging && longModeEnabled && !cr4.contains(.physicalAddressExtension) { continue }
                    var efer = roleEFER
                    if paging && longModeEnabled { efer.insert(.longModeActive) }
                    for (smm, guestMode) in [(false, false), (true, false), (false, true)] {
                        states.append(RoleRegisterState(cr0: cr0, cr4: cr4, efer: efer, smm: smm, guestMode: guestMode))
                    }
                }
            }
        }
        return states
    }
}

/// Every subset of the bits set in `mask`, the empty set first.
private func allSubsets<T: OptionSet>(of mask: T) -> [T] where T.RawValue == UInt64 {
    let bits = (0..<UInt64.bitWidth).map { UInt64(1) << UInt64($0) }.filter { mask.rawValue & $0 != 0 }
    return (0..<(1 << bits.count)).map { selection in
        var raw: UInt64 = 0
        for (index, bit) in bits.enumerated() where selection & (1 << index) != 0 { raw |= bit }
        return T(rawValue: raw)
    }
}

// MARK: - Guest entry formats

/// How one guest paging-structure entry grants access: this bounds the `access` a child role can
/// carry, since a child's access is its parent's ANDed with the parent's guest entry
/// (`FNAME(walk_addr_generic)`'s `pt_access`; roots start from ACC_ALL).
public enum GuestEntryFormat: Hashable, Sendable {
    /// A direct MMU (TDP, or a guest without paging): no guest entries; children take the parent's
    /// access, which is ACC_ALL.
    case none
    /// x86 paging entries (also what L1's NPT tables are). NX exists only with 8-byte entries and
    /// EFER.NX=1; without it an entry always grants execute (`FNAME(gpte_access)` folds NX into P).
    case x86(noExecute: Bool, fourByte: Bool)
    /// EPT entries: R maps to ACC_USER, W to ACC_WRITE, X to ACC_EXEC. Write without read is a
    /// misconfiguration, and execute-only is one too unless the CPU supports it (`bad_mt_xwr`).
    case ept(executeOnly: Bool)

    /// Every ACC value one present, non-reserved entry can grant.
    public var entryAccessValues: [UInt8] {
        switch self {
        case .none:
            return [ACC.all]
        case .x86(let noExecute, let fourByte):
            let executeChoices: [UInt8] = noExecute && !fourByte ? [0, ACC.exec] : [ACC.exec]
            var values: [UInt8] = []
            for write in [0, ACC.write] {
                for user in [0, ACC.user] {
                    for execute in executeChoices { values.append(write | user | execute) }
                }
            }
            return values
        case .ept(let executeOnly):
            var values: [UInt8] = []
            // Bits 0-2 of an EPT entry: read, write, execute; zero means not present.
            for permissions in 1...EPTEntryBits.permissionMask {
                let read = permissions & EPTEntryBits.read != 0
                let write = permissions & EPTEntryBits.write != 0
                let execute = permissions & EPTEntryBits.execute != 0
                if write && !read { continue }
                if execute && !read && !write && !executeOnly { continue }
                values.append((read ? ACC.user : 0) | (write ? ACC.write : 0) | (execute ? ACC.exec : 0))
            }
            return values
        }
    }
}

/// The permission bits of an EPT entry (SDM Vol. 3 "EPT Translation Mechanism").
enum EPTEntryBits {
    static let read = 1
    static let write = 2
    static let execute = 4
    static let permissionMask = 7
}

// MARK: - Contexts

/// Which of KVM's MMU contexts a role comes from.
public enum MMUFlavor: String, Hashable, Sendable, CaseIterable {
    /// root_mmu without TDP (`kvm_init_shadow_mmu`).
    case shadowPaging
    /// root_mmu with TDP (`kvm_calc_tdp_mmu_root_page_role`).
    case tdp
    /// guest_mmu shadowing L1's NPT (`kvm_init_shadow_npt_mmu`).
    case shadowNPT
    /// guest_mmu shadowing L1's EPT (`kvm_calc_shadow_ept_root_page_role`).
    case shadowEPT
}

/// One MMU context: its CPU and root roles, the root pages it allocates, and what bounds the roles
/// of the pages below them.
public struct RoleContext: Hashable, Sendable {
    public var flavor: MMUFlavor
    public var cpuRole: CPURole
    public var rootRole: PageRole
    public var entryFormat: GuestEntryFormat
    /// Guest levels at which an entry can map a huge page. KVM shadows a guest huge page with
    /// smaller pages under a direct child of the shadow page at that level.
    public var hugePageLevels: [Int]
    /// CR0.WP=0 emulation (`FNAME(page_fault)`, shadow paging only): a supervisor write to a
    /// read-only page maps it writable and supervisor-only, and not executable under CR4.SMEP. It
    /// changes the access direct children get; nested TDP faults are user accesses, so it never
    /// applies to them.
    public var emulatesSupervisorWrites: Bool

    /// The guest's paging level: `cpu_role.base.level` (0 without paging).
    public var guestRootLevel: Int { cpuRole.base.level }

    /// The shadow pages KVM allocates as roots (`mmu_alloc_direct_roots`, `mmu_alloc_shadow_roots`).
    /// A root level of 3, or a guest with fewer than 4 levels under an indirect root, gets four
    /// level-2 roots below `pae_root` (and `pml4_root`/`pml5_root` above it); those special roots are
    /// plain pages, not shadow pages, so they have no role and are not counted.
    public var rootPages: [PageRole] {
        let oneRoot = rootRole.level >= KVMLevel.pt64Root4 && (rootRole.isDirect || guestRootLevel >= KVMLevel.pt64Root4)
        if oneRoot { return [rootPageRole(rootRole: rootRole, level: rootRole.level, quadrant: 0)] }
        return paeRootRoles(rootRole: rootRole, cpuRole: cpuRole)
    }

    /// Every context one configuration can build, deduplicated.
    public static func all(in configuration: HostMMUConfiguration,
                           states: [RoleRegisterState] = RoleRegisterState.all) -> [RoleContext] {
        var contexts = Set<RoleContext>()
        for state in states {
            switch configuration {
            case .shadowPaging:
                let cpu = calcCPURole(cr0: state.cr0, cr4: state.cr4, efer: state.efer, smm: state.smm,
                                      guestMode: state.guestMode)
                contexts.insert(shadowPagingContext(cpu))
            case .ept(let maxLevel, let accessedDirty, let executeOnly):
                let cpu = calcCPURole(cr0: state.cr0, cr4: state.cr4, efer: state.efer, smm: state.smm,
                                      guestMode: state.guestMode)
                for level in tdpLevels(maxLevel: maxLevel) {
                    contexts.insert(tdpContext(cpu, level: level, accessedDirty: accessedDirty))
                }
                // Shadow EPT reads no guest register: one context per EPTP choice, in L2 only.
                guard state.guestMode else { break }
                for level in tdpLevels(maxLevel: maxLevel) {
                    for eptpAccessedDirty in accessedDirty ? [true, false] : [false] {
                        let cpu = shadowEPTRootRole(level: level, accessedDirty: eptpAccessedDirty, executeOnly: executeOnly)
                        contexts.insert(RoleContext(flavor: .shadowEPT, cpuRole: cpu, rootRole: cpu.base,
                                                    entryFormat: .ept(executeOnly: executeOnly),
                                                    hugePageLevels: [KVMLevel.pageDirectory, KVMLevel.pageDirectoryPointer],
                                                    emulatesSupervisorWrites: false))
                    }
                }
            case .npt(let hostLevel):
                let cpu = calcCPURole(cr0: state.cr0, cr4: state.cr4, efer: state.efer, smm: state.smm,
                                      guestMode: state.guestMode)
                contexts.insert(tdpContext(cpu, level: hostLevel, accessedDirty: true))
                // Shadow NPT: built while the vCPU runs L2 (so never in SMM) from L1's CR4 and EFER,
                // with CR0 = PG (svm/nested.c `nested_svm_init_mmu_context`). The state's CR0 stands
                // for L1's, which matters only through EFER.LMA.
                guard state.guestMode, let context = shadowNPTContext(state, hostLevel: hostLevel) else { break }
                contexts.insert(context)
            }
        }
        return contexts.sorted { ($0.flavor.rawValue, $0.rootRole.word, $0.cpuRole.asUInt64) < ($1.flavor.rawValue, $1.rootRole.word, $1.cpuRole.asUInt64) }
    }

    /// TDP root levels a configuration with `maxLevel` can use: with 5-level EPT, a vCPU with
    /// MAXPHYADDR <= 48 gets 4 (`kvm_mmu_get_tdp_level`).
    static func tdpLevels(maxLevel: Int) -> [Int] {
        let narrow = tdpLevel(maxTDPLevel: maxLevel, guestMaxPhysicalAddressBits: 48)
        let wide = tdpLevel(maxTDPLevel: maxLevel, guestMaxPhysicalAddressBits: 52)
        return narrow == wide ? [wide] : [narrow, wide]
    }

    static func shadowPagingContext(_ cpu: CPURole) -> RoleContext {
        RoleContext(flavor: .shadowPaging, cpuRole: cpu, rootRole: shadowRootRole(for: cpu),
                    entryFormat: x86EntryFormat(cpu), hugePageLevels: x86HugePageLevels(cpu),
                    emulatesSupervisorWrites: cpu.isCR0PG && !cpu.isCR0WP)
    }

    /// The TDP root role reads only SMM and guest mode from the CPU role, and TDP pages have no guest
    /// entries, so the context keeps just those two (as a CPU role without paging): register states
    /// that differ elsewhere build the same context.
    static func tdpContext(_ full: CPURole, level: Int, accessedDirty: Bool) -> RoleContext {
        let cpu = calcCPURole(cr0: [], cr4: [], efer: [], smm: full.base.smm, guestMode: full.base.guestMode)
        return RoleContext(flavor: .tdp, cpuRole: cpu, rootRole: tdpRootRole(for: cpu, tdpLevel: level, accessedDirtyEnabled: accessedDirty),
                    entryFormat: .none, hugePageLevels: [], emulatesSupervisorWrites: false)
    }

    /// Nil when L1's paging level exceeds the host's: a host whose tables are shallower than L1's
    /// does not expose the deeper mode (a 4-level host clears LA57; a 32-bit host runs no 64-bit L1).
    static func shadowNPTContext(_ state: RoleRegisterState, hostLevel: Int) -> RoleContext? {
        let cpu = shadowNPTCPURole(cr0: [.paging], cr4: state.cr4, efer: state.efer)
        guard cpu.base.level <= hostLevel else { return nil }
        return RoleContext(flavor: .shadowNPT, cpuRole: cpu, rootRole: shadowNPTRootRole(for: cpu, tdpLevel: hostLevel),
                           entryFormat: x86EntryFormat(cpu), hugePageLevels: x86HugePageLevels(cpu),
                           emulatesSupervisorWrites: false)
    }

    static func x86EntryFormat(_ cpu: CPURole) -> GuestEntryFormat {
        guard cpu.isCR0PG else { return .none }
        return .x86(noExecute: cpu.isEFERNX, fourByte: cpu.base.hasFourByteGPTE)
    }

    /// Levels where x86 paging allows a huge leaf: 4 MiB PDEs with CR4.PSE in 32-bit paging, 2 MiB
    /// PDEs in PAE and long mode, and 1 GiB PDPTEs in long mode (the vCPU model has GBPAGES).
    static func x86HugePageLevels(_ cpu: CPURole) -> [Int] {
        switch cpu.base.level {
        case 0: return []
        case KVMLevel.pt32Root: return cpu.isCR4PSE ? [KVMLevel.pageDirectory] : []
        case KVMLevel.pt32eRoot: return [KVMLevel.pageDirectory]
        default: return [KVMLevel.pageDirectory, KVMLevel.pageDirectoryPointer]
        }
    }

    /// The roles of the pages a page of role `parent` can point to in this context.
    ///
    /// Indirect children shadow the guest tables the parent's entries point to; their access is the
    /// parent's ANDed with that entry (a passthrough parent has no guest entry: its child, the guest
    /// root, keeps ACC_ALL). Direct children split a guest huge page mapped at the parent's level
    /// (with the leaf's access, CR0.WP=0 emulation applied), or continue a direct parent's split.
    func children(of parent: PageRole) -> Set<PageRole> {
        var result = Set<PageRole>()
        for index in RoleSpace.representativeIndices {
            if parent.isDirect {
                result.insert(childRole(of: parent, parentIndex: index, direct: true, access: parent.access))
                continue
            }
            let entryAccess: [UInt8] = parent.isPassthrough ? [ACC.all] : entryFormat.entryAccessValues
            for entry in entryAccess {
                result.insert(childRole(of: parent, parentIndex: index, direct: false, access: parent.access & entry))
            }
            guard !parent.isPassthrough, hugePageLevels.contains(parent.level) else { continue }
            for entry in entryAccess {
                for access in leafAccess(parent.access & entry) {
                    result.insert(childRole(of: parent, parentIndex: index, direct: true, access: access))
                }
            }
        }
        return result
    }

    /// The access a huge guest leaf can end up mapped with.
    func leafAccess(_ access: UInt8) -> [UInt8] {
        guard emulatesSupervisorWrites && access & ACC.write == 0 else { return [access] }
        var emulated = (access | ACC.write) & ~ACC.user
        if cpuRole.isCR4SMEP { emulated &= ~ACC.exec }
        return [access, emulated]
    }
}

// MARK: - Enumeration

/// A reachable shadow-page role with what an alternative layout needs to re-encode it: the guest
/// paging level of the context it came from.
public struct ReachableRole: Hashable, Sendable {
    public var role: PageRole
    public var guestRootLevel: Int

    public init(role: PageRole, guestRootLevel: Int) {
        self.role = role
        self.guestRootLevel = guestRootLevel
    }
}

/// The roles one configuration can create, by flavor.
public struct RoleSpace: Sendable {
    public var configuration: HostMMUConfiguration
    public var contextCount: Int
    public var reachable: Set<ReachableRole>
    /// The role words, each with the flavors that create it.
    public var flavors: [PageRole: Set<MMUFlavor>]

    /// `kvm_mmu_child_role` reads the parent entry's index only through its parity (which half of a
    /// 4-byte guest page table the child shadows), so an even and an odd index stand for all 512.
    /// (RolesTests checks this against every index.)
    public static let representativeIndices = [0, 1]

    public var roles: Set<PageRole> { Set(flavors.keys) }
    /// Upper-level roles (level > 1): the pages whose guest tables are write-tracked when they have gptes.
    public var upperLevelRoles: Set<PageRole> { roles.filter { $0.level > KVMLevel.pageTable } }
    /// Upper-level roles of pages with gptes: each one holds a `gfn_write_track` reference on its gfn.
    public var writeTrackedUpperLevelRoles: Set<PageRole> { upperLevelRoles.filter { $0.hasGPTEs } }
    public var levelOneRoles: Set<PageRole> { roles.filter { $0.level == KVMLevel.pageTable } }

    /// Enumerates `configuration`: every context's root pages, then their children level by level.
    public init(configuration: HostMMUConfiguration, states: [RoleRegisterState] = RoleRegisterState.all) {
        self.configuration = configuration
        let contexts = RoleContext.all(in: configuration, states: states)
        contextCount = contexts.count
        var reachable = Set<ReachableRole>()
        var flavors: [PageRole: Set<MMUFlavor>] = [:]
        for context in contexts {
            var pending = context.rootPages
            var seen = Set<PageRole>()
            while let page = pending.popLast() {
                guard seen.insert(page).inserted else { continue }
                reachable.insert(ReachableRole(role: page, guestRootLevel: context.guestRootLevel))
                flavors[page, default: []].insert(context.flavor)
                if page.level > KVMLevel.pageTable { pending.append(contentsOf: context.children(of: page)) }
            }
        }
        self.reachable = reachable
        self.flavors = flavors
    }

    /// Every configuration, enumerated.
    public static func allConfigurations() -> [RoleSpace] {
        let states = RoleRegisterState.all
        return HostMMUConfiguration.all.map { RoleSpace(configuration: $0, states: states) }
    }
}

// MARK: - Layouts

/// One field of a role-word layout.
public struct RoleField: Sendable {
    public var name: String
    public var offset: Int
    public var width: Int
    /// The field's value for a reachable role.
    public var value: @Sendable (ReachableRole) -> UInt32

    public init(_ name: String, offset: Int, width: Int, value: @escaping @Sendable (ReachableRole) -> UInt32) {
        self.name = name
        self.offset = offset
        self.width = width
        self.value = value
    }

    /// The bits the field occupies in the word.
    public var mask: UInt32 { UInt32(truncatingIfNeeded: ((UInt64(1) << UInt64(width)) - 1) << UInt64(offset)) }
}

/// A bound on the number of upper-level shadow pages per gfn as a seed states it.
public struct SeedClaim: Sendable {
    public var quote: String
    public var log2Bound: Int
    public var source: String
    public var bound: Int { 1 << log2Bound }
}

/// A layout of `union kvm_mmu_page_role`: its fields, from which the bit budget is summed and each
/// reachable role re-encoded.
public struct RoleLayout: Sendable {
    /// The role is one 32-bit word (KVM BUILD_BUG_ONs `sizeof(union kvm_mmu_page_role) == 4`).
    public static let wordBits = 32

    public var name: String
    public var summary: String
    public var fields: [RoleField]
    public var seedClaim: SeedClaim?

    public var bitsUsed: Int { fields.reduce(0) { $0 + $1.width } }
    public var bitsFree: Int { Self.wordBits - bitsUsed }

    /// Fields that overlap another or do not fit in the word; empty for a well-formed layout.
    public var layoutErrors: [String] {
        var errors: [String] = []
        var taken: UInt32 = 0
        for field in fields {
            if field.width <= 0 || field.offset < 0 || field.offset + field.width > Self.wordBits {
                errors.append("\(field.name) does not fit in \(Self.wordBits) bits")
                continue
            }
            if taken & field.mask != 0 { errors.append("\(field.name) overlaps another field") }
            taken |= field.mask
        }
        return errors
    }

    /// The word for `role` under this layout.
    public func word(for role: ReachableRole) -> UInt32 {
        var word: UInt32 = 0
        for field in fields {
            let value = field.value(role)
            precondition(value < UInt32(1) << UInt32(field.width), "\(name).\(field.name) = \(value) needs more than \(field.width) bits")
            word |= value << UInt32(field.offset)
        }
        return word
    }

    /// Distinct words for `roles`, and how many of those words stand for more than one upstream role
    /// (roles KVM keeps apart that this layout would let one shadow page stand for).
    public func count(_ roles: some Sequence<ReachableRole>) -> (words: Int, collisions: Int) {
        var upstreamByWord: [UInt32: Set<UInt32>] = [:]
        for role in roles { upstreamByWord[word(for: role), default: []].insert(role.role.word) }
        return (upstreamByWord.count, upstreamByWord.values.filter { $0.count > 1 }.count)
    }

    // Field values shared by every layout: the fields upstream has had since before seed 1.
    private static func bit(_ flag: Bool) -> UInt32 { flag ? 1 : 0 }

    private static var commonFields: [RoleField] {
        [
            RoleField("level", offset: 0, width: 4) { UInt32($0.role.level) },
            RoleField("has_4_byte_gpte", offset: 4, width: 1) { bit($0.role.hasFourByteGPTE) },
            RoleField("quadrant", offset: 5, width: 2) { UInt32($0.role.quadrant) },
            RoleField("direct", offset: 7, width: 1) { bit($0.role.isDirect) },
            RoleField("access", offset: 8, width: 3) { UInt32($0.role.access) },
            RoleField("invalid", offset: 11, width: 1) { bit($0.role.isInvalid) },
            RoleField("efer_nx", offset: 12, width: 1) { bit($0.role.eferNX) },
            RoleField("cr0_wp", offset: 13, width: 1) { bit($0.role.cr0WP) },
            RoleField("smep_andnot_wp", offset: 14, width: 1) { bit($0.role.smepAndNotWP) },
            RoleField("smap_andnot_wp", offset: 15, width: 1) { bit($0.role.smapAndNotWP) },
            RoleField("ad_disabled", offset: 16, width: 1) { bit($0.role.adDisabled) },
            RoleField("guest_mode", offset: 17, width: 1) { bit($0.role.guestMode) },
        ]
    }

    /// `smm` keeps the top byte in every layout so `kvm_memslots_for_spte_role` can shift it out.
    private static var smmField: RoleField {
        RoleField("smm", offset: 24, width: 8) { bit($0.role.smm) }
    }

    /// The header comment's bound, which upstream still carries.
    private static let headerClaim = SeedClaim(
        quote: "a bit less than 2^13", log2Bound: 13,
        source: "kvm_host.h comment above union kvm_mmu_page_role, as quoted in seed 1")

    /// KVM's current union (PageRole): `passthrough` at bit 18.
    public static let upstream = RoleLayout(
        name: "upstream",
        summary: "KVM's union kvm_mmu_page_role: a passthrough bit for the 5-level root over a 4-level nested NPT",
        fields: commonFields + [RoleField("passthrough", offset: 18, width: 1) { bit($0.role.isPassthrough) }, smmField],
        seedClaim: headerClaim)

    /// Seed 1, RFC v3: a 4-bit guest paging level; a page is passthrough when `glevel < level`.
    /// `kvm_mmu_get_page` clamps it to the page's level, so an indirect page has
    /// `min(level, guest level)`; a direct page has 0.
    public static let glevel = RoleLayout(
        name: "glevel",
        summary: "seed 1 (RFC v3): glevel:4 = guest paging level (0 if direct); passthrough when glevel < level",
        fields: commonFields + [
            RoleField("glevel", offset: 18, width: 4) { reachable in
                reachable.role.isDirect ? 0 : UInt32(min(reachable.role.level, reachable.guestRootLevel))
            },
            smmField,
        ],
        seedClaim: SeedClaim(quote: "a bit less than 2^15", log2Bound: 15, source: "seed 1, RFC v3 2/4's new header comment"))

    /// Sean's reply in seed 1: `shadow_root_level - guest_root_level` for a passthrough page, 0
    /// otherwise, ignored (0) for direct pages.
    public static let passthroughDelta = RoleLayout(
        name: "passthrough-delta",
        summary: "seed 1 (Sean): passthrough_delta:2 = shadow root level - guest root level, 0 if not passthrough or direct",
        fields: commonFields + [
            RoleField("passthrough_delta", offset: 18, width: 2) { reachable in
                reachable.role.isDirect ? 0 : UInt32(max(0, reachable.role.level - reachable.guestRootLevel))
            },
            smmField,
        ],
        seedClaim: nil)

    /// The union before `passthrough` (v5.18 and earlier): the 5-level root over a 4-level nested NPT
    /// shares its word with the root of a 5-level nested NPT at the same gfn, the reuse bug seed 1
    /// set out to fix.
    public static let noPassthrough = RoleLayout(
        name: "no-passthrough",
        summary: "KVM before seed 1's fix (v5.18): no passthrough information in the role",
        fields: commonFields + [smmField],
        seedClaim: headerClaim)

    /// Every layout, in report order.
    public static var all: [RoleLayout] { [upstream, glevel, passthroughDelta, noPassthrough] }

    public static func named(_ name: String) -> RoleLayout? { all.first { $0.name == name } }
}

// MARK: - Report

/// One layout's numbers over every configuration.
public struct RoleLayoutReport: Sendable {
    public var layout: RoleLayout
    /// The most distinct upper-level words any one configuration reaches for one gfn.
    public var upperLevelRolesPerGFN: Int
    /// The same, for pages with gptes only (the ones `gfn_write_track` counts).
    public var writeTrackedUpperLevelRolesPerGFN: Int
    /// The most distinct level-1 words any one configuration reaches for one gfn.
    public var levelOneRolesPerGFN: Int
    /// The configuration reaching `upperLevelRolesPerGFN`.
    public var worstConfiguration: HostMMUConfiguration
    /// Upper-level words standing for more than one upstream role, most in one configuration.
    public var collisions: Int
    /// Distinct upper-level words over all configurations together (roles that never share a VM).
    public var upperLevelRolesAnyConfiguration: Int

    public init(layout: RoleLayout, spaces: [RoleSpace]) {
        precondition(!spaces.isEmpty, "no configurations to report on")
        self.layout = layout
        var best: (count: Int, configuration: HostMMUConfiguration)?
        var tracked = 0, levelOne = 0, collisions = 0
        var everywhere = Set<UInt32>()
        for space in spaces {
            let upper = space.reachable.filter { $0.role.level > KVMLevel.pageTable }
            let (words, merged) = layout.count(upper)
            if best == nil || words > best!.count { best = (words, space.configuration) }
            collisions = max(collisions, merged)
            tracked = max(tracked, layout.count(upper.filter { $0.role.hasGPTEs }).words)
            levelOne = max(levelOne, layout.count(space.reachable.filter { $0.role.level == KVMLevel.pageTable }).words)
            for role in upper { everywhere.insert(layout.word(for: role)) }
        }
        upperLevelRolesPerGFN = best!.count
        worstConfiguration = best!.configuration
        writeTrackedUpperLevelRolesPerGFN = tracked
        levelOneRolesPerGFN = levelOne
        self.collisions = collisions
        upperLevelRolesAnyConfiguration = everywhere.count
    }
}
