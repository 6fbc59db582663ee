import X86Paging

/// Reads a QEMU `dump-guest-memory` ELF core: checks every header against the file before
/// touching guest memory, then loads the PT_LOAD segments at their physical addresses and decodes
/// the "QEMU" CPU-state notes.
struct ELFCoreReader {
    static let elfMagic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46]
    static let coreType: UInt16 = 4
    static let machines: [UInt16: String] = [3: "i386", 62: "x86-64"]
    static let loadSegment: UInt32 = 1
    static let noteSegment: UInt32 = 4
    /// e_phnum's escape value: the real count lives in section header 0's sh_info.
    static let extendedNumbering = 0xFFFF
    /// No real core has more segments; a larger count is a hostile header, not a guest.
    static let maxSegments = 1 << 16
    /// Bounds on the notes over all note segments together, so headers that point many note
    /// segments at the same bytes cannot multiply the work.
    static let maxNoteBytes: UInt64 = 16 << 20
    /// KVM's KVM_MAX_VCPUS on x86.
    static let maxCPUStates = 4096

    /// The layout of QEMUCPUState (QEMU target/i386/arch_dump.c): version, size, 16 GPRs, RIP,
    /// RFLAGS, ten 24-byte segments (CS first, GDT eighth, IDT ninth), CR0-CR4, KERNEL_GS_BASE.
    enum CPUStateLayout {
        static let rflags = 144
        static let codeSegmentFlags = 152 + 8
        static let gdtBase = 152 + 8 * 24 + 16
        static let idtBase = 152 + 9 * 24 + 16
        static let cr0 = 392
        static let cr3 = 416
        static let cr4 = 424
        static let kernelGSBase = 432
        static let minimumSize = 432
        static let fullSize = 440
    }

    struct Segment {
        var index: Int
        var type: UInt32
        var offset: UInt64
        var physicalAddress: UInt64
        var fileSize: UInt64
        var memorySize: UInt64
    }

    let file: ImageFile
    var path: String { file.path }

    func malformed(_ what: String) -> ImageLoadError { ImageLoadError(path: path, reason: .malformed(what)) }

    func load(into memory: GuestPhysicalMemory) throws(ImageLoadError) -> [GuestCPUState] {
        let identity = try file.bytes(at: 0, count: min(16, Int(file.size)))
        guard identity.count >= 4, Array(identity[0..<4]) == Self.elfMagic else {
            throw malformed("not an ELF file (wrong magic)")
        }
        guard identity.count == 16 else { throw malformed("truncated ELF identification (\(file.size) bytes)") }
        let is64: Bool
        switch identity[4] {
        case 1: is64 = false
        case 2: is64 = true
        default: throw malformed("unknown ELF class \(identity[4])")
        }
        guard identity[5] == 1 else { throw malformed("not a little-endian ELF file (EI_DATA=\(identity[5]))") }
        let header = try file.bytes(at: 0, count: is64 ? 64 : 52)
        let type = header.le16(16), machine = header.le16(18)
        guard type == Self.coreType else { throw malformed("not a core file (e_type \(type), expected 4)") }
        guard Self.machines[machine] != nil else { throw malformed("not an x86 core (e_machine \(machine))") }
        let programHeaderOffset = is64 ? header.le64(32) : UInt64(header.le32(28))
        let sectionHeaderOffset = is64 ? header.le64(40) : UInt64(header.le32(32))
        let entrySize = Int(is64 ? header.le16(54) : header.le16(42))
        var count = Int(is64 ? header.le16(56) : header.le16(44))
        let expectedEntrySize = is64 ? 56 : 32
        guard entrySize == expectedEntrySize else {
            throw malformed("program header entries are \(entrySize) bytes, expected \(expectedEntrySize)")
        }
        if count == Self.extendedNumbering {
            // sh_info of section header 0 (offset 44 in ELF64, 28 in ELF32).
            let section = try file.bytes(at: sectionHeaderOffset, count: is64 ? 64 : 40)
            count = Int(section.le32(is64 ? 44 : 28))
        }
        guard count > 0 else { throw malformed("no program headers") }
        guard count <= Self.maxSegments else { throw malformed("absurd program header count \(count)") }
        let table = try file.bytes(at: programHeaderOffset, count: count * entrySize)

        var loads: [Segment] = []
        var notes: [Segment] = []
        for index in 0..<count {
            let at = index * entrySize
            let segment: Segment
            if is64 {
                segment = Segment(index: index, type: table.le32(at), offset: table.le64(at + 8),
                                  physicalAddress: table.le64(at + 24), fileSize: table.le64(at + 32),
                                  memorySize: table.le64(at + 40))
            } else {
                segment = Segment(index: index, type: table.le32(at), offset: UInt64(table.le32(at + 4)),
                                  physicalAddress: UInt64(table.le32(at + 12)), fileSize: UInt64(table.le32(at + 16)),
                                  memorySize: UInt64(table.le32(at + 20)))
            }
            switch segment.type {
            case Self.loadSegment: loads.append(segment)
            case Self.noteSegment: notes.append(segment)
            default: continue
            }
            let (end, overflow) = segment.offset.addingReportingOverflow(segment.fileSize)
            guard !overflow, end <= file.size else {
                throw malformed("truncated: segment \(index) needs file bytes \(hex(segment.offset))+\(hex(segment.fileSize)) "
                                + "but the file has \(file.size) bytes")
            }
        }
        try check(loads, limit: memory.sizeLimit)
        let states = try cpuStates(notes)
        for segment in loads where segment.memorySize > 0 {
            try ImageLoader.loadSegment(file, offset: segment.offset, size: segment.memorySize, fileSize: segment.fileSize,
                                        at: GuestPhysicalAddress(segment.physicalAddress), into: memory)
        }
        return states
    }

    /// Sizes, address-space bounds and overlaps, all before any memory is backed.
    func check(_ loads: [Segment], limit: UInt64) throws(ImageLoadError) {
        var total: UInt64 = 0
        for segment in loads {
            guard segment.fileSize <= segment.memorySize else {
                throw malformed("segment \(segment.index): p_filesz \(hex(segment.fileSize)) exceeds p_memsz \(hex(segment.memorySize))")
            }
            let (end, overflow) = segment.physicalAddress.addingReportingOverflow(segment.memorySize)
            guard !overflow, end <= 1 << UInt64(GuestPhysicalMemory.maxPhysicalAddressBits) else {
                throw malformed("segment \(segment.index): guest-physical range \(hex(segment.physicalAddress))+\(hex(segment.memorySize)) "
                                + "lies beyond the 52-bit physical address space")
            }
            let (sum, sumOverflow) = total.addingReportingOverflow(segment.memorySize)
            guard !sumOverflow, sum <= limit else {
                throw malformed("absurd size: the segments claim more than the guest memory limit of \(limit) bytes")
            }
            total = sum
        }
        let sorted = loads.filter { $0.memorySize > 0 }.sorted { $0.physicalAddress < $1.physicalAddress }
        for (previous, next) in zip(sorted, sorted.dropFirst())
        where previous.physicalAddress + previous.memorySize > next.physicalAddress {
            throw malformed("segments \(previous.index) and \(next.index) overlap at guest-physical \(hex(next.physicalAddress))")
        }
    }

    /// Every "QEMU" note of type 0, in file order (QEMU writes one per vCPU, in vCPU order).
    func cpuStates(_ notes: [Segment]) throws(ImageLoadError) -> [GuestCPUState] {
        let sortedNotes = notes.filter { $0.fileSize > 0 }.sorted { $0.offset < $1.offset }
        for (previous, next) in zip(sortedNotes, sortedNotes.dropFirst()) where previous.offset + previous.fileSize > next.offset {
            throw malformed("note segments \(previous.index) and \(next.index) overlap in the file at offset \(hex(next.offset))")
        }
        var states: [GuestCPUState] = []
        var noteBytes: UInt64 = 0
        for segment in notes {
            noteBytes += segment.fileSize
            guard noteBytes <= Self.maxNoteBytes else {
                throw malformed("note segments total more than \(Self.maxNoteBytes) bytes (at segment \(segment.index))")
            }
            let bytes = try file.bytes(at: segment.offset, count: Int(segment.fileSize))
            var cursor = 0
            while cursor + 12 <= bytes.count {
                let nameSize = Int(bytes.le32(cursor)), descriptionSize = Int(bytes.le32(cursor + 4))
                let type = bytes.le32(cursor + 8)
                let nameStart = cursor + 12
                let descriptionStart = nameStart + ((nameSize + 3) & ~3)
                let next = descriptionStart + ((descriptionSize + 3) & ~3)
                guard nameSize <= bytes.count, descriptionSize <= bytes.count, next <= bytes.count else {
                    throw malformed("note at offset \(hex(segment.offset + UInt64(cursor))) runs past its segment \(segment.index)")
                }
                let name = bytes[nameStart..<nameStart + nameSize].prefix { $0 != 0 }
                if Array(name) == Array("QEMU".utf8) && type == 0 {
                    let description = Array(bytes[descriptionStart..<descriptionStart + descriptionSize])
                    guard states.count < Self.maxCPUStates else {
                        throw malformed("more than \(Self.maxCPUStates) QEMU CPU-state notes")
                    }
                    states.append(try cpuState(description, at: segment.offset + UInt64(descriptionStart)))
                }
                cursor = next
            }
        }
        return states
    }

    func cpuState(_ note: [UInt8], at offset: UInt64) throws(ImageLoadError) -> GuestCPUState {
        typealias Layout = CPUStateLayout
        guard note.count >= Layout.minimumSize else {
            throw malformed("QEMU CPU-state note at offset \(hex(offset)) is \(note.count) bytes, expected at least \(Layout.minimumSize)")
        }
        let recordedSize = Int(note.le32(4))
        let hasKernelGSBase = note.count >= Layout.fullSize && recordedSize >= Layout.fullSize
        return GuestCPUState(cr0: note.le64(Layout.cr0), cr3: note.le64(Layout.cr3), cr4: note.le64(Layout.cr4),
                             rflags: note.le64(Layout.rflags), codeSegmentFlags: note.le32(Layout.codeSegmentFlags),
                             gdtBase: note.le64(Layout.gdtBase), idtBase: note.le64(Layout.idtBase),
                             kernelGSBase: hasKernelGSBase ? note.le64(Layout.kernelGSBase) : nil)
    }
}

/// Writes a QEMU-style ELF64 core of guest memory and CPU states: the sample guest ships as one,
/// and tests build hostile variants from it.
public enum ELFCoreWriter {
    public static func make(memory: GuestPhysicalMemory, cpuStates: [GuestCPUState]) -> [UInt8] {
        let ranges = memory.backedRanges
        var notes: [UInt8] = []
        for state in cpuStates {
            var description = [UInt8](repeating: 0, count: ELFCoreReader.CPUStateLayout.fullSize)
            description.put32(1, at: 0)
            description.put32(UInt32(ELFCoreReader.CPUStateLayout.fullSize), at: 4)
            description.put64(state.rflags, at: ELFCoreReader.CPUStateLayout.rflags)
            description.put32(state.codeSegmentFlags, at: ELFCoreReader.CPUStateLayout.codeSegmentFlags)
            description.put64(state.gdtBase, at: ELFCoreReader.CPUStateLayout.gdtBase)
            description.put64(state.idtBase, at: ELFCoreReader.CPUStateLayout.idtBase)
            description.put64(state.cr0, at: ELFCoreReader.CPUStateLayout.cr0)
            description.put64(state.cr3, at: ELFCoreReader.CPUStateLayout.cr3)
            description.put64(state.cr4, at: ELFCoreReader.CPUStateLayout.cr4)
            description.put64(state.kernelGSBase ?? 0, at: ELFCoreReader.CPUStateLayout.kernelGSBase)
            var note = [UInt8](repeating: 0, count: 12)
            note.put32(5, at: 0)
            note.put32(UInt32(description.count), at: 4)
            note.put32(0, at: 8)
            note += Array("QEMU".utf8) + [0, 0, 0, 0]
            note += description
            notes += note
        }
        let headerCount = 1 + ranges.count
        let dataStart = 64 + 56 * headerCount
        var output = [UInt8](repeating: 0, count: 64)
        output.replaceSubrange(0..<4, with: ELFCoreReader.elfMagic)
        output[4] = 2; output[5] = 1; output[6] = 1
        output.put16(ELFCoreReader.coreType, at: 16)
        output.put16(62, at: 18)
        output.put32(1, at: 20)
        output.put64(64, at: 32)
        output.put16(64, at: 52)
        output.put16(56, at: 54)
        output.put16(UInt16(headerCount), at: 56)
        var offset = UInt64(dataStart)
        var programHeaders: [UInt8] = []
        func header(type: UInt32, offset: UInt64, address: UInt64, size: UInt64) {
            var entry = [UInt8](repeating: 0, count: 56)
            entry.put32(type, at: 0)
            entry.put64(offset, at: 8)
            entry.put64(address, at: 24)
            entry.put64(size, at: 32)
            entry.put64(size, at: 40)
            programHeaders += entry
        }
        header(type: ELFCoreReader.noteSegment, offset: offset, address: 0, size: UInt64(notes.count))
        offset += UInt64(notes.count)
        for range in ranges {
            header(type: ELFCoreReader.loadSegment, offset: offset, address: range.start.rawValue, size: range.size)
            offset += range.size
        }
        output += programHeaders
        output += notes
        for range in ranges {
            output += (try? memory.read(range.start, count: Int(range.size))) ?? []
        }
        return output
    }
}

extension [UInt8] {
    func le16(_ at: Int) -> UInt16 { UInt16(self[at]) | UInt16(self[at + 1]) << 8 }
    func le32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[at + $1]) << UInt32(8 * $1) } }
    func le64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[at + $1]) << UInt64(8 * $1) } }
    mutating func put16(_ value: UInt16, at: Int) { for byte in 0..<2 { self[at + byte] = UInt8(truncatingIfNeeded: value >> UInt16(8 * byte)) } }
    mutating func put32(_ value: UInt32, at: Int) { for byte in 0..<4 { self[at + byte] = UInt8(truncatingIfNeeded: value >> UInt32(8 * byte)) } }
    mutating func put64(_ value: UInt64, at: Int) { for byte in 0..<8 { self[at + byte] = UInt8(truncatingIfNeeded: value >> UInt64(8 * byte)) } }
}
