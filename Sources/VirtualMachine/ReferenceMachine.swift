import GuestMemory
import X86Paging

/// A guest-visible outcome that no architecturally allowed execution could produce.
public struct LockstepDisagreement: Error, CustomStringConvertible, Sendable {
    public var address: GuestVirtualAddress
    public var access: Access
    /// What the architecture says, from the reference walk.
    public var expected: String
    /// What the virtualized guest saw.
    public var actual: String
    /// The guest entries involved: (level, entry GPA, value now).
    public var entries: [(level: Int, gpa: GuestPhysicalAddress, value: UInt64)]

    public var description: String {
        var lines = ["lockstep disagreement at \(address) (\(access.kind) by \(access.privilege))",
                     "  architecture: \(expected)", "  virtualized:  \(actual)"]
        for entry in entries {
            lines.append("  level \(entry.level) entry at \(entry.gpa) = \(hex(entry.value))")
        }
        return lines.joined(separator: "\n")
    }
}

/// The lockstep reference: for every guest access, what the architecture allows the guest to see.
/// The guest may keep using a translation it cached until it invalidates it (INVLPG, a CR3 load
/// for non-global ones, a paging-mode change for all), so the machine tracks, per page, the
/// translations still allowed besides the one a fresh walk gives. It also checks the guest's
/// accessed and dirty bits: every entry of a translation used has A set, a leaf used for a write
/// has D set, and a leaf the guest wrote with D clear is not dirtied without a write through it.
public final class ReferenceMachine {
    public let memory: MemslotSet
    public let cpu: CPUModel
    public private(set) var registers: PagingRegisters
    private var walker: PageWalker
    struct Cached {
        var gpaFrame: UInt64
        var permissions: UInt8
        var isGlobal: Bool
    }
    private var cached: [UInt64: [Cached]] = [:]
    /// Leaf entries (by GPA) the guest last wrote, with the value written.
    private var guestWrittenEntries: [UInt64: UInt64] = [:]
    /// Leaf entries a write access went through since the guest last wrote them.
    private var writtenThrough: Set<UInt64> = []
    public private(set) var checkedAccesses = 0

    public init(memory: MemslotSet, registers: PagingRegisters, cpu: CPUModel = CPUModel()) throws(ControlStateError) {
        self.memory = memory
        self.cpu = cpu
        self.registers = registers
        walker = try PageWalker(registers: registers, cpu: cpu, memory: memory)
    }

    /// The architecture's answer for an access about to be made (a probe: nothing is written).
    public func expect(_ address: GuestVirtualAddress, _ access: Access) -> Result<Translation, WalkFault> {
        walker.translate(address, access, in: memory, setAccessedDirty: false)
    }

    /// Checks the virtualized outcome of an access against `expected` (from `expect`, taken just
    /// before the access), then records what the access lets the guest cache.
    public func check(_ address: GuestVirtualAddress, _ access: Access, size: Int, value: UInt64,
                      expected: Result<Translation, WalkFault>, actual: AccessResult) throws(LockstepDisagreement) {
        checkedAccesses += 1
        let page = address.rawValue >> 12
        let allowedStale = cached[page] ?? []
        func fail(_ expectedText: String) -> LockstepDisagreement {
            LockstepDisagreement(address: address, access: access, expected: expectedText, actual: "\(actual)",
                                 entries: entries(of: expected))
        }
        func staleAllows(_ gpa: GuestPhysicalAddress) -> Bool {
            allowedStale.contains { $0.gpaFrame == gpa.frame.rawValue && !walker.rules.isRefused(
                access, pagePermissions: $0.permissions, alignmentCheck: registers.rflags.contains(.alignmentCheck)) }
        }
        switch (expected, actual) {
        case (.success(let translation), .completed(let gpa, _)), (.success(let translation), .mmio(let gpa, _)):
            if gpa != translation.physicalAddress && !staleAllows(gpa) {
                throw fail("translation to \(translation.physicalAddress)")
            }
            if gpa == translation.physicalAddress { try checkAccessedDirty(translation, access, fail) }
        case (.success(let translation), .pageFault(let code, let cr2)):
            // Only a cached translation with fewer rights can fault where a fresh walk would not.
            let staleRefuses = allowedStale.contains { walker.rules.isRefused(
                access, pagePermissions: $0.permissions, alignmentCheck: registers.rflags.contains(.alignmentCheck)) }
            if !(staleRefuses && code.contains(.present) && cr2 == address) {
                throw fail("translation to \(translation.physicalAddress)")
            }
        case (.failure(.pageFault(let fault)), .pageFault(let code, let cr2)):
            if code.architectural != fault.errorCode.architectural || cr2 != address {
                throw fail("#PF error code \(fault.errorCode)")
            }
        case (.failure(.pageFault(let fault)), .completed(let gpa, _)), (.failure(.pageFault(let fault)), .mmio(let gpa, _)):
            if !staleAllows(gpa) { throw fail("#PF error code \(fault.errorCode)") }
        case (.failure(.generalProtection), .generalProtection):
            break
        case (.failure(.noMemory), .pageFault(let code, _)):
            // KVM reports a guest table outside memory as a not-present #PF.
            if code.contains(.present) { throw fail("a paging-structure entry outside guest memory") }
        default:
            throw fail("\(expected)")
        }
        if case .success(let translation) = expected {
            switch actual {
            case .completed(let gpa, _) where gpa == translation.physicalAddress, .mmio(let gpa, _) where gpa == translation.physicalAddress:
                cached[page, default: []].append(Cached(gpaFrame: gpa.frame.rawValue, permissions: translation.permissions,
                                                        isGlobal: translation.isGlobal))
                if access.kind == .write { writtenThrough.insert(translation.path.entryAddress(level: translation.level).rawValue) }
            default:
                break
            }
        }
        if access.kind == .write, case .completed(let gpa, _) = actual { noteGuestWrite(gpa, size: size, value: value) }
    }

    /// A guest store landed at `gpa`: if it rewrote a paging entry, that entry's dirty state is
    /// now whatever the guest wrote.
    func noteGuestWrite(_ gpa: GuestPhysicalAddress, size: Int, value: UInt64) {
        let entryAddress = registers.mode == .legacy32 ? gpa.rawValue & ~3 : gpa.rawValue & ~7
        guestWrittenEntries[entryAddress] = readEntry(GuestPhysicalAddress(entryAddress))
        writtenThrough.remove(entryAddress)
    }

    private func checkAccessedDirty(_ translation: Translation, _ access: Access,
                                    _ fail: (String) -> LockstepDisagreement) throws(LockstepDisagreement) {
        let path = translation.path
        guard path.topLevel > 0 else { return }
        let first = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        guard first >= path.bottomLevel else { return }
        for level in stride(from: first, through: path.bottomLevel, by: -1) {
            let address = path.entryAddress(level: level)
            let now = readEntry(address)
            if now & (1 << 5) == 0 { throw fail("A set in the level-\(level) entry used") }
            if level == path.bottomLevel {
                if access.kind == .write && now & (1 << 6) == 0 { throw fail("D set in the leaf written through") }
                if now & (1 << 6) != 0, let written = guestWrittenEntries[address.rawValue], written & (1 << 6) == 0,
                   !writtenThrough.contains(address.rawValue) && access.kind != .write {
                    throw fail("D clear: the guest wrote this leaf clean and nothing wrote through it since")
                }
            }
        }
    }

    private func readEntry(_ address: GuestPhysicalAddress) -> UInt64 {
        if registers.mode == .legacy32 { return UInt64((try? memory.load32(address)) ?? 0) }
        return (try? memory.load64(address)) ?? 0
    }

    private func entries(of expected: Result<Translation, WalkFault>) -> [(level: Int, gpa: GuestPhysicalAddress, value: UInt64)] {
        let path: WalkPath
        switch expected {
        case .success(let translation): path = translation.path
        case .failure(.pageFault(let fault)): path = fault.path
        case .failure(.noMemory(_, _, let walked)): path = walked
        default: return []
        }
        return path.levels.map { ($0, path.entryAddress(level: $0), readEntry(path.entryAddress(level: $0))) }
    }

    // MARK: Invalidation

    public func invalidatePage(_ address: GuestVirtualAddress) { cached[address.rawValue >> 12] = nil }

    /// New registers: what the write invalidates is the architecture's rule (a CR3 change drops
    /// the non-global translations; a change of paging, PGE, PAE, PCIDE 1 -> 0 or SMEP 0 -> 1 drops
    /// all), and PAE's PDPTE registers are reloaded only by the writes that reload them.
    public func setRegisters(_ new: PagingRegisters) throws(ControlStateError) {
        let old = registers
        let keptPDPTEs = new.mode == .pae && !new.reloadsPDPTEs(from: old) && new.cr3 == old.cr3
            ? (0..<4).map { walker.pdpte($0).rawValue } : nil
        let newWalker = try PageWalker(registers: new, cpu: cpu, memory: memory, pdpteValues: keptPDPTEs)
        registers = new
        walker = newWalker
        if new.invalidatesAllTranslations(from: old) {
            cached.removeAll()
        } else if new.cr3 != old.cr3 {
            dropNonGlobalTranslations()
        }
    }

    /// A CR3 load (also of the same value): non-global translations go, and PAE paging reloads
    /// its PDPTEs from memory.
    public func reloadCR3() {
        if let reloaded = try? PageWalker(registers: registers, cpu: cpu, memory: memory) { walker = reloaded }
        dropNonGlobalTranslations()
    }

    private func dropNonGlobalTranslations() {
        for (page, list) in cached {
            let kept = registers.cr4.contains(.globalPages) ? list.filter(\.isGlobal) : []
            cached[page] = kept.isEmpty ? nil : kept
        }
    }
}
