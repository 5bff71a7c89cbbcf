"""Tables and result files: one table printer, and the evaluation's rows, CSV, JSON and plots."""

import csv
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from iterseg import files
from iterseg.errors import CheckpointError


def format_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
  """A text table: a line per row, columns (header, key, format spec or callable(value) -> str)
  right-aligned (the first left-aligned); None is blank."""
  cells = [['' if r.get(key) is None else fmt(r[key]) if callable(fmt) else format(r[key], fmt)
            for _, key, fmt in columns] for r in rows]
  widths = [max([len(h)] + [len(c[i]) for c in cells]) + 2 for i, (h, _, _) in enumerate(columns)]

  def join(values):
    return values[0].ljust(widths[0]) + ''.join(map(str.rjust, values[1:], widths[1:]))

  head = join([h for h, _, _ in columns])
  return '\n'.join([head, '-' * len(head)] + [join(c) for c in cells])


EVALUATION_COLUMNS = (
    ('method', 'method', 's'), ('Np', 'num_patches', 'd'), ('soft Dice', 'soft_dice', '.4f'),
    ('hard Dice', 'hard_dice', '.4f'), ('IoU', 'iou', '.4f'), ('sens', 'sensitivity', '.4f'),
    ('spec', 'specificity', '.4f'), ('FOV hard Dice', 'fov_hard_dice', '.4f'),
    ('seam Dice', 'seam_soft_dice', '.4f'),
    ('refined', 'refined_fraction', lambda v: f'{100 * v:.1f}%'), ('GFLOPs', 'gflops', '.4g'))


def write_csv(path: str, rows: Sequence[dict]):
  def write(f):
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  files.atomic_write(path, write)


def write_results(results: dict, workdir: str, name: str = 'results') -> list:
  """<name>.json (everything), <name>.csv (the rows) and the plots; returns the paths written."""
  from iterseg import plots  # pylint: disable=g-import-not-at-top  # (matplotlib is slow to import)
  json_path, csv_path = (os.path.join(workdir, f'{name}.{ext}') for ext in ('json', 'csv'))
  files.atomic_write_json(json_path, results)
  write_csv(csv_path, results['rows'])
  return [json_path, csv_path] + plots.plot_all(results['rows'], workdir)


ROW_SCHEMA = {'method': str, 'num_patches': (files.number(1, whole=True), None),
              'soft_dice': files.number(0, 1)}
RESULTS_SCHEMA = {'geometry': dict, 'rows': [ROW_SCHEMA]}


def read_results(workdir: str) -> Optional[dict]:
  """<workdir>/results.json as --mode=evaluate wrote it, checked (`RESULTS_SCHEMA`); None if there
  is none; CheckpointError naming the file, the field and how to mend it if it is damaged."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  return files.read_json(path, 'run --mode=evaluate again to write it anew, or delete it',
                         CheckpointError, RESULTS_SCHEMA)


def find(rows: Sequence[dict], method: str, num_patches: Optional[int] = None) -> Optional[dict]:
  return next((r for r in rows if r['method'] == method and r['num_patches'] == num_patches), None)


ERROR_COLOURS = {'true_positive': (255, 255, 255), 'false_positive': (255, 40, 40),
                 'false_negative': (40, 140, 255)}


def write_error_image(path: str, image: np.ndarray, mask: np.ndarray, probs: np.ndarray) -> str:
  """A PNG at `path` of the image darkened, with its predictions' true positives white, false
  positives red and false negatives blue (`ERROR_COLOURS`): image uint8 [H, W, 3], mask [H, W]
  class ids, probs [H, W, C] (binary: p > 0.5; classes: argmax, a wrong foreground class red)."""
  probs = np.asarray(probs)
  pred = probs[..., 0] > 0.5 if probs.shape[-1] == 1 else probs.argmax(-1)
  truth = (mask > 0) if probs.shape[-1] == 1 else mask
  out = np.asarray(image, np.uint8) // 3
  wrong = pred != truth
  for name, where in (('true_positive', ~wrong & (truth > 0)),
                      ('false_negative', wrong & ~(pred > 0)), ('false_positive', wrong & (pred > 0))):
    out[where] = ERROR_COLOURS[name]
  files.atomic_write(path, lambda f: Image.fromarray(out).save(f, format='PNG'), 'wb')
  return path
