import Foundation
import GuestMemory
import Testing
import X86Paging

@Suite("ImageLoader raw images")
struct RawImageTests {
    @Test func rawImageIsPlacedAtItsBase() throws {
        var random = SplitMix64(seed: 42)
        let contents = random.bytes(10_000)  // 2.44 pages
        let file = try TemporaryFile(contents)
        let base = GuestPhysicalAddress(0x10_0000)
        let image = try ImageLoader.load(path: file.path, base: base)
        #expect(image.format == .raw)
        #expect(image.cpuStates.isEmpty)
        #expect(try image.memory.read(base, count: contents.count) == contents)
        // The last page is backed whole, zero past the file's end.
        #expect(rangesAre(image.memory.backedRanges, (UInt64(0x10_0000), 3 * pageSize)))
        #expect(try image.memory.read(GuestPhysicalAddress(0x10_0000 + 10_000), count: 3 * 4096 - 10_000)
            == [UInt8](repeating: 0, count: 3 * 4096 - 10_000))
        #expect(!image.memory.isBacked(GuestFrameNumber(0xFF)))
        #expect(image.memory.hostPage(GuestFrameNumber(0x100))?.isWritable == true)
    }

    @Test func rawImageAtAnUnalignedBase() throws {
        let contents: [UInt8] = Array(1...200)
        let (_, result) = try loadBytes(contents, base: GuestPhysicalAddress(0x2FA0))
        let image = try result.get()
        #expect(try image.memory.read(GuestPhysicalAddress(0x2FA0), count: 200) == contents)
        #expect(try image.memory.read(GuestPhysicalAddress(0x2000), count: 0xFA0) == [UInt8](repeating: 0, count: 0xFA0))
        #expect(rangesAre(image.memory.backedRanges, (UInt64(0x2000), 2 * pageSize)))
    }

    @Test func defaultBaseIsZero() throws {
        let (_, result) = try loadBytes([0xAA, 0xBB, 0xCC])
        let image = try result.get()
        #expect(try image.memory.read(GuestPhysicalAddress(0), count: 3) == [0xAA, 0xBB, 0xCC])
        #expect(image.memory.backedPageCount == 1)
    }

    @Test func formatDetection() throws {
        // ELF magic: an ELF core.
        let core = try smallCore(pages: 1, cpuStates: [])
        #expect(try loadBytes(core).result.get().format == .elf)
        // Anything else: raw, even when it nearly is ELF.
        for prefix: [UInt8] in [[0x7F, 0x45, 0x4C, 0x47], [0x7E, 0x45, 0x4C, 0x46], [0x45, 0x4C, 0x46, 0x7F], [0, 0, 0, 0]] {
            let image = try loadBytes(prefix + core.dropFirst(4)).result.get()
            #expect(image.format == .raw)
            #expect(try image.memory.read(GuestPhysicalAddress(0), count: 4) == prefix)
        }
        // Too short to hold the magic: raw.
        for count in 1...3 {
            let image = try loadBytes(Array(core.prefix(count))).result.get()
            #expect(image.format == .raw)
            #expect(try image.memory.read(GuestPhysicalAddress(0), count: count) == Array(core.prefix(count)))
        }
        // A file with the magic but nothing valid after it is treated as a (broken) ELF file.
        try expectLoadFailure([0x7F, 0x45, 0x4C, 0x46, 9, 9, 9], "truncated ELF identification", format: nil)
    }

    @Test func forcedFormats() throws {
        let core = try smallCore(pages: 2)
        // Forcing raw loads an ELF core byte for byte.
        let raw = try loadBytes(core, format: .raw, base: GuestPhysicalAddress(0x4000)).result.get()
        #expect(raw.format == .raw)
        #expect(raw.cpuStates.isEmpty)
        #expect(try raw.memory.read(GuestPhysicalAddress(0x4000), count: core.count) == core)
        // Forcing ELF on something else fails with the reason.
        try expectLoadFailure([UInt8](repeating: 0x41, count: 100), "not an ELF file (wrong magic)", format: .elf)
    }

    @Test func emptyFile() throws {
        for format: ImageFormat? in [nil, .raw, .elf] {
            let error = try expectLoadFailure([], "the file is empty", format: format)
            #expect(error?.reason == .empty)
        }
    }

    @Test func nonexistentFile() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("no-such-image-\(UUID().uuidString).img").path
        for format: ImageFormat? in [nil, .raw, .elf] {
            let result = loadFile(path, format: format)
            guard case .failure(let error) = result else {
                Issue.record("loading a missing file succeeded")
                continue
            }
            #expect(error.isUnreadableFile)
            #expect((error as any Error).isUnreadableFile)
            #expect(error.path == path)
            #expect(error.description.contains(path))
            #expect(error.description.contains("cannot open"))
            #expect(error.description.contains("No such file"), "\(error.description)")
            #expect(error.reason == .cannotOpen(errno: ENOENT))
        }
        // Other errors are not "unreadable file" errors.
        #expect(!(GuestMemoryError.unbacked(GuestPhysicalAddress(0)) as any Error).isUnreadableFile)
    }

    @Test(.enabled(if: getuid() != 0, "root opens mode-000 files"))
    func unreadableFile() throws {
        let file = try TemporaryFile([1, 2, 3])
        #expect(chmod(file.path, 0) == 0)
        let result = loadFile(file.path)
        guard case .failure(let error) = result else {
            Issue.record("loading a mode-000 file succeeded")
            return
        }
        #expect(error.isUnreadableFile)
        #expect(error.reason == .cannotOpen(errno: EACCES))
        #expect(error.description.hasPrefix(file.path))
    }

    @Test func directoryIsRefused() throws {
        let directory = try TemporaryDirectory()
        for format: ImageFormat? in [nil, .raw, .elf] {
            let result = loadFile(directory.path, format: format)
            guard case .failure(let error) = result else {
                Issue.record("loading a directory succeeded")
                continue
            }
            #expect(error.description.contains(directory.path))
            #expect(error.description.contains("not a regular file"), "\(error.description)")
        }
    }

    @Test func rawImageBeyondTheAddressSpace() throws {
        let error = try #require(try loadBytes([1, 2, 3, 4], format: .raw, base: GuestPhysicalAddress((1 << 52) - 2)).result.failure)
        #expect(error.reason == .memory(.beyondPhysicalAddressSpace(GuestPhysicalAddress((1 << 52) - 2), size: 4)))
        #expect(error.description.contains("52-bit"))
        // Right up to the top is fine.
        let image = try loadBytes([1, 2, 3, 4], base: GuestPhysicalAddress((1 << 52) - 4)).result.get()
        #expect(try image.memory.read(GuestPhysicalAddress((1 << 52) - 4), count: 4) == [1, 2, 3, 4])
    }

    @Test func rawImageOverTheSizeLimit() throws {
        let contents = [UInt8](repeating: 7, count: 3 * 4096)
        let error = try #require(try loadBytes(contents, sizeLimit: 2 * pageSize).result.failure)
        #expect(error.reason == .memory(.sizeLimitExceeded(requested: 3 * pageSize, limit: 2 * pageSize)))
        #expect(error.description.contains("limit"))
        #expect(try loadBytes(contents, sizeLimit: 3 * pageSize).result.get().memory.backedPageCount == 3)
    }

    /// A sparse file far over the size limit is refused without counting its 2^31 frames (which
    /// would take minutes; the time limit turns that into a failure).
    @Test(.timeLimit(.minutes(1))) func hugeSparseRawImageIsRefused() throws {
        let file = try TemporaryFile([1])
        guard truncate(file.path, 1 << 43) == 0 else { return }  // no sparse files this large here
        let error = try #require(loadFile(file.path, sizeLimit: 64 << 20).failure)
        #expect(error.reason == .memory(.sizeLimitExceeded(requested: 1 << 43, limit: 64 << 20)))
        #expect(error.description.hasPrefix(file.path + ": "))
    }

    @Test func specialFilesAreRefused() throws {
        // Character devices are not regular files (and /dev/zero never ends).
        let result = loadFile("/dev/zero")
        guard case .failure(let error) = result else {
            Issue.record("loading /dev/zero succeeded")
            return
        }
        #expect(error.description.contains("/dev/zero: not a regular file"))
    }

    /// open(2) of a FIFO blocks until a writer appears; the loader should refuse it without waiting.
    @Test(.timeLimit(.minutes(1))) func fifoIsRefusedWithoutBlocking() throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/fifo"
        #expect(mkfifo(path, 0o600) == 0)
        // Rescue a blocked open after a second by opening the write end (harmless if nobody waits).
        let rescuer = Thread {
            Thread.sleep(forTimeInterval: 1)
            let descriptor = open(path, O_WRONLY | O_NONBLOCK)
            if descriptor >= 0 {
                Thread.sleep(forTimeInterval: 0.1)
                close(descriptor)
            }
        }
        rescuer.start()
        let clock = ContinuousClock()
        var result: Result<LoadedImage, ImageLoadError>?
        let elapsed = clock.measure { result = loadFile(path) }
        guard case .failure(let error) = result else {
            Issue.record("loading a FIFO succeeded")
            return
        }
        #expect(error.description.contains("not a regular file"), "\(error.description)")
        #expect(elapsed < .milliseconds(500), "the load took \(elapsed)")
        if elapsed < .seconds(1) {
            Thread.sleep(forTimeInterval: 1.2)  // let the rescuer finish before the directory goes
        }
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
