import Testing
import Workloads
import X86Paging

/// One invalid scenario: the line and column the error must name and a piece of its message.
struct BadCase: CustomTestStringConvertible, Sendable {
    var text: String
    var line: Int
    var column: Int?
    var message: String

    init(_ text: String, line: Int, column: Int? = nil, _ message: String) {
        self.text = text
        self.line = line
        self.column = column
        self.message = message
    }

    var testDescription: String { text.replacing("\n", with: "⏎") }
}

/// Three harmless lines first, so every error is reported on a line other than 1.
private let prelude = "# prelude\nset wp=1\n\n"
private let preludeLines = 3

@Suite("Scenario parser: errors")
struct ScenarioErrorTests {
    static let cases: [BadCase] = [
        // Directives
        BadCase("frobnicate 1", line: 1, column: 1, "unknown directive 'frobnicate' (known directives: mem, cpu, set, map, access, pte, invlpg, reload-cr3, host, space, switch, invpcid, cr0, cr4, efer, cr3, zap, memslot, dirty-log, expect, vcpu, spp, l1, ept-map, ept-demand, vmenter, vmexit, invept, invvpid, kvm, nx-recover, age, prefault)"),
        BadCase("  maps 0x1000", line: 1, column: 3, "unknown directive 'maps'"),
        BadCase("reload-cr3 now", line: 1, column: 12, "reload-cr3: unexpected 'now'"),
        BadCase("invlpg", line: 1, column: 1, "invlpg: missing GVA (usage: invlpg GVA)"),
        BadCase("invlpg 0x1000 0x2000", line: 1, column: 15, "unexpected '0x2000'"),
        BadCase("invlpg 0x1000 cpl=3", line: 1, column: 15, "invlpg: unexpected 'cpl=3' (usage: invlpg GVA)"),
        // Nested virtualization
        BadCase("l1 vmx", line: 1, column: 4, "l1: L1's paging for L2 is ept or npt, not 'vmx'"),
        BadCase("l1 ept levels=3", line: 1, column: 15, "levels"),
        BadCase("l1 ept\nl1 npt", line: 2, column: 1, "L1's paging for L2 given twice (first on line 1)"),
        BadCase("access read 0\nl1 ept", line: 2, column: 1, "l1 must come before the first guest operation"),
        BadCase("vmenter", line: 1, column: 1, "vmenter needs L1's paging for L2 first (`l1 ept` or `l1 npt`)"),
        BadCase("ept-map 0 0x1000000 4k RWX", line: 1, column: 1, "ept-map needs L1's paging for L2 first"),
        BadCase("l1 ept\nept-map 0x1000 0x1000000 2m RWX", line: 2, column: 9, "L2GPA 0x1000 is not aligned to 2m"),
        BadCase("l1 ept\nept-map 0 0x1000000 4m RWX", line: 2, column: 21, "page size must be 4k, 2m or 1g, not '4m'"),
        BadCase("l1 ept\nept-map 0 0x1000000 4k RWZ", line: 2, column: 24, "PERMS are letters from R W X A D (or 0 alone), not 'RWZ'"),
        BadCase("ept-demand 0 0x1000000 16m 4k RWX", line: 1, column: 1, "ept-demand needs L1's paging for L2 first"),
        BadCase("l1 ept\nept-demand 0 0x1000000 3m 2m RWX", line: 2, column: 24,
                "SIZE must be a positive multiple of the page size (2m), not '3m'"),
        BadCase("l1 ept\nept-demand 0 0x1000000 0 4k RWX", line: 2, column: 24, "SIZE must be a positive multiple"),
        BadCase("l1 ept\nept-demand 0x1000 0x1000000 4m 2m RWX", line: 2, column: 12, "L2GPA 0x1000 is not aligned to 2m"),
        BadCase("l1 ept\nept-demand 0 0x1000000 4m 2m 0", line: 2, column: 30,
                "PERMS of an on-demand range must map the pages (letters of R W X A D, not 0)"),
        BadCase("l1 ept\nept-demand 0xfffffffffffff000 0 8k 4k R", line: 2, column: 12, "does not fit in an entry's 52-bit address"),
        BadCase("l1 ept\nvmenter\nept-demand 0 0x1000000 4k 4k R", line: 3, column: 1, "ept-demand is L1's: the vCPU runs L2"),
        BadCase("l1 npt\ninvept single", line: 2, column: 1, "invept needs `l1 ept`"),
        BadCase("l1 ept\ninvept local", line: 2, column: 8, "INVEPT type must be single or global, not 'local'"),
        BadCase("l1 ept\nvmexit", line: 2, column: 1, "vmexit: the vCPU runs L1 (vmenter first)"),
        BadCase("l1 ept\nvmenter\nvmenter", line: 3, column: 1, "vmenter is L1's: the vCPU runs L2 (vmexit first)"),
        BadCase("l1 ept\nvmenter\ncr3 0x1000", line: 3, column: 1, "cr3 in L2 is not modelled"),
        BadCase("l1 ept\nvmenter\nept-map 0 0x1000000 4k R", line: 3, column: 1, "ept-map is L1's: the vCPU runs L2"),
        BadCase("l1 ept\nvmenter\nvcpu 1", line: 3, column: 1,
                "vcpu 1: a new vCPU comes up in L1 (the current one runs L2: vmexit first, or switch to a vCPU in L1)"),
        BadCase("l1 ept\nvcpu 1\nvmenter\nvcpu 1\nept-map 0 0x1000000 4k R", line: 5, column: 1, "ept-map is L1's: the vCPU runs L2"),
        BadCase("l1 ept\nvmenter\nvmenter now", line: 3, column: 9, "expected key=value, not 'now'"),
        BadCase("l1 ept\ninvvpid sometimes", line: 2, column: 9, "INVVPID type must be individual, single, all or single-globals"),
        BadCase("l1 npt\ninvvpid all", line: 2, column: 1, "invvpid needs `l1 ept`"),
        BadCase("l1 npt\nvmenter vpid=2", line: 2, column: 1, "vpid= needs `l1 ept`"),
        BadCase("l1 ept\nvmenter vpid=0x10000", line: 2, column: 14, "vpid"),
        BadCase("l1 ept\ninvvpid single 0x10000", line: 2, column: 16, "VPID"),
        BadCase("l1 ept\nvmenter\ninvvpid all", line: 3, column: 1, "invvpid is L1's"),
        // mem
        BadCase("mem", line: 1, "mem: missing SIZE"),
        BadCase("mem 0", line: 1, column: 5, "mem: memory size must be a positive multiple of 4 KiB, not '0'"),
        BadCase("mem 4097", line: 1, column: 5, "positive multiple of 4 KiB, not '4097'"),
        BadCase("mem 1k", line: 1, "positive multiple of 4 KiB, not '1k'"),
        BadCase("mem 65G", line: 1, "memory size must be at most 64G, not '65G'"),
        BadCase("mem 64T", line: 1, "'64T' is not a size"),
        BadCase("mem M", line: 1, "'M' is not a size"),
        BadCase("mem 99999999999G", line: 1, "'99999999999G' does not fit in 64 bits"),
        BadCase("mem 64M 1", line: 1, column: 9, "mem: unexpected '1'"),
        BadCase("mem 64M\nmem 32M", line: 2, column: 1, "mem: memory size given twice (first on line 1)"),
        BadCase("map 0x1000 0x1000 4k P\nmem 32M", line: 2, "mem: mem must come before the first guest operation (the map on line 1)"),
        BadCase("access read 0x1000\nmem 32M", line: 2, "(the access on line 1)"),
        BadCase("invlpg 0x1000\n\nmem 32M", line: 3, "(the invlpg on line 1)"),
        // cpu
        BadCase("cpu", line: 1, "cpu: expected at least one option"),
        BadCase("cpu maxphyaddr=35", line: 1, column: 16, "maxphyaddr must be 36...52, not '35'"),
        BadCase("cpu maxphyaddr=53", line: 1, "maxphyaddr must be 36...52, not '53'"),
        BadCase("cpu gbpages=2", line: 1, column: 13, "gbpages must be 0 or 1, not '2'"),
        BadCase("cpu la57=yes", line: 1, "la57 must be 0 or 1, not 'yes'"),
        BadCase("cpu vendor=via", line: 1, "vendor must be intel or amd, not 'via'"),
        BadCase("cpu smep=1", line: 1, column: 5, "unknown option 'smep' (options: maxphyaddr, gbpages, la57, vendor)"),
        BadCase("cpu la57=1 la57=0", line: 1, column: 12, "option 'la57' given twice (first at column 5)"),
        BadCase("cpu gbpages", line: 1, column: 5, "expected key=value, not 'gbpages'"),
        BadCase("cpu gbpages=", line: 1, column: 5, "gbpages: missing value after '='"),
        BadCase("reload-cr3\ncpu gbpages=0", line: 2, "cpu: cpu must come before the first guest operation (the reload-cr3 on line 1)"),
        BadCase("set la57=1\ncpu la57=0", line: 2, "la57=0, but 5-level paging was chosen earlier"),
        // kvm
        BadCase("kvm", line: 1, "kvm: expected at least one option"),
        BadCase("kvm nx_huge_pages=on", line: 1, "nx_huge_pages must be 0 or 1"),
        BadCase("kvm nx_huge_pages_recovery_ratio=-1", line: 1, "nx_huge_pages_recovery_ratio"),
        BadCase("kvm tdp_mmu=0", line: 1, "unknown option 'tdp_mmu' (options: nx_huge_pages, nx_huge_pages_recovery_ratio, eager_page_split)"),
        BadCase("access read 0\nkvm nx_huge_pages=1", line: 2, "kvm must come before the first guest operation (the access on line 1)"),
        BadCase("nx-recover 1", line: 1, "nx-recover"),
        BadCase("age", line: 1, "age: missing clear or test"),
        BadCase("age young 0x10", line: 1, "age takes clear or test, not 'young'"),
        BadCase("age clear", line: 1, "age"),
        BadCase("age test 0x10 0", line: 1, "COUNT"),
        BadCase("age clear 0xffffffffffffffff 2", line: 1, "the gfn range overflows"),
        BadCase("l1 ept\nvmenter\nnx-recover", line: 3, "nx-recover in L2 is not modelled"),
        BadCase("prefault", line: 1, "prefault"),
        BadCase("prefault 0x1000", line: 1, "prefault"),
        BadCase("prefault 0x1000 4x", line: 1, "'4x' is not a size"),
        BadCase("prefault 0x1000 99999999999999999999", line: 1, "does not fit in 64 bits"),
        BadCase("prefault 0x1000 4K flags=", line: 1, "flags"),
        BadCase("prefault 0x1000 4K slot=1", line: 1, "unknown option 'slot'"),
        // set
        BadCase("set", line: 1, "set: expected at least one option"),
        BadCase("set wp=2", line: 1, column: 8, "wp must be 0 or 1, not '2'"),
        BadCase("set nx=true", line: 1, "nx must be 0 or 1"),
        BadCase("set smep=01", line: 1, "smep must be 0 or 1"),
        BadCase("set smap=", line: 1, "smap: missing value"),
        BadCase("set pke=-1", line: 1, "pke must be 0 or 1"),
        BadCase("set ac=x", line: 1, "ac must be 0 or 1"),
        BadCase("set pkru=0x1_0000_0000", line: 1, column: 10, "pkru must be 0...4294967295, not '0x1_0000_0000'"),
        BadCase("set pkru=zz", line: 1, "pkru: 'zz' is not a number"),
        BadCase("set la57=2", line: 1, "la57 must be 0 or 1"),
        BadCase("set paging=6", line: 1, column: 12, "paging must be legacy32, pae, 4level or 5level (or 32, 4, 5), not '6'"),
        BadCase("set la57=1 paging=5", line: 1, "la57 and paging both choose the paging mode"),
        BadCase("set wp=1 WP=0", line: 1, column: 10, "option 'wp' given twice"),
        BadCase("set smep=1 cr4=0", line: 1, column: 12, "unknown option 'cr4' (options: wp, nx, smep, smap, pke, ac, pkru, la57, paging, pse, pcid)"),
        BadCase("set smep 1", line: 1, "expected key=value, not 'smep'"),
        BadCase("cpu la57=0\nset la57=1", line: 2, column: 10, "5-level paging needs a CPU with LA57"),
        BadCase("cpu la57=0\nset paging=5", line: 2, "5-level paging needs a CPU with LA57"),
        BadCase("map 0x1000 0x1000 4k P\nhost levels=5", line: 2, "host must come before the first guest operation (the map on line 1)"),
        BadCase("pte 0x1000 1 P\ncpu gbpages=0", line: 2, "(the pte on line 1)"),
        // map
        BadCase("map 0x1000 0x2000 3m P", line: 1, column: 19, "map: page size must be 4k, 2m or 1g, not '3m'"),
        BadCase("map 0x1000 0x2000 4m P", line: 1, "page size must be 4k, 2m or 1g with 4-level paging, not '4m'"),
        BadCase("set paging=pae\nmap 0x0 0x0 1g P", line: 2, "page size must be 4k or 2m with PAE paging, not '1g'"),
        BadCase("set paging=32\nmap 0x0 0x0 2m P", line: 2, "page size must be 4k or 4m with 32-bit paging, not '2m'"),
        BadCase("map 0x1000 0x2000", line: 1, "map: missing page size (usage: map GVA GPA 4k|2m|1g FLAGS"),
        BadCase("map 0x1000 0x2000 4k", line: 1, "map: missing FLAGS"),
        BadCase("map 0x1000 0x2000 4k pkey=1", line: 1, column: 22, "map: missing FLAGS"),
        BadCase("map 0x1000 0x2000 4k P RW", line: 1, column: 24, "expected key=value, not 'RW'"),
        BadCase("map 0x1001 0x2000 4k P", line: 1, column: 5, "GVA 0x1001 is not aligned to the 4k page size"),
        BadCase("map 0x1000 0x2800 4k P", line: 1, column: 12, "GPA 0x2800 is not aligned to the 4k page size"),
        BadCase("map 0x201000 0x200000 2m P", line: 1, "GVA 0x201000 is not aligned to the 2m page size"),
        BadCase("map 0x40000000 0x20000000 1g P", line: 1, "GPA 0x20000000 is not aligned to the 1g page size"),
        BadCase("map 0x800000000000 0x0 4k P", line: 1, column: 5, "GVA 0x800000000000 is not canonical in 4-level paging"),
        BadCase("set la57=1\nmap 0x100000000000000 0x0 4k P", line: 2, "is not canonical in 5-level paging"),
        BadCase("set paging=pae\nmap 0x100000000 0x0 4k P", line: 2, "does not fit in the 32-bit linear addresses of PAE paging"),
        BadCase("map 0x1000 0x10000000000000 4k P", line: 1, "GPA 0x10000000000000 does not fit in a 4-level paging 4k entry"),
        BadCase("set paging=32\nmap 0x1000 0x100000000 4k P", line: 2, "does not fit in a 32-bit paging 4k entry (limit 0x100000000)"),
        BadCase("set paging=32\nmap 0x400000 0x10000000000 4m P", line: 2, "(limit 0x10000000000)"),
        BadCase("set paging=32\nmap 0x1000 0x1000 4k P,NX", line: 2, column: 22, "FLAGS: NX does not exist in the 4-byte entries of 32-bit paging"),
        BadCase("set paging=32\nmap 0x1000 0x1000 4k P l2=bit40", line: 2, "l2: bit40 does not exist"),
        BadCase("map 0x1000 0x2000 4k P,QQ", line: 1, column: 24, "FLAGS: unknown flag 'QQ'"),
        BadCase("map 0x1000 0x2000 4k P,,RW", line: 1, column: 24, "empty item in flag list"),
        BadCase("map 0x1000 0x2000 4k 0,P", line: 1, "'0' (no flags) cannot be combined"),
        BadCase("map 0x1000 0x2000 4k P l3=Z", line: 1, column: 27, "l3: unknown flag 'Z'"),
        BadCase("map 0x1000 0x2000 4k P l1=P", line: 1, column: 24, "unknown option 'l1' (options: l2, l3, l4, pkey)"),
        BadCase("map 0x1000 0x2000 4k P l5=P", line: 1, "unknown option 'l5'"),
        BadCase("map 0x200000 0x200000 2m P l2=P", line: 1, column: 28, "l2: a 2m page's leaf is at level 2"),
        BadCase("map 0x0 0x0 1g P l3=P", line: 1, "l3: a 1g page's leaf is at level 3"),
        BadCase("map 0x1000 0x2000 4k P l2=P l2=RW", line: 1, column: 29, "option 'l2' given twice"),
        BadCase("map 0x1000 0x2000 4k P pkey=16", line: 1, column: 29, "pkey must be 0...15, not '16'"),
        BadCase("map 0x1000 0x2000 4k P pkey=x", line: 1, "pkey: 'x' is not a number"),
        BadCase("set paging=pae\nmap 0x1000 0x2000 4k P pkey=1", line: 2, "pkey needs 4- or 5-level paging, not PAE paging"),
        BadCase("map 0xg000 0x2000 4k P", line: 1, column: 5, "GVA: '0xg000' is not a number"),
        BadCase("map 0x1000 -1 4k P", line: 1, column: 12, "GPA: '-1' is not a number"),
        BadCase("map 0x1_0000_0000_0000_0000 0x0 4k P", line: 1, "GVA: '0x1_0000_0000_0000_0000' does not fit in 64 bits"),
        // access
        BadCase("access read", line: 1, "access: missing GVA (usage: access read|write|exec GVA [cpl=0|3] [value=V])"),
        BadCase("access", line: 1, "access: missing read|write|exec"),
        BadCase("access execute 0x1000", line: 1, column: 8, "access kind must be read, write or exec, not 'execute'"),
        BadCase("access read 0x1000 cpl=4", line: 1, column: 24, "cpl must be 0...3, not '4'"),
        BadCase("access read 0x1000 cpl=3 cpl=0", line: 1, "option 'cpl' given twice"),
        BadCase("access write 0x1000 value=0x1_0000_0000_0000_0000", line: 1, "value: '0x1_0000_0000_0000_0000' does not fit in 64 bits"),
        BadCase("access write 0x1000 size=8", line: 1, "unknown option 'size' (options: cpl, value)"),
        BadCase("access read 0x1000 3", line: 1, "expected key=value, not '3'"),
        BadCase("set paging=32\naccess read 0x100000000", line: 2, "does not fit in the 32-bit linear addresses of 32-bit paging"),
        BadCase("access read 1__0", line: 1, "GVA: '1__0' is not a number"),
        BadCase("access read 10_", line: 1, "is not a number"),
        BadCase("access read _10", line: 1, "is not a number"),
        BadCase("access read 0x", line: 1, "is not a number"),
        // pte
        BadCase("pte 0x1000 1", line: 1, "pte: missing FLAGS or raw=VALUE"),
        BadCase("pte 0x1000 0 P", line: 1, column: 12, "LEVEL must be 1...5, not '0'"),
        BadCase("pte 0x1000 6 P", line: 1, "LEVEL must be 1...5, not '6'"),
        BadCase("pte 0x1000 5 P", line: 1, column: 12, "LEVEL 5 does not exist in 4-level paging (levels 1...4)"),
        BadCase("set paging=32\npte 0x1000 3 P", line: 2, "LEVEL 3 does not exist in 32-bit paging (levels 1...2)"),
        BadCase("pte 0x1000 1 raw=", line: 1, column: 18, "raw: '' is not a number"),
        BadCase("pte 0x1000 1 raw=0xq", line: 1, column: 18, "raw: '0xq' is not a number"),
        BadCase("pte 0x1000 1 value=3", line: 1, "expected FLAGS or raw=VALUE, not 'value=3'"),
        BadCase("pte 0x1000 1 P cpl=5", line: 1, "cpl must be 0...3"),
        BadCase("pte 0x1000 1 P raw=1", line: 1, "unknown option 'raw' (options: cpl)"),
        BadCase("pte 0x800000000000 1 P", line: 1, "is not canonical"),
        BadCase("set paging=32\npte 0x1000 1 raw=0x100000000", line: 2, "raw: 0x100000000 does not fit in the 4-byte entries"),
        BadCase("set paging=32\npte 0x1000 1 NX", line: 2, "NX does not exist in the 4-byte entries"),
        BadCase("expect", line: 1, "expected at least one NAME=N"),
        BadCase("expect pf_fixed=1 tlb_flushes=2", line: 1, column: 19, "unknown counter 'tlb_flushes'"),
        BadCase("expect mmu_unsync=0 MMU_UNSYNC=1", line: 1, column: 21, "counter 'mmu_unsync' given twice"),
        BadCase("expect pf_fixed=-1", line: 1, column: 17, "pf_fixed: '-1' is not a number"),
        // Errors on later lines after valid ones.
        BadCase("mem 64M\nmap 0x1000 0x2000 4k P\naccess read 0x1000\n\n# fine so far\naccess jump 0x1000", line: 6, "access kind"),
    ]

    @Test(arguments: cases)
    func namesTheLine(bad: BadCase) throws {
        let error = try #require(parseError(bad.text))
        #expect(error.line == bad.line, "\(error)")
        if let column = bad.column { #expect(error.column == column, "\(error)") }
        #expect(error.description.contains(bad.message), "\(error)")
        #expect(error.description.hasPrefix("line \(bad.line): "), "\(error)")
        #expect(error.source == "test")
        #expect(!error.text.isEmpty || error.message.contains("''") || error.message.contains("missing"))
    }

    @Test(arguments: cases)
    func namesTheLineAfterAPrelude(bad: BadCase) throws {
        // Every case, shifted down by a few lines (the paging-mode checks still see no earlier
        // guest operation, since the prelude has none).
        let error = try #require(parseError(prelude + bad.text))
        #expect(error.line == bad.line + preludeLines, "\(error)")
        // Messages that cite another line cite it shifted too; compare up to the citation.
        let stable = bad.message.firstRange(of: "line ").map { String(bad.message[..<$0.lowerBound]) } ?? bad.message
        #expect(error.description.contains(stable), "\(error)")
    }

    @Test func issueExampleMessage() throws {
        let text = "mem 64M\nset wp=1 nx=1\n\n# maps\nmap 0x400000 0x2000000 4k P,RW,US\n\nmap 0x600000 0x3000000 3m P\n"
        let error = try #require(parseError(text))
        #expect(error.description == "line 7: map: page size must be 4k, 2m or 1g, not '3m'")
        #expect(error.line == 7 && error.column == 24 && error.text == "3m" && error.directive == "map")
    }

    @Test func errorWithoutLine() {
        let error = ScenarioError(text: "x", message: "something")
        #expect(error.description == "something")
        #expect(ScenarioError(line: 2, directive: "map", text: "x", message: "m").description == "line 2: map: m")
    }
}
