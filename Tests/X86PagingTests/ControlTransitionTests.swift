// `PagingRegisters.transitionFault(to:cpu:)` checked exhaustively over the bits its rules read,
// against the #GP conditions of each instruction as the SDM lists them (vol. 2: MOV to CR0, MOV to
// CR4, WRMSR IA32_EFER), written here one instruction at a time and independently of the function.

import Testing
import X86Paging

private let cd = CR0(rawValue: 1 << 30)
private let nw = CR0(rawValue: 1 << 29)

/// Every combination of the bits the rules read: CR0.PE/PG/CD/NW, CR4.PAE/LA57/PCIDE,
/// EFER.LME/NXE, and CR3 bits 11:0 zero or not.
private func allStates() -> [PagingRegisters] {
    var states: [PagingRegisters] = []
    for bits in 0..<(1 << 10) {
        var r = PagingRegisters()
        func on(_ bit: Int) -> Bool { bits & (1 << bit) != 0 }
        if on(0) { r.cr0.insert(.protectionEnable) }
        if on(1) { r.cr0.insert(.paging) }
        if on(2) { r.cr0.formUnion(cd) }
        if on(3) { r.cr0.formUnion(nw) }
        if on(4) { r.cr4.insert(.physicalAddressExtension) }
        if on(5) { r.cr4.insert(.la57) }
        if on(6) { r.cr4.insert(.pcidEnable) }
        if on(7) { r.efer.insert(.longModeEnable) }
        if on(8) { r.efer.insert(.noExecuteEnable) }
        r.cr3 = 0x10_0000 | (on(9) ? 0x5 : 0)
        states.append(r.withComputedLongModeActive)
    }
    return states
}

/// A state the processor can be in (every instruction that got there was allowed).
private func isReachable(_ r: PagingRegisters, cpu: CPUModel) -> Bool {
    !(r.cr0.contains(.paging) && !r.cr0.contains(.protectionEnable))
        && !(r.cr0.contains(nw) && !r.cr0.contains(cd))
        && !(r.isLongModeActive && !r.cr4.contains(.physicalAddressExtension))
        && !(r.cr4.contains(.pcidEnable) && !r.isLongModeActive)
        && !(r.cr4.contains(.la57) && !cpu.supportsLA57)
        && !(r.efer.contains(.noExecuteEnable) && !cpu.supportsNX)
}

/// MOV to CR0 of `new.cr0` from `old`: does it raise #GP?
private func movCR0Faults(_ old: PagingRegisters, _ newCR0: CR0) -> Bool {
    let settingPG = newCR0.contains(.paging) && !old.cr0.contains(.paging)
    let clearingPG = !newCR0.contains(.paging) && old.cr0.contains(.paging)
    return (newCR0.contains(.paging) && !newCR0.contains(.protectionEnable))
        || (newCR0.contains(nw) && !newCR0.contains(cd))
        || (settingPG && old.efer.contains(.longModeEnable) && !old.cr4.contains(.physicalAddressExtension))
        || (clearingPG && old.cr4.contains(.pcidEnable))
}

/// MOV to CR4 of `newCR4` from `old`.
private func movCR4Faults(_ old: PagingRegisters, _ newCR4: CR4, cpu: CPUModel) -> Bool {
    let lma = old.isLongModeActive
    let settingPCIDE = newCR4.contains(.pcidEnable) && !old.cr4.contains(.pcidEnable)
    return (newCR4.contains(.la57) && !cpu.supportsLA57)
        || (lma && !newCR4.contains(.physicalAddressExtension))
        || (lma && newCR4.contains(.la57) != old.cr4.contains(.la57))
        || (settingPCIDE && (old.cr3 & 0xFFF != 0 || !lma))
}

/// WRMSR to IA32_EFER of `newEFER` from `old` (LMA as the processor computes it).
private func wrmsrEFERFaults(_ old: PagingRegisters, _ newEFER: EFER, cpu: CPUModel) -> Bool {
    (newEFER.contains(.noExecuteEnable) && !cpu.supportsNX)
        || (old.cr0.contains(.paging) && newEFER.contains(.longModeEnable) != old.efer.contains(.longModeEnable))
}

@Suite("Control-register transitions (SDM #GP rules)")
struct ControlTransitionTests {
    static let cpus = [CPUModel(supportsLA57: true, supportsNX: true), CPUModel(supportsLA57: false, supportsNX: true),
                       CPUModel(supportsLA57: true, supportsNX: false)]

    /// Every single-register write from every reachable state: the function faults exactly when the
    /// instruction does, and what it allows leaves a reachable state.
    @Test(arguments: cpus.indices)
    func everySingleRegisterWriteMatchesTheInstruction(cpuIndex: Int) {
        let cpu = Self.cpus[cpuIndex]
        let states = allStates()
        var checked = 0
        for old in states where isReachable(old, cpu: cpu) {
            for target in states {
                // The three writes: only CR0, only CR4, only EFER changes (CR3 never does here).
                var cr0Write = old
                cr0Write.cr0 = target.cr0
                var cr4Write = old
                cr4Write.cr4 = target.cr4
                var eferWrite = old
                eferWrite.efer = target.efer
                let cases: [(PagingRegisters, Bool, String)] = [
                    (cr0Write.withComputedLongModeActive, movCR0Faults(old, target.cr0), "MOV CR0"),
                    (cr4Write.withComputedLongModeActive, movCR4Faults(old, target.cr4, cpu: cpu), "MOV CR4"),
                    (eferWrite.withComputedLongModeActive, wrmsrEFERFaults(old, target.efer, cpu: cpu), "WRMSR EFER"),
                ]
                for (new, faults, what) in cases {
                    let fault = old.transitionFault(to: new, cpu: cpu)
                    #expect((fault != nil) == faults,
                            "\(what) from \(old) to \(new): SDM says \(faults ? "#GP" : "ok"), got \(fault.map { "\($0)" } ?? "ok")")
                    if fault == nil { #expect(isReachable(new, cpu: cpu), "\(what) from \(old) to \(new)") }
                    checked += 1
                }
            }
        }
        #expect(checked > 10_000)
    }

    /// The mode switches an OS makes, step by step, are all allowed; the shortcuts are refused
    /// with the rule that forbids them.
    @Test func modeSwitchSequences() {
        let cpu = CPUModel()
        let long4 = PagingRegisters(cr0: [.protectionEnable, .paging], cr3: 0x1000, cr4: [.physicalAddressExtension],
                                    efer: [.longModeEnable]).withComputedLongModeActive
        // 4-level -> PAE: PG off, LME off, PG on.
        var step = long4
        var steps: [PagingRegisters] = []
        step.cr0.remove(.paging); steps.append(step.withComputedLongModeActive)
        step.efer.remove(.longModeEnable); steps.append(step.withComputedLongModeActive)
        step.cr0.insert(.paging); steps.append(step.withComputedLongModeActive)
        var previous = long4
        for next in steps {
            #expect(previous.transitionFault(to: next, cpu: cpu) == nil)
            previous = next
        }
        #expect(previous.mode == .pae)

        var noLME = long4
        noLME.efer.remove(.longModeEnable)
        #expect(long4.transitionFault(to: noLME.withComputedLongModeActive, cpu: cpu) == .longModeEnableChangedWithPaging)
        var la57 = long4
        la57.cr4.insert(.la57)
        #expect(long4.transitionFault(to: la57, cpu: cpu) == .la57ChangedInLongMode)
        var noPAE = long4
        noPAE.cr4.remove(.physicalAddressExtension)
        #expect(long4.transitionFault(to: noPAE, cpu: cpu) == .paeClearedInLongMode)
        var pcid = long4
        pcid.cr4.insert(.pcidEnable)
        #expect(long4.transitionFault(to: pcid, cpu: cpu) == nil)
        var pcidLow = long4
        pcidLow.cr3 |= 1
        var pcidLowNew = pcidLow
        pcidLowNew.cr4.insert(.pcidEnable)
        #expect(pcidLow.transitionFault(to: pcidLowNew, cpu: cpu) == .pcidEnabledWithNonZeroCR3Low)
        var leaving = pcid
        leaving.cr0.remove(.paging)
        #expect(pcid.transitionFault(to: leaving.withComputedLongModeActive, cpu: cpu) == .pcidOutsideLongMode)
        var legacyPCID = PagingRegisters(cr0: [.protectionEnable, .paging], cr4: [.physicalAddressExtension])
        let before = legacyPCID
        legacyPCID.cr4.insert(.pcidEnable)
        #expect(before.transitionFault(to: legacyPCID, cpu: cpu) == .pcidOutsideLongMode)
        for fault in ControlTransitionFault.allCases { #expect(!fault.description.isEmpty) }
    }

    @Test func computedLongModeActiveAndPendingMode() {
        let off = PagingRegisters(cr0: [.protectionEnable], cr4: [.physicalAddressExtension, .la57],
                                  efer: [.longModeEnable, .longModeActive])
        #expect(!off.withComputedLongModeActive.efer.contains(.longModeActive))
        #expect(off.mode == .disabled)
        #expect(off.modeWithPagingOn == .fiveLevel)
        var on = off
        on.cr0.insert(.paging)
        on.efer.remove(.longModeActive)
        #expect(on.withComputedLongModeActive.efer.contains(.longModeActive))
    }
}
