// The guest operating system behind the built-in workloads, at generation time: it keeps what an
// OS keeps (free frames, processes with their mappings and PCIDs, which vCPU runs which address
// space, which TLBs may hold stale entries) and writes down, as scenario directives, each guest
// access, table store, register write and TLB invalidation it makes. Nothing is poked behind the
// MMU: page contents are copied and zeroed with kernel stores through the direct map, table
// entries are changed with `map` and `pte` (kernel stores through the same direct map), and the
// VMM's requests (dirty logging) are the scenario's VMM directives.

import X86Paging

/// A deterministic random source (SplitMix64, Steele, Lea and Flood 2014): the same seed gives the
/// same workload.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }
}

struct GuestOS {
    // MARK: Layout

    /// The kernel image: 8 MiB of guest-physical memory from 16 MiB, just above the table pool.
    static let kernelImageStart: UInt64 = GuestKernel.tablePoolEnd
    static let kernelImageSize: UInt64 = 8 << 20
    /// Frames for processes start above the kernel image.
    static let firstUserFrame: UInt64 = kernelImageStart + kernelImageSize
    /// Where the kernel image is mapped in long mode (Linux's __START_KERNEL_map + 16 MiB).
    static let kernelText64: UInt64 = 0xffff_ffff_8100_0000
    /// User program text, data, heap; each process's mmap area; the pages exec maps.
    static let userText: UInt64 = 0x40_0000
    static let userHeap: UInt64 = 0x100_0000
    static let mmapBase: UInt64 = 0x7f00_0000_0000
    /// PCIDs: a process's kernel PCID is 1 + its slot; KPTI's user PCID sets bit 11, as Linux does.
    static let userPCIDBit: UInt16 = 0x800

    static let present: UInt64 = 1 << 0, writable: UInt64 = 1 << 1, user: UInt64 = 1 << 2
    static let accessed: UInt64 = 1 << 5, dirty: UInt64 = 1 << 6, pageSizeBit: UInt64 = 1 << 7
    static let noExecute: UInt64 = 1 << 63
    /// Linux's tlb_single_page_flush_ceiling: above this many pages a range flush flushes all.
    static let singlePageFlushCeiling = 33

    // MARK: State

    let parameters: WorkloadParameters
    let memorySize: UInt64
    /// The workload ends with a migration: dirty rings, which KVM enables only before a vCPU
    /// exists, are chosen at the start.
    var migrates = false
    var directives: [ScenarioDirective] = []
    var phases: [WorkloadPhase] = []
    /// By directive index: the value each load the guest makes must return.
    var expectedLoads: [Int: UInt64] = [:]
    var random: SeededGenerator

    /// The paging mode the kernel runs in (after boot).
    var mode: PagingMode = .fourLevel
    private var nextFrame: UInt64 = firstUserFrame
    private var freeFrames: [UInt64] = []
    private var freeHugeFrames: [UInt64] = []
    private var hugePoolStart: UInt64
    /// The non-zero words of each frame the guest wrote (offset -> value), so that the kernel can
    /// copy a page and clear a recycled one with its own stores.
    private var contents: [UInt64: [UInt64: UInt64]] = [:]
    /// Mappings of each frame (copy-on-write sharing).
    private var references: [UInt64: Int] = [:]
    /// Frames of the program text every exec maps (the page cache): shared, never freed.
    var programTextFrames: [UInt64] = []

    var vcpuCount = 1
    var currentVCPU = 0
    /// The process each vCPU runs (nil: a kernel thread on the kernel space).
    var running: [Int?] = [nil]
    /// For each process, the vCPUs whose TLB may hold its translations under its PCID although it
    /// is not running there (Linux's lazy TLB: they flush when they switch to it again).
    var staleTLB: [Int: Set<Int>] = [:]
    var editSpace = Scenario.kernelSpace
    var pcidEnabled = false
    /// New processes get separate user and kernel roots (KPTI).
    var kptiEnabled = false
    var processes: [Int: Process] = [:]
    var nextPIDCounter = 1
    /// Address spaces of exited processes, reused by new ones (their tables are empty).
    var freeSpaceNames: [String] = []
    var spaceCounter = 0

    struct UserPage {
        var frame: UInt64
        var writable: Bool
        var copyOnWrite: Bool
        var executable: Bool
        /// A 2 MiB page (transparent huge page).
        var huge: Bool
    }

    struct Process {
        /// The space the kernel runs the process in (its only one without KPTI).
        var space: String
        /// KPTI: the space user code runs in.
        var userSpace: String?
        var pcid: UInt16
        var pages: [UInt64: UserPage] = [:]
        /// The virtual pages the process may touch (its VMAs), page-aligned addresses.
        var heapPages: [UInt64] = []
        var spaces: [String] { [space] + (userSpace.map { [$0] } ?? []) }
    }

    init(parameters: WorkloadParameters, memorySize: UInt64) {
        self.parameters = parameters
        self.memorySize = memorySize
        random = SeededGenerator(seed: parameters.seed)
        hugePoolStart = memorySize
    }

    // MARK: Emitting

    mutating func emit(_ directive: ScenarioDirective) { directives.append(directive) }

    mutating func phase(_ name: String) { phases.append(WorkloadPhase(name: name, firstDirective: directives.count)) }

    var windowBase: UInt64 { mode.isLongMode ? GuestKernel.windowBase64 : GuestKernel.windowBase32 }

    /// The kernel's address for guest-physical `gpa`: its direct map.
    func directMap(_ gpa: UInt64) -> GuestVirtualAddress { GuestVirtualAddress(windowBase + gpa) }

    mutating func onVCPU(_ index: Int) {
        guard index != currentVCPU else { return }
        emit(.vcpu(index))
        currentVCPU = index
    }

    mutating func edit(_ space: String) {
        guard space != editSpace else { return }
        emit(.space(space))
        editSpace = space
    }

    mutating func kernelRead(_ gpa: UInt64) {
        emit(.access(kind: .read, gva: directMap(gpa), cpl: 0, value: nil))
        expectLoad(of: gpa)
    }

    /// The load just emitted reads guest-physical `gpa`: it must return what the guest last stored
    /// there.
    mutating func expectLoad(of gpa: UInt64) {
        expectedLoads[directives.count - 1] = contents[gpa & ~0xFFF]?[gpa & 0xFFF] ?? 0
    }

    mutating func kernelWrite(_ gpa: UInt64, _ value: UInt64) {
        emit(.access(kind: .write, gva: directMap(gpa), cpl: 0, value: value))
        contentsSet(gpa, value)
    }

    /// What the guest's store of `value` at `gpa` leaves in the frame.
    mutating func contentsSet(_ gpa: UInt64, _ value: UInt64) {
        contents[gpa & ~0xFFF, default: [:]][gpa & 0xFFF] = value == 0 ? nil : value
    }

    func frameReferences(_ frame: UInt64) -> Int { references[frame] ?? 0 }

    mutating func shareFrame(_ frame: UInt64) { references[frame, default: 0] += 1 }

    mutating func nonZeroValue() -> UInt64 { random.next() | 1 }

    // MARK: Frames

    mutating func allocateFrame() throws(WorkloadError) -> UInt64 {
        let frame: UInt64
        if let reused = freeFrames.popLast() {
            frame = reused
        } else {
            guard nextFrame + 4096 <= hugePoolStart else {
                throw WorkloadError("guest memory is exhausted (\(memorySize >> 20) MiB): fewer --pages or --processes")
            }
            frame = nextFrame
            nextFrame += 4096
        }
        references[frame] = 1
        zero(frame, bytes: 4096)
        return frame
    }

    /// A recycled frame still holds its last owner's data: the kernel clears the words it knows
    /// are not zero (the rest of the frame is zero already).
    private mutating func zero(_ frame: UInt64, bytes: UInt64) {
        for page in stride(from: frame, to: frame + bytes, by: 4096) {
            for offset in (contents[page] ?? [:]).keys.sorted() { kernelWrite(page + offset, 0) }
            contents[page] = nil
        }
    }

    mutating func releaseFrame(_ frame: UInt64) {
        guard !programTextFrames.contains(frame) else { return }
        let left = (references[frame] ?? 1) - 1
        references[frame] = left == 0 ? nil : left
        if left == 0 { freeFrames.append(frame) }
    }

    mutating func reserveHugePool(pages: Int) {
        hugePoolStart = memorySize - UInt64(pages) << 21
        freeHugeFrames = (0..<UInt64(pages)).map { hugePoolStart + $0 << 21 }.reversed()
    }

    mutating func allocateHugeFrame() throws(WorkloadError) -> UInt64 {
        guard let frame = freeHugeFrames.popLast() else {
            throw WorkloadError("the huge-page pool is exhausted (a generator bug: mmap frees its huge pages each round)")
        }
        zero(frame, bytes: 2 << 20)
        return frame
    }

    mutating func copy(_ source: UInt64, to destination: UInt64) {
        for (offset, _) in (contents[source] ?? [:]).sorted(by: { $0.key < $1.key }) {
            kernelRead(source + offset)
            kernelWrite(destination + offset, contents[source]![offset]!)
        }
    }

    mutating func releaseHugeFrame(_ frame: UInt64) { freeHugeFrames.append(frame) }

    // MARK: Boot

    /// The leaf flags of the direct map at `gpa`: supervisor, writable; NX where the mode has it,
    /// except over the kernel's text, which runs from there below long mode.
    private func directMapFlags(_ gpa: UInt64) -> UInt64 {
        let text = gpa >= Self.kernelImageStart && gpa < Self.kernelImageStart + Self.kernelImageSize / 2
        return GuestOS.present | GuestOS.writable | GuestOS.accessed | GuestOS.dirty
            | (mode == .legacy32 || text ? 0 : GuestOS.noExecute)
    }

    /// Extends the kernel's window over all of guest memory in the current mode: the direct map
    /// (PAGE_OFFSET + physical address), with the largest pages the mode has below 1 GiB.
    private mutating func buildDirectMap() {
        let size: PageSize = mode == .legacy32 ? .size4M : .size2M
        for gpa in stride(from: GuestKernel.tablePoolEnd, to: memorySize, by: Int(size.bytes)) {
            emit(.map(MapDirective(gva: directMap(gpa), gpa: GuestPhysicalAddress(gpa), pageSize: size,
                                   leafFlags: directMapFlags(gpa), upperFlags: [:])))
        }
    }

    /// Kernel text (long mode: at __START_KERNEL_map; below it, through the direct map).
    private func kernelText(_ offset: UInt64) -> GuestVirtualAddress {
        mode.isLongMode ? GuestVirtualAddress(Self.kernelText64 + offset) : directMap(Self.kernelImageStart + offset)
    }

    /// The kernel runs a little in the current mode: fetches from its text, reads and writes of
    /// its data (per-vCPU areas in the image's second half).
    private mutating func kernelActivity(_ count: Int) {
        for step in 0..<count {
            let text = UInt64(random.next() % (Self.kernelImageSize / 2)) & ~7
            emit(.access(kind: .fetch, gva: kernelText(text), cpl: 0, value: nil))
            expectLoad(of: Self.kernelImageStart + text)
            let data = Self.kernelImageStart + Self.kernelImageSize / 2 + UInt64(currentVCPU) << 16 + UInt64(step % 64) << 6
            if step % 2 == 0 { kernelWrite(data, nonZeroValue()) } else { kernelRead(data) }
        }
    }

    /// Long mode's mapping of the kernel image at __START_KERNEL_map (text executable, read-only).
    private mutating func mapKernelImage() {
        for offset in stride(from: UInt64(0), to: Self.kernelImageSize, by: 2 << 20) {
            let text = offset < Self.kernelImageSize / 2
            let flags = GuestOS.present | GuestOS.accessed | (text ? 0 : GuestOS.writable | GuestOS.dirty | GuestOS.noExecute)
            emit(.map(MapDirective(gva: GuestVirtualAddress(Self.kernelText64 + offset),
                                   gpa: GuestPhysicalAddress(Self.kernelImageStart + offset), pageSize: .size2M,
                                   leafFlags: flags, upperFlags: [:])))
        }
    }

    /// Firmware to kernel, one mode at a time, then the application processors.
    mutating func boot() throws(WorkloadError) {
        emit(.mem(bytes: memorySize))
        chooseDirtyRings()
        if !parameters.la57 { emit(.cpu(CPUSettings(supportsLA57: false))) }
        emit(.set(ControlSettings(pagingMode: .legacy32)))
        mode = .legacy32
        phase("firmware (paging off)")
        // The vCPU starts with the boot tables' CR3; firmware clears PG and runs on physical
        // addresses, building the 32-bit direct map with stores at the tables' physical addresses.
        emit(.writeRegister(.cr0, value: 0x11))
        for step in 0..<UInt64(8) {
            let gpa = Self.kernelImageStart + Self.kernelImageSize / 2 + step << 3
            emit(.access(kind: .write, gva: GuestVirtualAddress(gpa), cpl: 0, value: 0xb007 + step))
            contentsSet(gpa, 0xb007 + step)
        }
        buildDirectMap()
        phase("32-bit paging")
        emit(.writeRegister(.cr0, value: 0x8001_0011))
        kernelActivity(8)
        switchMode(to: .pae, phase: "PAE paging")
        emit(.reloadCR3)  // the PDPTE of the direct map's new directory is loaded at a CR3 load
        kernelActivity(8)
        switchMode(to: .fourLevel, phase: "4-level paging")
        if parameters.la57 { switchMode(to: .fiveLevel, phase: "5-level paging") }
        bringUpApplicationProcessors()
    }

    /// A switch to `mode` the way the kernel makes it (the runner orders the register writes), and
    /// the new mode's direct map (and, in long mode, kernel image mapping).
    private mutating func switchMode(to mode: PagingMode, phase name: String) {
        phase(name)
        emit(.set(ControlSettings(pagingMode: mode)))
        self.mode = mode
        buildDirectMap()
        guard mode.isLongMode else { return }
        mapKernelImage()
        kernelActivity(12)
    }

    /// The tables a boot loader leaves (4-level, direct map and kernel image) and the APs: the
    /// start of every workload but `boot`.
    mutating func quickBoot() throws(WorkloadError) {
        emit(.mem(bytes: memorySize))
        chooseDirtyRings()
        mode = .fourLevel
        buildDirectMap()
        mapKernelImage()
        phase("boot")
        kernelActivity(4)
        bringUpApplicationProcessors()
    }

    private mutating func chooseDirtyRings() {
        guard migrates && parameters.dirtyLog == .ring else { return }
        emit(.dirtyLog(.mode(.ring, ringEntries: 4096)))
    }

    private mutating func bringUpApplicationProcessors() {
        guard parameters.vcpus > 1 else { return }
        phase("application processors")
        for index in 1..<parameters.vcpus {
            onVCPU(index)
            vcpuCount += 1
            running.append(nil)
            kernelActivity(4)
        }
        onVCPU(0)
    }
}
