// KVM's TDP MMU (tdp_mmu.c): the direct MMU for EPT and NPT, shared by every vCPU of a VM, faulting
// under mmu_lock held for read with compare-and-exchange on SPTEs.
//
// # Public API
//
// Creating one (a VM has one; every vCPU uses it):
//
//     let mmu = try TDPMMU(memory: memslots, configuration: .ept(capabilities: caps, guestMaxPhysicalAddressBits: 46),
//                          lock: MMULock(), events: MMUEventLog())
//     mmu.flushRemoteTLBs = { /* every vCPU flushes its TLB before it next runs the guest */ }
//     mmu.freeObsoleteRoots = { /* every vCPU drops an invalid root before it next runs the guest */ }
//
//   `TDPMMUConfiguration` (`.ept(...)`, `.npt(...)` or memberwise): SPTE masks, root level 4 or 5,
//   the largest huge page, the NX huge-page mitigation and its recovery ratio, PML or write-protect
//   dirty logging, manual dirty-log protection, eager page splitting, zap-all on memslot deletion.
//   The existing memslots of `memory` are adopted; from then on the layout changes only through the
//   memslot calls below (a fault finding the memslots changed behind the MMU's back throws).
//
// Roots (kvm_tdp_mmu_alloc_root / kvm_tdp_mmu_put_root; one shared root per role):
//
//     func rootRole(guestMode: Bool = false) -> PageRole
//     func allocateRoot(guestMode: Bool = false) throws(TDPMMUError) -> TDPRoot     // +1 reference
//     func allocateRoot(role: PageRole) throws(TDPMMUError) -> TDPRoot
//     func putRoot(_ root: TDPRoot) throws(TDPMMUError)                 // -1 reference; takes no lock
//     func invalidateAllRoots()             // write lock; roles become invalid, roots scheduled to zap
//     func zapInvalidatedRoots()            // read lock; zaps them and drops the MMU's own references
//     func zapAllFast()                     // kvm_mmu_zap_all_fast: the two above plus freeObsoleteRoots
//     var roots: [TDPRoot]
//
//   `TDPRoot.frame` is the host frame of the root table (EPTP / nCR3); `isInvalid` is KVM's
//   `role.invalid`: a vCPU must put such a root and allocate a new one before it runs the guest
//   (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), and flush its TLB when it loads a new root.
//
// Faults (kvm_mmu_page_fault with TDP: MMIO fast path, page tracking, fast page fault, kvm_tdp_mmu_map):
//
//     func pageFault(at: GuestPhysicalAddress, errorCode: PageFaultErrorCode, root: TDPRoot,
//                    vcpuID: Int = 0) throws(TDPMMUError) -> PageFaultResult
//     static func errorCode(forEPTViolation: EPTViolationQualification) -> PageFaultErrorCode
//
//   An EPT violation passes `errorCode(forEPTViolation:)`; an EPT misconfiguration passes
//   `[.reservedBit]` (KVM's PFERR_RSVD_MASK); an NPT fault passes the #NPF error code. Results:
//   `.fixed`, `.spurious`, `.retry` (nothing done: re-enter; also when the root went invalid) and
//   `.emulate` (MMIO, a write to a read-only memslot, a write to a write-tracked gfn).
//
// Zapping (all take the lock for write unless noted; TLB flushes go through `flushRemoteTLBs`):
//
//     func zapGFNRange(_ gfns: Range<UInt64>)     // kvm_zap_gfn_range: leaves in valid roots
//     func unmapGFNRange(_ gfns: Range<UInt64>)   // MMU-notifier unmap: leaves in every root
//     func zapAll()                                 // kvm_tdp_mmu_zap_all (VM teardown)
//     func recoverNXHugePages() -> Int             // one pass of kvm-nx-lpage-recovery
//
// Memslots (KVM_SET_USER_MEMORY_REGION's MMU half; the MemslotSet is changed here, under the lock):
//
//     func addMemslot(id:base:size:flags:hostMapping:hostAlignment:hostSkew:) throws(TDPMMUError) -> Memslot
//     func deleteMemslot(id:) throws(TDPMMUError)
//     func moveMemslot(id:to:) throws(TDPMMUError) -> Memslot   // KVM_MR_MOVE: flushed as a delete
//     func setMemslotFlags(id:flags:) throws(TDPMMUError)       // kvm_mmu_slot_apply_flags
//     func hostMapping(ofSlot:) -> HostMappingSize?
//
// Dirty logging (spec section 8):
//
//     func setDirtyLogProtection(_:) throws(TDPMMUError)   // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on/off
//     func getDirtyLog(slot:) throws(TDPMMUError) -> [UInt64]                     // KVM_GET_DIRTY_LOG
//     func clearDirtyLog(slot:firstPage:bitmap:) throws(TDPMMUError)              // KVM_CLEAR_DIRTY_LOG
//     func writeProtectSlot(_:minLevel:) throws(TDPMMUError)                      // read lock
//     func clearDirtySlot(_:) throws(TDPMMUError)                                 // read lock
//     func writeProtectMasked(slot:gfnOffset:mask:) / clearDirtyMasked(...)       // write lock
//     func splitHugePages(slot:gfns:targetLevel:) throws(TDPMMUError)             // read lock
//     func recoverHugePages(slot:) throws(TDPMMUError)                            // read lock
//
// Write tracking and huge-page accounting (page_track.c, update_gfn_disallow_lpage_count):
//
//     func addWriteTrack(_ gfn:) / removeWriteTrack(_ gfn:) throws(TDPMMUError)
//     func isWriteTracked(_ gfn:) -> Bool
//     func updateGFNDisallowLpageCount(_ gfn:, delta:) throws(TDPMMUError)
//     func maxMappingLevel(_ gfn:) -> Int?
//
// Aging (MMU notifiers; read lock, atomic):
//
//     func ageGFNRange(_ gfns: Range<UInt64>) -> Bool
//     func testAgeGFNRange(_ gfns: Range<UInt64>) -> Bool
//
// Looking and checking:
//
//     func mapping(of gfn: UInt64, in root: TDPRoot) -> TDPMapping?   // the leaf (or MMIO) SPTE
//     func audit() -> [String]                                         // empty when every invariant holds
//     var stats: MMUStats; var pageTableCount: Int; var lostRaces: UInt64
//
//   `stats` holds the counters this MMU keeps (pages_4k/2m/1g, nx_lpage_splits, pf_taken/fixed/
//   emulate/spurious/fast/mmio_spte_created, remote_tlb_flush(_requests)); the VM adds its own
//   (exits, mmio_exits, tlb_flush...) and the shadow MMU's when both run.
//
// Memslot huge-page rules: a memslot's guest frames and host frames must agree modulo a huge page
// for it to map huge (`hostAlignment`/`hostSkew` place the host frames, as a VMM aligns its
// mapping), edges of a slot that cut a huge region forbid it there, write-tracked gfns forbid it in
// their region, and the host must map at least that large: `hostMapping` per slot, by default
// `.oneGiB`, meaning whatever the slot's contiguous host frames allow (`.twoMiB` is a host with
// transparent huge pages, `.fourKiB` one without).
//
// # Locking
//
// `lock` is KVM's mmu_lock. Faults, root allocation, aging, eager splitting, write-protecting or
// clearing the dirty state of a whole slot, recovering huge pages and zapping invalidated roots
// take it for read and change SPTEs only by compare-and-exchange (a lost race makes a fault return
// `.retry` and makes the others look at the SPTE again). Zaps, memslot changes, the masked
// dirty-log calls, write tracking, NX recovery and the auditor take it for write. An SPTE that must
// not be seen half-changed is frozen (`SPTE.frozen`) by its changer; every other thread backs off
// from a frozen SPTE. The callbacks run with the lock held: they must not take it.
//
// The hardware (a vCPU's walker over these tables) must set A/D bits with a locked update of the
// entry it walked (`SPTESlot.compareExchange`, walking again if the entry changed), and must walk
// with the lock held for read, as KVM's vCPUs in guest mode hold off the freeing of page tables as
// an RCU read-side critical section does. With PML it marks the gfn dirty when it sets D on a leaf.
//
// # Freeing page tables
//
// A table unlinked while the lock is held for read may still be walked by another reader that
// stepped into it before. KVM frees such tables after an RCU grace period; here they are queued and
// freed when no reader holds the lock: at the start of every write-locked operation, and after a
// read-locked one if the lock can be taken for write at once. A queued table is full of frozen
// SPTEs, so a late reader backs off instead of using it (a dead root's table was zapped empty, and
// no walk starts from a root nobody references).

import GuestMemory
import Synchronization
import X86Paging

/// How KVM is configured for TDP: the SPTE format, the root level, huge pages and dirty logging.
public struct TDPMMUConfiguration: Sendable, Hashable {
    /// How dirty logging finds written pages.
    public enum DirtyLogging: Sendable, Hashable {
        /// Write-protect pages and mark them dirty on the write fault (no PML).
        case writeProtect
        /// Intel PML (`cpu_dirty_log_size` set): clear D bits; the processor logs the GPA when it
        /// sets D, so the hardware walker must mark the gfn dirty when it sets D on a leaf.
        case pml
    }

    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
    public enum DirtyLogProtection: Sendable, Hashable {
        /// KVM_GET_DIRTY_LOG clears the bitmap and re-protects the pages it reports.
        case automatic
        /// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: GET only copies; KVM_CLEAR_DIRTY_LOG re-protects.
        case manual
        /// Plus KVM_DIRTY_LOG_INITIALLY_SET: a slot starts logging with every bit set and nothing
        /// write-protected; huge pages are write-protected and split as CLEAR_DIRTY_LOG reaches them.
        case manualInitiallySet
    }

    /// The SPTE format: `SPTEMasks.ept(...)` for EPT, `SPTEMasks.shadowPaging(...)` for NPT.
    public var masks: SPTEMasks
    /// The root level, 4 or 5 (`kvm_mmu_get_tdp_level`).
    public var rootLevel: Int
    /// `max_huge_page_level`: 1 (4K only), 2 (2M) or 3 (1G), from EPT capabilities or host GBPAGES.
    public var maxHugePageLevel: Int
    /// `is_nx_huge_page_enabled`: executable huge pages are split to 4K (iTLB multihit mitigation).
    public var nxHugePages: Bool
    /// `nx_huge_pages_recovery_ratio`: one recovery pass zaps ceil(nx_lpage_splits / ratio) pages;
    /// 0 disables recovery.
    public var nxHugePagesRecoveryRatio: Int
    public var dirtyLogging: DirtyLogging
    public var dirtyLogProtection: DirtyLogProtection
    /// The `eager_page_split` module parameter (default on).
    public var eagerPageSplit: Bool
    /// KVM_X86_QUIRK_SLOT_ZAP_ALL (default on): deleting a memslot zaps every root (invalidate and
    /// zap all); off, only the slot's leaves are zapped.
    public var zapAllOnMemslotDeletion: Bool

    public init(masks: SPTEMasks, rootLevel: Int, maxHugePageLevel: Int = 3, nxHugePages: Bool = false,
                nxHugePagesRecoveryRatio: Int = 60, dirtyLogging: DirtyLogging = .writeProtect,
                dirtyLogProtection: DirtyLogProtection = .automatic, eagerPageSplit: Bool = true,
                zapAllOnMemslotDeletion: Bool = true) {
        self.masks = masks
        self.rootLevel = rootLevel
        self.maxHugePageLevel = maxHugePageLevel
        self.nxHugePages = nxHugePages
        self.nxHugePagesRecoveryRatio = nxHugePagesRecoveryRatio
        self.dirtyLogging = dirtyLogging
        self.dirtyLogProtection = dirtyLogProtection
        self.eagerPageSplit = eagerPageSplit
        self.zapAllOnMemslotDeletion = zapAllOnMemslotDeletion
    }

    /// VMX with EPT (`kvm_mmu_set_ept_masks`, `vmx_get_max_ept_level`, `ept_caps_to_lpage_level`):
    /// the root level is 5 only when the CPU has 5-level EPT and the guest can address more than 48
    /// bits. PML needs EPT A/D bits.
    public static func ept(capabilities: EPTCapabilities, guestMaxPhysicalAddressBits: Int, pml: Bool = false,
                           nxHugePages: Bool = false) -> TDPMMUConfiguration {
        let level = tdpLevel(maxTDPLevel: capabilities.fiveLevel ? KVMLevel.pt64Root5 : KVMLevel.pt64Root4,
                             guestMaxPhysicalAddressBits: guestMaxPhysicalAddressBits)
        let hugeLevel = capabilities.pages1GiB ? 3 : (capabilities.pages2MiB ? 2 : 1)
        return TDPMMUConfiguration(
            masks: .ept(accessedDirty: capabilities.accessedDirty, executeOnly: capabilities.executeOnly,
                        hostPhysicalAddressBits: capabilities.maxPhysicalAddressBits),
            rootLevel: level, maxHugePageLevel: hugeLevel, nxHugePages: nxHugePages,
            dirtyLogging: pml && capabilities.accessedDirty ? .pml : .writeProtect)
    }

    /// SVM with NPT: the host's paging level and the x86 SPTE format; 1 GiB pages when the host has
    /// them.
    public static func npt(hostLevels: Int, hostPhysicalAddressBits: Int = 46, supports1GiBPages: Bool = true,
                           nxHugePages: Bool = false) -> TDPMMUConfiguration {
        TDPMMUConfiguration(masks: .shadowPaging(hostPhysicalAddressBits: hostPhysicalAddressBits), rootLevel: hostLevels,
                            maxHugePageLevel: supports1GiBPages ? 3 : 2, nxHugePages: nxHugePages)
    }

    func validate() throws(TDPMMUError) {
        guard rootLevel == KVMLevel.pt64Root4 || rootLevel == KVMLevel.pt64Root5 else {
            throw .invalidConfiguration("the TDP root level is 4 or 5, not \(rootLevel)")
        }
        guard (1...3).contains(maxHugePageLevel) else {
            throw .invalidConfiguration("the largest huge page is at level 1, 2 or 3, not \(maxHugePageLevel)")
        }
        guard nxHugePagesRecoveryRatio >= 0 else {
            throw .invalidConfiguration("the NX recovery ratio cannot be negative (\(nxHugePagesRecoveryRatio))")
        }
        if dirtyLogging == .pml && !(masks.isEPT && masks.accessedDirtyEnabled) {
            throw .invalidConfiguration("PML needs EPT with accessed/dirty bits")
        }
        guard (36...52).contains(masks.hostPhysicalAddressBits) else {
            throw .invalidConfiguration("host MAXPHYADDR must be 36-52, not \(masks.hostPhysicalAddressBits)")
        }
    }
}

/// Why a TDP MMU request was refused.
public enum TDPMMUError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidConfiguration(String)
    /// The host page pool has no frame left for a page table.
    case outOfHostMemory(String)
    /// A root role the TDP MMU cannot use (it must be direct, ACC_ALL, at the root level...).
    case invalidRootRole(PageRole, String)
    /// SMM roots map a second address space the model does not have.
    case smmAddressSpaceNotModelled
    /// The root belongs to another TDP MMU.
    case foreignRoot
    /// More puts than gets of a root (or a put of the MMU's own reference to a valid root).
    case rootOverReleased(PageRole)
    /// The address lies beyond what a root of this level maps.
    case addressBeyondRoot(GuestPhysicalAddress, rootLevel: Int)
    /// The memslots changed without the TDP MMU (its huge-page metadata would be stale).
    case memslotsChangedOutsideTDPMMU(expectedGeneration: UInt64, generation: UInt64)
    case memslot(MemslotError)
    case noSuchMemslot(Int)
    /// No memslot holds the gfn.
    case gfnNotInMemslot(UInt64)
    /// A level argument outside what the operation accepts.
    case invalidLevel(Int, String)
    /// A write-track or disallow count would overflow or go negative.
    case countOutOfRange(gfn: UInt64, String)
    /// A dirty-log range KVM_CLEAR_DIRTY_LOG refuses (unaligned, or beyond the slot).
    case invalidDirtyLogRange(slot: Int, firstPage: UInt64, pages: UInt64)
    /// Sub-page write protection refused the request.
    case subPageProtection(SubPageProtectionError)

    public var description: String {
        switch self {
        case .invalidConfiguration(let why): "invalid TDP MMU configuration: \(why)"
        case .outOfHostMemory(let why): "no host frame for a TDP page table: \(why)"
        case .invalidRootRole(let role, let why): "\(role) cannot be a TDP root: \(why)"
        case .smmAddressSpaceNotModelled: "SMM roots (address space 1) are not modelled"
        case .foreignRoot: "the root belongs to another TDP MMU"
        case .rootOverReleased(let role): "root \(role) was put more often than it was taken"
        case .addressBeyondRoot(let address, let level): "\(address) lies beyond what a \(level)-level root maps"
        case .memslotsChangedOutsideTDPMMU(let expected, let generation):
            "the memslots changed without the TDP MMU (generation \(generation), expected \(expected)); change them through it"
        case .memslot(let error): "\(error)"
        case .noSuchMemslot(let id): "there is no memslot \(id)"
        case .gfnNotInMemslot(let gfn): "gfn \(hex(gfn)) is in no memslot"
        case .subPageProtection(let error): "\(error)"
        case .invalidLevel(let level, let why): "level \(level): \(why)"
        case .countOutOfRange(let gfn, let why): "gfn \(hex(gfn)): \(why)"
        case .invalidDirtyLogRange(let slot, let first, let pages):
            "memslot \(slot): pages \(first)+\(pages) are not a valid dirty-log range (64-page aligned, inside the slot)"
        }
    }
}

/// A TDP root (the root `kvm_mmu_page` of the TDP MMU): shared by every vCPU with the same role,
/// referenced by each of them and by the MMU itself until it is invalidated.
public final class TDPRoot: @unchecked Sendable, CustomStringConvertible {
    /// The role the root was created with (valid).
    public let role: PageRole
    /// The host frame of the root table (what the EPTP or nCR3 points at).
    public let frame: HostFrameNumber
    let table: SPTEPointer
    let references: Atomic<Int>
    let invalid = Atomic<Bool>(false)
    /// `tdp_mmu_scheduled_root_to_zap`; under `tdp_mmu_pages_lock`.
    @exclusivity(unchecked) var scheduledToZap = false
    let owner: ObjectIdentifier

    init(role: PageRole, frame: HostFrameNumber, table: SPTEPointer, owner: ObjectIdentifier) {
        self.role = role
        self.frame = frame
        self.table = table
        self.owner = owner
        // One reference for the vCPU that asked, one the MMU keeps until it invalidates the root.
        references = Atomic(2)
    }

    /// `role.invalid`: the root was invalidated (memslot deletion, zap-all); vCPUs must drop it.
    public var isInvalid: Bool { invalid.load(ordering: .acquiring) }
    /// The role with its `invalid` bit as it is now.
    public var currentRole: PageRole {
        var current = role
        current.isInvalid = isInvalid
        return current
    }
    /// `tdp_mmu_root_count`.
    public var referenceCount: Int { references.load(ordering: .relaxed) }
    public var level: Int { role.level }

    public var description: String {
        "tdp root \(frame) \(currentRole) refs \(referenceCount)"
    }
}

/// One leaf (or MMIO, or non-present) SPTE found by `TDPMMU.mapping(of:in:)`.
public struct TDPMapping: Equatable, Sendable {
    /// The SPTE where the walk for the gfn stopped.
    public var spte: SPTE
    /// Its level (a huge leaf's level, or where a non-present entry was found).
    public var level: Int
    /// The lowest gfn the SPTE maps.
    public var gfn: UInt64
}

/// The VM-wide counters the TDP MMU keeps, atomically (faults update them concurrently); the
/// per-vCPU fault counters are in `VCPUFaultStats`.
final class TDPCounters: Sendable {
    let pages4K = Atomic<Int64>(0)
    let pages2M = Atomic<Int64>(0)
    let pages1G = Atomic<Int64>(0)
    let nxLpageSplits = Atomic<Int64>(0)
    let pageTables = Atomic<Int64>(0)
    /// Frames holding TDP tables, roots and tables waiting to be freed included (for the auditor).
    let liveTables = Atomic<Int64>(0)
    let remoteTLBFlush = Atomic<UInt64>(0)
    let remoteTLBFlushRequests = Atomic<UInt64>(0)
    /// Compare-and-exchanges that lost a race (not a KVM counter: how much the threads contended).
    let lostRaces = Atomic<UInt64>(0)

    @inline(__always)
    func updatePages(level: Int, delta: Int64) {
        switch level {
        case 1: pages4K.add(delta, ordering: .relaxed)
        case 2: pages2M.add(delta, ordering: .relaxed)
        case 3: pages1G.add(delta, ordering: .relaxed)
        default: preconditionFailure("KVM maps pages only at levels 1-3")
        }
    }
}

/// KVM's TDP MMU for one VM. See the top of this file for the API, locking and freeing rules.
public final class TDPMMU: @unchecked Sendable {
    public let memory: MemslotSet
    public let pool: HostPagePool
    /// Fixed but for the dirty-log protection, which `setDirtyLogProtection` changes while no
    /// memslot logs dirty pages (KVM_ENABLE_CAP of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    @exclusivity(unchecked) public private(set) var configuration: TDPMMUConfiguration
    public let masks: SPTEMasks
    /// KVM's mmu_lock, shared with whatever else changes this VM's MMU state.
    public let lock: MMULock
    public let events: MMUEventLog
    /// `kvm_flush_remote_tlbs`: every vCPU must flush its TLB (guest-physical translations of the TDP
    /// tables) before it runs the guest again. Called with the lock held; counted here
    /// (`remote_tlb_flush`, `remote_tlb_flush_requests`). Set before vCPUs run.
    @exclusivity(unchecked) public var flushRemoteTLBs: @Sendable () -> Void = {}
    /// The gfns vCPUs logged in their PML buffers and have not yet drained into the dirty bitmap
    /// (at their next exit); the auditor counts them as marked. Called with the lock held.
    @exclusivity(unchecked) public var pmlBufferedGFNs: @Sendable () -> Set<UInt64> = { [] }
    /// With dirty rings: the gfns pushed onto the vCPUs' rings and not yet reset, which the
    /// auditor counts as logged. Called with the lock held.
    @exclusivity(unchecked) public var dirtyRingGFNs: @Sendable () -> Set<UInt64> = { [] }
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS to every vCPU: roots were invalidated. Set before vCPUs run.
    @exclusivity(unchecked) public var freeObsoleteRoots: @Sendable () -> Void = {}
    /// The shadow MMU whose rmaps KVM's dirty log and memslot flag changes walk next to the TDP
    /// MMU's tables once it has pages (`kvm_memslots_have_rmaps`: under TDP, L2's `guest_mmu`
    /// pages). Its operations run under this MMU's lock held for write. Set before vCPUs run.
    public var shadowRmaps: ShadowMMU? {
        get { unmanagedShadowRmaps?.takeUnretainedValue() }
        set { unmanagedShadowRmaps = newValue.map { Unmanaged.passUnretained($0) } }
    }
    /// `shadowRmaps` unretained, for the fault path's look at it (no retain and release per fault).
    @exclusivity(unchecked) var unmanagedShadowRmaps: Unmanaged<ShadowMMU>?
    /// Sub-page write protection, once enabled (`enableSubPageProtection`, TDPMMU+SPP.swift).
    @exclusivity(unchecked) public internal(set) var subPageProtection: SubPageProtection?

    /// A test seam (spec 15: keep the atomic-update failure paths injectable): called with the slot
    /// and its level just before every compare-and-exchange of the read-locked paths, so a test can
    /// change the SPTE as another thread or the processor would in that window. Set it only while no
    /// operation runs.
    @exclusivity(unchecked) var beforeAtomicUpdate: ((SPTESlot, Int) -> Void)?

    let records: TDPPageRecords
    let counters = TDPCounters()
    /// Every vCPU's `vcpu->stat` fault counters.
    let vcpuStats = VCPUFaultStats()
    /// `tdp_mmu_pages_lock`: the root list, the NX huge-page list, the queue of tables to free.
    let pagesLock = LockedValue(PagesState())
    /// Tables waiting to be freed (read without the mutex, to skip an empty queue cheaply).
    let pendingFrees = Atomic<Int>(0)
    /// KVM's WARN_ON_ONCEs that fired, reported by the auditor.
    let warnings = LockedValue<[String]>([])

    /// The memslots with their huge-page metadata, by base gfn. Changed with the lock held for write.
    @exclusivity(unchecked) var slotIndex: [MemslotMetadata] = []
    /// The memslots generation the metadata describes.
    @exclusivity(unchecked) var knownGeneration: UInt64
    /// The role every table of a root shares, but for the level.
    let rootLevel: Int
    /// gfns a root maps: 2^(9 * rootLevel).
    let rootSpan: UInt64
    /// `kvm_mmu_max_gfn`: MMIO SPTEs hold the gfn below the host's MAXPHYADDR.
    let maxGFN: UInt64

    struct PagesState {
        var roots: [TDPRoot] = []
        /// `possible_nx_huge_pages`, oldest first, linked through the page records (frame numbers).
        var nxHead: UInt64 = 0
        var nxTail: UInt64 = 0
        /// Tables unlinked and waiting for no reader to hold the lock, linked through the records.
        var pendingFreeHead: UInt64 = 0
    }

    /// A TDP MMU over `memory`, adopting its memslots (each with the host mapping `hostMapping`
    /// gives it, `.oneGiB` by default: the largest page the slot's contiguous host frames allow).
    public init(memory: MemslotSet, configuration: TDPMMUConfiguration, lock: MMULock = MMULock(),
                events: MMUEventLog = MMUEventLog(), hostMapping: [Int: HostMappingSize] = [:]) throws(TDPMMUError) {
        try configuration.validate()
        self.memory = memory
        pool = memory.pool
        self.configuration = configuration
        masks = configuration.masks
        self.lock = lock
        self.events = events
        records = TDPPageRecords(pool: memory.pool)
        rootLevel = configuration.rootLevel
        rootSpan = UInt64(1) << UInt64(9 * configuration.rootLevel)
        maxGFN = (UInt64(1) << UInt64(configuration.masks.hostPhysicalAddressBits - pageShift)) - 1
        knownGeneration = memory.generation
        slotIndex = memory.slots.map { MemslotMetadata(slot: $0, hostMapping: hostMapping[$0.id] ?? .oneGiB) }
    }

    deinit {
        // No vCPU can hold a root any more: tear every table down and give the frames back.
        let roots = pagesLock.withLock { $0.roots }
        for root in roots {
            zapRoot(root, shared: false)
            try? pool.freePage(root.frame)
        }
        reclaimDeferredPages()
        records.release()
    }

    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 turned on or off: refused while a memslot logs dirty
    /// pages. Takes the lock for write.
    public func setDirtyLogProtection(_ protection: TDPMMUConfiguration.DirtyLogProtection) throws(TDPMMUError) {
        try withExclusiveLock { () throws(TDPMMUError) in
            if let logging = memory.slots.first(where: \.logsDirtyPages) {
                throw .invalidConfiguration("the dirty-log protection cannot change while memslot \(logging.id) logs dirty pages")
            }
            configuration.dirtyLogProtection = protection
        }
    }

    // MARK: Statistics

    /// KVM's counters for this MMU: `pages_4k/2m/1g`, `nx_lpage_splits`, the `pf_*` faults it
    /// handled and the remote TLB flushes it asked for. Exact whenever no operation is running.
    public var stats: MMUStats {
        var stats = MMUStats()
        stats.pages4K = UInt64(max(0, counters.pages4K.load(ordering: .relaxed)))
        stats.pages2M = UInt64(max(0, counters.pages2M.load(ordering: .relaxed)))
        stats.pages1G = UInt64(max(0, counters.pages1G.load(ordering: .relaxed)))
        stats.nxLpageSplits = UInt64(max(0, counters.nxLpageSplits.load(ordering: .relaxed)))
        vcpuStats.addTotals(to: &stats)
        stats.remoteTLBFlush = counters.remoteTLBFlush.load(ordering: .relaxed)
        stats.remoteTLBFlushRequests = counters.remoteTLBFlushRequests.load(ordering: .relaxed)
        return stats
    }

    /// SPTE updates that lost a race to another thread and had to look again (not a KVM counter).
    public var lostRaces: UInt64 { counters.lostRaces.load(ordering: .relaxed) }

    /// `tdp_mmu_pages`: page tables linked below roots (roots not counted).
    public var pageTableCount: Int { Int(counters.pageTables.load(ordering: .relaxed)) }

    /// Every root, valid or not, still referenced.
    public var roots: [TDPRoot] { pagesLock.withLock { $0.roots } }

    // MARK: Locking

    /// Runs `body` under the lock held for read, then frees queued tables if no one holds the lock.
    func withSharedLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        lock.lockShared()
        let result: Result
        do {
            result = try body()
        } catch {
            lock.unlockShared()
            reclaimIfUnlocked()
            throw error
        }
        lock.unlockShared()
        reclaimIfUnlocked()
        return result
    }

    /// Runs `body` under the lock held for write, after freeing the tables no reader can reach.
    func withExclusiveLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        lock.lockExclusive()
        defer { lock.unlockExclusive() }
        reclaimDeferredPages()
        return try body()
    }

    private func reclaimIfUnlocked() {
        guard pendingFrees.load(ordering: .relaxed) > 0, lock.tryLockExclusive() else { return }
        reclaimDeferredPages()
        lock.unlockExclusive()
    }

    /// Frees every queued table. The caller holds the lock for write (or is the last owner), so no
    /// walk can be inside any of them.
    func reclaimDeferredPages() {
        var frame = pagesLock.withLock { state -> UInt64 in
            let head = state.pendingFreeHead
            state.pendingFreeHead = 0
            return head
        }
        while frame != 0, let page = records.page(HostFrameNumber(frame)) {
            let next = page.freeNext
            page.clear()
            do { try pool.freePage(page.frame) } catch { preconditionFailure("TDP page table \(page.frame) was not allocated: \(error)") }
            pendingFrees.subtract(1, ordering: .relaxed)
            counters.liveTables.subtract(1, ordering: .relaxed)
            frame = next
        }
    }

    /// Queues an unlinked table (or a dead root's, taken off the root list at the same time) to be
    /// freed when no reader can be in it.
    func deferFree(_ page: TDPPage, unlisting root: TDPRoot? = nil) {
        page.setFlags(TDPPage.removedFlag)
        pagesLock.withLock { state in
            if let root { state.roots.removeAll { $0 === root } }
            page.freeNext = state.pendingFreeHead
            state.pendingFreeHead = page.frame.rawValue
        }
        pendingFrees.add(1, ordering: .relaxed)
    }

    // MARK: Page tables

    /// A zeroed table for `role` at `gfn`, linked from `parent` once published
    /// (`tdp_mmu_alloc_sp` + `tdp_mmu_init_sp`).
    func allocatePageTable(role: PageRole, gfn: UInt64, parent: SPTEPointer?,
                           nxHugePageDisallowed: Bool) throws(TDPMMUError) -> TDPPage {
        let frame: HostFrameNumber
        do { frame = try pool.allocatePage() } catch { throw .outOfHostMemory("\(error)") }
        let page = records.page(frame)!
        let table = table(of: frame)
        // The pool hands out zeroed frames: already a table of non-present SPTEs when that is 0.
        if SPTE.nonPresent.rawValue != 0 {
            for index in 0..<KVMLevel.entriesPerPage { SPTESlot(table + index).store(.nonPresent) }
        }
        page.initialize(role: role, gfn: gfn, parent: parent, nxHugePageDisallowed: nxHugePageDisallowed)
        counters.liveTables.add(1, ordering: .relaxed)
        events.record(.kvmMMUGetPage(gfn: GuestFrameNumber(gfn), role: role, created: true))
        return page
    }

    /// Frees a table that was never linked (a lost race): no one else can have seen it.
    func freeUnpublishedPageTable(_ page: TDPPage) {
        page.clear()
        do { try pool.freePage(page.frame) } catch { preconditionFailure("TDP page table \(page.frame) was not allocated: \(error)") }
        counters.liveTables.subtract(1, ordering: .relaxed)
    }

    @inline(__always)
    func table(of frame: HostFrameNumber) -> SPTEPointer {
        pool.pointer(frame).assumingMemoryBound(to: UInt64.self)
    }

    /// The role of tables at `level` under `root`.
    @inline(__always)
    func role(_ root: PageRole, level: Int) -> PageRole {
        var role = root
        role.level = level
        role.isInvalid = false
        return role
    }

    // MARK: TLB flushes and warnings

    /// `kvm_flush_remote_tlbs` (and `_gfn`, `_range`, `_memslot`: the model flushes everything).
    func requestRemoteTLBFlush() {
        counters.remoteTLBFlushRequests.add(1, ordering: .relaxed)
        counters.remoteTLBFlush.add(1, ordering: .relaxed)
        flushRemoteTLBs()
    }

    /// A KVM WARN_ON_ONCE: recorded for the auditor (at most 64 kept).
    func warn(_ message: @autoclosure () -> String) {
        let text = message()
        warnings.withLock { if $0.count < 64 { $0.append(text) } }
    }

    // MARK: Memslots

    /// The slot holding `gfn` with its metadata (a binary search, no allocation).
    @inline(__always)
    func slotMetadata(containing gfn: UInt64) -> MemslotMetadata? {
        lentSlotMetadata(containing: gfn)?.takeUnretainedValue()
    }

    /// `slotMetadata(containing:)` lent rather than retained, for a fault (whose locks keep the
    /// records from being replaced).
    @inline(__always)
    func lentSlotMetadata(containing gfn: UInt64) -> Unmanaged<MemslotMetadata>? {
        slotIndex.withUnsafeBufferPointer { slots in
            var low = 0, high = slots.count
            while low < high {
                let middle = (low + high) / 2
                if slots[middle].slot.endFrame.rawValue <= gfn { low = middle + 1 } else { high = middle }
            }
            guard low < slots.count, slots[low].slot.contains(GuestFrameNumber(gfn)) else { return nil }
            return .passUnretained(slots[low])
        }
    }

    func slotMetadata(id: Int) -> MemslotMetadata? { slotIndex.first { $0.slot.id == id } }

    /// Throws when someone changed the memslots behind the MMU's back. Lock held.
    func checkMemslotsUnchanged() throws(TDPMMUError) {
        let generation = memory.uncheckedGeneration
        guard generation == knownGeneration else {
            throw .memslotsChangedOutsideTDPMMU(expectedGeneration: knownGeneration, generation: generation)
        }
    }

    // MARK: Roots

    /// `kvm_calc_tdp_mmu_root_page_role` for this MMU (SMM is not modelled).
    public func rootRole(guestMode: Bool = false) -> PageRole {
        var cpu = CPURole()
        cpu.base.guestMode = guestMode
        return tdpRootRole(for: cpu, tdpLevel: rootLevel, accessedDirtyEnabled: masks.accessedDirtyEnabled)
    }

    /// `kvm_tdp_mmu_alloc_root` for the root role with `guestMode`: the existing valid root of that
    /// role with one more reference, or a new root.
    public func allocateRoot(guestMode: Bool = false) throws(TDPMMUError) -> TDPRoot {
        try allocateRoot(role: rootRole(guestMode: guestMode))
    }

    /// `kvm_tdp_mmu_alloc_root` for `role`, which must be a TDP root role of this MMU.
    public func allocateRoot(role: PageRole) throws(TDPMMUError) -> TDPRoot {
        if role.smm { throw .smmAddressSpaceNotModelled }
        var expected = rootRole(guestMode: role.guestMode)
        expected.isInvalid = false
        guard role == expected else {
            throw .invalidRootRole(role, "expected \(expected): direct, ACC_ALL, level \(rootLevel), cr0_wp and efer_nx set")
        }
        return try withSharedLock { () throws(TDPMMUError) -> TDPRoot in
            try pagesLock.withLock { (state: inout PagesState) throws(TDPMMUError) -> TDPRoot in
                for root in state.roots where !root.isInvalid && root.role == role {
                    // A valid root always holds the MMU's reference, so this cannot revive a dead one.
                    root.references.add(1, ordering: .relaxed)
                    return root
                }
                let frame: HostFrameNumber
                do { frame = try pool.allocatePage() } catch { throw .outOfHostMemory("\(error)") }
                records.page(frame)!.initialize(role: role, gfn: 0, parent: nil, nxHugePageDisallowed: false)
                counters.liveTables.add(1, ordering: .relaxed)
                let root = TDPRoot(role: role, frame: frame, table: table(of: frame), owner: ObjectIdentifier(self))
                state.roots.append(root)
                events.record(.kvmMMUGetPage(gfn: GuestFrameNumber(0), role: role, created: true))
                return root
            }
        }
    }

    /// `kvm_tdp_mmu_put_root`: drops one reference; the last one (only possible once the root is
    /// invalid and zapped) frees it.
    public func putRoot(_ root: TDPRoot) throws(TDPMMUError) {
        guard root.owner == ObjectIdentifier(self) else { throw .foreignRoot }
        let left = root.references.subtract(1, ordering: .acquiringAndReleasing).newValue
        if left > 0 { return }
        // The MMU keeps its reference until it invalidates the root: reaching 0 on a valid root, or
        // going below 0, is a put without a matching get.
        guard left == 0 && root.isInvalid else {
            root.references.add(1, ordering: .relaxed)
            throw .rootOverReleased(root.role)
        }
        // Off the list and onto the free queue in one step, so that an auditor never sees the
        // root's table in neither place.
        deferFree(records.page(root.frame)!, unlisting: root)
    }

    /// `kvm_tdp_mmu_get_root` (`refcount_inc_not_zero`): a reference to `root`, unless its last
    /// one is gone (it is being freed).
    func tryGetRoot(_ root: TDPRoot) -> Bool {
        var count = root.references.load(ordering: .relaxed)
        while count > 0 {
            let (exchanged, original) = root.references.compareExchange(expected: count, desired: count + 1,
                                                                       ordering: .acquiringAndReleasing)
            if exchanged { return true }
            count = original
        }
        return false
    }

    /// The roots an operation visits, valid ones only or all (KVM's root iterators skip roots whose
    /// last reference is gone).
    func rootsToVisit(validOnly: Bool) -> [TDPRoot] {
        pagesLock.withLock { state in
            state.roots.filter { $0.references.load(ordering: .relaxed) > 0 && (!validOnly || !$0.isInvalid) }
        }
    }

    // MARK: NX huge pages

    /// `track_possible_nx_huge_page`, if the table still wants it (a racing unlink clears the flag
    /// first, under the same lock).
    func trackPossibleNXHugePage(_ page: TDPPage) {
        pagesLock.withLock { state in
            guard page.nxHugePageDisallowed, !page.isPossibleNXHugePage else { return }
            page.setFlags(TDPPage.possibleNXHugePageFlag)
            page.nxPrevious = state.nxTail
            page.nxNext = 0
            if state.nxTail != 0 { records.page(HostFrameNumber(state.nxTail))!.nxNext = page.frame.rawValue }
            state.nxTail = page.frame.rawValue
            if state.nxHead == 0 { state.nxHead = page.frame.rawValue }
            counters.nxLpageSplits.add(1, ordering: .relaxed)
        }
    }

    /// `unaccount_nx_huge_page` / the NX half of `tdp_mmu_unlink_sp`: clears the flag and takes the
    /// page off the list. `pagesLock` must not be held.
    func unaccountNXHugePage(_ page: TDPPage) {
        pagesLock.withLock { state in untrackNXHugePage(page, &state) }
    }

    private func untrackNXHugePage(_ page: TDPPage, _ state: inout PagesState) {
        page.clearFlags(TDPPage.nxHugePageDisallowedFlag)
        guard page.isPossibleNXHugePage else { return }
        let previous = page.nxPrevious, next = page.nxNext
        if previous != 0 { records.page(HostFrameNumber(previous))!.nxNext = next } else { state.nxHead = next }
        if next != 0 { records.page(HostFrameNumber(next))!.nxPrevious = previous } else { state.nxTail = previous }
        page.nxPrevious = 0
        page.nxNext = 0
        page.clearFlags(TDPPage.possibleNXHugePageFlag)
        counters.nxLpageSplits.subtract(1, ordering: .relaxed)
    }

    /// The pages on `possible_nx_huge_pages`, oldest first.
    func possibleNXHugePages() -> [TDPPage] {
        pagesLock.withLock { state in
            var pages: [TDPPage] = []
            var frame = state.nxHead
            while frame != 0, let page = records.page(HostFrameNumber(frame)) {
                pages.append(page)
                frame = page.nxNext
            }
            return pages
        }
    }
}
