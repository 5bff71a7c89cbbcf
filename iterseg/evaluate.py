"""Test-split evaluation (paper Figures 3 and 4): Dice and IoU of every method beside its FLOPs.

Methods, each a row of results.json / results.csv:
  ('baseline', None)   the U-Net on the full-resolution image;
  ('stage1', None)     stage 1 alone, its output upsampled to hi_size (`Prediction.coarse`);
  ('two_stage', Np)    the two-stage method (`Prediction.probs`), for each Np with a trained stage 2.

Metrics, computed per image and then averaged over the test images (as the authors):
  soft_dice  (2 sum(p y) + 1) / (sum(p) + sum(y) + 1) on the probabilities (`losses.per_image_soft_dice`);
  hard_dice  2 |P n Y| / (|P| + |Y|) with P = {p > 0.5}; 1 when both are empty;
  iou        |P n Y| / |P u Y|; 1 when both are empty;
  refined_fraction  the fraction of the image's pixels that stage 2 recomputed (two-stage only).
With num_classes > 1 each metric is the mean over the foreground classes 1..C-1 of the one-hot metric
(soft: softmax probability of class c vs. mask == c; hard: argmax == c vs. mask == c), so class 0 is the
background and a class absent from both the prediction and the mask counts as 1 (hard metrics).

FLOPs per image come from XLA's cost analysis (`flops.report`): `gflops` in the authors' accounting
(the networks only: stage1(hi/8) + k * stage2(hi/Np)), `gflops_compiled` for the whole compiled function.
Latency per image (for the Dice vs. latency plot): the batch-1 median of `<workdir>/benchmark.json`
when that file was written for the same geometry; otherwise timed during this evaluation (median over
the batches after the first, which pays for compilation, of the blocked predictor call per image at
config.eval.batch_size). `results['latency_source']` says which.
"""

import csv
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from iterseg import flops, inference, losses

METRICS = ('soft_dice', 'hard_dice', 'iou')
# Config fields the weights depend on: evaluation refuses a config that disagrees with the saved one.
GEOMETRY = ('hi_size', 'stage1_size', 'num_classes', 'stage2_uses_coarse', 'model.width',
            'model.depth')

Method = tuple  # (name, Np or None), e.g. ('two_stage', 8).


# --- Metrics ------------------------------------------------------------------------------------------


def _ratio(numerator, denominator):
  """numerator / denominator, and 1 where both are 0 (an empty prediction of an empty mask)."""
  empty = denominator == 0
  return jnp.where(empty, 1.0, numerator / jnp.where(empty, 1.0, denominator))


@functools.partial(jax.jit, static_argnames='num_classes')
def image_metrics(probs, masks, num_classes: int) -> dict:
  """Per-image metrics. probs: [B, H, W, C] float32; masks: [B, H, W] class ids -> {name: [B]}."""
  axes = (1, 2)
  if num_classes == 1:
    labels = (masks != 0).astype(jnp.float32)
    soft = losses.per_image_soft_dice(probs[..., 0], labels)
    pred = (probs[..., 0] > 0.5).astype(jnp.float32)
    inter = jnp.sum(pred * labels, axes)
    total = jnp.sum(pred, axes) + jnp.sum(labels, axes)
    return {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
            'iou': _ratio(inter, total - inter)}
  onehot = jax.nn.one_hot(masks.astype(jnp.int32), num_classes, dtype=jnp.float32)  # [B, H, W, C]
  pred = jax.nn.one_hot(jnp.argmax(probs, -1), num_classes, dtype=jnp.float32)
  soft = losses.soft_dice(probs, onehot, axis=axes)  # [B, C], smooth 1.
  inter = jnp.sum(pred * onehot, axes)
  total = jnp.sum(pred, axes) + jnp.sum(onehot, axes)
  per_class = {'soft_dice': soft, 'hard_dice': _ratio(2 * inter, total),
               'iou': _ratio(inter, total - inter)}
  return {name: v[:, 1:].mean(-1) for name, v in per_class.items()}  # Foreground classes only.


def refined_fraction(pred: inference.Prediction, spec: inference.Spec):
  """[B]: the fraction of each image's pixels that stage 2 recomputed (patches over the threshold)."""
  if spec.threshold is None:
    count = jnp.full(pred.refined.shape[:1], spec.refine_count, jnp.float32)
  else:
    chosen = jnp.take_along_axis(pred.scores, pred.refined, axis=1)
    count = jnp.sum(chosen >= spec.threshold, axis=1).astype(jnp.float32)
  return count / spec.num_patches ** 2


# --- Predictors: images [B, H, W, 3] -> probs [B, H, W, C] or (probs, refined_fraction [B]) ------------


_stage1 = jax.jit(inference.stage1, static_argnames='spec')


@functools.partial(jax.jit, static_argnames='spec')
def _two_stage(params, images, spec):
  pred = inference.two_stage(params, images, spec)
  return pred.probs, refined_fraction(pred, spec)


def predictors(params: dict, config) -> dict[Method, Callable]:
  """The methods that `params` can run, as functions of images [B, hi, hi, 3].

  params: {'baseline': p, 'stage1': p, 'stage2': {Np: p}}, any of them absent (not trained).
  """
  out = {}
  if 'baseline' in params:
    spec = inference.spec_from_config(config)
    out[('baseline', None)] = functools.partial(inference.baseline, params['baseline'], spec=spec)
  if 'stage1' in params:
    spec = inference.spec_from_config(config)
    out[('stage1', None)] = functools.partial(_stage1, params['stage1'], spec=spec)
    for n, stage2 in sorted(params.get('stage2', {}).items()):
      two = {'stage1': params['stage1'], 'stage2': stage2}
      spec = inference.spec_from_config(config, n)
      out[('two_stage', n)] = functools.partial(_two_stage, two, spec=spec)
  return out


# --- The evaluation loop ------------------------------------------------------------------------------


def _pad(array: np.ndarray, size: int) -> np.ndarray:
  """Repeats the last row so that a partial last batch has the shape already compiled."""
  if len(array) == size:
    return array
  return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def evaluate(predict_fns: dict[Method, Callable], batches: Iterable[dict], num_classes: int, *,
             total: Optional[int] = None, progress: bool = True) -> dict:
  """Runs every predictor on every batch and averages the per-image metrics over the images.

  predict_fns: {method: fn(images) -> probs [B, H, W, C] or (probs, refined_fraction [B])};
  batches: {'image': float32 [b, H, W, 3], 'mask': [b, H, W] ids, 'name' (optional) [b]}, as
  `pipeline.eval_batches` yields them (a partial last batch is padded, so nothing recompiles).
  Returns {'num_images', 'names', 'methods': {method: {metric: mean, 'refined_fraction': mean or None,
  'per_image': {metric: [values]}, 'latency_s': median blocked call time per image}}}.
  """
  per_image = {m: {k: [] for k in METRICS + ('refined_fraction',)} for m in predict_fns}
  call_times = {m: [] for m in predict_fns}
  names, batch_size, num_images, last = [], None, 0, None
  for batch in tqdm(batches, total=total, desc='evaluate', unit='batch', disable=not progress):
    b = len(batch['image'])
    batch_size = batch_size or b
    images = jnp.asarray(_pad(np.asarray(batch['image'], np.float32), batch_size))
    masks = jnp.asarray(_pad(np.asarray(batch['mask']), batch_size))
    names += [str(n) for n in batch['name']] if 'name' in batch else [str(num_images + i)
                                                                       for i in range(b)]
    for method, fn in predict_fns.items():
      start = time.perf_counter()
      out = jax.block_until_ready(fn(images))
      call_times[method].append(time.perf_counter() - start)
      probs, fraction = out if isinstance(out, tuple) else (out, None)
      metrics = jax.device_get(image_metrics(probs, masks, num_classes))
      for k in METRICS:
        per_image[method][k] += metrics[k][:b].tolist()
      if fraction is not None:
        per_image[method]['refined_fraction'] += np.asarray(fraction)[:b].tolist()
    num_images += b
    last = images
  if not num_images:
    raise ValueError('no images to evaluate: the test split is empty; check config.data.')
  for method, fn in predict_fns.items():  # One batch only: its time included compilation.
    if len(call_times[method]) == 1:
      start = time.perf_counter()
      jax.block_until_ready(fn(last))
      call_times[method].append(time.perf_counter() - start)
  methods = {}
  for method, values in per_image.items():
    fractions = values.pop('refined_fraction')
    methods[method] = {
        **{k: float(np.mean(v)) for k, v in values.items()},
        'refined_fraction': float(np.mean(fractions)) if fractions else None,
        'per_image': values,
        'latency_s': float(np.median(call_times[method][1:])) / batch_size,
    }
  return {'num_images': num_images, 'names': names, 'methods': methods}


def evaluate_params(params: dict, batches: Iterable[dict], config, **kwargs) -> dict:
  """`evaluate` of every method that params ({'baseline', 'stage1', 'stage2': {Np: p}}) can run."""
  return evaluate(predictors(params, config), batches, int(config.num_classes), **kwargs)


# --- Loading a workdir --------------------------------------------------------------------------------


def get_field(config, dotted: str):
  """config['model']['width'] for 'model.width'."""
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def check_same_geometry(config, saved, workdir: str = ''):
  """ValueError unless `config` agrees with the workdir's saved config on what the weights depend on."""
  for field in GEOMETRY:
    if get_field(config, field) != get_field(saved, field):
      raise ValueError(
          f'config.{field}={get_field(config, field)!r} but the networks in '
          f'{workdir or "the workdir"} were trained with {get_field(saved, field)!r}: use the '
          f'training config (or --config.{field}={get_field(saved, field)!r}).')


def load_trained(workdir: str, config) -> dict:
  """{'baseline', 'stage1', 'stage2': {Np: p}} of every network trained in `workdir` (absent: not).

  Raises checkpoints.CheckpointError when the workdir holds no trained network.
  """
  from iterseg import checkpoints  # Imported here: orbax is slow to import.
  saved = checkpoints.read_config(workdir)
  check_same_geometry(config, saved, workdir)
  nps = checkpoints.trained_num_patches(workdir)
  params = {'stage2': {}}
  trained = checkpoints.trained_networks(workdir)
  for name in ('stage1', 'baseline'):
    if name in trained:
      params[name] = checkpoints.load_params(workdir, name, saved)
  for n in nps:
    params['stage2'][n] = checkpoints.load_params(workdir, checkpoints.network_name('stage2', n),
                                                  saved)
  if 'stage1' not in params and 'baseline' not in params:
    raise checkpoints.CheckpointError(
        f'no trained network in {checkpoints.network_dir(workdir, "")}: run '
        f'`python launch.py --mode=train --workdir={workdir}` first.')
  return params


# --- Latency, rows, files -----------------------------------------------------------------------------


def benchmark_latencies(workdir: str, config) -> Optional[dict]:
  """{method: seconds per image at batch 1} from <workdir>/benchmark.json, or None if absent / other
  geometry."""
  path = os.path.join(workdir, 'benchmark.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      bench = json.load(f)
    geometry = bench['geometry']
    if any(geometry.get(field) != get_field(config, field) for field in GEOMETRY):
      return None
    return {(r['method'], r['num_patches']): r['latency_ms'] / 1e3 for r in bench['rows']
            if r['batch_size'] == 1}
  except (OSError, ValueError, KeyError, TypeError):
    return None


def make_rows(evaluation: dict, flop_report: dict, latencies: dict) -> list[dict]:
  """One flat row per method: the averaged metrics, GFLOPs per image and latency in ms."""
  rows = []
  for (name, n), m in evaluation['methods'].items():
    if name == 'two_stage':
      gflops, compiled = flop_report['two_stage'][n], flop_report['two_stage_compiled'][n]
    else:
      gflops = compiled = flop_report[name]
    latency = latencies.get((name, n))
    rows.append({
        'method': name, 'num_patches': n, **{k: m[k] for k in METRICS},
        'refined_fraction': m['refined_fraction'], 'gflops': gflops / 1e9,
        'gflops_compiled': compiled / 1e9,
        'latency_ms': None if latency is None else latency * 1e3,
        'num_images': evaluation['num_images']})
  return rows


def format_table(rows: list[dict]) -> str:
  """The printed summary: method, Np, soft / hard Dice, IoU, % refined, GFLOPs and ms per image."""
  head = (f'{"method":<11}{"Np":>4}{"soft Dice":>11}{"hard Dice":>11}{"IoU":>8}{"refined":>9}'
          f'{"GFLOPs":>10}{"ms/image":>10}')
  lines = [head, '-' * len(head)]
  for r in rows:
    refined = '' if r['refined_fraction'] is None else f'{100 * r["refined_fraction"]:.1f}%'
    latency = '' if r['latency_ms'] is None else f'{r["latency_ms"]:.1f}'
    lines.append(f'{r["method"]:<11}{"" if r["num_patches"] is None else r["num_patches"]:>4}'
                 f'{r["soft_dice"]:>11.4f}{r["hard_dice"]:>11.4f}{r["iou"]:>8.4f}{refined:>9}'
                 f'{r["gflops"]:>10.4g}{latency:>10}')
  return '\n'.join(lines)


def _write_atomic(path: str, write: Callable[[Any], None], mode: str = 'w'):
  tmp = f'{path}.tmp'
  with open(tmp, mode, newline='' if 'b' not in mode else None) as f:
    write(f)
  os.replace(tmp, path)


def write_results(results: dict, workdir: str) -> list[str]:
  """results.json (everything), results.csv (the rows) and the plots; returns the paths written."""
  os.makedirs(workdir, exist_ok=True)
  json_path, csv_path = os.path.join(workdir, 'results.json'), os.path.join(workdir, 'results.csv')
  _write_atomic(json_path, lambda f: json.dump(results, f, indent=1))

  def write_csv(f):
    writer = csv.DictWriter(f, fieldnames=list(results['rows'][0]))
    writer.writeheader()
    writer.writerows(results['rows'])
  _write_atomic(csv_path, write_csv)
  from iterseg import plots  # Imported here: matplotlib is slow to import.
  return [json_path, csv_path] + plots.plot_all(results['rows'], workdir)


def run(config, workdir: str) -> dict:
  """--mode=evaluate: every trained method on the test split; writes results.{json,csv} and plots.

  Returns {'rows': [...], 'latency_source', 'num_images', 'dataset', 'per_image', 'flops', 'files'}.
  """
  from iterseg import data  # pylint: disable=g-import-not-at-top
  from iterseg.data import pipeline  # pylint: disable=g-import-not-at-top
  params = load_trained(workdir, config)
  source = data.load_split(config, 'test')
  batch_size = int(config.eval.batch_size)
  main = jax.process_index() == 0
  evaluation = evaluate_params(params, pipeline.eval_batches(source, batch_size), config,
                               total=math.ceil(len(source) / batch_size), progress=main)
  nps = sorted(params['stage2']) if 'stage1' in params else []
  flop_report = flops.report(config, None,  # Random weights: FLOPs do not depend on the values.
                             nps or [int(config.num_patches)])
  latencies = benchmark_latencies(workdir, config)
  if latencies is None:
    source_note = (f'timed during evaluation: median blocked call per image at batch '
                   f'{batch_size} on {jax.default_backend()}')
    latencies = {m: v['latency_s'] for m, v in evaluation['methods'].items()}
  else:
    source_note = 'benchmark.json (batch 1)'
  rows = make_rows(evaluation, flop_report, latencies)
  results = {
      'rows': rows, 'latency_source': source_note, 'num_images': evaluation['num_images'],
      'dataset': str(config.data.name), 'names': evaluation['names'],
      'per_image': {f'{n}' if k is None else f'{n}_np{k}': v['per_image']
                    for (n, k), v in evaluation['methods'].items()},
      'flops': {'baseline': flop_report['baseline'], 'stage1': flop_report['stage1'],
                **{key: {str(n): f for n, f in flop_report[key].items()}
                   for key in ('stage2', 'two_stage', 'two_stage_compiled')}},
  }
  if main:
    results['files'] = write_results(results, workdir)
    print(f'Test split of {config.data.name}: {evaluation["num_images"]} images. '
          f'Latency: {source_note}.')
    print(format_table(rows))
    print('Wrote ' + ', '.join(results['files']))
  return results
