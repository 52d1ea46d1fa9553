#!/usr/bin/env bash
# Work on the llama.cpp patch series in a git work tree (the ollama way).
#
#   scripts/patches.sh checkout DIR   DIR becomes a git repository: commit 1 is pristine
#                                     vendor/llama.cpp, commit 2 adds patches/files/ (the
#                                     new LogQuant sources), then one commit per patch of
#                                     patches/series/. Edit there and commit.
#   scripts/patches.sh export DIR     copies the files of patches/files/ back from DIR and
#                                     regenerates patches/series/ from the commits after
#                                     commit 2 (one concern per commit: `NNNN-subject.patch`).
#
# The build (build.rs) applies the same series to a copy of vendor/ on every change.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,13p' "$0"; exit 2; }
g() { git -C "$dir" -c user.name=logquant -c user.email=logquant@localhost "$@"; }

case "$cmd" in
checkout)
  [ ! -e "$dir" ] || { echo "patches.sh: $dir exists; give a new folder" >&2; exit 2; }
  mkdir -p "$dir"
  cp -a "$root/vendor/llama.cpp/." "$dir/"
  g init -q && g add -A && g commit -qm "upstream: vendor/llama.cpp ($(head -n1 "$root/vendor/VERSION"))"
  g tag upstream
  cp -a "$root/patches/files/." "$dir/"
  g add -A && g commit -qm "logquant: new files (patches/files)"
  g tag logquant-files
  for p in "$root"/patches/series/*.patch; do
    [ -e "$p" ] || continue
    g am -q --whitespace=nowarn "$p" || { echo "patches.sh: $(basename "$p") does not apply; fix it in $dir (git am --continue), then export" >&2; exit 1; }
  done
  echo "work tree ready in $dir: $(g rev-list --count logquant-files..HEAD) patches applied"
  ;;
export)
  (cd "$root/patches/files" && find . -type f) | while read -r f; do cp "$dir/$f" "$root/patches/files/$f"; done
  if g diff --name-only logquant-files HEAD | grep -qxF -f <(cd "$root/patches/files" && find . -type f | sed 's|^\./||'); then
    echo "patches.sh: a series commit touches a file of patches/files; fold that change into the new file itself" >&2
    exit 1
  fi
  rm -f "$root"/patches/series/*.patch
  g format-patch -q -N --no-signature --zero-commit -o "$root/patches/series" logquant-files..HEAD
  ls "$root/patches/series"
  ;;
*) sed -n '2,13p' "$0"; exit 2 ;;
esac
