#!/usr/bin/env bash
# A GPU session's work in one device call (bench/GPU_NOTES.md says what to do
# with its output). Two steps:
#
#   bash bench/gpu_session.sh prepare
#       here, with nvcc: the harness built for sm_90 from this tree, tuning
#       variants of it, and earlier kernel versions from git
#       ($TFXENT_GPU_REVISIONS: NAME=REVISION ...; $TFXENT_GPU_VARIANTS:
#       NAME=NVCC_FLAG ...); the wheels of
#       bench/gpu_requirements.txt. All into .gpu/ (git-ignored; the device
#       call carries it).
#   bash bench/gpu_session.sh run
#       on the device machine, with .gpu carried: the correctness checks,
#       then (in another process) the benchmark (ours, the variants,
#       PyTorch, Liger-Kernel), then
#       compute-sanitizer's memcheck over the small checks: 107 s on an
#       H200 with the default builds (each further build timed adds about
#       4 s), 7 minutes at most. Everything it prints goes to
#       $OUT/gpu_session.log too; the tables to $OUT (rewritten after each
#       row).
#
# Device tool call: run(command="bash bench/gpu_session.sh run", carry=[".gpu"],
# timeout_s=480).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
# v2 (with its NaN fix), the first version measured on a GPU: the progress
# since (bench/GPU_NOTES.md has the versions in between).
REVISIONS=${TFXENT_GPU_REVISIONS-baseline=35b24b7}
ARCH=${TFXENT_CUDA_ARCH:-sm_90}
# Tuning variants of this tree, NAME=FLAG: each is the build that would ship
# with that knob's value as the default. minblocks0: v3.2's default, before
# v3.3 asked 4 blocks per SM.
VARIANTS=${TFXENT_GPU_VARIANTS-minblocks0=-DTFXENT_GPU_MIN_BLOCKS_PER_SM=0}

build() {  # build NAME SOURCE_ROOT [NVCC FLAGS...]
  local name=$1 root=$2
  shift 2
  nvcc -x cu -std=c++17 -O3 -I"$root" --expt-relaxed-constexpr -shared \
    -Xcompiler -fPIC -arch="$ARCH" "$@" "$root/tests/gpu/harness.cu" -o "$GPU_DIR/$name.so"
}

case "${1:-}" in
  prepare)
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: \
      -r bench/gpu_requirements.txt -d "$GPU_DIR/wheels"
    build ours . &
    pids=($!)
    for spec in $VARIANTS; do
      build "${spec%%=*}" . "${spec#*=}" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed build stops here
    for spec in $REVISIONS; do
      tree=$(mktemp -d)
      git archive "${spec#*=}" | tar -x -C "$tree"
      build "${spec%%=*}" "$tree"
      rm -rf "$tree"
    done
    echo "$REVISIONS" >"$GPU_DIR/revisions"
    echo $VARIANTS >"$GPU_DIR/variants"
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
      local status=0 variants=()
      for name in $(sed 's/=[^ ]*//g' "$GPU_DIR/revisions" "$GPU_DIR/variants"); do
        variants+=(--variant "$name=$GPU_DIR/$name.so")
      done
      # At most 270 s (46-53 s on an H200), so that a kernel that hangs
      # leaves the timings their time.
      local checks=0
      timeout 270 python3 bench/bench_gpu.py --check --library "$GPU_DIR/ours.so" || checks=$?
      [ "$checks" -eq 124 ] && echo "checks stopped after 270 s: the last case logged is the one after which they hung"
      [ "$checks" -eq 0 ] || status=$checks
      # The timings in a process of their own: a kernel fault in the checks
      # kills its CUDA context, not theirs.
      python3 bench/bench_gpu.py --bench --library "$GPU_DIR/ours.so" "${variants[@]}" \
        --out "$out" || status=$?
      echo "revisions: $(cat "$GPU_DIR/revisions"); variants: $(cat "$GPU_DIR/variants")"
      # Out-of-bounds accesses on the real GPU: the small checks under memcheck,
      # with what is left of 7 minutes (of the session's 15 minutes of device
      # time, the machine's start takes one or two: this leaves room to rerun).
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
    run_all 2>&1 | tee "$out/gpu_session.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
