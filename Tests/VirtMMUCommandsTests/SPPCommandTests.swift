// `virtmmu run` with sub-page write protection: the TDP-only example (which `.ci/run` runs with
// `--mmu tdp`; it lives outside the examples/*.vmm loop, which uses the default MMU) and the clear
// refusal under the other MMUs.

import Foundation
import Testing
@testable import VirtMMUCommands

@Suite("virtmmu run: sub-page write protection")
struct SPPCommandTests {
    static let example = examplesDirectory.appendingPathComponent("tdp-only/spp.vmm").path

    @Test func exampleRunsUnderTDPWithSPPExits() throws {
        let outcome = try runCommand([Self.example, "--mmu", "tdp", "--json"])
        #expect(outcome.status == 0, "\(outcome.message ?? "")")
        let objects = try jsonObjects(outcome.output)
        #expect(objects.last?["status"] as? String == "ok")
        let accesses = objects.filter { $0["type"] as? String == "access" }
        #expect(accesses.allSatisfy { ["none", "spp"].contains($0["exit"] as? String) })
        let refused = accesses.filter { $0["exit"] as? String == "spp" }
        #expect(refused.count == 7)
        #expect(refused.allSatisfy { $0["fault"] as? Bool == false && $0["exception"] as? String == "none" })
        let masks = objects.filter { $0["type"] as? String == "spp" }
        #expect(masks.map { $0["gfn"] as? String } == ["0x2000", "0x9000", "0x2000"])
        #expect(masks.map { $0["mask"] as? String } == ["0xfffffffe", "0xffff0000", "0xffffffff"])
        let text = try runCommand([Self.example, "--mmu", "tdp"])
        #expect(text.status == 0)
        #expect(text.output.contains("SPP exit gpa 0x2000000"))
        #expect(text.output.contains("line 13, gfn 0x2000: mask 0xfffffffe (31 of 32 sub-pages writable)"))
    }

    @Test func otherMMUsRefuseSPPLines() throws {
        for mmu in ["shadow", "npt"] {
            let outcome = try runCommand([Self.example, "--mmu", mmu])
            #expect(outcome.status == 1)
            #expect(outcome.message?.contains("line 12: spp needs --mmu tdp (EPT)") == true, "\(outcome.message ?? "")")
        }
    }
}
