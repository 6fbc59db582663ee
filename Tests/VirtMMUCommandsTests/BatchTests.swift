import Foundation
import Testing
@testable import VirtMMUCommands
import GuestMemory
import X86Paging

/// Runs `lines` through `walk --batch` over `memory` and returns the output lines.
func runBatch(_ lines: [String], memory: GuestPhysicalMemory, registers: PagingRegisters,
              defaultAccess: AccessKind = .read, defaultCPL: Int = 0) throws -> (output: [String], lines: Int, bad: Int) {
    let directory = FileManager.default.temporaryDirectory
    let input = directory.appendingPathComponent("virtmmu-batch-\(UUID().uuidString).jsonl")
    let output = directory.appendingPathComponent("virtmmu-batch-\(UUID().uuidString).out")
    defer {
        try? FileManager.default.removeItem(at: input)
        try? FileManager.default.removeItem(at: output)
    }
    try lines.joined(separator: "\n").write(to: input, atomically: true, encoding: .utf8)
    FileManager.default.createFile(atPath: output.path, contents: nil)
    let handle = try FileHandle(forWritingTo: output)
    let batch = BatchWalker(memory: memory, registers: registers, cpu: CPUModel(), updateAccessedDirty: false,
                            defaultAccess: defaultAccess, defaultCPL: defaultCPL, outputDescriptor: handle.fileDescriptor)
    let status = try batch.run(path: input.path)
    try handle.close()
    let text = try String(contentsOf: output, encoding: .utf8)
    return (text.split(separator: "\n").map(String.init), status.lines, status.badLines)
}

/// What the batch format says one query's result must be, computed with the walker directly.
func expectedLine(_ walker: PageWalker, gva: UInt64, access: Access, memory: GuestPhysicalMemory) -> String {
    do {
        let translation = try walker.walk(GuestVirtualAddress(gva), access, in: memory, setAccessedDirty: false)
        return "{\"gva\":\"\(hex(gva))\",\"ok\":true,\"gpa\":\"\(hex(translation.physicalAddress.rawValue))\","
            + "\"level\":\(translation.level),\"page_size\":\(translation.pageSize)}"
    } catch {
        switch error {
        case .pageFault(let fault):
            return "{\"gva\":\"\(hex(gva))\",\"ok\":false,\"fault\":\"pf\",\"error_code\":\"\(hex(UInt64(fault.errorCode.architectural)))\"}"
        case .generalProtection:
            return "{\"gva\":\"\(hex(gva))\",\"ok\":false,\"fault\":\"gp\",\"error_code\":\"0x0\"}"
        case .noMemory(let gpa, let level, _):
            return "{\"gva\":\"\(hex(gva))\",\"ok\":false,\"fault\":\"no_memory\",\"gpa\":\"\(hex(gpa.rawValue))\",\"level\":\(level)}"
        case .addressTooWide:
            return "too wide"
        }
    }
}

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct BatchTests {
    let sample = try! SampleGuest.make()

    @Test func everyQueryMatchesTheWalker() throws {
        var random = SplitMix64(state: 42)
        let interesting: [UInt64] = [SampleGuest.userCode, SampleGuest.userData, SampleGuest.userReadOnly, SampleGuest.userKeyed,
                                     SampleGuest.userNotPresent, SampleGuest.userReservedBit, SampleGuest.userStack,
                                     SampleGuest.directMapBase, SampleGuest.kernelTextBase, SampleGuest.gigabyteAliasBase,
                                     0x0000_8000_0000_0000, 0]
        var lines: [String] = []
        var expected: [String] = []
        let base = try PageWalker(registers: sample.registers, memory: sample.memory)
        let toggles: [(cr4: UInt64?, ac: Bool)] = [(nil, false), (nil, true), (0x20, false), (0x3000a0, true)]
        for _ in 0..<3000 {
            let gva = interesting.randomElement(using: &random)! &+ UInt64.random(in: 0..<0x3000, using: &random)
            let kind = AccessKind.allCases.randomElement(using: &random)!
            let cpl = [0, 3].randomElement(using: &random)!
            let implicit = Bool.random(using: &random) && cpl == 0
            let toggle = toggles.randomElement(using: &random)!
            var line = "{\"gva\":\"\(hex(gva))\",\"access\":\"\(kind.name)\",\"cpl\":\(cpl)"
            if implicit { line += ",\"implicit\":true" }
            if toggle.ac { line += ",\"ac\":true" }
            var registers = sample.registers
            if let cr4 = toggle.cr4 {
                line += ",\"cr4\":\"\(hex(cr4))\""
                registers.cr4 = CR4(rawValue: cr4)
            }
            if toggle.ac { registers.rflags.insert(.alignmentCheck) }
            lines.append(line + "}")
            let walker = toggle.cr4 == nil && !toggle.ac ? base : try PageWalker(registers: registers, memory: sample.memory)
            let privilege: Privilege = implicit ? .implicitSupervisor : cpl == 3 ? .user : .supervisor
            expected.append(expectedLine(walker, gva: gva, access: Access(kind, privilege), memory: sample.memory))
        }
        let result = try runBatch(lines, memory: sample.memory, registers: sample.registers)
        #expect(result.bad == 0)
        #expect(result.lines == lines.count)
        #expect(result.output == expected)
    }

    @Test func formatsAndDefaults() throws {
        let result = try runBatch([
            "{\"gva\":\"0x400123\",\"access\":\"read\",\"cpl\":3}",
            "  { \"cpl\" : 3 , \"access\" : \"write\" , \"gva\" : 4194595 }  ",
            "{\"gva\":\"0x800000000000\",\"access\":\"read\",\"cpl\":0}",
            "",
            "{\"gva\":\"0x400123\",\"id\":{\"nested\":[1,2.5e3,null,true,\"x\\\"y\"]}}",
            "{\"gva\":\"0xffffc90012345678\"}",
        ], memory: sample.memory, registers: sample.registers, defaultAccess: .read, defaultCPL: 3)
        #expect(result.bad == 0)
        #expect(result.lines == 5)
        #expect(result.output == [
            "{\"gva\":\"0x400123\",\"ok\":true,\"gpa\":\"0x2000123\",\"level\":1,\"page_size\":4096}",
            "{\"gva\":\"0x400123\",\"ok\":false,\"fault\":\"pf\",\"error_code\":\"0x7\"}",
            "{\"gva\":\"0x800000000000\",\"ok\":false,\"fault\":\"gp\",\"error_code\":\"0x0\"}",
            "{\"gva\":\"0x400123\",\"ok\":true,\"gpa\":\"0x2000123\",\"level\":1,\"page_size\":4096}",
            // The default CPL 3 makes this a user read of a supervisor page.
            "{\"gva\":\"0xffffc90012345678\",\"ok\":false,\"fault\":\"pf\",\"error_code\":\"0x5\"}",
        ])
    }

    @Test func badLinesGetErrorsInPlace() throws {
        let bad = [
            "garbage", "{", "{\"gva\":}", "{\"access\":\"read\"}", "{\"gva\":\"0xzz\"}", "{\"gva\":\"0x1\",\"access\":\"jump\"}",
            "{\"gva\":\"0x1\",\"cpl\":4}", "{\"gva\":\"0x1\"} trailing", "{\"gva\":\"0x1\",\"ac\":1}",
            "{\"gva\":\"0x10000000000000000\"}", "{\"gva\":\"0x1\",\"cr0\":\"0x80000000\"}", "{\"gva\":\"0x1\",\"pkru\":\"0x100000000\"}",
            "{\"gva\":\"0x1\",\"x\":" + String(repeating: "[", count: 200) + "}",
        ]
        let lines = ["{\"gva\":\"0x400000\",\"cpl\":3}"] + bad + ["{\"gva\":\"0x400000\",\"cpl\":3}"]
        let result = try runBatch(lines, memory: sample.memory, registers: sample.registers)
        #expect(result.bad == bad.count)
        #expect(result.output.count == lines.count)
        #expect(result.output.first == result.output.last)
        for (offset, line) in result.output.dropFirst().dropLast().enumerated() {
            #expect(line.contains("\"ok\":false,\"line\":\(offset + 2),\"error\":"), "\(line)")
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object?["error"] is String)
        }
    }

    @Test func outputIsValidJSON() throws {
        let result = try runBatch(["{\"gva\":\"0x400000\"}", "{\"gva\":\"0x800000\"}", "{\"gva\":\"0x1\\u0000\"}"],
                                  memory: sample.memory, registers: sample.registers)
        for line in result.output {
            #expect((try? JSONSerialization.jsonObject(with: Data(line.utf8))) != nil, "\(line)")
        }
    }

    @Test func missingInputFileIsNoInput() throws {
        let batch = BatchWalker(memory: sample.memory, registers: sample.registers, cpu: CPUModel(), updateAccessedDirty: false)
        do {
            _ = try batch.run(path: "/nonexistent/queries.jsonl")
            Issue.record("expected a failure")
        } catch let failure as CommandFailure {
            #expect(failure.code == ExitCodes.noInput)
            #expect(failure.message.contains("/nonexistent/queries.jsonl"))
        }
    }

    @Test func numbers() {
        #expect(parseNumber("0x1F") == 31)
        #expect(parseNumber("0xffff_8880_0000_0000") == 0xffff_8880_0000_0000)
        #expect(parseNumber("42") == 42)
        #expect(parseNumber("0x") == nil)
        #expect(parseNumber("-1") == nil)
        #expect(parseNumber("0x1_0000_0000_0000_0000") == nil)
    }
}
