import Foundation
import Testing
import ArgumentParser
@testable import VirtMMUCommands
import KVMMMU
import Workloads
import X86Paging

/// `virtmmu compare` parsed from `arguments` (after `compare`), run in-process.
func compareCommand(_ arguments: [String], input: String = "") throws -> RunCommand.Outcome {
    let command = try #require(try VirtMMU.parseAsRoot(["compare"] + arguments) as? CompareCommand)
    return command.perform(standardInput: { input })
}

let exampleFiles: [String] = (try? FileManager.default.contentsOfDirectory(atPath: examplesDirectory.path))?
    .filter { $0.hasSuffix(".vmm") && !isNestedExample($0) }.sorted().map { examplesDirectory.appendingPathComponent($0).path } ?? []

@Suite struct VariantCommandTests {
    static let variants = MMUVariant.allCases

    @Test(arguments: variants)
    func everyExampleRunsCleanlyAndComparesIdentical(_ variant: MMUVariant) throws {
        #expect(exampleFiles.count >= 8)
        for file in exampleFiles {
            let run = try runCommand([file, "--variant", variant.rawValue])
            #expect(run.status == 0, "\(variant) \(file): \(run.message ?? "")")
            let compared = try compareCommand([file, "--variant", "upstream", "--variant", variant.rawValue])
            #expect(compared.status == 0, "\(variant) \(file): \(compared.output)")
            #expect(compared.output.contains("verdict: identical"))
        }
    }

    @Test func jsonHasStableKeys() throws {
        let file = try #require(exampleFiles.first { $0.hasSuffix("legacy32.vmm") })
        let outcome = try compareCommand([file, "--variant", "upstream", "--variant", "glevel", "--json"])
        #expect(outcome.status == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(outcome.output.utf8)) as? [String: Any])
        #expect(object["identical"] as? Bool == true)
        #expect(object["variants"] as? [String] == ["upstream", "glevel"])
        let counters = try #require(object["counters"] as? [String: [Int]])
        for key in ["context_resets", "role_reinitializations", "roots_created", "root_cache_hits", "pf_fixed"] {
            #expect(counters[key]?.count == 2, "\(key)")
        }
        #expect(object["shadow_pages_by_level"] is [String: [Int]])
        #expect(object["shadow_pages_by_role"] is [String: [Int]])
        #expect(object["outcome_differences"] as? [Any] != nil)
    }

    @Test func comparisonReportsDifferingOutcomes() throws {
        let scenario = "map 0x400000 0x1000000 4k P,RW\naccess read 0x400000\n"
        let reports = try [MMUVariant.upstream, .glevel].map {
            try ScenarioRunner(scenario: try Scenario.parse(scenario, name: "x"), variant: $0).run()
        }
        var altered = reports[1]
        altered.accesses[0].outcome.result = .generalProtection
        let comparison = VariantComparison(scenario: "x", variants: (.upstream, .glevel), reports: (reports[0], altered))
        #expect(!comparison.identical)
        #expect(comparison.outcomeDifferences.count == 1)
        #expect(comparison.text.contains("verdict: different"))
    }

    @Test func badArgumentsAndBadScenarios() throws {
        #expect(VirtMMU.exitStatus(for: ValidationError("x"), arguments: ["compare"]) == 1)
        #expect(throws: (any Error).self) { _ = try VirtMMU.parseAsRoot(["compare", "-", "--variant", "bogus", "--variant", "upstream"]) }
        #expect(throws: (any Error).self) { _ = try VirtMMU.parseAsRoot(["compare", "-", "--variant", "upstream"]) }
        #expect(throws: (any Error).self) { _ = try VirtMMU.parseAsRoot(["run", "-", "--variant", "bogus"]) }
        let bad = try compareCommand(["-", "--variant", "upstream", "--variant", "glevel"], input: "frobnicate\n")
        #expect(bad.status == 1)
        let refused = try compareCommand(["-", "--variant", "upstream", "--variant", "local-roots"],
                                         input: "host levels=6\nmap 0x400000 0x1000000 4k P\naccess read 0x400000\n")
        #expect(refused.status == 1)
    }
}

@Suite struct VariantRoleRuleTests {
    /// The reset the split avoided: a CR0.WP toggle under TDP only re-initialises upstream, but
    /// resets with the combined role; without TDP the two agree.
    @Test func cr0WPUnderTDP() {
        let old: CR0 = [.paging, .protectionEnable, .writeProtect]
        let new: CR0 = [.paging, .protectionEnable]
        #expect(contextResetForCR0(old: old, new: new, tdp: true).context == .reinitializeRoles)
        #expect(contextResetForCR0WithCombinedRole(old: old, new: new, tdp: true, paging: true).context == .reset)
        #expect(contextResetForCR0WithCombinedRole(old: old, new: new, tdp: false, paging: true)
                == contextResetForCR0(old: old, new: new, tdp: false))
        #expect(contextResetForCR0WithCombinedRole(old: [.writeProtect], new: [], tdp: true, paging: false).context == .none)
    }

    @Test func childRoleFromRootRoleAgreesWithParentDerivedRole() {
        var root = PageRole(level: 3, hasFourByteGPTE: true, access: ACC.all, eferNX: true, cr0WP: true)
        root.quadrant = 0
        for quadrant in 0..<4 {
            var parent = root
            parent.level = 2
            parent.quadrant = quadrant
            for index in [0, 1, 2, 511] {
                let address = UInt64(quadrant) << 30 | UInt64(index) << 21
                for direct in [false, true] {
                    let derived = childRole(of: parent, parentIndex: index, direct: direct, access: ACC.write)
                    let recomputed = childRoleFromRootRole(root, level: 1, direct: direct, access: ACC.write, address: address)
                    #expect(derived == recomputed)
                }
            }
        }
    }
}
