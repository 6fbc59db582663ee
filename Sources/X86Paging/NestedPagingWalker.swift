// The nested walk: an L2 linear address through L2's own paging to an L2 guest-physical address,
// with every guest-physical address that walk uses (each L2 paging-structure entry, then the final
// address) itself translated through L1's EPT or NPT tables (SDM 29.3.3, APM 15.25.5-15.25.6).
// It is the same generic level loop twice over: `PageWalker` walks L2's tables in a
// `PhysicalMemory` whose frames are L2 guest-physical frames found through L1's tables.

/// L1's tables for L2's guest-physical addresses.
public enum NestedPagingTables: Sendable {
    /// L1's EPT.
    case ept(EPTWalker)
    /// L1's nested page tables: x86 tables walked in the paging mode L1 ran VMRUN in, every access
    /// a user access.
    case npt(PageWalker)
}

/// Which access an L2 paging-structure read is, as far as L1's tables are concerned.
public enum GuestTableAccessRule: Sendable, Hashable {
    /// The processor's: a read (under EPT A/D flags, a write: the EPT walker applies that), and a
    /// write for each A/D update the walk makes in L2's tables. Under NPT every guest table access
    /// is a user write, as the A/D updates may need it.
    case architectural
    /// KVM's nested MMU walk (`nested_access` in `FNAME(walk_addr_generic)`): every guest table
    /// access a write, whether or not it updates A/D bits.
    case alwaysWrite
}

/// Where L1's tables refused an address of L2's walk.
public struct NestedFaultSite: Sendable, Hashable {
    /// The L2 guest-physical address.
    public var address: GuestPhysicalAddress
    /// The level of L2's paging-structure entry being read or updated at `address`; 0 when
    /// `address` is the final translation of the linear address.
    public var guestLevel: Int
    /// The level of L1's table entry that refused it (for a misconfiguration, the one
    /// misconfigured).
    public var nestedLevel: Int

    @inlinable
    public init(address: GuestPhysicalAddress, guestLevel: Int, nestedLevel: Int) {
        self.address = address
        self.guestLevel = guestLevel
        self.nestedLevel = nestedLevel
    }

    /// The access was to the final translation rather than to one of L2's paging structures.
    @inlinable public var isFinal: Bool { guestLevel == 0 }
}

/// Why a nested walk gave no translation.
public enum NestedPagingFault: Error, Sendable, Equatable {
    /// L2's own fault (#PF with its error code, #GP): delivered to L2, no exit.
    case guest(WalkFault)
    /// An EPT violation: a VM exit to L1 with this exit qualification (bits 7 and 8 say whether the
    /// access was to one of L2's paging structures or to the final translation).
    case eptViolation(NestedFaultSite, qualification: EPTViolationQualification)
    /// An EPT misconfiguration: a VM exit to L1 (no qualification).
    case eptMisconfiguration(NestedFaultSite)
    /// A nested page fault (#NPF, VMEXIT_NPF) to L1: EXITINFO1 is this error code, with
    /// GUEST_FINAL (bit 32) or GUEST_PAGE (bit 33), and EXITINFO2 the site's address.
    case nestedPageFault(NestedFaultSite, errorCode: PageFaultErrorCode)
    /// L1 has no memory at this L1 guest-physical address, where L1's tables, or the L2 table
    /// they map, would be.
    case noMemory(GuestPhysicalAddress)

    /// The exit to L1 this fault makes, if it makes one.
    public var site: NestedFaultSite? {
        switch self {
        case .eptViolation(let site, _), .eptMisconfiguration(let site), .nestedPageFault(let site, _): site
        case .guest, .noMemory: nil
        }
    }
}

/// A successful nested walk.
public struct NestedPagingTranslation: Sendable, Equatable {
    /// L2's walk: the L2 guest-physical address and L2's combined permissions.
    public var guest: Translation
    /// L1's guest-physical address of the access.
    public var outputAddress: GuestPhysicalAddress
    /// L1's tables' combined permissions for the final address, as ACC bits (EPT: 1 supervisor
    /// execute, 2 write, 4 read, 8 user execute; NPT: 1 execute, 2 write, 4 user).
    public var nestedPermissions: UInt8
    /// The level of L1's leaf for the final address.
    public var nestedLevel: Int

    @inlinable
    public init(guest: Translation, outputAddress: GuestPhysicalAddress, nestedPermissions: UInt8, nestedLevel: Int) {
        self.guest = guest
        self.outputAddress = outputAddress
        self.nestedPermissions = nestedPermissions
        self.nestedLevel = nestedLevel
    }
}

/// L1's EPT walker in a box, so that a nested walk borrows it in place (see `LentNestedTables`).
@usableFromInline
final class EPTTablesBox: Sendable {
    @usableFromInline let walker: EPTWalker
    @usableFromInline init(_ walker: EPTWalker) { self.walker = walker }
}

/// L1's NPT walker in a box (see `EPTTablesBox`).
@usableFromInline
final class NPTTablesBox: Sendable {
    @usableFromInline let walker: PageWalker
    @usableFromInline init(_ walker: PageWalker) { self.walker = walker }
}

/// L1's tables, boxed: `NestedPagingTables` as a value carries the walker itself, which every
/// binding of its payload copied (a memcpy and the reference counting of its masks), once for each
/// of L2's table reads and again for the final translation.
@usableFromInline
enum BoxedNestedTables: Sendable {
    case ept(EPTTablesBox)
    case npt(NPTTablesBox)

    @inlinable
    init(_ tables: NestedPagingTables) {
        switch tables {
        case .ept(let walker): self = .ept(EPTTablesBox(walker))
        case .npt(let walker): self = .npt(NPTTablesBox(walker))
        }
    }

    /// The boxes lent without counting references, for the length of a walk that holds them.
    @inlinable
    var lent: LentNestedTables {
        switch self {
        case .ept(let box): .ept(.passUnretained(box))
        case .npt(let box): .npt(.passUnretained(box))
        }
    }
}

/// L1's tables lent to one walk: a trivial value, so that handing it to every table read neither
/// copies a walker nor retains one. Valid while the `BoxedNestedTables` it came from lives.
@usableFromInline
enum LentNestedTables {
    case ept(Unmanaged<EPTTablesBox>)
    case npt(Unmanaged<NPTTablesBox>)

    @inlinable var isEPT: Bool {
        if case .ept = self { return true }
        return false
    }
}

/// L2's walker in a box, borrowed in place by a walk: captured by the closure that lends the walk
/// its fault slot, the walker itself was copied (267 bytes) on every walk.
@usableFromInline
final class GuestWalkerBox: Sendable {
    @usableFromInline let walker: PageWalker
    @usableFromInline init(_ walker: PageWalker) { self.walker = walker }

    /// L2's walk, from a method: inlined into a closure the walker was still copied out of the box.
    @inlinable @inline(never)
    func translate<Memory: PhysicalMemory>(_ address: GuestVirtualAddress, _ access: Access, in memory: NestedTableMemory<Memory>,
                                           setAccessedDirty: Bool, fault: inout WalkFault?) -> Translation {
        walker.translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
    }
}

/// Walks L2's linear addresses through L2's paging and L1's EPT or NPT.
public struct NestedPagingWalker: Sendable {
    @usableFromInline let guestBox: GuestWalkerBox
    @usableFromInline let boxedTables: BoxedNestedTables
    public let rule: GuestTableAccessRule

    public init(guest: PageWalker, tables: NestedPagingTables, rule: GuestTableAccessRule = .architectural) {
        self.guestBox = GuestWalkerBox(guest)
        self.boxedTables = BoxedNestedTables(tables)
        self.rule = rule
    }

    /// L2's walker.
    public var guest: PageWalker { guestBox.walker }

    /// L1's tables.
    public var tables: NestedPagingTables {
        switch boxedTables {
        case .ept(let box): .ept(box.walker)
        case .npt(let box): .npt(box.walker)
        }
    }

    /// L2's walker for `registers`, with PAE's PDPTE registers loaded through L1's tables as VM
    /// entry or a MOV to CR3 in L2 loads them: guest-physical accesses with no linear address.
    public static func guestWalker<Memory: PhysicalMemory>(
        registers: PagingRegisters, cpu: CPUModel, tables: NestedPagingTables, memory: Memory
    ) throws(NestedGuestSetupError) -> PageWalker {
        var pdptes: [UInt64]?
        if registers.mode == .pae {
            var values: [UInt64] = []
            let boxed = BoxedNestedTables(tables)
            let base = registers.cr3 & 0xFFFF_FFE0
            for index in 0..<4 {
                let address = GuestPhysicalAddress(base + UInt64(index) * 8)
                var fault: NestedTableFault?
                let page = withExtendedLifetime(boxed) {
                    withUnsafeMutablePointer(to: &fault) { slot in
                        NestedTableMemory(tables: boxed.lent, memory: memory, writes: false, setAccessedDirty: true,
                                          origin: .guestPhysical, fault: slot).hostPage(address.frame)
                    }
                }
                guard let page else {
                    throw .pdpteLoad(fault?.fault(at: address, guestLevel: 3) ?? .noMemory(address))
                }
                // The PDPT is 32-byte aligned, so each PDPTE is 8-byte aligned in its page.
                values.append(UInt64(littleEndian: page.bytes.load(fromByteOffset: Int(address.pageOffset),
                                                                 as: UInt64.self)))
            }
            pdptes = values
        }
        do {
            return try PageWalker(registers: registers, cpu: cpu, memory: memory, pdpteValues: pdptes)
        } catch {
            throw .registers(error)
        }
    }

    /// Translates `address` for `access`. With `setAccessedDirty`, a successful walk sets the A/D
    /// bits of L2's entries and of L1's EPT/NPT entries it used, as the processor does; a
    /// faulting one sets none in L2's tables.
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool = true
    ) -> Result<NestedPagingTranslation, NestedPagingFault> {
        var fault: NestedPagingFault?
        let (translation, final) = walk(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
        if let fault { return .failure(fault) }
        return .success(NestedPagingTranslation(guest: translation, outputAddress: final.outputAddress,
                                                nestedPermissions: final.permissions, nestedLevel: final.level))
    }

    /// `translate` for hot paths: the fault goes to `sink`, and the result keeps what a TLB entry
    /// keeps, without either walk's path (a `Result` carrying them was copied at every step).
    @inlinable
    public func translate<Memory: PhysicalMemory, Sink: WalkFaultSink<NestedPagingFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool = true,
        sink: inout Sink
    ) throws(Sink.Failure) -> NestedWalkSummary {
        if guestBox.walker.mode == .disabled {
            return try translateWithGuestPagingOff(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &sink)
        }
        let (translation, final) = try walk(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &sink)
        return NestedWalkSummary(guestPhysicalAddress: translation.physicalAddress, outputAddress: final.outputAddress,
                                 nestedLevel: final.level, guestPermissions: translation.permissions,
                                 isGlobal: translation.isGlobal, nestedPermissions: final.permissions)
    }

    /// `translate(_:_:in:setAccessedDirty:sink:)` with L2's paging off: L2's linear address is its
    /// guest-physical address (32 bits wide, else #GP), with every permission and nothing to update
    /// in L2's tables, so only L1's tables are walked; L2's walker would build a translation (with
    /// its empty path) for the same answer.
    @inlinable
    func translateWithGuestPagingOff<Memory: PhysicalMemory, Sink: WalkFaultSink<NestedPagingFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool, sink: inout Sink
    ) throws(Sink.Failure) -> NestedWalkSummary {
        let physical = GuestPhysicalAddress(address.rawValue)
        guard address.rawValue >> 32 == 0 else {
            try sink.record(.guest(.addressTooWide(address, width: 32)))
            return NestedWalkSummary(guestPhysicalAddress: physical, outputAddress: GuestPhysicalAddress(0), nestedLevel: 0,
                                     guestPermissions: 0, isGlobal: false, nestedPermissions: 0)
        }
        // Paging off makes every address a supervisor-mode one for mode-based execute control.
        let final = try translateFinal(physical, access, userModeAddress: false, boxedTables.lent, memory,
                                       setAccessedDirty: setAccessedDirty, sink: &sink)
        return NestedWalkSummary(guestPhysicalAddress: physical, outputAddress: final.outputAddress, nestedLevel: final.level,
                                 guestPermissions: accessAll, isGlobal: false, nestedPermissions: final.permissions)
    }

    /// The walk both `translate`s make; on a fault, what it returns is not to be used.
    @inlinable @inline(__always)
    func walk<Memory: PhysicalMemory, Sink: WalkFaultSink<NestedPagingFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool, sink: inout Sink
    ) throws(Sink.Failure) -> (Translation, NestedFinalTranslation) {
        // `self` holds the boxes for the whole walk.
        let tables = boxedTables.lent
        let guest = Unmanaged.passUnretained(guestBox)
        let tableWrites = !tables.isEPT || rule == .alwaysWrite
        var tableFault: NestedTableFault?
        var guestFault: WalkFault?
        // Returned into this frame: no `Result` wraps (and copies) L2's translation.
        let translation = withUnsafeMutablePointer(to: &tableFault) { slot in
            guest._withUnsafeGuaranteedRef {
                $0.translate(address, access,
                             in: NestedTableMemory(tables: tables, memory: memory, writes: tableWrites,
                                                   setAccessedDirty: setAccessedDirty, origin: .guestPagingStructure,
                                                   fault: slot),
                             setAccessedDirty: setAccessedDirty, fault: &guestFault)
            }
        }
        if let guestFault {
            if case .noMemory(let tableAddress, let level, _) = guestFault {
                try sink.record(tableFault?.fault(at: tableAddress, guestLevel: level) ?? .noMemory(tableAddress))
            } else {
                try sink.record(.guest(guestFault))
            }
            return (translation, .failed)
        }
        // (Nothing to update with L2's paging off.)
        if setAccessedDirty && !tableWrites && translation.path.topLevel > 0,
           let refused = refusedAccessedDirtyUpdate(translation.path, access, tables, memory) {
            try sink.record(refused.fault.fault(at: refused.address, guestLevel: refused.level))
            return (translation, .failed)
        }
        // Under mode-based execute control a fetch needs bit 10 when the linear address is a
        // user-mode one: U/S set at every level of L2's walk (with L2's paging off, the model
        // takes every address as supervisor-mode).
        let final = try translateFinal(translation.physicalAddress, access, userModeAddress: translation.level > 0 && translation.isUser,
                                       tables, memory, setAccessedDirty: setAccessedDirty, sink: &sink)
        return (translation, final)
    }

    /// An L2 A/D update the walk skipped because L1's EPT does not let L2's table be written: the
    /// processor's write to that entry is an EPT violation. (A table in memory L1 itself cannot
    /// write, a read-only memslot, is skipped silently, as KVM does.)
    @inlinable
    func refusedAccessedDirtyUpdate<Memory: PhysicalMemory>(
        _ path: WalkPath, _ access: Access, _ tables: LentNestedTables, _ memory: Memory
    ) -> (fault: NestedTableFault, address: GuestPhysicalAddress, level: Int)? {
        guard path.topLevel > 0 else { return nil }
        var level = path.topIsRegister ? path.topLevel - 1 : path.topLevel
        while level >= path.bottomLevel {
            let needed: UInt64 = level == path.bottomLevel && access.kind == .write ? 0x60 : 0x20
            if path.entryValue(level: level) & needed != needed {
                let entryAddress = path.entryAddress(level: level)
                var fault: NestedTableFault?
                _ = withUnsafeMutablePointer(to: &fault) { slot in
                    NestedTableMemory(tables: tables, memory: memory, writes: true, setAccessedDirty: true,
                                      origin: .guestPagingStructure, fault: slot).hostPage(entryAddress.frame)
                }
                if let fault { return (fault, entryAddress, level) }
            }
            level -= 1
        }
        return nil
    }

    /// The final translation of L2's guest-physical `address` through L1's tables.
    @inlinable @inline(__always)
    func translateFinal<Memory: PhysicalMemory, Sink: WalkFaultSink<NestedPagingFault>>(
        _ address: GuestPhysicalAddress, _ access: Access, userModeAddress: Bool, _ tables: LentNestedTables,
        _ memory: Memory, setAccessedDirty: Bool, sink: inout Sink
    ) throws(Sink.Failure) -> NestedFinalTranslation {
        switch tables {
        case .ept(let box):
            var tableSink = NestedEPTFaultSink()
            let final = box._withUnsafeGuaranteedRef {
                let leaf = $0.walker.translateLeaf(address, EPTAccess(access.kind, origin: .finalTranslation,
                                                                      userModeAddress: userModeAddress),
                                                   in: memory, setAccessedDirty: setAccessedDirty, sink: &tableSink)
                return NestedFinalTranslation(outputAddress: leaf.outputAddress, level: leaf.level, permissions: leaf.permissions)
            }
            if let fault = tableSink.fault {
                try sink.record(fault.fault(at: address, guestLevel: 0))
                return .failed
            }
            return final
        case .npt(let box):
            var tableSink = NestedNPTFaultSink()
            let final = box._withUnsafeGuaranteedRef {
                let translation = $0.walker.translate(GuestVirtualAddress(address.rawValue), Access(access.kind, .user),
                                                      in: memory, setAccessedDirty: setAccessedDirty, sink: &tableSink)
                return NestedFinalTranslation(outputAddress: translation.physicalAddress, level: translation.level,
                                              permissions: translation.permissions)
            }
            if let fault = tableSink.fault {
                try sink.record(fault.fault(at: address, guestLevel: 0))
                return .failed
            }
            return final
        }
    }
}

/// A successful nested walk as a TLB entry keeps it: no walk path.
public struct NestedWalkSummary: Sendable, Equatable {
    /// L2's guest-physical address of the access.
    public var guestPhysicalAddress: GuestPhysicalAddress
    /// L1's guest-physical address of the access.
    public var outputAddress: GuestPhysicalAddress
    /// The level of L1's leaf for the final address.
    public var nestedLevel: Int
    /// L2's combined ACC bits (see `Translation.permissions`).
    public var guestPermissions: UInt8
    /// L2's leaf is global (G with CR4.PGE).
    public var isGlobal: Bool
    /// L1's tables' combined ACC bits for the final address (see `NestedPagingTranslation`).
    public var nestedPermissions: UInt8

    @inlinable
    public init(guestPhysicalAddress: GuestPhysicalAddress, outputAddress: GuestPhysicalAddress, nestedLevel: Int,
                guestPermissions: UInt8, isGlobal: Bool, nestedPermissions: UInt8) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.outputAddress = outputAddress
        self.nestedLevel = nestedLevel
        self.guestPermissions = guestPermissions
        self.isGlobal = isGlobal
        self.nestedPermissions = nestedPermissions
    }
}

/// The final translation through L1's tables, as much as a nested walk reports of it.
@usableFromInline
struct NestedFinalTranslation {
    @usableFromInline var outputAddress: GuestPhysicalAddress
    @usableFromInline var level: Int
    @usableFromInline var permissions: UInt8

    @inlinable
    init(outputAddress: GuestPhysicalAddress, level: Int, permissions: UInt8) {
        self.outputAddress = outputAddress
        self.level = level
        self.permissions = permissions
    }

    /// What a faulting walk returns beside its fault.
    @inlinable static var failed: Self { Self(outputAddress: GuestPhysicalAddress(0), level: 0, permissions: 0) }
}

/// L2's walker could not be built.
public enum NestedGuestSetupError: Error, Sendable, Equatable {
    case registers(ControlStateError)
    /// Loading a PAE PDPTE through L1's tables faulted (a VM exit to L1).
    case pdpteLoad(NestedPagingFault)
}

/// What L1's tables said about one of L2's table frames, or about the final address: as much of
/// the walk's fault as the exit needs. The walk's path stays behind: faults that carried it were
/// copied (a memcpy each) at every step out of the walk.
@usableFromInline
enum NestedTableFault {
    case eptViolation(EPTViolationQualification, level: Int)
    case eptMisconfiguration(level: Int)
    /// An address beyond 52 bits: not a guest-physical address.
    case eptAddressTooWide
    /// A #PF of the NPT walk: its architectural error code and the level that refused.
    case nptPageFault(errorCode: UInt64, level: Int)
    /// An address L1's NPT paging mode cannot hold (#GP or too wide for the walk).
    case nptUnaddressable
    /// L1's own table at this L1 address has no memory.
    case tableNoMemory(GuestPhysicalAddress)
    /// L1's tables map the frame to an L1 address without memory.
    case noMemory(GuestPhysicalAddress)

    @inlinable @inline(__always)
    init(_ fault: EPTWalkFault) {
        switch fault {
        case .violation(_, let qualification, let level, _): self = .eptViolation(qualification, level: level)
        case .misconfiguration(_, let level, _): self = .eptMisconfiguration(level: level)
        case .noMemory(let tableAddress, _, _): self = .tableNoMemory(tableAddress)
        case .addressTooWide: self = .eptAddressTooWide
        }
    }

    @inlinable @inline(__always)
    init(_ fault: WalkFault) {
        switch fault {
        case .pageFault(let pageFault): self = .nptPageFault(errorCode: UInt64(pageFault.errorCode.architectural), level: pageFault.level)
        case .noMemory(let tableAddress, _, _): self = .tableNoMemory(tableAddress)
        case .generalProtection, .addressTooWide: self = .nptUnaddressable
        }
    }

    /// The nested fault at `address`, met while reading L2's level-`guestLevel` entry (0: the
    /// final translation).
    @inlinable
    func fault(at address: GuestPhysicalAddress, guestLevel: Int) -> NestedPagingFault {
        switch self {
        case .eptViolation(let qualification, let level):
            return .eptViolation(NestedFaultSite(address: address, guestLevel: guestLevel, nestedLevel: level),
                                 qualification: qualification)
        case .eptMisconfiguration(let level):
            return .eptMisconfiguration(NestedFaultSite(address: address, guestLevel: guestLevel, nestedLevel: level))
        case .tableNoMemory(let tableAddress):
            return .noMemory(tableAddress)
        case .eptAddressTooWide:
            // An L2 table or page address beyond 52 bits cannot come out of an x86 entry.
            return .noMemory(address)
        case .nptPageFault(let errorCode, let level):
            var code = PageFaultErrorCode(rawValue: errorCode)
            code.insert(guestLevel == 0 ? .guestFinal : .guestPage)
            return .nestedPageFault(NestedFaultSite(address: address, guestLevel: guestLevel, nestedLevel: level),
                                    errorCode: code)
        case .nptUnaddressable:
            // An L2 guest-physical address L1's paging mode cannot hold: a #NPF that reports the
            // address as reserved, as the nested walk's RSVD fault would.
            return .nestedPageFault(NestedFaultSite(address: address, guestLevel: guestLevel, nestedLevel: 0),
                                    errorCode: [.present, .reservedBit, .user,
                                                guestLevel == 0 ? .guestFinal : .guestPage])
        case .noMemory(let l1Address):
            return .noMemory(l1Address)
        }
    }
}

/// The sink of a walk of L1's EPT: its fault, summarised where the walk records it.
@usableFromInline
struct NestedEPTFaultSink: WalkFaultSink {
    @usableFromInline var fault: NestedTableFault?
    @inlinable init() {}
    @inlinable @inline(__always)
    mutating func record(_ fault: EPTWalkFault) { self.fault = NestedTableFault(fault) }
}

/// The sink of a walk of L1's NPT (see `NestedEPTFaultSink`).
@usableFromInline
struct NestedNPTFaultSink: WalkFaultSink {
    @usableFromInline var fault: NestedTableFault?
    @inlinable init() {}
    @inlinable @inline(__always)
    mutating func record(_ fault: WalkFault) { self.fault = NestedTableFault(fault) }
}

/// L2's guest-physical memory as L2's walker reads its tables: each frame found through L1's
/// tables, then in L1's memory. A frame L1's tables refuse reads as no memory, with the refusal
/// kept in `fault` for the exit.
@usableFromInline
struct NestedTableMemory<Memory: PhysicalMemory>: PhysicalMemory {
    @usableFromInline let tables: LentNestedTables
    @usableFromInline let memory: Memory
    /// Table accesses go to L1's tables as writes.
    @usableFromInline let writes: Bool
    @usableFromInline let setAccessedDirty: Bool
    @usableFromInline let origin: EPTAccess.Origin
    /// The caller's slot for the first refusal (a walk stops at the first frame it cannot read).
    @usableFromInline let fault: UnsafeMutablePointer<NestedTableFault?>

    @inlinable
    init(tables: LentNestedTables, memory: Memory, writes: Bool, setAccessedDirty: Bool, origin: EPTAccess.Origin,
         fault: UnsafeMutablePointer<NestedTableFault?>) {
        self.tables = tables
        self.memory = memory
        self.writes = writes
        self.setAccessedDirty = setAccessedDirty
        self.origin = origin
        self.fault = fault
    }

    @inlinable
    func hostPage(_ frame: GuestFrameNumber) -> HostPage? {
        guard let (output, writable) = translate(frame, setAccessedDirty: setAccessedDirty) else {
            return nil
        }
        guard let page = memory.hostPage(output) else {
            fault.pointee = .noMemory(output.address)
            return nil
        }
        return HostPage(bytes: page.bytes, isWritable: page.isWritable && writable)
    }

    /// L2's table frame's L1 frame, and whether L1's tables let L2's walker write it.
    @inlinable
    func translate(_ frame: GuestFrameNumber, setAccessedDirty: Bool) -> (GuestFrameNumber, Bool)? {
        let kind: AccessKind = writes ? .write : .read
        switch tables {
        case .ept(let box):
            var sink = NestedEPTFaultSink()
            let translation = box._withUnsafeGuaranteedRef {
                $0.walker.translate(frame.address, EPTAccess(kind, origin: origin), in: memory,
                                    setAccessedDirty: setAccessedDirty, sink: &sink)
            }
            if let eptFault = sink.fault {
                fault.pointee = eptFault
                return nil
            }
            return (translation.outputAddress.frame, translation.isWritable)
        case .npt(let box):
            var sink = NestedNPTFaultSink()
            let translation = box._withUnsafeGuaranteedRef {
                $0.walker.translate(GuestVirtualAddress(frame.address.rawValue), Access(kind, .user), in: memory,
                                    setAccessedDirty: setAccessedDirty, sink: &sink)
            }
            if let nptFault = sink.fault {
                fault.pointee = nptFault
                return nil
            }
            return (translation.physicalAddress.frame, translation.isWritable)
        }
    }

    /// L2's walker wrote an A/D bit into `frame`: L1's memory records its own frame.
    @inlinable
    func didWriteEntry(in frame: GuestFrameNumber) {
        if let (output, _) = translate(frame, setAccessedDirty: false) { memory.didWriteEntry(in: output) }
    }
}
