import GuestMemory
import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One `walk --batch` query after parsing: the access plus any register overrides.
struct BatchQuery {
    var gva: UInt64 = 0
    var hasGVA = false
    var access: AccessKind
    var cpl: Int
    var implicit: Bool
    var alignmentCheck: Bool
    var cr0: UInt64?
    var cr3: UInt64?
    var cr4: UInt64?
    var efer: UInt64?
    var pkru: UInt64?

    var privilege: Privilege { implicit ? .implicitSupervisor : cpl == 3 ? .user : .supervisor }
}

/// `virtmmu walk --batch`: JSON Lines in, JSON Lines out, one result per query in input order.
///
/// The JSON here is parsed and written by hand over raw bytes: the format is fixed and flat, and a
/// general JSON decoder would cost more than the walk itself by two orders of magnitude, while the
/// command must push millions of queries a second. Walkers are cached by register state, so a
/// batch that keeps its registers builds one walker (and loads PAE PDPTEs once).
final class BatchWalker {
    let memory: GuestPhysicalMemory
    let baseRegisters: PagingRegisters
    let cpu: CPUModel
    let updateAccessedDirty: Bool
    let defaultAccess: AccessKind
    let defaultCPL: Int
    let defaultImplicit: Bool
    private var output: ByteWriter
    private var lastRegisters: PagingRegisters?
    private var lastWalker: Result<WalkerBox, ControlStateError>?
    private var walkers: [PagingRegisters: Result<WalkerBox, ControlStateError>] = [:]
    private static let walkerCacheLimit = 4096

    init(memory: GuestPhysicalMemory, registers: PagingRegisters, cpu: CPUModel, updateAccessedDirty: Bool,
         defaultAccess: AccessKind = .read, defaultCPL: Int = 0, defaultImplicit: Bool = false,
         outputDescriptor: Int32 = 1) {
        self.memory = memory
        output = ByteWriter(fileDescriptor: outputDescriptor)
        self.baseRegisters = registers
        self.cpu = cpu
        self.updateAccessedDirty = updateAccessedDirty
        self.defaultAccess = defaultAccess
        self.defaultCPL = defaultCPL
        self.defaultImplicit = defaultImplicit
    }

    /// Runs every query in `path` (`-` for standard input). Returns the number of queries and of
    /// lines that were not valid queries; those get an `"error"` result line.
    func run(path: String) throws -> (lines: Int, badLines: Int) {
        let descriptor: Int32
        if path == "-" {
            descriptor = 0
        } else {
            descriptor = open(path, O_RDONLY)
            guard descriptor >= 0 else {
                throw CommandFailure(message: "error: \(path): cannot open: \(String(cString: strerror(errno)))",
                                     code: ExitCodes.noInput)
            }
        }
        defer { if descriptor != 0 { _ = close(descriptor) } }
        var lines = 0, badLines = 0
        var lineNumber = 0
        var readError: Int32 = 0
        forEachLine(descriptor, error: &readError) { line in
            lineNumber += 1
            if isBlank(line) { return }
            lines += 1
            if !answer(line, lineNumber: lineNumber) { badLines += 1 }
        }
        output.flush()
        if readError != 0 {
            throw CommandFailure(message: "error: \(path): read failed: \(String(cString: strerror(readError)))",
                                 code: ExitCodes.noInput)
        }
        return (lines, badLines)
    }

    /// Calls `body` with each line (without its newline) of the file, reading in large chunks.
    private func forEachLine(_ descriptor: Int32, error: inout Int32, _ body: (UnsafeRawBufferPointer) -> Void) {
        var capacity = 1 << 20
        var buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        defer { buffer.deallocate() }
        var filled = 0
        while true {
            if filled == capacity {
                // A line longer than the buffer: grow, so no line is ever split.
                let larger = UnsafeMutableRawPointer.allocate(byteCount: capacity * 2, alignment: 16)
                larger.copyMemory(from: buffer, byteCount: filled)
                buffer.deallocate()
                buffer = larger
                capacity *= 2
            }
            let got = read(descriptor, buffer + filled, capacity - filled)
            if got < 0 {
                if errno == EINTR { continue }
                error = errno
                return
            }
            let atEnd = got == 0
            filled += got
            var start = 0
            let bytes = buffer.assumingMemoryBound(to: UInt8.self)
            var index = atEnd ? filled : start
            while index < filled {
                if bytes[index] == 0x0A {
                    body(UnsafeRawBufferPointer(start: buffer + start, count: index - start))
                    start = index + 1
                }
                index += 1
            }
            if atEnd {
                if start < filled { body(UnsafeRawBufferPointer(start: buffer + start, count: filled - start)) }
                return
            }
            if start > 0 {
                (buffer).copyMemory(from: buffer + start, byteCount: filled - start)
                filled -= start
            }
        }
    }

    private func isBlank(_ line: UnsafeRawBufferPointer) -> Bool {
        for byte in line where byte != 0x20 && byte != 0x09 && byte != 0x0D { return false }
        return true
    }

    /// Answers one line; false when it was not a valid query.
    private func answer(_ line: UnsafeRawBufferPointer, lineNumber: Int) -> Bool {
        var query = BatchQuery(access: defaultAccess, cpl: defaultCPL, implicit: defaultImplicit,
                               alignmentCheck: baseRegisters.rflags.contains(.alignmentCheck))
        var parser = QueryParser(line)
        if let problem = parser.parse(into: &query) {
            writeError(lineNumber: lineNumber, gva: query.hasGVA ? query.gva : nil, message: problem)
            return false
        }
        var registers = baseRegisters
        if let value = query.cr0 { registers.cr0 = CR0(rawValue: value) }
        if let value = query.cr3 { registers.cr3 = value }
        if let value = query.cr4 { registers.cr4 = CR4(rawValue: value) }
        if let value = query.efer { registers.efer = EFER(rawValue: value) }
        if let value = query.pkru { registers.pkru = PKRU(UInt32(truncatingIfNeeded: value)) }
        if query.alignmentCheck { registers.rflags.insert(.alignmentCheck) } else { registers.rflags.remove(.alignmentCheck) }
        let box: WalkerBox
        switch walkerFor(registers) {
        case .success(let cached): box = cached
        case .failure(let error):
            writeError(lineNumber: lineNumber, gva: query.gva, message: "impossible register state: \(error)")
            return false
        }
        let address = GuestVirtualAddress(query.gva)
        switch box.walker.translate(address, Access(query.access, query.privilege), in: memory,
                                    setAccessedDirty: updateAccessedDirty) {
        case .success(let translation):
            output.append("{\"gva\":\"")
            output.appendHex(query.gva)
            output.append("\",\"ok\":true,\"gpa\":\"")
            output.appendHex(translation.physicalAddress.rawValue)
            output.append("\",\"level\":")
            output.appendDecimal(UInt64(translation.level))
            output.append(",\"page_size\":")
            output.appendDecimal(translation.pageSize)
            output.append("}\n")
        case .failure(let error):
            switch error {
            case .pageFault(let fault):
                writeFault("pf", gva: query.gva, errorCode: UInt64(fault.errorCode.architectural))
            case .generalProtection:
                writeFault("gp", gva: query.gva, errorCode: 0)
            case .noMemory(let gpa, let level, _):
                // A table pointer into guest-physical space with nothing behind it: not an
                // architectural outcome the guest could see, so it gets its own fault name.
                output.append("{\"gva\":\"")
                output.appendHex(query.gva)
                output.append("\",\"ok\":false,\"fault\":\"no_memory\",\"gpa\":\"")
                output.appendHex(gpa.rawValue)
                output.append("\",\"level\":")
                output.appendDecimal(UInt64(level))
                output.append("}\n")
            case .addressTooWide(_, let width):
                writeError(lineNumber: lineNumber, gva: query.gva,
                           message: "address wider than the \(width)-bit linear addresses of \(box.walker.mode.displayName)")
                return false
            }
        }
        return true
    }

    private func walkerFor(_ registers: PagingRegisters) -> Result<WalkerBox, ControlStateError> {
        if let lastRegisters, lastRegisters == registers, let lastWalker { return lastWalker }
        let result: Result<WalkerBox, ControlStateError>
        if let cached = walkers[registers] {
            result = cached
        } else {
            do {
                result = .success(WalkerBox(try PageWalker(registers: registers, cpu: cpu, memory: memory)))
            } catch {
                result = .failure(error)
            }
            if walkers.count >= Self.walkerCacheLimit { walkers.removeAll(keepingCapacity: true) }
            walkers[registers] = result
        }
        lastRegisters = registers
        lastWalker = result
        return result
    }

    private func writeFault(_ kind: StaticString, gva: UInt64, errorCode: UInt64) {
        output.append("{\"gva\":\"")
        output.appendHex(gva)
        output.append("\",\"ok\":false,\"fault\":\"")
        output.append(kind)
        output.append("\",\"error_code\":\"")
        output.appendHex(errorCode)
        output.append("\"}\n")
    }

    private func writeError(lineNumber: Int, gva: UInt64?, message: String) {
        output.append("{")
        if let gva {
            output.append("\"gva\":\"")
            output.appendHex(gva)
            output.append("\",")
        }
        output.append("\"ok\":false,\"line\":")
        output.appendDecimal(UInt64(lineNumber))
        output.append(",\"error\":")
        output.append(quoted(message))
        output.append("}\n")
    }
}

/// A walker shared by reference: `PageWalker` is a large value, and copying it per query showed
/// up in profiles of the batch command.
final class WalkerBox {
    let walker: PageWalker
    init(_ walker: PageWalker) { self.walker = walker }
}

/// Buffered output straight to a file descriptor.
struct ByteWriter {
    let fileDescriptor: Int32
    private var buffer: [UInt8] = []
    private static let flushThreshold = 1 << 16

    init(fileDescriptor: Int32) {
        self.fileDescriptor = fileDescriptor
        buffer.reserveCapacity(Self.flushThreshold + 256)
    }

    mutating func append(_ text: StaticString) {
        text.withUTF8Buffer { buffer.append(contentsOf: $0) }
        flushIfFull()
    }

    mutating func append(_ text: String) {
        buffer.append(contentsOf: text.utf8)
        flushIfFull()
    }

    mutating func appendHex(_ value: UInt64) {
        buffer.append(0x30)
        buffer.append(0x78)
        if value == 0 {
            buffer.append(0x30)
            return
        }
        var shift = (63 - value.leadingZeroBitCount) & ~3
        while shift >= 0 {
            let digit = UInt8((value >> UInt64(shift)) & 0xF)
            buffer.append(digit < 10 ? 0x30 + digit : 0x57 + digit)
            shift -= 4
        }
    }

    mutating func appendDecimal(_ value: UInt64) {
        if value < 10 {
            buffer.append(0x30 + UInt8(value))
            return
        }
        var digits: (UInt64, Int) = (value, 0)
        var scratch: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                      UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &scratch) { bytes in
            while digits.0 > 0 {
                bytes[digits.1] = 0x30 + UInt8(digits.0 % 10)
                digits.0 /= 10
                digits.1 += 1
            }
            for index in stride(from: digits.1 - 1, through: 0, by: -1) { buffer.append(bytes[index]) }
        }
    }

    private mutating func flushIfFull() {
        if buffer.count >= Self.flushThreshold { flush() }
    }

    mutating func flush() {
        var written = 0
        buffer.withUnsafeBytes { bytes in
            while written < bytes.count {
                let result = write(fileDescriptor, bytes.baseAddress! + written, bytes.count - written)
                if result < 0 {
                    if errno == EINTR { continue }
                    return  // The reader went away (EPIPE): nothing more to say.
                }
                written += result
            }
        }
        buffer.removeAll(keepingCapacity: true)
    }
}

/// A parser for one flat JSON object of the batch query format. Unknown keys are skipped (with
/// their values, whatever they are) so producers can add fields; known keys are checked strictly.
struct QueryParser {
    let bytes: UnsafeRawBufferPointer
    var index = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var atEnd: Bool { index >= bytes.count }
    var current: UInt8 { bytes[index] }

    mutating func skipSpace() {
        while !atEnd, current == 0x20 || current == 0x09 || current == 0x0D || current == 0x0A { index += 1 }
    }

    /// Fills `query`; returns a description of the first problem, or nil.
    mutating func parse(into query: inout BatchQuery) -> String? {
        skipSpace()
        guard !atEnd, current == UInt8(ascii: "{") else { return "not a JSON object" }
        index += 1
        skipSpace()
        if !atEnd, current == UInt8(ascii: "}") {
            index += 1
        } else {
            while true {
                skipSpace()
                guard let key = parseStringRange() else { return "expected a quoted key at column \(index + 1)" }
                skipSpace()
                guard !atEnd, current == UInt8(ascii: ":") else { return "expected ':' at column \(index + 1)" }
                index += 1
                skipSpace()
                if let problem = parseValue(for: key, into: &query) { return problem }
                skipSpace()
                guard !atEnd else { return "unterminated object" }
                if current == UInt8(ascii: ",") { index += 1; continue }
                if current == UInt8(ascii: "}") { index += 1; break }
                return "expected ',' or '}' at column \(index + 1)"
            }
        }
        skipSpace()
        guard atEnd else { return "trailing characters after the object at column \(index + 1)" }
        guard query.hasGVA else { return "missing \"gva\"" }
        return nil
    }

    /// The bytes of a string without its quotes; nil if there is no well-formed string here.
    mutating func parseStringRange() -> Range<Int>? {
        guard !atEnd, current == UInt8(ascii: "\"") else { return nil }
        index += 1
        let start = index
        while !atEnd {
            switch current {
            case UInt8(ascii: "\""):
                defer { index += 1 }
                return start..<index
            case UInt8(ascii: "\\"):
                index += 2
            default:
                if current < 0x20 { return nil }
                index += 1
            }
        }
        return nil
    }

    func matches(_ range: Range<Int>, _ name: StaticString) -> Bool {
        guard range.count == name.utf8CodeUnitCount else { return false }
        return name.withUTF8Buffer { expected in
            for offset in 0..<range.count where bytes[range.lowerBound + offset] != expected[offset] { return false }
            return true
        }
    }

    func text(_ range: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
    }

    mutating func parseValue(for key: Range<Int>, into query: inout BatchQuery) -> String? {
        if matches(key, "gva") {
            guard let value = parseNumber() else { return "\"gva\" must be a hex string or an integer" }
            query.gva = value
            query.hasGVA = true
        } else if matches(key, "access") {
            guard let range = parseStringRange() else { return "\"access\" must be \"read\", \"write\" or \"fetch\"" }
            if matches(range, "read") { query.access = .read }
            else if matches(range, "write") { query.access = .write }
            else if matches(range, "fetch") { query.access = .fetch }
            else { return "\"access\" must be \"read\", \"write\" or \"fetch\", not \"\(text(range))\"" }
        } else if matches(key, "cpl") {
            guard let value = parseNumber(), value <= 3 else { return "\"cpl\" must be 0, 1, 2 or 3" }
            query.cpl = Int(value)
        } else if matches(key, "ac") {
            guard let value = parseBool() else { return "\"ac\" must be true or false" }
            query.alignmentCheck = value
        } else if matches(key, "implicit") {
            guard let value = parseBool() else { return "\"implicit\" must be true or false" }
            query.implicit = value
        } else if matches(key, "cr0") {
            guard let value = parseNumber() else { return "\"cr0\" must be a hex string or an integer" }
            query.cr0 = value
        } else if matches(key, "cr3") {
            guard let value = parseNumber() else { return "\"cr3\" must be a hex string or an integer" }
            query.cr3 = value
        } else if matches(key, "cr4") {
            guard let value = parseNumber() else { return "\"cr4\" must be a hex string or an integer" }
            query.cr4 = value
        } else if matches(key, "efer") {
            guard let value = parseNumber() else { return "\"efer\" must be a hex string or an integer" }
            query.efer = value
        } else if matches(key, "pkru") {
            guard let value = parseNumber(), value >> 32 == 0 else { return "\"pkru\" must be a 32-bit value" }
            query.pkru = value
        } else {
            guard skipValue(depth: 0) else { return "malformed value for \"\(text(key))\"" }
        }
        return nil
    }

    /// A hex string ("0x..."), a decimal string, or a JSON integer, as a 64-bit value.
    mutating func parseNumber() -> UInt64? {
        guard !atEnd else { return nil }
        if current == UInt8(ascii: "\"") {
            guard let range = parseStringRange(), !range.isEmpty else { return nil }
            var position = range.lowerBound
            var radix: UInt64 = 10
            if range.count > 2, bytes[position] == UInt8(ascii: "0"), bytes[position + 1] | 0x20 == UInt8(ascii: "x") {
                radix = 16
                position += 2
            }
            return digits(position..<range.upperBound, radix: radix)
        }
        let start = index
        while !atEnd, current >= UInt8(ascii: "0"), current <= UInt8(ascii: "9") { index += 1 }
        guard index > start else { return nil }
        return digits(start..<index, radix: 10)
    }

    func digits(_ range: Range<Int>, radix: UInt64) -> UInt64? {
        var value: UInt64 = 0
        var any = false
        for position in range {
            let byte = bytes[position]
            let digit: UInt64
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt64(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f") where radix == 16: digit = UInt64(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F") where radix == 16: digit = UInt64(byte - UInt8(ascii: "A") + 10)
            case UInt8(ascii: "_"): continue
            default: return nil
            }
            let (shifted, overflow) = value.multipliedReportingOverflow(by: radix)
            guard !overflow else { return nil }
            let (sum, carry) = shifted.addingReportingOverflow(digit)
            guard !carry else { return nil }
            value = sum
            any = true
        }
        return any ? value : nil
    }

    mutating func parseBool() -> Bool? {
        if literal("true") { return true }
        if literal("false") { return false }
        return nil
    }

    mutating func literal(_ word: StaticString) -> Bool {
        let count = word.utf8CodeUnitCount
        guard bytes.count - index >= count else { return false }
        let found = word.withUTF8Buffer { expected in
            (0..<count).allSatisfy { bytes[index + $0] == expected[$0] }
        }
        if found { index += count }
        return found
    }

    /// Skips any JSON value (nesting bounded so a hostile line cannot exhaust the stack).
    mutating func skipValue(depth: Int) -> Bool {
        guard depth < 64, !atEnd else { return false }
        switch current {
        case UInt8(ascii: "\""):
            return parseStringRange() != nil
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            let closing = current == UInt8(ascii: "{") ? UInt8(ascii: "}") : UInt8(ascii: "]")
            let isObject = current == UInt8(ascii: "{")
            index += 1
            skipSpace()
            if !atEnd, current == closing { index += 1; return true }
            while true {
                skipSpace()
                if isObject {
                    guard parseStringRange() != nil else { return false }
                    skipSpace()
                    guard !atEnd, current == UInt8(ascii: ":") else { return false }
                    index += 1
                    skipSpace()
                }
                guard skipValue(depth: depth + 1) else { return false }
                skipSpace()
                guard !atEnd else { return false }
                if current == UInt8(ascii: ",") { index += 1; continue }
                if current == closing { index += 1; return true }
                return false
            }
        default:
            if literal("true") || literal("false") || literal("null") { return true }
            let start = index
            while !atEnd, let scalar = Optional(current),
                  scalar == UInt8(ascii: "-") || scalar == UInt8(ascii: "+") || scalar == UInt8(ascii: ".")
                    || scalar | 0x20 == UInt8(ascii: "e") || (scalar >= UInt8(ascii: "0") && scalar <= UInt8(ascii: "9")) {
                index += 1
            }
            return index > start
        }
    }
}
