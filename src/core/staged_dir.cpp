#include "core/staged_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/common.h"

namespace dlcm {

namespace fs = std::filesystem;

namespace {

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);  // best effort: some filesystems refuse fsync on directories
    ::close(fd);
  }
}

}  // namespace

StagedDir::StagedDir(const std::string& out_in, bool replace, const std::string& flag) {
  std::string out = out_in;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  const std::string leaf = fs::path(out).filename().string();
  DLCM_CHECK(!out.empty() && !leaf.empty() && leaf != "." && leaf != "..", "'", out_in,
             "': the output must be a named folder (e.g. exports/my_model)");
  std::error_code ec;
  if (fs::exists(out, ec)) {
    DLCM_CHECK(replace, out, ": already exists; give ", flag, " to replace it, or choose "
               "another output folder");
    DLCM_CHECK(fs::is_directory(out, ec), out, ": exists and is not a folder; refusing to "
               "replace it");
    DLCM_CHECK(fs::is_empty(out, ec) || fs::exists(fs::path(out) / "config.json", ec), out,
               ": exists and holds no config.json (not a model folder); refusing to replace it "
               "even with ", flag, ". Choose another output folder or empty this one");
  }
  const fs::path parent = fs::path(out).parent_path();
  if (!parent.empty()) {
    fs::create_directories(parent, ec);
    DLCM_CHECK(!ec, parent.string(), ": cannot create the output's parent folder: ", ec.message());
  }
  out_ = out;
  tmp_ = out + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp_, ec);
  fs::create_directory(tmp_, ec);
  DLCM_CHECK(!ec, tmp_, ": cannot create the staging folder: ", ec.message());
}

StagedDir::~StagedDir() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);
}

void StagedDir::commit() {
  DLCM_CHECK(!committed_, "internal: StagedDir committed twice (", out_, ")");
  fsync_dir(tmp_);
  std::error_code ec;
  const std::string old = out_ + ".old-" + std::to_string(::getpid());
  const bool had_old = fs::exists(out_, ec);
  if (had_old) {
    fs::remove_all(old, ec);
    fs::rename(out_, old, ec);
    DLCM_CHECK(!ec, out_, ": cannot move the existing folder aside: ", ec.message());
  }
  fs::rename(tmp_, out_, ec);
  if (ec) {
    std::error_code ec2;
    if (had_old) fs::rename(old, out_, ec2);  // put the previous one back
    fail(out_, ": cannot rename ", tmp_, " into place: ", ec.message());
  }
  committed_ = true;
  const fs::path parent = fs::path(out_).parent_path();
  fsync_dir(parent.empty() ? "." : parent.string());
  if (had_old) fs::remove_all(old, ec);
}

void write_text_file_synced(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "wb");
  DLCM_CHECK(f, path, ": cannot create file: ", std::strerror(errno));
  bool ok = text.empty() || std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  DLCM_CHECK(ok, path, ": write failed: ", std::strerror(err), " (disk full?)");
}

}  // namespace dlcm
