#!/usr/bin/env bash
# Turns the Bazel outputs into a wheel:
#   bazel build //tf_xent_ops:_xent_ops.so //tf_xent_ops:build_info
#   pip_package/build_pip_package.sh OUTPUT_DIR [PYTHON]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
python="${2:-python3}"
if [[ "$python" == */* ]]; then  # absolute, keeping a venv's interpreter path
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
bin="$root/bazel-bin/tf_xent_ops"
for f in _xent_ops.so _build_info.py; do
  [ -f "$bin/$f" ] || { echo "missing $bin/$f: run the bazel build first" >&2; exit 1; }
done
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/tf_xent_ops/tf_keras"
cp "$root"/python/tf_xent_ops/*.py "$stage/tf_xent_ops/"
cp "$root"/python/tf_xent_ops/tf_keras/*.py "$stage/tf_xent_ops/tf_keras/"
cp "$bin/_xent_ops.so" "$bin/_build_info.py" "$stage/tf_xent_ops/"
chmod -R u+w "$stage"/tf_xent_ops
cp "$root/pip_package/setup.py" "$stage/"
(cd "$stage" && "$python" -m pip wheel --no-deps --no-build-isolation -q -w "$out" .)
ls "$out"/tf_xent_ops-*.whl
