import GuestMemory
import X86Paging

/// KVM's VM-wide shadow-MMU state (`struct kvm_arch`'s MMU half): the shadow-page hash, the
/// rmaps from gfns to the SPTEs that map them, gfn write tracking, and the counters.
///
/// Single-threaded by design, like KVM's shadow MMU under `mmu_lock` held for write: callers
/// serialise (the VM runs shadow-MMU faults under one lock). That is also why the hot classes'
/// stored properties are `@exclusivity(unchecked)`: no access to them can overlap another, and the
/// dynamic checks cost a third of a fault.
public final class ShadowMMU {
    public let memory: MemslotSet
    public let pool: HostPagePool
    public let masks: SPTEMasks
    @exclusivity(unchecked) public var stats = MMUStats()
    public let events: MMUEventLog
    /// The MMU design the VM runs (docs/VARIANTS.md); every vCPU's context uses the same.
    public let variant: MMUVariant
    /// KVM's `kvm_flush_remote_tlbs`: the VM installs the flush of every vCPU's TLB.
    @exclusivity(unchecked) public var flushRemoteTLBs: () -> Void = {}
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS on every vCPU: the VM installs it.
    @exclusivity(unchecked) public var freeObsoleteRoots: () -> Void = {}
    /// Under a TDP L1, the TDP MMU whose SPTEs must also stop L1 writing a table `guest_mmu`
    /// shadows (KVM's write tracking and `kvm_mmu_slot_gfn_write_protect` cover both MMUs). Its
    /// lock is the one every `guest_mmu` operation holds for write.
    @exclusivity(unchecked) public unowned(unsafe) var tdpSharingWriteTracking: TDPMMU?
    /// The CPU logs dirty pages itself (PML, KVM's `cpu_dirty_log_size`): L2's leaves are then
    /// made write-protect-only for dirty logging (`leafADState`).
    @exclusivity(unchecked) public var cpuDirtyLogging = false
    /// With dirty rings: the gfns pushed onto the vCPUs' rings and not yet reset, which the
    /// auditor counts as logged (the VM installs it).
    @exclusivity(unchecked) public var dirtyRingGFNs: () -> Set<UInt64> = { [] }
    /// KVM's `mmu_unsync_pages_lock`: the TDP MMU's faults unsync pages holding `mmu_lock` for read.
    /// (Its value is unused; a zero-sized one would share the mutex pointer's address, which
    /// ThreadSanitizer then reports as a race on the pointer.)
    let unsyncPagesLock = LockedValue(0)

    /// The list `withUnsyncLeaves` fills, kept empty between calls for its capacity.
    @exclusivity(unchecked) var unsyncLeafBuffer: [ShadowPage] = []

    /// `mmu_page_hash`: KVM_NUM_MMU_PAGES buckets, indexed by `hash_64(gfn, 12)`.
    @exclusivity(unchecked) var hashBuckets = [[ShadowPage]](repeating: [], count: ShadowMMU.hashBucketCount)
    static let hashBucketCount = 1 << 12
    /// Host frame -> the shadow page whose table lives there (KVM's `page_private`).
    let directory: ShadowPageDirectory
    /// Every leaf SPTE, by the page it maps and its level.
    @exclusivity(unchecked) var rmaps: RmapTables
    /// `gfn_write_track`: gfns whose writes must be emulated (upper-level guest tables).
    /// `gfn_write_track`, by the host frame backing the gfn: how many upper-level shadow pages
    /// shadow the guest table there. Flat, like KVM's per-memslot array: one load per fault.
    let writeTrack: FrameWordTable
    /// The sum of the write-track counts, for the auditor.
    @exclusivity(unchecked) var writeTrackTotal = 0
    /// By the host frame backing a gfn: how many valid shadow pages (any level) shadow the guest
    /// table there, so that asking "is this gfn a shadowed table?" on every fault is one load
    /// rather than a walk of a hash chain.
    let shadowedTableCount: FrameWordTable
    /// Shadow pages backed by guest PTEs; zero lets emulated writes skip all bookkeeping.
    @exclusivity(unchecked) public internal(set) var indirectShadowPages = 0
    /// `n_used_mmu_pages`.
    @exclusivity(unchecked) public internal(set) var usedPages = 0
    /// `n_max_mmu_pages`: the shadow-page cache's (soft) size. The VM derives it from its memslots
    /// as KVM does (`defaultMaxPages`) unless set (`KVM_SET_NR_MMU_PAGES`, `setMaxPages`).
    @exclusivity(unchecked) public internal(set) var maxPages = ShadowMMU.minimumMaxPages
    /// `kvm_mmu_available_pages`.
    public var availablePages: Int { max(0, maxPages - usedPages) }
    /// KVM's dummy root (`kvm_mmu_get_dummy_root`: the zero page): what the hardware walks when
    /// the guest's root table is in no memslot, so that every access faults. Allocated once.
    public private(set) var dummyRootFrame: HostFrameNumber?

    func allocateDummyRoot() throws(ShadowMMUError) -> HostFrameNumber {
        if let dummyRootFrame { return dummyRootFrame }
        let frame: HostFrameNumber
        do { frame = try pool.allocatePage() } catch { throw .outOfHostMemory("\(error)") }
        pool.pointer(frame).initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        dummyRootFrame = frame
        return frame
    }

    /// The shadow MMU's `possible_nx_huge_pages` (KVM keeps one list per MMU, `KVM_SHADOW_MMU`):
    /// direct pages an executable fault made where a huge leaf was otherwise allowed, oldest
    /// first, for the recovery worker. Their number is the shadow MMU's part of `nx_lpage_splits`.
    @exclusivity(unchecked) unowned(unsafe) var oldestPossibleNXHugePage: ShadowPage?
    @exclusivity(unchecked) unowned(unsafe) var newestPossibleNXHugePage: ShadowPage?

    /// `mmu_valid_gen`.
    @exclusivity(unchecked) public internal(set) var validGeneration: UInt8 = 0
    /// Counts the zaps that made a root in use obsolete and the flips of `validGeneration`: while
    /// it stays, no root a context holds has become obsolete (`MMUContext.freeObsoleteRoots`).
    @exclusivity(unchecked) private(set) var rootObsoletions: UInt64 = 0
    @exclusivity(unchecked) var nextSerial: UInt64 = 0

    /// KVM's `KVM_MIN_ALLOC_MMU_PAGES`: the smallest cache.
    public static let minimumMaxPages = 64
    /// KVM's `KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO`.
    public static let memslotPagesPerShadowPage: UInt64 = 50
    /// KVM's `KVM_MIN_FREE_MMU_PAGES` and `KVM_REFILL_PAGES`: a fault first makes sure this many
    /// pages are free, and refills to the second number when they are not.
    public static let minimumFreePages = 5
    public static let refillPages = 25

    /// KVM's default `n_max_mmu_pages` for memslots of `pages` 4 KiB pages in all.
    public static func defaultMaxPages(memslotPages pages: UInt64) -> Int {
        max(Int(pages / memslotPagesPerShadowPage), minimumMaxPages)
    }

    /// KVM's `RMAP_RECYCLE_THRESHOLD`.
    public static let rmapRecycleThreshold = 1000
    /// KVM's `PTE_PREFETCH_NUM`.
    public static let prefetchCount = 8

    public init(memory: MemslotSet, pool: HostPagePool, masks: SPTEMasks = .shadowPaging, events: MMUEventLog = MMUEventLog(),
                variant: MMUVariant = .upstream) {
        self.variant = variant
        self.memory = memory
        self.pool = pool
        self.masks = masks
        self.events = events
        directory = ShadowPageDirectory(pool: pool)
        rmaps = RmapTables(pool: pool)
        writeTrack = FrameWordTable(pool: pool)
        shadowedTableCount = FrameWordTable(pool: pool)
    }

    deinit {
        directory.release()
        rmaps.release()
        writeTrack.release()
        shadowedTableCount.release()
    }

    /// Every live shadow page, oldest first.
    public var shadowPages: [ShadowPage] {
        hashBuckets.joined().sorted { $0.serial < $1.serial }
    }

    // MARK: Finding and creating shadow pages

    /// `hash_64(gfn, 12)`.
    static func bucket(_ gfn: GuestFrameNumber) -> Int {
        Int((gfn.rawValue &* 0x61C8_8646_80B5_83EB) >> 52)
    }

    /// KVM's `is_obsolete_sp`.
    func isObsolete(_ page: ShadowPage) -> Bool {
        page.role.isInvalid || page.validGeneration != validGeneration
    }

    /// `kvm_mmu_find_shadow_page`: a valid page with this gfn and role, counting hash collisions
    /// and misses as KVM does. An unsync page found is synced from the guest entries first (and
    /// not found if that fails); creating an upper-level page zaps the gfn's unsync pages, as the
    /// gfn is about to be write-tracked.
    func findShadowPage(_ gfn: GuestFrameNumber, _ role: PageRole, for context: MMUContext?) -> ShadowPage? {
        var collisions: UInt64 = 0
        var found: ShadowPage?
        var zapped = false
        for page in hashBuckets[Self.bucket(gfn)] where !isObsolete(page) {
            guard page.gfn == gfn else {
                collisions += 1
                continue
            }
            guard page.role == role else {
                if role.level > 1 && page.unsync {
                    zap(page, flushing: false)
                    zapped = true
                }
                continue
            }
            if page.hasGPTEs {
                if page.unsync, let context {
                    let synced = context.syncPage(page)
                    if synced < 0 {
                        zapped = true
                        break
                    }
                    if synced > 0 { flushRemoteTLBs() }
                }
                page.writeFloodingCount = 0
            }
            found = page
            break
        }
        if zapped { flushRemoteTLBs() }
        if found == nil { stats.mmuCacheMiss += 1 }
        stats.maxMMUPageHashCollisions = max(stats.maxMMUPageHashCollisions, collisions)
        return found
    }

    /// `__kvm_mmu_get_shadow_page`.
    func getShadowPage(_ gfn: GuestFrameNumber, _ role: PageRole,
                       for context: MMUContext?) throws(ShadowMMUError) -> (page: ShadowPage, created: Bool) {
        if let existing = findShadowPage(gfn, role, for: context) {
            events.record(.kvmMMUGetPage(gfn: gfn, role: role, created: false))
            return (existing, false)
        }
        let frame: HostFrameNumber
        do {
            frame = try pool.allocatePage()
        } catch {
            throw .outOfHostMemory("\(error)")
        }
        let sptes = pool.pointer(frame).bindMemory(to: UInt64.self, capacity: 512)
        // The pool hands out zeroed frames, which is a table of non-present SPTEs already.
        if SPTE.nonPresent.rawValue != 0 { sptes.initialize(repeating: SPTE.nonPresent.rawValue, count: 512) }
        let page = ShadowPage(gfn: gfn, role: role, frame: frame, sptes: sptes, validGeneration: validGeneration,
                              serial: nextSerial, isPassthrough: variant.isPassthrough(role))
        nextSerial += 1
        hashBuckets[Self.bucket(gfn)].append(page)
        directory.set(page, at: frame.rawValue)
        usedPages += 1
        if page.hasGPTEs { accountShadowed(page) }
        events.record(.kvmMMUGetPage(gfn: gfn, role: role, created: true))
        return (page, true)
    }

    /// The per-vCPU root pages of the `local-roots` variant alive now, for the auditor: they are in
    /// no hash bucket, but their links to hashed pages are checked like any other.
    @exclusivity(unchecked) var perVCPURootPages: [ShadowPage] = []

    /// Seed 2's `kvm_mmu_alloc_local_shadow_page`: a zeroed page for one vCPU's root, keyed by
    /// nothing (not hashed, not counted in `n_used_mmu_pages`, never write-tracked), reachable
    /// from its frame so that parent links into it work as for any page.
    func allocatePerVCPURootPage(_ role: PageRole) throws(ShadowMMUError) -> ShadowPage {
        let frame: HostFrameNumber
        do { frame = try pool.allocatePage() } catch { throw .outOfHostMemory("\(error)") }
        let sptes = pool.pointer(frame).bindMemory(to: UInt64.self, capacity: 512)
        sptes.initialize(repeating: SPTE.nonPresent.rawValue, count: 512)
        let page = ShadowPage(gfn: GuestFrameNumber(0), role: role, frame: frame, sptes: sptes, validGeneration: validGeneration,
                              serial: nextSerial, isPassthrough: false, isPerVCPURoot: true)
        nextSerial += 1
        directory.set(page, at: frame.rawValue)
        perVCPURootPages.append(page)
        return page
    }

    /// Frees a per-vCPU root page: its children lose this parent (they stay in the hash, as any
    /// page nobody links to), and the page goes.
    func freePerVCPURootPage(_ page: ShadowPage) {
        guard !page.isFreed else { return }
        for index in 0..<KVMLevel.entriesPerPage { zapPTE(page.spte(index), in: page) }
        for parent in page.parentPTEs { parent.pointee = SPTE.nonPresent.rawValue }
        page.parentPTEs.removeAll()
        page.isFreed = true
        perVCPURootPages.removeAll { $0 === page }
        directory.set(nil, at: page.frame.rawValue)
        try? pool.freePage(page.frame)
    }

    /// `account_shadowed`: from now on the guest table's writes are intercepted.
    func accountShadowed(_ page: ShadowPage) {
        indirectShadowPages += 1
        if let frame = memory.hostFrame(of: page.gfn) { shadowedTableCount[frame.rawValue] += 1 }
        if page.level > 1, let frame = memory.hostFrame(of: page.gfn) {
            writeTrack[frame.rawValue] += 1
            writeTrackTotal += 1
        }
        // Level 1 too: a new shadow page starts in sync, its table write-protected; a later
        // write fault may unsync it.
        // (Under a TDP L1 `writeProtect` reaches the TDP MMU's leaves too.)
        if writeProtect(page.gfn) { flushRemoteTLBs() }
        // A TDP L1 writes its tables through the TDP MMU: an upper-level table is write-tracked
        // there (L1's stores to it are emulated and reach `trackWrite`); a last-level one only
        // keeps huge pages off its gfn (`kvm_mmu_gfn_disallow_lpage`) and was write-protected
        // above, so that L1's first store faults and the TDP MMU's make_spte unsyncs it.
        if let tdp = tdpSharingWriteTracking {
            if page.level > 1 {
                try? tdp.addWriteTrackLocked(page.gfn.rawValue)
            } else {
                try? tdp.updateGFNDisallowLpageCountLocked(page.gfn.rawValue, delta: 1)
            }
        }
    }

    /// `mmu_try_to_unsync_pages` as the TDP MMU's `make_spte` asks it when it is about to map
    /// `gfn` writable, with `mmu_lock` held for read: shadow pages cannot come or go meanwhile
    /// (that takes the lock for write), but two TDP faults may unsync at once, so the unsync
    /// runs under `mmu_unsync_pages_lock`, as in KVM. True when the SPTE must stay read-only.
    public func unsyncForTDPMapping(_ gfn: GuestFrameNumber) -> Bool {
        unsyncPagesLock.withLock { _ in mustWriteProtect(gfn, canUnsync: true, prefetch: false) }
    }

    func unaccountShadowed(_ page: ShadowPage) {
        indirectShadowPages -= 1
        if let tdp = tdpSharingWriteTracking {
            if page.level > 1 {
                try? tdp.removeWriteTrackLocked(page.gfn.rawValue)
            } else {
                try? tdp.updateGFNDisallowLpageCountLocked(page.gfn.rawValue, delta: -1)
            }
        }
        if let frame = memory.hostFrame(of: page.gfn), shadowedTableCount[frame.rawValue] > 0 {
            shadowedTableCount[frame.rawValue] -= 1
        }
        if page.level > 1 {
            if let frame = memory.hostFrame(of: page.gfn), writeTrack[frame.rawValue] > 0 {
                writeTrack[frame.rawValue] -= 1
                writeTrackTotal -= 1
            }
        }
    }

    /// Whether writes to `gfn` are tracked (an upper-level guest table lives there).
    public func isWriteTracked(_ gfn: GuestFrameNumber) -> Bool {
        guard let frame = memory.hostFrame(of: gfn) else { return false }
        return writeTrack[frame.rawValue] != 0
    }

    /// Valid pages shadowing the guest table at `gfn`.
    func gptePages(at gfn: GuestFrameNumber) -> [ShadowPage] {
        hashBuckets[Self.bucket(gfn)].filter { $0.gfn == gfn && $0.hasGPTEs && !isObsolete($0) }
    }

    /// The page an SPTE pointer lies in.
    func page(containing pointer: SPTEPointer) -> ShadowPage {
        directory.page(pool.frame(of: UnsafeRawPointer(pointer))!.rawValue)!
    }

    /// Whether a valid page shadows the guest table at `gfn` (`gptePages(at:)`, answered by the
    /// per-frame count instead of the hash chain).
    func hasShadowedTable(at gfn: GuestFrameNumber) -> Bool {
        guard let frame = memory.hostFrame(of: gfn) else { return false }
        return shadowedTableCount[frame.rawValue] != 0
    }

    /// The page a non-leaf SPTE points at.
    func child(of spte: SPTE) -> ShadowPage? { directory.page(spte.pfn.rawValue) }

    // MARK: rmaps

    func rmapAdd(_ pointer: SPTEPointer, in page: ShadowPage, gfn: GuestFrameNumber, access: UInt8) {
        page.setTranslation(at: page.index(of: pointer), gfn: gfn, access: access)
        stats.updatePageStats(level: page.level, delta: 1)
        let frame = SPTE(rawValue: pointer.pointee).pfn.rawValue
        let count = rmaps.add(pointer, frame: frame, level: page.level)
        stats.maxMMURmapSize = max(stats.maxMMURmapSize, UInt64(count - 1))
        if count > Self.rmapRecycleThreshold {
            // KVM zaps the whole chain rather than let it grow without bound.
            for spte in rmaps.sptes(frame, level: page.level) { dropSPTE(spte) }
            flushRemoteTLBs()
        }
    }

    /// Removes a leaf from its rmap; `spte` is its value before it was cleared.
    func rmapRemove(_ pointer: SPTEPointer, _ spte: SPTE, level: Int) {
        if rmaps.remove(pointer, frame: spte.pfn.rawValue, level: level) {
            stats.updatePageStats(level: level, delta: -1)
        }
    }

    /// Every leaf SPTE that maps `gfn`, at any level.
    public func mappings(of gfn: GuestFrameNumber) -> [SPTEPointer] { mappings(of: gfn, minLevel: 1) }

    /// The leaf SPTEs that map `gfn` at levels `minLevel...maxLevel` (KVM's `gfn_to_rmap` per
    /// level): a huge leaf is in the rmap of the host frame its region starts at.
    func mappings(of gfn: GuestFrameNumber, minLevel: Int, maxLevel: Int = 3) -> [SPTEPointer] {
        var found: [SPTEPointer] = []
        for level in minLevel...maxLevel {
            let regionStart = GuestFrameNumber(gfn.rawValue & ~(pagesPerHugePage(level) - 1))
            guard let frame = memory.hostFrame(of: regionStart)?.rawValue else { continue }
            found += rmaps.sptes(frame, level: level)
        }
        return found
    }

    // MARK: Changing SPTEs

    /// `drop_spte`: clears an SPTE, removing a leaf from its rmap.
    func dropSPTE(_ pointer: SPTEPointer) {
        let old = SPTE(rawValue: pointer.pointee)
        pointer.pointee = SPTE.nonPresent.rawValue
        let level = page(containing: pointer).level
        if old.isShadowPresent && old.isLast(level: level) { rmapRemove(pointer, old, level: level) }
    }

    /// `drop_parent_pte`.
    func dropParentPTE(_ child: ShadowPage, _ pointer: SPTEPointer) {
        if let position = child.parentPTEs.firstIndex(of: pointer) { child.parentPTEs.remove(at: position) }
        pointer.pointee = SPTE.nonPresent.rawValue
    }

    /// `__link_shadow_page`: points `pointer` at `child`, replacing a large leaf if there is one.
    /// `asPDPTE`: the entry is one of the four PDPTEs of a per-vCPU PAE root the hardware walks in
    /// PAE paging, where the rights bits of a non-leaf SPTE are reserved; it carries only P (and
    /// the MMU-present bit, in bits the PDPTE format ignores).
    func link(_ pointer: SPTEPointer, to child: ShadowPage, asPDPTE: Bool = false, flushingLargeSPTE: Bool = true) {
        let old = SPTE(rawValue: pointer.pointee)
        if old.isShadowPresent {
            // Only a huge leaf can be in the way: a present non-leaf would have been reused.
            // (`drop_large_spte`: a huge-page split, whose child maps the same, needs no flush.)
            dropSPTE(pointer)
            if flushingLargeSPTE { flushRemoteTLBs() }
        }
        pointer.pointee = asPDPTE
            ? SPTE.pdpte(child: child.frame).rawValue
            : SPTE.nonLeaf(child: child.frame, adDisabled: child.role.adDisabled, masks: masks).rawValue
        child.parentPTEs.append(pointer)
        if child.isUnsyncRoot { markUnsync(pointer) }
    }

    /// `mmu_page_zap_pte`: clears one SPTE of `page`; true when it was present.
    @discardableResult
    func zapPTE(_ pointer: SPTEPointer, in page: ShadowPage) -> Bool {
        let spte = SPTE(rawValue: pointer.pointee)
        if spte.isShadowPresent {
            if spte.isLast(level: page.level) {
                dropSPTE(pointer)
            } else if let child = child(of: spte) {
                dropParentPTE(child, pointer)
            } else {
                pointer.pointee = SPTE.nonPresent.rawValue
            }
            return true
        }
        if spte.isMMIO(masks) { pointer.pointee = SPTE.nonPresent.rawValue }
        return false
    }

    /// `kvm_mmu_slot_gfn_write_protect` for 4K and up: clears W and MMU-writable in every SPTE
    /// mapping `gfn`. True when something changed (the caller flushes).
    @discardableResult
    func writeProtect(_ gfn: GuestFrameNumber) -> Bool {
        var changed = false
        // The rmaps in place, not `mappings(of:)`: a sync write-protects each page it syncs. A
        // huge leaf over the gfn is in the rmap of its region's first frame.
        for level in 1...3 {
            let regionStart = GuestFrameNumber(gfn.rawValue & ~(pagesPerHugePage(level) - 1))
            guard let frame = memory.hostFrame(of: level == 1 ? gfn : regionStart)?.rawValue else { continue }
            rmaps.forEachSPTE(frame, level: level) { pointer in
                let spte = SPTE(rawValue: pointer.pointee)
                guard spte.isWritable || spte.isMMUWritable(masks) else { return }
                pointer.pointee = spte.rawValue & ~(SPTE.writableBit | masks.mmuWritable)
                changed = true
            }
        }
        // `kvm_mmu_slot_gfn_write_protect` covers the TDP MMU's leaves too (L1's mapping of a
        // table `guest_mmu` shadows), under the same lock held for write.
        if let tdp = tdpSharingWriteTracking, tdp.writeProtectGFNLocked(gfn.rawValue, minLevel: KVMLevel.pageTable) { changed = true }
        return changed
    }

    // MARK: Zapping

    // MARK: The page cache limit

    /// `kvm_mmu_change_mmu_pages`: zaps the oldest pages down to `goal` if more are in use, then
    /// takes `goal` as the limit (or what is in use, if zapping could not get there: roots stay).
    public func setMaxPages(_ goal: Int) {
        if usedPages > goal {
            zapOldestPages(usedPages - goal)
            maxPages = max(goal, usedPages)
        } else {
            maxPages = goal
        }
    }

    /// `make_mmu_pages_available`: before a fault may allocate, at least `minimumFreePages` must
    /// be free; otherwise the oldest pages are zapped to refill to `refillPages`. A soft limit: a
    /// fault may then use more than what is free.
    func makePagesAvailable() throws(ShadowMMUError) {
        let available = availablePages
        guard available < Self.minimumFreePages else { return }
        zapOldestPages(Self.refillPages - available)
        if availablePages == 0 { throw .noShadowPagesAvailable(used: usedPages, limit: maxPages) }
    }

    /// `kvm_mmu_zap_oldest_mmu_pages`: zaps pages from the oldest (KVM's tail of
    /// `active_mmu_pages`), skipping roots, until `count` are gone; one TLB flush for all of them.
    /// Counts `mmu_recycled`.
    @discardableResult
    func zapOldestPages(_ count: Int) -> Int {
        guard count > 0 else { return 0 }
        var zapped = 0
        for page in shadowPages where page.rootCount == 0 {
            zap(page, flushing: false)
            zapped += 1
            if zapped >= count { break }
        }
        if zapped > 0 { flushRemoteTLBs() }
        stats.mmuRecycled += UInt64(zapped)
        return zapped
    }

    /// `kvm_mmu_prepare_zap_page` and `kvm_mmu_commit_zap_page` in one step: unlink the page
    /// from its children and parents, stop tracking its guest table, and free it unless a vCPU
    /// still uses it as a root (then it is only marked invalid, and freed with the last root).
    public func zap(_ page: ShadowPage) { zap(page, flushing: true) }

    /// `zap`, leaving the TLB flush to the caller when `flushing` is false (a batch of zaps
    /// commits with one flush, as KVM's invalid list does).
    func zap(_ page: ShadowPage, flushing: Bool) {
        guard !page.isFreed else { return }
        events.record(.kvmMMUPrepareZapPage(gfn: page.gfn, role: page.role))
        stats.mmuShadowZapped += 1
        // A root in use that was not already obsolete: every vCPU must drop it before it runs
        // again (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS).
        let zappedRoot = page.rootCount > 0 && !isObsolete(page)
        zapUnsyncChildren(of: page)
        for index in 0..<512 { zapPTE(page.spte(index), in: page) }
        for parent in page.parentPTEs { parent.pointee = SPTE.nonPresent.rawValue }
        page.parentPTEs.removeAll()
        if page.hasGPTEs && !page.role.isInvalid { unaccountShadowed(page) }
        unlinkUnsync(page)
        if page.nxHugePageDisallowed { unaccountNXHugePage(page) }
        if page.rootCount == 0 {
            free(page)
        } else {
            page.role.isInvalid = true
        }
        if flushing { flushRemoteTLBs() }
        if zappedRoot {
            rootObsoletions &+= 1
            freeObsoleteRoots()
        }
    }

    func free(_ page: ShadowPage) {
        page.isFreed = true
        let bucket = Self.bucket(page.gfn)
        hashBuckets[bucket].removeAll { $0 === page }
        directory.set(nil, at: page.frame.rawValue)
        usedPages -= 1
        try? pool.freePage(page.frame)
    }

    /// `mmu_free_root_page`.
    func releaseRoot(_ page: ShadowPage) {
        page.rootCount -= 1
        // KVM zaps the invalid root once more (and counts it) on the way to freeing it.
        if page.rootCount == 0 && page.role.isInvalid { zap(page) }
    }

    /// `kvm_mmu_zap_all_fast` (a memslot deleted or moved, the MMIO generation wrapping): flips the
    /// valid generation so that every existing page is obsolete at once, asks every vCPU to free
    /// its obsolete roots before it runs again, then zaps the obsolete pages oldest first (the tail
    /// of `active_mmu_pages`) with one TLB flush for the batch (`kvm_zap_obsolete_pages`). A root
    /// still in use is only marked invalid, and goes when its vCPU drops it.
    public func zapAllFast() {
        validGeneration = validGeneration == 0 ? 1 : 0
        rootObsoletions &+= 1
        events.record(.kvmMMUZapAllFast(mmuValidGen: validGeneration, usedPages: usedPages))
        freeObsoleteRoots()
        var zapped = 0
        for page in shadowPages where isObsolete(page) && !page.role.isInvalid && !page.isFreed {
            zap(page, flushing: false)
            zapped += 1
        }
        if zapped > 0 { flushRemoteTLBs() }
    }

    /// `kvm_zap_gfn_range` for the shadow MMU (`kvm_rmap_zap_gfn_range`: an MTRR or CR0.CD change,
    /// an APICv inhibit): every leaf SPTE mapping a gfn of `gfns` goes, whatever its level; shadow
    /// pages stay, and so do the guest tables they shadow. One TLB flush if anything went.
    /// Returns the number of SPTEs zapped.
    @discardableResult
    public func zapGFNRange(_ gfns: Range<UInt64>) -> Int {
        var zapped = 0
        for slot in memory.slots {
            let first = max(gfns.lowerBound, slot.baseFrame.rawValue)
            let end = min(gfns.upperBound, slot.baseFrame.rawValue + slot.pageCount)
            guard first < end else { continue }
            for gfn in first..<end {
                // A huge leaf is found from each of its gfns; it goes once.
                for pointer in mappings(of: GuestFrameNumber(gfn)) where SPTE(rawValue: pointer.pointee).isShadowPresent {
                    dropSPTE(pointer)
                    zapped += 1
                }
            }
        }
        if zapped > 0 { flushRemoteTLBs() }
        return zapped
    }

    /// Zaps every shadow page of the guest table at `gfn` (`kvm_mmu_unprotect_page`).
    @discardableResult
    public func unprotect(_ gfn: GuestFrameNumber) -> Bool {
        let pages = gptePages(at: gfn)
        for page in pages { zap(page) }
        return !pages.isEmpty
    }
}

public enum ShadowMMUError: Error, Equatable, Sendable, CustomStringConvertible {
    case outOfHostMemory(String)
    /// Every shadow page in use is a root and the page cache is full (KVM's -ENOSPC from
    /// `make_mmu_pages_available`).
    case noShadowPagesAvailable(used: Int, limit: Int)

    public var description: String {
        switch self {
        case .outOfHostMemory(let why): "the host page pool is exhausted: \(why)"
        case .noShadowPagesAvailable(let used, let limit):
            "no shadow page can be freed: \(used) in use (all roots) against a limit of \(limit)"
        }
    }
}
