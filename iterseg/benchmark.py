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
from iterseg.run import Run
from iterseg.settings import Settings

CPU_SLIDING_WINDOW_MAX_NP = 8

COLUMNS = (
    ('method', 'method', 's'), ('Np', 'num_patches', 'd'), ('batch', 'batch_size', 'd'),
    ('ms/image', 'latency_ms', '.2f'), ('images/s', 'images_per_s', '.2f'),
    ('GFLOPs/img', 'gflops_per_image', '.3f'), ('GFLOP/s', 'achieved_gflops_per_s', '.1f'),
    ('% of peak', 'peak_fraction', lambda v: f'{100 * v:.2f}%'),
    ('compile s', 'compile_s', '.1f'), ('speed-up', 'speedup_vs_baseline', lambda v: f'{v:.2f}x'))
TRAIN_COLUMNS = (
    ('network', 'method', 's'), ('Np', 'num_patches', 'd'), ('batch', 'batch_size', 'd'),
    ('ms/step', 'step_ms', '.1f'), ('steps/s', 'steps_per_s', '.2f'),
    ('images/s', 'images_per_s', '.1f'), ('GFLOPs/step', 'gflops_per_step', '.2f'),
    ('GFLOP/s', 'achieved_gflops_per_s', '.1f'),
    ('% of peak', 'peak_fraction', lambda v: f'{100 * v:.2f}%'), ('compile s', 'compile_s', '.1f'))
# Dense peak TFLOP/s by device kind (substring of jax.devices()[0].device_kind) and dtype; a
# benchmark.peak_tflops overrides. CPUs have none: their peak depends on the machine.
PEAK_TFLOPS = {
    'H200': {'bfloat16': 989.0, 'float32': 67.0}, 'H100': {'bfloat16': 989.0, 'float32': 67.0},
    'A100': {'bfloat16': 312.0, 'float32': 19.5}, 'L4': {'bfloat16': 121.0, 'float32': 30.3},
    'TPU v4': {'bfloat16': 275.0}, 'TPU v5 lite': {'bfloat16': 197.0}, 'TPU v5e': {'bfloat16': 197.0},
    'TPU v5p': {'bfloat16': 459.0}, 'TPU v6': {'bfloat16': 918.0},
}


def peak_tflops(s: Settings, device_kind: Optional[str] = None) -> Optional[float]:
  """The peak TFLOP/s that utilisation is a fraction of: benchmark.peak_tflops, else the table's
  entry for this device and model.dtype, else None (CPU, unknown devices)."""
  if s.benchmark.peak_tflops is not None:
    return s.benchmark.peak_tflops
  kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peaks.get(s.spec.dtype)
  return None


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
              repeats: int, max_seconds: float = float('inf'), progress: bool = True,
              peak: Optional[float] = None):
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
          'peak_fraction': None if r['flops'] is None or not peak else (
              r['flops'] / call / 1e12 / peak),
          'speedup_vs_baseline': None if base is None else base / latency,
          'times_ms': [t * 1e3 for t in r['times']],
      })
  return rows, skipped


def training_speed(s: Settings, peak: Optional[float], *,
                   networks: Sequence[str] = ('stage1', 'stage2', 'baseline'),
                   progress: bool = True) -> list:
  """Each network's pmapped training step on random uint8 batches of train.batch_size images of
  hi_size (after a step that compiles): ms/step, steps/s, images/s, XLA's FLOPs per step over every
  local device, and the achieved FLOP/s and its fraction of `peak`."""
  from iterseg import state, train  # pylint: disable=g-import-not-at-top
  rows, devices = [], jax.local_device_count()
  batch = s.train.batch_size - s.train.batch_size % devices or devices
  rng = np.random.default_rng(0)
  hi = s.spec.hi_size
  data = {'image': rng.integers(0, 256, (devices, batch // devices, hi, hi, 3), dtype=np.uint8),
          'mask': rng.integers(0, 2, (devices, batch // devices, hi, hi), dtype=np.uint8)}
  data = jax.device_put(data, jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.local_devices()), ('d',)), jax.sharding.PartitionSpec('d')))
  frozen = train.replicate(models.init_unet(jax.random.key(1), s.spec, 'stage1'))
  for network in tqdm(networks, desc='time training', unit='network',
                      disable=not progress, leave=False):
    spec = s.spec_for(s.spec.num_patches) if network == 'stage2' else s.spec
    step = train.make_train_step(network, spec, s.train, 1)
    args = (train.replicate(state.create_train_state(s.train, spec, network)), data,
            frozen if network == 'stage2' else None)
    t = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t
    per_device = flops.compiled_flops(compiled)
    current, metrics = compiled(*args)  # The executable just compiled (step() would compile again).
    jax.block_until_ready(metrics)
    times = []
    for _ in range(s.benchmark.repeats):
      t = time.perf_counter()
      current, metrics = compiled(current, data, args[2])
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    total = None if per_device is None else per_device * devices  # One device's, counted.
    rows.append({'method': network, 'num_patches': spec.num_patches if network == 'stage2' else None,
                 'batch_size': batch, 'step_ms': seconds * 1e3, 'steps_per_s': 1 / seconds,
                 'images_per_s': batch / seconds, 'compile_s': compile_s,
                 'gflops_per_step': None if total is None else total / 1e9,
                 'achieved_gflops_per_s': None if total is None else total / seconds / 1e9,
                 'peak_fraction': None if total is None or not peak else (
                     total / seconds / 1e12 / peak / devices)})
  return rows


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
  s = s.with_placeholder_statistics()  # Untrained: random weights are timed.
  if s.spec.resolution == 'native':
    return run_native(s, workdir, progress=main)
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
  peak = peak_tflops(s)
  rows, skipped = benchmark(comparison, batch_sizes=what['batch_sizes'], hi_size=s.spec.hi_size,
                            repeats=s.benchmark.repeats, max_seconds=s.benchmark.max_seconds,
                            progress=main, peak=peak)
  train_rows = training_speed(s, peak, progress=main) if s.benchmark.train else []
  skipped += [f'{methods.method_key("sliding_window", n)}: not on {jax.default_backend()} by '
              f'default (set --config.benchmark.sliding_window=True)' for n in s.train.num_patches_list
              if n not in what['sliding_window_nps'] and s.benchmark.sliding_window is None]
  results = {
      'device': description, 'backend': jax.default_backend(), 'geometry': s.spec.geometry(),
      'refine_count': s.refine_count, 'score': s.spec.score, 'threshold': s.spec.threshold,
      'weights': weights, 'repeats': s.benchmark.repeats, 'plan': what, 'skipped': skipped,
      'statistic': 'median over repeats, after 1 warm-up', 'rows': rows, 'train_rows': train_rows,
      'dtype': s.spec.dtype, 'peak_tflops': peak,
  }
  if predict_throughput is not None and main:
    if time.perf_counter() - start < s.benchmark.max_seconds:
      results['predict'] = predict_throughput()
    else:
      skipped.append(f'predict end to end (time budget of {s.benchmark.max_seconds:g} s spent)')
  if main:
    print(report.format_table(rows, COLUMNS))
    if train_rows:
      print(report.format_table(train_rows, TRAIN_COLUMNS))
    print(f'Utilisation: achieved FLOP/s / {"no peak (set benchmark.peak_tflops)" if peak is None else f"{peak:g} TFLOP/s"} '
          f'({s.spec.dtype} on {jax.devices()[0].device_kind}).')
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


# --- Native resolution: time and memory against image size -----------------------------------------

NATIVE_COLUMNS = (
    ('size', 'size', 's'), ('method', 'method', 's'), ('s/image', 'seconds', '.2f'),
    ('MPix/s', 'mpix_per_s', '.1f'), ('peak RSS GB', 'peak_rss_gb', '.2f'),
    ('soft Dice', 'soft_dice', '.4f'), ('refined', 'refined_fraction', lambda v: f'{100 * v:.1f}%'),
    ('GFLOPs', 'gflops', '.1f'), ('speed-up', 'speedup', lambda v: f'{v:.1f}x'),
    ('rounds', 'repeats', 'd'))


class PeakMemory:
  """The peak resident memory of this process while the block runs (Linux: VmHWM, reset on entry
  through /proc/self/clear_refs); `gb` is None where that cannot be read."""

  def __enter__(self):
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
      self.reset = True
    except OSError:
      self.reset = False
    return self

  def __exit__(self, *exc):
    self.gb = None
    try:
      with open('/proc/self/status') as f:
        for line in f:
          if line.startswith('VmHWM:') and self.reset:
            self.gb = int(line.split()[1]) / 2 ** 20
    except OSError:
      pass


def soft_dice(probs: np.ndarray, bits: np.ndarray, rows: int = 1024) -> float:
  """Binary soft Dice (2 sum(p y) + 1) / (sum(p) + sum(y) + 1) of one image of any size against
  its mask packed into bits (np.packbits(mask > 0, axis=1)), summed in bands of rows: a 16384^2
  image needs no second full-size array."""
  py = p = y = 0.0
  width = probs.shape[1]
  for y0 in range(0, probs.shape[0], rows):
    band_p = probs[y0:y0 + rows, :, 0]
    band_y = np.unpackbits(bits[y0:y0 + rows], axis=1, count=width).astype(bool)
    py += float(band_p[band_y].sum(dtype=np.float64))
    p += float(band_p.sum(dtype=np.float64))
    y += float(band_y.sum())
  return (2 * py + 1) / (p + y + 1)


def run_native(s: Settings, workdir: str, *, progress: bool = True) -> dict:
  """--mode=benchmark at resolution='native': two-stage and the dense sliding window on synthetic
  high-resolution scenes of side benchmark.native_sides (square, not seen in training: scene
  indices from 10 000), one at a time, smallest first. For each: seconds per image (after a call
  that compiles that size's bucket; the median of up to benchmark.repeats rounds of both methods,
  as many as this size's share of the time budget allows), MPix/s, the peak resident memory of
  the first call, soft Dice against the scene's mask, the tiles refined, and the FLOPs that ran.
  A size whose dense run the time budget (benchmark.max_seconds) cannot fit, estimated from the
  last size, is skipped and reported. Also: the stage-2 time saved by a threshold that halves the
  refined tiles (at the largest size up to 4096). Writes benchmark.json and benchmark_native.png."""
  from iterseg import native  # pylint: disable=g-import-not-at-top
  from iterseg.data import synthetic  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  nets, weights = networks_for_benchmark(s, workdir)
  point = Run(workdir).operating_point()
  if point is not None:  # Two-stage at its calibrated budget.
    s = s.at_operating_point(point)
    if progress:
      print(f'Using the calibrated operating point of {workdir}/calibration.json: {point}.')
  model = native.NativeModel(nets, s.spec)
  sides = s.benchmark.native_sides
  description = device_description()
  if progress:
    print(f'Native benchmark on {description}: sides {sides}, U-Net width {s.spec.width} depth '
          f'{s.spec.depth}, tiles of {s.spec.patch_size} px (halo {s.spec.halo}), stage 1 at '
          f'1/{s.spec.downscale}, refine_fraction {s.spec.refine_fraction:g}, threshold '
          f'{s.spec.threshold}, dense windows of {s.spec.window_side} px (overlap '
          f'{s.spec.overlap:g}), weights: '
          f'{"random" if set(weights.values()) == {"random"} else "trained"}.', flush=True)
  rows, skipped, saving, dense_rate = [], [], None, None
  bar = tqdm(sides, desc='native benchmark', unit='size', disable=not progress)
  remaining = lambda: s.benchmark.max_seconds - (time.perf_counter() - start)
  for i, side in enumerate(bar):
    if remaining() <= 0:
      skipped.append(f'{side}x{side}: every method (the time budget of '
                     f'{s.benchmark.max_seconds:g} s is spent)')
      continue
    bar.set_postfix(side=side)
    scene = synthetic.make_highres_example(10_000 + side, side, side)
    image, mask = scene['image'], np.packbits(scene['mask'] > 0, axis=1)  # The mask in 1/8.
    del scene
    warm = model.warm(side, side)  # This size's buckets; stage 2's chunk sizes the first time.
    with PeakMemory() as memory:
      t = time.perf_counter()
      pred = model.two_stage(image)
      times = [time.perf_counter() - t]
    mpix = side * side / 1e6
    rows.append({'size': f'{side}x{side}', 'side': side, 'method': 'two_stage',
                 'peak_rss_gb': memory.gb, 'soft_dice': soft_dice(pred.probs, mask),
                 'refined_fraction': pred.stats['refined'] / pred.stats['tiles'],
                 'gflops': sum(pred.stats['gflops'].values()), 'compile_s': warm,
                 'stage_seconds': pred.stats['seconds']})
    two_stage = rows[-1]
    if side <= 4096:
      saving = _threshold_saving(model, image, pred) or saving
    del pred
    estimate = None if dense_rate is None else mpix / dense_rate
    dense, dense_times = None, []
    if nets.baseline is None:
      skipped.append(f'{side}x{side} dense: no baseline network')
    elif estimate is not None and estimate > remaining():
      skipped.append(f'{side}x{side} dense (about {estimate:.0f} s; the time budget of '
                     f'{s.benchmark.max_seconds:g} s would be spent)')
    else:
      with PeakMemory() as memory:
        t = time.perf_counter()
        probs = model.sliding_window(image)
        dense_times.append(time.perf_counter() - t)
      dense_rate = mpix / dense_times[0]
      rows.append({'size': f'{side}x{side}', 'side': side, 'method': 'sliding_window',
                   'peak_rss_gb': memory.gb, 'soft_dice': soft_dice(probs.probs, mask),
                   'refined_fraction': None, 'gflops': probs.stats['gflops']['dense']})
      dense = rows[-1]
      del probs
    # More rounds, both methods in each (interleaved, as noise comes in spells), while this size's
    # share of the budget (by area, against the sizes still to come) allows: the median is kept.
    round_s = times[0] + sum(dense_times)
    share = remaining() * side ** 2 / sum(x ** 2 for x in sides[i:])
    for _ in range(min(s.benchmark.repeats, int(share // round_s) + 1) - 1):
      times.append(_seconds(model.two_stage, image))
      if dense is not None:
        dense_times.append(_seconds(model.sliding_window, image))
    two_stage.update(seconds=float(np.median(times)), mpix_per_s=mpix / float(np.median(times)),
                     repeats=len(times))
    if dense is not None:
      dense.update(seconds=float(np.median(dense_times)), repeats=len(dense_times),
                   mpix_per_s=mpix / float(np.median(dense_times)))
      two_stage['speedup'] = dense['seconds'] / two_stage['seconds']
    del image, mask
  bar.close()
  results = {'device': description, 'backend': jax.default_backend(), 'resolution': 'native',
             'geometry': s.spec.geometry(), 'weights': weights, 'rows': rows, 'skipped': skipped,
             'threshold_saving': saving, 'compiles': model.compiles,
             'refine_fraction': s.spec.refine_fraction, 'threshold': s.spec.threshold}
  if progress:
    print(report.format_table(rows, NATIVE_COLUMNS))
    if saving:
      print(f'A threshold at the median score of the refined tiles ({saving["threshold"]:.4f}) at '
            f'{saving["size"]}: {saving["tiles"][0]} -> {saving["tiles"][1]} tiles refined, '
            f'stage 2 {saving["stage2_seconds"][0]:.2f} -> {saving["stage2_seconds"][1]:.2f} s '
            f'({100 * saving["stage2_cut"]:.0f} % less), {saving["gflops"][0]:.2f} -> '
            f'{saving["gflops"][1]:.2f} GFLOPs.')
    for line in skipped:
      print(f'Skipped {line}')
    print(f'{model.compiles} compilations for {len(sides)} sizes (stage 1 per size bucket, the '
          f'bands per width bucket, stage 2 per chunk size, the windows once).')
    path = os.path.join(workdir, 'benchmark.json')
    files.atomic_write_json(path, results)
    results['files'] = [path, plots.plot_native_benchmark(rows, os.path.join(
        workdir, 'benchmark_native.png'))]
    print('Wrote ' + ', '.join(results['files']))
  return results


def _seconds(fn, image: np.ndarray) -> float:
  """Seconds of one call fn(image), its result dropped."""
  t = time.perf_counter()
  fn(image)
  return time.perf_counter() - t


def _threshold_saving(model, image: np.ndarray, pred) -> Optional[dict]:
  """Two-stage again with a threshold at the median score of the tiles `pred` refined: about half
  of them are refined; the stage-2 time and FLOPs before and after."""
  chosen = pred.scores.reshape(-1)[pred.refined.reshape(-1)]
  if len(chosen) < 2 * model.spec.chunk:
    return None
  threshold = float(np.median(chosen))
  again = model.two_stage(image, threshold=threshold)
  before, after = pred.stats['seconds']['stage2'], again.stats['seconds']['stage2']
  return {'size': f'{image.shape[0]}x{image.shape[1]}', 'threshold': threshold,
          'tiles': [pred.stats['refined'], again.stats['refined']],
          'stage2_seconds': [before, after], 'stage2_cut': 1 - after / before,
          'gflops': [pred.stats['gflops']['stage2'], again.stats['gflops']['stage2']]}
