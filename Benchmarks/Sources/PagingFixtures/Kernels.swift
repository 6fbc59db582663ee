// The measured loops. Each runs `count` operations over a fixture's permuted addresses and returns a
// checksum of the results, so the work cannot be optimised away; the caller black-holes it. They
// are `@inline(never)` so that profiles show one symbol per kernel, and the walk itself is
// specialised here, from the root package's `@inlinable` generic code, for GuestPhysicalMemory.

import GuestMemory
import X86Paging

@inline(__always)
func walkLoop(_ fixture: WalkFixture, _ addresses: [GuestVirtualAddress], count: Int, access: Access,
              setAccessedDirty: Bool) -> UInt64 {
    let walker = fixture.walker
    let memory = fixture.memory
    return addresses.withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        var sum: UInt64 = 0
        for index in 0..<count {
            do throws(WalkFault) {
                let translation = try walker.walk(buffer[index & mask], access, in: memory,
                                                  setAccessedDirty: setAccessedDirty)
                sum &+= translation.physicalAddress.rawValue
            } catch {
                switch error {
                case .pageFault(let fault): sum &+= fault.errorCode.rawValue &+ UInt64(fault.level)
                default: sum &+= 1 << 40
                }
            }
        }
        return sum
    }
}

/// Successful walks, probe mode (`setAccessedDirty: false`): no writes at all.
@inline(never)
public func walkProbe(_ fixture: WalkFixture, count: Int) -> UInt64 {
    walkLoop(fixture, fixture.addresses, count: count, access: .read(.supervisor), setAccessedDirty: false)
}

/// Successful walks with the default A/D handling (A is already set after the first pass, so this
/// is the steady state: a compare per level, no stores).
@inline(never)
public func walkAccessedDirty(_ fixture: WalkFixture, count: Int) -> UInt64 {
    walkLoop(fixture, fixture.addresses, count: count, access: .read(.supervisor), setAccessedDirty: true)
}

/// Walks that fault at the PTE (not present), default A/D mode.
@inline(never)
public func walkNotPresent(_ fixture: WalkFixture, count: Int) -> UInt64 {
    walkLoop(fixture, fixture.notPresent, count: count, access: .write(.user), setAccessedDirty: true)
}

/// User writes to supervisor read-only pages: a permission fault at the leaf.
@inline(never)
public func walkPermissionFault(_ fixture: WalkFixture, count: Int) -> UInt64 {
    walkLoop(fixture, fixture.protected, count: count, access: .write(.user), setAccessedDirty: true)
}

@inline(__always)
func eptLoop(_ fixture: EPTFixture, count: Int, setAccessedDirty: Bool) -> UInt64 {
    let walker = fixture.walker
    let memory = fixture.memory
    return fixture.addresses.withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        var sum: UInt64 = 0
        for index in 0..<count {
            do throws(EPTWalkFault) {
                let translation = try walker.walk(buffer[index & mask], .read, in: memory,
                                                  setAccessedDirty: setAccessedDirty)
                sum &+= translation.outputAddress.rawValue
            } catch {
                sum &+= 1
            }
        }
        return sum
    }
}

@inline(never)
public func eptProbe(_ fixture: EPTFixture, count: Int) -> UInt64 {
    eptLoop(fixture, count: count, setAccessedDirty: false)
}

@inline(never)
public func eptAccessedDirty(_ fixture: EPTFixture, count: Int) -> UInt64 {
    eptLoop(fixture, count: count, setAccessedDirty: true)
}

// MARK: Baselines

/// The floor a walk cannot beat: the same chain of dependent reads a walk makes (index the table,
/// `GuestPhysicalMemory.hostPage` the entry's frame, load the entry, mask out the next table),
/// with no checks at all. Constants are passed from the wrappers so the level loop unrolls.
@inline(__always)
func radixChain<E: FixedWidthInteger & UnsignedInteger>(
    _ memory: GuestPhysicalMemory, _ addresses: [GuestVirtualAddress], count: Int, levels: Int, bits: Int,
    entry _: E.Type, root: (UInt64) -> UInt64
) -> UInt64 {
    addresses.withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        let indexMask: UInt64 = (1 << UInt64(bits)) - 1
        var sum: UInt64 = 0
        for index in 0..<count {
            let address = buffer[index & mask].rawValue
            var table = root(address)
            var level = levels
            while level > 0 {
                let entryAddress = table &+ ((address >> UInt64(12 + (level - 1) * bits)) & indexMask)
                    &* UInt64(MemoryLayout<E>.size)
                guard let page = memory.hostPage(GuestFrameNumber(entryAddress >> 12)) else {
                    sum &+= 1
                    break
                }
                let value = UInt64(page.bytes.load(fromByteOffset: Int(entryAddress & 0xFFF), as: E.self))
                table = value & 0x000F_FFFF_FFFF_F000
                level -= 1
            }
            sum &+= table
        }
        return sum
    }
}

/// `levels` dependent radix lookups + 8-byte loads per address (4 for a 4-level 4 KiB walk).
@inline(never)
public func radixChain64(_ fixture: WalkFixture, levels: Int, count: Int) -> UInt64 {
    let root = fixture.root
    switch levels {
    case 3: return radixChain(fixture.memory, fixture.addresses, count: count, levels: 3, bits: 9, entry: UInt64.self) { _ in root }
    case 4: return radixChain(fixture.memory, fixture.addresses, count: count, levels: 4, bits: 9, entry: UInt64.self) { _ in root }
    case 5: return radixChain(fixture.memory, fixture.addresses, count: count, levels: 5, bits: 9, entry: UInt64.self) { _ in root }
    default: fatalError("levels 3...5")
    }
}

/// The PAE floor: the PDPTE register picks the directory, then 2 dependent lookups + loads.
@inline(never)
public func radixChainPAE(_ fixture: WalkFixture, count: Int) -> UInt64 {
    let walker = fixture.walker
    return radixChain(fixture.memory, fixture.addresses, count: count, levels: 2, bits: 9, entry: UInt64.self) {
        walker.pdpte(Int($0 >> 30) & 3).frameAddress
    }
}

/// The 32-bit floor: 2 dependent lookups + 4-byte loads.
@inline(never)
public func radixChain32(_ fixture: WalkFixture, count: Int) -> UInt64 {
    let root = fixture.root
    return radixChain(fixture.memory, fixture.addresses, count: count, levels: 2, bits: 10, entry: UInt32.self) { _ in root }
}

/// The EPT floor: 4 dependent lookups + loads from the EPTP's root.
@inline(never)
public func radixChainEPT(_ fixture: EPTFixture, count: Int) -> UInt64 {
    let root = fixture.root
    let addresses = fixture.addresses.map { GuestVirtualAddress($0.rawValue) }
    return radixChain(fixture.memory, addresses, count: count, levels: 4, bits: 9, entry: UInt64.self) { _ in root }
}

// MARK: Enumeration

/// `PageWalker.mappings(in:)` over the fixture's 1 GiB; returns runs + leaves.
@inline(never)
public func enumerateMappings(_ fixture: MappingFixture) -> UInt64 {
    let (runs, summary) = fixture.walker.mappings(in: fixture.memory)
    return UInt64(runs.count) &+ summary.leafPages
}

/// The enumeration floor: read every PTE of the 512 page tables through `hostPage` (one radix
/// lookup and one load per entry, as the enumerator does) and count the present ones.
@inline(never)
public func scanPageTables(_ fixture: MappingFixture) -> UInt64 {
    let memory = fixture.memory
    var present: UInt64 = 0
    for table in fixture.pageTables {
        for index in 0..<512 {
            let entryAddress = table &+ UInt64(index) &* 8
            guard let page = memory.hostPage(GuestFrameNumber(entryAddress >> 12)) else { continue }
            present &+= page.bytes.load(fromByteOffset: Int(entryAddress & 0xFFF), as: UInt64.self) & 1
        }
    }
    return present
}
