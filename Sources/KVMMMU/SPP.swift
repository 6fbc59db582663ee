// KVM's side of sub-page write protection (SPP), as the unmerged series designed it (spec 12.2) with
// the decisions docs/SPP.md records: the per-memslot permission storage behind
// KVM_SUBPAGES_SET_ACCESS / KVM_SUBPAGES_GET_ACCESS, the SPP table KVM builds on demand from host
// pages, the SPTE bits that arm a leaf, and the questions the TDP fault path, the dirty log and the
// emulator must ask. The table's format and the processor's check are architecture and live in
// X86Paging (SPPTable.swift).
//
// A *page* is a 4 KiB guest page (one gfn); a *sub-page* is one of its 32 aligned 128-byte pieces.
// A page is *protected* when its stored bitmap is not all-writable; its EPT leaf is then *armed*:
// W clear and bit 61 set, so the processor checks writes against the SPP table instead of faulting.

import GuestMemory
import X86Paging

// MARK: The page-role bit

extension PageRole {
    /// Bit 23: the series' `spp:1`. Bits 19-23 are unused upstream; the seed-1 variants
    /// (`MMUVariant`) use 19-22 for `glevel` and 19-20 for `passthrough_delta`, so 23 is the one
    /// bit free under every variant. (TDX's `is_mirror` took bit 19 in v6.14; not modelled.)
    @usableFromInline static var subPageProtectionTableBit: UInt32 { 23 }

    /// `spp`, bit 23 (the SPP extension; not upstream): the page is a table of the SPP table, not a
    /// page of EPT or shadow entries. Its own role bit keeps it apart from an EPT page of the same
    /// gfn and level wherever pages are keyed by (gfn, role).
    @inlinable public var isSubPageProtectionTable: Bool {
        get { flag(Self.subPageProtectionTableBit) }
        set { setFlag(Self.subPageProtectionTableBit, newValue) }
    }

    /// The role of an SPP-table page at `level` (1 = a table of L1Es ... 4 = the root): direct,
    /// full access, `spp` set. The SPP table belongs to the VM, not to an address space or a vCPU
    /// mode, so nothing else is set.
    @inlinable
    public static func subPageProtectionTable(level: Int) -> PageRole {
        var role = PageRole(level: level, isDirect: true, access: ACC.all)
        role.isSubPageProtectionTable = true
        return role
    }
}

// MARK: The SPTE bits

extension SPTE {
    /// Bit 61 of an EPT leaf (`PT_SPP_MASK`): writes through the leaf consult the SPP table.
    @inlinable public static var subPagePermissionBit: UInt64 { EPTEntry.subPagePermissionBit }

    /// Bit 55, a software bit: the leaf was armed, and dirty logging took bit 61 away so that the
    /// next write faults and is logged (the series' `PT64_SPP_SAVED_BIT`). Free in the EPT format:
    /// 54 and 56 hold the access-tracking saved R and X (55 is where a saved W would go, which KVM
    /// never saves), 57/58 host- and MMU-writable, 52-53 the A/D type; the MMIO generation also
    /// uses 52-62, but only in MMIO SPTEs, which are never shadow-present and never armed.
    @inlinable public static var savedSubPagePermissionBit: UInt64 { 1 << 55 }

    /// Bit 61 is set: the leaf is armed.
    @inlinable public var isSubPageArmed: Bool { rawValue & Self.subPagePermissionBit != 0 }

    /// Bit 55 is set: the leaf is armed in waiting, until the next write is logged.
    @inlinable public var hasSavedSubPageArming: Bool { rawValue & Self.savedSubPagePermissionBit != 0 }

    /// Whether the processor consults the SPP table for a write through this SPTE, the leaf of a
    /// walk at `level` (the architectural rule, asked of X86Paging).
    @inlinable
    public func consultsSubPagePermissions(level: Int) -> Bool {
        EPTEntry(rawValue: rawValue).consultsSubPagePermissions(level: level)
    }

    /// The leaf for a protected page: a writable 4 KiB leaf gives up W for bit 61; a leaf KVM has
    /// write-protected for dirty logging (W clear, MMU-writable) gets the saved bit instead, so
    /// the write that logs the page arms it. Nil when nothing changes or SPP must not apply: not
    /// EPT, not a present 4 KiB leaf, already armed, or not MMU-writable. The last is the safety
    /// rule: SPP grants writes to a W=0 page, so it may only stand where KVM would have granted W
    /// itself — never on a read-only host page, a write-tracked gfn or a read-only memslot.
    public func armedForSubPageProtection(level: Int, masks: SPTEMasks) -> SPTE? {
        guard masks.isEPT, level == KVMLevel.pageTable, isShadowPresent, !isMMIO(masks), isMMUWritable(masks),
              !isSubPageArmed, !hasSavedSubPageArming
        else { return nil }
        if isWritable { return SPTE((rawValue & ~Self.writableBit) | Self.subPagePermissionBit) }
        return SPTE(rawValue | Self.savedSubPagePermissionBit)
    }

    /// The leaf of a page that is no longer protected: bit 61 and the saved bit cleared. W stays
    /// clear and MMU-writable stays set, so the next write faults, is logged if it must be, and is
    /// made writable by the ordinary (fast) path. Nil when neither bit is set.
    @inlinable
    public func disarmedSubPageProtection() -> SPTE? {
        let bits = Self.subPagePermissionBit | Self.savedSubPagePermissionBit
        guard rawValue & bits != 0 else { return nil }
        return SPTE(rawValue & ~bits)
    }

    /// Write protection for dirty logging (`spte_write_protect` without `pt_protect`), SPP-aware:
    /// W is cleared as usual, and an armed leaf moves bit 61 to the saved bit, because an armed
    /// leaf lets writes to its writable sub-pages through without a fault, so the dirty log would
    /// miss them. Nil when nothing changes.
    ///
    /// Access tracking (`markedForAccessTrack`) needs no such care: it clears R, W and X, and a
    /// not-present EPT entry's other bits (61 included) are ignored and restored untouched.
    @inlinable
    public func writeProtectedForDirtyLogging() -> SPTE? {
        var bits = rawValue & ~Self.writableBit
        if isSubPageArmed { bits = (bits & ~Self.subPagePermissionBit) | Self.savedSubPagePermissionBit }
        return bits == rawValue ? nil : SPTE(bits)
    }

    /// The leaf after a write fault on a protected page whose leaf is not armed — dirty logging set
    /// its arming aside (the saved bit), or the leaf predates the protection: bit 61 set, W and the
    /// saved bit clear. Not W: the page is still protected, and the retried write meets the SPP
    /// table. The caller logs the page dirty first, as the fast page fault path does when it sets
    /// W (the series' `restore_spp_bit`). Nil when the leaf is not MMU-writable: SPP may only stand
    /// where KVM would have granted W.
    public func armedAfterWriteFault(masks: SPTEMasks) -> SPTE? {
        guard masks.isEPT, isShadowPresent, isMMUWritable(masks) else { return nil }
        return SPTE((rawValue & ~(Self.writableBit | Self.savedSubPagePermissionBit)) | Self.subPagePermissionBit)
    }
}

// MARK: Errors and exits

/// Why an SPP request was refused, with the page or slot concerned.
public enum SubPageProtectionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// SPP is an EPT feature (shadow paging and NPT have no bit 61 to arm).
    case requiresEPT
    /// The series made SPP and nested virtualization exclusive (`spp_init` returned -EPERM).
    case exclusiveWithNestedVirtualization
    /// Dirty logging by PML clears D instead of W, and whether the processor sets D on a write SPP
    /// lets through is not documented: SPP is enabled only with write-protection dirty logging.
    case requiresWriteProtectDirtyLogging
    /// SPP was not enabled for this VM (-ENODEV).
    case notEnabled
    /// The SPP table's root is not a valid SPPTP on this host.
    case tablePointer(SPPTablePointerError)
    /// No host page was left for an SPP-table page.
    case hostMemory(HostPagePoolError)
    /// `flags` must be 0 (-EINVAL).
    case invalidFlags(UInt32)
    /// A request covers 1 to `SubPageProtection.maxPagesPerRequest` pages (-EINVAL).
    case invalidPageCount(Int)
    /// SET needs one bitmap per page (-EINVAL).
    case maskCountMismatch(pages: Int, masks: Int)
    /// The page lies in no memslot (-EFAULT).
    case notInMemslot(GuestFrameNumber)
    /// The page lies in a read-only memslot: every write there already exits as MMIO, and arming
    /// its leaf would let SPP grant writes to ROM (-EINVAL).
    case readOnlyMemslot(GuestFrameNumber, slot: Int)
    /// The page lies at or above 2^48, beyond the 4-level SPP table's reach (5-level EPT).
    case beyondTableReach(GuestFrameNumber)
    /// Moving the slot would put its protected pages beyond the SPP table's reach.
    case moveBeyondTableReach(slot: Int, to: GuestPhysicalAddress)

    public var description: String {
        switch self {
        case .requiresEPT: "sub-page write protection needs EPT"
        case .exclusiveWithNestedVirtualization: "sub-page write protection and nested virtualization exclude each other"
        case .requiresWriteProtectDirtyLogging: "sub-page write protection needs write-protection dirty logging, not PML"
        case .notEnabled: "sub-page write protection is not enabled for this VM"
        case .tablePointer(let error): "the SPP table cannot be used: \(error)"
        case .hostMemory(let error): "no host page for the SPP table: \(error)"
        case .invalidFlags(let flags): "SPP request flags \(hex(flags)) must be 0"
        case .invalidPageCount(let count):
            "an SPP request covers 1 to \(SubPageProtection.maxPagesPerRequest) pages, not \(count)"
        case .maskCountMismatch(let pages, let masks): "\(pages) pages need \(pages) bitmaps, not \(masks)"
        case .notInMemslot(let gfn): "\(gfn) lies in no memslot"
        case .readOnlyMemslot(let gfn, let slot):
            "\(gfn) lies in read-only memslot \(slot): its writes already exit, and SPP would grant them"
        case .beyondTableReach(let gfn):
            "\(gfn) lies at or above 2^48, beyond the reach of the 4-level SPP table"
        case .moveBeyondTableReach(let slot, let base):
            "memslot \(slot) has protected pages that would lie beyond the SPP table's reach at \(base)"
        }
    }
}

/// `KVM_EXIT_SPP` (proposed as 29, a number upstream later gave to KVM_EXIT_X86_RDMSR): a guest
/// write refused by sub-page permissions, for the VMM to handle (`kvm_run.spp`).
public struct SubPageWriteExit: Equatable, Sendable {
    /// The exit reason the series proposed.
    public static let exitReason = 29
    /// `spp.addr`: the guest-physical address of the refused write (for a write the processor or
    /// the emulator cut at a page boundary, the start of the refused page's part).
    public var address: GuestPhysicalAddress
    /// `spp.insn_len`: the length of the writing instruction, so the VMM can skip or emulate it.
    public var instructionLength: Int
}

/// An SPPT misconfiguration reaches the VMM as `KVM_EXIT_UNKNOWN` with this hardware exit reason:
/// KVM builds the table itself, so a misconfiguration is a KVM bug it cannot fix.
public struct SPPTableMisconfigurationExit: Equatable, Sendable {
    public var address: GuestPhysicalAddress
    public var hardwareExitReason: Int { SPPExitQualification.exitReason }
}

/// What the write-fault path does with a write EPT violation on a leaf (`writeFaultAction`).
public enum SubPageWriteFaultAction: Equatable, Sendable {
    /// SPP has no part in it: handle the fault as any other.
    case notSubPageProtected
    /// The leaf is armed and the page protected: the processor refused the write for a protected
    /// sub-page. Exit to the VMM (`subPageWriteExit`); never make the leaf writable.
    case exitToUserspace
    /// The page is protected but its leaf is not armed (dirty logging set the arming aside, or the
    /// leaf predates the protection): log the page dirty, arm the leaf
    /// (`SPTE.armedAfterWriteFault`) and let the guest retry the write against the SPP table.
    case armAndRetry
    /// The leaf still carries SPP bits but the page is no longer protected: clear them
    /// (`disarmedSubPageProtection`) and handle the fault as any other.
    case disarmStaleLeaf
}

/// The emulator's SPP check of one write (`checkEmulatedWrite`).
public enum EmulatedSubPageWriteCheck: Equatable, Sendable {
    case permitted
    /// The write touches the write-protected `subPage` of the page at `address` (the start of
    /// the write's part in that page): exit as for a refused guest write.
    case denied(address: GuestPhysicalAddress, subPage: Int)
}

/// One table of the SPP table: a host page of 512 entries, keyed like a shadow page by the first
/// gfn it covers and its role.
public struct SPPTablePage: Hashable, Sendable, CustomStringConvertible {
    /// The first gfn of the range the table covers (512^level gfns).
    public let gfn: GuestFrameNumber
    public let role: PageRole
    public let frame: HostFrameNumber

    public var level: Int { role.level }
    public var description: String { "spp table l\(level) gfn \(hex(gfn.rawValue)) at \(frame)" }

    struct Key: Hashable {
        let gfn: UInt64
        let role: UInt32
    }
    var key: Key { Key(gfn: gfn.rawValue, role: role.word) }
}

// MARK: The manager

/// Sub-page write protection for one VM (KVM_CAP_X86_SPP enabled): the permissions of every page,
/// the SPP table built from them, and the questions the rest of the MMU asks.
///
/// Permissions belong to the memslot's pages (`slot->arch.subpage_wp_info`: one 32-bit bitmap per
/// page, all-writable until set), so they move with a moved slot and go with a deleted one. The
/// SPP table is a cache of them, indexed by guest-physical address: it is zapped whenever the
/// layout changes and rebuilt a 2 MiB block at a time on SPPT misses.
///
/// Hooks the TDP MMU implements (no-ops until it does): `splitOrZapHugeMapping`,
/// `updateLeafArming`, `flushRemoteTLBs`. Concurrency: changes (SET, misses, zaps, memslot
/// notifications) run under the MMU lock held for write, as KVM holds `mmu_lock`; the queries of
/// the fault path under it held for read or write. The queries allocate nothing.
public final class SubPageProtection: @unchecked Sendable {
    /// KVM_SUBPAGE_MAX_PAGES: the most pages one SET or GET covers.
    public static let maxPagesPerRequest = 512
    /// gfns below this can be protected: the SPP table indexes guest-physical bits 47:12.
    public static var reachableFrameLimit: UInt64 { 1 << UInt64(SPPTWalker.reachableAddressBits - pageShift) }

    public let memory: MemslotSet
    public let pool: HostPagePool
    public let masks: SPTEMasks
    public let events: MMUEventLog
    /// The root table, which lives as long as SPP is enabled (so SPPTP never changes).
    public let rootFrame: HostFrameNumber
    /// What the processor walks: KVM's table through SPPTP.
    public let walker: SPPTWalker

    /// Zaps (or splits) any huge mapping containing the gfn, so the next fault maps it with a 4 KiB
    /// leaf (asking `maxMappingLevel`). Called when a page becomes protected.
    @exclusivity(unchecked) public var splitOrZapHugeMapping: (GuestFrameNumber) -> Void = { _ in }
    /// Rewrites the gfn's 4 KiB leaf, if it has one, for a change of protection: true means
    /// protected now (`armedForSubPageProtection`), false not (`disarmedSubPageProtection`).
    @exclusivity(unchecked) public var updateLeafArming: (GuestFrameNumber, Bool) -> Void = { _, _ in }
    /// Flushes every vCPU's TLB: processors may cache sub-page permissions with translations.
    @exclusivity(unchecked) public var flushRemoteTLBs: () -> Void = {}

    /// A slot's bitmaps, by slot-relative page. KVM allocates one u32 per page of the slot; the
    /// model keeps only the pages whose bitmap is not all-writable (the default), so a huge slot
    /// costs nothing until pages in it are protected. Tied to the slot's host memory, so a
    /// deleted slot whose id comes back for a new slot cannot inherit them.
    final class SlotPermissions {
        let hostBase: HostFrameNumber
        let pageCount: UInt64
        /// Where the block counters place the slot's pages (its base when last counted).
        var countedBase: GuestFrameNumber
        /// Slot-relative page -> bitmap, for the protected pages only.
        var protectedMasks: [UInt64: SubPageWriteMask] = [:]

        init(_ slot: Memslot) {
            hostBase = slot.hostBase
            pageCount = slot.pageCount
            countedBase = slot.baseFrame
        }

        var protectedPages: Int { protectedMasks.count }

        func belongs(to slot: Memslot) -> Bool { slot.hostBase == hostBase && slot.pageCount == pageCount }
    }

    private var slotPermissions: [Int: SlotPermissions] = [:]
    /// Protected pages per 2 MiB block (key gfn >> 9) and per 1 GiB block (key gfn >> 18): what
    /// `maxMappingLevel` asks, as KVM's `disallow_lpage` counts.
    private var protectedPer2MiB: [UInt64: Int] = [:]
    private var protectedPer1GiB: [UInt64: Int] = [:]
    /// Pages protected in all slots.
    public private(set) var protectedPageCount = 0
    private var tables: [SPPTablePage.Key: SPPTablePage] = [:]

    /// Enables SPP (KVM_ENABLE_CAP(KVM_CAP_X86_SPP)): allocates the SPP table's root.
    /// - Parameters:
    ///   - masks: the VM's SPTE format; SPP needs EPT.
    ///   - nestedVirtualization: whether L1 may run its own guests; SPP is refused then (the
    ///     series' rule: the model hides SPP from L1 and does not let both be on).
    public init(memory: MemslotSet, masks: SPTEMasks, nestedVirtualization: Bool = false,
                events: MMUEventLog = MMUEventLog()) throws(SubPageProtectionError) {
        guard masks.isEPT else { throw .requiresEPT }
        guard !nestedVirtualization else { throw .exclusiveWithNestedVirtualization }
        let root: HostFrameNumber
        do throws(HostPagePoolError) {
            root = try memory.pool.allocatePage()
        } catch {
            throw .hostMemory(error)
        }
        do throws(SPPTablePointerError) {
            walker = try SPPTWalker(pointer: SPPTablePointer(root.address.rawValue),
                                    maxPhysicalAddressBits: masks.hostPhysicalAddressBits)
        } catch {
            try? memory.pool.freePage(root)
            throw .tablePointer(error)
        }
        self.memory = memory
        pool = memory.pool
        self.masks = masks
        self.events = events
        rootFrame = root
        let rootPage = SPPTablePage(gfn: GuestFrameNumber(0), role: .subPageProtectionTable(level: SPPTWalker.levels),
                                    frame: root)
        tables[rootPage.key] = rootPage
    }

    deinit {
        for page in tables.values { try? pool.freePage(page.frame) }
    }

    /// SPPTP as KVM writes it into the VMCS (`construct_spptp`).
    public var tablePointer: SPPTablePointer { walker.pointer }

    /// Every table of the SPP table, the root first, then by level and gfn.
    public var tablePages: [SPPTablePage] {
        tables.values.sorted { ($1.level, $0.gfn) < ($0.level, $1.gfn) }
    }

    // MARK: KVM_SUBPAGES_SET_ACCESS / KVM_SUBPAGES_GET_ACCESS

    /// KVM_SUBPAGES_SET_ACCESS: page `gfn + i` gets `masks[i]` (bit j = sub-page j writable).
    ///
    /// All or nothing: every page is checked before any changes. Each page must lie in a memslot
    /// that is not read-only, and a bitmap other than all-writable needs a page below 2^48. A page
    /// that becomes protected loses any huge mapping and has its leaf armed; one that becomes
    /// all-writable again is disarmed. Built parts of the SPP table are updated at once (a stale
    /// L1E would let through writes now refused); the rest waits for a miss.
    public func setSubpageAccess(gfn: GuestFrameNumber, count: Int, masks: [SubPageWriteMask],
                                 flags: UInt32 = 0) throws(SubPageProtectionError) {
        try validateRequest(gfn: gfn, count: count, flags: flags)
        guard masks.count == count else { throw .maskCountMismatch(pages: count, masks: masks.count) }
        for (offset, mask) in masks.enumerated() {
            let page = GuestFrameNumber(gfn.rawValue + UInt64(offset))
            guard let slot = memory.slot(containing: page) else { throw .notInMemslot(page) }
            guard !slot.isReadOnly else { throw .readOnlyMemslot(page, slot: slot.id) }
            guard mask == .allWritable || page.rawValue < Self.reachableFrameLimit else { throw .beyondTableReach(page) }
        }
        var changed = false
        for (offset, mask) in masks.enumerated() {
            let page = GuestFrameNumber(gfn.rawValue + UInt64(offset))
            if store(mask, for: page) { changed = true }
        }
        if changed { flushRemoteTLBs() }
    }

    /// KVM_SUBPAGES_GET_ACCESS: the bitmaps of pages `gfn ..< gfn + count`, each of which must lie
    /// in a memslot (a read-only slot's pages read all-writable: SPP never restricts them).
    public func getSubpageAccess(gfn: GuestFrameNumber, count: Int, flags: UInt32 = 0)
        throws(SubPageProtectionError) -> [SubPageWriteMask] {
        try validateRequest(gfn: gfn, count: count, flags: flags)
        var result: [SubPageWriteMask] = []
        result.reserveCapacity(count)
        for offset in 0..<count {
            let page = GuestFrameNumber(gfn.rawValue + UInt64(offset))
            guard memory.slot(containing: page) != nil else { throw .notInMemslot(page) }
            result.append(writeMask(for: page))
        }
        return result
    }

    private func validateRequest(gfn: GuestFrameNumber, count: Int, flags: UInt32) throws(SubPageProtectionError) {
        guard flags == 0 else { throw .invalidFlags(flags) }
        guard count >= 1 && count <= Self.maxPagesPerRequest else { throw .invalidPageCount(count) }
        // No memslot reaches 2^64 bytes, so a range that wraps starts outside every slot.
        guard gfn.rawValue <= UInt64.max - UInt64(count) else { throw .notInMemslot(gfn) }
    }

    /// Stores `mask` for `gfn` (in a writable slot) and carries out what the change means.
    /// True when the bitmap changed.
    private func store(_ mask: SubPageWriteMask, for gfn: GuestFrameNumber) -> Bool {
        guard let slot = memory.slot(containing: gfn) else { return false }
        let permissions = permissions(of: slot)
        let page = gfn.rawValue - slot.baseFrame.rawValue
        let old = permissions.protectedMasks[page] ?? .allWritable
        guard old != mask else { return false }
        let wasProtected = old != .allWritable, isProtected = mask != .allWritable
        permissions.protectedMasks[page] = isProtected ? mask : nil
        if wasProtected != isProtected { adjustBlockCounters(for: gfn, protected: isProtected) }
        events.record(.kvmSPPSetSubpages(vcpuID: nil, gfn: gfn, access: mask))
        if isProtected && !wasProtected { splitOrZapHugeMapping(gfn) }
        if isProtected != wasProtected { updateLeafArming(gfn, isProtected) }
        if let table = leafTableIfBuilt(for: gfn) { writeLeaf(mask, in: table, for: gfn) }
        return true
    }

    /// The slot's permission record, made (all-writable) on first use; a stale one left by a
    /// deleted slot whose id was reused is dropped first.
    private func permissions(of slot: Memslot) -> SlotPermissions {
        if let existing = slotPermissions[slot.id] {
            if existing.belongs(to: slot) { return existing }
            forget(existing)
        }
        let created = SlotPermissions(slot)
        slotPermissions[slot.id] = created
        return created
    }

    private func adjustBlockCounters(for gfn: GuestFrameNumber, protected: Bool) {
        let step = protected ? 1 : -1
        protectedPageCount += step
        func bump(_ table: inout [UInt64: Int], _ key: UInt64) {
            let value = table[key, default: 0] + step
            table[key] = value == 0 ? nil : value
        }
        bump(&protectedPer2MiB, gfn.rawValue >> 9)
        bump(&protectedPer1GiB, gfn.rawValue >> 18)
    }

    /// Takes a slot record's protected pages out of the counters.
    private func forget(_ permissions: SlotPermissions) {
        for page in permissions.protectedMasks.keys {
            adjustBlockCounters(for: GuestFrameNumber(permissions.countedBase.rawValue + page), protected: false)
        }
    }

    // MARK: Queries of the fault path (allocation-free)

    /// The stored bitmap of `gfn`; all-writable outside memslots and for pages never set.
    @inline(__always)
    public func writeMask(for gfn: GuestFrameNumber) -> SubPageWriteMask {
        guard protectedPageCount > 0, let slot = memory.slot(containing: gfn),
              let permissions = slotPermissions[slot.id], permissions.belongs(to: slot)
        else { return .allWritable }
        return permissions.protectedMasks[gfn.rawValue - slot.baseFrame.rawValue] ?? .allWritable
    }

    /// Whether `gfn` is protected, so it must be mapped by a 4 KiB leaf (what `disallow_lpage`
    /// answers for huge pages).
    @inline(__always)
    public func requiresSmallPage(_ gfn: GuestFrameNumber) -> Bool { writeMask(for: gfn) != .allWritable }

    /// The largest level at most `limit` at which `gfn` may be mapped: 1 when its 2 MiB block holds
    /// a protected page, at most 2 when its 1 GiB block does.
    @inline(__always)
    public func maxMappingLevel(for gfn: GuestFrameNumber, limit: Int) -> Int {
        guard protectedPageCount > 0, limit > KVMLevel.pageTable else { return limit }
        if protectedPer2MiB[gfn.rawValue >> 9] != nil { return KVMLevel.pageTable }
        if limit > KVMLevel.pageDirectory && protectedPer1GiB[gfn.rawValue >> 18] != nil { return KVMLevel.pageDirectory }
        return limit
    }

    /// The fault path's last step for a leaf it is about to install for `gfn` at `level`: armed
    /// when the page is protected, unchanged otherwise (see `SPTE.armedForSubPageProtection`).
    @inline(__always)
    public func applyingProtection(to spte: SPTE, gfn: GuestFrameNumber, level: Int) -> SPTE {
        guard protectedPageCount > 0, requiresSmallPage(gfn) else { return spte }
        return spte.armedForSubPageProtection(level: level, masks: masks) ?? spte
    }

    /// What to do with a write EPT violation on `leaf` (the SPTE at `level` mapping `gfn`).
    /// A huge leaf over a protected page is the ordinary path's to replace (it maps at
    /// `maxMappingLevel`); a leaf KVM would not make writable stays the ordinary path's too.
    public func writeFaultAction(gfn: GuestFrameNumber, leaf: SPTE, level: Int) -> SubPageWriteFaultAction {
        guard level == KVMLevel.pageTable, leaf.isShadowPresent else { return .notSubPageProtected }
        guard requiresSmallPage(gfn) else {
            return leaf.isSubPageArmed || leaf.hasSavedSubPageArming ? .disarmStaleLeaf : .notSubPageProtected
        }
        if leaf.isSubPageArmed { return .exitToUserspace }
        return leaf.isMMUWritable(masks) ? .armAndRetry : .notSubPageProtected
    }

    /// The exit for a write the processor refused for a protected sub-page (an SPP-induced EPT
    /// violation), traced as `kvm_spp_induced_page_fault`.
    public func subPageWriteExit(vcpuID: Int, address: GuestPhysicalAddress, instructionLength: Int) -> SubPageWriteExit {
        events.record(.kvmSPPInducedPageFault(vcpuID: vcpuID, gpa: address, instructionLength: instructionLength))
        return SubPageWriteExit(address: address, instructionLength: instructionLength)
    }

    /// The check the emulator makes before it writes guest memory for the guest (Jim Mattson's
    /// point: an emulated write must obey SPP as the processor would). Each page's part of the
    /// write is checked against that page's stored bitmap — the bitmap every mapped leaf of the
    /// page is armed with — a sub-page at a time, so a write to a writable sub-page of a protected
    /// page goes through, exactly as it would without emulation.
    public func checkEmulatedWrite(at address: GuestPhysicalAddress, byteCount: UInt64)
        throws(SubPageWriteError) -> EmulatedSubPageWriteCheck {
        let write = try PageSplitWrite(address: address, byteCount: byteCount)
        guard protectedPageCount > 0 else { return .permitted }
        for piece in write {
            let mask = writeMask(for: piece.frame)
            if let subPage = try mask.firstDeniedSubPage(forWriteAt: piece.pageOffset, byteCount: piece.byteCount) {
                return .denied(address: piece.address, subPage: subPage)
            }
        }
        return .permitted
    }

    // MARK: The SPP table

    /// What the processor reads from KVM's SPP table for `address`.
    public func hardwareLookUp(_ address: GuestPhysicalAddress) throws(SPPTWalkFault) -> SPPTLookup {
        try walker.lookUp(address, in: PoolPhysicalView(pool: pool))
    }

    /// The processor's SPP check of a write whose EPT walk of KVM's tables ended at `leaf`.
    public func hardwareCheckWrite(at address: GuestPhysicalAddress, byteCount: UInt64, leaf: SPTE, level: Int)
        throws(SubPageWriteError) -> SubPageWriteVerdict {
        try walker.checkWrite(at: address, byteCount: byteCount, leaf: EPTEntry(rawValue: leaf.rawValue), level: level,
                              in: PoolPhysicalView(pool: pool))
    }

    /// `handle_spp` for an SPPT miss at `address`: builds the missing tables down to the L1 table
    /// of the address's 2 MiB block and fills all 512 of its L1Es from the stored bitmaps (an L1E
    /// has no present bit, so a table of them must be complete before its L2E points to it).
    public func handleTableMiss(at address: GuestPhysicalAddress, vcpuID: Int) throws(SubPageProtectionError) {
        events.record(.kvmSPPInducedExit(vcpuID: vcpuID, gpa: address, qualification: .sppTableMiss))
        let gfn = address.frame
        guard gfn.rawValue < Self.reachableFrameLimit else { throw .beyondTableReach(gfn) }
        var table = rootFrame
        var level = SPPTWalker.levels
        var filled = false
        while level > 1 {
            let slot = entry(in: table, index: Self.index(of: gfn, level: level))
            let existing = SPPDirectoryEntry(rawValue: UInt64(littleEndian: slot.pointee))
            if existing.isPresent {
                table = HostFrameNumber(existing.nextTableAddress >> UInt64(pageShift))
            } else {
                let child = try allocateTable(level: level - 1, covering: gfn)
                if level - 1 == 1 {
                    fillLeafTable(child.frame, covering: gfn, vcpuID: vcpuID)
                    filled = true
                }
                // The child is complete before it is linked, so no walk sees a half-filled table.
                slot.pointee = SPPDirectoryEntry(nextTable: child.frame.address.rawValue).rawValue.littleEndian
                table = child.frame
            }
            level -= 1
        }
        // Every level was present (another vCPU's miss built it first): refresh the leaves anyway.
        if !filled { fillLeafTable(table, covering: gfn, vcpuID: vcpuID) }
    }

    /// An SPPT misconfiguration at `address`: traced, and handed to the VMM as an unknown exit.
    public func handleTableMisconfiguration(at address: GuestPhysicalAddress, vcpuID: Int) -> SPPTableMisconfigurationExit {
        events.record(.kvmSPPInducedExit(vcpuID: vcpuID, gpa: address, qualification: []))
        return SPPTableMisconfigurationExit(address: address)
    }

    /// Frees every table but the root and clears the root (`kvm_mmu_zap_all` for the SPP table):
    /// every write to an armed leaf then misses, and the misses rebuild from the stored bitmaps,
    /// which a zap never touches. The root stays, so SPPTP stays valid.
    public func zapAllTables() {
        for page in tablePages where page.frame != rootFrame {
            events.record(.kvmMMUPrepareZapPage(gfn: page.gfn, role: page.role))
            tables[page.key] = nil
            do {
                try pool.freePage(page.frame)
            } catch {
                preconditionFailure("SPP table page \(page) was not allocated: \(error)")
            }
        }
        entry(in: rootFrame, index: 0).update(repeating: 0, count: KVMLevel.entriesPerPage)
        flushRemoteTLBs()
    }

    // MARK: Memslot changes

    /// A slot was deleted (KVM_MR_DELETE): its pages' permissions go with it, and the SPP table,
    /// indexed by the old addresses, is zapped.
    public func memslotDeleted(id: Int) {
        if let permissions = slotPermissions.removeValue(forKey: id) { forget(permissions) }
        zapAllTables()
    }

    /// Refuses a move (KVM_MR_MOVE) that would carry protected pages to 2^48 or above, where the
    /// SPP table cannot protect them. Call before moving.
    public func validateMemslotMove(id: Int, to base: GuestPhysicalAddress) throws(SubPageProtectionError) {
        guard let slot = memory.slot(id: id), let permissions = slotPermissions[id], permissions.belongs(to: slot),
              permissions.protectedPages > 0
        else { return }
        let baseFrame = base.frame.rawValue
        for page in permissions.protectedMasks.keys {
            guard baseFrame + page < Self.reachableFrameLimit else {
                throw .moveBeyondTableReach(slot: id, to: base)
            }
        }
    }

    /// A slot was moved: its permissions are its pages' and move with it (they are stored by page
    /// of the slot, so only the huge-page counters move), and the SPP table is zapped.
    public func memslotMoved(id: Int) {
        if let slot = memory.slot(id: id), let permissions = slotPermissions[id], permissions.belongs(to: slot),
           permissions.countedBase != slot.baseFrame {
            forget(permissions)
            permissions.countedBase = slot.baseFrame
            for page in permissions.protectedMasks.keys {
                adjustBlockCounters(for: GuestFrameNumber(slot.baseFrame.rawValue + page), protected: true)
            }
        }
        zapAllTables()
    }

    // MARK: Table plumbing

    /// The index of `gfn`'s entry in a table at `level` (9 bits a level, as the processor indexes).
    static func index(of gfn: GuestFrameNumber, level: Int) -> Int {
        Int((gfn.rawValue >> UInt64((level - 1) * 9)) & 0x1FF)
    }

    /// The first gfn of the range a table at `level` covers.
    static func baseGFN(of gfn: GuestFrameNumber, level: Int) -> GuestFrameNumber {
        GuestFrameNumber(gfn.rawValue & ~((1 << UInt64(level * 9)) - 1))
    }

    private func entry(in table: HostFrameNumber, index: Int) -> UnsafeMutablePointer<UInt64> {
        pool.pointer(table).assumingMemoryBound(to: UInt64.self) + index
    }

    /// `kvm_spp_get_page`: a new zeroed table at `level` for the range holding `gfn`.
    private func allocateTable(level: Int, covering gfn: GuestFrameNumber) throws(SubPageProtectionError) -> SPPTablePage {
        let frame: HostFrameNumber
        do throws(HostPagePoolError) {
            frame = try pool.allocatePage()
        } catch {
            throw .hostMemory(error)
        }
        let page = SPPTablePage(gfn: Self.baseGFN(of: gfn, level: level), role: .subPageProtectionTable(level: level),
                                frame: frame)
        tables[page.key] = page
        events.record(.kvmMMUGetPage(gfn: page.gfn, role: page.role, created: true))
        return page
    }

    /// Writes all 512 L1Es of the table for `gfn`'s 2 MiB block from the stored bitmaps.
    private func fillLeafTable(_ table: HostFrameNumber, covering gfn: GuestFrameNumber, vcpuID: Int) {
        let base = Self.baseGFN(of: gfn, level: 1).rawValue
        for index in 0..<KVMLevel.entriesPerPage {
            let page = GuestFrameNumber(base + UInt64(index))
            let mask = writeMask(for: page)
            writeLeaf(mask, in: table, for: page)
            if mask != .allWritable { events.record(.kvmSPPSetSubpages(vcpuID: vcpuID, gfn: page, access: mask)) }
        }
    }

    private func writeLeaf(_ mask: SubPageWriteMask, in table: HostFrameNumber, for gfn: GuestFrameNumber) {
        entry(in: table, index: Self.index(of: gfn, level: 1)).pointee = SPPLeafEntry(spreading: mask).rawValue.littleEndian
    }

    /// The L1 table holding `gfn`'s L1E, or nil when the walk to it would miss.
    private func leafTableIfBuilt(for gfn: GuestFrameNumber) -> HostFrameNumber? {
        guard gfn.rawValue < Self.reachableFrameLimit else { return nil }
        var table = rootFrame
        for level in stride(from: SPPTWalker.levels, to: 1, by: -1) {
            let slot = entry(in: table, index: Self.index(of: gfn, level: level))
            let directory = SPPDirectoryEntry(rawValue: UInt64(littleEndian: slot.pointee))
            guard directory.isPresent else { return nil }
            table = HostFrameNumber(directory.nextTableAddress >> UInt64(pageShift))
        }
        return table
    }

    // MARK: The auditor

    /// The structure's invariants: every table is reachable from the root exactly once, at the
    /// level and gfn its role and key say, with no reserved bit set and nothing but zeros in
    /// entries not present; every L1E equals the stored bitmap of its page; the huge-page
    /// counters agree with the stored bitmaps at the slots' current addresses. One line per
    /// violation.
    public func audit() -> [String] {
        var problems: [String] = []
        let byFrame = Dictionary(tables.values.map { ($0.frame.rawValue, $0) }, uniquingKeysWith: { first, _ in first })
        var reached = Set<UInt64>()
        let reserved = SPPDirectoryEntry.reservedBits(maxPhysicalAddressBits: walker.maxPhysicalAddressBits)
        func visit(_ page: SPPTablePage) {
            guard reached.insert(page.frame.rawValue).inserted else {
                problems.append("\(page) is linked more than once")
                return
            }
            if !pool.isAllocated(page.frame) { problems.append("\(page) lives in a free host page") }
            let span = UInt64(1) << UInt64((page.level - 1) * 9)
            for index in 0..<KVMLevel.entriesPerPage {
                let gfn = GuestFrameNumber(page.gfn.rawValue + UInt64(index) * span)
                let raw = UInt64(littleEndian: entry(in: page.frame, index: index).pointee)
                if page.level == 1 {
                    let expected = SPPLeafEntry(spreading: writeMask(for: gfn)).rawValue
                    if raw != expected {
                        problems.append("L1E of \(gfn) is \(hex(raw)), but its stored bitmap makes \(hex(expected))")
                    }
                    continue
                }
                let directory = SPPDirectoryEntry(rawValue: raw)
                guard directory.isPresent else {
                    if raw != 0 { problems.append("\(page): entry \(index) is not present but holds \(hex(raw))") }
                    continue
                }
                if raw & reserved != 0 { problems.append("\(page): entry \(index) has reserved bits \(hex(raw & reserved))") }
                guard let child = byFrame[directory.nextTableAddress >> UInt64(pageShift)] else {
                    problems.append("\(page): entry \(index) points at \(hex(directory.nextTableAddress)), no SPP table")
                    continue
                }
                if child.level != page.level - 1 || child.gfn != gfn || !child.role.isSubPageProtectionTable {
                    problems.append("\(page): entry \(index) points at \(child), "
                        + "expected level \(page.level - 1) gfn \(hex(gfn.rawValue))")
                }
                visit(child)
            }
        }
        if let root = byFrame[rootFrame.rawValue], root.level == SPPTWalker.levels {
            visit(root)
        } else {
            problems.append("the root \(rootFrame) is not a level-\(SPPTWalker.levels) SPP table")
        }
        for page in tables.values where !reached.contains(page.frame.rawValue) {
            problems.append("\(page) is not reachable from the root")
        }
        var per2MiB: [UInt64: Int] = [:], per1GiB: [UInt64: Int] = [:], total = 0
        for (id, permissions) in slotPermissions {
            guard let slot = memory.slot(id: id), permissions.belongs(to: slot) else {
                if permissions.protectedPages > 0 { problems.append("memslot \(id) is gone but its protected pages are counted") }
                continue
            }
            if permissions.countedBase != slot.baseFrame {
                problems.append("memslot \(id) moved to \(slot.baseFrame) but is counted at \(permissions.countedBase)")
            }
            for (page, mask) in permissions.protectedMasks {
                if page >= slot.pageCount { problems.append("memslot \(id) has a bitmap for page \(page), beyond its end") }
                if mask == .allWritable { problems.append("memslot \(id) stores an all-writable bitmap for page \(page)") }
                let gfn = slot.baseFrame.rawValue + page
                per2MiB[gfn >> 9, default: 0] += 1
                per1GiB[gfn >> 18, default: 0] += 1
            }
            total += permissions.protectedPages
        }
        if total != protectedPageCount { problems.append("\(total) protected pages, counted \(protectedPageCount)") }
        if per2MiB != protectedPer2MiB { problems.append("the 2 MiB block counters disagree with the stored bitmaps") }
        if per1GiB != protectedPer1GiB { problems.append("the 1 GiB block counters disagree with the stored bitmaps") }
        return problems
    }

    /// The invariants of one leaf SPTE `spte` mapping `gfn` at `level`, for the TDP MMU's auditor:
    /// SPP bits only on a 4 KiB, non-writable, MMU-writable leaf of a protected page, never both
    /// bits at once; and a protected page never mapped writable or huge. Nil when they hold.
    public func auditLeaf(_ spte: SPTE, gfn: GuestFrameNumber, level: Int) -> String? {
        guard spte.isShadowPresent else { return nil }
        let isProtected = requiresSmallPage(gfn)
        if spte.isSubPageArmed || spte.hasSavedSubPageArming {
            if spte.isSubPageArmed && spte.hasSavedSubPageArming { return "\(gfn): leaf both armed and saved" }
            if level != KVMLevel.pageTable { return "\(gfn): SPP bits on a level-\(level) leaf" }
            if spte.isWritable { return "\(gfn): armed leaf is writable" }
            if !spte.isMMUWritable(masks) { return "\(gfn): SPP bits on a leaf KVM would not make writable" }
            if !isProtected { return "\(gfn): SPP bits on the leaf of a page that is not protected" }
            return nil
        }
        guard isProtected else { return nil }
        if level != KVMLevel.pageTable { return "\(gfn): protected page mapped by a level-\(level) leaf" }
        if spte.isWritable { return "\(gfn): protected page mapped writable without SPP" }
        if spte.isMMUWritable(masks) { return "\(gfn): protected page's MMU-writable leaf is not armed" }
        return nil
    }
}

/// The host page pool as the processor sees it when it walks KVM's own tables (SPTEs, the SPP
/// table): the walkers speak of guest-physical frames, and here those numbers are host frame
/// numbers, so the same reference walkers that walk guest tables walk KVM's.
public struct PoolPhysicalView: PhysicalMemory {
    public let pool: HostPagePool

    @inlinable public init(pool: HostPagePool) { self.pool = pool }

    @inlinable
    public func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        let host = HostFrameNumber(frame.rawValue)
        guard pool.contains(host) else { return nil }
        return HostPage(bytes: pool.pointer(host), isWritable: true)
    }
}
