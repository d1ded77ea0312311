#include "tools/cli_help.h"

#include <algorithm>

namespace dlcm {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string closest_name(const std::string& word, const std::vector<std::string>& names) {
  std::string best;
  size_t best_d = 3;  // farther than 2 edits is another word, not a typo
  for (const std::string& n : names) {
    const size_t d = edit_distance(word, n);
    if (d < best_d && 2 * d < std::max(word.size(), n.size())) {
      best_d = d;
      best = n;
    }
  }
  return best;
}

namespace {

std::string command_path(const CLI::App* app) {
  std::string p;
  for (const CLI::App* a = app; a; a = a->get_parent())
    p = a->get_parent() ? " " + a->get_name() + p : "dlcm" + p;
  return p;
}

}  // namespace

std::string unknown_name_hint(const CLI::App& app, int argc, const char* const* argv) {
  const CLI::App* cur = &app;
  bool values = false;  // the previous option takes values: bare words are its values
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() > 1 && arg[0] == '-' && !(arg[1] >= '0' && arg[1] <= '9') && arg[1] != '.') {
      const std::string name = arg.substr(0, arg.find('='));
      const CLI::Option* opt = cur->get_option_no_throw(name);
      if (!opt && (name == "--help" || name == "-h" || name == "--version")) return "";
      if (!opt) {
        std::vector<std::string> names;
        for (const CLI::Option* o : cur->get_options())
          for (const std::string& l : o->get_lnames()) names.push_back("--" + l);
        const std::string near = closest_name(name, names);
        return "unknown flag '" + name + "' of '" + command_path(cur) + "'" +
               (near.empty() ? " (see '" + command_path(cur) + " --help')"
                             : " (did you mean '" + near + "'?)");
      }
      values = opt->get_type_size() != 0 && arg.find('=') == std::string::npos;
      continue;
    }
    std::vector<std::string> subs;
    for (const CLI::App* s : cur->get_subcommands([](const CLI::App*) { return true; }))
      subs.push_back(s->get_name());
    if (std::find(subs.begin(), subs.end(), arg) != subs.end()) {
      cur = cur->get_subcommand(arg);
      values = false;
      continue;
    }
    if (values || subs.empty()) continue;  // an option's value, or a positional argument
    const std::string near = closest_name(arg, subs);
    std::string list;
    for (const auto& s : subs) list += (list.empty() ? "" : ", ") + s;
    return "unknown subcommand '" + arg + "' of '" + command_path(cur) + "'" +
           (near.empty() ? " (expected one of: " + list + ")" : " (did you mean '" + near + "'?)");
  }
  return "";
}

}  // namespace dlcm
