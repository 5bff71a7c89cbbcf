"""--mode=calibrate: sweep the refinement budget and threshold, and pick the operating point.

`native.segmenter(...).sweep` gives the points: at the square protocol every k of
`calibrate.refine_counts` (default 1, 2, 4, ... up to Np * Np, and Np) at each trained Np; at native
size every `calibrate.refine_fractions`; each with every threshold of `calibrate.thresholds`. Each is
measured as evaluate measures (`measure`): soft and hard Dice, the refined fraction, GFLOPs per image
(the paper's stage1 + k * stage2 at the square protocol, what ran at native size) and the latency,
the median seconds per image after compiling. (At the square protocol a threshold changes which of
the k patches keep stage 2's result, not the compute.) The Pareto front over (soft Dice higher,
GFLOPs lower, latency lower) and the operating point of `calibrate.target` are written to
<workdir>/calibration.{json,csv,png}:
  'dice_drop': the fewest GFLOPs with soft Dice >= baseline soft Dice - calibrate.max_dice_drop;
  'latency':   the best soft Dice with latency_ms <= calibrate.latency_budget_ms.

Data: never the test split. The sweep runs on a seeded (config.seed) random share
`calibrate.holdout` of the TRAIN split. Training uses ALL training examples by default (as the
paper), so these images were seen in training: the sweep then ranks operating points but its Dice
is optimistic. With train.exclude_holdout=True the networks train without them, and the operating
point's Dice is an estimate on unseen images (calibration.json says which: 'seen_in_training').
The test split stays untouched for --mode=evaluate.
"""

import os
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from iterseg import checkpoints, evaluate, files, native, report
from iterseg.errors import CheckpointError, DataError
from iterseg.plans import CalibratePlan
from iterseg.run import POINT_FIELDS, Run
from iterseg.settings import Settings

DICE_EPS = 1e-9  # Float slack of the 'dice_drop' rule (0.8 - 0.01 > 0.79 in binary floats).
COLUMNS = (
    ('Np', 'num_patches', 'd'), ('k', 'refine_count', 'd'),
    ('tiles', 'refine_fraction', lambda v: f'{100 * v:g}%'), ('threshold', 'threshold', 's'),
    ('soft Dice', 'soft_dice', '.4f'), ('hard Dice', 'hard_dice', '.4f'),
    ('refined', 'refined_fraction', lambda v: f'{100 * v:.1f}%'), ('GFLOPs', 'gflops', '.4g'),
    ('ms/image', 'latency_ms', '.2f'), ('front', 'front', 's'))


def seen_in_training(s: Settings, workdir: str) -> bool:
  """Whether the workdir's networks trained on the images calibrate measures on: unless its
  config.json excluded the same holdout (train.exclude_holdout, the same share and seed)."""
  try:
    trained = Run(workdir).settings()
  except CheckpointError:
    return True
  return not (trained.train.exclude_holdout and trained.calibrate.holdout == s.calibrate.holdout
              and trained.seed == s.seed and trained.data == s.data)


refine_counts = native.refine_counts


def measure(segmenter, examples: Sequence[dict], skipped: Optional[dict] = None) -> dict:
  """{'soft_dice', 'hard_dice', 'refined_fraction', 'gflops'} of the one method of `segmenter`,
  means over the images as evaluate measures them, and 'latency_ms': the median over the images
  of the seconds per image, every call compiled before it is timed. The images it cannot segment
  are added to `skipped` ({name: reason})."""
  evaluation = evaluate.evaluate(segmenter, examples, progress=False)
  if skipped is not None:
    skipped.update(evaluation['skipped'])
  e = evaluation['methods'][segmenter.keys[0]]
  return {**{k: e[k] for k in ('soft_dice', 'hard_dice', 'refined_fraction', 'gflops')},
          'latency_ms': float(np.median(e['per_image']['seconds'])) * 1e3}


def dominates(a: dict, b: dict) -> bool:
  """Whether `a` is at least as good as `b` in soft Dice, GFLOPs and latency, and better in one."""
  at_least = (a['soft_dice'] >= b['soft_dice'] and a['gflops'] <= b['gflops'] and
              a['latency_ms'] <= b['latency_ms'])
  better = (a['soft_dice'] > b['soft_dice'] or a['gflops'] < b['gflops'] or
            a['latency_ms'] < b['latency_ms'])
  return at_least and better


def pareto_front(points: Sequence[dict]) -> list:
  """The points no other point dominates (soft Dice higher, GFLOPs and latency lower), in order."""
  return [p for p in points if not any(dominates(q, p) for q in points)]


def choose(points: Sequence[dict], baseline_dice: Optional[float],
           plan: CalibratePlan) -> Optional[dict]:
  """The operating point of `plan.target` among `points`, or None if no point meets it.

  'dice_drop': fewest GFLOPs with soft_dice >= baseline_dice - max_dice_drop (ties: better Dice,
  then lower latency); 'latency': best soft Dice with latency_ms <= latency_budget_ms (ties: fewer
  GFLOPs, then lower latency). Either way the point chosen is on the Pareto front.
  """
  if plan.target == 'dice_drop':
    if baseline_dice is None:
      return None
    floor = baseline_dice - plan.max_dice_drop - DICE_EPS
    ok = [p for p in points if p['soft_dice'] >= floor]
    return min(ok, key=lambda p: (p['gflops'], -p['soft_dice'], p['latency_ms']), default=None)
  ok = [p for p in points if p['latency_ms'] <= plan.latency_budget_ms]
  return max(ok, key=lambda p: (p['soft_dice'], -p['gflops'], -p['latency_ms']), default=None)


def plot(points: Sequence[dict], front: Sequence[dict], chosen: Optional[dict],
         baseline: Optional[dict], path: str) -> str:
  """calibration.png: soft Dice against GFLOPs per image (log x); returns `path`."""
  # pylint: disable=g-import-not-at-top  # (matplotlib is slow to import)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib import ticker
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5, 4), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.scatter([p['gflops'] for p in points], [p['soft_dice'] for p in points], s=14,
             color='tab:gray', alpha=0.6, label='sweep (Np, k, threshold)')
  line = sorted(front, key=lambda p: (p['gflops'], p['soft_dice']))
  ax.plot([p['gflops'] for p in line], [p['soft_dice'] for p in line], 'o-', color='tab:blue',
          markersize=4, label='Pareto front (Dice, GFLOPs, latency)')
  for p in line:
    ax.annotate(f'{100 * p["refined_fraction"]:.3g}%', (p['gflops'], p['soft_dice']),
                textcoords='offset points', xytext=(3, 3), fontsize=6)
  if baseline is not None:
    ax.axhline(baseline['soft_dice'], color='tab:red', label='baseline (BL)')
  if chosen is not None:
    ax.scatter([chosen['gflops']], [chosen['soft_dice']], marker='*', s=180, color='tab:orange',
               edgecolor='black', zorder=5, label='operating point')
  ax.set_xscale('log')
  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel('GFLOPs per image (log scale)')
  ax.set_ylabel('mean soft Dice per image (held-out train)')
  ax.set_title('Calibration: labels are the share of the pixels refined', fontsize=9)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format='png'), 'wb')
  return path


def _describe(chosen: Optional[dict], baseline: Optional[dict], plan: CalibratePlan) -> str:
  """One line: the operating point, or why there is none."""
  base = '' if baseline is None else f' (baseline {baseline["soft_dice"]:.4f})'
  if chosen is not None:
    return (f'Operating point ({plan.target}): ' + ', '.join(
        f'{k}={chosen[k]}' for k in POINT_FIELDS if k == 'threshold' or chosen[k]) +
            f': soft Dice {chosen["soft_dice"]:.4f}{base}, {chosen["gflops"]:.4g} GFLOPs, '
            f'{chosen["latency_ms"]:.2f} ms/image.')
  if plan.target == 'dice_drop':
    return (f'No operating point: no point reaches soft Dice >= baseline - '
            f'{plan.max_dice_drop:g}{base}; raise config.calibrate.max_dice_drop or sweep larger '
            f'budgets (config.calibrate.refine_counts, or refine_fractions at native size).')
  return (f'No operating point: no point runs within {plan.latency_budget_ms:g} ms/image; raise '
          f'config.calibrate.latency_budget_ms.')


def run(s: Settings, workdir: str) -> dict:
  """--mode=calibrate: sweeps (Np, k, threshold) on held-out train images; writes calibration.*.

  Returns calibration.json's content ({'target', 'baseline', 'points', 'front', 'operating_point',
  'num_images', ...}) and 'files', the paths written (process 0).
  """
  from iterseg import data  # pylint: disable=g-import-not-at-top  # (TFDS is slow to import)
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir)
  plan = s.calibrate
  nets = checkpoints.load_networks(workdir, s)
  nps = sorted(nets.stage2) if nets.stage1 is not None else []
  if not nps:
    raise CheckpointError(
        f'{workdir} has no trained stage 1 with a stage 2 (networks: {nets.names()}): nothing to '
        f'calibrate; train them with --mode=train.')
  if plan.target == 'dice_drop' and nets.baseline is None:
    raise CheckpointError(
        f"config.calibrate.target='dice_drop' compares with the baseline, which {workdir} lacks: "
        f"train it, or use calibrate.target='latency'.")
  source = data.load_split(s.data, 'train')
  indices = data.holdout_indices(len(source), plan.holdout, s.seed)
  if not len(indices):
    raise DataError(f'no training images to calibrate on: the train split of {s.data.name} is '
                    f'empty; check config.data.')
  skipped = {}  # {name: reason}: the images that cannot be read or segmented, left out of all.
  held = list(evaluate.Readable(data.Subset(source, indices), skipped))
  segmenter = native.segmenter(nets, s, batch_size=min(s.eval.batch_size, len(indices)))
  sweep = segmenter.sweep(plan)
  if not sweep:
    raise CheckpointError(f'nothing to sweep: config.calibrate.refine_counts={plan.refine_counts} '
                          f'has no count <= Np*Np for the trained Np {nps}, or '
                          f'calibrate.refine_fractions or calibrate.thresholds is empty.')

  def measured(one) -> dict:
    nonlocal held
    result = measure(one, held, skipped)
    held = [e for e in held if e['name'] not in skipped]  # The next measures go without them.
    return result

  baseline = None
  if nets.baseline is not None:
    e = measured(segmenter.only('baseline'))
    baseline = {k: e[k] for k in ('soft_dice', 'gflops', 'latency_ms')}
  points = [{**point, **measured(segmenter.at(point))}
            for point in tqdm(sweep, desc='calibrate', unit='point', disable=not main)]
  return _finish(s, workdir, plan, baseline, points, len(held), main, skipped)


def _finish(s: Settings, workdir: str, plan: CalibratePlan, baseline, points, num_images: int,
            main: bool, skipped: Optional[dict] = None) -> dict:
  """The front, the operating point, calibration.{json,csv,png} and the printout; then a DataError
  if images were `skipped` ({name: reason}: they are named in calibration.json)."""
  front = pareto_front(points)
  chosen = choose(points, None if baseline is None else baseline['soft_dice'], plan)
  result = {
      'target': plan.target, 'baseline': baseline, 'points': points, 'front': front,
      'operating_point': None if chosen is None else {k: chosen[k] for k in POINT_FIELDS},
      'resolution': s.spec.resolution, 'num_images': num_images,
      'holdout': {'fraction': plan.holdout, 'seed': s.seed, 'split': 'train',
                  'seen_in_training': seen_in_training(s, workdir)},
      'geometry': s.spec.geometry(), 'skipped': skipped or {},
  }
  if main:
    paths = [os.path.join(workdir, f'calibration.{ext}') for ext in ('json', 'csv', 'png')]
    files.atomic_write_json(paths[0], result)
    report.write_csv(paths[1], points)
    plot(points, front, chosen, baseline, paths[2])
    result['files'] = paths
    on_front = {id(p) for p in front}
    rows = [dict(p, front='*' if id(p) in on_front else '',
                 threshold='none' if p['threshold'] is None else f'{p["threshold"]:.3g}')
            for p in points]
    seen = ('seen in training: the Dice ranks the points' if result['holdout']['seen_in_training']
            else 'not seen in training')
    print(f'Calibration on {num_images} held-out images of the train split of {s.data.name} '
          f'({seen}; latency: the median seconds per image on {jax.default_backend()}). *: on the '
          f'Pareto front.')
    if baseline is not None:
      print(f'Baseline: soft Dice {baseline["soft_dice"]:.4f}, {baseline["gflops"]:.4g} GFLOPs, '
            f'{baseline["latency_ms"]:.2f} ms/image.')
    print(report.format_table(rows, COLUMNS))
    print(_describe(chosen, baseline, plan))
    print('Wrote ' + ', '.join(paths))
  evaluate.refuse_skipped(result['skipped'], num_images + len(result['skipped']),
                          os.path.join(workdir, 'calibration.json'))
  return result
