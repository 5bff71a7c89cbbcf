"""--mode=ablate: each feature beyond the paper switched off and on, the rest as configured.

  feature        config field          paper (off)   on                  retrains
  stage2_init    train.stage2_init     'random'      'stage1'            stage 2
  halo           halo                  0             the config's, or 4  stage 2
  refine_budget  refine_budget         'image'       'batch'             nothing (inference only)
  input_norm     model.input_norm      'none'        'standardize'       every network

For each feature in `ablation.features`, the variant that matches the config is the workdir itself
(trained and evaluated by --mode=train); the other is trained in <workdir>/ablation/<feature>-<on|off>,
starting from copies of the workdir's checkpoints of the networks the feature does not touch, and
evaluated on the test split there. The two-stage rows at config.num_patches go into
<workdir>/ablation.json, ablation.png and the 'ablation' entry of results.json.
"""

import dataclasses
import json
import os
import shutil
from typing import Optional

import jax

from iterseg import evaluate, files, models, report, train
from iterseg.errors import CheckpointError
from iterseg.run import Run
from iterseg.settings import Settings


@dataclasses.dataclass(frozen=True)
class Feature:
  section: str  # The Settings part that holds the field: 'spec' or 'train'.
  field: str
  off: object
  on: object
  retrains: tuple  # The networks whose weights depend on the feature.

  def value(self, s: Settings):
    return getattr(getattr(s, self.section), self.field)

  def set(self, s: Settings, value) -> Settings:
    return s.vary(self.section, **{self.field: value})


FEATURES = {
    'stage2_init': Feature('train', 'stage2_init', 'random', 'stage1', ('stage2',)),
    'halo': Feature('spec', 'halo', 0, 4, ('stage2',)),
    'refine_budget': Feature('spec', 'refine_budget', 'image', 'batch', ()),
    'input_norm': Feature('spec', 'input_norm', 'none', 'standardize',
                          ('stage1', 'stage2', 'baseline')),
}
COLUMNS = (('feature', 'feature', 's'), ('state', 'state', 's'), ('value', 'value', 's'),
           ('soft Dice', 'soft_dice', '.4f'), ('hard Dice', 'hard_dice', '.4f'),
           ('seam Dice', 'seam_soft_dice', '.4f'), ('GFLOPs', 'gflops', '.4g'))


def variants(s: Settings, names) -> list:
  """[(feature, state, value, is the workdir's own)] for each feature: its off and on values."""
  out = []
  for name in names:
    f = FEATURES[name]
    current = f.value(s)
    on = current if current != f.off else f.on
    for state, value in (('off', f.off), ('on', on)):
      out.append((name, state, value, value == current))
  return out


def _two_stage_row(results: dict, num_patches: int) -> Optional[dict]:
  return report.find(results['rows'], 'two_stage', num_patches)


def run(s: Settings, workdir: str) -> dict:
  """Trains and evaluates the other state of each feature; returns {'rows', 'files'}."""
  names = s.ablation_features
  trained = Run(workdir).trained_networks()
  if 'stage1' not in trained:
    raise CheckpointError(f'{workdir} has no trained stage 1: run --mode=train first.')
  main = jax.process_index() == 0
  plans = {}  # Every variant checked before anything is written (train.preflight).
  for name, state, value, own in variants(s, names):
    if not own:
      feature = FEATURES[name]
      where = os.path.join(workdir, 'ablation', f'{name}-{state}')
      vs = feature.set(s, value)
      networks = tuple(n for n in vs.train.networks if n in feature.retrains)
      if networks:  # (The networks it keeps are copied from the workdir: not checked here.)
        vs = vs.vary('train', networks=networks)
        train.training_data(vs)
      plans[name, state] = where, vs
  own_results = evaluate.run(s, workdir)
  rows = []
  for name, state, value, own in variants(s, names):
    feature = FEATURES[name]
    if own:
      results, where = own_results, workdir
    else:
      where, vs = plans[name, state]
      for network in trained:  # What the feature does not change is copied, not retrained.
        kind, _ = models.parse(network)
        target = Run(where).network_dir(network)
        if kind not in feature.retrains and not os.path.exists(target) and main:
          shutil.copytree(Run(workdir).network_dir(network), target)
      if feature.retrains:
        vs = train.train(vs, where)
      else:
        Run(where).save_settings(vs)
      results = evaluate.run(vs, where)
    row = _two_stage_row(results, s.spec.num_patches)
    if row is None:
      continue
    rows.append({'feature': name, 'state': state, 'value': str(value), 'workdir': where,
                 **{k: row.get(k) for k in ('soft_dice', 'hard_dice', 'iou', 'seam_soft_dice',
                                            'gflops')}})
  out = {'num_patches': s.spec.num_patches, 'rows': rows, 'files': []}
  if main:
    from iterseg import plots  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, 'ablation.json')
    files.atomic_write_json(path, rows)
    results_path = os.path.join(workdir, 'results.json')
    with open(results_path) as f:
      merged = json.load(f)
    merged['ablation'] = rows
    files.atomic_write_json(results_path, merged)
    out['files'] = [path, results_path, plots.plot_ablation(rows, os.path.join(workdir,
                                                                                'ablation.png'))]
    print(f'Ablation at Np={s.spec.num_patches} (two-stage, test split):')
    print(report.format_table(rows, COLUMNS))
    print('Wrote ' + ', '.join(out['files']))
  return out
