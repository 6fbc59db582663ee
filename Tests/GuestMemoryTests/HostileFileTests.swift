#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Testing
import X86Paging

/// Loader input from an adversary: every case must end in an `ImageLoadError` that names the file
/// and the fault, never a crash, a hang or a huge allocation.
@Suite("Hostile files")
struct HostileFileTests {
    /// The core most cases start from: a note segment (index 0) with one vCPU, a two-page run at
    /// 0x1000 (index 1) and a page at 0x100000 (index 2).
    let core: [UInt8]

    init() throws {
        core = try smallCore(pages: 3)
    }

    @Test func theBaseCoreLoads() throws {
        let image = try loadBytes(core).result.get()
        #expect(rangesAre(image.memory.backedRanges, (UInt64(0x1000), 0x2000), (0x10_0000, 0x1000)))
        #expect(image.cpuStates.count == 1)
        #expect(core.getLE64(ELF64.paddr(1)) == 0x1000)
        #expect(core.getLE64(ELF64.filesz(1)) == 0x2000)
        #expect(core.getLE64(ELF64.paddr(2)) == 0x10_0000)
    }

    // MARK: Identification and header

    @Test func wrongMagicWithELFForced() throws {
        var bytes = core
        bytes[0] = 0x7E
        try expectLoadFailure(bytes, "not an ELF file (wrong magic)")
        try expectLoadFailure(Array("MZ\u{90}\u{00} a PE file".utf8), "wrong magic")
        // Shorter than the magic.
        for count in 1...3 { try expectLoadFailure(Array(core.prefix(count)), "wrong magic") }
        // The magic alone, or a partial identification.
        for count in [4, 5, 15] { try expectLoadFailure(Array(core.prefix(count)), "truncated ELF identification") }
    }

    @Test func wrongClass() throws {
        for value: UInt8 in [0, 3, 0xFF] {
            var bytes = core
            bytes[4] = value
            try expectLoadFailure(bytes, "unknown ELF class \(value)", format: nil)
        }
        // ELF32 class on an ELF64 layout: the ELF32 fields read garbage and fail.
        var bytes = core
        bytes[4] = 1
        try expectLoadFailure(bytes, "program header entries are", format: nil)
    }

    @Test func wrongEndianness() throws {
        for value: UInt8 in [0, 2, 0x80] {
            var bytes = core
            bytes[5] = value
            try expectLoadFailure(bytes, "not a little-endian ELF file (EI_DATA=\(value))", format: nil)
        }
    }

    @Test func wrongFileType() throws {
        for type: UInt16 in [0, 1, 2, 3, 0x400, 0xFFFF] {
            var bytes = core
            bytes.setLE16(type, at: 16)
            try expectLoadFailure(bytes, "not a core file (e_type \(type), expected 4)", format: nil)
        }
    }

    @Test func wrongMachine() throws {
        for machine: UInt16 in [0, 40, 183, 243, 0x3E00] {
            var bytes = core
            bytes.setLE16(machine, at: 18)
            try expectLoadFailure(bytes, "not an x86 core (e_machine \(machine))", format: nil)
        }
    }

    @Test func wrongProgramHeaderEntrySize() throws {
        for size: UInt16 in [0, 32, 55, 57, 64, 0xFFFF] {
            var bytes = core
            bytes.setLE16(size, at: ELF64.phentsize)
            try expectLoadFailure(bytes, "program header entries are \(size) bytes, expected 56", format: nil)
        }
        var builder = CoreBuilder()
        builder.is64 = false
        builder.machine = 3
        builder.segments = [.load(0, [1])]
        var bytes = builder.bytes()
        bytes.setLE16(56, at: 42)
        try expectLoadFailure(bytes, "program header entries are 56 bytes, expected 32")
    }

    @Test func programHeaderCounts() throws {
        var bytes = core
        bytes.setLE16(0, at: ELF64.phnum)
        try expectLoadFailure(bytes, "no program headers")
        // More headers than the file could hold.
        for count: UInt16 in [1000, 0xFFFE] {
            bytes.setLE16(count, at: ELF64.phnum)
            try expectLoadFailure(bytes, "truncated")
        }
        // 0xFFFF means "see section header 0", which this file does not have (e_shoff 0 is the ELF
        // header itself, whose sh_info position holds zero).
        bytes.setLE16(0xFFFF, at: ELF64.phnum)
        try expectLoadFailure(bytes, "no program headers")
    }

    @Test func programHeaderTableOutsideTheFile() throws {
        for offset: UInt64 in [UInt64(core.count), UInt64(core.count) - 100, 1 << 40, UInt64.max, UInt64.max - 55] {
            var bytes = core
            bytes.setLE64(offset, at: ELF64.phoff)
            try expectLoadFailure(bytes, "truncated")
        }
    }

    // MARK: Truncation

    /// Every prefix of a valid core either loads or fails cleanly; with the whole file covered by
    /// headers and segments, every proper prefix fails.
    @Test func everyPrefixOfACore() throws {
        let full = try smallCore(pages: 2)  // note + two runs: 64 + 3 * 56 + 460 + 8192 bytes
        let file = try TemporaryFile(full)
        #expect(try loadFile(file.path, format: .elf).get().memory.backedPageCount == 2)
        var failures = 0
        // Shrink the one file from the full length down to nothing.
        for length in stride(from: full.count - 1, through: 0, by: -1) {
            #expect(truncate(file.path, off_t(length)) == 0)
            for format: ImageFormat? in length < 8 ? [.elf, nil] : [.elf] {
                switch loadFile(file.path, format: format) {
                case .success(let image):
                    // Auto-detection takes files too short for the magic as raw images.
                    #expect(format == nil && length > 0 && length < 4 && image.format == .raw, "prefix of \(length) bytes loaded")
                case .failure(let error):
                    failures += 1
                    #expect(error.path == file.path)
                    #expect(error.description.hasPrefix(file.path + ": "))
                    let expected = switch length {
                    case 0: "the file is empty"
                    case 1..<4: "wrong magic"
                    default: "truncated"
                    }
                    if !error.description.contains(expected) {
                        Issue.record("prefix of \(length) bytes: \(error.description)")
                    }
                }
            }
        }
        #expect(failures >= full.count)
    }

    @Test func everyPrefixOfAnELF32Core() throws {
        var builder = CoreBuilder()
        builder.is64 = false
        builder.machine = 3
        builder.extendedNumbering = true
        builder.segments = [.note(qemuNote(paeState)), .load(0x2000, [UInt8](repeating: 3, count: 100), memorySize: 0x1000)]
        let full = builder.bytes()
        let file = try TemporaryFile(full)
        #expect(try loadFile(file.path).get().cpuStates.count == 1)
        for length in stride(from: full.count - 1, through: 0, by: -1) {
            #expect(truncate(file.path, off_t(length)) == 0)
            if case .success = loadFile(file.path, format: .elf) { Issue.record("prefix of \(length) bytes loaded") }
        }
    }

    // MARK: Segments

    @Test func segmentDataOutsideTheFile() throws {
        var bytes = core
        bytes.setLE64(core.getLE64(ELF64.filesz(2)) + 1, at: ELF64.filesz(2))
        bytes.setLE64(core.getLE64(ELF64.filesz(2)) + 1, at: ELF64.memsz(2))
        try expectLoadFailure(bytes, "truncated: segment 2 needs file bytes")
        for (offset, size) in [(UInt64.max, UInt64(1)), (UInt64.max - 0xFFF, 0x1000), (1 << 62, 0), (0, UInt64.max)] {
            bytes = core
            bytes.setLE64(offset, at: ELF64.offset(1))
            bytes.setLE64(size, at: ELF64.filesz(1))
            bytes.setLE64(max(size, 0x2000), at: ELF64.memsz(1))
            try expectLoadFailure(bytes, "truncated")
        }
        // The note segment too.
        bytes = core
        bytes.setLE64(UInt64(core.count), at: ELF64.offset(0))
        try expectLoadFailure(bytes, "truncated: segment 0")
    }

    @Test func overlappingSegments() throws {
        // The second run starts inside the first.
        var bytes = core
        bytes.setLE64(0x2000, at: ELF64.paddr(2))
        try expectLoadFailure(bytes, "segments 1 and 2 overlap at guest-physical 0x2000")
        // The same start.
        bytes.setLE64(0x1000, at: ELF64.paddr(2))
        try expectLoadFailure(bytes, "overlap")
        // Overlapping by one byte, in reverse file order.
        bytes.setLE64(0xFFF, at: ELF64.paddr(1))
        bytes.setLE64(0x0, at: ELF64.paddr(2))
        bytes.setLE64(0x1000, at: ELF64.memsz(2))
        try expectLoadFailure(bytes, "segments 2 and 1 overlap")
        // Only the zero-fill parts overlap.
        var builder = CoreBuilder()
        builder.segments = [.load(0, [1], memorySize: 0x3000), .load(0x2FFF, [2])]
        try expectLoadFailure(builder.bytes(), "overlap")
        // A big segment containing two small ones that are apart from each other.
        builder.segments = [.load(0x1000, [1]), .load(0x5000, [2]), .load(0, [], memorySize: 0x10000)]
        try expectLoadFailure(builder.bytes(), "overlap")
    }

    @Test func fileSizeExceedingMemorySize() throws {
        var bytes = core
        bytes.setLE64(0x1FFF, at: ELF64.memsz(1))
        try expectLoadFailure(bytes, "segment 1: p_filesz 0x2000 exceeds p_memsz 0x1fff")
        bytes.setLE64(0, at: ELF64.memsz(1))
        try expectLoadFailure(bytes, "exceeds p_memsz 0x0")
    }

    @Test func absurdMemorySizes() throws {
        for size: UInt64 in [1 << 50, 1 << 40, (64 << 20) + 1] {
            var bytes = core
            bytes.setLE64(size, at: ELF64.memsz(2))
            bytes.setLE64(0x4000_0000_0000, at: ELF64.paddr(2))
            try expectLoadFailure(bytes, "absurd size: the segments claim more than the guest memory limit of \(64 << 20) bytes")
        }
        // With the default 64 GiB limit too, before anything is backed.
        var bytes = core
        bytes.setLE64(1 << 50, at: ELF64.memsz(2))
        try expectLoadFailure(bytes, "absurd size: the segments claim more than the guest memory limit of \(64 << 30) bytes",
                              sizeLimit: 64 << 30)
    }

    @Test func segmentSizesSummingOverTheLimit() throws {
        var builder = CoreBuilder()
        builder.segments = [.load(0, [], memorySize: 40 << 20), .load(1 << 30, [], memorySize: 40 << 20)]
        try expectLoadFailure(builder.bytes(), "absurd size")
        // Under the limit, both load.
        builder.segments = [.load(0, [], memorySize: 4 << 20), .load(1 << 30, [], memorySize: 4 << 20)]
        #expect(try loadBytes(builder.bytes(), sizeLimit: 8 << 20).result.get().memory.backedPageCount == 2048)
    }

    @Test func manyTinySegmentsStillRespectTheLimit() throws {
        // 100 one-byte segments claim 100 bytes but need 100 pages.
        var builder = CoreBuilder()
        builder.segments = (0..<100).map { .load(UInt64($0) * 0x1000, [UInt8($0)]) }
        let error = try expectLoadFailure(builder.bytes(), "limit", sizeLimit: 64 << 10)
        #expect(error?.reason == .memory(.sizeLimitExceeded(requested: 4096, limit: 64 << 10)))
        let image = try loadBytes(builder.bytes(), sizeLimit: 100 << 12).result.get()
        #expect(image.memory.backedPageCount == 100)
        #expect(try image.memory.read(GuestPhysicalAddress(99 * 0x1000), count: 1) == [99])
    }

    @Test func physicalAddressesBeyondFiftyTwoBits() throws {
        for (address, size) in [
            (UInt64(1) << 52, UInt64(0x1000)), ((1 << 52) - 0x1000, 0x1001), (UInt64.max - 0xFFF, 0x2000),
            (UInt64.max, 0x1000), (1 << 63, 0x1000),
        ] {
            var bytes = core
            bytes.setLE64(address, at: ELF64.paddr(2))
            bytes.setLE64(size, at: ELF64.memsz(2))
            try expectLoadFailure(bytes, "lies beyond the 52-bit physical address space", sizeLimit: 64 << 30)
        }
        // The very last page is fine.
        var bytes = core
        bytes.setLE64((1 << 52) - 0x1000, at: ELF64.paddr(2))
        let image = try loadBytes(bytes).result.get()
        #expect(image.memory.isBacked(GuestFrameNumber((1 << 40) - 1)))
    }

    // MARK: Notes

    @Test func notesRunningPastTheirSegment() throws {
        let noteOffset = Int(core.getLE64(ELF64.offset(0)))
        // namesz, descsz: huge, or just one too many.
        for (field, value) in [(0, UInt32.max), (4, UInt32.max), (0, 0x8000_0000), (4, 441), (0, 0x1000), (4, 0x10_0000)] {
            var bytes = core
            bytes.setLE32(value, at: noteOffset + field)
            try expectLoadFailure(bytes, "runs past its segment 0")
        }
        // The segment cut mid-note (the rest of the file is still there).
        var bytes = core
        bytes.setLE64(core.getLE64(ELF64.filesz(0)) - 4, at: ELF64.filesz(0))
        try expectLoadFailure(bytes, "runs past its segment")
        // A note header alone with sizes that point outside.
        var builder = CoreBuilder()
        var header = [UInt8](repeating: 0, count: 12)
        header.setLE32(5, at: 0)
        builder.segments = [.note(header), .load(0, [1])]
        try expectLoadFailure(builder.bytes(), "runs past its segment")
    }

    @Test func trailingBytesInANoteSegmentAreIgnored() throws {
        var builder = CoreBuilder()
        builder.segments = [.note(qemuNote(paeState) + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), .load(0, [1])]
        #expect(try loadBytes(builder.bytes()).result.get().cpuStates.count == 1)
    }

    @Test func shortQEMUNote() throws {
        for size in [0, 8, 100, 431] {
            var builder = CoreBuilder()
            builder.segments = [.note(qemuNote(paeState, descriptorSize: size)), .load(0, [1])]
            try expectLoadFailure(builder.bytes(), "is \(size) bytes, expected at least 432")
        }
        // The descriptor size field shrunk in a writer core.
        var bytes = core
        let noteOffset = Int(core.getLE64(ELF64.offset(0)))
        bytes.setLE32(400, at: noteOffset + 4)
        try expectLoadFailure(bytes, "QEMU CPU-state note at offset")
    }

    @Test func oversizedNoteSegment() throws {
        var builder = CoreBuilder()
        builder.segments = [.note([UInt8](repeating: 0, count: (16 << 20) + 4)), .load(0, [1])]
        try expectLoadFailure(builder.bytes(), "note segments total more than \(16 << 20) bytes")
    }

    /// Note segments may point at the same file bytes; the CPU states they yield should still be
    /// bounded by the notes the file actually holds (else a small file yields 65535 x 16 MiB of
    /// notes to read and parse, and billions of states).
    @Test func aliasedNoteSegmentsDoNotMultiplyCPUStates() throws {
        var builder = CoreBuilder()
        let aliases = 200
        builder.segments = [.note(qemuNote(paeState)), .load(0, [1])] + Array(repeating: .note([]), count: aliases)
        var bytes = builder.bytes()
        let blob = builder.programHeaders[0]
        for index in 2..<(2 + aliases) {
            bytes.setLE64(blob.offset, at: ELF64.offset(index))
            bytes.setLE64(blob.fileSize, at: ELF64.filesz(index))
        }
        try expectLoadFailure(bytes, "overlap in the file")
    }

    // MARK: Fuzzing

    /// The cores to mutate: the writer's ELF64 core with two vCPUs, and hand-built ELF32 and
    /// extended-numbering cores.
    static func fuzzSeeds() throws -> [[UInt8]] {
        var elf32 = CoreBuilder()
        elf32.is64 = false
        elf32.machine = 3
        elf32.segments = [.note(qemuNote(paeState)), .load(0x1000, [UInt8](repeating: 7, count: 0x1000)),
                          .load(0x8000, [1, 2, 3], memorySize: 0x2000)]
        var extended = CoreBuilder()
        extended.extendedNumbering = true
        extended.segments = [.note(qemuNote(longModeState) + qemuNote(paeState)), .load(0x3000, [UInt8](repeating: 9, count: 0x1800))]
        return [try smallCore(pages: 3, cpuStates: [longModeState, paeState]), elf32.bytes(), extended.bytes()]
    }

    @Test(.timeLimit(.minutes(2)), arguments: [UInt64(0xF00D), 0xC0FFEE])
    func fuzzedCoresLoadOrFailCleanly(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let seeds = try Self.fuzzSeeds()
        let sizeLimit: UInt64 = 4 << 20
        let file = try TemporaryFile()
        let iterations = isDebugBuild ? 1000 : 4000  // per seed: 2000 in all in debug
        let interesting8: [UInt8] = [0, 1, 0x7F, 0x80, 0xFE, 0xFF, 0x10, 0x40]
        let interesting64: [UInt64] = [0, 1, 0xFFF, 0x1000, 1 << 31, 1 << 32, 1 << 40, 1 << 50, 1 << 52, (1 << 52) - 0x1000,
                                       1 << 63, UInt64.max, UInt64.max - 0xFFF, 4 << 20, (4 << 20) + 1, 16 << 20, 0xFFFF]
        var loaded = 0, failed = 0
        for iteration in 0..<iterations {
            let original = seeds[Int(random.next() % UInt64(seeds.count))]
            var bytes = original
            let is64 = bytes[4] == 2
            let headerEnd = is64 ? 64 : 52
            let phoff = Int(is64 ? bytes.getLE64(32) : UInt64(bytes.getLE32(28)))
            let entrySize = is64 ? 56 : 32
            let phnum = Int(bytes.getLE16(is64 ? 56 : 44))
            let tableEnd = phoff + entrySize * (phnum == 0xFFFF ? 2 : phnum)
            let noteStart = Int(is64 ? bytes.getLE64(phoff + 8) : UInt64(bytes.getLE32(phoff + 4)))
            let noteEnd = noteStart + Int(is64 ? bytes.getLE64(phoff + 32) : UInt64(bytes.getLE32(phoff + 16)))
            let mutations = 1 + Int(random.next() % 4)
            for _ in 0..<mutations {
                let region: Range<Int> = switch random.next() % 10 {
                case 0...2: 0..<headerEnd
                case 3...5: phoff..<tableEnd
                case 6...8: noteStart..<noteEnd
                default: 0..<bytes.count
                }
                let position = region.lowerBound + Int(random.next() % UInt64(region.count))
                switch random.next() % 6 {
                case 0, 1: bytes[position] = UInt8(truncatingIfNeeded: random.next())
                case 2: bytes[position] = interesting8[Int(random.next() % UInt64(interesting8.count))]
                case 3: bytes[position] ^= 1 << UInt8(random.next() % 8)
                case 4:
                    // A whole little-endian field, aligned as ELF fields are.
                    let width = is64 ? 8 : 4
                    let aligned = min(position & ~(width - 1), bytes.count - width)
                    let value = interesting64[Int(random.next() % UInt64(interesting64.count))]
                    for byte in 0..<width { bytes[aligned + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * byte)) }
                default:
                    let aligned = min(position & ~3, bytes.count - 4)
                    bytes.setLE32(UInt32(truncatingIfNeeded: interesting64[Int(random.next() % UInt64(interesting64.count))]),
                                  at: aligned)
                }
            }
            // Now and then, cut or extend the file as well.
            switch random.next() % 20 {
            case 0: bytes.removeLast(Int(random.next() % UInt64(bytes.count)))
            case 1: bytes += random.bytes(Int(random.next() % 600))
            default: break
            }
            try file.write(bytes)
            let format: ImageFormat? = random.next() % 4 == 0 ? nil : .elf
            switch loadFile(file.path, format: format, sizeLimit: sizeLimit) {
            case .success(let image):
                loaded += 1
                #expect(image.memory.backedPageCount * pageSize <= sizeLimit)
                if bytes == original {
                    #expect(image.format == .elf)
                }
            case .failure(let error):
                failed += 1
                if !error.description.hasPrefix(file.path + ": ") || error.description.count <= file.path.count + 6 {
                    Issue.record("iteration \(iteration): poor error \(error.description)")
                }
            }
        }
        // Both outcomes happen: the fuzzer reaches past the first checks.
        #expect(loaded > 0)
        #expect(failed > 0)
    }
}
