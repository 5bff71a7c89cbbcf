"""Test-split evaluation (paper Figures 3 and 4): Dice and IoU of every method beside its FLOPs.

One skeleton whatever the protocol: `native.segmenter` says what runs (the square protocol's
batches at hi_size, or each image at its own size) and measures each method on a batch; `evaluate`
walks the images and collects the per-image values, `merge_processes` gathers each process's share,
and `run` writes results.json / results.csv and the plots. Each method is a row, with the metrics of
`metrics.image_metrics` averaged over the test images (as the authors), `refined_fraction` (the share
of each image's pixels that stage 2 recomputed) and GFLOPs per image: `gflops`, the authors'
accounting stage1(hi/8) + k * stage2(hi/Np) at the square protocol and what ran at native size;
`gflops_compiled`, XLA's count of the whole compiled function. Speed is the benchmark's.
"""

import collections
import functools
import os
from typing import Iterable, Optional

import jax
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, files, metrics, native, report
from iterseg.errors import DataError
from iterseg.settings import Settings

SEAM = ('seam_soft_dice', 'seam_hard_dice')
FOV = tuple(f'fov_{m}' for m in metrics.METRICS)
PER_IMAGE = metrics.METRICS + FOV + SEAM + ('refined_fraction', 'gflops', 'seconds')


def evaluate(segmenter, examples: Iterable[dict], *, total=None, progress: bool = True,
             allow_empty: bool = False, fov: bool = False, errors: Optional[str] = None) -> dict:
  """Every method of `segmenter` (native.Square or native.Native) on every example ({'image',
  'mask', 'name'}), each batch compiled before it is timed; with `fov`, the metrics inside each
  image's field of view too; with `errors` (a folder), each image's errors drawn there
  (`report.write_error_image`: <name>_<method>.png, '/' in a name as '__').

  Returns {'num_images', 'names', 'methods': {key: {name: mean (None for a value no image has),
  'per_image': {name: [values]}}}}, name over `PER_IMAGE`.
  """
  per_image = {key: collections.defaultdict(list) for key in segmenter.keys}
  names = []
  for batch in tqdm(segmenter.batches(examples), total=total, desc='evaluate', unit='batch',
                    disable=not progress):
    names += [str(n) for n in batch['name']]
    segmenter.warm(batch)
    keep = functools.partial(_write_errors, errors, batch) if errors else None
    for key, values in segmenter.measure(batch, fov=fov, keep=keep).items():
      for name, v in values.items():
        per_image[key][name] += v
  return _summarized(per_image, names, allow_empty)


def _write_errors(folder: str, batch: dict, key: str, i: int, probs) -> None:
  name = str(batch['name'][i]).replace('/', '__')  # 'DRIVE/21_training.tif': one flat folder.
  report.write_error_image(os.path.join(folder, f'{name}_{key}.png'), batch['image'][i],
                           batch['mask'][i], probs)


def _summarized(per_image: dict, names: list, allow_empty: bool) -> dict:
  """`evaluate`'s result from the per-image lists {key: {name: [values]}}."""
  if not names and not allow_empty:
    raise DataError('no images to evaluate: the test split is empty; check config.data.')
  out = {}
  for key, lists in per_image.items():
    values = {k: list(v) for k, v in lists.items() if len(v)}
    out[key] = {**{k: float(np.mean(values[k])) if k in values else None for k in PER_IMAGE},
                'per_image': values}
  return {'num_images': len(names), 'names': names, 'methods': out}


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


def make_rows(segmenter, evaluation: dict) -> list:
  """One flat row per method: the averaged metrics, the refined share and GFLOPs per image."""
  rows = []
  for key in segmenter.keys:
    e = evaluation['methods'][key]
    name, _, n = key.partition('_np')
    rows.append({'method': name, 'num_patches': int(n) if n else None,
                 **{k: e[k] for k in metrics.METRICS + FOV + SEAM + ('refined_fraction', 'gflops')},
                 'gflops_compiled': segmenter.compiled_gflops.get(key, e['gflops']),
                 'num_images': evaluation['num_images']})
  return rows


def run(s: Settings, workdir: str) -> dict:
  """--mode=evaluate: every trained method on the test split; writes results.{json,csv} and plots.

  Returns {'rows', 'num_images', 'dataset', 'names', 'per_image', 'geometry', 'resolution',
  'files'}.
  """
  from iterseg import data  # pylint: disable=g-import-not-at-top  # (TFDS is slow to import)
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir)
  nets = checkpoints.load_networks(workdir, s)
  source = data.load_split(s.data, 'test')
  mine = data.Subset(source, range(jax.process_index(), len(source), jax.process_count()))
  segmenter = native.segmenter(nets, s)
  errors = os.path.join(workdir, 'errors') if s.eval.errors else None
  if errors:
    os.makedirs(errors, exist_ok=True)
  evaluation = merge_processes(evaluate(
      segmenter, mine, total=-(-len(mine) // segmenter.batch_size), progress=main,
      allow_empty=True, fov=s.eval.fov != 'none', errors=errors), len(source))
  results = {
      'rows': make_rows(segmenter, evaluation), 'num_images': evaluation['num_images'],
      'geometry': s.spec.geometry(), 'resolution': s.spec.resolution, 'dataset': s.data.name,
      'names': evaluation['names'],
      'per_image': {k: v['per_image'] for k, v in evaluation['methods'].items()},
  }
  if main:
    results['files'] = report.write_results(results, workdir)
    print(f'Test split of {s.data.name}: {results["num_images"]} images at '
          f'{s.spec.resolution} resolution (speed: --mode=benchmark).')
    print(report.format_table(results['rows'], report.EVALUATION_COLUMNS))
    print('Wrote ' + ', '.join(results['files']))
  return results
