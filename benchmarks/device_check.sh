#!/usr/bin/env bash
# One prepared device run (see ../.library/device): everything that needs a GPU, results under $OUT.
# Usage on the device (from the repo root, with the opacus wheel carried in .whl/). A device call runs at most
# 600 s and a session has ~15 min of device time including the machine's start, so run it as separate calls, in
# this order of priority, as far as the budget goes:
#   STAGES="tests norms" bash benchmarks/device_check.sh     # <= 325 s: compiled kernels vs references
#   STAGES="bench" bash benchmarks/device_check.sh           # <= 240 s: e2e suite (fastdp reference path, Opacus)
#   STAGES="triton" bash benchmarks/device_check.sh          # <= 240 s: e2e with every Triton kernel, autotuned
#   STAGES="tiles" bash benchmarks/device_check.sh           # <= 150 s: every autotune candidate compiled against
#                                                            # the reference (the tests stage checks the default
#                                                            # 32-wide tiles only, which lower to mma.sync; the
#                                                            # triton stage will pick wgmma tiles: run this to trust it)
#   STAGES="micro" bash benchmarks/device_check.sh           # optional, <= 240 s: kernel microbenchmarks
#   STAGES="microadam" bash benchmarks/device_check.sh       # <= 200 s: MicroAdam's fused step on CUDA (parity,
#                                                            # then step time vs fused Adam on GPT-2 small)
# The test stage runs the default tiles (FASTDP_AUTOTUNE=0: no candidate timing per test shape); the triton e2e
# run autotunes (fastdp/kernels/_tuning.py) and records the tiles it picked in its JSON ("autotuned_tiles").
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
[ -e fastdp/kernels ] || ln -s ../kernels fastdp/kernels   # fastdp.kernels without installing the package
STAGES=${STAGES:-"tests norms bench triton"}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/device.txt"
if [[ $STAGES == *tests* ]]; then
  # compiled Triton kernels against their references, then the engine with every kernel forced
  # (~14 kernels, each compiled for several dtypes and shape specialisations: give compilation room)
  # (per-test results in tests_kernels.xml: which ops may join fastdp/kernels/_backend.py::GPU_VALIDATED)
  FASTDP_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels \
    tests/test_gpu.py -k "not every_candidate_tile" --junitxml "$OUT/tests_kernels.xml" 2>&1 | tail -25 \
    | tee "$OUT/tests_kernels.txt"
  FASTDP_AUTOTUNE=0 FASTDP_BACKEND=triton timeout 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py \
    2>&1 | tail -5 | tee "$OUT/tests_engine_triton.txt"
fi
if [[ $STAGES == *tiles* ]]; then
  # each autotune candidate of each kernel, compiled, against the reference (fp32 and bf16)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_tile_configs.py \
    --junitxml "$OUT/tests_tiles.xml" 2>&1 | tail -15 | tee "$OUT/tests_tiles.txt"
fi
if [[ $STAGES == *norms* ]]; then
  timeout 45 python3 -m fastdp.bench.check_norms vit,gpt2,wrn 2>&1 | grep -v -i warn | tee "$OUT/check_norms.txt"
fi
if [[ $STAGES == *bench* ]]; then
  # <= 4 minutes. The end-to-end suite: 3 workloads x fp32/bf16 x every variant (non-private, fastdp flat and
  # per-layer, the sparse methods, DP-MicroAdam, Opacus hooks/ghost), 20 timed steps after 3 warm-up, then the
  # profiled pass (kernels per step), then, in what is left of 200 s, the largest bf16 batch of non-private,
  # fastdp and Opacus. Runs past the budget become 'skipped' rows; the JSON/CSV/MD are rewritten after every
  # workload, so a timeout still leaves the rows measured so far. FASTDP_COMMIT=<hash> records the commit.
  timeout 240 python3 -m fastdp.bench.e2e --out-dir "$OUT" --steps 20 --warmup 3 --time-budget 200 \
    --max-batch --max-batch-variants nonprivate,fastdp,opacus-hooks,opacus-ghost --max-batch-dtypes bf16 \
    ${FASTDP_COMMIT:+--commit "$FASTDP_COMMIT"} 2>&1 | tee "$OUT/e2e_log.txt" | tail -25
fi
if [[ $STAGES == *triton* ]]; then
  # the engine with every Triton kernel forced, beside non-private. The first step of each workload and dtype
  # compiles ~4 tile candidates per kernel and times them (fastdp/kernels/_tuning.py; by compile_check.py 0.2-6 s per
  # compilation, ~20 per workload and dtype), all inside the warm-up steps; the picks land in the JSON
  FASTDP_BACKEND=triton timeout 240 python3 -m fastdp.bench.e2e --out-dir "$OUT/triton" \
    --variants nonprivate,fastdp,fastdp-per-layer \
    --steps 20 --warmup 3 --no-launches --time-budget 200 ${FASTDP_COMMIT:+--commit "$FASTDP_COMMIT"} 2>&1 \
    | tee "$OUT/e2e_triton_log.txt" | tail -12
fi
if [[ $STAGES == *micro* ]]; then
  # kernel microbenchmarks: reference vs Triton vs naive PyTorch at GPT-2 / ViT-S / WRN shapes, fp32 and bf16, each
  # result checked before it is timed; copy micro.json to benchmarks/results/<device>_<date>_micro.json
  timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -o addopts="" benchmarks/micro --benchmark-only \
    --benchmark-json "$OUT/micro.json" --benchmark-columns=median,mean,rounds 2>&1 | tail -60 | tee "$OUT/micro.txt"
fi
if [[ $STAGES == *microadam* ]]; then
  # MicroAdam's fused step on CUDA: bit-identical to the unfused step (tests/test_gpu.py), then its step time against
  # Adam (foreach and fused) on GPT-2 small's 148 tensors and each kernel vs its reference (issue 20's GPU goal:
  # <= 2x fused Adam); copy micro_adam_cuda.* to benchmarks/results/
  timeout 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py -k microadam 2>&1 | tail -5 \
    | tee "$OUT/tests_microadam.txt"
  timeout 120 python3 -m fastdp.bench.bench_micro_adam --device cuda --steps 20 --unfused \
    --out "$OUT/micro_adam_cuda.json" 2>&1 | tail -15 | tee "$OUT/micro_adam_cuda.txt"
fi
