// safetensors reading and writing (SPEC section 9): 8-byte little-endian header length, JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data.
// Readers validate everything and name the file and the tensor at fault.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/common.h"
#include "core/params.h"

namespace dlcm {

struct TensorEntry {
  std::string dtype;  // "F32", "BF16", "I32", ...
  std::vector<i64> shape;
  size_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafeTensorsFile {
 public:
  // Reads and validates the whole file (header length sane and within file, JSON valid,
  // offsets in bounds, non-overlapping, sizes matching dtype*shape).
  explicit SafeTensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  const std::map<std::string, TensorEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Copies tensor `name` into out as float32 (F32, BF16 or F16 source) after checking its shape
  // equals `shape`; errors name the file, tensor, expected and found shapes.
  void read_f32(const std::string& name, const std::vector<i64>& shape, float* out) const;
  std::vector<float> read_f32(const std::string& name) const;  // any shape
  std::vector<i32> read_i32(const std::string& name) const;    // I32 or I64 source

 private:
  std::string path_;
  std::map<std::string, TensorEntry> entries_;
  std::map<std::string, std::string> metadata_;
  // The file is memory-mapped read-only (shared so the class stays copyable); data_ points
  // at the data section inside the mapping. Writers replace files by rename, so a mapping
  // never sees a file change under it.
  std::shared_ptr<const uint8_t> map_;
  const uint8_t* data_ = nullptr;
};

struct TensorToWrite {
  std::string name;
  std::vector<i64> shape;
  const float* data = nullptr;  // F32
  const i32* data_i32 = nullptr;  // or I32 (exactly one of the two)
  // On disk, float data is "F32", or rounded to nearest even into "BF16" or "F16" (a value
  // beyond F16's range is an error naming the tensor).
  std::string dtype = "F32";
};

// Writes path atomically (temp file in the same directory, fsync, rename).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Checks that f holds exactly the tensors named in `expected`: lists missing ones by name and
// rejects extra ones ("does the config match the checkpoint?").
void check_tensor_set(const SafeTensorsFile& f, const std::vector<std::string>& expected);

// All parameters of a store, by their names (SPEC section 9 names).
void save_params(const std::string& path, const ParamStore& ps);
// Loads every parameter of ps from path; missing tensors, unexpected extra tensors and shape
// mismatches are errors naming the tensor.
void load_params(const std::string& path, ParamStore& ps);

}  // namespace dlcm
