#!/usr/bin/env bash
# Installs a wheel into a fresh virtual environment, with the pinned test
# requirements, and runs the test suite against the installed package with no
# compiler, assembler or linker on PATH:
#   pip_package/test_wheel.sh WHEEL VENV_DIR [PYTHON]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
venv="$2"
python="${3:-python3}"
rm -rf "$venv" && "$python" -m venv "$venv"
venv="$(cd "$venv" && pwd)"
# PYTHONPATH cleared: the source tree must not stand in for the wheel.
export PYTHONPATH=
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt"
# With its dependencies: the wheel's own requirements must resolve.
"$venv/bin/python" -m pip install -q "$wheel"
# The system's tools, less every compiler, assembler and linker.
tools="$venv/tools"
mkdir -p "$tools"
for dir in /usr/local/bin /usr/bin /bin /usr/local/sbin /usr/sbin /sbin; do
  [ -d "$dir" ] || continue
  for tool in "$dir"/*; do
    name="$(basename "$tool")"
    case "$name" in
      cc | c++ | cpp | *gcc* | *g++* | *-cc | *-c++ | *-cpp* | clang* | nvcc* | \
        ld | ld.* | *-ld | *-ld.* | as | *-as | icx | icpx | tcc) continue ;;
    esac
    # Once per name (merged-/usr systems list /bin and /usr/bin alike).
    [ -e "$tools/$name" ] || [ -L "$tools/$name" ] || ln -s "$tool" "$tools/$name"
  done
done
site="$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")"
cd "$root"
PATH="$venv/bin:$tools" TFXENT_PACKAGE_DIR="$site" TFXENT_INSTALLED_WHEEL="$wheel" \
  "$venv/bin/python" -m pytest -o pythonpath=tests -o addopts="-ra -p no:cacheprovider" \
  tests --deselect tests/test_install.py
