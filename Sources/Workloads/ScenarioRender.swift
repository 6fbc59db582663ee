// The canonical text form of a scenario: what `Scenario.render()` prints and `Scenario.parse` reads
// back to the same directives.
//
//   mem 64M                     sizes with the largest exact K/M/G suffix
//   cpu maxphyaddr=46 gbpages=1 la57=1 vendor=intel        only the keys given, in this order
//   set wp=1 nx=1 smep=0 smap=0 pke=0 ac=0 pkru=0x0 la57=1   only the keys given, in this order;
//                               4/5-level paging as la57=0|1, 32-bit/PAE as paging=32|pae
//   map 0x400000 0x2000000 4k P,RW,US l4=P,RW,US pkey=1      addresses hex, flags by EntryFlags.describe
//   access write 0x400000 cpl=3 value=0x2a                 cpl only when not 0
//   pte 0x400000 1 raw=0x2000067 cpl=3
//   invlpg 0x400000
//   reload-cr3
//   host levels=5
//   space user1
//   switch user1 pcid=0x5 noflush   pcid only when not 0 (decimal), noflush when given
//   invpcid single pcid=5           type by name; pcid only when not 0, gva only when not 0
//   cr0 0x80010011                  cr4 / efer likewise, values hex
//   cr3 0x100000 noflush
//   expect mmu_unsync=1 pf_fixed=3   counters in the order given, values decimal
//   vcpu 1
//   kvm nx_huge_pages=1 nx_huge_pages_recovery_ratio=60 eager_page_split=0   only the keys given, in this order

import X86Paging

extension Scenario {
    /// The canonical text: one directive per line, no comments, ending in a newline. Parsing it
    /// gives the same directives and settings; for a scenario whose statements already carry their
    /// canonical text on lines 1, 2, 3... (one from `init(name:directives:)`, or parsed from
    /// `render()` output) `Scenario.parse(s.render(), name: s.name) == s`.
    public func render() -> String {
        directives.map { $0.directive.rendered + "\n" }.joined()
    }
}

extension ScenarioDirective {
    /// The directive's canonical line.
    public var rendered: String {
        switch self {
        case .mem(let bytes):
            return "mem " + renderSize(bytes)
        case .cpu(let settings):
            var words = ["cpu"]
            if let value = settings.maxPhysicalAddressBits { words.append("maxphyaddr=\(value)") }
            if let value = settings.supports1GiBPages { words.append("gbpages=" + bit(value)) }
            if let value = settings.supportsLA57 { words.append("la57=" + bit(value)) }
            if let value = settings.vendor { words.append("vendor=" + value.rawValue) }
            return words.joined(separator: " ")
        case .set(let settings):
            var words = ["set"]
            if let value = settings.writeProtect { words.append("wp=" + bit(value)) }
            if let value = settings.noExecuteEnable { words.append("nx=" + bit(value)) }
            if let value = settings.smep { words.append("smep=" + bit(value)) }
            if let value = settings.smap { words.append("smap=" + bit(value)) }
            if let value = settings.protectionKeys { words.append("pke=" + bit(value)) }
            if let value = settings.alignmentCheck { words.append("ac=" + bit(value)) }
            if let value = settings.pkru { words.append("pkru=" + hex(value)) }
            switch settings.pagingMode {
            case nil: break
            case .fourLevel: words.append("la57=0")
            case .fiveLevel: words.append("la57=1")
            case .pae: words.append("paging=pae")
            case .legacy32: words.append("paging=32")
            // Not expressible; the parser never produces it. Rendered so that parsing rejects it.
            case .disabled: words.append("paging=disabled")
            }
            if let value = settings.pageSizeExtensions { words.append("pse=" + bit(value)) }
            if let value = settings.pcidEnable { words.append("pcid=" + bit(value)) }
            return words.joined(separator: " ")
        case .map(let map):
            var words = ["map", hex(map.gva.rawValue), hex(map.gpa.rawValue), map.pageSize.name,
                         EntryFlags.describe(map.leafFlags)]
            for level in map.upperFlags.keys.sorted() {
                words.append("l\(level)=" + EntryFlags.describe(map.upperFlags[level]!))
            }
            if let pkey = map.pkey { words.append("pkey=\(pkey)") }
            return words.joined(separator: " ")
        case .access(let kind, let gva, let cpl, let value):
            var words = ["access", kind.scenarioName, hex(gva.rawValue)]
            if cpl != 0 { words.append("cpl=\(cpl)") }
            if let value { words.append("value=" + hex(value)) }
            return words.joined(separator: " ")
        case .pte(let gva, let level, let value, let cpl):
            var words = ["pte", hex(gva.rawValue), "\(level)"]
            switch value {
            case .flags(let flags): words.append(EntryFlags.describe(flags))
            case .raw(let raw): words.append("raw=" + hex(raw))
            }
            if cpl != 0 { words.append("cpl=\(cpl)") }
            return words.joined(separator: " ")
        case .invlpg(let gva):
            return "invlpg " + hex(gva.rawValue)
        case .reloadCR3:
            return "reload-cr3"
        case .host(let levels):
            return "host levels=\(levels)"
        case .space(let name):
            return "space " + name
        case .switchSpace(let name, let pcid, let noFlush):
            var words = ["switch", name]
            if pcid != 0 { words.append("pcid=\(pcid)") }
            if noFlush { words.append("noflush") }
            return words.joined(separator: " ")
        case .invpcid(let type, let pcid, let gva):
            var words = ["invpcid", type.scenarioName]
            if pcid != 0 { words.append("pcid=" + hex(pcid)) }
            if gva.rawValue != 0 { words.append("gva=" + hex(gva.rawValue)) }
            return words.joined(separator: " ")
        case .writeRegister(let register, let value):
            return register.rawValue + " " + hex(value)
        case .loadCR3(let value, let noFlush):
            return "cr3 " + hex(value) + (noFlush ? " noflush" : "")
        case .subPageProtection(.set(let gfn, let mask)):
            return "spp set " + hex(gfn.rawValue) + " " + hex(mask.rawValue)
        case .subPageProtection(.get(let gfn)):
            return "spp get " + hex(gfn.rawValue)
        case .zap(.all):
            return "zap all"
        case .zap(.gfns(let first, let count)):
            return "zap gfn " + hex(first) + (count == 1 ? "" : " \(count)")
        case .memslot(.add(let slot, let base, let size, let readOnly)):
            return "memslot add \(slot) " + hex(base.rawValue) + " " + renderSize(size) + (readOnly ? " readonly" : "")
        case .memslot(.delete(let slot)):
            return "memslot delete \(slot)"
        case .memslot(.move(let slot, let base)):
            return "memslot move \(slot) " + hex(base.rawValue)
        case .memslot(.flags(let slot, let logDirty)):
            return "memslot flags \(slot) log-dirty=" + bit(logDirty)
        case .dirtyLog(.setLogging(let slot, let enabled)):
            return "dirty-log " + (enabled ? "enable" : "disable") + " \(slot)"
        case .dirtyLog(.mode(let mode, let entries)):
            return "dirty-log mode " + mode.rawValue + (mode == .ring && entries != 4096 ? " entries=\(entries)" : "")
        case .dirtyLog(.get(let slot)):
            return "dirty-log get \(slot)"
        case .dirtyLog(.clear(let slot, let first, let count)):
            return "dirty-log clear \(slot) \(first) \(count)"
        case .vcpu(let index):
            return "vcpu \(index)"
        case .l1(.ept(let levels, let ad, let executeOnly)):
            return "l1 ept levels=\(levels) ad=\(bit(ad)) execonly=\(bit(executeOnly))"
        case .l1(.npt(let levels)):
            return "l1 npt levels=\(levels)"
        case .eptMap(let map):
            return ["ept-map", hex(map.l2GPA.rawValue), hex(map.l1GPA.rawValue), map.pageSize.name, map.permissions.rendered]
                .joined(separator: " ") + (map.guest == 0 ? "" : " guest=\(map.guest)")
        case .eptDemand(let demand):
            return ["ept-demand", hex(demand.l2GPA.rawValue), hex(demand.l1GPA.rawValue), hex(demand.size), demand.pageSize.name,
                    demand.permissions.rendered].joined(separator: " ") + (demand.guest == 0 ? "" : " guest=\(demand.guest)")
        case .vmenter(let vpid, let guest):
            return "vmenter" + (vpid.map { " vpid=\($0)" } ?? "") + (guest == 0 ? "" : " guest=\(guest)")
        case .invvpid(let type, let vpid, let gva):
            return "invvpid \(type.scenarioName) " + hex(vpid) + " " + hex(gva.rawValue)
        case .vmexit:
            return "vmexit"
        case .invept(let scope, let guest):
            return "invept " + scope.rawValue + (guest == 0 ? "" : " guest=\(guest)")
        case .expect(let counters):
            return (["expect"] + counters.map { "\($0.name)=\($0.value)" }).joined(separator: " ")
        case .kvm(let parameters):
            var words = ["kvm"]
            if let value = parameters.nxHugePages { words.append("nx_huge_pages=" + bit(value)) }
            if let value = parameters.nxHugePagesRecoveryRatio { words.append("nx_huge_pages_recovery_ratio=\(value)") }
            if let value = parameters.eagerPageSplit { words.append("eager_page_split=" + bit(value)) }
            return words.joined(separator: " ")
        case .nxRecover:
            return "nx-recover"
        case .age(let testOnly, let first, let count):
            return "age " + (testOnly ? "test " : "clear ") + hex(first) + (count == 1 ? "" : " \(count)")
        case .preFault(let gpa, let size, let flags):
            return "prefault " + hex(gpa.rawValue) + " " + hex(size) + (flags == 0 ? "" : " flags=" + hex(flags))
        }
    }
}

extension AccessKind {
    /// The scenario language's word: `read`, `write`, `exec`.
    public var scenarioName: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .fetch: "exec"
        }
    }
}

/// `bytes` with the largest K/M/G suffix that divides it exactly: `64M`, `2G`, `4K`, `100`.
public func renderSize(_ bytes: UInt64) -> String {
    for (suffix, shift) in [("G", UInt64(30)), ("M", 20), ("K", 10)] where bytes != 0 && bytes & ((1 << shift) - 1) == 0 {
        return "\(bytes >> shift)\(suffix)"
    }
    return "\(bytes)"
}

private func bit(_ value: Bool) -> String { value ? "1" : "0" }
