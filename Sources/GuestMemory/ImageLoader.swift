import X86Paging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// How a guest memory image is laid out on disk.
public enum ImageFormat: String, Sendable, CaseIterable {
    /// A flat copy of guest-physical memory starting at a base address.
    case raw
    /// A QEMU `dump-guest-memory` ELF core (ELF32 or ELF64): PT_LOAD segments placed by physical
    /// address, and a "QEMU" note per vCPU with its control registers.
    case elf
}

/// The registers a QEMU core records for one vCPU (QEMU's `QEMUCPUState` note).
public struct GuestCPUState: Sendable, Equatable {
    public var cr0: UInt64
    public var cr3: UInt64
    public var cr4: UInt64
    public var rflags: UInt64
    /// The code-segment descriptor flags as QEMU keeps them (L is bit 21).
    public var codeSegmentFlags: UInt32
    public var gdtBase: UInt64
    public var idtBase: UInt64
    /// IA32_KERNEL_GS_BASE, when the note is new enough to carry it.
    public var kernelGSBase: UInt64?
    /// QEMU's note has no EFER; nil means it was not recorded.
    public var efer: UInt64?

    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, rflags: UInt64 = 0x2, codeSegmentFlags: UInt32 = 0,
                gdtBase: UInt64 = 0, idtBase: UInt64 = 0, kernelGSBase: UInt64? = nil, efer: UInt64? = nil) {
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.rflags = rflags
        self.codeSegmentFlags = codeSegmentFlags
        self.gdtBase = gdtBase
        self.idtBase = idtBase
        self.kernelGSBase = kernelGSBase
        self.efer = efer
    }

    /// Whether the vCPU was in IA-32e mode, judged from what the note does carry: a 64-bit code
    /// segment, or descriptor-table bases that only a 64-bit kernel can have.
    public var looksLongMode: Bool {
        let paged = cr0 & (1 << 31) != 0 && cr4 & (1 << 5) != 0
        guard paged else { return false }
        return codeSegmentFlags & (1 << 21) != 0 || gdtBase >> 32 != 0 || idtBase >> 32 != 0
            || (kernelGSBase ?? 0) >> 32 != 0
    }

    /// The EFER to walk with when the core does not record one. LME|LMA follow `looksLongMode`.
    /// NXE is assumed whenever PAE-based paging is on: a guest that left NXE clear has no XD bits
    /// set (they would be reserved and fault), so assuming NXE changes only fetch permissions it
    /// never used, while wrongly assuming NXE clear would turn every XD page into an RSVD fault.
    public var inferredEFER: UInt64 {
        let paePaging = cr0 & (1 << 31) != 0 && cr4 & (1 << 5) != 0
        var value: UInt64 = 0
        if paePaging { value |= EFER.noExecuteEnable.rawValue }
        if looksLongMode { value |= EFER.longModeEnable.rawValue | EFER.longModeActive.rawValue | EFER.syscallEnable.rawValue }
        return value
    }

    /// How `inferredEFER` was reached, for reports.
    public var eferInference: String {
        guard cr0 & (1 << 31) != 0 && cr4 & (1 << 5) != 0 else {
            return "not in the core; \(hex(inferredEFER)) assumed (no PAE paging)"
        }
        let reason: String
        if codeSegmentFlags & (1 << 21) != 0 {
            reason = "CS.L=1"
        } else if gdtBase >> 32 != 0 || idtBase >> 32 != 0 {
            reason = "64-bit GDT/IDT base"
        } else if (kernelGSBase ?? 0) >> 32 != 0 {
            reason = "64-bit KERNEL_GS_BASE"
        } else {
            reason = "no sign of long mode"
        }
        return "not in the core; \(hex(inferredEFER)) inferred (\(reason); NXE assumed)"
    }
}

/// A loaded image: guest memory plus whatever CPU state the file carried.
public struct LoadedImage {
    public var memory: GuestPhysicalMemory
    public var format: ImageFormat
    /// One entry per vCPU, in the core's order; empty for raw images.
    public var cpuStates: [GuestCPUState]
}

/// Why an image could not be loaded. Every case names the file.
public struct ImageLoadError: Error, CustomStringConvertible, Sendable {
    public enum Reason: Sendable, Equatable {
        case cannotOpen(errno: Int32)
        case readFailed(errno: Int32)
        case empty
        case malformed(String)
        case memory(GuestMemoryError)
    }

    public var path: String
    public var reason: Reason

    public init(path: String, reason: Reason) {
        self.path = path
        self.reason = reason
    }

    /// Whether the file itself could not be opened (as opposed to being wrong inside).
    public var isUnreadableFile: Bool {
        if case .cannotOpen = reason { return true }
        return false
    }

    public var description: String {
        switch reason {
        case .cannotOpen(let code): "\(path): cannot open: \(String(cString: strerror(code)))"
        case .readFailed(let code): "\(path): read failed: \(String(cString: strerror(code)))"
        case .empty: "\(path): the file is empty"
        case .malformed(let what): "\(path): \(what)"
        case .memory(let error): "\(path): \(error)"
        }
    }
}

extension Error {
    /// Whether this is an image error for a file that could not be opened at all.
    public var isUnreadableFile: Bool { (self as? ImageLoadError)?.isUnreadableFile ?? false }
}

/// Loads raw images and QEMU ELF cores into `GuestPhysicalMemory`, refusing hostile files with an
/// error that names the file and the fault instead of crashing, hanging or over-allocating.
public enum ImageLoader {
    /// Reads the file at `path`. `format` nil detects an ELF core by its magic; `base` places a raw
    /// image. `sizeLimit` caps the guest memory a file may claim.
    public static func load(path: String, format: ImageFormat? = nil, base: GuestPhysicalAddress = GuestPhysicalAddress(0),
                            sizeLimit: UInt64 = 64 << 30) throws(ImageLoadError) -> LoadedImage {
        let file = try ImageFile(path: path)
        defer { file.close() }
        guard file.size > 0 else { throw ImageLoadError(path: path, reason: .empty) }
        let detected: ImageFormat
        if let format {
            detected = format
        } else {
            detected = (try? file.bytes(at: 0, count: 4)) == [0x7F, 0x45, 0x4C, 0x46] ? .elf : .raw
        }
        let memory = GuestPhysicalMemory(sizeLimit: sizeLimit)
        switch detected {
        case .raw:
            try loadSegment(file, offset: 0, size: file.size, fileSize: file.size, at: base, into: memory)
            return LoadedImage(memory: memory, format: .raw, cpuStates: [])
        case .elf:
            let states = try ELFCoreReader(file: file).load(into: memory)
            return LoadedImage(memory: memory, format: .elf, cpuStates: states)
        }
    }

    /// Copies `fileSize` bytes from `offset` to guest-physical `address` and zero-fills up to `size`.
    static func loadSegment(_ file: ImageFile, offset: UInt64, size: UInt64, fileSize: UInt64, at address: GuestPhysicalAddress,
                            into memory: GuestPhysicalMemory) throws(ImageLoadError) {
        do {
            try memory.back(address, size: size)
        } catch {
            throw ImageLoadError(path: file.path, reason: .memory(error))
        }
        let chunkSize = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 16)
        defer { buffer.deallocate() }
        var done: UInt64 = 0
        while done < fileSize {
            let count = Int(min(UInt64(chunkSize), fileSize - done))
            let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
            try file.read(at: offset + done, into: chunk)
            do {
                try memory.write(GuestPhysicalAddress(address.rawValue + done), from: UnsafeRawBufferPointer(chunk))
            } catch {
                throw ImageLoadError(path: file.path, reason: .memory(error))
            }
            done += UInt64(count)
        }
    }
}

/// An open file read with pread; sizes come from fstat so every offset can be checked first.
final class ImageFile {
    let path: String
    let descriptor: Int32
    let size: UInt64

    init(path: String) throws(ImageLoadError) {
        self.path = path
        // O_NONBLOCK so that a FIFO or device cannot block the open; the type check below refuses
        // them, and the flag means nothing for the regular files that pass it.
        let descriptor = open(path, O_RDONLY | O_NONBLOCK)
        guard descriptor >= 0 else { throw ImageLoadError(path: path, reason: .cannotOpen(errno: errno)) }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else {
            let code = errno
            _ = closeDescriptor(descriptor)
            throw ImageLoadError(path: path, reason: .cannotOpen(errno: code))
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            _ = closeDescriptor(descriptor)
            throw ImageLoadError(path: path, reason: .malformed("not a regular file"))
        }
        self.descriptor = descriptor
        self.size = UInt64(info.st_size)
    }

    func close() { _ = closeDescriptor(descriptor) }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ImageLoadError) {
        var done = 0
        while done < buffer.count {
            let got = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if got < 0 {
                if errno == EINTR { continue }
                throw ImageLoadError(path: path, reason: .readFailed(errno: errno))
            }
            if got == 0 {
                throw ImageLoadError(path: path, reason: .malformed("unexpected end of file at offset \(hex(offset + UInt64(done)))"))
            }
            done += got
        }
    }

    func bytes(at offset: UInt64, count: Int) throws(ImageLoadError) -> [UInt8] {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw ImageLoadError(path: path, reason: .malformed(
                "truncated: needs \(count) bytes at offset \(hex(offset)) but the file has \(size) bytes"))
        }
        var result = [UInt8](repeating: 0, count: count)
        var failure: ImageLoadError?
        result.withUnsafeMutableBytes { buffer in
            do throws(ImageLoadError) { try read(at: offset, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return result
    }
}

private func closeDescriptor(_ descriptor: Int32) -> Int32 { close(descriptor) }
