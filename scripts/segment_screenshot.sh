#!/usr/bin/env bash
# Screenshot of a page written by `dlcm segment --html` in headless Chromium (Debian's chromium,
# installed by scripts/setup.sh). Usage: bash scripts/segment_screenshot.sh PAGE.html OUT.png [W,H]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT]" >&2; exit 2; }
page=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1200,900}
[ -f "$page" ] || { echo "$0: $1: no such page" >&2; exit 2; }
command -v chromium >/dev/null || { echo "$0: chromium not installed (bash scripts/setup.sh)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
  --user-data-dir="$profile" --window-size="$size" --screenshot="$out" "file://$page" 2>/dev/null
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out"
