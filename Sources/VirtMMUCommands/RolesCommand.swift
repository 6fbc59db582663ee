import ArgumentParser
import KVMMMU

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `virtmmu roles`: the role-space questions of seed 1 (how many upper-level shadow pages one gfn
/// can have, how many role bits each layout spends), answered by enumerating the reachable roles
/// (KVMMMU's RoleSpace) rather than by counting bits.
struct RolesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "roles",
        abstract: "Count the shadow-page roles one gfn can have, under KVM's role layout and seed 1's alternatives.",
        discussion: """
        Enumerates every guest register state the role computation reads (CR0.PG/WP, \
        CR4.PSE/PAE/LA57/SMEP/SMAP/PKE, EFER.LME/NX, SMM, guest mode) in every host MMU \
        configuration (shadow paging; EPT 4/5-level with and without A/D and execute-only; NPT \
        3/4/5-level), computes the root roles and then child roles level by level with the shadow \
        MMU's own functions, and counts distinct role words. Roles coexist at one gfn only within \
        one configuration (one VM's hash), so each count is the largest any one configuration \
        reaches. Layouts: \(RoleLayout.all.map(\.name).joined(separator: ", ")).
        """)

    @Flag(help: "Print one JSON object instead of the table.")
    var json = false

    @Option(name: .customLong("layout"), parsing: .upToNextOption,
            help: "Layouts to report (default: all): \(RoleLayout.all.map(\.name).joined(separator: ", ")).")
    var layouts: [String] = []

    func validate() throws {
        for name in layouts where RoleLayout.named(name) == nil {
            throw ValidationError("unknown layout '\(name)'; known: \(RoleLayout.all.map(\.name).joined(separator: ", "))")
        }
    }

    func run() throws {
        var output = ByteWriter(fileDescriptor: 1)
        output.append(Self.render(layoutNames: layouts, json: json))
        output.flush()
    }

    /// The chosen layouts (all when none is named), in the order given.
    static func selectedLayouts(_ names: [String]) -> [RoleLayout] {
        names.isEmpty ? RoleLayout.all : names.compactMap(RoleLayout.named)
    }

    /// The command's whole output.
    static func render(layoutNames: [String], json: Bool) -> String {
        let spaces = RoleSpace.allConfigurations()
        let reports = selectedLayouts(layoutNames).map { RoleLayoutReport(layout: $0, spaces: spaces) }
        return json ? Self.json(reports, spaces: spaces) : table(reports, spaces: spaces)
    }

    // MARK: Comparison with the seed

    /// Digits kept when printing a log2 or a ratio.
    static let decimalPlaces = 2

    static func rounded(_ value: Double) -> Double {
        let scale = pow(10, Double(decimalPlaces))
        return (value * scale).rounded() / scale
    }

    static func measuredLog2(_ report: RoleLayoutReport) -> Double { rounded(log2(Double(report.upperLevelRolesPerGFN))) }

    /// How many times fewer roles are reachable than the seed's bound allows.
    static func factorBelow(_ claim: SeedClaim, _ report: RoleLayoutReport) -> Double {
        rounded(Double(claim.bound) / Double(report.upperLevelRolesPerGFN))
    }

    static func claimText(_ report: RoleLayoutReport) -> String {
        guard let claim = report.layout.seedClaim else { return "none stated" }
        let within = report.upperLevelRolesPerGFN < claim.bound ? "within" : "EXCEEDS"
        return "\(claim.quote): \(within), 2^\(measuredLog2(report)), \(factorBelow(claim, report))x below 2^\(claim.log2Bound)"
    }

    // MARK: Table

    static func table(_ reports: [RoleLayoutReport], spaces: [RoleSpace]) -> String {
        let stateCount = RoleRegisterState.all.count
        var text = """
        Shadow-page roles per gfn, enumerated from KVM's role computation: \(stateCount) register states \
        in \(spaces.count) host configurations, \(spaces.reduce(0) { $0 + $1.contextCount }) MMU contexts.


        """
        let columns: [(String, Int)] = [("layout", 19), ("bits", 6), ("free", 6), ("upper/gfn", 11), ("tracked", 9),
                                        ("level-1/gfn", 13), ("merged", 8), ("seed claim", 0)]
        text += columns.map { leftAligned($0.0, to: $0.1) }.joined() + "\n"
        for report in reports {
            let cells = [report.layout.name, "\(report.layout.bitsUsed)", "\(report.layout.bitsFree)",
                         "\(report.upperLevelRolesPerGFN)", "\(report.writeTrackedUpperLevelRolesPerGFN)",
                         "\(report.levelOneRolesPerGFN)", "\(report.collisions)", claimText(report)]
            text += zip(cells, columns).map { leftAligned($0.0, to: $0.1.1) }.joined() + "\n"
        }
        text += """

        upper/gfn    distinct role words at level > 1 one VM can create for one gfn (the hash key is (gfn, role))
        tracked      of those, pages with gptes: each holds a gfn_write_track reference (the seed's bound is about these)
        level-1/gfn  distinct level-1 role words for one gfn
        merged       words standing for two or more roles KVM keeps apart (one shadow page would serve both)
        Worst configuration for every layout: \(Set(reports.map { "\($0.worstConfiguration)" }).sorted().joined(separator: "; ")).

        Fields (name offset:width):

        """
        for report in reports {
            text += "  " + leftAligned(report.layout.name, to: 19)
                + report.layout.fields.map { "\($0.name) \($0.offset):\($0.width)" }.joined(separator: ", ") + "\n"
            text += "  " + leftAligned("", to: 19) + report.layout.summary + "\n"
        }
        text += "\nPer host configuration (upstream role words):\n"
        let configurationWidth = 34
        text += "  " + leftAligned("configuration", to: configurationWidth) + leftAligned("contexts", to: 10)
            + leftAligned("upper", to: 8) + leftAligned("tracked", to: 9) + "level-1\n"
        for space in spaces {
            text += "  " + leftAligned("\(space.configuration)", to: configurationWidth) + leftAligned("\(space.contextCount)", to: 10)
                + leftAligned("\(space.upperLevelRoles.count)", to: 8) + leftAligned("\(space.writeTrackedUpperLevelRoles.count)", to: 9)
                + "\(space.levelOneRoles.count)\n"
        }
        return text
    }

    // MARK: JSON

    static func json(_ reports: [RoleLayoutReport], spaces: [RoleSpace]) -> String {
        var object = JSONObject()
        object.add("wordBits", RoleLayout.wordBits)
        object.add("registerStates", RoleRegisterState.all.count)
        object.addRaw("layouts", "[" + reports.map(layoutJSON).joined(separator: ",") + "]")
        let configurations = spaces.map { space -> String in
            var entry = JSONObject()
            entry.add("configuration", "\(space.configuration)")
            entry.add("contexts", space.contextCount)
            entry.add("upperLevelRoles", space.upperLevelRoles.count)
            entry.add("writeTrackedUpperLevelRoles", space.writeTrackedUpperLevelRoles.count)
            entry.add("levelOneRoles", space.levelOneRoles.count)
            return entry.text
        }
        object.addRaw("configurations", "[" + configurations.joined(separator: ",") + "]")
        return object.text + "\n"
    }

    static func layoutJSON(_ report: RoleLayoutReport) -> String {
        var object = JSONObject()
        object.add("layout", report.layout.name)
        object.add("summary", report.layout.summary)
        object.add("bitsUsed", report.layout.bitsUsed)
        object.add("bitsFree", report.layout.bitsFree)
        let fields = report.layout.fields.map { field -> String in
            var entry = JSONObject()
            entry.add("name", field.name)
            entry.add("offset", field.offset)
            entry.add("width", field.width)
            return entry.text
        }
        object.addRaw("fields", "[" + fields.joined(separator: ",") + "]")
        object.add("upperLevelRolesPerGFN", report.upperLevelRolesPerGFN)
        object.add("writeTrackedUpperLevelRolesPerGFN", report.writeTrackedUpperLevelRolesPerGFN)
        object.add("levelOneRolesPerGFN", report.levelOneRolesPerGFN)
        object.add("upperLevelRolesAnyConfiguration", report.upperLevelRolesAnyConfiguration)
        object.add("collisions", report.collisions)
        object.add("worstConfiguration", "\(report.worstConfiguration)")
        if let claim = report.layout.seedClaim {
            var entry = JSONObject()
            entry.add("quote", claim.quote)
            entry.add("source", claim.source)
            entry.add("log2Bound", claim.log2Bound)
            entry.add("bound", claim.bound)
            entry.add("withinBound", report.upperLevelRolesPerGFN < claim.bound)
            entry.addRaw("measuredLog2", "\(measuredLog2(report))")
            entry.addRaw("factorBelowBound", "\(factorBelow(claim, report))")
            object.addRaw("seedClaim", entry.text)
        } else {
            object.addRaw("seedClaim", "null")
        }
        return object.text
    }
}
