import Testing
import X86Paging
@testable import KVMMMU

/// Every subset of `bits`.
func subsets<T: OptionSet>(of bits: [T]) -> [T] where T.Element == T {
    (0..<(1 << bits.count)).map { mask in
        var set = T()
        for (i, bit) in bits.enumerated() where mask & (1 << i) != 0 { set.insert(bit) }
        return set
    }
}

/// Spec 3.4 restated as raw word bits, without PageRole's accessors.
private func expectedCPURoleWord(cr0: CR0, cr4: CR4, efer: EFER, smm: Bool, guestMode: Bool) -> UInt64 {
    var base: UInt32 = 7 << 8                     // access = ACC_ALL
    if smm { base |= 1 << 24 }
    if guestMode { base |= 1 << 17 }
    var ext: UInt32 = 1                           // valid
    guard cr0.contains(.paging) else {
        base |= 1 << 7                            // direct, level 0
        return UInt64(base) | UInt64(ext) << 32
    }
    let wp = cr0.contains(.writeProtect)
    let lma = efer.contains(.longModeActive)
    if efer.contains(.noExecuteEnable) { base |= 1 << 12 }
    if wp { base |= 1 << 13 }
    if cr4.contains(.smep) && !wp { base |= 1 << 14 }
    if cr4.contains(.smap) && !wp { base |= 1 << 15 }
    if !cr4.contains(.physicalAddressExtension) { base |= 1 << 4 }
    let level: UInt32 = lma ? (cr4.contains(.la57) ? 5 : 4) : (cr4.contains(.physicalAddressExtension) ? 3 : 2)
    base |= level
    if cr4.contains(.pageSizeExtensions) { ext |= 1 << 2 }
    if lma && cr4.contains(.protectionKeys) { ext |= 1 << 3 }
    if cr4.contains(.smap) { ext |= 1 << 4 }
    if cr4.contains(.smep) { ext |= 1 << 5 }
    if lma && cr4.contains(.la57) { ext |= 1 << 6 }
    if lma { ext |= 1 << 7 }
    return UInt64(base) | UInt64(ext) << 32
}

private let cr0Bits: [CR0] = [.paging, .writeProtect, .protectionEnable]
private let cr4Bits: [CR4] = [.pageSizeExtensions, .physicalAddressExtension, .globalPages, .la57, .pcidEnable,
                              .smep, .smap, .protectionKeys]
private let eferBits: [EFER] = [.longModeEnable, .longModeActive, .noExecuteEnable, .syscallEnable]

@Suite struct CPURoleTests {
    @Test func calcCPURoleMatchesSpecOverAllRelevantBits() {
        var checked = 0
        for cr0 in subsets(of: cr0Bits) {
            for cr4 in subsets(of: cr4Bits) {
                for efer in subsets(of: eferBits) {
                    for smm in [false, true] {
                        for guestMode in [false, true] {
                            let role = calcCPURole(cr0: cr0, cr4: cr4, efer: efer, smm: smm, guestMode: guestMode)
                            let expected = expectedCPURoleWord(cr0: cr0, cr4: cr4, efer: efer, smm: smm, guestMode: guestMode)
                            if role.asUInt64 != expected {
                                Issue.record("cr0 \(hex(cr0.rawValue)) cr4 \(hex(cr4.rawValue)) efer \(hex(efer.rawValue)) smm \(smm) gm \(guestMode): \(hex(role.asUInt64)) != \(hex(expected))")
                            }
                            checked += 1
                        }
                    }
                }
            }
        }
        #expect(checked == 8 * 256 * 16 * 4)
    }

    @Test func onlyRoleBitsMatter() {
        for cr0 in subsets(of: cr0Bits) {
            for cr4 in subsets(of: cr4Bits) {
                for efer in subsets(of: eferBits) {
                    let full = calcCPURole(cr0: cr0, cr4: cr4, efer: efer)
                    let masked = calcCPURole(cr0: cr0.intersection(CR0.kvmMMURoleBits),
                                             cr4: cr4.intersection(CR4.kvmMMURoleBits),
                                             efer: efer.intersection([.longModeActive, .noExecuteEnable]))
                    #expect(full == masked)
                }
            }
        }
    }

    @Test func roleBitConstantsAreKVMs() {
        #expect(CR0.kvmMMURoleBits.rawValue == (1 << 31) | (1 << 16))
        #expect(CR4.kvmMMURoleBits.rawValue == (1 << 4) | (1 << 5) | (1 << 12) | (1 << 20) | (1 << 21) | (1 << 22))
        #expect(EFER.kvmMMURoleBits.rawValue == (1 << 8) | (1 << 11))
    }

    @Test func accessorsAndPagingMode() {
        let off = calcCPURole(cr0: [], cr4: [.physicalAddressExtension], efer: [.noExecuteEnable])
        #expect(!off.isCR0PG && off.base.isDirect && off.base.level == 0 && off.pagingMode == .disabled)
        #expect(off.isCR4PAE && !off.isEFERNX, "paging off ignores CR4 and EFER")
        let legacy = calcCPURole(cr0: [.paging], cr4: [.pageSizeExtensions], efer: [])
        #expect(legacy.pagingMode == .legacy32 && !legacy.isCR4PAE && legacy.isCR4PSE)
        let pae = calcCPURole(cr0: [.paging, .writeProtect], cr4: [.physicalAddressExtension], efer: [.noExecuteEnable])
        #expect(pae.pagingMode == .pae && pae.isCR0WP && pae.isEFERNX && !pae.isEFERLMA)
        let five = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension, .la57, .protectionKeys],
                               efer: [.longModeEnable, .longModeActive])
        #expect(five.pagingMode == .fiveLevel && five.isCR4LA57 && five.isCR4PKE && five.isEFERLMA)
        // LA57 and PKE without long mode do not count.
        let paeLA57 = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension, .la57, .protectionKeys], efer: [])
        #expect(paeLA57.pagingMode == .pae && !paeLA57.isCR4LA57 && !paeLA57.isCR4PKE)
        for mode in PagingMode.allCases {
            #expect(CPURole(base: PageRole(level: mode.rootLevel)).pagingMode == mode)
        }
    }
}

@Suite struct RootRoleTests {
    @Test func shadowRootRoleIsCPUBaseAtLeastPAEWithNX() {
        for cr0 in subsets(of: cr0Bits) {
            for cr4 in subsets(of: cr4Bits) {
                for efer in subsets(of: eferBits) {
                    let cpu = calcCPURole(cr0: cr0, cr4: cr4, efer: efer, smm: true)
                    let root = shadowRootRole(for: cpu)
                    #expect(root.level == max(cpu.base.level, 3))
                    #expect(root.eferNX)
                    var rest = root
                    rest.level = cpu.base.level
                    rest.eferNX = cpu.base.eferNX
                    #expect(rest == cpu.base, "only level and efer_nx differ")
                }
            }
        }
    }

    @Test func shadowRootRoleWordsByHand() {
        // 32-bit guest, WP: level 3 | 4-byte 0x10 | access 0x700 | efer_nx 0x1000 | cr0_wp 0x2000.
        let legacy = calcCPURole(cr0: [.paging, .writeProtect], cr4: [], efer: [])
        #expect(shadowRootRole(for: legacy).word == 0x3713)
        // No paging: level 3 | direct 0x80 | access 0x700 | efer_nx 0x1000.
        let off = calcCPURole(cr0: [], cr4: [], efer: [])
        #expect(shadowRootRole(for: off).word == 0x1783)
        #expect(shadowRootRole(for: off).isDirect)
        // 4-level, SMEP without WP, in SMM: 4 | 0x700 | 0x1000 | smep_andnot_wp 0x4000 | smm 1<<24.
        let long = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension, .smep],
                               efer: [.longModeActive, .noExecuteEnable], smm: true)
        #expect(shadowRootRole(for: long).word == 0x0100_5704)
    }

    @Test func tdpRootRoleWordsByHand() {
        let any = calcCPURole(cr0: [.paging], cr4: [], efer: [])
        // 4 | direct 0x80 | 0x700 | efer_nx 0x1000 | cr0_wp 0x2000.
        #expect(tdpRootRole(for: any, tdpLevel: 4, accessedDirtyEnabled: true).word == 0x3784)
        // 5-level, A/D off (0x1_0000), L2 (0x2_0000), SMM.
        let l2 = calcCPURole(cr0: [], cr4: [], efer: [], smm: true, guestMode: true)
        #expect(tdpRootRole(for: l2, tdpLevel: 5, accessedDirtyEnabled: false).word == 0x0103_3785)
        // TDP roots never depend on guest paging.
        for cr0 in subsets(of: cr0Bits) {
            for cr4 in subsets(of: cr4Bits) {
                let cpu = calcCPURole(cr0: cr0, cr4: cr4, efer: [.noExecuteEnable])
                #expect(tdpRootRole(for: cpu, tdpLevel: 4, accessedDirtyEnabled: true).word == 0x3784)
            }
        }
    }

    @Test func tdpLevelSelection() {
        #expect(tdpLevel(forcedRootLevel: 4, maxTDPLevel: 5, guestMaxPhysicalAddressBits: 52) == 4)
        #expect(tdpLevel(maxTDPLevel: 5, guestMaxPhysicalAddressBits: 48) == 4)
        #expect(tdpLevel(maxTDPLevel: 5, guestMaxPhysicalAddressBits: 49) == 5)
        #expect(tdpLevel(maxTDPLevel: 4, guestMaxPhysicalAddressBits: 52) == 4)
    }

    @Test func shadowEPTRoleByHand() {
        let role = shadowEPTRootRole(level: 4, accessedDirty: false, executeOnly: true)
        // base: 4 | access 0x700 | ad_disabled 0x1_0000 | guest_mode 0x2_0000; ext: valid | execonly.
        #expect(role.asUInt64 == 0x3_0003_0704)
        let withAD = shadowEPTRootRole(level: 5, accessedDirty: true, executeOnly: false)
        #expect(withAD.asUInt64 == 0x1_0002_0705)
        #expect(withAD.base.hasGPTEs && !withAD.base.cr0WP && !withAD.base.eferNX)
    }

    @Test func shadowNPTPassthroughOnlyForFourOnFive() {
        let l1Long = shadowNPTCPURole(cr0: [.paging], cr4: [.physicalAddressExtension, .protectionKeys],
                                      efer: [.longModeActive, .noExecuteEnable])
        #expect(!l1Long.isCR4PKE && l1Long.base.guestMode)
        let passthrough = shadowNPTRootRole(for: l1Long, tdpLevel: 5)
        #expect(passthrough.isPassthrough && passthrough.level == 5 && !passthrough.hasGPTEs)
        #expect(!shadowNPTRootRole(for: l1Long, tdpLevel: 4).isPassthrough)
        let l1PAE = shadowNPTCPURole(cr0: [.paging], cr4: [.physicalAddressExtension], efer: [])
        let root = shadowNPTRootRole(for: l1PAE, tdpLevel: 5)
        #expect(!root.isPassthrough && root.level == 5 && root.hasGPTEs)
    }
}

@Suite struct ChildRoleTests {
    @Test func childIsOneLevelDownWithCallersAccessAndDirect() {
        let cpu = calcCPURole(cr0: [.paging, .writeProtect], cr4: [.physicalAddressExtension],
                              efer: [.longModeActive, .noExecuteEnable])
        let root = shadowRootRole(for: cpu)
        for index in [0, 1, 2, 255, 510, 511] {
            for direct in [false, true] {
                for access in UInt8(0)...7 {
                    let child = childRole(of: root, parentIndex: index, direct: direct, access: access)
                    var expected = root
                    expected.level = 3
                    expected.access = access
                    expected.isDirect = direct
                    #expect(child == expected, "8-byte guests have no quadrants")
                }
            }
        }
    }

    @Test func childOfPassthroughRootIsNotPassthrough() {
        let cpu = shadowNPTCPURole(cr0: [.paging], cr4: [.physicalAddressExtension], efer: [.longModeActive])
        let root = shadowNPTRootRole(for: cpu, tdpLevel: 5)
        let child = childRole(of: root, parentIndex: 0, direct: false, access: ACC.all)
        #expect(!child.isPassthrough && child.level == 4 && child.hasGPTEs)
    }

    @Test func thirtyTwoBitGuestQuadrants() {
        let cpu = calcCPURole(cr0: [.paging, .writeProtect], cr4: [.pageSizeExtensions], efer: [])
        let rootRole = shadowRootRole(for: cpu)
        let roots = paeRootRoles(rootRole: rootRole, cpuRole: cpu)
        #expect(roots.map(\.quadrant) == [0, 1, 2, 3])
        #expect(roots.allSatisfy { $0.level == 2 && $0.hasFourByteGPTE && !$0.isDirect })
        for (i, root) in roots.enumerated() {
            #expect(rootQuadrant(forPAERoot: i, guestRootLevel: 2) == i)
            for index in 0..<512 {
                let child = childRole(of: root, parentIndex: index, direct: false, access: ACC.user | ACC.write)
                #expect(child.level == 1 && child.quadrant == index & 1 && child.hasFourByteGPTE)
                // A guest 4 MiB page is shadowed by a direct level-1 page with the same quadrant rule.
                let direct = childRole(of: root, parentIndex: index, direct: true, access: ACC.all)
                #expect(direct.isDirect && direct.quadrant == index & 1)
            }
        }
    }

    /// The quadrant geometry of spec 5.3: for a 32-bit linear address, the PAE root picked by
    /// VA[31:30] and the level-1 child picked by the 8-byte PDE index VA[29:21] shadow exactly the
    /// guest PD entries and PT entries the 4-byte walk uses.
    @Test(arguments: [UInt32(0), 0x0020_0000, 0x003F_F000, 0x4000_0000, 0x7FE0_1000, 0xC0A0_0000, 0xFFFF_FFFF, 0x1234_5678])
    func quadrantsCoverTheAddressesThe32BitWalkUses(_ address: UInt32) {
        let cpu = calcCPURole(cr0: [.paging], cr4: [], efer: [])
        let roots = paeRootRoles(rootRole: shadowRootRole(for: cpu), cpuRole: cpu)
        let rootIndex = Int(address >> 30)
        let pdeIndex = Int((address >> 21) & 0x1FF)               // index in the shadow PAE PD
        let root = roots[rootIndex]
        let child = childRole(of: root, parentIndex: pdeIndex, direct: false, access: ACC.all)
        // The shadow PD with quadrant q covers guest PDEs [256q, 256q + 256); 2 shadow PDEs per guest PDE.
        let guestPDEIndex = Int(address >> 22)
        #expect(guestPDEIndex == root.quadrant * 256 + pdeIndex / 2)
        // The shadow PT with quadrant q covers guest PTEs [512q, 512q + 512) of the 1024-entry guest PT.
        let guestPTEIndex = Int((address >> 12) & 0x3FF)
        let shadowPTEIndex = Int((address >> 12) & 0x1FF)
        #expect(guestPTEIndex == child.quadrant * 512 + shadowPTEIndex)
    }

    @Test func paeAndNonPagingRoots() {
        let pae = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension], efer: [.noExecuteEnable])
        let paeRoots = paeRootRoles(rootRole: shadowRootRole(for: pae), cpuRole: pae)
        #expect(paeRoots.allSatisfy { $0.quadrant == 0 && $0.level == 2 && !$0.hasFourByteGPTE })
        #expect(Set(paeRoots).count == 1, "four PAE roots share one role; their gfns differ")
        let off = calcCPURole(cr0: [], cr4: [], efer: [])
        let directRoots = paeRootRoles(rootRole: shadowRootRole(for: off), cpuRole: off)
        #expect(directRoots.allSatisfy { $0.isDirect && $0.quadrant == 0 && $0.level == 2 })
        #expect(rootQuadrant(forPAERoot: 3, guestRootLevel: 3) == 0)
        #expect(rootQuadrant(forPAERoot: 3, guestRootLevel: 4) == 0)
    }

    @Test func rootPageRoleSetsLevelAndQuadrant() {
        let cpu = calcCPURole(cr0: [.paging], cr4: [], efer: [])
        let role = rootPageRole(rootRole: shadowRootRole(for: cpu), level: 2, quadrant: 3)
        #expect(role.level == 2 && role.quadrant == 3)
        let long = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension], efer: [.longModeActive])
        #expect(rootPageRole(rootRole: shadowRootRole(for: long), level: 4, quadrant: 0) == shadowRootRole(for: long))
    }
}
