// The `nested` built-in workload: an L1 hypervisor (the scenario's guest, under KVM's TDP MMU with
// EPT) runs two L2 guests, each with its own EPTP, VPID and operating system: the processes
// workload's guest OS (boot tables, fork with copy-on-write, exec, demand paging, exit, context
// switches with and without PCIDs, KPTI) generated for each L2 and run in slices, L1 switching
// between the guests with vmexit and vmenter. L1 maps each guest's memory on demand: every first
// touch of a page exits with an EPT violation, L1's handler maps it and L2 executes the
// instruction again. Midway L1 splits one 2 MiB EPT page of each guest
// into 4 KiB ones (the same memory, as a hypervisor does to track a guest's writes) and later
// merges it back, each time with INVEPT. With `--vcpus 2` L1 runs each guest on a vCPU of its own
// (guest N on vCPU N), so the two vCPUs enter, leave and flush their guests' contexts apart while
// sharing `guest_mmu`'s pages. Every L2 access, L2 kernel table stores included, is checked in
// lockstep like any L2 access (docs/NESTED.md).

import X86Paging

extension WorkloadKind {
    /// L2 guests the `nested` workload runs.
    static let nestedGuests = 2
    /// L1-physical memory below the L2 guests' memory: L1's kernel pool (its EPT tables) and room.
    static let nestedL1Base: UInt64 = 32 << 20

    /// The part of an L2 guest's memory L1 maps 4 KiB at a time (the rest 2 MiB at a time).
    static let nestedLowMemory: UInt64 = 16 << 20

    /// Each L2 guest's memory: what the processes workload's guest needs (one vCPU).
    static func nestedGuestMemory(_ parameters: WorkloadParameters) -> UInt64 {
        WorkloadKind.processes.memorySize(l2Parameters(parameters, guest: 0))
    }

    /// An L2 guest's parameters: one vCPU, a seed of its own.
    static func l2Parameters(_ parameters: WorkloadParameters, guest: Int) -> WorkloadParameters {
        var l2 = parameters
        l2.vcpus = 1
        l2.seed = parameters.seed &+ UInt64(guest) &* 0x9E37_79B9
        return l2
    }

    func generateNested(_ parameters: WorkloadParameters) throws(WorkloadError) -> GeneratedWorkload {
        let guestMemory = Self.nestedGuestMemory(parameters)
        let chunk: UInt64 = 2 << 20
        var directives: [ScenarioDirective] = [.mem(bytes: Self.nestedL1Base + UInt64(Self.nestedGuests) * guestMemory),
                                               .l1(.ept(levels: 4, accessedDirty: true, executeOnly: false))]
        var phases = [WorkloadPhase(name: "L1 backs its L2 guests' memory", firstDirective: 0)]
        var expectedLoads: [Int: UInt64] = [:]
        func l1Base(_ guest: Int) -> UInt64 { Self.nestedL1Base + UInt64(guest) * guestMemory }
        func mapGuest(_ guest: Int, chunk index: UInt64) -> ScenarioDirective {
            .eptMap(EPTMapDirective(l2GPA: GuestPhysicalAddress(index * chunk), l1GPA: GuestPhysicalAddress(l1Base(guest) + index * chunk),
                                    pageSize: .size2M, permissions: [.read, .write, .execute], guest: guest))
        }
        // L1 maps a guest's memory as the guest touches it, from its EPT-violation handler: the
        // low 16 MiB (the L2 kernel's tables and window) a 4 KiB page at a time, the rest 2 MiB.
        let lowMemory = min(Self.nestedLowMemory, guestMemory)
        for guest in 0..<Self.nestedGuests {
            directives.append(.eptDemand(EPTDemandDirective(l2GPA: GuestPhysicalAddress(0), l1GPA: GuestPhysicalAddress(l1Base(guest)),
                                                            size: lowMemory, pageSize: .size4K,
                                                            permissions: [.read, .write, .execute], guest: guest)))
            if guestMemory > lowMemory {
                directives.append(.eptDemand(EPTDemandDirective(l2GPA: GuestPhysicalAddress(lowMemory),
                                                                l1GPA: GuestPhysicalAddress(l1Base(guest) + lowMemory),
                                                                size: guestMemory - lowMemory, pageSize: .size2M,
                                                                permissions: [.read, .write, .execute], guest: guest)))
            }
        }
        // Each guest's OS, as the processes workload has it, without the lines that are the VMM's or
        // L1's (memory size, vCPUs).
        var slices: [[(directive: ScenarioDirective, expectedLoad: UInt64?)]] = []
        let slicesPerGuest = max(2, parameters.iterations * 2)
        for guest in 0..<Self.nestedGuests {
            var os = GuestOS(parameters: Self.l2Parameters(parameters, guest: guest), memorySize: guestMemory)
            try os.quickBoot()
            try os.runProcesses()
            var operations: [(ScenarioDirective, UInt64?)] = [(.set(ControlSettings(writeProtect: true, noExecuteEnable: true,
                                                                                    pagingMode: .fourLevel)), nil)]
            for (index, directive) in os.directives.enumerated() {
                switch directive {
                case .mem, .cpu, .vcpu: continue
                default: operations.append((directive, os.expectedLoads[index]))
                }
            }
            let size = (operations.count + slicesPerGuest - 1) / slicesPerGuest
            for start in stride(from: 0, to: operations.count, by: size) {
                let slice = Array(operations[start..<min(start + size, operations.count)])
                slices.append(slice.map { (directive: $0.0, expectedLoad: $0.1) })
            }
        }
        // The guests take turns, a slice each; L1 splits and merges one EPT page of a guest.
        let splitChunk = guestMemory / chunk - 1
        let vcpus = max(1, min(parameters.vcpus, Self.nestedGuests))
        for round in 0..<slicesPerGuest {
            for guest in 0..<Self.nestedGuests {
                let index = guest * slicesPerGuest + round
                guard index < slices.count else { continue }
                // The guest's own vCPU is the one that changes its EPT and flushes it (INVEPT acts
                // on the logical processor that executes it).
                if vcpus > 1 { directives.append(.vcpu(guest % vcpus)) }
                if round == slicesPerGuest / 2 {
                    phases.append(WorkloadPhase(name: "L1 splits guest \(guest)'s EPT page", firstDirective: directives.count))
                    for page in 0..<UInt64(512) {
                        directives.append(.eptMap(EPTMapDirective(
                            l2GPA: GuestPhysicalAddress(splitChunk * chunk + page << 12),
                            l1GPA: GuestPhysicalAddress(l1Base(guest) + splitChunk * chunk + page << 12),
                            pageSize: .size4K, permissions: [.read, .write, .execute], guest: guest)))
                    }
                    directives.append(.invept(.single, guest: guest))
                } else if round == slicesPerGuest - 1 {
                    directives.append(mapGuest(guest, chunk: splitChunk))
                    directives.append(.invept(.single, guest: guest))
                }
                if round == 0 { phases.append(WorkloadPhase(name: "guest \(guest) boots", firstDirective: directives.count)) }
                directives.append(.vmenter(vpid: UInt16(guest + 1), guest: guest))
                for operation in slices[index] {
                    if let load = operation.expectedLoad { expectedLoads[directives.count] = load }
                    directives.append(operation.directive)
                }
                directives.append(.vmexit)
            }
        }
        let scenario: Scenario
        do {
            scenario = try Scenario(name: "<workload nested>", directives: directives)
        } catch {
            throw WorkloadError("nested: the generated operations do not parse (a bug in the generator): \(error)")
        }
        var ran = parameters
        ran.vcpus = vcpus  // one L1 vCPU, or one per L2 guest
        return GeneratedWorkload(kind: self, parameters: ran, scenario: scenario, phases: phases, expectedLoads: expectedLoads)
    }
}
