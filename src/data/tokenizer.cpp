#include "data/tokenizer.h"

#include <fcntl.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/common.h"
#include "core/json_util.h"
#include "core/rng.h"
#include "data/hf_tokenizer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

std::string read_tokenizer_file(const std::string& path, std::uintmax_t max_bytes) {
  std::error_code ec;
  DLCM_CHECK(fs::is_regular_file(path, ec), path, ": not a regular file");
  const std::uintmax_t size = fs::file_size(path, ec);
  DLCM_CHECK(!ec, "cannot read ", path, ": ", ec.message());
  DLCM_CHECK(size <= max_bytes, path, ": ", size, " bytes, over the limit of ", max_bytes,
             " bytes for a tokenizer file");
  std::ifstream f(path, std::ios::binary);
  DLCM_CHECK(f, "cannot open ", path);
  std::string s(size_t(size), '\0');
  f.read(s.data(), std::streamsize(size));
  DLCM_CHECK(!f.bad() && f.gcount() == std::streamsize(size), "error reading ", path);
  return s;
}

void write_tokenizer_file(const std::string& path, std::string_view data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DLCM_CHECK(f, "cannot write ", tmp);
    f.write(data.data(), std::streamsize(data.size()));
    DLCM_CHECK(f.good(), "error writing ", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  DLCM_CHECK(!ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

namespace {

constexpr int kFormatVersion = 1;

// SentencePiece models are ~0.5 MB at 32k pieces and a few MB at 256k; 64 MiB stops a wrong
// file (or a device such as /dev/zero) from being read whole.
constexpr std::uintmax_t kMaxModelBytes = std::uintmax_t(64) << 20;

json base_json(const Tokenizer& t, const SpecialIds& s) {
  return json{{"format_version", kFormatVersion}, {"kind", t.kind()},
              {"vocab_size", t.vocab_size()},   {"pad_id", s.pad},
              {"bos_id", s.bos},                {"eos_id", s.eos},
              {"unk_id", s.unk}};
}

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// ---------------------------------------------------------------------------------------------
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kOffset = 4;
  std::string kind() const override { return "bytes"; }
  int32_t vocab_size() const override { return 256 + kOffset; }
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = int32_t(uint8_t(text[i])) + kOffset;
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    s.reserve(ids.size());
    for (int32_t id : ids) {
      DLCM_CHECK(id >= 0 && id < vocab_size(), "bytes tokenizer: id ", id,
                 " outside the vocabulary [0, ", vocab_size(), ")");
      if (id >= kOffset) s.push_back(char(id - kOffset));
    }
    return s;
  }
  std::string decode_piece(int32_t id) const override {
    DLCM_CHECK(id >= 0 && id < vocab_size(), "bytes tokenizer: id ", id,
               " outside the vocabulary [0, ", vocab_size(), ")");
    return id >= kOffset ? std::string(1, char(id - kOffset)) : std::string();
  }
  std::vector<VocabEntry> vocab_entries() const override {
    using K = VocabEntry::Kind;
    std::vector<VocabEntry> v = {
        {"<pad>", 0, K::Control}, {"<s>", 0, K::Control}, {"</s>", 0, K::Control}, {"<unk>", 0, K::Unknown}};
    static const char* hex = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b)
      v.push_back({std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", 0, K::Byte});
    return v;
  }
  void save(const std::string& dir) const override {
    json j = base_json(*this, special_);
    j["byte_offset"] = kOffset;
    write_tokenizer_file((fs::path(dir) / kTokenizerMeta).string(), j.dump(2) + "\n");
  }
};

// Which pieces of a serialized SentencePiece ModelProto are USER_DEFINED (the processor's API
// has no such query and the proto's generated header is not installed). The proto's field 1 is
// the repeated piece message, whose field 3 is the type (USER_DEFINED = 4).
std::vector<uint8_t> user_defined_pieces(std::string_view proto, int n, const std::string& where) {
  size_t p = 0;
  auto varint = [&](std::string_view s, size_t& i) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      DLCM_CHECK(i < s.size(), where, ": truncated SentencePiece model");
      const uint8_t c = uint8_t(s[i++]);
      v |= uint64_t(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    fail(where, ": malformed varint in the SentencePiece model");
  };
  // Skips a field of wire type wt at s[i].
  auto skip = [&](std::string_view s, size_t& i, uint64_t wt) {
    uint64_t n = 0;
    if (wt == 0) varint(s, i);
    else if (wt == 1) n = 8;
    else if (wt == 5) n = 4;
    else if (wt == 2) n = varint(s, i);
    else fail(where, ": unsupported protobuf wire type ", wt, " in the SentencePiece model");
    DLCM_CHECK(n <= s.size() - i, where, ": truncated SentencePiece model");
    i += size_t(n);
  };
  std::vector<uint8_t> ud;
  while (p < proto.size()) {
    const uint64_t key = varint(proto, p);
    if (key >> 3 != 1 || (key & 7) != 2) {
      skip(proto, p, key & 7);
      continue;
    }
    const uint64_t len = varint(proto, p);
    DLCM_CHECK(len <= proto.size() - p, where, ": truncated SentencePiece model");
    std::string_view piece = proto.substr(p, size_t(len));
    p += size_t(len);
    uint64_t type = 1;  // NORMAL when absent
    for (size_t i = 0; i < piece.size();) {
      const uint64_t k = varint(piece, i);
      if (k >> 3 == 3 && (k & 7) == 0) type = varint(piece, i);
      else skip(piece, i, k & 7);
    }
    ud.push_back(type == 4);
  }
  DLCM_CHECK(int(ud.size()) == n, where, ": the SentencePiece model lists ", ud.size(),
             " pieces, the processor ", n);
  return ud;
}

// ---------------------------------------------------------------------------------------------
class BpeTokenizer final : public Tokenizer {
 public:
  // `model` is the serialized SentencePiece ModelProto; `where` names it in errors.
  BpeTokenizer(std::string model, const std::string& where) : model_(std::move(model)) {
    auto st = sp_.LoadFromSerializedProto(model_);
    DLCM_CHECK(st.ok(), where, ": not a valid SentencePiece model (", st.ToString(), ")");
    special_.pad = sp_.pad_id();
    special_.bos = sp_.bos_id();
    special_.eos = sp_.eos_id();
    special_.unk = sp_.unk_id();
    DLCM_CHECK(special_.pad == 0 && special_.bos == 1 && special_.eos == 2 && special_.unk == 3,
               where, ": expected special ids pad=0 bos=1 eos=2 unk=3, model has pad=",
               special_.pad, " bos=", special_.bos, " eos=", special_.eos, " unk=", special_.unk);
    const int n = sp_.GetPieceSize();
    user_defined_ = user_defined_pieces(model_, n, where);
    pieces_.resize(n);
    for (int i = 0; i < n; ++i) {
      if (sp_.IsControl(i) || sp_.IsUnknown(i)) continue;
      const std::string& p = sp_.IdToPiece(i);
      if (sp_.IsByte(i)) {  // "<0xAB>"
        pieces_[i] = std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
        continue;
      }
      std::string out;
      for (size_t k = 0; k < p.size();) {
        if (p.compare(k, 3, "\xE2\x96\x81") == 0) {
          out.push_back(' ');
          k += 3;
        } else {
          out.push_back(p[k++]);
        }
      }
      pieces_[i] = std::move(out);
    }
  }
  std::string kind() const override { return "bpe"; }
  int32_t vocab_size() const override { return int32_t(pieces_.size()); }
  // SentencePiece's BPE encoder slows down on long inputs, so long text is encoded in chunks
  // of >= kChunk bytes cut just before a space that follows a non-space, or before a newline.
  // No piece can cross such a point (pieces carry the space marker only at their start, or
  // consist of spaces only; "\n" is a piece of its own), so the ids are exactly those of
  // encoding the whole text at once.
  std::vector<int32_t> encode(std::string_view text) const override {
    constexpr size_t kChunk = 1024;
    std::vector<int32_t> out;
    std::vector<int> ids;
    size_t p = 0;
    while (p < text.size()) {
      size_t q = p + kChunk;
      while (q < text.size() &&
             !(text[q] == '\n' || (text[q] == ' ' && text[q - 1] != ' ')))
        ++q;
      if (q > text.size()) q = text.size();
      auto st = sp_.Encode(text.substr(p, q - p), &ids);
      DLCM_CHECK(st.ok(), "bpe tokenizer: encode failed (", st.ToString(), ")");
      out.insert(out.end(), ids.begin(), ids.end());
      p = q;
    }
    return out;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> v;
    v.reserve(ids.size());
    for (int32_t id : ids) {
      DLCM_CHECK(id >= 0 && id < vocab_size(), "bpe tokenizer: id ", id,
                 " outside the vocabulary [0, ", vocab_size(), ")");
      if (!is_special(id)) v.push_back(id);
    }
    std::string out;
    auto st = sp_.Decode(v, &out);
    DLCM_CHECK(st.ok(), "bpe tokenizer: decode failed (", st.ToString(), ")");
    return out;
  }
  std::string decode_piece(int32_t id) const override {
    DLCM_CHECK(id >= 0 && id < vocab_size(), "bpe tokenizer: id ", id,
               " outside the vocabulary [0, ", vocab_size(), ")");
    return pieces_[id];
  }
  std::vector<VocabEntry> vocab_entries() const override {
    using K = VocabEntry::Kind;
    std::vector<VocabEntry> v(pieces_.size());
    for (int i = 0; i < int(v.size()); ++i) {
      v[i].piece = sp_.IdToPiece(i);
      v[i].score = sp_.GetScore(i);
      v[i].kind = sp_.IsUnknown(i)   ? K::Unknown
                  : sp_.IsControl(i) ? K::Control
                  : sp_.IsByte(i)    ? K::Byte
                  : user_defined_[i] ? K::UserDefined
                                     : K::Normal;
    }
    return v;
  }
  void save(const std::string& dir) const override {
    write_tokenizer_file((fs::path(dir) / kTokenizerModel).string(), model_);
    json j = base_json(*this, special_);
    j["model_file"] = kTokenizerModel;
    j["library"] = "sentencepiece";
    j["model_type"] = "bpe";
    j["byte_fallback"] = true;
    j["normalization"] = "identity";
    write_tokenizer_file((fs::path(dir) / kTokenizerMeta).string(), j.dump(2) + "\n");
  }
  std::string sentencepiece_model() const override { return model_; }

 private:
  std::string model_;
  sentencepiece::SentencePieceProcessor sp_;
  std::vector<std::string> pieces_;
  std::vector<uint8_t> user_defined_;  // per id: a user-defined symbol ("\n")
};

// Feeds the training sample to SentencePiece from memory.
class VecIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VecIterator(const std::vector<std::string>& v) : v_(v) {}
  bool done() const override { return i_ >= v_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return v_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& v_;
  size_t i_ = 0;
};

// Silences SentencePiece's training log (it writes to stderr directly) for a scope.
struct StderrMute {
  int saved = -1;
  explicit StderrMute(bool on) {
    if (!on) return;
    std::fflush(stderr);
    saved = dup(2);
    int nul = open("/dev/null", O_WRONLY);
    if (saved >= 0 && nul >= 0) dup2(nul, 2);
    if (nul >= 0) close(nul);
  }
  ~StderrMute() {
    if (saved < 0) return;
    std::fflush(stderr);
    dup2(saved, 2);
    close(saved);
  }
};

}  // namespace

std::vector<int32_t> Tokenizer::piece_byte_lengths() const {
  std::vector<int32_t> n(vocab_size());
  for (int32_t i = 0; i < vocab_size(); ++i) n[i] = int32_t(decode_piece(i).size());
  return n;
}

std::vector<uint8_t> Tokenizer::word_starts() const {
  std::vector<uint8_t> w(vocab_size(), 0);
  for (int32_t i = 0; i < vocab_size(); ++i) {
    if (is_special(i)) continue;
    const std::string piece = decode_piece(i);
    if (piece.empty()) continue;
    const unsigned char c = piece[0];
    // "\xE2\x96\x81" (U+2581) in case a piece keeps the raw marker.
    w[i] = (std::isspace(c) || std::ispunct(c) || piece.rfind("\xE2\x96\x81", 0) == 0) ? 1 : 0;
  }
  return w;
}

namespace {

// Our metadata under its old name: a small object with "kind" (HF's files have "model").
bool is_legacy_meta(const json& j) { return j.is_object() && j.contains("kind") && !j.contains("model"); }

// The text of dir/tokenizer.json, bounded for HF's files (64 MiB; ours are under 1 KiB).
std::string read_tokenizer_json(const std::string& path) {
  return read_tokenizer_file(path, std::uintmax_t(64) << 20);
}

}  // namespace

bool has_legacy_tokenizer_meta(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(fs::path(dir) / kTokenizerMeta, ec)) return false;
  const std::string p = (fs::path(dir) / kHfTokenizerJson).string();
  if (!fs::is_regular_file(p, ec)) return false;
  const std::string text = read_tokenizer_json(p);
  return is_legacy_meta(parse_json_bounded(text, p, JsonLimits{32, size_t(64) << 20}));
}

std::vector<std::string> tokenizer_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  const bool ours = fs::exists(fs::path(dir) / kTokenizerMeta, ec);
  std::vector<const char*> names = {kTokenizerMeta, kTokenizerModel};
  if (!ours) names = {kHfTokenizerJson, kHfTokenizerConfig, kHfSpecialTokensMap, kTokenizerModel};
  for (const char* f : names) {
    fs::path p = fs::path(dir) / f;
    if (fs::exists(p, ec)) out.push_back(p.string());
  }
  return out;
}

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> train_bpe(const std::vector<std::string>& docs, const BpeOptions& opt) {
  DLCM_CHECK(opt.vocab_size >= 300 && opt.vocab_size <= (1 << 20),
             "bpe vocab_size must be in [300, 1048576], got ", opt.vocab_size);
  // Sentences = lines (long lines cut at spaces to stay under SentencePiece's length limit),
  // sampled by a hash of (seed, line) so the sample does not depend on thread timing.
  constexpr size_t kMaxLine = 4000;
  int64_t total = 0;
  for (const auto& d : docs) total += int64_t(d.size());
  DLCM_CHECK(total > 0, "bpe training: no text to train on");
  const double keep = std::min(1.0, double(opt.sample_bytes) / double(total));
  const uint64_t thresh = keep >= 1.0 ? ~0ull : uint64_t(keep * 18446744073709551615.0);
  std::vector<std::string> sample;
  int64_t sample_bytes = 0;
  auto add = [&](std::string_view line) {
    if (line.empty()) return;
    if (keep < 1.0 && counter_hash(opt.seed, fnv1a(line)) > thresh) return;
    sample.emplace_back(line);
    sample_bytes += int64_t(line.size());
  };
  for (const auto& d : docs) {
    std::string_view s(d);
    while (!s.empty()) {
      size_t nl = s.find('\n');
      std::string_view line = s.substr(0, nl);
      s = nl == std::string_view::npos ? std::string_view() : s.substr(nl + 1);
      while (line.size() > kMaxLine) {
        size_t cut = line.rfind(' ', kMaxLine);
        if (cut == std::string_view::npos || cut < kMaxLine / 2) cut = kMaxLine;
        // Never cut inside a UTF-8 sequence.
        while (cut > 0 && (uint8_t(line[cut]) & 0xC0) == 0x80) --cut;
        if (cut == 0) cut = kMaxLine;
        add(line.substr(0, cut));
        line = line.substr(cut);
      }
      add(line);
    }
  }
  DLCM_CHECK(!sample.empty(), "bpe training: the training sample is empty");
  std::unordered_map<std::string, std::string> kw = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"user_defined_symbols", "\n"},
      {"character_coverage", "0.9999"},
      {"pad_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"unk_id", "3"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"max_sentence_length", std::to_string(kMaxLine + 16)},
      {"num_threads", std::to_string(std::max(1, opt.num_threads))},
      {"hard_vocab_limit", "false"},
      {"minloglevel", opt.verbose ? "0" : "2"},
  };
  sentencepiece::SetRandomGeneratorSeed(uint32_t(opt.seed));
  VecIterator it(sample);
  std::string model;
  sentencepiece::util::Status st;
  {
    StderrMute mute(!opt.verbose);
    st = sentencepiece::SentencePieceTrainer::Train(kw, &it, &model);
  }
  DLCM_CHECK(st.ok(), "bpe training failed (vocab_size ", opt.vocab_size, ", sample ",
             sample.size(), " lines / ", sample_bytes, " bytes): ", st.ToString());
  return std::make_unique<BpeTokenizer>(std::move(model), "trained bpe model");
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  std::string jpath = (fs::path(dir) / kTokenizerMeta).string();
  json j;
  // Our metadata is a few hundred bytes; the limits only bound a hostile file.
  const JsonLimits ours{8, size_t(1) << 20};
  if (fs::exists(jpath)) {
    j = read_json_file_bounded(jpath, ours);
  } else {
    jpath = (fs::path(dir) / kHfTokenizerJson).string();
    DLCM_CHECK(fs::exists(jpath), "tokenizer: neither ", (fs::path(dir) / kTokenizerMeta).string(),
               " nor ", jpath, " found (expected a dlcm_tokenizer.json, or an HF tokenizer.json)");
    const std::string text = read_tokenizer_json(jpath);
    j = parse_json_bounded(text, jpath, JsonLimits{32, size_t(64) << 20});
    if (!is_legacy_meta(j)) return load_hf_tokenizer(dir);
    j = parse_json_bounded(text, jpath, ours);  // ours under the old name: our limits
  }
  DLCM_CHECK(j.is_object() && j.contains("kind") && j["kind"].is_string(), jpath,
             ": field \"kind\" (\"bpe\" or \"bytes\") missing");
  const std::string kind = j["kind"];
  std::unique_ptr<Tokenizer> t;
  if (kind == "bytes") {
    t = make_byte_tokenizer();
  } else if (kind == "bpe") {
    std::string mf = kTokenizerModel;
    if (j.contains("model_file")) {
      DLCM_CHECK(j["model_file"].is_string(), jpath, ": field \"model_file\" must be a string, got ",
                 json_excerpt(j["model_file"]));
      mf = j["model_file"].get<std::string>();
    }
    // The model file belongs to the folder: a bare file name, and no symlink out of it.
    DLCM_CHECK(!mf.empty() && mf.size() <= 255 && mf.find('/') == std::string::npos &&
                   mf.find('\0') == std::string::npos && mf != "." && mf != "..",
               jpath, ": field \"model_file\" must name a file in ", dir, " (a bare file name), got ",
               json_excerpt(j["model_file"]));
    const std::string mpath = (fs::path(dir) / mf).string();
    DLCM_CHECK(fs::exists(mpath), jpath, ": model file ", mpath, " not found");
    std::error_code ec;
    const fs::path real = fs::canonical(mpath, ec), home = fs::canonical(dir, ec);
    DLCM_CHECK(!ec && real.parent_path() == home, jpath, ": model file ", mpath,
               " leads outside ", dir, " (a symbolic link?); copy the model file into the folder");
    t = std::make_unique<BpeTokenizer>(read_tokenizer_file(mpath, kMaxModelBytes), mpath);
  } else {
    fail(jpath, ": field \"kind\" must be \"bpe\" or \"bytes\", got ", json_excerpt(j["kind"]));
  }
  for (auto [field, want] : {std::pair<const char*, int32_t>{"vocab_size", t->vocab_size()},
                             {"pad_id", t->pad_id()},
                             {"bos_id", t->bos_id()},
                             {"eos_id", t->eos_id()},
                             {"unk_id", t->unk_id()}}) {
    if (!j.contains(field)) continue;
    DLCM_CHECK(j[field].is_number_integer() && j[field].get<int64_t>() == want, jpath,
               ": field \"", field, "\" is ", json_excerpt(j[field]), " but the tokenizer has ", want);
  }
  return t;
}

bool is_valid_utf8(std::string_view s) {
  std::string t(s);
  return repair_utf8(t) == 0;
}

int64_t repair_utf8(std::string& s) {
  // Fast path: pure ASCII.
  size_t i = 0;
  while (i < s.size() && uint8_t(s[i]) < 0x80) ++i;
  if (i == s.size()) return 0;
  std::string out(s.data(), i);
  out.reserve(s.size() + 16);
  int64_t bad = 0;
  const size_t n = s.size();
  while (i < n) {
    uint8_t c = uint8_t(s[i]);
    int len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      out.push_back(char(c));
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4, cp = c & 0x07;
    }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      uint8_t cc = uint8_t(s[i + k]);
      if ((cc & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (ok) {
      if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
          (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        ok = false;
    }
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      ++bad;
      ++i;
    }
  }
  s.swap(out);
  return bad;
}

}  // namespace dlcm
