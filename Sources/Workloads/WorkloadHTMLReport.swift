extension WorkloadComparison {
    public func html() -> String { "" }
}
