// An L2 4 KiB fault through shadow EPT against an L1 4 KiB fault through shadow paging, both at
// KVM's fault handler (`MMUContext.pageFault(atL2:errorCode:)` / `pageFault(at:access:errorCode:)`):
// the walk of L1's EPT or of the guest's own tables, `FNAME(fetch)`, the SPTE, the prefetch that
// finds nothing to map. No vCPU around them, so neither figure includes the exit, the hardware
// walk or the retried access of `fault-4k`; `L2FaultFixture` below measures those through the vCPU.
//
// Same shape on both sides: 16,384 pages under 32 last-level tables, every eighth page accessed
// (the targets, one per group of 8, so prefetch stops at the next page), each table shadowed
// already by a warm-up fault in its last group, which is not a target.

import GuestMemory
import KVMMMU
import VirtualMachine
import X86Paging

/// L1's memory: one memslot, every frame touched before the clock starts.
private func l1Memory(pages: Int) -> (HostPagePool, MemslotSet) {
    let pool = try! HostPagePool(capacityPages: pages + 8192)
    let memory = MemslotSet(pool: pool)
    try! memory.addSlot(id: 0, base: GuestPhysicalAddress(0), size: UInt64(pages) << 12)
    for frame in 0..<UInt64(pages) { _ = memory.hostPage(GuestFrameNumber(frame)) }
    return (pool, memory)
}

/// Writes 4-level tables (EPT or x86, by `tableFlags`) mapping `count` pages from `base` to `output`
/// from `base`, allocating tables from `tables`; `leaf(page)` gives each leaf's flags.
private func mapPages(_ memory: MemslotSet, root: UInt64, tables: inout UInt64, base: UInt64, output: UInt64,
                      count: Int, tableFlags: UInt64, leaf: (Int) -> UInt64) {
    func entry(_ table: UInt64, _ address: UInt64, _ level: Int) -> UnsafeMutablePointer<UInt64> {
        let index = (address >> UInt64(12 + 9 * (level - 1))) & 0x1FF
        let page = memory.hostPage(GuestPhysicalAddress(table).frame)!.bytes
        return (page + Int(index * 8)).assumingMemoryBound(to: UInt64.self)
    }
    for page in 0..<count {
        let address = base + UInt64(page) << 12
        var table = root
        for level in stride(from: 4, to: 1, by: -1) {
            let pointer = entry(table, address, level)
            if pointer.pointee == 0 {
                pointer.pointee = tables | tableFlags
                tables += 0x1000
            }
            table = pointer.pointee & 0x000F_FFFF_FFFF_F000
        }
        entry(table, address, 1).pointee = output + UInt64(page) << 12 | leaf(page)
    }
}

/// One fixture: a context, the addresses to fault (L2 guest-physical or L1 linear, as raw values).
public final class NestedFaultFixture {
    public let context: MMUContext
    public let targets: [UInt64]
    public let nested: Bool
    let pagesBefore: UInt64

    static let pages = 16_384
    static let base: UInt64 = 0x4000_0000
    static let dataBase: UInt64 = 0x10_0000 * 16  // 16 MiB: tables below, data above
    public static let capacity = (pages / 512) * 63

    /// `nested`: L2 faults through shadow EPT (L1's EPTP with A/D on); else L1 faults through
    /// shadow paging of its own 4-level tables.
    public init(nested: Bool) {
        self.nested = nested
        let (pool, memory) = l1Memory(pages: Self.pages + 4096 + 0x1000)
        let mmu = nested ? ShadowMMU(memory: memory, pool: pool, masks: .ept(accessedDirty: true, executeOnly: true))
            : ShadowMMU(memory: memory, pool: pool)
        let root: UInt64 = 0x10_0000
        var tables = root + 0x1000
        // EPT: RWX, A on targets; x86: P|RW|US, A on targets.
        let accessed: UInt64 = nested ? 1 << 8 : 1 << 5
        let permissions: UInt64 = nested ? 7 | 6 << 3 : 7
        mapPages(memory, root: root, tables: &tables, base: Self.base, output: Self.dataBase, count: Self.pages,
                 tableFlags: 7) { page in page % 8 == 0 ? permissions | accessed : permissions }
        if nested {
            let ept = try! NestedEPTContext(pointer: EPTPointer(root: root, levels: 4, accessedDirty: true),
                                            capabilities: EPTCapabilities())
            context = MMUContext(mmu: mmu, nestedEPT: ept)
        } else {
            let registers = PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: root,
                                            cr4: [.physicalAddressExtension],
                                            efer: [.noExecuteEnable, .longModeEnable, .longModeActive])
            context = try! MMUContext(mmu: mmu, registers: registers)
        }
        _ = try! context.load()
        var targetList: [UInt64] = []
        for table in 0..<(Self.pages / 512) {
            let first = Self.base + UInt64(table * 512) << 12
            // The last group shadows the table and is not a target.
            _ = Self.fault(context, first + 505 << 12, nested: nested)
            for group in 0..<63 { targetList.append(first + UInt64(group * 8) << 12) }
        }
        targets = shuffled(targetList)
        pagesBefore = mmu.stats.pages4K
    }

    @inline(__always)
    static func fault(_ context: MMUContext, _ address: UInt64, nested: Bool) -> Bool {
        if nested {
            return try! context.pageFault(atL2: GuestPhysicalAddress(address), errorCode: [.user, .guestFinal])
                == .handled(.fixed)
        }
        return try! context.pageFault(at: GuestVirtualAddress(address), access: .read(.user), errorCode: [.user]) == .fixed
    }

    /// Each fault mapped exactly its own page.
    public func verify(count: Int, fixed: Int) {
        precondition(fixed == count, "nested faults: \(fixed) fixed of \(count)")
        precondition(context.mmu.stats.pages4K == pagesBefore + UInt64(count), "a fault mapped more or less than its page")
    }
}

/// The first `count` targets of `fixture`, one fault each.
@inline(never)
public func runNestedFaults(_ fixture: NestedFaultFixture, count: Int) -> Int {
    let context = fixture.context
    let nested = fixture.nested
    return fixture.targets.withUnsafeBufferPointer { buffer in
        var fixed = 0
        for index in 0..<count where NestedFaultFixture.fault(context, buffer[index], nested: nested) { fixed += 1 }
        return fixed
    }
}

// MARK: - L2 faults through the vCPU

/// The figure the handler-level pair above leaves out: an L1 vCPU under TDP (EPT, 4 KiB pages) running L2 with its paging off over L1's 4-level EPT,
/// which maps `pages` L2 pages (RWX) that L1 wrote before entering. Each target's first access is
/// one EPT violation of the shadow EPT: the exit, KVM's `guest_mmu` fault, the retried access.
public final class L2FaultFixture {
    public let vm: VirtualMachine
    public let vcpu: VCPU
    public let targets: [GuestVirtualAddress]
    static let pages = 8192
    static let l1DataBase: UInt64 = 0x100_0000
    static let eptBase: UInt64 = 0x80_0000

    public init() {
        var configuration = TDPMMUConfiguration.ept(capabilities: EPTCapabilities(), guestMaxPhysicalAddressBits: 46)
        configuration.maxHugePageLevel = 1
        vm = try! VirtualMachine(memorySize: 64 << 20, mmu: .tdp(configuration))
        vcpu = try! vm.addVCPU(registers: PagingRegisters())
        // L1's EPT: one table per level, 16 last-level tables, written before the first entry.
        let memory = vm.memory
        func store(_ value: UInt64, _ address: UInt64) {
            memory.hostPage(GuestPhysicalAddress(address).frame)!.bytes
                .storeBytes(of: value, toByteOffset: Int(address & 0xFFF), as: UInt64.self)
        }
        store((Self.eptBase + 0x1000) | 7, Self.eptBase)
        store((Self.eptBase + 0x2000) | 7, Self.eptBase + 0x1000)
        for page in 0..<Self.pages {
            let table = Self.eptBase + 0x3000 + UInt64(page / 512) * 0x1000
            if page % 512 == 0 { store(table | 7, Self.eptBase + 0x2000 + UInt64(page / 512) * 8) }
            store((Self.l1DataBase + UInt64(page) << 12) | 6 << 3 | 7, table + UInt64(page % 512) * 8)
        }
        try! vcpu.enterL2(.ept(EPTPointer(root: Self.eptBase, levels: 4, accessedDirty: true), capabilities: EPTCapabilities()),
                          registers: PagingRegisters())
        // The first page of each last-level table builds the shadow tables above it: not a target.
        // One target in each group of eight pages, so that KVM's prefetch maps no other target.
        var list: [UInt64] = []
        for page in 0..<Self.pages {
            if page % 512 == 0 {
                _ = try! vcpu.accessL2(GuestVirtualAddress(UInt64(page) << 12), Access(.read, .user))
            } else if page % 8 == 4 {
                list.append(UInt64(page) << 12)
            }
        }
        var random = UInt64(0x9E37_79B9)
        for index in stride(from: list.count - 1, to: 0, by: -1) {
            random = random &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            list.swapAt(index, Int(random >> 33) % (index + 1))
        }
        targets = list.map { GuestVirtualAddress($0) }
    }
}

/// Each target's first L2 access, through the vCPU: exits taken, and a checksum of what completed.
/// (`accessL2` takes the memslots' srcu and mmu_lock for write around the whole access.)
@inline(never)
public func runL2Faults(_ fixture: L2FaultFixture, count: Int) -> (exits: Int, checksum: UInt64) {
    var exits = 0
    var sum: UInt64 = 0
    for index in 0..<count {
        let outcome = try! fixture.vcpu.accessL2(fixture.targets[index], Access(.read, .user))
        exits &+= outcome.exits
        if case .completed(let gpa, _, let value) = outcome.result { sum &+= gpa.rawValue &+ value } else { sum &+= 1 << 40 }
    }
    return (exits, sum)
}
