#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Testing
import Workloads
import X86Paging

@Suite("Scenario parser: directives and options")
struct ScenarioParserTests {
    @Test func emptyScenarioHasTheDefaults() throws {
        let scenario = try Scenario.parse("", name: "empty")
        #expect(scenario.name == "empty")
        #expect(scenario.directives.isEmpty)
        #expect(scenario.memorySize == 64 << 20)
        #expect(scenario.cpuModel.maxPhysicalAddressBits == 46)
        #expect(scenario.cpuModel.supports1GiBPages)
        #expect(scenario.cpuModel.supportsLA57)
        #expect(scenario.cpuModel.vendor == .intel)
        #expect(scenario.initialControls == ControlState.defaults)
        #expect(scenario.pagingMode == .fourLevel)
        let controls = scenario.initialControls
        #expect(controls.writeProtect && controls.noExecuteEnable)
        #expect(!controls.smep && !controls.smap && !controls.protectionKeys && !controls.alignmentCheck)
        #expect(controls.pkru == .allowAll)
    }

    @Test func commentsBlankLinesAndLineNumbers() throws {
        let text = """
            # a whole-line comment

            \tmem 16M   # trailing comment
               # indented comment
            reload-cr3#no space before the comment
            invlpg 0x1000 \r
            """
        let scenario = try Scenario.parse(text, name: "t")
        #expect(scenario.directives.map(\.line) == [3, 5, 6])
        #expect(scenario.directives[0].text == "\tmem 16M   # trailing comment")
        #expect(scenario.directives[1].directive == .reloadCR3)
        #expect(scenario.directives[2].text == "invlpg 0x1000 ")
        #expect(scenario.memorySize == 16 << 20)
    }

    @Test func crlfLineEndings() throws {
        let scenario = try Scenario.parse("mem 8M\r\nset wp=0\r\n\r\ninvlpg 0x2000\r\n", name: "t")
        #expect(scenario.directives.map(\.line) == [1, 2, 4])
        #expect(scenario.directives.map(\.text) == ["mem 8M", "set wp=0", "invlpg 0x2000"])
    }

    @Test(arguments: [
        ("mem 64M", UInt64(64) << 20), ("mem 2G", 2 << 30), ("mem 4096", 4096), ("mem 4k", 4096), ("mem 4K", 4096),
        ("mem 0x1000", 4096), ("mem 1_048_576", 1 << 20), ("mem 64g", 64 << 30), ("mem 3m", 3 << 20),
        ("MEM 0x10M", 16 << 20), ("mem 8192", 8192),
    ])
    func mem(text: String, bytes: UInt64) {
        #expect(single(text) == .mem(bytes: bytes))
        #expect(parseOK(text)?.memorySize == bytes)
    }

    @Test func setEveryKey() throws {
        let directive = single("set wp=0 nx=0 smep=1 smap=1 pke=1 ac=1 pkru=0x5555_5554 la57=1")
        let expected = ControlSettings(writeProtect: false, noExecuteEnable: false, smep: true, smap: true,
                                       protectionKeys: true, alignmentCheck: true, pkru: 0x5555_5554,
                                       pagingMode: .fiveLevel)
        #expect(directive == .set(expected))
        let scenario = try #require(parseOK("set wp=0 nx=0 smep=1 smap=1 pke=1 ac=1 pkru=0x5555_5554 la57=1"))
        let controls = scenario.initialControls
        #expect(controls.pagingMode == .fiveLevel)
        #expect(!controls.writeProtect && !controls.noExecuteEnable)
        #expect(controls.smep && controls.smap && controls.protectionKeys && controls.alignmentCheck)
        #expect(controls.pkru == PKRU(0x5555_5554))
        #expect(controls.cr0 == [.protectionEnable, .paging])
        #expect(controls.cr4 == [.physicalAddressExtension, .la57, .smep, .smap, .protectionKeys])
        #expect(controls.efer == [.longModeEnable, .longModeActive])
        #expect(controls.rflags == .alignmentCheck)
        #expect(controls.registers(cr3: 0x1000).mode == .fiveLevel)
    }

    @Test func setKeysAreCaseInsensitiveAndPartial() {
        #expect(single("SET WP=0") == .set(ControlSettings(writeProtect: false)))
        #expect(single("set smap=1") == .set(ControlSettings(smap: true)))
        #expect(single("set pkru=12") == .set(ControlSettings(pkru: 12)))
        #expect(single("set la57=0") == .set(ControlSettings(pagingMode: .fourLevel)))
    }

    @Test(arguments: [("32", PagingMode.legacy32), ("pae", .pae), ("PAE", .pae), ("4", .fourLevel), ("5", .fiveLevel)])
    func setPaging(value: String, mode: PagingMode) throws {
        let scenario = try #require(parseOK("set paging=\(value)"))
        #expect(scenario.directives[0].directive == .set(ControlSettings(pagingMode: mode)))
        #expect(scenario.pagingMode == mode)
        #expect(scenario.initialControls.registers(cr3: 0).mode == mode)
    }

    @Test func registersForEachMode() throws {
        let legacy = ControlState(pagingMode: .legacy32)
        #expect(legacy.cr4.contains(.pageSizeExtensions) && !legacy.cr4.contains(.physicalAddressExtension))
        #expect(!legacy.efer.contains(.longModeActive))
        let pae = ControlState(pagingMode: .pae, writeProtect: false, noExecuteEnable: false)
        #expect(pae.cr4 == .physicalAddressExtension && pae.efer == [] && pae.cr0 == [.protectionEnable, .paging])
        #expect(ControlState.defaults.efer == [.longModeEnable, .longModeActive, .noExecuteEnable])
        #expect(ControlState.defaults.cr0 == [.protectionEnable, .paging, .writeProtect])
    }

    @Test func laterSetsChangeStateButNotInitialControls() throws {
        let text = """
            set smep=1
            map 0x400000 0x200000 4k P,RW,US
            set smep=0 wp=0
            access write 0x400000
            """
        let scenario = try #require(parseOK(text))
        #expect(scenario.initialControls.smep)
        #expect(scenario.initialControls.writeProtect)
        #expect(scenario.directives[2].directive == .set(ControlSettings(writeProtect: false, smep: false)))
    }

    @Test func cpuEveryKey() throws {
        let scenario = try #require(parseOK("cpu maxphyaddr=39 gbpages=0 la57=0 vendor=AMD"))
        #expect(scenario.directives[0].directive == .cpu(CPUSettings(maxPhysicalAddressBits: 39, supports1GiBPages: false,
                                                                      supportsLA57: false, vendor: .amd)))
        #expect(scenario.cpuModel == CPUModel(maxPhysicalAddressBits: 39, supports1GiBPages: false, supportsLA57: false,
                                              vendor: .amd))
    }

    @Test func cpuLinesAccumulate() throws {
        let scenario = try #require(parseOK("cpu maxphyaddr=52\ncpu gbpages=0\ncpu maxphyaddr=36"))
        #expect(scenario.cpuModel.maxPhysicalAddressBits == 36)
        #expect(!scenario.cpuModel.supports1GiBPages)
    }

    @Test func kvmParametersAccumulate() throws {
        let scenario = try #require(parseOK("kvm nx_huge_pages=1 nx_huge_pages_recovery_ratio=10\nkvm eager_page_split=0\nkvm nx_huge_pages=0"))
        #expect(scenario.directives[0].directive == .kvm(KVMModuleParameters(nxHugePages: true, nxHugePagesRecoveryRatio: 10)))
        #expect(scenario.kvmParameters == KVMModuleParameters(nxHugePages: false, nxHugePagesRecoveryRatio: 10, eagerPageSplit: false))
        #expect(single("nx-recover") == .nxRecover)
    }

    @Test func mapFourKilobytes() {
        let directive = single("map 0x400000 0x2000000 4k P,RW,US|NX")
        #expect(directive == .map(MapDirective(gva: GuestVirtualAddress(0x40_0000), gpa: GuestPhysicalAddress(0x200_0000),
                                               pageSize: .size4K, leafFlags: 0x8000_0000_0000_0007)))
    }

    @Test func mapEveryOption() throws {
        let directive = single("map 0xffff800040000000 0x40000000 1G P|RW|A|D|G L4=P,us pkey=15")
        guard case .map(let map) = directive else { Issue.record("not a map"); return }
        #expect(map.gva == GuestVirtualAddress(0xFFFF_8000_4000_0000))
        #expect(map.gpa == GuestPhysicalAddress(0x4000_0000))
        #expect(map.pageSize == .size1G && map.pageSize.leafLevel == 3)
        #expect(map.leafFlags == 0x163)
        #expect(map.upperFlags == [4: 0x5])
        #expect(map.pkey == 15)
        #expect(map.tableFlags(level: 4) == 0x5)
        #expect(map.tableFlags(level: 5) == MapDirective.defaultUpperFlags)
        #expect(MapDirective.defaultUpperFlags == 0x7)
        #expect(map.leafFlagsWithKey == 0x163 | 15 << 59)
    }

    @Test func mapUpperLevelsAndPageSizes() throws {
        guard case .map(let twoMeg) = single("map 0x200000 0x400000 2m P,PS l3=P,RW l4=0") else { return }
        #expect(twoMeg.pageSize == .size2M && twoMeg.upperFlags == [3: 0x3, 4: 0])
        #expect(twoMeg.leafFlags == 0x81)
        let five = try #require(parseOK("set la57=1\nmap 0x1000 0x1000 4096 P l2=P l5=P,US"))
        guard case .map(let fiveLevel) = five.directives[1].directive else { Issue.record("not a map"); return }
        #expect(fiveLevel.upperFlags == [2: 1, 5: 5] && fiveLevel.pageSize == .size4K)
    }

    @Test func mapInOtherPagingModes() throws {
        let legacy = try #require(parseOK("set paging=32\nmap 0xffc00000 0xfc00000000 4m P,RW"))
        guard case .map(let big) = legacy.directives[1].directive else { return }
        #expect(big.pageSize == .size4M && big.gpa.rawValue == 0xFC_0000_0000)
        let pae = try #require(parseOK("set paging=pae\nmap 0xc0200000 0x200000 2m P,RW,NX l3=P"))
        guard case .map(let paeMap) = pae.directives[1].directive else { return }
        #expect(paeMap.upperFlags == [3: 1] && paeMap.leafFlags == 0x8000_0000_0000_0003)
        #expect(parseOK("set paging=32\nmap 0xfffff000 0xfffff000 4k P,US l2=P,RW,US") != nil)
    }

    @Test(arguments: [
        ("access read 0x1000", AccessKind.read, UInt64(0x1000), 0, UInt64?.none),
        ("access write 0x2000 cpl=3 value=0xdead_beef", .write, 0x2000, 3, 0xDEAD_BEEF),
        ("access exec 0x3000 cpl=0", .fetch, 0x3000, 0, nil),
        ("access fetch 0x3000 cpl=1", .fetch, 0x3000, 1, nil),
        ("ACCESS Read 4096 CPL=2 VALUE=18446744073709551615", .read, 4096, 2, UInt64.max),
        ("access read 0x0000800000000000", .read, 0x8000_0000_0000, 0, nil),
    ])
    func access(text: String, kind: AccessKind, gva: UInt64, cpl: Int, value: UInt64?) {
        #expect(single(text) == .access(kind: kind, gva: GuestVirtualAddress(gva), cpl: cpl, value: value))
    }

    @Test func pte() {
        #expect(single("pte 0x400000 1 P,RW") == .pte(gva: GuestVirtualAddress(0x40_0000), level: 1, value: .flags(3), cpl: 0))
        #expect(single("pte 0x400000 4 raw=0x8000_0000_0000_1067 cpl=3")
            == .pte(gva: GuestVirtualAddress(0x40_0000), level: 4, value: .raw(0x8000_0000_0000_1067), cpl: 3))
        #expect(single("pte 0x400000 2 RAW=0") == .pte(gva: GuestVirtualAddress(0x40_0000), level: 2, value: .raw(0), cpl: 0))
        #expect(single("pte 0x400000 3 0") == .pte(gva: GuestVirtualAddress(0x40_0000), level: 3, value: .flags(0), cpl: 0))
        #expect(parseOK("set la57=1\npte 0xff00000000000000 5 P")?.directives[1].directive
            == .pte(gva: GuestVirtualAddress(0xFF00_0000_0000_0000), level: 5, value: .flags(1), cpl: 0))
        #expect(parseOK("set paging=pae\npte 0xc0000000 3 P")?.directives[1].directive
            == .pte(gva: GuestVirtualAddress(0xC000_0000), level: 3, value: .flags(1), cpl: 0))
    }

    @Test func invlpgAndReload() {
        #expect(single("invlpg 0xffffffff81000000") == .invlpg(GuestVirtualAddress(0xFFFF_FFFF_8100_0000)))
        #expect(single("invlpg 0x8000000000000000") == .invlpg(GuestVirtualAddress(0x8000_0000_0000_0000)))
        #expect(single("reload-cr3") == .reloadCR3)
        #expect(single("Reload-CR3") == .reloadCR3)
    }

    @Test func numbers() {
        #expect(single("invlpg 0XABCDEF") == .invlpg(GuestVirtualAddress(0xAB_CDEF)))
        #expect(single("invlpg 1_000") == .invlpg(GuestVirtualAddress(1000)))
        #expect(single("invlpg 0xffff_ffff_ffff_ffff") == .invlpg(GuestVirtualAddress(.max)))
        #expect(single("invlpg 0") == .invlpg(GuestVirtualAddress(0)))
    }

    @Test func expectNamesCountersInOrder() {
        #expect(single("expect mmu_unsync=1 PF_FIXED=0x3 root_cache_hits=2") == .expect([
            ExpectedCounter(name: "mmu_unsync", value: 1), ExpectedCounter(name: "pf_fixed", value: 3),
            ExpectedCounter(name: "root_cache_hits", value: 2),
        ]))
        // Not a guest operation: `mem` may still follow, and the machine is not booted by it.
        let scenario = parseOK("expect shadow_pages=0\nmem 32M")
        #expect(scenario?.memorySize == 32 << 20)
        #expect(ExpectedCounter.names.count == Set(ExpectedCounter.names).count)
    }

    @Test func expectRefusesWhatItCannotCheck() {
        #expect(parseError("expect")?.message.contains("at least one NAME=N") == true)
        #expect(parseError("expect pf_fixd=1")?.message.contains("unknown counter 'pf_fixd'") == true)
        #expect(parseError("expect pf_fixed=1 pf_fixed=2")?.message.contains("given twice") == true)
        #expect(parseError("expect pf_fixed")?.message.contains("expected NAME=N") == true)
        #expect(parseError("expect pf_fixed=")?.message.contains("missing value") == true)
        let error = parseError("expect pf_fixed=x1")
        #expect(error?.message.contains("'x1' is not a number") == true)
        #expect(error?.column == 17)
    }

    @Test func knownDirectives() {
        #expect(Scenario.knownDirectives == ["mem", "cpu", "set", "map", "access", "pte", "invlpg", "reload-cr3", "host", "space", "switch", "invpcid", "cr0", "cr4", "efer", "cr3", "zap", "memslot", "dirty-log", "expect", "vcpu", "spp", "l1", "ept-map", "ept-demand", "vmenter", "vmexit", "invept", "invvpid", "kvm", "nx-recover", "age", "prefault"])
    }

    @Test func parseContentsOfFile() throws {
        let path = "/tmp/virtmmu-scenario-test-\(UInt64.random(in: 0...UInt64.max)).scn"
        let text = "mem 32M\nmap 0x1000 0x2000 4k P,RW\naccess read 0x1000\n"
        let file = try #require(fopen(path, "wb"))
        _ = text.utf8CString.withUnsafeBufferPointer { fwrite($0.baseAddress, 1, $0.count - 1, file) }
        fclose(file)
        defer { remove(path) }
        let scenario = try Scenario.parse(contentsOfFile: path)
        #expect(scenario.name == path)
        #expect(scenario.memorySize == 32 << 20 && scenario.directives.count == 3)

        #expect(throws: ScenarioError.self) { try Scenario.parse(contentsOfFile: "/nonexistent/dir/x.scn") }
        do {
            _ = try Scenario.parse(contentsOfFile: "/nonexistent/dir/x.scn")
        } catch {
            #expect(error.line == nil)
            #expect(error.source == "/nonexistent/dir/x.scn")
            #expect(error.description.contains("cannot open '/nonexistent/dir/x.scn'"))
        }
    }
}

@Suite("EntryFlags")
struct EntryFlagsTests {
    @Test func namesAndBits() throws {
        let expected: [(String, UInt64)] = [("P", 1), ("RW", 2), ("US", 4), ("PWT", 8), ("PCD", 16), ("A", 32), ("D", 64),
                                            ("PS", 128), ("G", 256), ("NX", 1 << 63)]
        for (name, bit) in expected {
            #expect(try EntryFlags.parse(name) == bit)
            #expect(try EntryFlags.parse(name.lowercased()) == bit)
            #expect(EntryFlags.describe(bit) == name)
        }
        #expect(EntryFlags.present.rawValue == 1 && EntryFlags.noExecute.rawValue == 1 << 63)
        #expect(EntryFlags.global.rawValue == 0x100 && EntryFlags.pageSize.rawValue == 0x80)
    }

    @Test func lists() throws {
        #expect(try EntryFlags.parse("P,RW,US|NX") == 0x8000_0000_0000_0007)
        #expect(try EntryFlags.parse("p|rw|Us") == 7)
        #expect(try EntryFlags.parse("0") == 0)
        #expect(try EntryFlags.parse("bit0") == 1)
        #expect(try EntryFlags.parse("BIT9,bit11,bit52,bit62") == (1 << 9 | 1 << 11 | 1 << 52 | 1 << 62))
        #expect(try EntryFlags.parse("P,P") == 1)
        #expect(try EntryFlags.parse("bit63") == 1 << 63)
    }

    @Test func describe() {
        #expect(EntryFlags.describe(0) == "0")
        #expect(EntryFlags.describe(0x8000_0000_0000_0007) == "P,RW,US,NX")
        #expect(EntryFlags.describe(1 << 9 | 1 << 59 | 1) == "P,bit9,bit59")
        #expect(EntryFlags.name(ofBit: 12) == "bit12")
    }

    @Test(arguments: ["", "Q", "P,,RW", "P,", "|P", "bit64", "bit", "bit-1", "bit007", "bit01", "0,P", "P|0", "bıt5", "x"])
    func invalidLists(text: String) {
        #expect(throws: ScenarioError.self) { try EntryFlags.parse(text) }
    }

    @Test func describeRoundTrips() throws {
        var rng = SplitMix64(seed: 7)
        for _ in 0..<2000 {
            let mask = rng.next() & rng.next()
            #expect(try EntryFlags.parse(EntryFlags.describe(mask)) == mask)
        }
    }
}
