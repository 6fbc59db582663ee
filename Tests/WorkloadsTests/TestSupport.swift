import Testing
import Workloads
import X86Paging

/// The workloads' SplitMix64: every property and fuzz failure reproduces from its seed.
typealias SplitMix64 = SeededGenerator

extension SeededGenerator {
    mutating func chance(_ percent: Int) -> Bool { Int.random(in: 0..<100, using: &self) < percent }
}

/// Parses `text`, failing the test (and returning nil) on an error.
func parseOK(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> Scenario? {
    do {
        return try Scenario.parse(text, name: "test")
    } catch {
        Issue.record("unexpected error: \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// The error parsing `text` gives, failing the test (and returning nil) when it parses.
func parseError(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> ScenarioError? {
    do {
        let scenario = try Scenario.parse(text, name: "test")
        Issue.record("expected an error, parsed \(scenario.directives.map(\.text))", sourceLocation: sourceLocation)
        return nil
    } catch {
        return error
    }
}

/// The only directive of a one-directive scenario.
func single(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> ScenarioDirective? {
    guard let scenario = parseOK(text, sourceLocation: sourceLocation) else { return nil }
    #expect(scenario.directives.count == 1, sourceLocation: sourceLocation)
    return scenario.directives.first?.directive
}

// MARK: Random scenarios

/// Generates random valid scenarios: a setup part (mem, cpu, set with a paging mode) then guest
/// operations valid for that mode.
struct ScenarioGenerator {
    var rng: SplitMix64

    init(seed: UInt64) { rng = SplitMix64(seed: seed) }

    mutating func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &rng) }
    mutating func u64() -> UInt64 { rng.next() }
    mutating func bool() -> Bool { rng.next() & 1 == 1 }
    mutating func maybe<T>(_ percent: Int, _ make: (inout ScenarioGenerator) -> T) -> T? {
        rng.chance(percent) ? make(&self) : nil
    }

    mutating func flags(thirtyTwoBit: Bool) -> UInt64 {
        switch int(0...3) {
        case 0: return 0
        case 1: return [0x7, 0x3, 0x1, 0x5, 0x67][int(0...4)]
        default:
            let mask = u64() & u64()
            return thirtyTwoBit ? mask & 0xFFFF_FFFF : mask
        }
    }

    mutating func gva(mode: PagingMode, alignedTo size: UInt64 = 1, canonical: Bool = true) -> UInt64 {
        var value: UInt64
        switch mode {
        case .legacy32, .pae, .disabled: value = u64() & 0xFFFF_FFFF
        case .fourLevel, .fiveLevel:
            let width = mode.linearAddressWidth
            value = u64() & ((1 << UInt64(width)) - 1)
            if canonical && value & (1 << UInt64(width - 1)) != 0 { value |= ~((1 << UInt64(width)) - 1) }
            if !canonical && bool() { value = u64() }
        }
        return value & ~(size - 1)
    }

    mutating func scenario() -> [ScenarioDirective] {
        var directives: [ScenarioDirective] = []
        let mode = [PagingMode.legacy32, .pae, .fourLevel, .fiveLevel][int(0...3)]
        var setup: [ScenarioDirective] = []
        if rng.chance(60) { setup.append(.mem(bytes: UInt64(int(1...(16 << 8))) << 12)) }
        if rng.chance(60) {
            var cpu = CPUSettings()
            cpu.maxPhysicalAddressBits = maybe(50) { $0.int(36...52) }
            cpu.supports1GiBPages = maybe(50) { $0.bool() }
            cpu.supportsLA57 = mode == .fiveLevel ? maybe(50) { _ in true } : maybe(50) { $0.bool() }
            cpu.vendor = maybe(30) { $0.bool() ? .intel : .amd }
            if cpu == CPUSettings() { cpu.supports1GiBPages = true }
            setup.append(.cpu(cpu))
        }
        if rng.chance(20) {
            var parameters = KVMModuleParameters(nxHugePages: maybe(60) { $0.bool() },
                                                 nxHugePagesRecoveryRatio: maybe(40) { $0.int(0...100) },
                                                 eagerPageSplit: maybe(40) { $0.bool() })
            if parameters == KVMModuleParameters() { parameters.nxHugePages = true }
            setup.append(.kvm(parameters))
        }
        // The paging mode, possibly with other settings.
        var modeSettings = randomControls()
        modeSettings.pagingMode = mode
        setup.append(.set(modeSettings))
        for _ in 0..<int(0...2) { setup.append(.set(randomControlsNonEmpty())) }
        // cpu must come before a set that chooses 5-level paging only when it disables LA57, which
        // the generator never does for 5-level scenarios, so any order works.
        setup.shuffle(using: &rng)
        directives += setup

        let thirtyTwo = mode == .legacy32
        for _ in 0..<int(0...25) {
            switch int(0...7) {
            case 0, 1:
                let sizes = PageSize.sizes(for: mode)
                let size = sizes[int(0...(sizes.count - 1))]
                let gpaLimit: UInt64 = thirtyTwo ? (size == .size4M ? 1 << 36 : 1 << 32) : 1 << 52
                var upper: [Int: UInt64] = [:]
                if mode.rootLevel > size.leafLevel {
                    for level in (size.leafLevel + 1)...mode.rootLevel where rng.chance(30) {
                        upper[level] = flags(thirtyTwoBit: thirtyTwo)
                    }
                }
                directives.append(.map(MapDirective(
                    gva: GuestVirtualAddress(gva(mode: mode, alignedTo: size.bytes)),
                    gpa: GuestPhysicalAddress((u64() % gpaLimit) & ~(size.bytes - 1)),
                    pageSize: size, leafFlags: flags(thirtyTwoBit: thirtyTwo), upperFlags: upper,
                    pkey: mode.isLongMode ? maybe(30) { $0.int(0...15) } : nil)))
            case 2, 3:
                directives.append(.access(kind: AccessKind.allCases[int(0...2)],
                                          gva: GuestVirtualAddress(gva(mode: mode, canonical: false)),
                                          cpl: [0, 3, 1, 2][int(0...3)], value: maybe(40) { $0.u64() }))
            case 4:
                let value: EntryValue = bool()
                    ? .flags(flags(thirtyTwoBit: thirtyTwo))
                    : .raw(thirtyTwo ? u64() & 0xFFFF_FFFF : u64())
                directives.append(.pte(gva: GuestVirtualAddress(gva(mode: mode)), level: int(1...mode.rootLevel),
                                       value: value, cpl: bool() ? 0 : 3))
            case 5:
                directives.append(.invlpg(GuestVirtualAddress(gva(mode: mode, canonical: false))))
            case 6:
                let names = ExpectedCounter.names.shuffled(using: &rng).prefix(int(1...4))
                directives.append(.expect(names.map { ExpectedCounter(name: $0, value: bool() ? u64() : UInt64(int(0...9))) }))
            default:
                switch int(0...4) {
                case 0:
                    switch int(0...2) {
                    case 0: directives.append(.nxRecover)
                    case 1: directives.append(.age(testOnly: bool(), first: u64() >> 24, count: UInt64(int(1...600))))
                    default: directives.append(.preFault(gpa: GuestPhysicalAddress(u64()), size: u64(), flags: maybe(80) { $0.u64() } ?? 0))
                    }
                case 1, 2: directives.append(.reloadCR3)
                default: directives.append(.set(randomControlsNonEmpty()))
                }
            }
        }
        return directives
    }

    mutating func randomControls() -> ControlSettings {
        var settings = ControlSettings()
        settings.writeProtect = maybe(30) { $0.bool() }
        settings.noExecuteEnable = maybe(30) { $0.bool() }
        settings.smep = maybe(30) { $0.bool() }
        settings.smap = maybe(30) { $0.bool() }
        settings.protectionKeys = maybe(30) { $0.bool() }
        settings.alignmentCheck = maybe(30) { $0.bool() }
        settings.pkru = maybe(30) { UInt32(truncatingIfNeeded: $0.u64()) }
        return settings
    }

    mutating func randomControlsNonEmpty() -> ControlSettings {
        var settings = randomControls()
        if settings.isEmpty { settings.alignmentCheck = bool() }
        return settings
    }
}
