#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "core/half.h"
#include "core/json_util.h"

namespace dlcm {

// The format is little-endian on disk; we copy bytes straight into floats.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");

namespace {

using nlohmann::json;

// Headers beyond this are treated as corruption: real headers are a few hundred bytes per
// tensor, so 100 MB would mean ~10^6 tensors.
constexpr uint64_t kMaxHeader = 100ull << 20;

// Element size of every dtype the safetensors format defines (so headers written by other
// tools validate); 0 = unknown.
size_t dtype_size(const std::string& d) {
  static const std::pair<const char*, size_t> table[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  for (auto& [n, s] : table)
    if (d == n) return s;
  return 0;
}

std::string shape_str(const std::vector<i64>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

i64 numel_of(const std::vector<i64>& s) {
  i64 n = 1;
  for (i64 v : s) n *= v;
  return n;
}

// Names and values from a file go into messages cut to a readable length.
std::string excerpt(const std::string& s, size_t max_chars = 80) {
  return s.size() <= max_chars ? s : s.substr(0, max_chars) + "...";
}

bool json_nonneg_int(const json& v) {
  return v.is_number_unsigned() || (v.is_number_integer() && v.get<i64>() >= 0);
}

std::string errno_str() { return std::strerror(errno); }

// fsync a directory so that a rename inside it survives a power cut. Best effort: some
// filesystems refuse fsync on directories.
void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// RAII FILE* that also removes a temp file unless committed.
struct TempFile {
  std::string tmp;
  FILE* f = nullptr;
  bool committed = false;
  ~TempFile() {
    if (f) std::fclose(f);
    if (!committed && !tmp.empty()) ::unlink(tmp.c_str());
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Reading

SafeTensorsFile::SafeTensorsFile(const std::string& path) : path_(path) {
  const std::string& P = path_;
  int fd = ::open(P.c_str(), O_RDONLY | O_CLOEXEC);
  DLCM_CHECK(fd >= 0, P, ": cannot open safetensors file: ", errno_str());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(P, S_ISDIR(st.st_mode) ? ": is a directory; expected a .safetensors file"
                                : ": not a regular file; expected a .safetensors file");
  }
  const uint64_t fsize = uint64_t(st.st_size);
  if (fsize < 8) {
    ::close(fd);
    fail(P, ": file is too short (", fsize,
         " bytes) to be safetensors; it needs at least the 8-byte header length "
         "(truncated or not a safetensors file?)");
  }
  void* m = ::mmap(nullptr, fsize, PROT_READ, MAP_PRIVATE, fd, 0);
  int merr = errno;
  ::close(fd);  // the mapping keeps the file alive
  DLCM_CHECK(m != MAP_FAILED, P, ": cannot map file: ", std::strerror(merr));
  map_ = std::shared_ptr<const uint8_t>(static_cast<const uint8_t*>(m),
                                        [fsize](const uint8_t* q) {
                                          ::munmap(const_cast<uint8_t*>(q), fsize);
                                        });
  const uint8_t* base = map_.get();

  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | base[i];
  DLCM_CHECK(hlen <= kMaxHeader, P, ": header length ", hlen,
             " bytes is absurdly large (limit 100 MB); the file is corrupt or not safetensors");
  DLCM_CHECK(hlen <= fsize - 8, P, ": truncated header: the header length says ", hlen,
             " bytes but only ", fsize - 8, " follow (incomplete download or copy?)");
  DLCM_CHECK(hlen >= 2, P, ": header of ", hlen, " bytes cannot hold a JSON object");

  // The format nests three levels (header object, tensor entry, shape/offsets array).
  const std::string_view text(reinterpret_cast<const char*>(base + 8), size_t(hlen));
  json h = parse_json_bounded(text, P + ": header", JsonLimits{3, size_t(kMaxHeader)});
  DLCM_CHECK(h.is_object(), P, ": header must be a JSON object of tensors, got ", h.type_name());
  {
    // nlohmann keeps the last of duplicate keys; two entries for one tensor name mean a
    // corrupt or crafted header, so find them (second pass, keys only).
    std::set<std::string> seen;
    std::string dup;
    json::parser_callback_t keys = [&](int depth, json::parse_event_t ev, json& parsed) {
      if (ev == json::parse_event_t::key && depth == 1 && dup.empty() &&
          !seen.insert(parsed.get<std::string>()).second)
        dup = parsed.get<std::string>();
      return ev != json::parse_event_t::value || depth <= 1;  // keep no values
    };
    const json skeleton = json::parse(text, keys);  // keys only: the values were discarded
    DLCM_CHECK(dup.empty(), P, ": header names tensor '", excerpt(dup),
               "' twice (corrupt header)");
  }

  const uint64_t dsize = fsize - 8 - hlen;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      DLCM_CHECK(e.is_object(), P, ": __metadata__ must be an object of string to string, got ",
                 e.type_name());
      for (auto m = e.begin(); m != e.end(); ++m) {
        DLCM_CHECK(m.value().is_string(), P, ": __metadata__ value for '", excerpt(m.key()),
                   "' must be a string, got ", json_excerpt(m.value()));
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string T = P + ": tensor '" + excerpt(name) + "'";
    DLCM_CHECK(e.is_object(), T, ": header entry must be an object with dtype, shape and "
               "data_offsets, got ", e.type_name());
    DLCM_CHECK(e.contains("dtype") && e["dtype"].is_string(), T, ": missing or non-string 'dtype'");
    DLCM_CHECK(e.contains("shape") && e["shape"].is_array(), T, ": missing or non-array 'shape'");
    DLCM_CHECK(e.contains("data_offsets") && e["data_offsets"].is_array(), T,
               ": missing or non-array 'data_offsets'");
    TensorEntry te;
    te.dtype = e["dtype"].get<std::string>();
    const size_t es = dtype_size(te.dtype);
    DLCM_CHECK(es != 0, T, ": unknown dtype \"", excerpt(te.dtype),
               "\" (expected one of F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL, ...)");
    // Byte count from the shape, saturated so that absurd shapes cannot overflow. The product
    // of the non-zero dimensions must fit too: code multiplies dimensions in i64.
    DLCM_CHECK(e["shape"].size() <= 16, T, ": shape has ", e["shape"].size(),
               " dimensions (at most 16)");
    unsigned __int128 bytes = es, nonzero = 1;
    for (const json& d : e["shape"]) {
      DLCM_CHECK(json_nonneg_int(d), T, ": shape must be a list of non-negative integers, got ",
                 json_excerpt(e["shape"]));
      uint64_t v = d.get<uint64_t>();
      DLCM_CHECK(v <= uint64_t(INT64_MAX), T, ": shape dimension ", v, " is too large");
      te.shape.push_back(i64(v));
      bytes *= v;
      if (bytes > (unsigned __int128)(UINT64_MAX)) bytes = (unsigned __int128)(UINT64_MAX);
      if (v && nonzero <= (unsigned __int128)(uint64_t(1) << 62)) nonzero *= v;
    }
    // Without a zero dimension the byte count below bounds the product; with one, it does not.
    DLCM_CHECK(bytes > 0 || nonzero <= (unsigned __int128)(uint64_t(1) << 62), T, ": shape ",
               json_excerpt(e["shape"]), " has too many elements");
    const json& off = e["data_offsets"];
    DLCM_CHECK(off.size() == 2 && json_nonneg_int(off[0]) && json_nonneg_int(off[1]), T,
               ": data_offsets must be two non-negative integers [begin, end], got ",
               json_excerpt(off));
    uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    DLCM_CHECK(b <= en, T, ": data_offsets [", b, ", ", en, "] end before they begin");
    DLCM_CHECK(en <= dsize, T, ": data_offsets [", b, ", ", en,
               "] are out of bounds: the data section has only ", dsize,
               " bytes (truncated file?)");
    DLCM_CHECK(bytes == (unsigned __int128)(en - b), T, ": dtype ", te.dtype, " and shape ",
               shape_str(te.shape), " need ", uint64_t(bytes), " bytes but data_offsets [", b,
               ", ", en, "] span ", en - b, " bytes (byte size mismatch)");
    te.begin = b;
    te.end = en;
    entries_.emplace(name, std::move(te));
  }

  // Overlap check: sort extents by start; each must begin at or after the previous end.
  std::vector<std::pair<const std::string*, const TensorEntry*>> order;
  for (auto& [n, te] : entries_)
    if (te.end > te.begin) order.push_back({&n, &te});
  std::sort(order.begin(), order.end(),
            [](auto& a, auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    DLCM_CHECK(order[i].second->begin >= order[i - 1].second->end, P, ": tensors '",
               excerpt(*order[i - 1].first), "' [", order[i - 1].second->begin, ", ",
               order[i - 1].second->end, ") and '", excerpt(*order[i].first), "' [",
               order[i].second->begin, ", ", order[i].second->end,
               ") overlap in the data section (corrupt header)");

  data_ = base + 8 + hlen;
}

void SafeTensorsFile::read_f32(const std::string& name, const std::vector<i64>& shape,
                               float* out) const {
  auto it = entries_.find(name);
  DLCM_CHECK(it != entries_.end(), path_, ": missing tensor '", name, "'");
  const TensorEntry& te = it->second;
  DLCM_CHECK(te.shape == shape, path_, ": tensor '", name, "' has shape ", shape_str(te.shape),
             ", expected ", shape_str(shape), " (does the config match the checkpoint?)");
  const uint8_t* src = data_ + te.begin;
  const i64 n = numel_of(te.shape);
  if (te.dtype == "F32") {
    if (n) std::memcpy(out, src, size_t(n) * 4);
  } else if (te.dtype == "BF16" || te.dtype == "F16") {
    const bool bf = te.dtype == "BF16";
    for (i64 i = 0; i < n; ++i) {
      uint16_t v;
      std::memcpy(&v, src + 2 * i, 2);
      out[i] = bf ? bf16_bits_to_f32(v) : f16_bits_to_f32(v);
    }
  } else {
    fail(path_, ": tensor '", name, "' has dtype ", te.dtype,
         "; only F32, BF16 and F16 can be read as float");
  }
}

std::vector<float> SafeTensorsFile::read_f32(const std::string& name) const {
  auto it = entries_.find(name);
  DLCM_CHECK(it != entries_.end(), path_, ": missing tensor '", name, "'");
  std::vector<float> out(size_t(numel_of(it->second.shape)));
  read_f32(name, it->second.shape, out.data());
  return out;
}

std::vector<i32> SafeTensorsFile::read_i32(const std::string& name) const {
  auto it = entries_.find(name);
  DLCM_CHECK(it != entries_.end(), path_, ": missing tensor '", name, "'");
  const TensorEntry& te = it->second;
  const i64 n = numel_of(te.shape);
  const uint8_t* src = data_ + te.begin;
  std::vector<i32> out(static_cast<size_t>(n));
  if (te.dtype == "I32") {
    if (n) std::memcpy(out.data(), src, size_t(n) * 4);
  } else if (te.dtype == "I64") {
    for (i64 i = 0; i < n; ++i) {
      int64_t v;
      std::memcpy(&v, src + 8 * i, 8);
      DLCM_CHECK(v >= INT32_MIN && v <= INT32_MAX, path_, ": tensor '", name, "' element ", i,
                 " = ", v, " does not fit in int32");
      out[i] = i32(v);
    }
  } else {
    fail(path_, ": tensor '", name, "' has dtype ", te.dtype,
         "; only I32 and I64 can be read as integers");
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Writing

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps tensors in the caller's order, which matches the data layout.
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  std::set<std::string> seen;
  uint64_t off = 0;
  for (const TensorToWrite& t : tensors) {
    DLCM_CHECK(!t.name.empty() && t.name != "__metadata__", path, ": invalid tensor name '",
               t.name, "'");
    DLCM_CHECK(seen.insert(t.name).second, path, ": duplicate tensor name '", t.name, "'");
    DLCM_CHECK(!(t.data && t.data_i32), "internal: tensor '", t.name,
               "' has both float and int data");
    for (i64 d : t.shape)
      DLCM_CHECK(d >= 0, "internal: tensor '", t.name, "' has negative dimension");
    DLCM_CHECK(t.dtype == "F32" || (!t.data_i32 && (t.dtype == "BF16" || t.dtype == "F16")),
               "internal: tensor '", t.name, "' cannot be written as ", t.dtype);
    const uint64_t bytes = uint64_t(numel_of(t.shape)) * (t.dtype == "F32" ? 4 : 2);
    DLCM_CHECK(bytes == 0 || t.data || t.data_i32, "internal: tensor '", t.name, "' has no data");
    if (t.dtype == "F16")
      for (i64 i = 0, n = numel_of(t.shape); i < n; ++i)
        DLCM_CHECK(!std::isfinite(t.data[i]) || std::isfinite(f16_bits_to_f32(f32_to_f16_bits(t.data[i]))),
                   path, ": tensor '", t.name, "' element ", i, " = ", t.data[i],
                   " is beyond the F16 range (|x| <= 65504); write it as BF16 or F32");
    h[t.name] = {{"dtype", t.data_i32 ? "I32" : t.dtype},
                 {"shape", t.shape},
                 {"data_offsets", {off, off + bytes}}};
    off += bytes;
  }
  std::string htext = h.dump();
  // Pad with spaces so the data section starts 8-byte aligned (as the reference writer does).
  htext.append((8 - htext.size() % 8) % 8, ' ');

  namespace fs = std::filesystem;
  TempFile tf;
  tf.tmp = path + ".tmp-" + std::to_string(::getpid());
  tf.f = std::fopen(tf.tmp.c_str(), "wb");
  DLCM_CHECK(tf.f, path, ": cannot create temporary file ", tf.tmp, ": ", errno_str(),
             " (does the directory exist and is it writable?)");
  auto put = [&](const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, tf.f) != n)
      fail(path, ": write failed: ", errno_str(), " (disk full?)");
  };
  uint8_t lenbuf[8];
  for (int i = 0; i < 8; ++i) lenbuf[i] = uint8_t(uint64_t(htext.size()) >> (8 * i));
  put(lenbuf, 8);
  put(htext.data(), htext.size());
  std::vector<uint16_t> half;  // 16-bit data, converted a block at a time
  for (const TensorToWrite& t : tensors) {
    const i64 n = numel_of(t.shape);
    if (t.dtype == "F32") {
      put(t.data_i32 ? static_cast<const void*>(t.data_i32) : static_cast<const void*>(t.data),
          size_t(n) * 4);
      continue;
    }
    const bool bf = t.dtype == "BF16";
    constexpr i64 kBlock = 1 << 16;
    half.resize(size_t(std::min(n, kBlock)));
    for (i64 a = 0; a < n; a += kBlock) {
      const i64 m = std::min(kBlock, n - a);
      for (i64 i = 0; i < m; ++i)
        half[i] = bf ? f32_to_bf16_bits(t.data[a + i]) : f32_to_f16_bits(t.data[a + i]);
      put(half.data(), size_t(m) * 2);
    }
  }
  DLCM_CHECK(std::fflush(tf.f) == 0, path, ": write failed: ", errno_str(), " (disk full?)");
  DLCM_CHECK(::fsync(::fileno(tf.f)) == 0, path, ": fsync failed: ", errno_str());
  int rc = std::fclose(tf.f);
  tf.f = nullptr;
  DLCM_CHECK(rc == 0, path, ": close failed: ", errno_str());
  DLCM_CHECK(std::rename(tf.tmp.c_str(), path.c_str()) == 0, path, ": cannot rename ", tf.tmp,
             " into place: ", errno_str());
  tf.committed = true;
  fsync_dir(fs::path(path).parent_path().string());
}

void save_params(const std::string& path, const ParamStore& ps) {
  std::vector<TensorToWrite> ts;
  ts.reserve(ps.params().size());
  for (const Param& p : ps.params()) {
    DLCM_CHECK(p.w, "internal: save_params before ParamStore::finalize (", p.name, ")");
    ts.push_back({p.name, p.shape, p.w, nullptr});
  }
  // "format: pt" lets safetensors.torch.load_file and HF tooling accept the file as is.
  write_safetensors(path, ts, {{"format", "pt"}});
}

namespace {

std::string list_names(const std::vector<std::string>& names) {
  std::string s;
  const size_t show = std::min<size_t>(names.size(), 8);
  for (size_t i = 0; i < show; ++i) s += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > show) s += " and " + std::to_string(names.size() - show) + " more";
  return s;
}

}  // namespace

void check_tensor_set(const SafeTensorsFile& f, const std::vector<std::string>& expected) {
  std::set<std::string> want(expected.begin(), expected.end());
  std::vector<std::string> missing;
  for (const std::string& n : expected)
    if (!f.has(n)) missing.push_back(n);
  DLCM_CHECK(missing.empty(), f.path(), ": missing tensor", missing.size() > 1 ? "s " : " ",
             list_names(missing), " (does the config match the checkpoint?)");
  for (auto& [n, te] : f.entries())
    DLCM_CHECK(want.count(n), f.path(), ": unexpected tensor '", excerpt(n),
               "' in file (does the config match the checkpoint?)");
}

void load_params(const std::string& path, ParamStore& ps) {
  SafeTensorsFile f(path);
  std::vector<std::string> names;
  for (const Param& p : ps.params()) names.push_back(p.name);
  check_tensor_set(f, names);
  for (Param& p : ps.params()) {
    DLCM_CHECK(p.w, "internal: load_params before ParamStore::finalize (", p.name, ")");
    f.read_f32(p.name, p.shape, p.w);
    const i64 i = first_nonfinite(p.w, p.numel);
    DLCM_CHECK(i < 0, path, ": tensor '", p.name, "' holds a non-finite value (", p.w[std::max<i64>(i, 0)],
               " at element ", i, "); the weights are corrupt or come from a diverged run");
  }
}

}  // namespace dlcm
