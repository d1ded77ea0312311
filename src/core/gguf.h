// GGUF v3 writing (the model file of llama.cpp / ggml). Layout, all little-endian:
//   "GGUF", u32 version 3, u64 tensor count, u64 key/value count,
//   key/values: string key, u32 value type, value (strings: u64 length + bytes; arrays: u32
//               element type, u64 count, elements),
//   tensor infos: string name, u32 n_dims, u64 ne[n_dims] INNERMOST FIRST (ne[0] = columns of a
//               row-major [rows, cols] matrix), u32 ggml type, u64 offset into the data section,
//   padding to general.alignment (32 unless set), then each tensor's data, each padded to it.
// Tensor data is converted from float32 when the file is written: F32, F16 (IEEE half, nearest
// even), BF16 (nearest even) or Q8_0 (blocks of 32 along a row: f16 scale d = max|x| / 127 and
// 32 int8 q = round(x / d), half away from zero; ggml's reference quantizer).
#pragma once
#include <string>
#include <variant>
#include <vector>

#include "core/common.h"

namespace dlcm {

// ggml tensor types written here (ggml's numbering).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30 };
// "f32" | "f16" | "bf16" | "q8_0"; anything else is an Error naming `flag`.
GgmlType parse_ggml_type(const std::string& name, const std::string& flag);
const char* ggml_type_name(GgmlType t);
constexpr i64 kQ8BlockSize = 32;  // values per Q8_0 block (2-byte scale + 32 bytes)

// F16 and BF16 data come from core/half.h (nearest even). Q8_0:
// n values (a multiple of 32) -> n / 32 blocks of 34 bytes appended to out.
void quantize_q8_0(const float* x, i64 n, std::vector<uint8_t>& out);

class GgufWriter {
 public:
  // Metadata, written in the order set; a key set twice is an Error.
  void set_u32(const std::string& key, uint32_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_strings(const std::string& key, std::vector<std::string> v);
  void set_f32s(const std::string& key, std::vector<float> v);
  void set_i32s(const std::string& key, std::vector<int32_t> v);

  // A tensor of float32 values, shape outermost first as dlcm stores it ({rows, cols}); it is
  // written as `type` with the dims reversed. Q8_0 needs the innermost dim divisible by 32.
  // Values must be finite (the error names the tensor).
  void add_tensor(const std::string& name, std::vector<i64> shape, std::vector<float> data,
                  GgmlType type);

  // The alignment of the data section (general.alignment when set, else 32).
  uint32_t alignment() const;
  // The whole file, written atomically to path (temp file in the same folder, fsync, rename).
  void write(const std::string& path) const;

 private:
  using Value = std::variant<uint32_t, int32_t, float, bool, std::string, std::vector<std::string>,
                             std::vector<float>, std::vector<int32_t>>;
  struct Tensor {
    std::string name;
    std::vector<i64> shape;
    std::vector<float> data;
    GgmlType type;
  };
  void set(const std::string& key, Value v);
  std::vector<std::pair<std::string, Value>> kv_;
  std::vector<Tensor> tensors_;
};

}  // namespace dlcm
