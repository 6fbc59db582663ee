// Every combination of entry permission bits × control bits × access, walked by PageWalker over
// real tables in GuestPhysicalMemory and compared with the independent reference
// (ReferenceRules.swift). By default a deterministic sample runs (debug-friendly); with
// VIRTMMU_EXHAUSTIVE=1 the full space runs (CI: `VIRTMMU_EXHAUSTIVE=1 swift test -c release
// --filter Exhaustive`).

import GuestMemory
import Testing
import X86Paging

/// One slice of the space: a mode and the level of the leaf.
struct ExhaustiveSpace: Sendable, CustomTestStringConvertible {
    let mode: RefMode
    let leafLevel: Int
    /// One in `sampleDivisor` (config, register) pairs runs without VIRTMMU_EXHAUSTIVE.
    let sampleDivisor: UInt64
    /// Instead of one varied level at a time: R/W, U/S (and XD) of every level at once, all present,
    /// so that the AND over levels is covered combinatorially.
    var crossLevels = false

    var testDescription: String { "\(mode) leaf L\(leafLevel)\(crossLevels ? " cross-level" : "")" }

    var topLevel: Int {
        switch mode {
        case .bits32: 2
        case .pae: 3
        case .fourLevel: 4
        case .fiveLevel: 5
        }
    }
    var entrySize: Int { mode == .bits32 ? 4 : 8 }
    var is64: Bool { mode != .bits32 }

    /// Distinct table indices at every level; high-half (sign-extended) for the IA-32e modes.
    var linearAddress: UInt64 {
        switch mode {
        case .bits32: return 0x2F3 << 22 | 0x18B << 12 | 0x9AC
        case .pae: return 3 << 30 | 0x117 << 21 | 0x08B << 12 | 0x9AC
        case .fourLevel:
            return 0xFFFF_0000_0000_0000 | 0x1A3 << 39 | 0x0C5 << 30 | 0x117 << 21 | 0x08B << 12 | 0x9AC
        case .fiveLevel:
            return 0xFE00_0000_0000_0000 | 0x1F0 << 48 | 0x1A3 << 39 | 0x0C5 << 30 | 0x117 << 21 | 0x08B << 12 | 0x9AC
        }
    }

    /// The table that holds the level-`level` entry.
    func table(level: Int) -> UInt64 {
        if mode == .pae && level == 3 { return 0x12020 }  // a 32-byte-aligned PDPT, not page aligned
        return 0x10000 + UInt64(5 - level) * 0x1000
    }

    func entryAddress(level: Int) -> UInt64 {
        let va = linearAddress
        if mode == .pae && level == 3 { return table(level: 3) + (va >> 30) * 8 }
        let bitsPerLevel = mode == .bits32 ? 10 : 9
        let index = (va >> UInt64(12 + bitsPerLevel * (level - 1))) & ((1 << UInt64(bitsPerLevel)) - 1)
        return table(level: level) + index * UInt64(entrySize)
    }

    /// The table the level-`level` entry points at.
    func nextTable(level: Int) -> UInt64 {
        mode == .pae && level == 3 ? 0x13000 : 0x10000 + UInt64(5 - level + 1) * 0x1000
    }

    /// The page a leaf maps.
    var leafFrame: UInt64 {
        switch (mode, leafLevel) {
        case (.bits32, 1): 0xABCD_E000
        case (.bits32, _): 0xA5C0_0000 | 0x3 << 13  // PA 0x3_A5C0_0000 via PSE-36
        case (_, 1): 0x1234_5678_9000
        case (_, 2): 0x2345_6780_0000
        default: 0x2345_4000_0000
        }
    }

    /// Levels whose entry bits vary one at a time above the leaf.
    /// (5-level paging varies only the PML5E: the levels below it are the 4-level spaces'.)
    var variedLevels: [Int] {
        if mode == .fiveLevel { return [5] }
        return leafLevel < topLevel ? Array((leafLevel + 1)...topLevel) : []
    }

    func upperVariants(level: Int) -> Int {
        if mode == .pae && level == 3 { return 2 }  // a PDPTE register has only P
        return is64 ? 32 : 16  // P RW US NX PS, or P RW US PS
    }
    var leafVariants: Int { is64 ? 32 : 16 }  // P RW US NX extra, or P RW US extra

    struct Config {
        var index: Int
        var variedLevel: Int
        var upper: Int
        var leaf: Int
        var key: Int { (index &* 7 &+ 3) & 15 }
    }

    /// Permission bits per level in a cross-level config: R/W, U/S, and XD for the 64-bit formats.
    var crossBits: Int { is64 ? 3 : 2 }
    /// Levels with permission bits (a PAE PDPTE register has none).
    var crossLevelCount: Int { topLevel - leafLevel + 1 - (mode == .pae ? 1 : 0) }

    var configs: [Config] {
        var result: [Config] = []
        if crossLevels {
            for bits in 0..<(1 << (crossBits * crossLevelCount)) {
                result.append(Config(index: result.count, variedLevel: -1, upper: bits, leaf: 0))
            }
            return result
        }
        for leaf in 0..<(variedLevels.isEmpty ? leafVariants : 0) {
            result.append(Config(index: result.count, variedLevel: 0, upper: 0, leaf: leaf))
        }
        for level in variedLevels {
            for upper in 0..<upperVariants(level: level) {
                for leaf in 0..<leafVariants {
                    result.append(Config(index: result.count, variedLevel: level, upper: upper, leaf: leaf))
                }
            }
        }
        return result
    }

    /// The raw entry at `level` for `config`.
    func entry(level: Int, _ config: Config) -> UInt64 {
        if crossLevels {
            if mode == .pae && level == 3 { return nextTable(level: 3) | 1 }
            let bits = (config.upper >> (crossBits * (level - leafLevel))) & ((1 << crossBits) - 1)
            var value: UInt64 = 1
            if bits & 1 != 0 { value |= 2 }
            if bits & 2 != 0 { value |= 4 }
            if bits & 4 != 0 { value |= 1 << 63 }
            if level == leafLevel {
                value |= leafFrame
                if leafLevel > 1 { value |= 1 << 7 }
                if mode.paging == .ia32e { value |= UInt64(config.key) << 59 }
            } else {
                value |= nextTable(level: level)
            }
            return value
        }
        if level == leafLevel {
            let v = config.leaf
            var value = leafFrame
            if v & 1 != 0 { value |= 1 }
            if v & 2 != 0 { value |= 2 }
            if v & 4 != 0 { value |= 4 }
            if is64 {
                if v & 8 != 0 { value |= 1 << 63 }
                // Extra: PAT, bit 7 in a PTE and bit 12 in a large leaf.
                if v & 16 != 0 { value |= leafLevel == 1 ? 1 << 7 : 1 << 12 }
                if mode.paging == .ia32e { value |= UInt64(config.key) << 59 }
            } else if v & 8 != 0 {
                // Extra: PAT (bit 7) in a PTE, reserved bit 21 in a 4 MiB PDE.
                value |= leafLevel == 1 ? 1 << 7 : 1 << 21
            }
            if leafLevel > 1 { value |= 1 << 7 }
            if config.index % 3 == 0 { value |= 1 << 8 }  // G
            return value
        }
        let next = nextTable(level: level)
        if mode == .pae && level == 3 {
            return next | (level == config.variedLevel ? UInt64(config.upper & 1) : 1)
        }
        guard level == config.variedLevel else { return next | 7 }
        let v = config.upper
        var value = next
        if v & 1 != 0 { value |= 1 }
        if v & 2 != 0 { value |= 2 }
        if v & 4 != 0 { value |= 4 }
        if is64 {
            if v & 8 != 0 { value |= 1 << 63 }
            if v & 16 != 0 { value |= 1 << 7 }
        } else if v & 8 != 0 {
            value |= 1 << 7
        }
        return value
    }

    /// Register configuration `r`: bit 0 WP, 1 SMEP, 2 SMAP, 3 PKE, 4 PKS, 5 NXE, 6 AC, 7 PSE,
    /// bits 8-9 the PKRU rights (AD, WD) of the page's key, bits 10-11 its PKRS rights. Every other
    /// key has AD=WD=1, so a walker that read the wrong key would refuse allowed accesses.
    static let registerConfigs = 4096
    static func controls(_ r: Int, key: Int) -> RefControls {
        var c = RefControls()
        c.wp = r & 1 != 0
        c.smep = r & 2 != 0
        c.smap = r & 4 != 0
        c.pke = r & 8 != 0
        c.pks = r & 16 != 0
        c.nxe = r & 32 != 0
        c.ac = r & 64 != 0
        c.pse = r & 128 != 0
        let keyMask = UInt32(3) << UInt32(2 * key)
        c.pkru = (~keyMask) | UInt32((r >> 8) & 3) << UInt32(2 * key)
        c.pkrs = (~keyMask) | UInt32((r >> 10) & 3) << UInt32(2 * key)
        return c
    }

    func machine(controls: RefControls, pdpte: UInt64) -> RefMachine {
        var machine = RefMachine(mode: mode, cr3: table(level: topLevel), controls: controls)
        machine.pge = true
        if mode == .pae { machine.pdptes = [0, 0, 0, pdpte] }
        return machine
    }
}

/// Runs one space; returns the mismatch log.
func runExhaustiveSpace(_ space: ExhaustiveSpace, full: Bool) throws -> MismatchLog {
    let memory = GuestPhysicalMemory()
    try memory.back(GuestPhysicalAddress(0x10000), size: 0x10000)
    let va = space.linearAddress
    let levels = Array((space.leafLevel...space.topLevel).reversed())  // top first
    let size = space.entrySize
    var log = MismatchLog()
    // Walkers are per (PDPTE variant, key, register config), built on first use.
    var walkers = [PageWalker?](repeating: nil, count: 2 * 16 * ExhaustiveSpace.registerConfigs)
    func walker(pdpteVariant: Int, pdpte: UInt64, key: Int, r: Int) throws -> PageWalker {
        let slot = (pdpteVariant * 16 + key) * ExhaustiveSpace.registerConfigs + r
        if let w = walkers[slot] { return w }
        let machine = space.machine(controls: ExhaustiveSpace.controls(r, key: key), pdpte: pdpte)
        let w = try PageWalker(registers: machine.registers, cpu: machine.cpu, memory: memory,
                               pdpteValues: space.mode == .pae ? machine.pdptes : nil)
        walkers[slot] = w
        return w
    }

    for config in space.configs {
        var original: [UInt64] = []
        for level in levels {
            let value = space.entry(level: level, config)
            original.append(value)
            rawWrite(memory, space.entryAddress(level: level), size: size, value)
        }
        let pdpte = space.mode == .pae ? original[0] : 0
        let pdpteVariant = Int(pdpte & 1)
        // The access-independent structure, per (NXE, PSE): the only controls it depends on.
        var shapes: [RefStructure] = []
        for variant in 0..<4 {
            var c = RefControls()
            c.nxe = variant & 1 != 0
            c.pse = variant & 2 != 0
            let (shape, _) = ReferenceWalk.structure(va, machine: space.machine(controls: c, pdpte: pdpte)) {
                rawRead(memory, $0, size: $1)
            }
            shapes.append(shape)
        }
        for r in 0..<ExhaustiveSpace.registerConfigs {
            if !full && mix64(UInt64(config.index) &* 0x1_0000 &+ UInt64(space.leafLevel), UInt64(r)) % space.sampleDivisor != 0 {
                continue
            }
            let controls = ExhaustiveSpace.controls(r, key: config.key)
            let machine = space.machine(controls: controls, pdpte: pdpte)
            let shape = shapes[(controls.nxe ? 1 : 0) | (controls.pse ? 2 : 0)]
            let w = try walker(pdpteVariant: pdpteVariant, pdpte: pdpte, key: config.key, r: r)
            // The level of a successful walk's leaf (A goes on every level from the top to it).
            var successLeaf = 0
            if case .stop(.leaf(let level, _, _, _), _, _, _, _) = shape { successLeaf = level }
            for (kind, privilege) in allRefAccesses {
                let setAD = (r ^ config.index) & 1 == 0
                let expected = ReferenceWalk.result(shape, machine: machine, kind, privilege)
                let (actual, _) = walkerResult(w, va, kind, privilege, memory: memory, setAccessedDirty: setAD)
                log.checked += 1
                if actual != expected {
                    log.record("\(space.testDescription) config \(config.index) (varied L\(config.variedLevel) "
                        + "upper \(config.upper) leaf \(config.leaf) key \(config.key)) regs \(r) "
                        + "\(kind) \(privilege): expected \(expected), walker \(actual); entries "
                        + original.map { "0x" + String($0, radix: 16) }.joined(separator: " "))
                }
                // Memory: A on every level used and D on the leaf of a write, only for a successful
                // walk with setAccessedDirty; nothing otherwise (the PAE PDPTE is a register).
                var succeeded = false
                if case .translated = actual { succeeded = true }
                for (i, level) in levels.enumerated() {
                    let address = space.entryAddress(level: level)
                    let now = rawRead(memory, address, size: size)!
                    var want = original[i]
                    if succeeded && setAD && level >= successLeaf && !(space.mode == .pae && level == 3) {
                        want |= 1 << 5
                        if level == successLeaf && kind == .write { want |= 1 << 6 }
                    }
                    if now != want {
                        log.record("\(space.testDescription) config \(config.index) regs \(r) \(kind) \(privilege) "
                            + "setAD \(setAD): L\(level) entry is 0x\(String(now, radix: 16)), expected "
                            + "0x\(String(want, radix: 16))")
                    }
                    if now != original[i] { rawWrite(memory, address, size: size, original[i]) }
                }
            }
        }
    }
    return log
}

@Suite("Exhaustive permission tests")
struct ExhaustivePermissionTests {
    static let spaces: [ExhaustiveSpace] = [
        ExhaustiveSpace(mode: .fourLevel, leafLevel: 1, sampleDivisor: 256),
        ExhaustiveSpace(mode: .fourLevel, leafLevel: 2, sampleDivisor: 256),
        ExhaustiveSpace(mode: .fourLevel, leafLevel: 3, sampleDivisor: 256),
        ExhaustiveSpace(mode: .fiveLevel, leafLevel: 1, sampleDivisor: 512),
        ExhaustiveSpace(mode: .fiveLevel, leafLevel: 2, sampleDivisor: 512),
        ExhaustiveSpace(mode: .pae, leafLevel: 1, sampleDivisor: 128),
        ExhaustiveSpace(mode: .pae, leafLevel: 2, sampleDivisor: 64),
        ExhaustiveSpace(mode: .bits32, leafLevel: 1, sampleDivisor: 32),
        ExhaustiveSpace(mode: .bits32, leafLevel: 2, sampleDivisor: 32),
        ExhaustiveSpace(mode: .fourLevel, leafLevel: 1, sampleDivisor: 256, crossLevels: true),
        ExhaustiveSpace(mode: .fourLevel, leafLevel: 2, sampleDivisor: 128, crossLevels: true),
        ExhaustiveSpace(mode: .pae, leafLevel: 1, sampleDivisor: 16, crossLevels: true),
        ExhaustiveSpace(mode: .bits32, leafLevel: 1, sampleDivisor: 8, crossLevels: true),
    ]

    /// The A/D rules spelled out once on a plain 4-level mapping (the space runs check them for every case).
    @Test("Exhaustive A/D rules: A on every level, D on the leaf of a write, nothing on a fault or a probe",
          arguments: [1, 2, 3])
    func accessedDirty(leafLevel: Int) throws {
        let sizes: [Int: UInt64] = [1: 0x1000, 2: 0x20_0000, 3: 0x4000_0000]
        let va: UInt64 = 0x7F12_4000_0000
        for access in [Access.read(.user), .write(.user), .fetch(.user), .write(.supervisor), .read(.implicitSupervisor)] {
            for probe in [false, true] {
                let memory = GuestPhysicalMemory()
                try memory.back(GuestPhysicalAddress(0), size: 1 << 20)
                let builder = try PageTableBuilder(memory: memory, format: .fourLevel, tableArea: GuestPhysicalAddress(0x1_0000))
                try builder.map(va, to: 0x8000_0000, size: sizes[leafLevel]!, leafFlags: 0x7)
                let addresses = try (leafLevel...4).map { try #require(try builder.entryAddress(of: va, level: $0)) }
                let before = try addresses.map { try memory.load64($0) }
                #expect(before.allSatisfy { $0 & 0x60 == 0 })
                let walker = try PageWalker(
                    registers: PagingRegisters(cr0: [.paging, .protectionEnable, .writeProtect], cr3: builder.root.rawValue,
                                               cr4: [.physicalAddressExtension],
                                               efer: [.longModeEnable, .longModeActive, .noExecuteEnable]),
                    memory: memory)
                let t = try walker.walk(GuestVirtualAddress(va | 0x123), access, in: memory, setAccessedDirty: !probe)
                #expect(t.level == leafLevel)
                let after = try addresses.map { try memory.load64($0) }
                for (i, level) in (leafLevel...4).enumerated() {
                    var want = before[i]
                    if !probe {
                        want |= 0x20
                        if level == leafLevel && access.kind == .write { want |= 0x40 }
                    }
                    #expect(after[i] == want, "\(access) probe \(probe) level \(level)")
                    // The returned path shows the entries as they now are.
                    #expect(t.path.entryValue(level: level) == want)
                }
                // A faulting walk (a user write to the now read-only leaf) changes nothing.
                try memory.store64(after[0] & ~2, at: addresses[0])
                let snapshot = try addresses.map { try memory.load64($0) }
                #expect(throws: WalkFault.self) { try walker.walk(GuestVirtualAddress(va), .write(.user), in: memory) }
                #expect(try addresses.map { try memory.load64($0) } == snapshot)
            }
        }
    }

    @Test("Exhaustive walker vs reference", arguments: spaces)
    func exhaustiveSpace(_ space: ExhaustiveSpace) throws {
        let log = try runExhaustiveSpace(space, full: TestEnvironment.exhaustive)
        #expect(log.checked > 0)
        print("\(space.testDescription): \(space.configs.count) table configurations, \(log.checked) walks checked")
        #expect(log.count == 0, "\(log.summary)")
    }
}

/// The reference checked against hand-worked SDM examples, so that it is not validated only by
/// agreeing with the walker.
@Suite("Reference rules: hand-checked SDM examples")
struct ReferenceRulesSanityTests {
    /// A 4-level translation whose only interesting entry is the PTE.
    func ia32e(pte: RefEntryBits, _ controls: RefControls, key: Int = 0, _ kind: RefAccessKind,
               _ privilege: RefPrivilege) -> RefOutcome {
        ReferenceRules.evaluate([(4, RefEntryBits()), (3, RefEntryBits()), (2, RefEntryBits()), (1, pte)], key: key,
                                paging: .ia32e, controls: controls, kind, privilege)
    }

    @Test func examples() {
        let readOnlyUser = RefEntryBits(writable: false)
        var c = RefControls()
        // 4.6.1: supervisor writes ignore R/W with CR0.WP=0 and honour it with WP=1.
        #expect(ia32e(pte: readOnlyUser, c, .write, .supervisor) == .translated(leafLevel: 1, writable: false, user: true, executable: true))
        c.wp = true
        #expect(ia32e(pte: readOnlyUser, c, .write, .supervisor) == .pageFault(errorCode: 0b11, level: 1))
        #expect(ia32e(pte: readOnlyUser, c, .write, .user) == .pageFault(errorCode: 0b111, level: 1))
        // User access to a supervisor page.
        #expect(ia32e(pte: RefEntryBits(user: false), c, .read, .user) == .pageFault(errorCode: 0b101, level: 1))
        // XD: with NXE a fetch faults with I/D; without NXE the bit is reserved (RSVD, no I/D).
        c.nxe = true
        #expect(ia32e(pte: RefEntryBits(noExecute: true), c, .fetch, .user) == .pageFault(errorCode: 0b1_0101, level: 1))
        c.nxe = false
        #expect(ia32e(pte: RefEntryBits(noExecute: true), c, .fetch, .user) == .pageFault(errorCode: 0b1101, level: 1))
        // SMAP: explicit supervisor reads of user pages are allowed with AC=1, implicit ones never.
        c.smap = true
        #expect(ia32e(pte: RefEntryBits(), c, .read, .supervisor) == .pageFault(errorCode: 0b1, level: 1))
        c.ac = true
        #expect(ia32e(pte: RefEntryBits(), c, .read, .supervisor) == .translated(leafLevel: 1, writable: true, user: true, executable: true))
        #expect(ia32e(pte: RefEntryBits(), c, .read, .implicitSupervisor) == .pageFault(errorCode: 0b1, level: 1))
        // SMEP: supervisor fetch from a user page; I/D reported because SMEP is on.
        c.smep = true
        #expect(ia32e(pte: RefEntryBits(), c, .fetch, .supervisor) == .pageFault(errorCode: 0b1_0001, level: 1))
        // 4.6.2: PKRU AD stops every data access to a user page (PK set), not fetches.
        var k = RefControls()
        k.pke = true
        k.pkru = 1 << 10  // key 5 AD
        #expect(ia32e(pte: RefEntryBits(), k, key: 5, .read, .supervisor) == .pageFault(errorCode: 0b10_0001, level: 1))
        #expect(ia32e(pte: RefEntryBits(), k, key: 5, .fetch, .user) == .translated(leafLevel: 1, writable: true, user: true, executable: true))
        #expect(ia32e(pte: RefEntryBits(), k, key: 4, .read, .user) == .translated(leafLevel: 1, writable: true, user: true, executable: true))
        // WD stops user writes always, supervisor writes only with WP=1. Both causes: PK still set.
        k.pkru = 2 << 10
        #expect(ia32e(pte: RefEntryBits(), k, key: 5, .write, .user) == .pageFault(errorCode: 0b10_0111, level: 1))
        #expect(ia32e(pte: RefEntryBits(), k, key: 5, .write, .supervisor) == .translated(leafLevel: 1, writable: true, user: true, executable: true))
        k.wp = true
        #expect(ia32e(pte: RefEntryBits(), k, key: 5, .write, .supervisor) == .pageFault(errorCode: 0b10_0011, level: 1))
        #expect(ia32e(pte: readOnlyUser, k, key: 5, .write, .user) == .pageFault(errorCode: 0b10_0111, level: 1))
        // PKRS governs supervisor pages.
        var s = RefControls()
        s.pks = true
        s.pkrs = 1
        #expect(ia32e(pte: RefEntryBits(user: false), s, .read, .supervisor) == .pageFault(errorCode: 0b10_0001, level: 1))
        // 32-bit paging: no XD, I/D only with SMEP even with NXE; PS without PSE is ignored.
        var l = RefControls()
        l.nxe = true
        let pde = RefEntryBits(pageSize: true)
        #expect(ReferenceRules.evaluate([(2, pde), (1, RefEntryBits(present: false))], key: 0, paging: .bits32, controls: l,
                                        .fetch, .user) == .pageFault(errorCode: 0b100, level: 1))
        l.pse = true
        #expect(ReferenceRules.evaluate([(2, pde)], key: 0, paging: .bits32, controls: l, .fetch, .user)
                == .translated(leafLevel: 2, writable: true, user: true, executable: true))
        // PS in a PML4E is reserved; a 1 GiB PDPTE needs CPU support.
        var g = RefControls()
        #expect(ReferenceRules.evaluate([(4, RefEntryBits(pageSize: true))], key: 0, paging: .ia32e, controls: g, .read, .user)
                == .pageFault(errorCode: 0b1101, level: 4))
        g.supports1GiB = false
        #expect(ReferenceRules.evaluate([(4, RefEntryBits()), (3, RefEntryBits(pageSize: true))], key: 0, paging: .ia32e,
                                        controls: g, .write, .supervisor) == .pageFault(errorCode: 0b1011, level: 3))
    }
}
