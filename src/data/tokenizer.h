// Tokenizers (SPEC sections 2, 9): one interface, three kinds.
//   "bpe"   SentencePiece BPE trained with the library (byte fallback, identity normalisation,
//           whitespace kept, "\n" a piece of its own), files tokenizer.model +
//           dlcm_tokenizer.json.
//   "bytes" 256 byte ids after the specials, file dlcm_tokenizer.json only.
//   "hf"    a Hugging Face tokenizers file (tokenizer.json, BPE models only), read by
//           data/hf_tokenizer.h; the import path for models from the HF ecosystem.
// Special ids of bpe and bytes: pad=0, bos=1, eos=2, unk=3. Byte b of the bytes tokenizer is
// id 4+b (vocab 260). An hf tokenizer takes its special ids from its files (any ids; unk may
// be absent, -1) and its special tokens are those the file marks special.
//
// Our own metadata file was called tokenizer.json before; it is now dlcm_tokenizer.json, so
// that tokenizer.json in a checkpoint is always in HF's format. The old name is still read.
//
// Round trips:
//   bytes: decode(encode(s)) == s for ANY byte string (also invalid UTF-8, NULs).
//   bpe:   decode(encode(s)) == s for valid UTF-8 s that does not contain U+2581 ("▁", the
//          SentencePiece whitespace marker, which comes back as a space). Invalid UTF-8 never
//          crashes: each malformed byte is encoded as U+FFFD (bytes EF BF BD via byte fallback),
//          so it decodes to U+FFFD. prepare() repairs input text to valid UTF-8 first.
//   hf:    decode(encode(s)) == s for valid UTF-8 s, unless the file's normalizer or decoder
//          changes text (e.g. a prefix space that the decoder strips); malformed UTF-8 bytes
//          are encoded as U+FFFD, as for bpe.
// decode_piece(id) gives the raw bytes of one token (specials: ""), so a stream of pieces
// concatenates to decode(ids) for valid UTF-8 (a multi-byte character may arrive split across
// byte-fallback pieces; buffer until the bytes form whole characters before printing).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dlcm {

struct SpecialIds {
  int32_t pad = 0, bos = 1, eos = 2, unk = 3;  // unk -1: the tokenizer has none (hf only)
};

// One vocabulary entry as SentencePiece describes it, for writing the tokenizer into other
// formats (GGUF): the piece text (spaces as U+2581, byte pieces "<0xAB>", specials "<s>"...),
// its score (BPE: higher merges first) and its kind.
struct VocabEntry {
  enum class Kind { Normal, Unknown, Control, UserDefined, Byte };
  std::string piece;
  float score = 0;
  Kind kind = Kind::Normal;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "bpe" | "bytes" | "hf"
  virtual int32_t vocab_size() const = 0;
  // Text -> ids, without BOS/EOS.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Ids -> text; specials (pad/bos/eos) are skipped. Throws Error for ids outside the vocab.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // Raw bytes of one token, for streaming output ("" for specials).
  virtual std::string decode_piece(int32_t id) const = 0;
  // Every id's entry, in id order. bytes: the specials ("<pad>", "<s>", "</s>", "<unk>"),
  // then byte b as the byte piece "<0xBB>". Empty for a kind that has no such description.
  virtual std::vector<VocabEntry> vocab_entries() const { return {}; }
  // Writes the tokenizer's files into dir (which must exist): dlcm_tokenizer.json (and
  // tokenizer.model for bpe); an hf tokenizer writes back the HF files it was read from.
  virtual void save(const std::string& dir) const = 0;
  // The serialized SentencePiece model of a bpe tokenizer ("" for the other kinds).
  virtual std::string sentencepiece_model() const { return {}; }

  int32_t pad_id() const { return special_.pad; }
  int32_t bos_id() const { return special_.bos; }
  int32_t eos_id() const { return special_.eos; }
  int32_t unk_id() const { return special_.unk; }
  // Special tokens: skipped by decode, empty pieces. For bpe and bytes the ids 0..3.
  bool is_special(int32_t id) const {
    return id >= 0 && size_t(id) < special_mask_.size() && special_mask_[size_t(id)];
  }

  // Bytes of text each id stands for (decode_piece(id).size(); 0 for specials); the sum over
  // the targets of a window is that window's UTF-8 byte count, for bits per byte.
  std::vector<int32_t> piece_byte_lengths() const;
  // Word-start flag per id, for the DLCM's router.kind = "word" (SPEC 4.9 controls): 1 when
  // the token begins a word, i.e. its piece starts with whitespace (space, newline, tab; the
  // SentencePiece marker U+2581 comes back as a space) or with ASCII punctuation; 0 for
  // specials (BOS is a forced boundary anyway) and for pieces that continue a word.
  std::vector<uint8_t> word_starts() const;

 protected:
  SpecialIds special_;
  std::vector<uint8_t> special_mask_ = {1, 1, 1, 1};  // per id (shorter: the rest are not)
};

// File names a tokenizer may write into a directory (checkpoints copy those that exist).
inline const char* kTokenizerMeta = "dlcm_tokenizer.json";  // ours (bpe, bytes)
inline const char* kTokenizerModel = "tokenizer.model";      // SentencePiece model
// Hugging Face's names; tokenizer.json is also what dlcm_tokenizer.json used to be called.
inline const char* kHfTokenizerJson = "tokenizer.json";
inline const char* kHfTokenizerConfig = "tokenizer_config.json";
inline const char* kHfSpecialTokensMap = "special_tokens_map.json";
// Paths of the tokenizer files present in dir, the metadata file first: those of the
// tokenizer load_tokenizer(dir) reads (dlcm_tokenizer.json + tokenizer.model when present;
// else tokenizer.json and its HF companions).
std::vector<std::string> tokenizer_files(const std::string& dir);
// True when dir holds our metadata under its old name tokenizer.json (folders written before
// dlcm_tokenizer.json); saving the loaded tokenizer writes the new name.
bool has_legacy_tokenizer_meta(const std::string& dir);

std::unique_ptr<Tokenizer> make_byte_tokenizer();

struct BpeOptions {
  int32_t vocab_size = 8192;
  // Training sample: lines drawn deterministically (hash of seed and line text) until the byte
  // budget is reached; bounds training time (~1-2 min for 40 MB on 2 cores).
  int64_t sample_bytes = 40'000'000;
  int32_t num_threads = 2;
  uint64_t seed = 1234;
  bool verbose = false;  // SentencePiece's own training log on stderr
};
// Trains SentencePiece BPE on the documents (order matters only through the hash sample).
std::unique_ptr<Tokenizer> train_bpe(const std::vector<std::string>& docs, const BpeOptions& opt);

// Reads the tokenizer in dir: dlcm_tokenizer.json (and tokenizer.model), else tokenizer.json,
// which is either HF's format (an imported tokenizer) or ours under its old name. Errors name
// the file and field.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

// Whole-file read of a tokenizer file, refused above max_bytes (a wrong file or a device such as
// /dev/zero is never read whole; errors name the file), and an atomic write (temp file, rename).
// Shared by every tokenizer kind.
std::string read_tokenizer_file(const std::string& path, std::uintmax_t max_bytes);
void write_tokenizer_file(const std::string& path, std::string_view data);

// UTF-8 helpers (used by prepare and tests).
bool is_valid_utf8(std::string_view s);
// Replaces each malformed byte with U+FFFD; returns the number of replacements.
int64_t repair_utf8(std::string& s);

}  // namespace dlcm
