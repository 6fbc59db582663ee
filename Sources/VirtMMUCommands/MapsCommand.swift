import ArgumentParser
import GuestMemory
import X86Paging

struct MapsCommand: FailureReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "maps",
        abstract: "List every present mapping of the guest's address space, coalesced into runs.",
        discussion: """
        A run is a range of virtually and physically contiguous pages of one page size with equal \
        permissions (combined over every level), protection key and global bit: what QEMU's monitor \
        shows with `info tlb` and `info mem`. Entries with reserved bits set are not reachable and \
        are counted, not listed. With --json, one JSON object per run per line.
        """)

    @OptionGroup var machine: MachineOptions

    @Flag(help: "Print JSON Lines instead of the table.")
    var json = false
    @Option(help: "Stop after this many runs.")
    var maxRuns: Int = 1_000_000

    func validate() throws {
        guard maxRuns > 0 else { throw ValidationError("--max-runs must be positive") }
    }

    func execute() throws {
        let (memory, registers, origin) = try machine.loadGuest()
        let walker = try machine.makeWalker(registers, memory: memory)
        let (runs, summary) = walker.mappings(in: memory, maxRuns: maxRuns)
        var output = ByteWriter(fileDescriptor: 1)
        if json {
            for run in runs { output.append(Self.json(run)) }
        } else {
            output.append("\(origin)\n\(walker.mode.displayName), CR3=\(hex(registers.cr3))\n\n")
            output.append(Self.tableHeader)
            for run in runs { output.append(Self.row(run, mode: walker.mode)) }
            output.append("\n\(runs.count) runs over \(summary.leafPages) leaf entries")
            if summary.reservedEntries > 0 {
                output.append("; \(summary.reservedEntries) present entries skipped for reserved bits (walks through them fault)")
            }
            if summary.unbackedTables > 0 {
                output.append("; \(summary.unbackedTables) tables point at guest-physical memory that is not in the image")
            }
            output.append("\n")
        }
        output.flush()
        if summary.truncated {
            var standardError = StandardError()
            print("warning: stopped early (--max-runs \(maxRuns) or the work limit reached); the list is incomplete",
                  to: &standardError)
        }
    }

    static let tableHeader = "GVA start           GVA end             GPA start           size        page   perms  pkey\n"

    static func row(_ run: Mapping, mode: PagingMode) -> String {
        let width = mode.isLongMode ? 16 : 8
        let end = run.linearAddress.rawValue &+ (run.size - 1)
        let permissions = (run.isUser ? "u" : "s") + "r" + (run.isWritable ? "w" : "-") + (run.isExecutable ? "x" : "-")
            + (run.isGlobal ? "g" : "-")
        return leftAligned(zeroPadded(run.linearAddress.rawValue, width), to: 20) + leftAligned(zeroPadded(end, width), to: 20)
            + leftAligned(zeroPadded(run.physicalAddress.rawValue, 13), to: 20) + leftAligned(sizeName(run.size), to: 12)
            + leftAligned(shortSize(run.pageSize), to: 7) + leftAligned(permissions, to: 7) + "\(run.protectionKey)\n"
    }

    static func json(_ run: Mapping) -> String {
        var object = JSONObject()
        object.add("gva", hex(run.linearAddress.rawValue))
        object.add("gpa", hex(run.physicalAddress.rawValue))
        object.addRaw("size", String(run.size))
        object.addRaw("page_size", String(run.pageSize))
        object.add("writable", run.isWritable)
        object.add("user", run.isUser)
        object.add("nx", !run.isExecutable)
        object.add("global", run.isGlobal)
        object.add("pkey", run.protectionKey)
        return object.text + "\n"
    }

    static func zeroPadded(_ value: UInt64, _ width: Int) -> String {
        let digits = String(value, radix: 16)
        return "0x" + String(repeating: "0", count: max(0, width - digits.count)) + digits
    }

    static func shortSize(_ bytes: UInt64) -> String {
        if bytes >= 1 << 30 { return "\(bytes >> 30)G" }
        if bytes >= 1 << 20 { return "\(bytes >> 20)M" }
        return "\(bytes >> 10)K"
    }
}
