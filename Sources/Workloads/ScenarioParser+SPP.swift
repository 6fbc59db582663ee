// The `spp` directive: sub-page write protection requests as a VMM makes them (docs/SPP.md).
//
//   spp set GFN MASK     KVM_SUBPAGES_SET_ACCESS of one page: MASK's bit i makes sub-page i
//                        (page offsets 128i..128i+127) writable; MASK fits in 32 bits
//   spp get GFN          KVM_SUBPAGES_GET_ACCESS of one page, reported as a `spp` line
//
// What depends on the machine (the gfn's memslot, a read-only slot, `--mmu tdp`) is checked when
// the line runs.

import X86Paging

extension DirectiveArguments {
    mutating func parseSubPageProtection() throws(ScenarioError) -> ScenarioDirective {
        guard let verb = tokens.first else { throw error("missing set or get (usage: \(spec.usage))") }
        switch asciiLowercased(verb.text) {
        case "set":
            let arguments = try positional(["set", "GFN", "MASK"])
            try noOptions()
            let gfn = try frameNumber(arguments[1])
            let mask = try number(arguments[2], what: "MASK", in: 0...UInt64(UInt32.max))
            return .subPageProtection(.set(gfn: gfn, mask: SubPageWriteMask(UInt32(mask))))
        case "get":
            let arguments = try positional(["get", "GFN"])
            try noOptions()
            return .subPageProtection(.get(gfn: try frameNumber(arguments[1])))
        default:
            throw error("spp takes set or get, not '\(verb.text)' (usage: \(spec.usage))", at: verb)
        }
    }

    /// A gfn: a guest-physical address shifted right by 12 must still be one (below 2^52).
    private func frameNumber(_ token: Token) throws(ScenarioError) -> GuestFrameNumber {
        GuestFrameNumber(try number(token, what: "GFN", in: 0...((1 << 40) - 1)))
    }
}
