#!/usr/bin/env bash
# The GPU check: the benchmark table at 768 (batch 1 and 16, float32 and bfloat16, with training
# steps/s) and a 16384^2 native image, on the machine's own jax, flax, optax and orbax, into one
# markdown file. Installs nothing from the network: what the machine lacks comes from a folder of
# wheels (default .whl). About 5 minutes on one H100/H200.
#
#   bash .ci/gpu_check.sh [out.md]                       # on the GPU machine
#   GPU_CHECK_SMOKE=1 bash .ci/gpu_check.sh smoke.md      # tiny sizes, to try it on a CPU first
#
# The wheels, made where pip reaches PyPI (Python 3.12, x86-64, as the device machine's python3):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl ml-collections tensorflow-datasets grain \
#     array-record promise dm-tree simple-parsing docstring-parser tensorflow-metadata \
#     googleapis-common-protos immutabledict termcolor toml
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check.md}
wheels=${WHEELS:-.whl}
work=$(mktemp -d /tmp/iterseg-gpu-check.XXXXXX)
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$wheels"/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then  # Tiny sizes: the same commands in a minute on a CPU.
  square=(--config.hi_size=64 --config.model.width=4 --config.model.depth=3
          --config.num_patches=4 "--config.train.num_patches_list=(2,4)" --config.train.batch_size=4)
  native=("--config.benchmark.native_sides=(256,512)")
else  # Np 4 and 8, no sliding window: fewer compilations (seconds each at 768 on a GPU).
  square=(--config.train.batch_size=16 --config.num_patches=8 "--config.train.num_patches_list=(4,8)")
  native=("--config.benchmark.native_sides=(4096,16384)")
fi
start=$SECONDS
for dtype in float32 bfloat16; do
  echo "== benchmark at the paper's size, $dtype"
  python3 launch.py --config=configs/ph2.py --mode=benchmark --workdir="$work/$dtype" \
    "${square[@]}" --config.model.dtype=$dtype "--config.benchmark.batch_sizes=(1,16)" \
    --config.benchmark.sliding_window=False --config.benchmark.train=True \
    --config.benchmark.repeats=5 --config.benchmark.max_seconds=100
done
echo "== native resolution"
python3 launch.py --config=configs/native_demo.py --mode=benchmark --workdir="$work/native" \
  "${native[@]}" --config.benchmark.max_seconds=120
python3 - "$work" "$out" $((SECONDS - start)) <<'PY'
import json, sys
from iterseg import benchmark, report
work, out, seconds = sys.argv[1:]
lines = ['# iterseg GPU check', '']
for dtype in ('float32', 'bfloat16'):
  b = json.load(open(f'{work}/{dtype}/benchmark.json'))
  lines += [f'## Paper U-Net, {dtype} ({b["device"]}; peak {b["peak_tflops"]} TFLOP/s)', '',
            '```', report.format_table(b['rows'], benchmark.COLUMNS), '',
            report.format_table(b['train_rows'], benchmark.TRAIN_COLUMNS), '```', '']
  lines += [f'Skipped: {s}' for s in b['skipped']] + ['']
n = json.load(open(f'{work}/native/benchmark.json'))
lines += [f'## Native resolution ({n["device"]}, random weights)', '', '```',
          report.format_table(n['rows'], benchmark.NATIVE_COLUMNS), '```', '',
          f'Compilations: {n["compiles"]}. Skipped: {n["skipped"]}. Threshold saving: '
          f'{n["threshold_saving"]}.', '', f'Wall time of the check: {seconds} s.']
open(out, 'w').write('\n'.join(lines) + '\n')
print(f'Wrote {out}')
PY
