import GuestMemory
import KVMMMU
import X86Paging

// The lockstep reference for L2: what the architecture allows an L2 access for the composed
// translation (L2's paging, then L1's EPT or NPT, both read from L1's memory): the same host page,
// the same L2 fault, or the same exit to L1 with the same qualification (or #NPF error code) for
// the same L2 guest-physical address, reported at the same level of L2's walk. The architecture's
// side is X86Paging's `NestedPagingWalker`, never KVM's walk.
//
// Guest-physical translations derived from L1's EPT may be cached until L1's INVEPT (SDM 29.4):
// KVM's unsync shadow pages of L1's last-level EPT tables keep entries L1 has since changed, and
// nested EPT is synced only when a root is loaded anew (after INVEPT). Such translations can only
// have been cached while L2 ran, i.e. from the tables as they were at a VM entry: the check also
// accepts an outcome that a walk over L1's last-level EPT tables as one of the VM entries since
// the covering INVEPT left them would give (`EPTTableSnapshot`). (Under NPT, KVM syncs at every
// VMRUN, so only the newest walk is accepted.)

extension VCPU {
    /// The architecture's answer for L2's access at `address` now. Its walk sets the A/D bits the
    /// access sets (in L2's tables and, with EPTP.AD, in L1's EPT), as the processor would.
    public func architecturalL2(_ address: GuestVirtualAddress,
                                _ access: Access) throws(VirtualMachineError) -> Result<NestedPagingTranslation, NestedPagingFault> {
        guard let nested else { throw .invalidAccess("vCPU \(id) has never entered L2") }
        let guest: PageWalker
        do {
            guest = try NestedPagingWalker.guestWalker(registers: nested.registers, cpu: vm.cpu, tables: nested.l1Tables,
                                                       memory: vm.memory)
        } catch {
            throw .invalidAccess("the architecture cannot load L2's registers: \(error)")
        }
        return NestedPagingWalker(guest: guest, tables: nested.l1Tables).translate(address, access, in: vm.memory)
    }

    /// Checks an L2 access's outcome against the architecture's answer `expected` (from
    /// `architecturalL2`, asked after the access: the access's own A/D updates leave the answer
    /// unchanged). Throws the disagreement.
    public func checkL2(_ outcome: L2AccessOutcome, at address: GuestVirtualAddress, _ access: Access,
                        expected: Result<NestedPagingTranslation, NestedPagingFault>) throws(LockstepDisagreement) {
        if Self.l2OutcomeAgrees(outcome, expected, memory: vm.memory) { return }
        if let nested, agreesWithStaleEPT(outcome, address, access, nested) { return }
        throw LockstepDisagreement(address: address, access: access, expected: "\(expected)",
                                   actual: "\(outcome.result) (level \(outcome.exitGuestLevel.map(String.init) ?? "-"))",
                                   entries: [])
    }

    /// Whether the outcome is the architecture's answer for L1's EPT as one of the VM entries
    /// since the last covering INVEPT left its last-level tables (upper levels as they are now:
    /// KVM write-tracks them, so they are never stale).
    private func agreesWithStaleEPT(_ outcome: L2AccessOutcome, _ address: GuestVirtualAddress, _ access: Access,
                                    _ nested: NestedVCPUState) -> Bool {
        guard case .ept(let pointer, _) = nested.paging,
              let guest = try? NestedPagingWalker.guestWalker(registers: nested.registers, cpu: vm.cpu, tables: nested.l1Tables,
                                                              memory: vm.memory)
        else { return false }
        let walker = NestedPagingWalker(guest: guest, tables: nested.l1Tables)
        for snapshot in nested.eptSnapshots.reversed() where snapshot.rootAddress == pointer.rootAddress {
            let stale = walker.translate(address, access, in: SnapshotMemory(memory: vm.memory, snapshot: snapshot),
                                         setAccessedDirty: false)
            if Self.l2OutcomeAgrees(outcome, stale, memory: vm.memory) { return true }
        }
        return false
    }

    /// Whether the outcome is exactly `expected` (no stale translation allowed).
    public static func l2OutcomeAgrees(_ outcome: L2AccessOutcome, _ expected: Result<NestedPagingTranslation, NestedPagingFault>,
                                memory: MemslotSet) -> Bool {
        switch (expected, outcome.result) {
        case (.success(let translation), .completed(let gpa, let hostAddress, _)):
            guard let frame = memory.hostFrame(of: translation.outputAddress.frame) else { return false }
            return gpa == translation.guest.physicalAddress
                && hostAddress == frame.rawValue << 12 | translation.outputAddress.pageOffset
        case (.success(let translation), .mmio(let l1GPA, _)):
            // KVM's emulator sends to the VMM what no writable memslot holds.
            let slot = memory.slot(containing: l1GPA.frame)
            return l1GPA == translation.outputAddress && (slot == nil || slot?.flags.contains(.readOnly) == true)
        case (.failure(.guest(.pageFault(let fault))), .pageFault(let errorCode, _)):
            return errorCode.rawValue == UInt64(fault.errorCode.architectural)
        case (.failure(.guest(.generalProtection)), .generalProtection), (.failure(.guest(.addressTooWide)), .generalProtection):
            return true
        case (.failure(.eptViolation(let site, let qualification)), .exitToL1(.eptViolation(let address, let reflected))):
            return address == site.address && reflected == qualification && outcome.exitGuestLevel == site.guestLevel
        case (.failure(.eptMisconfiguration(let site)), .exitToL1(.eptMisconfiguration(let address))):
            return address == site.address && outcome.exitGuestLevel == site.guestLevel
        case (.failure(.nestedPageFault(let site, let code)), .exitToL1(.nestedPageFault(let address, let reflected))):
            return address == site.address && reflected == code && outcome.exitGuestLevel == site.guestLevel
        default:
            return false
        }
    }
}

/// L1's last-level EPT tables reachable from an EPTP, copied at a VM entry.
final class EPTTableSnapshot {
    let rootAddress: UInt64
    /// L1 gfn of a last-level table -> a copy of its 4 KiB.
    private(set) var pages: [UInt64: UnsafeMutableRawPointer] = [:]

    /// Walks L1's EPT from the root (a table seen twice, as hostile tables may link, is read once).
    init(_ pointer: EPTPointer, memory: MemslotSet) {
        rootAddress = pointer.rootAddress
        var visited = Set<UInt64>()
        var pending = [(frame: pointer.rootAddress >> 12, level: pointer.levels)]
        while let (frame, level) = pending.popLast() {
            guard visited.insert(frame).inserted, let page = memory.hostPage(GuestFrameNumber(frame)) else { continue }
            if level == 1 {
                let copy = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
                copy.copyMemory(from: page.bytes, byteCount: 4096)
                pages[frame] = copy
                continue
            }
            for index in 0..<512 {
                let entry = page.bytes.load(fromByteOffset: index * 8, as: UInt64.self)
                // Present (any of R, W, X) and not a large leaf: a table one level down.
                guard entry & 0x7 != 0, entry & 0x80 == 0 else { continue }
                pending.append(((entry & 0x000F_FFFF_FFFF_F000) >> 12, level - 1))
            }
        }
    }

    deinit { for page in pages.values { page.deallocate() } }

    /// Whether it holds what `other` holds.
    func sameTables(as other: EPTTableSnapshot) -> Bool {
        rootAddress == other.rootAddress && pages.count == other.pages.count
            && pages.allSatisfy { frame, copy in other.pages[frame].map { Self.equalPages($0, copy) } ?? false }
    }

    private static func equalPages(_ a: UnsafeMutableRawPointer, _ b: UnsafeMutableRawPointer) -> Bool {
        (0..<512).allSatisfy { a.load(fromByteOffset: $0 * 8, as: UInt64.self) == b.load(fromByteOffset: $0 * 8, as: UInt64.self) }
    }
}

/// L1's memory with its last-level EPT tables as a snapshot has them (read-only: the probe
/// walks set no A/D bits).
private struct SnapshotMemory: PhysicalMemory {
    let memory: MemslotSet
    let snapshot: EPTTableSnapshot

    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        if let copy = snapshot.pages[frame.rawValue] { return HostPage(bytes: copy, isWritable: false) }
        return memory.hostPage(frame)
    }
}

extension NestedVCPUState {
    /// A VM entry under EPT: the last-level tables as L2 will run over them (kept unless they
    /// are what the newest snapshot of the same root holds already).
    func recordEPTSnapshot(_ pointer: EPTPointer, memory: MemslotSet) {
        let snapshot = EPTTableSnapshot(pointer, memory: memory)
        if let newest = eptSnapshots.last(where: { $0.rootAddress == snapshot.rootAddress }), newest.sameTables(as: snapshot) {
            return
        }
        eptSnapshots.append(snapshot)
    }

    /// INVEPT: the translations it invalidates can no longer be used.
    func forgetEPTSnapshots(_ type: INVEPTType) {
        switch type {
        case .allContexts: eptSnapshots.removeAll()
        case .singleContext(let pointer): eptSnapshots.removeAll { $0.rootAddress == pointer.rootAddress }
        }
    }
}
