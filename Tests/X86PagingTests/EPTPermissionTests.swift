// Every combination of EPT permission bits over every level of a walk, for every access kind and
// origin, with execute-only translations supported or not, EPT A/D flags on or off, and mode-based
// execute control on or off, walked by EPTWalker over real tables and compared with a plain
// restatement of SDM 29.3.2-29.3.3 written here. By default a deterministic sample of the larger
// slices runs; VIRTMMU_EXHAUSTIVE=1 runs all of them.

import GuestMemory
import Testing
import X86Paging

/// One entry's permission bits as a test sets them: R (bit 0), W (bit 1), X (bit 2) and, under
/// mode-based execute control, XU (bit 10).
struct EPTRuleBits: Equatable {
    var read, write, execute, userExecute: Bool

    /// `value` packs R, W, X, XU in bits 0-3.
    init(_ value: Int) {
        read = value & 1 != 0
        write = value & 2 != 0
        execute = value & 4 != 0
        userExecute = value & 8 != 0
    }

    var raw: UInt64 {
        (read ? 1 : 0) | (write ? 2 : 0) | (execute ? 4 : 0) | (userExecute ? 1 << 10 : 0)
    }
}

/// The CPU and VMCS settings one walk runs under.
struct EPTRuleMachine: CustomStringConvertible {
    var executeOnlySupported: Bool
    var accessedDirty: Bool
    var modeBasedExecute: Bool

    var description: String {
        "execonly \(executeOnlySupported) ad \(accessedDirty) mbec \(modeBasedExecute)"
    }
}

enum EPTRuleOutcome: Equatable {
    case translated
    case violation(level: Int, qualification: UInt64)
    case misconfiguration(level: Int)
}

/// The SDM's rules, stated plainly: entries are used top-down; the first one that is not present
/// ends the walk with a violation, the first misconfigured one with a misconfiguration; at the leaf
/// the access needs its permission in every entry used. A violation's qualification reports the
/// access, the AND of R/W/X (and XU) over the entries used, and where the address came from.
func eptRuleOutcome(entries: [EPTRuleBits], topLevel: Int, kind: AccessKind, origin: EPTAccess.Origin,
                    userModeAddress: Bool, machine: EPTRuleMachine) -> EPTRuleOutcome {
    var allRead = true, allWrite = true, allExecute = true, allUserExecute = true
    // Guest paging-structure accesses are writes for EPT when its A/D flags are on (29.3.3.2),
    // and a write to a guest paging structure (an A/D update) is a locked read-modify-write,
    // reported as a read and a write.
    let tableAsWrite = origin == .guestPagingStructure && machine.accessedDirty
    let tableWrite = origin == .guestPagingStructure && (machine.accessedDirty || kind == .write)
    func qualification() -> UInt64 {
        var q: UInt64 = 0
        if tableWrite {
            q |= 0b11
        } else {
            switch kind {
            case .read: q |= 1
            case .write: q |= 2
            case .fetch: q |= 4
            }
        }
        if allRead { q |= 1 << 3 }
        if allWrite { q |= 1 << 4 }
        if allExecute { q |= 1 << 5 }
        if machine.modeBasedExecute && allUserExecute { q |= 1 << 6 }
        switch origin {
        case .guestPhysical: break
        case .guestPagingStructure: q |= 1 << 7
        case .finalTranslation: q |= 1 << 7 | 1 << 8
        }
        return q
    }
    for (index, entry) in entries.enumerated() {
        let level = topLevel - index
        let userExecute = machine.modeBasedExecute ? entry.userExecute : entry.execute
        allRead = allRead && entry.read
        allWrite = allWrite && entry.write
        allExecute = allExecute && entry.execute
        allUserExecute = allUserExecute && userExecute
        let present = entry.read || entry.write || entry.execute || (machine.modeBasedExecute && entry.userExecute)
        if !present { return .violation(level: level, qualification: qualification()) }
        let writeOnly = entry.write && !entry.read
        let executeOnly = !entry.read && (entry.execute || (machine.modeBasedExecute && entry.userExecute))
        if writeOnly || (executeOnly && !machine.executeOnlySupported) { return .misconfiguration(level: level) }
    }
    let allowed: Bool
    if tableAsWrite || kind == .write {
        allowed = allWrite
    } else if kind == .read {
        allowed = allRead
    } else {
        allowed = userModeAddress ? allUserExecute : allExecute
    }
    return allowed ? .translated : .violation(level: topLevel - entries.count + 1, qualification: qualification())
}

/// One slice of the space: the walk length, the leaf's level, mode-based execute control.
struct EPTPermissionSpace: Sendable, CustomTestStringConvertible {
    let levels: Int
    let leafLevel: Int
    let modeBasedExecute: Bool
    /// One in `sampleDivisor` entry combinations runs without VIRTMMU_EXHAUSTIVE.
    let sampleDivisor: UInt64

    var testDescription: String { "\(levels)-level EPT, leaf L\(leafLevel)\(modeBasedExecute ? ", MBEC" : "")" }

    var entryCount: Int { levels - leafLevel + 1 }
    var valuesPerEntry: Int { modeBasedExecute ? 16 : 8 }

    /// Distinct indices at every level; bits 51:48 only for a 5-level walk.
    var address: UInt64 {
        let low: UInt64 = 0x1A3 << 39 | 0x0C5 << 30 | 0x117 << 21 | 0x08B << 12 | 0x9AC
        return levels == 5 ? 0xA << 48 | low : low
    }

    func table(level: Int) -> UInt64 { 0x10000 + UInt64(5 - level) * 0x1000 }

    func entryAddress(level: Int) -> GuestPhysicalAddress {
        let index = (address >> UInt64(12 + 9 * (level - 1))) & 0x1FF
        return GuestPhysicalAddress(table(level: level) + index * 8)
    }

    /// The leaf's output page: aligned to its size, far from the tables.
    var pageBase: UInt64 { 0x40_0000_0000 }
}

@Suite("EPT permissions, exhaustively against the SDM's rules")
struct EPTPermissionTests {
    static let spaces: [EPTPermissionSpace] = [
        EPTPermissionSpace(levels: 4, leafLevel: 1, modeBasedExecute: false, sampleDivisor: 1),
        EPTPermissionSpace(levels: 4, leafLevel: 2, modeBasedExecute: false, sampleDivisor: 1),
        EPTPermissionSpace(levels: 4, leafLevel: 3, modeBasedExecute: false, sampleDivisor: 1),
        EPTPermissionSpace(levels: 5, leafLevel: 1, modeBasedExecute: false, sampleDivisor: 8),
        EPTPermissionSpace(levels: 5, leafLevel: 3, modeBasedExecute: false, sampleDivisor: 1),
        EPTPermissionSpace(levels: 4, leafLevel: 1, modeBasedExecute: true, sampleDivisor: 32),
        EPTPermissionSpace(levels: 4, leafLevel: 3, modeBasedExecute: true, sampleDivisor: 1),
        EPTPermissionSpace(levels: 5, leafLevel: 2, modeBasedExecute: true, sampleDivisor: 512),
    ]

    @Test("Every permission combination per level x access kind x origin", arguments: spaces)
    func space(_ space: EPTPermissionSpace) throws {
        let memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: 1 << 20)
        let combinations = (0..<space.entryCount).reduce(1) { product, _ in product * space.valuesPerEntry }
        var walks = 0
        for combination in 0..<combinations {
            if !TestEnvironment.exhaustive && space.sampleDivisor > 1
                && mix64(UInt64(combination), UInt64(space.levels * 16 + space.leafLevel)) % space.sampleDivisor != 0 {
                continue
            }
            var entries: [EPTRuleBits] = []
            var rest = combination
            for _ in 0..<space.entryCount {
                entries.append(EPTRuleBits(rest % space.valuesPerEntry))
                rest /= space.valuesPerEntry
            }
            for executeOnly in [false, true] {
                for ad in [false, true] {
                    let machine = EPTRuleMachine(executeOnlySupported: executeOnly, accessedDirty: ad,
                                                 modeBasedExecute: space.modeBasedExecute)
                    for kind in AccessKind.allCases {
                        for origin in EPTAccess.Origin.allCases {
                            for user in space.modeBasedExecute ? [false, true] : [false] {
                                try check(space, entries, machine, EPTAccess(kind, origin: origin, userModeAddress: user),
                                          memory)
                                walks += 1
                            }
                        }
                    }
                }
            }
        }
        #expect(walks > 1000)
    }

    func write(_ space: EPTPermissionSpace, _ entries: [EPTRuleBits], _ memory: GuestPhysicalMemory) throws {
        for (index, entry) in entries.enumerated() {
            let level = space.levels - index
            var value = entry.raw
            if level == space.leafLevel {
                value |= space.pageBase | 6 << 3  // write-back
                if level > 1 { value |= 1 << 7 }
            } else {
                value |= space.table(level: level - 1)
            }
            try memory.store64(value, at: space.entryAddress(level: level))
        }
    }

    func check(_ space: EPTPermissionSpace, _ entries: [EPTRuleBits], _ machine: EPTRuleMachine, _ access: EPTAccess,
               _ memory: GuestPhysicalMemory) throws {
        try write(space, entries, memory)
        let capabilities = EPTCapabilities(executeOnly: machine.executeOnlySupported,
                                           modeBasedExecute: machine.modeBasedExecute)
        let walker = try EPTWalker(pointer: EPTPointer(root: space.table(level: space.levels), levels: space.levels,
                                                       accessedDirty: machine.accessedDirty),
                                   capabilities: capabilities, modeBasedExecute: machine.modeBasedExecute)
        let want = eptRuleOutcome(entries: entries, topLevel: space.levels, kind: access.kind, origin: access.origin,
                                  userModeAddress: access.userModeAddress, machine: machine)
        let got: EPTRuleOutcome
        switch walker.translate(GuestPhysicalAddress(space.address), access, in: memory) {
        case .success(let translation):
            got = .translated
            let size: UInt64 = 1 << UInt64(12 + 9 * (space.leafLevel - 1))
            #expect(translation.outputAddress.rawValue == space.pageBase | space.address & (size - 1))
            #expect(translation.level == space.leafLevel)
        case .failure(.violation(let gpa, let qualification, let level, _)):
            #expect(gpa.rawValue == space.address)
            got = .violation(level: level, qualification: qualification.rawValue)
        case .failure(.misconfiguration(_, let level, _)):
            got = .misconfiguration(level: level)
        case .failure(let other):
            Issue.record("unexpected \(other)")
            return
        }
        #expect(got == want, "\(space.testDescription) \(entries.map { String($0.raw, radix: 16) }) \(machine) \(access)")
        guard case .translated = got else {
            // A walk that faults sets no flag.
            for level in space.leafLevel...space.levels {
                #expect(try memory.load64(space.entryAddress(level: level)) & 0x300 == 0)
            }
            return
        }
        // A/D: accessed in every entry used, dirty in the leaf of a write (a guest paging-structure
        // access being one), nothing without EPTP bit 6.
        let isWrite = access.kind == .write || (access.origin == .guestPagingStructure && machine.accessedDirty)
        for level in space.leafLevel...space.levels {
            let value = try memory.load64(space.entryAddress(level: level))
            #expect((value & 1 << 8 != 0) == machine.accessedDirty, "A at level \(level)")
            #expect((value & 1 << 9 != 0) == (machine.accessedDirty && isWrite && level == space.leafLevel),
                    "D at level \(level)")
        }
    }

    @Test("Mode-based execute control needs the capability")
    func modeBasedExecuteCapability() throws {
        let pointer = EPTPointer(root: 0x10000, levels: 4, accessedDirty: false)
        #expect(throws: EPTPointerError.modeBasedExecuteUnsupported) {
            try EPTWalker(pointer: pointer, capabilities: EPTCapabilities(modeBasedExecute: false), modeBasedExecute: true)
        }
        #expect(throws: Never.self) {
            try EPTWalker(pointer: pointer, capabilities: EPTCapabilities(modeBasedExecute: true), modeBasedExecute: true)
        }
        // Without the control, bit 10 is ignored: an entry with only bit 10 is not present.
        let memory = GuestPhysicalMemory()
        try memory.back(GuestPhysicalAddress(0), size: 1 << 20)
        let space = EPTPermissionSpace(levels: 4, leafLevel: 3, modeBasedExecute: false, sampleDivisor: 1)
        try write(space, [EPTRuleBits(7), EPTRuleBits(8)], memory)
        let walker = try EPTWalker(pointer: EPTPointer(root: space.table(level: 4), levels: 4, accessedDirty: false),
                                   capabilities: EPTCapabilities(modeBasedExecute: true))
        let result = walker.translate(GuestPhysicalAddress(space.address), EPTAccess(.fetch, userModeAddress: true),
                                      in: memory)
        guard case .failure(.violation(_, let qualification, let level, _)) = result else {
            Issue.record("expected a violation, got \(result)")
            return
        }
        #expect(level == 3 && qualification == [.instructionFetch])
    }
}
