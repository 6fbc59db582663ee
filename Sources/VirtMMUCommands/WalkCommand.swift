import ArgumentParser
import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct WalkCommand: FailureReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "walk",
        abstract: "Walk guest page tables for one access and explain every level, or many accesses as JSON Lines.",
        discussion: """
        Without --gva (and without --image) it walks a set of demonstration accesses over the built-in \
        sample guest. With --batch FILE (or - for standard input) it reads one JSON query per line: \
        {"gva":"0x...","access":"read"|"write"|"fetch","cpl":0|3} with optional cr0, cr3, cr4, efer, pkru, \
        ac and implicit, and writes one JSON result per line, in order.
        """)

    @OptionGroup var machine: MachineOptions

    @Option(help: "The linear address to translate.")
    var gva: NumberArgument?
    @Option(help: "read, write or fetch.")
    var access: AccessKind = .read
    @Option(help: "Current privilege level: 0-2 supervisor, 3 user.")
    var cpl: Int = 0
    @Flag(help: "An implicit supervisor access (descriptor tables, TSS...): RFLAGS.AC cannot lift SMAP for it.")
    var implicit = false
    @Flag(help: "RFLAGS.AC=1 (STAC).")
    var ac = false
    @Flag(help: "Write the accessed/dirty bits a successful walk sets into the loaded memory (default: probe only).")
    var updateAccessedDirty = false
    @Flag(help: "Print JSON instead of the readable report.")
    var json = false
    @Option(help: "JSON Lines queries from FILE, or - for standard input.")
    var batch: String?

    func validate() throws {
        guard (0...3).contains(cpl) else { throw ValidationError("--cpl must be 0, 1, 2 or 3, not \(cpl)") }
        if batch != nil && gva != nil { throw ValidationError("--batch takes its addresses from the input; drop --gva") }
        if machine.image != nil && gva == nil && batch == nil {
            throw ValidationError("give --gva (or --batch) with --image")
        }
    }

    func execute() throws {
        var (memory, registers, origin) = try machine.loadGuest()
        if ac { registers.rflags.insert(.alignmentCheck) }
        if let batch {
            let walker = BatchWalker(memory: memory, registers: registers, cpu: machine.cpuModel,
                                     updateAccessedDirty: updateAccessedDirty, defaultAccess: access,
                                     defaultCPL: cpl, defaultImplicit: implicit)
            let status = try walker.run(path: batch)
            if status.badLines > 0 {
                var standardError = StandardError()
                print("\(status.badLines) of \(status.lines) input lines were not valid queries (see their \"error\" fields)",
                      to: &standardError)
                throw ExitCode(ExitCodes.dataError)
            }
            return
        }
        let walker = try machine.makeWalker(registers, memory: memory)
        let privilege: Privilege = implicit ? .implicitSupervisor : cpl == 3 ? .user : .supervisor
        if let gva {
            let explanation = explain(walker, GuestVirtualAddress(gva.value), Access(access, privilege), memory: memory)
            print(json ? explanation.json : explanation.text)
            return
        }
        // The demonstration over the sample guest.
        if !json {
            print("VirtMMU reference walker — \(origin)")
            print("\(walker.mode.displayName), CR0=\(hex(registers.cr0.rawValue)) CR3=\(hex(registers.cr3)) "
                  + "CR4=\(hex(registers.cr4.rawValue)) EFER=\(hex(registers.efer.rawValue)) PKRU=\(hex(registers.pkru.rawValue))")
            print("")
        }
        for demo in SampleGuest.demonstrations {
            var demoRegisters = registers
            if demo.alignmentCheck { demoRegisters.rflags.insert(.alignmentCheck) }
            let demoWalker = try machine.makeWalker(demoRegisters, memory: memory)
            let explanation = explain(demoWalker, GuestVirtualAddress(demo.address), demo.access, memory: memory)
            if json {
                print(explanation.json)
            } else {
                print("# \(demo.title)")
                print(explanation.text)
                print("")
            }
        }
        if !json {
            print("Try: virtmmu maps (every mapping of the sample), virtmmu walk --gva 0x400000 --access write --cpl 3,")
            print("     virtmmu walk --json ..., or --image FILE for a raw image or a QEMU dump-guest-memory core.")
        }
    }

    func explain(_ walker: PageWalker, _ address: GuestVirtualAddress, _ access: Access,
                 memory: GuestPhysicalMemory) -> WalkExplanation {
        let result: Result<Translation, WalkFault>
        do {
            result = .success(try walker.walk(address, access, in: memory, setAccessedDirty: updateAccessedDirty))
        } catch {
            result = .failure(error)
        }
        var explanation = WalkExplanation(walker: walker, address: address, access: access, result: result,
                                          accessedDirtyApplied: updateAccessedDirty)
        if case .success(let translation) = result {
            explanation.finalPageBacked = memory.isBacked(translation.physicalAddress.frame)
        }
        return explanation
    }
}

/// Standard error as a `TextOutputStream`.
struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        var writer = ByteWriter(fileDescriptor: 2)
        writer.append(string)
        writer.flush()
    }
}
