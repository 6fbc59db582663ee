// Fixtures for the shadow-MMU benchmarks: a VirtualMachine whose guest kernel (the Workloads
// `GuestKernel`, so tables live where the scenario runner puts them) maps user pages with 4-level
// paging, and a vCPU running on them. Everything here uses the root package's public API only, and
// measures the VM as it is: no lockstep reference machine, no auditor.
//
// The fault fixtures are single-use: each target page faults once. The callers build a fresh
// fixture per batch outside the timed region and time only the accesses.

import GuestMemory
import KVMMMU
import VirtualMachine
import Workloads
import X86Paging

/// Guest PTE bits.
public enum GuestBits {
    public static let present: UInt64 = 0x1
    public static let writable: UInt64 = 0x2
    public static let user: UInt64 = 0x4
    public static let accessed: UInt64 = 0x20
    public static let dirty: UInt64 = 0x40
    /// A plain user data page that has been used: P|RW|US|A|D.
    public static let userLeaf: UInt64 = present | writable | user | accessed | dirty
    /// Upper-level entries: P|RW|US|A (A already set, so warm-up walks do not write them).
    public static let userTable: UInt64 = present | writable | user | accessed
}

/// 4-level paging, CR0.WP=1, EFER.NXE=1, no SMEP/SMAP/PKE: the scenario language's defaults.
public func longModeRegisters(cr3: UInt64) -> PagingRegisters {
    PagingRegisters(cr0: [.protectionEnable, .paging, .writeProtect], cr3: cr3, cr4: [.physicalAddressExtension],
                    efer: [.longModeEnable, .longModeActive, .noExecuteEnable])
}

/// Guest-physical memory for data pages starts above the guest kernel's table pool.
let dataBase: UInt64 = GuestKernel.tablePoolEnd  // 16 MiB

/// A VM with a guest kernel and one vCPU in 4-level paging.
public final class ShadowGuest {
    public let vm: VirtualMachine
    public let kernel: GuestKernel
    public let vcpu: VCPU

    /// - Parameters:
    ///   - dataBytes: guest RAM above the 16 MiB table pool.
    ///   - mmu: the shadow MMU (default) or the TDP MMU.
    public init(dataBytes: UInt64, mmu: VirtualMachineMMU = .shadow, map: (GuestKernel) throws -> Void) {
        // A shadow-page cache large enough that no fixture recycles pages (KVM_SET_NR_MMU_PAGES):
        // the cold-fault fixtures create thousands of shadow pages, which KVM's default limit for
        // this little memory would recycle.
        vm = try! VirtualMachine(memorySize: dataBase + dataBytes, shadowPageLimit: 1 << 14, mmu: mmu)
        kernel = try! GuestKernel(vm: vm, mode: .fourLevel)
        try! map(kernel)
        vcpu = try! vm.addVCPU(registers: longModeRegisters(cr3: kernel.root.rawValue))
    }

    /// Maps `gva` -> `gpa` as a 4 KiB leaf with `flags`, upper levels P|RW|US|A.
    static func map4K(_ kernel: GuestKernel, _ gva: UInt64, _ gpa: UInt64, flags: UInt64) throws {
        try kernel.map(GuestVirtualAddress(gva), to: GuestPhysicalAddress(gpa), leafLevel: 1, leafFlags: flags,
                       tableFlags: { _ in GuestBits.userTable })
    }

    /// Stores a value at each address (so reads return something): the host backs every data
    /// page and the line the target touches is written, so the timed accesses never take a host
    /// page fault on guest RAM. (The first touch still costs a host TLB miss, as on a real guest.)
    func populate(_ gpas: [UInt64]) {
        for gpa in gpas { try! vm.memory.store64(gpa ^ 0x5A5A_5A5A, at: GuestPhysicalAddress(gpa)) }
    }

    /// Backs the next `count` free frames of the host page pool (the ones the MMU will hand out
    /// for new shadow pages, lowest first) by writing a zero into each, so that creating a shadow
    /// page does not include the host kernel's page fault on the anonymous mapping. KVM likewise
    /// takes shadow pages from a pre-filled memory cache.
    func prefaultShadowFrames(_ count: Int) {
        let pool = vm.pool
        var frame = pool.firstFrame.rawValue
        var touched = 0
        while touched < count && frame <= pool.lastFrame.rawValue {
            let host = HostFrameNumber(frame)
            if !pool.isAllocated(host) {
                pool.pointer(host).storeBytes(of: 0, as: UInt64.self)
                touched += 1
            }
            frame += 1
        }
    }

    /// One access that must complete; returns its outcome.
    @discardableResult
    func mustComplete(_ gva: UInt64, _ access: Access = .read(.user)) -> AccessOutcome {
        let outcome = try! vcpu.access(GuestVirtualAddress(gva), access, size: 8)
        guard case .completed = outcome.result else { fatalError("\(hex(gva)): \(outcome)") }
        return outcome
    }
}

func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }

/// `items` in a fixed pseudo-random order (xorshift-driven Fisher-Yates, no Foundation).
func shuffled<T>(_ items: [T], seed: UInt64 = 0x9E37_79B9_7F4A_7C15) -> [T] {
    var state = seed
    var result = items
    for index in stride(from: result.count - 1, to: 0, by: -1) {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        result.swapAt(index, Int(state % UInt64(index + 1)))
    }
    return result
}

// MARK: Fault fixtures

/// Which shadow fault a fixture's targets take. Every target takes exactly one #PF exit.
public enum FaultKind: String, CaseIterable, Sendable {
    /// The guest PT is already shadowed: the fault installs one SPTE. Only every 8th PTE has A set,
    /// so prefetch stops at the first neighbour (it reads one guest PTE and maps nothing).
    /// 64 MiB of 4 KiB pages (16,384 PTEs in 32 PTs); 63 targets per PT.
    case warm
    /// As `warm`, but every PTE has A set: the fault installs its SPTE and prefetch maps the 7
    /// neighbours of the aligned group of 8 (KVM's common case for a fresh, used mapping).
    case warmPrefetch
    /// The guest PD is shadowed, the PT is not: one new level-1 shadow page + one SPTE.
    case coldPT
    /// The guest PDPT is shadowed, the PD and PT are not: two new shadow pages + one SPTE.
    case coldPD

    /// Leaf SPTEs each fault installs (fault + prefetched).
    public var sptesPerFault: Int { self == .warmPrefetch ? 8 : 1 }
    /// Shadow pages each fault creates.
    public var newPagesPerFault: Int {
        switch self {
        case .warm, .warmPrefetch: 0
        case .coldPT: 1
        case .coldPD: 2
        }
    }
}

/// A fresh VM whose targets each take exactly one shadow fault of `kind`. Single-use.
public final class FaultFixture {
    public let kind: FaultKind
    public let guest: ShadowGuest
    /// Target addresses, in access order (a fixed permutation).
    public let targets: [GuestVirtualAddress]
    public let access: Access
    let statsBefore: MMUStats
    let pagesBefore: Int

    /// User region for the warm fixtures: PML4 0, PDPT 1, PD 0..31 (64 MiB).
    static let warmBase: UInt64 = 0x0000_0000_4000_0000
    static let warmPages = 16_384
    /// Cold-PT region: 4 GiB from 16 GiB, one page per 2 MiB (2048 PTs under 4 PDs).
    static let coldPTBase: UInt64 = 0x0000_0004_0000_0000
    static let coldPTRegions = 2048
    /// Cold-PD region: two PML4 slots (1 and 2), one page per 1 GiB (1024 PDs and PTs).
    static let coldPDBase: UInt64 = 0x0000_0080_0000_0000
    static let coldPDRegions = 1024

    /// The number of targets a fixture of `kind` has.
    public static func capacity(_ kind: FaultKind) -> Int {
        switch kind {
        case .warm, .warmPrefetch: (warmPages / 512) * 63
        case .coldPT: coldPTRegions - coldPTRegions / 512
        case .coldPD: coldPDRegions - coldPDRegions / 512
        }
    }

    public init(_ kind: FaultKind, access: Access = .read(.user), prefaultHost: Bool = true) {
        self.kind = kind
        self.access = access
        var warmUps: [UInt64] = []
        var targetList: [UInt64] = []
        var dataPages: [UInt64] = []
        let dataBytes: UInt64
        let guest: ShadowGuest
        switch kind {
        case .warm, .warmPrefetch:
            dataBytes = UInt64(Self.warmPages) << 12
            guest = ShadowGuest(dataBytes: dataBytes) { kernel in
                for page in 0..<Self.warmPages {
                    let accessed = kind == .warmPrefetch || page % 8 == 0
                    let flags = accessed ? GuestBits.userLeaf : GuestBits.userLeaf & ~GuestBits.accessed
                    try ShadowGuest.map4K(kernel, Self.warmBase + UInt64(page) << 12, dataBase + UInt64(page) << 12,
                                          flags: flags)
                }
            }
            for table in 0..<(Self.warmPages / 512) {
                let first = table * 512
                // Index 504 shadows the PT (prefetch stops at 505 or maps 505...511): not a target.
                warmUps.append(Self.warmBase + UInt64(first + 504) << 12)
                for group in 0..<63 {
                    let page = first + group * 8
                    let offset = UInt64(group * 8) & 0xFF8
                    targetList.append(Self.warmBase + UInt64(page) << 12 | offset)
                    dataPages.append(dataBase + UInt64(page) << 12 | offset)
                }
            }
        case .coldPT:
            dataBytes = UInt64(Self.coldPTRegions) << 12
            guest = ShadowGuest(dataBytes: dataBytes) { kernel in
                for region in 0..<Self.coldPTRegions {
                    try ShadowGuest.map4K(kernel, Self.coldPTBase + UInt64(region) << 21, dataBase + UInt64(region) << 12,
                                          flags: GuestBits.userLeaf)
                }
            }
            for region in 0..<Self.coldPTRegions {
                let gva = Self.coldPTBase + UInt64(region) << 21
                // The first region of each GiB shadows its PD.
                if region % 512 == 0 { warmUps.append(gva) } else { targetList.append(gva) }
                dataPages.append(dataBase + UInt64(region) << 12)
            }
        case .coldPD:
            dataBytes = UInt64(Self.coldPDRegions) << 12
            guest = ShadowGuest(dataBytes: dataBytes) { kernel in
                for region in 0..<Self.coldPDRegions {
                    try ShadowGuest.map4K(kernel, Self.coldPDBase + UInt64(region) << 30, dataBase + UInt64(region) << 12,
                                          flags: GuestBits.userLeaf)
                }
            }
            for region in 0..<Self.coldPDRegions {
                let gva = Self.coldPDBase + UInt64(region) << 30
                // The first region of each 512 GiB shadows its PDPT.
                if region % 512 == 0 { warmUps.append(gva) } else { targetList.append(gva) }
                dataPages.append(dataBase + UInt64(region) << 12)
            }
        }
        self.guest = guest
        if prefaultHost {
            guest.populate(dataPages)
            guest.prefaultShadowFrames(targetList.count * kind.newPagesPerFault + 16)
        }
        for gva in warmUps {
            let outcome = guest.mustComplete(gva)
            precondition(outcome.exits == 1, "warm-up \(hex(gva)) took \(outcome.exits) exits")
        }
        targets = shuffled(targetList).map { GuestVirtualAddress($0) }
        precondition(targets.count == Self.capacity(kind))
        statsBefore = guest.vm.mmu.stats
        pagesBefore = guest.vm.mmu.usedPages
    }

    /// The host address each target's access lands on (found with the guest walker over the
    /// memslots, without touching the MMU), for the first-touch baseline.
    public func hostAddresses() -> [UnsafeRawPointer] {
        let walker = guest.vcpu.context.guestWalker
        let memory = guest.vm.memory
        return targets.map { gva in
            guard case .success(let translation) = walker.translate(gva, access, in: memory, setAccessedDirty: false),
                  let page = memory.hostPage(translation.physicalAddress.frame)
            else { fatalError("\(gva) does not translate") }
            return UnsafeRawPointer(page.bytes + Int(translation.physicalAddress.pageOffset))
        }
    }

    /// Checks, after `count` targets ran and took `exits` exits in all, that every access took one
    /// exit and installed exactly what `kind` says: one fixed fault, `sptesPerFault` leaf SPTEs,
    /// `newPagesPerFault` shadow pages. Call outside the timed region.
    public func verify(count: Int, exits: Int) {
        let stats = guest.vm.mmu.stats
        let delta = stats.delta(from: statsBefore)
        let pages = guest.vm.mmu.usedPages - pagesBefore
        // pages_4k is a level, not a cumulative counter: `delta` keeps its later value.
        let sptes = stats.pages4K &- statsBefore.pages4K
        guard exits == count, delta.pfTaken == UInt64(count), delta.pfFixed == UInt64(count),
              sptes == UInt64(count * kind.sptesPerFault), pages == count * kind.newPagesPerFault,
              delta.pfEmulate == 0, delta.pfSpurious == 0, delta.mmuShadowZapped == 0
        else {
            fatalError("\(kind): \(count) accesses took \(exits) exits, pf_taken \(delta.pfTaken), pf_fixed "
                       + "\(delta.pfFixed), pages_4k +\(sptes), shadow pages +\(pages), "
                       + "pf_emulate \(delta.pfEmulate), pf_spurious \(delta.pfSpurious), zapped \(delta.mmuShadowZapped)")
        }
    }
}

// MARK: TLB fixture

/// A VM with 64 pages faulted in and in the TLB.
public final class TLBFixture {
    public let guest: ShadowGuest
    /// One page.
    public let one: [GuestVirtualAddress]
    /// 64 consecutive pages (distinct TLB slots), in a fixed permuted order.
    public let sixtyFour: [GuestVirtualAddress]

    public init() {
        let base: UInt64 = 0x0000_0000_4000_0000
        guest = ShadowGuest(dataBytes: 64 << 12) { kernel in
            for page in 0..<64 {
                try ShadowGuest.map4K(kernel, base + UInt64(page) << 12, dataBase + UInt64(page) << 12,
                                      flags: GuestBits.userLeaf)
            }
        }
        guest.populate((0..<64).map { dataBase + UInt64($0) << 12 | UInt64($0 * 8) & 0xFF8 })
        let pages = (0..<64).map { base + UInt64($0) << 12 | UInt64($0 * 8) & 0xFF8 }
        // First pass faults (or walks prefetched SPTEs) and fills the TLB; then every access hits.
        for gva in pages { guest.mustComplete(gva) }
        for gva in pages {
            let read = guest.mustComplete(gva)
            let write = guest.mustComplete(gva, .write(.user))
            precondition(read.tlbHit && read.exits == 0 && write.tlbHit && write.exits == 0, "\(hex(gva)) is not a TLB hit")
        }
        one = [GuestVirtualAddress(pages[5])]
        sixtyFour = shuffled(pages).map { GuestVirtualAddress($0) }
    }
}

/// TLB hits under the TDP MMU (EPT) with sub-page write protection enabled: 64 ordinary pages
/// and 64 pages whose bitmaps protect every odd sub-page (0x5555_5555), each written in a
/// writable sub-page. The writes to the second set are SPP-checked: the TLB entry carries the
/// bitmap and every write hitting it is checked sub-page by sub-page.
public final class SPPTLBFixture {
    public let guest: ShadowGuest
    /// 64 ordinary pages, in a fixed permuted order.
    public let plain: [GuestVirtualAddress]
    /// 64 protected pages, each address in a writable sub-page, in the same order.
    public let protected: [GuestVirtualAddress]
    public static let mask: UInt32 = 0x5555_5555

    public init() {
        let base: UInt64 = 0x0000_0000_4000_0000
        let guest = ShadowGuest(dataBytes: 128 << 12, mmu: .ept()) { kernel in
            for page in 0..<128 {
                try ShadowGuest.map4K(kernel, base + UInt64(page) << 12, dataBase + UInt64(page) << 12,
                                      flags: GuestBits.userLeaf)
            }
        }
        try! guest.vm.enableSubPageProtection()
        let dataFrame = dataBase >> 12
        try! guest.vm.setSubpageAccess(gfn: GuestFrameNumber(dataFrame + 64),
                                       masks: [SubPageWriteMask](repeating: SubPageWriteMask(Self.mask), count: 64))
        // Sub-page 2 * (page % 16): a writable one, at a different offset on each page.
        let pages: [UInt64] = (0..<128).map { (page: Int) -> UInt64 in
            let offset = UInt64((page % 16) * 256 + 8)
            return base + UInt64(page) << 12 | offset
        }
        for gva in pages {
            _ = guest.mustComplete(gva, .write(.user))
            _ = guest.mustComplete(gva, .write(.user))
        }
        for gva in pages {
            let write = guest.mustComplete(gva, .write(.user))
            precondition(write.tlbHit && write.exits == 0, "\(hex(gva)) is not a TLB hit")
        }
        let order = shuffled(Array(0..<64))
        self.guest = guest
        plain = order.map { GuestVirtualAddress(pages[$0]) }
        protected = order.map { GuestVirtualAddress(pages[64 + $0]) }
    }
}

// MARK: Walk fixtures over this VM's memory (breakdown baselines)

/// The host page pool as the hardware sees it (the VM's own adapter is internal).
public struct PoolMemory: PhysicalMemory {
    public let pool: HostPagePool

    @inlinable
    public func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        let host = HostFrameNumber(frame.rawValue)
        guard pool.contains(host) else { return nil }
        return HostPage(bytes: pool.pointer(host), isWritable: true)
    }
}

/// The two walks a warm fault makes, separately: the guest walk over the VM's memslots (what
/// `MMUContext` does) and the hardware walk over KVM's SPTEs (what `VCPU` does before the exit,
/// failing at the PTE, and again on the retry, succeeding).
public final class WalkBreakdownFixture {
    public let guest: ShadowGuest
    /// The warm fixture's targets.
    public let targets: [GuestVirtualAddress]
    /// Targets whose SPTE is not present yet (the PT shadow page exists): the hardware walk fails at level 1.
    public let unmapped: [GuestVirtualAddress]
    public let hardware: PageWalker
    public let hostMemory: PoolMemory

    public init() {
        let fixture = FaultFixture(.warm)
        guest = fixture.guest
        // Fault in half of the targets: those are the hardware walk's successes.
        let half = fixture.targets.count / 2
        for gva in fixture.targets.prefix(half) { guest.mustComplete(gva.rawValue) }
        // Power-of-two lists for masked indexing.
        let size = 1 << (Int.bitWidth - 1 - half.leadingZeroBitCount)
        targets = Array(fixture.targets.prefix(size))
        unmapped = Array(fixture.targets.suffix(size))
        let root = guest.vcpu.context.root!.frame
        hostMemory = PoolMemory(pool: guest.vm.pool)
        hardware = try! PageWalker(registers: PagingRegisters(cr0: [.protectionEnable, .writeProtect, .paging],
                                                              cr3: root.rawValue << 12, cr4: [.physicalAddressExtension],
                                                              efer: [.noExecuteEnable, .longModeEnable, .longModeActive]),
                                   memory: hostMemory)
        for gva in targets { _ = try! hardware.walk(gva, .read(.user), in: hostMemory) }
        for gva in unmapped {
            if case .success = hardware.translate(gva, .read(.user), in: hostMemory) { fatalError("\(gva) is mapped") }
        }
    }
}

// MARK: Root switching and sync

/// Two address spaces (the kernel's root table and a copy of it sharing every lower table), both
/// with built shadow roots: each CR3 load between them is a `prev_roots` hit.
public final class RootSwitchFixture {
    public let guest: ShadowGuest
    public let roots: (UInt64, UInt64)
    public let pcid: Bool

    public init(pcid: Bool) {
        self.pcid = pcid
        let copy: UInt64 = 0xF0_0000
        guest = ShadowGuest(dataBytes: 1 << 20) { kernel in
            try ShadowGuest.map4K(kernel, 0x40_0000, dataBase, flags: GuestBits.userLeaf)
        }
        let memory = guest.vm.memory
        for offset in stride(from: UInt64(0), to: 4096, by: 8) {
            try! memory.store64(try! memory.load64(GuestPhysicalAddress(guest.kernel.root.rawValue + offset)),
                                at: GuestPhysicalAddress(copy + offset))
        }
        roots = pcid ? (guest.kernel.root.rawValue | 1, copy | 2) : (guest.kernel.root.rawValue, copy)
        if pcid {
            var registers = guest.vcpu.registers
            registers.cr4.insert(.pcidEnable)
            try! guest.vcpu.setRegisters(registers)
        }
        for root in [roots.0, roots.1, roots.0, roots.1] {
            try! guest.vcpu.loadCR3(root, noFlush: false)
            guest.mustComplete(0x40_0000)
        }
    }

    /// Loads the two roots in turn `count` times (no-flush loads with PCIDs); returns the root
    /// cache hits, which must be `count`.
    public func run(count: Int) -> UInt64 {
        let before = guest.vcpu.context.rootCacheHits
        let vcpu = guest.vcpu
        for index in 0..<count {
            try! vcpu.loadCR3(index & 1 == 0 ? roots.0 : roots.1, noFlush: pcid)
        }
        return guest.vcpu.context.rootCacheHits - before
    }
}

/// A guest page table with 512 present entries, its shadow page fully populated; each round the
/// kernel rewrites an entry through its window (unsyncing the shadow page), every entry's RW bit
/// is toggled, and a CR3 load syncs all 512 SPTEs (`mmu_sync_children` -> `sync_spte`).
public final class SyncFixture {
    public let guest: ShadowGuest
    let tableEntries: UInt64
    var writable = true

    public init() {
        guest = ShadowGuest(dataBytes: 2 << 20) { kernel in
            for page in 0..<512 as Range<UInt64> {
                try ShadowGuest.map4K(kernel, 0x40_0000 + page << 12, dataBase + page << 12, flags: GuestBits.userLeaf)
            }
        }
        for page in 0..<512 as Range<UInt64> { guest.mustComplete(0x40_0000 + page << 12) }
        tableEntries = try! guest.kernel.entryAddress(GuestVirtualAddress(0x40_0000), level: 1)!.rawValue
    }

    /// Unsyncs the table and rewrites its entries (untimed).
    public func prepare() {
        writable.toggle()
        let memory = guest.vm.memory
        for index in 0..<512 as Range<UInt64> {
            let address = GuestPhysicalAddress(tableEntries + index * 8)
            var entry = try! memory.load64(address)
            if writable { entry |= GuestBits.writable } else { entry &= ~GuestBits.writable }
            try! memory.store64(entry, at: address)
        }
        // The kernel's own store through its window: the write fault unsyncs the shadow PT.
        let window = guest.kernel.windowAddress(GuestPhysicalAddress(tableEntries))
        let value = try! memory.load64(GuestPhysicalAddress(tableEntries))
        _ = try! guest.vcpu.access(window, .write(.supervisor), size: 8, value: value)
    }

    /// The sync: a CR3 load of the current value (KVM_REQ_MMU_SYNC at the entry it services).
    public func sync() {
        try! guest.vcpu.loadCR3(guest.vcpu.registers.cr3, noFlush: false)
    }

    public var unsyncPages: UInt64 { guest.vm.mmu.stats.mmuUnsync }
}

/// A fresh VM under the TDP MMU (EPT, 4 KiB mappings only) whose targets each take exactly one EPT
/// violation: the guest's tables are mapped in EPT already (one warm-up access per page table), and
/// each target is the first touch of its data page. Single-use.
public final class TDPFaultFixture {
    public let guest: ShadowGuest
    public let targets: [GuestVirtualAddress]
    /// The guest-physical page each target maps, in the same order.
    public let targetGPAs: [GuestPhysicalAddress]
    let pagesBefore: UInt64

    static let base: UInt64 = 0x0000_0000_4000_0000
    static let pages = 16_384
    public static let capacity = pages - pages / 512

    public init() {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.maxHugePageLevel = 1  // every fault maps one 4 KiB page
        let guest = ShadowGuest(dataBytes: UInt64(Self.pages) << 12, mmu: .tdp(configuration)) { kernel in
            for page in 0..<Self.pages {
                try ShadowGuest.map4K(kernel, Self.base + UInt64(page) << 12, dataBase + UInt64(page) << 12,
                                      flags: GuestBits.userLeaf)
            }
        }
        var targetList: [UInt64] = []
        var dataPages: [UInt64] = []
        for page in 0..<Self.pages {
            dataPages.append(dataBase + UInt64(page) << 12)
            // The first page under each page table maps the table itself in EPT: not a target.
            if page % 512 == 0 {
                _ = guest.mustComplete(Self.base + UInt64(page) << 12)
            } else {
                targetList.append(Self.base + UInt64(page) << 12)
            }
        }
        guest.populate(dataPages)
        guest.prefaultShadowFrames(targetList.count + 64)
        self.guest = guest
        targets = shuffled(targetList).map { GuestVirtualAddress($0) }
        targetGPAs = targets.map { GuestPhysicalAddress(dataBase + ($0.rawValue - Self.base)) }
        pagesBefore = guest.vm.stats.pages4K
    }

    /// The TDP root the vCPU runs on (the only one).
    public var root: TDPRoot { guest.vm.tdp!.roots[0] }

    /// Each access took one exit and mapped one 4 KiB page.
    public func verify(count: Int, exits: Int) {
        precondition(exits == count, "TDP faults: \(exits) exits for \(count) accesses")
        precondition(guest.vm.stats.pages4K == pagesBefore + UInt64(count), "TDP faults: pages_4k did not grow by \(count)")
    }
}

/// Populating guest memory: a guest that maps `bytes` of RAM 1:1 with 1 GiB pages (two table
/// pages in all), whose every 4 KiB page is then touched once, so that each access faults once
/// and the MMU maps it with a 4 KiB page (TDP with huge pages off; shadow paging splits the guest's
/// 1 GiB pages into 4 KiB SPTEs). Guest RAM is backed by the host beforehand, so the timed faults
/// do not include the host kernel's own page faults.
public final class PopulationFixture {
    public let vm: VirtualMachine
    public let vcpus: [VCPU]
    /// Every page to touch, in a shuffled order, split into one list per vCPU.
    public let targets: [[GuestVirtualAddress]]
    public let pageCount: Int

    public init(bytes: UInt64, tdp: Bool, vcpus vcpuCount: Int = 1) {
        precondition(bytes % (1 << 30) == 0 && bytes > 0, "whole GiB")
        let cpu = CPUModel()
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.maxHugePageLevel = 1
        vm = try! VirtualMachine(memorySize: bytes, cpu: cpu, shadowPageLimit: Int(bytes >> 21) + 4096,
                                 mmu: tdp ? .tdp(configuration) : .shadow)
        let memory = vm.memory
        try! memory.store64(0x2000 | GuestBits.userTable, at: GuestPhysicalAddress(0x1000))
        for gib in 0..<(bytes >> 30) {
            try! memory.store64(gib << 30 | GuestBits.userLeaf | 0x80, at: GuestPhysicalAddress(0x2000 + gib * 8))
        }
        // Back every page of guest RAM (a write per host page), as a running guest's memory is.
        for page in stride(from: UInt64(0x3000), to: bytes, by: 4096) {
            try! memory.store64(page, at: GuestPhysicalAddress(page))
        }
        let pages = shuffled(Array(stride(from: UInt64(0x3000), to: bytes, by: 4096)))
        pageCount = pages.count
        var lists = [[GuestVirtualAddress]](repeating: [], count: vcpuCount)
        for (index, page) in pages.enumerated() { lists[index % vcpuCount].append(GuestVirtualAddress(page)) }
        targets = lists
        var made: [VCPU] = []
        for _ in 0..<vcpuCount { made.append(try! vm.addVCPU(registers: longModeRegisters(cr3: 0x1000))) }
        vcpus = made
        // The two table pages, walked once before the clock starts.
        for vcpu in made { _ = try! vcpu.access(GuestVirtualAddress(0x1000), .read(.user), size: 8) }
    }

    /// Every target is mapped by a 4 KiB leaf (shadow paging maps some by prefetch, without a
    /// fault of their own).
    public func verify() {
        let mapped = vm.stats.pages4K
        precondition(mapped >= UInt64(pageCount), "population: \(mapped) pages mapped for \(pageCount) targets")
    }
}

