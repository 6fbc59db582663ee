import ArgumentParser
import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct SampleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sample",
        abstract: "Write the built-in sample guest as a QEMU-style ELF core, to try --image with.")

    @Option(help: "Where to write the core.")
    var out: String

    func run() throws {
        let sample = try SampleGuest.make()
        let registers = sample.registers
        // A 64-bit code segment (L, bit 21) and the QEMU note's layout, so the core reads back with
        // the same registers (EFER is inferred from CS.L: the note has no EFER).
        let state = GuestCPUState(cr0: registers.cr0.rawValue, cr3: registers.cr3, cr4: registers.cr4.rawValue,
                                  rflags: 0x2, codeSegmentFlags: 1 << 21)
        let bytes = ELFCoreWriter.make(memory: sample.memory, cpuStates: [state])
        let descriptor = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard descriptor >= 0 else {
            var standardError = StandardError()
            print("error: \(out): cannot create: \(String(cString: strerror(errno)))", to: &standardError)
            throw ExitCode(ExitCodes.noInput)
        }
        defer { _ = close(descriptor) }
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = write(descriptor, raw.baseAddress! + offset, raw.count - offset)
                if written <= 0 { break }
                offset += written
            }
        }
        print("wrote \(out): \(bytes.count) bytes, \(sample.memory.backedPageCount) guest pages, 1 vCPU")
    }
}

/// The `virtmmu` command.
public struct VirtMMU: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "virtmmu",
        abstract: "An executable model of x86 paging and the KVM MMU.",
        discussion: """
        Exit codes: 0 success; 64 bad command line; 65 bad input (malformed image, impossible \
        register state, invalid batch lines); 66 a file could not be opened. `run` has its own: 0 \
        success; 1 bad scenario, unreadable file or bad arguments; 2 lockstep disagreement or broken \
        invariant. `compare` adds 4: the two variants showed the guest different outcomes. \
        `run --variant NAME` runs one of the seed threads' designs (docs/VARIANTS.md).
        """,
        subcommands: [WalkCommand.self, MapsCommand.self, SampleCommand.self, RunCommand.self, CompareCommand.self, RolesCommand.self,
                      DumpCommand.self],
        defaultSubcommand: WalkCommand.self)

    public init() {}
}
