#include "core/gguf.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <filesystem>
#include <type_traits>

#include "core/half.h"

namespace dlcm {

namespace {

// GGUF value types (gguf_type in ggml).
enum : uint32_t {
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
};
constexpr uint32_t kVersion = 3;
constexpr uint32_t kDefaultAlignment = 32;
constexpr i64 kQ8BlockBytes = 2 + kQ8BlockSize;

// Little-endian byte sink over a FILE*, naming the file on errors.
struct Sink {
  FILE* f;
  const std::string& path;
  uint64_t written = 0;
  void put(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n)
      fail(path, ": write failed: ", std::strerror(errno), " (disk full?)");
    written += n;
  }
  template <typename T>
  void num(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // x86-64 and aarch64 are little-endian, as GGUF is
    put(b, sizeof(T));
  }
  void str(const std::string& s) {
    num<uint64_t>(s.size());
    put(s.data(), s.size());
  }
  void pad_to(uint64_t align) {
    static const uint8_t zeros[256] = {};
    while (written % align) put(zeros, size_t(std::min<uint64_t>(align - written % align, 256)));
  }
};

i64 tensor_bytes(GgmlType t, i64 n) {
  switch (t) {
    case GgmlType::F32: return 4 * n;
    case GgmlType::F16:
    case GgmlType::BF16: return 2 * n;
    case GgmlType::Q8_0: return n / kQ8BlockSize * kQ8BlockBytes;
  }
  return 0;
}

}  // namespace

GgmlType parse_ggml_type(const std::string& name, const std::string& flag) {
  if (name == "f32") return GgmlType::F32;
  if (name == "f16") return GgmlType::F16;
  if (name == "bf16") return GgmlType::BF16;
  if (name == "q8_0") return GgmlType::Q8_0;
  fail(flag, ": expected f32, f16, bf16 or q8_0, got \"", name, "\"");
}

const char* ggml_type_name(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::BF16: return "bf16";
    case GgmlType::Q8_0: return "q8_0";
  }
  return "?";
}

void quantize_q8_0(const float* x, i64 n, std::vector<uint8_t>& out) {
  DLCM_CHECK(n % kQ8BlockSize == 0, "internal: quantize_q8_0 of ", n,
             " values, not a multiple of ", kQ8BlockSize);
  const size_t base = out.size();
  out.resize(base + size_t(n / kQ8BlockSize * kQ8BlockBytes));
  uint8_t* o = out.data() + base;
  for (i64 b = 0; b < n; b += kQ8BlockSize, o += kQ8BlockBytes) {
    float amax = 0;
    for (i64 j = 0; j < kQ8BlockSize; ++j) amax = std::max(amax, std::fabs(x[b + j]));
    // As ggml's reference: the values are scaled by 1/d of the float d, not of its f16
    // rounding, and rounded half away from zero.
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16_bits(d);
    std::memcpy(o, &dh, 2);
    for (i64 j = 0; j < kQ8BlockSize; ++j) o[2 + j] = uint8_t(int8_t(std::round(x[b + j] * id)));
  }
}

void GgufWriter::set(const std::string& key, Value v) {
  DLCM_CHECK(!key.empty(), "internal: empty GGUF key");
  for (auto& [k, _] : kv_) DLCM_CHECK(k != key, "internal: GGUF key '", key, "' set twice");
  kv_.emplace_back(key, std::move(v));
}
void GgufWriter::set_u32(const std::string& k, uint32_t v) { set(k, v); }
void GgufWriter::set_i32(const std::string& k, int32_t v) { set(k, v); }
void GgufWriter::set_f32(const std::string& k, float v) { set(k, v); }
void GgufWriter::set_bool(const std::string& k, bool v) { set(k, v); }
void GgufWriter::set_string(const std::string& k, const std::string& v) { set(k, v); }
void GgufWriter::set_strings(const std::string& k, std::vector<std::string> v) {
  set(k, std::move(v));
}
void GgufWriter::set_f32s(const std::string& k, std::vector<float> v) { set(k, std::move(v)); }
void GgufWriter::set_i32s(const std::string& k, std::vector<int32_t> v) { set(k, std::move(v)); }

void GgufWriter::add_tensor(const std::string& name, std::vector<i64> shape,
                            std::vector<float> data, GgmlType type) {
  DLCM_CHECK(!name.empty() && name.size() < 64, "internal: GGUF tensor name '", name,
             "' must have 1-63 bytes (ggml's limit)");
  for (auto& t : tensors_)
    DLCM_CHECK(t.name != name, "internal: GGUF tensor '", name, "' added twice");
  DLCM_CHECK(!shape.empty() && shape.size() <= 4, "internal: GGUF tensor '", name,
             "' needs 1-4 dims, got ", shape.size());
  i64 n = 1;
  for (i64 d : shape) {
    DLCM_CHECK(d > 0, "internal: GGUF tensor '", name, "' has a dim of ", d);
    n *= d;
  }
  DLCM_CHECK(i64(data.size()) == n, "internal: GGUF tensor '", name, "' has ", data.size(),
             " values for ", n, " elements");
  DLCM_CHECK(type != GgmlType::Q8_0 || shape.back() % kQ8BlockSize == 0, "tensor '", name,
             "': q8_0 needs rows of a multiple of ", kQ8BlockSize, " values, got ", shape.back());
  const i64 bad = first_nonfinite(data.data(), n);
  DLCM_CHECK(bad < 0, "tensor '", name, "' has a non-finite value at element ", bad,
             " (a diverged checkpoint?)");
  // F16 values, and Q8_0 scales max|x| / 127, must fit in f16.
  const float limit = type == GgmlType::F16 ? 65520.0f : type == GgmlType::Q8_0 ? 65520.0f * 127 : INFINITY;
  for (i64 i = 0; i < n; ++i)
    DLCM_CHECK(std::fabs(data[i]) < limit, "tensor '", name, "': value ", data[i], " at element ", i,
               " is too large for ", ggml_type_name(type), " (f16 range); use --dtype bf16 or f32");
  tensors_.push_back({name, std::move(shape), std::move(data), type});
}

uint32_t GgufWriter::alignment() const {
  for (auto& [k, v] : kv_)
    if (k == "general.alignment") {
      const uint32_t* a = std::get_if<uint32_t>(&v);
      DLCM_CHECK(a && *a >= 8 && (*a & (*a - 1)) == 0,
                 "internal: general.alignment must be a u32 power of two >= 8");
      return *a;
    }
  return kDefaultAlignment;
}

void GgufWriter::write(const std::string& path) const {
  const uint64_t align = alignment();
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  DLCM_CHECK(f, path, ": cannot create temporary file ", tmp, ": ", std::strerror(errno),
             " (does the folder exist and is it writable?)");
  bool committed = false;
  struct Cleanup {
    FILE*& f;
    const std::string& tmp;
    bool& committed;
    ~Cleanup() {
      if (f) std::fclose(f);
      if (!committed) ::unlink(tmp.c_str());
    }
  } cleanup{f, tmp, committed};

  Sink s{f, path};
  s.put("GGUF", 4);
  s.num<uint32_t>(kVersion);
  s.num<uint64_t>(tensors_.size());
  s.num<uint64_t>(kv_.size());
  for (auto& [key, v] : kv_) {
    s.str(key);
    std::visit(
        [&](auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, uint32_t>) {
            s.num<uint32_t>(kU32), s.num<uint32_t>(x);
          } else if constexpr (std::is_same_v<T, int32_t>) {
            s.num<uint32_t>(kI32), s.num<int32_t>(x);
          } else if constexpr (std::is_same_v<T, float>) {
            s.num<uint32_t>(kF32), s.num<float>(x);
          } else if constexpr (std::is_same_v<T, bool>) {
            s.num<uint32_t>(kBool), s.num<uint8_t>(x ? 1 : 0);
          } else if constexpr (std::is_same_v<T, std::string>) {
            s.num<uint32_t>(kString), s.str(x);
          } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            s.num<uint32_t>(kArray), s.num<uint32_t>(kString), s.num<uint64_t>(x.size());
            for (auto& e : x) s.str(e);
          } else if constexpr (std::is_same_v<T, std::vector<float>>) {
            s.num<uint32_t>(kArray), s.num<uint32_t>(kF32), s.num<uint64_t>(x.size());
            s.put(x.data(), x.size() * 4);
          } else {
            s.num<uint32_t>(kArray), s.num<uint32_t>(kI32), s.num<uint64_t>(x.size());
            s.put(x.data(), x.size() * 4);
          }
        },
        v);
  }
  uint64_t off = 0;
  for (const Tensor& t : tensors_) {
    s.str(t.name);
    s.num<uint32_t>(uint32_t(t.shape.size()));
    for (size_t d = t.shape.size(); d-- > 0;) s.num<uint64_t>(uint64_t(t.shape[d]));
    s.num<uint32_t>(uint32_t(t.type));
    s.num<uint64_t>(off);
    off += uint64_t(tensor_bytes(t.type, i64(t.data.size())));
    off = (off + align - 1) / align * align;
  }
  s.pad_to(align);
  const uint64_t data_start = s.written;
  std::vector<uint8_t> buf;
  for (const Tensor& t : tensors_) {
    const i64 n = i64(t.data.size());
    buf.clear();
    switch (t.type) {
      case GgmlType::F32:
        buf.resize(size_t(n) * 4);
        std::memcpy(buf.data(), t.data.data(), buf.size());
        break;
      case GgmlType::F16:
      case GgmlType::BF16:
        buf.resize(size_t(n) * 2);
        for (i64 i = 0; i < n; ++i) {
          const uint16_t h = t.type == GgmlType::F16 ? f32_to_f16_bits(t.data[i])
                                                     : f32_to_bf16_bits(t.data[i]);
          std::memcpy(buf.data() + 2 * i, &h, 2);
        }
        break;
      case GgmlType::Q8_0: quantize_q8_0(t.data.data(), n, buf); break;
    }
    s.put(buf.data(), buf.size());
    s.pad_to(align);
  }
  DLCM_CHECK(s.written - data_start == off, "internal: GGUF data section is ",
             s.written - data_start, " bytes, tensor infos say ", off);
  DLCM_CHECK(std::fflush(f) == 0, path, ": write failed: ", std::strerror(errno), " (disk full?)");
  DLCM_CHECK(::fsync(::fileno(f)) == 0, path, ": fsync failed: ", std::strerror(errno));
  const int rc = std::fclose(f);
  f = nullptr;
  DLCM_CHECK(rc == 0, path, ": close failed: ", std::strerror(errno));
  DLCM_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, path, ": cannot rename ", tmp,
             " into place: ", std::strerror(errno));
  committed = true;
}

}  // namespace dlcm
