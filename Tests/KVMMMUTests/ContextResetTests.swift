import Testing
import X86Paging
@testable import KVMMMU

/// One row of spec 3.6, written out by hand.
struct ResetCase<Register: Sendable>: Sendable, CustomStringConvertible {
    let name: String
    let old: Register
    let new: Register
    let tdp: Bool
    let expected: MMUContextUpdate
    var description: String { name }
}

private let pg = CR0.paging
private let wp = CR0.writeProtect
private let pe = CR0.protectionEnable
private let cd = CR0(rawValue: 1 << 30)

private func update(_ context: ContextReset, _ flushes: TLBFlushRequests = [], asyncPF: Bool = false) -> MMUContextUpdate {
    MMUContextUpdate(context: context, flushes: flushes, resetsAsyncPageFaults: asyncPF)
}

private let cr0Cases: [ResetCase<CR0>] = [
    .init(name: "no change", old: [pe, pg, wp], new: [pe, pg, wp], tdp: false, expected: update(.none)),
    .init(name: "WP only, paging, TDP: roles only", old: [pe, pg], new: [pe, pg, wp], tdp: true, expected: update(.reinitializeRoles)),
    .init(name: "WP only, paging, TDP, cleared", old: [pe, pg, wp], new: [pe, pg], tdp: true, expected: update(.reinitializeRoles)),
    .init(name: "WP only, paging, shadow: reset", old: [pe, pg], new: [pe, pg, wp], tdp: false, expected: update(.reset)),
    .init(name: "WP only, no paging, shadow", old: [pe], new: [pe, wp], tdp: false, expected: update(.none)),
    .init(name: "WP only, no paging, TDP", old: [pe, wp], new: [pe], tdp: true, expected: update(.none)),
    .init(name: "WP and PE, TDP: not WP-only", old: [pg], new: [pg, wp, pe], tdp: true, expected: update(.reset)),
    .init(name: "PG on", old: [pe], new: [pe, pg], tdp: true, expected: update(.reset, asyncPF: true)),
    .init(name: "PG off flushes the guest TLB", old: [pe, pg], new: [pe], tdp: false, expected: update(.reset, .flushGuest, asyncPF: true)),
    .init(name: "PG and WP on", old: [pe], new: [pe, pg, wp], tdp: false, expected: update(.reset, asyncPF: true)),
    .init(name: "PE only", old: [], new: [pe], tdp: false, expected: update(.none)),
    .init(name: "CD only", old: [pe, pg], new: [pe, pg, cd], tdp: true, expected: update(.none)),
]

@Suite struct ContextResetTests {
    @Test(arguments: cr0Cases)
    func cr0(_ row: ResetCase<CR0>) {
        #expect(contextResetForCR0(old: row.old, new: row.new, tdp: row.tdp) == row.expected)
        #expect(contextResetForCR0(old: row.old, new: row.new, tdp: row.tdp, paging: row.new.contains(.paging)) == row.expected)
    }

    static let cr4Cases: [ResetCase<CR4>] = [
        .init(name: "no change", old: [.physicalAddressExtension], new: [.physicalAddressExtension], tdp: false, expected: update(.none)),
        .init(name: "PSE", old: [], new: [.pageSizeExtensions], tdp: true, expected: update(.reset)),
        .init(name: "PAE toggles: reset + current", old: [], new: [.physicalAddressExtension], tdp: true, expected: update(.reset, .flushCurrent)),
        .init(name: "SMEP 0->1: reset + current", old: [], new: [.smep], tdp: false, expected: update(.reset, .flushCurrent)),
        .init(name: "SMEP 1->0: reset only", old: [.smep], new: [], tdp: false, expected: update(.reset)),
        .init(name: "SMAP", old: [], new: [.smap], tdp: true, expected: update(.reset)),
        .init(name: "PKE", old: [.protectionKeys], new: [], tdp: true, expected: update(.reset)),
        .init(name: "LA57", old: [], new: [.la57], tdp: false, expected: update(.reset)),
        .init(name: "PGE: guest flush, no reset", old: [], new: [.globalPages], tdp: false, expected: update(.none, .flushGuest)),
        .init(name: "PGE and PAE: guest flush wins", old: [.globalPages], new: [.physicalAddressExtension], tdp: true, expected: update(.reset, .flushGuest)),
        .init(name: "PCIDE 0->1 shadow: unload", old: [], new: [.pcidEnable], tdp: false, expected: update(.unload)),
        .init(name: "PCIDE 0->1 TDP: nothing", old: [], new: [.pcidEnable], tdp: true, expected: update(.none)),
        .init(name: "PCIDE 1->0: guest flush", old: [.pcidEnable], new: [], tdp: false, expected: update(.none, .flushGuest)),
        .init(name: "PCIDE 0->1 with SMAP, shadow: reset", old: [], new: [.pcidEnable, .smap], tdp: false, expected: update(.reset)),
        .init(name: "PKS is not a role bit", old: [], new: [.supervisorProtectionKeys], tdp: false, expected: update(.none)),
    ]

    @Test(arguments: cr4Cases)
    func cr4(_ row: ResetCase<CR4>) {
        #expect(contextResetForCR4(old: row.old, new: row.new, tdp: row.tdp) == row.expected)
    }

    static let eferCases: [ResetCase<EFER>] = [
        .init(name: "NX", old: [], new: [.noExecuteEnable], tdp: false, expected: update(.reset)),
        .init(name: "LME", old: [.longModeEnable], new: [], tdp: false, expected: update(.reset)),
        .init(name: "SCE", old: [], new: [.syscallEnable], tdp: false, expected: update(.none)),
        .init(name: "LMA alone", old: [.longModeEnable], new: [.longModeEnable, .longModeActive], tdp: false, expected: update(.none)),
    ]

    @Test(arguments: eferCases)
    func efer(_ row: ResetCase<EFER>) {
        #expect(contextResetForEFER(old: row.old, new: row.new) == row.expected)
    }

    /// Every CR4 transition over the bits with rules, against spec 3.6 restated in one expression each.
    @Test func cr4ExhaustiveAgainstRestatement() {
        let bits: [CR4] = [.pageSizeExtensions, .physicalAddressExtension, .globalPages, .pcidEnable, .smep, .protectionKeys]
        for old in subsets(of: bits) {
            for new in subsets(of: bits) {
                for tdp in [false, true] {
                    let x = old.symmetricDifference(new)
                    let roleChange = !x.intersection(CR4.kvmMMURoleBits).isEmpty
                    let unload = !tdp && new.contains(.pcidEnable) && !old.contains(.pcidEnable)
                    let guest = x.contains(.globalPages) || (old.contains(.pcidEnable) && !new.contains(.pcidEnable))
                    let current = !guest && (x.contains(.physicalAddressExtension) || (new.contains(.smep) && !old.contains(.smep)))
                    let got = contextResetForCR4(old: old, new: new, tdp: tdp)
                    #expect(got.context.recomputesRoles == roleChange)
                    #expect(got.context.unloadsRoots == (roleChange || unload))
                    #expect(got.flushes.contains(.flushGuest) == guest)
                    #expect(got.flushes.contains(.flushCurrent) == current)
                    #expect(!got.resetsAsyncPageFaults)
                }
            }
        }
    }

    @Test func cr0ExhaustiveAgainstRestatement() {
        for old in subsets(of: [pg, wp, pe, cd]) {
            for new in subsets(of: [pg, wp, pe, cd]) {
                for tdp in [false, true] {
                    let x = old.symmetricDifference(new)
                    let expected: ContextReset
                    if x == wp && !new.contains(pg) {
                        expected = .none
                    } else if x == wp && tdp {
                        expected = .reinitializeRoles
                    } else {
                        expected = x.isDisjoint(with: [pg, wp]) ? .none : .reset
                    }
                    let got = contextResetForCR0(old: old, new: new, tdp: tdp)
                    #expect(got.context == expected)
                    #expect(got.resetsAsyncPageFaults == x.contains(pg))
                    #expect(got.flushes == (old.contains(pg) && !new.contains(pg) ? .flushGuest : []))
                }
            }
        }
    }

    @Test func combiningResets() {
        for a in ContextReset.allCases {
            for b in ContextReset.allCases {
                let c = a.combined(with: b)
                #expect(c.unloadsRoots == (a.unloadsRoots || b.unloadsRoots))
                #expect(c.recomputesRoles == (a.recomputesRoles || b.recomputesRoles))
            }
        }
        #expect(ContextReset.unload.combined(with: .reinitializeRoles) == .reset)
        #expect(update(.reset, [.flushGuest, .flushCurrent], asyncPF: true).description == "reset+flushGuest+flushCurrent+resetAsyncPF")
    }
}
