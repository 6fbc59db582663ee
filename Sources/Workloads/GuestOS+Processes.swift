// Processes, memory mappings and a live migration, as the guest OS (and its VMM) make them.

import VirtualMachine
import X86Paging

extension GuestOS {
    // MARK: Processes and their mappings

    mutating func createProcess() -> Int {
        let pid = nextPIDAndAdvance()
        let space = takeSpace(user: false)
        let userSpace = kptiEnabled ? takeSpace(user: true) : nil
        let slot = UInt16(pid % 2000)
        processes[pid] = Process(space: space, userSpace: userSpace, pcid: 1 + slot)
        // A new mm: whatever its PCID last held on any vCPU is someone else's.
        staleTLB[pid] = Set(0..<vcpuCount)
        return pid
    }

    private mutating func nextPIDAndAdvance() -> Int {
        defer { nextPIDCounter += 1 }
        return nextPIDCounter
    }

    /// A free address space of the kind asked for, or a new one (`space` creates its root).
    private mutating func takeSpace(user: Bool) -> String {
        if let index = freeSpaceNames.firstIndex(where: { $0.hasSuffix(".u") == user }) {
            return freeSpaceNames.remove(at: index)
        }
        spaceCounter += 1
        let name = "mm\(spaceCounter)" + (user ? ".u" : "")
        edit(name)
        return name
    }

    func leafValue(_ page: UserPage) -> UInt64 {
        var value = page.frame | GuestOS.present | GuestOS.user | GuestOS.accessed
        if page.writable { value |= GuestOS.writable | GuestOS.dirty }
        if !page.executable { value |= GuestOS.noExecute }
        if page.huge { value |= GuestOS.pageSizeBit }
        return value
    }

    /// The kernel maps `page` at `gva` in every space of the process.
    mutating func install(_ pid: Int, _ gva: UInt64, _ page: UserPage) {
        processes[pid]!.pages[gva] = page
        let flags = leafValue(page) & ~page.frame & ~GuestOS.pageSizeBit
        for space in processes[pid]!.spaces {
            edit(space)
            emit(.map(MapDirective(gva: GuestVirtualAddress(gva), gpa: GuestPhysicalAddress(page.frame),
                                   pageSize: page.huge ? .size2M : .size4K, leafFlags: flags, upperFlags: [:])))
        }
    }

    /// The kernel rewrites the leaf for `gva` in every space of the process (`nil`: not present).
    mutating func rewrite(_ pid: Int, _ gva: UInt64, _ page: UserPage?, level: Int = 1) {
        processes[pid]!.pages[gva] = page
        for space in processes[pid]!.spaces {
            edit(space)
            emit(.pte(gva: GuestVirtualAddress(gva), level: level, value: .raw(page.map(leafValue) ?? 0), cpl: 0))
        }
    }

    // MARK: Kernel entry and TLB invalidation

    /// A trap or syscall: with KPTI the kernel switches to the process's kernel root.
    mutating func enterKernel() {
        guard let pid = running[currentVCPU], let process = processes[pid], process.userSpace != nil else { return }
        emit(.switchSpace(name: process.space, pcid: process.pcid, noFlush: true))
    }

    /// Back to user mode: with KPTI on the process's user root, with its user PCID.
    mutating func returnToUser() {
        guard let pid = running[currentVCPU], let process = processes[pid], let userSpace = process.userSpace else { return }
        emit(.switchSpace(name: userSpace, pcid: process.pcid | GuestOS.userPCIDBit, noFlush: true))
    }

    /// The kernel changed mappings of `pid` at `gvas` (nil: too many, or all): it flushes its own
    /// TLB and sends a shootdown to every other vCPU running the process (an IPI: the handler
    /// enters the kernel there). vCPUs not running it flush when they switch to it again.
    mutating func flush(_ pid: Int, _ gvas: [UInt64]?) {
        if let gvas, gvas.isEmpty { return }
        let origin = currentVCPU
        let pages = gvas.flatMap { $0.count <= GuestOS.singlePageFlushCeiling ? $0 : nil }
        let userPCID = processes[pid]!.userSpace != nil ? processes[pid]!.pcid | GuestOS.userPCIDBit : nil
        for vcpu in [origin] + (0..<vcpuCount).filter({ $0 != origin }) where running[vcpu] == pid {
            onVCPU(vcpu)
            if vcpu != origin { enterKernel() }
            if let pages {
                for gva in pages {
                    emit(.invlpg(GuestVirtualAddress(gva)))
                    if let userPCID { emit(.invpcid(.individualAddress, pcid: UInt64(userPCID), gva: GuestVirtualAddress(gva))) }
                }
            } else {
                emit(.reloadCR3)
                if let userPCID { emit(.invpcid(.singleContext, pcid: UInt64(userPCID), gva: GuestVirtualAddress(0))) }
            }
            if vcpu != origin { returnToUser() }
        }
        for vcpu in 0..<vcpuCount where running[vcpu] != pid { staleTLB[pid, default: []].insert(vcpu) }
        onVCPU(origin)
    }

    /// The scheduler puts `pid` on the current vCPU: a CR3 load (two with KPTI), keeping the
    /// PCID's translations unless they may be stale.
    mutating func schedule(_ pid: Int?) {
        let vcpu = currentVCPU
        running[vcpu] = pid
        guard let pid, let process = processes[pid] else {
            emit(.switchSpace(name: Scenario.kernelSpace, pcid: 0, noFlush: false))
            return
        }
        guard pcidEnabled else {
            emit(.switchSpace(name: process.space, pcid: 0, noFlush: false))
            return
        }
        let keep = !(staleTLB[pid]?.contains(vcpu) ?? false)
        staleTLB[pid]?.remove(vcpu)
        emit(.switchSpace(name: process.space, pcid: process.pcid, noFlush: keep))
        if let userSpace = process.userSpace {
            emit(.switchSpace(name: userSpace, pcid: process.pcid | GuestOS.userPCIDBit, noFlush: keep))
        }
    }

    // MARK: User accesses and the page-fault handler

    /// The mapping that covers `gva` in `pid`: its base and page.
    func mapping(_ pid: Int, _ gva: UInt64) -> (base: UInt64, page: UserPage)? {
        let pages = processes[pid]!.pages
        if let page = pages[gva & ~0xFFF], !page.huge { return (gva & ~0xFFF, page) }
        if let page = pages[gva & ~0x1F_FFFF], page.huge { return (gva & ~0x1F_FFFF, page) }
        return nil
    }

    /// The process running on the current vCPU touches `gva`. A fault the kernel can resolve
    /// (demand paging, copy-on-write) is handled and the access made again; one it cannot (a write
    /// to a page mprotect made read-only) stays the access's outcome, the signal a process gets.
    mutating func userAccess(_ kind: AccessKind, _ gva: UInt64) throws(WorkloadError) {
        let pid = running[currentVCPU]!
        let value = kind == .write ? nonZeroValue() : nil
        let access = ScenarioDirective.access(kind: kind, gva: GuestVirtualAddress(gva), cpl: 3, value: value)
        emit(access)
        guard let (base, page) = mapping(pid, gva) else {
            guard processes[pid]!.heapPages.contains(gva & ~0xFFF) else { return }
            enterKernel()
            let frame = try allocateFrame()
            install(pid, gva & ~0xFFF, UserPage(frame: frame, writable: true, copyOnWrite: false, executable: false, huge: false))
            returnToUser()
            emit(access)
            noteCompletedAccess(pid, gva, value)
            return
        }
        if kind == .write && !page.writable {
            guard page.copyOnWrite else { return }
            enterKernel()
            try breakCopyOnWrite(pid, base, page)
            returnToUser()
            emit(access)
        } else if kind == .fetch && !page.executable {
            return
        }
        noteCompletedAccess(pid, gva, value)
    }

    /// The access just emitted completes: a store changes the page, a load must return what the
    /// page holds.
    private mutating func noteCompletedAccess(_ pid: Int, _ gva: UInt64, _ value: UInt64?) {
        guard let (base, page) = mapping(pid, gva) else { return }
        let gpa = page.frame + (gva - base)
        if let value { contentsSet(gpa, value) } else { expectLoad(of: gpa) }
    }

    /// The write fault on a copy-on-write page: the last sharer takes the frame back writable,
    /// any other copies it to a frame of its own.
    private mutating func breakCopyOnWrite(_ pid: Int, _ base: UInt64, _ page: UserPage) throws(WorkloadError) {
        var own = page
        own.writable = true
        own.copyOnWrite = false
        if frameReferences(page.frame) > 1 {
            own.frame = try allocateFrame()
            copy(page.frame, to: own.frame)
            releaseFrame(page.frame)
        }
        rewrite(pid, base, own)
        flush(pid, [base])
    }

    /// A few user accesses of the process running on the current vCPU: its text, its heap.
    mutating func burst(_ count: Int) throws(WorkloadError) {
        guard let pid = running[currentVCPU] else { return }
        let text = processes[pid]!.pages.filter { $0.value.executable }.keys.sorted()
        let heap = processes[pid]!.heapPages
        for step in 0..<count {
            if step % 4 == 0, let page = text.randomElement(using: &random) {
                try userAccess(.fetch, page + (random.next() % 512) << 3)
            } else if let page = heap.randomElement(using: &random) {
                try userAccess(step % 3 == 0 ? .read : .write, page + (random.next() % 512) << 3)
            }
        }
    }

    // MARK: fork, exec, exit

    /// fork: the child shares every page; writable ones become copy-on-write in both.
    mutating func fork(_ parent: Int) -> Int {
        enterKernel()
        let child = createProcess()
        for (gva, page) in processes[parent]!.pages.sorted(by: { $0.key < $1.key }) {
            var shared = page
            if page.writable {
                shared.writable = false
                shared.copyOnWrite = true
                rewrite(parent, gva, shared)
            }
            shareFrame(page.frame)
            install(child, gva, shared)
        }
        processes[child]!.heapPages = processes[parent]!.heapPages
        flush(parent, nil)
        returnToUser()
        return child
    }

    /// Every mapping of `pid` goes (exec and exit).
    private mutating func unmapAll(_ pid: Int) {
        let pages = processes[pid]!.pages.sorted(by: { $0.key < $1.key })
        for (gva, page) in pages {
            rewrite(pid, gva, nil, level: page.huge ? 2 : 1)
            releaseFrame(page.frame)
        }
        processes[pid]!.pages = [:]
        flush(pid, pages.map(\.key))
    }

    /// exec: the old image goes; the program's text (page-cache frames shared by every process
    /// that runs it) is mapped, and a heap of `pages` pages waits for demand faults.
    mutating func exec(_ pid: Int) throws(WorkloadError) {
        enterKernel()
        unmapAll(pid)
        if programTextFrames.isEmpty {
            for page in 0..<4 as Range<UInt64> {
                let frame = try allocateFrame()
                kernelWrite(frame, 0x9090_9090_0000 + page)  // the loader reads the program in
                programTextFrames.append(frame)
            }
        }
        for (index, frame) in programTextFrames.enumerated() {
            shareFrame(frame)
            install(pid, GuestOS.userText + UInt64(index) << 12,
                    UserPage(frame: frame, writable: false, copyOnWrite: false, executable: true, huge: false))
        }
        processes[pid]!.heapPages = (0..<UInt64(parameters.pages)).map { GuestOS.userHeap + $0 << 12 }
        returnToUser()
    }

    /// exit: the mappings go, the vCPU switches to another process (or the kernel's space), and
    /// the address space waits for the next process.
    mutating func exit(_ pid: Int) {
        enterKernel()
        unmapAll(pid)
        let process = processes.removeValue(forKey: pid)!
        staleTLB[pid] = nil
        let next = processes.keys.sorted().first { candidate in !running.contains(candidate) }
        schedule(next)
        freeSpaceNames.append(contentsOf: process.spaces)
    }

    // MARK: The workloads

    /// A new process, scheduled on `vcpu` (which stays the current one).
    private mutating func startProcess(on vcpu: Int) -> Int {
        onVCPU(vcpu)
        let pid = createProcess()
        schedule(pid)
        return pid
    }

    /// Processes come and go: forks with copy-on-write, execs, exits, and context switches on
    /// every vCPU; halfway through the kernel turns PCIDs on and new processes get KPTI's
    /// separate user and kernel roots.
    mutating func runProcesses() throws(WorkloadError) {
        phase("processes")
        for vcpu in 0..<vcpuCount {
            let pid = startProcess(on: vcpu)
            try exec(pid)
            try burst(parameters.pages)
        }
        let switchIteration = parameters.iterations >= 2 && mode.isLongMode ? parameters.iterations / 2 : nil
        for iteration in 0..<parameters.iterations {
            if iteration == switchIteration { enablePCIDAndKPTI() }
            let vcpu = iteration % vcpuCount
            onVCPU(vcpu)
            // Room for the child: the process here exits when the machine is full.
            if processes.count >= parameters.processes, let victim = running[vcpu] {
                exit(victim)
                try burst(parameters.pages / 2)
            }
            if running[vcpu] == nil {
                let pid = createProcess()
                schedule(pid)
                try exec(pid)
            }
            let parent = running[vcpu]!
            let child = fork(parent)
            try burst(parameters.pages)  // the parent writes: copy-on-write faults
            onVCPU((vcpu + 1) % vcpuCount)
            schedule(child)
            try burst(parameters.pages)  // the child reads what it shares and writes its copies
            if random.next() % 2 == 0 {
                try exec(child)
                try burst(parameters.pages)
            }
            onVCPU(vcpu)
            // Every vCPU switches to a process that is not running (or keeps its own).
            for other in 0..<vcpuCount {
                onVCPU(other)
                let waiting = processes.keys.sorted().filter { !running.contains($0) }
                if let next = waiting.randomElement(using: &random) { schedule(next) }
                try burst(parameters.pages / 2)
            }
            onVCPU(vcpu)
        }
    }

    private mutating func enablePCIDAndKPTI() {
        phase("PCID and KPTI")
        for vcpu in 0..<vcpuCount {
            onVCPU(vcpu)
            emit(.set(ControlSettings(pcidEnable: true)))
        }
        onVCPU(0)
        pcidEnabled = true
        kptiEnabled = true
    }

    /// One multi-threaded process on every vCPU: mmap, demand faults from every thread,
    /// mprotect and munmap with shootdowns, a transparent huge page faulted in whole and one
    /// collapsed from 4 KiB pages (khugepaged).
    mutating func runMappings() throws(WorkloadError) {
        phase("mmap")
        onVCPU(0)
        let pid = createProcess()
        for vcpu in 0..<vcpuCount {
            onVCPU(vcpu)
            schedule(pid)
        }
        onVCPU(0)
        let pageCount = min(parameters.pages, 512)
        for iteration in 0..<UInt64(parameters.iterations) {
            let base = GuestOS.mmapBase + iteration << 23
            let region = (0..<UInt64(pageCount)).map { base + $0 << 12 }
            processes[pid]!.heapPages = region
            for gva in region {
                onVCPU(Int(random.next() % UInt64(vcpuCount)))
                try userAccess(.write, gva + (random.next() % 512) << 3)
            }
            for gva in region.shuffled(using: &random).prefix(pageCount / 2) {
                onVCPU(Int(random.next() % UInt64(vcpuCount)))
                try userAccess(.read, gva)
            }
            // mprotect(PROT_READ) of the first half, a thread's write into it, and back.
            let half = Array(region.prefix(max(1, pageCount / 2)))
            try protect(pid, half, writable: false)
            onVCPU(Int(random.next() % UInt64(vcpuCount)))
            try userAccess(.write, half[0])
            try userAccess(.read, half[0])
            try protect(pid, half, writable: true)
            // khugepaged: the 4 KiB pages of the 2 MiB range become one huge page.
            try collapse(pid, base, region)
            for _ in 0..<pageCount {
                onVCPU(Int(random.next() % UInt64(vcpuCount)))
                try userAccess(.read, base + random.next() % (2 << 20) & ~7)
            }
            // A transparent huge page faulted in whole.
            let hugeBase = base + (4 << 20)
            try touchHuge(pid, hugeBase)
            for _ in 0..<pageCount {
                onVCPU(Int(random.next() % UInt64(vcpuCount)))
                try userAccess(.write, hugeBase + random.next() % (2 << 20) & ~7)
            }
            // munmap of both.
            enterKernel()
            for gva in [base, hugeBase] {
                let page = processes[pid]!.pages[gva]!
                rewrite(pid, gva, nil, level: 2)
                releaseHugeFrame(page.frame)
            }
            processes[pid]!.heapPages = []
            flush(pid, nil)
            returnToUser()
        }
        onVCPU(0)
    }

    private mutating func protect(_ pid: Int, _ pages: [UInt64], writable: Bool) throws(WorkloadError) {
        enterKernel()
        for gva in pages {
            guard var page = processes[pid]!.pages[gva] else { continue }
            page.writable = writable
            rewrite(pid, gva, page)
        }
        flush(pid, pages)
        returnToUser()
    }

    private mutating func collapse(_ pid: Int, _ base: UInt64, _ region: [UInt64]) throws(WorkloadError) {
        enterKernel()
        let huge = try allocateHugeFrame()
        for gva in region {
            guard let page = processes[pid]!.pages.removeValue(forKey: gva) else { continue }
            copy(page.frame, to: huge + (gva - base))
            releaseFrame(page.frame)
        }
        rewrite(pid, base, UserPage(frame: huge, writable: true, copyOnWrite: false, executable: false, huge: true), level: 2)
        flush(pid, nil)
        returnToUser()
    }

    private mutating func touchHuge(_ pid: Int, _ base: UInt64) throws(WorkloadError) {
        let access = ScenarioDirective.access(kind: .write, gva: GuestVirtualAddress(base), cpl: 3, value: nonZeroValue())
        emit(access)
        enterKernel()
        let huge = try allocateHugeFrame()
        install(pid, base, UserPage(frame: huge, writable: true, copyOnWrite: false, executable: false, huge: true))
        returnToUser()
        emit(access)
        if case .access(_, _, _, let value?) = access { contentsSet(huge, value) }
    }

    /// A live migration's pre-copy loop: one process per vCPU writes its working set while the
    /// VMM logs dirty pages, reads and clears the log each round and "sends" what it reported; the
    /// writes shrink round by round, and a last round runs with the vCPUs stopped. Every read of
    /// the log is checked: a page changed since it was last sent and not reported is a page the
    /// destination would lack.
    /// One pass: the VMM reads the log (and, with manual protection, clears it, write-protecting
    /// the pages again before it sends them).
    private mutating func readDirtyLog() {
        emit(.dirtyLog(.get(slot: 0)))
        if parameters.dirtyLog == .manualProtect { emit(.dirtyLog(.clear(slot: 0, first: 0, count: memorySize >> 12))) }
    }

    mutating func runMigration() throws(WorkloadError) {
        phase("populate")
        for vcpu in 0..<vcpuCount {
            let pid = startProcess(on: vcpu)
            processes[pid]!.heapPages = (0..<UInt64(parameters.pages)).map { GuestOS.userHeap + $0 << 12 }
            for gva in processes[pid]!.heapPages { try userAccess(.write, gva) }
        }
        phase("pre-copy")
        if parameters.dirtyLog == .manualProtect { emit(.dirtyLog(.mode(.manualProtect, ringEntries: 4096))) }
        emit(.dirtyLog(.setLogging(slot: 0, enabled: true)))
        for round in 0..<parameters.iterations {
            let writes = max(1, parameters.pages * (parameters.iterations - round) / parameters.iterations)
            for vcpu in 0..<vcpuCount {
                onVCPU(vcpu)
                let heap = processes[running[vcpu]!]!.heapPages
                let hot = heap.prefix(max(1, heap.count / 4))
                for step in 0..<writes {
                    let page = step % 2 == 0 ? hot.randomElement(using: &random)! : heap.randomElement(using: &random)!
                    try userAccess(.write, page + (random.next() % 512) << 3)
                }
            }
            readDirtyLog()
        }
        phase("stop and copy")
        readDirtyLog()
        emit(.dirtyLog(.setLogging(slot: 0, enabled: false)))
        onVCPU(0)
    }
}
