#!/usr/bin/env bash
# On a CUDA machine: run the kernel tests natively (TRITON_INTERPRET=0), time each
# kernel against its torch reference and the bandwidth floor (bench_kernels.py and,
# with pytest-benchmark, test_kernel_microbench.py), and the end-to-end engine
# benchmarks (bench_e2e.py). Results: bench/results/*.json, named after the device.
# Usage: bash bench/gpu.sh [--quick]
#   STEPS="tests kernels e2e compare micro" (default: all) picks steps, e.g. one per device call:
#   the device tool stops a command after 10 minutes, and e2e alone can take most of that.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=${1:-}
STEPS=" ${STEPS:-tests kernels e2e compare micro} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
TESTS_RC=0 E2E_RC=0 MICRO_RC=0

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu.sh: no CUDA device visible to torch; on CPU run 'pytest -m kernels' instead" >&2; exit 1; }
# memgen must import with its compiled runtime. The GPU image has no network and maybe no
# C++ build tools: install the wheels bench/build_gpu_wheels.sh made (carried as .gpu-wheels/),
# else try a local build.
if ! $PY -c "import memgen._native, memgen.kernels" 2>/dev/null; then
  if compgen -G ".gpu-wheels/memgen_engine-*.whl" >/dev/null; then
    # memgen without deps (the image's torch pins its own triton), then what the image may lack
    $PY -m pip install -q --no-index --find-links .gpu-wheels --no-deps memgen-engine \
      && $PY -m pip install -q --no-index --find-links .gpu-wheels gguf tqdm pytest pytest-benchmark hypothesis
  else
    $PY -m pip install -q --no-deps --no-build-isolation -e .
  fi || { echo "gpu.sh: cannot install memgen here: run bench/build_gpu_wheels.sh on a machine with" \
                "network and carry .gpu-wheels/ along" >&2; exit 1; }
fi

export TRITON_INTERPRET=0      # tests/conftest.py defaults it to 1 when unset
export PYTHONUNBUFFERED=1
mkdir -p bench/results
SLUG=$($PY -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name(0)).strip('_').lower())")

# 1. kernel tests, natively on the GPU (summary -> bench/results/kernel_tests_<device>.json)
if want tests; then
JUNIT=$(mktemp --suffix=.xml)
set +e
# the kernels against their references, the engine on Triton vs torch, and real CUDA graphs vs eager
$PY -m pytest -m kernels tests/test_kernels.py tests/test_triton_backend.py tests/test_cuda_graph.py \
  -q -p no:cacheprovider --junitxml="$JUNIT"
TESTS_RC=$?
set -e
$PY - "$SLUG" "$TESTS_RC" "$JUNIT" <<'PYEOF'
import json, sys, torch, triton, xml.etree.ElementTree as ET
slug, rc, junit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
suite = ET.parse(junit).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               exit_code=rc, **summary, failed=failed),
          open(f"bench/results/kernel_tests_{slug}.json", "w"), indent=2)
print(f"kernel tests on {torch.cuda.get_device_name(0)}: {summary}, failed: {failed}")
PYEOF
fi

# 2. kernel microbenchmarks (writes bench/results/kernels_<device>.json)
if want kernels; then $PY bench/bench_kernels.py ${QUICK:+--quick}; fi

# 3. end to end on a random-weight model with Qwen2.5-1.5B's shapes: decode time per
#    output token at batch 1 vs the bandwidth floor (target <= 1.3x), MemGen vs the plain
#    LLM (target <= 1.1x) at batch 1/8, batch-16 throughput (-> bench/results/e2e_<device>.json)
set +e
if want e2e; then
$PY bench/bench_e2e.py --config qwen2.5-1.5b --device cuda ${QUICK:+--quick}
E2E_RC=$?
fi
if want compare; then
# the same at batch 1 without CUDA graphs: what the graphs buy (-> e2e_eager_<device>.json)
$PY bench/bench_e2e.py --config qwen2.5-1.5b --device cuda --quick --batch-sizes 1 --enforce-eager \
  --out "bench/results/e2e_eager_${SLUG}.json" || E2E_RC=1
# MemGen with lazy weaver/trigger streams (the CPU default) instead of following R
# (the CUDA default): which is faster on this GPU (-> e2e_lazy_<device>.json)
$PY bench/bench_e2e.py --config qwen2.5-1.5b --device cuda --quick --batch-sizes 1 8 --lazy-memgen-streams \
  --out "bench/results/e2e_lazy_${SLUG}.json" || E2E_RC=1
fi

# 4. kernel microbenchmarks with pytest-benchmark, Triton vs torch reference per kernel
#    (-> bench/results/kernel_microbench_<device>.json; extra_info holds bytes and x floor)
if ! want micro; then
  :
elif $PY -c "import pytest_benchmark" 2>/dev/null; then
  $PY -m pytest bench/test_kernel_microbench.py -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds,iterations \
    --benchmark-json="bench/results/kernel_microbench_${SLUG}.json"
  MICRO_RC=$?
else
  echo "gpu.sh: pytest-benchmark is not installed (pip install 'memgen-engine[test]'): microbenchmarks skipped" >&2
  MICRO_RC=1
fi
set -e
# under the device tool, what lands in $OUT comes back to the calling machine
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp bench/results/*_"${SLUG}".json "$OUT"/ 2>/dev/null || true; fi
echo "gpu.sh: kernel tests rc=$TESTS_RC, end-to-end rc=$E2E_RC, microbenchmarks rc=$MICRO_RC; results in bench/results/*_${SLUG}.json"

[ "$TESTS_RC" -eq 0 ] && [ "$E2E_RC" -eq 0 ] && [ "$MICRO_RC" -eq 0 ]
