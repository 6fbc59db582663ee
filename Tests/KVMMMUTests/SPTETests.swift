import Testing
import X86Paging
@testable import KVMMMU

private let x86 = SPTEMasks.shadowPaging
private let eptAD = SPTEMasks.ept(accessedDirty: true, executeOnly: false)
private let eptNoAD = SPTEMasks.ept(accessedDirty: false, executeOnly: false)
private let eptExecOnly = SPTEMasks.ept(accessedDirty: true, executeOnly: true)
private let allMasks: [SPTEMasks] = [x86, eptAD, eptNoAD, eptExecOnly]

private func bit(_ n: UInt64) -> UInt64 { 1 << n }

@Suite struct SPTEMaskTests {
    @Test func x86MasksAreKVMDefaults() {
        #expect(x86.present == bit(0) && x86.user == bit(2) && x86.x == 0 && x86.nx == bit(63))
        #expect(x86.accessed == bit(5) && x86.dirty == bit(6))
        #expect(x86.hostWritable == bit(9) && x86.mmuWritable == bit(10))
        #expect(x86.accTrack == 0 && x86.memoryType == 0 && x86.accessedDirtyEnabled && !x86.isEPT)
        #expect(x86.mmioValue == bit(51) | bit(0) && x86.mmioMask == x86.mmioValue && x86.mmioAccessMask == 6)
        #expect(x86.isMMIOCachingEnabled)
        let wide = SPTEMasks.shadowPaging(hostPhysicalAddressBits: 52)
        #expect(!wide.isMMIOCachingEnabled && wide.mmioValue == 0)
    }

    @Test func eptMasksAreKVMs() {
        #expect(eptAD.present == bit(0) | bit(63) && eptExecOnly.present == bit(63))
        #expect(eptAD.user == bit(0) && eptAD.x == bit(2) && eptAD.nx == 0)
        #expect(eptAD.accessed == bit(8) && eptAD.dirty == bit(9))
        #expect(eptNoAD.accessed == bit(8) && eptNoAD.dirty == bit(9) && !eptNoAD.accessedDirtyEnabled)
        #expect(eptAD.hostWritable == bit(57) && eptAD.mmuWritable == bit(58))
        #expect(eptAD.accTrack == 7 && eptAD.memoryType == 0x70)
        #expect(eptAD.mmioValue == 0b110 && eptAD.mmioMask == 7 | bit(63) && eptAD.mmioAccessMask == 0)
    }

    /// Software bits must not collide with each other or with what hardware reads.
    @Test func softwareBitsAreDisjoint() {
        for masks in allMasks {
            let software = [SPTE.mmuPresentBit, masks.hostWritable, masks.mmuWritable, SPTE.adMask,
                            SPTE.accTrackSavedBits << SPTE.accTrackSavedShift]
            var seen: UInt64 = 0
            for field in software {
                #expect(seen & field == 0)
                seen |= field
            }
            #expect(seen & SPTE.baseAddressMask == 0)
            #expect(seen & (masks.present | masks.user | masks.x | masks.nx | masks.accessed | masks.dirty) == 0)
        }
    }
}

@Suite struct SPTEConstructorTests {
    let pfn = HostFrameNumber(0x1234)

    @Test func nonLeafByHand() {
        // MMU-present 0x800 | pfn | P W U (7) | A 0x20.
        #expect(SPTE.nonLeaf(child: pfn, adDisabled: false, masks: x86).rawValue == 0x123_4827)
        // A/D disabled: type 1 in bits 52-53 instead of A.
        #expect(SPTE.nonLeaf(child: pfn, adDisabled: true, masks: x86).rawValue == 0x0010_0000_0123_4807)
        // EPT: 0x800 | pfn | R (present, user) W X | SVE | A 0x100.
        #expect(SPTE.nonLeaf(child: pfn, adDisabled: false, masks: eptAD).rawValue == 0x8000_0000_0123_4907)
        #expect(SPTE.nonLeaf(child: pfn, adDisabled: false, masks: eptExecOnly).rawValue == 0x8000_0000_0123_4907)
        for masks in allMasks {
            let spte = SPTE.nonLeaf(child: pfn, adDisabled: false, masks: masks)
            #expect(spte.isShadowPresent && !spte.isLarge && !spte.isLast(level: 2) && spte.isWritable)
            #expect(spte.isExecutable(masks) && spte.pfn == pfn && !spte.isMMIO(masks))
        }
    }

    @Test func x86LeafByHand() {
        // 0x800 | P | A 0x20 | U 4 | host-writable 0x200 | pfn | W 2 | MMU-writable 0x400 | D 0x40.
        let rw = SPTE.leaf(pfn: pfn, level: 1, access: ACC.all, hostWritable: true, writable: true, masks: x86)
        #expect(rw.rawValue == 0x123_4E67)
        // No exec: NX; level 2: PS; not writable: no W, MMU-writable, D.
        let ro = SPTE.leaf(pfn: pfn, level: 2, access: ACC.user, hostWritable: true, writable: false, masks: x86)
        #expect(ro.rawValue == bit(63) | 0x123_4000 | 0x800 | 0x200 | 0x80 | 0x20 | 0x4 | 0x1)
        // Without host-writable the write decision is dropped, as make_spte strips ACC_WRITE.
        let hostRO = SPTE.leaf(pfn: pfn, level: 1, access: ACC.all, hostWritable: false, writable: true, masks: x86)
        #expect(!hostRO.isWritable && !hostRO.isMMUWritable(x86) && !hostRO.isHostWritable(x86) && !hostRO.isDirty(x86))
        // Not accessed (prefetch), supervisor-only.
        let prefetch = SPTE.leaf(pfn: pfn, level: 1, access: ACC.exec, hostWritable: true, writable: false,
                                 accessed: false, masks: x86)
        #expect(prefetch.rawValue == 0x123_4000 | 0x800 | 0x200 | 0x1)
    }

    @Test func eptLeafByHand() {
        let rw = SPTE.leaf(pfn: pfn, level: 1, access: ACC.all, hostWritable: true, writable: true, masks: eptAD)
        let expected: UInt64 = 0x800 | bit(63) | bit(0) | bit(8) | bit(2) | 0x70 | bit(57) | 0x123_4000
            | bit(1) | bit(58) | bit(9)
        #expect(rw.rawValue == expected)
        let adOff = SPTE.leaf(pfn: pfn, level: 3, access: ACC.exec, hostWritable: true, writable: false,
                              adDisabled: true, masks: eptNoAD)
        #expect(adOff.adState == .disabled && adOff.isLarge && adOff.isLast(level: 3) && adOff.isExecutable(eptNoAD))
        let wrprot = SPTE.leaf(pfn: pfn, level: 1, access: ACC.all, hostWritable: true, writable: true,
                               adState: .wrprotOnly, masks: eptAD)
        #expect(wrprot.adState == .wrprotOnly && wrprot.isADEnabled && wrprot.needsADWriteProtect)
    }

    @Test func eptWriteExecuteWithoutReadIsNotMMIOThanksToSuppressVE() {
        let spte = SPTE.leaf(pfn: pfn, level: 1, access: ACC.exec | ACC.write, hostWritable: true, writable: true,
                             masks: eptExecOnly)
        #expect(spte.rawValue & 7 == 0b110)
        #expect(!spte.isMMIO(eptExecOnly) && spte.isShadowPresent)
    }

    /// Every leaf make_spte can build is in one of the four writable states of spec 6.2.
    @Test func leavesSatisfyWritableInvariants() {
        for masks in allMasks {
            for hostWritable in [false, true] {
                for writable in [false, true] {
                    for access in UInt8(0)...7 {
                        let spte = SPTE.leaf(pfn: pfn, level: 1, access: access, hostWritable: hostWritable,
                                             writable: writable, masks: masks)
                        #expect(spte.checkWritableInvariants(masks))
                        #expect(spte.isWritable == (writable && hostWritable))
                        #expect(spte.isWritable == spte.isDirty(masks), "W comes with D")
                        #expect(spte.isExecutable(masks) == (access & ACC.exec != 0))
                        #expect(spte.isAccessed(masks) && spte.isShadowPresent && spte.pfn == pfn)
                    }
                }
            }
        }
    }

    @Test func writableInvariantTable() {
        for masks in allMasks {
            for host in [false, true] {
                for mmu in [false, true] {
                    for w in [false, true] {
                        var bits = SPTE.mmuPresentBit
                        if host { bits |= masks.hostWritable }
                        if mmu { bits |= masks.mmuWritable }
                        if w { bits |= SPTE.writableBit }
                        let valid = (host && mmu && w) || (host && mmu && !w) || (host && !mmu && !w) || (!host && !mmu && !w)
                        #expect(SPTE(bits).checkWritableInvariants(masks) == valid, "host \(host) mmu \(mmu) W \(w)")
                    }
                }
            }
        }
    }
}

@Suite struct SPTEPredicateTests {
    @Test func nonPresentAndFrozen() {
        #expect(SPTE.nonPresent.rawValue == 0)
        #expect(SPTE.frozen.rawValue == 0x5a0 && SPTE.frozen.isFrozen)
        for masks in allMasks {
            for spte in [SPTE.nonPresent, SPTE.frozen] {
                #expect(!spte.isShadowPresent && !spte.isMMIO(masks))
            }
        }
    }

    @Test func lastAndLarge() {
        let small = SPTE(SPTE.mmuPresentBit)
        let large = SPTE(SPTE.mmuPresentBit | SPTE.pageSizeBit)
        #expect(small.isLast(level: 1) && !small.isLast(level: 2) && !small.isLarge)
        #expect(large.isLast(level: 2) && large.isLast(level: 3) && large.isLarge)
    }

    @Test func adStates() {
        let base = SPTE.mmuPresentBit
        #expect(SPTE(base).adState == .enabled && SPTE(base).isADEnabled && !SPTE(base).needsADWriteProtect)
        #expect(SPTE(base | 1 << 52).adState == .disabled && !SPTE(base | 1 << 52).isADEnabled)
        #expect(SPTE(base | 2 << 52).adState == .wrprotOnly && SPTE(base | 2 << 52).needsADWriteProtect)
        #expect(SPTE(base | 3 << 52).adState == nil)
    }

    @Test func accessTrackingWithoutAD() {
        let masks = eptNoAD
        let spte = SPTE.leaf(pfn: HostFrameNumber(0x42), level: 1, access: ACC.all, hostWritable: true,
                             writable: true, adDisabled: true, masks: masks)
        #expect(!spte.isAccessTracked(masks))
        let tracked = spte.markedForAccessTrack(masks)
        #expect(tracked.isAccessTracked(masks) && tracked.isShadowPresent)
        #expect(tracked.rawValue & 7 == 0, "hardware sees it not present")
        #expect(tracked.rawValue & (1 << 54) != 0 && tracked.rawValue & (1 << 56) != 0, "R and X saved")
        #expect(!tracked.isAccessed(masks) && !tracked.isWritable)
        #expect(tracked.markedForAccessTrack(masks) == tracked, "idempotent")
        #expect(tracked.checkWritableInvariants(masks), "MMU-writable without W is a valid state")
        let restored = tracked.restoredFromAccessTrack(masks)
        // R and X come back; W and A do not (W returns through a write fault).
        #expect(restored.rawValue == spte.rawValue & ~(SPTE.writableBit | masks.accessed))
        #expect(!restored.isAccessTracked(masks))

        // Execute-only: only X is saved and restored.
        let xOnly = SPTE.leaf(pfn: HostFrameNumber(0x42), level: 1, access: ACC.exec, hostWritable: true,
                              writable: false, adDisabled: true, masks: eptExecOnly)
        let xTracked = xOnly.markedForAccessTrack(eptExecOnly)
        #expect(xTracked.rawValue & (1 << 54) == 0 && xTracked.rawValue & (1 << 56) != 0)
        #expect(xTracked.restoredFromAccessTrack(eptExecOnly).rawValue == xOnly.rawValue & ~eptExecOnly.accessed)
    }

    @Test func accessTrackingWithADClearsOnlyA() {
        for masks in [x86, eptAD] {
            let spte = SPTE.leaf(pfn: HostFrameNumber(7), level: 1, access: ACC.all, hostWritable: true,
                                 writable: true, masks: masks)
            let marked = spte.markedForAccessTrack(masks)
            #expect(marked.rawValue == spte.rawValue & ~masks.accessed)
            #expect(!marked.isAccessTracked(masks), "A/D-enabled SPTEs are never access-tracked")
        }
    }

    @Test func writeProtection() {
        let spte = SPTE.leaf(pfn: HostFrameNumber(9), level: 1, access: ACC.all, hostWritable: true, writable: true, masks: x86)
        let dirtyLog = spte.writeProtected(forPageTable: false, masks: x86)
        #expect(dirtyLog != nil && !dirtyLog!.isWritable && dirtyLog!.isMMUWritable(x86))
        #expect(SPTE.leafChangeNeedsTLBFlush(old: spte, new: dirtyLog!, masks: x86) == false)
        #expect(dirtyLog!.needsAtomicUpdate(x86), "fast page fault may set W again")
        let shadowed = spte.writeProtected(forPageTable: true, masks: x86)
        #expect(shadowed != nil && !shadowed!.isWritable && !shadowed!.isMMUWritable(x86))
        #expect(shadowed!.checkWritableInvariants(x86))
        #expect(SPTE.leafChangeNeedsTLBFlush(old: spte, new: shadowed!, masks: x86))
        #expect(shadowed!.writeProtected(forPageTable: true, masks: x86) == nil)
        #expect(dirtyLog!.writeProtected(forPageTable: false, masks: x86) == nil)
        #expect(!spte.needsAtomicUpdate(x86), "writable and dirty: nothing can change under us")
    }

    @Test func describe() {
        let spte = SPTE.leaf(pfn: HostFrameNumber(0x1234), level: 2, access: ACC.all, hostWritable: true, writable: true, masks: x86)
        #expect(spte.describe(x86) == "0x1234ee7 (rwxu) pfn 0x1234 PS A D host-writable mmu-writable")
        #expect(SPTE.nonPresent.describe(x86) == "0x0 not present")
        #expect(spte.description == "spte 0x1234ee7")
    }
}

@Suite struct MMIOSPTETests {
    /// Boundary generations: the ends, each half's edges, every single bit, and alternating patterns.
    static let generations: [UInt64] = {
        var values: [UInt64] = [0, 1, 0xFE, 0xFF, 0x100, 0x101, 0x1FF, 0x7FF00, 0x7FFFE, 0x7FFFF, 0x55555, 0x2AAAA, 0x3FFFF, 0x40000]
        values += (0..<19).map { UInt64(1) << $0 }
        return values
    }()

    @Test(arguments: generations)
    func generationRoundTrips(_ generation: UInt64) {
        for masks in [x86, eptAD] {
            let spte = SPTE.mmio(gfn: GuestFrameNumber(0xABCDE), access: ACC.all, generation: generation, masks: masks)
            #expect(spte.mmioGeneration == generation)
            #expect(spte.isMMIO(masks) && !spte.isShadowPresent)
            #expect(spte.mmioGFN(masks) == GuestFrameNumber(0xABCDE))
            // The generation lands in bits 3-10 and 52-62 only.
            let genBits = spte.rawValue & (bitRange(3, 10) | bitRange(52, 62))
            #expect(genBits == ((generation & 0xFF) << 3) | ((generation >> 8) << 52))
        }
    }

    @Test func generationKeepsOnlyNineteenBits() {
        for generation: UInt64 in [0x80000, 0xFFFF_FFFF, 0x1_2345_6789, .max] {
            let spte = SPTE.mmio(gfn: GuestFrameNumber(1), access: 0, generation: generation, masks: x86)
            #expect(spte.mmioGeneration == generation & 0x7FFFF)
        }
    }

    @Test func gfnRoundTripsUpToHostMAXPHYADDR() {
        for bits in [36, 46, 51] {
            let masks = SPTEMasks.shadowPaging(hostPhysicalAddressBits: bits)
            for gfn: UInt64 in [0, 1, 0x5555, (1 << UInt64(bits - 12)) - 1, 1 << UInt64(bits - 13)] {
                let spte = SPTE.mmio(gfn: GuestFrameNumber(gfn), access: ACC.write, generation: 0x7FFFF, masks: masks)
                #expect(spte.mmioGFN(masks) == GuestFrameNumber(gfn))
                #expect(spte.isMMIO(masks))
            }
        }
        let ept52 = SPTEMasks.ept(accessedDirty: true, executeOnly: true, hostPhysicalAddressBits: 52)
        let top = GuestFrameNumber((1 << 40) - 1)
        #expect(SPTE.mmio(gfn: top, access: 0, generation: 3, masks: ept52).mmioGFN(ept52) == top)
    }

    @Test func accessKeepsOnlyTheMMIOAccessBits() {
        let x = SPTE.mmio(gfn: GuestFrameNumber(5), access: ACC.all, generation: 0, masks: x86)
        #expect(x.mmioAccess(x86) == ACC.write | ACC.user)
        #expect(x.rawValue == bit(51) | 0x5000 | 0b111, "P, W, U + reserved bit 51")
        let e = SPTE.mmio(gfn: GuestFrameNumber(5), access: ACC.all, generation: 0, masks: eptAD)
        #expect(e.mmioAccess(eptAD) == 0)
        #expect(e.rawValue == 0x5000 | 0b110)
    }

    @Test func presentSPTEsAreNeverMMIO() {
        for masks in allMasks {
            for access in UInt8(0)...7 {
                let spte = SPTE.leaf(pfn: HostFrameNumber(0x3_FFFF_FFFF), level: 1, access: access,
                                     hostWritable: true, writable: true, masks: masks)
                #expect(!spte.isMMIO(masks))
            }
        }
    }

    @Test func mmioCachingOffMeansNothingIsMMIO() {
        let wide = SPTEMasks.shadowPaging(hostPhysicalAddressBits: 52)
        #expect(!SPTE(0).isMMIO(wide) && !SPTE(bit(51) | 1).isMMIO(wide))
    }

    @Test func describeMMIO() {
        let spte = SPTE.mmio(gfn: GuestFrameNumber(0xFEE00), access: ACC.write, generation: 0x123, masks: x86)
        #expect(spte.describe(x86) == "\(hex(spte.rawValue)) mmio gfn 0xfee00 access w-- gen 0x123")
    }
}
