#include "data/shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

namespace dlcm {
namespace {

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
ShardWriter::ShardWriter(const std::string& path, int64_t vocab_size)
    : path_(path), tmp_(path + ".tmp"), vocab_(vocab_size) {
  DLCM_CHECK(vocab_size > 0 && vocab_size <= (int64_t(1) << 31), path,
             ": vocab size must be in [1, 2^31], got ", vocab_size);
  width_ = vocab_size <= 65536 ? 2 : 4;
  f_ = std::fopen(tmp_.c_str(), "wb");
  DLCM_CHECK(f_, "cannot create ", tmp_, ": ", std::strerror(errno));
  uint8_t hdr[kShardHeaderBytes] = {};
  DLCM_CHECK(std::fwrite(hdr, 1, sizeof hdr, f_) == sizeof hdr, "error writing ", tmp_);
}

ShardWriter::~ShardWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void ShardWriter::add_document(const int32_t* ids, int64_t n) {
  DLCM_CHECK(f_, path_, ": add_document after finish()");
  buf_.resize(size_t(n) * width_);
  uint8_t* p = buf_.data();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    DLCM_CHECK(id >= 0 && id < vocab_, path_, ": token id ", id, " outside vocab [0, ", vocab_,
               ") in document ", n_docs_);
    for (int b = 0; b < width_; ++b) *p++ = uint8_t(uint32_t(id) >> (8 * b));
  }
  DLCM_CHECK(std::fwrite(buf_.data(), 1, buf_.size(), f_) == buf_.size(), "error writing ", tmp_,
             ": ", std::strerror(errno));
  n_tokens_ += n;
  n_docs_ += 1;
}

void ShardWriter::finish() {
  DLCM_CHECK(f_, path_, ": finish() called twice");
  uint8_t hdr[kShardHeaderBytes] = {};
  std::memcpy(hdr, kShardMagic, 8);
  put_u32(hdr + 8, kShardVersion);
  put_u32(hdr + 12, uint32_t(width_));
  put_u64(hdr + 16, uint64_t(vocab_));
  put_u64(hdr + 24, uint64_t(n_tokens_));
  put_u64(hdr + 32, uint64_t(n_docs_));
  bool ok = std::fseek(f_, 0, SEEK_SET) == 0 && std::fwrite(hdr, 1, sizeof hdr, f_) == sizeof hdr;
  ok = (std::fflush(f_) == 0) && ok;
  ok = (std::fclose(f_) == 0) && ok;
  f_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    fail("error writing ", tmp_, ": ", std::strerror(errno));
  }
  std::filesystem::rename(tmp_, path_);
}

// ---------------------------------------------------------------------------------------------
ShardReader::ShardReader(const std::string& path, int64_t expected_vocab) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  DLCM_CHECK(fd >= 0, "token shard ", path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("token shard ", path, ": cannot stat (", std::strerror(errno), ")");
  }
  const int64_t fsize = st.st_size;
  if (fsize < kShardHeaderBytes) {
    ::close(fd);
    fail("token shard ", path, ": truncated, file has ", fsize, " bytes but the header needs ",
         kShardHeaderBytes);
  }
  map_ = ::mmap(nullptr, size_t(fsize), PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  DLCM_CHECK(map_ != MAP_FAILED, "token shard ", path, ": mmap failed (", std::strerror(errno), ")");
  map_bytes_ = size_t(fsize);
  auto bad = [&](auto&&... a) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    fail("token shard ", path, ": ", a...);
  };
  const uint8_t* h = static_cast<const uint8_t*>(map_);
  if (std::memcmp(h, kShardMagic, 8) != 0) bad("wrong magic (not a dlcm token shard)");
  const uint32_t version = get_u32(h + 8);
  if (version != kShardVersion)
    bad("format version ", version, ", this build reads version ", kShardVersion);
  const uint32_t width = get_u32(h + 12);
  if (width != 2 && width != 4) bad("element width ", width, ", expected 2 or 4");
  const uint64_t vocab = get_u64(h + 16), ntok = get_u64(h + 24), ndoc = get_u64(h + 32);
  if (vocab == 0 || vocab > (uint64_t(1) << 31)) bad("vocab size ", vocab, " out of range");
  if (width == 2 && vocab > 65536) bad("vocab size ", vocab, " does not fit element width 2");
  if (expected_vocab >= 0 && int64_t(vocab) != expected_vocab)
    bad("vocab size ", vocab, " does not match the expected ", expected_vocab,
        " (tokenizer/model vocab)");
  if (ntok > uint64_t(fsize) / width)
    bad("token count ", ntok, " needs more bytes than the file has (", fsize, ")");
  const uint64_t need = uint64_t(kShardHeaderBytes) + ntok * width;
  if (need != uint64_t(fsize))
    bad("token count ", ntok, " x ", width, " bytes + ", kShardHeaderBytes,
        "-byte header = ", need, " bytes, but the file has ", fsize,
        need > uint64_t(fsize) ? " (truncated)" : " (trailing bytes)");
  if (ndoc > ntok) bad("document count ", ndoc, " exceeds token count ", ntok);
  vocab_ = int64_t(vocab);
  n_tokens_ = int64_t(ntok);
  n_docs_ = int64_t(ndoc);
  width_ = int(width);
  data_ = h + kShardHeaderBytes;
  ::madvise(map_, map_bytes_, MADV_RANDOM);
}

ShardReader::~ShardReader() {
  if (map_) ::munmap(map_, map_bytes_);
}

void ShardReader::read(int64_t start, int64_t n, int32_t* out) const {
  DLCM_CHECK(start >= 0 && n >= 0 && start + n <= n_tokens_, "token shard ", path_,
             ": read of [", start, ", ", start + n, ") outside [0, ", n_tokens_, ")");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = at(start + i);
    if (id < 0 || id >= vocab_)
      fail("token shard ", path_, ": token ", start + i, " has id ", id, " outside vocab [0, ",
           vocab_, ") (corrupt file)");
    out[i] = id;
  }
}

}  // namespace dlcm
