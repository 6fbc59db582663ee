import Testing
import Workloads
import X86Paging

/// The directives and resolved settings of a scenario, without line numbers and source text.
struct Content: Equatable {
    var directives: [ScenarioDirective]
    var memorySize: UInt64
    var cpuModel: CPUModel
    var initialControls: ControlState

    init(_ scenario: Scenario) {
        directives = scenario.directives.map(\.directive)
        memorySize = scenario.memorySize
        cpuModel = scenario.cpuModel
        initialControls = scenario.initialControls
    }
}

@Suite("Scenario parser: round trip and fuzzing")
struct ScenarioPropertyTests {
    static let seeds: [UInt64] = Array(0..<8)

    @Test(arguments: seeds)
    func randomScenariosRoundTrip(seed: UInt64) throws {
        var generator = ScenarioGenerator(seed: 0x5CE7_A210 &+ seed)
        for round in 0..<150 {
            let directives = generator.scenario()
            let scenario: Scenario
            do {
                scenario = try Scenario(name: "random", directives: directives)
            } catch {
                let text = directives.map(\.rendered).joined(separator: "\n")
                Issue.record("seed \(seed) round \(round): generated scenario rejected: \(error)\n\(text)")
                continue
            }
            #expect(scenario.directives.map(\.directive) == directives, "seed \(seed) round \(round)")
            #expect(scenario.directives.map(\.line) == Array(1..<(directives.count + 1)))
            let text = scenario.render()
            let again = try Scenario.parse(text, name: "random")
            #expect(again == scenario, "seed \(seed) round \(round)\n\(text)")
            #expect(again.render() == text)
        }
    }

    /// The same directives written with comments, blank lines, tabs, upper case, decimal numbers and
    /// `|` separators parse to the same content.
    @Test(arguments: seeds)
    func noisySpellingsParseTheSame(seed: UInt64) throws {
        var generator = ScenarioGenerator(seed: 0xD1CE &+ seed)
        var rng = SplitMix64(seed: seed)
        for _ in 0..<100 {
            let scenario = try Scenario(name: "n", directives: generator.scenario())
            var lines: [String] = []
            for statement in scenario.directives {
                if rng.chance(20) { lines.append("") }
                if rng.chance(20) { lines.append("   # a comment: map 0x1000 with = signs, P|RW") }
                var words = statement.text.split(separator: " ").map(String.init)
                words = words.enumerated().map { index, word in respell(word, first: index == 0, rng: &rng) }
                var line = ""
                for word in words { line += (rng.chance(50) ? "\t" : "  ") + word }
                if rng.chance(30) { line += " # trailing" }
                if rng.chance(10) { line += "\r" }
                lines.append(line)
            }
            let noisy = lines.joined(separator: "\n")
            let parsed = try Scenario.parse(noisy, name: "n")
            #expect(Content(parsed) == Content(scenario), "\(noisy)")
            #expect(Content(try Scenario.parse(parsed.render(), name: "n")) == Content(scenario))
        }
    }

    /// Respells one word of a canonical line without changing its meaning.
    private func respell(_ word: String, first: Bool, rng: inout SplitMix64) -> String {
        if first { return rng.chance(50) ? word.uppercased() : word }
        var key = ""
        var value = word
        if let equals = word.firstIndex(of: "=") {
            key = String(word[...equals])
            value = String(word[word.index(after: equals)...])
            if rng.chance(50) { key = key.uppercased() }
        }
        if value.hasPrefix("0x"), let number = UInt64(value.dropFirst(2), radix: 16) {
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: value = String(number)
            case 1: value = "0X" + String(number, radix: 16, uppercase: true)
            default: value = "0x" + groupedHex(number)
            }
        } else if value.contains(",") || ["P", "RW", "US", "NX", "G", "A", "D", "PS"].contains(value) {
            value = String(value.map { $0 == "," && rng.chance(50) ? "|" : $0 })
            if rng.chance(50) { value = value.lowercased() }
        }
        return key + value
    }

    private func groupedHex(_ number: UInt64) -> String {
        let digits = Array(String(number, radix: 16))
        var out = ""
        for (index, digit) in digits.enumerated() {
            if index > 0 && (digits.count - index) % 4 == 0 { out += "_" }
            out.append(digit)
        }
        return out
    }

    @Test(arguments: Array(ExampleScenarios.all.indices))
    func examplesRoundTripThroughRender(index: Int) throws {
        let scenario = try Scenario.parse(ExampleScenarios.all[index], name: "example")
        let rendered = scenario.render()
        let again = try Scenario.parse(rendered, name: "example")
        #expect(Content(again) == Content(scenario))
        #expect(try Scenario.parse(again.render(), name: "example") == again)
    }

    /// Random byte and line mutations of valid scenarios: the parser returns a scenario or a
    /// `ScenarioError` naming a line of the input, and never crashes. What it accepts renders and
    /// parses back to the same content.
    @Test(arguments: seeds)
    func mutationsNeverCrash(seed: UInt64) throws {
        var rng = SplitMix64(seed: 0xF022 &+ seed)
        var generator = ScenarioGenerator(seed: 0xBA5E &+ seed)
        let alphabet = Array("0123456789abcdefxX_=,|#: \t\n\rPRWUSNXGKMmgkl-.".utf8) + [0x00, 0x7F, 0xC3, 0xA9, 0xFF, 0xE2, 0x80]
        var accepted = 0
        var rejected = 0
        for round in 0..<400 {
            let base: String = rng.chance(30)
                ? ExampleScenarios.all[Int.random(in: 0..<ExampleScenarios.all.count, using: &rng)]
                : try Scenario(name: "m", directives: generator.scenario()).render()
            var bytes = Array(base.utf8)
            var lines = base.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            if rng.chance(30) && !lines.isEmpty {
                // Line-level mutations.
                for _ in 0..<Int.random(in: 1...3, using: &rng) {
                    let i = Int.random(in: 0..<lines.count, using: &rng)
                    let j = Int.random(in: 0..<lines.count, using: &rng)
                    switch Int.random(in: 0..<4, using: &rng) {
                    case 0: lines.swapAt(i, j)
                    case 1: lines.insert(lines[i], at: j)
                    case 2: if lines.count > 1 { lines.remove(at: i) }
                    default: lines[i] = String(lines[i].prefix(Int.random(in: 0...lines[i].count, using: &rng)))
                    }
                }
                bytes = Array(lines.joined(separator: "\n").utf8)
            }
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let position = bytes.isEmpty ? 0 : Int.random(in: 0..<bytes.count, using: &rng)
                let byte = rng.chance(70) ? alphabet[Int.random(in: 0..<alphabet.count, using: &rng)]
                                          : UInt8(truncatingIfNeeded: rng.next())
                switch Int.random(in: 0..<4, using: &rng) {
                case 0: if !bytes.isEmpty { bytes[position] = byte }
                case 1: bytes.insert(byte, at: position)
                case 2: if !bytes.isEmpty { bytes.remove(at: position) }
                default: if !bytes.isEmpty { bytes[position] ^= 1 << UInt8(Int.random(in: 0..<8, using: &rng)) }
                }
            }
            let text = String(decoding: bytes, as: UTF8.self)
            let lineCount = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).count
            do {
                let scenario = try Scenario.parse(text, name: "m")
                accepted += 1
                let again = try Scenario.parse(scenario.render(), name: "m")
                #expect(Content(again) == Content(scenario), "seed \(seed) round \(round)")
            } catch {
                rejected += 1
                let line = try #require(error.line, "seed \(seed) round \(round): \(error)")
                #expect((1...lineCount).contains(line), "seed \(seed) round \(round): \(error)")
                #expect(error.description.hasPrefix("line \(line): "))
            }
        }
        #expect(accepted > 0 && rejected > 0, "accepted \(accepted), rejected \(rejected)")
    }

    /// Random garbage lines.
    @Test func randomTextNeverCrashes() {
        var rng = SplitMix64(seed: 99)
        let words = ["map", "access", "pte", "set", "cpu", "mem", "invlpg", "reload-cr3", "0x1000", "4k", "2m", "1g",
                     "P,RW", "raw=", "cpl=3", "l2=P", "pkey=", "la57=1", "paging=32", "=", "#", "0x", "_", "18446744073709551616",
                     "bit64", "value=0x", "write", "exec", "5", "0", "-1", "é"]
        for _ in 0..<3000 {
            var text = ""
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                for _ in 0..<Int.random(in: 0...7, using: &rng) {
                    text += words[Int.random(in: 0..<words.count, using: &rng)] + (rng.chance(80) ? " " : "")
                }
                text += "\n"
            }
            do {
                _ = try Scenario.parse(text, name: "g")
            } catch {
                #expect(error.line != nil)
            }
        }
    }
}

@Suite("Scenario parser: example files")
struct ExampleScenarioTests {
    @Test func smepSmapTour() throws {
        let scenario = try Scenario.parse(ExampleScenarios.smepSmapTour, name: "smep-smap-tour.scn")
        #expect(scenario.memorySize == 128 << 20)
        #expect(!scenario.cpuModel.supportsLA57 && scenario.cpuModel.supports1GiBPages)
        #expect(scenario.initialControls == ControlState.defaults)
        #expect(scenario.directives.count == 27)
        #expect(scenario.directives.first?.line == 3)
        let kinds = scenario.directives.map(\.directive.name)
        #expect(kinds.filter { $0 == "map" }.count == 5)
        #expect(kinds.filter { $0 == "access" }.count == 11)

        guard case .map(let stack) = scenario.directives[6].directive else { Issue.record("not a map"); return }
        #expect(stack.gva == GuestVirtualAddress(0x7FFF_FFFF_F000) && stack.gpa == GuestPhysicalAddress(0x300_0000))
        #expect(stack.leafFlags == EntryFlags([.present, .writable, .user, .noExecute]).rawValue)
        #expect(stack.upperFlags == [2: 7, 3: 7, 4: 7])
        guard case .map(let keyed) = scenario.directives[7].directive else { Issue.record("not a map"); return }
        #expect(keyed.pkey == 3)
        guard case .map(let kernel) = scenario.directives[3].directive else { Issue.record("not a map"); return }
        #expect(kernel.pageSize == .size2M && kernel.leafFlags == 0x121)
        #expect(scenario.directives[10].directive == .access(kind: .write, gva: GuestVirtualAddress(0x7FFF_FFFF_F000), cpl: 3,
                                                            value: 0x1122_3344_5566_7788))
        #expect(scenario.directives[12].directive == .set(ControlSettings(smep: true, smap: true)))
        #expect(scenario.directives[18].directive == .set(ControlSettings(protectionKeys: true, pkru: 0x80)))
        #expect(scenario.directives[20].directive == .pte(gva: GuestVirtualAddress(0x40_0000), level: 1, value: .flags(0x27), cpl: 0))
        #expect(scenario.directives[21].directive == .invlpg(GuestVirtualAddress(0x40_0000)))
        #expect(scenario.directives[23].directive == .pte(gva: GuestVirtualAddress(0x40_0000), level: 1, value: .raw(0), cpl: 0))
        #expect(scenario.directives[24].directive == .reloadCR3)
        #expect(scenario.directives.last?.directive == .access(kind: .read, gva: GuestVirtualAddress(0x8000_0000_0000), cpl: 0, value: nil))
        #expect(scenario.directives[3].text.hasPrefix("map 0xffffffff81000000"))
    }

    @Test func otherModes() throws {
        let pae = try Scenario.parse(ExampleScenarios.paeGuest, name: "pae")
        #expect(pae.pagingMode == .pae && pae.memorySize == 32 << 20)
        let legacy = try Scenario.parse(ExampleScenarios.legacyGuest, name: "legacy")
        #expect(legacy.pagingMode == .legacy32 && !legacy.initialControls.noExecuteEnable)
        #expect(legacy.cpuModel.maxPhysicalAddressBits == 40)
        guard case .map(let big) = legacy.directives[2].directive else { Issue.record("not a map"); return }
        #expect(big.pageSize == .size4M && big.gpa == GuestPhysicalAddress(0x1_0000_0000))
        let five = try Scenario.parse(ExampleScenarios.fiveLevelGuest, name: "five")
        #expect(five.pagingMode == .fiveLevel)
        guard case .map(let huge) = five.directives[1].directive else { Issue.record("not a map"); return }
        #expect(huge.upperFlags == [5: 3, 4: 3])
    }

    @Test func renderedExample() throws {
        let scenario = try Scenario.parse(ExampleScenarios.smepSmapTour, name: "t")
        let lines = scenario.render().split(separator: "\n").map(String.init)
        #expect(lines[0] == "mem 128M")
        #expect(lines[1] == "cpu maxphyaddr=46 gbpages=1 la57=0")
        #expect(lines[2] == "set wp=1 nx=1 smep=0 smap=0 pke=0 ac=0")
        #expect(lines[3] == "map 0xffffffff81000000 0x1000000 2m P,A,G")
        #expect(lines[6] == "map 0x7ffffffff000 0x3000000 4k P,RW,US,NX l2=P,RW,US l3=P,RW,US l4=P,RW,US")
        #expect(lines[7] == "map 0x600000 0x4000000 4k P,RW,US pkey=3")
        #expect(lines[10] == "access write 0x7ffffffff000 cpl=3 value=0x1122334455667788")
        #expect(lines[18] == "set pke=1 pkru=0x80")
        #expect(lines[23] == "pte 0x400000 1 raw=0x0")
        #expect(lines[24] == "reload-cr3")
        let pae = try Scenario.parse(ExampleScenarios.paeGuest, name: "p").render()
        #expect(pae.hasPrefix("mem 32M\nset paging=pae\n"))
        let five = try Scenario.parse(ExampleScenarios.fiveLevelGuest, name: "f").render()
        #expect(five.hasPrefix("set la57=1\nmap 0xff11000000000000 0x0 1g P,RW l4=P,RW l5=P,RW\n"))
        #expect(renderSize(4096) == "4K" && renderSize(3 << 30) == "3G" && renderSize(100) == "100")
    }
}
