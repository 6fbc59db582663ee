import GuestMemory
import X86Paging

/// A guest-visible outcome that no architecturally allowed execution could produce.
public struct LockstepDisagreement: Error, CustomStringConvertible, Sendable {
    public var address: GuestVirtualAddress
    public var access: Access
    /// What the architecture says, from the reference walk.
    public var expected: String
    /// What the virtualized guest saw.
    public var actual: String
    /// The guest entries involved: (level, entry GPA, value now).
    public var entries: [(level: Int, gpa: GuestPhysicalAddress, value: UInt64)]

    public var description: String {
        var lines = ["lockstep disagreement at \(address) (\(access.kind) by \(access.privilege))",
                     "  architecture: \(expected)", "  virtualized:  \(actual)"]
        for entry in entries {
            lines.append("  level \(entry.level) entry at \(entry.gpa) = \(hex(entry.value))")
        }
        return lines.joined(separator: "\n")
    }
}

/// The lockstep reference: for every guest access, what the architecture allows the guest to see.
/// The guest may keep using a translation it cached until it invalidates it (INVLPG, a CR3 load
/// for non-global ones of the PCID loaded, INVPCID, a paging-mode change for all), so the machine
/// tracks, per page and PCID, the translations still allowed besides the one a fresh walk gives.
/// The processor may also cache translations it never used (SDM 4.10.2.1, speculative caching):
/// the machine counts as cached, besides every translation an access used, the valid translations
/// of the neighbouring pages in the same aligned group of eight 4 KiB leaves whose leaf has A set
/// (a superset of what KVM's PTE prefetch installs). It also checks the guest's accessed and dirty
/// bits: every entry of a translation walked has A set, a leaf used for a write has D set unless a
/// cached dirty translation served it, and a leaf the guest wrote with D clear is not dirtied
/// without a write through it.
public final class ReferenceMachine {
    public let memory: MemslotSet
    public let cpu: CPUModel
    public private(set) var registers: PagingRegisters
    private var walker: PageWalker
    struct Cached: Equatable {
        var gpaFrame: UInt64
        var permissions: UInt8
        var isGlobal: Bool
        /// The PCID the translation was cached under (0 without CR4.PCIDE).
        var pcid: UInt16
        /// The leaf was dirty when cached: a write may use the translation without setting D.
        var dirty: Bool
    }
    /// The group of 4 KiB pages whose translations a use of one may cache (KVM's PTE_PREFETCH_NUM).
    static let speculativeGroup: UInt64 = 8
    private var cached: [UInt64: [Cached]] = [:]
    /// An older value of a last-level entry, and the PCIDs that may still hold its translation.
    struct StaleLeaf: PCIDTagged {
        var value: UInt64
        var pcids: Set<UInt16>
    }
    /// By entry GPA: older values of last-level entries whose translations may still be cached.
    private var staleLeaves: [UInt64: [StaleLeaf]] = [:]
    /// An older value of a non-leaf entry that the paging-structure caches may still hold.
    struct StaleTableEntry: PCIDTagged {
        var value: UInt64
        var level: Int
        var pcids: Set<UInt16>
    }
    /// By entry GPA: older values of non-leaf entries (with `cachesPagingStructures`).
    private var staleTableEntries: [UInt64: [StaleTableEntry]] = [:]
    /// Entry values at the places the pending write may land (see `expect`).
    private var valuesBeforeWrite: [UInt64: UInt64] = [:]
    /// The PCID current in each period between PCID changes, oldest first (the last is current):
    /// a translation can be cached only under a PCID current while it was valid.
    private var pcidPeriods: [UInt16] = [0]
    /// By entry GPA: the period in which the guest last wrote the entry (before boot: period 0).
    private var entryWrittenInPeriod: [UInt64: Int] = [:]
    /// What the processors of one guest know about its memory together: a store or a write-through
    /// by one processor changes what every other may see.
    final class SharedMemoryFacts {
        /// Frames any processor has walked as last-level tables.
        var levelOneTables: Set<UInt64> = []
        /// Frames any processor has walked as tables above the last level, with those levels.
        var upperTables: [UInt64: Set<Int>] = [:]
        /// The processors keep paging-structure caches the guest can observe (see
        /// `cachesPagingStructures`).
        var cachesPagingStructures = false
        /// Leaf entries (by GPA) the guest last wrote, with the value written.
        var guestWrittenEntries: [UInt64: UInt64] = [:]
        /// Leaf entries a write access went through since the guest last wrote them.
        var writtenThrough: Set<UInt64> = []
        /// Every processor of the guest (weakly: the machines own the facts, not the reverse).
        var processors: [WeakProcessor] = []
        /// The sub-page write permissions the VMM gave pages (SPP), by gfn, for the pages it
        /// restricted: a write touching a refused sub-page is KVM_EXIT_SPP, not a #PF, and changes
        /// nothing. Kept here from the VMM's requests, not read from KVM; the VM's, so every
        /// processor's.
        var subPageWriteMasks: [UInt64: SubPageWriteMask] = [:]
    }
    struct WeakProcessor {
        weak var machine: ReferenceMachine?
    }
    private let shared: SharedMemoryFacts
    public private(set) var checkedAccesses = 0

    /// Whether the guest's processors keep paging-structure caches it can see (SDM 4.10.3): a
    /// non-leaf entry the guest rewrites without invalidating may still be used, through its older
    /// value, for any address under it, until an invalidation drops the current PCID's caches
    /// (INVLPG or INVPCID of any address, a flushing CR3 load, single-context INVPCID, a change of
    /// paging mode). True for a guest whose paging runs in hardware (TDP: the vCPU's PDE cache);
    /// false under shadow paging, where KVM write-protects the guest's tables and the hardware
    /// caches only KVM's own. For every processor of the guest.
    public var cachesPagingStructures: Bool {
        get { shared.cachesPagingStructures }
        set { shared.cachesPagingStructures = newValue }
    }

    public convenience init(memory: MemslotSet, registers: PagingRegisters, cpu: CPUModel = CPUModel()) throws(ControlStateError) {
        try self.init(memory: memory, registers: registers, cpu: cpu, shared: SharedMemoryFacts())
    }

    private init(memory: MemslotSet, registers: PagingRegisters, cpu: CPUModel, shared: SharedMemoryFacts) throws(ControlStateError) {
        self.memory = memory
        self.cpu = cpu
        self.registers = registers
        self.shared = shared
        walker = try PageWalker(registers: registers, cpu: cpu, memory: memory)
        pcidPeriods = [registers.pcid]
        shared.processors.append(WeakProcessor(machine: self))
    }

    /// Another processor of the same guest, starting with `registers` and an empty TLB: it sees
    /// the stores and write-throughs of every processor of the guest, and they see its own.
    public func bringUpProcessor(registers: PagingRegisters) throws(ControlStateError) -> ReferenceMachine {
        try ReferenceMachine(memory: memory, registers: registers, cpu: cpu, shared: shared)
    }

    /// The architecture's answer for an access about to be made (a probe: nothing is written).
    /// For a write, the entry-sized values at every place the write may land are noted first, so
    /// that a store that rewrites a last-level paging entry is known with its old value.
    public func expect(_ address: GuestVirtualAddress, _ access: Access) -> Result<Translation, WalkFault> {
        let expected = walker.translate(address, access, in: memory, setAccessedDirty: false)
        valuesBeforeWrite.removeAll(keepingCapacity: true)
        if access.kind == .write {
            var frames = allowedStale(address, access, expected).translations.map(\.gpaFrame)
            if case .success(let translation) = expected { frames.append(translation.physicalAddress.frame.rawValue) }
            for frame in frames where shared.levelOneTables.contains(frame) || shared.upperTables[frame] != nil {
                let entry = frame << 12 | (address.rawValue & pageOffsetMask & ~UInt64(entrySize - 1))
                valuesBeforeWrite[entry] = readEntry(GuestPhysicalAddress(entry))
            }
        }
        return expected
    }

    /// What the guest may see besides a fresh walk: translations, and #PF error codes of walks
    /// through older non-leaf entries the paging-structure caches may hold.
    struct StaleOutcomes {
        var translations: [Cached] = []
        var faultCodes: [PageFaultErrorCode] = []
    }

    /// The translations for `address` the guest may still hold besides a fresh walk's: those
    /// cached for its page under the current PCID (or global), those through an older value of
    /// the last-level entry the walk reaches, and (with `cachesPagingStructures`) the outcomes of
    /// walks through an older value of a non-leaf entry on the way.
    private func allowedStale(_ address: GuestVirtualAddress, _ access: Access,
                              _ expected: Result<Translation, WalkFault>) -> StaleOutcomes {
        let pcid = registers.pcid
        var allowed = StaleOutcomes()
        allowed.translations = (cached[address.rawValue >> 12] ?? []).filter { $0.isGlobal || $0.pcid == pcid }
        let path: WalkPath
        switch expected {
        case .success(let translation): path = translation.path
        case .failure(.pageFault(let fault)): path = fault.path
        default: return allowed
        }
        if !staleTableEntries.isEmpty { addWalksThroughStaleTableEntries(address, access, path, pcid, to: &allowed) }
        guard path.bottomLevel == 1, let olderValues = staleLeaves[path.entryAddress(level: 1).rawValue] else { return allowed }
        let above = permissionsAbove(path)
        for older in olderValues where older.pcids.contains(pcid) {
            let frame = (entrySize == 4 ? Legacy32Entry(bits: older.value).frameAddress : Entry64(rawValue: older.value).frameAddress) >> 12
            allowed.translations.append(Cached(gpaFrame: frame, permissions: above & entryPermissions(older.value), isGlobal: false,
                                               pcid: pcid, dirty: older.value & (1 << 6) != 0))
        }
        return allowed
    }

    /// For each non-leaf entry on `path` with older values the caches may hold for `pcid`: the walk
    /// the processor would make from the cached value (the entries below read from memory as they
    /// are now). A walk through a cache may set A and D where a fresh walk would not look, so its
    /// translations count as dirty.
    private func addWalksThroughStaleTableEntries(_ address: GuestVirtualAddress, _ access: Access, _ path: WalkPath,
                                                  _ pcid: UInt16, to allowed: inout StaleOutcomes) {
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        guard first >= max(2, path.bottomLevel) else { return }
        for level in stride(from: first, through: max(2, path.bottomLevel), by: -1) {
            let entry = path.entryAddress(level: level).rawValue
            guard let olderValues = staleTableEntries[entry] else { continue }
            for older in olderValues where older.level == level && older.pcids.contains(pcid) {
                let view = EntryOverlayMemory(memory: memory, entryAddress: entry, value: older.value, entrySize: entrySize)
                switch walker.translate(address, access, in: view, setAccessedDirty: false) {
                case .success(let translation):
                    allowed.translations.append(Cached(gpaFrame: translation.physicalAddress.frame.rawValue,
                                                       permissions: translation.permissions, isGlobal: false, pcid: pcid,
                                                       dirty: true))
                case .failure(.pageFault(let fault)):
                    allowed.faultCodes.append(fault.errorCode)
                default:
                    break
                }
            }
        }
    }

    private var entrySize: Int { registers.mode == .legacy32 ? 4 : 8 }

    /// The ACC bits (1 execute, 2 write, 4 user) one entry grants, by the paging format's rules.
    private func entryPermissions(_ entry: UInt64) -> UInt8 {
        entrySize == 4
            ? Legacy32Format(cr4: registers.cr4, cpu: cpu).permissions(Legacy32Entry(bits: entry))
            : Long64Format(mode: registers.mode, efer: registers.efer, cpu: cpu).permissions(Entry64(rawValue: entry))
    }

    /// The ACC bits granted by the entries above the last level on `path` (PAE's PDPTE registers
    /// grant everything).
    private func permissionsAbove(_ path: WalkPath) -> UInt8 {
        var permissions: UInt8 = 7
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        guard first >= 2 else { return permissions }
        for level in 2...first { permissions &= entryPermissions(path.entryValue(level: level)) }
        return permissions
    }

    /// Checks the virtualized outcome of an access against `expected` (from `expect`, taken just
    /// before the access), then records what the access lets the guest cache.
    public func check(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                      expected: Result<Translation, WalkFault>, actual reported: AccessResult) throws(LockstepDisagreement) {
        checkedAccesses += 1
        // An SPP exit is a write the guest's translation allowed and its sub-page permissions
        // refused: its translation is checked as a completed write's, and nothing was stored.
        var actual = reported
        var refusedBySubPages = false
        if case .subPageWriteExit(let gpa) = reported {
            guard access.kind == .write, !permitsSubPageWrite(at: gpa, size: size) else {
                throw LockstepDisagreement(address: address, access: access, expected: access.kind == .write
                                           ? "no SPP exit: every sub-page the write touches at \(gpa) is writable"
                                           : "no SPP exit: SPP governs writes only",
                                           actual: "\(reported)", entries: entries(of: expected))
            }
            actual = .completed(gpa: gpa, value: value)
            refusedBySubPages = true
        } else if access.kind == .write, case .completed(let gpa, _) = reported, !permitsSubPageWrite(at: gpa, size: size) {
            throw LockstepDisagreement(address: address, access: access, expected:
                "KVM_EXIT_SPP at \(gpa): sub-page \(SubPageWriteMask.subPage(containing: gpa.pageOffset)) of its page "
                + "is write-protected (\(subPageWriteMask(for: gpa.frame)))", actual: "\(reported)", entries: entries(of: expected))
        }
        let page = address.rawValue >> 12
        let pcid = registers.pcid
        let stale = allowedStale(address, access, expected)
        let allowedStale = stale.translations
        func fail(_ expectedText: String) -> LockstepDisagreement {
            LockstepDisagreement(address: address, access: access, expected: expectedText, actual: "\(reported)",
                                 entries: entries(of: expected))
        }
        func staleAllows(_ gpa: GuestPhysicalAddress) -> Bool {
            allowedStale.contains { $0.gpaFrame == gpa.frame.rawValue && !walker.rules.isRefused(
                access, pagePermissions: $0.permissions, alignmentCheck: registers.rflags.contains(.alignmentCheck)) }
        }
        switch (expected, actual) {
        case (.success(let translation), .completed(let gpa, _)), (.success(let translation), .mmio(let gpa, _)):
            if gpa != translation.physicalAddress && !staleAllows(gpa) {
                throw fail("translation to \(translation.physicalAddress)")
            }
            if gpa == translation.physicalAddress {
                // A cached translation (dirty, for a write) may serve the access without a walk,
                // and then no A or D bit is set in memory.
                let servedByCache = allowedStale.contains { $0.gpaFrame == gpa.frame.rawValue
                    && (access.kind != .write || $0.dirty) && !walker.rules.isRefused(
                        access, pagePermissions: $0.permissions, alignmentCheck: registers.rflags.contains(.alignmentCheck)) }
                try checkAccessedDirty(translation, access, servedByCache: servedByCache, fail)
            }
        case (.success(let translation), .pageFault(let code, let cr2)):
            // Only a cached translation with fewer rights can fault where a fresh walk would not.
            let staleRefuses = allowedStale.contains { walker.rules.isRefused(
                access, pagePermissions: $0.permissions, alignmentCheck: registers.rflags.contains(.alignmentCheck)) }
            let staleFaults = stale.faultCodes.contains { $0.architectural == code.architectural }
            if !((staleRefuses && code.contains(.present) || staleFaults) && cr2 == address) {
                throw fail("translation to \(translation.physicalAddress)")
            }
        case (.failure(.pageFault(let fault)), .pageFault(let code, let cr2)):
            let staleFaults = stale.faultCodes.contains { $0.architectural == code.architectural }
            if code.architectural != fault.errorCode.architectural && !staleFaults || cr2 != address {
                throw fail("#PF error code \(fault.errorCode)")
            }
        case (.failure(.pageFault(let fault)), .completed(let gpa, _)), (.failure(.pageFault(let fault)), .mmio(let gpa, _)):
            if !staleAllows(gpa) { throw fail("#PF error code \(fault.errorCode)") }
        case (.failure(.generalProtection), .generalProtection):
            break
        case (.failure(.noMemory), .pageFault(let code, _)):
            // KVM reports a guest table outside memory as a not-present #PF.
            if code.contains(.present) { throw fail("a paging-structure entry outside guest memory") }
        default:
            throw fail("\(expected)")
        }
        if case .success(let translation) = expected {
            switch actual {
            case .completed(let gpa, _) where gpa == translation.physicalAddress, .mmio(let gpa, _) where gpa == translation.physicalAddress:
                // With paging off (level 0) there is no entry, and nothing to cache.
                guard translation.level > 0 else { break }
                let leafDirty = readEntry(translation.path.entryAddress(level: translation.level)) & (1 << 6) != 0
                remember(page, Cached(gpaFrame: gpa.frame.rawValue, permissions: translation.permissions,
                                      isGlobal: translation.isGlobal, pcid: pcid, dirty: leafDirty || access.kind == .write))
                if translation.level == 1 {
                    shared.levelOneTables.insert(translation.path.entryAddress(level: 1).frame.rawValue)
                    cacheNeighbours(of: address, access)
                }
                if cachesPagingStructures { noteUpperTables(of: translation.path) }
                if access.kind == .write { shared.writtenThrough.insert(translation.path.entryAddress(level: translation.level).rawValue) }
            default:
                break
            }
        }
        // An access served through an older entry value left that translation in the TLB: it
        // stays usable until the page itself is invalidated, whatever drops the older value.
        if let gpa = actual.completedAddress, expected.translatedAddress != gpa,
           let used = allowedStale.first(where: { $0.gpaFrame == gpa.frame.rawValue }) {
            remember(page, Cached(gpaFrame: used.gpaFrame, permissions: used.permissions, isGlobal: used.isGlobal, pcid: pcid,
                                  dirty: used.dirty || access.kind == .write))
        }
        if access.kind == .write, !refusedBySubPages, case .completed(let gpa, _) = actual {
            noteGuestWrite(gpa, size: size, value: value)
        }
    }

    // MARK: Sub-page write permissions (SPP)

    /// The VMM set `mask` for page `gfn` (KVM_SUBPAGES_SET_ACCESS went through).
    public func setSubPageWriteMask(_ mask: SubPageWriteMask, for gfn: GuestFrameNumber) {
        shared.subPageWriteMasks[gfn.rawValue] = mask == .allWritable ? nil : mask
    }

    /// The permissions the VMM gave page `gfn` (all writable unless it restricted them).
    public func subPageWriteMask(for gfn: GuestFrameNumber) -> SubPageWriteMask {
        shared.subPageWriteMasks[gfn.rawValue] ?? .allWritable
    }

    /// A memslot holding `gfns` moved to start at `newBase`: permissions belong to the slot's
    /// pages and move with them.
    public func subPageWriteMasksMoved(from gfns: Range<UInt64>, to newBase: UInt64) {
        let moving = shared.subPageWriteMasks.filter { gfns.contains($0.key) }
        for gfn in moving.keys { shared.subPageWriteMasks[gfn] = nil }
        for (gfn, mask) in moving { shared.subPageWriteMasks[gfn - gfns.lowerBound + newBase] = mask }
    }

    /// A memslot holding `gfns` was deleted: its pages' permissions went with it.
    public func subPageWriteMasksDeleted(_ gfns: Range<UInt64>) {
        shared.subPageWriteMasks = shared.subPageWriteMasks.filter { !gfns.contains($0.key) }
    }

    /// The architecture's rule, a sub-page at a time: a write (within one page) goes through only
    /// if every 128-byte sub-page it touches is writable.
    private func permitsSubPageWrite(at gpa: GuestPhysicalAddress, size: Int) -> Bool {
        guard let mask = shared.subPageWriteMasks[gpa.frame.rawValue] else { return true }
        return (try? mask.permitsWrite(atPageOffset: gpa.pageOffset, byteCount: UInt64(size))) ?? false
    }

    private func remember(_ page: UInt64, _ entry: Cached) {
        if cached[page]?.contains(entry) == true { return }
        cached[page, default: []].append(entry)
    }

    /// Speculative caching: the valid translations of the other pages of the aligned group of
    /// eight around `address` whose 4 KiB leaf has A set.
    private func cacheNeighbours(of address: GuestVirtualAddress, _ access: Access) {
        let first = (address.rawValue >> 12) & ~(Self.speculativeGroup - 1)
        for page in first..<first + Self.speculativeGroup where page != address.rawValue >> 12 {
            let neighbour = GuestVirtualAddress(page << 12)
            guard case .success(let translation) = walker.translate(neighbour, Access(.read, .supervisor), in: memory,
                                                                     setAccessedDirty: false),
                  translation.level == 1 else { continue }
            let leaf = readEntry(translation.path.entryAddress(level: 1))
            guard leaf & (1 << 5) != 0 else { continue }
            remember(page, Cached(gpaFrame: translation.physicalAddress.frame.rawValue, permissions: translation.permissions,
                                  isGlobal: translation.isGlobal, pcid: registers.pcid, dirty: leaf & (1 << 6) != 0))
        }
    }

    /// A guest store landed at `gpa`: if it rewrote a paging entry, that entry's dirty state is
    /// now whatever the guest wrote. If it rewrote a last-level entry that held a valid,
    /// accessed translation, the processor may have cached that translation just before (SDM
    /// 4.10.2.1: any valid translation may be cached at any time), so it stays allowed until the
    /// guest invalidates it.
    func noteGuestWrite(_ gpa: GuestPhysicalAddress, size: Int, value: UInt64) {
        let entryAddress = registers.mode == .legacy32 ? gpa.rawValue & ~3 : gpa.rawValue & ~7
        let replaced: UInt64?
        if let old = valuesBeforeWrite[entryAddress], old & 1 != 0, old & (1 << 5) != 0,
           walker.reservedBitsSet(in: old, level: 1) == 0, old != readEntry(GuestPhysicalAddress(entryAddress)) {
            replaced = old
        } else {
            replaced = nil
        }
        // Any processor of the guest may have cached a translation through the old value.
        for processor in shared.processors { processor.machine?.noteEntryWritten(entryAddress, replacing: replaced) }
        if cachesPagingStructures, let levels = shared.upperTables[entryAddress >> 12], let old = valuesBeforeWrite[entryAddress],
           old != readEntry(GuestPhysicalAddress(entryAddress)) {
            for level in levels where isCacheableTableEntry(old, level: level) {
                for processor in shared.processors {
                    processor.machine?.noteTableEntryWritten(entryAddress, level: level, replacing: old)
                }
            }
        }
        shared.guestWrittenEntries[entryAddress] = readEntry(GuestPhysicalAddress(entryAddress))
        shared.writtenThrough.remove(entryAddress)
    }

    private func noteEntryWritten(_ entryAddress: UInt64, replacing old: UInt64?) {
        if let old {
            // The old value was valid from its own write until now: only the PCIDs current in
            // that time may have cached a translation through it.
            let since = entryWrittenInPeriod[entryAddress] ?? 0
            staleLeaves[entryAddress, default: []].append(StaleLeaf(value: old, pcids: Set(pcidPeriods[since...])))
        }
        entryWrittenInPeriod[entryAddress] = pcidPeriods.count - 1
    }

    /// The frames of the tables above the last level `path` went through, by level.
    private func noteUpperTables(of path: WalkPath) {
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        guard first >= 2 else { return }
        for level in 2...first where level > path.bottomLevel {
            shared.upperTables[path.entryAddress(level: level).frame.rawValue, default: []].insert(level)
        }
    }

    /// Whether a paging-structure cache may hold `value` as a level-`level` entry: present,
    /// accessed, no reserved bit, and pointing at a table (not a page).
    private func isCacheableTableEntry(_ value: UInt64, level: Int) -> Bool {
        guard value & 1 != 0, value & (1 << 5) != 0, walker.reservedBitsSet(in: value, level: level) == 0 else { return false }
        let mapsPage = value & (1 << 7) != 0 && (level == 2 || (level == 3 && registers.mode.isLongMode))
        return !mapsPage
    }

    private func noteTableEntryWritten(_ entryAddress: UInt64, level: Int, replacing old: UInt64) {
        let since = entryWrittenInPeriod[entryAddress] ?? 0
        staleTableEntries[entryAddress, default: []].append(StaleTableEntry(value: old, level: level,
                                                                            pcids: Set(pcidPeriods[since...])))
    }

    /// Drops what the paging-structure caches may hold for `pcid` (every PCID when nil): they have
    /// no global entries.
    private func dropStaleTableEntries(pcid: UInt16?) {
        Self.forget(pcid: pcid, in: &staleTableEntries)
    }

    /// Older entry values no PCID may use any more go; `pcid` nil forgets them all.
    private static func forget<Older: PCIDTagged>(pcid: UInt16?, in olderValues: inout [UInt64: [Older]]) {
        guard !olderValues.isEmpty else { return }
        guard let pcid else {
            olderValues.removeAll()
            return
        }
        for (entry, list) in olderValues {
            var kept = list
            for index in kept.indices { kept[index].pcids.remove(pcid) }
            kept.removeAll { $0.pcids.isEmpty }
            olderValues[entry] = kept.isEmpty ? nil : kept
        }
    }

    private func checkAccessedDirty(_ translation: Translation, _ access: Access, servedByCache: Bool,
                                    _ fail: (String) -> LockstepDisagreement) throws(LockstepDisagreement) {
        let path = translation.path
        guard path.topLevel > 0 else { return }
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        guard first >= path.bottomLevel else { return }
        for level in stride(from: first, through: path.bottomLevel, by: -1) {
            let address = path.entryAddress(level: level)
            let now = readEntry(address)
            if !servedByCache && now & (1 << 5) == 0 { throw fail("A set in the level-\(level) entry used") }
            if level == path.bottomLevel {
                if !servedByCache && access.kind == .write && now & (1 << 6) == 0 { throw fail("D set in the leaf written through") }
                if now & (1 << 6) != 0, let written = shared.guestWrittenEntries[address.rawValue], written & (1 << 6) == 0,
                   !shared.writtenThrough.contains(address.rawValue) && access.kind != .write {
                    throw fail("D clear: the guest wrote this leaf clean and nothing wrote through it since")
                }
            }
        }
    }

    private func readEntry(_ address: GuestPhysicalAddress) -> UInt64 {
        if registers.mode == .legacy32 { return UInt64((try? memory.load32(address)) ?? 0) }
        return (try? memory.load64(address)) ?? 0
    }

    private func entries(of expected: Result<Translation, WalkFault>) -> [(level: Int, gpa: GuestPhysicalAddress, value: UInt64)] {
        let path: WalkPath
        switch expected {
        case .success(let translation): path = translation.path
        case .failure(.pageFault(let fault)): path = fault.path
        case .failure(.noMemory(_, _, let walked)): path = walked
        default: return []
        }
        return path.levels.map { ($0, path.entryAddress(level: $0), readEntry(path.entryAddress(level: $0))) }
    }

    // MARK: Invalidation

    /// INVLPG: the page's translations for the current PCID and its global ones go (SDM: other
    /// PCIDs' may stay).
    public func invalidatePage(_ address: GuestVirtualAddress) {
        let pcid = registers.pcid
        drop(page: address.rawValue >> 12) { $0.isGlobal || $0.pcid == pcid }
        dropStaleLeaf(of: address, pcid: pcid)
        // INVLPG drops every paging-structure-cache entry of the current PCID (SDM 4.10.4.1).
        dropStaleTableEntries(pcid: pcid)
    }

    /// Forgets the older values of the last-level entry `address` walks through, for `pcid`.
    private func dropStaleLeaf(of address: GuestVirtualAddress, pcid: UInt16) {
        let path: WalkPath
        switch walker.translate(address, Access(.read, .supervisor), in: memory, setAccessedDirty: false) {
        case .success(let translation): path = translation.path
        case .failure(.pageFault(let fault)): path = fault.path
        default: return
        }
        guard path.bottomLevel == 1 else { return }
        let entry = path.entryAddress(level: 1).rawValue
        guard var list = staleLeaves[entry] else { return }
        for index in list.indices { list[index].pcids.remove(pcid) }
        list.removeAll { $0.pcids.isEmpty }
        staleLeaves[entry] = list.isEmpty ? nil : list
    }

    /// Forgets older last-level values for `pcid` (every PCID when nil).
    private func dropStaleLeaves(pcid: UInt16?) {
        Self.forget(pcid: pcid, in: &staleLeaves)
    }

    /// INVPCID of `type` for `pcid` (and `address`, for an individual-address invalidation).
    public func invalidatePCID(_ type: INVPCIDType, pcid: UInt16, address: GuestVirtualAddress) {
        switch type {
        case .individualAddress:
            drop(page: address.rawValue >> 12) { !$0.isGlobal && $0.pcid == pcid }
            dropStaleLeaf(of: address, pcid: pcid)
            dropStaleTableEntries(pcid: pcid)
        case .singleContext:
            dropAll { !$0.isGlobal && $0.pcid == pcid }
            dropStaleLeaves(pcid: pcid)
            dropStaleTableEntries(pcid: pcid)
        case .allContextsIncludingGlobal:
            cached.removeAll()
            dropStaleLeaves(pcid: nil)
            dropStaleTableEntries(pcid: nil)
        case .allContextsExceptGlobal:
            dropAll { !$0.isGlobal }
            dropStaleLeaves(pcid: nil)
            dropStaleTableEntries(pcid: nil)
        }
    }

    private func drop(page: UInt64, where shouldDrop: (Cached) -> Bool) {
        guard let list = cached[page] else { return }
        let kept = list.filter { !shouldDrop($0) }
        cached[page] = kept.isEmpty ? nil : kept
    }

    private func dropAll(where shouldDrop: (Cached) -> Bool) {
        for page in Array(cached.keys) { drop(page: page, where: shouldDrop) }
    }

    /// New registers: what the write invalidates is the architecture's rule (a CR3 change drops
    /// the non-global translations of the PCID loaded; a change of paging, PGE, PAE, PCIDE 1 -> 0 or
    /// SMEP 0 -> 1 drops all), and PAE's PDPTE registers are reloaded only by the writes that
    /// reload them.
    public func setRegisters(_ new: PagingRegisters) throws(ControlStateError) {
        let old = registers
        let keptPDPTEs = new.mode == .pae && !new.reloadsPDPTEs(from: old) && new.cr3 == old.cr3
            ? (0..<4).map { walker.pdpte($0).rawValue } : nil
        let newWalker = try PageWalker(registers: new, cpu: cpu, memory: memory, pdpteValues: keptPDPTEs)
        registers = new
        walker = newWalker
        notePCID(new.pcid)
        if new.invalidatesAllTranslations(from: old) {
            cached.removeAll()
            dropStaleLeaves(pcid: nil)
            dropStaleTableEntries(pcid: nil)
        } else if new.cr3 != old.cr3 {
            dropNonGlobalTranslations(of: new.pcid)
        }
    }

    /// MOV to CR3 of `value` (also the value CR3 holds): PAE paging reloads its PDPTEs from memory;
    /// the non-global translations of the PCID loaded go unless `noFlush` (bit 63 of the source,
    /// meaningful only with CR4.PCIDE).
    public func loadCR3(_ value: UInt64, noFlush: Bool = false) throws(ControlStateError) {
        var new = registers
        new.cr3 = value
        walker = try PageWalker(registers: new, cpu: cpu, memory: memory)
        registers = new
        notePCID(new.pcid)
        if !(noFlush && new.cr4.contains(.pcidEnable)) { dropNonGlobalTranslations(of: new.pcid) }
    }

    private func notePCID(_ pcid: UInt16) {
        if pcidPeriods[pcidPeriods.count - 1] != pcid { pcidPeriods.append(pcid) }
    }

    /// A CR3 load of the value CR3 holds, flushing.
    public func reloadCR3() {
        try? loadCR3(registers.cr3)
    }

    private func dropNonGlobalTranslations(of pcid: UInt16) {
        let keepsGlobal = registers.cr4.contains(.globalPages)
        dropAll { !(keepsGlobal && $0.isGlobal) && $0.pcid == pcid }
        dropStaleLeaves(pcid: pcid)
        dropStaleTableEntries(pcid: pcid)
    }
}

private extension AccessResult {
    /// Where a completed (or MMIO) access went.
    var completedAddress: GuestPhysicalAddress? {
        switch self {
        case .completed(let gpa, _), .mmio(let gpa, _): gpa
        default: nil
        }
    }
}

private extension Result where Success == Translation {
    /// The address a fresh walk translates to, nil when it faults.
    var translatedAddress: GuestPhysicalAddress? {
        if case .success(let translation) = self { return translation.physicalAddress }
        return nil
    }
}

/// An older entry value with the PCIDs that may still use it.
private protocol PCIDTagged {
    var pcids: Set<UInt16> { get set }
}

/// Guest memory with one entry reading as an older value: the memory a walk through a
/// paging-structure cache that still holds that value sees.
private final class EntryOverlayMemory: PhysicalMemory {
    let memory: MemslotSet
    let entryAddress: UInt64
    let value: UInt64
    let entrySize: Int
    /// A copy of the entry's page with the older value in place (the walk only reads it).
    private let page: UnsafeMutableRawPointer?

    init(memory: MemslotSet, entryAddress: UInt64, value: UInt64, entrySize: Int) {
        self.memory = memory
        self.entryAddress = entryAddress
        self.value = value
        self.entrySize = entrySize
        if let original = memory.hostPage(GuestFrameNumber(entryAddress >> 12)) {
            let copy = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
            copy.copyMemory(from: original.bytes, byteCount: 4096)
            let offset = Int(entryAddress & 0xFFF)
            if entrySize == 4 {
                copy.storeBytes(of: UInt32(truncatingIfNeeded: value), toByteOffset: offset, as: UInt32.self)
            } else {
                copy.storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
            }
            page = copy
        } else {
            page = nil
        }
    }

    deinit { page?.deallocate() }

    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        if frame.rawValue == entryAddress >> 12, let page { return HostPage(bytes: page, isWritable: false) }
        return memory.hostPage(frame)
    }
}
