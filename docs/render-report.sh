#!/usr/bin/env bash
# Renders a workload's HTML report (virtmmu run --report) to a PNG with a headless Chromium, to check
# that the page and its inline SVG charts render. Usage: docs/render-report.sh REPORT.html OUT.png [WIDTH HEIGHT]
# Needs chromium-headless-shell or chromium (Debian: apt-get install chromium-headless-shell).
set -euo pipefail
report="$1"; out="$2"; width="${3:-1200}"; height="${4:-2400}"
browser="$(command -v chromium-headless-shell || command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
    echo "render-report.sh: no headless Chromium found (apt-get install chromium-headless-shell)" >&2
    exit 1
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
    --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")" 2>/dev/null
test -s "$out"
echo "wrote $out"
