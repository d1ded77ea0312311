#include "data/prepare.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <unordered_set>

#include "core/common.h"
#include "core/json_util.h"
#include "core/rng.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Doc {
  std::string text;
  int32_t source = 0;  // index into the source names
};

struct Stats {
  int64_t read = 0, empty = 0, junk = 0, duplicates = 0, repaired = 0;
};

bool has_ext(const fs::path& p, const char* ext) { return p.extension() == ext; }

// The files of the inputs, and in `names` each one's source name: its path under the input
// folder ("web/part-1.txt"), or the path as given for a file input.
std::vector<std::string> collect_files(const std::vector<std::string>& inputs,
                                       std::vector<std::string>& names) {
  DLCM_CHECK(!inputs.empty(), "prepare: no --input given");
  std::vector<std::string> files;
  for (const auto& in : inputs) {
    std::error_code ec;
    fs::path p(in);
    if (fs::is_directory(p, ec)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::end(it);
           it.increment(ec)) {
        if (!it->is_regular_file(ec)) continue;
        if (has_ext(it->path(), ".txt") || has_ext(it->path(), ".jsonl"))
          found.push_back(it->path().string());
      }
      DLCM_CHECK(!ec, "prepare: cannot read folder ", in, " (", ec.message(), ")");
      DLCM_CHECK(!found.empty(), "prepare: input folder ", in,
                 " contains no .txt or .jsonl files");
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
      for (const auto& f : found) names.push_back(fs::path(f).lexically_relative(p).string());
    } else if (fs::is_regular_file(p, ec)) {
      files.push_back(p.string());
      names.push_back(p.string());
    } else {
      fail("prepare: input ", in, " does not exist (expected a file or folder)");
    }
  }
  return files;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DLCM_CHECK(f, "prepare: cannot open ", path);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  DLCM_CHECK(!f.bad(), "prepare: error reading ", path);
  return s;
}

uint64_t text_hash(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return splitmix64(h ^ (uint64_t(s.size()) << 1));
}

// Cleans in place; returns false when the document should be dropped (and counts why).
bool clean_doc(std::string& t, Stats& st) {
  const int64_t bad = repair_utf8(t);
  if (bad) ++st.repaired;
  std::string out;
  out.reserve(t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    unsigned char c = uint8_t(t[i]);
    if (c == '\r') {
      if (i + 1 < t.size() && t[i + 1] == '\n') continue;
      out.push_back('\n');
    } else if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) {
      continue;
    } else {
      out.push_back(char(c));
    }
  }
  size_t a = out.find_first_not_of(" \t\n");
  if (a == std::string::npos) {
    ++st.empty;
    return false;
  }
  size_t b = out.find_last_not_of(" \t\n");
  t = out.substr(a, b - a + 1);
  // Junk: count code points.
  int64_t nonspace = 0, letters = 0, repl = 0;
  for (size_t i = 0; i < t.size();) {
    unsigned char c = uint8_t(t[i]);
    if (c < 0x80) {
      if (c != ' ' && c != '\n' && c != '\t') ++nonspace;
      if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') ++letters;
      ++i;
      continue;
    }
    int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    ++nonspace;
    if (t.compare(i, 3, "\xEF\xBF\xBD") == 0)
      ++repl;
    else if (t.compare(i, 3, "\xE2\x80\x80") < 0 || t.compare(i, 3, "\xE2\xB0\x80") >= 0)
      ++letters;  // non-ASCII outside the punctuation/symbol block U+2000-U+2BFF
    i += len;
  }
  if (repl * 10 > nonspace || letters * 4 < nonspace) {
    ++st.junk;
    return false;
  }
  return true;
}

// A document longer than kLong is cut into pieces of about kTarget bytes, at a blank line, else
// at a line end, else anywhere (never inside a UTF-8 sequence).
void cut_long_document(std::string_view d, std::vector<std::string>& out) {
  constexpr size_t kLong = 64 * 1024, kTarget = 16 * 1024;
  if (d.size() <= kLong) {
    out.emplace_back(d);
    return;
  }
  size_t s = 0;
  while (s < d.size()) {
    size_t cut = d.size();
    if (d.size() - s > kTarget + kTarget / 2) {
      cut = d.find("\n\n", s + kTarget);
      if (cut == std::string_view::npos || cut > s + 4 * kTarget) {
        cut = d.find('\n', s + kTarget);
        if (cut == std::string_view::npos || cut > s + 4 * kTarget) cut = s + kTarget;
      }
    }
    while (cut < d.size() && (uint8_t(d[cut]) & 0xC0) == 0x80) ++cut;
    out.emplace_back(d.substr(s, cut - s));
    s = cut;
  }
}

// A plain-text file without form feeds given alone: its paragraphs (text between blank lines,
// i.e. lines holding only spaces or tabs) are the documents (a very long one cut as above).
void split_paragraphs(const std::string& all, std::vector<std::string>& out) {
  const std::string_view v(all);
  size_t start = 0, pos = 0;
  bool blank_run = false;
  while (pos <= all.size()) {
    size_t nl = all.find('\n', pos);
    if (nl == std::string::npos) nl = all.size();
    const bool blank = all.find_first_not_of(" \t\r", pos) >= nl;
    if (blank && !blank_run && pos > start) cut_long_document(v.substr(start, pos - start), out);
    if (!blank && blank_run) start = pos;
    blank_run = blank;
    pos = nl + 1;
  }
  if (!blank_run && start < all.size()) cut_long_document(v.substr(start), out);
}

// Plain text: form feeds separate documents; long documents are cut at blank lines.
void split_text(const std::string& all, std::vector<std::string>& out) {
  size_t pos = 0;
  while (pos <= all.size()) {
    size_t ff = all.find('\f', pos);
    cut_long_document(std::string_view(all.data() + pos, (ff == std::string::npos ? all.size() : ff) - pos), out);
    if (ff == std::string::npos) break;
    pos = ff + 1;
  }
}

struct Reader {
  std::vector<Doc> docs;
  std::vector<std::string> sources;
  std::map<std::string, int32_t> source_ids;
  std::unordered_set<uint64_t> seen;
  Stats st;

  int32_t source_id(const std::string& s) {
    auto [it, inserted] = source_ids.emplace(s, int32_t(sources.size()));
    if (inserted) sources.push_back(s);
    return it->second;
  }
  void add(std::string text, int32_t src) {
    ++st.read;
    if (!clean_doc(text, st)) return;
    if (!seen.insert(text_hash(text)).second) {
      ++st.duplicates;
      return;
    }
    docs.push_back({std::move(text), src});
  }
  bool paragraphs = false;  // a single plain-text input: split_paragraphs
  bool used_paragraphs = false;

  // `name`: the source name recorded in meta.json (the file's path under its input folder, or
  // as given), unless a .jsonl line names its own.
  void read_file(const std::string& path, const std::string& name) {
    const std::string all = slurp(path);
    if (has_ext(path, ".jsonl")) {
      size_t pos = 0;
      int64_t line_no = 0;
      while (pos < all.size()) {
        size_t nl = all.find('\n', pos);
        if (nl == std::string::npos) nl = all.size();
        ++line_no;
        std::string_view line(all.data() + pos, nl - pos);
        pos = nl + 1;
        if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
        json j;
        try {
          j = json::parse(line);
        } catch (const json::exception& e) {
          fail(path, ":", line_no, ": invalid JSON (", e.what(), ")");
        }
        DLCM_CHECK(j.is_object() && j.contains("text") && j["text"].is_string(), path, ":",
                   line_no, ": expected a JSON object with a string field \"text\"");
        std::string src = name;
        if (j.contains("source") && j["source"].is_string()) src = j["source"].get<std::string>();
        add(j["text"].get<std::string>(), source_id(src));
      }
    } else {
      std::vector<std::string> parts;
      used_paragraphs = paragraphs && all.find('\f') == std::string::npos;
      if (used_paragraphs) split_paragraphs(all, parts);
      else split_text(all, parts);
      const int32_t sid = source_id(name);
      for (auto& p : parts) add(std::move(p), sid);
    }
  }
};

std::string human_mb(int64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MB", double(b) / 1e6);
  return buf;
}

std::string iso_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

struct SplitResult {
  int64_t documents = 0, tokens = 0, bytes = 0, target_bytes = 0;
};

// Encodes docs (in order, parallel in blocks) and writes the shard.
SplitResult encode_split(const char* name, const std::vector<const Doc*>& docs,
                         const Tokenizer& tok, const std::vector<int32_t>& piece_bytes,
                         const std::string& path, bool quiet) {
  auto t0 = Clock::now();
  ShardWriter w(path, tok.vocab_size());
  SplitResult r;
  constexpr size_t kBlock = 1024;
  std::vector<std::vector<int32_t>> enc;
  int64_t total_bytes = 0;
  for (auto* d : docs) total_bytes += int64_t(d->text.size());
  double last_print = 0;
  for (size_t b0 = 0; b0 < docs.size(); b0 += kBlock) {
    const size_t n = std::min(kBlock, docs.size() - b0);
    enc.assign(n, {});
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(n); ++i) {
      std::vector<int32_t> ids = tok.encode(docs[b0 + i]->text);
      ids.insert(ids.begin(), tok.bos_id());
      enc[i] = std::move(ids);
    }
    for (size_t i = 0; i < n; ++i) {
      w.add_document(enc[i]);
      r.tokens += int64_t(enc[i].size());
      r.bytes += int64_t(docs[b0 + i]->text.size());
      for (int32_t id : enc[i]) r.target_bytes += piece_bytes[id];
    }
    r.documents += int64_t(n);
    const double el = secs(t0);
    if (!quiet && (el - last_print > 5.0 || b0 + n == docs.size())) {
      last_print = el;
      std::printf("prepare: encode %s %5.1f%%  %lld docs  %lld tokens  %.2f MB/s  %.0fs\n", name,
                  100.0 * double(r.bytes) / double(std::max<int64_t>(1, total_bytes)),
                  (long long)r.documents, (long long)r.tokens, r.bytes / 1e6 / std::max(el, 1e-9),
                  el);
      std::fflush(stdout);
    }
  }
  w.finish();
  return r;
}

// Validation iff a hash of the text falls below val_fraction; tiny corpora keep at least one
// document on each side. Both lists keep the order of `docs`, which is the order of the shards.
void split_documents(const std::vector<Doc>& docs, double val_fraction,
                     std::vector<const Doc*>& train, std::vector<const Doc*>& val) {
  const uint64_t cut = uint64_t(val_fraction * 18446744073709551615.0);
  const Doc* min_doc = nullptr;
  uint64_t min_h = ~0ull;
  for (const auto& d : docs) {
    const uint64_t h = splitmix64(text_hash(d.text) ^ 0x5851F42D4C957F2Dull);
    (h < cut ? val : train).push_back(&d);
    if (h < min_h) min_h = h, min_doc = &d;
  }
  if (val.empty()) {  // tiny corpus: the lowest hash goes to validation
    val.push_back(min_doc);
    train.erase(std::find(train.begin(), train.end(), min_doc));
  }
  if (train.empty()) {  // cannot happen with val_fraction < 0.5 unless 2-3 docs; move one back
    train.push_back(val.back());
    val.pop_back();
  }
}

void write_json(const std::string& path, const json& j, int indent = 2) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    DLCM_CHECK(f, "cannot write ", tmp);
    f << j.dump(indent) << "\n";
    DLCM_CHECK(f.good(), "error writing ", tmp);
  }
  fs::rename(tmp, path);
}

}  // namespace

json prepare(const std::vector<std::string>& inputs, const std::string& out_dir,
             const PrepareOptions& opt) {
  const auto t_start = Clock::now();
  DLCM_CHECK(opt.tokenizer == "bpe" || opt.tokenizer == "bytes",
             "prepare: --tokenizer must be \"bpe\" or \"bytes\", got \"", opt.tokenizer, "\"");
  // A given tokenizer is read first, so a wrong folder fails before the corpus is read.
  std::unique_ptr<Tokenizer> tok = opt.tokenizer_from.empty() ? nullptr : load_tokenizer(opt.tokenizer_from);
  DLCM_CHECK(opt.val_fraction > 0 && opt.val_fraction < 0.5,
             "prepare: val_fraction must be in (0, 0.5), got ", opt.val_fraction);
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  auto say = [&](auto&&... a) {
    if (opt.quiet) return;
    std::ostringstream os;
    (os << ... << a);
    std::printf("prepare: %s\n", os.str().c_str());
    std::fflush(stdout);
  };

  // 1. Read, clean, deduplicate.
  std::vector<std::string> names;
  const std::vector<std::string> files = collect_files(inputs, names);
  Reader rd;
  rd.paragraphs = files.size() == 1 && !has_ext(files[0], ".jsonl");
  for (size_t i = 0; i < files.size(); ++i) rd.read_file(files[i], names[i]);
  if (rd.used_paragraphs)
    say("one plain-text file without form feeds: its paragraphs (split at blank lines) are the documents");
  const double t_read = secs(t_start);
  int64_t kept_bytes = 0;
  for (const auto& d : rd.docs) kept_bytes += int64_t(d.text.size());
  say("read ", files.size(), " file(s): ", rd.st.read, " documents, kept ", rd.docs.size(), " (",
      human_mb(kept_bytes), "), dropped ", rd.st.empty, " empty, ", rd.st.junk, " junk, ",
      rd.st.duplicates, " duplicate; ", t_read, "s");
  if (rd.docs.empty()) {
    std::string list;
    for (size_t i = 0; i < files.size() && i < 3; ++i) list += (i ? ", " : "") + files[i];
    if (files.size() > 3) list += ", ...";
    fail("prepare: no usable text in the input (", files.size(), " file(s): ", list, "; ",
         rd.st.read, " document(s) read, ", rd.st.empty, " empty, ", rd.st.junk,
         " junk/binary, ", rd.st.duplicates, " duplicate)");
  }
  DLCM_CHECK(rd.docs.size() >= 2, "prepare: need at least 2 usable documents for a train/",
             "validation split, the input has ", rd.docs.size(),
             " (separate documents with blank lines or form feeds in .txt files, or use .jsonl)");

  // 2. Split by a hash of the text.
  std::vector<const Doc*> train, val;
  split_documents(rd.docs, opt.val_fraction, train, val);

  // 3. Tokenizer.
  fs::create_directories(out_dir);
  auto t_tok = Clock::now();
  if (tok) {
    say("tokenizer from ", opt.tokenizer_from, " (", tok->kind(), ")");
  } else if (opt.tokenizer == "bytes") {
    tok = make_byte_tokenizer();
  } else {
    std::vector<std::string> texts;
    texts.reserve(train.size());
    for (auto* d : train) texts.push_back(d->text);
    BpeOptions bo;
    bo.vocab_size = opt.vocab_size;
    bo.sample_bytes = opt.bpe_sample_bytes;
    bo.seed = opt.seed;
    bo.num_threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
    say("training SentencePiece BPE, vocab ", opt.vocab_size, ", sample up to ",
        human_mb(opt.bpe_sample_bytes), " of ", human_mb(kept_bytes));
    tok = train_bpe(texts, bo);
  }
  tok->save(out_dir);
  const double t_tokenizer = secs(t_tok);
  say("tokenizer ", tok->kind(), " vocab ", tok->vocab_size(), " ready in ", t_tokenizer, "s");

  // 4. Encode and write shards.
  auto t_enc = Clock::now();
  const std::vector<int32_t> pb = tok->piece_byte_lengths();
  const std::string train_path = (fs::path(out_dir) / "train.bin").string();
  const std::string val_path = (fs::path(out_dir) / "val.bin").string();
  SplitResult tr = encode_split("train", train, *tok, pb, train_path, opt.quiet);
  SplitResult va = encode_split("val", val, *tok, pb, val_path, opt.quiet);
  const double t_encode = secs(t_enc);

  // 5. meta.json.
  std::vector<int64_t> src_docs(rd.sources.size()), src_bytes(rd.sources.size());
  for (const auto& d : rd.docs) src_docs[d.source]++, src_bytes[d.source] += int64_t(d.text.size());
  json sources = json::array();
  for (size_t i = 0; i < rd.sources.size(); ++i)
    sources.push_back({{"name", rd.sources[i]}, {"documents", src_docs[i]}, {"bytes", src_bytes[i]}});
  auto split_json = [&](const SplitResult& r, const char* file) {
    return json{{"file", file},
                {"documents", r.documents},
                {"tokens", r.tokens},
                {"bytes", r.bytes},
                {"target_bytes", r.target_bytes},
                {"bytes_per_token",
                 r.tokens > r.documents ? double(r.bytes) / double(r.tokens - r.documents) : 0.0}};
  };
  json meta = {
      {"format_version", 1},
      {"created", iso_now()},
      {"tokenizer",
       {{"kind", tok->kind()},
        {"vocab_size", tok->vocab_size()},
        {"requested_vocab_size",
         opt.tokenizer == "bpe" && opt.tokenizer_from.empty() ? opt.vocab_size : tok->vocab_size()},
        {"pad_id", tok->pad_id()},
        {"bos_id", tok->bos_id()},
        {"eos_id", tok->eos_id()},
        {"unk_id", tok->unk_id()}}},
      {"vocab_size", tok->vocab_size()},
      {"inputs", inputs},
      {"files", files},
      {"sources", sources},
      {"documents",
       {{"read", rd.st.read},
        {"kept", int64_t(rd.docs.size())},
        {"empty", rd.st.empty},
        {"junk", rd.st.junk},
        {"duplicates", rd.st.duplicates},
        {"utf8_repaired", rd.st.repaired}}},
      {"split",
       {{"val_fraction", opt.val_fraction},
        {"rule", "validation iff splitmix64(fnv1a64(text)) < val_fraction * 2^64"}}},
      {"train", split_json(tr, "train.bin")},
      {"val", split_json(va, "val.bin")},
      {"bytes_per_token", split_json(tr, "").at("bytes_per_token")},
      {"seconds",
       {{"read", t_read}, {"tokenizer", t_tokenizer}, {"encode", t_encode}, {"total", secs(t_start)}}},
      {"threads", omp_get_max_threads()},
      {"notes",
       "bytes = UTF-8 bytes of the cleaned text (BOS excluded); bits per byte = summed CE nats / "
       "ln 2 / val.bytes; bytes_per_token excludes the BOS tokens"},
  };
  // The source of each validation document, in val.bin order (per-source analysis).
  json val_doc_sources = json::array();
  for (const Doc* d : val) val_doc_sources.push_back(d->source);
  write_json((fs::path(out_dir) / kValSourcesFile).string(),
             json{{"sources", rd.sources}, {"documents", val_doc_sources}}, -1);
  write_json((fs::path(out_dir) / "meta.json").string(), meta);
  say("done: train ", tr.tokens, " tokens (", tr.documents, " docs), val ", va.tokens,
      " tokens (", va.documents, " docs), ", meta["bytes_per_token"].get<double>(),
      " bytes/token, ", secs(t_start), "s -> ", out_dir);
  return meta;
}

DataDir open_data_dir(const std::string& dir) {
  DataDir d;
  d.dir = dir;
  const std::string mpath = (fs::path(dir) / "meta.json").string();
  DLCM_CHECK(fs::exists(mpath), "data directory ", dir,
             ": meta.json not found (run `dlcm prepare` first)");
  // A few KB in practice (the list of input files makes it grow); the limits bound a
  // hostile file.
  d.meta = read_json_file_bounded(mpath, JsonLimits{16, size_t(16) << 20});
  DLCM_CHECK(d.meta.is_object(), mpath, ": must be a JSON object, got ", d.meta.type_name());
  d.tokenizer = load_tokenizer(dir);
  const int64_t V = d.tokenizer->vocab_size();
  d.train = std::make_shared<ShardReader>((fs::path(dir) / "train.bin").string(), V);
  d.val = std::make_shared<ShardReader>((fs::path(dir) / "val.bin").string(), V);
  const json* vb = d.meta.contains("val") && d.meta["val"].is_object() && d.meta["val"].contains("bytes")
                       ? &d.meta["val"]["bytes"] : nullptr;
  // Bits per byte divide by it: a negative or absurd count would report garbage.
  DLCM_CHECK(vb && (vb->is_number_unsigned() || vb->is_number_integer()) &&
                 vb->get<int64_t>() >= 0 && vb->get<int64_t>() <= (int64_t(1) << 50),
             mpath, ": field val.bytes missing or not an integer in [0, 2^50]");
  d.val_bytes = vb->get<int64_t>();
  return d;
}

bool load_val_sources(const DataDir& d, ValSources& out, std::string* why) {
  auto no = [&](const std::string& reason) {
    if (why) *why = reason;
    return false;
  };
  const int64_t n_docs = d.val->documents();
  const fs::path file = fs::path(d.dir) / kValSourcesFile;
  if (fs::exists(file)) {
    json j;
    try {
      j = json::parse(slurp(file.string()));
      out.names = j.at("sources").get<std::vector<std::string>>();
      out.doc = j.at("documents").get<std::vector<int32_t>>();
    } catch (const json::exception& e) {
      fail(file.string(), ": expected {\"sources\": [names], \"documents\": [indices]} (",
           e.what(), "); run `dlcm prepare` again to rewrite it");
    }
    DLCM_CHECK(int64_t(out.doc.size()) == n_docs, file.string(), ": lists ", out.doc.size(),
               " documents but val.bin holds ", n_docs, " (the folder was changed after prepare)");
    for (int32_t s : out.doc)
      DLCM_CHECK(s >= 0 && s < int32_t(out.names.size()), file.string(), ": source index ", s,
                 " is outside [0, ", out.names.size(), ")");
    out.origin = kValSourcesFile;
    return true;
  }
  // Prepared before the file existed: read the corpus again as prepare did.
  std::vector<std::string> files;
  double val_fraction = 0;
  try {
    files = d.meta.at("files").get<std::vector<std::string>>();
    val_fraction = d.meta.at("split").at("val_fraction").get<double>();
  } catch (const json::exception&) {
    return no(std::string(kValSourcesFile) + " is missing and meta.json lacks files/split.val_fraction");
  }
  // A relative path is relative to where prepare ran: try the working directory, then the
  // folders above the data folder.
  for (auto& f : files) {
    if (fs::is_regular_file(f)) continue;
    std::error_code ec;
    fs::path up = fs::absolute(d.dir, ec);
    while (!ec && fs::path(f).is_relative() && up.has_relative_path() && !fs::is_regular_file(up / f))
      up = up.parent_path();
    if (ec || !fs::path(f).is_relative() || !fs::is_regular_file(up / f))
      return no(std::string(kValSourcesFile) + " is missing (prepared by an older dlcm) and the corpus file " +
                f + " listed in meta.json is not readable from here or from a folder above " + d.dir);
    f = (up / f).string();
  }
  Reader rd;  // as the dlcm before val_sources.json read them: sources named by file stem
  for (const auto& f : files) rd.read_file(f, fs::path(f).stem().string());
  std::vector<const Doc*> train, val;
  if (rd.docs.size() >= 2) split_documents(rd.docs, val_fraction, train, val);
  if (int64_t(val.size()) != n_docs)
    return no("re-reading the corpus files of meta.json gives " + std::to_string(val.size()) +
              " validation documents, val.bin holds " + std::to_string(n_docs) +
              " (the files changed since prepare)");
  // The first and last documents must encode to the lengths val.bin holds.
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < d.val->size(); ++i)
    if (d.val->at(i) == d.tokenizer->bos_id()) starts.push_back(i);
  starts.push_back(d.val->size());
  for (int64_t k : {int64_t(0), n_docs - 1}) {
    const int64_t len = int64_t(d.tokenizer->encode(val[k]->text).size()) + 1;
    if (int64_t(starts.size()) != n_docs + 1 || starts[k + 1] - starts[k] != len)
      return no("re-reading the corpus files of meta.json gives validation document " +
                std::to_string(k) + " with another token count than val.bin (the files changed since prepare)");
  }
  out.names = rd.sources;
  out.doc.clear();
  for (const Doc* v : val) out.doc.push_back(v->source);
  out.origin = "re-derived from the corpus files in meta.json";
  return true;
}

}  // namespace dlcm
