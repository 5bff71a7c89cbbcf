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
import collections.abc
import functools
import os
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, files, methods, metrics, native, report
from iterseg.errors import DataError, InputError
from iterseg.models import Networks
from iterseg.settings import Settings

SEAM = ('seam_soft_dice', 'seam_hard_dice')
FOV = tuple(f'fov_{m}' for m in metrics.METRICS)
PER_IMAGE = metrics.METRICS + FOV + SEAM + ('refined_fraction', 'gflops', 'seconds')


class Readable(collections.abc.Sequence):
  """`examples` whose reads may fail: an example that cannot be read (a DataError: a damaged
  record) is None, and `skipped` ({name: reason}) says why; iterating yields the others."""

  def __init__(self, examples: Sequence[dict], skipped: dict):
    self.examples, self.skipped = examples, skipped

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> Optional[dict]:
    try:
      return self.examples[i]
    except DataError as e:
      self.skipped[f'example {getattr(self.examples, "indices", range(i + 1))[i]}'] = _line(e)
      return None

  def __iter__(self):
    return (e for e in map(self.__getitem__, range(len(self))) if e is not None)


def evaluate(segmenter, examples: Sequence[dict], *, total=None, progress: bool = True,
             allow_empty: bool = False, fov: bool = False, errors: Optional[str] = None) -> dict:
  """Every method of `segmenter` (native.Square or native.Native) on every example ({'image',
  'mask', 'name'}), each batch compiled before it is timed; with `fov`, the metrics inside each
  image's field of view too; with `errors` (a folder), each image's errors drawn there
  (`report.write_error_image`: <name>_<method>.png, '/' in a name as '__'). An example that cannot
  be read (DataError) or segmented (InputError: e.g. too large at native size) is skipped.

  Returns {'num_images', 'names', 'methods': {key: {name: mean (None for a value no image has),
  'per_image': {name: [values]}}}, 'skipped': {name: reason}}, name over `PER_IMAGE`.
  """
  per_image = {key: collections.defaultdict(list) for key in segmenter.keys}
  names, skipped = [], {}
  for batch in tqdm(segmenter.batches(Readable(examples, skipped)), total=total, desc='evaluate',
                    unit='batch', disable=not progress):
    keep = functools.partial(_write_errors, errors, batch) if errors else None
    try:
      segmenter.warm(batch)
      measured = segmenter.measure(batch, fov=fov, keep=keep)
    except InputError as e:  # The image is refused before any work (native.check_fits).
      skipped.update((str(n), _line(e)) for n in batch['name'])
      continue
    names += [str(n) for n in batch['name']]
    for key, values in measured.items():
      for name, v in values.items():
        per_image[key][name] += v
  if not names and skipped and not allow_empty:
    raise _none_left(skipped, len(examples))
  return dict(_summarized(per_image, names, allow_empty), skipped=skipped)


def validation_score(s: Settings, network: str, params, examples: Sequence[dict], *,
                     num_patches: Optional[int] = None, stage1=None) -> float:
  """The mean hard Dice on `examples` (the validation images) of what `network`'s parameters make
  at inference, measured as `evaluate` measures it: the baseline (native: its sliding window),
  stage 1 alone, or stage 2 at `num_patches` within two-stage after `stage1`. What
  train.select_checkpoint='best' keeps the best step by."""
  nets, key = Networks(**{network: params}), network
  if network == 'stage2':
    nets, key = Networks(stage1=stage1, stage2={num_patches: params}), methods.method_key(
        'two_stage', num_patches)
  measured = evaluate(native.segmenter(nets, s).only(key), examples, progress=False)
  return measured['methods'][key]['hard_dice']


def _line(error: Exception) -> str:
  return ' '.join(str(error).split())


def _none_left(skipped: dict, total: int) -> DataError:
  name, reason = next(iter(skipped.items()))
  return DataError(f'none of the {total} images could be read or segmented, e.g. {name}: {reason}')


def refuse_skipped(skipped: dict, total: int, path: str) -> None:
  """Once the results are written: each image skipped named with its reason, then a DataError
  (the exit status says some failed) naming how many, and the first."""
  if skipped:
    for name, reason in skipped.items() if jax.process_index() == 0 else ():
      print(f'  skipped {name}: {reason}')
    name, reason = next(iter(skipped.items()))
    raise DataError(f'{len(skipped)} of {total} images could not be read or segmented and were '
                    f'skipped (listed above and in {path}), e.g. {name}: {reason}')


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
    every = _gathered_text(gather, evaluation['names'], rows)
    merged_names = [every[p][r] for p, r in order if every[p][r]]  # '': skipped there.
    more = int(gather(np.int32(len(evaluation['skipped']))).max())
    skipped = {}
    if more:  # The same gathers on every process: `more` is the largest count of any.
      names, reasons = (_gathered_text(gather, list(part), more, width) for part, width in (
          (evaluation['skipped'], 256), (evaluation['skipped'].values(), 1024)))
      skipped = {n: r for p in range(processes) for n, r in zip(names[p], reasons[p]) if n}
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
    evaluation = dict(_summarized(per_image, merged_names, allow_empty=True), skipped=skipped)
  if not evaluation['num_images']:
    if evaluation['skipped']:
      raise _none_left(evaluation['skipped'], total)
    raise DataError('no images to evaluate: the test split is empty; check config.data.')
  return evaluation


def _gathered_text(gather, texts, rows: int, width: int = 256) -> list:
  """Every process's `texts` (at most `rows` each): [P][rows] str, '' where a process had fewer."""
  codes = np.zeros((rows, width), np.uint8)
  for i, text in enumerate(texts):
    encoded = text.encode()[:width]
    codes[i, :len(encoded)] = np.frombuffer(encoded, np.uint8)
  return [[row.tobytes().rstrip(b'\0').decode(errors='replace') for row in part]
          for part in gather(codes)]


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

  Returns {'rows', 'num_images', 'dataset', 'names', 'skipped', 'per_image', 'geometry',
  'resolution', 'files'}. An image that cannot be read or segmented is skipped, named with its
  reason in results.json ('skipped': {name: reason}), and the others are evaluated; then a
  DataError says so (the exit status says some failed).
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
      'names': evaluation['names'], 'skipped': evaluation['skipped'],
      'per_image': {k: v['per_image'] for k, v in evaluation['methods'].items()},
  }
  if main:
    results['files'] = report.write_results(results, workdir)
    print(f'Test split of {s.data.name}: {results["num_images"]} images at '
          f'{s.spec.resolution} resolution (speed: --mode=benchmark).')
    print(report.format_table(results['rows'], report.EVALUATION_COLUMNS))
    print('Wrote ' + ', '.join(results['files']))
  refuse_skipped(results['skipped'], len(source), os.path.join(workdir, 'results.json'))
  return results
