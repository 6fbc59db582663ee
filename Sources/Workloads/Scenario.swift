// The scenario language's data model: a parsed scenario, its directives with typed payloads, and
// the settings they resolve to. The grammar is described in ScenarioParser.swift; the canonical text
// form in ScenarioRender.swift.

import VirtualMachine
import KVMMMU
import X86Paging

/// A parsed scenario: its directives in order, each with where it came from, and the machine they
/// describe (memory size, CPU model, control registers before the first guest operation).
public struct Scenario: Hashable, Sendable {
    /// Where the scenario came from: a file path or a name the caller chose.
    public var name: String
    /// Every directive, in source order, with its line number and text.
    public var directives: [ScenarioStatement]
    /// Guest memory in bytes: the `mem` directive's, or `defaultMemorySize`.
    public var memorySize: UInt64
    /// The CPU model: `defaultCPUModel` with every `cpu` directive applied.
    public var cpuModel: CPUModel
    /// The control settings the guest starts with: `ControlState.defaults` with every `set` that comes
    /// before the first guest operation applied. Later `set` directives change them as the scenario
    /// runs (and applying the early ones again is harmless: `set` assigns absolute values).
    public var initialControls: ControlState
    /// The host's paging depth for shadow pages (`host levels=4|5`), or nil to follow the guest.
    public var hostLevels: Int?
    /// KVM's module parameters the `kvm` lines set (the rest keep the VM's defaults).
    public var kvmParameters: KVMModuleParameters

    /// The most vCPUs a scenario may bring up (`vcpu N` takes 0 ..< this).
    public static let maximumVCPUs = 64
    /// 64 MiB.
    public static let defaultMemorySize: UInt64 = 64 << 20
    /// The largest `mem` accepted, 64 GiB.
    public static let maximumMemorySize: UInt64 = 64 << 30
    /// MAXPHYADDR 46, 1 GiB pages and LA57 supported, Intel.
    public static var defaultCPUModel: CPUModel {
        CPUModel(maxPhysicalAddressBits: 46, supports1GiBPages: true, supportsLA57: true, vendor: .intel)
    }

    /// The paging mode the scenario runs in (fixed before the first guest operation).
    public var pagingMode: PagingMode { initialControls.pagingMode }

    public init(name: String, directives: [ScenarioStatement], memorySize: UInt64, cpuModel: CPUModel,
                initialControls: ControlState, hostLevels: Int? = nil, kvmParameters: KVMModuleParameters = KVMModuleParameters()) {
        self.name = name
        self.directives = directives
        self.memorySize = memorySize
        self.cpuModel = cpuModel
        self.initialControls = initialControls
        self.hostLevels = hostLevels
        self.kvmParameters = kvmParameters
    }

    /// The address space the guest kernel boots on, and the one `map` edits until a `space` line.
    public static let kernelSpace = "kernel"


    /// A scenario made of `directives`, validated exactly as the parser validates text: each
    /// statement gets its canonical text (`ScenarioDirective.rendered`) and line `index + 1`, so
    /// `Scenario.parse(s.render(), name: s.name) == s`.
    public init(name: String, directives: [ScenarioDirective]) throws(ScenarioError) {
        self = try Scenario.parse(directives.map(\.rendered).joined(separator: "\n"), name: name)
    }
}

/// One directive at its place in the source.
public struct ScenarioStatement: Hashable, Sendable {
    /// 1-based line number.
    public var line: Int
    /// The line as written (without its line terminator, comment included).
    public var text: String
    public var directive: ScenarioDirective

    public init(line: Int, text: String, directive: ScenarioDirective) {
        self.line = line
        self.text = text
        self.directive = directive
    }
}

/// One directive with its typed payload.
public enum ScenarioDirective: Hashable, Sendable {
    /// `mem SIZE`: guest memory in bytes.
    case mem(bytes: UInt64)
    /// `set KEY=VALUE...`: control-register changes; only the keys given are set.
    case set(ControlSettings)
    /// `cpu KEY=VALUE...`: CPU-model changes; only the keys given are set.
    case cpu(CPUSettings)
    /// `map GVA GPA SIZE FLAGS [lN=FLAGS]... [pkey=N]`: the guest maps a page.
    case map(MapDirective)
    /// `access read|write|exec GVA [cpl=N] [value=V]`: the guest touches memory.
    case access(kind: AccessKind, gva: GuestVirtualAddress, cpl: Int, value: UInt64?)
    /// `pte GVA LEVEL FLAGS|raw=VALUE [cpl=N]`: the guest rewrites its own level-`level` entry for `gva`.
    case pte(gva: GuestVirtualAddress, level: Int, value: EntryValue, cpl: Int)
    /// `invlpg GVA`.
    case invlpg(GuestVirtualAddress)
    /// `reload-cr3`: the guest writes CR3 with its current value (flushing non-global translations).
    case reloadCR3
    /// `host levels=4|5`: the host's paging depth for shadow pages.
    case host(levels: Int)
    /// `space NAME`: create the address space if new; following `map` and `pte` edit it.
    case space(String)
    /// `switch NAME [pcid=N] [noflush]`: MOV to CR3 of the space's root for the current mode, with
    /// PCID `pcid` in bits 11:0 and, with `noFlush`, bit 63 of the source set.
    case switchSpace(name: String, pcid: UInt16, noFlush: Bool)
    /// `invpcid TYPE [pcid=N] [gva=ADDR]`: the guest's INVPCID (a PCID above 4095, like a
    /// non-canonical individual address, is how a scenario asks for the #GP).
    case invpcid(INVPCIDType, pcid: UInt64, gva: GuestVirtualAddress)
    /// `cr0 VALUE`, `cr4 VALUE`, `efer VALUE`: a raw write of the whole register.
    case writeRegister(ControlRegister, value: UInt64)
    /// `cr3 VALUE [noflush]`: a raw MOV to CR3 (bit 63 of the source set with `noFlush`).
    case loadCR3(value: UInt64, noFlush: Bool)
    /// `zap all` / `zap gfn FIRST [COUNT]`: a host-side zap the guest does not ask for
    /// (`kvm_mmu_zap_all_fast`, as for a memslot deletion; `kvm_zap_gfn_range`, as for an MTRR
    /// change).
    case zap(ZapScope)
    /// `memslot add|delete|move|flags ...`: a memslot change by the VMM (KVM_SET_USER_MEMORY_REGION).
    case memslot(MemslotChange)
    /// `dirty-log enable|disable|mode|get|clear ...`: dirty logging as a VMM drives it.
    case dirtyLog(DirtyLogRequest)
    /// `expect NAME=VALUE...`: the counters must have these values at this point of the run (a run
    /// that finds otherwise fails); in source order.
    case expect([ExpectedCounter])
    /// `spp set GFN MASK` / `spp get GFN`: the VMM's sub-page write protection requests
    /// (KVM_SUBPAGES_SET_ACCESS / GET_ACCESS, one page each; `--mmu tdp` only).
    case subPageProtection(SubPageProtectionRequest)
    /// `vcpu N`: the following guest operations run on vCPU `N` (brought up, when new, in the state
    /// the current vCPU is in, as an OS's AP trampoline leaves an application processor).
    case vcpu(Int)
    /// `l1 ept|npt ...`: the paging L1 gives L2 (docs/NESTED.md).
    case l1(NestedPagingSetting)
    /// `ept-map L2GPA L1GPA 4k|2m|1g PERMS`: L1 writes its entry for an L2 page with L1 stores.
    case eptMap(EPTMapDirective)
    /// `ept-demand L2GPA L1GPA SIZE 4k|2m|1g PERMS`: L1 maps an L2 range on demand, from its
    /// handler of the exits the range's unmapped pages cause.
    case eptDemand(EPTDemandDirective)
    /// `vmenter [vpid=N] [guest=N]`: L1 enters L2 guest `guest` (VMLAUNCH/VMRESUME, VMRUN: its
    /// EPTP or nCR3, its registers), with VPID `vpid` in vmcs12 ("enable VPID" set) or without
    /// VPID (nil).
    case vmenter(vpid: UInt16?, guest: Int)
    /// `vmexit`: L2 exits to L1.
    case vmexit
    /// `invept single [guest=N]|global`: L1's INVEPT of guest `guest`'s EPTP, or of every EPTP.
    case invept(INVEPTScope, guest: Int)
    /// `invvpid individual|single|all|single-globals [VPID] [GVA]`: L1's INVVPID.
    case invvpid(INVVPIDType, vpid: UInt16, gva: GuestVirtualAddress)
    /// `kvm KEY=VALUE...`: KVM's module parameters for the VM; only the keys given change.
    case kvm(KVMModuleParameters)
    /// `nx-recover`: one period of KVM's NX huge-page recovery worker.
    case nxRecover
    /// `age clear|test GFN [COUNT]`: the MMU notifiers' clear_young or test_young over COUNT gfns
    /// (`kvm_age_gfn`, `kvm_test_age_gfn`).
    case age(testOnly: Bool, first: UInt64, count: UInt64)
    /// `prefault GPA SIZE [flags=N]`: the VMM's KVM_PRE_FAULT_MEMORY on the current vCPU, called
    /// again while it makes progress, as a VMM does (any values: KVM's own checks answer bad ones).
    case preFault(gpa: GuestPhysicalAddress, size: UInt64, flags: UInt64)

    /// The directive's keyword.
    public var name: String {
        switch self {
        case .mem: "mem"
        case .set: "set"
        case .cpu: "cpu"
        case .map: "map"
        case .access: "access"
        case .pte: "pte"
        case .invlpg: "invlpg"
        case .reloadCR3: "reload-cr3"
        case .host: "host"
        case .space: "space"
        case .switchSpace: "switch"
        case .invpcid: "invpcid"
        case .writeRegister(let register, _): register.rawValue
        case .loadCR3: "cr3"
        case .zap: "zap"
        case .memslot: "memslot"
        case .dirtyLog: "dirty-log"
        case .expect: "expect"
        case .vcpu: "vcpu"
        case .subPageProtection: "spp"
        case .l1: "l1"
        case .eptMap: "ept-map"
        case .eptDemand: "ept-demand"
        case .vmenter: "vmenter"
        case .vmexit: "vmexit"
        case .invept: "invept"
        case .invvpid: "invvpid"
        case .kvm: "kvm"
        case .nxRecover: "nx-recover"
        case .age: "age"
        case .preFault: "prefault"
        }
    }

    /// Whether this directive is a guest operation (it needs the machine built). `mem`, `cpu` and
    /// `host` must come before the first one.
    public var isGuestOperation: Bool {
        switch self {
        case .mem, .set, .cpu, .host, .expect, .l1, .kvm: false
        case .map, .access, .pte, .invlpg, .reloadCR3, .space, .switchSpace, .invpcid, .writeRegister, .loadCR3, .zap,
             .memslot, .dirtyLog, .vcpu, .subPageProtection, .eptMap, .eptDemand, .vmenter, .vmexit, .invept, .invvpid, .nxRecover,
             .age, .preFault: true
        }
    }

    /// Whether the directive runs guest code, so that the kernel must have booted (loaded CR3 and
    /// turned paging on) first. `map` and `space` before boot are boot code writing tables directly.
    public var runsGuest: Bool {
        switch self {
        // The VMM's own requests (memslots, the dirty log, a zap) need the machine but not the guest.
        // `ept-demand` only tells L1's exit handler what to map later.
        case .mem, .set, .cpu, .host, .map, .space, .zap, .memslot, .dirtyLog, .expect, .l1, .kvm, .nxRecover, .age,
             .eptDemand: false
        // SPP's permissions are checked by the reference machine, which the boot makes; and
        // KVM_PRE_FAULT_MEMORY is an ioctl of a vCPU, which the boot brings up.
        case .preFault, .access, .pte, .invlpg, .reloadCR3, .switchSpace, .invpcid, .writeRegister, .loadCR3, .vcpu, .subPageProtection,
             .eptMap, .vmenter, .vmexit, .invept, .invvpid: true
        }
    }
}

/// A memslot change.
public enum MemslotChange: Hashable, Sendable {
    /// `memslot add SLOT GPA SIZE [readonly]`.
    case add(slot: Int, base: GuestPhysicalAddress, size: UInt64, readOnly: Bool)
    /// `memslot delete SLOT`.
    case delete(slot: Int)
    /// `memslot move SLOT GPA`.
    case move(slot: Int, base: GuestPhysicalAddress)
    /// `memslot flags SLOT log-dirty=0|1` (the read-only flag cannot change, as in KVM).
    case flags(slot: Int, logDirty: Bool)
}

/// A dirty-log request.
public enum DirtyLogRequest: Hashable, Sendable {
    /// `dirty-log enable SLOT` / `dirty-log disable SLOT`: KVM_MEM_LOG_DIRTY_PAGES on or off.
    case setLogging(slot: Int, enabled: Bool)
    /// `dirty-log mode reset|manual|ring [entries=N]`: get-and-reset, manual protection with
    /// clear, or per-vCPU dirty rings of `ringEntries` entries.
    case mode(DirtyLogProtocol, ringEntries: Int)
    /// `dirty-log get SLOT`: KVM_GET_DIRTY_LOG.
    case get(slot: Int)
    /// `dirty-log clear SLOT FIRST COUNT`: KVM_CLEAR_DIRTY_LOG of COUNT pages from page FIRST of
    /// the slot.
    case clear(slot: Int, first: UInt64, count: UInt64)
}

/// A sub-page write protection request.
public enum SubPageProtectionRequest: Hashable, Sendable {
    /// `spp set GFN MASK`: page `gfn` gets `mask` (bit i: sub-page i, bytes 128i..128i+127, writable).
    case set(gfn: GuestFrameNumber, mask: SubPageWriteMask)
    /// `spp get GFN`: the page's permissions, reported as a `spp` line.
    case get(gfn: GuestFrameNumber)
}

/// What a `zap` directive zaps.
public enum ZapScope: Hashable, Sendable {
    /// Every shadow page, made obsolete at once (`kvm_mmu_zap_all_fast`).
    case all
    /// The leaf SPTEs mapping `count` gfns from `first` (`kvm_zap_gfn_range`).
    case gfns(first: UInt64, count: UInt64)
}

/// One counter an `expect` line names, and the value it must have.
public struct ExpectedCounter: Hashable, Sendable {
    /// One of `ExpectedCounter.names`.
    public var name: String
    public var value: UInt64

    public init(name: String, value: UInt64) {
        self.name = name
        self.value = value
    }

    /// The counters the model keeps beside KVM's statistics (`RunReport`'s context counters, and
    /// the shadow pages alive), which an `expect` line may name too.
    public static let contextCounterNames = ["context_resets", "role_reinitializations", "roots_created",
                                             "root_cache_hits", "root_cache_misses", "shadow_pages"]

    /// Every name an `expect` line accepts: KVM's statistics (`MMUStats.counterNames`), then the
    /// context counters.
    public static var names: [String] { MMUStats.counterNames + contextCounterNames }
}

/// A control register `cr0`, `cr4` and `efer` write by value.
public enum ControlRegister: String, Hashable, Sendable, CaseIterable {
    case cr0, cr4, efer

    /// `registers` with this register replaced by `value`; EFER.LMA is then what the processor
    /// computes from LME and PG, whatever `value` says.
    public func writing(_ value: UInt64, to registers: PagingRegisters) -> PagingRegisters {
        var new = registers
        switch self {
        case .cr0: new.cr0 = CR0(rawValue: value)
        case .cr4: new.cr4 = CR4(rawValue: value)
        case .efer: new.efer = EFER(rawValue: value)
        }
        return new.withComputedLongModeActive
    }
}

extension INVPCIDType {
    /// The scenario language's word: `individual`, `single`, `all`, `all-nonglobal`.
    public var scenarioName: String {
        switch self {
        case .individualAddress: "individual"
        case .singleContext: "single"
        case .allContextsIncludingGlobal: "all"
        case .allContextsExceptGlobal: "all-nonglobal"
        }
    }
}

/// A page size a `map` directive can use.
public enum PageSize: UInt64, Hashable, Sendable, CaseIterable {
    case size4K = 0x1000
    /// 2 MiB: a PDE with PS in PAE, 4-level and 5-level paging.
    case size2M = 0x20_0000
    /// 1 GiB: a PDPTE with PS in 4-level and 5-level paging.
    case size1G = 0x4000_0000
    /// 4 MiB: a PDE with PS in 32-bit paging (extension: `4m`, only with `set paging=32`).
    case size4M = 0x40_0000

    /// The size in bytes.
    @inlinable public var bytes: UInt64 { rawValue }

    /// The level of the leaf entry that maps a page of this size.
    public var leafLevel: Int {
        switch self {
        case .size4K: 1
        case .size2M, .size4M: 2
        case .size1G: 3
        }
    }

    /// The spelling used in scenario text: `4k`, `2m`, `1g`, `4m`.
    public var name: String {
        switch self {
        case .size4K: "4k"
        case .size2M: "2m"
        case .size1G: "1g"
        case .size4M: "4m"
        }
    }

    /// The page sizes a paging mode can map.
    public static func sizes(for mode: PagingMode) -> [PageSize] {
        switch mode {
        case .disabled: []
        case .legacy32: [.size4K, .size4M]
        case .pae: [.size4K, .size2M]
        case .fourLevel, .fiveLevel: [.size4K, .size2M, .size1G]
        }
    }
}

/// The payload of `map`.
public struct MapDirective: Hashable, Sendable {
    public var gva: GuestVirtualAddress
    public var gpa: GuestPhysicalAddress
    public var pageSize: PageSize
    /// The leaf entry's flag bits as written (`EntryFlags` bit mask). The address, and PS for a large
    /// page, are not part of it: whoever builds the entry adds them.
    public var leafFlags: UInt64
    /// Flags for the table entries above the leaf that were given explicitly (`l2=`, `l3=`, `l4=`,
    /// `l5=`), by level. Levels not listed use `defaultUpperFlags`.
    public var upperFlags: [Int: UInt64]
    /// The protection key (bits 62:59 of the leaf), 0...15, when given.
    public var pkey: Int?

    /// P, RW, US.
    public static let defaultUpperFlags: UInt64 = EntryFlags.present.rawValue | EntryFlags.writable.rawValue
        | EntryFlags.user.rawValue

    public init(gva: GuestVirtualAddress, gpa: GuestPhysicalAddress, pageSize: PageSize, leafFlags: UInt64,
                upperFlags: [Int: UInt64] = [:], pkey: Int? = nil) {
        self.gva = gva
        self.gpa = gpa
        self.pageSize = pageSize
        self.leafFlags = leafFlags
        self.upperFlags = upperFlags
        self.pkey = pkey
    }

    /// The flags of the table entry at `level` (above the leaf): the explicit ones or the default.
    public func tableFlags(level: Int) -> UInt64 { upperFlags[level] ?? Self.defaultUpperFlags }

    /// The leaf's flags with the protection key placed in bits 62:59.
    public var leafFlagsWithKey: UInt64 {
        guard let pkey else { return leafFlags }
        return (leafFlags & ~bitRange(59, 62)) | UInt64(pkey & 15) << 59
    }
}

/// What a `pte` directive writes.
public enum EntryValue: Hashable, Sendable {
    /// The entry's flag bits (an `EntryFlags` mask); the runner keeps the entry's address.
    case flags(UInt64)
    /// The whole entry, exactly.
    case raw(UInt64)
}

/// Changes made by one `set` directive: nil means "not given, leave as is".
public struct ControlSettings: Hashable, Sendable {
    /// `wp=`: CR0.WP.
    public var writeProtect: Bool?
    /// `nx=`: EFER.NXE.
    public var noExecuteEnable: Bool?
    /// `smep=`: CR4.SMEP.
    public var smep: Bool?
    /// `smap=`: CR4.SMAP.
    public var smap: Bool?
    /// `pke=`: CR4.PKE.
    public var protectionKeys: Bool?
    /// `ac=`: RFLAGS.AC.
    public var alignmentCheck: Bool?
    /// `pkru=`: PKRU.
    public var pkru: UInt32?
    /// `la57=0|1` (4- or 5-level paging) or, as an extension, `paging=32|pae|4|5` (also spelled
    /// `legacy32|pae|4level|5level`). After the first guest operation, a mode switch.
    public var pagingMode: PagingMode?
    /// `pse=`: CR4.PSE.
    public var pageSizeExtensions: Bool?
    /// `pcid=`: CR4.PCIDE.
    public var pcidEnable: Bool?

    public init(writeProtect: Bool? = nil, noExecuteEnable: Bool? = nil, smep: Bool? = nil, smap: Bool? = nil,
                protectionKeys: Bool? = nil, alignmentCheck: Bool? = nil, pkru: UInt32? = nil,
                pagingMode: PagingMode? = nil, pageSizeExtensions: Bool? = nil, pcidEnable: Bool? = nil) {
        self.pageSizeExtensions = pageSizeExtensions
        self.pcidEnable = pcidEnable
        self.writeProtect = writeProtect
        self.noExecuteEnable = noExecuteEnable
        self.smep = smep
        self.smap = smap
        self.protectionKeys = protectionKeys
        self.alignmentCheck = alignmentCheck
        self.pkru = pkru
        self.pagingMode = pagingMode
    }

    /// Nothing is changed.
    public var isEmpty: Bool { self == ControlSettings() }

    /// The registers this `set` leaves, from `registers`, where `controls` are the settings with this
    /// `set` applied. The keys given change their bits; a paging mode replaces the bits that select
    /// the mode (CR0.PG, CR4.PAE, LA57 and PSE, EFER.LME and LMA) with `controls`'s, and keeps
    /// CR4.PCIDE only in 4- and 5-level paging. CR3 is the caller's (a mode switch loads a new root).
    public func applied(to registers: PagingRegisters, controls: ControlState) -> PagingRegisters {
        var new = registers
        func assign<Set: OptionSet>(_ value: Bool?, _ member: Set, in set: inout Set) where Set.Element == Set {
            guard let value else { return }
            if value { set.insert(member) } else { set.remove(member) }
        }
        if pagingMode != nil {
            let target = controls.registers(cr3: registers.cr3)
            let modeCR4: CR4 = [.physicalAddressExtension, .la57, .pageSizeExtensions]
            new.cr0.insert(.paging)
            new.cr0.insert(.protectionEnable)
            new.cr4 = new.cr4.subtracting(modeCR4).union(target.cr4.intersection(modeCR4))
            assign(target.efer.contains(.longModeEnable), .longModeEnable, in: &new.efer)
            if !target.mode.isLongMode { new.cr4.remove(.pcidEnable) }
        }
        assign(writeProtect, .writeProtect, in: &new.cr0)
        assign(noExecuteEnable, .noExecuteEnable, in: &new.efer)
        assign(smep, .smep, in: &new.cr4)
        assign(smap, .smap, in: &new.cr4)
        assign(protectionKeys, .protectionKeys, in: &new.cr4)
        assign(alignmentCheck, .alignmentCheck, in: &new.rflags)
        assign(pageSizeExtensions, .pageSizeExtensions, in: &new.cr4)
        assign(pcidEnable, .pcidEnable, in: &new.cr4)
        if let pkru { new.pkru = PKRU(pkru) }
        return new.withComputedLongModeActive
    }
}

/// The control settings in force: what `set` directives change.
public struct ControlState: Hashable, Sendable {
    public var pagingMode: PagingMode
    /// CR0.WP.
    public var writeProtect: Bool
    /// EFER.NXE.
    public var noExecuteEnable: Bool
    /// CR4.SMEP.
    public var smep: Bool
    /// CR4.SMAP.
    public var smap: Bool
    /// CR4.PKE.
    public var protectionKeys: Bool
    /// RFLAGS.AC.
    public var alignmentCheck: Bool
    public var pkru: PKRU
    /// CR4.PSE as `set pse=` chose it; nil: set with 32-bit paging only (so 4 MiB pages work).
    public var pageSizeExtensions: Bool?
    /// CR4.PCIDE (4- and 5-level paging only).
    public var pcidEnable: Bool

    public init(pagingMode: PagingMode = .fourLevel, writeProtect: Bool = true, noExecuteEnable: Bool = true,
                smep: Bool = false, smap: Bool = false, protectionKeys: Bool = false, alignmentCheck: Bool = false,
                pkru: PKRU = .allowAll, pageSizeExtensions: Bool? = nil, pcidEnable: Bool = false) {
        self.pageSizeExtensions = pageSizeExtensions
        self.pcidEnable = pcidEnable
        self.pagingMode = pagingMode
        self.writeProtect = writeProtect
        self.noExecuteEnable = noExecuteEnable
        self.smep = smep
        self.smap = smap
        self.protectionKeys = protectionKeys
        self.alignmentCheck = alignmentCheck
        self.pkru = pkru
    }

    /// 4-level paging, CR0.WP=1, EFER.NXE=1, SMEP/SMAP/PKE off, RFLAGS.AC=0, PKRU=0.
    public static var defaults: ControlState { ControlState() }

    /// These settings with `changes` applied.
    public func applying(_ changes: ControlSettings) -> ControlState {
        var state = self
        if let value = changes.pagingMode { state.pagingMode = value }
        if let value = changes.writeProtect { state.writeProtect = value }
        if let value = changes.noExecuteEnable { state.noExecuteEnable = value }
        if let value = changes.smep { state.smep = value }
        if let value = changes.smap { state.smap = value }
        if let value = changes.protectionKeys { state.protectionKeys = value }
        if let value = changes.alignmentCheck { state.alignmentCheck = value }
        if let value = changes.pkru { state.pkru = PKRU(value) }
        if let value = changes.pageSizeExtensions { state.pageSizeExtensions = value }
        if let value = changes.pcidEnable { state.pcidEnable = value }
        // PCIDs exist only in IA-32e mode: a switch out of it leaves PCIDE clear.
        if changes.pagingMode != nil && !state.pagingMode.isLongMode { state.pcidEnable = false }
        return state
    }

    /// CR0: PE and PG, plus WP when set.
    public var cr0: CR0 {
        var value: CR0 = [.protectionEnable, .paging]
        if writeProtect { value.insert(.writeProtect) }
        return value
    }

    /// CR4: PSE with 32-bit paging (so 4 MiB pages work) unless `pse=` chose otherwise, PAE with
    /// PAE/4/5-level paging, LA57 with 5-level paging, and SMEP, SMAP, PKE, PCIDE as set.
    public var cr4: CR4 {
        var value: CR4 = []
        switch pagingMode {
        case .disabled, .legacy32: break
        case .pae, .fourLevel: value.insert(.physicalAddressExtension)
        case .fiveLevel: value.formUnion([.physicalAddressExtension, .la57])
        }
        if pageSizeExtensions ?? (pagingMode == .legacy32) { value.insert(.pageSizeExtensions) }
        if pcidEnable { value.insert(.pcidEnable) }
        if smep { value.insert(.smep) }
        if smap { value.insert(.smap) }
        if protectionKeys { value.insert(.protectionKeys) }
        return value
    }

    /// EFER: LME and LMA with 4/5-level paging, NXE as set.
    public var efer: EFER {
        var value: EFER = []
        if pagingMode.isLongMode { value.formUnion([.longModeEnable, .longModeActive]) }
        if noExecuteEnable { value.insert(.noExecuteEnable) }
        return value
    }

    /// RFLAGS: AC as set.
    public var rflags: RFLAGS { alignmentCheck ? .alignmentCheck : [] }

    /// The registers for a walker, with `cr3` (the root table address) supplied by the caller.
    public func registers(cr3: UInt64) -> PagingRegisters {
        PagingRegisters(cr0: cr0, cr3: cr3, cr4: cr4, efer: efer, pkru: pkru, rflags: rflags)
    }
}

/// Changes made by one `cpu` directive: nil means "not given, leave as is".
public struct CPUSettings: Hashable, Sendable {
    /// `maxphyaddr=N`, 36...52.
    public var maxPhysicalAddressBits: Int?
    /// `gbpages=0|1`.
    public var supports1GiBPages: Bool?
    /// `la57=0|1`.
    public var supportsLA57: Bool?
    /// `vendor=intel|amd` (extension).
    public var vendor: CPUVendor?

    public init(maxPhysicalAddressBits: Int? = nil, supports1GiBPages: Bool? = nil, supportsLA57: Bool? = nil,
                vendor: CPUVendor? = nil) {
        self.maxPhysicalAddressBits = maxPhysicalAddressBits
        self.supports1GiBPages = supports1GiBPages
        self.supportsLA57 = supportsLA57
        self.vendor = vendor
    }

    /// `model` with these changes applied.
    public func applied(to model: CPUModel) -> CPUModel {
        var model = model
        if let value = maxPhysicalAddressBits { model.maxPhysicalAddressBits = value }
        if let value = supports1GiBPages { model.supports1GiBPages = value }
        if let value = supportsLA57 { model.supportsLA57 = value }
        if let value = vendor { model.vendor = value }
        return model
    }
}

/// KVM's module parameters a scenario may set (`kvm KEY=VALUE...`); nil keeps the VM's default.
/// They shape the TDP MMU (and `guest_mmu` under it); the model's shadow paging of a guest's own
/// tables maps 4 KiB pages only, so there they change nothing.
public struct KVMModuleParameters: Hashable, Sendable {
    /// `nx_huge_pages=0|1`: the iTLB multihit mitigation (executable huge pages split to 4 KiB).
    public var nxHugePages: Bool?
    /// `nx_huge_pages_recovery_ratio=N`: each recovery period zaps 1/N of the split pages (0: none).
    public var nxHugePagesRecoveryRatio: Int?
    /// `eager_page_split=0|1`: split huge pages when dirty logging starts, not at the first write.
    public var eagerPageSplit: Bool?

    public init(nxHugePages: Bool? = nil, nxHugePagesRecoveryRatio: Int? = nil, eagerPageSplit: Bool? = nil) {
        self.nxHugePages = nxHugePages
        self.nxHugePagesRecoveryRatio = nxHugePagesRecoveryRatio
        self.eagerPageSplit = eagerPageSplit
    }

    /// These parameters over `other`'s (a later `kvm` line over an earlier one).
    public func applied(to other: KVMModuleParameters) -> KVMModuleParameters {
        KVMModuleParameters(nxHugePages: nxHugePages ?? other.nxHugePages,
                            nxHugePagesRecoveryRatio: nxHugePagesRecoveryRatio ?? other.nxHugePagesRecoveryRatio,
                            eagerPageSplit: eagerPageSplit ?? other.eagerPageSplit)
    }

    /// `configuration` with these parameters applied.
    public func applied(to configuration: TDPMMUConfiguration) -> TDPMMUConfiguration {
        var configuration = configuration
        if let value = nxHugePages { configuration.nxHugePages = value }
        if let value = nxHugePagesRecoveryRatio { configuration.nxHugePagesRecoveryRatio = value }
        if let value = eagerPageSplit { configuration.eagerPageSplit = value }
        return configuration
    }
}

/// A scenario that cannot be parsed: where, what, and why.
public struct ScenarioError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The scenario's name (a file path, usually), when known.
    public var source: String?
    /// 1-based line number; nil for errors not tied to a line (an unreadable file, a lone flag list).
    public var line: Int?
    /// 1-based column (in Unicode scalars) of the offending text, when known.
    public var column: Int?
    /// The directive being parsed, when known.
    public var directive: String?
    /// The offending text: a token, or the whole line.
    public var text: String
    /// What is wrong, without the location.
    public var message: String

    public init(source: String? = nil, line: Int? = nil, column: Int? = nil, directive: String? = nil,
                text: String, message: String) {
        self.source = source
        self.line = line
        self.column = column
        self.directive = directive
        self.text = text
        self.message = message
    }

    /// `line 7: map: page size must be 4k, 2m or 1g, not '3m'`.
    public var description: String {
        var parts: [String] = []
        if let line { parts.append("line \(line)") }
        if let directive { parts.append(directive) }
        parts.append(message)
        return parts.joined(separator: ": ")
    }
}
