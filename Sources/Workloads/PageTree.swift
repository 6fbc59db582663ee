// The tables KVM built, as a tree per root: shadow pages (with their roles) under shadow paging,
// the TDP MMU's tables under TDP. Read from the host pages themselves after a run, for the HTML
// report and `virtmmu dump --dot`.

import GuestMemory
import KVMMMU
import VirtualMachine
import X86Paging

/// One table page of KVM's: its level, what it maps, and the tables below it.
public struct PageTreeNode: Sendable, Hashable {
    public var level: Int
    /// Shadow paging: the gfn of the guest table shadowed (or of the first page a direct page
    /// maps). TDP: the first gfn the table maps.
    public var gfn: UInt64
    /// The shadow page's role (empty under TDP).
    public var role: String
    public var unsync: Bool
    public var presentEntries: Int
    /// Present entries that map pages (4 KiB at level 1, huge above).
    public var leaves: Int
    public var children: [PageTreeNode]

    /// Tables in this subtree, this one included.
    public var tableCount: Int { 1 + children.reduce(0) { $0 + $1.tableCount } }
}

public enum PageTree {
    /// Every valid root of the VM's MMU, largest first.
    public static func roots(of vm: VirtualMachine) -> [PageTreeNode] {
        let trees: [PageTreeNode]
        if let tdp = vm.tdp {
            trees = tdp.roots.filter { !$0.isInvalid }.map { tdpNode(frame: $0.frame, level: $0.level, gfn: 0, vm: vm) }
        } else {
            trees = vm.mmu.shadowPages.filter { $0.rootCount > 0 && !$0.role.isInvalid }.map { shadowNode($0, vm: vm) }
        }
        return trees.sorted { ($0.tableCount, $1.gfn) > ($1.tableCount, $0.gfn) }
    }

    private static func entries(_ frame: HostFrameNumber, vm: VirtualMachine) -> UnsafeMutablePointer<UInt64> {
        vm.pool.pointer(frame).bindMemory(to: UInt64.self, capacity: 512)
    }

    private static func shadowNode(_ page: ShadowPage, vm: VirtualMachine) -> PageTreeNode {
        var node = PageTreeNode(level: page.level, gfn: page.gfn.rawValue, role: vm.variant.describe(page.role), unsync: page.unsync,
                                presentEntries: 0, leaves: 0, children: [])
        for index in 0..<512 {
            let spte = SPTE(page.sptes[index])
            guard spte.isShadowPresent else { continue }
            node.presentEntries += 1
            if spte.isLast(level: page.level) {
                node.leaves += 1
            } else if let child = vm.mmu.shadowPage(containingHostAddress: spte.pfn.rawValue << 12) {
                node.children.append(shadowNode(child, vm: vm))
            }
        }
        return node
    }

    private static func tdpNode(frame: HostFrameNumber, level: Int, gfn: UInt64, vm: VirtualMachine) -> PageTreeNode {
        var node = PageTreeNode(level: level, gfn: gfn, role: "", unsync: false, presentEntries: 0, leaves: 0, children: [])
        let table = entries(frame, vm: vm)
        for index in 0..<512 {
            let spte = SPTE(table[index])
            guard spte.isShadowPresent else { continue }
            node.presentEntries += 1
            if spte.isLast(level: level) {
                node.leaves += 1
            } else {
                node.children.append(tdpNode(frame: spte.pfn, level: level - 1, gfn: gfn + UInt64(index) << (9 * UInt64(level - 1)), vm: vm))
            }
        }
        return node
    }

    /// The tree under `root` in Graphviz's DOT language: one box per table (level, gfn, role,
    /// entries), an edge to each table below it.
    public static func dot(_ root: PageTreeNode, title: String) -> String {
        var out = "digraph \"\(dotEscaped(title))\" {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n"
        var next = 0
        func visit(_ node: PageTreeNode) -> Int {
            let id = next
            next += 1
            var label = "level \(node.level) gfn \(hex(node.gfn))\\n\(node.presentEntries) present, \(node.leaves) leaves"
            if !node.role.isEmpty { label += "\\n" + dotEscaped(node.role) }
            if node.unsync { label += "\\nunsync" }
            out += "  n\(id) [label=\"\(label)\"\(node.unsync ? ", style=dashed" : "")];\n"
            for child in node.children { out += "  n\(id) -> n\(visit(child));\n" }
            return id
        }
        _ = visit(root)
        return out + "}\n"
    }

    private static func dotEscaped(_ text: String) -> String {
        var escaped = ""
        for character in text {
            if character == "\\" || character == "\"" { escaped.append("\\") }
            escaped.append(character)
        }
        return escaped
    }
}
