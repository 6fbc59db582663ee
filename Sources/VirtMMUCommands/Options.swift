import ArgumentParser
import GuestMemory
import X86Paging

/// A 64-bit value given as `0x` hex or decimal (underscores allowed).
public struct NumberArgument: ExpressibleByArgument, Sendable, Hashable {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public init?(argument: String) {
        guard let value = parseNumber(argument) else { return nil }
        self.value = value
    }
    public var defaultValueDescription: String { hex(value) }
}

/// Parses `0x...` hex or decimal, with optional underscores; nil when malformed or out of range.
public func parseNumber<S: StringProtocol>(_ text: S) -> UInt64? {
    let cleaned = String(text.filter { $0 != "_" })
    if cleaned.hasPrefix("0x") || cleaned.hasPrefix("0X") {
        let digits = cleaned.dropFirst(2)
        return digits.isEmpty ? nil : UInt64(digits, radix: 16)
    }
    return UInt64(cleaned, radix: 10)
}

extension AccessKind: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "read", "r": self = .read
        case "write", "w": self = .write
        case "fetch", "x", "exec", "execute": self = .fetch
        default: return nil
        }
    }
    public static var allValueStrings: [String] { ["read", "write", "fetch"] }
    public var name: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .fetch: "fetch"
        }
    }
}

extension ImageFormat: ExpressibleByArgument {}
extension CPUVendor: ExpressibleByArgument {}

/// Exit codes (sysexits.h), shared by every subcommand and documented in the README.
public enum ExitCodes {
    /// The command line is wrong (ArgumentParser's validation errors exit with this too).
    public static let usage: Int32 = 64
    /// The input is wrong: a malformed image, an impossible register state, a bad batch line.
    public static let dataError: Int32 = 65
    /// A file could not be opened.
    public static let noInput: Int32 = 66
}

/// A failure the command reports as one clear line and an exit code.
struct CommandFailure: Error, CustomStringConvertible {
    var message: String
    var code: Int32
    var description: String { message }
}

/// A subcommand whose `execute` reports expected failures as one line on standard error and an
/// exit code, instead of ArgumentParser's generic error output.
protocol FailureReportingCommand: ParsableCommand {
    func execute() throws
}

extension FailureReportingCommand {
    func run() throws {
        do {
            try execute()
        } catch let failure as CommandFailure {
            var standardError = StandardError()
            print(failure.message, to: &standardError)
            throw ExitCode(failure.code)
        }
    }
}

/// Where the guest comes from and the register state to walk with: shared by `walk` and `maps`.
struct MachineOptions: ParsableArguments {
    @Option(help: "A guest memory image: a raw flat file or a QEMU dump-guest-memory ELF core. Without it, the built-in sample guest.")
    var image: String?

    @Option(help: "Image format (default: detected from the file's magic).")
    var format: ImageFormat?

    @Option(help: "Guest-physical address at which a raw image starts.")
    var base: NumberArgument = NumberArgument(0)

    @Option(help: "Which vCPU's registers to take from an ELF core.")
    var vcpu: Int = 0

    @Option(help: "CR0 (default: from the ELF core or the sample guest).")
    var cr0: NumberArgument?
    @Option(help: "CR3.")
    var cr3: NumberArgument?
    @Option(help: "CR4.")
    var cr4: NumberArgument?
    @Option(help: "IA32_EFER.")
    var efer: NumberArgument?
    @Option(help: "PKRU.")
    var pkru: NumberArgument?
    @Option(help: "IA32_PKRS (with CR4.PKS).")
    var pkrs: NumberArgument?

    @Option(help: "MAXPHYADDR of the CPU model.")
    var maxPhysAddr: Int = 46
    @Flag(help: "The CPU model has no 1 GiB pages.")
    var no1gPages = false
    @Flag(help: "The CPU model has no 5-level paging.")
    var noLa57 = false
    @Option(help: "Vendor-specific reserved bits: intel or amd.")
    var vendor: CPUVendor = .intel

    func validate() throws {
        guard (36...52).contains(maxPhysAddr) else {
            throw ValidationError("--max-phys-addr must be between 36 and 52, not \(maxPhysAddr)")
        }
        if image == nil && (format != nil || base.value != 0) {
            throw ValidationError("--format and --base need --image")
        }
        if let cr3, cr3.value >> 52 != 0 {
            throw ValidationError("--cr3 \(hex(cr3.value)) has bits above bit 51")
        }
        if let pkru, pkru.value >> 32 != 0 { throw ValidationError("--pkru is a 32-bit register") }
        if let pkrs, pkrs.value >> 32 != 0 { throw ValidationError("--pkrs is a 32-bit register") }
    }

    var cpuModel: CPUModel {
        CPUModel(maxPhysicalAddressBits: maxPhysAddr, supports1GiBPages: !no1gPages, supportsLA57: !noLa57,
                 supportsNX: true, vendor: vendor)
    }

    /// The guest: its memory, the registers to walk with, and a line saying where they came from.
    func loadGuest() throws -> (memory: GuestPhysicalMemory, registers: PagingRegisters, origin: String) {
        var registers: PagingRegisters
        let memory: GuestPhysicalMemory
        var origin: String
        if let image {
            let loaded: LoadedImage
            do {
                loaded = try ImageLoader.load(path: image, format: format, base: GuestPhysicalAddress(base.value))
            } catch {
                throw CommandFailure(message: "error: \(error)", code: error.isUnreadableFile ? ExitCodes.noInput : ExitCodes.dataError)
            }
            memory = loaded.memory
            origin = "\(image) (\(loaded.format.rawValue), \(loaded.memory.backedPageCount) pages)"
            registers = PagingRegisters()
            if !loaded.cpuStates.isEmpty {
                guard loaded.cpuStates.indices.contains(vcpu) else {
                    throw CommandFailure(message: "error: \(image) holds \(loaded.cpuStates.count) vCPU states; there is no vCPU \(vcpu)",
                                         code: ExitCodes.usage)
                }
                let state = loaded.cpuStates[vcpu]
                registers = PagingRegisters(cr0: CR0(rawValue: state.cr0), cr3: state.cr3, cr4: CR4(rawValue: state.cr4),
                                            efer: EFER(rawValue: state.efer ?? state.inferredEFER),
                                            rflags: RFLAGS(rawValue: state.rflags))
                origin += ", registers of vCPU \(vcpu)"
                if state.efer == nil { origin += "; EFER \(state.eferInference)" }
            } else if cr3 == nil {
                throw CommandFailure(message: "error: \(image) carries no CPU state; give at least --cr0, --cr3, --cr4 and --efer",
                                     code: ExitCodes.usage)
            }
        } else {
            let sample = try SampleGuest.make()
            memory = sample.memory
            registers = sample.registers
            origin = "built-in sample guest (64 MiB, 4-level paging)"
        }
        if let cr0 { registers.cr0 = CR0(rawValue: cr0.value) }
        if let cr3 { registers.cr3 = cr3.value }
        if let cr4 { registers.cr4 = CR4(rawValue: cr4.value) }
        if let efer { registers.efer = EFER(rawValue: efer.value) }
        if let pkru { registers.pkru = PKRU(UInt32(pkru.value)) }
        if let pkrs { registers.pkrs = PKRS(UInt32(pkrs.value)) }
        return (memory, registers, origin)
    }

    func makeWalker(_ registers: PagingRegisters, memory: GuestPhysicalMemory) throws -> PageWalker {
        do {
            return try PageWalker(registers: registers, cpu: cpuModel, memory: memory)
        } catch {
            throw CommandFailure(message: "error: impossible register state: \(error)", code: ExitCodes.dataError)
        }
    }
}
