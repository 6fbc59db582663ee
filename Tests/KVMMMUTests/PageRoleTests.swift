import Testing
import X86Paging
@testable import KVMMMU

// The layout restated from kvm_host.h, independently of PageRole's own constants: name, first bit,
// width, and how to read/write the field through the public accessors.
private struct RoleField: CustomStringConvertible, Sendable {
    let name: String
    let shift: UInt32
    let width: UInt32
    let get: @Sendable (PageRole) -> Int
    let set: @Sendable (inout PageRole, Int) -> Void
    /// Values the accessor accepts; for `smm` the accessor is a Bool over an 8-bit field.
    let values: [Int]
    /// The word bits a value becomes.
    let encode: @Sendable (Int) -> UInt32

    var mask: UInt32 { ((1 << width) - 1) << shift }
    var description: String { name }
}

private func boolField(_ name: String, _ bit: UInt32, _ path: WritableKeyPath<PageRole, Bool> & Sendable) -> RoleField {
    RoleField(name: name, shift: bit, width: 1, get: { $0[keyPath: path] ? 1 : 0 },
              set: { $0[keyPath: path] = $1 != 0 }, values: [0, 1], encode: { UInt32($0) << bit })
}

private let roleFields: [RoleField] = [
    RoleField(name: "level", shift: 0, width: 4, get: { $0.level }, set: { $0.level = $1 },
              values: Array(0...15), encode: { UInt32($0) }),
    boolField("has_4_byte_gpte", 4, \.hasFourByteGPTE),
    RoleField(name: "quadrant", shift: 5, width: 2, get: { $0.quadrant }, set: { $0.quadrant = $1 },
              values: Array(0...3), encode: { UInt32($0) << 5 }),
    boolField("direct", 7, \.isDirect),
    RoleField(name: "access", shift: 8, width: 3, get: { Int($0.access) }, set: { $0.access = UInt8($1) },
              values: Array(0...7), encode: { UInt32($0) << 8 }),
    boolField("invalid", 11, \.isInvalid),
    boolField("efer_nx", 12, \.eferNX),
    boolField("cr0_wp", 13, \.cr0WP),
    boolField("smep_andnot_wp", 14, \.smepAndNotWP),
    boolField("smap_andnot_wp", 15, \.smapAndNotWP),
    boolField("ad_disabled", 16, \.adDisabled),
    boolField("guest_mode", 17, \.guestMode),
    boolField("passthrough", 18, \.isPassthrough),
    RoleField(name: "smm", shift: 24, width: 8, get: { $0.smm ? 1 : 0 }, set: { $0.smm = $1 != 0 },
              values: [0, 1], encode: { UInt32($0) << 24 }),
]

@Suite struct PageRoleLayoutTests {
    /// Backgrounds against which each field is written: empty, full, and a few irregular words.
    static let backgrounds: [UInt32] = [0, 0xFFFF_FFFF, 0x5555_5555, 0xAAAA_AAAA, 0x0107_3A95, 0xFE00_C46A]

    @Test(arguments: roleFields)
    fileprivate func fieldRoundTripsOverItsWholeRange(_ field: RoleField) {
        for background in Self.backgrounds {
            for value in field.values {
                var role = PageRole(word: background)
                field.set(&role, value)
                #expect(field.get(role) == value, "\(field) = \(value) on \(hex(background))")
                // Exactly the field's bits changed, and they hold the value.
                #expect(role.word & ~field.mask == background & ~field.mask, "\(field) disturbed other bits")
                #expect(role.word & field.mask == field.encode(value), "\(field) encoded wrongly")
                // Every other field reads as before.
                let before = PageRole(word: background)
                for other in roleFields where other.name != field.name {
                    #expect(other.get(role) == other.get(before), "\(field) changed \(other)")
                }
            }
        }
    }

    @Test func fieldsTileTheWordLeavingBits19To23Unused() {
        var covered: UInt32 = 0
        for field in roleFields {
            #expect(covered & field.mask == 0, "\(field) overlaps another field")
            covered |= field.mask
        }
        #expect(~covered == 0x1F << 19)
    }

    @Test func memberwiseInitialiserMatchesAccessors() {
        let role = PageRole(level: 3, hasFourByteGPTE: true, quadrant: 2, isDirect: true, access: 5, isInvalid: true,
                            eferNX: true, cr0WP: true, smepAndNotWP: true, smapAndNotWP: true, adDisabled: true,
                            guestMode: true, isPassthrough: true, smm: true)
        // 3 | 0x10 | 2<<5 | 0x80 | 5<<8 | 0x800 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x1_0000 | 0x2_0000
        // | 0x4_0000 | 1<<24
        #expect(role.word == 0x0107_FDD3)
        #expect(PageRole().word == 0)
        #expect(PageRole(word: 0x0107_FDD3) == role)
    }

    @Test func smmReadsAnyNonzeroTopByte() {
        #expect(PageRole(word: 0x0200_0000).smm)
        #expect(PageRole(word: 0x0200_0000).addressSpaceID == 1)
        var role = PageRole(word: 0xFF00_0000)
        role.smm = false
        #expect(role.word == 0)
    }

    @Test func hasGPTEsIsIndirectAndNotPassthrough() {
        for direct in [false, true] {
            for passthrough in [false, true] {
                let role = PageRole(level: 4, isDirect: direct, isPassthrough: passthrough)
                #expect(role.hasGPTEs == (!direct && !passthrough))
            }
        }
    }

    @Test func descriptionFollowsKVMTracepoint() {
        let tdp = PageRole(level: 4, isDirect: true, access: ACC.all, eferNX: true, cr0WP: true)
        #expect(tdp.description == "l4 8-byte q0 direct wux nxe ad wp")
        let pt32 = PageRole(level: 1, hasFourByteGPTE: true, quadrant: 1, access: ACC.write | ACC.user,
                            smepAndNotWP: true, guestMode: true, smm: true)
        #expect(pt32.description == "l1 4-byte q1 wu- !nxe ad !wp smep_andnot_wp guest_mode smm")
        let odd = PageRole(word: (1 << 19) | (2 << 24) | (1 << 16) | (1 << 11) | 2)
        #expect(odd.description == "l2 8-byte q0 --- invalid !nxe !ad !wp smm unused=0x80000 smm_byte=0x2")
    }

    @Test func accTraceStringsMatchKVMTable() {
        let kvm = ["---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux"]
        #expect((0..<8).map { ACC.traceString(UInt8($0)) } == kvm)
    }
}

@Suite struct ExtendedAndCPURoleTests {
    @Test func extendedRoleBitsAreKVMs() {
        let fields: [(WritableKeyPath<ExtendedRole, Bool>, UInt32)] = [
            (\.valid, 0), (\.execOnly, 1), (\.cr4PSE, 2), (\.cr4PKE, 3), (\.cr4SMAP, 4), (\.cr4SMEP, 5),
            (\.cr4LA57, 6), (\.eferLMA, 7),
        ]
        for background: UInt32 in [0, 0xFFFF_FFFF, 0xA5A5_A5A5] {
            for (path, bit) in fields {
                for value in [false, true] {
                    var ext = ExtendedRole(word: background)
                    ext[keyPath: path] = value
                    #expect(ext[keyPath: path] == value)
                    #expect(ext.word == (value ? background | (1 << bit) : background & ~(1 << bit)))
                }
            }
        }
        #expect(ExtendedRole(valid: true, execOnly: true, eferLMA: true).word == 0x83)
    }

    @Test func cpuRolePacksBaseLowExtHigh() {
        let role = CPURole(base: PageRole(word: 0x1234_5678), ext: ExtendedRole(word: 0x9ABC_DEF0))
        #expect(role.asUInt64 == 0x9ABC_DEF0_1234_5678)
        #expect(CPURole(asUInt64: 0x9ABC_DEF0_1234_5678) == role)
        var changed = role
        changed.asUInt64 = 0x81_0000_3704
        #expect(changed.base.word == 0x3704 && changed.ext.word == 0x81)
    }

    @Test func refreshingPassthroughBitsMovesOnlyCR0WP() {
        let role = calcCPURole(cr0: [.paging], cr4: [.physicalAddressExtension, .smep], efer: [.longModeActive])
        let refreshed = role.refreshingPassthroughBits(cr0: [.paging, .writeProtect])
        #expect(refreshed.base.cr0WP)
        var expected = role
        expected.base.cr0WP = true
        #expect(refreshed == expected)
        #expect(refreshed.base.smepAndNotWP, "KVM leaves smep_andnot_wp stale")
    }
}
