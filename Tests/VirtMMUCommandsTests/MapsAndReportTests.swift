import Foundation
import Testing
import ArgumentParser
@testable import VirtMMUCommands
import GuestMemory
import X86Paging

@Suite struct MapsTests {
    let sample = try! SampleGuest.make()

    /// Every page of every run translates, through the walker, to the run's frames with the run's
    /// permissions; and addresses outside every run do not translate.
    @Test func mapsAgreeWithTheWalker() throws {
        // Without SMAP and protection keys every present page is readable by the supervisor, so a
        // supervisor read succeeds exactly where a mapping exists.
        var registers = sample.registers
        registers.cr4 = [.physicalAddressExtension, .globalPages]
        let walker = try PageWalker(registers: registers, memory: sample.memory)
        let (runs, summary) = walker.mappings(in: sample.memory)
        #expect(!summary.truncated)
        #expect(summary.reservedEntries == 1)
        #expect(runs.count == 8)
        for run in runs {
            var offset: UInt64 = 0
            while offset < run.size {
                let translation = try walker.walk(GuestVirtualAddress(run.linearAddress.rawValue + offset), .read(.supervisor),
                                                  in: sample.memory, setAccessedDirty: false)
                #expect(translation.physicalAddress.rawValue == run.physicalAddress.rawValue + offset)
                #expect(translation.permissions == run.permissions)
                #expect(translation.pageSize == run.pageSize)
                #expect(translation.protectionKey == run.protectionKey)
                offset += max(run.pageSize, run.size / 64)
            }
        }
        var random = SplitMix64(state: 7)
        for _ in 0..<20000 {
            let base = [SampleGuest.userCode, SampleGuest.directMapBase, SampleGuest.kernelTextBase - 0x10_0000, 0x7fff_ffff_0000]
                .randomElement(using: &random)!
            let address = base &+ UInt64.random(in: 0..<(128 << 20), using: &random)
            let inRun = runs.contains { address &- $0.linearAddress.rawValue < $0.size }
            let translates = (try? walker.walk(GuestVirtualAddress(address), .read(.supervisor), in: sample.memory,
                                               setAccessedDirty: false)) != nil
            #expect(inRun == translates, "\(hex(address))")
        }
    }

    @Test func jsonLinesFormat() throws {
        let walker = try PageWalker(registers: sample.registers, memory: sample.memory)
        let (runs, _) = walker.mappings(in: sample.memory)
        let lines = runs.map { MapsCommand.json($0) }
        #expect(lines[0] == "{\"gva\":\"0x400000\",\"gpa\":\"0x2000000\",\"size\":16384,\"page_size\":4096,\"writable\":false,"
                + "\"user\":true,\"nx\":false,\"global\":false,\"pkey\":0}\n")
        for line in lines {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect(Set(object.keys) == ["gva", "gpa", "size", "page_size", "writable", "user", "nx", "global", "pkey"])
        }
        #expect(lines.contains { $0.contains("\"pkey\":1") })
        #expect(lines.contains { $0.contains("\"page_size\":1073741824") })
    }
}

@Suite struct ReportTests {
    let sample = try! SampleGuest.make()

    func explain(_ address: UInt64, _ access: Access, ac: Bool = false) throws -> WalkExplanation {
        var registers = sample.registers
        if ac { registers.rflags.insert(.alignmentCheck) }
        let walker = try PageWalker(registers: registers, memory: sample.memory)
        let result: Result<Translation, WalkFault>
        do { result = .success(try walker.walk(GuestVirtualAddress(address), access, in: sample.memory, setAccessedDirty: false)) }
        catch { result = .failure(error) }
        return WalkExplanation(walker: walker, address: GuestVirtualAddress(address), access: access, result: result,
                               accessedDirtyApplied: false)
    }

    @Test func reportsNameTheLevelAndTheRule() throws {
        let readOnly = try explain(SampleGuest.kernelTextBase, .write(.supervisor)).text
        #expect(readOnly.contains("PDE"))
        #expect(readOnly.contains("fault: #PF error code 0x3"))
        #expect(readOnly.contains("CR0.WP=1"))
        let smap = try explain(SampleGuest.userData, .read(.implicitSupervisor), ac: true).text
        #expect(smap.contains("SMAP"))
        let keyed = try explain(SampleGuest.userKeyed, .read(.user)).text
        #expect(keyed.contains("0x25"))
        #expect(keyed.lowercased().contains("protection key"))
        let reserved = try explain(SampleGuest.userReservedBit, .read(.user)).text
        #expect(reserved.contains("RSVD"))
        let canonical = try explain(0x0000_8000_0000_0000, .read(.user)).text
        #expect(canonical.contains("#GP"))
        let ok = try explain(SampleGuest.gigabyteAliasBase + 0x1234_5678, .read(.supervisor))
        #expect(ok.text.contains("ok: 0x12345678 (1 GiB page at level 3)"))
        let json = try #require(try JSONSerialization.jsonObject(with: Data(ok.json.utf8)) as? [String: Any])
        #expect(json["gpa"] as? String == "0x12345678")
        #expect(json["ok"] as? Bool == true)
    }

    @Test func commandLineValidation() {
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["walk", "--cpl", "4"]) }
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["walk", "--access", "jump"]) }
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["walk", "--image", "x", "--batch", "-", "--gva", "1"]) }
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["maps", "--max-phys-addr", "99"]) }
        #expect(throws: (any Error).self) { try VirtMMU.parseAsRoot(["walk", "--cr3", "0x10000000000000000"]) }
        #expect((try? VirtMMU.parseAsRoot(["walk", "--gva", "0x400000", "--access", "write", "--cpl", "3"])) != nil)
    }

    @Test func loadGuestFromCoreTakesItsRegisters() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("virtmmu-\(UUID().uuidString).core").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var command = try #require(try VirtMMU.parseAsRoot(["sample", "--out", path]) as? SampleCommand)
        try command.run()
        let options = try MachineOptions.parse(["--image", path])
        let (memory, registers, origin) = try options.loadGuest()
        #expect(registers.cr3 == sample.registers.cr3)
        #expect(registers.cr0 == sample.registers.cr0)
        #expect(registers.cr4 == sample.registers.cr4)
        #expect(registers.mode == .fourLevel)
        #expect(origin.contains("inferred"))
        #expect(memory.backedPageCount == sample.memory.backedPageCount)
        let missing = try MachineOptions.parse(["--image", path + ".missing"])
        #expect(throws: CommandFailure.self) { try missing.loadGuest() }
        _ = command
    }
}
