// Out-of-line questions reports ask about a walk; never on the hot path.

extension PageWalker {
    /// The reserved bits set in the entry `value` at `level` under this walker's mode and masks.
    public func reservedBitsSet(in value: UInt64, level: Int) -> UInt64 {
        switch mode {
        case .disabled:
            return 0
        case .legacy32:
            let entry = Legacy32Entry(bits: value)
            return level == 2 && legacy32.isLeaf(entry, level: level) ? value & legacy32.largePageReserved : 0
        case .pae where level == 3:
            return value & Long64Format.pdpteReservedBits(cpu: cpu)
        case .pae, .fourLevel, .fiveLevel:
            return value & long64.reserved.mask(for: value, level: level)
        }
    }
}
