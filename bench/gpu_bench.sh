#!/usr/bin/env bash
# The GPU checks and benchmark in two steps, for a CUDA machine that may have
# no compiler toolchain for Python packages and no network:
#
#   bash bench/gpu_bench.sh prepare
#       on a machine with nvcc and network access: the standalone harness
#       built for $TFXENT_CUDA_ARCH (default sm_90) from this tree, earlier
#       kernel versions from git to time beside it ($TFXENT_GPU_REVISIONS:
#       NAME=REVISION ..., none by default), and the wheels of
#       bench/gpu_requirements.txt. All into .gpu/ (git-ignored).
#   bash bench/gpu_bench.sh run
#       on the GPU machine, with .gpu/ copied along: the correctness checks,
#       then (in another process) the benchmark (ours, the revisions,
#       PyTorch, Liger-Kernel), then compute-sanitizer's memcheck over the
#       small checks, within 7 minutes (about 2 on an H200). Everything it
#       prints goes to $OUT/gpu_bench.log too (bench/results/ without $OUT);
#       the tables to $OUT (rewritten after each row).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
REVISIONS=${TFXENT_GPU_REVISIONS-}
ARCH=${TFXENT_CUDA_ARCH:-sm_90}

build() {  # build NAME SOURCE_ROOT
  nvcc -x cu -std=c++17 -O3 -I"$2" --expt-relaxed-constexpr -shared \
    -Xcompiler -fPIC -arch="$ARCH" "$2/tests/gpu/harness.cu" -o "$GPU_DIR/$1.so"
}

case "${1:-}" in
  prepare)
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: \
      -r bench/gpu_requirements.txt -d "$GPU_DIR/wheels"
    build ours .
    for spec in $REVISIONS; do
      tree=$(mktemp -d)
      git archive "${spec#*=}" | tar -x -C "$tree"
      build "${spec%%=*}" "$tree"
      rm -rf "$tree"
    done
    echo "$REVISIONS" >"$GPU_DIR/revisions"
    du -sh "$GPU_DIR"
    ;;
  run)
    out=${OUT:-bench/results}
    mkdir -p "$out"
    run_all() {
      echo "kernel $(uname -r) (4.4.0: gVisor, where compute-sanitizer cannot run)"
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        "$GPU_DIR"/wheels/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
      local status=0 revisions=()
      for name in $(sed 's/=[^ ]*//g' "$GPU_DIR/revisions"); do
        revisions+=(--variant "$name=$GPU_DIR/$name.so")
      done
      # At most 270 s (about 50 s on an H200), so that a kernel that hangs
      # leaves the timings their time.
      local checks=0
      timeout 270 python3 bench/bench_gpu.py --check --library "$GPU_DIR/ours.so" || checks=$?
      [ "$checks" -eq 124 ] && echo "checks stopped after 270 s: the last case logged is the one after which they hung"
      [ "$checks" -eq 0 ] || status=$checks
      # The timings in a process of their own: a kernel fault in the checks
      # kills its CUDA context, not theirs.
      python3 bench/bench_gpu.py --bench --library "$GPU_DIR/ours.so" "${revisions[@]}" \
        --out "$out" || status=$?
      echo "revisions timed beside: $(cat "$GPU_DIR/revisions")"
      # Out-of-bounds accesses on the real GPU: the small checks under
      # memcheck, with what is left of 7 minutes.
      local left=$((420 - SECONDS))
      if [ "$left" -gt 60 ]; then
        # Without PyTorch's caching allocator every buffer is a cudaMalloc of
        # its own, whose end memcheck sees (in a cached block it would not).
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$left" \
          compute-sanitizer --tool memcheck --error-exitcode 3 \
          python3 bench/bench_gpu.py --check --small --exact-buffers --library "$GPU_DIR/ours.so" \
          || status=$?
      else
        echo "memcheck skipped: ${SECONDS} s used"
      fi
      return "$status"
    }
    set +e
    run_all 2>&1 | tee "$out/gpu_bench.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
