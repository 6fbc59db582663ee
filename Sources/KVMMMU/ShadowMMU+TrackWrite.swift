import GuestMemory
import X86Paging

extension ShadowMMU {
    /// KVM's write-flood threshold: emulated writes to one shadowed table without an intervening use.
    public static let writeFloodThreshold = 3

    /// The shadow page whose table holds the host-physical address, if any.
    public func shadowPage(containingHostAddress address: UInt64) -> ShadowPage? {
        directory.page(address >> 12)
    }

    /// `kvm_mmu_track_write`: the guest wrote `bytes` bytes at `gpa` through the emulator (the new
    /// bytes are already in memory). Every SPTE shadowing a written guest entry is zapped; a
    /// misaligned write or a flood of writes zaps the whole shadow page. `fourByteGuestEntries`
    /// says whether the vCPU pages with 4-byte entries; the written entry is read back as KVM does.
    public func trackWrite(_ gpa: GuestPhysicalAddress, bytes: Int, fourByteGuestEntries: Bool) {
        guard indirectShadowPages > 0 else { return }
        let newEntry = writtenEntry(gpa, bytes: bytes, fourByte: fourByteGuestEntries)
        stats.mmuPTEWrite += 1
        var flush = false
        for page in gptePages(at: gpa.frame) {
            if isMisaligned(page, gpa, bytes: bytes) || isFlooded(page) {
                zap(page)
                stats.mmuFlooded += 1
                continue
            }
            guard let (first, count) = writtenSPTEs(page, gpa) else { continue }
            for index in first..<first + count {
                let pointer = page.spte(index)
                let wasPresent = SPTE(rawValue: pointer.pointee).isShadowPresent
                zapPTE(pointer, in: page)
                if newEntry != 0 && page.level != 1 { stats.mmuPDEZapped += 1 }
                if wasPresent { flush = true }
            }
        }
        if flush { flushRemoteTLBs() }
    }

    /// `mmu_pte_write_fetch_gpte`: the entry as written, read back from memory (a 4-byte write to
    /// an 8-byte entry reads the whole entry); 0 for writes of other sizes.
    private func writtenEntry(_ gpa: GuestPhysicalAddress, bytes: Int, fourByte: Bool) -> UInt64 {
        var address = gpa.rawValue
        var size = bytes
        if !fourByte && bytes == 4 {
            address &= ~7
            size = 8
        }
        switch size {
        case 4: return UInt64((try? memory.load32(GuestPhysicalAddress(address))) ?? 0)
        case 8: return (try? memory.load64(GuestPhysicalAddress(address))) ?? 0
        default: return 0
        }
    }

    /// `detect_write_misaligned`: a write not confined to one guest entry, or narrower than 4
    /// bytes (except a single byte at an entry's start, which is how Linux clears status bits).
    private func isMisaligned(_ page: ShadowPage, _ gpa: GuestPhysicalAddress, bytes: Int) -> Bool {
        let offset = gpa.pageOffset
        let entrySize = UInt64(page.guestEntrySize)
        if offset & (entrySize - 1) == 0 && bytes == 1 { return false }
        let spansEntries = (offset ^ (offset + UInt64(bytes) - 1)) & ~(entrySize - 1) != 0
        return spansEntries || bytes < 4
    }

    /// `detect_write_flooding`: upper-level pages only.
    private func isFlooded(_ page: ShadowPage) -> Bool {
        guard page.level > 1 else { return false }
        page.writeFloodingCount += 1
        return page.writeFloodingCount >= Self.writeFloodThreshold
    }

    /// `get_written_sptes`: the SPTEs of `page` that shadow the entry written at `gpa`. A 4-byte
    /// guest PDE (4 MiB) is shadowed by two 8-byte PDEs (2 MiB each); a 4-byte guest table is
    /// split between two quadrant pages, and the write may belong to the other one.
    private func writtenSPTEs(_ page: ShadowPage, _ gpa: GuestPhysicalAddress) -> (first: Int, count: Int)? {
        var offset = gpa.pageOffset
        var count = 1
        if page.role.hasFourByteGPTE {
            offset <<= 1
            if page.level == 2 {
                offset &= ~7
                offset <<= 1
                count = 2
            }
            let quadrant = Int(offset >> 12)
            offset &= pageOffsetMask
            if quadrant != page.role.quadrant { return nil }
        }
        return (Int(offset / 8), count)
    }
}
