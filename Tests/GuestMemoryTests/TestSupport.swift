import Foundation
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Testing
import X86Paging

// MARK: Deterministic randomness

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, and good enough to drive property and
/// fuzz tests reproducibly.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8(truncatingIfNeeded: next()) }
    }
}

/// Whether the tests run an optimized build (the fuzz loops do more work there).
#if DEBUG
let isDebugBuild = true
#else
let isDebugBuild = false
#endif

// MARK: Little-endian byte editing

extension Array where Element == UInt8 {
    mutating func setLE16(_ value: UInt16, at offset: Int) {
        for byte in 0..<2 { self[offset + byte] = UInt8(truncatingIfNeeded: value >> UInt16(8 * byte)) }
    }
    mutating func setLE32(_ value: UInt32, at offset: Int) {
        for byte in 0..<4 { self[offset + byte] = UInt8(truncatingIfNeeded: value >> UInt32(8 * byte)) }
    }
    mutating func setLE64(_ value: UInt64, at offset: Int) {
        for byte in 0..<8 { self[offset + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * byte)) }
    }
    func getLE16(_ offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }
    func getLE32(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[offset + $1]) << UInt32(8 * $1) } }
    func getLE64(_ offset: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[offset + $1]) << UInt64(8 * $1) } }
}

// MARK: Temporary files

/// A file under the temporary directory with a unique name, removed when the value goes away.
final class TemporaryFile {
    let path: String

    init(_ bytes: [UInt8] = [], suffix: String = ".img") throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("guestmemory-test-\(UUID().uuidString)\(suffix)").path
        try write(bytes)
    }

    /// Replaces the file's contents. Overwrites and then cuts to length: truncating to zero first
    /// (O_TRUNC, or Foundation's Data.write) makes ext4 flush, costing milliseconds per write.
    func write(_ bytes: [UInt8]) throws {
        let descriptor = open(path, O_WRONLY | O_CREAT, 0o600)
        guard descriptor >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { close(descriptor) }
        var done = 0
        while done < bytes.count {
            let written = bytes.withUnsafeBytes { buffer in
                pwrite(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(done))
            }
            guard written > 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
            done += written
        }
        guard ftruncate(descriptor, off_t(bytes.count)) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A unique temporary directory, removed (with its contents) when the value goes away.
final class TemporaryDirectory {
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("guestmemory-test-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Loads `bytes` through a temporary file; returns the image or the loader's error.
func loadBytes(_ bytes: [UInt8], format: ImageFormat? = nil, base: GuestPhysicalAddress = GuestPhysicalAddress(0),
               sizeLimit: UInt64 = 64 << 20) throws -> (path: String, result: Result<LoadedImage, ImageLoadError>) {
    let file = try TemporaryFile(bytes)
    return (file.path, loadFile(file.path, format: format, base: base, sizeLimit: sizeLimit))
}

func loadFile(_ path: String, format: ImageFormat? = nil, base: GuestPhysicalAddress = GuestPhysicalAddress(0),
              sizeLimit: UInt64 = 64 << 20) -> Result<LoadedImage, ImageLoadError> {
    do throws(ImageLoadError) {
        return .success(try ImageLoader.load(path: path, format: format, base: base, sizeLimit: sizeLimit))
    } catch {
        return .failure(error)
    }
}

/// Expects loading `bytes` to fail with an `ImageLoadError` whose description names the file and
/// contains `phrase`. Returns the error for further checks.
@discardableResult
func expectLoadFailure(_ bytes: [UInt8], _ phrase: String, format: ImageFormat? = .elf, sizeLimit: UInt64 = 64 << 20,
                       sourceLocation: SourceLocation = #_sourceLocation) throws -> ImageLoadError? {
    let (path, result) = try loadBytes(bytes, format: format, sizeLimit: sizeLimit)
    switch result {
    case .success:
        Issue.record("expected the load to fail with \"\(phrase)\", but it succeeded", sourceLocation: sourceLocation)
        return nil
    case .failure(let error):
        #expect(error.path == path, sourceLocation: sourceLocation)
        #expect(error.description.hasPrefix(path), "\(error.description)", sourceLocation: sourceLocation)
        #expect(error.description.contains(phrase), "\(error.description)", sourceLocation: sourceLocation)
        #expect(!error.isUnreadableFile, sourceLocation: sourceLocation)
        return error
    }
}

// MARK: Building ELF cores by hand

/// The bytes of a QEMU "QEMU" note (type 0) for `state`, with a descriptor of `descriptorSize`
/// bytes whose recorded size field is `recordedSize`.
func qemuNote(_ state: GuestCPUState, descriptorSize: Int = 440, recordedSize: UInt32? = nil,
              name: String = "QEMU", type: UInt32 = 0) -> [UInt8] {
    var description = [UInt8](repeating: 0, count: descriptorSize)
    func put64(_ value: UInt64, _ offset: Int) { if offset + 8 <= descriptorSize { description.setLE64(value, at: offset) } }
    func put32(_ value: UInt32, _ offset: Int) { if offset + 4 <= descriptorSize { description.setLE32(value, at: offset) } }
    put32(1, 0)
    put32(recordedSize ?? UInt32(descriptorSize), 4)
    put64(state.rflags, 144)
    put32(state.codeSegmentFlags, 152 + 8)
    put64(state.gdtBase, 152 + 8 * 24 + 16)
    put64(state.idtBase, 152 + 9 * 24 + 16)
    put64(state.cr0, 392)
    put64(state.cr3, 416)
    put64(state.cr4, 424)
    put64(state.kernelGSBase ?? 0, 432)
    return elfNote(name: name, type: type, description: description)
}

/// One ELF note: namesz, descsz, type, the NUL-terminated name and the descriptor, each padded to 4.
func elfNote(name: String, type: UInt32, description: [UInt8]) -> [UInt8] {
    var nameBytes = Array(name.utf8) + [0]
    var note = [UInt8](repeating: 0, count: 12)
    note.setLE32(UInt32(nameBytes.count), at: 0)
    note.setLE32(UInt32(description.count), at: 4)
    note.setLE32(type, at: 8)
    while nameBytes.count % 4 != 0 { nameBytes.append(0) }
    var padded = description
    while padded.count % 4 != 0 { padded.append(0) }
    return note + nameBytes + padded
}

/// A program header of a hand-built core.
struct ProgramHeader {
    var type: UInt32
    var offset: UInt64
    var physicalAddress: UInt64
    var fileSize: UInt64
    var memorySize: UInt64

    static let load: UInt32 = 1
    static let note: UInt32 = 4
}

/// A segment to lay out: its file bytes follow the headers in order.
struct SegmentSpec {
    var type: UInt32
    var physicalAddress: UInt64 = 0
    var data: [UInt8]
    /// nil: the data's length.
    var memorySize: UInt64? = nil

    static func load(_ address: UInt64, _ data: [UInt8], memorySize: UInt64? = nil) -> SegmentSpec {
        SegmentSpec(type: ProgramHeader.load, physicalAddress: address, data: data, memorySize: memorySize)
    }

    static func note(_ data: [UInt8]) -> SegmentSpec { SegmentSpec(type: ProgramHeader.note, data: data) }
}

/// Builds ELF32 or ELF64 cores with full control over the header fields, for the cases
/// `ELFCoreWriter` never produces (ELF32, extended numbering, hostile values).
struct CoreBuilder {
    var is64 = true
    var machine: UInt16 = 62
    var type: UInt16 = 4
    var segments: [SegmentSpec] = []
    /// Put the program-header count in section header 0's sh_info and e_phnum = 0xFFFF.
    var extendedNumbering = false

    var headerSize: Int { is64 ? 64 : 52 }
    var entrySize: Int { is64 ? 56 : 32 }

    /// The program headers as laid out by `bytes()`.
    var programHeaders: [ProgramHeader] {
        var offset = UInt64(headerSize + entrySize * segments.count)
        return segments.map { spec in
            defer { offset += UInt64(spec.data.count) }
            return ProgramHeader(type: spec.type, offset: offset, physicalAddress: spec.physicalAddress,
                                 fileSize: UInt64(spec.data.count), memorySize: spec.memorySize ?? UInt64(spec.data.count))
        }
    }

    func bytes() -> [UInt8] {
        var output = [UInt8](repeating: 0, count: headerSize)
        output.replaceSubrange(0..<4, with: [0x7F, 0x45, 0x4C, 0x46])
        output[4] = is64 ? 2 : 1
        output[5] = 1
        output[6] = 1
        output.setLE16(type, at: 16)
        output.setLE16(machine, at: 18)
        output.setLE32(1, at: 20)
        let phnum = extendedNumbering ? 0xFFFF : UInt16(segments.count)
        if is64 {
            output.setLE64(64, at: 32)  // e_phoff
            output.setLE16(64, at: 52)  // e_ehsize
            output.setLE16(56, at: 54)  // e_phentsize
            output.setLE16(phnum, at: 56)
        } else {
            output.setLE32(52, at: 28)
            output.setLE16(52, at: 40)
            output.setLE16(32, at: 42)
            output.setLE16(phnum, at: 44)
        }
        for header in programHeaders {
            var entry = [UInt8](repeating: 0, count: entrySize)
            entry.setLE32(header.type, at: 0)
            if is64 {
                entry.setLE64(header.offset, at: 8)
                entry.setLE64(header.physicalAddress, at: 16)  // p_vaddr: anything
                entry.setLE64(header.physicalAddress, at: 24)
                entry.setLE64(header.fileSize, at: 32)
                entry.setLE64(header.memorySize, at: 40)
            } else {
                entry.setLE32(UInt32(header.offset), at: 4)
                entry.setLE32(UInt32(truncatingIfNeeded: header.physicalAddress), at: 8)
                entry.setLE32(UInt32(truncatingIfNeeded: header.physicalAddress), at: 12)
                entry.setLE32(UInt32(truncatingIfNeeded: header.fileSize), at: 16)
                entry.setLE32(UInt32(truncatingIfNeeded: header.memorySize), at: 20)
            }
            output += entry
        }
        for spec in segments { output += spec.data }
        if extendedNumbering {
            // Section header 0 at the end; only sh_info matters.
            let sectionOffset = output.count
            var section = [UInt8](repeating: 0, count: is64 ? 64 : 40)
            section.setLE32(UInt32(segments.count), at: is64 ? 44 : 28)
            output += section
            if is64 {
                output.setLE64(UInt64(sectionOffset), at: 40)  // e_shoff
                output.setLE16(64, at: 58)  // e_shentsize
                output.setLE16(0, at: 60)  // e_shnum (real count in sh_size, also 0 here)
            } else {
                output.setLE32(UInt32(sectionOffset), at: 32)
                output.setLE16(40, at: 46)
                output.setLE16(0, at: 48)
            }
        }
        return output
    }
}

// MARK: Offsets in an ELF64 core as ELFCoreWriter lays it out

enum ELF64 {
    static let phoff = 32, shoff = 40, phentsize = 54, phnum = 56
    /// Program header `index`'s field offsets (ELFCoreWriter: index 0 is the note segment).
    static func header(_ index: Int) -> Int { 64 + 56 * index }
    static func type(_ index: Int) -> Int { header(index) }
    static func offset(_ index: Int) -> Int { header(index) + 8 }
    static func paddr(_ index: Int) -> Int { header(index) + 24 }
    static func filesz(_ index: Int) -> Int { header(index) + 32 }
    static func memsz(_ index: Int) -> Int { header(index) + 40 }
}

/// Sample CPU states with every field distinct.
let longModeState = GuestCPUState(
    cr0: 0x8005_0033, cr3: 0x1_2345_6000, cr4: 0x0035_06F0, rflags: 0x246, codeSegmentFlags: 0x00A0_9B00,
    gdtBase: 0xFFFF_FE00_0000_1000, idtBase: 0xFFFF_FE00_0000_0000, kernelGSBase: 0xFFFF_8880_7FC0_0000)
let paeState = GuestCPUState(
    cr0: 0x8000_0011, cr3: 0x0ABC_D000, cr4: 0x20, rflags: 0x202, codeSegmentFlags: 0x00CF_9B00,
    gdtBase: 0xC1A0_0000, idtBase: 0xC1A0_1000, kernelGSBase: 0)

/// Guest memory with `pages` distinct, patterned pages: the first ones contiguous from 0x1000 and
/// the last one apart at 0x10_0000, so cores get more than one PT_LOAD.
func patternedMemory(pages: Int = 3, seed: UInt64 = 1) throws -> GuestPhysicalMemory {
    let memory = GuestPhysicalMemory()
    var random = SplitMix64(seed: seed)
    for page in 0..<pages {
        let address = page == pages - 1 && pages > 1 ? GuestPhysicalAddress(0x10_0000) : GuestPhysicalAddress(0x1000 + UInt64(page) * pageSize)
        try memory.back(address, size: pageSize)
        try memory.write(address, bytes: random.bytes(Int(pageSize)))
    }
    return memory
}

/// A small valid ELF64 core: `pages` pages of memory and the given vCPUs.
func smallCore(pages: Int = 3, cpuStates: [GuestCPUState] = [longModeState]) throws -> [UInt8] {
    ELFCoreWriter.make(memory: try patternedMemory(pages: pages), cpuStates: cpuStates)
}

typealias BackedRange = (start: GuestPhysicalAddress, size: UInt64)

func rangesEqual(_ a: [BackedRange], _ b: [BackedRange]) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { $0.start == $1.start && $0.size == $1.size }
}

/// Compares against plain (start, size) pairs.
func rangesAre(_ a: [BackedRange], _ b: (UInt64, UInt64)...) -> Bool { rangesEqual(a, b) }

func rangesEqual(_ a: [BackedRange], _ b: [(UInt64, UInt64)]) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { $0.start.rawValue == $1.0 && $0.size == $1.1 }
}

func describe(_ ranges: [(start: GuestPhysicalAddress, size: UInt64)]) -> String {
    ranges.map { "\($0.start)+\(hex($0.size))" }.joined(separator: ", ")
}
