// Shared by the libFuzzer harnesses: a per-process scratch folder for inputs that the code under
// test reads from files. A harness passes when every input either succeeds or throws
// dlcm::Error; anything else (a crash, a sanitizer report, another exception type escaping,
// a leak) is a finding.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "core/common.h"

namespace dlcm::fuzz {

inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("dlcm-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

// Writes data to scratch_dir()/name and returns the path.
inline std::string write_scratch(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch_dir() + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

inline std::string write_scratch(const std::string& name, const std::string& text) {
  return write_scratch(name, reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

// A harness whose input is one file in a folder of its own: writes data to
// scratch_dir()/folder/file and calls read(scratch_dir()/folder), where a dlcm::Error is a pass.
template <class Read>
void read_file_input(const char* folder, const char* file, const uint8_t* data, size_t size,
                     Read read) {
  const std::string dir = scratch_dir() + "/" + folder;
  std::filesystem::create_directories(dir);
  write_scratch(std::string(folder) + "/" + file, data, size);
  try {
    read(dir);
  } catch (const Error&) {
  }
}

}  // namespace dlcm::fuzz
