#include "core/json_util.h"

#include <fstream>
#include <iterator>

#include "core/common.h"

namespace dlcm {

nlohmann::json parse_json_bounded(std::string_view text, const std::string& source,
                                  JsonLimits limits) {
  DLCM_CHECK(text.size() <= limits.max_bytes, source, ": JSON of ", text.size(),
             " bytes exceeds the limit of ", limits.max_bytes, " bytes");
  // Pre-scan for nesting depth outside strings; invalid text is left to the parser below.
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      DLCM_CHECK(++depth <= limits.max_depth, source, ": JSON nested deeper than ",
                 limits.max_depth, " levels (at byte ", i, ")");
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    // parse_error, and out_of_range for a number too large for a double ("1e999").
    fail(source, ": invalid JSON: ", e.what());
  }
}

nlohmann::json read_json_file_bounded(const std::string& path, JsonLimits limits) {
  std::ifstream f(path, std::ios::binary);
  DLCM_CHECK(f, path, ": cannot open JSON file (check the path)");
  f.seekg(0, std::ios::end);
  const std::streamoff size = f.tellg();
  DLCM_CHECK(size >= 0, path, ": cannot read JSON file");
  DLCM_CHECK(size_t(size) <= limits.max_bytes, path, ": JSON of ", size,
             " bytes exceeds the limit of ", limits.max_bytes, " bytes");
  f.seekg(0);
  std::string text(size_t(size), '\0');
  f.read(text.data(), size);
  DLCM_CHECK(f.gcount() == size, path, ": cannot read JSON file");
  return parse_json_bounded(text, path, limits);
}

namespace {

// Appends a rendering of v to out until out reaches `cap` characters; each level adds at least
// one character, so the recursion is at most `cap` deep.
void excerpt(const nlohmann::json& v, std::string& out, size_t cap) {
  if (out.size() >= cap) return;
  if (v.is_object() || v.is_array()) {
    const bool obj = v.is_object();
    out += obj ? '{' : '[';
    bool first = true;
    for (auto it = v.begin(); it != v.end() && out.size() < cap; ++it) {
      if (!first) out += ',';
      first = false;
      if (obj) {
        excerpt(nlohmann::json(it.key()), out, cap);
        out += ':';
      }
      excerpt(it.value(), out, cap);
    }
    if (out.size() < cap) out += obj ? '}' : ']';
  } else if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    // Render only a prefix, so a megabyte string is not escaped whole.
    const size_t room = cap - out.size();
    out += nlohmann::json(s.substr(0, room)).dump(-1, ' ', false,
                                                   nlohmann::json::error_handler_t::replace);
    if (s.size() > room) out += "...";
  } else {
    out += v.dump();  // number, bool, null: short
  }
}

}  // namespace

std::string json_excerpt(const nlohmann::json& v, size_t max_chars) {
  // Render one character past the limit: reaching it means something was cut.
  std::string out;
  excerpt(v, out, max_chars + 1);
  if (out.size() > max_chars) {
    out.resize(max_chars);
    out += "...";
  }
  return out;
}

}  // namespace dlcm
