"""--mode=benchmark: measured speed of each method, beside its FLOPs, on this machine.

For each batch size in config.benchmark.batch_sizes, on random images [B, hi, hi, 3]:
  baseline              `inference.baseline`: the U-Net on the full image;
  stage1                stage 1 alone (resize, U-Net at stage1_size, upsample);
  two_stage (Np)        `inference.two_stage` for each Np in config.train.num_patches_list;
  sliding_window (Np)   the reference that refines *every* patch: `inference.two_stage` with
                        refine_count = Np * Np (no threshold), i.e. what patch selection saves
                        (config.benchmark.sliding_window = False, an optional field, leaves it out).

Each function is compiled ahead of time (`jit(...).lower(...).compile()`, the compile time is
reported), called once to warm up, then timed `config.benchmark.repeats` times; every call is
blocked on with `jax.block_until_ready`. The repeats are interleaved (round r times every method once)
so that a change of machine load hits every method alike, and the median is kept. The jitted functions
are timed directly, so `iterseg.infer`'s host-side input checks are not. FLOPs are XLA's cost analysis
of the same compiled executables; achieved FLOP/s = FLOPs per call / median call time.

Weights come from the workdir's checkpoints when it has them and are random (config.seed) otherwise:
speed does not depend on their values. Data is never read. Runs on the default device (one device).
"""

import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iterseg import evaluate, inference

_stage1 = jax.jit(inference.stage1, static_argnames='spec')


def device_description() -> str:
  """E.g. 'cpu: cpu x 4 (2 host CPU cores)'."""
  devices = jax.devices()
  return (f'{jax.default_backend()}: {devices[0].device_kind} x {len(devices)} '
          f'({os.cpu_count()} host CPU cores); timed on {devices[0]}')


def params_for_benchmark(config, workdir: Optional[str], num_patches_list: Sequence[int]):
  """({'baseline', 'stage1', 'stage2': {Np: p}}, {network: 'trained' | 'random'}).

  Trained networks of `workdir` when it has any (and their geometry matches the config), random ones
  (key config.seed) for the rest.
  """
  trained = {}
  if workdir:
    try:
      trained = evaluate.load_trained(workdir, config)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; no workdir, other config.
      print(f'No trained weights used ({str(e).splitlines()[0][:200]}); timing random weights.')
  randoms = inference.init_params(config, jax.random.key(config.seed))
  params = {'stage2': {}}
  source = {}
  for name in ('baseline', 'stage1'):
    params[name] = trained.get(name, randoms[name])
    source[name] = 'trained' if name in trained else 'random'
  for n in num_patches_list:
    stage2 = trained.get('stage2', {})
    params['stage2'][n] = stage2.get(n, randoms['stage2'])
    source[f'stage2_np{n}'] = 'trained' if n in stage2 else 'random'
  return params, source


def methods(params: dict, config, num_patches_list: Sequence[int], sliding_window: bool = True):
  """[(name, Np, jitted fn, args, static kwargs)] for every benchmarked method."""
  spec = inference.spec_from_config(config)
  out = [('baseline', None, inference.baseline, (params['baseline'],), {'spec': spec}),
         ('stage1', None, _stage1, (params['stage1'],), {'spec': spec})]
  for n in num_patches_list:
    two = {'stage1': params['stage1'], 'stage2': params['stage2'][n]}
    spec_n = inference.spec_from_config(config, n)
    out.append(('two_stage', n, inference.two_stage, (two,), {'spec': spec_n}))
  for n in num_patches_list if sliding_window else ():
    two = {'stage1': params['stage1'], 'stage2': params['stage2'][n]}
    every = dataclasses.replace(inference.spec_from_config(config, n), refine_count=n * n,
                                threshold=None)
    out.append(('sliding_window', n, inference.two_stage, (two,), {'spec': every}))
  return out


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs per call from a compiled executable's cost analysis (None if the backend gives none)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Unsupported on some backends.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def _timed_call(fn: Callable, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def benchmark(params: dict, config, *, batch_sizes: Sequence[int], num_patches_list: Sequence[int],
              repeats: int, sliding_window: bool = True, progress: bool = True) -> list[dict]:
  """One row per (batch size, method, Np): latency, throughput, compile time, FLOPs, speed-up.

  params: {'baseline', 'stage1', 'stage2': {Np: p}}. Rows: {'method', 'num_patches', 'batch_size',
  'compile_s', 'call_ms' (median), 'latency_ms' (per image), 'images_per_s', 'gflops_per_image',
  'achieved_gflops_per_s', 'speedup_vs_baseline', 'times_ms' (every timed call)}.
  """
  if repeats < 1:
    raise ValueError(f'config.benchmark.repeats must be >= 1, got {repeats}')
  hi = int(config.hi_size)
  rows = []
  for b in batch_sizes:
    images = jax.random.uniform(jax.random.key(0), (int(b), hi, hi, 3), jnp.float32)
    runs = []
    for name, n, jitted, args, static in methods(params, config, num_patches_list, sliding_window):
      start = time.perf_counter()
      compiled = jitted.lower(*args, images, **static).compile()
      compile_s = time.perf_counter() - start
      runs.append({'name': name, 'n': n, 'fn': compiled, 'args': args + (images,),
                   'compile_s': compile_s, 'flops': compiled_flops(compiled), 'times': []})
      _timed_call(compiled, runs[-1]['args'])  # Warm-up.
      if progress:
        print(f'  batch {b}: compiled {name}{"" if n is None else f" Np={n}"} '
              f'in {compile_s:.1f} s', flush=True)
    for _ in range(repeats):  # Interleaved: every method once per round.
      for r in runs:
        r['times'].append(_timed_call(r['fn'], r['args']))
    base = None
    for r in runs:
      call = float(np.median(r['times']))
      latency = call / b
      base = latency if r['name'] == 'baseline' else base
      rows.append({
          'method': r['name'], 'num_patches': r['n'], 'batch_size': int(b),
          'compile_s': r['compile_s'], 'call_ms': call * 1e3, 'latency_ms': latency * 1e3,
          'images_per_s': b / call,
          'gflops_per_image': None if r['flops'] is None else r['flops'] / b / 1e9,
          'achieved_gflops_per_s': None if r['flops'] is None else r['flops'] / call / 1e9,
          'speedup_vs_baseline': base / latency,
          'times_ms': [t * 1e3 for t in r['times']],
      })
    del runs
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f'{"method":<15}{"Np":>4}{"batch":>6}{"ms/image":>10}{"images/s":>10}{"GFLOPs/img":>12}'
          f'{"GFLOP/s":>9}{"compile s":>10}{"speed-up":>10}')
  lines = [head, '-' * len(head)]
  for r in rows:
    g = '' if r['gflops_per_image'] is None else f'{r["gflops_per_image"]:.3f}'
    gs = '' if r['achieved_gflops_per_s'] is None else f'{r["achieved_gflops_per_s"]:.1f}'
    lines.append(f'{r["method"]:<15}{"" if r["num_patches"] is None else r["num_patches"]:>4}'
                 f'{r["batch_size"]:>6}{r["latency_ms"]:>10.2f}{r["images_per_s"]:>10.2f}{g:>12}'
                 f'{gs:>9}{r["compile_s"]:>10.1f}{r["speedup_vs_baseline"]:>9.2f}x')
  return '\n'.join(lines)


def speedup_summary(rows: list[dict]) -> str:
  """'two-stage vs baseline (same run): batch 1: Np=2 1.8x, Np=8 5.6x; ...'."""
  parts = []
  for b in sorted({r['batch_size'] for r in rows}):
    ratios = [f'Np={r["num_patches"]} {r["speedup_vs_baseline"]:.1f}x' for r in rows
              if r['batch_size'] == b and r['method'] == 'two_stage']
    parts.append(f'batch {b}: ' + ', '.join(ratios))
  return 'two-stage speed-up over the baseline (same run): ' + '; '.join(parts)


def run(config, workdir: str) -> dict:
  """--mode=benchmark: times every method; prints the table; writes <workdir>/benchmark.json.

  Returns {'device', 'backend', 'geometry', 'weights', 'repeats', 'rows', 'file'}.
  """
  nps = [int(n) for n in config.train.num_patches_list]
  batch_sizes = [int(b) for b in config.benchmark.batch_sizes]
  repeats = int(config.benchmark.repeats)
  # Optional (not in configs/default.py): the all-patches reference is slow at large batches.
  sliding_window = bool(config.benchmark.get('sliding_window', True))
  main = jax.process_index() == 0
  params, weights = params_for_benchmark(config, workdir, nps)
  description = device_description()
  if main:
    print(f'Benchmark on {description}; hi_size={config.hi_size}, U-Net width '
          f'{config.model.width} depth {config.model.depth}, weights: '
          f'{"random" if set(weights.values()) == {"random"} else weights}.', flush=True)
  rows = benchmark(params, config, batch_sizes=batch_sizes, num_patches_list=nps, repeats=repeats,
                   sliding_window=sliding_window, progress=main)
  results = {
      'device': description, 'backend': jax.default_backend(),
      'geometry': {field: evaluate.get_field(config, field) for field in evaluate.GEOMETRY},
      'refine_count': config.get('refine_count'), 'score': str(config.score),
      'threshold': config.get('threshold'),
      'weights': weights, 'repeats': repeats, 'batch_sizes': batch_sizes, 'num_patches_list': nps, 'statistic': 'median over repeats, after 1 warm-up',
      'rows': rows,
  }
  if main:
    print(format_table(rows))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'benchmark.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(path + '.tmp', path)
    results['file'] = path
    print(speedup_summary(rows))
    print(f'Speed-up = baseline ms/image / method ms/image at the same batch size. Wrote {path}')
  return results
