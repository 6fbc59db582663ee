import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where an SPTE lives: a pointer into a shadow page's table, KVM's `u64 *sptep`. Its shadow page
/// is found from the host frame it points into, as KVM finds it through `page_private`.
public typealias SPTEPointer = UnsafeMutablePointer<UInt64>

/// KVM's `struct kvm_mmu_page`: one shadow page table, keyed by (gfn, role).
public final class ShadowPage {
    /// The guest table it shadows (indirect), or the first gfn of the range it maps (direct).
    public let gfn: GuestFrameNumber
    @exclusivity(unchecked) public internal(set) var role: PageRole
    /// The host frame holding the 512 SPTEs.
    public let frame: HostFrameNumber
    public let sptes: UnsafeMutablePointer<UInt64>
    /// For pages backed by guest PTEs: per SPTE, `gfn << 12 | ACC` of the guest translation it
    /// shadows (KVM's `shadowed_translation`).
    let shadowedTranslations: UnsafeMutablePointer<UInt64>?
    /// Every SPTE that points at this page (KVM's `parent_ptes` rmap).
    @exclusivity(unchecked) var parentPTEs: [SPTEPointer] = []
    @exclusivity(unchecked) public internal(set) var rootCount = 0
    /// The guest table may be written without KVM seeing it: its SPTEs are synced from the guest
    /// entries when the guest invalidates its TLB (level-1 pages only).
    @exclusivity(unchecked) public internal(set) var unsync = false
    /// How many bits of `unsyncChildBitmap` are set (KVM's `unsync_children`).
    @exclusivity(unchecked) public internal(set) var unsyncChildren = 0
    /// For pages above level 1: bit i set when the child under SPTE i is unsync or has unsync
    /// children (KVM's `unsync_child_bitmap`; bits of children since unlinked are cleared lazily).
    let unsyncChildBitmap: UnsafeMutablePointer<UInt64>?
    /// The page was freed (a zap that freed it may come while a batch of zaps still lists it).
    @exclusivity(unchecked) var isFreed = false
    /// Emulated writes to the shadowed table since the page was last used by a walk.
    @exclusivity(unchecked) public internal(set) var writeFloodingCount = 0
    /// KVM's `nx_huge_page_disallowed`: a direct page made because the NX huge-page mitigation
    /// refused an executable huge leaf here; a later fault must not map a huge leaf over it
    /// (`disallowed_hugepage_adjust`), or the split would be undone by the next read.
    @exclusivity(unchecked) public internal(set) var nxHugePageDisallowed = false
    /// The page's neighbours on the shadow MMU's `possible_nx_huge_pages` list (oldest first),
    /// while it is on it. Unowned: the hash owns every page, and a zap takes a page off the list
    /// before it is freed (strong links would also keep the pages of a dropped MMU alive).
    @exclusivity(unchecked) unowned(unsafe) var olderPossibleNXHugePage: ShadowPage?
    @exclusivity(unchecked) unowned(unsafe) var newerPossibleNXHugePage: ShadowPage?
    @exclusivity(unchecked) public internal(set) var isPossibleNXHugePage = false
    public let validGeneration: UInt8
    /// Sequence number of creation, standing in for the position on `active_mmu_pages`.
    let serial: UInt64
    /// KVM's `is_passthrough_sp`, answered once by the MMU's variant when the page was made (the
    /// seed-1 variants say it with a role field instead of the `passthrough` bit).
    public let isPassthrough: Bool
    /// Seed 2's per-vCPU root page (the `local-roots` variant): a page standing where KVM has its
    /// special roots (`pae_root`, `pml4_root`, `pml5_root`), owned by one vCPU's context, never in
    /// the hash nor in `prev_roots`, made at each root load and freed with the root.
    public let isPerVCPURoot: Bool
    /// KVM's `sp_has_gptes`: the page shadows a guest table (neither direct, passthrough nor a
    /// per-vCPU root, whose entries come from CR3 or the PDPTE registers).
    public let hasGPTEs: Bool

    init(gfn: GuestFrameNumber, role: PageRole, frame: HostFrameNumber, sptes: UnsafeMutablePointer<UInt64>,
         validGeneration: UInt8, serial: UInt64, isPassthrough: Bool, isPerVCPURoot: Bool = false) {
        self.gfn = gfn
        self.role = role
        self.frame = frame
        self.sptes = sptes
        self.validGeneration = validGeneration
        self.serial = serial
        self.isPassthrough = isPassthrough
        self.isPerVCPURoot = isPerVCPURoot
        hasGPTEs = !role.isDirect && !isPassthrough && !isPerVCPURoot
        if hasGPTEs {
            let translations = UnsafeMutablePointer<UInt64>.allocate(capacity: 512)
            translations.initialize(repeating: 0, count: 512)
            shadowedTranslations = translations
        } else {
            shadowedTranslations = nil
        }
        if role.level > 1 {
            let bitmap = UnsafeMutablePointer<UInt64>.allocate(capacity: Self.bitmapWords)
            bitmap.initialize(repeating: 0, count: Self.bitmapWords)
            unsyncChildBitmap = bitmap
        } else {
            unsyncChildBitmap = nil
        }
    }

    deinit {
        shadowedTranslations?.deallocate()
        unsyncChildBitmap?.deallocate()
    }

    static let bitmapWords = 512 / 64

    /// Whether the bit for the child under SPTE `index` is set.
    func hasUnsyncChild(at index: Int) -> Bool {
        guard let unsyncChildBitmap else { return false }
        return unsyncChildBitmap[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    /// Sets the bit for SPTE `index`; false when it was set already.
    func setUnsyncChild(at index: Int) -> Bool {
        guard let unsyncChildBitmap, !hasUnsyncChild(at: index) else { return false }
        unsyncChildBitmap[index >> 6] |= 1 << UInt64(index & 63)
        unsyncChildren += 1
        return true
    }

    /// Clears the bit for SPTE `index` (KVM's `clear_unsync_child_bit`).
    func clearUnsyncChild(at index: Int) {
        guard let unsyncChildBitmap, hasUnsyncChild(at: index) else { return }
        unsyncChildBitmap[index >> 6] &= ~(1 << UInt64(index & 63))
        unsyncChildren -= 1
    }

    /// The indexes whose unsync-child bit is set, in order, without allocating. Each word of the
    /// bitmap is read when the iteration reaches it: a loop may clear the bit it is visiting.
    var unsyncChildIndexes: UnsyncChildIndexes { UnsyncChildIndexes(page: self) }

    struct UnsyncChildIndexes: Sequence, IteratorProtocol {
        let page: ShadowPage
        private var word = -1
        /// The bits of `word` not visited yet.
        private var bits: UInt64 = 0

        init(page: ShadowPage) { self.page = page }

        mutating func next() -> Int? {
            guard let bitmap = page.unsyncChildBitmap else { return nil }
            while bits == 0 {
                word += 1
                guard word < ShadowPage.bitmapWords else { return nil }
                bits = bitmap[word]
            }
            let index = word * 64 + bits.trailingZeroBitCount
            bits &= bits - 1
            return index
        }
    }

    /// KVM's `is_unsync_root`.
    public var isUnsyncRoot: Bool { unsync || unsyncChildren > 0 }

    @inlinable public var level: Int { role.level }

    /// The gfn the SPTE at `index` maps (KVM's `kvm_mmu_page_get_gfn`).
    public func mappedGFN(at index: Int) -> GuestFrameNumber {
        if isPassthrough { return gfn }
        if let shadowedTranslations { return GuestFrameNumber(shadowedTranslations[index] >> 12) }
        return GuestFrameNumber(gfn.rawValue + UInt64(index) << UInt64((level - 1) * 9))
    }

    /// The guest access the SPTE at `index` was made for (KVM's `kvm_mmu_page_get_access`).
    public func mappedAccess(at index: Int) -> UInt8 {
        if let shadowedTranslations { return UInt8(shadowedTranslations[index] & 7) }
        return role.access
    }

    func setTranslation(at index: Int, gfn: GuestFrameNumber, access: UInt8) {
        shadowedTranslations?[index] = gfn.rawValue << 12 | UInt64(access)
    }

    /// The guest-physical address of the first guest PTE a level-1 page shadows: a 4-byte guest
    /// table is shadowed by two pages, each covering half of it (the quadrant).
    public var firstGuestEntryAddress: GuestPhysicalAddress {
        GuestPhysicalAddress(gfn.rawValue << 12 + UInt64(role.quadrant) << (9 + 2))
    }

    /// The size of the guest entries this page shadows.
    public var guestEntrySize: Int { role.hasFourByteGPTE ? 4 : 8 }

    /// The SPTE pointer for `index`.
    @inlinable public func spte(_ index: Int) -> SPTEPointer { sptes + index }

    /// The index of `pointer` in this page.
    func index(of pointer: SPTEPointer) -> Int { pointer - sptes }
}

extension ShadowPage: CustomStringConvertible {
    /// As KVM's tracepoints print a shadow page.
    public var description: String {
        "sp gen \(validGeneration) gfn \(String(gfn.rawValue, radix: 16)) \(role) root \(rootCount)\(unsync ? " unsync" : " sync")\(isPerVCPURoot ? " per-vcpu" : "")"
    }
}
