#!/usr/bin/env bash
# Turns the Bazel outputs into a wheel through setup.py, which packages them
# as they are (TFXENT_PREBUILT_LIBRARIES) instead of compiling:
#   bazel build //tf_xent_ops:_xent_ops.so //tf_xent_ops:build_info \
#     //tf_xent_ops:cpu_levels_list
#   pip_package/build_pip_package.sh OUTPUT_DIR [PYTHON]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
python="${2:-python3}"
if [[ "$python" == */* ]]; then  # absolute, keeping a venv's interpreter path
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
bin="$root/bazel-bin/tf_xent_ops"
for f in _xent_ops.so _build_info.py cpu_levels.txt; do
  [ -f "$bin/$f" ] || { echo "missing $bin/$f: run the bazel build first" >&2; exit 1; }
done
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$bin/_xent_ops.so" "$bin/_build_info.py" "$stage/"
# The CPU levels this configuration ships (bazel-bin may hold others).
while read -r library; do cp "$bin/$library" "$stage/"; done < "$bin/cpu_levels.txt"
chmod u+w "$stage"/*
(cd "$root" && TFXENT_PREBUILT_LIBRARIES="$stage" \
  "$python" -m pip wheel --no-deps --no-build-isolation -q -w "$out" .)
ls "$out"/tf_xent_ops-*.whl
