#!/usr/bin/env bash
# Re-sync vendor/llama.cpp from the llama.cpp sources shipped inside the crates.io
# package llama-cpp-sys-2 at one pinned version. Nothing in vendor/ is edited by hand:
# moving to a newer llama.cpp is `scripts/sync-vendor.sh NEW_VERSION`, then fixing the
# patch in patches/ that no longer applies (the build names it).
#
# usage: scripts/sync-vendor.sh [VERSION]   (default: the version in vendor/VERSION)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-$(sed -n 's/^llama-cpp-sys-2 version: //p' "$root/vendor/VERSION")}
[ -n "$version" ] || { echo "sync-vendor: no version given and none in vendor/VERSION" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Fetch the package with cargo itself (the ordinary client), through a throwaway crate.
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-llama-cpp-sys"
version = "0.0.0"
edition = "2021"
[dependencies]
llama-cpp-sys-2 = { version = "=$version", default-features = false }
TOML
touch "$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet)
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/llama-cpp-sys-2-"$version".crate | head -n1)
sha=$(sha256sum "$crate" | cut -d' ' -f1)
tar xzf "$crate" -C "$work"
src="$work/llama-cpp-sys-2-$version/llama.cpp"

dst="$root/vendor/llama.cpp"
rm -rf "$dst"
mkdir -p "$dst/ggml/src"
# Only what the project builds: llama (include, src), ggml core, the CPU, CUDA and
# Metal backends, and the CMake files that the CUDA build may drive.
cp -a "$src/LICENSE" "$src/CMakeLists.txt" "$src/cmake" "$src/include" "$src/src" "$dst/"
cp -a "$src/ggml/CMakeLists.txt" "$src/ggml/cmake" "$src/ggml/include" "$dst/ggml/"
find "$src/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$dst/ggml/src/" \;
for backend in ggml-cpu ggml-cuda ggml-metal; do
  cp -a "$src/ggml/src/$backend" "$dst/ggml/src/"
done

cat > "$root/vendor/VERSION" <<TXT
llama-cpp-sys-2 version: $version
llama-cpp-sys-2 crate sha256: $sha
ggml version: $(sed -n 's/^set(GGML_VERSION_MAJOR \(.*\))/\1/p' "$src/ggml/CMakeLists.txt").$(sed -n 's/^set(GGML_VERSION_MINOR \(.*\))/\1/p' "$src/ggml/CMakeLists.txt").$(sed -n 's/^set(GGML_VERSION_PATCH \(.*\))/\1/p' "$src/ggml/CMakeLists.txt")
source: the llama.cpp/ folder of that crate, subset copied by scripts/sync-vendor.sh
license: vendor/llama.cpp/LICENSE (MIT)
TXT
echo "vendor/llama.cpp synced from llama-cpp-sys-2 $version (crate sha256 $sha)"
