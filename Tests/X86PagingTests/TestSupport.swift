// Glue between the independent reference (ReferenceRules.swift) and the walker under test, plus a
// seeded PRNG. Nothing here decides what the right answer is.

import Foundation
import GuestMemory
import X86Paging

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, deterministic for a seed.
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
    /// True with probability `numerator / denominator`.
    mutating func chance(_ numerator: UInt64, in denominator: UInt64) -> Bool { next() % denominator < numerator }
    mutating func bool() -> Bool { next() & 1 == 1 }
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
}

/// A stateless 64-bit mix, for deterministic sampling decisions.
func mix64(_ a: UInt64, _ b: UInt64 = 0) -> UInt64 {
    var rng = SplitMix64(seed: a &* 0x2545_F491_4F6C_DD1D ^ b)
    return rng.next()
}

enum TestEnvironment {
    /// `VIRTMMU_EXHAUSTIVE=1` runs the full spaces (CI: `swift test -c release --filter Exhaustive`).
    static var exhaustive: Bool {
        ProcessInfo.processInfo.environment["VIRTMMU_EXHAUSTIVE"] == "1"
    }
}

extension RefAccessKind {
    var walkerKind: AccessKind {
        switch self {
        case .read: .read
        case .write: .write
        case .fetch: .fetch
        }
    }
}

extension RefPrivilege {
    var walkerPrivilege: Privilege {
        switch self {
        case .user: .user
        case .supervisor: .supervisor
        case .implicitSupervisor: .implicitSupervisor
        }
    }
}

/// All nine access kinds × privileges.
let allRefAccesses: [(RefAccessKind, RefPrivilege)] = RefAccessKind.allCases.flatMap { kind in
    RefPrivilege.allCases.map { (kind, $0) }
}

extension RefMachine {
    /// The register state that selects this machine's mode and controls.
    var registers: PagingRegisters {
        var cr0: CR0 = [.paging, .protectionEnable]
        if controls.wp { cr0.insert(.writeProtect) }
        var cr4: CR4 = []
        if controls.pse { cr4.insert(.pageSizeExtensions) }
        if controls.smep { cr4.insert(.smep) }
        if controls.smap { cr4.insert(.smap) }
        if controls.pke { cr4.insert(.protectionKeys) }
        if controls.pks { cr4.insert(.supervisorProtectionKeys) }
        if pge { cr4.insert(.globalPages) }
        var efer: EFER = []
        if controls.nxe { efer.insert(.noExecuteEnable) }
        switch mode {
        case .bits32: break
        case .pae: cr4.insert(.physicalAddressExtension)
        case .fourLevel:
            cr4.insert(.physicalAddressExtension)
            efer.formUnion([.longModeEnable, .longModeActive])
        case .fiveLevel:
            cr4.formUnion([.physicalAddressExtension, .la57])
            efer.formUnion([.longModeEnable, .longModeActive])
        }
        return PagingRegisters(cr0: cr0, cr3: cr3, cr4: cr4, efer: efer, pkru: PKRU(controls.pkru),
                               pkrs: PKRS(controls.pkrs), rflags: controls.ac ? [.alignmentCheck] : [])
    }

    var cpu: CPUModel {
        CPUModel(maxPhysicalAddressBits: maxPhysicalAddressBits, supports1GiBPages: controls.supports1GiB)
    }
}

/// The walker's answer in the reference's vocabulary.
func walkerResult(_ walker: PageWalker, _ address: UInt64, _ kind: RefAccessKind, _ privilege: RefPrivilege,
                  memory: GuestPhysicalMemory, setAccessedDirty: Bool) -> (result: RefWalkResult, path: WalkPath?) {
    // `translate` rather than `walk`: the harness records a backtrace for every thrown error,
    // which would dominate loops where most walks fault.
    switch walker.translate(GuestVirtualAddress(address), Access(kind.walkerKind, privilege.walkerPrivilege),
                            in: memory, setAccessedDirty: setAccessedDirty) {
    case .success(let t):
        return (.translated(physical: t.physicalAddress.rawValue, level: t.level, pageSize: t.pageSize,
                            writable: t.isWritable, user: t.isUser, executable: t.isExecutable,
                            key: t.protectionKey, global: t.isGlobal), t.path)
    case .failure(let error):
        switch error {
        case .pageFault(let fault):
            // Compare the full 64-bit code: no KVM-internal bit may leak into an architectural fault.
            let code = fault.errorCode.rawValue
            return (.pageFault(errorCode: code >> 32 == 0 ? UInt32(code) : 0xDEAD_BEEF, level: fault.level), fault.path)
        case .generalProtection: return (.generalProtection, nil)
        case .noMemory(let address, let level, let path): return (.noMemory(address: address.rawValue, level: level), path)
        case .addressTooWide: return (.tooWide, nil)
        }
    }
}

/// The walker's path as reference path entries.
func refPath(_ path: WalkPath) -> [RefPathEntry] {
    path.levels.map { RefPathEntry(level: $0, address: path.entryAddress(level: $0).rawValue, value: path.entryValue(level: $0)) }
}

/// Reads a little-endian entry straight from the host page behind it.
@inline(__always)
func rawRead(_ memory: GuestPhysicalMemory, _ address: UInt64, size: Int) -> UInt64? {
    guard address >> 52 == 0, let page = memory.hostPage(GuestPhysicalAddress(address).frame) else { return nil }
    let offset = Int(address & 0xFFF)
    if size == 4 { return UInt64(UInt32(littleEndian: page.bytes.load(fromByteOffset: offset, as: UInt32.self))) }
    return UInt64(littleEndian: page.bytes.load(fromByteOffset: offset, as: UInt64.self))
}

@inline(__always)
func rawWrite(_ memory: GuestPhysicalMemory, _ address: UInt64, size: Int, _ value: UInt64) {
    let page = memory.hostPage(GuestPhysicalAddress(address).frame)!
    let offset = Int(address & 0xFFF)
    if size == 4 {
        page.bytes.storeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, toByteOffset: offset, as: UInt32.self)
    } else {
        page.bytes.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt64.self)
    }
}

/// Collects mismatches, keeping the first few in full.
struct MismatchLog {
    var count = 0
    var examples: [String] = []
    var checked = 0
    mutating func record(_ message: @autoclosure () -> String) {
        count += 1
        if examples.count < 12 { examples.append(message()) }
    }
    var summary: String { "\(count) mismatches of \(checked) checks:\n" + examples.joined(separator: "\n") }
}

