"""--mode=benchmark: measured speed of each method (`methods.methods`) beside its FLOPs.

For each batch size, on random uint8 images [B, hi, hi, 3], every method is compiled ahead of time
(`jit(...).lower(...).compile()`, the compile time is reported), called once to warm up, then timed
`repeats` times; every call is blocked on. The repeats are interleaved (round r times every method
once) so that a change of machine load hits every method alike, and the median is kept. FLOPs are
XLA's cost analysis of the same executables; achieved FLOP/s = FLOPs per call / median call time.

The plan fits the machine: unless the config says otherwise, CPU times batch 1 only and the
sliding-window reference only up to Np = 8; GPU and TPU time batch 1 and 16 and every reference.
A time budget (`benchmark.max_seconds`; predict's end-to-end run comes after, if time is left) skips
what would not fit, estimated from each method's warm-up call, and the report says what it skipped.

Weights come from the workdir's checkpoints when it has them and are random (seed) otherwise:
speed does not depend on their values. Data is never read. Runs on the default device (one device).
This is the one place that times methods: `latency` serves --mode=calibrate too. When the workdir
has results.json of the same geometry, its Dice and the measured latency give tradeoff_latency.png.
"""

import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, files, flops, methods, models, plots, report
from iterseg.errors import Error
from iterseg.models import Networks
from iterseg.settings import Settings

CPU_SLIDING_WINDOW_MAX_NP = 8

COLUMNS = (
    ('method', 'method', 's'), ('Np', 'num_patches', 'd'), ('batch', 'batch_size', 'd'),
    ('ms/image', 'latency_ms', '.2f'), ('images/s', 'images_per_s', '.2f'),
    ('GFLOPs/img', 'gflops_per_image', '.3f'), ('GFLOP/s', 'achieved_gflops_per_s', '.1f'),
    ('compile s', 'compile_s', '.1f'), ('speed-up', 'speedup_vs_baseline', lambda v: f'{v:.2f}x'))


def device_description() -> str:
  """E.g. 'cpu: cpu x 4 (2 host CPU cores); timed on TFRT_CPU_0'."""
  devices = jax.devices()
  return (f'{jax.default_backend()}: {devices[0].device_kind} x {len(devices)} '
          f'({os.cpu_count()} host CPU cores); timed on {devices[0]}')


def plan(s: Settings, backend: Optional[str] = None) -> dict:
  """{'batch_sizes', 'sliding_window_nps'}: what to time on this backend (config fields win)."""
  backend = backend or jax.default_backend()
  cpu = backend == 'cpu'
  batch_sizes = s.benchmark.batch_sizes or ((1,) if cpu else (1, 16))
  nps = s.train.num_patches_list
  if s.benchmark.sliding_window is None:
    sliding = tuple(n for n in nps if not cpu or n <= CPU_SLIDING_WINDOW_MAX_NP)
  else:
    sliding = tuple(nps) if s.benchmark.sliding_window else ()
  return {'batch_sizes': tuple(batch_sizes), 'sliding_window_nps': sliding}


def networks_for_benchmark(s: Settings, workdir: Optional[str]):
  """(Networks with stage 2 for every Np of the plan, {network: 'trained' | 'random'})."""
  trained = Networks()
  if workdir:
    try:
      trained = checkpoints.load_networks(workdir, s)
    except (Error, OSError) as e:  # No workdir, another config.
      print(f'No trained weights used ({str(e).splitlines()[0][:200]}); timing random weights.')
  nps = s.train.num_patches_list
  randoms = models.random_networks(s.spec, jax.random.key(s.seed), nps)
  nets = Networks(**{network: trained.get(network) or randoms.get(network)
                     for network in ('stage1', 'baseline')},
                  stage2={n: trained.stage2.get(n) or randoms.stage2[n] for n in nps})
  weights = {name: 'trained' if trained.get(name) is not None else 'random'
             for name in nets.names()}
  return nets, weights


def _timed_call(fn: Callable, images) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(images))
  return time.perf_counter() - start


def latency(method: methods.Method, images, repeats: int) -> float:
  """Seconds per image of `method` on the batch `images`: the median of `repeats` blocked calls,
  after one call that compiles."""
  compiled = method.lower(images).compile()
  fn = lambda x: compiled(method.params, x)
  _timed_call(fn, images)
  return float(np.median([_timed_call(fn, images) for _ in range(repeats)])) / len(images)


def benchmark(comparison: Sequence[methods.Method], *, batch_sizes: Sequence[int], hi_size: int,
              repeats: int, max_seconds: float = float('inf'), progress: bool = True):
  """(rows, skipped): one row per (batch size, method) timed, and a line per thing skipped.

  Rows: {'method', 'num_patches', 'batch_size', 'compile_s', 'call_ms' (median), 'latency_ms' (per
  image), 'images_per_s', 'gflops_per_image', 'achieved_gflops_per_s', 'speedup_vs_baseline',
  'times_ms' (every timed call)}. A method whose warm-up call shows that its repeats would overrun
  `max_seconds` (counted from the start) is skipped, as is every batch size after the budget ran out.
  """
  start, rows, skipped = time.perf_counter(), [], []
  left = lambda: max_seconds - (time.perf_counter() - start)
  for b in batch_sizes:
    if left() <= 0:
      skipped.append(f'batch {b}: every method (time budget of {max_seconds:g} s spent)')
      continue
    images = np.random.default_rng(0).integers(0, 256, (int(b), hi_size, hi_size, 3), np.uint8)
    images = jax.device_put(images)
    runs = []
    for m in tqdm(comparison, desc=f'compile batch {b}', unit='method', disable=not progress,
                  leave=False):
      t = time.perf_counter()
      compiled = m.lower(images).compile()
      compile_s = time.perf_counter() - t
      fn = lambda x, c=compiled, p=m.params: c(p, x)
      warm = _timed_call(fn, images)
      if warm * repeats > left():
        skipped.append(f'batch {b}: {m.key} (one call took {warm:.1f} s; {repeats} repeats would '
                       f'overrun the {max_seconds:g} s budget)')
        continue
      runs.append({'m': m, 'fn': fn, 'compile_s': compile_s,
                   'flops': flops.compiled_flops(compiled), 'times': []})
    bar = tqdm(total=repeats * len(runs), desc=f'time batch {b}', unit='call',
               disable=not progress, leave=False)
    for _ in range(repeats):  # Interleaved: every method once per round.
      for r in runs:
        r['times'].append(_timed_call(r['fn'], images))
        bar.update(1)
    bar.close()
    base = None
    for r in runs:
      call = float(np.median(r['times']))
      latency = call / b
      base = latency if r['m'].name == 'baseline' else base
      rows.append({
          'method': r['m'].name, 'num_patches': r['m'].num_patches, 'batch_size': int(b),
          'compile_s': r['compile_s'], 'call_ms': call * 1e3, 'latency_ms': latency * 1e3,
          'images_per_s': b / call,
          'gflops_per_image': None if r['flops'] is None else r['flops'] / b / 1e9,
          'achieved_gflops_per_s': None if r['flops'] is None else r['flops'] / call / 1e9,
          'speedup_vs_baseline': None if base is None else base / latency,
          'times_ms': [t * 1e3 for t in r['times']],
      })
  return rows, skipped


def speedup_summary(rows: Sequence[dict]) -> str:
  """'two-stage speed-up over the baseline (same run): batch 1: Np=2 1.8x, Np=8 5.6x; ...'."""
  parts = []
  for b in sorted({r['batch_size'] for r in rows}):
    ratios = [f'Np={r["num_patches"]} {r["speedup_vs_baseline"]:.1f}x' for r in rows
              if r['batch_size'] == b and r['method'] == 'two_stage' and r['speedup_vs_baseline']]
    parts.append(f'batch {b}: ' + ', '.join(ratios))
  return 'two-stage speed-up over the baseline (same run): ' + '; '.join(parts)


def plot_with_dice(rows: Sequence[dict], s: Settings, workdir: str) -> Optional[str]:
  """tradeoff_latency.png: the Dice of <workdir>/results.json (same geometry) against the batch-1
  latency measured here; None when there is no such results.json."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    if results.get('geometry') != s.spec.geometry():
      return None
    dice = {(r['method'], r['num_patches']): r['soft_dice'] for r in results['rows']}
  except (OSError, ValueError, KeyError, TypeError):
    return None
  joined = [dict(r, soft_dice=dice[(r['method'], r['num_patches'])]) for r in rows
            if r['batch_size'] == 1 and (r['method'], r['num_patches']) in dice]
  return plots.plot_tradeoff(joined, os.path.join(workdir, 'tradeoff_latency.png'), x='latency_ms')


def run(s: Settings, workdir: str, *, predict_throughput: Optional[Callable[[], dict]] = None
        ) -> dict:
  """--mode=benchmark: times every method; prints the table; writes <workdir>/benchmark.json.

  `predict_throughput`, when given, measures predict's end-to-end images/s (files in, files out),
  reported beside the compiled function's. Returns {'device', 'backend', 'geometry', 'weights',
  'plan', 'skipped', 'rows', 'predict', 'file'}.
  """
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir)
  start = time.perf_counter()
  what = plan(s)
  nets, weights = networks_for_benchmark(s, workdir)
  description = device_description()
  if main:
    print(f'Benchmark on {description}; hi_size={s.spec.hi_size}, U-Net width {s.spec.width} depth '
          f'{s.spec.depth}, batch sizes {what["batch_sizes"]}, budget {s.benchmark.max_seconds:g} s,'
          f' weights: {"random" if set(weights.values()) == {"random"} else weights}.', flush=True)
  comparison = [m for m in methods.methods(nets, s, sliding_window=True)
                if m.name != 'sliding_window' or m.num_patches in what['sliding_window_nps']]
  rows, skipped = benchmark(comparison, batch_sizes=what['batch_sizes'], hi_size=s.spec.hi_size,
                            repeats=s.benchmark.repeats, max_seconds=s.benchmark.max_seconds,
                            progress=main)
  skipped += [f'{methods.method_key("sliding_window", n)}: not on {jax.default_backend()} by '
              f'default (set --config.benchmark.sliding_window=True)' for n in s.train.num_patches_list
              if n not in what['sliding_window_nps'] and s.benchmark.sliding_window is None]
  results = {
      'device': description, 'backend': jax.default_backend(), 'geometry': s.spec.geometry(),
      'refine_count': s.refine_count, 'score': s.spec.score, 'threshold': s.spec.threshold,
      'weights': weights, 'repeats': s.benchmark.repeats, 'plan': what, 'skipped': skipped,
      'statistic': 'median over repeats, after 1 warm-up', 'rows': rows,
  }
  if predict_throughput is not None and main:
    if time.perf_counter() - start < s.benchmark.max_seconds:
      results['predict'] = predict_throughput()
    else:
      skipped.append(f'predict end to end (time budget of {s.benchmark.max_seconds:g} s spent)')
  if main:
    print(report.format_table(rows, COLUMNS))
    path = os.path.join(workdir, 'benchmark.json')
    files.atomic_write_json(path, results)
    results['file'] = path
    results['plot'] = plot_with_dice(rows, s, workdir)
    print(speedup_summary(rows))
    for line in skipped:
      print(f'Skipped {line}')
    if 'predict' in results:
      p = results['predict']
      print(f'predict end to end ({p["num_images"]} files of {p["size"]}, outputs '
            f'{"/".join(p["outputs"])}): {p["images_per_s"]:.1f} images/s, against '
            f'{p["compiled_images_per_s"]:.1f} images/s for the compiled function alone.')
    print(f'Speed-up = baseline ms/image / method ms/image at the same batch size. Wrote {path}')
  return results
