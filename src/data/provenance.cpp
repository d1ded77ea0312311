#include "data/provenance.h"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/build_info.h"
#include "core/common.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Process {
  std::mutex mu;
  std::vector<std::string> argv;
  std::string start;
};
Process& process() {
  static Process p;
  return p;
}

uint64_t fnv1a64(const char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ uint8_t(p[i])) * 0x100000001b3ull;
  return h;
}

std::string hex64(uint64_t h) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", (unsigned long long)h);
  return b;
}

std::string start_time() {
  Process& p = process();
  std::lock_guard<std::mutex> g(p.mu);
  if (p.start.empty()) p.start = utc_time_iso();
  return p.start;
}

}  // namespace

void set_command_line(int argc, const char* const* argv) {
  Process& p = process();
  std::lock_guard<std::mutex> g(p.mu);
  p.argv.assign(argv, argv + argc);
  p.start = utc_time_iso();
}

const std::vector<std::string>& command_line() { return process().argv; }

std::string utc_time_iso() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

json cpu_json() {
  std::string model = "unknown";
  std::vector<std::string> flags;
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
    if (key == "model name" && model == "unknown") model = value;
    if (key == "flags" && flags.empty()) {
      std::istringstream is(value);
      for (std::string w; is >> w;) flags.push_back(w);
    }
  }
  // The extensions that decide which kernels run and how fast (docs/design.md).
  static const char* kIsa[] = {"sse4_2",      "avx",         "avx2",        "fma",
                               "f16c",        "avx512f",     "avx512bw",    "avx512vl",
                               "avx512dq",    "avx512_vnni", "avx512_bf16", "avx512_fp16",
                               "amx_tile",    "amx_bf16",    "amx_int8"};
  json isa = json::array();
  for (const char* x : kIsa)
    if (std::find(flags.begin(), flags.end(), x) != flags.end()) isa.push_back(x);
  return {{"model", model},
          {"logical_cpus", std::thread::hardware_concurrency()},
          {"isa", isa}};
}

json library_versions_json() {
  const BuildInfo& b = build_info();
  return {{"onednn", ops::onednn_version()},
          {"sentencepiece", b.sentencepiece},
          {"openmp", b.openmp},
          {"compiler", b.compiler}};
}

json data_fingerprint(const std::string& data_dir) {
  const fs::path dir(data_dir);
  const std::string meta_path = (dir / "meta.json").string();
  std::ifstream mf(meta_path, std::ios::binary);
  DLCM_CHECK(mf, meta_path, ": cannot read the data folder's meta.json (for the run's provenance)");
  const std::string meta((std::istreambuf_iterator<char>(mf)), {});
  json j = {{"dir", data_dir}, {"meta_fnv1a64", hex64(fnv1a64(meta.data(), meta.size()))}};
  try {
    const json m = json::parse(meta);
    if (m.is_object() && m.contains("created")) j["created"] = m["created"];
  } catch (const json::exception&) {
    // the hash above still identifies the file; open_data_dir reports it as malformed
  }
  json shards = json::object();
  for (const char* name : {"train.bin", "val.bin"}) {
    const std::string p = (dir / name).string();
    std::error_code ec;
    const auto bytes = fs::file_size(p, ec);
    if (ec) continue;  // a folder may lack a split; the reader reports that where it matters
    char head[64] = {0};
    std::ifstream sf(p, std::ios::binary);
    sf.read(head, sizeof head);
    shards[name] = {{"bytes", uint64_t(bytes)},
                    {"header_fnv1a64", hex64(fnv1a64(head, size_t(sf.gcount())))}};
  }
  j["shards"] = shards;
  return j;
}

json provenance_json(const std::string& data_dir) {
  const BuildInfo& b = build_info();
  json j = {{"version", b.version},
            {"git_commit", b.git_commit},
            {"git_dirty", b.git_dirty},
            {"build",
             {{"type", b.build_type}, {"compiler", b.compiler}, {"flags", b.cxx_flags},
              {"isa", b.isa},
              {"kernels", ops::isa_name(ops::isa())}}},
            {"command", command_line()},
            {"libraries", library_versions_json()},
            {"cpu", cpu_json()},
            {"threads", omp_get_max_threads()},
            {"start", start_time()}};
  if (!data_dir.empty()) j["data"] = data_fingerprint(data_dir);
  return j;
}

std::string version_text() {
  const BuildInfo& b = build_info();
  const json cpu = cpu_json();
  std::string isa, cpu_isa;
  // (no `s += sep + x`: GCC 12 warns about it with a false -Wrestrict)
  auto join = [](std::string& s, const std::string& x) { s += s.empty() ? x : " " + x; };
  for (const auto& x : b.isa) join(isa, x);
  for (const auto& x : cpu["isa"]) join(cpu_isa, x.get<std::string>());
  std::ostringstream os;
  os << "dlcm " << b.version << "\n"
     << "commit   " << b.git_commit << (b.git_dirty ? " (dirty: uncommitted changes)" : "") << "\n"
     << "build    " << b.build_type << ", " << b.compiler << "\n"
     << "flags    " << b.cxx_flags << "\n"
     << "isa      built for: " << (isa.empty() ? "baseline x86-64" : isa) << "\n"
     << "kernels  " << ops::isa_summary() << "\n"
     << "cpu      " << cpu["model"].get<std::string>() << ": " << cpu_isa << "\n"
     << "libs     oneDNN " << ops::onednn_version() << ", SentencePiece " << b.sentencepiece
     << ", OpenMP " << b.openmp << "\n";
  return os.str();
}

}  // namespace dlcm
