"""Test-split evaluation (paper Figures 3 and 4): Dice and IoU of every method beside its FLOPs.

Each method of `methods.methods` is a row of results.json / results.csv, with the metrics of
`metrics.image_metrics` averaged over the test images (as the authors), `refined_fraction` (the share
of each image's pixels that stage 2 recomputed, from `Prediction.refined`) and GFLOPs per image from
XLA (`gflops`: the authors' accounting stage1(hi/8) + k * stage2(hi/Np); `gflops_compiled`: the whole
compiled function). Speed is the benchmark's (--mode=benchmark), measured on its own.
"""

import math
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, files, flops, methods, metrics, report
from iterseg.data import pipeline
from iterseg.methods import Method
from iterseg.errors import DataError
from iterseg.settings import Settings

SEAM = ('seam_soft_dice', 'seam_hard_dice')


def evaluate(comparison: Sequence[Method], batches: Iterable[dict], num_classes: int, *,
             total: Optional[int] = None, progress: bool = True, seam_np: Optional[int] = None,
             allow_empty: bool = False) -> dict:
  """Runs every method on every batch and averages the per-image metrics over the images.

  Seams: 'seam_soft_dice' and 'seam_hard_dice' are the same metrics restricted to the pixels near
  the inner borders of the patch grid (`metrics.seam_band`, width patch side / 8, at least 2 px), of
  the method's own Np (of `seam_np` for the baseline and stage 1), where bare patches lack context.

  batches: {'image': [b, H, W, 3], 'mask': [b, H, W] ids, 'name' (optional) [b]}, as
  `pipeline.eval_batches` yields them (a partial last batch is padded, so nothing recompiles).
  Returns {'num_images', 'names', 'methods': {key: {metric: mean, 'refined_fraction': mean or None,
  'per_image': {metric: [values]}}}}.
  """
  keys = metrics.METRICS + SEAM + ('refined_fraction',)
  per_image = {m.key: {k: [] for k in keys} for m in comparison}
  bands = {}
  names, batch_size, num_images = [], None, 0
  for batch in tqdm(batches, total=total, desc='evaluate', unit='batch', disable=not progress):
    b = len(batch['image'])
    batch_size = batch_size or b
    images = jnp.asarray(pipeline.pad_batch(np.asarray(batch['image']), batch_size))
    masks = jnp.asarray(pipeline.pad_batch(np.asarray(batch['mask']), batch_size))
    names += [str(n) for n in batch['name']] if 'name' in batch else [str(num_images + i)
                                                                       for i in range(b)]
    for m in comparison:
      probs, fraction = m(images)
      values = jax.device_get(metrics.image_metrics(probs, masks, num_classes))
      for k in metrics.METRICS:
        per_image[m.key][k] += values[k][:b].tolist()
      n = m.num_patches or seam_np
      if n:
        hi = images.shape[1]
        band = bands.setdefault(n, jnp.asarray(metrics.seam_band(hi, n, max(2, hi // n // 8))))
        seam = jax.device_get(metrics.image_metrics(probs, masks, num_classes, band))
        for k in SEAM:
          per_image[m.key][k] += seam[k[len('seam_'):]][:b].tolist()
      if fraction is not None:
        per_image[m.key]['refined_fraction'] += np.asarray(fraction)[:b].tolist()
    num_images += b
  return _summarized(per_image, names, allow_empty)


def _summarized(per_image: dict, names: list, allow_empty: bool) -> dict:
  """{'num_images', 'names', 'methods': {key: {metric: mean, 'refined_fraction': mean or None,
  'per_image': {metric: [values]}}}} of per-image lists {key: {metric: [values]}}."""
  if not names and not allow_empty:
    raise DataError('no images to evaluate: the test split is empty; check config.data.')
  out = {}
  for key, lists in per_image.items():
    values = {k: v for k, v in lists.items() if v}
    fractions = values.pop('refined_fraction', [])
    out[key] = {**{k: float(np.mean(v)) for k, v in values.items()},
                'refined_fraction': float(np.mean(fractions)) if fractions else None,
                'per_image': values}
  return {'num_images': len(names), 'names': names, 'methods': out}


PER_IMAGE = metrics.METRICS + SEAM + ('refined_fraction', 'gflops', 'seconds')


def merge_processes(evaluation: dict, total: int) -> dict:
  """Under several processes, the evaluations of each process's share (process p: images p, p + P,
  ...) gathered into one, in the split's order, on every process; as it is under one. DataError if
  the split is empty."""
  processes = jax.process_count()
  if processes > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    rows = -(-total // processes)
    order = [(i % processes, i // processes) for i in range(total)]
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a))  # [P, rows, ...]
    names = np.zeros((rows, 256), np.uint8)
    for i, name in enumerate(evaluation['names']):
      encoded = name.encode()[:256]
      names[i, :len(encoded)] = np.frombuffer(encoded, np.uint8)
    every = gather(names)
    merged_names = [every[p, r].tobytes().rstrip(b'\0').decode() for p, r in order]
    per_image = {}
    for key in sorted(evaluation['methods']):
      mine = evaluation['methods'][key]['per_image']
      per_image[key] = {}
      for metric in PER_IMAGE:  # The same gathers, in the same order, on every process.
        padded = np.full(rows, np.nan)
        values = mine.get(metric, [])
        padded[:len(values)] = values
        every = gather(padded)
        per_image[key][metric] = [float(every[p, r]) for p, r in order
                                  if not np.isnan(every[p, r])]
    evaluation = _summarized(per_image, merged_names, allow_empty=True)
  if not evaluation['num_images']:
    raise DataError('no images to evaluate: the test split is empty; check config.data.')
  return evaluation


def evaluate_native(model, source: Sequence[dict], num_classes: int, *,
                    refine_fraction: Optional[float] = None, threshold='config',
                    progress: bool = True, allow_empty: bool = False) -> dict:
  """resolution='native': every method of `model` (native.NativeModel) on every image of `source`
  at its own size, the metrics on its own mask. Returns `evaluate`'s structure, and per method
  'gflops' (the mean per image of what ran) and 'seconds' (the mean per image)."""
  keys = {'baseline': model.nets.baseline is not None, 'stage1': model.nets.stage1 is not None,
          methods.method_key('two_stage', model.spec.num_patches): model.stage2_params
          is not None}
  keys = [k for k, present in keys.items() if present]
  per_image = {k: {m: [] for m in metrics.METRICS + ('refined_fraction', 'gflops', 'seconds')}
               for k in keys}
  names = []
  for example in tqdm(source, total=len(source), desc='evaluate', unit='image',
                      disable=not progress):
    names.append(str(example['name']))
    for key in keys:
      if key == 'baseline':
        pred = model.sliding_window(example['image'])
      elif key == 'stage1':
        pred = model.stage1_only(example['image'])
      else:
        pred = model.two_stage(example['image'], refine_fraction=refine_fraction,
                               threshold=threshold)
        per_image[key]['refined_fraction'].append(pred.stats['refined'] / pred.stats['tiles'])
      for name, value in metrics.one_image_metrics(pred.probs, example['mask'],
                                                   num_classes).items():
        per_image[key][name].append(value)
      per_image[key]['gflops'].append(sum(pred.stats['gflops'].values()))
      per_image[key]['seconds'].append(sum(pred.stats['seconds'].values()))
  return _summarized(per_image, names, allow_empty)


def make_rows(comparison: Sequence[Method], evaluation: dict, flop_report: dict) -> list:
  """One flat row per method: the averaged metrics and GFLOPs per image."""
  rows = []
  for m in comparison:
    e = evaluation['methods'][m.key]
    if m.name == 'two_stage':
      gflops = flop_report['two_stage'][m.num_patches]
      compiled = flop_report['two_stage_compiled'][m.num_patches]
    else:
      gflops = compiled = flop_report[m.name]
    rows.append({
        'method': m.name, 'num_patches': m.num_patches, **{k: e[k] for k in metrics.METRICS},
        **{k: e.get(k) for k in SEAM},
        'refined_fraction': e['refined_fraction'], 'gflops': gflops / 1e9,
        'gflops_compiled': None if compiled is None else compiled / 1e9,
        'num_images': evaluation['num_images']})
  return rows


def run(s: Settings, workdir: str) -> dict:
  """--mode=evaluate: every trained method on the test split; writes results.{json,csv} and plots.

  Returns {'rows', 'num_images', 'dataset', 'names', 'per_image', 'flops', 'files'}.
  """
  from iterseg import data  # pylint: disable=g-import-not-at-top  # (TFDS is slow to import)
  from iterseg.data import pipeline  # pylint: disable=g-import-not-at-top
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir)
  nets = checkpoints.load_networks(workdir, s)
  source = data.load_split(s.data, 'test')
  mine = data.Subset(source, range(jax.process_index(), len(source), jax.process_count()))
  if s.spec.resolution == 'native':
    return _write(s, workdir, _native_results(s, nets, mine, len(source), main), main)
  comparison = methods.methods(nets, s)
  batch_size = s.eval.batch_size
  evaluation = merge_processes(evaluate(
      comparison, pipeline.eval_batches(mine, batch_size), s.spec.num_classes,
      total=math.ceil(len(mine) / batch_size), progress=main, seam_np=s.spec.num_patches,
      allow_empty=True), len(source))
  nps = sorted(nets.stage2) if nets.stage1 is not None else []
  flop_report = flops.report(s, nps or [s.spec.num_patches])
  rows = make_rows(comparison, evaluation, flop_report)
  results = {
      'rows': rows, 'num_images': evaluation['num_images'], 'geometry': s.spec.geometry(),
      'dataset': s.data.name, 'names': evaluation['names'],
      'per_image': {k: v['per_image'] for k, v in evaluation['methods'].items()},
      'flops': {'baseline': flop_report['baseline'], 'stage1': flop_report['stage1'],
                **{key: {str(n): f for n, f in flop_report[key].items()}
                   for key in ('stage2', 'two_stage', 'two_stage_compiled')}},
  }
  return _write(s, workdir, results, main)


def _native_results(s: Settings, nets, mine, total: int, main: bool) -> dict:
  """The results of resolution='native': each image at its own size; FLOPs are what ran. `mine`:
  this process's share of the `total` test images."""
  from iterseg import native  # pylint: disable=g-import-not-at-top
  model = native.NativeModel(nets, s.spec)
  evaluation = merge_processes(evaluate_native(model, mine, s.spec.num_classes, progress=main,
                                               allow_empty=True), total)
  rows = []
  for key, e in evaluation['methods'].items():
    name, _, n = key.partition('_np')
    rows.append({'method': name, 'num_patches': int(n) if n else None,
                 **{k: e[k] for k in metrics.METRICS}, 'refined_fraction': e['refined_fraction'],
                 'gflops': e['gflops'], 'gflops_compiled': e['gflops'],
                 'num_images': evaluation['num_images']})
  return {'rows': rows, 'num_images': evaluation['num_images'], 'geometry': s.spec.geometry(),
          'dataset': s.data.name, 'names': evaluation['names'], 'resolution': 'native',
          'per_image': {k: v['per_image'] for k, v in evaluation['methods'].items()},
          'compiles': model.compiles}


def _write(s: Settings, workdir: str, results: dict, main: bool) -> dict:
  if main:
    results['files'] = report.write_results(results, workdir)
    print(f'Test split of {s.data.name}: {results["num_images"]} images'
          f'{" at their own sizes" if s.spec.resolution == "native" else ""} (speed: '
          f'--mode=benchmark).')
    print(report.format_table(results['rows'], report.EVALUATION_COLUMNS))
    print('Wrote ' + ', '.join(results['files']))
  return results
