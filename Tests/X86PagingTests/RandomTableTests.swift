// Property tests: random (often hostile) page tables, random register states and random accesses in
// every paging mode, each walk compared with the plain reference walk of ReferenceRules.swift.
// Seeded (SplitMix64), so every failure reproduces from its printed mode and round.

import Foundation
import GuestMemory
import Testing
import X86Paging

enum RandomMode: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case bits32NoPSE, bits32PSE, pae, fourLevel, fiveLevel
    var refMode: RefMode {
        switch self {
        case .bits32NoPSE, .bits32PSE: .bits32
        case .pae: .pae
        case .fourLevel: .fourLevel
        case .fiveLevel: .fiveLevel
        }
    }
    var testDescription: String { rawValue }
}

/// One random world: memory full of random tables plus a random machine.
struct RandomWorld {
    static let poolBase: UInt64 = 0x40_0000
    static let poolPages = 12

    let memory = GuestPhysicalMemory()
    var machine: RefMachine
    var anchors: [UInt64] = []
    var readOnlyPages: Set<UInt64> = []
    var rng: SplitMix64
    let mode: RandomMode

    var entrySize: Int { mode.refMode == .bits32 ? 4 : 8 }
    var topLevel: Int {
        switch mode.refMode {
        case .bits32: 2
        case .pae: 3
        case .fourLevel: 4
        case .fiveLevel: 5
        }
    }

    init(mode: RandomMode, seed: UInt64) throws {
        self.mode = mode
        var rng = SplitMix64(seed: seed)
        var controls = RefControls()
        controls.wp = rng.bool()
        let pse = rng.bool()
        controls.pse = mode == .bits32PSE || (mode != .bits32NoPSE && pse)
        controls.smep = rng.bool()
        controls.smap = rng.bool()
        controls.pke = rng.bool()
        controls.pks = rng.bool()
        controls.nxe = rng.bool()
        controls.ac = rng.bool()
        // Rights registers: mostly sparse so that some keys allow everything.
        controls.pkru = UInt32(truncatingIfNeeded: rng.next() & rng.next())
        controls.pkrs = UInt32(truncatingIfNeeded: rng.next() & rng.next())
        controls.supports1GiB = rng.chance(3, in: 4)
        var machine = RefMachine(mode: mode.refMode, cr3: 0, controls: controls)
        machine.pge = rng.bool()
        machine.maxPhysicalAddressBits = [36, 39, 40, 41, 46, 46, 52][rng.below(7)]
        self.machine = machine
        self.rng = rng
        try memory.back(GuestPhysicalAddress(Self.poolBase), size: UInt64(Self.poolPages) * 0x1000)
        build()
    }

    func poolPage(_ index: Int) -> UInt64 { Self.poolBase + UInt64(index) * 0x1000 }

    mutating func randomPoolPage() -> UInt64 { poolPage(rng.below(Self.poolPages)) }

    /// One random bit in MAXPHYADDR..51 (none when MAXPHYADDR is 52).
    mutating func beyondMaxPhysicalBit() -> UInt64 {
        let m = machine.maxPhysicalAddressBits
        return m < 52 ? 1 << UInt64(m + rng.below(52 - m)) : 0
    }

    /// A physical page address: mostly sane, sometimes beyond MAXPHYADDR or unbacked.
    mutating func randomFrame(alignment: Int) -> UInt64 {
        let m = machine.maxPhysicalAddressBits
        var frame = rng.next() & ReferenceWalk.bits(12, m - 1)
        if rng.chance(1, in: 16) { frame |= beyondMaxPhysicalBit() }
        if rng.chance(7, in: 8) { frame &= ~((1 << UInt64(alignment)) - 1) }
        if mode.refMode == .bits32 { frame &= 0xFFFF_F000 }
        return frame
    }

    /// A random entry for `level`, pointing at a pool page or a random frame.
    mutating func randomEntry(level: Int) -> UInt64 {
        if rng.chance(1, in: 25) { return rng.next() }  // pure garbage
        var value: UInt64 = 0
        if rng.chance(9, in: 10) { value |= 1 }                 // P
        if rng.chance(3, in: 4) { value |= 2 }                  // R/W
        if rng.chance(3, in: 4) { value |= 4 }                  // U/S
        value |= rng.next() & 0x178                             // PWT, PCD, A, D, G
        value |= rng.next() & 0xE00                             // ignored 11:9
        let mayBeLarge = mode.refMode == .bits32 ? level == 2 : level >= 2
        // PS in a PML4E/PML5E is always reserved: rarely.
        let large = mayBeLarge && (level >= 4 ? rng.chance(1, in: 20) : rng.chance(1, in: 3))
        if large || (level == 1 && rng.bool()) { value |= 0x80 } // PS (PAT in a PTE)
        if mode.refMode == .bits32 {
            if large {
                // 4 MiB page: bits 31:22 plus PSE-36 bits 20:13, bit 21 sometimes.
                value |= rng.next() & 0xFFC0_0000
                value |= rng.next() & (rng.bool() ? 0x1F_E000 : 0x6000)
                if rng.chance(1, in: 6) { value |= 1 << 21 }
                if rng.bool() { value |= 1 << 12 }              // PAT
            } else {
                value |= rng.chance(5, in: 6) ? randomPoolPage() : randomFrame(alignment: 12)
            }
            return value & 0xFFFF_FFFF
        }
        if rng.chance(1, in: 6) { value |= 1 << 63 }           // XD
        if mode.refMode != .pae || rng.chance(1, in: 8) {
            value |= rng.next() & ReferenceWalk.bits(52, 62)    // PK and ignored bits (reserved under PAE)
        }
        if large {
            let alignment = level == 2 ? 21 : 30
            value |= randomFrame(alignment: alignment)
            if rng.bool() { value |= 1 << 12 }                  // PAT
        } else {
            value |= rng.chance(5, in: 6) ? randomPoolPage() : randomFrame(alignment: 12)
        }
        return value
    }

    func entryAddress(table: UInt64, level: Int, va: UInt64) -> UInt64 {
        let bitsPerLevel: UInt64 = mode.refMode == .bits32 ? 10 : 9
        let index = (va >> (12 + bitsPerLevel * UInt64(level - 1))) & ((1 << bitsPerLevel) - 1)
        return table + index * UInt64(entrySize)
    }

    mutating func randomLinearAddress() -> UInt64 {
        switch mode.refMode {
        case .bits32, .pae: return rng.next() & 0xFFFF_FFFF
        case .fourLevel:
            let low = rng.next() & ReferenceWalk.bits(0, 47)
            return low >> 47 == 1 ? low | ReferenceWalk.bits(48, 63) : low
        case .fiveLevel:
            let low = rng.next() & ReferenceWalk.bits(0, 56)
            return low >> 56 == 1 ? low | ReferenceWalk.bits(57, 63) : low
        }
    }

    mutating func build() {
        let root = randomPoolPage()
        switch mode.refMode {
        case .bits32, .fourLevel, .fiveLevel:
            machine.cr3 = root | (rng.next() & 0x18)              // PWT/PCD
            if mode.refMode != .bits32 && rng.chance(1, in: 20) {
                machine.cr3 |= beyondMaxPhysicalBit()
            }
        case .pae:
            machine.cr3 = root + UInt64(rng.below(128)) * 32 | (rng.next() & 0x18)
            let pdpt = machine.cr3 & 0xFFFF_FFE0
            for index in 0..<4 {
                var value: UInt64 = rng.chance(9, in: 10) ? 1 : 0
                value |= rng.next() & 0x18                        // PWT/PCD
                value |= rng.next() & 0xE00                       // ignored
                value |= randomPoolPage()
                if rng.chance(1, in: 25) {                        // a reserved bit: MOV CR3 would #GP
                    let candidates: [Int] = [1, 2, 5, 6, 7, 8, machine.maxPhysicalAddressBits, 63]
                    value |= 1 << UInt64(candidates[rng.below(candidates.count)])
                }
                rawWrite(memory, pdpt + UInt64(index) * 8, size: 8, value)
                machine.pdptes[index] = value
            }
        }
        // Paths for a few anchors, sharing tables freely (cycles and aliasing included).
        for _ in 0..<6 {
            let va = randomLinearAddress()
            anchors.append(va)
            var table = machine.cr3 & (mode.refMode == .bits32 ? 0xFFFF_F000 : ReferenceWalk.bits(12, 51))
            var level = topLevel
            if mode.refMode == .pae {
                table = machine.pdptes[Int(va >> 30)] & ReferenceWalk.bits(12, 51)
                level = 2
            }
            while level >= 1, table >= Self.poolBase, table < poolPage(Self.poolPages) {
                let address = entryAddress(table: table, level: level, va: va)
                var value = rawRead(memory, address, size: entrySize)!
                if value == 0 || rng.chance(1, in: 4) {
                    value = randomEntry(level: level)
                    rawWrite(memory, address, size: entrySize, value)
                }
                if value & 1 == 0 { break }
                table = mode.refMode == .bits32 ? value & 0xFFFF_F000 : value & ReferenceWalk.bits(12, 51)
                level -= 1
            }
        }
        // Scattered garbage.
        for _ in 0..<40 {
            let address = randomPoolPage() + UInt64(rng.below(4096 / entrySize) * entrySize)
            rawWrite(memory, address, size: entrySize, randomEntry(level: 1 + rng.below(topLevel)))
        }
        // Sometimes a table page the guest cannot write: A/D there must stay untouched.
        if rng.chance(1, in: 3) {
            let page = randomPoolPage()
            try! memory.setReadOnly(GuestPhysicalAddress(page), size: 0x1000, true)
            readOnlyPages.insert(page)
        }
        // The PDPTE registers are loaded at the CR3 load, after all the writes above (which may
        // have landed in the PDPT).
        if mode.refMode == .pae {
            let pdpt = machine.cr3 & 0xFFFF_FFE0
            machine.pdptes = (0..<4).map { rawRead(memory, pdpt + UInt64($0) * 8, size: 8)! }
        }
    }

    /// A linear address near an anchor (same page, a neighbouring entry, or anywhere).
    mutating func randomAccessAddress() -> UInt64 {
        let anchor = anchors[rng.below(anchors.count)]
        switch rng.below(8) {
        case 0: return randomLinearAddress()
        case 1: return rng.next() & (mode.refMode == .bits32 || mode.refMode == .pae ? 0x1_FFFF_FFFF : UInt64.max)
        case 2, 3:
            // Flip some index bits below the anchor's top level.
            let flip = rng.next() & ReferenceWalk.bits(12, mode.refMode == .bits32 ? 31 : 29)
            return anchor ^ (flip & (flip >> 3))
        default:
            return (anchor & ~0xFFF) | (rng.next() & 0xFFF)
        }
    }

    /// The whole table pool as bytes.
    func snapshot() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.poolPages * 4096)
        bytes.withUnsafeMutableBytes { buffer in
            for page in 0..<Self.poolPages {
                let host = memory.hostPage(GuestPhysicalAddress(poolPage(page)).frame)!
                (buffer.baseAddress! + page * 4096).copyMemory(from: host.bytes, byteCount: 4096)
            }
        }
        return bytes
    }

    /// The reference's expected init error, if the register state is one the CPU would refuse.
    var expectedInitError: ControlStateError? {
        let m = machine.maxPhysicalAddressBits
        switch mode.refMode {
        case .bits32: return nil
        case .pae:
            let reserved = ReferenceWalk.pdpteReserved(maxPhysicalAddressBits: m)
            for (index, value) in machine.pdptes.enumerated() where value & 1 != 0 && value & reserved != 0 {
                return .pdpteReservedBits(index: index, value: value)
            }
            return nil
        case .fourLevel, .fiveLevel:
            let bad = machine.cr3 & ReferenceWalk.bits(m, 51)
            return bad != 0 ? .cr3ReservedBits(bad) : nil
        }
    }
}

@Suite("Random table property tests")
struct RandomTableTests {
    static let rounds = 0..<60
    static let accessesPerRound = 60

    @Test("Random tables: walker agrees with the reference walk", arguments: RandomMode.allCases)
    func randomTables(_ mode: RandomMode) throws {
        try randomTablesBody(mode, rounds: Self.rounds)
    }

    func randomTablesBody(_ mode: RandomMode, rounds: Range<Int>) throws {
        var log = MismatchLog()
        var outcomes: [String: Int] = [:]
        for round in rounds {
            let seed = mix64(UInt64(RandomMode.allCases.firstIndex(of: mode)!) << 32 | UInt64(round))
            var world = try RandomWorld(mode: mode, seed: seed)
            let machine = world.machine
            let walker: PageWalker
            do {
                walker = try PageWalker(registers: machine.registers, cpu: machine.cpu, memory: world.memory)
                if let expected = world.expectedInitError {
                    log.record("\(mode) round \(round): walker accepted a state the reference refuses: \(expected)")
                    continue
                }
            } catch {
                if error != world.expectedInitError {
                    log.record("\(mode) round \(round): init error \(error), reference \(String(describing: world.expectedInitError))")
                }
                outcomes["initError", default: 0] += 1
                continue
            }
            if mode.refMode == .pae {
                let loaded = (0..<4).map { walker.pdpte($0).rawValue }
                if loaded != machine.pdptes { log.record("\(mode) round \(round): PDPTEs \(loaded) != \(machine.pdptes)") }
            }
            for access in 0..<Self.accessesPerRound {
                let va = world.randomAccessAddress()
                let (kind, privilege) = allRefAccesses[world.rng.below(allRefAccesses.count)]
                let context = "\(mode) round \(round) access \(access): va 0x\(String(va, radix: 16)) \(kind) \(privilege)"
                let (expected, expectedPath) = ReferenceWalk.walk(va, kind, privilege, machine: machine) {
                    rawRead(world.memory, $0, size: $1)
                }
                let before = world.snapshot()
                let (actual, path) = walkerResult(walker, va, kind, privilege, memory: world.memory, setAccessedDirty: false)
                log.checked += 1
                outcomes[outcomeName(expected), default: 0] += 1
                if actual != expected {
                    log.record("\(context): expected \(expected), walker \(actual); path \(expectedPath)")
                    continue
                }
                if let path, refPath(path) != expectedPath {
                    log.record("\(context): path \(refPath(path)), reference \(expectedPath)")
                }
                if !sameBytes(world.snapshot(), before) { log.record("\(context): setAccessedDirty:false changed memory") }

                // Again with A/D updates: same answer; A on every entry used, D on a written leaf.
                guard world.rng.bool() else { continue }
                let (again, _) = walkerResult(walker, va, kind, privilege, memory: world.memory, setAccessedDirty: true)
                if again != expected { log.record("\(context): with A/D updates \(again), without \(expected)") }
                var want = before
                if case .translated = expected {
                    for (i, entry) in expectedPath.enumerated() where !(mode.refMode == .pae && entry.level == 3) {
                        let page = entry.address & ~0xFFF
                        guard !world.readOnlyPages.contains(page),
                              let pageIndex = (0..<RandomWorld.poolPages).first(where: { world.poolPage($0) == page })
                        else { continue }
                        let offset = pageIndex * 4096 + Int(entry.address & 0xFFF)
                        want[offset] |= 1 << 5
                        if i == expectedPath.count - 1 && kind == .write { want[offset] |= 1 << 6 }
                    }
                }
                let after = world.snapshot()
                if !sameBytes(after, want) {
                    let diff = (0..<after.count).first { after[$0] != want[$0] }!
                    log.record("\(context): A/D update wrong at pool byte \(diff): 0x\(String(after[diff], radix: 16)) "
                        + "expected 0x\(String(want[diff], radix: 16)); path \(expectedPath)")
                }
            }
        }
        #expect(log.count == 0, "\(log.summary)")
        print("random \(mode) rounds \(rounds): \(log.checked) walks checked, outcomes \(outcomes.sorted { $0.key < $1.key })")
        // The generator must reach every kind of outcome, or the property says little.
        for name in ["translated", "notPresent", "protection", "noMemory"] + (mode == .bits32NoPSE ? [] : ["reserved"]) {
            #expect(outcomes[name, default: 0] > 0, "\(mode): no \(name) outcome in \(outcomes)")
        }
        if mode.refMode == .fourLevel || mode.refMode == .fiveLevel {
            #expect(outcomes["generalProtection", default: 0] > 0, "\(mode): \(outcomes)")
            #expect(outcomes["protectionKey", default: 0] > 0, "\(mode): \(outcomes)")
        }
    }

    func outcomeName(_ result: RefWalkResult) -> String {
        switch result {
        case .translated: "translated"
        case .pageFault(let code, _):
            code & RefErrorCode.present == 0 ? "notPresent"
                : code & RefErrorCode.reserved != 0 ? "reserved"
                : code & RefErrorCode.protectionKey != 0 ? "protectionKey" : "protection"
        case .generalProtection: "generalProtection"
        case .noMemory: "noMemory"
        case .tooWide: "tooWide"
        }
    }
}

/// Byte-wise equality through memcmp (an element-wise `==` is slow in debug builds).
func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    return a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
}

/// Many more random worlds, only with VIRTMMU_EXHAUSTIVE=1 (named so that the CI's
/// `--filter Exhaustive` selects it).
@Suite("Exhaustive random table property tests", .enabled(if: TestEnvironment.exhaustive))
struct ExhaustiveRandomTableTests {
    static let rounds = 60..<4060

    @Test("Exhaustive random tables", arguments: RandomMode.allCases)
    func exhaustiveRandomTables(_ mode: RandomMode) throws {
        try RandomTableTests().randomTablesBody(mode, rounds: Self.rounds)
    }
}
