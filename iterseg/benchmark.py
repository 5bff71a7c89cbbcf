"""--mode=benchmark: measured speed and memory of each method beside its FLOPs.

One skeleton whatever the protocol: `native.benchmark_cases` gives the inputs and how each method
runs on them (the square protocol: a batch of random uint8 images [B, hi, hi, 3] per batch size,
every method compiled ahead of time; native resolution: a synthetic scene per side of
benchmark.native_sides, two-stage against the dense sliding window). `benchmark` compiles each
method (the compile time is reported), calls it in rounds (every method once a round, so that a
change of machine load hits them alike, every call blocked on) and keeps the median; the speed-up
is against the baseline on the same input. FLOPs are XLA's cost analysis of what ran; achieved
FLOP/s = FLOPs per call / median call time.

The plan fits the machine: unless the config says otherwise, CPU times batch 1 only and the
sliding-window reference (every patch refined) only up to Np = 8; GPU and TPU time batch 1 and 16
and every reference. A time budget (`benchmark.max_seconds`; predict's end-to-end run comes after,
if time is left) skips what would not fit, and the report says what it skipped.

Weights come from the workdir's checkpoints when it has them and are random (seed) otherwise:
speed does not depend on their values; a calibrated operating point is used. Runs on the default
device. When the workdir has results.json of the same geometry, its Dice and the measured latency
give tradeoff_latency.png.
"""

import contextlib
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, files, flops, methods, models, plots, report
from iterseg.errors import CheckpointError, Error
from iterseg.models import Networks
from iterseg.run import Run
from iterseg.settings import Settings

CPU_SLIDING_WINDOW_MAX_NP = 8

COLUMNS = (
    ('input', 'case', 's'), ('method', 'method', 's'), ('Np', 'num_patches', 'd'),
    ('ms/image', 'latency_ms', '.2f'), ('images/s', 'images_per_s', '.2f'),
    ('MPix/s', 'mpix_per_s', '.1f'), ('GFLOPs/img', 'gflops_per_image', '.3f'),
    ('GFLOP/s', 'achieved_gflops_per_s', '.1f'),
    ('% of peak', 'peak_fraction', lambda v: f'{100 * v:.2f}%'),
    ('peak RSS GB', 'peak_rss_gb', '.2f'), ('soft Dice', 'soft_dice', '.4f'),
    ('refined', 'refined_fraction', lambda v: f'{100 * v:.1f}%'),
    ('decoded', 'decoded_fraction', lambda v: f'{100 * v:.0f}%'), ('compile s', 'compile_s', '.1f'),
    ('speed-up', 'speedup_vs_baseline', lambda v: f'{v:.2f}x'), ('rounds', 'repeats', 'd'))
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
  cpu = (backend or jax.default_backend()) == 'cpu'
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
  for case in dict.fromkeys(r['case'] for r in rows):
    ratios = [f'Np={r["num_patches"]} {r["speedup_vs_baseline"]:.1f}x' for r in rows
              if r['case'] == case and r['method'] == 'two_stage' and r['speedup_vs_baseline']]
    parts.append(f'{case}: ' + ', '.join(ratios))
  return 'two-stage speed-up over the baseline (same run): ' + '; '.join(parts)


def plot_with_dice(rows: Sequence[dict], s: Settings, workdir: str) -> Optional[str]:
  """tradeoff_latency.png: the Dice of <workdir>/results.json (same geometry) against the batch-1
  latency measured here; None when there is no such results.json."""
  try:
    results = report.read_results(workdir)
  except CheckpointError as e:  # Said, and only this plot is left out.
    print(f'iterseg: warning: {e} The plot of Dice against latency is left out.')
    return None
  if results is None or results['geometry'] != s.spec.geometry():
    return None
  dice = {(r['method'], r['num_patches']): r['soft_dice'] for r in results['rows']}
  joined = [dict(r, soft_dice=dice[(r['method'], r['num_patches'])]) for r in rows
            if r['batch_size'] == 1 and (r['method'], r['num_patches']) in dice]
  return plots.plot_tradeoff(joined, os.path.join(workdir, 'tradeoff_latency.png'), x='latency_ms')


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
    with contextlib.suppress(OSError), open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:') and self.reset:
          self.gb = int(line.split()[1]) / 2 ** 20


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


def benchmark(cases: Sequence, *, repeats: int, max_seconds: float = float('inf'),
              progress: bool = True, peak: Optional[float] = None) -> tuple:
  """(rows, skipped, extras): every method of every case (`native.Case`) timed; a line per thing
  skipped; what else each case showed.

  Per case and method: compiled first (the time is reported), then called in rounds, every method
  once a round (noise comes in spells: it hits them alike), up to `repeats` rounds while the
  case's share of the time budget `max_seconds` (by pixels, against the cases still to come)
  allows; the median call is kept. The first call's peak resident memory is reported. A method
  whose first call would overrun the budget, estimated from its rate on the last case, is skipped,
  as is every case once the budget is spent. Rows: {'case', 'size', 'method', 'num_patches',
  'batch_size', 'compile_s', 'call_ms' (median), 'latency_ms' (per image), 'images_per_s',
  'mpix_per_s', 'gflops_per_image', 'achieved_gflops_per_s', 'peak_fraction', 'peak_rss_gb',
  'soft_dice' (against the case's mask), 'refined_fraction', 'speedup_vs_baseline', 'repeats',
  'times_ms'}.
  """
  start, rows, skipped, extras, rates = time.perf_counter(), [], [], [], {}
  left = lambda: max_seconds - (time.perf_counter() - start)
  spent = f'the time budget of {max_seconds:g} s'
  for i, case in enumerate(tqdm(cases, desc='benchmark', unit='input', disable=not progress)):
    if left() <= 0:
      skipped.append(f'{case.label}: every method ({spent} is spent)')
      continue
    timed, mask, extra = case.make()
    runs = []
    for t in timed:
      estimate = case.pixels / rates[t.key] if t.key in rates else 0.0
      if estimate > left():
        skipped.append(f'{case.label}: {t.key} (about {estimate:.1f} s; {spent} would be '
                       f'overrun)')
        continue
      compile_s = t.compile()
      if left() <= 0:
        skipped.append(f'{case.label}: {t.key} ({spent} is spent)')
        continue
      with PeakMemory() as memory:
        first = time.perf_counter()
        out = t.call()
        first = time.perf_counter() - first
      rates[t.key] = case.pixels / first
      if mask is not None:  # Scored now: the output is dropped before the next method runs.
        out['soft_dice'] = soft_dice(out['probs'], mask)
      out['probs'] = None
      runs.append({'t': t, 'out': out, 'times': [first], 'compile_s': compile_s,
                   'peak_rss_gb': memory.gb})
    share = left() * case.pixels / sum(c.pixels for c in cases[i:])
    round_s = sum(r['times'][0] for r in runs) or 1.0
    for _ in range(min(repeats, int(share // round_s) + 1) - 1):
      for r in runs:
        t0 = time.perf_counter()
        r['t'].call()
        r['times'].append(time.perf_counter() - t0)
    b = case.batch_size
    base = next((float(np.median(r['times'])) / b for r in runs if r['t'].name == 'baseline'),
                None)
    for r in runs:
      call, out = float(np.median(r['times'])), r['out']
      latency = call / b
      gflops = None if out['gflops'] is None else out['gflops'] / b
      rows.append({
          'case': case.label, 'size': case.size, 'method': r['t'].name,
          'num_patches': r['t'].num_patches, 'batch_size': b, 'compile_s': r['compile_s'],
          'call_ms': call * 1e3, 'latency_ms': latency * 1e3, 'images_per_s': b / call,
          'mpix_per_s': case.pixels / call / 1e6, 'gflops_per_image': gflops,
          'achieved_gflops_per_s': None if gflops is None else gflops / latency,
          'peak_fraction': None if gflops is None or not peak else gflops / latency / 1e3 / peak,
          'peak_rss_gb': r['peak_rss_gb'], 'refined_fraction': out['refined_fraction'],
          'soft_dice': out.get('soft_dice'), 'decoded_fraction': out.get('decoded'),
          'speedup_vs_baseline': None if base is None else base / latency,
          'repeats': len(r['times']), 'times_ms': [x * 1e3 for x in r['times']]})
    del runs
    if left() > 0:
      extras.append(extra())
  return rows, skipped, [e for e in extras if e]


def run(s: Settings, workdir: str, *, predict_throughput: Optional[Callable[[], dict]] = None
        ) -> dict:
  """--mode=benchmark: times every method (`native.benchmark_cases`); prints the table; writes
  <workdir>/benchmark.json and benchmark.png (time per megapixel against size).

  `predict_throughput`, when given, measures predict's end-to-end images/s (files in, files out),
  reported beside the segmenting call's alone. Returns {'device', 'backend', 'geometry', 'weights',
  'plan', 'skipped', 'rows', 'train_rows', 'extras', 'predict', 'files'}.
  """
  from iterseg import native  # pylint: disable=g-import-not-at-top
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir)
  s = s.with_placeholder_statistics()  # Untrained: random weights are timed.
  start = time.perf_counter()
  point = Run(workdir).operating_point()
  if point is not None:
    s = s.at_operating_point(point)
  what = plan(s)
  nets, weights = networks_for_benchmark(s, workdir)
  description = device_description()
  if main:
    print(f'Benchmark on {description}: hi_size {s.spec.hi_size}, stage 1 at 1/'
          f'{s.spec.downscale}, U-Net width {s.spec.width} depth {s.spec.depth}; budget '
          f'{s.benchmark.max_seconds:g} s; weights: {"random" if set(weights.values()) == {"random"} else weights}'
          + ('' if point is None else f'; the operating point of calibration.json: {point}')
          + '.', flush=True)
  peak = peak_tflops(s)
  cases = native.benchmark_cases(nets, s, **what)
  rows, skipped, extras = benchmark(cases, repeats=s.benchmark.repeats,
                                    max_seconds=s.benchmark.max_seconds, progress=main, peak=peak)
  train_rows = training_speed(s, peak, progress=main) if s.benchmark.train else []
  skipped += [f'{methods.method_key("sliding_window", n)}: not on {jax.default_backend()} by '
              f'default (set --config.benchmark.sliding_window=True)' for n in s.train.num_patches_list
              if n not in what['sliding_window_nps'] and s.benchmark.sliding_window is None]
  results = {
      'device': description, 'backend': jax.default_backend(), 'geometry': s.spec.geometry(),
      'resolution': s.spec.resolution, 'operating_point': point, 'weights': weights,
      'repeats': s.benchmark.repeats, 'plan': what, 'skipped': skipped, 'rows': rows,
      'statistic': 'median over the rounds', 'train_rows': train_rows, 'extras': extras,
      'dtype': s.spec.dtype, 'peak_tflops': peak,
  }
  if predict_throughput is not None and main:
    if time.perf_counter() - start < s.benchmark.max_seconds:
      results['predict'] = predict_throughput()
    else:
      skipped.append(f'predict end to end (time budget of {s.benchmark.max_seconds:g} s spent)')
  if main:
    _report(results, s, workdir)
  return results


def _report(results: dict, s: Settings, workdir: str) -> None:
  """Prints the tables and writes benchmark.json and the plots (process 0)."""
  rows, peak = results['rows'], results['peak_tflops']
  print(report.format_table(rows, COLUMNS))
  if results['train_rows']:
    print(report.format_table(results['train_rows'], TRAIN_COLUMNS))
  print(f'Utilisation: achieved FLOP/s / '
        f'{"no peak (set benchmark.peak_tflops)" if peak is None else f"{peak:g} TFLOP/s"} '
        f'({s.spec.dtype} on {jax.devices()[0].device_kind}).')
  for e in results['extras']:
    if 'tissue' in e:
      print(f'Slide {e["size"]} ({e["codec"]} tiles, {100 * e["tissue"]:.0f} % tissue): full-'
            f'resolution pixels decoded: ' + ', '.join(
                f'{k} {100 * v:.0f} %' for k, v in e['decoded'].items()) + '.')
      continue
    print(f'A threshold at the median score of the refined tiles ({e["threshold"]:.4f}) at '
          f'{e["size"]}: {e["tiles"][0]} -> {e["tiles"][1]} tiles refined, two-stage '
          f'{e["seconds"][0]:.2f} -> {e["seconds"][1]:.2f} s ({100 * e["cut"]:.0f} % less), '
          f'stage 2 {e["gflops"][0]:.2f} -> {e["gflops"][1]:.2f} GFLOPs.')
  path = os.path.join(workdir, 'benchmark.json')
  files.atomic_write_json(path, results)
  results['files'] = [path, plot_with_dice(rows, s, workdir)]
  if len({r['size'] for r in rows}) > 1:
    results['files'].append(plots.plot_benchmark(rows, os.path.join(workdir, 'benchmark.png')))
  print(speedup_summary(rows))
  for line in results['skipped']:
    print(f'Skipped {line}')
  if 'predict' in results:
    p = results['predict']
    print(f'predict end to end ({p["num_images"]} files of {p["size"]}, outputs '
          f'{"/".join(p["outputs"])}): {p["images_per_s"]:.1f} images/s, against '
          f'{p["compiled_images_per_s"]:.1f} images/s for the segmenting call alone.')
  print('Speed-up = baseline ms/image / method ms/image on the same input. Wrote '
        + ', '.join(p for p in results['files'] if p))
