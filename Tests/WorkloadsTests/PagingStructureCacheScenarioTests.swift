import Testing
import VirtualMachine
import Workloads
import X86Paging

/// A guest that repoints a page directory entry without invalidating: under TDP its paging runs in
/// hardware, whose PDE cache (and the TLB entries made through it) may keep the old page table
/// until the guest invalidates, which the lockstep reference allows; under shadow paging KVM
/// write-protects the directory and the new entry is seen at once. Both agree with the
/// architecture, and INVLPG of the page brings the new entry into use everywhere.
@Suite struct PagingStructureCacheScenarioTests {
    static let scenario = """
    map 0x400000 0x1000000 4k P,RW,US,A,D
    map 0x409000 0x1009000 4k P,RW,US,A,D
    map 0x600000 0x1100000 4k P,RW,US,A,D
    map 0x609000 0x1109000 4k P,RW,US,A,D
    access read 0x400000 cpl=3
    access read 0x600000 cpl=3
    pte 0x400000 2 raw=PDE
    access read 0x409000 cpl=3
    invlpg 0x7000000
    access read 0x409000 cpl=3
    invlpg 0x409000
    access read 0x409000 cpl=3
    """

    /// The scenario with 0x400000's PDE pointed at 0x600000's page table.
    static func text() throws -> String {
        let setup = try ScenarioRunner(scenario: Scenario.parse(scenario.components(separatedBy: "pte ")[0], name: "setup")).run()
        let pde = try #require(setup.entries.first { $0.gva.rawValue == 0x600000 && $0.level == 2 }).value
        return scenario.replacingOccurrences(of: "raw=PDE", with: "raw=\(hex(pde))")
    }

    @Test(arguments: ["shadow", "ept", "npt"])
    func repointedDirectoryEntry(mmu: String) throws {
        let machine: VirtualMachineMMU = mmu == "shadow" ? .shadow : mmu == "ept" ? .ept() : .npt()
        let report = try ScenarioRunner(scenario: Scenario.parse(Self.text(), name: "pde-cache"), mmu: machine).run()
        let reads = report.accesses.filter { $0.operation == "read" }.map { record -> UInt64? in
            if case .completed(let gpa, _) = record.outcome.result { return gpa.rawValue }
            return nil
        }
        let old: UInt64 = 0x100_9000, new: UInt64 = 0x110_9000
        if mmu == "shadow" {
            #expect(reads == [0x100_0000, 0x110_0000, new, new, new])
        } else {
            // The hardware's PDE cache serves the old table; the TLB keeps what it translated
            // through it across an INVLPG of another page.
            #expect(reads == [0x100_0000, 0x110_0000, old, old, new])
        }
    }
}
