import GuestMemory
import KVMMMU
import X86Paging

// Memslot changes and the dirty log, as KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG and
// KVM_CLEAR_DIRTY_LOG do them: the memslots' part in GuestMemory, the MMU's in KVMMMU.

/// How the VMM reads the dirty log.
public enum DirtyLogProtocol: String, Sendable, CaseIterable {
    /// KVM_GET_DIRTY_LOG takes the bits and write-protects their pages again in one step.
    case getAndReset = "reset"
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only copies the bitmap; the VMM clears
    /// (and so write-protects) ranges with KVM_CLEAR_DIRTY_LOG when it has copied their pages.
    case manualProtect = "manual"
    /// KVM_CAP_DIRTY_LOG_RING: each vCPU pushes the pages it dirties onto its own ring; the VMM
    /// harvests the rings and KVM_RESET_DIRTY_RINGS write-protects the harvested pages again.
    case ring = "ring"
}

/// One vCPU's dirty ring (`struct kvm_dirty_ring`): KVM pushes at the dirty index, the VMM
/// harvests from its fetch index (marking entries harvested), and KVM_RESET_DIRTY_RINGS recycles
/// the harvested entries from the reset index. Indexes only grow; an entry's slot is the index
/// modulo the size.
public struct DirtyRing: Sendable {
    /// One `struct kvm_dirty_gfn`: a slot and a page offset in it.
    public struct Entry: Sendable, Hashable {
        public var slot: Int
        public var offset: UInt64
    }

    /// Entries (a power of two).
    public let size: Int
    private var entries: [Entry]
    private(set) var dirtyIndex = 0
    private(set) var fetchIndex = 0
    private(set) var resetIndex = 0

    /// KVM_DIRTY_RING_RSVD_ENTRIES: room kept for the pushes one more entry can make (without
    /// PML, which shadow paging does not use, nothing is added to it).
    public static let reservedEntries = 64
    /// KVM_DIRTY_RING_MAX_ENTRIES.
    public static let maximumEntries = 65536

    init(size: Int) {
        self.size = size
        entries = [Entry](repeating: Entry(slot: 0, offset: 0), count: size)
    }

    /// Entries pushed and not yet reset.
    public var used: Int { dirtyIndex - resetIndex }
    /// `kvm_dirty_ring_soft_full`: the vCPU must exit (KVM_EXIT_DIRTY_RING_FULL) before it runs again.
    public var isSoftFull: Bool { used >= size - Self.reservedEntries }

    /// `kvm_dirty_ring_push`. False when the ring is completely full (KVM warns and drops it; the
    /// soft limit keeps that from happening).
    mutating func push(_ entry: Entry) -> Bool {
        guard used < size else { return false }
        entries[dirtyIndex & (size - 1)] = entry
        dirtyIndex += 1
        return true
    }

    /// What the VMM does: every entry not yet harvested, oldest first.
    mutating func harvest() -> [Entry] {
        let harvested = (fetchIndex..<dirtyIndex).map { entries[$0 & (size - 1)] }
        fetchIndex = dirtyIndex
        return harvested
    }

    /// Every entry pushed and not yet reset (harvested or not): pages whose next write KVM does
    /// not have to see, for the auditors.
    var unresetEntries: [Entry] { (resetIndex..<dirtyIndex).map { entries[$0 & (size - 1)] } }

    /// `kvm_dirty_ring_reset`: the harvested entries, which the caller re-protects; they are free again.
    mutating func takeHarvested() -> [Entry] {
        let harvested = (resetIndex..<fetchIndex).map { entries[$0 & (size - 1)] }
        resetIndex = fetchIndex
        return harvested
    }
}

extension VirtualMachine {
    /// Creates a slot of zeroed memory (KVM_MR_CREATE). The memslots generation moves on, so MMIO
    /// SPTEs made for that range before are stale.
    @discardableResult
    public func addMemslot(id: Int, base: GuestPhysicalAddress, size: UInt64, readOnly: Bool = false) throws(VirtualMachineError) -> Memslot {
        try changingMemslots { () throws(VirtualMachineError) in
            if let tdp {
                // Host frames aligned with the guest's modulo 2 MiB, as a VMM aligns its mapping, so
                // that 2 MiB-aligned guest pages can map huge.
                do {
                    return try tdp.addMemslot(id: id, base: base, size: size, flags: readOnly ? .readOnly : [], hostAlignment: 512)
                } catch {
                    throw .memslot("\(error)")
                }
            }
            do {
                return try memory.addSlot(id: id, base: base, size: size, flags: readOnly ? .readOnly : [])
            } catch {
                throw .memslot("\(error)")
            }
        }
    }

    /// Deletes a slot (KVM_MR_DELETE): KVM flushes the shadow MMU for it first
    /// (`kvm_arch_flush_shadow_memslot`, which with the default KVM_X86_QUIRK_SLOT_ZAP_ALL zaps
    /// every shadow page at once), while the slot's gfns still lead to their host frames.
    public func deleteMemslot(id: Int) throws(VirtualMachineError) {
        try changingMemslots { () throws(VirtualMachineError) in
            guard memory.slot(id: id) != nil else { throw .memslot("there is no memslot \(id)") }
            if let tdp {
                if hasNestedShadowPages { withShadowMMULock { mmu.zapAllFast() } }
                do { try tdp.deleteMemslot(id: id) } catch { throw .memslot("\(error)") }
                return
            }
            try withShadowMMULock { () throws(VirtualMachineError) in
                mmu.zapAllFast()
                do { try memory.deleteSlot(id: id) } catch { throw .memslot("\(error)") }
            }
        }
    }

    /// Moves a slot (KVM_MR_MOVE): the same memory at another guest-physical address; the shadow
    /// MMU is flushed as for a deletion.
    @discardableResult
    public func moveMemslot(id: Int, to base: GuestPhysicalAddress) throws(VirtualMachineError) -> Memslot {
        try changingMemslots { () throws(VirtualMachineError) in
            guard let slot = memory.slot(id: id) else { throw .memslot("there is no memslot \(id)") }
            guard base != slot.baseAddress else { return slot }
            do {
                // Refused layouts are refused before anything is zapped.
                try checkMove(slot, to: base)
                if let tdp {
                    if hasNestedShadowPages { withShadowMMULock { mmu.zapAllFast() } }
                    return try tdp.moveMemslot(id: id, to: base)
                }
                return try withShadowMMULock {
                    mmu.zapAllFast()
                    return try memory.moveSlot(id: id, to: base)
                }
            } catch let error as VirtualMachineError {
                throw error
            } catch {
                throw .memslot("\(error)")
            }
        }
    }

    private func checkMove(_ slot: Memslot, to base: GuestPhysicalAddress) throws(VirtualMachineError) {
        guard base.rawValue & 0xFFF == 0 else { throw .memslot("memslot \(slot.id): \(base) is not page-aligned") }
        let (end, overflow) = base.rawValue.addingReportingOverflow(slot.size)
        guard !overflow, end <= 1 << 52 else { throw .memslot("memslot \(slot.id): \(base)+\(hex(slot.size)) leaves the 52-bit space") }
        if let other = memory.slots.first(where: { $0.id != slot.id && $0.baseAddress.rawValue < end && base.rawValue < $0.baseAddress.rawValue + $0.size }) {
            throw .memslot("memslot \(slot.id) at \(base) would overlap \(other)")
        }
    }

    /// Turns a slot's dirty logging on or off (KVM_MEM_LOG_DIRTY_PAGES; `kvm_mmu_slot_apply_flags`).
    /// Turning it on gives the slot a clear bitmap and write-protects every SPTE mapping it, so
    /// that the first write to each page faults and is logged; then the TLBs are flushed.
    public func setDirtyLogging(slot id: Int, _ enabled: Bool) throws(VirtualMachineError) {
        try changingMemslots { () throws(VirtualMachineError) in
            guard let slot = memory.slot(id: id) else { throw .memslot("there is no memslot \(id)") }
            guard slot.logsDirtyPages != enabled else { return }
            var flags = slot.flags
            if enabled { flags.insert(.logDirtyPages) } else { flags.remove(.logDirtyPages) }
            if let tdp {
                // kvm_mmu_slot_apply_flags: eager splitting, write protection (or D bits cleared with
                // PML), a remote TLB flush, in the TDP MMU and in the rmaps of L2's shadow pages.
                do { try tdp.setMemslotFlags(id: id, flags: flags) } catch { throw .memslot("\(error)") }
                return
            }
            try withShadowMMULock { () throws(VirtualMachineError) in
                do { try memory.setFlags(id: id, flags: flags) } catch { throw .memslot("\(error)") }
                if enabled {
                    mmu.removeWriteAccess(from: slot)
                    mmu.flushRemoteTLBs()
                }
            }
        }
    }

    /// Chooses how the dirty log is read (KVM_ENABLE_CAP of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 or
    /// KVM_CAP_DIRTY_LOG_RING), which KVM refuses to change while a slot logs dirty pages; a ring
    /// (`ringEntries` entries a vCPU: a power of two from 256 to 65536) only before the first
    /// vCPU exists, and once chosen it stays.
    public func setDirtyLogProtocol(_ new: DirtyLogProtocol, ringEntries: Int = 4096) throws(VirtualMachineError) {
        try withSlotsLock { () throws(VirtualMachineError) in
            guard new != dirtyLogProtocol else { return }
            if dirtyLogProtocol == .ring { throw .memslot("a VM with dirty rings cannot go back to the dirty bitmap") }
            if let logging = memory.slots.first(where: \.logsDirtyPages) {
                throw .memslot("the dirty-log protocol cannot change while memslot \(logging.id) logs dirty pages")
            }
            if new == .ring {
                guard vcpus.isEmpty else { throw .memslot("dirty rings must be enabled before the first vCPU is created") }
                guard ringEntries >= 256, ringEntries <= DirtyRing.maximumEntries, ringEntries & (ringEntries - 1) == 0 else {
                    throw .memslot("a dirty ring holds a power of two of entries from 256 to \(DirtyRing.maximumEntries), not \(ringEntries)")
                }
                dirtyRingEntries = ringEntries
                if let tdp {
                    do { try tdp.setDirtyLogProtection(.automatic) } catch { throw .memslot("\(error)") }
                }
                memory.dirtyRingSink = { [unowned self] slot, offset in self.pushDirty(slot: slot, offset: offset) }
            } else if let tdp {
                do { try tdp.setDirtyLogProtection(new == .manualProtect ? .manual : .automatic) } catch { throw .memslot("\(error)") }
            }
            dirtyLogProtocol = new
        }
    }

    /// `mark_page_dirty_in_slot` with dirty rings: onto the running vCPU's ring. A write made
    /// with no vCPU running (the VMM's own, through KVM) goes to the slot's bitmap, as with
    /// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
    private func pushDirty(slot: Int, offset: UInt64) {
        if let vcpu = Self.running.vcpu, vcpu.vm === self, vcpu.pushDirty(DirtyRing.Entry(slot: slot, offset: offset)) { return }
        let sink = memory.dirtyRingSink
        memory.dirtyRingSink = nil
        defer { memory.dirtyRingSink = sink }
        if let slot = memory.slot(id: slot) { memory.markDirty(GuestFrameNumber(slot.baseFrame.rawValue + offset)) }
    }

    /// The gfns on the vCPUs' rings that no KVM_RESET_DIRTY_RINGS has re-protected yet.
    func unresetDirtyRingGFNs() -> Set<UInt64> {
        var gfns = Set<UInt64>()
        for vcpu in vcpus {
            for entry in vcpu.dirtyRing?.unresetEntries ?? [] {
                guard let slot = memory.slot(id: entry.slot) else { continue }
                gfns.insert(slot.baseFrame.rawValue + entry.offset)
            }
        }
        return gfns
    }

    /// What the VMM reads from every vCPU's ring (and, for writes made with no vCPU running, the
    /// slots' bitmaps), marking the entries harvested: each as (slot, gfn), ring by ring, oldest
    /// first.
    public func harvestDirtyRings() -> [(slot: Int, gfn: GuestFrameNumber)] {
        var harvested: [(slot: Int, gfn: GuestFrameNumber)] = []
        for vcpu in vcpus {
            for entry in vcpu.harvestDirtyRing() {
                guard let slot = memory.slot(id: entry.slot) else { continue }  // deleted since
                harvested.append((entry.slot, GuestFrameNumber(slot.baseFrame.rawValue + entry.offset)))
            }
        }
        for slot in memory.slots where slot.logsDirtyPages {
            guard let bitmap = try? memory.getAndClearDirtyLog(slot: slot.id) else { continue }
            for gfn in Self.frames(in: bitmap, base: slot.baseFrame.rawValue) { harvested.append((slot.id, gfn)) }
        }
        return harvested
    }

    /// KVM_RESET_DIRTY_RINGS: the harvested entries of every ring are write-protected again
    /// (their pages' next write is pushed anew) and their room freed; one TLB flush if any were.
    /// Returns how many entries were reset.
    @discardableResult
    public func resetDirtyRings() -> Int {
        if tdp == nil { return withShadowMMULock { resetDirtyRingsLocked() } }
        return resetDirtyRingsLocked()
    }

    private func resetDirtyRingsLocked() -> Int {
        var reset = 0
        var flush = false
        for vcpu in vcpus {
            for entry in vcpu.takeHarvestedDirtyEntries() {
                reset += 1
                guard let slot = memory.slot(id: entry.slot), slot.logsDirtyPages else { continue }
                if let tdp {
                    // kvm_arch_mmu_enable_log_dirty_pt_masked: D cleared with PML, else W, in the TDP
                    // MMU and in the rmaps of L2's shadow pages.
                    let offset = entry.offset & ~63, mask = UInt64(1) << (entry.offset & 63)
                    try? tdp.enableLogDirtyMasked(slot: entry.slot, gfnOffset: offset, mask: mask)
                    flush = true
                    continue
                }
                if mmu.writeProtect(base: GuestFrameNumber(slot.baseFrame.rawValue + entry.offset), mask: 1) { flush = true }
            }
        }
        if flush { mmu.flushRemoteTLBs() }
        return reset
    }

    /// KVM_GET_DIRTY_LOG: the gfns of the slot written since the last read (get-and-reset) or
    /// whose bits have not been cleared (manual protection), in ascending order. Get-and-reset
    /// write-protects the pages it reports in the same step and flushes the TLBs if it did.
    public func getDirtyLog(slot id: Int) throws(VirtualMachineError) -> [GuestFrameNumber] {
        let (bitmap, base) = try getDirtyLogBitmap(slot: id)
        return Self.frames(in: bitmap, base: base.rawValue)
    }

    /// KVM_GET_DIRTY_LOG as the ioctl returns it: the slot's dirty bitmap (bit `i` of word `w` is
    /// page `64 * w + i` of the slot), with the slot's first gfn; otherwise as `getDirtyLog`. A
    /// VMM migrating a large slot hands this bitmap back to KVM_CLEAR_DIRTY_LOG as it is.
    public func getDirtyLogBitmap(slot id: Int) throws(VirtualMachineError) -> (bitmap: [UInt64], base: GuestFrameNumber) {
        return try withSlotsLock { () throws(VirtualMachineError) in
            guard let slot = memory.slot(id: id) else { throw .memslot("there is no memslot \(id)") }
            if let tdp {
                do {
                    return (try tdp.getDirtyLog(slot: id), slot.baseFrame)
                } catch {
                    throw .memslot("\(error)")
                }
            }
            let bitmap = try withShadowMMULock { () throws(VirtualMachineError) -> [UInt64] in
                let bitmap: [UInt64]
                do {
                    bitmap = dirtyLogProtocol == .getAndReset ? try memory.getAndClearDirtyLog(slot: id) : try memory.dirtyBitmap(slot: id)
                } catch {
                    throw .memslot("\(error)")
                }
                if dirtyLogProtocol == .getAndReset {
                    var flush = false
                    for (word, mask) in bitmap.enumerated() where mask != 0 {
                        // KVM flushes whenever a word had bits, write-protected or not.
                        flush = true
                        mmu.writeProtect(base: GuestFrameNumber(slot.baseFrame.rawValue + UInt64(word) * 64), mask: mask)
                    }
                    if flush { mmu.flushRemoteTLBs() }
                }
                return bitmap
            }
            return (bitmap, slot.baseFrame)
        }
    }

    /// KVM_CLEAR_DIRTY_LOG (manual protection only): clears the bits of `count` pages from page
    /// `first` of the slot and write-protects the pages whose bits were set. KVM's rules: `first` a
    /// multiple of 64, `count` too unless the range ends at the slot's end, the range inside the
    /// slot. Returns the gfns whose bits were set.
    @discardableResult
    public func clearDirtyLog(slot id: Int, first: UInt64, count: UInt64) throws(VirtualMachineError) -> [GuestFrameNumber] {
        return try withSlotsLock { () throws(VirtualMachineError) in
            guard dirtyLogProtocol == .manualProtect else {
                throw .memslot("clearing the dirty log needs manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
            }
            guard let slot = memory.slot(id: id) else { throw .memslot("there is no memslot \(id)") }
            guard first & 63 == 0 else { throw .memslot("the first page to clear (\(first)) must be a multiple of 64") }
            guard first <= slot.pageCount, count <= slot.pageCount - first else {
                throw .memslot("pages \(first)..<\(first &+ count) are not all in memslot \(id) (\(slot.pageCount) pages)")
            }
            guard count & 63 == 0 || first + count == slot.pageCount else {
                throw .memslot("the page count (\(count)) must be a multiple of 64 unless the range ends at the slot's end")
            }
            guard count > 0 else { return [] }
            // KVM_CLEAR_DIRTY_LOG's bitmap: every page of the range, a word for each 64.
            var request = [UInt64](repeating: ~0, count: Int((count + 63) / 64))
            if count % 64 != 0 { request[request.count - 1] = (1 << (count % 64)) - 1 }
            if let tdp {
                // The bits that were set in the range, then the TDP MMU's KVM_CLEAR_DIRTY_LOG of it.
                let before: [UInt64]
                do { before = try memory.dirtyBitmap(slot: id) } catch { throw .memslot("\(error)") }
                var cleared = [UInt64](repeating: 0, count: request.count)
                for word in 0..<request.count {
                    let index = Int(first / 64) + word
                    if index < before.count { cleared[word] = before[index] & request[word] }
                }
                do { try tdp.clearDirtyLog(slot: id, firstPage: first, bitmap: request) } catch { throw .memslot("\(error)") }
                return Self.frames(in: cleared, base: slot.baseFrame.rawValue + first)
            }
            let cleared = try shadowClearDirtyLog(slot, firstPage: first, bitmap: request)
            return Self.frames(in: cleared, base: slot.baseFrame.rawValue + first)
        }
    }

    /// KVM_CLEAR_DIRTY_LOG as the ioctl takes it: the pages of `bitmap` (bit `i` of word `w` is
    /// page `firstPage + 64 * w + i` of the slot), normally the bits a KVM_GET_DIRTY_LOG returned
    /// and whose pages the VMM has copied, are cleared where set and write-protected again. Only
    /// those: a page dirtied since that get stays dirty for the next one.
    public func clearDirtyLog(slot id: Int, firstPage: UInt64, bitmap: [UInt64]) throws(VirtualMachineError) {
        try withSlotsLock { () throws(VirtualMachineError) in
            guard dirtyLogProtocol == .manualProtect else {
                throw .memslot("clearing the dirty log needs manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
            }
            guard let slot = memory.slot(id: id) else { throw .memslot("there is no memslot \(id)") }
            if let tdp {
                do { try tdp.clearDirtyLog(slot: id, firstPage: firstPage, bitmap: bitmap) } catch { throw .memslot("\(error)") }
                return
            }
            let pages = UInt64(bitmap.count) * 64
            guard firstPage & 63 == 0, firstPage < slot.pageCount, pages > 0,
                  firstPage + pages <= slot.pageCount || firstPage + pages - slot.pageCount < 64
            else { throw .memslot("pages \(firstPage)..<\(firstPage + pages) are not a range KVM_CLEAR_DIRTY_LOG takes in memslot \(id)") }
            _ = try shadowClearDirtyLog(slot, firstPage: firstPage, bitmap: bitmap)
        }
    }

    /// KVM_CLEAR_DIRTY_LOG under shadow paging, `mmu_lock` held for write: the bits of `bitmap`
    /// that were set are cleared, their pages write-protected and the TLBs flushed if any were.
    /// Returns the bits cleared, word by word.
    private func shadowClearDirtyLog(_ slot: Memslot, firstPage: UInt64, bitmap: [UInt64]) throws(VirtualMachineError) -> [UInt64] {
        try withShadowMMULock { () throws(VirtualMachineError) -> [UInt64] in
            var cleared = [UInt64](repeating: 0, count: bitmap.count)
            var flush = false
            for (word, requested) in bitmap.enumerated() where requested != 0 {
                let offset = firstPage + UInt64(word) * 64
                do { cleared[word] = try memory.clearDirty(slot: slot.id, firstPage: offset, mask: requested) } catch {
                    throw .memslot("\(error)")
                }
                guard cleared[word] != 0 else { continue }
                flush = true
                mmu.writeProtect(base: GuestFrameNumber(slot.baseFrame.rawValue + offset), mask: cleared[word])
            }
            if flush { mmu.flushRemoteTLBs() }
            return cleared
        }
    }

    /// A memslot change (KVM_SET_USER_MEMORY_REGION): under `slots_lock`, and with the memslots'
    /// srcu held for write, so that no vCPU's exit reads the memslots while they change.
    private func changingMemslots<Result>(_ body: () throws(VirtualMachineError) -> Result) throws(VirtualMachineError) -> Result {
        slotsLock.lockExclusive()
        defer { slotsLock.unlockExclusive() }
        memslotsSRCU.lockExclusive()
        defer { memslotsSRCU.unlockExclusive() }
        return try body()
    }

    /// A dirty-log operation, under `slots_lock` as KVM's ioctls take it.
    private func withSlotsLock<Result>(_ body: () throws(VirtualMachineError) -> Result) throws(VirtualMachineError) -> Result {
        slotsLock.lockExclusive()
        defer { slotsLock.unlockExclusive() }
        return try body()
    }

    static func frames(in bitmap: [UInt64], base: UInt64) -> [GuestFrameNumber] {
        var frames: [GuestFrameNumber] = []
        frames.reserveCapacity(bitmap.reduce(0) { $0 + $1.nonzeroBitCount })
        for (word, mask) in bitmap.enumerated() {
            var bits = mask
            while bits != 0 {
                frames.append(GuestFrameNumber(base + UInt64(word) * 64 + UInt64(bits.trailingZeroBitCount)))
                bits &= bits - 1
            }
        }
        return frames
    }
}
