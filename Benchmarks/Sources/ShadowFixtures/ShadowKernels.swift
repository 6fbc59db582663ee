// The measured loops of the shadow-MMU benchmarks, shared by the harness target and the quick
// timer. `@inline(never)` so that profiles show one symbol per kernel. Each returns a checksum of
// the results; the fault loops also return the exits they counted (checked by
// `FaultFixture.verify`, outside the timed region).

import GuestMemory
import KVMMMU
import VirtualMachine
import X86Paging

/// The first `count` targets of `fixture`, one `VCPU.access` each: every one is a shadow fault
/// (exit, guest walk, SPTE installed) followed by the retried access (hardware walk, TLB fill,
/// the load or store).
@inline(never)
public func runFaults(_ fixture: FaultFixture, count: Int) -> (exits: Int, checksum: UInt64) {
    precondition(count <= fixture.targets.count, "a \(fixture.kind) fixture has \(fixture.targets.count) targets")
    let vcpu = fixture.guest.vcpu
    let access = fixture.access
    return fixture.targets.withUnsafeBufferPointer { buffer in
        var exits = 0
        var sum: UInt64 = 0
        for index in 0..<count {
            let outcome = try! vcpu.access(buffer[index], access, size: 8, value: UInt64(index))
            exits &+= outcome.exits
            if case .completed(let gpa, let value) = outcome.result {
                sum &+= gpa.rawValue &+ value
            } else {
                sum &+= 1 << 40
            }
        }
        return (exits, sum)
    }
}

/// The first `count` targets of a TDP fixture: each an EPT violation, the TDP MMU's fault, and
/// the retried access through the two-dimensional walk.
@inline(never)
public func runTDPFaults(_ fixture: TDPFaultFixture, count: Int) -> (exits: Int, checksum: UInt64) {
    let vcpu = fixture.guest.vcpu
    return fixture.targets.withUnsafeBufferPointer { buffer in
        var exits = 0
        var sum: UInt64 = 0
        for index in 0..<count {
            let outcome = try! vcpu.access(buffer[index], .read(.user), size: 8)
            exits &+= outcome.exits
            if case .completed(let gpa, let value) = outcome.result { sum &+= gpa.rawValue &+ value } else { sum &+= 1 << 40 }
        }
        return (exits, sum)
    }
}

/// `runTDPFaults` over pages that are all mapped already (the `tdp-tlb-miss-4k` kernel): a name of
/// its own, so that callgrind can count it apart from the faults that warmed the fixture.
@inline(never)
public func runTDPWalks(_ fixture: TDPFaultFixture, count: Int) -> (exits: Int, checksum: UInt64) {
    runTDPFaults(fixture, count: count)
}

/// The floor under a fault's retried access: one 8-byte host load from each target's page, in
/// the same order, on a fixture in the same state (the pages were populated when it was built,
/// then the rest of the fixture was built). Each address depends on the previous load (its value
/// >> 63 is always 0, which the compiler cannot know), so the loads cannot overlap, as in a fault
/// where the access waits for everything before it. What remains of a fault above this is the model.
@inline(never)
public func runFirstTouch(_ addresses: [UnsafeRawPointer], count: Int) -> UInt64 {
    addresses.withUnsafeBufferPointer { buffer in
        var sum: UInt64 = 0
        var previous: UInt64 = 0
        for index in 0..<count {
            previous = (buffer[index] + Int(truncatingIfNeeded: previous >> 63)).load(as: UInt64.self)
            sum &+= previous
        }
        return sum
    }
}

/// `count` accesses cycling through `addresses` (a power-of-two count), all TLB hits. Returns the
/// checksum and the number of accesses that were TLB hits without an exit.
public func runTLBHits(_ fixture: TLBFixture, _ addresses: [GuestVirtualAddress], access: Access,
                       count: Int) -> (hits: Int, checksum: UInt64) {
    runTLBHits(on: fixture.guest.vcpu, addresses, access: access, count: count)
}

/// `runTLBHits` on any vCPU (the SPP fixture's runs under TDP with EPT).
@inline(never)
public func runTLBHits(on vcpu: VCPU, _ addresses: [GuestVirtualAddress], access: Access,
                       count: Int) -> (hits: Int, checksum: UInt64) {
    addresses.withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        var hits = 0
        var sum: UInt64 = 0
        for index in 0..<count {
            let outcome = try! vcpu.access(buffer[index & mask], access, size: 8, value: UInt64(index))
            if outcome.tlbHit && outcome.exits == 0 { hits &+= 1 }
            if case .completed(_, let value) = outcome.result { sum &+= value }
        }
        return (hits, sum)
    }
}

/// The guest walk of a warm fault on its own: `MMUContext.guestWalker` over the VM's memslots,
/// with A/D updates (all A bits are set, so no stores), user read.
@inline(never)
public func runGuestWalks(_ fixture: WalkBreakdownFixture, count: Int) -> UInt64 {
    let walker = fixture.guest.vcpu.context.guestWalker
    let memory = fixture.guest.vm.memory
    return fixture.targets.withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        var sum: UInt64 = 0
        for index in 0..<count {
            switch walker.translate(buffer[index & mask], .read(.user), in: memory, setAccessedDirty: true) {
            case .success(let translation): sum &+= translation.physicalAddress.rawValue
            case .failure: sum &+= 1
            }
        }
        return sum
    }
}

/// The hardware walk over KVM's SPTEs: `mapped` walks succeed (the retry after a fault), otherwise
/// they fail at the PTE (the walk that causes the exit).
@inline(never)
public func runHardwareWalks(_ fixture: WalkBreakdownFixture, mapped: Bool, count: Int) -> UInt64 {
    let walker = fixture.hardware
    let memory = fixture.hostMemory
    return (mapped ? fixture.targets : fixture.unmapped).withUnsafeBufferPointer { buffer in
        let mask = buffer.count - 1
        var sum: UInt64 = 0
        for index in 0..<count {
            switch walker.translate(buffer[index & mask], .read(.user), in: memory, setAccessedDirty: true) {
            case .success(let translation): sum &+= translation.physicalAddress.rawValue
            case .failure(.pageFault(let fault)): sum &+= fault.errorCode.rawValue &+ UInt64(fault.level)
            case .failure: sum &+= 1 << 40
            }
        }
        return sum
    }
}

/// The floor of a TLB hit: a direct-mapped tag array probed the way `TLB` does (slot hash, tag and
/// generation compare), then the 8-byte load from the host page. No permission check, no
/// outcome value.
public final class TLBFloorFixture {
    struct Slot {
        var tag: UInt64
        var generation: UInt64
        var host: UnsafeMutableRawPointer?
    }

    var slots: [Slot]
    let generation: UInt64 = 1
    let fixture: TLBFixture
    public let addresses: [GuestVirtualAddress]

    public init(_ fixture: TLBFixture) {
        self.fixture = fixture
        addresses = fixture.sixtyFour
        slots = Array(repeating: Slot(tag: 0, generation: 0, host: nil), count: 1024)
        let vm = fixture.guest.vm
        for gva in addresses {
            let outcome = try! fixture.guest.vcpu.access(gva, .read(.user), size: 8)
            guard case .completed(let gpa, _) = outcome.result else { fatalError() }
            let page = gva.rawValue >> 12
            let host = vm.memory.hostFrame(of: gpa.frame)!
            slots[Int((page ^ (page >> 11)) & 1023)] = Slot(tag: page, generation: 1, host: vm.pool.pointer(host))
        }
    }
}

@inline(never)
public func runTLBFloor(_ floor: TLBFloorFixture, count: Int) -> UInt64 {
    floor.slots.withUnsafeBufferPointer { slots in
        floor.addresses.withUnsafeBufferPointer { buffer in
            let mask = buffer.count - 1
            let generation = floor.generation
            var sum: UInt64 = 0
            for index in 0..<count {
                let address = buffer[index & mask].rawValue
                let page = address >> 12
                let slot = slots[Int((page ^ (page >> 11)) & 1023)]
                if slot.generation == generation && slot.tag == page, let host = slot.host {
                    sum &+= host.load(fromByteOffset: Int(address & 0xFF8), as: UInt64.self)
                } else {
                    sum &+= 1
                }
            }
            return sum
        }
    }
}

/// One vCPU's share of a population: each target read once (each a fault). Returns the exits.
@inline(never)
public func runPopulation(_ vcpu: VCPU, _ targets: [GuestVirtualAddress]) -> Int {
    targets.withUnsafeBufferPointer { buffer in
        var exits = 0
        for address in buffer {
            let outcome = try! vcpu.access(address, .read(.user), size: 8)
            guard case .completed(let gpa, let value) = outcome.result, gpa.rawValue == value else {
                preconditionFailure("population: \(address) came to \(outcome.result)")
            }
            exits &+= outcome.exits
        }
        return exits
    }
}

/// Writes every target once (with dirty logging on, each a fault that logs the page and makes its
/// SPTE writable). Returns the exits.
@inline(never)
public func writeEveryPage(_ vcpu: VCPU, _ targets: [GuestVirtualAddress]) -> Int {
    var exits = 0
    for address in targets {
        let outcome = try! vcpu.access(address, .write(.user), size: 8, value: address.rawValue)
        guard case .completed = outcome.result else { preconditionFailure("\(address) came to \(outcome.result)") }
        exits &+= outcome.exits
    }
    return exits
}

/// One round of a live migration's dirty-log loop over memslot 0 with manual protection:
/// KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of everything it returned (which write-protects
/// those pages again). Returns the pages the log named.
@inline(never)
public func collectAndClearDirtyLog(_ vm: VirtualMachine) -> Int {
    let (bitmap, _) = try! vm.getDirtyLogBitmap(slot: 0)
    try! vm.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap)
    return bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
}

/// The first `count` targets of a TDP fixture at KVM's fault handler alone (the `kvm-tdp-fault-4k`
/// kernel): what the vCPU's EPT-violation exit hands `kvm_mmu_page_fault` — the guest-physical
/// address and the error code `__vmx_handle_ept_violation` makes of a read of the final
/// translation — with no hardware walk, exit or retried access around it. (KVM's `vcpu_run` holds
/// the memslots' srcu across the whole run, so the fault itself does not take it.) Returns the
/// faults fixed.
@inline(never)
public func runKVMTDPFaults(_ fixture: TDPFaultFixture, count: Int) -> Int {
    let mmu = fixture.guest.vm.tdp!
    let root = fixture.root
    let errorCode = TDPMMU.errorCode(forEPTViolation: [.dataRead, .linearAddressValid, .finalTranslation])
    return fixture.targetGPAs.withUnsafeBufferPointer { buffer in
        var fixed = 0
        for index in 0..<count {
            if case .fixed = try! mmu.pageFault(at: buffer[index], errorCode: errorCode, root: root) { fixed += 1 }
        }
        return fixed
    }
}

/// Populates `bytes` of `vcpu`'s guest-physical memory from `first` with KVM_PRE_FAULT_MEMORY
/// calls of at most `chunk` bytes each (the `tdp-prefault-4g` kernels): one prefetch fault a page,
/// no guest access. Returns the calls made.
@inline(never)
public func runPreFault(_ vcpu: VCPU, from first: UInt64 = 0, bytes: UInt64, chunk: UInt64 = .max) -> Int {
    var calls = 0
    var start = first
    let end = first + bytes
    while start < end {
        var range = PreFaultRange(gpa: GuestPhysicalAddress(start), size: min(chunk, end - start))
        while range.size > 0 {
            try! vcpu.preFaultMemory(&range)
            calls += 1
        }
        start += min(chunk, end - start)
    }
    return calls
}
