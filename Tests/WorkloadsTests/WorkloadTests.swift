import KVMMMU
import Testing
import VirtualMachine
import Workloads
import X86Paging

/// The built-in workloads: each runs in lockstep under shadow paging and TDP and shows the guest the
/// same; the same seed gives the same operations; a recording replays under any MMU and variant.
@Suite struct WorkloadTests {
    static let small = WorkloadParameters(processes: 3, pages: 6, iterations: 2, vcpus: 2, seed: 7)

    func run(_ kind: WorkloadKind, _ parameters: WorkloadParameters = small,
             mmus: [VirtualMachineMMU] = [.shadow, .ept()]) throws -> WorkloadComparison {
        let workload = try kind.generate(parameters)
        let comparison = WorkloadComparison.run(title: kind.rawValue, parameters: parameters, scenario: workload.scenario,
                                                phases: workload.phases, expectedLoads: workload.expectedLoads, mmus: mmus)
        for run in comparison.runs {
            #expect(run.failure == nil, "\(kind) under \(run.mmu): \(String(describing: run.failure))")
            #expect(run.report.lockstepChecks > 0)
            #expect(run.report.vcpuCount == parameters.vcpus)
            // Every load returned what the guest OS last stored there.
            #expect(comparison.loadMismatches(run).isEmpty, "\(kind) under \(run.mmu): \(comparison.loadMismatches(run).prefix(3))")
            #expect(comparison.loadsChecked(run) > 0)
        }
        #expect(comparison.succeeded)
        #expect(comparison.sameGuestOutcomes, "\(kind): the guest saw different outcomes under shadow and TDP")
        return comparison
    }

    func directives(_ comparison: WorkloadComparison) -> [ScenarioDirective] { comparison.scenario.directives.map(\.directive) }

    /// Error codes of the #PF the guest took, by code.
    func pageFaults(_ run: WorkloadMMURun) -> [UInt32: Int] {
        var codes: [UInt32: Int] = [:]
        for access in run.report.accesses {
            if case .pageFault(let code, _) = access.outcome.result { codes[code.architectural, default: 0] += 1 }
        }
        return codes
    }

    @Test func bootGoesThroughEveryPagingMode() throws {
        let comparison = try run(.boot)
        let modes = directives(comparison).compactMap { directive -> PagingMode? in
            if case .set(let settings) = directive { return settings.pagingMode }
            return nil
        }
        #expect(modes == [.legacy32, .pae, .fourLevel, .fiveLevel])
        // Firmware's stores with paging off land at their physical addresses.
        let firmware = comparison.runs[0].report.accesses.prefix(8)
        #expect(firmware.allSatisfy { if case .completed(let gpa, _) = $0.outcome.result { gpa.rawValue == $0.gva.rawValue } else { false } })
        // Shadow paging rebuilds its tables in each mode; TDP maps guest memory once.
        let shadow = comparison.runs[0].report, tdp = comparison.runs[1].report
        #expect(shadow.rootsCreated >= 4 && tdp.rootsCreated == 0)
        #expect(shadow.statsAfter.pfEmulate > 0 && tdp.statsAfter.pfEmulate == 0)

        var without = Self.small
        without.la57 = false
        let fourLevel = try run(.boot, without)
        #expect(!directives(fourLevel).contains { if case .set(let settings) = $0 { settings.pagingMode == .fiveLevel } else { false } })
        #expect(fourLevel.scenario.cpuModel.supportsLA57 == false)
    }

    @Test func processesForkWithCopyOnWriteAndSwitchWithAndWithoutPCIDs() throws {
        let comparison = try run(.processes)
        let faults = pageFaults(comparison.runs[0])
        // Demand paging (a user write to a page not present: 0x6) and copy-on-write (a user write to
        // a present read-only page: 0x7).
        #expect(faults[0x6, default: 0] > 0)
        #expect(faults[0x7, default: 0] > 0)
        let all = directives(comparison)
        let switches = all.compactMap { if case .switchSpace(let name, let pcid, let noFlush) = $0 { (name, pcid, noFlush) } else { nil } }
        #expect(switches.contains { $0.1 == 0 })                                      // without PCIDs
        #expect(switches.contains { $0.1 != 0 && $0.2 })                              // with PCIDs, keeping the TLB
        #expect(switches.contains { $0.0.hasSuffix(".u") && $0.1 & 0x800 != 0 })      // KPTI's user root and PCID
        #expect(all.contains { if case .invpcid = $0 { true } else { false } })
        let shadow = comparison.runs[0].report
        #expect(shadow.rootCacheHits > 0)
    }

    @Test func mmapShootsDownOtherVCPUsAndCollapsesHugePages() throws {
        let comparison = try run(.mmap)
        let all = directives(comparison)
        // An INVLPG on vCPU 1 after a vCPU 0 change: a shootdown.
        var vcpu = 0, shootdowns = 0
        for directive in all {
            if case .vcpu(let index) = directive { vcpu = index }
            if case .invlpg = directive, vcpu == 1 { shootdowns += 1 }
        }
        #expect(shootdowns > 0)
        #expect(all.contains { if case .pte(_, 2, .raw(let value), _) = $0 { value & 0x80 != 0 } else { false } })  // collapse
        #expect(all.contains { if case .map(let map) = $0 { map.pageSize == .size2M && map.leafFlags & 0x4 != 0 } else { false } })
        // The write into the mprotect-ed page faults (P|W|U) and the process sees it.
        #expect(pageFaults(comparison.runs[0])[0x7, default: 0] > 0)
        // TDP maps the guest's huge pages with 2 MiB EPT leaves where it can.
        #expect(comparison.runs[1].report.timeline.contains { $0.stats.pages2M > 0 })
    }

    @Test(arguments: DirtyLogProtocol.allCases)
    func migrationLosesNoDirtyPageAndConverges(protocol dirtyLog: DirtyLogProtocol) throws {
        var parameters = Self.small
        parameters.dirtyLog = dirtyLog
        let comparison = try run(.migration, parameters)
        #expect(directives(comparison).contains(.dirtyLog(.mode(dirtyLog, ringEntries: 4096))) == (dirtyLog != .getAndReset))
        #expect(directives(comparison).contains { if case .dirtyLog(.clear) = $0 { true } else { false } } == (dirtyLog == .manualProtect))
        for run in comparison.runs {
            let passes = run.report.dirtyLogs.map(\.gfns.count)
            #expect(passes.count == Self.small.iterations + 1)
            #expect(passes.first ?? 0 > 0)
            // The last round runs with the vCPUs stopped: nothing left to send.
            #expect(passes.last == 0)
        }
    }

    /// A load that returns something else than what the guest stored fails the comparison.
    @Test func aWrongLoadIsAMismatch() throws {
        let comparison = try run(.processes)
        var wrong = comparison
        let (directive, value) = try #require(comparison.expectedLoads.first { $0.value != 0 })
        wrong.expectedLoads[directive] = value ^ 1
        #expect(!wrong.succeeded)
        #expect(wrong.runs.allSatisfy { run in wrong.loadMismatches(run).map(\.directive) == [directive] })
        #expect(wrong.text().contains("MEMORY MISMATCH: the load of directive \(directive + 1) returned \(hex(value))"))
        #expect(wrong.jsonLines().contains(#""load_mismatches":1"#) && wrong.jsonLines().contains(#""status":"memory_mismatch""#))
    }

    @Test func theSameSeedGivesTheSameOperations() throws {
        for kind in WorkloadKind.allCases {
            let first = try kind.generate(Self.small).scenario.render()
            #expect(first == (try kind.generate(Self.small).scenario.render()))
            var other = Self.small
            other.seed = 8
            if kind != .boot { #expect(first != (try kind.generate(other).scenario.render()), "\(kind)") }
        }
    }

    /// A run reports its progress every `progressInterval` directives (the command shows it on a
    /// terminal) and samples its counters for the charts.
    @Test func progressAndTimelineFollowTheRun() throws {
        let scenario = try WorkloadKind.processes.generate(Self.small).scenario
        let runner = ScenarioRunner(scenario: scenario)
        runner.progressInterval = 50
        runner.timelineInterval = 40
        var seen: [Int] = []
        runner.progress = { done, total in
            #expect(total == scenario.directives.count)
            seen.append(done)
        }
        let report = try runner.run()
        #expect(seen == Array(stride(from: 50, to: scenario.directives.count, by: 50)))
        let samples = report.timeline.map(\.directives)
        #expect(samples == Array(stride(from: 40, to: scenario.directives.count, by: 40)) + [scenario.directives.count])
        #expect(zip(report.timeline, report.timeline.dropFirst()).allSatisfy { $0.stats.pfTaken <= $1.stats.pfTaken })
        #expect(report.timeline.last?.lockstepChecks == report.lockstepChecks)
    }

    @Test func badParametersAreRefusedWithTheirLimits() {
        var parameters = Self.small
        parameters.pages = 0
        #expect(throws: WorkloadError.self) { try WorkloadKind.mmap.generate(parameters) }
        parameters.pages = 6
        parameters.vcpus = 65
        #expect(parameters.problem() == "--vcpus must be in 1...64, not 65")
    }

    /// A recording parses back to the same operations and replays, under another MMU and another
    /// variant, with the same guest-visible outcomes.
    @Test func aRecordingReplaysUnderAnotherMMUAndVariant() throws {
        let workload = try WorkloadKind.processes.generate(Self.small)
        let text = workload.scenario.render()
        let replayed = try Scenario.parse(text, name: "recording.vmm")
        #expect(replayed.directives.map(\.directive) == workload.scenario.directives.map(\.directive))
        let original = WorkloadComparison.run(title: "original", parameters: nil, scenario: workload.scenario, phases: [], mmus: [.shadow])
        let npt = WorkloadComparison.run(title: "replay", parameters: nil, scenario: replayed, phases: [], mmus: [.npt()])
        let variant = WorkloadComparison.run(title: "replay", parameters: nil, scenario: replayed, phases: [], mmus: [.shadow],
                                             variant: .localRoots)
        for replay in [npt, variant] {
            #expect(replay.runs[0].failure == nil)
            #expect(replay.runs[0].report.accesses.map(\.outcome.result) == original.runs[0].report.accesses.map(\.outcome.result))
        }
    }

    @Test func theMixedReportHasItsSectionsAndJSON() throws {
        let comparison = try run(.mixed, WorkloadParameters(processes: 2, pages: 4, iterations: 2, vcpus: 2, seed: 3))
        let text = comparison.text()
        for section in ["Faults", "Shadow pages", "Roots", "TLB", "Exits", "Memory the MMU used", "Time", "Lockstep verdict",
                        "shadow", "tdp (EPT)", "Dirty pages per migration pass", "all agree", "The guest saw the same"] {
            #expect(text.contains(section), "missing \(section)")
        }
        let lines = comparison.jsonLines().split(separator: "\n")
        #expect(lines.first?.hasPrefix(#"{"type":"workload","title":"mixed""#) == true)
        #expect(lines.filter { $0.hasPrefix(#"{"type":"mmu_run""#) }.count == 2)
        #expect(lines.contains { $0.hasPrefix(#"{"type":"timeline","mmu":"tdp""#) })
        #expect(lines.contains { $0.hasPrefix(#"{"type":"migration_pass""#) })
        #expect(lines.last == #"{"type":"result","status":"ok","title":"mixed","mmus":["shadow","tdp"],"same_guest_outcomes":true}"#)
    }

    /// The HTML page is well-formed (every element closed, in order), self-contained, and has
    /// every chart with data in it.
    @Test func theHTMLReportIsWellFormedWithEveryChart() throws {
        let comparison = try run(.mixed, WorkloadParameters(processes: 2, pages: 4, iterations: 2, vcpus: 2, seed: 3))
        let html = comparison.html()
        #expect(html.hasPrefix("<!DOCTYPE html>"))
        // Nothing to fetch: no script, no source or link (the only URL is SVG's namespace name).
        #expect(!html.contains("<script") && !html.contains("src=") && !html.contains("href=") && !html.contains("https:"))
        #expect(unbalancedTags(html) == nil, "\(unbalancedTags(html) ?? "")")
        for chart in ["faults", "table-pages", "root-cache"] {
            let svg = try #require(element(html, id: chart), "chart \(chart) missing")
            let counts = attributeValues(svg, "data-points").compactMap(Int.init)
            #expect(!counts.isEmpty && counts.allSatisfy { $0 > 0 }, "chart \(chart) has an empty series")
        }
        for chart in ["shadow-pages-by-level", "shadow-pages-by-role", "dirty-passes"] {
            let svg = try #require(element(html, id: chart), "chart \(chart) missing")
            let values = attributeValues(svg, "data-value").compactMap(Double.init)
            #expect(!values.isEmpty && values.contains { $0 > 0 }, "chart \(chart) has no data")
        }
        let tables = attributeValues(html, "data-tables").compactMap(Int.init)
        #expect(tables.count == 1 && tables[0] > 1)
    }

    /// The first element whose id is `id`, through its closing tag.
    func element(_ html: String, id: String) -> Substring? {
        guard let start = html.range(of: "<svg class=\"chart\" id=\"\(id)\""),
              let end = html[start.upperBound...].range(of: "</svg>") else { return nil }
        return html[start.lowerBound..<end.upperBound]
    }

    func attributeValues(_ text: some StringProtocol, _ name: String) -> [String] {
        text.split(separator: " ").compactMap { word in
            guard word.hasPrefix(name + "=\"") else { return nil }
            return String(word.dropFirst(name.count + 2).prefix { $0 != "\"" })
        }
    }

    /// The first tag that breaks nesting, or nil when every element is closed in order (void
    /// elements and self-closing tags need no end tag).
    func unbalancedTags(_ html: String) -> String? {
        let void: Set<String> = ["meta", "br", "hr", "img", "input", "link", "!doctype"]
        var open: [String] = []
        var rest = html[...]
        while let start = rest.firstIndex(of: "<") {
            guard let end = rest[start...].firstIndex(of: ">") else { return "an unterminated tag" }
            let tag = rest[rest.index(after: start)..<end]
            rest = rest[rest.index(after: end)...]
            let name = tag.prefix { !$0.isWhitespace && $0 != ">" && $0 != "/" || $0 == "/" && tag.first == "/" }.lowercased()
            if tag.hasSuffix("/") || void.contains(name) { continue }
            if name.hasPrefix("/") {
                guard open.popLast() == String(name.dropFirst()) else { return "</\(name.dropFirst())> closes \(open.last ?? "nothing")" }
            } else {
                open.append(name)
            }
        }
        return open.isEmpty ? nil : "<\(open.last!)> is never closed"
    }
}

/// `vcpu N`: parsing, rendering, and a guest whose vCPUs see each other's table stores.
@Suite struct VCPUDirectiveTests {
    @Test func vcpusComeUpInOrder() throws {
        #expect(single("vcpu 0") == .vcpu(0))
        #expect(ScenarioDirective.vcpu(3).rendered == "vcpu 3")
        let error = try #require(parseError("vcpu 1\nvcpu 3"))
        #expect(error.line == 2 && error.message.contains("cannot come up before vCPU 2"))
        #expect(parseError("vcpu 64")?.message.contains("0...63") == true)
    }

    /// vCPU 1 keeps a translation vCPU 0 changed until it invalidates it; a leaf vCPU 0 wrote clean
    /// and vCPU 1 wrote through is dirty for vCPU 0 too.
    static let twoVCPUs = """
        map 0x400000 0x1000000 4k P,RW,US
        map 0x401000 0x1001000 4k P,RW,US
        access write 0x400000 cpl=3 value=1
        vcpu 1
        access read 0x400000 cpl=3
        access write 0x401000 cpl=3 value=2
        vcpu 0
        pte 0x401000 1 P,US
        invlpg 0x401000
        vcpu 1
        access read 0x401000 cpl=3
        invlpg 0x401000
        access write 0x401000 cpl=3 value=3
        vcpu 0
        pte 0x400000 1 P,RW,US,A
        invlpg 0x400000
        vcpu 1
        invlpg 0x400000
        access write 0x400000 cpl=3 value=4
        vcpu 0
        access read 0x400000 cpl=3
        """

    @Test func vcpusShareMemoryAndKeepTheirOwnTLBs() throws {
        let scenario = try #require(parseOK(Self.twoVCPUs))
        for mmu in [VirtualMachineMMU.shadow, .ept(), .npt()] {
            let report = try ScenarioRunner(scenario: scenario, mmu: mmu).run()
            #expect(report.vcpuCount == 2)
            let outcomes = report.accesses.map(\.outcome.result)
            // After its INVLPG vCPU 1 sees the page read-only.
            guard case .pageFault(let code, _) = outcomes[5] else {
                Issue.record("\(mmu.name): \(outcomes[5])")
                continue
            }
            #expect(code.architectural == 0x7)
            guard case .completed(_, let value) = outcomes.last! else {
                Issue.record("\(mmu.name): \(outcomes.last!)")
                continue
            }
            #expect(value == 4)
        }
    }
}
