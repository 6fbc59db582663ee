import Foundation
import Testing
import ArgumentParser
@testable import VirtMMUCommands
@testable import KVMMMU
import X86Paging

/// `virtmmu roles` and the enumeration under it (KVMMMU's RoleSpace).
@Suite struct RolesTests {
    /// Every configuration, enumerated once for the suite.
    static let spaces = RoleSpace.allConfigurations()

    static func space(_ configuration: HostMMUConfiguration) throws -> RoleSpace {
        try #require(spaces.first { $0.configuration == configuration })
    }

    static var allRoles: Set<PageRole> { spaces.reduce(into: Set()) { $0.formUnion($1.roles) } }

    // MARK: Reachable roles

    /// A 32-bit guest under shadow paging: four level-2 PAE roots with quadrants 0-3 shadowing its
    /// page directory, and level-1 pages with quadrant 1 shadowing the upper half of a page table.
    @Test func thirtyTwoBitGuestQuadrants() throws {
        let shadow = try Self.space(.shadowPaging)
        for quadrant in 0..<4 {
            #expect(shadow.roles.contains(PageRole(level: 2, hasFourByteGPTE: true, quadrant: quadrant, access: ACC.all,
                                                   eferNX: true, cr0WP: true)))
        }
        let upperHalf = PageRole(level: 1, hasFourByteGPTE: true, quadrant: 1, access: ACC.all, eferNX: true, cr0WP: true)
        #expect(shadow.roles.contains(upperHalf))
        #expect(shadow.flavors[upperHalf] == [.shadowPaging])
    }

    /// The 5-level root over a 4-level nested NPT is a passthrough page, and its child (the shadow of
    /// L1's level-4 table) is not; a 4-level host has no such root.
    @Test func passthroughRootForFourLevelNestedNPTOnFiveLevelHost() throws {
        let npt5 = try Self.space(.npt(hostLevel: KVMLevel.pt64Root5))
        // SVM builds the context with CR0 = PG: cr0_wp is 0 and nothing else of L1's CR0 counts.
        let root = PageRole(level: 5, access: ACC.all, eferNX: true, guestMode: true, isPassthrough: true)
        #expect(npt5.roles.contains(root))
        #expect(npt5.flavors[root] == [.shadowNPT])
        #expect(npt5.roles.contains(PageRole(level: 4, access: ACC.all, eferNX: true, guestMode: true)))
        // Only roots are passthrough.
        let passthrough = npt5.roles.filter(\.isPassthrough)
        #expect(!passthrough.isEmpty)
        #expect(passthrough.allSatisfy { $0.level == KVMLevel.pt64Root5 && !$0.isDirect && $0.guestMode && $0.access == ACC.all })
        let npt4 = try Self.space(.npt(hostLevel: KVMLevel.pt64Root4))
        #expect(!npt4.roles.contains { $0.isPassthrough })
        #expect(!(try Self.space(.shadowPaging)).roles.contains { $0.isPassthrough })
    }

    /// Shadow EPT pages carry ad_disabled from L1's EPTP; without host A/D, L1 cannot enable it.
    @Test func shadowEPTAccessedDirty() throws {
        let withAD = try Self.space(.ept(maxLevel: 4, accessedDirty: true, executeOnly: false))
        let ept = withAD.roles.filter { $0.flavorIs(.shadowEPT, in: withAD) }
        #expect(ept.contains { $0.adDisabled } && ept.contains { !$0.adDisabled })
        let withoutAD = try Self.space(.ept(maxLevel: 4, accessedDirty: false, executeOnly: false))
        #expect(withoutAD.roles.allSatisfy { $0.adDisabled })
        // EPT entries grant write only with read, so no shadow EPT role has write without user (= read).
        #expect(ept.allSatisfy { $0.access & ACC.write == 0 || $0.access & ACC.user != 0 })
    }

    /// KVM's `kvm_mmu_child_role` copies has_4_byte_gpte into direct children too: a 32-bit guest's
    /// 4 MiB page shadowed by 4 KiB pages gets direct level-1 pages with has_4_byte_gpte and the
    /// quadrant of the half they split. Direct roots and direct upper-level pages never have it.
    @Test func directPagesHaveFourByteGPTEOnlyAtLevelOne() throws {
        let shadow = try Self.space(.shadowPaging)
        #expect(shadow.roles.contains(PageRole(level: 1, hasFourByteGPTE: true, quadrant: 1, isDirect: true,
                                               access: ACC.all, eferNX: true, cr0WP: true)))
        for role in Self.allRoles where role.isDirect && role.hasFourByteGPTE {
            #expect(role.level == KVMLevel.pageTable, "\(role)")
        }
        for configuration in HostMMUConfiguration.all {
            for context in RoleContext.all(in: configuration) {
                for root in context.rootPages where root.isDirect { #expect(!root.hasFourByteGPTE, "\(root)") }
            }
        }
    }

    /// Roles no context can build.
    @Test func impossibleRolesAreNotReached() {
        for role in Self.allRoles {
            #expect((1...KVMLevel.pt64Root5).contains(role.level), "\(role)")
            #expect(role.quadrant == 0 || role.hasFourByteGPTE, "quadrant without 4-byte gptes: \(role)")
            #expect(role.quadrant <= 1 || role.level == KVMLevel.pt32Root, "level-1 pages have two halves: \(role)")
            #expect(!role.hasFourByteGPTE || role.level <= KVMLevel.pt32Root, "\(role)")
            #expect(!role.isPassthrough || (!role.isDirect && role.level == KVMLevel.pt64Root5), "\(role)")
            #expect(!(role.smm && role.guestMode), "SMM in guest mode: \(role)")
            #expect(!role.isInvalid, "\(role)")
            #expect(role.word & PageRole.unusedBits == 0, "\(role)")
            #expect(role.smepAndNotWP == false || role.cr0WP == false, "\(role)")
            #expect(role.smapAndNotWP == false || role.cr0WP == false, "\(role)")
        }
        #expect(!RoleRegisterState.all.contains { $0.smm && $0.guestMode })
        #expect(!RoleRegisterState.all.contains {
            $0.cr0.contains(.paging) && $0.efer.contains(.longModeEnable) && !$0.cr4.contains(.physicalAddressExtension)
        })
    }

    /// The enumeration visits two parent indices; the child role must not depend on more than the
    /// index's parity, for any parent it meets.
    @Test func childRoleReadsOnlyTheIndexParity() {
        let parents = Self.allRoles.filter { $0.level > KVMLevel.pageTable }
        #expect(parents.count > 100)
        for parent in parents {
            for direct in [false, true] {
                let byParity = RoleSpace.representativeIndices.map {
                    childRole(of: parent, parentIndex: $0, direct: direct, access: parent.access)
                }
                for index in 0..<KVMLevel.entriesPerPage {
                    #expect(childRole(of: parent, parentIndex: index, direct: direct, access: parent.access) == byParity[index & 1])
                }
            }
        }
    }

    // MARK: Layouts

    /// The upstream layout's field list reproduces PageRole bit for bit on every reachable role.
    @Test func upstreamLayoutIsPageRole() {
        for space in Self.spaces {
            for reachable in space.reachable {
                #expect(RoleLayout.upstream.word(for: reachable) == reachable.role.word, "\(reachable.role)")
            }
        }
        let used = RoleLayout.upstream.fields.reduce(UInt32(0)) { $0 | $1.mask }
        #expect(used == ~PageRole.unusedBits)
    }

    /// Bit budgets are the sums of the field widths, and fields fit without overlapping.
    @Test func bitBudgetsAddUp() {
        for layout in RoleLayout.all {
            #expect(layout.layoutErrors.isEmpty, "\(layout.name): \(layout.layoutErrors)")
            #expect(layout.bitsUsed == layout.fields.map(\.width).reduce(0, +))
            #expect(layout.bitsUsed + layout.bitsFree == RoleLayout.wordBits)
            let masks = layout.fields.reduce(UInt32(0)) { $0 | $1.mask }
            #expect(masks.nonzeroBitCount == layout.bitsUsed)
        }
        // Each proposal against upstream: glevel adds 4 bits where passthrough had 1, the delta 2.
        let budgets = Dictionary(uniqueKeysWithValues: RoleLayout.all.map { ($0.name, $0.bitsUsed) })
        #expect(budgets == ["upstream": 27, "glevel": 30, "passthrough-delta": 28, "no-passthrough": 26])
    }

    /// Without passthrough information, the 5-level root over a 4-level nested NPT takes the word of
    /// the root over a 5-level one: the wrong-root reuse seed 1 fixed. The proposals keep them apart.
    @Test func onlyTheLayoutWithoutPassthroughMergesRoles() throws {
        let reports = RoleLayout.all.map { RoleLayoutReport(layout: $0, spaces: Self.spaces) }
        for report in reports {
            #expect(report.collisions == (report.layout.name == "no-passthrough" ? 8 : 0), "\(report.layout.name)")
        }
        let npt5 = try Self.space(.npt(hostLevel: KVMLevel.pt64Root5))
        let passthroughRoot = try #require(npt5.reachable.first { $0.role.isPassthrough })
        var fiveLevelRoot = passthroughRoot
        fiveLevelRoot.role.isPassthrough = false
        fiveLevelRoot.guestRootLevel = KVMLevel.pt64Root5
        #expect(npt5.reachable.contains(fiveLevelRoot))
        #expect(RoleLayout.noPassthrough.word(for: passthroughRoot) == RoleLayout.noPassthrough.word(for: fiveLevelRoot))
        for layout in [RoleLayout.glevel, .passthroughDelta, .upstream] {
            #expect(layout.word(for: passthroughRoot) != layout.word(for: fiveLevelRoot), "\(layout.name)")
        }
    }

    /// The numbers the command prints (docs/ROLES.md explains them); a change here is a change in
    /// what the role computation can reach.
    @Test func countsPerGFN() {
        for layout in RoleLayout.all {
            let report = RoleLayoutReport(layout: layout, spaces: Self.spaces)
            #expect(report.upperLevelRolesPerGFN == 555, "\(layout.name)")
            #expect(report.writeTrackedUpperLevelRolesPerGFN == 435, "\(layout.name)")
            #expect(report.levelOneRolesPerGFN == 492, "\(layout.name)")
            #expect(report.worstConfiguration == .shadowPaging)
            if let claim = layout.seedClaim { #expect(report.upperLevelRolesPerGFN < claim.bound) }
        }
    }

    // MARK: The command

    @Test func jsonOutputHasTheDocumentedFields() throws {
        let command = try #require(try VirtMMU.parseAsRoot(["roles", "--json", "--layout", "glevel", "upstream"]) as? RolesCommand)
        let text = RolesCommand.render(layoutNames: command.layouts, json: command.json)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        let layouts = try #require(object["layouts"] as? [[String: Any]])
        #expect(layouts.map { $0["layout"] as? String } == ["glevel", "upstream"])
        for layout in layouts {
            for key in ["layout", "bitsUsed", "bitsFree", "fields", "upperLevelRolesPerGFN", "levelOneRolesPerGFN", "seedClaim"] {
                #expect(layout[key] != nil, "\(key)")
            }
            let fields = try #require(layout["fields"] as? [[String: Any]])
            let widths = fields.compactMap { $0["width"] as? Int }
            #expect(widths.count == fields.count && fields.allSatisfy { $0["name"] is String && $0["offset"] is Int })
            #expect(widths.reduce(0, +) == layout["bitsUsed"] as? Int)
            let claim = try #require(layout["seedClaim"] as? [String: Any])
            #expect(claim["withinBound"] as? Bool == true)
        }
        #expect(layouts[0]["bitsFree"] as? Int == 2)
        #expect((object["configurations"] as? [Any])?.count == HostMMUConfiguration.all.count)
        // Sean's proposal came with no bound: the claim is null, not missing.
        let delta = RolesCommand.render(layoutNames: ["passthrough-delta"], json: true)
        #expect(delta.contains("\"seedClaim\":null"))
    }

    @Test func tableAndArguments() throws {
        let table = RolesCommand.render(layoutNames: [], json: false)
        for layout in RoleLayout.all { #expect(table.contains(layout.name)) }
        #expect(table.contains("a bit less than 2^13: within"))
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["roles", "--layout", "glevel4"]) }
        #expect((try? VirtMMU.parseAsRoot(["roles"])) is RolesCommand)
    }
}

extension PageRole {
    /// Whether `space` reaches this role from a context of `flavor`.
    fileprivate func flavorIs(_ flavor: MMUFlavor, in space: RoleSpace) -> Bool {
        space.flavors[self]?.contains(flavor) ?? false
    }
}
