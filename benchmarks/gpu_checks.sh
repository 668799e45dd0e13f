#!/usr/bin/env bash
# The CUDA checks, in one run on a GPU machine: the --device cuda tests, then the benchmarks that
# take --device. Each step has its own time limit, so one slow step never hides the others.
#
# The machine may lack the project's own packages (duckdb, polars, weightwatcher, ...): put them,
# unpacked from wheels for that machine's Python, in .whl/site.tar.xz and they are used from there.
#     bash benchmarks/gpu_checks.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:-.}"
mkdir -p "$log"
failed=0
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site.tar.xz && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, duckdb, polars; print('torch', torch.__version__, 'duckdb', duckdb.__version__, 'polars', polars.__version__, 'cpus', torch.get_num_threads())"

step() {  # step SECONDS NAME COMMAND...: run one check, its output also to LOG_DIR/NAME.txt
  local limit=$1 name=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$log/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=1
}
step 240 tests python3 -m pytest -q -p no:cacheprovider -s tests/test_device.py tests/test_tiers.py -k "cuda or device"
step 180 weightwatcher python3 benchmarks/bench_weightwatcher.py --sizes 70m,160m,410m --repeats 1 --device cuda
step 60 tiers python3 benchmarks/bench_tiers.py --device cuda --repeats 1
step 60 activations python3 benchmarks/bench_activations.py --models demo,70m --device cpu,cuda --repeats 2
step 45 data_order python3 benchmarks/bench_data_order.py --sizes "" --models 70m,160m --device cuda
exit "$failed"  # non-zero when any step failed or ran out of time
