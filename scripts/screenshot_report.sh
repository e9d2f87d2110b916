#!/usr/bin/env bash
# Render the demo dedup report (or a given HTML file) and screenshot it with
# headless Chromium:  scripts/screenshot_report.sh [REPORT.html] [OUT.png] [WIDTHxHEIGHT]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
html="${1:-}"
png="${2:-report.png}"
size="${3:-1400x1000}"
if [[ -z "$html" ]]; then
    html="$(mktemp --suffix=.html)"
    "$py" "$here/examples/dedup_demo.py" "$html"
elif [[ ! -f "$html" ]]; then
    echo "screenshot_report.sh: no such file: $html" >&2
    exit 1
fi
chrome="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$chrome" ]]; then
    echo "screenshot_report.sh: chromium not found (apt-get install -y chromium)" >&2
    exit 1
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$chrome" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --screenshot="$png" \
    --window-size="${size/x/,}" "file://$(realpath "$html")" 2>/dev/null
echo "wrote $png from $html" >&2
