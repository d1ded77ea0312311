#include "data/hf_tokenizer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <shared_mutex>
#include <unordered_map>

#include "core/common.h"
#include "core/json_util.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Real tokenizer.json files reach ~10 MB (128k-token vocabularies) and nest about 6 levels.
constexpr size_t kMaxJsonBytes = size_t(64) << 20;
constexpr int kMaxJsonDepth = 32;
// Ids up to 2^21 - 1 (the largest real vocabularies have ~256k tokens): the per-id tables of
// a hostile file stay small.
constexpr int32_t kMaxId = (1 << 21) - 1;
// Normalizer and decoder strings ("▁", " "): a long replacement would let a small text expand
// without bound.
constexpr size_t kMaxRuleBytes = 64;
const std::string kSpMeta = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace marker

// ---------------------------------------------------------------------------------- UTF-8
// Text is repaired to valid UTF-8 before it gets here, so these only decode.
inline int u8len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

inline uint32_t u8decode(const char* p, int n) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  if (n == 1) return u[0];
  uint32_t cp = u[0] & (0xFF >> (n + 1));
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (u[k] & 0x3F);
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

size_t utf8_chars(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size(); i += u8len(uint8_t(s[i]))) ++n;
  return n;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t i = 0;
  for (size_t j; (j = s.find(from, i)) != std::string::npos; i = j + from.size()) {
    out.append(s, i, j - i);
    out.append(to);
  }
  if (i == 0) return;
  out.append(s, i, std::string::npos);
  s.swap(out);
}

// Unicode White_Space: what \s of the GPT-2 pattern matches in HF's regex engine (measured
// over every code point with tokenizers 0.20: exactly this property).
inline bool is_ws(uint32_t cp) {
  return cp == ' ' || (cp >= 9 && cp <= 13) || (cp >= 0x80 && u_isUWhiteSpace(UChar32(cp)));
}

// -------------------------------------------------------------------- byte-level alphabet
// GPT-2 maps each byte to a printable character: the printable bytes ! .. ~, ¡ .. ¬, ® .. ÿ
// stand for themselves, the other 68 bytes for U+0100 + k in byte order.
struct ByteAlphabet {
  std::string of_byte[256];                   // UTF-8 of the character for each byte
  std::unordered_map<uint32_t, uint8_t> byte;  // character -> byte
  ByteAlphabet() {
    int k = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? uint32_t(b) : uint32_t(0x100 + k++);
      append_utf8(of_byte[b], cp);
      byte[cp] = uint8_t(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

// Bytes of a byte-level token; a token with a character outside the alphabet (an added token
// such as "<|endoftext|>" written plainly) stands for its own UTF-8, as HF's decoder does.
std::string byte_level_to_bytes(const std::string& tok) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  for (size_t i = 0; i < tok.size();) {
    const int n = u8len(uint8_t(tok[i]));
    auto it = a.byte.find(u8decode(tok.data() + i, n));
    if (it == a.byte.end()) return tok;
    out.push_back(char(it->second));
    i += n;
  }
  return out;
}

// ------------------------------------------------------------- GPT-2 pre-tokenizer split
// The pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// as a scanner over code-point classes: the alternatives are tried in order at each position
// and every class run is maximal, so one look at the next class decides each match. The
// lookahead rule: a whitespace run followed by a non-space leaves its last character to the
// next match (which then takes it as the optional space, or alone).
enum class Cls : uint8_t { Letter, Number, Space, Other };

Cls classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return Cls::Letter;
    if (cp >= '0' && cp <= '9') return Cls::Number;
    if (cp == ' ' || (cp >= 9 && cp <= 13)) return Cls::Space;
    return Cls::Other;
  }
  if (is_ws(cp)) return Cls::Space;
  switch (u_charType(UChar32(cp))) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER:
      return Cls::Letter;
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER:
      return Cls::Number;
    default:
      return Cls::Other;
  }
}

void gpt2_split(std::string_view s, std::vector<std::string_view>& out) {
  // Characters: byte offset and class.
  std::vector<uint32_t> off;
  std::vector<Cls> cls;
  off.reserve(s.size() + 1);
  cls.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const int n = u8len(uint8_t(s[i]));
    off.push_back(uint32_t(i));
    cls.push_back(classify(u8decode(s.data() + i, n)));
    i += n;
  }
  const size_t n = cls.size();
  off.push_back(uint32_t(s.size()));
  auto emit = [&](size_t a, size_t b) { out.push_back(s.substr(off[a], off[b] - off[a])); };
  auto run_end = [&](size_t k, Cls c) {
    while (k < n && cls[k] == c) ++k;
    return k;
  };
  size_t k = 0;
  while (k < n) {
    const char c = s[off[k]];
    if (c == '\'' && k + 1 < n) {  // contractions (ASCII, lowercase only, as in GPT-2)
      const char c1 = s[off[k + 1]];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(k, k + 2);
        k += 2;
        continue;
      }
      if (k + 2 < n) {
        const char c2 = s[off[k + 2]];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          emit(k, k + 3);
          k += 3;
          continue;
        }
      }
    }
    if (c == ' ' && k + 1 < n && cls[k + 1] != Cls::Space) {  // " ?" + a letter/number/other run
      const size_t e = run_end(k + 1, cls[k + 1]);
      emit(k, e);
      k = e;
    } else if (cls[k] != Cls::Space) {
      const size_t e = run_end(k, cls[k]);
      emit(k, e);
      k = e;
    } else {
      const size_t e = run_end(k, Cls::Space);
      const size_t stop = (e == n || e - k == 1) ? e : e - 1;
      emit(k, stop);
      k = stop;
    }
  }
}

// ---------------------------------------------------------------- reading the JSON files
// Field access with errors that name the file and the field path.
struct Reader {
  std::string file;
  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(file, ": field \"", field, "\" ", what);
  }
  const json* opt(const json& o, const char* key) const {
    auto it = o.find(key);
    return (it == o.end() || it->is_null()) ? nullptr : &*it;
  }
  const json& req(const json& o, const char* key, const std::string& where) const {
    const json* v = o.is_object() ? opt(o, key) : nullptr;
    if (!v) bad(where + key, "is missing");
    return *v;
  }
  std::string str(const json& o, const char* key, const std::string& where) const {
    const json& v = req(o, key, where);
    if (!v.is_string()) bad(where + key, "must be a string, got " + json_excerpt(v));
    return v.get<std::string>();
  }
  bool flag(const json& o, const char* key, const std::string& where, bool dflt) const {
    const json* v = opt(o, key);
    if (!v) return dflt;
    if (!v->is_boolean()) bad(where + key, "must be true or false, got " + json_excerpt(*v));
    return v->get<bool>();
  }
  std::string type_of(const json& o, const std::string& where) const {
    if (!o.is_object()) bad(where.substr(0, where.size() - 1), "must be an object, got " + json_excerpt(o));
    return str(o, "type", where);
  }
  // A one-character string (Metaspace replacement, Strip content).
  std::string one_char(const json& o, const char* key, const std::string& where) const {
    std::string s = str(o, key, where);
    if (s.empty() || !is_valid_utf8(s) || utf8_chars(s) != 1)
      bad(where + key, "must be a single character, got " + json_excerpt(o[key]));
    return s;
  }
  // Replace's pattern: {"String": s} only (regular expressions are not supported).
  std::string pattern(const json& o, const std::string& where) const {
    const json& p = req(o, "pattern", where);
    if (!p.is_object() || !p.contains("String") || !p["String"].is_string() ||
        p["String"].get<std::string>().empty())
      bad(where + "pattern", "must be {\"String\": \"...\"} (regex patterns are not supported), got " +
                                 json_excerpt(p));
    return rule(p, "String", where + "pattern.");
  }
  // A normalizer/decoder string: at most kMaxRuleBytes.
  std::string rule(const json& o, const char* key, const std::string& where) const {
    std::string s = str(o, key, where);
    if (s.size() > kMaxRuleBytes)
      bad(where + key, "is longer than " + std::to_string(kMaxRuleBytes) + " bytes");
    return s;
  }
};

std::string dump(const json& j) {
  return j.dump(2, ' ', false, json::error_handler_t::strict) + "\n";
}

// ------------------------------------------------------------------------ the tokenizer
struct AddedToken {
  int32_t id = 0;
  std::string content;
  std::string match;  // what is searched for: content, normalized when `normalized`
  bool lstrip = false, rstrip = false, normalized = false, special = false;
};

// Added tokens by their first byte, longest first (the first hit at a position is the
// leftmost-longest match).
struct AddedIndex {
  std::vector<const AddedToken*> by_byte[256];
  bool empty = true;
};

struct NormOp {
  bool prepend = false;  // Prepend(a), else Replace(a -> b)
  std::string a, b;
};

enum class Pre { None, ByteLevel, Metaspace };
enum class Prepend { Always, First, Never };

struct DecStep {
  enum Kind { Replace, ByteFallback, Fuse, Strip, ByteLevel, Metaspace } kind;
  std::string a, b;        // Replace: a -> b; Strip: a = the character; Metaspace: a
  int start = 0, stop = 0;  // Strip
  bool strip_first = false;  // Metaspace: drop the prepended space of the first token
};

struct Merge {
  int32_t rank, id;
};

class HfTokenizer final : public Tokenizer {
 public:
  explicit HfTokenizer(const std::string& dir);
  std::string kind() const override { return "hf"; }
  int32_t vocab_size() const override { return int32_t(tokens_.size()); }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string decode_piece(int32_t id) const override {
    check_id(id);
    return is_special(id) ? std::string() : pieces_[size_t(id)];
  }
  void save(const std::string& dir) const override {
    for (const auto& [name, text] : files_) write_tokenizer_file((fs::path(dir) / name).string(), text);
    // Our metadata takes precedence in a folder: a stale one would hide these files.
    std::error_code ec;
    fs::remove(fs::path(dir) / kTokenizerMeta, ec);
  }
  // tokenizer_config.json content naming the special tokens (when the folder had none).
  json config_json() const;
  bool has_file(const std::string& name) const { return files_.count(name) > 0; }

 private:
  void check_id(int32_t id) const {
    DLCM_CHECK(id >= 0 && id < vocab_size(), "hf tokenizer: id ", id,
               " outside the vocabulary [0, ", vocab_size(), ")");
  }
  void parse_model(const Reader& r, const json& m);
  void parse_normalizer(const Reader& r, const json& n, const std::string& where);
  void parse_pre_tokenizer(const Reader& r, const json& p, const std::string& where);
  void parse_decoder(const Reader& r, const json& d, const std::string& where);
  void resolve_specials(const Reader& r, const json& j, const std::string& dir);
  // Splits s at the added tokens of `ix`; calls seg(begin, end) for the text between matches
  // and tok(id) for each match, in order.
  template <class Seg, class Tok>
  void split_added(std::string_view s, const AddedIndex& ix, Seg seg, Tok tok) const;
  std::string normalize(std::string_view s) const {
    std::string n(s);
    for (const NormOp& op : norm_) {
      if (!op.prepend) replace_all(n, op.a, op.b);
      else if (!n.empty()) n.insert(0, op.a);
    }
    return n;
  }
  void encode_segment(std::string_view seg, bool at_start, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;

  std::map<std::string, std::string> files_;  // verbatim, for save()
  std::vector<std::string> tokens_;           // id -> token string as in the file
  std::vector<std::string> pieces_;           // id -> raw bytes (decode_piece)
  std::unordered_map<std::string, int32_t> vocab_;  // the model's vocabulary
  std::unordered_map<uint64_t, Merge> merges_;      // (left id, right id) -> merge
  int32_t byte_ids_[256];
  int32_t model_unk_ = -1;
  bool split_special_ = false;  // tokenizer_config.json: special tokens in text are plain text
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::vector<NormOp> norm_;
  Pre pre_ = Pre::None;
  bool add_prefix_space_ = false, use_regex_ = true, meta_split_ = true;
  Prepend prepend_ = Prepend::Always;
  std::string meta_rep_ = kSpMeta;
  std::vector<DecStep> dec_;
  std::vector<AddedToken> added_;
  AddedIndex raw_added_, norm_added_;  // matched before / after normalizing
  // Word -> ids for short words, shared by the threads that encode (prepare runs many).
  mutable std::shared_mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

HfTokenizer::HfTokenizer(const std::string& dir) {
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  const std::string path = (fs::path(dir) / kHfTokenizerJson).string();
  const std::string text = read_tokenizer_file(path, kMaxJsonBytes);
  const json j = parse_json_bounded(text, path, JsonLimits{kMaxJsonDepth, kMaxJsonBytes});
  Reader r{path};
  DLCM_CHECK(j.is_object(), path, ": must be a JSON object (HF tokenizers format), got ",
             j.type_name());
  files_[kHfTokenizerJson] = text;
  parse_model(r, r.req(j, "model", ""));

  // Added tokens: ids may extend the vocabulary; their content names the id.
  if (const json* at = r.opt(j, "added_tokens")) {
    if (!at->is_array()) r.bad("added_tokens", "must be an array, got " + json_excerpt(*at));
    for (size_t i = 0; i < at->size(); ++i) {
      const std::string w = "added_tokens[" + std::to_string(i) + "].";
      const json& e = (*at)[i];
      if (!e.is_object()) r.bad(w.substr(0, w.size() - 1), "must be an object");
      AddedToken t;
      const json& id = r.req(e, "id", w);
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxId)
        r.bad(w + "id", "must be an integer in [0, " + std::to_string(kMaxId) + "], got " +
                            json_excerpt(id));
      t.id = int32_t(id.get<int64_t>());
      t.content = r.str(e, "content", w);
      if (t.content.empty() || !is_valid_utf8(t.content))
        r.bad(w + "content", "must be a non-empty UTF-8 string");
      if (r.flag(e, "single_word", w, false))
        r.bad(w + "single_word", "true is not supported (only false)");
      t.lstrip = r.flag(e, "lstrip", w, false);
      t.rstrip = r.flag(e, "rstrip", w, false);
      t.normalized = r.flag(e, "normalized", w, true);
      t.special = r.flag(e, "special", w, false);
      added_.push_back(std::move(t));
    }
  }
  int32_t max_id = -1;
  for (const auto& [s, id] : vocab_) max_id = std::max(max_id, id);
  for (const auto& t : added_) max_id = std::max(max_id, t.id);
  DLCM_CHECK(max_id >= 0, path, ": the vocabulary is empty (fields \"model.vocab\", \"added_tokens\")");
  tokens_.assign(size_t(max_id) + 1, std::string());
  for (const auto& [s, id] : vocab_) tokens_[size_t(id)] = s;
  for (const auto& t : added_) tokens_[size_t(t.id)] = t.content;

  if (const json* n = r.opt(j, "normalizer")) parse_normalizer(r, *n, "normalizer.");
  resolve_specials(r, j, dir);  // also reads split_special_tokens
  // Tokens marked normalized are searched for, normalized, in the normalized text; the others
  // in the raw text first. With split_special_tokens, special ones are not searched for.
  for (auto& t : added_) {
    t.match = t.normalized ? normalize(t.content) : t.content;
    if (t.match.empty()) continue;  // normalized away: it never matches
    if (t.special && split_special_) continue;
    AddedIndex& ix = t.normalized ? norm_added_ : raw_added_;
    ix.by_byte[uint8_t(t.match[0])].push_back(&t);
    ix.empty = false;
  }
  for (auto* ix : {&raw_added_, &norm_added_})
    for (auto& l : ix->by_byte)
      std::stable_sort(l.begin(), l.end(), [](const AddedToken* a, const AddedToken* b) {
        return a->match.size() > b->match.size();
      });
  if (const json* p = r.opt(j, "pre_tokenizer")) parse_pre_tokenizer(r, *p, "pre_tokenizer.");
  if (const json* d = r.opt(j, "decoder")) parse_decoder(r, *d, "decoder.");
  const bool byte_level_dec =
      std::any_of(dec_.begin(), dec_.end(), [](const DecStep& s) { return s.kind == DecStep::ByteLevel; });
  if (byte_level_dec != (pre_ == Pre::ByteLevel))
    r.bad(byte_level_dec ? "decoder" : "pre_tokenizer",
          "ByteLevel must be used by both the pre_tokenizer and the decoder (or by neither)");
  if (const json* pp = r.opt(j, "post_processor")) r.type_of(*pp, "post_processor.");

  // Pieces for streaming: the per-token steps of the decoder.
  pieces_.resize(tokens_.size());
  for (size_t id = 0; id < tokens_.size(); ++id) {
    std::string p = tokens_[id];
    for (const DecStep& s : dec_) {
      if (s.kind == DecStep::Replace) {
        replace_all(p, s.a, s.b);
      } else if (s.kind == DecStep::Metaspace) {
        replace_all(p, s.a, " ");
      } else if (s.kind == DecStep::ByteFallback) {
        if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' &&
            std::isxdigit(uint8_t(p[3])) && std::isxdigit(uint8_t(p[4])))
          p = std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
      } else if (s.kind == DecStep::ByteLevel) {
        p = byte_level_to_bytes(p);
      }
    }
    pieces_[id] = std::move(p);
  }
}

void HfTokenizer::parse_model(const Reader& r, const json& m) {
  const std::string w = "model.";
  if (!m.is_object()) r.bad("model", "must be an object");
  const json* type = r.opt(m, "type");
  if (type && (!type->is_string() || type->get<std::string>() != "BPE"))
    r.bad("model.type", "must be \"BPE\" (WordPiece, Unigram and WordLevel models are not supported), got " +
                            json_excerpt(*type));
  if (const json* d = r.opt(m, "dropout"))
    r.bad("model.dropout", "must be null (BPE dropout is a training-time option), got " + json_excerpt(*d));
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = r.opt(m, k);
    if (v && !(v->is_string() && v->get<std::string>().empty()))
      r.bad(w + k, "is not supported (must be null), got " + json_excerpt(*v));
  }
  byte_fallback_ = r.flag(m, "byte_fallback", w, false);
  fuse_unk_ = r.flag(m, "fuse_unk", w, false);
  ignore_merges_ = r.flag(m, "ignore_merges", w, false);
  const json& v = r.req(m, "vocab", w);
  if (!v.is_object()) r.bad("model.vocab", "must be an object {token: id}, got " + json_excerpt(v));
  std::unordered_map<int32_t, const std::string*> seen;
  vocab_.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    const json& id = it.value();
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxId)
      r.bad("model.vocab[" + json_excerpt(json(it.key()), 40) + "]",
            "must be an integer id in [0, " + std::to_string(kMaxId) + "], got " + json_excerpt(id));
    if (!is_valid_utf8(it.key()) || it.key().empty())
      r.bad("model.vocab", "has an empty or malformed token " + json_excerpt(json(it.key()), 40));
    const int32_t i = int32_t(id.get<int64_t>());
    auto [pos, fresh] = vocab_.emplace(it.key(), i);
    auto [sp, first] = seen.emplace(i, &pos->first);
    if (!first)
      r.bad("model.vocab", "gives id " + std::to_string(i) + " to two tokens, " +
                               json_excerpt(json(*sp->second), 40) + " and " +
                               json_excerpt(json(it.key()), 40));
  }
  if (const json* u = r.opt(m, "unk_token")) {
    if (!u->is_string() || !vocab_.count(u->get<std::string>()))
      r.bad("model.unk_token", "must be null or a token of model.vocab, got " + json_excerpt(*u));
    model_unk_ = vocab_.at(u->get<std::string>());
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab_.find(name);
    if (it != vocab_.end()) byte_ids_[b] = it->second;
  }
  const json& mg = r.req(m, "merges", w);
  if (!mg.is_array()) r.bad("model.merges", "must be an array, got " + json_excerpt(mg));
  merges_.reserve(mg.size());
  for (size_t i = 0; i < mg.size(); ++i) {
    const json& e = mg[i];
    const std::string f = "model.merges[" + std::to_string(i) + "]";
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        r.bad(f, "must be \"left right\" (two tokens and one space), got " + json_excerpt(e));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      r.bad(f, "must be \"left right\" or [\"left\", \"right\"], got " + json_excerpt(e));
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
      r.bad(f, "merges tokens missing from model.vocab: " + json_excerpt(e));
    // A later duplicate replaces an earlier one, as in HF.
    merges_[(uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second)] = {int32_t(i), iab->second};
  }
}

void HfTokenizer::parse_normalizer(const Reader& r, const json& n, const std::string& where) {
  const std::string t = r.type_of(n, where);
  if (t == "Sequence") {
    const json& list = r.req(n, "normalizers", where);
    if (!list.is_array()) r.bad(where + "normalizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      parse_normalizer(r, list[i], where + "normalizers[" + std::to_string(i) + "].");
  } else if (t == "Prepend") {
    norm_.push_back({true, r.rule(n, "prepend", where), ""});
  } else if (t == "Replace") {
    norm_.push_back({false, r.pattern(n, where), r.rule(n, "content", where)});
  } else {
    r.bad(where + "type", "\"" + t + "\" is not supported (normalizers: Sequence, Prepend, Replace)");
  }
}

Prepend read_prepend_scheme(const Reader& r, const json& o, const std::string& where) {
  if (const json* s = r.opt(o, "prepend_scheme")) {
    if (s->is_string()) {
      if (*s == "always") return Prepend::Always;
      if (*s == "first") return Prepend::First;
      if (*s == "never") return Prepend::Never;
    }
    r.bad(where + "prepend_scheme", "must be \"always\", \"first\" or \"never\", got " + json_excerpt(*s));
  }
  return r.flag(o, "add_prefix_space", where, true) ? Prepend::Always : Prepend::Never;
}

void HfTokenizer::parse_pre_tokenizer(const Reader& r, const json& p, const std::string& where) {
  const std::string t = r.type_of(p, where);
  if (t == "Sequence") {
    const json& list = r.req(p, "pretokenizers", where);
    if (!list.is_array() || list.size() > 1)
      r.bad(where + "pretokenizers", "must hold a single ByteLevel or Metaspace pre-tokenizer "
                                     "(Split and other pre-tokenizers are not supported)");
    if (list.size() == 1) parse_pre_tokenizer(r, list[0], where + "pretokenizers[0].");
  } else if (t == "ByteLevel") {
    pre_ = Pre::ByteLevel;
    add_prefix_space_ = r.flag(p, "add_prefix_space", where, true);
    use_regex_ = r.flag(p, "use_regex", where, true);
  } else if (t == "Metaspace") {
    pre_ = Pre::Metaspace;
    meta_rep_ = r.one_char(p, "replacement", where);
    prepend_ = read_prepend_scheme(r, p, where);
    meta_split_ = r.flag(p, "split", where, true);
  } else {
    r.bad(where + "type", "\"" + t + "\" is not supported (pre-tokenizers: ByteLevel, Metaspace)");
  }
}

void HfTokenizer::parse_decoder(const Reader& r, const json& d, const std::string& where) {
  const std::string t = r.type_of(d, where);
  DecStep s{DecStep::Fuse, "", "", 0, 0, false};
  if (t == "Sequence") {
    const json& list = r.req(d, "decoders", where);
    if (!list.is_array()) r.bad(where + "decoders", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      parse_decoder(r, list[i], where + "decoders[" + std::to_string(i) + "].");
    return;
  } else if (t == "Replace") {
    s.kind = DecStep::Replace;
    s.a = r.pattern(d, where);
    s.b = r.rule(d, "content", where);
  } else if (t == "ByteFallback") {
    s.kind = DecStep::ByteFallback;
  } else if (t == "Fuse") {
    s.kind = DecStep::Fuse;
  } else if (t == "Strip") {
    s.kind = DecStep::Strip;
    s.a = r.one_char(d, "content", where);
    for (auto [key, dst] : {std::pair<const char*, int*>{"start", &s.start}, {"stop", &s.stop}}) {
      const json& v = r.req(d, key, where);
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 1024)
        r.bad(where + key, "must be an integer in [0, 1024], got " + json_excerpt(v));
      *dst = int(v.get<int64_t>());
    }
  } else if (t == "ByteLevel") {
    s.kind = DecStep::ByteLevel;
  } else if (t == "Metaspace") {
    s.kind = DecStep::Metaspace;
    s.a = r.one_char(d, "replacement", where);
    s.strip_first = read_prepend_scheme(r, d, where) != Prepend::Never;
  } else {
    r.bad(where + "type", "\"" + t + "\" is not supported (decoders: Sequence, Replace, ByteFallback, "
                          "Fuse, Strip, ByteLevel, Metaspace)");
  }
  dec_.push_back(std::move(s));
}

void HfTokenizer::resolve_specials(const Reader& r, const json& j, const std::string& dir) {
  auto id_of = [&](const std::string& content) -> int32_t {
    for (const auto& t : added_)
      if (t.content == content) return t.id;
    auto it = vocab_.find(content);
    return it == vocab_.end() ? -1 : it->second;
  };
  // From the transformers files: a string, {"content": ...}, or null (= none).
  std::map<std::string, int32_t> named;  // role -> id (-1: explicitly none)
  for (const char* file : {kHfTokenizerConfig, kHfSpecialTokensMap}) {
    const std::string path = (fs::path(dir) / file).string();
    if (!fs::exists(path)) continue;
    const std::string text = read_tokenizer_file(path, kMaxJsonBytes);
    const json c = parse_json_bounded(text, path, JsonLimits{kMaxJsonDepth, kMaxJsonBytes});
    files_[file] = text;
    DLCM_CHECK(c.is_object(), path, ": must be a JSON object, got ", c.type_name());
    if (file == std::string(kHfTokenizerConfig) && c.contains("split_special_tokens")) {
      DLCM_CHECK(c["split_special_tokens"].is_boolean(), path,
                 ": field \"split_special_tokens\" must be true or false, got ",
                 json_excerpt(c["split_special_tokens"]));
      split_special_ = c["split_special_tokens"].get<bool>();
    }
    for (const char* role : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
      if (named.count(role) || !c.contains(role)) continue;
      const json& v = c[role];
      std::string content;
      if (v.is_null()) {
        named[role] = -1;
        continue;
      } else if (v.is_string()) {
        content = v.get<std::string>();
      } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
        content = v["content"].get<std::string>();
      } else {
        fail(path, ": field \"", role, "\" must be a token string, {\"content\": ...} or null, got ",
             json_excerpt(v));
      }
      const int32_t id = id_of(content);
      DLCM_CHECK(id >= 0, path, ": field \"", role, "\" names ", json_excerpt(json(content)),
                 ", which is not a token of ", r.file);
      named[role] = id;
    }
  }
  auto pick = [&](const char* role, std::initializer_list<const char*> names) -> int32_t {
    if (auto it = named.find(role); it != named.end()) return it->second;
    for (const char* n : names)
      if (int32_t id = id_of(n); id >= 0) return id;
    return -1;
  };
  // bos: also the first special token a TemplateProcessing post-processor puts before the text.
  if (!named.count("bos_token")) {
    const json* pp = r.opt(j, "post_processor");
    if (pp && pp->is_object() && pp->value("type", "") == "TemplateProcessing" &&
        pp->contains("single") && (*pp)["single"].is_array() && !(*pp)["single"].empty()) {
      const json& first = (*pp)["single"][0];
      if (first.is_object() && first.contains("SpecialToken") && first["SpecialToken"].is_object() &&
          first["SpecialToken"].contains("id") && first["SpecialToken"]["id"].is_string()) {
        const int32_t id = id_of(first["SpecialToken"]["id"].get<std::string>());
        if (id >= 0) named["bos_token"] = id;
      }
    }
  }
  special_.eos = pick("eos_token", {"</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"});
  DLCM_CHECK(special_.eos >= 0, r.file,
             ": no end-of-sequence token: none of \"</s>\", \"<|endoftext|>\", \"<|end_of_text|>\", "
             "\"<eos>\" is in the vocabulary and there is no tokenizer_config.json naming eos_token; "
             "add a tokenizer_config.json with \"eos_token\" next to it");
  special_.bos = pick("bos_token", {"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"});
  if (special_.bos < 0) special_.bos = special_.eos;  // GPT-2: <|endoftext|> separates documents
  special_.unk = named.count("unk_token") ? named["unk_token"] : model_unk_;
  if (special_.unk < 0 && !named.count("unk_token")) special_.unk = id_of("<unk>");
  special_.pad = pick("pad_token", {"<pad>"});
  if (special_.pad < 0) special_.pad = special_.eos;
  special_mask_.assign(tokens_.size(), 0);
  for (const auto& t : added_)
    if (t.special) special_mask_[size_t(t.id)] = 1;
  for (int32_t id : {special_.pad, special_.bos, special_.eos, special_.unk})
    if (id >= 0) special_mask_[size_t(id)] = 1;
}

json HfTokenizer::config_json() const {
  auto tok = [&](int32_t id) { return id < 0 ? json() : json(tokens_[size_t(id)]); };
  return json{{"tokenizer_class", "PreTrainedTokenizerFast"},
              {"bos_token", tok(special_.bos)},
              {"eos_token", tok(special_.eos)},
              {"unk_token", tok(special_.unk)},
              {"pad_token", tok(special_.pad)},
              {"clean_up_tokenization_spaces", false}};
}

template <class Seg, class Tok>
void HfTokenizer::split_added(std::string_view s, const AddedIndex& ix, Seg seg, Tok tok) const {
  size_t done = 0;  // text before this has been handed out
  size_t i = 0;
  auto ws_before = [&](size_t p) {  // start of the whitespace run ending at p (>= done)
    while (p > done) {
      size_t q = p - 1;
      while (q > done && (uint8_t(s[q]) & 0xC0) == 0x80) --q;
      if (!is_ws(u8decode(s.data() + q, u8len(uint8_t(s[q]))))) break;
      p = q;
    }
    return p;
  };
  while (!ix.empty && i < s.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken* t : ix.by_byte[uint8_t(s[i])])
      if (s.compare(i, t->match.size(), t->match) == 0) {
        hit = t;
        break;
      }
    if (!hit) {
      i += u8len(uint8_t(s[i]));
      continue;
    }
    size_t b = hit->lstrip ? ws_before(i) : i, e = i + hit->match.size();
    if (hit->rstrip)
      while (e < s.size() && is_ws(u8decode(s.data() + e, u8len(uint8_t(s[e]))))) e += u8len(uint8_t(s[e]));
    if (b > done) seg(done, b);
    tok(hit->id);
    done = i = e;
  }
  if (done < s.size()) seg(done, s.size());
}

std::vector<int32_t> HfTokenizer::encode(std::string_view text) const {
  std::string repaired;
  if (!is_valid_utf8(text)) {
    repaired.assign(text);
    repair_utf8(repaired);
    text = repaired;
  }
  std::vector<int32_t> out;
  split_added(
      text, raw_added_,
      [&](size_t b, size_t e) {
        const std::string n = normalize(text.substr(b, e - b));
        const std::string_view nv(n);
        split_added(
            nv, norm_added_,
            [&](size_t b2, size_t e2) { encode_segment(nv.substr(b2, e2 - b2), b == 0 && b2 == 0, out); },
            [&](int32_t id) { out.push_back(id); });
      },
      [&](int32_t id) { out.push_back(id); });
  return out;
}

void HfTokenizer::encode_segment(std::string_view seg, bool at_start, std::vector<int32_t>& out) const {
  if (pre_ == Pre::ByteLevel) {
    std::string pre;
    if (add_prefix_space_ && seg.substr(0, 1) != " ") {
      pre = " ";
      pre.append(seg);
      seg = pre;
    }
    std::vector<std::string_view> words;
    if (use_regex_) gpt2_split(seg, words);
    else words.push_back(seg);
    const ByteAlphabet& a = byte_alphabet();
    std::string w;
    for (std::string_view word : words) {
      w.clear();
      for (char c : word) w += a.of_byte[uint8_t(c)];
      encode_word(w, out);
    }
  } else if (pre_ == Pre::Metaspace) {
    std::string s(seg);
    replace_all(s, " ", meta_rep_);
    const bool prepend = prepend_ == Prepend::Always || (prepend_ == Prepend::First && at_start);
    if (prepend && s.compare(0, meta_rep_.size(), meta_rep_) != 0) s.insert(0, meta_rep_);
    if (!meta_split_) {
      encode_word(s, out);
      return;
    }
    // Split before each replacement character (it starts the next word).
    size_t b = 0;
    for (size_t p = s.find(meta_rep_, 1); p != std::string::npos; p = s.find(meta_rep_, p + 1)) {
      encode_word(std::string_view(s).substr(b, p - b), out);
      b = p;
    }
    encode_word(std::string_view(s).substr(b), out);
  } else {
    encode_word(seg, out);
  }
}

void HfTokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  constexpr size_t kCacheWord = 64, kCacheEntries = size_t(1) << 17;
  if (word.size() > kCacheWord) return bpe(word, out);
  const std::string key(word);
  {
    std::shared_lock lock(cache_mu_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  bpe(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  std::unique_lock lock(cache_mu_);
  if (cache_.size() < kCacheEntries) cache_.emplace(key, std::move(ids));
}

// BPE on one word: characters (or byte fallback / unk) first, then the lowest-ranked adjacent
// pair is merged until none is left (ties: leftmost), as HF's BPE model does.
void HfTokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> id;
  id.reserve(word.size());
  // HF holds an unknown character's <unk> back until the next character found in the vocab or
  // the word's end; byte-fallback tokens do not release it, so "êé" with <0xAA> missing is
  // <0xC3> <0xA9> <unk> (tokenizers 0.20, measured). With fuse_unk the held <unk> absorbs the
  // next unknown character, else that one releases it.
  bool held_unk = false;
  for (size_t i = 0; i < word.size();) {
    const int n = std::min<int>(u8len(uint8_t(word[i])), int(word.size() - i));
    auto it = vocab_.find(std::string(word.substr(i, n)));
    if (it != vocab_.end()) {
      if (held_unk) id.push_back(model_unk_);
      held_unk = false;
      id.push_back(it->second);
    } else {
      bool bytes = byte_fallback_;  // every byte of the character has its <0xXX> token
      for (int k = 0; bytes && k < n; ++k) bytes = byte_ids_[uint8_t(word[i + k])] >= 0;
      if (bytes) {
        for (int k = 0; k < n; ++k) id.push_back(byte_ids_[uint8_t(word[i + k])]);
      } else if (model_unk_ >= 0) {
        if (held_unk && !fuse_unk_) id.push_back(model_unk_);
        held_unk = true;
      }  // no unk token: the character is dropped, as in HF
    }
    i += n;
  }
  if (held_unk) id.push_back(model_unk_);
  const int n = int(id.size());
  if (n > 1 && !merges_.empty()) {
    std::vector<int> next(n), prev(n);
    std::vector<uint8_t> alive(n, 1);
    for (int k = 0; k < n; ++k) next[k] = k + 1 < n ? k + 1 : -1, prev[k] = k - 1;
    struct Cand {
      int32_t rank, pos, id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
    auto find = [&](int a, int b) -> const Merge* {
      auto it = merges_.find((uint64_t(uint32_t(id[a])) << 32) | uint32_t(id[b]));
      return it == merges_.end() ? nullptr : &it->second;
    };
    auto push = [&](int a) {
      if (a < 0 || next[a] < 0) return;
      if (const Merge* m = find(a, next[a])) q.push({m->rank, a, m->id});
    };
    for (int k = 0; k + 1 < n; ++k) push(k);
    while (!q.empty()) {
      const Cand c = q.top();
      q.pop();
      const int a = c.pos;
      if (!alive[a] || next[a] < 0) continue;
      const Merge* m = find(a, next[a]);
      if (!m || m->id != c.id || m->rank != c.rank) continue;  // stale entry
      const int b = next[a];
      id[a] = c.id;
      alive[b] = 0;
      next[a] = next[b];
      if (next[b] >= 0) prev[next[b]] = a;
      push(prev[a]);
      push(a);
    }
    for (int k = 0; k >= 0; k = next[k]) out.push_back(id[k]);
    return;
  }
  out.insert(out.end(), id.begin(), id.end());
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int32_t id : ids) {
    check_id(id);
    if (!is_special(id) && !tokens_[size_t(id)].empty()) toks.push_back(tokens_[size_t(id)]);
  }
  for (const DecStep& s : dec_) {
    switch (s.kind) {
      case DecStep::Replace:
        for (auto& t : toks) replace_all(t, s.a, s.b);
        break;
      case DecStep::Metaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          replace_all(toks[i], s.a, " ");
          if (i == 0 && s.strip_first && !toks[i].empty() && toks[i][0] == ' ') toks[i].erase(0, 1);
        }
        break;
      case DecStep::ByteFallback: {
        // Runs of <0xXX> tokens become their bytes when those are valid UTF-8, else one U+FFFD
        // per token (HF's rule).
        std::vector<std::string> o;
        std::string bytes;
        size_t nbytes = 0;
        auto flush = [&] {
          if (nbytes == 0) return;
          if (is_valid_utf8(bytes)) o.push_back(bytes);
          else
            for (size_t k = 0; k < nbytes; ++k) o.push_back("\xEF\xBF\xBD");
          bytes.clear();
          nbytes = 0;
        };
        for (auto& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(uint8_t(t[3])) && std::isxdigit(uint8_t(t[4]))) {
            bytes.push_back(char(std::stoi(t.substr(3, 2), nullptr, 16)));
            ++nbytes;
          } else {
            flush();
            o.push_back(std::move(t));
          }
        }
        flush();
        toks.swap(o);
        break;
      }
      case DecStep::Fuse: {
        std::string all;
        for (auto& t : toks) all += t;
        toks.assign(1, all);
        break;
      }
      case DecStep::Strip:
        for (auto& t : toks) {
          for (int k = 0; k < s.start && t.compare(0, s.a.size(), s.a) == 0; ++k) t.erase(0, s.a.size());
          for (int k = 0; k < s.stop && t.size() >= s.a.size() &&
                          t.compare(t.size() - s.a.size(), s.a.size(), s.a) == 0;
               ++k)
            t.resize(t.size() - s.a.size());
        }
        break;
      case DecStep::ByteLevel:
        for (auto& t : toks) t = byte_level_to_bytes(t);
        break;
    }
  }
  std::string out;
  for (const auto& t : toks) out += t;
  return out;
}

json added_token_json(int32_t id, const std::string& content, bool special) {
  return json{{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
              {"rstrip", false},  {"normalized", false}, {"special", special}};
}

json bos_template(const std::string& bos, int32_t bos_id) {
  auto sp = json{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}};
  return json{{"type", "TemplateProcessing"},
              {"single", json::array({sp, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
              {"pair", json::array({sp,
                                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                    sp,
                                    {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
              {"special_tokens", {{bos, {{"id", bos}, {"ids", {bos_id}}, {"tokens", {bos}}}}}}};
}

json bpe_model_json(json vocab, json merges, const json& unk, bool byte_fallback) {
  return json{{"type", "BPE"},
              {"dropout", nullptr},
              {"unk_token", unk},
              {"continuing_subword_prefix", nullptr},
              {"end_of_word_suffix", nullptr},
              {"fuse_unk", byte_fallback},
              {"byte_fallback", byte_fallback},
              {"ignore_merges", false},
              {"vocab", std::move(vocab)},
              {"merges", std::move(merges)}};
}

json tokenizer_json(json added, json normalizer, json pre, json post, json decoder, json model) {
  return json{{"version", "1.0"},           {"truncation", nullptr},
              {"padding", nullptr},          {"added_tokens", std::move(added)},
              {"normalizer", std::move(normalizer)}, {"pre_tokenizer", std::move(pre)},
              {"post_processor", std::move(post)},   {"decoder", std::move(decoder)},
              {"model", std::move(model)}};
}

// ByteLevel as pre-tokenizer, post-processor (offsets only) and decoder alike.
json byte_level_json(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

// tokenizer_config.json and special_tokens_map.json for the given special tokens.
void write_transformers_configs(const std::string& dir, const std::string& cls,
                                const std::map<std::string, json>& specials, bool add_bos,
                                int64_t model_max_length, bool split_special) {
  json cfg = {{"tokenizer_class", cls},
              {"add_bos_token", add_bos},
              {"add_eos_token", false},
              {"clean_up_tokenization_spaces", false}};
  // dlcm's own tokenizers read "<s>" in a text as the characters, not as the special token.
  if (!split_special) cfg["split_special_tokens"] = true;
  json map = json::object();
  for (const auto& [role, tok] : specials) {
    cfg[role] = tok;
    if (!tok.is_null()) map[role] = tok;
  }
  if (model_max_length > 0) cfg["model_max_length"] = model_max_length;
  write_tokenizer_file((fs::path(dir) / kHfTokenizerConfig).string(), dump(cfg));
  write_tokenizer_file((fs::path(dir) / kHfSpecialTokensMap).string(), dump(map));
}

void write_bpe(const Tokenizer& tok, const std::string& dir, const HfWriteOptions& opt) {
  const std::string model = tok.sentencepiece_model();
  const std::vector<SpPiece> pieces = read_sentencepiece_pieces(model);
  DLCM_CHECK(int32_t(pieces.size()) == tok.vocab_size(), "bpe tokenizer: the SentencePiece model has ",
             pieces.size(), " pieces but the tokenizer ", tok.vocab_size());
  json vocab = json::object(), added = json::array();
  std::unordered_map<std::string, int32_t> normal;  // pieces BPE may produce
  for (int32_t i = 0; i < int32_t(pieces.size()); ++i) {
    const SpPiece& p = pieces[size_t(i)];
    vocab[p.piece] = i;
    if (p.type == 1) normal.emplace(p.piece, i);
    // Controls, unknown and user-defined pieces are matched whole before BPE, as
    // SentencePiece does ("\n" is ours).
    if (p.type == 2 || p.type == 3 || p.type == 4) added.push_back(added_token_json(i, p.piece, p.type != 4));
  }
  // Merges: every split of a piece into two pieces, the highest-scoring result first (the
  // order in which SentencePiece's encoder would apply them); equal scores by piece id, then
  // by the length of the left part.
  struct M {
    float score;
    int32_t id;
    size_t left;
  };
  std::vector<M> ms;
  bool space_in_piece = false;
  for (const auto& [piece, id] : normal) {
    space_in_piece |= piece.find(' ') != std::string::npos;
    for (size_t k = u8len(uint8_t(piece[0])); k < piece.size(); k += u8len(uint8_t(piece[k])))
      if (normal.count(piece.substr(0, k)) && normal.count(piece.substr(k)))
        ms.push_back({pieces[size_t(id)].score, id, k});
  }
  std::sort(ms.begin(), ms.end(), [](const M& a, const M& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.id != b.id) return a.id < b.id;
    return a.left < b.left;
  });
  json merges = json::array();
  for (const M& m : ms) {
    const std::string& p = pieces[size_t(m.id)].piece;
    if (space_in_piece) merges.push_back({p.substr(0, m.left), p.substr(m.left)});
    else merges.push_back(p.substr(0, m.left) + " " + p.substr(m.left));
  }
  const std::string& bos = pieces[size_t(tok.bos_id())].piece;
  const json normalizer = {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpMeta}};
  const json decoder = {{"type", "Sequence"},
                        {"decoders",
                         {{{"type", "Replace"}, {"pattern", {{"String", kSpMeta}}}, {"content", " "}},
                          {{"type", "ByteFallback"}},
                          {{"type", "Fuse"}}}}};
  const json unk = tok.unk_id() >= 0 ? json(pieces[size_t(tok.unk_id())].piece) : json();
  const json tj = tokenizer_json(added, normalizer, nullptr,
                                 opt.add_bos ? bos_template(bos, tok.bos_id()) : json(), decoder,
                                 bpe_model_json(std::move(vocab), std::move(merges), unk, true));
  write_tokenizer_file((fs::path(dir) / kHfTokenizerJson).string(), dump(tj));
  write_tokenizer_file((fs::path(dir) / kTokenizerModel).string(), model);
  write_transformers_configs(dir, "PreTrainedTokenizerFast",
                             {{"bos_token", bos},
                              {"eos_token", pieces[size_t(tok.eos_id())].piece},
                              {"unk_token", unk},
                              {"pad_token", pieces[size_t(tok.pad_id())].piece}},
                             opt.add_bos, opt.model_max_length, false);
}

void write_bytes(const Tokenizer& tok, const std::string& dir, const HfWriteOptions& opt) {
  const ByteAlphabet& a = byte_alphabet();
  const char* names[4] = {"<pad>", "<s>", "</s>", "<unk>"};
  json vocab = json::object(), added = json::array();
  for (int32_t i = 0; i < 4; ++i) {
    vocab[names[i]] = i;
    added.push_back(added_token_json(i, names[i], true));
  }
  for (int b = 0; b < 256; ++b) vocab[a.of_byte[b]] = 4 + b;
  DLCM_CHECK(tok.vocab_size() == 260 && tok.bos_id() == 1 && tok.eos_id() == 2 && tok.pad_id() == 0,
             "bytes tokenizer: unexpected vocabulary layout");
  const json tj = tokenizer_json(added, nullptr, byte_level_json(false),
                                 opt.add_bos ? bos_template("<s>", 1) : json(),
                                 byte_level_json(false),
                                 bpe_model_json(std::move(vocab), json::array(), nullptr, false));
  write_tokenizer_file((fs::path(dir) / kHfTokenizerJson).string(), dump(tj));
  write_transformers_configs(dir, "PreTrainedTokenizerFast",
                             {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"},
                              {"pad_token", "<pad>"}},
                             opt.add_bos, opt.model_max_length, false);
}

}  // namespace

// ------------------------------------------------------------- SentencePiece model file
// The few fields of the ModelProto needed here: pieces (field 1) with piece (1), score (2) and
// type (3), read from the protobuf wire format.
std::vector<SpPiece> read_sentencepiece_pieces(std::string_view m) {
  auto varint = [](std::string_view s, size_t& i) -> uint64_t {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      DLCM_CHECK(i < s.size(), "SentencePiece model: truncated varint");
      const uint8_t c = uint8_t(s[i++]);
      v |= uint64_t(c & 0x7F) << shift;
      if (!(c & 0x80)) return v;
    }
    fail("SentencePiece model: malformed varint");
  };
  // Calls f(field, wire type, value, bytes) for each field of a message.
  auto fields = [&](std::string_view s, auto&& f) {
    for (size_t i = 0; i < s.size();) {
      const uint64_t key = varint(s, i);
      const int field = int(key >> 3), wt = int(key & 7);
      uint64_t v = 0;
      std::string_view bytes;
      if (wt == 0) {
        v = varint(s, i);
      } else if (wt == 1 || wt == 5) {
        const size_t n = wt == 1 ? 8 : 4;
        DLCM_CHECK(i + n <= s.size(), "SentencePiece model: truncated field");
        bytes = s.substr(i, n);
        i += n;
      } else if (wt == 2) {
        const uint64_t n = varint(s, i);
        DLCM_CHECK(n <= s.size() - i, "SentencePiece model: truncated field");
        bytes = s.substr(i, size_t(n));
        i += size_t(n);
      } else {
        fail("SentencePiece model: unsupported wire type ", wt);
      }
      f(field, wt, v, bytes);
    }
  };
  std::vector<SpPiece> out;
  fields(m, [&](int field, int wt, uint64_t, std::string_view bytes) {
    if (field != 1 || wt != 2) return;
    SpPiece p;
    fields(bytes, [&](int f2, int wt2, uint64_t v2, std::string_view b2) {
      if (f2 == 1 && wt2 == 2) p.piece = std::string(b2);
      else if (f2 == 2 && wt2 == 5) std::memcpy(&p.score, b2.data(), 4);
      else if (f2 == 3 && wt2 == 0) p.type = int(v2);
    });
    out.push_back(std::move(p));
  });
  return out;
}

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& dir) {
  return std::make_unique<HfTokenizer>(dir);
}

void write_hf_tokenizer_files(const Tokenizer& tok, const std::string& dir, const HfWriteOptions& opt) {
  std::error_code ec;
  DLCM_CHECK(fs::is_directory(dir, ec), dir, ": not a directory (create it before writing the tokenizer)");
  const std::string kind = tok.kind();
  if (kind == "bpe") {
    write_bpe(tok, dir, opt);
  } else if (kind == "bytes") {
    write_bytes(tok, dir, opt);
  } else if (kind == "hf") {
    const auto& h = static_cast<const HfTokenizer&>(tok);
    h.save(dir);
    if (!h.has_file(kHfTokenizerConfig)) {
      json cfg = h.config_json();
      if (opt.model_max_length > 0) cfg["model_max_length"] = opt.model_max_length;
      write_tokenizer_file((fs::path(dir) / kHfTokenizerConfig).string(), dump(cfg));
    }
  } else {
    fail("write_hf_tokenizer_files: unknown tokenizer kind \"", kind, "\"");
  }
}

void convert_gpt2_tokenizer(const std::string& encoder_json, const std::string& vocab_bpe,
                            const std::string& out_dir) {
  const json enc = read_json_file_bounded(encoder_json, JsonLimits{4, kMaxJsonBytes});
  DLCM_CHECK(enc.is_object() && !enc.empty(), encoder_json,
             ": must be a JSON object {token: id} (GPT-2's encoder.json)");
  for (auto it = enc.begin(); it != enc.end(); ++it)
    DLCM_CHECK(it.value().is_number_integer() && it.value().get<int64_t>() >= 0 &&
                   it.value().get<int64_t>() <= kMaxId,
               encoder_json, ": token ", json_excerpt(json(it.key()), 40), " has id ",
               json_excerpt(it.value()), ", expected an integer in [0, ", kMaxId, "]");
  const std::string text = read_tokenizer_file(vocab_bpe, kMaxJsonBytes);
  json merges = json::array();
  size_t line_no = 0;
  for (size_t i = 0; i < text.size();) {
    size_t e = text.find('\n', i);
    if (e == std::string::npos) e = text.size();
    std::string line = text.substr(i, e - i);
    i = e + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t sp = line.find(' ');
    DLCM_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < line.size() &&
                   line.find(' ', sp + 1) == std::string::npos,
               vocab_bpe, ":", line_no, ": expected a merge \"left right\", got ",
               json_excerpt(json(line.substr(0, 60))));
    const std::string a = line.substr(0, sp), b = line.substr(sp + 1);
    DLCM_CHECK(enc.contains(a) && enc.contains(b) && enc.contains(a + b), vocab_bpe, ":", line_no,
               ": merge ", json_excerpt(json(line.substr(0, 60))), " uses tokens missing from ",
               encoder_json);
    merges.push_back(line);
  }
  json added = json::array();
  const std::string eot = "<|endoftext|>";
  json eot_tok;
  if (enc.contains(eot)) {
    added.push_back(added_token_json(enc[eot].get<int32_t>(), eot, true));
    eot_tok = eot;
  }
  const json tj = tokenizer_json(added, nullptr, byte_level_json(true),
                                 byte_level_json(true), byte_level_json(true),
                                 bpe_model_json(enc, std::move(merges), nullptr, false));
  std::error_code ec;
  DLCM_CHECK(fs::is_directory(out_dir, ec), out_dir, ": not a directory");
  write_tokenizer_file((fs::path(out_dir) / kHfTokenizerJson).string(), dump(tj));
  write_transformers_configs(out_dir, "GPT2TokenizerFast",
                             {{"bos_token", eot_tok}, {"eos_token", eot_tok}, {"unk_token", eot_tok}},
                             false, 1024, true);
}

}  // namespace dlcm
