// The workload report as one self-contained HTML page: the terminal report's table, charts drawn as
// inline SVG (faults over time, MMU table pages over time, shadow pages by level and role, the root
// cache hit rate, dirty pages per migration pass) and the page tree of one root as nested
// <details> elements. No script, no style sheet or font from the network: it opens offline.

import KVMMMU
import X86Paging

extension WorkloadComparison {
    /// The page; `treeRoot` chooses the root whose tree is shown (by size, largest first) in the
    /// first run that has roots.
    public func html(treeRoot: Int = 0) -> String {
        var body = "<h1>VirtMMU workload report: \(escapeHTML(title))</h1>\n"
        body += "<pre class=\"summary\">\(escapeHTML(text()))</pre>\n"
        body += "<section><h2>Faults over time</h2>\n" + faultsChart() + "</section>\n"
        body += "<section><h2>MMU table pages over time</h2>\n" + tablePagesChart() + "</section>\n"
        body += "<section><h2>Shadow pages by level and role (at the end)</h2>\n" + shadowPagesChart() + "</section>\n"
        body += "<section><h2>Root cache hit rate</h2>\n" + rootCacheChart() + "</section>\n"
        body += "<section><h2>Dirty pages per migration pass</h2>\n" + dirtyPassesChart() + "</section>\n"
        body += "<section><h2>Page tree of one root</h2>\n" + treeSection(treeRoot) + "</section>\n"
        return """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <title>VirtMMU workload report: \(escapeHTML(title))</title>
        <style>
        body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
        pre.summary { background: #f6f6f6; padding: 1em; font-size: 12px; overflow-x: auto; }
        svg.chart { border: 1px solid #ddd; background: #fff; font-size: 11px; }
        details { margin-left: 1.2em; font-family: monospace; font-size: 12px; }
        summary { cursor: pointer; }
        .unsync { color: #b35900; }
        .note { color: #666; font-style: italic; }
        </style>
        </head>
        <body>
        \(body)</body>
        </html>

        """
    }

    // MARK: The charts

    private var markers: [(x: Double, label: String)] { phases.map { (Double($0.firstDirective), $0.name) } }

    private func faultsChart() -> String {
        var series: [ChartSeries] = runs.map { run in
            ChartSeries(name: "\(Self.columnName(run)): exits for faults (pf_taken)",
                        points: Self.perInterval(run.report.timeline) { Double($0.stats.pfTaken) })
        }
        if let run = runs.first {
            // The #PF the guest took are the same under every MMU: counted from the operations.
            var previous = 0
            let points = run.report.timeline.map { sample -> (Double, Double) in
                let faults = run.report.accesses[min(previous, sample.operations)..<min(sample.operations, run.report.accesses.count)]
                    .filter(\.outcome.result.isPageFault).count
                previous = sample.operations
                return (Double(sample.directives), Double(faults))
            }
            series.append(ChartSeries(name: "guest #PF (every MMU)", points: points))
        }
        return SVGChart.line(id: "faults", series: series, xLabel: "directive", yLabel: "per interval", markers: markers)
    }

    private func tablePagesChart() -> String {
        let series = runs.map { run in
            ChartSeries(name: "\(Self.columnName(run)): " + (run.mmu == "shadow" ? "shadow pages" : "TDP table pages"),
                        points: run.report.timeline.map { (Double($0.directives), Double($0.tablePages)) })
        }
        return SVGChart.line(id: "table-pages", series: series, xLabel: "directive", yLabel: "pages", markers: markers)
    }

    private func shadowPagesChart() -> String {
        guard let run = runs.first(where: { !$0.report.shadowPagesByRole.isEmpty }) else {
            return "<p class=\"note\">No shadow pages at the end of any run (TDP keeps no shadow pages).</p>\n"
        }
        let byLevel = run.report.shadowPagesByLevel.sorted { $0.key > $1.key }.map { ("level \($0.key)", Double($0.value)) }
        let byRole = run.report.shadowPagesByRole.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.map { ($0.key, Double($0.value)) }
        return "<p>\(escapeHTML(Self.columnName(run))): \(run.report.shadowPagesByLevel.values.reduce(0, +)) shadow pages.</p>\n"
            + SVGChart.bars(id: "shadow-pages-by-level", bars: byLevel)
            + SVGChart.bars(id: "shadow-pages-by-role", bars: byRole)
    }

    private func rootCacheChart() -> String {
        let series = runs.compactMap { run -> ChartSeries? in
            guard run.report.rootCacheHits + run.report.rootCacheMisses > 0 else { return nil }
            let points = run.report.timeline.compactMap { sample -> (Double, Double)? in
                let lookups = sample.rootCacheHits + sample.rootCacheMisses
                return lookups == 0 ? nil : (Double(sample.directives), 100 * Double(sample.rootCacheHits) / Double(lookups))
            }
            return ChartSeries(name: "\(Self.columnName(run)): CR3 loads finding their root cached (%)", points: points)
        }
        guard !series.isEmpty else {
            return "<p class=\"note\">No CR3 load looked for a cached root (under TDP CR3 loads do not exit).</p>\n"
        }
        return SVGChart.line(id: "root-cache", series: series, xLabel: "directive", yLabel: "hit rate %", markers: markers, yMaximum: 100)
    }

    private func dirtyPassesChart() -> String {
        let passes = runs.map(\.report.dirtyLogs.count).max() ?? 0
        guard passes > 0 else { return "<p class=\"note\">This workload reads no dirty log (the migration workload does).</p>\n" }
        let bars = (0..<passes).flatMap { pass in
            runs.map { run in
                ("pass \(pass + 1) \(Self.columnName(run))", pass < run.report.dirtyLogs.count ? Double(run.report.dirtyLogs[pass].gfns.count) : 0)
            }
        }
        return "<p>Pages each KVM_GET_DIRTY_LOG reported; every page changed since it was last sent was among them "
            + "(the runner checks it at each pass), so the destination's copy matches.</p>\n" + SVGChart.bars(id: "dirty-passes", bars: bars)
    }

    private func treeSection(_ index: Int) -> String {
        guard let run = runs.first(where: { !$0.roots.isEmpty }) else { return "<p class=\"note\">No roots at the end.</p>\n" }
        let root = run.roots[min(max(0, index), run.roots.count - 1)]
        var out = "<p>\(escapeHTML(Self.columnName(run))): root \(min(max(0, index), run.roots.count - 1)) of \(run.roots.count) "
            + "(largest first), \(root.tableCount) tables.</p>\n<div class=\"tree\" data-tables=\"\(root.tableCount)\">\n"
        func visit(_ node: PageTreeNode, depth: Int) {
            let role = node.role.isEmpty ? "" : " " + escapeHTML(node.role)
            out += "<details\(depth < 2 ? " open" : "")><summary\(node.unsync ? " class=\"unsync\"" : "")>level \(node.level) gfn "
                + "\(hex(node.gfn)): \(node.presentEntries) present, \(node.leaves) leaves\(node.unsync ? ", unsync" : "")\(role)</summary>\n"
            for child in node.children { visit(child, depth: depth + 1) }
            out += "</details>\n"
        }
        visit(root, depth: 0)
        return out + "</div>\n"
    }

    /// What a cumulative counter added in each interval between samples.
    static func perInterval(_ timeline: [TimelineSample], _ value: (TimelineSample) -> Double) -> [(Double, Double)] {
        var previous = 0.0
        return timeline.map { sample in
            let now = value(sample)
            defer { previous = now }
            return (Double(sample.directives), now - previous)
        }
    }
}

/// One line of a chart: a name and its (x, y) points.
struct ChartSeries {
    var name: String
    var points: [(Double, Double)]
}

/// Inline SVG charts, sized in the page's pixels.
enum SVGChart {
    static let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    static let width = 1000.0, height = 300.0, left = 60.0, right = 20.0, top = 20.0, bottom = 40.0

    /// A line chart with a legend and dashed vertical lines at `markers` (the workload's phases).
    static func line(id: String, series: [ChartSeries], xLabel: String, yLabel: String, markers: [(x: Double, label: String)],
                     yMaximum: Double? = nil) -> String {
        let xs = series.flatMap { $0.points.map(\.0) }, ys = series.flatMap { $0.points.map(\.1) }
        let xMax = max(1, xs.max() ?? 1), yMax = max(1, yMaximum ?? (ys.max() ?? 1))
        let plotWidth = width - left - right, plotHeight = height - top - bottom
        func x(_ value: Double) -> Double { left + value / xMax * plotWidth }
        func y(_ value: Double) -> Double { top + plotHeight - value / yMax * plotHeight }
        let legendHeight = Double(series.count) * 16
        var out = "<svg class=\"chart\" id=\"\(id)\" data-chart=\"\(id)\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" "
            + "height=\(quoted(height + legendHeight)) viewBox=\"0 0 \(Int(width)) \(Int(height + legendHeight))\">\n"
        out += axes(xLabel: xLabel, yLabel: yLabel, xMax: xMax, yMax: yMax)
        for (index, marker) in markers.enumerated() {
            // Phases can be short: their labels step down in four rows so that neighbours stay legible.
            let labelY = top + 10 + Double(index % 4) * 11
            out += "<line x1=\(quoted(x(marker.x))) y1=\(quoted(top)) x2=\(quoted(x(marker.x))) y2=\(quoted(top + plotHeight)) "
                + "stroke=\"#999\" stroke-dasharray=\"4 3\"/>"
                + "<text x=\(quoted(x(marker.x) + 3)) y=\(quoted(labelY)) fill=\"#666\" font-size=\"10\">\(escapeHTML(marker.label))</text>\n"
        }
        for (index, line) in series.enumerated() {
            let color = colors[index % colors.count]
            let points = line.points.map { "\(format(x($0.0))),\(format(y($0.1)))" }.joined(separator: " ")
            out += "<polyline data-series=\(quoted(escapeHTML(line.name))) data-points=\"\(line.points.count)\" fill=\"none\" "
                + "stroke=\"\(color)\" stroke-width=\"1.5\" points=\"\(points)\"/>\n"
            let legendY = height + Double(index) * 16 + 4
            out += "<rect x=\(quoted(left)) y=\(quoted(legendY)) width=\"10\" height=\"10\" fill=\"\(color)\"/>"
                + "<text x=\(quoted(left + 16)) y=\(quoted(legendY + 9))>\(escapeHTML(line.name))</text>\n"
        }
        return out + "</svg>\n"
    }

    /// A horizontal bar chart, one labelled bar per value.
    static func bars(id: String, bars: [(label: String, value: Double)]) -> String {
        let rowHeight = 18.0, labelWidth = 560.0
        let chartHeight = top + Double(bars.count) * rowHeight + 10
        let maximum = max(1, bars.map(\.value).max() ?? 1)
        var out = "<svg class=\"chart\" id=\"\(id)\" data-chart=\"\(id)\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" "
            + "height=\(quoted(chartHeight)) viewBox=\"0 0 \(Int(width)) \(Int(chartHeight))\">\n"
        for (index, bar) in bars.enumerated() {
            let y = top + Double(index) * rowHeight
            let barWidth = bar.value / maximum * (width - labelWidth - 80)
            let label = bar.label.count > 90 ? String(bar.label.prefix(88)) + "…" : bar.label
            out += "<text x=\(quoted(labelWidth - 6)) y=\(quoted(y + 12)) text-anchor=\"end\">\(escapeHTML(label))</text>"
                + "<rect data-value=\(quoted(bar.value)) x=\(quoted(labelWidth)) y=\(quoted(y + 2)) width=\(quoted(max(1, barWidth))) "
                + "height=\(quoted(rowHeight - 4)) fill=\"\(colors[0])\"><title>\(escapeHTML(bar.label)): \(Int(bar.value))</title></rect>"
                + "<text x=\(quoted(labelWidth + barWidth + 4)) y=\(quoted(y + 12))>\(Int(bar.value))</text>\n"
        }
        return out + "</svg>\n"
    }

    private static func axes(xLabel: String, yLabel: String, xMax: Double, yMax: Double) -> String {
        let plotHeight = height - top - bottom
        var out = "<line x1=\(quoted(left)) y1=\(quoted(top + plotHeight)) x2=\(quoted(width - right)) y2=\(quoted(top + plotHeight)) stroke=\"#333\"/>"
            + "<line x1=\(quoted(left)) y1=\(quoted(top)) x2=\(quoted(left)) y2=\(quoted(top + plotHeight)) stroke=\"#333\"/>\n"
        for step in 0...4 {
            let value = yMax * Double(step) / 4, y = top + plotHeight - plotHeight * Double(step) / 4
            out += "<text x=\(quoted(left - 4)) y=\(quoted(y + 4)) text-anchor=\"end\">\(format(value))</text>"
                + "<line x1=\(quoted(left)) y1=\(quoted(y)) x2=\(quoted(width - right)) y2=\(quoted(y)) stroke=\"#eee\"/>\n"
            let xValue = xMax * Double(step) / 4, x = left + (width - left - right) * Double(step) / 4
            out += "<text x=\(quoted(x)) y=\(quoted(top + plotHeight + 14)) text-anchor=\"middle\">\(format(xValue))</text>\n"
        }
        out += "<text x=\(quoted(width / 2)) y=\(quoted(height - 6)) text-anchor=\"middle\">\(escapeHTML(xLabel))</text>"
            + "<text x=\"12\" y=\(quoted(top + plotHeight / 2)) transform=\"rotate(-90 12 \(format(top + plotHeight / 2)))\" "
            + "text-anchor=\"middle\">\(escapeHTML(yLabel))</text>\n"
        return out
    }

    /// A number for SVG: at most one decimal.
    static func format(_ value: Double) -> String {
        let tenths = Int((value * 10).rounded())
        return tenths % 10 == 0 ? String(tenths / 10) : (tenths < 0 && tenths > -10 ? "-" : "") + "\(tenths / 10).\(abs(tenths % 10))"
    }

    private static func quoted(_ value: Double) -> String { "\"" + format(value) + "\"" }
    private static func quoted(_ text: String) -> String { "\"" + text + "\"" }
}

/// `text` with `&`, `<`, `>` and quotes escaped for HTML text and attribute values.
public func escapeHTML(_ text: String) -> String {
    var out = ""
    for character in text {
        switch character {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default: out.append(character)
        }
    }
    return out
}
