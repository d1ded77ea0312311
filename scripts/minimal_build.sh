#!/usr/bin/env bash
# The core tool with only the required dependencies (docs/install.md): compiler, CMake, oneDNN,
# SentencePiece, ICU, CLI11, nlohmann json. Configures a scratch build folder with every optional
# package hidden (MPI, Ceres, GoogleTest, Google Benchmark, pybind11, chromium), builds `dlcm`,
# and checks that it runs and that `dlcm scaling fit` names the missing Ceres.
#   scripts/minimal_build.sh [BUILD_DIR]   (default build-minimal; ccache makes a rerun cheap)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-minimal}
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
  -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DCMAKE_DISABLE_FIND_PACKAGE_Ceres=ON \
  -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON \
  -DCMAKE_DISABLE_FIND_PACKAGE_pybind11=ON -DDLCM_BROWSER_CHECK=OFF | tee "$BUILD.configure.log" \
  | grep "dlcm: left out"
cmake --build "$BUILD" -j"$(nproc)" --target dlcm
"$BUILD/dlcm" --version | head -1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/run"
if "$BUILD/dlcm" scaling fit "$tmp/run" --out "$tmp/fit" > "$tmp/fit.log" 2>&1; then
  echo "dlcm scaling fit ran in a build without Ceres"; exit 1
fi
echo "without Ceres: $(cat "$tmp/fit.log")"
echo "[minimal] $BUILD/dlcm builds and runs without the optional packages"
