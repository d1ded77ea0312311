// Token shards (SPEC section 9): a 64-byte header then little-endian token ids.
//
//   offset size  field
//   0      8     magic "DLCMTOK\0"
//   8      4     format version (u32, currently 1)
//   12     4     element width in bytes (u32, 2 or 4)
//   16     8     vocab size (u64)
//   24     8     token count (u64)
//   32     8     document count (u64)
//   40     24    reserved (zero)
//   64     ...   token ids, `element width` bytes each, little-endian
//
// Every document starts with BOS; documents are concatenated with nothing in between.
// The reader memory-maps the file and validates the header against the file size; every error
// names the file and what was expected.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

constexpr char kShardMagic[8] = {'D', 'L', 'C', 'M', 'T', 'O', 'K', '\0'};
constexpr uint32_t kShardVersion = 1;
constexpr int64_t kShardHeaderBytes = 64;

// Writes PATH.tmp and renames it to PATH on finish(); the element width is 2 bytes when
// vocab_size <= 65536, else 4.
class ShardWriter {
 public:
  ShardWriter(const std::string& path, int64_t vocab_size);
  ~ShardWriter();  // an unfinished writer removes its temporary file
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  // Appends one document; ids must already start with BOS (checked against vocab size only).
  void add_document(const int32_t* ids, int64_t n);
  void add_document(const std::vector<int32_t>& ids) { add_document(ids.data(), int64_t(ids.size())); }
  void finish();
  int64_t tokens() const { return n_tokens_; }
  int64_t documents() const { return n_docs_; }

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  int64_t vocab_, n_tokens_ = 0, n_docs_ = 0;
  int width_;
  std::vector<uint8_t> buf_;
};

class ShardReader {
 public:
  // expected_vocab < 0: accept any vocab size; otherwise it must match the header.
  explicit ShardReader(const std::string& path, int64_t expected_vocab = -1);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return n_tokens_; }  // token count
  int64_t documents() const { return n_docs_; }
  int64_t vocab_size() const { return vocab_; }
  int element_bytes() const { return width_; }
  int32_t at(int64_t i) const {
    const uint8_t* p = data_ + i * width_;
    return width_ == 2 ? int32_t(uint32_t(p[0]) | uint32_t(p[1]) << 8)
                       : int32_t(uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 |
                                 uint32_t(p[3]) << 24);
  }
  // Copies tokens [start, start+n) to out; throws if out of range or an id is >= vocab size
  // (a corrupt file), naming the file and position.
  void read(int64_t start, int64_t n, int32_t* out) const;
  std::vector<int32_t> read(int64_t start, int64_t n) const {
    std::vector<int32_t> v(n);
    read(start, n, v.data());
    return v;
  }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint8_t* data_ = nullptr;
  int64_t vocab_ = 0, n_tokens_ = 0, n_docs_ = 0;
  int width_ = 2;
};

}  // namespace dlcm
