import GuestMemory
import Testing
import X86Paging

private func gpa(_ value: UInt64) -> GuestPhysicalAddress { GuestPhysicalAddress(value) }

/// The fields a QEMU note carries (efer is never recorded).
private func expectSameRecordedState(_ loaded: GuestCPUState, _ original: GuestCPUState,
                                     sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(loaded.cr0 == original.cr0, sourceLocation: sourceLocation)
    #expect(loaded.cr3 == original.cr3, sourceLocation: sourceLocation)
    #expect(loaded.cr4 == original.cr4, sourceLocation: sourceLocation)
    #expect(loaded.rflags == original.rflags, sourceLocation: sourceLocation)
    #expect(loaded.codeSegmentFlags == original.codeSegmentFlags, sourceLocation: sourceLocation)
    #expect(loaded.gdtBase == original.gdtBase, sourceLocation: sourceLocation)
    #expect(loaded.idtBase == original.idtBase, sourceLocation: sourceLocation)
    #expect(loaded.kernelGSBase == (original.kernelGSBase ?? 0), sourceLocation: sourceLocation)
    #expect(loaded.efer == nil, sourceLocation: sourceLocation)
}

/// Every byte of every backed range of `a` equals `b`'s, and the layouts agree.
private func expectSameMemory(_ a: GuestPhysicalMemory, _ b: GuestPhysicalMemory,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
    #expect(rangesEqual(a.backedRanges, b.backedRanges), "\(describe(a.backedRanges)) vs \(describe(b.backedRanges))",
            sourceLocation: sourceLocation)
    for range in a.backedRanges {
        #expect(try a.read(range.start, count: Int(range.size)) == b.read(range.start, count: Int(range.size)),
                "\(range.start)", sourceLocation: sourceLocation)
    }
}

@Suite("ELF cores")
struct ELFCoreTests {
    @Test func roundTripThroughAFile() throws {
        let memory = GuestPhysicalMemory()
        var random = SplitMix64(seed: 7)
        // Runs of different lengths, one across a radix-leaf boundary, one high up.
        for (address, size) in [(UInt64(0), UInt64(0x3000)), (0x10_0000, 0x1000), (0x1FFE000, 0x4000), (0xF_0000_0000, 0x2000)] {
            try memory.back(gpa(address), size: size)
            try memory.write(gpa(address), bytes: random.bytes(Int(size)))
        }
        let states = [
            longModeState,
            GuestCPUState(cr0: 0x8000_0031, cr3: 0x2000, cr4: 0x20, rflags: 0x46, codeSegmentFlags: 1 << 21,
                          gdtBase: 0x1234, idtBase: 0x5678, kernelGSBase: 0x9ABC),
            paeState,
        ]
        let core = ELFCoreWriter.make(memory: memory, cpuStates: states)
        let file = try TemporaryFile(core, suffix: ".core")
        let image = try ImageLoader.load(path: file.path)
        #expect(image.format == .elf)
        try expectSameMemory(image.memory, memory)
        #expect(image.memory.backedPageCount == memory.backedPageCount)
        #expect(image.cpuStates.count == 3)
        for (loaded, original) in zip(image.cpuStates, states) { expectSameRecordedState(loaded, original) }
        // Writing the loaded image again gives the same file.
        #expect(ELFCoreWriter.make(memory: image.memory, cpuStates: image.cpuStates) == core)
        // Loading with format forced gives the same.
        let forced = try ImageLoader.load(path: file.path, format: .elf)
        #expect(forced.cpuStates == image.cpuStates)
    }

    @Test func writerLayout() throws {
        let memory = try patternedMemory(pages: 3)
        let core = ELFCoreWriter.make(memory: memory, cpuStates: [longModeState, paeState])
        #expect(Array(core[0..<7]) == [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1])
        #expect(core.getLE16(16) == 4)
        #expect(core.getLE16(18) == 62)
        #expect(core.getLE64(ELF64.phoff) == 64)
        #expect(core.getLE16(ELF64.phentsize) == 56)
        #expect(core.getLE16(ELF64.phnum) == 3)  // one note, two runs
        #expect(core.getLE32(ELF64.type(0)) == 4)
        #expect(core.getLE64(ELF64.filesz(0)) == 2 * (12 + 8 + 440))
        #expect(core.getLE32(ELF64.type(1)) == 1)
        #expect(core.getLE64(ELF64.paddr(1)) == 0x1000)
        #expect(core.getLE64(ELF64.filesz(1)) == 0x2000)
        #expect(core.getLE64(ELF64.paddr(2)) == 0x10_0000)
        #expect(core.count == 64 + 3 * 56 + 2 * 460 + 3 * 4096)
    }

    @Test func coreWithoutCPUStatesOrMemory() throws {
        let empty = ELFCoreWriter.make(memory: GuestPhysicalMemory(), cpuStates: [])
        let image = try loadBytes(empty).result.get()
        #expect(image.format == .elf)
        #expect(image.cpuStates.isEmpty)
        #expect(image.memory.backedRanges.isEmpty)

        let statesOnly = ELFCoreWriter.make(memory: GuestPhysicalMemory(), cpuStates: [paeState])
        let loaded = try loadBytes(statesOnly).result.get()
        #expect(loaded.cpuStates.count == 1)
        expectSameRecordedState(loaded.cpuStates[0], paeState)
    }

    @Test func manyVCPUsKeepTheirOrder() throws {
        var states: [GuestCPUState] = []
        for index in UInt64(0)..<64 {
            let rflags: UInt64 = 2 | index << 32
            states.append(GuestCPUState(cr0: 0x8000_0011, cr3: index << 12, cr4: 0x20, rflags: rflags,
                                        codeSegmentFlags: UInt32(index), gdtBase: index, idtBase: ~index,
                                        kernelGSBase: index * 3))
        }
        let core = ELFCoreWriter.make(memory: try patternedMemory(pages: 1), cpuStates: states)
        let image = try loadBytes(core).result.get()
        #expect(image.cpuStates.count == 64)
        for (loaded, original) in zip(image.cpuStates, states) { expectSameRecordedState(loaded, original) }
    }

    @Test func notesAcrossSeveralSegmentsAndForeignNotesAreSkipped() throws {
        // A CORE/NT_PRSTATUS note and a QEMU note of another type come before the QEMU ones.
        let foreign = elfNote(name: "CORE", type: 1, description: [UInt8](repeating: 0xEE, count: 336))
            + qemuNote(longModeState, type: 7)
            + elfNote(name: "QEMUX", type: 0, description: [UInt8](repeating: 0x11, count: 440))
        var builder = CoreBuilder()
        builder.segments = [
            .note(foreign + qemuNote(paeState)),
            .load(0x3000, [UInt8](repeating: 0x5A, count: 0x1000)),
            .note(qemuNote(longModeState) + elfNote(name: "", type: 0, description: [])),
            SegmentSpec(type: 6 /* PT_PHDR */, data: [1, 2, 3]),
        ]
        let image = try loadBytes(builder.bytes()).result.get()
        #expect(image.cpuStates.count == 2)
        expectSameRecordedState(image.cpuStates[0], paeState)
        expectSameRecordedState(image.cpuStates[1], longModeState)
        #expect(try image.memory.read(gpa(0x3FFF), count: 1) == [0x5A])
    }

    @Test func kernelGSBaseNeedsAFullNote() throws {
        // 432 bytes: the minimum, without KERNEL_GS_BASE.
        var builder = CoreBuilder()
        builder.segments = [.note(qemuNote(longModeState, descriptorSize: 432)), .load(0, [1])]
        var image = try loadBytes(builder.bytes()).result.get()
        #expect(image.cpuStates.count == 1)
        #expect(image.cpuStates[0].kernelGSBase == nil)
        #expect(image.cpuStates[0].cr4 == longModeState.cr4)
        // 440 bytes but a recorded size of 432: still none.
        builder.segments[0] = .note(qemuNote(longModeState, descriptorSize: 440, recordedSize: 432))
        image = try loadBytes(builder.bytes()).result.get()
        #expect(image.cpuStates[0].kernelGSBase == nil)
        // Larger than QEMU's note: the known fields still decode.
        builder.segments[0] = .note(qemuNote(longModeState, descriptorSize: 500))
        image = try loadBytes(builder.bytes()).result.get()
        #expect(image.cpuStates[0].kernelGSBase == longModeState.kernelGSBase)
        expectSameRecordedState(image.cpuStates[0], longModeState)
    }

    @Test func zeroFillBeyondFileSize() throws {
        var builder = CoreBuilder()
        builder.segments = [.load(0x8000, [0xAB, 0xCD, 0xEF], memorySize: 0x2800), .load(0x20000, [], memorySize: 0x1000)]
        let image = try loadBytes(builder.bytes()).result.get()
        #expect(try image.memory.read(gpa(0x8000), count: 4) == [0xAB, 0xCD, 0xEF, 0])
        #expect(try image.memory.read(gpa(0x8003), count: 0x27FD) == [UInt8](repeating: 0, count: 0x27FD))
        #expect(rangesAre(image.memory.backedRanges, (UInt64(0x8000), 0x3000), (0x20000, 0x1000)))
        #expect(image.cpuStates.isEmpty)
    }

    @Test func segmentsSharingAPageWithoutOverlapping() throws {
        var builder = CoreBuilder()
        builder.segments = [.load(0x1800, [UInt8](repeating: 2, count: 0x800)), .load(0x1000, [UInt8](repeating: 1, count: 0x800))]
        let image = try loadBytes(builder.bytes()).result.get()
        #expect(try image.memory.read(gpa(0x1000), count: 0x1000)
            == [UInt8](repeating: 1, count: 0x800) + [UInt8](repeating: 2, count: 0x800))
        #expect(image.memory.backedPageCount == 1)
        // Zero-sized segments anywhere are ignored, even on top of others.
        builder.segments.append(.load(0x1400, [], memorySize: 0))
        #expect(try loadBytes(builder.bytes()).result.get().memory.backedPageCount == 1)
    }

    @Test func minimalELF32Core() throws {
        var builder = CoreBuilder()
        builder.is64 = false
        builder.machine = 3
        let low = (0..<300).map { UInt8(truncatingIfNeeded: $0) }
        builder.segments = [
            .note(qemuNote(paeState)),
            .load(0x0010_0000, low, memorySize: 0x1800),  // zero-filled past 300 bytes
            .load(0xFFFF_F000, [0x11, 0x22], memorySize: 0x1000),  // the last page below 4 GiB
        ]
        let bytes = builder.bytes()
        #expect(bytes.getLE16(42) == 32)
        let image = try loadBytes(bytes).result.get()
        #expect(image.format == .elf)
        #expect(try image.memory.read(gpa(0x10_0000), count: 300) == low)
        #expect(try image.memory.read(gpa(0x10_0000 + 300), count: 0x1800 - 300) == [UInt8](repeating: 0, count: 0x1800 - 300))
        #expect(try image.memory.read(gpa(0xFFFF_F000), count: 3) == [0x11, 0x22, 0])
        #expect(rangesAre(image.memory.backedRanges, (UInt64(0x10_0000), 0x2000), (0xFFFF_F000, 0x1000)))
        #expect(image.cpuStates.count == 1)
        expectSameRecordedState(image.cpuStates[0], paeState)
        #expect(image.cpuStates[0].inferredEFER == 0x800)
    }

    @Test func elf64CoreForI386AndELF32ForX8664AreAccepted() throws {
        // QEMU picks the class by the guest's address width, not the machine.
        var builder = CoreBuilder()
        builder.machine = 3
        builder.segments = [.load(0x1000, [1, 2, 3])]
        #expect(try loadBytes(builder.bytes()).result.get().memory.backedPageCount == 1)
        builder.is64 = false
        builder.machine = 62
        #expect(try loadBytes(builder.bytes()).result.get().memory.backedPageCount == 1)
    }

    @Test(arguments: [true, false])
    func extendedProgramHeaderNumbering(is64: Bool) throws {
        var builder = CoreBuilder()
        builder.is64 = is64
        builder.machine = is64 ? 62 : 3
        builder.extendedNumbering = true
        builder.segments = [.note(qemuNote(paeState))]
        for index in 0..<5 {
            builder.segments.append(.load(UInt64(index) * 0x2000, [UInt8](repeating: UInt8(index + 1), count: 16)))
        }
        let bytes = builder.bytes()
        #expect(bytes.getLE16(is64 ? 56 : 44) == 0xFFFF)
        let image = try loadBytes(bytes).result.get()
        #expect(image.cpuStates.count == 1)
        #expect(image.memory.backedPageCount == 5)
        for index in 0..<5 {
            #expect(try image.memory.read(gpa(UInt64(index) * 0x2000), count: 17)
                == [UInt8](repeating: UInt8(index + 1), count: 16) + [0])
        }
    }

    @Test func extendedNumberingWithBadSectionHeaders() throws {
        var builder = CoreBuilder()
        builder.extendedNumbering = true
        builder.segments = [.load(0, [1])]
        let good = builder.bytes()
        let sectionOffset = Int(good.getLE64(ELF64.shoff))
        // sh_info of 0: no program headers.
        var bytes = good
        bytes.setLE32(0, at: sectionOffset + 44)
        try expectLoadFailure(bytes, "no program headers")
        // An absurd count.
        bytes.setLE32(0x0100_0000, at: sectionOffset + 44)
        try expectLoadFailure(bytes, "absurd program header count")
        // More headers than the file holds.
        bytes.setLE32(0xFFFF, at: sectionOffset + 44)
        try expectLoadFailure(bytes, "truncated")
        // e_shoff past the end.
        bytes = good
        bytes.setLE64(UInt64(good.count), at: ELF64.shoff)
        try expectLoadFailure(bytes, "truncated")
        bytes.setLE64(UInt64.max, at: ELF64.shoff)
        try expectLoadFailure(bytes, "truncated")
        // The section header cut short.
        try expectLoadFailure(Array(good.dropLast(1)), "truncated")
    }

    // MARK: EFER inference

    static let pagingOn: UInt64 = 1 << 31 | 1
    static let paeOn: UInt64 = 1 << 5

    @Test func eferForLongMode() {
        let state = GuestCPUState(cr0: Self.pagingOn, cr3: 0, cr4: Self.paeOn, codeSegmentFlags: 1 << 21)
        #expect(state.looksLongMode)
        #expect(state.inferredEFER == 0xD01)
        #expect(state.eferInference.contains("CS.L=1"))
        #expect(state.eferInference.contains("0xd01"))
        #expect(longModeState.inferredEFER == 0xD01)
    }

    @Test func eferForLongModeFromSixtyFourBitBases() {
        // A compatibility-mode code segment (CS.L=0) under a 64-bit kernel.
        let gdt = GuestCPUState(cr0: Self.pagingOn, cr3: 0, cr4: Self.paeOn, gdtBase: 0xFFFF_FE00_0000_0000)
        #expect(gdt.inferredEFER == 0xD01)
        #expect(gdt.eferInference.contains("64-bit GDT/IDT base"))
        let idt = GuestCPUState(cr0: Self.pagingOn, cr3: 0, cr4: Self.paeOn, idtBase: 1 << 32)
        #expect(idt.inferredEFER == 0xD01)
        let gs = GuestCPUState(cr0: Self.pagingOn, cr3: 0, cr4: Self.paeOn, kernelGSBase: 0xFFFF_8880_0000_0000)
        #expect(gs.inferredEFER == 0xD01)
        #expect(gs.eferInference.contains("KERNEL_GS_BASE"))
    }

    @Test func eferForThirtyTwoBitPAE() {
        let state = GuestCPUState(cr0: Self.pagingOn, cr3: 0, cr4: Self.paeOn, codeSegmentFlags: 0x00CF_9B00,
                                  gdtBase: 0xC000_0000, idtBase: 0xFFFF_F000, kernelGSBase: 0xFFFF_FFFF)
        #expect(!state.looksLongMode)
        #expect(state.inferredEFER == 0x800)
        #expect(state.eferInference.contains("no sign of long mode"))
        #expect(paeState.inferredEFER == 0x800)
    }

    @Test func eferWithoutPAEPaging() {
        // Paging off: nothing, even with signs of 64-bit code.
        let off = GuestCPUState(cr0: 0x11, cr3: 0, cr4: Self.paeOn, codeSegmentFlags: 1 << 21, gdtBase: 1 << 40)
        #expect(!off.looksLongMode)
        #expect(off.inferredEFER == 0)
        #expect(off.eferInference.contains("no PAE paging"))
        // 32-bit paging without PAE: no NXE either.
        let legacy = GuestCPUState(cr0: Self.pagingOn, cr3: 0x1000, cr4: 1 << 4, codeSegmentFlags: 1 << 21)
        #expect(legacy.inferredEFER == 0)
        #expect(GuestCPUState(cr0: 0, cr3: 0, cr4: 0).inferredEFER == 0)
    }

    @Test func eferInferredFromLoadedCores() throws {
        let states = [
            GuestCPUState(cr0: Self.pagingOn, cr3: 0x1000, cr4: Self.paeOn, codeSegmentFlags: 1 << 21),
            GuestCPUState(cr0: Self.pagingOn, cr3: 0x2000, cr4: Self.paeOn),
            GuestCPUState(cr0: 0x11, cr3: 0, cr4: 0),
        ]
        let image = try loadBytes(ELFCoreWriter.make(memory: try patternedMemory(pages: 1), cpuStates: states)).result.get()
        #expect(image.cpuStates.map(\.inferredEFER) == [0xD01, 0x800, 0])
    }
}
