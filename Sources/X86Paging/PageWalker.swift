// The reference walker: the architecture's answer for one linear-address access in any paging mode.

/// The register state a page walk depends on.
public struct PagingRegisters: Hashable, Sendable {
    public var cr0: CR0
    /// The raw CR3: the root table plus, depending on mode, PCID or PWT/PCD bits.
    public var cr3: UInt64
    public var cr4: CR4
    public var efer: EFER
    public var pkru: PKRU
    /// IA32_PKRS, used with CR4.PKS.
    public var pkrs: PKRS
    public var rflags: RFLAGS

    public init(cr0: CR0 = [], cr3: UInt64 = 0, cr4: CR4 = [], efer: EFER = [],
                pkru: PKRU = .allowAll, pkrs: PKRS = .allowAll, rflags: RFLAGS = []) {
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.pkru = pkru
        self.pkrs = pkrs
        self.rflags = rflags
    }

    /// Long mode is active when paging is on with EFER.LME set (the processor then sets LMA).
    public var isLongModeActive: Bool { cr0.contains(.paging) && efer.contains(.longModeEnable) }

    public var mode: PagingMode {
        guard cr0.contains(.paging) else { return .disabled }
        guard cr4.contains(.physicalAddressExtension) else { return .legacy32 }
        guard isLongModeActive else { return .pae }
        return cr4.contains(.la57) ? .fiveLevel : .fourLevel
    }

    /// Whether moving from `old` to these registers loads the PAE PDPTE registers from memory
    /// (SDM 4.4.1), other than by a MOV to CR3 (which always does under PAE paging): PAE paging
    /// results and the write changed CR0.CD, CR0.NW or CR0.PG, or CR4.PAE, CR4.PGE, CR4.PSE or
    /// CR4.SMEP. Any other write leaves the PDPTE registers as they were, whatever memory says.
    public func reloadsPDPTEs(from old: PagingRegisters) -> Bool {
        guard mode == .pae else { return false }
        let cr0Bits = CR0(rawValue: 1 << 30 | 1 << 29).union(.paging)  // CD, NW, PG
        let cr4Bits: CR4 = [.physicalAddressExtension, .globalPages, .pageSizeExtensions, .smep]
        return !CR0(rawValue: cr0.rawValue ^ old.cr0.rawValue).isDisjoint(with: cr0Bits)
            || !CR4(rawValue: cr4.rawValue ^ old.cr4.rawValue).isDisjoint(with: cr4Bits)
    }

    /// Which cached translations a write from `old` to these registers invalidates, CR3 aside
    /// (SDM 4.10.4.1): a change of CR0.PG, of CR4.PGE, CR4.PAE, or CR4.PCIDE 1 -> 0, or CR4.SMEP
    /// 0 -> 1 invalidates all of them, global ones too; nothing else does (CR0.WP, EFER, RFLAGS.AC
    /// and PKRU changes keep every translation, to be checked under the new rules).
    public func invalidatesAllTranslations(from old: PagingRegisters) -> Bool {
        let cr4Changed = CR4(rawValue: cr4.rawValue ^ old.cr4.rawValue)
        return cr0.contains(.paging) != old.cr0.contains(.paging)
            || cr4Changed.contains(.globalPages) || cr4Changed.contains(.physicalAddressExtension)
            || (old.cr4.contains(.pcidEnable) && !cr4.contains(.pcidEnable))
            || (cr4.contains(.smep) && !old.cr4.contains(.smep))
    }
}

/// A register state the processor would refuse (a #GP on the MOV that made it).
public enum ControlStateError: Error, Equatable, Sendable, CustomStringConvertible {
    case pagingWithoutProtection
    case longModeWithoutPAE
    case inconsistentLongModeActive
    case la57Unsupported
    case noExecuteUnsupported
    case cr3ReservedBits(UInt64)
    /// A present PAE PDPTE with reserved bits: MOV CR3 raises #GP.
    case pdpteReservedBits(index: Int, value: UInt64)
    /// The PDPT that CR3 names has no memory behind it.
    case pdpteUnreadable(GuestPhysicalAddress)

    public var description: String {
        switch self {
        case .pagingWithoutProtection: "CR0.PG=1 requires CR0.PE=1"
        case .longModeWithoutPAE: "EFER.LME with CR0.PG=1 requires CR4.PAE=1"
        case .inconsistentLongModeActive: "EFER.LMA is set but EFER.LME and CR0.PG are not both set"
        case .la57Unsupported: "CR4.LA57 is set but the CPU model has no 5-level paging"
        case .noExecuteUnsupported: "EFER.NXE is set but the CPU model has no NX"
        case .cr3ReservedBits(let bits): "CR3 has reserved bits set (\(hex(bits))) beyond MAXPHYADDR"
        case .pdpteReservedBits(let index, let value):
            "PDPTE \(index) (\(hex(value))) is present with reserved bits set; MOV CR3 would #GP"
        case .pdpteUnreadable(let address): "the PAE PDPT at \(address) has no memory behind it"
        }
    }
}

/// A successful translation.
public struct Translation: Sendable, Equatable {
    // Word-sized fields first and the bytes last, with no padding between them: copying a result
    // with interior padding out of the walk stalled on store forwarding (measured: a third of a
    // 4-level walk).
    public var path: WalkPath
    public var linearAddress: GuestVirtualAddress
    public var physicalAddress: GuestPhysicalAddress
    /// The leaf's level (1 = PTE, 2 = PDE, 3 = PDPTE); 0 with paging disabled.
    public var level: Int
    public var pageSize: UInt64
    /// The leaf's protection key (IA-32e paging; 0 otherwise).
    public var protectionKey: Int
    /// `permissions` in bits 7:0 and `isGlobal` in bit 8: one word, for the same reason.
    @usableFromInline var attributes: UInt64

    /// Combined ACC bits over every level (1 execute, 2 write, 4 user).
    @inlinable public var permissions: UInt8 {
        get { UInt8(truncatingIfNeeded: attributes) }
        set { attributes = attributes & ~0xFF | UInt64(newValue) }
    }
    /// The leaf's G bit with CR4.PGE set.
    @inlinable public var isGlobal: Bool {
        get { attributes & 0x100 != 0 }
        set { attributes = attributes & ~0x100 | (newValue ? 0x100 : 0) }
    }

    @inlinable
    public init(linearAddress: GuestVirtualAddress, physicalAddress: GuestPhysicalAddress, level: Int, pageSize: UInt64,
                permissions: UInt8, protectionKey: Int, isGlobal: Bool, path: WalkPath) {
        self.linearAddress = linearAddress
        self.physicalAddress = physicalAddress
        self.level = level
        self.pageSize = pageSize
        self.protectionKey = protectionKey
        self.attributes = UInt64(permissions) | (isGlobal ? 0x100 : 0)
        self.path = path
    }

    /// What a faulting walk returns beside its fault: nothing to use.
    @inlinable
    static func failed(_ address: GuestVirtualAddress) -> Translation {
        Translation(linearAddress: address, physicalAddress: GuestPhysicalAddress(0), level: 0, pageSize: 0, permissions: 0,
                    protectionKey: 0, isGlobal: false, path: WalkPath())
    }

    public var isWritable: Bool { permissions & accessWrite != 0 }
    public var isUser: Bool { permissions & accessUser != 0 }
    public var isExecutable: Bool { permissions & accessExecute != 0 }
}

/// A #PF the walk raises.
public struct PageFault: Error, Sendable, Equatable {
    public var linearAddress: GuestVirtualAddress
    public var errorCode: PageFaultErrorCode
    /// The level whose entry faulted (not present or reserved bits), or the leaf's level for a
    /// permission fault.
    public var level: Int
    /// For a permission fault, every rule the access broke.
    public var violations: PermissionViolation
    public var path: WalkPath

    @inlinable
    public init(linearAddress: GuestVirtualAddress, errorCode: PageFaultErrorCode, level: Int,
                violations: PermissionViolation, path: WalkPath) {
        self.linearAddress = linearAddress
        self.errorCode = errorCode
        self.level = level
        self.violations = violations
        self.path = path
    }
}

/// Why a walk gave no translation.
public enum WalkFault: Error, Sendable, Equatable {
    case pageFault(PageFault)
    /// A non-canonical linear address: #GP (or #SS), not #PF.
    case generalProtection(GuestVirtualAddress)
    /// A paging-structure entry lives at a guest-physical address with no memory behind it.
    case noMemory(GuestPhysicalAddress, level: Int, path: WalkPath)
    /// The address does not fit the mode's linear-address width (wider than 32 bits outside
    /// IA-32e mode): no instruction can produce it, so it is a bad query rather than a fault.
    case addressTooWide(GuestVirtualAddress, width: Int)
}

/// Where a walk's fault goes: thrown (`walk`) or stored (`translate`). The walk is written once,
/// generic over its sink, and each caller gets the cheapest form: a throwing walk returns its
/// translation straight into the caller's frame with the fault in the error channel, and a storing
/// one never throws (a thrown error costs a runtime hook call, which test harnesses use to record
/// a backtrace per throw).
public protocol WalkFaultSink<Fault> {
    associatedtype Fault: Error
    associatedtype Failure: Error
    /// Takes the fault; a throwing sink throws it, a storing sink keeps it and returns.
    mutating func record(_ fault: Fault) throws(Failure)
}

/// The sink of `walk`: the fault is thrown.
@frozen
public struct ThrowingFaultSink<Fault: Error>: WalkFaultSink {
    @inlinable public init() {}
    @inlinable @inline(__always)
    public mutating func record(_ fault: Fault) throws(Fault) { throw fault }
}

/// The sink of `translate`: the fault is kept here.
extension Optional: WalkFaultSink where Wrapped: Error {
    public typealias Fault = Wrapped
    public typealias Failure = Never
    @inlinable @inline(__always)
    public mutating func record(_ fault: Wrapped) { self = fault }
}

/// Walks guest page tables as the architecture does. Build one per register state (the masks and
/// permission table are computed once, like KVM's MMU context) and walk many addresses with it.
public struct PageWalker: Sendable {
    public internal(set) var registers: PagingRegisters
    public let cpu: CPUModel
    public let mode: PagingMode
    public let rules: PermissionRules
    @usableFromInline let legacy32: Legacy32Format
    @usableFromInline let long64: Long64Format
    @usableFromInline var rootTable: UInt64
    /// The four PAE PDPTE registers, loaded when CR3 was.
    public let pdptes: (Entry64, Entry64, Entry64, Entry64)
    @usableFromInline let pdptBase: UInt64
    @usableFromInline let reportsFetch: Bool
    @usableFromInline let alignmentCheck: Bool
    @usableFromInline let globalPagesEnabled: Bool

    /// Validates the register state and, with PAE paging, loads the PDPTE registers from
    /// `memory` (or takes `pdpteValues` when given: the registers can differ from memory after the
    /// guest rewrites its PDPT without reloading CR3).
    public init<Memory: PhysicalMemory>(registers: PagingRegisters, cpu: CPUModel = CPUModel(),
                                        memory: Memory, pdpteValues: [UInt64]? = nil) throws(ControlStateError) {
        let regs = registers
        if regs.cr0.contains(.paging) && !regs.cr0.contains(.protectionEnable) { throw .pagingWithoutProtection }
        if regs.isLongModeActive && !regs.cr4.contains(.physicalAddressExtension) { throw .longModeWithoutPAE }
        if regs.efer.contains(.longModeActive) && !regs.isLongModeActive { throw .inconsistentLongModeActive }
        if regs.cr4.contains(.la57) && regs.isLongModeActive && !cpu.supportsLA57 { throw .la57Unsupported }
        if regs.efer.contains(.noExecuteEnable) && !cpu.supportsNX { throw .noExecuteUnsupported }
        let mode = regs.mode
        self.registers = regs
        self.cpu = cpu
        self.mode = mode
        rules = PermissionRules(cr0: regs.cr0, cr4: regs.cr4, efer: regs.efer, mode: mode)
        legacy32 = Legacy32Format(cr4: regs.cr4, cpu: cpu)
        long64 = Long64Format(mode: mode, efer: regs.efer, cpu: cpu)
        // SDM 4.7: I/D is reported only with SMEP, or with NXE under PAE-based paging. (KVM also
        // reports it for 32-bit paging with EFER.NXE=1; the SDM says otherwise and wins.)
        reportsFetch = regs.cr4.contains(.smep)
            || (regs.efer.contains(.noExecuteEnable) && mode != .legacy32 && mode != .disabled)
        alignmentCheck = regs.rflags.contains(.alignmentCheck)
        globalPagesEnabled = regs.cr4.contains(.globalPages)

        switch mode {
        case .disabled, .legacy32:
            rootTable = regs.cr3 & 0xFFFF_F000
            pdptBase = 0
            pdptes = (Entry64(rawValue: 0), Entry64(rawValue: 0), Entry64(rawValue: 0), Entry64(rawValue: 0))
        case .pae:
            // CR3 bits 31:5 locate the 32-byte-aligned PDPT.
            let base = regs.cr3 & 0xFFFF_FFE0
            pdptBase = base
            rootTable = base
            var loaded: [UInt64] = []
            if let pdpteValues {
                loaded = Array(pdpteValues.prefix(4)) + Array(repeating: 0, count: max(0, 4 - pdpteValues.count))
            } else {
                for index in 0..<4 {
                    let address = GuestPhysicalAddress(base + UInt64(index) * 8)
                    guard let entry = memory.readEntry(Entry64.self, at: address) else { throw .pdpteUnreadable(address) }
                    loaded.append(entry.rawValue)
                }
            }
            let reserved = Long64Format.pdpteReservedBits(cpu: cpu)
            for (index, value) in loaded.enumerated() where value & x86PresentBit != 0 && value & reserved != 0 {
                throw .pdpteReservedBits(index: index, value: value)
            }
            pdptes = (Entry64(rawValue: loaded[0]), Entry64(rawValue: loaded[1]),
                      Entry64(rawValue: loaded[2]), Entry64(rawValue: loaded[3]))
        case .fourLevel, .fiveLevel:
            let reserved = regs.cr3 & cpu.reservedPhysicalAddressBits
            if reserved != 0 { throw .cr3ReservedBits(reserved) }
            rootTable = regs.cr3 & bitRange(pageShift, 51)
            pdptBase = 0
            pdptes = (Entry64(rawValue: 0), Entry64(rawValue: 0), Entry64(rawValue: 0), Entry64(rawValue: 0))
        }
    }

    /// This walker after a MOV to CR3 of `cr3`: in 4- and 5-level paging only the root changes,
    /// so the permission rules and formats are kept rather than rebuilt (a CR3 switch is hot);
    /// other modes are validated afresh (PAE reloads its PDPTEs).
    public func loadingCR3<Memory: PhysicalMemory>(_ cr3: UInt64, memory: Memory) throws(ControlStateError) -> PageWalker {
        var new = registers
        new.cr3 = cr3
        guard mode == .fourLevel || mode == .fiveLevel else { return try PageWalker(registers: new, cpu: cpu, memory: memory) }
        let reserved = cr3 & cpu.reservedPhysicalAddressBits
        if reserved != 0 { throw .cr3ReservedBits(reserved) }
        var walker = self
        walker.registers = new
        walker.rootTable = cr3 & bitRange(pageShift, 51)
        return walker
    }

    /// The PDPTE register selected by bits 31:30 of a PAE linear address.
    @inlinable
    public func pdpte(_ index: Int) -> Entry64 {
        switch index & 3 {
        case 0: pdptes.0
        case 1: pdptes.1
        case 2: pdptes.2
        default: pdptes.3
        }
    }

    /// Translates `address` for `access`. With `setAccessedDirty` (the default), a successful
    /// walk sets A in every entry it used and D in the leaf of a write, as KVM's walker does; a
    /// faulting walk changes nothing. Pass false for a probe that never writes.
    @inlinable
    public func walk<Memory: PhysicalMemory>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool = true
    ) throws(WalkFault) -> Translation {
        var sink = ThrowingFaultSink<WalkFault>()
        return try translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &sink)
    }

    /// `walk` without throwing: the outcome as a value. Callers that expect many faults (batch
    /// queries, exhaustive tests) use this; a thrown error costs a runtime hook call, and test
    /// harnesses hook it to record a backtrace per throw.
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool = true
    ) -> Result<Translation, WalkFault> {
        var fault: WalkFault?
        let translation = translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, fault: &fault)
        if let fault { return .failure(fault) }
        return .success(translation)
    }

    /// The walk for hot paths that expect faults: the translation is returned straight into the
    /// caller's frame, and a fault, when there is one, lands in `fault` (the translation is then
    /// meaningless). Nothing is thrown and no `Result` wraps (and copies) the translation.
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool = true,
        fault: inout WalkFault?
    ) -> Translation {
        translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
    }

    /// The walk, with its fault delivered to `sink`: callers that need only part of a fault (an
    /// error code, say) keep only that part, and nothing else of the fault is copied.
    @inlinable @inline(__always)
    public func translate<Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, setAccessedDirty: Bool,
        sink: inout Sink
    ) throws(Sink.Failure) -> Translation {
        switch mode {
        case .disabled:
            guard address.rawValue >> 32 == 0 else {
                try sink.record(.addressTooWide(address, width: 32))
                return .failed(address)
            }
            return Translation(linearAddress: address, physicalAddress: GuestPhysicalAddress(address.rawValue),
                               level: 0, pageSize: pageSize, permissions: accessAll, protectionKey: 0,
                               isGlobal: false, path: WalkPath())
        case .legacy32:
            guard address.rawValue >> 32 == 0 else {
                try sink.record(.addressTooWide(address, width: 32))
                return .failed(address)
            }
            return try translate(format: legacy32, table: rootTable, level: 2, address: address, access: access,
                                 memory: memory, path: WalkPath(), setAccessedDirty: setAccessedDirty, sink: &sink)
        case .pae:
            guard address.rawValue >> 32 == 0 else {
                try sink.record(.addressTooWide(address, width: 32))
                return .failed(address)
            }
            let index = Int(address.rawValue >> 30) & 3
            let pdpte = pdpte(index)
            var path = WalkPath()
            path.record(level: 3, address: pdptBase + UInt64(index) * 8, value: pdpte.rawValue)
            path.topFromRegister = true
            guard pdpte.isPresent else {
                try sink.record(.pageFault(PageFault(linearAddress: address, errorCode: errorCode(access, []), level: 3,
                                                     violations: [], path: path)))
                return .failed(address)
            }
            return try translate(format: long64, table: pdpte.frameAddress, level: 2, address: address, access: access,
                                 memory: memory, path: path, setAccessedDirty: setAccessedDirty, sink: &sink)
        case .fourLevel, .fiveLevel:
            guard address.isCanonical(width: mode.linearAddressWidth) else {
                try sink.record(.generalProtection(address))
                return .failed(address)
            }
            return try translate(format: long64, table: rootTable, level: mode.rootLevel, address: address,
                                 access: access, memory: memory, path: WalkPath(), setAccessedDirty: setAccessedDirty,
                                 sink: &sink)
        }
    }

    /// The walk resumed below a paging-structure-cache entry (SDM 4.10.3.2): from the table at
    /// `table` (level `level`), the entries above it having combined to `permissions` (ACC bits:
    /// R/W and U/S ANDed, XD ORed). IA-32e paging only (4- and 5-level), where a cache entry stands
    /// for the upper entries of every address sharing its prefix. The translation's path holds only
    /// the entries read from `level` down.
    @inlinable @inline(__always)
    public func translate<Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, resumingAt table: UInt64, level: Int,
        permissions: UInt8, setAccessedDirty: Bool, sink: inout Sink
    ) throws(Sink.Failure) -> Translation {
        guard mode.isLongMode, address.isCanonical(width: mode.linearAddressWidth) else {
            // Never cached outside IA-32e paging; a non-canonical address matches no cache entry.
            return try translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &sink)
        }
        return try translate(format: long64, table: table, level: level, address: address, access: access,
                             memory: memory, path: WalkPath(), startPermissions: permissions,
                             setAccessedDirty: setAccessedDirty, sink: &sink)
    }

    /// The combined permissions (ACC bits) of a walk's entries from its top down to `level`, as a
    /// paging-structure-cache entry for the table below `level` keeps them. IA-32e paging only.
    @inlinable @inline(__always)
    public func combinedPermissions(of path: WalkPath, downTo level: Int) -> UInt8 {
        var all = UInt64.max
        var any: UInt64 = 0
        var current = path.topLevel
        while current >= level {
            let value = path.entryValue(level: current)
            all &= value
            any |= value
            current -= 1
        }
        // R/W and U/S AND across the levels, XD ORs: one entry with both says it for all of them.
        return long64.permissions(Entry64(rawValue: all & ~x86NoExecuteBit | any & x86NoExecuteBit))
    }

    @inlinable @inline(__always)
    func errorCode(_ access: Access, _ base: PageFaultErrorCode) -> PageFaultErrorCode {
        var code = base
        if access.kind == .write { code.insert(.write) }
        if access.privilege == .user { code.insert(.user) }
        if access.kind == .fetch && reportsFetch { code.insert(.fetch) }
        return code
    }

    // Inlined into `walk` / `translate` so the result is built in place: returned through a second
    // frame, its fields were written 8 bytes at a time and read back 16 at a time, stalling on
    // store forwarding.
    @inlinable @inline(__always)
    func translate<Format: PagingFormat, Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        format: Format, table: UInt64, level: Int, address: GuestVirtualAddress, access: Access,
        memory: Memory, path startPath: WalkPath, startPermissions: UInt8 = accessAll, setAccessedDirty: Bool,
        sink: inout Sink
    ) throws(Sink.Failure) -> Translation {
        // A/D updates only ever set bits, so an entry can change under the walk only a bounded
        // number of times (tables aliasing themselves); the bound keeps a hostile guest from
        // spinning the walker regardless.
        var restartsLeft = 16
        var path = startPath
        while true {
            var permissions = startPermissions
            let stop = walkTables(format, table: table, level: level, address: address.rawValue,
                                  memory: memory, path: &path, permissions: &permissions)
            let leafLevel: Int
            switch stop {
            case .leaf(let level):
                leafLevel = level
            case .notPresent(let level):
                try sink.record(.pageFault(PageFault(linearAddress: address, errorCode: errorCode(access, []), level: level,
                                                     violations: [], path: path)))
                return .failed(address)
            case .reservedBits(let level):
                try sink.record(.pageFault(PageFault(linearAddress: address,
                                                     errorCode: errorCode(access, [.present, .reservedBit]),
                                                     level: level, violations: [], path: path)))
                return .failed(address)
            case .noMemory(let entryAddress, let level):
                try sink.record(.noMemory(GuestPhysicalAddress(entryAddress), level: level, path: path))
                return .failed(address)
            }
            let leafBits = path.entryValue(level: leafLevel)
            let key = mode.isLongMode ? Int((leafBits >> 59) & 0xF) : 0
            let refused = rules.isRefused(access, pagePermissions: permissions, alignmentCheck: alignmentCheck)
            let keyRefused = rules.isRefusedByKey(access, pagePermissions: permissions, key: key,
                                                  pkru: registers.pkru, pkrs: registers.pkrs)
            if refused || keyRefused {
                let violations = rules.violations(access, pagePermissions: permissions, alignmentCheck: alignmentCheck,
                                                  key: key, pkru: registers.pkru, pkrs: registers.pkrs)
                try sink.record(.pageFault(PageFault(linearAddress: address,
                                                     errorCode: errorCode(access, keyRefused ? [.present, .protectionKey] : [.present]),
                                                     level: leafLevel, violations: violations, path: path)))
                return .failed(address)
            }
            if setAccessedDirty && !X86Paging.setAccessedDirty(format, path: &path, isWrite: access.kind == .write,
                                                               memory: memory) && restartsLeft > 0 {
                restartsLeft -= 1
                path = startPath
                continue
            }
            let size = Format.pageSize(level: leafLevel)
            let base = format.pageBase(Format.Entry(bits: leafBits), level: leafLevel)
            return Translation(linearAddress: address,
                               physicalAddress: GuestPhysicalAddress(base | (address.rawValue & (size - 1))),
                               level: leafLevel, pageSize: size, permissions: permissions, protectionKey: key,
                               isGlobal: globalPagesEnabled && leafBits & x86GlobalBit != 0, path: path)
        }
    }
}

/// What a lean IA-32e walk (`PageWalker.translateLongMode`) gives back: the leaf and the combined
/// permissions, small enough to come back in registers. The entries read stay in the caller's path.
@frozen
public struct LongModeLeaf {
    public var physicalAddress: GuestPhysicalAddress
    /// The leaf entry as the walk left it (A, and for a write D, set).
    public var entry: UInt64
    /// The leaf's level (1 = PTE, 2 = PDE, 3 = PDPTE).
    public var level: Int
    /// Combined ACC bits over every level (1 execute, 2 write, 4 user).
    public var permissions: UInt8

    @inlinable
    init(physicalAddress: GuestPhysicalAddress, entry: UInt64, level: Int, permissions: UInt8) {
        self.physicalAddress = physicalAddress
        self.entry = entry
        self.level = level
        self.permissions = permissions
    }

    @inlinable
    static var failed: LongModeLeaf { LongModeLeaf(physicalAddress: GuestPhysicalAddress(0), entry: 0, level: 0, permissions: 0) }
}

extension PageWalker {
    /// `translate(_:_:in:setAccessedDirty:sink:)` in IA-32e paging (4- and 5-level), setting A/D,
    /// for hot callers that need only the leaf: the entries read go to the caller's `path` (reset
    /// here) instead of being copied out in a `Translation`, and the walker's rules are read in
    /// place. The same walk, faults and A/D updates as the generic one (an update with nothing to
    /// set is skipped without a call); other modes must use the generic one.
    @inlinable @inline(__always)
    public func translateLongMode<Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, path: inout WalkPath, sink: inout Sink
    ) throws(Sink.Failure) -> LongModeLeaf {
        guard address.isCanonical(width: mode.linearAddressWidth) else {
            try sink.record(.generalProtection(address))
            return .failed
        }
        return try translateLongMode(address, access, in: memory, table: rootTable, level: mode.rootLevel,
                                     permissions: accessAll, path: &path, sink: &sink)
    }

    /// `translate(_:_:in:resumingAt:level:permissions:setAccessedDirty:sink:)` as the lean walk
    /// above: from the table a paging-structure-cache entry names, with the permissions of the
    /// entries above it; `path` holds the entries read from `level` down.
    @inlinable @inline(__always)
    public func translateLongMode<Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, resumingAt table: UInt64, level: Int,
        permissions: UInt8, path: inout WalkPath, sink: inout Sink
    ) throws(Sink.Failure) -> LongModeLeaf {
        guard address.isCanonical(width: mode.linearAddressWidth) else {
            try sink.record(.generalProtection(address))
            return .failed
        }
        return try translateLongMode(address, access, in: memory, table: table, level: level, permissions: permissions,
                                     path: &path, sink: &sink)
    }

    // The generic level loop with the generic walk's faults, restarts and A/D updates, over the
    // 64-bit format only, ending in the leaf instead of a `Translation`. The fault handling is the
    // generic walk's, written out again: shared through a helper, it cost 47 instructions a TDP
    // fault and, in the generic walk, 72 a shadow fault (callgrind). Tried again with two
    // `@inline(__always)` helpers (the stop's fault, the leaf's refusal): the release build kept
    // the refusal check out of line and copied the path into it, +281 instructions a TDP fault
    // (-182 a shadow fault); taking the path `borrowing` crashed the Swift 6.3.1 compiler.
    @inlinable @inline(__always)
    func translateLongMode<Memory: PhysicalMemory, Sink: WalkFaultSink<WalkFault>>(
        _ address: GuestVirtualAddress, _ access: Access, in memory: Memory, table: UInt64, level: Int,
        permissions startPermissions: UInt8, path: inout WalkPath, sink: inout Sink
    ) throws(Sink.Failure) -> LongModeLeaf {
        var restartsLeft = 16
        while true {
            path = WalkPath()
            var permissions = startPermissions
            let stop = walkTables(long64, table: table, level: level, address: address.rawValue, memory: memory,
                                  path: &path, permissions: &permissions)
            let leafLevel: Int
            switch stop {
            case .leaf(let level):
                leafLevel = level
            case .notPresent(let level):
                try sink.record(.pageFault(PageFault(linearAddress: address, errorCode: errorCode(access, []), level: level,
                                                     violations: [], path: path)))
                return .failed
            case .reservedBits(let level):
                try sink.record(.pageFault(PageFault(linearAddress: address,
                                                     errorCode: errorCode(access, [.present, .reservedBit]),
                                                     level: level, violations: [], path: path)))
                return .failed
            case .noMemory(let entryAddress, let level):
                try sink.record(.noMemory(GuestPhysicalAddress(entryAddress), level: level, path: path))
                return .failed
            }
            let leafBits = path.entryValue(level: leafLevel)
            let key = Int((leafBits >> 59) & 0xF)
            let refused = rules.isRefused(access, pagePermissions: permissions, alignmentCheck: alignmentCheck)
            let keyRefused = rules.isRefusedByKey(access, pagePermissions: permissions, key: key,
                                                  pkru: registers.pkru, pkrs: registers.pkrs)
            if refused || keyRefused {
                let violations = rules.violations(access, pagePermissions: permissions, alignmentCheck: alignmentCheck,
                                                  key: key, pkru: registers.pkru, pkrs: registers.pkrs)
                try sink.record(.pageFault(PageFault(linearAddress: address,
                                                     errorCode: errorCode(access, keyRefused ? [.present, .protectionKey] : [.present]),
                                                     level: leafLevel, violations: violations, path: path)))
                return .failed
            }
            let isWrite = access.kind == .write
            if hasAccessedDirtyToSet(long64, path: path, isWrite: isWrite)
                && !X86Paging.setAccessedDirty(long64, path: &path, isWrite: isWrite, memory: memory) && restartsLeft > 0 {
                restartsLeft -= 1
                continue
            }
            let leaf = path.entryValue(level: leafLevel)
            let size = Long64Format.pageSize(level: leafLevel)
            let base = long64.pageBase(Entry64(bits: leafBits), level: leafLevel)
            return LongModeLeaf(physicalAddress: GuestPhysicalAddress(base | (address.rawValue & (size - 1))), entry: leaf,
                                level: leafLevel, permissions: permissions)
        }
    }
}
