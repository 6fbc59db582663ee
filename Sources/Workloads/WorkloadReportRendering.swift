// How a workload comparison is shown: a terminal report with one column per MMU, and JSON Lines.
//
// JSON LINES (one object per line, keys in this order)
//   {"type":"workload","title":"mixed","processes":4,"pages":12,"iterations":4,"vcpus":2,"seed":1,
//    "la57":true,"dirty_log":"reset","memory":"0x...","directives":N}
//                                                       (the size keys only for a generated workload)
//   {"type":"phase","name":"processes","first_directive":N}            one per phase
//   {"type":"mmu_run","mmu":"shadow","variant":"upstream","status":"ok","operations":N,
//    "lockstep_checks":N,"wall_seconds":0.0,"checks_per_second":0,"table_pages":N,"peak_table_pages":N,
//    "vcpus":N,"roots_created":N,"root_cache_hits":N,"root_cache_misses":N,"shadow_pages":{"1":N,...},
//    "stats":{...every counter, KVM's names, counted over the run...},"loads_checked":N,
//    "load_mismatches":N}                                                    one per MMU
//   {"type":"timeline","mmu":"shadow","directives":N,"operations":N,"lockstep_checks":N,"table_pages":N,
//    "root_cache_hits":N,"root_cache_misses":N,"stats":{...}}               the samples, per MMU
//   {"type":"migration_pass","mmu":"shadow","pass":1,"line":N,"slot":0,"dirty_pages":N}  per dirty-log get
//   {"type":"error","mmu":"tdp","status":"disagreement","line":N,"message":"..."}        a failed run
//   {"type":"result","status":"ok","title":"mixed","mmus":["shadow","tdp"],"same_guest_outcomes":true}

import KVMMMU
import VirtualMachine
import X86Paging

extension WorkloadComparison {
    // MARK: Text

    /// The terminal report: what ran, one column per MMU (faults, shadow pages, roots, TLB flushes,
    /// exits, memory, time), and the lockstep verdict.
    public func text() -> String {
        var out = "Workload \(title)"
        if let parameters {
            out += ": \(parameters.processes) processes, \(parameters.pages) pages, \(parameters.iterations) iterations, "
                + "\(parameters.vcpus) vCPU\(parameters.vcpus == 1 ? "" : "s"), seed \(parameters.seed)"
                + (parameters.dirtyLog == .getAndReset ? "" : ", dirty log: \(parameters.dirtyLog.rawValue)")
        }
        out += "\n  \(scenario.directives.count) directives (\(runs.first?.report.accesses.count ?? 0) guest operations reported), "
            + "\(scenario.memorySize >> 20) MiB of guest memory"
        if !phases.isEmpty { out += "\n  phases: " + phases.map(\.name).joined(separator: ", ") }
        out += "\n\n"
        var table = TextTable(header: [""] + runs.map(Self.columnName), rightAligned: Set(1...max(1, runs.count)))
        func section(_ name: String) { table.add([name] + runs.map { _ in "" }) }
        func row(_ label: String, _ value: (WorkloadMMURun) -> String) { table.add(["  " + label] + runs.map(value)) }
        func counter(_ label: String, _ name: String) {
            row(label) { String($0.report.statsAfter.delta(from: $0.report.statsBefore)[kvmName: name] ?? 0) }
        }
        section("Faults")
        counter("pf_taken (exits for a fault)", "pf_taken")
        counter("pf_fixed (SPTE installed)", "pf_fixed")
        counter("pf_emulate", "pf_emulate")
        counter("pf_spurious", "pf_spurious")
        counter("pf_guest (#PF injected)", "pf_guest")
        row("#PF the guest saw") { String($0.report.accesses.filter(\.outcome.result.isPageFault).count) }
        row("  not present (demand paging)") { String($0.report.guestPageFaults { !$0.contains(.present) }) }
        row("  protection (copy-on-write...)") { String($0.report.guestPageFaults { $0.contains(.present) }) }
        section("Shadow pages")
        counter("mmu_cache_miss (created)", "mmu_cache_miss")
        counter("mmu_shadow_zapped", "mmu_shadow_zapped")
        counter("mmu_unsync (at the end)", "mmu_unsync")
        counter("mmu_flooded", "mmu_flooded")
        counter("mmu_pte_write", "mmu_pte_write")
        counter("mmu_recycled", "mmu_recycled")
        section("Roots")
        row("roots_created") { String($0.report.rootsCreated) }
        row("root cache hits / misses") { "\($0.report.rootCacheHits) / \($0.report.rootCacheMisses)" }
        section("TLB")
        counter("tlb_flush", "tlb_flush")
        counter("remote_tlb_flush", "remote_tlb_flush")
        counter("invlpg (exits)", "invlpg")
        section("Exits")
        counter("exits", "exits")
        counter("insn_emulation", "insn_emulation")
        if runs.contains(where: { $0.report.statsAfter.nestedRun > $0.report.statsBefore.nestedRun }) {
            // Only a run with L2 shows it: every other report stays as it was.
            section("Nested (L2)")
            counter("nested_run (VM entries)", "nested_run")
            row("L2 operations") { String($0.report.accesses.filter(\.inL2).count) }
            row("  exits to L1") { String($0.report.accesses.filter { $0.exitToL1 != nil }.count) }
            row("  pages L1 mapped at exits (on demand)") { String($0.report.l1Maps.count) }
            row("  L2 TLB hits") { String($0.report.accesses.filter { $0.inL2 && $0.outcome.tlbHit }.count) }
            row("guest_mode shadow pages (guest_mmu, at the end)") { run in
                String(run.report.shadowPagesByRole.filter { $0.key.contains("guest_mode") }.values.reduce(0, +))
            }
        }
        section("Leaves mapped at the end")
        counter("pages_4k", "pages_4k")
        counter("pages_2m", "pages_2m")
        section("Memory the MMU used")
        row("table pages at the end") { Self.pages($0.report.tablePages) }
        row("table pages at the peak") { Self.pages($0.peakTablePages) }
        section("Time")
        row("wall time") { Self.seconds($0.wallSeconds) }
        row("accesses checked per second") { String(Int($0.checksPerSecond.rounded())) }
        out += table.render(indent: "")
        let migrationPasses = runs.first?.report.dirtyLogs ?? []
        if !migrationPasses.isEmpty {
            out += "\nDirty pages per migration pass (" + runs.map(Self.columnName).joined(separator: " / ") + "): "
            out += migrationPasses.indices.map { pass in
                runs.map { run in pass < run.report.dirtyLogs.count ? String(run.report.dirtyLogs[pass].gfns.count) : "-" }
                    .joined(separator: "/")
            }.joined(separator: ", ") + "\n"
        }
        out += "\nLockstep verdict:\n"
        for run in runs {
            out += "  \(Self.columnName(run)): "
            if let failure = run.failure {
                out += "FAILED: \(failure)\n"
            } else {
                out += "\(run.report.lockstepChecks) accesses checked in lockstep on \(run.report.vcpuCount) vCPU"
                    + "\(run.report.vcpuCount == 1 ? "" : "s"): all agree; the structural auditor found nothing\n"
            }
            if let mismatch = loadMismatches(run).first {
                out += "    MEMORY MISMATCH: the load of directive \(mismatch.directive + 1) returned \(hex(mismatch.read)), "
                    + "the guest had stored \(hex(mismatch.expected)) (\(loadMismatches(run).count) loads wrong)\n"
            } else if !expectedLoads.isEmpty {
                out += "    and each of its \(loadsChecked(run)) loads returned what the guest had last stored there\n"
            }
        }
        if runs.count > 1 && succeeded {
            out += sameGuestOutcomes
                ? "  The guest saw the same in every run: \(runs[0].report.accesses.count) operation outcomes identical.\n"
                : "  The guest's operation outcomes differ between runs (each allowed by the architecture: stale TLB entries).\n"
        }
        return out
    }

    static func columnName(_ run: WorkloadMMURun) -> String {
        let mmu = run.mmu == "tdp" ? "tdp (EPT)" : run.mmu == "npt" ? "tdp (NPT)" : "shadow"
        return run.variant == .upstream ? mmu : "\(mmu) \(run.variant.rawValue)"
    }

    static func pages(_ count: Int) -> String { "\(count) (\(count * 4) KiB)" }

    static func seconds(_ value: Double) -> String {
        let milliseconds = Int((value * 1000).rounded())
        return "\(milliseconds / 1000).\(String(repeating: "0", count: 3 - String(milliseconds % 1000).count))\(milliseconds % 1000) s"
    }

    // MARK: JSON Lines

    public func jsonLines() -> String {
        var lines: [String] = []
        var header = JSONLine()
        header.add("type", "workload")
        header.add("title", title)
        if let parameters {
            header.add("processes", parameters.processes)
            header.add("pages", parameters.pages)
            header.add("iterations", parameters.iterations)
            header.add("vcpus", parameters.vcpus)
            header.add("seed", Int(truncatingIfNeeded: parameters.seed))
            header.add("la57", parameters.la57)
            header.add("dirty_log", parameters.dirtyLog.rawValue)
        }
        header.addHex("memory", scenario.memorySize)
        header.add("directives", scenario.directives.count)
        lines.append(header.text)
        for phase in phases {
            var line = JSONLine()
            line.add("type", "phase")
            line.add("name", phase.name)
            line.add("first_directive", phase.firstDirective)
            lines.append(line.text)
        }
        for run in runs {
            let report = run.report
            var line = JSONLine()
            line.add("type", "mmu_run")
            line.add("mmu", run.mmu)
            line.add("variant", run.variant.rawValue)
            line.add("status", run.failure.map(RunReport.status(of:)) ?? "ok")
            line.add("operations", report.accesses.count)
            line.add("lockstep_checks", report.lockstepChecks)
            line.addRaw("wall_seconds", String(run.wallSeconds))
            line.add("checks_per_second", Int(run.checksPerSecond.rounded()))
            line.add("table_pages", report.tablePages)
            line.add("peak_table_pages", run.peakTablePages)
            line.add("vcpus", report.vcpuCount)
            line.add("roots_created", Int(report.rootsCreated))
            line.add("root_cache_hits", Int(report.rootCacheHits))
            line.add("root_cache_misses", Int(report.rootCacheMisses))
            let levels = report.shadowPagesByLevel.keys.sorted().map { "\"\($0)\":\(report.shadowPagesByLevel[$0]!)" }
            line.addRaw("shadow_pages", "{" + levels.joined(separator: ",") + "}")
            line.addRaw("stats", report.statsAfter.delta(from: report.statsBefore).jsonObject)
            line.add("loads_checked", loadsChecked(run))
            line.add("load_mismatches", loadMismatches(run).count)
            lines.append(line.text)
        }
        for run in runs {
            for sample in run.report.timeline {
                var line = JSONLine()
                line.add("type", "timeline")
                line.add("mmu", run.mmu)
                line.add("directives", sample.directives)
                line.add("operations", sample.operations)
                line.add("lockstep_checks", sample.lockstepChecks)
                line.add("table_pages", sample.tablePages)
                line.add("root_cache_hits", Int(sample.rootCacheHits))
                line.add("root_cache_misses", Int(sample.rootCacheMisses))
                line.addRaw("stats", sample.stats.jsonObject)
                lines.append(line.text)
            }
            for (pass, log) in run.report.dirtyLogs.enumerated() {
                var line = JSONLine()
                line.add("type", "migration_pass")
                line.add("mmu", run.mmu)
                line.add("pass", pass + 1)
                line.add("line", log.line)
                line.add("slot", log.slot)
                line.add("dirty_pages", log.gfns.count)
                lines.append(line.text)
            }
        }
        for run in runs {
            guard let failure = run.failure else { continue }
            lines.append(#"{"type":"error","mmu":"# + run.mmu + "\"," + RunReport.errorJSON(failure).dropFirst(#"{"type":"error","#.count))
        }
        var result = JSONLine()
        result.add("type", "result")
        result.add("status", runs.compactMap(\.failure).first.map(RunReport.status(of:))
                   ?? (succeeded ? "ok" : "memory_mismatch"))
        result.add("title", title)
        result.addRaw("mmus", "[" + runs.map { jsonString($0.mmu) }.joined(separator: ",") + "]")
        result.add("same_guest_outcomes", sameGuestOutcomes)
        lines.append(result.text)
        return lines.map { $0 + "\n" }.joined()
    }
}

extension RunReport {
    /// The #PF the guest took whose error code `matches`.
    func guestPageFaults(_ matches: (PageFaultErrorCode) -> Bool) -> Int {
        accesses.filter { if case .pageFault(let code, _) = $0.outcome.result { matches(code) } else { false } }.count
    }
}

extension AccessResult {
    /// Whether the guest took a #PF.
    public var isPageFault: Bool { if case .pageFault = self { true } else { false } }
}
