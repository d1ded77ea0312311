#include "models/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/json_util.h"
#include "core/safetensors.h"
#include "models/model.h"

namespace dlcm {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// "runs/x/" and "runs/x" must name the same sibling temp directories.
std::string normalize_dir(const std::string& dir) {
  DLCM_CHECK(!dir.empty(), "checkpoint directory name is empty");
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

std::string join(const std::string& dir, const char* file) { return (fs::path(dir) / file).string(); }

void fsync_path(const std::string& p, bool directory) {
  int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);  // best effort on directories (some filesystems refuse)
  ::close(fd);
}

// Writes text to path and fsyncs it (the whole directory is renamed into place later, so no
// per-file temp name is needed here).
void write_text_file(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "wb");
  DLCM_CHECK(f, path, ": cannot create file: ", std::strerror(errno));
  bool ok = text.empty() || std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  DLCM_CHECK(ok, path, ": write failed: ", std::strerror(err), " (disk full?)");
}

void copy_file_synced(const std::string& src, const std::string& dst) {
  std::error_code ec;
  fs::copy_file(src, dst, fs::copy_options::overwrite_existing, ec);
  DLCM_CHECK(!ec, src, ": cannot copy into checkpoint (", dst, "): ", ec.message());
  fsync_path(dst, false);
}

json read_json_file(const std::string& dir, const char* file, const char* what) {
  const std::string p = join(dir, file);
  std::ifstream f(p);
  DLCM_CHECK(f, dir, ": cannot open ", file, " (", what, ")");
  return read_json_file_bounded(p);  // bounded size and nesting (core/json_util.h)
}

bool pid_alive(long pid) { return pid > 0 && (::kill(pid_t(pid), 0) == 0 || errno == EPERM); }

// Parses "<base>.<tag>-<pid>"; returns the pid or -1.
long sibling_pid(const std::string& name, const std::string& base, const std::string& tag) {
  const std::string pre = base + "." + tag + "-";
  if (name.size() <= pre.size() || name.compare(0, pre.size(), pre) != 0) return -1;
  const std::string num = name.substr(pre.size());
  if (num.find_first_not_of("0123456789") != std::string::npos || num.size() > 10) return -1;
  const long long v = std::stoll(num);
  return v <= 0x7fffffffLL ? long(v) : -1;
}

// Sibling "<dir>.old-<pid>" directories: the previous checkpoint of an interrupted save.
std::vector<fs::path> old_siblings(const std::string& dir) {
  std::vector<fs::path> out;
  fs::path p(dir), parent = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent, ec))
    if (sibling_pid(e.path().filename().string(), p.filename().string(), "old") >= 0)
      out.push_back(e.path());
  return out;
}

// Renames the complete folder TMP to DIR. An existing DIR is moved aside to DIR.old-PID (not
// deleted) until TMP has its final name, so some complete checkpoint exists at every instant.
void swap_into_place(const std::string& tmp, const std::string& dir) {
  std::error_code ec;
  const std::string old = dir + ".old-" + std::to_string(::getpid());
  const fs::path parent = fs::path(dir).parent_path();
  const bool had_old = fs::exists(dir, ec);
  if (had_old) {
    fs::remove_all(old, ec);
    fs::rename(dir, old, ec);
    DLCM_CHECK(!ec, dir, ": cannot move previous checkpoint aside: ", ec.message());
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    std::error_code ec2;
    if (had_old) fs::rename(old, dir, ec2);  // put the previous one back
    fail(dir, ": cannot rename ", tmp, " into place: ", ec.message());
  }
  fsync_path(parent.empty() ? "." : parent.string(), true);
  if (had_old) fs::remove_all(old, ec);
}

void check_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    auto olds = old_siblings(dir);
    if (!olds.empty())
      fail(dir, ": checkpoint directory does not exist, but ", olds.back().string(),
           " holds the previous checkpoint of an interrupted save; rename it to ", dir,
           " (saving to ", dir, " again recovers it automatically)");
    fail(dir, ": checkpoint directory does not exist");
  }
  DLCM_CHECK(fs::is_directory(dir, ec), dir,
             ": not a checkpoint directory (it is a file); expected the output folder of "
             "'dlcm train'");
  DLCM_CHECK(fs::exists(join(dir, "config.json"), ec), dir,
             ": not a checkpoint directory (no config.json); expected the output folder of "
             "'dlcm train'");
}

}  // namespace

int clean_stale_checkpoint_siblings(const std::string& dir_in, bool owned) {
  const std::string dir = normalize_dir(dir_in);
  fs::path p(dir);
  fs::path parent = p.parent_path();
  if (parent.empty()) parent = ".";
  const std::string base = p.filename().string();
  std::error_code ec;
  if (!fs::is_directory(parent, ec)) return 0;
  const long self = long(::getpid());
  std::vector<fs::path> tmps, olds;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string name = e.path().filename().string();
    long pid;
    if ((pid = sibling_pid(name, base, "tmp")) >= 0) {
      // A live writer other than us may still be building it; leave it alone.
      if (owned || pid == self || !pid_alive(pid)) tmps.push_back(e.path());
    } else if ((pid = sibling_pid(name, base, "old")) >= 0) {
      if (owned || pid == self || !pid_alive(pid)) olds.push_back(e.path());
    }
  }
  int removed = 0;
  // A crash between "dir -> dir.old" and "tmp -> dir" leaves no dir: the old copy is complete,
  // so put it back rather than lose the run.
  if (!fs::exists(dir, ec) && !olds.empty()) {
    fs::rename(olds.back(), dir, ec);
    DLCM_CHECK(!ec, dir, ": cannot restore previous checkpoint from ", olds.back().string(), ": ",
               ec.message());
    olds.pop_back();
  }
  for (auto* v : {&tmps, &olds})
    for (const fs::path& q : *v) {
      fs::remove_all(q, ec);
      if (!ec) ++removed;
    }
  return removed;
}

void save_checkpoint(const std::string& dir_in, const CheckpointWrite& w) {
  DLCM_CHECK(w.config && w.params, "internal: save_checkpoint needs config and params");
  DLCM_CHECK(bool(w.exp_avg) == bool(w.exp_avg_sq),
             "internal: save_checkpoint needs both optimizer moments or neither");
  const std::string dir = normalize_dir(dir_in);
  const std::string leaf = fs::path(dir).filename().string();
  // Saving renames DIR as a whole, which "." / ".." / "/" cannot be.
  DLCM_CHECK(!leaf.empty() && leaf != "." && leaf != "..", dir_in,
             ": a checkpoint must be saved to a named folder (e.g. runs/my_run), not '", dir_in,
             "'");
  const ParamStore& ps = *w.params;
  if (w.exp_avg) {
    DLCM_CHECK(i64(w.exp_avg->size()) >= ps.total() && i64(w.exp_avg_sq->size()) >= ps.total(),
               "internal: optimizer buffers smaller than the parameter block");
  }
  // A checkpoint is the run's last good state: never replace it with NaN or infinity.
  for (const Param& p : ps.params()) {
    const std::pair<const float*, const char*> parts[] = {
        {p.w, ""},
        {w.exp_avg ? w.exp_avg->data() + p.offset : nullptr, ".exp_avg"},
        {w.exp_avg_sq ? w.exp_avg_sq->data() + p.offset : nullptr, ".exp_avg_sq"}};
    for (auto [x, suffix] : parts) {
      const i64 i = x ? first_nonfinite(x, p.numel) : -1;
      DLCM_CHECK(i < 0, dir, ": refusing to save a checkpoint: tensor '", p.name, suffix,
                 "' holds a non-finite value (", x ? x[std::max<i64>(i, 0)] : 0.f, " at element ",
                 i, "); the previous checkpoint is kept");
    }
  }
  std::error_code ec;
  fs::path parent = fs::path(dir).parent_path();
  if (!parent.empty()) {
    fs::create_directories(parent, ec);
    DLCM_CHECK(!ec, parent.string(), ": cannot create directory for checkpoint: ", ec.message());
  }
  clean_stale_checkpoint_siblings(dir);
  // Replacing DIR deletes it, so only ever replace a checkpoint or an empty folder: a typo in
  // --out must not wipe unrelated files.
  if (fs::exists(dir, ec)) {
    DLCM_CHECK(fs::is_directory(dir, ec), dir, ": exists and is not a directory; choose another "
               "checkpoint path");
    DLCM_CHECK(is_checkpoint(dir) || fs::is_empty(dir, ec), dir,
               ": exists and is not a checkpoint (no config.json and model.safetensors); "
               "refusing to replace it. Choose another output directory or empty this one");
  }

  const std::string tmp = dir + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  DLCM_CHECK(!ec, tmp, ": cannot create temporary checkpoint directory: ", ec.message());
  try {
    write_text_file(join(tmp, "config.json"), config_to_json(*w.config).dump(2) + "\n");
    save_params(join(tmp, "model.safetensors"), ps);
    if (w.exp_avg) {
      std::vector<TensorToWrite> ts;
      ts.reserve(2 * ps.params().size());
      for (const Param& p : ps.params()) {
        ts.push_back({p.name + ".exp_avg", p.shape, w.exp_avg->data() + p.offset, nullptr});
        ts.push_back({p.name + ".exp_avg_sq", p.shape, w.exp_avg_sq->data() + p.offset, nullptr});
      }
      write_safetensors(join(tmp, "optimizer.safetensors"), ts, {{"format", "pt"}});
    }
    const json& st = w.trainer_state.is_null() ? json::object() : w.trainer_state;
    write_text_file(join(tmp, "trainer_state.json"), st.dump(2) + "\n");
    if (!w.provenance.is_null())
      write_text_file(join(tmp, "provenance.json"), w.provenance.dump(2) + "\n");
    for (const std::string& src : w.extra_files) {
      const std::string name = fs::path(src).filename().string();
      DLCM_CHECK(!name.empty(), src, ": extra checkpoint file has no file name");
      DLCM_CHECK(name != "config.json" && name != "model.safetensors" &&
                     name != "optimizer.safetensors" && name != "trainer_state.json" &&
                     name != "provenance.json",
                 src, ": extra file would overwrite the checkpoint's own ", name);
      DLCM_CHECK(fs::is_regular_file(src, ec), src,
                 ": cannot copy into checkpoint: file does not exist");
      copy_file_synced(src, join(tmp, name.c_str()));
    }
    fsync_path(tmp, true);
    swap_into_place(tmp, dir);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

void copy_checkpoint(const std::string& src_in, const std::string& dst_in) {
  const std::string src = normalize_dir(src_in), dst = normalize_dir(dst_in);
  DLCM_CHECK(is_checkpoint(src), src, ": not a checkpoint, nothing to copy");
  clean_stale_checkpoint_siblings(dst);
  std::error_code ec;
  DLCM_CHECK(!fs::exists(dst, ec) || is_checkpoint(dst), dst,
             ": exists and is not a checkpoint; refusing to replace it");
  const std::string tmp = dst + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  DLCM_CHECK(!ec, tmp, ": cannot create temporary checkpoint directory: ", ec.message());
  try {
    for (const auto& e : fs::directory_iterator(src)) {
      const fs::path to = fs::path(tmp) / e.path().filename();
      fs::create_hard_link(e.path(), to, ec);
      if (ec) copy_file_synced(e.path().string(), to.string());
    }
    fsync_path(tmp, true);
    swap_into_place(tmp, dst);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

Config load_checkpoint_config(const std::string& dir_in) {
  const std::string dir = normalize_dir(dir_in);
  check_dir(dir);
  json j = read_json_file(dir, "config.json", "model configuration");
  return config_from_json(j, join(dir, "config.json"));
}

void load_checkpoint_params(const std::string& dir_in, ParamStore& ps) {
  const std::string dir = normalize_dir(dir_in);
  check_dir(dir);
  const std::string p = join(dir, "model.safetensors");
  DLCM_CHECK(fs::exists(p), dir,
             ": checkpoint has no model.safetensors (incomplete copy or not a checkpoint)");
  load_params(p, ps);
}

bool load_checkpoint_optimizer(const std::string& dir_in, const ParamStore& ps, Buf& exp_avg,
                               Buf& exp_avg_sq) {
  const std::string dir = normalize_dir(dir_in);
  check_dir(dir);
  const std::string p = join(dir, "optimizer.safetensors");
  if (!fs::exists(p)) return false;
  SafeTensorsFile f(p);
  std::vector<std::string> names;
  for (const Param& q : ps.params()) {
    names.push_back(q.name + ".exp_avg");
    names.push_back(q.name + ".exp_avg_sq");
  }
  check_tensor_set(f, names);
  // Padding between tensors stays zero, as in a fresh optimizer.
  exp_avg.assign(size_t(ps.total()), 0.0f);
  exp_avg_sq.assign(size_t(ps.total()), 0.0f);
  for (const Param& q : ps.params()) {
    f.read_f32(q.name + ".exp_avg", q.shape, exp_avg.data() + q.offset);
    f.read_f32(q.name + ".exp_avg_sq", q.shape, exp_avg_sq.data() + q.offset);
    for (auto [x, suffix] : {std::pair{exp_avg.data(), ".exp_avg"}, {exp_avg_sq.data(), ".exp_avg_sq"}}) {
      const i64 i = first_nonfinite(x + q.offset, q.numel);
      DLCM_CHECK(i < 0, p, ": tensor '", q.name, suffix, "' holds a non-finite value (",
                 x[q.offset + std::max<i64>(i, 0)], " at element ", i,
                 "); the optimizer state is corrupt or comes from a diverged run");
    }
  }
  return true;
}

json load_trainer_state(const std::string& dir_in) {
  const std::string dir = normalize_dir(dir_in);
  check_dir(dir);
  json j = read_json_file(dir, "trainer_state.json", "needed to resume training");
  validate_trainer_state(j, join(dir, "trainer_state.json"));
  return j;
}

void validate_trainer_state(const json& st, const std::string& source) {
  DLCM_CHECK(st.is_object(), source, ": must be a JSON object, got ", st.type_name());
  // Counters a run can reach: 2^40 steps, 2^62 tokens, 2^20 ranks. Anything else is a corrupt
  // or hand-edited file and would resume into a wrong schedule.
  auto counter = [&](const char* key, i64 max) -> i64 {
    if (!st.contains(key)) return 0;
    const json& v = st[key];
    DLCM_CHECK(v.is_number_integer() || v.is_number_unsigned(), source, ": '", key,
               "' must be an integer, got a ", v.type_name());
    DLCM_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t(max), source, ": '", key,
               "' = ", v.get<uint64_t>(), " is out of range [0, ", max, "] (corrupt file?)");
    const i64 x = v.get<i64>();
    DLCM_CHECK(x >= 0 && x <= max, source, ": '", key, "' = ", x, " is out of range [0, ", max,
               "] (corrupt file?)");
    return x;
  };
  const i64 step = counter("step", i64(1) << 40);
  counter("tokens_seen", i64(1) << 62);
  counter("adam_t", step);
  const i64 skips = counter("nonfinite_skips", step);
  counter("nonfinite_in_a_row", skips);
  if (st.contains("world_size"))
    DLCM_CHECK(counter("world_size", i64(1) << 20) >= 1, source,
               ": 'world_size' must be in [1, 2^20], got 0");
  if (st.contains("seed"))
    DLCM_CHECK(st["seed"].is_number_integer() || st["seed"].is_number_unsigned(), source,
               ": 'seed' must be an integer, got a ", st["seed"].type_name());
}

bool is_checkpoint(const std::string& dir_in) {
  if (dir_in.empty()) return false;
  const std::string dir = normalize_dir(dir_in);
  std::error_code ec;
  return fs::is_directory(dir, ec) && fs::is_regular_file(join(dir, "config.json"), ec) &&
         fs::is_regular_file(join(dir, "model.safetensors"), ec);
}

std::string resolve_checkpoint(const std::string& path) {
  if (is_checkpoint(path)) return path;
  std::string sub = (fs::path(path) / "checkpoint").string();
  if (is_checkpoint(sub)) return sub;
  if (!fs::exists(path))
    fail(path, ": no such checkpoint or run directory (give the --out folder of 'dlcm train')");
  fail(path, ": not a checkpoint (no config.json and model.safetensors here or in ",
       "checkpoint/); give the --out folder of 'dlcm train'");
}

}  // namespace dlcm
