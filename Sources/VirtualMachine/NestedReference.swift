import GuestMemory
import KVMMMU
import X86Paging

// The lockstep reference for L2: what the architecture allows an L2 access for the composed
// translation (L2's paging, then L1's EPT or NPT, both read from L1's memory): the same host page,
// the same L2 fault, or the same exit to L1 with the same qualification (or #NPF error code) for
// the same L2 guest-physical address, reported at the same level of L2's walk. The architecture's
// side is X86Paging's `NestedPagingWalker`, never KVM's walk.
//
// Besides the newest walk, a translation L2 cached may still be used until an invalidation that
// names it (SDM 28.4.3 / 29.4): `L2CachedTranslations` keeps, as L1 sees the tags (vmcs12's VPID,
// 0 without VPID; L1's EPTP root or nCR3; PCID), every translation a checked L2 access got from
// a walk, and drops them as the architecture's invalidations say: INVLPG and MOV to CR3 in L2,
// INVVPID, INVEPT, and every VM entry and exit without VPID (VPID 0).
//
// Guest-physical translations derived from L1's EPT may be cached until L1's INVEPT (SDM 29.4):
// KVM's unsync shadow pages of L1's last-level EPT tables keep entries L1 has since changed, and
// nested EPT is synced only when a root is loaded anew (after INVEPT). Such translations can only
// have been cached while L2 ran, i.e. from the tables as they were at a VM entry: the check also
// accepts an outcome that a walk over L1's last-level EPT tables as one of the VM entries since
// the covering INVEPT left them would give (`EPTTableSnapshot`). (Under NPT, KVM syncs at every
// VMRUN, so only the newest walk is accepted.)

extension VCPU {
    /// The architecture's answer for L2's access at `address` now. Its walk sets the A/D bits the
    /// access sets (in L2's tables and, with EPTP.AD, in L1's EPT), as the processor would.
    /// `setAccessedDirty` false asks without touching memory (after an access the TLB served, which
    /// set no A/D bit).
    public func architecturalL2(_ address: GuestVirtualAddress, _ access: Access,
                                setAccessedDirty: Bool = true) throws(VirtualMachineError) -> Result<NestedPagingTranslation, NestedPagingFault> {
        guard let nested else { throw .invalidAccess("vCPU \(id) has never entered L2") }
        // L2's walker as VM entry or L2's last MOV to CR3 loaded it: in PAE paging its PDPTE
        // registers hold what L2's PDPT had then, whatever L2 has written there since.
        return NestedPagingWalker(guest: nested.guestWalker, tables: nested.l1Tables)
            .translate(address, access, in: vm.memory, setAccessedDirty: setAccessedDirty)
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
    /// unchanged), or a translation L2 cached and has not invalidated since. Throws the
    /// disagreement.
    public func checkL2(_ outcome: L2AccessOutcome, at address: GuestVirtualAddress, _ access: Access,
                        expected: Result<NestedPagingTranslation, NestedPagingFault>) throws(LockstepDisagreement) {
        if Self.l2OutcomeAgrees(outcome, expected, memory: vm.memory) {
            if let nested, nested.registers.cr0.contains(.paging), case .success(let translation) = expected,
               case .completed = outcome.result, !outcome.emulated {
                nested.cachedReference.remember(address, translation, access, vpid: nested.architecturalVPID,
                                                eptRoot: nested.l1RootAddress, pcid: nested.registers.pcid, paging: nested.paging)
            }
            return
        }
        if let nested, case .completed(let gpa, let hostAddress, _) = outcome.result,
           nested.cachedReference.allows(address, access, gpa: gpa, hostAddress: hostAddress, vpid: nested.architecturalVPID,
                                         eptRoot: nested.l1RootAddress, pcid: nested.registers.pcid,
                                         refused: nested.guestWalker.rules.refusedPermissions(
                                             access, alignmentCheck: nested.registers.rflags.contains(.alignmentCheck)),
                                         memory: vm.memory) {
            return
        }
        // A stale EPT translation from KVM's unsync shadow of L1's last-level tables, before INVEPT.
        if let nested, agreesWithStaleEPT(outcome, address, access, nested) { return }
        throw LockstepDisagreement(address: address, access: access, expected: "\(expected)",
                                   actual: "\(outcome.result) (level \(outcome.exitGuestLevel.map(String.init) ?? "-"))",
                                   entries: [])
    }

    /// Whether the outcome is the architecture's answer for L1's EPT with each last-level table
    /// as it is now or as one of the VM entries since the last covering INVEPT left it (upper
    /// levels as they are now: KVM write-tracks them, so they are never stale). Each table may
    /// come from a different entry: the processor caches each guest-physical mapping on its own
    /// (SDM 29.4), and KVM syncs each unsync shadow page on its own, so one access may combine a
    /// table's older mapping with another's newer one. (Within one table the choice is one
    /// snapshot for all its entries.) A search over the tables the walk reads, a choice at a time.
    private func agreesWithStaleEPT(_ outcome: L2AccessOutcome, _ address: GuestVirtualAddress, _ access: Access,
                                    _ nested: NestedVCPUState) -> Bool {
        guard case .ept(let pointer, _) = nested.paging else { return false }
        var olderTables: [UInt64: [UnsafeMutableRawPointer]] = [:]
        for snapshot in nested.eptSnapshots where snapshot.rootAddress == pointer.rootAddress {
            for (frame, copy) in snapshot.pages { olderTables[frame, default: []].append(copy) }
        }
        guard !olderTables.isEmpty else { return false }
        let walker = NestedPagingWalker(guest: nested.guestWalker, tables: nested.l1Tables)
        func agrees(choosing choice: [UInt64: Int]) -> Bool {
            let view = StaleEPTMemory(memory: vm.memory, olderTables: olderTables, choice: choice)
            let stale = walker.translate(address, access, in: view, setAccessedDirty: false)
            if Self.l2OutcomeAgrees(outcome, stale, memory: vm.memory) { return true }
            // The first table the walk read as it is now that has older contents: try each.
            guard let frame = view.tablesReadAsTheyAreNow.first, let older = olderTables[frame] else { return false }
            for index in older.indices {
                var next = choice
                next[frame] = index
                if agrees(choosing: next) { return true }
            }
            return false
        }
        return agrees(choosing: [:])
    }

    /// Whether the outcome is exactly `expected` (no stale translation allowed).
    public static func l2OutcomeAgrees(_ outcome: L2AccessOutcome, _ expected: Result<NestedPagingTranslation, NestedPagingFault>,
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

/// L1's last-level EPT tables reachable from an EPTP, copied at a VM entry.
final class EPTTableSnapshot {
    let rootAddress: UInt64
    /// L1 gfn of a last-level table -> a copy of its 4 KiB.
    private(set) var pages: [UInt64: UnsafeMutableRawPointer] = [:]

    /// Walks L1's EPT from the root (a table seen twice, as hostile tables may link, is read once).
    init(_ pointer: EPTPointer, memory: MemslotSet) {
        rootAddress = pointer.rootAddress
        var visited = Set<UInt64>()
        var pending = [(frame: pointer.rootAddress >> 12, level: pointer.levels)]
        while let (frame, level) = pending.popLast() {
            guard visited.insert(frame).inserted, let page = memory.hostPage(GuestFrameNumber(frame)) else { continue }
            if level == 1 {
                let copy = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
                copy.copyMemory(from: page.bytes, byteCount: 4096)
                pages[frame] = copy
                continue
            }
            for index in 0..<512 {
                let entry = page.bytes.load(fromByteOffset: index * 8, as: UInt64.self)
                // Present (any of R, W, X) and not a large leaf: a table one level down.
                guard entry & 0x7 != 0, entry & 0x80 == 0 else { continue }
                pending.append(((entry & 0x000F_FFFF_FFFF_F000) >> 12, level - 1))
            }
        }
    }

    deinit { for page in pages.values { page.deallocate() } }

    /// Whether it holds what `other` holds.
    func sameTables(as other: EPTTableSnapshot) -> Bool {
        rootAddress == other.rootAddress && pages.count == other.pages.count
            && pages.allSatisfy { frame, copy in other.pages[frame].map { Self.equalPages($0, copy) } ?? false }
    }

    private static func equalPages(_ a: UnsafeMutableRawPointer, _ b: UnsafeMutableRawPointer) -> Bool {
        (0..<512).allSatisfy { a.load(fromByteOffset: $0 * 8, as: UInt64.self) == b.load(fromByteOffset: $0 * 8, as: UInt64.self) }
    }
}

/// L1's memory with some of its last-level EPT tables as a VM entry's snapshot had them
/// (`choice`: table frame -> index into its older copies), the others as they are now; notes the
/// tables with older copies that a walk read as they are now. Read-only: the probe walks set no
/// A/D bits.
private final class StaleEPTMemory: PhysicalMemory {
    let memory: MemslotSet
    let olderTables: [UInt64: [UnsafeMutableRawPointer]]
    let choice: [UInt64: Int]
    private(set) var tablesReadAsTheyAreNow: [UInt64] = []

    init(memory: MemslotSet, olderTables: [UInt64: [UnsafeMutableRawPointer]], choice: [UInt64: Int]) {
        self.memory = memory
        self.olderTables = olderTables
        self.choice = choice
    }

    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        if let older = olderTables[frame.rawValue] {
            if let index = choice[frame.rawValue] { return HostPage(bytes: older[index], isWritable: false) }
            if !tablesReadAsTheyAreNow.contains(frame.rawValue) { tablesReadAsTheyAreNow.append(frame.rawValue) }
        }
        return memory.hostPage(frame)
    }
}

extension NestedVCPUState {
    /// A VM entry under EPT: the last-level tables as L2 will run over them (kept unless they
    /// are what the newest snapshot of the same root holds already).
    func recordEPTSnapshot(_ pointer: EPTPointer, memory: MemslotSet) {
        let snapshot = EPTTableSnapshot(pointer, memory: memory)
        if let newest = eptSnapshots.last(where: { $0.rootAddress == snapshot.rootAddress }), newest.sameTables(as: snapshot) {
            return
        }
        eptSnapshots.append(snapshot)
    }

    /// INVEPT: the translations it invalidates can no longer be used.
    func forgetEPTSnapshots(_ type: INVEPTType) {
        switch type {
        case .allContexts: eptSnapshots.removeAll()
        case .singleContext(let pointer): eptSnapshots.removeAll { $0.rootAddress == pointer.rootAddress }
        }
    }
}

extension NestedVCPUState {
    /// L2's VPID as L1 sees it: vmcs12's, 0 without VPID (and under NPT, whose ASID the model's
    /// L1 does not choose).
    var architecturalVPID: UInt16 { vpid12 ?? 0 }

    /// The EP4TA (or nCR3) L2's combined mappings are tagged with: L1's root table address.
    var l1RootAddress: UInt64 {
        switch paging {
        case .ept(let pointer, _): pointer.rootAddress
        case .npt(let nestedCR3): nestedCR3 & bitRange(12, 51)
        }
    }
}

/// The translations the architecture lets L2 use from a TLB besides a fresh walk: each one a
/// checked L2 access got from a walk, under the tags L1 sees (VPID, EP4TA, PCID), until an
/// invalidation names it. A cached translation serves an access L2's rules in force and L1's
/// tables at the time allow, and a write only when it was cached by a write (its leaves dirty),
/// the rule the model's TLB follows.
final class L2CachedTranslations {
    struct Key: Hashable {
        var page: UInt64
        var vpid: UInt16
        var eptRoot: UInt64
        var pcid: UInt16
    }
    struct Cached: Equatable {
        var l1Frame: UInt64
        var l2Frame: UInt64
        var isGlobal: Bool
        var guestPermissions: UInt8
        var nestedKinds: UInt8
        var dirty: Bool
    }
    private var entries: [Key: [Cached]] = [:]

    func remember(_ address: GuestVirtualAddress, _ translation: NestedPagingTranslation, _ access: Access, vpid: UInt16,
                  eptRoot: UInt64, pcid: UInt16, paging: L1NestedPaging) {
        let cached = Cached(l1Frame: translation.outputAddress.frame.rawValue, l2Frame: translation.guest.physicalAddress.frame.rawValue,
                            isGlobal: translation.guest.isGlobal, guestPermissions: translation.guest.permissions,
                            nestedKinds: VCPU.nestedKinds(translation.nestedPermissions, paging), dirty: access.kind == .write)
        let key = Key(page: address.rawValue >> 12, vpid: vpid, eptRoot: eptRoot, pcid: pcid)
        if entries[key]?.contains(cached) != true { entries[key, default: []].append(cached) }
    }

    /// Whether a cached translation under the tags in force gives the access at `gpa` and
    /// `hostAddress`. `refused` is L2's rules' refusals for the access (by combined ACC value).
    func allows(_ address: GuestVirtualAddress, _ access: Access, gpa: GuestPhysicalAddress, hostAddress: UInt64, vpid: UInt16,
                eptRoot: UInt64, pcid: UInt16, refused: UInt8, memory: MemslotSet) -> Bool {
        let page = address.rawValue >> 12
        let candidates = (entries[Key(page: page, vpid: vpid, eptRoot: eptRoot, pcid: pcid)] ?? [])
            + entries.filter { $0.key.page == page && $0.key.vpid == vpid && $0.key.eptRoot == eptRoot && $0.key.pcid != pcid }
                .flatMap { $0.value.filter(\.isGlobal) }
        return candidates.contains { cached in
            guard cached.l2Frame == gpa.frame.rawValue, access.kind != .write || cached.dirty,
                  cached.nestedKinds & (1 << access.kind.rawValue) != 0, (refused >> cached.guestPermissions) & 1 == 0,
                  let host = memory.hostFrame(of: GuestFrameNumber(cached.l1Frame)) else { return false }
            return host.rawValue == hostAddress >> 12
        }
    }

    private func drop(where shouldDrop: (Key, Cached) -> Bool) {
        for (key, list) in entries {
            let kept = list.filter { !shouldDrop(key, $0) }
            entries[key] = kept.isEmpty ? nil : kept
        }
    }

    /// Everything of one VPID (a VM entry or exit without VPID drops VPID 0's).
    func drop(vpid: UInt16) { drop { key, _ in key.vpid == vpid } }

    /// MOV to CR3: the non-global translations of the PCID loaded, every EP4TA.
    func dropNonGlobal(vpid: UInt16, pcid: UInt16) { drop { key, cached in key.vpid == vpid && key.pcid == pcid && !cached.isGlobal } }

    /// INVLPG: the page's translations of the current PCID and the global ones, every EP4TA.
    func invalidatePage(_ address: GuestVirtualAddress, vpid: UInt16, pcid: UInt16) {
        let page = address.rawValue >> 12
        drop { key, cached in key.page == page && key.vpid == vpid && (key.pcid == pcid || cached.isGlobal) }
    }

    /// INVVPID as the SDM defines its types (every EP4TA).
    func invalidateVPID(_ type: INVVPIDType, vpid: UInt16, address: GuestVirtualAddress) {
        let page = address.rawValue >> 12
        switch type {
        case .individualAddress: drop { key, _ in key.vpid == vpid && key.page == page }
        case .singleContext: drop(vpid: vpid)
        case .allContexts: drop { key, _ in key.vpid != 0 }
        case .singleContextRetainingGlobals: drop { key, cached in key.vpid == vpid && !cached.isGlobal }
        }
    }

    /// INVPCID in L2, for the current VPID (every EP4TA).
    func invalidatePCID(_ type: INVPCIDType, pcid: UInt16, address: GuestVirtualAddress, vpid: UInt16) {
        let page = address.rawValue >> 12
        drop { key, cached in
            guard key.vpid == vpid else { return false }
            switch type {
            case .individualAddress: return key.page == page && key.pcid == pcid && !cached.isGlobal
            case .singleContext: return key.pcid == pcid && !cached.isGlobal
            case .allContextsIncludingGlobal: return true
            case .allContextsExceptGlobal: return !cached.isGlobal
            }
        }
    }

    /// INVEPT single-context: the combined mappings of the EP4TA, every VPID and PCID.
    func drop(eptRoot: UInt64) { drop { key, _ in key.eptRoot == eptRoot } }

    /// INVEPT all-context.
    func dropAll() { entries.removeAll() }
}
