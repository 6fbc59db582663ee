// The EPT walker (SDM vol. 3, 29.3): guest-physical -> the EPT's output physical address, over the
// same generic level loop as the x86 walkers.

/// What the processor's EPT supports (IA32_VMX_EPT_VPID_CAP).
public struct EPTCapabilities: Hashable, Sendable {
    /// Bit 0: execute-only translations (X=1, R=W=0) are allowed.
    public var executeOnly: Bool
    /// Bit 7: 5-level EPT (page-walk length 5).
    public var fiveLevel: Bool
    /// Bit 16: 2 MiB pages.
    public var pages2MiB: Bool
    /// Bit 17: 1 GiB pages.
    public var pages1GiB: Bool
    /// Bit 21: accessed and dirty flags.
    public var accessedDirty: Bool
    /// The "mode-based execute control for EPT" VM-execution control (secondary control bit 22)
    /// can be set: EPT bit 10 then grants execute for user-mode linear addresses and bit 2 only
    /// for supervisor-mode ones.
    public var modeBasedExecute: Bool
    public var maxPhysicalAddressBits: Int

    public init(executeOnly: Bool = true, fiveLevel: Bool = true, pages2MiB: Bool = true, pages1GiB: Bool = true,
                accessedDirty: Bool = true, modeBasedExecute: Bool = false, maxPhysicalAddressBits: Int = 46) {
        self.executeOnly = executeOnly
        self.fiveLevel = fiveLevel
        self.pages2MiB = pages2MiB
        self.pages1GiB = pages1GiB
        self.accessedDirty = accessedDirty
        self.modeBasedExecute = modeBasedExecute
        self.maxPhysicalAddressBits = min(max(maxPhysicalAddressBits, 36), 52)
    }
}

/// The EPT pointer (SDM 25.6.11).
@frozen
public struct EPTPointer: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    /// Builds an EPTP with write-back paging-structure memory type.
    public init(root: UInt64, levels: Int, accessedDirty: Bool) {
        rawValue = (root & bitRange(12, 51)) | UInt64(levels - 1) << 3 | (accessedDirty ? 1 << 6 : 0) | 6
    }

    /// Bits 2:0: memory type of the paging structures (0 UC or 6 WB).
    @inlinable public var memoryType: Int { Int(rawValue & 7) }
    /// Bits 5:3 plus one: 4 or 5.
    @inlinable public var levels: Int { Int((rawValue >> 3) & 7) + 1 }
    /// Bit 6: accessed and dirty flags enabled.
    @inlinable public var accessedDirtyEnabled: Bool { rawValue & (1 << 6) != 0 }
    @inlinable public var rootAddress: UInt64 { rawValue & bitRange(12, 51) }
}

/// An EPTP that VM entry would reject.
public enum EPTPointerError: Error, Equatable, Sendable, CustomStringConvertible {
    case badMemoryType(Int)
    case badWalkLength(Int)
    case accessedDirtyUnsupported
    case reservedBits(UInt64)
    /// Mode-based execute control enabled on a CPU without it (VM entry fails its control checks).
    case modeBasedExecuteUnsupported

    public var description: String {
        switch self {
        case .badMemoryType(let type): "EPTP memory type \(type) is not UC (0) or WB (6)"
        case .badWalkLength(let levels): "EPTP page-walk length \(levels) is not supported"
        case .accessedDirtyUnsupported: "EPTP enables accessed/dirty flags the CPU does not support"
        case .reservedBits(let bits): "EPTP has reserved bits set (\(hex(bits)))"
        case .modeBasedExecuteUnsupported: "mode-based execute control is enabled but the CPU does not support it"
        }
    }
}

/// The EPT table format with its reserved-bit and misconfiguration rules.
@frozen
public struct EPTFormat: PagingFormat {
    public typealias Entry = EPTEntry
    public let reserved: ReservedBitMasks
    public let executeOnly: Bool
    public let accessedDirty: Bool
    /// Mode-based execute control is on: bit 10 is a permission (user-mode execute).
    public let modeBasedExecute: Bool

    public init(capabilities: EPTCapabilities, accessedDirty: Bool, modeBasedExecute: Bool = false) {
        executeOnly = capabilities.executeOnly
        self.accessedDirty = accessedDirty
        self.modeBasedExecute = modeBasedExecute
        let high = bitRange(capabilities.maxPhysicalAddressBits, 51)
        let no1GiB: UInt64 = capabilities.pages1GiB ? 0 : 1 << 7
        let no2MiB: UInt64 = capabilities.pages2MiB ? 0 : 1 << 7
        var masks = ReservedBitMasks()
        // SDM Tables 29-1..29-6: bits 7:3 of a PML5E/PML4E, 6:3 of a non-leaf PDPTE/PDE, and the
        // alignment bits of a large leaf are reserved; bit 7 of a PTE is ignored.
        masks.set(level: 5, table: high | bitRange(3, 7), page: high | bitRange(3, 7))
        masks.set(level: 4, table: high | bitRange(3, 7), page: high | bitRange(3, 7))
        masks.set(level: 3, table: high | bitRange(3, 6) | no1GiB, page: high | bitRange(12, 29) | no1GiB)
        masks.set(level: 2, table: high | bitRange(3, 6) | no2MiB, page: high | bitRange(12, 20) | no2MiB)
        masks.set(level: 1, table: high, page: high)
        reserved = masks
    }

    /// Present when any of bits 2:0 is set, or (mode-based execute control) bit 10 (SDM 29.3.2).
    @inlinable public func isPresent(_ entry: Entry) -> Bool {
        entry.isPresent || (modeBasedExecute && entry.isUserExecutable)
    }

    /// Misconfigured: reserved bits, write without read, execute-only without the capability
    /// (bit 0 clear with bit 2 set, or with bit 10 set under mode-based execute control), or a
    /// leaf memory type of 2, 3 or 7 (SDM 29.3.3.1).
    @inlinable public func hasReservedBits(_ entry: Entry, level: Int) -> Bool {
        let bits = entry.rawValue
        if bits & reserved.mask(pageSize: level > 1 && entry.isPageSize, level: level) != 0 { return true }
        if entry.isWritable && !entry.isReadable { return true }
        if !executeOnly && !entry.isReadable && (entry.isExecutable || (modeBasedExecute && entry.isUserExecutable)) {
            return true
        }
        if isLeaf(entry, level: level) {
            let type = entry.memoryType
            if type == 2 || type == 3 || type == 7 { return true }
        }
        return false
    }
    @inlinable public func isLeaf(_ entry: Entry, level: Int) -> Bool { level == 1 || entry.isPageSize }
    /// ACC bits: 1 execute (supervisor-mode execute under mode-based execute control), 2 write,
    /// 4 read (KVM's "user means readable" for EPT), 8 user-mode execute: bit 10 under mode-based
    /// execute control, else the same bit 2 as supervisor execute.
    @inlinable public func permissions(_ entry: Entry) -> UInt8 {
        // The ACC nibble of each value of bits 2:0 (X, W, R), the value's nibble in this word:
        // R -> 4, W -> 2, X -> 1 and 8. A lookup: every level of every EPT walk asks, and the bit
        // shuffling cost several times as many instructions.
        let accByXWR: UInt32 = 0xFBD9_6240
        let acc = UInt8(truncatingIfNeeded: accByXWR >> UInt32(truncatingIfNeeded: (entry.rawValue & 7) << 2)) & 0xF
        guard modeBasedExecute else { return acc }
        return acc & 7 | UInt8(truncatingIfNeeded: (entry.rawValue >> 10) & 1) << 3
    }
    @inlinable public func nextTableAddress(_ entry: Entry) -> UInt64 { entry.frameAddress }
    // Forced inline: left to the optimizer, it was merged with the x86 formats' and called.
    @inlinable @inline(__always) public func pageBase(_ entry: Entry, level: Int) -> UInt64 {
        entry.rawValue & bitRange(pageShift + (level - 1) * 9, 51)
    }
    @inlinable public var accessedBit: UInt64 { accessedDirty ? 1 << 8 : 0 }
    @inlinable public var dirtyBit: UInt64 { accessedDirty ? 1 << 9 : 0 }
}

/// A successful EPT translation.
public struct EPTTranslation: Sendable, Equatable {
    public var guestPhysicalAddress: GuestPhysicalAddress
    /// The EPT's output address (L1 guest-physical when the tables are an L1 hypervisor's).
    public var outputAddress: GuestPhysicalAddress
    public var level: Int
    public var pageSize: UInt64
    /// Combined permissions, ACC-encoded (1 execute, 2 write, 4 read, 8 user-mode execute).
    public var permissions: UInt8
    public var memoryType: Int
    public var ignoresPAT: Bool
    public var path: WalkPath
    /// The walk set the leaf's dirty bit, which was clear (what PML logs).
    public var dirtiedLeaf = false

    @inlinable
    public init(guestPhysicalAddress: GuestPhysicalAddress, outputAddress: GuestPhysicalAddress, level: Int,
                pageSize: UInt64, permissions: UInt8, memoryType: Int, ignoresPAT: Bool, path: WalkPath) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.outputAddress = outputAddress
        self.level = level
        self.pageSize = pageSize
        self.permissions = permissions
        self.memoryType = memoryType
        self.ignoresPAT = ignoresPAT
        self.path = path
    }

    /// What a faulting walk returns beside its fault: nothing to use.
    @inlinable
    static func failed(_ address: GuestPhysicalAddress) -> EPTTranslation {
        EPTTranslation(guestPhysicalAddress: address, outputAddress: GuestPhysicalAddress(0), level: 0, pageSize: 0,
                       permissions: 0, memoryType: 0, ignoresPAT: false, path: WalkPath())
    }

    public var isReadable: Bool { permissions & accessUser != 0 }
    public var isWritable: Bool { permissions & accessWrite != 0 }
    public var isExecutable: Bool { permissions & accessExecute != 0 }
    /// Executable for user-mode linear addresses (the same as `isExecutable` without mode-based
    /// execute control).
    public var isUserExecutable: Bool { permissions & accessUserExecute != 0 }
}

/// ACC bit 3 of an EPT walk's combined permissions: execute for user-mode linear addresses.
@usableFromInline let accessUserExecute: UInt8 = 8
/// Every EPT permission: read, write, supervisor and user execute.
@usableFromInline let eptAccessAll: UInt8 = 0xF

/// The exit qualification of an EPT violation (SDM 28.2.1, Table 28-7). Bits 9-11 (advanced
/// VM-exit information) are not reported: neither the model's CPU nor KVM's nested VMX offers that
/// capability. Bit 12 (NMI unblocking due to IRET) stays clear: no guest here executes IRET.
@frozen
public struct EPTViolationQualification: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public static var dataRead: Self { Self(rawValue: 1 << 0) }
    @inlinable public static var dataWrite: Self { Self(rawValue: 1 << 1) }
    @inlinable public static var instructionFetch: Self { Self(rawValue: 1 << 2) }
    /// Bits 3-5: the AND over every entry used of its R, W and X bits (X: supervisor-mode execute
    /// under mode-based execute control).
    @inlinable public static var readable: Self { Self(rawValue: 1 << 3) }
    @inlinable public static var writable: Self { Self(rawValue: 1 << 4) }
    @inlinable public static var executable: Self { Self(rawValue: 1 << 5) }
    /// Bit 6: the AND of bit 10 (user-mode execute) over every entry used, under mode-based
    /// execute control; undefined without it, and then reported clear.
    @inlinable public static var userExecutable: Self { Self(rawValue: 1 << 6) }
    /// Bit 7: the guest linear-address field is valid.
    @inlinable public static var linearAddressValid: Self { Self(rawValue: 1 << 7) }
    /// Bit 8 (with bit 7): the access was to the final translation, not a guest paging structure.
    @inlinable public static var finalTranslation: Self { Self(rawValue: 1 << 8) }
}

/// One access by guest-physical address, as an EPT walk sees it.
@frozen
public struct EPTAccess: Hashable, Sendable {
    /// What used the guest-physical address (bits 7 and 8 of a violation's qualification).
    public enum Origin: UInt8, Hashable, Sendable, CaseIterable {
        /// No linear address behind it (the PAE PDPTE loads of a MOV to CR3, say): bit 7 clear.
        case guestPhysical
        /// A guest paging-structure entry read or written while translating a linear address.
        case guestPagingStructure
        /// The translation of a linear address: the access itself.
        case finalTranslation
    }

    public var kind: AccessKind
    public var origin: Origin
    /// The linear address is a user-mode address (U/S set at every level of the guest's walk).
    /// Under mode-based execute control a fetch from it needs bit 10 rather than bit 2.
    public var userModeAddress: Bool

    @inlinable
    public init(_ kind: AccessKind, origin: Origin = .guestPhysical, userModeAddress: Bool = false) {
        self.kind = kind
        self.origin = origin
        self.userModeAddress = userModeAddress
    }
}

/// Why an EPT walk gave no translation.
public enum EPTWalkFault: Error, Sendable, Equatable {
    case violation(GuestPhysicalAddress, qualification: EPTViolationQualification, level: Int, path: WalkPath)
    case misconfiguration(GuestPhysicalAddress, level: Int, path: WalkPath)
    case noMemory(GuestPhysicalAddress, level: Int, path: WalkPath)
    /// An address wider than 52 bits: not a guest-physical address.
    case addressTooWide(GuestPhysicalAddress)
}

/// Walks EPT tables: the second walker over the generic level loop.
public struct EPTWalker: Sendable {
    public let pointer: EPTPointer
    public let capabilities: EPTCapabilities
    public let format: EPTFormat

    /// Validates the EPTP (and the mode-based execute control) as VM entry does.
    public init(pointer: EPTPointer, capabilities: EPTCapabilities = EPTCapabilities(),
                modeBasedExecute: Bool = false) throws(EPTPointerError) {
        let type = pointer.memoryType
        guard type == 0 || type == 6 else { throw .badMemoryType(type) }
        guard pointer.levels == 4 || (pointer.levels == 5 && capabilities.fiveLevel) else {
            throw .badWalkLength(pointer.levels)
        }
        if pointer.accessedDirtyEnabled && !capabilities.accessedDirty { throw .accessedDirtyUnsupported }
        let reserved = pointer.rawValue & (bitRange(7, 11) | bitRange(capabilities.maxPhysicalAddressBits, 63))
        guard reserved == 0 else { throw .reservedBits(reserved) }
        if modeBasedExecute && !capabilities.modeBasedExecute { throw .modeBasedExecuteUnsupported }
        self.pointer = pointer
        self.capabilities = capabilities
        format = EPTFormat(capabilities: capabilities, accessedDirty: pointer.accessedDirtyEnabled,
                           modeBasedExecute: modeBasedExecute)
    }

    /// Translates `address` for an access of `kind` with no linear address behind it. A/D
    /// handling is as in `PageWalker.walk`.
    @inlinable
    public func walk<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ kind: AccessKind, in memory: Memory, setAccessedDirty: Bool = true
    ) throws(EPTWalkFault) -> EPTTranslation {
        try walk(address, EPTAccess(kind), in: memory, setAccessedDirty: setAccessedDirty)
    }

    /// Translates `address` for `access`.
    @inlinable
    public func walk<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ access: EPTAccess, in memory: Memory, setAccessedDirty: Bool = true
    ) throws(EPTWalkFault) -> EPTTranslation {
        var sink = ThrowingFaultSink<EPTWalkFault>()
        return try translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &sink)
    }

    /// `walk` without throwing (see `PageWalker.translate`).
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ kind: AccessKind, in memory: Memory, setAccessedDirty: Bool = true
    ) -> Result<EPTTranslation, EPTWalkFault> {
        translate(address, EPTAccess(kind), in: memory, setAccessedDirty: setAccessedDirty)
    }

    /// `walk` without throwing (see `PageWalker.translate`).
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ access: EPTAccess, in memory: Memory, setAccessedDirty: Bool = true
    ) -> Result<EPTTranslation, EPTWalkFault> {
        var fault: EPTWalkFault?
        let translation = translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
        if let fault { return .failure(fault) }
        return .success(translation)
    }

    /// The walk for hot paths that expect faults (see `PageWalker.translate(_:_:in:setAccessedDirty:fault:)`).
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ kind: AccessKind, in memory: Memory, setAccessedDirty: Bool = true,
        fault: inout EPTWalkFault?
    ) -> EPTTranslation {
        translate(address, EPTAccess(kind), in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
    }

    /// The walk for hot paths that expect faults, for `access`.
    @inlinable
    public func translate<Memory: PhysicalMemory>(
        _ address: GuestPhysicalAddress, _ access: EPTAccess, in memory: Memory, setAccessedDirty: Bool = true,
        fault: inout EPTWalkFault?
    ) -> EPTTranslation {
        translate(address, access, in: memory, setAccessedDirty: setAccessedDirty, sink: &fault)
    }

    /// With EPT A/D flags enabled, the processor's accesses to guest paging structures count as
    /// writes for EPT (SDM 29.3.3.2): they need W, set the leaf's D, and a violation reports both
    /// a read and a write.
    @inlinable @inline(__always)
    func isWrite(_ access: EPTAccess) -> Bool {
        access.kind == .write || (access.origin == .guestPagingStructure && pointer.accessedDirtyEnabled)
    }

    /// The walk, with its fault delivered to `sink` (see `WalkFaultSink`): callers that need only
    /// part of a fault keep only that part, and the walk's path is not copied out with it.
    @inlinable @inline(__always)
    public func translate<Memory: PhysicalMemory, Sink: WalkFaultSink<EPTWalkFault>>(
        _ address: GuestPhysicalAddress, _ access: EPTAccess, in memory: Memory, setAccessedDirty: Bool,
        sink: inout Sink
    ) throws(Sink.Failure) -> EPTTranslation {
        guard address.rawValue >> 52 == 0 else {
            try sink.record(.addressTooWide(address))
            return .failed(address)
        }
        let write = isWrite(access)
        var restartsLeft = 16
        while true {
            var path = WalkPath()
            var permissions = eptAccessAll
            let stop = walkTables(format, table: pointer.rootAddress, level: pointer.levels, address: address.rawValue,
                                  memory: memory, path: &path, permissions: &permissions)
            guard case .leaf(let leafLevel) = stop else {
                try recordFault(of: stop, at: address, access, permissions, path, sink: &sink)
                return .failed(address)
            }
            guard permissions & needed(access) == needed(access) else {
                try recordFault(of: .notPresent(level: leafLevel), at: address, access, permissions, path, sink: &sink)
                return .failed(address)
            }
            let leafWasDirty = path.entryValue(level: leafLevel) & format.dirtyBit != 0
            if setAccessedDirty && !X86Paging.setAccessedDirty(format, path: &path, isWrite: write, memory: memory)
                && restartsLeft > 0 {
                restartsLeft -= 1
                continue
            }
            let leaf = EPTEntry(rawValue: path.entryValue(level: leafLevel))
            let size = EPTFormat.pageSize(level: leafLevel)
            let base = format.pageBase(leaf, level: leafLevel)
            var translation = EPTTranslation(guestPhysicalAddress: address,
                                             outputAddress: GuestPhysicalAddress(base | (address.rawValue & (size - 1))),
                                             level: leafLevel, pageSize: size, permissions: permissions,
                                             memoryType: leaf.memoryType, ignoresPAT: leaf.ignoresPAT, path: path)
            translation.dirtiedLeaf = !leafWasDirty && format.dirtyBit != 0 && leaf.rawValue & format.dirtyBit != 0
            return translation
        }
    }

    /// The ACC bits `access` needs at every level (SDM 29.3.3.2).
    @inlinable @inline(__always)
    func needed(_ access: EPTAccess) -> UInt8 {
        if isWrite(access) { return accessWrite }
        switch access.kind {
        case .read, .write: return accessUser
        case .fetch: return access.userModeAddress ? accessUserExecute : accessExecute
        }
    }

    /// A violation's exit qualification: the access, what the entries used allowed, and where the
    /// guest-physical address came from.
    @inlinable
    func qualification(_ access: EPTAccess, _ permissions: UInt8) -> EPTViolationQualification {
        var result: EPTViolationQualification = switch access.kind {
        case .read: .dataRead
        case .write: .dataWrite
        case .fetch: .instructionFetch
        }
        // A guest paging-structure write (an A/D update, or any table access under EPT A/D) is a
        // locked read-modify-write: bit 1, and bit 0 too, which the SDM leaves to the
        // implementation and which KVM's nested walk reports (`nested_access` is W|U).
        if access.origin == .guestPagingStructure && isWrite(access) { result = [.dataRead, .dataWrite] }
        if permissions & accessUser != 0 { result.insert(.readable) }
        if permissions & accessWrite != 0 { result.insert(.writable) }
        if permissions & accessExecute != 0 { result.insert(.executable) }
        if format.modeBasedExecute && permissions & accessUserExecute != 0 { result.insert(.userExecutable) }
        switch access.origin {
        case .guestPhysical: break
        case .guestPagingStructure: result.insert(.linearAddressValid)
        case .finalTranslation: result.formUnion([.linearAddressValid, .finalTranslation])
        }
        return result
    }
}

// MARK: - A walk that keeps only its leaf

/// What a walk keeps of an EPT translation when it wants only the leaf (a hardware walk filling a
/// TLB entry): `EPTTranslation` carries the walk's path, and building it, then copying it out of
/// the walk, cost more than the levels it describes. Small enough to come back in registers.
@frozen
public struct EPTLeaf: Sendable, Equatable {
    /// The EPT's output address for the walked address.
    public var outputAddress: GuestPhysicalAddress
    /// The leaf's level (1: a 4 KiB page).
    public var level: Int
    /// The leaf entry as the walk left it (A, and for a write D, set when the walk sets them).
    public var entry: UInt64
    /// Combined permissions, ACC-encoded as in `EPTTranslation` (1 execute, 2 write, 4 read, 8
    /// user-mode execute).
    public var permissions: UInt8
    /// The walk set the leaf's dirty bit, which was clear (what PML logs).
    public var dirtiedLeaf: Bool

    @inlinable
    public init(outputAddress: GuestPhysicalAddress, level: Int, entry: UInt64, permissions: UInt8, dirtiedLeaf: Bool) {
        self.outputAddress = outputAddress
        self.level = level
        self.entry = entry
        self.permissions = permissions
        self.dirtiedLeaf = dirtiedLeaf
    }

    /// What a faulting walk returns beside its fault: nothing to use.
    @inlinable static var failed: Self {
        Self(outputAddress: GuestPhysicalAddress(0), level: 0, entry: 0, permissions: 0, dirtiedLeaf: false)
    }

    public var isReadable: Bool { permissions & accessUser != 0 }
    public var isWritable: Bool { permissions & accessWrite != 0 }
    public var isExecutable: Bool { permissions & accessExecute != 0 }
}

extension EPTWalker {
    /// The walk of `translate(_:_:in:setAccessedDirty:sink:)`, its faults, restarts and A/D updates
    /// alike, answering only the leaf; an A/D update is skipped without a call when every entry has
    /// its bits.
    @inlinable @inline(__always)
    public func translateLeaf<Memory: PhysicalMemory, Sink: WalkFaultSink<EPTWalkFault>>(
        _ address: GuestPhysicalAddress, _ access: EPTAccess, in memory: Memory, setAccessedDirty: Bool = true,
        sink: inout Sink
    ) throws(Sink.Failure) -> EPTLeaf {
        guard address.rawValue >> 52 == 0 else {
            try sink.record(.addressTooWide(address))
            return .failed
        }
        let write = isWrite(access)
        let required = needed(access)
        var restartsLeft = 16
        while true {
            var path = WalkPath()
            var permissions = eptAccessAll
            let stop = walkTables(format, table: pointer.rootAddress, level: pointer.levels, address: address.rawValue,
                                  memory: memory, path: &path, permissions: &permissions)
            guard case .leaf(let leafLevel) = stop else {
                try recordFault(of: stop, at: address, access, permissions, path, sink: &sink)
                return .failed
            }
            if permissions & required != required {
                try recordFault(of: .notPresent(level: leafLevel), at: address, access, permissions, path, sink: &sink)
                return .failed
            }
            let leafWasDirty = path.entryValue(level: leafLevel) & format.dirtyBit != 0
            if setAccessedDirty && hasAccessedDirtyToSet(format, path: path, isWrite: write)
                && !X86Paging.setAccessedDirty(format, path: &path, isWrite: write, memory: memory) && restartsLeft > 0 {
                restartsLeft -= 1
                continue
            }
            let leaf = path.entryValue(level: leafLevel)
            let mask = EPTFormat.pageSize(level: leafLevel) - 1
            let base = format.pageBase(EPTEntry(rawValue: leaf), level: leafLevel)
            return EPTLeaf(outputAddress: GuestPhysicalAddress(base | address.rawValue & mask), level: leafLevel, entry: leaf,
                           permissions: permissions,
                           dirtiedLeaf: !leafWasDirty && format.dirtyBit != 0 && leaf & format.dirtyBit != 0)
        }
    }

    /// The fault of a walk that stopped short of a leaf it may use (a permission refusal at the leaf
    /// reads as `.notPresent` there: both are violations with what the entries allowed).
    @inlinable
    func recordFault<Sink: WalkFaultSink<EPTWalkFault>>(
        of stop: TableWalkStop, at address: GuestPhysicalAddress, _ access: EPTAccess, _ permissions: UInt8,
        _ path: WalkPath, sink: inout Sink
    ) throws(Sink.Failure) {
        switch stop {
        case .leaf(let level), .notPresent(let level):
            try sink.record(.violation(address, qualification: qualification(access, permissions), level: level, path: path))
        case .reservedBits(let level):
            try sink.record(.misconfiguration(address, level: level, path: path))
        case .noMemory(let entryAddress, let level):
            try sink.record(.noMemory(GuestPhysicalAddress(entryAddress), level: level, path: path))
        }
    }
}
