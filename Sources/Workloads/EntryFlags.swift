// Paging-structure entry flags as scenario text spells them: `P,RW,US|NX`, `bit9`, `0`.

import X86Paging

/// The flag bits of a paging-structure entry, with the scenario language's names.
///
/// A flag list is one or more items joined by `,` or `|`: a name (`P RW US PWT PCD A D PS G NX`,
/// case-insensitive), `bitN` for bit N (0...63, decimal), or `0` alone for no flags.
public struct EntryFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// P, bit 0.
    public static var present: EntryFlags { EntryFlags(rawValue: 1 << 0) }
    /// RW, bit 1.
    public static var writable: EntryFlags { EntryFlags(rawValue: 1 << 1) }
    /// US, bit 2.
    public static var user: EntryFlags { EntryFlags(rawValue: 1 << 2) }
    /// PWT, bit 3.
    public static var writeThrough: EntryFlags { EntryFlags(rawValue: 1 << 3) }
    /// PCD, bit 4.
    public static var cacheDisable: EntryFlags { EntryFlags(rawValue: 1 << 4) }
    /// A, bit 5.
    public static var accessed: EntryFlags { EntryFlags(rawValue: 1 << 5) }
    /// D, bit 6.
    public static var dirty: EntryFlags { EntryFlags(rawValue: 1 << 6) }
    /// PS, bit 7.
    public static var pageSize: EntryFlags { EntryFlags(rawValue: 1 << 7) }
    /// G, bit 8.
    public static var global: EntryFlags { EntryFlags(rawValue: 1 << 8) }
    /// NX (XD), bit 63.
    public static var noExecute: EntryFlags { EntryFlags(rawValue: 1 << 63) }

    /// The named bits, in bit order: (name, bit number).
    public static let names: [(name: String, bit: Int)] = [
        ("P", 0), ("RW", 1), ("US", 2), ("PWT", 3), ("PCD", 4), ("A", 5), ("D", 6), ("PS", 7), ("G", 8), ("NX", 63),
    ]

    /// The name of `bit` (`P`, `NX`, or `bitN`).
    public static func name(ofBit bit: Int) -> String {
        names.first { $0.bit == bit }?.name ?? "bit\(bit)"
    }

    /// Parses a flag list into a bit mask. Errors carry no line; the scenario parser adds it.
    public static func parse(_ text: String) throws(ScenarioError) -> UInt64 {
        switch parseList(Substring(text)) {
        case .success(let mask): return mask
        case .failure(let failure):
            throw ScenarioError(column: failure.offset + 1, text: failure.item, message: failure.message)
        }
    }

    /// The canonical spelling of `mask`: bits in ascending order joined by `,`, each by name or
    /// `bitN`; `0` for no bits. `parse(describe(m)) == m` for every mask.
    public static func describe(_ mask: UInt64) -> String {
        guard mask != 0 else { return "0" }
        var items: [String] = []
        for bit in 0..<64 where mask & (1 << UInt64(bit)) != 0 {
            items.append(name(ofBit: bit))
        }
        return items.joined(separator: ",")
    }

    /// Why a flag list is invalid: the item and its offset (in Unicode scalars) in the list.
    struct ListFailure: Error {
        var item: String
        var offset: Int
        var message: String
    }

    static func parseList(_ text: Substring) -> Result<UInt64, ListFailure> {
        let scalars = Array(text.unicodeScalars)
        if scalars.isEmpty {
            return .failure(ListFailure(item: "", offset: 0, message: "empty flag list"))
        }
        var mask: UInt64 = 0
        var itemCount = 0
        var sawZero: (offset: Int, item: String)?
        var start = 0
        while start <= scalars.count {
            var end = start
            while end < scalars.count && scalars[end] != "," && scalars[end] != "|" { end += 1 }
            var itemScalars = String.UnicodeScalarView()
            itemScalars.append(contentsOf: scalars[start..<end])
            let item = String(itemScalars)
            itemCount += 1
            if item.isEmpty {
                return .failure(ListFailure(item: String(text), offset: start,
                                            message: "empty item in flag list '\(text)'"))
            }
            switch bitMask(of: item) {
            case .some(0): sawZero = (start, item)
            case .some(let bits): mask |= bits
            case nil:
                return .failure(ListFailure(item: item, offset: start, message: "unknown flag '\(item)' "
                    + "(flags are P, RW, US, PWT, PCD, A, D, PS, G, NX, bit0...bit63, or 0 alone)"))
            }
            start = end + 1
        }
        if let sawZero, itemCount > 1 {
            return .failure(ListFailure(item: sawZero.item, offset: sawZero.offset,
                                        message: "'0' (no flags) cannot be combined with other flags"))
        }
        return .success(mask)
    }

    /// The mask of one item, 0 for `0`, nil when it is not a flag.
    private static func bitMask(of item: String) -> UInt64? {
        if item == "0" { return 0 }
        let upper = asciiUppercased(item)
        if let named = names.first(where: { $0.name == upper }) { return 1 << UInt64(named.bit) }
        guard upper.hasPrefix("BIT") else { return nil }
        let digits = upper.utf8.dropFirst(3)
        guard !digits.isEmpty, digits.count <= 2, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        // No leading zeros except "bit0": one spelling per bit.
        if digits.count == 2 && digits.first == 0x30 { return nil }
        let bit = digits.reduce(0) { $0 * 10 + Int($1 - 0x30) }
        return bit < 64 ? 1 << UInt64(bit) : nil
    }
}

/// `text` with ASCII letters uppercased and everything else untouched (Unicode case mapping would let
/// look-alikes such as a dotless i match a keyword).
func asciiUppercased(_ text: String) -> String {
    String(decoding: text.utf8.map { $0 >= 0x61 && $0 <= 0x7A ? $0 - 0x20 : $0 }, as: UTF8.self)
}

/// `text` with ASCII letters lowercased and everything else untouched.
func asciiLowercased(_ text: String) -> String {
    String(decoding: text.utf8.map { $0 >= 0x41 && $0 <= 0x5A ? $0 + 0x20 : $0 }, as: UTF8.self)
}
