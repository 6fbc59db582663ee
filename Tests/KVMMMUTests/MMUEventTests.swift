import Dispatch
import Testing
import X86Paging
@testable import KVMMMU

/// One of every event, in `MMUEvent.allNames` order.
private let sampleEvents: [MMUEvent] = {
    let role = PageRole(level: 1, hasFourByteGPTE: true, quadrant: 1, isDirect: true, access: ACC.all, eferNX: true)
    let spte = SPTE(0x8000_0000_0123_4907)
    return [
        .kvmMMUPagetableWalk(address: 0xFFFF_8000_0000_1000, pferr: [.write, .user]),
        .kvmMMUPagingElement(pte: 0x1234_5067, level: 4),
        .kvmMMUSetAccessedBit(gpa: GuestPhysicalAddress(0x1008)),
        .kvmMMUSetDirtyBit(gpa: GuestPhysicalAddress(0x2010)),
        .kvmMMUWalkerError(pferr: [.present, .fetch]),
        .kvmMMUGetPage(gfn: GuestFrameNumber(0x1234), role: role, created: true),
        .kvmMMUSyncPage(gfn: GuestFrameNumber(0x10), role: role),
        .kvmMMUUnsyncPage(gfn: GuestFrameNumber(0x11), role: role),
        .kvmMMUPrepareZapPage(gfn: GuestFrameNumber(0x12), role: role),
        .markMMIOSPTE(gfn: GuestFrameNumber(0xFEE00), access: 6, generation: 0x42),
        .handleMMIOPageFault(address: 0xFEE0_0030, gfn: GuestFrameNumber(0xFEE00), access: 6),
        .fastPageFault(vcpuID: 1, address: 0x7000, errorCode: [.present, .write], oldSPTE: SPTE(0x5_0a05),
                       newSPTE: SPTE(0x5_0a07), spurious: false, fixed: true),
        .kvmMMUZapAllFast(mmuValidGen: 1, usedPages: 31),
        .checkMMIOSPTE(spte: SPTE(0x8_0000_0000_5006), kvmGeneration: 3, spteGeneration: 2),
        .kvmMMUSetSPTE(level: 1, gfn: GuestFrameNumber(0x1234), spte: spte),
        .kvmMMUSPTERequested(gfn: GuestFrameNumber(0x1234), pfn: HostFrameNumber(0x5678), level: 2),
        .kvmTDPMMUSPTEChanged(addressSpaceID: 0, gfn: GuestFrameNumber(0x200), level: 2, old: SPTE.nonPresent, new: spte),
        .kvmMMUSplitHugePage(gfn: GuestFrameNumber(0x200), spte: spte, level: 2, errno: -12),
        .kvmPageFault(vcpuID: 0, address: 0x7000, errorCode: [.write]),
        .kvmSPPSetSubpages(vcpuID: nil, gfn: GuestFrameNumber(0x1234), access: 0xFFFF_0000),
        .kvmSPPInducedExit(vcpuID: 2, gpa: GuestPhysicalAddress(0x123_4080), qualification: .sppTableMiss),
        .kvmSPPInducedPageFault(vcpuID: 1, gpa: GuestPhysicalAddress(0x123_4100), instructionLength: 3),
    ]
}()

@Suite struct MMUEventTests {
    @Test func namesAreTheTracepointNames() {
        #expect(sampleEvents.map(\.name) == MMUEvent.allNames)
        #expect(Set(MMUEvent.allNames).count == MMUEvent.allNames.count)
    }

    @Test func descriptionsFollowTPPrintk() {
        let text = sampleEvents.map(\.description)
        #expect(text[0] == "addr ffff800000001000 pferr 6 W|U")
        #expect(text[1] == "pte 12345067 level 4")
        #expect(text[2] == "gpa 1008")
        #expect(text[4] == "pferr 11 P|F")
        #expect(text[5] == "sp gfn 1234 l1 4-byte q1 direct wux nxe ad new")
        #expect(text[8] == "sp gfn 12 l1 4-byte q1 direct wux nxe ad")
        #expect(text[9] == "gfn fee00 access 6 gen 42")
        #expect(text[10] == "addr:fee00030 gfn fee00 access 6")
        #expect(text[11] == "vcpu 1 gva 7000 error_code P|W old 0x50a05 new 50a07 spurious 0 fixed 1")
        #expect(text[12] == "kvm-mmu-valid-gen 1 used_pages 1f")
        #expect(text[13] == "spte 8000000005006 kvm_gen 3 spte-gen 2 valid 0")
        #expect(text[14] == "gfn 1234 spte 8000000001234907 level 1")
        #expect(text[15] == "gfn 1234 pfn 5678 level 2")
        #expect(text[16] == "as id 0 gfn 200 level 2 old_spte 0 new_spte 8000000001234907")
        #expect(text[17] == "gfn 200 spte 8000000001234907 level 2 errno -12")
        #expect(text[19] == "gfn 1234 access ffff0000")
        #expect(MMUEvent.kvmSPPSetSubpages(vcpuID: 3, gfn: GuestFrameNumber(0x10), access: 0).description
                == "vcpu 3 gfn 10 access 0")
        #expect(text[20] == "vcpu 2 gpa 1234080 qualification 800")
        #expect(text[21] == "vcpu 1 gpa 1234100 insn_len 3")
        let x86Leaf = SPTE.leaf(pfn: HostFrameNumber(0x99), level: 1, access: ACC.user, hostWritable: true,
                                writable: true, masks: .shadowPaging)
        let setSPTE = MMUEvent.kvmMMUSetSPTE(level: 1, gfn: GuestFrameNumber(0x99), spte: x86Leaf)
        #expect(setSPTE.description(masks: .shadowPaging) == "gfn 99 spte \(String(x86Leaf.rawValue, radix: 16)) (rw-u) level 1")
        #expect(sampleEvents[14].description(masks: .ept(accessedDirty: true, executeOnly: false)).contains("(rwxu) level 1"))
    }
}

/// Counts how often an event is actually built.
private final class BuildCounter: @unchecked Sendable {
    var built = 0
    func event() -> MMUEvent {
        built += 1
        return .kvmMMUZapAllFast(mmuValidGen: 0, usedPages: built)
    }
}

@Suite struct MMUEventLogTests {
    @Test func offByDefaultAndDoesNotBuildEvents() {
        let log = MMUEventLog(capacity: 4)
        let counter = BuildCounter()
        #expect(!log.isRecording)
        log.record(counter.event())
        #expect(counter.built == 0)
        #expect(log.events.isEmpty && log.counts.isEmpty)
        log.isRecording = true
        log.record(counter.event())
        #expect(counter.built == 1 && log.events.count == 1)
        log.isRecording = false
        log.record(counter.event())
        #expect(counter.built == 1 && log.events.count == 1)
    }

    @Test func ringKeepsTheNewestInOrder() {
        let log = MMUEventLog(capacity: 3, recording: true)
        for event in sampleEvents.prefix(5) { log.record(event) }
        let kept = log.events
        #expect(kept.map(\.sequence) == [2, 3, 4])
        #expect(kept.map(\.event) == Array(sampleEvents[2..<5]))
        #expect(log.overwrittenCount == 2)
        #expect(log.count(of: "kvm_mmu_pagetable_walk") == 1, "counts include overwritten events")
        #expect(log.counts.values.reduce(0, +) == 5)
        log.record(sampleEvents[5])
        log.record(sampleEvents[5])
        #expect(log.events.map(\.sequence) == [4, 5, 6])
        #expect(log.count(of: "kvm_mmu_get_page") == 2)

        log.clear()
        #expect(log.events.isEmpty && log.counts.isEmpty && log.overwrittenCount == 0)
        log.record(sampleEvents[0])
        #expect(log.events.map(\.sequence) == [7], "sequence numbers are never reused")
    }

    @Test func ringWrapsManyTimes() {
        let log = MMUEventLog(capacity: 5, recording: true)
        for i in 0..<23 { log.record(.kvmMMUZapAllFast(mmuValidGen: 0, usedPages: i)) }
        #expect(log.events.map(\.sequence) == [18, 19, 20, 21, 22])
        #expect(log.events.map(\.event) == (18..<23).map { MMUEvent.kvmMMUZapAllFast(mmuValidGen: 0, usedPages: $0) })
        #expect(log.count(of: "kvm_mmu_zap_all_fast") == 23 && log.overwrittenCount == 18)
    }

    @Test func concurrentRecordingLosesNothing() {
        let log = MMUEventLog(capacity: 1000, recording: true)
        let threads = 8
        let perThread = 500
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            for i in 0..<perThread {
                log.record(.kvmPageFault(vcpuID: thread, address: UInt64(i), errorCode: []))
            }
        }
        let kept = log.events
        #expect(log.count(of: "kvm_page_fault") == threads * perThread)
        #expect(kept.count == 1000)
        #expect(kept.map(\.sequence) == Array(UInt64(threads * perThread - 1000)..<UInt64(threads * perThread)))
    }
}
