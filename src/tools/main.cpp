// dlcm command-line tool: a thin shell over the library (see src/tools/cli_*.cpp).
#include <cstdio>
int main(int argc, char** argv) {
  std::fprintf(stderr, "dlcm: no subcommands yet\n");
  return 1;
}
