// A folder written atomically: files go into a staging sibling OUT.tmp-PID, and commit()
// renames it to OUT (moving a replaced OUT aside first and deleting it only after the new one
// is in place). An uncommitted staging folder is removed by the destructor, so an error leaves
// nothing behind and the old OUT untouched.
#pragma once
#include <string>

namespace dlcm {

class StagedDir {
 public:
  // Checks OUT before anything is written: an existing OUT is an Error unless `replace`, and
  // even then only a folder that is empty or holds a config.json (a model folder) is replaced,
  // so a mistyped path never deletes unrelated files. `flag` names the option that allows
  // replacing ("--force") in the message.
  StagedDir(const std::string& out, bool replace, const std::string& flag);
  ~StagedDir();
  StagedDir(const StagedDir&) = delete;
  StagedDir& operator=(const StagedDir&) = delete;

  const std::string& path() const { return tmp_; }  // where to write the files
  const std::string& out() const { return out_; }
  void commit();

 private:
  std::string out_, tmp_;
  bool committed_ = false;
};

// Writes text into path (truncating) and fsyncs it; errors name the path.
void write_text_file_synced(const std::string& path, const std::string& text);

}  // namespace dlcm
