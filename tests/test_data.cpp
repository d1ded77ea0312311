// Data layer: tokenizers, token shards, loaders, prepare().
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "data/hf_tokenizer.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "data/train_data.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;
namespace fs = std::filesystem;

namespace {

// Deterministic English-like text with varied words, digits, whitespace and some Unicode.
std::string gen_text(uint64_t seed, int sentences) {
  static const char* words[] = {"the",    "model",  "concept", "token",  "learns", "a",
                                "river",  "stone",  "quickly", "under",  "bright", "of",
                                "dynamic", "large", "boundary", "and",   "café",   "naïve",
                                "world",  "number", "is",      "over",   "Zürich", "data"};
  Rng r(seed);
  std::string s;
  for (int i = 0; i < sentences; ++i) {
    int n = 4 + int(r.next() % 9);
    for (int k = 0; k < n; ++k) {
      std::string w = words[r.next() % (sizeof words / sizeof *words)];
      if (k == 0) w[0] = char(std::toupper(w[0]));
      s += w;
      s += (r.next() % 11 == 0) ? "  " : " ";
    }
    s += std::to_string(r.next() % 1000);
    s += (r.next() % 5 == 0) ? ".\n" : ". ";
  }
  return s;
}

void write(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary);
  f << s;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

std::unique_ptr<Tokenizer> tiny_bpe(int vocab = 400, int threads = 2) {
  std::vector<std::string> docs;
  for (int i = 0; i < 200; ++i) docs.push_back(gen_text(100 + i, 12));
  BpeOptions o;
  o.vocab_size = vocab;
  o.num_threads = threads;
  return train_bpe(docs, o);
}

// A shard of n tokens with ids 4 + (i % (V-4)), one document every 37 tokens.
std::string make_shard(const std::string& dir, int64_t n, int64_t V = 1000) {
  std::string path = dir + "/s.bin";
  ShardWriter w(path, V);
  std::vector<int32_t> doc;
  for (int64_t i = 0; i < n; ++i) {
    if (i % 37 == 0 && !doc.empty()) {
      w.add_document(doc);
      doc.clear();
    }
    doc.push_back(i % 37 == 0 ? 1 : int32_t(4 + i % (V - 4)));
  }
  if (!doc.empty()) w.add_document(doc);
  w.finish();
  return path;
}

}  // namespace

// ------------------------------------------------------------------------------- tokenizers
TEST(Tokenizer, BytesRoundTripAnyBytes) {
  auto t = make_byte_tokenizer();
  EXPECT_EQ(t->kind(), "bytes");
  EXPECT_EQ(t->vocab_size(), 260);
  Rng r(5);
  for (int rep = 0; rep < 50; ++rep) {
    std::string s(r.next() % 300, '\0');
    for (auto& c : s) c = char(r.next() & 0xFF);
    auto ids = t->encode(s);
    ASSERT_EQ(ids.size(), s.size());
    for (int32_t id : ids) ASSERT_FALSE(t->is_special(id));
    EXPECT_EQ(t->decode(ids), s);
    std::string cat;
    for (int32_t id : ids) cat += t->decode_piece(id);
    EXPECT_EQ(cat, s);
  }
  // Specials are skipped by decode; out-of-range ids are a clear error.
  EXPECT_EQ(t->decode({t->bos_id(), 4 + 'h', 4 + 'i', t->eos_id()}), "hi");
  EXPECT_NE(error_of([&] { t->decode({260}); }).find("outside the vocabulary"), std::string::npos);
  test::TempDir d;
  t->save(d.path);
  auto u = load_tokenizer(d.path);
  EXPECT_EQ(u->kind(), "bytes");
  EXPECT_EQ(u->encode("abc"), t->encode("abc"));
  EXPECT_EQ(tokenizer_files(d.path).size(), 1u);
}

TEST(Tokenizer, BpeRoundTripSaveLoad) {
  auto t = tiny_bpe();
  EXPECT_EQ(t->kind(), "bpe");
  EXPECT_EQ(t->vocab_size(), 400);
  EXPECT_EQ(t->pad_id(), 0);
  EXPECT_EQ(t->bos_id(), 1);
  EXPECT_EQ(t->eos_id(), 2);
  EXPECT_EQ(t->unk_id(), 3);
  const std::vector<std::string> cases = {
      gen_text(1, 30),
      gen_text(3, 2000),  // long: encoded in chunks
      std::string(3000, ' ') + "x" + std::string(2500, '\n') + std::string(5000, 'y'),
      "",
      " leading and trailing  ",
      "tabs\tand\nnew\n\nlines\n",
      "   indented code:\n    if x:\n        return 42\n",
      "Unicode: 日本語, emoji 😀, Ελληνικά, ß, €100",
      "digits 1234567890 and 3.14159",
      "CRLF\r\nline",
  };
  test::TempDir d;
  t->save(d.path);
  auto u = load_tokenizer(d.path);
  EXPECT_EQ(tokenizer_files(d.path).size(), 2u);
  for (const auto& s : cases) {
    auto ids = t->encode(s);
    EXPECT_EQ(t->decode(ids), s) << s;
    std::string cat;
    for (int32_t id : ids) cat += t->decode_piece(id);
    EXPECT_EQ(cat, s) << s;
    EXPECT_EQ(u->encode(s), ids) << s;
    int64_t nb = 0;
    auto pb = t->piece_byte_lengths();
    for (int32_t id : ids) nb += pb[id];
    EXPECT_EQ(nb, int64_t(s.size()));
  }
  // The BPE merges do compress the training-like text.
  std::string s = gen_text(7, 50);
  EXPECT_LT(t->encode(s).size() * 2, s.size());
  // Invalid UTF-8 does not crash: malformed bytes come back as U+FFFD (documented).
  std::string bad = "ok \xFF\xC3 end";
  EXPECT_EQ(t->decode(t->encode(bad)), "ok \xEF\xBF\xBD\xEF\xBF\xBD end");
  // Newline is a single token.
  EXPECT_EQ(t->encode("\n").size(), 1u);
}

TEST(Tokenizer, BpeTrainingIsDeterministic) {
  auto a = tiny_bpe(350, 2), b = tiny_bpe(350, 2), c = tiny_bpe(350, 1);
  test::TempDir da, db;
  a->save(da.path);
  b->save(db.path);
  EXPECT_EQ(test::read_text(da.path + "/tokenizer.model"), test::read_text(db.path + "/tokenizer.model"));
  // Independent of the thread count too (the model file differs only in the recorded
  // trainer options, so compare the vocabulary and an encoding).
  ASSERT_EQ(a->vocab_size(), c->vocab_size());
  for (int32_t i = 0; i < a->vocab_size(); ++i) EXPECT_EQ(a->decode_piece(i), c->decode_piece(i));
  EXPECT_EQ(a->encode(gen_text(9, 40)), c->encode(gen_text(9, 40)));
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  test::TempDir d;
  EXPECT_NE(error_of([&] { load_tokenizer(d.path); }).find("tokenizer.json"), std::string::npos);
  write(d.path + "/tokenizer.json", R"({"kind": "wordpiece"})");
  EXPECT_NE(error_of([&] { load_tokenizer(d.path); }).find("\"kind\""), std::string::npos);
  write(d.path + "/tokenizer.json", R"({"kind": "bpe"})");
  EXPECT_NE(error_of([&] { load_tokenizer(d.path); }).find("tokenizer.model"), std::string::npos);
  write(d.path + "/tokenizer.model", "garbage");
  EXPECT_NE(error_of([&] { load_tokenizer(d.path); }).find("not a valid SentencePiece"),
            std::string::npos);
}

// --------------------------------------------------------------- HF tokenizer.json (interop)
namespace {

// Every observable of two tokenizers agrees on the texts.
void expect_same_tokenizer(const Tokenizer& a, const Tokenizer& b, const std::vector<std::string>& texts) {
  ASSERT_EQ(a.vocab_size(), b.vocab_size());
  EXPECT_EQ(a.bos_id(), b.bos_id());
  EXPECT_EQ(a.eos_id(), b.eos_id());
  EXPECT_EQ(a.pad_id(), b.pad_id());
  EXPECT_EQ(a.unk_id(), b.unk_id());
  for (int32_t i = 0; i < a.vocab_size(); ++i) {
    ASSERT_EQ(a.is_special(i), b.is_special(i)) << i;
    ASSERT_EQ(a.decode_piece(i), b.decode_piece(i)) << i;
  }
  EXPECT_EQ(a.word_starts(), b.word_starts());
  EXPECT_EQ(a.piece_byte_lengths(), b.piece_byte_lengths());
  for (const auto& s : texts) {
    const auto ids = a.encode(s);
    EXPECT_EQ(b.encode(s), ids) << s;
    EXPECT_EQ(b.decode(ids), a.decode(ids)) << s;
  }
}

const std::vector<std::string>& interop_texts() {
  static const std::vector<std::string> t = {
      gen_text(1, 30), gen_text(3, 400), "", " leading and trailing  ", "tabs\tand\nnew\n\nlines\n",
      "Unicode: 日本語, emoji 😀👍🏽, Ελληνικά, ß, €100", "digits 1234567890", "▁marker", "<s> is text, </s><pad><unk> too", "bad \xFF\xC3 utf8",
      std::string(3000, ' ') + "x" + std::string(300, '\n')};
  return t;
}

// A small byte-level tokenizer.json written by hand: bytes-to-unicode letters a, b, c and the
// space (U+0120 "Ġ"), two merges, specials at ids that are not 0..3.
std::string tiny_byte_level_json(const std::string& extra_model = "", const std::string& pre = "") {
  return R"({"version": "1.0", "added_tokens": [
      {"id": 7, "content": "<|endoftext|>", "special": true, "normalized": false},
      {"id": 8, "content": "<|pad|>", "special": true, "normalized": false}],
    "normalizer": null,
    "pre_tokenizer": )" + (pre.empty() ? R"({"type": "ByteLevel", "add_prefix_space": false})" : pre) + R"(,
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "Ġab": 5, "abc": 6},
              "merges": ["a b", ["Ġ", "ab"]])" + extra_model + R"(}})";
}

}  // namespace

TEST(HfTokenizer, OurBpeExportReadsBackIdentically) {
  auto t = tiny_bpe();
  test::TempDir d;
  write_hf_tokenizer_files(*t, d.path);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"})
    EXPECT_TRUE(fs::exists(d.path + "/" + f)) << f;
  EXPECT_FALSE(fs::exists(d.path + "/dlcm_tokenizer.json"));
  auto h = load_tokenizer(d.path);
  EXPECT_EQ(h->kind(), "hf");
  expect_same_tokenizer(*t, *h, interop_texts());
  // The SentencePiece pieces behind the export: types as SentencePiece has them.
  const std::string model = t->sentencepiece_model();
  const auto pieces = read_sentencepiece_pieces(model);
  ASSERT_EQ(int32_t(pieces.size()), t->vocab_size());
  EXPECT_EQ(pieces[0].type, 3);  // <pad>, control
  EXPECT_EQ(pieces[1].piece, "<s>");
  EXPECT_EQ(pieces[3].type, 2);  // <unk>
  int user = 0, bytes = 0;
  for (const auto& p : pieces) user += p.type == 4, bytes += p.type == 6;
  EXPECT_EQ(user, 1);  // "\n"
  EXPECT_EQ(bytes, 256);
  EXPECT_NE(error_of([&] { read_sentencepiece_pieces(model.substr(0, 7)); }).find("truncated"),
            std::string::npos);
  // The HF files go with a checkpoint; written again they are the same bytes.
  EXPECT_EQ(tokenizer_files(d.path).size(), 4u);
  test::TempDir e;
  write_hf_tokenizer_files(*h, e.path);
  EXPECT_EQ(test::read_text(e.path + "/tokenizer.json"), test::read_text(d.path + "/tokenizer.json"));
}

TEST(HfTokenizer, BytesExportReadsBackIdentically) {
  auto t = make_byte_tokenizer();
  test::TempDir d;
  write_hf_tokenizer_files(*t, d.path);
  auto h = load_tokenizer(d.path);
  EXPECT_EQ(h->kind(), "hf");
  std::vector<std::string> texts = interop_texts();
  // Valid UTF-8 only: hf repairs malformed bytes, bytes keeps them.
  std::erase_if(texts, [](const std::string& s) { return !is_valid_utf8(s); });
  expect_same_tokenizer(*t, *h, texts);
}

TEST(HfTokenizer, SpecialIdsComeFromTheFiles) {
  test::TempDir d;
  write(d.path + "/tokenizer.json", tiny_byte_level_json());
  auto t = load_tokenizer(d.path);
  // No tokenizer_config.json: eos by its well-known name, bos = eos, pad = eos, no unk.
  EXPECT_EQ(t->vocab_size(), 9);
  EXPECT_EQ(t->eos_id(), 7);
  EXPECT_EQ(t->bos_id(), 7);
  EXPECT_EQ(t->pad_id(), 7);
  EXPECT_EQ(t->unk_id(), -1);
  EXPECT_TRUE(t->is_special(7));
  EXPECT_TRUE(t->is_special(8));
  EXPECT_FALSE(t->is_special(0));
  EXPECT_FALSE(t->is_special(3));  // 0..3 are ordinary tokens here
  EXPECT_EQ(t->encode("ab abc"), (std::vector<int32_t>{4, 5, 2}));
  EXPECT_EQ(t->encode("c<|endoftext|> ab<|pad|>"), (std::vector<int32_t>{2, 7, 5, 8}));
  EXPECT_EQ(t->decode({7, 4, 5, 2, 8}), "ab abc");
  EXPECT_EQ(t->decode_piece(5), " ab");
  EXPECT_EQ(t->decode_piece(7), "");
  EXPECT_EQ(t->word_starts()[5], 1);
  EXPECT_EQ(t->word_starts()[4], 0);
  // The config names them (strings or {"content": ...}).
  write(d.path + "/tokenizer_config.json",
        R"({"bos_token": {"content": "<|pad|>"}, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})");
  t = load_tokenizer(d.path);
  EXPECT_EQ(t->bos_id(), 8);
  EXPECT_EQ(t->pad_id(), 8);
  EXPECT_EQ(t->eos_id(), 7);
  const auto files = tokenizer_files(d.path);
  EXPECT_EQ(files.size(), 2u);
  write(d.path + "/tokenizer_config.json", R"({"eos_token": "</s>"})");
  const std::string e = error_of([&] { load_tokenizer(d.path); });
  EXPECT_NE(e.find("tokenizer_config.json: field \"eos_token\" names \"</s>\""), std::string::npos) << e;
}

TEST(HfTokenizer, UnsupportedPartsAreRefusedByName) {
  test::TempDir d;
  auto err = [&](const std::string& json) {
    write(d.path + "/tokenizer.json", json);
    return error_of([&] { load_tokenizer(d.path); });
  };
  const std::string ok = tiny_byte_level_json();
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = ok;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {with(R"("type": "BPE")", R"("type": "WordPiece")"), "field \"model.type\" must be \"BPE\""},
      {with(R"("type": "BPE")", R"("type": "Unigram")"), "field \"model.type\""},
      {with(R"("normalizer": null)", R"("normalizer": {"type": "NFKC"})"),
       "field \"normalizer.type\" \"NFKC\" is not supported"},
      {with(R"({"type": "ByteLevel", "add_prefix_space": false})",
            R"({"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]})"),
       "field \"pre_tokenizer.pretokenizers\""},
      {with(R"({"type": "ByteLevel", "add_prefix_space": false})", R"({"type": "Whitespace"})"),
       "field \"pre_tokenizer.type\" \"Whitespace\" is not supported"},
      {with(R"(["Ġ", "ab"])", R"(["Ġ", "zz"])"), "field \"model.merges[1]\" merges tokens missing"},
      {with(R"("a b")", R"("a  b")"), "field \"model.merges[0]\" must be"},
      {with(R"("vocab": {"a": 0)", R"("dropout": 0.1, "vocab": {"a": 0)"), "field \"model.dropout\""},
      {with(R"("vocab": {"a": 0)", R"("vocab": {"a": -4)"), "field \"model.vocab[\"a\"]\""},
      {with(R"("c": 2)", R"("c": 1)"), "gives id 1 to two tokens"},
      {with(R"("special": true, "normalized": false},)", R"("special": true, "single_word": true},)"),
       "field \"added_tokens[0].single_word\""},
      {with(R"("decoder": {"type": "ByteLevel"})", R"("decoder": {"type": "WordPiece"})"),
       "field \"decoder.type\" \"WordPiece\""},
      {with(R"("decoder": {"type": "ByteLevel"})", R"("decoder": null)"),
       "ByteLevel must be used by both"},
      {with("<|endoftext|>", "<|eot|>"), "no end-of-sequence token"},
      {"[" + std::string(40, '[') + std::string(41, ']'), "nested deeper than 32"},
      {with(R"("normalizer": null)",
            R"("normalizer": {"type": "Replace", "pattern": {"String": "a"}, "content": ")" +
                std::string(65, 'x') + "\"}"),
       "field \"normalizer.content\" is longer than 64 bytes"},
      {with(R"("c": 2)", R"("c": 2097152)"), "field \"model.vocab[\"c\"]\" must be an integer id in [0, 2097151]"},
      {with(R"("added_tokens": [)", R"("added_tokens": {"x": 1}, "unused": [)"),
       "field \"added_tokens\" must be an array"},
      {R"({"model": 3})", "field \"model\" must be an object"},
      {"{}", "field \"model\" is missing"},
  };
  for (const auto& [json, want] : cases) {
    const std::string e = err(json);
    EXPECT_NE(e.find(want), std::string::npos) << "want: " << want << "\ngot: " << e;
    EXPECT_NE(e.find("tokenizer.json"), std::string::npos) << e;
  }
}

// Byte fallback where some <0xXX> tokens are missing: a character whose bytes all have tokens
// becomes them; any other becomes <unk>, held back (as HF does) until the next character found
// in the vocab or the word's end, past byte-fallback tokens; fuse_unk joins held ones. The ids
// are those of HF tokenizers 0.20.3 on the same file.
TEST(HfTokenizer, ByteFallbackWithMissingBytesHoldsUnkAsHfDoes) {
  for (bool fuse : {false, true}) {
    test::TempDir d;
    write(d.path + "/tokenizer.json", std::string(R"({"added_tokens": [
        {"id": 0, "content": "<unk>", "special": true, "normalized": false},
        {"id": 6, "content": "</s>", "special": true, "normalized": false}],
      "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
      "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": )") +
                                     (fuse ? "true" : "false") + R"(,
        "vocab": {"<unk>": 0, "a": 1, "b": 2, "<0xC3>": 3, "<0xA9>": 4, "<0xA8>": 5, "</s>": 6},
        "merges": []}})");
    auto t = load_tokenizer(d.path);
    using V = std::vector<int32_t>;
    EXPECT_EQ(t->encode("aé"), (V{1, 3, 4}));
    EXPECT_EQ(t->encode("éb"), (V{3, 4, 2}));  // b's byte 62 has no token: b is itself
    EXPECT_EQ(t->encode("aêb"), (V{1, 0, 2}));  // ê is C3 AA: <0xAA> missing
    EXPECT_EQ(t->encode("êé"), (V{3, 4, 0}));
    EXPECT_EQ(t->encode("aêéêb"), fuse ? (V{1, 3, 4, 0, 2}) : (V{1, 3, 4, 0, 0, 2}));
    EXPECT_EQ(t->encode("êêa"), fuse ? (V{0, 1}) : (V{0, 0, 1}));
  }
}

// GPT-2's two files converted: the first line of vocab.bpe is skipped only when it is the
// "#version" header (a file without one starts with its first merge), CRLF endings and blank
// lines are allowed, and the merges keep their order.
// The SentencePiece model's pieces as the HF export reads them: text, score and kind of every
// piece, as SentencePiece itself reports them; a varint longer than 10 bytes is refused.
TEST(HfTokenizer, SentencePiecePiecesMatchSentencePiece) {
  auto t = tiny_bpe();
  const std::vector<SpPiece> pieces = read_sentencepiece_pieces(t->sentencepiece_model());
  const std::vector<VocabEntry> want = t->vocab_entries();
  ASSERT_EQ(pieces.size(), want.size());
  std::set<float> scores;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(pieces[i].piece, want[i].piece) << i;
    EXPECT_EQ(pieces[i].score, want[i].score) << i;
    scores.insert(pieces[i].score);
    EXPECT_EQ(pieces[i].type == 2, want[i].kind == VocabEntry::Kind::Unknown) << i;
    EXPECT_EQ(pieces[i].type == 3, want[i].kind == VocabEntry::Kind::Control) << i;
  }
  EXPECT_GT(scores.size(), 100u);  // real scores, not a default
  EXPECT_NE(error_of([&] { read_sentencepiece_pieces(std::string(11, '\xFF')); }).find("malformed varint"),
            std::string::npos);
}

TEST(HfTokenizer, Gpt2FilesConvertWithOrWithoutTheVersionLine) {
  for (bool header : {true, false}) {
    test::TempDir d;
    write(d.path + "/encoder.json",
          R"({"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "<|endoftext|>": 5})");
    write(d.path + "/vocab.bpe", std::string(header ? "#version: 0.2\r\n" : "") + "a b\r\n\nab c\n");
    const std::string out = d.path + "/out";
    fs::create_directory(out);
    convert_gpt2_tokenizer(d.path + "/encoder.json", d.path + "/vocab.bpe", out);
    const nlohmann::json j = nlohmann::json::parse(test::read_text(out + "/tokenizer.json"));
    EXPECT_EQ(j["model"]["merges"], nlohmann::json::array({"a b", "ab c"})) << header;
    const nlohmann::json cfg = nlohmann::json::parse(test::read_text(out + "/tokenizer_config.json"));
    EXPECT_EQ(cfg.value("eos_token", ""), "<|endoftext|>");  // what transformers reads
    auto t = load_tokenizer(out);
    EXPECT_EQ(t->encode("abc"), (std::vector<int32_t>{4})) << header;
    EXPECT_EQ(t->encode("ab"), (std::vector<int32_t>{3})) << header;
    // <|endoftext|> is an added special token: matched whole in text, skipped by decode
    EXPECT_EQ(t->encode("ab<|endoftext|>c"), (std::vector<int32_t>{3, 5, 2})) << header;
    EXPECT_EQ(t->decode({3, 5, 2}), "abc") << header;
  }
}

TEST(HfTokenizer, SentencePieceStyleFromHandWrittenFile) {
  // LLaMA's shape: Prepend + Replace, byte fallback, decoder Replace/ByteFallback/Fuse/Strip.
  test::TempDir d;
  std::string vocab = R"("<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "i": 5, "▁h": 6, "▁hi": 7)";
  for (int b = 0; b < 256; ++b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, ", \"<0x%02X>\": %d", b, 8 + b);
    vocab += buf;
  }
  write(d.path + "/tokenizer.json", R"({"added_tokens": [
      {"id": 0, "content": "<unk>", "special": true, "normalized": false},
      {"id": 1, "content": "<s>", "special": true, "normalized": false},
      {"id": 2, "content": "</s>", "special": true, "normalized": false}],
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                   {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}]},
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
              "vocab": {)" + vocab + R"(}, "merges": ["▁ h", "▁h i"]}})");
  auto t = load_tokenizer(d.path);
  EXPECT_EQ(t->bos_id(), 1);
  EXPECT_EQ(t->eos_id(), 2);
  EXPECT_EQ(t->unk_id(), 0);
  EXPECT_EQ(t->pad_id(), 2);
  // "hi hi" -> "▁hi▁hi"; "é" (C3 A9) falls back to bytes; each segment between special tokens
  // gets the prefix (HF's rule for a Prepend normalizer).
  EXPECT_EQ(t->encode("hi hi"), (std::vector<int32_t>{7, 7}));
  EXPECT_EQ(t->encode("é"), (std::vector<int32_t>{3, 8 + 0xC3, 8 + 0xA9}));
  EXPECT_EQ(t->encode("hi</s>hi"), (std::vector<int32_t>{7, 2, 7}));
  EXPECT_EQ(t->decode({1, 7, 7, 3, 8 + 0xC3, 8 + 0xA9, 2}), "hi hi é");
  EXPECT_EQ(t->decode({8 + 0xC3, 4}), "\xEF\xBF\xBDh");  // a lone byte: U+FFFD, as HF
  EXPECT_EQ(t->decode_piece(7), " hi");
  EXPECT_EQ(t->decode_piece(8 + 0xC3), "\xC3");
}

TEST(Tokenizer, Utf8Repair) {
  std::string s = "a\xC3\xA9\xFF" "b\xE2\x82" "c\xF0\x9F\x98\x80";
  EXPECT_FALSE(is_valid_utf8(s));
  EXPECT_EQ(repair_utf8(s), 3);  // one U+FFFD per malformed byte
  EXPECT_EQ(s, "a\xC3\xA9\xEF\xBF\xBD" "b\xEF\xBF\xBD\xEF\xBF\xBD" "c\xF0\x9F\x98\x80");
  EXPECT_TRUE(is_valid_utf8(s));
}

// ---------------------------------------------------------------------------------- shards
TEST(Shards, WriteReadRoundTrip) {
  test::TempDir d;
  for (int64_t V : {300, 70000}) {
    std::string path = d.path + "/t.bin";
    ShardWriter w(path, V);
    w.add_document({1, 5, 6, int32_t(V - 1)});
    w.add_document({1, 7});
    w.finish();
    ShardReader r(path, V);
    EXPECT_EQ(r.size(), 6);
    EXPECT_EQ(r.documents(), 2);
    EXPECT_EQ(r.element_bytes(), V <= 65536 ? 2 : 4);
    EXPECT_EQ(r.read(0, 6), (std::vector<int32_t>{1, 5, 6, int32_t(V - 1), 1, 7}));
    EXPECT_EQ(fs::file_size(path), uint64_t(64 + 6 * r.element_bytes()));
  }
}

// A writer dropped before finish() (an error while preparing) leaves neither the shard nor its
// temporary file.
TEST(Shards, AnUnfinishedWriterLeavesNoFile) {
  test::TempDir d;
  const std::string path = d.path + "/t.bin";
  {
    ShardWriter w(path, 300);
    w.add_document({1, 2, 3});
    EXPECT_TRUE(fs::exists(path + ".tmp"));
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(d.path));
}

// A shard whose writes fail on the device (ENOSPC: the temporary file is a link to
// /dev/full) is refused at finish() naming the file, with the file closed and no name left.
TEST(Shards, ADiskFullWriteIsRefusedAndLeavesNothing) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  test::TempDir d;
  const std::string path = d.path + "/t.bin";
  fs::create_symlink("/dev/full", path + ".tmp");
  const i64 fds = test::open_descriptors();
  const std::string e = error_of([&] {
    ShardWriter w(path, 300);
    w.add_document({1, 2, 3});
    w.finish();
  });
  EXPECT_NE(e.find("error writing " + path + ".tmp"), std::string::npos) << e;
  EXPECT_EQ(test::open_descriptors(), fds);
  EXPECT_TRUE(fs::is_empty(d.path));
}

TEST(Shards, HeaderValidationErrors) {
  test::TempDir d;
  const std::string good = make_shard(d.path, 500, 1000);
  const std::string bytes = test::read_text(good);
  const std::string p = d.path + "/bad.bin";
  // Every refusal names the file and the fault, and leaves neither the file's mapping nor a
  // descriptor behind (a server's reader refuses many files in one process).
  const i64 fds = test::open_descriptors();
  auto expect_err = [&](const std::string& content, int64_t vocab, const std::string& what) {
    write(p, content);
    std::string e = error_of([&] { ShardReader r(p, vocab); });
    EXPECT_NE(e.find(p), std::string::npos) << e;
    EXPECT_NE(e.find(what), std::string::npos) << e;
    EXPECT_FALSE(test::is_mapped(p)) << what;
    EXPECT_EQ(test::open_descriptors(), fds) << what;
  };
  expect_err(bytes.substr(0, 40), 1000, "truncated");
  expect_err(bytes.substr(0, bytes.size() - 3), 1000, "truncated");
  expect_err(bytes + "xy", 1000, "trailing");
  std::string m = bytes;
  m[0] = 'X';
  expect_err(m, 1000, "magic");
  std::string v = bytes;
  v[8] = 9;
  expect_err(v, 1000, "version");
  std::string w = bytes;
  w[12] = 3;
  expect_err(w, 1000, "element width");
  expect_err(bytes, 999, "does not match the expected 999");
  auto with_u64 = [&](size_t at, uint64_t x) {
    std::string b = bytes;
    for (int i = 0; i < 8; ++i) b[at + i] = char(uint8_t(x >> (8 * i)));
    return b;
  };
  expect_err(with_u64(16, 0), -1, "vocab size 0 out of range");
  expect_err(with_u64(16, (uint64_t(1) << 31) + 1), -1, "out of range");
  expect_err(with_u64(16, 70000), -1, "does not fit element width 2");  // ids are 2 bytes
  expect_err(with_u64(32, 501), 1000, "document count 501 exceeds token count 500");
  // A token id beyond the vocab is caught on read.
  std::string c = bytes;
  c[64] = char(0xFF), c[65] = char(0xFF);
  write(p, c);
  ShardReader r(p, 1000);
  EXPECT_NE(error_of([&] { r.read(0, 4); }).find("corrupt"), std::string::npos);
  EXPECT_NE(error_of([&] { ShardReader x(d.path + "/missing.bin"); }).find("missing.bin"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------- loaders
TEST(Loader, DeterministicAndResumable) {
  test::TempDir d;
  auto shard = std::make_shared<const ShardReader>(make_shard(d.path, 5000), 1000);
  TrainLoader a(shard, 32, 42), b(shard, 32, 42), c(shard, 32, 43);
  TokenBatch x = a.get(10, 1, 0, 4), y = b.get(10, 1, 0, 4);
  EXPECT_EQ(x.tokens, y.tokens);  // a fresh loader (resume) gives the same batch
  EXPECT_EQ(x.tokens.size(), 4u * 33);
  EXPECT_EQ(x.n_targets, 4 * 32);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t i = 0; i < 32; ++i) {
      EXPECT_EQ(x.inputs[r * 32 + i], x.tokens[r * 33 + i]);
      EXPECT_EQ(x.targets[r * 32 + i], x.tokens[r * 33 + i + 1]);
    }
  EXPECT_NE(a.get(10, 1, 1, 4).tokens, x.tokens);  // other rank
  EXPECT_NE(a.get(11, 1, 0, 4).tokens, x.tokens);  // other step
  EXPECT_NE(a.get(10, 0, 0, 4).tokens, x.tokens);  // other micro-batch
  EXPECT_NE(c.get(10, 1, 0, 4).tokens, x.tokens);  // other seed
  // Windows stay inside the stream, and offsets spread over it.
  std::set<int64_t> offs;
  for (int64_t s = 0; s < 200; ++s) {
    int64_t o = a.offset(s, 0, 0, 0);
    EXPECT_GE(o, 0);
    EXPECT_LE(o + 33, shard->size());
    offs.insert(o / 500);
  }
  EXPECT_EQ(offs.size(), 10u);
  EXPECT_NE(error_of([&] { TrainLoader t(shard, 5000, 1); }).find("fewer than one"),
            std::string::npos);
}

TEST(Loader, ValidationCoversEachTokenOnce) {
  test::TempDir d;
  for (int64_t n : {1000, 993, 33, 2}) {
    auto shard = std::make_shared<const ShardReader>(make_shard(d.path, n), 1000);
    const int64_t L = 32;
    ValIterator it(shard, L, 0, std::vector<int32_t>(1000, 1));
    std::vector<int32_t> seen_targets;
    TokenBatch b;
    int64_t bytes = 0, windows = 0;
    while (it.next(3, b)) {
      for (int64_t r = 0; r < b.rows; ++r)
        for (int64_t i = 0; i < L; ++i) {
          int32_t t = b.targets[r * L + i];
          if (t >= 0) seen_targets.push_back(t);
          EXPECT_GE(b.inputs[r * L + i], 0);
        }
      bytes += b.n_bytes;
      windows += b.valid_rows;
    }
    const auto all = shard->read(0, n);
    EXPECT_EQ(std::vector<int32_t>(all.begin() + 1, all.end()), seen_targets) << n;
    EXPECT_EQ(it.num_targets(), n - 1);
    EXPECT_EQ(bytes, n - 1);
    EXPECT_EQ(windows, it.num_windows());
    it.reset();
    EXPECT_TRUE(it.next(1, b));
  }
  EXPECT_NEAR(bits_per_byte(std::log(2.0) * 10, 5), 2.0, 1e-12);
}

// ---------------------------------------------------------------------------------- prepare
namespace {
std::string corpus_jsonl(int docs, uint64_t seed) {
  std::string s;
  for (int i = 0; i < docs; ++i) {
    nlohmann::json j = {{"source", i % 2 ? "odd" : "even"}, {"text", gen_text(seed + i, 6)}};
    s += j.dump() + "\n";
  }
  return s;
}

std::multiset<std::string> docs_of(const ShardReader& r, const Tokenizer& t) {
  std::multiset<std::string> out;
  auto all = r.read(0, r.size());
  std::vector<int32_t> cur;
  for (size_t i = 0; i <= all.size(); ++i) {
    if (i == all.size() || (all[i] == t.bos_id() && i > 0)) {
      out.insert(t.decode(cur));
      cur.clear();
    }
    if (i < all.size() && all[i] != t.bos_id()) cur.push_back(all[i]);
  }
  return out;
}
}  // namespace

TEST(Prepare, BytesSplitIsDisjointAndDeterministic) {
  test::TempDir in, o1, o2;
  fs::create_directories(in.path + "/sub");
  std::string jl = corpus_jsonl(400, 1000);
  write(in.path + "/a.jsonl", jl);
  // Plain text with form-feed separated documents, a duplicate and junk.
  write(in.path + "/sub/b.txt", gen_text(1, 20) + "\f" + gen_text(2, 20) + "\f" +
                                    gen_text(1, 20) + "\f\x01\x02###\f  \n");
  write(in.path + "/ignored.bin", "not read");
  PrepareOptions po;
  po.tokenizer = "bytes";
  po.quiet = true;
  po.val_fraction = 0.05;
  auto meta = prepare({in.path}, o1.path, po);
  EXPECT_EQ(meta["documents"]["kept"], 402);
  EXPECT_EQ(meta["documents"]["duplicates"], 1);
  EXPECT_EQ(meta["documents"]["junk"], 1);
  EXPECT_EQ(meta["documents"]["empty"], 1);
  DataDir dd = open_data_dir(o1.path);
  auto tr = docs_of(*dd.train, *dd.tokenizer), va = docs_of(*dd.val, *dd.tokenizer);
  EXPECT_EQ(int64_t(tr.size()), dd.train->documents());
  EXPECT_EQ(int64_t(va.size()), dd.val->documents());
  EXPECT_EQ(tr.size() + va.size(), 402u);
  EXPECT_GT(va.size(), 5u);
  EXPECT_LT(va.size(), 50u);
  for (const auto& v : va) EXPECT_EQ(tr.count(v), 0u);
  EXPECT_EQ(dd.val_bytes, meta["val"]["bytes"].get<int64_t>());
  EXPECT_EQ(dd.val_bytes, meta["val"]["target_bytes"].get<int64_t>());
  EXPECT_EQ(dd.val_bytes + dd.val->documents(), dd.val->size());  // bytes + one BOS per doc
  // Deterministic by document: reversed input order gives the same validation set.
  std::string rev;
  {
    std::vector<std::string> lines;
    size_t p = 0;
    while (p < jl.size()) {
      size_t nl = jl.find('\n', p);
      lines.push_back(jl.substr(p, nl - p + 1));
      p = nl + 1;
    }
    for (auto it = lines.rbegin(); it != lines.rend(); ++it) rev += *it;
  }
  test::TempDir in2;
  write(in2.path + "/x.jsonl", rev);
  fs::copy(in.path + "/sub/b.txt", in2.path + "/b.txt");
  prepare({in2.path}, o2.path, po);
  DataDir d2 = open_data_dir(o2.path);
  EXPECT_EQ(docs_of(*d2.val, *d2.tokenizer), va);
}

TEST(Prepare, BpeEndToEnd) {
  test::TempDir in, out;
  write(in.path + "/c.jsonl", corpus_jsonl(300, 77));
  PrepareOptions po;
  po.vocab_size = 512;
  po.quiet = true;
  auto meta = prepare({in.path + "/c.jsonl"}, out.path, po);
  DataDir dd = open_data_dir(out.path);
  EXPECT_EQ(dd.tokenizer->kind(), "bpe");
  EXPECT_EQ(dd.train->vocab_size(), dd.tokenizer->vocab_size());
  EXPECT_GT(meta["bytes_per_token"].get<double>(), 2.0);
  EXPECT_EQ(meta["val"]["bytes"], meta["val"]["target_bytes"]);
  EXPECT_EQ(dd.train->at(0), dd.tokenizer->bos_id());
  EXPECT_EQ(dd.val->at(0), dd.tokenizer->bos_id());
  for (const char* f : {"dlcm_tokenizer.json", "tokenizer.model", "train.bin", "val.bin", "meta.json"})
    EXPECT_TRUE(fs::exists(out.path + "/" + f)) << f;
  // tokenizer.json is HF's name: a prepared folder does not use it for our metadata.
  EXPECT_FALSE(fs::exists(out.path + "/tokenizer.json"));
  ValIterator it(dd.val, 64, dd.tokenizer->pad_id(), dd.tokenizer->piece_byte_lengths());
  TokenBatch b;
  int64_t bytes = 0;
  while (it.next(4, b)) bytes += b.n_bytes;
  EXPECT_EQ(bytes, dd.val_bytes);
}

// The junk filter counts letters against the other non-blank characters: spaces, tabs and line
// ends do not count, so indented code with few letters is kept; symbol soup is dropped; CJK
// text is letters; a text that is 10% U+FFFD (bytes that were not UTF-8) is dropped.
TEST(Prepare, BlanksDoNotMakeADocumentJunk) {
  test::TempDir in, out;
  write(in.path + "/docs.jsonl",
        nlohmann::json{{"text", "x = 1\n\t\t\t\t\t\t\t\t    y = 2"}}.dump() + "\n" +
            nlohmann::json{{"text", gen_text(5, 20)}}.dump() + "\n" +
            nlohmann::json{{"text", "x = 1 + 2 * 3 - 4 / 5 == 6 ## 7 @@ 8"}}.dump() + "\n" +
            // non-ASCII letters count as letters, U+FFFD (repaired bytes) against the text
            nlohmann::json{{"text", "日本語のテキスト、中文文本，한국어 텍스트。"}}.dump() + "\n" +
            nlohmann::json{{"text", "word \xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}}.dump() + "\n");
  PrepareOptions po;
  po.quiet = true;
  po.tokenizer = "bytes";
  po.val_fraction = 0.3;
  auto meta = prepare({in.path + "/docs.jsonl"}, out.path, po);
  EXPECT_EQ(meta["documents"]["kept"], 3);
  EXPECT_EQ(meta["documents"]["junk"], 2);
  DataDir dd = open_data_dir(out.path);
  auto docs = docs_of(*dd.train, *dd.tokenizer);
  docs.merge(docs_of(*dd.val, *dd.tokenizer));
  EXPECT_EQ(docs.count("日本語のテキスト、中文文本，한국어 텍스트。"), 1u);
  EXPECT_EQ(docs.count("x = 1\n\t\t\t\t\t\t\t\t    y = 2"), 1u);
}

TEST(Prepare, EmptyOrJunkInputIsAClearError) {
  test::TempDir in, out;
  write(in.path + "/empty.txt", "");
  write(in.path + "/junk.txt", std::string("\x01\x02\x03 12345 ---- \xFF\xFE\xFD", 17) +
                                   "\f" + "    \n\n\t");
  PrepareOptions po;
  po.quiet = true;
  po.tokenizer = "bytes";
  std::string e = error_of([&] { prepare({in.path}, out.path, po); });
  EXPECT_NE(e.find("no usable text"), std::string::npos) << e;
  EXPECT_NE(e.find("2 file(s): "), std::string::npos) << e;
  EXPECT_EQ(e.find(", ..."), std::string::npos) << e;
  {  // more than three files: the first three named, then "..."
    test::TempDir many;
    for (const char* f : {"a.txt", "b.txt", "c.txt", "d.txt", "e.txt"}) write(many.path + "/" + f, "\n");
    e = error_of([&] { prepare({many.path}, out.path, po); });
    EXPECT_NE(e.find("5 file(s): " + many.path + "/a.txt, " + many.path + "/b.txt, " + many.path +
                     "/c.txt, ...;"),
              std::string::npos) << e;
  }
  test::TempDir none;
  e = error_of([&] { prepare({none.path}, out.path, po); });
  EXPECT_NE(e.find("no .txt or .jsonl"), std::string::npos) << e;
  e = error_of([&] { prepare({none.path + "/nope.txt"}, out.path, po); });
  EXPECT_NE(e.find("does not exist"), std::string::npos) << e;
  write(in.path + "/bad.jsonl", "{\"text\": \"fine\"}\n[1,2]\n");
  e = error_of([&] { prepare({in.path + "/bad.jsonl"}, out.path, po); });
  EXPECT_NE(e.find("bad.jsonl:2"), std::string::npos) << e;
  po.tokenizer = "wordpiece";
  e = error_of([&] { prepare({in.path}, out.path, po); });
  EXPECT_NE(e.find("--tokenizer"), std::string::npos) << e;
}

TEST(HfTokenizer, OldTokenizerJsonNameStillLoads) {
  // A prepared folder written before the rename: our metadata as tokenizer.json.
  test::TempDir in, out;
  write(in.path + "/c.jsonl", corpus_jsonl(120, 5));
  PrepareOptions po;
  po.vocab_size = 400;
  po.quiet = true;
  prepare({in.path + "/c.jsonl"}, out.path, po);
  const auto fresh = load_tokenizer(out.path);
  fs::rename(out.path + "/dlcm_tokenizer.json", out.path + "/tokenizer.json");
  EXPECT_TRUE(has_legacy_tokenizer_meta(out.path));
  const auto old = load_tokenizer(out.path);
  EXPECT_EQ(old->kind(), "bpe");
  expect_same_tokenizer(*fresh, *old, {gen_text(5, 40)});
  DataDir dd = open_data_dir(out.path);
  EXPECT_EQ(dd.tokenizer->kind(), "bpe");
  // Checkpoints trained from it carry the tokenizer under the new name only.
  Config c = test::tiny_baseline();
  c.model.vocab_size = old->vocab_size();
  TrainData td = open_train_data(out.path, c);
  std::set<std::string> names;
  for (const auto& f : td.checkpoint_files) names.insert(fs::path(f).filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"dlcm_tokenizer.json", "tokenizer.model"}));
  test::TempDir ck;
  for (const auto& f : td.checkpoint_files) fs::copy_file(f, ck.path + "/" + fs::path(f).filename().string());
  expect_same_tokenizer(*fresh, *load_tokenizer(ck.path), {gen_text(6, 40)});
  // The bytes tokenizer too.
  test::TempDir b;
  make_byte_tokenizer()->save(b.path);
  fs::rename(b.path + "/dlcm_tokenizer.json", b.path + "/tokenizer.json");
  EXPECT_EQ(load_tokenizer(b.path)->kind(), "bytes");
  EXPECT_FALSE(has_legacy_tokenizer_meta(ck.path));
}

// What the trainer reads: open_train_data's batches are the loaders' (not merely the right
// shapes), the validation token count is the split's targets, and the tokenizer's word starts
// come along for router.kind = "word".
TEST(TrainData, BatchesAndCountsAreTheShards) {
  test::TempDir in, out;
  write(in.path + "/c.jsonl", corpus_jsonl(200, 7));
  PrepareOptions po;
  po.vocab_size = 400;
  po.val_fraction = 0.2;
  po.quiet = true;
  prepare({in.path + "/c.jsonl"}, out.path, po);
  DataDir dd = open_data_dir(out.path);
  Config c = test::tiny_baseline();
  c.model.vocab_size = dd.tokenizer->vocab_size();
  const i64 L = c.train.seq_len, B = 2;
  TrainData td = open_train_data(out.path, c);
  std::vector<i32> tok(B * L), tgt(B * L);
  const TrainLoader train(dd.train, L, c.train.seed, c.model.pad_id);
  for (i64 step : {0, 3}) {
    std::fill(tok.begin(), tok.end(), -7);
    std::fill(tgt.begin(), tgt.end(), -7);
    td.train_batch(step, 1, 0, B, L, tok.data(), tgt.data());
    const TokenBatch want = train.get(step, 1, 0, B);
    EXPECT_EQ(tok, want.inputs) << step;
    EXPECT_EQ(tgt, want.targets) << step;
  }
  ValIterator val(dd.val, L, c.model.pad_id);
  const i64 n = td.val_count(B, L);
  ASSERT_GE(n, 2) << "too little validation text for the check";
  for (i64 i = 0; i < n; ++i) {
    TokenBatch want;
    val.next(B, want);
    std::fill(tok.begin(), tok.end(), -7);
    std::fill(tgt.begin(), tgt.end(), -7);
    td.val_batch(i, B, L, tok.data(), tgt.data());
    EXPECT_EQ(tok, want.inputs) << i;
    EXPECT_EQ(tgt, want.targets) << i;
  }
  EXPECT_EQ(td.val_tokens, i64(dd.val->size()) - 1);
  EXPECT_EQ(td.val_tokens, val.num_targets());
  EXPECT_EQ(td.word_starts, dd.tokenizer->word_starts());
  EXPECT_FALSE(td.word_starts.empty());
}

TEST(HfTokenizer, CommandLine) {
  test::TempDir d;
  make_byte_tokenizer()->save(d.path);
  auto r = test::run_dlcm("tokenizer export-hf --dir " + d.path + " --out " + d.path + "/hf");
  ASSERT_EQ(r.rc, 0) << r.out;
  r = test::run_dlcm("tokenizer encode --dir " + d.path + "/hf --text 'hé'");
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("[108,199,173]"), std::string::npos) << r.out;  // 4 + bytes h, C3, A9
  r = test::run_dlcm("tokenizer decode --dir " + d.path + "/hf --ids 1,108,199,173,2");
  EXPECT_EQ(r.out, "hé");
  r = test::run_dlcm("tokenizer encode --dir " + d.path + "/nowhere --text x");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("dlcm_tokenizer.json"), std::string::npos) << r.out;
}

TEST(HfTokenizer, PrepareWithAGivenTokenizer) {
  // Data for fine-tuning an imported model: the tokenizer comes from an HF folder (here the
  // bytes tokenizer in HF's format), and the shards are those its own kind would give.
  test::TempDir in, hf, a, b;
  write(in.path + "/c.jsonl", corpus_jsonl(60, 9));
  write_hf_tokenizer_files(*make_byte_tokenizer(), hf.path);
  PrepareOptions po;
  po.quiet = true;
  po.tokenizer = "bytes";
  prepare({in.path + "/c.jsonl"}, a.path, po);
  po.tokenizer_from = hf.path;
  prepare({in.path + "/c.jsonl"}, b.path, po);
  EXPECT_EQ(test::read_text(a.path + "/train.bin"), test::read_text(b.path + "/train.bin"));
  EXPECT_EQ(test::read_text(a.path + "/val.bin"), test::read_text(b.path + "/val.bin"));
  EXPECT_EQ(load_tokenizer(b.path)->kind(), "hf");
  std::set<std::string> names;
  for (const auto& f : tokenizer_files(b.path)) names.insert(fs::path(f).filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}));
  // A wrong folder fails before any reading.
  po.tokenizer_from = in.path + "/none";
  EXPECT_NE(error_of([&] { prepare({in.path + "/c.jsonl"}, b.path, po); }).find("none"), std::string::npos);
}

// A document over 64 KiB is cut into pieces of about 16 KiB: at a blank line where there is one
// within reach, else at a line end, so a text with line ends is never cut inside a line.
TEST(Prepare, LongDocumentsAreCutAtLineEnds) {
  test::TempDir in, out;
  std::string doc;
  std::set<std::string> lines;
  for (int i = 0; doc.size() < 100 * 1024; ++i) {
    std::string l = "line " + std::to_string(i) + " " + gen_text(900 + i, 8);
    std::replace(l.begin(), l.end(), '\n', ' ');  // one line each, no blank line anywhere
    l.erase(l.find_last_not_of(' ') + 1);         // no trailing blanks (documents are trimmed)
    lines.insert(l);
    doc += l + "\n";
  }
  write(in.path + "/long.txt", doc);  // one paragraph: no blank line, no form feed
  PrepareOptions po;
  po.tokenizer = "bytes";
  po.quiet = true;
  po.val_fraction = 0.2;
  prepare({in.path + "/long.txt"}, out.path, po);
  DataDir dd = open_data_dir(out.path);
  auto docs = docs_of(*dd.train, *dd.tokenizer);
  docs.merge(docs_of(*dd.val, *dd.tokenizer));
  size_t pieces = 0, seen = 0;
  for (const std::string& d : docs) {
    ++pieces;
    EXPECT_LE(d.size(), 4 * 16 * 1024u);
    std::istringstream is(d);
    for (std::string l; std::getline(is, l); ++seen)
      EXPECT_EQ(lines.count(l), 1u) << "a cut inside a line: " << l.substr(0, 40);
  }
  EXPECT_GE(pieces, 5u);
  EXPECT_EQ(seen, lines.size());  // every line in exactly one piece
}

// One plain-text file without form feeds: its paragraphs are the documents, with a validation
// share as for any input; one that has form feeds keeps them as separators. Source names are
// the full file names (path under the input folder, or as given), not stems.
TEST(Prepare, SingleTextFileIsSplitAtBlankLinesAndSourcesKeepFullNames) {
  test::TempDir in, out, out2, out3;
  std::string book;
  for (int i = 0; i < 120; ++i) book += gen_text(500 + i, 8) + (i % 3 ? "\n\n" : "\n  \n\n\n");
  write(in.path + "/book.en.txt", book);
  PrepareOptions po;
  po.tokenizer = "bytes";
  po.quiet = true;
  po.val_fraction = 0.1;
  auto meta = prepare({in.path + "/book.en.txt"}, out.path, po);
  EXPECT_EQ(meta["documents"]["kept"], 120);
  EXPECT_GT(meta["val"]["documents"].get<int64_t>(), 2);
  EXPECT_LT(meta["val"]["documents"].get<int64_t>(), 30);
  ASSERT_EQ(meta["sources"].size(), 1u);
  EXPECT_EQ(meta["sources"][0]["name"], in.path + "/book.en.txt");
  DataDir dd = open_data_dir(out.path);
  auto tr = docs_of(*dd.train, *dd.tokenizer), va = docs_of(*dd.val, *dd.tokenizer);
  EXPECT_EQ(tr.size() + va.size(), 120u);
  std::string first = gen_text(500, 8);  // a whole paragraph, trimmed like every document
  first.erase(first.find_last_not_of(" \n") + 1);
  EXPECT_EQ(va.count(first) + tr.count(first), 1u);
  EXPECT_EQ(meta["documents"]["duplicates"], 0);  // the last paragraph is read once
  // The last paragraph without a final newline is a document too; CRLF and lone CR line ends
  // become LF (lines of only CR and blanks separate paragraphs).
  {
    test::TempDir o;
    const std::string p1 = "first paragraph line one\r\nline two of it", p2 = "the second one\rends here";
    write(in.path + "/crlf.txt", p1 + "\r\n \r\n\r\n" + p2);
    po.val_fraction = 0.4;
    meta = prepare({in.path + "/crlf.txt"}, o.path, po);
    po.val_fraction = 0.1;
    EXPECT_EQ(meta["documents"]["kept"], 2);
    DataDir od = open_data_dir(o.path);
    auto all = docs_of(*od.train, *od.tokenizer);
    all.merge(docs_of(*od.val, *od.tokenizer));
    EXPECT_EQ(all, (std::multiset<std::string>{"first paragraph line one\nline two of it",
                                               "the second one\nends here"}));
  }
  // With form feeds, they separate the documents (blank lines do not).
  write(in.path + "/ff.txt", gen_text(1, 8) + "\n\n" + gen_text(2, 8) + "\f" + gen_text(3, 8));
  meta = prepare({in.path + "/ff.txt"}, out2.path, po);
  EXPECT_EQ(meta["documents"]["kept"], 2);
  // In a folder, names are paths under it with their extensions; text files stay whole.
  fs::create_directories(in.path + "/web");
  write(in.path + "/web/part.1.txt", gen_text(7, 8) + "\n\n" + gen_text(8, 8));
  write(in.path + "/web/part.2.txt", gen_text(9, 8));
  meta = prepare({in.path + "/web"}, out3.path, po);
  EXPECT_EQ(meta["documents"]["kept"], 2);
  std::vector<std::string> names;
  for (const auto& s : meta["sources"]) names.push_back(s["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"part.1.txt", "part.2.txt"}));
}
