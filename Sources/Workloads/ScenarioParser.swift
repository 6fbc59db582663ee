// The scenario language's parser.
//
// GRAMMAR (one directive per line; `#` starts a comment, whole-line or trailing; blank lines are
// ignored; tokens are separated by spaces or tabs; keywords, keys and flag names are case-insensitive)
//
//   mem SIZE                                        guest memory (default 64M)
//   cpu [maxphyaddr=N] [gbpages=0|1] [la57=0|1] [vendor=intel|amd]
//   set [wp=0|1] [nx=0|1] [smep=0|1] [smap=0|1] [pke=0|1] [ac=0|1] [pkru=V] [la57=0|1]
//       [paging=32|pae|4|5|legacy32|4level|5level] [pse=0|1] [pcid=0|1]
//   host levels=4|5                                 the host's paging depth for shadow pages
//   map GVA GPA 4k|2m|1g FLAGS [l2=FLAGS] [l3=FLAGS] [l4=FLAGS] [pkey=N]
//   access read|write|exec GVA [cpl=N] [value=V]
//   pte GVA LEVEL FLAGS|raw=VALUE [cpl=N]
//   invlpg GVA
//   reload-cr3
//   space NAME                                      create/select the address space map and pte edit
//   switch NAME [pcid=N] [noflush]                  MOV to CR3 of that space's root
//   invpcid 0|1|2|3|individual|single|all|all-nonglobal [pcid=N] [gva=ADDR]
//   cr0 VALUE | cr4 VALUE | efer VALUE              raw register writes
//   cr3 VALUE [noflush]                             raw MOV to CR3
//   zap all | zap gfn FIRST [COUNT]                 a host-side zap (all pages fast / a gfn range's SPTEs)
//   memslot add SLOT GPA SIZE [readonly] | memslot delete SLOT | memslot move SLOT GPA
//   memslot flags SLOT log-dirty=0|1
//   dirty-log enable|disable SLOT | dirty-log mode reset|manual|ring [entries=N] | dirty-log get SLOT
//   dirty-log clear SLOT FIRST COUNT
//   expect NAME=N...                                the counters must have these values here
//   vcpu N                                          later guest operations run on vCPU N (0...63)
//   spp set GFN MASK | spp get GFN                  sub-page write permissions (--mmu tdp; MASK 32 bits)
//   l1 ept [levels=4|5] [ad=0|1] [execonly=0|1] | l1 npt [levels=4|5]   L1's paging for L2 (TDP runs)
//   ept-map L2GPA L1GPA 4k|2m|1g PERMS [guest=N]    L1 writes its entry for guest N (PERMS: letters of RWXAD, or 0)
//   vmenter [vpid=N] [guest=N] | vmexit            L1 enters L2 guest N (with VPID N), L2 exits
//   invept single [guest=N] | invept global         L1's INVEPT of guest N's EPTP, or of all
//   invvpid individual|single|all|single-globals [VPID] [GVA]   L1's INVVPID (VPID and GVA default to 0)
//
//   NUMBER  decimal or 0x-hexadecimal, `_` allowed between digits, at most 2^64-1
//   SIZE    NUMBER with an optional K, M or G suffix (x1024, x1024^2, x1024^3)
//   FLAGS   items joined by `,` or `|`: P RW US PWT PCD A D PS G NX, bitN (0...63), or 0 alone
//   N       a NUMBER; at least one key=value for `cpu` and `set`; no key twice on a line
//
// Extensions (beyond the issue that defines the language; each marked "extension" below):
//   - `set paging=32|pae|4|5` chooses the paging mode (`la57=0|1` is 4- or 5-level paging);
//   - `cpu vendor=intel|amd`;
//   - `map ... 4m` with `paging=32` (the 4 MiB page of 32-bit paging), and `l5=FLAGS` with 5-level paging;
//   - `access fetch` as a synonym of `access exec`;
//   - `cpl` accepts 0...3 (the issue says 0|3).
//
// Registers: the parser follows the control registers line by line (`set` and the raw writes), so
// that `map` and `pte` are checked against the mode the registers select (with CR0.PG off, the mode
// they prepare: `PagingRegisters.modeWithPagingOn`) and `access`/`invlpg` against the mode in force.
// A write the processor would refuse (`PagingRegisters.transitionFault`) is a bad line here already;
// only what depends on memory (a PAE PDPT's reserved bits, say) is left to the run.
//
// Semantics checked here:
//   - `mem` is a positive multiple of 4 KiB, at most 64 GiB, and given at most once;
//   - `expect` names each counter at most once, from `ExpectedCounter.names`;
//   - `mem`, `cpu` and `host` come before the first guest operation (any directive but `mem`, `cpu`,
//     `set` and `host`); a paging mode chosen after it is a mode switch;
//   - `cpu maxphyaddr` is 36...52; 5-level paging needs `cpu la57=1` (the default);
//   - `map`: the page size is one the paging mode has; GVA and GPA are aligned to it; the GVA is
//     canonical (4/5-level) or 32-bit (32-bit/PAE paging); the GPA fits the entry's address field;
//     `lN=` only for table levels above the leaf; `pkey` 0...15 and only with 4/5-level paging;
//   - `pte`: LEVEL is 1...5 and at most the paging mode's root level; the GVA as for `map`;
//   - with 32-bit paging every flag, raw value and address fits in 32 bits (4-byte entries);
//   - `access`/`invlpg` GVAs fit in 32 bits outside 4/5-level paging (non-canonical ones are allowed in
//     4/5-level paging: they are how a scenario asks for a #GP);
//   - `pkru` fits in 32 bits; every other number in 64;
//   - `l1` comes before the first guest operation, at most once; `ept-map`, `vmenter` and `invept`
//     need it (`invept` with `l1 ept`); `vmenter` only from L1, `vmexit` only in L2; in L2 only
//     `set`, `map`, `pte`, `access`, `invlpg`, `invpcid`, `space`, `switch`, `reload-cr3`, `expect` and `vmexit`, which act
//     on L2 (its registers followed apart from L1's, from paging off at its first entry).
// A `map` GPA need not lie inside `mem` (an unbacked GPA is a scenario's way to reach MMIO), nor below
// MAXPHYADDR (address bits above it are reserved bits a scenario may want to set); `map ... 1g` is
// accepted with `cpu gbpages=0` for the same reason (the PS bit is then reserved).
//
// ADDING A DIRECTIVE: add a case to `ScenarioDirective` (with its `name` and `isGuestOperation`), an
// entry to `ScenarioParser.table` below, and its canonical form in `ScenarioDirective.rendered`.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import X86Paging

extension Scenario {
    /// Parses scenario text. `name` names the scenario (a file path, usually) in `Scenario.name`.
    public static func parse(_ text: String, name: String) throws(ScenarioError) -> Scenario {
        do throws(ScenarioError) {
            var parser = ScenarioParser(name: name)
            return try parser.parse(text)
        } catch {
            var error = error
            error.source = name
            throw error
        }
    }

    /// Reads and parses the scenario file at `path`; the scenario is named by its path.
    public static func parse(contentsOfFile path: String) throws(ScenarioError) -> Scenario {
        try parse(readScenarioFile(path), name: path)
    }

    /// The directive keywords the parser knows, in table order.
    public static var knownDirectives: [String] { ScenarioParser.table.map(\.name) }
}

/// How one directive is parsed: its keyword, its usage line for error messages, and the function that
/// turns its arguments into a directive (validating them against the state so far).
struct DirectiveSpec: Sendable {
    let name: String
    let usage: String
    let parse: @Sendable (inout DirectiveArguments) throws(ScenarioError) -> ScenarioDirective
}

/// What the parser has resolved so far.
struct ScenarioState: Sendable {
    var memorySize = Scenario.defaultMemorySize
    var memoryLine: Int?
    var cpu = Scenario.defaultCPUModel
    var controls = ControlState.defaults
    /// The control registers as the lines so far leave them (CR3 holds only the PCID and the low
    /// bits a `cr3` line gave: root addresses are the run's).
    var registers = ControlState.defaults.registers(cr3: 0)
    var hostLevels: Int?
    var hostLine: Int?
    var kvmParameters = KVMModuleParameters()
    /// L1's address spaces created so far (`kernel` exists from the start), and each L2 guest's:
    /// a guest's kernel and its spaces are shared by all the vCPUs that run it.
    var l1Spaces: Set<String> = [Scenario.kernelSpace]
    var l2Spaces: [Int: Set<String>] = [:]
    /// The address spaces of the level the lines run in.
    var spaces: Set<String> {
        get { inL2 ? l2Spaces[currentGuest, default: [Scenario.kernelSpace]] : l1Spaces }
        set {
            if inL2 { l2Spaces[currentGuest] = newValue } else { l1Spaces = newValue }
        }
    }
    /// The first guest operation: its line and keyword.
    var firstOperation: (line: Int, name: String)?
    /// Every vCPU brought up so far, with the registers and settings its lines left and, for one
    /// that runs L2, L1's kept aside and the guest; the current one's live in `registers`,
    /// `controls`, `suspendedL1` and `currentGuest` (its entry here is stale until `vcpu` switches
    /// away).
    var vcpus: [VCPULines] = [VCPULines(level: GuestLevelLines(registers: ControlState.defaults.registers(cr3: 0), controls: .defaults))]
    /// The vCPU the lines run on.
    var currentVCPU = 0
    /// L1's paging for L2 and the line that gave it.
    var nested: (setting: NestedPagingSetting, line: Int)?
    /// Whether the lines run in L2 (after `vmenter`, until `vmexit`).
    var inL2: Bool { suspendedL1 != nil }
    /// While the lines run in L2: L1's registers, settings and spaces (`registers`, `controls` and
    /// `spaces` are then L2's).
    var suspendedL1: GuestLevelLines?
    /// Each vCPU's L2 guests as their lines left them, by `vCPU * 16 + guest`, while L1 runs
    /// (vmcs12 keeps L2's registers across exits; an L2 starts with its paging off).
    var l2Levels: [Int: GuestLevelLines] = [:]
    /// The L2 guest the lines run in (`vmenter guest=`).
    var currentGuest = 0

    /// The mode whose tables `map` and `pte` edit: the one the registers select, or with paging off
    /// the one they prepare.
    var mode: PagingMode { registers.modeWithPagingOn }
    /// The mode accesses run in (`.disabled` with paging off: linear addresses are physical).
    var runningMode: PagingMode { registers.mode }
}

/// What the lines so far left of one guest level (L1, or an L2) on one vCPU.
struct GuestLevelLines: Sendable {
    var registers: PagingRegisters
    var controls: ControlState

    /// An L2 at its first entry: paging off, the default settings for the mode a `set paging=`
    /// chooses.
    static let newL2 = GuestLevelLines(registers: PagingRegisters(), controls: .defaults)
}

/// What the lines so far left of one vCPU: the level it runs, and L1's while it runs L2 `guest`.
struct VCPULines: Sendable {
    var level: GuestLevelLines
    var suspendedL1: GuestLevelLines? = nil
    var guest = 0
}

/// One whitespace-separated word of a line.
struct Token: Sendable {
    var text: String
    /// 1-based column of its first scalar.
    var column: Int
}

struct ScenarioParser {
    let name: String
    var state = ScenarioState()

    init(name: String) { self.name = name }

    // MARK: The directive table

    static let table: [DirectiveSpec] = [
        DirectiveSpec(name: "mem", usage: "mem SIZE", parse: { (args: inout DirectiveArguments) throws(ScenarioError) in
            try args.parseMem()
        }),
        DirectiveSpec(name: "cpu", usage: "cpu [maxphyaddr=N] [gbpages=0|1] [la57=0|1] [vendor=intel|amd]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseCPU() }),
        DirectiveSpec(name: "set", usage: "set [wp=0|1] [nx=0|1] [smep=0|1] [smap=0|1] [pke=0|1] [ac=0|1] [pkru=V] "
                        + "[la57=0|1] [paging=legacy32|pae|4level|5level] [pse=0|1] [pcid=0|1]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseSet() }),
        DirectiveSpec(name: "map", usage: "map GVA GPA 4k|2m|1g FLAGS [l2=FLAGS] [l3=FLAGS] [l4=FLAGS] [pkey=N]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseMap() }),
        DirectiveSpec(name: "access", usage: "access read|write|exec GVA [cpl=0|3] [value=V]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseAccess() }),
        DirectiveSpec(name: "pte", usage: "pte GVA LEVEL FLAGS|raw=VALUE [cpl=0|3]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parsePTE() }),
        DirectiveSpec(name: "invlpg", usage: "invlpg GVA",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in
                          let gva = try args.positional(["GVA"])[0]
                          try args.noOptions()
                          return .invlpg(GuestVirtualAddress(try args.operationAddress(gva, what: "GVA")))
                      }),
        DirectiveSpec(name: "reload-cr3", usage: "reload-cr3",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in
                          _ = try args.positional([])
                          try args.noOptions()
                          return .reloadCR3
                      }),
        DirectiveSpec(name: "host", usage: "host levels=4|5",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseHost() }),
        DirectiveSpec(name: "space", usage: "space NAME",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseSpace() }),
        DirectiveSpec(name: "switch", usage: "switch NAME [pcid=N] [noflush]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseSwitch() }),
        DirectiveSpec(name: "invpcid", usage: "invpcid 0|1|2|3|individual|single|all|all-nonglobal [pcid=N] [gva=ADDR]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseINVPCID() }),
    ] + ControlRegister.allCases.map { register in
        DirectiveSpec(name: register.rawValue, usage: "\(register.rawValue) VALUE",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseRegisterWrite(register) })
    } + [
        DirectiveSpec(name: "cr3", usage: "cr3 VALUE [noflush]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseCR3() }),
        DirectiveSpec(name: "zap", usage: "zap all | zap gfn FIRST [COUNT]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseZap() }),
        DirectiveSpec(name: "memslot", usage: "memslot add SLOT GPA SIZE [readonly] | memslot delete SLOT | "
                        + "memslot move SLOT GPA | memslot flags SLOT log-dirty=0|1",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseMemslot() }),
        DirectiveSpec(name: "dirty-log", usage: "dirty-log enable|disable SLOT | dirty-log mode reset|manual|ring [entries=N] | "
                        + "dirty-log get SLOT | dirty-log clear SLOT FIRST COUNT",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseDirtyLog() }),
        DirectiveSpec(name: "expect", usage: "expect NAME=N... (a KVM statistic or a context counter)",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseExpect() }),
        DirectiveSpec(name: "vcpu", usage: "vcpu N (0 for the boot vCPU; a new one is N = the number brought up so far)",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseVCPU() }),
        DirectiveSpec(name: "spp", usage: "spp set GFN MASK | spp get GFN",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseSubPageProtection() }),
        DirectiveSpec(name: "l1", usage: "l1 ept [levels=4|5] [ad=0|1] [execonly=0|1] | l1 npt [levels=4|5]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseL1() }),
        DirectiveSpec(name: "ept-map", usage: "ept-map L2GPA L1GPA 4k|2m|1g PERMS (letters of R W X A D, or 0)",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseEPTMap() }),
        DirectiveSpec(name: "ept-demand", usage: "ept-demand L2GPA L1GPA SIZE 4k|2m|1g PERMS (letters of R W X A D) [guest=N]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseEPTDemand() }),
        DirectiveSpec(name: "vmenter", usage: "vmenter [vpid=N]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseVMEnter() }),
        DirectiveSpec(name: "vmexit", usage: "vmexit",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseNoArguments(.vmexit) }),
        DirectiveSpec(name: "invept", usage: "invept single|global",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseINVEPT() }),
        DirectiveSpec(name: "invvpid", usage: "invvpid individual|single|all|single-globals [VPID] [GVA]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseINVVPID() }),
        DirectiveSpec(name: "kvm", usage: "kvm [nx_huge_pages=0|1] [nx_huge_pages_recovery_ratio=N] [eager_page_split=0|1]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseKVMParameters() }),
        DirectiveSpec(name: "nx-recover", usage: "nx-recover",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseNoArguments(.nxRecover) }),
        DirectiveSpec(name: "age", usage: "age clear|test GFN [COUNT]",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parseAge() }),
        DirectiveSpec(name: "prefault", usage: "prefault GPA SIZE [flags=N] (KVM_PRE_FAULT_MEMORY)",
                      parse: { (args: inout DirectiveArguments) throws(ScenarioError) in try args.parsePreFault() }),
    ]

    static let tableByName: [String: DirectiveSpec] = Dictionary(uniqueKeysWithValues: table.map { ($0.name, $0) })

    // MARK: Lines

    mutating func parse(_ text: String) throws(ScenarioError) -> Scenario {
        var statements: [ScenarioStatement] = []
        var initialControls: ControlState?
        var lineNumber = 0
        for rawLine in text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            var scalars = Array(rawLine)
            if scalars.last == "\r" { scalars.removeLast() }
            var lineText = String.UnicodeScalarView()
            lineText.append(contentsOf: scalars)
            let line = String(lineText)
            let tokens = Self.tokenize(scalars)
            guard let keyword = tokens.first else { continue }
            let name = asciiLowercased(keyword.text)
            guard let spec = Self.tableByName[name] else {
                throw ScenarioError(line: lineNumber, column: keyword.column, text: keyword.text,
                                    message: "unknown directive '\(keyword.text)' (known directives: "
                                        + Self.table.map(\.name).joined(separator: ", ") + ")")
            }
            var arguments = DirectiveArguments(line: lineNumber, text: line, spec: spec, keyword: keyword,
                                               tokens: Array(tokens.dropFirst()), state: state)
            let directive = try spec.parse(&arguments)
            try apply(directive, line: lineNumber, keyword: keyword)
            if directive.isGuestOperation && initialControls == nil { initialControls = state.controls }
            statements.append(ScenarioStatement(line: lineNumber, text: line, directive: directive))
        }
        return Scenario(name: name, directives: statements, memorySize: state.memorySize, cpuModel: state.cpu,
                        initialControls: initialControls ?? state.controls, hostLevels: state.hostLevels,
                        kvmParameters: state.kvmParameters)
    }

    /// Records what `directive` changes, checking the rules that span lines.
    private mutating func apply(_ directive: ScenarioDirective, line: Int, keyword: Token) throws(ScenarioError) {
        func tooLate(_ what: String) -> ScenarioError {
            let first = state.firstOperation!
            return ScenarioError(line: line, column: keyword.column, directive: directive.name, text: keyword.text,
                                 message: "\(what) must come before the first guest operation "
                                    + "(the \(first.name) on line \(first.line))")
        }
        try checkNesting(directive, line: line, keyword: keyword)
        switch directive {
        case .mem(let bytes):
            if state.firstOperation != nil { throw tooLate("mem") }
            if let previous = state.memoryLine {
                throw ScenarioError(line: line, column: keyword.column, directive: "mem", text: keyword.text,
                                    message: "memory size given twice (first on line \(previous))")
            }
            state.memorySize = bytes
            state.memoryLine = line
        case .cpu(let settings):
            if state.firstOperation != nil { throw tooLate("cpu") }
            state.cpu = settings.applied(to: state.cpu)
        case .kvm(let parameters):
            // Module parameters are read when the VM is made.
            if state.firstOperation != nil { throw tooLate("kvm") }
            state.kvmParameters = parameters.applied(to: state.kvmParameters)
        case .set(let settings):
            let controls = state.controls.applying(settings)
            let registers = settings.applied(to: state.registers, controls: controls)
            // A mode switch is a sequence of writes the runner orders legally; any other `set` is
            // one write, which must be one the processor allows.
            if settings.pagingMode == nil { try checkTransition(to: registers, line: line, keyword: keyword, directive: directive) }
            state.registers = registers
            state.controls = controls
        case .host(let levels):
            if state.firstOperation != nil { throw tooLate("host") }
            if let previous = state.hostLine {
                throw ScenarioError(line: line, column: keyword.column, directive: "host", text: keyword.text,
                                    message: "host levels given twice (first on line \(previous))")
            }
            state.hostLevels = levels
            state.hostLine = line
        case .space(let name):
            state.spaces.insert(name)
        case .switchSpace(_, let pcid, _):
            state.registers.cr3 = UInt64(pcid)
        case .writeRegister(let register, let value):
            let registers = register.writing(value, to: state.registers)
            try checkTransition(to: registers, line: line, keyword: keyword, directive: directive)
            state.registers = registers
        case .loadCR3(let value, _):
            state.registers.cr3 = value & 0xFFF
        case .vcpu(let index):
            // Each vCPU has its own registers and level; a new one starts as the current one is
            // (in L1: checkNesting refuses one brought up from L2).
            state.vcpus[state.currentVCPU] = VCPULines(level: GuestLevelLines(registers: state.registers, controls: state.controls),
                                                       suspendedL1: state.suspendedL1, guest: state.currentGuest)
            if index == state.vcpus.count { state.vcpus.append(state.vcpus[state.currentVCPU]) }
            state.currentVCPU = index
            let next = state.vcpus[index]
            (state.registers, state.controls, state.suspendedL1, state.currentGuest)
                = (next.level.registers, next.level.controls, next.suspendedL1, next.guest)
        case .l1(let setting):
            if state.firstOperation != nil { throw tooLate("l1") }
            state.nested = (setting, line)
        case .vmenter(_, let guest):
            state.suspendedL1 = GuestLevelLines(registers: state.registers, controls: state.controls)
            state.currentGuest = guest
            let l2 = state.l2Levels[state.currentVCPU * 16 + guest] ?? .newL2
            (state.registers, state.controls) = (l2.registers, l2.controls)
        case .vmexit:
            state.l2Levels[state.currentVCPU * 16 + state.currentGuest] = GuestLevelLines(registers: state.registers,
                                                                                          controls: state.controls)
            let l1 = state.suspendedL1!
            (state.registers, state.controls) = (l1.registers, l1.controls)
            state.suspendedL1 = nil
        case .map, .access, .pte, .invlpg, .reloadCR3, .invpcid, .zap, .memslot, .dirtyLog, .expect, .subPageProtection, .eptMap,
             .eptDemand, .invept, .invvpid, .nxRecover, .age, .preFault:
            break
        }
        if directive.isGuestOperation && state.firstOperation == nil { state.firstOperation = (line, directive.name) }
        if state.hostLevels == 4 && state.mode == .fiveLevel {
            throw ScenarioError(line: line, column: keyword.column, directive: directive.name, text: keyword.text,
                                message: "5-level paging needs a 5-level host (host levels=4 on line \(state.hostLine!))")
        }
    }

    /// The rules of L1 and L2: which directives need `l1`, and which run in L1 or L2.
    private func checkNesting(_ directive: ScenarioDirective, line: Int, keyword: Token) throws(ScenarioError) {
        func fail(_ message: String) -> ScenarioError {
            ScenarioError(line: line, column: keyword.column, directive: directive.name, text: keyword.text, message: message)
        }
        switch directive {
        case .l1:
            if let previous = state.nested { throw fail("L1's paging for L2 given twice (first on line \(previous.line))") }
        case .eptMap, .eptDemand, .vmenter, .invept, .invvpid:
            guard let nested = state.nested else { throw fail("\(directive.name) needs L1's paging for L2 first (`l1 ept` or `l1 npt`)") }
            if state.inL2 { throw fail("\(directive.name) is L1's: the vCPU runs L2 (vmexit first)") }
            if case .npt = nested.setting {
                switch directive {
                case .invept, .invvpid: throw fail("\(directive.name) needs `l1 ept` (L1 gives L2 NPT)")
                case .vmenter(let vpid?, _) where vpid != 0: throw fail("vpid= needs `l1 ept` (VPID is VMX's; L1 gives L2 NPT)")
                default: break
                }
            }
        case .vmexit:
            if !state.inL2 { throw fail("vmexit: the vCPU runs L1 (vmenter first)") }
        case .access, .expect, .set, .map, .pte, .invlpg, .space, .switchSpace, .reloadCR3, .invpcid:
            break  // L1's, or L2's between `vmenter` and `vmexit`
        case .preFault:
            break  // the VMM's ioctl, which KVM refuses while the vCPU runs L2 (EOPNOTSUPP)
        case .vcpu(let index):
            // Another vCPU runs whatever it ran (L1, or an L2 guest whose kernel all its vCPUs share).
            if state.inL2 && index == state.vcpus.count {
                throw fail("vcpu \(index): a new vCPU comes up in L1 (the current one runs L2: vmexit first, or switch to "
                           + "a vCPU in L1)")
            }
        default:
            if state.inL2 { throw fail("\(directive.name) in L2 is not modelled (docs/NESTED.md): vmexit first") }
        }
    }

    /// Fails the line when the processor would refuse the write (#GP), naming the rule.
    private func checkTransition(to registers: PagingRegisters, line: Int, keyword: Token,
                                 directive: ScenarioDirective) throws(ScenarioError) {
        if let fault = state.registers.transitionFault(to: registers, cpu: state.cpu) {
            throw ScenarioError(line: line, column: keyword.column, directive: directive.name, text: keyword.text,
                                message: "#GP: \(fault)")
        }
    }

    /// Splits a line into tokens at spaces and tabs (and other ASCII blanks), stopping at `#`.
    static func tokenize(_ scalars: [Unicode.Scalar]) -> [Token] {
        var tokens: [Token] = []
        var index = 0
        while index < scalars.count {
            let scalar = scalars[index]
            if scalar == "#" { break }
            if isBlank(scalar) { index += 1; continue }
            let start = index
            while index < scalars.count && !isBlank(scalars[index]) && scalars[index] != "#" { index += 1 }
            var text = String.UnicodeScalarView()
            text.append(contentsOf: scalars[start..<index])
            tokens.append(Token(text: String(text), column: start + 1))
        }
        return tokens
    }

    private static func isBlank(_ scalar: Unicode.Scalar) -> Bool {
        scalar == " " || scalar == "\t" || scalar == "\r" || scalar == "\u{0B}" || scalar == "\u{0C}"
    }
}

// MARK: Numbers

enum NumberParse: Equatable {
    case value(UInt64)
    case invalid
    case overflow
}

/// Decimal or `0x` hexadecimal, `_` allowed between digits.
func parseNumber(_ text: some StringProtocol) -> NumberParse {
    var bytes = Array(text.utf8)
    var radix: UInt64 = 10
    if bytes.count >= 2 && bytes[0] == 0x30 && (bytes[1] == 0x78 || bytes[1] == 0x58) {
        radix = 16
        bytes.removeFirst(2)
    }
    guard let first = bytes.first, let last = bytes.last, first != 0x5F, last != 0x5F else { return .invalid }
    var value: UInt64 = 0
    var overflowed = false
    var previousUnderscore = false
    for byte in bytes {
        if byte == 0x5F {
            if previousUnderscore { return .invalid }
            previousUnderscore = true
            continue
        }
        previousUnderscore = false
        let digit: UInt64
        switch byte {
        case 0x30...0x39: digit = UInt64(byte - 0x30)
        case 0x61...0x66 where radix == 16: digit = UInt64(byte - 0x61 + 10)
        case 0x41...0x46 where radix == 16: digit = UInt64(byte - 0x41 + 10)
        default: return .invalid
        }
        let (product, o1) = value.multipliedReportingOverflow(by: radix)
        let (sum, o2) = product.addingReportingOverflow(digit)
        if o1 || o2 { overflowed = true }
        value = sum
    }
    return overflowed ? .overflow : .value(value)
}

/// A NUMBER with an optional K, M or G suffix (binary multiples).
func parseSize(_ text: String) -> NumberParse {
    var body = Substring(text)
    var shift: UInt64 = 0
    switch body.last {
    case "k", "K": shift = 10
    case "m", "M": shift = 20
    case "g", "G": shift = 30
    default: break
    }
    if shift != 0 { body = body.dropLast() }
    switch parseNumber(body) {
    case .value(let value):
        guard value <= UInt64.max >> shift else { return .overflow }
        return .value(value << shift)
    case let other: return other
    }
}

// MARK: Arguments of one directive

/// The arguments of one directive line, with helpers that parse and validate them and build errors
/// that name the line, the column and the directive.
struct DirectiveArguments {
    let line: Int
    let text: String
    let spec: DirectiveSpec
    let keyword: Token
    /// Every token after the keyword.
    let tokens: [Token]
    /// The scenario state before this line.
    let state: ScenarioState
    /// How many tokens `positional` consumed.
    private var consumed = 0

    init(line: Int, text: String, spec: DirectiveSpec, keyword: Token, tokens: [Token], state: ScenarioState) {
        self.line = line
        self.text = text
        self.spec = spec
        self.keyword = keyword
        self.tokens = tokens
        self.state = state
    }

    var mode: PagingMode { state.mode }

    func error(_ message: String, at token: Token? = nil, column: Int? = nil) -> ScenarioError {
        ScenarioError(line: line, column: column ?? token?.column ?? keyword.column, directive: spec.name,
                      text: token?.text ?? text, message: message)
    }

    // MARK: Shape

    /// The first `names.count` tokens, which must not be `key=value` options (except where
    /// `allowingOption` says so).
    mutating func positional(_ names: [String], allowingOption: Set<Int> = []) throws(ScenarioError) -> [Token] {
        for (index, name) in names.enumerated() {
            guard index < tokens.count, allowingOption.contains(index) || !tokens[index].text.contains("=") else {
                let where_ = index < tokens.count ? tokens[index] : nil
                throw ScenarioError(line: line, column: where_?.column ?? keyword.column, directive: spec.name,
                                    text: where_?.text ?? text, message: "missing \(name) (usage: \(spec.usage))")
            }
        }
        consumed = names.count
        return Array(tokens.prefix(names.count))
    }

    /// The `key=value` options after the positional arguments, keyed by lowercased key; each value
    /// token's column is the value's own. Unknown keys, keys given twice and words that are not
    /// `key=value` are errors.
    /// `words` are bare words also allowed (`noflush`), keyed by themselves.
    func options(_ allowed: [String], words: [String] = []) throws(ScenarioError) -> [String: Token] {
        var result: [String: Token] = [:]
        var keyTokens: [String: Token] = [:]
        for token in tokens.dropFirst(consumed) {
            let word = asciiLowercased(token.text)
            if words.contains(word) {
                if let first = keyTokens[word] {
                    throw error("'\(word)' given twice (first at column \(first.column))", at: token)
                }
                keyTokens[word] = token
                result[word] = token
                continue
            }
            guard let equals = token.text.unicodeScalars.firstIndex(of: "=") else {
                if allowed.isEmpty {
                    throw error("unexpected '\(token.text)' (usage: \(spec.usage))", at: token)
                }
                throw error("expected key=value, not '\(token.text)' (usage: \(spec.usage))", at: token)
            }
            let rawKey = String(token.text.unicodeScalars[..<equals])
            let key = asciiLowercased(rawKey)
            let value = String(token.text.unicodeScalars[token.text.unicodeScalars.index(after: equals)...])
            guard allowed.contains(key) else {
                let known = allowed.isEmpty ? "it takes no options" : "options: " + allowed.joined(separator: ", ")
                throw error("unknown option '\(rawKey)' (\(known))", at: token)
            }
            if let first = keyTokens[key] {
                throw error("option '\(key)' given twice (first at column \(first.column))", at: token)
            }
            guard !value.isEmpty else { throw error("\(key): missing value after '='", at: token) }
            keyTokens[key] = token
            result[key] = Token(text: value, column: token.column + rawKey.unicodeScalars.count + 1)
        }
        return result
    }

    /// Fails when anything follows the positional arguments.
    func noOptions() throws(ScenarioError) {
        if let extra = tokens.dropFirst(consumed).first {
            throw error("unexpected '\(extra.text)' (usage: \(spec.usage))", at: extra)
        }
    }

    // MARK: Values

    func number(_ token: Token, what: String) throws(ScenarioError) -> UInt64 {
        switch parseNumber(token.text) {
        case .value(let value): return value
        case .invalid: throw error("\(what): '\(token.text)' is not a number", at: token)
        case .overflow: throw error("\(what): '\(token.text)' does not fit in 64 bits", at: token)
        }
    }

    func number(_ token: Token, what: String, in range: ClosedRange<UInt64>) throws(ScenarioError) -> UInt64 {
        let value = try number(token, what: what)
        guard range.contains(value) else {
            throw error("\(what) must be \(range.lowerBound)...\(range.upperBound), not '\(token.text)'", at: token)
        }
        return value
    }

    func bool(_ token: Token, what: String) throws(ScenarioError) -> Bool {
        switch token.text {
        case "0": return false
        case "1": return true
        default: throw error("\(what) must be 0 or 1, not '\(token.text)'", at: token)
        }
    }

    func flags(_ token: Token, what: String) throws(ScenarioError) -> UInt64 {
        switch EntryFlags.parseList(Substring(token.text)) {
        case .success(let mask):
            if mode == .legacy32 && mask >> 32 != 0 {
                let bit = 63 - mask.leadingZeroBitCount
                throw error("\(what): \(EntryFlags.name(ofBit: bit)) does not exist in the 4-byte entries of "
                    + "32-bit paging", at: token)
            }
            return mask
        case .failure(let failure):
            throw error("\(what): \(failure.message)", at: token, column: token.column + failure.offset)
        }
    }

    func cpl(_ options: [String: Token]) throws(ScenarioError) -> Int {
        guard let token = options["cpl"] else { return 0 }
        return Int(try number(token, what: "cpl", in: 0...3))
    }

    /// A GVA a guest operation names: any 64-bit value in 4/5-level paging, 32 bits otherwise.
    /// `tables` says the address is one whose entries are edited (checked against the edit mode,
    /// `mode`), not one accessed (checked against the mode in force).
    func operationAddress(_ token: Token, what: String, tables: Bool = false) throws(ScenarioError) -> UInt64 {
        let value = try number(token, what: what)
        let mode = tables ? mode : state.runningMode
        if !mode.isLongMode && value > UInt64(UInt32.max) {
            throw error("\(what) \(hex(value)) does not fit in the 32-bit linear addresses of \(mode.displayName)",
                        at: token)
        }
        return value
    }

    /// A GVA whose page-table entries a directive touches: canonical in 4/5-level paging.
    func mappableAddress(_ token: Token, what: String) throws(ScenarioError) -> UInt64 {
        let value = try operationAddress(token, what: what, tables: true)
        if mode.isLongMode && !GuestVirtualAddress(value).isCanonical(width: mode.linearAddressWidth) {
            throw error("\(what) \(hex(value)) is not canonical in \(mode.displayName) (bits 63:\(mode.linearAddressWidth - 1) "
                + "must be equal)", at: token)
        }
        return value
    }

    // MARK: Directives

    mutating func parseMem() throws(ScenarioError) -> ScenarioDirective {
        let size = try positional(["SIZE"])[0]
        try noOptions()
        let bytes: UInt64
        switch parseSize(size.text) {
        case .value(let value): bytes = value
        case .invalid: throw error("'\(size.text)' is not a size (a number with an optional K, M or G suffix)", at: size)
        case .overflow: throw error("'\(size.text)' does not fit in 64 bits", at: size)
        }
        guard bytes > 0, bytes % pageSize == 0 else {
            throw error("memory size must be a positive multiple of 4 KiB, not '\(size.text)'", at: size)
        }
        guard bytes <= Scenario.maximumMemorySize else {
            throw error("memory size must be at most 64G, not '\(size.text)'", at: size)
        }
        return .mem(bytes: bytes)
    }

    mutating func parseCPU() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let options = try options(["maxphyaddr", "gbpages", "la57", "vendor"])
        guard !options.isEmpty else { throw error("expected at least one option (usage: \(spec.usage))") }
        var settings = CPUSettings()
        if let token = options["maxphyaddr"] {
            settings.maxPhysicalAddressBits = Int(try number(token, what: "maxphyaddr", in: 36...52))
        }
        if let token = options["gbpages"] { settings.supports1GiBPages = try bool(token, what: "gbpages") }
        if let token = options["la57"] {
            let la57 = try bool(token, what: "la57")
            if !la57 && mode == .fiveLevel {
                throw error("la57=0, but 5-level paging was chosen earlier (set la57=1 or paging=5)", at: token)
            }
            settings.supportsLA57 = la57
        }
        if let token = options["vendor"] {
            guard let vendor = CPUVendor(rawValue: asciiLowercased(token.text)) else {
                throw error("vendor must be intel or amd, not '\(token.text)'", at: token)
            }
            settings.vendor = vendor
        }
        return .cpu(settings)
    }

    mutating func parseKVMParameters() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let options = try options(["nx_huge_pages", "nx_huge_pages_recovery_ratio", "eager_page_split"])
        guard !options.isEmpty else { throw error("expected at least one option (usage: \(spec.usage))") }
        var parameters = KVMModuleParameters()
        if let token = options["nx_huge_pages"] { parameters.nxHugePages = try bool(token, what: "nx_huge_pages") }
        if let token = options["nx_huge_pages_recovery_ratio"] {
            parameters.nxHugePagesRecoveryRatio = Int(try number(token, what: "nx_huge_pages_recovery_ratio", in: 0...1_000_000))
        }
        if let token = options["eager_page_split"] { parameters.eagerPageSplit = try bool(token, what: "eager_page_split") }
        return .kvm(parameters)
    }

    mutating func parseSet() throws(ScenarioError) -> ScenarioDirective {
        _ = try positional([])
        let options = try options(["wp", "nx", "smep", "smap", "pke", "ac", "pkru", "la57", "paging", "pse", "pcid"])
        guard !options.isEmpty else { throw error("expected at least one option (usage: \(spec.usage))") }
        var settings = ControlSettings()
        if let token = options["wp"] { settings.writeProtect = try bool(token, what: "wp") }
        if let token = options["nx"] { settings.noExecuteEnable = try bool(token, what: "nx") }
        if let token = options["smep"] { settings.smep = try bool(token, what: "smep") }
        if let token = options["smap"] { settings.smap = try bool(token, what: "smap") }
        if let token = options["pke"] { settings.protectionKeys = try bool(token, what: "pke") }
        if let token = options["ac"] { settings.alignmentCheck = try bool(token, what: "ac") }
        if let token = options["pkru"] {
            settings.pkru = UInt32(try number(token, what: "pkru", in: 0...UInt64(UInt32.max)))
        }
        if let token = options["la57"] { settings.pagingMode = try bool(token, what: "la57") ? .fiveLevel : .fourLevel }
        if let token = options["paging"] {
            if options["la57"] != nil {
                throw error("la57 and paging both choose the paging mode; give one", at: token)
            }
            switch asciiLowercased(token.text) {
            case "32", "legacy32": settings.pagingMode = .legacy32
            case "pae": settings.pagingMode = .pae
            case "4", "4level": settings.pagingMode = .fourLevel
            case "5", "5level": settings.pagingMode = .fiveLevel
            default: throw error("paging must be legacy32, pae, 4level or 5level (or 32, 4, 5), not '\(token.text)'", at: token)
            }
        }
        if let token = options["pse"] { settings.pageSizeExtensions = try bool(token, what: "pse") }
        if let token = options["pcid"] {
            let on = try bool(token, what: "pcid")
            let mode = settings.pagingMode ?? state.runningMode
            if on && !mode.isLongMode {
                throw error("#GP: pcid=1 (CR4.PCIDE) needs 4- or 5-level paging, not \(mode.displayName)", at: token)
            }
            settings.pcidEnable = on
        }
        if settings.pagingMode == .fiveLevel && !state.cpu.supportsLA57 {
            throw error("5-level paging needs a CPU with LA57 (cpu la57=0 was given)",
                        at: options["la57"] ?? options["paging"])
        }
        return .set(settings)
    }

    mutating func parseMap() throws(ScenarioError) -> ScenarioDirective {
        let args = try positional(["GVA", "GPA", "page size", "FLAGS"])
        let levels = mode.rootLevel
        let upperKeys = levels >= 2 ? (2...levels).map { "l\($0)" } : []
        let options = try options(upperKeys + ["pkey"])

        let sizeToken = args[2]
        let allowed = PageSize.sizes(for: mode)
        let allowedNames = allowed.map(\.name)
        let sizeList = allowedNames.dropLast().joined(separator: ", ") + " or " + allowedNames.last!
        guard case .value(let bytes) = parseSize(sizeToken.text), let size = PageSize(rawValue: bytes) else {
            throw error("page size must be \(sizeList), not '\(sizeToken.text)'", at: sizeToken)
        }
        guard allowed.contains(size) else {
            throw error("page size must be \(sizeList) with \(mode.displayName), not '\(sizeToken.text)'", at: sizeToken)
        }
        if size == .size4M && !state.registers.cr4.contains(.pageSizeExtensions) {
            throw error("a 4m page needs CR4.PSE (set pse=1): without it 32-bit paging has only 4 KiB pages", at: sizeToken)
        }

        let gva = try mappableAddress(args[0], what: "GVA")
        guard gva & (size.bytes - 1) == 0 else {
            throw error("GVA \(hex(gva)) is not aligned to the \(size.name) page size", at: args[0])
        }
        let gpa = try number(args[1], what: "GPA")
        guard gpa & (size.bytes - 1) == 0 else {
            throw error("GPA \(hex(gpa)) is not aligned to the \(size.name) page size", at: args[1])
        }
        let gpaLimit: UInt64 = switch mode {
        case .legacy32: size == .size4M ? 1 << UInt64(state.cpu.pse36HighAddressBits + 32) : 1 << 32
        default: 1 << 52
        }
        guard gpa < gpaLimit else {
            throw error("GPA \(hex(gpa)) does not fit in a \(mode.displayName) \(size.name) entry (limit \(hex(gpaLimit)))",
                        at: args[1])
        }
        let leafFlags = try flags(args[3], what: "FLAGS")

        var upper: [Int: UInt64] = [:]
        for level in 2...max(2, levels) {
            guard let token = options["l\(level)"] else { continue }
            guard level > size.leafLevel else {
                throw error("l\(level): a \(size.name) page's leaf is at level \(size.leafLevel); "
                    + "lN= sets the tables above it", at: token, column: token.column - "l\(level)=".count)
            }
            upper[level] = try flags(token, what: "l\(level)")
        }
        var pkey: Int?
        if let token = options["pkey"] {
            guard mode.isLongMode else {
                throw error("pkey needs 4- or 5-level paging, not \(mode.displayName)", at: token)
            }
            pkey = Int(try number(token, what: "pkey", in: 0...15))
        }
        return .map(MapDirective(gva: GuestVirtualAddress(gva), gpa: GuestPhysicalAddress(gpa), pageSize: size,
                                 leafFlags: leafFlags, upperFlags: upper, pkey: pkey))
    }

    mutating func parseAccess() throws(ScenarioError) -> ScenarioDirective {
        let args = try positional(["read|write|exec", "GVA"])
        let options = try options(["cpl", "value"])
        let kind: AccessKind
        switch asciiLowercased(args[0].text) {
        case "read": kind = .read
        case "write": kind = .write
        case "exec", "fetch": kind = .fetch
        default: throw error("access kind must be read, write or exec, not '\(args[0].text)'", at: args[0])
        }
        let gva = try operationAddress(args[1], what: "GVA")
        let cpl = try cpl(options)
        var value: UInt64?
        if let token = options["value"] { value = try number(token, what: "value") }
        return .access(kind: kind, gva: GuestVirtualAddress(gva), cpl: cpl, value: value)
    }

    mutating func parsePTE() throws(ScenarioError) -> ScenarioDirective {
        let args = try positional(["GVA", "LEVEL", "FLAGS or raw=VALUE"], allowingOption: [2])
        let options = try options(["cpl"])
        let gva = try mappableAddress(args[0], what: "GVA")
        let level = Int(try number(args[1], what: "LEVEL", in: 1...5))
        guard level <= mode.rootLevel else {
            throw error("LEVEL \(level) does not exist in \(mode.displayName) (levels 1...\(mode.rootLevel))", at: args[1])
        }
        let valueToken = args[2]
        let value: EntryValue
        if asciiLowercased(String(valueToken.text.prefix(4))) == "raw=" {
            let raw = Token(text: String(valueToken.text.dropFirst(4)), column: valueToken.column + 4)
            let bits = try number(raw, what: "raw")
            if mode == .legacy32 && bits > UInt64(UInt32.max) {
                throw error("raw: \(hex(bits)) does not fit in the 4-byte entries of 32-bit paging", at: raw)
            }
            value = .raw(bits)
        } else if valueToken.text.contains("=") {
            throw error("expected FLAGS or raw=VALUE, not '\(valueToken.text)' (usage: \(spec.usage))", at: valueToken)
        } else {
            value = .flags(try flags(valueToken, what: "FLAGS"))
        }
        return .pte(gva: GuestVirtualAddress(gva), level: level, value: value, cpl: try cpl(options))
    }
}

// MARK: Files

/// The contents of a scenario file (at most 64 MiB), invalid UTF-8 repaired.
private func readScenarioFile(_ path: String) throws(ScenarioError) -> String {
    func failure(_ what: String) -> ScenarioError {
        let reason = String(cString: strerror(errno))
        return ScenarioError(source: path, text: path, message: "cannot \(what) '\(path)': \(reason)")
    }
    guard let file = fopen(path, "rb") else { throw failure("open") }
    defer { fclose(file) }
    let limit = 64 << 20
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
        if count > 0 { bytes.append(contentsOf: chunk[0..<count]) }
        if bytes.count > limit {
            throw ScenarioError(source: path, text: path, message: "'\(path)' is larger than 64 MiB; not a scenario")
        }
        if count < chunk.count {
            if ferror(file) != 0 { throw failure("read") }
            break
        }
    }
    return String(decoding: bytes, as: UTF8.self)
}
