"""--mode=ablate: each feature beyond the paper switched off and on, the rest as configured.

  feature             config field                paper (off)   on                    retrains
  stage2_init         train.stage2_init           'random'      'stage1'              stage 2
  halo                halo                        0             the config's, or 4    stage 2
  refine_budget       refine_budget               'image'       'batch'               nothing
  input_norm          model.input_norm            'none'        'standardize'         every network
  patch_sampling      train.patch_sampling        'random'      'entropy_weighted'    stage 2
  rotate              train.rotate                False         True                  every network
  brightness_contrast train.brightness_contrast   0.0           the config's, or 0.1  every network
  gamma               train.gamma                 0.0           the config's, or 0.2  every network
  lr_schedule         train.lr_schedule           'constant'    'cosine'              every network
  select_checkpoint   train.select_checkpoint     'last'        'best'                nothing
(select_checkpoint 'best' needs the workdir trained with it: its checkpoints hold their scores.)

For each feature in `ablation.features`, the variant that matches the config is the workdir itself
(trained and evaluated by --mode=train); the other trains in <workdir>/ablation/<feature>-<state>
from copies of the workdir's checkpoints of the networks the feature does not touch, and is
evaluated on the test split there. The two-stage rows at config.num_patches go into
<workdir>/ablation.json, ablation.png and the 'ablation' entry of results.json.
"""

import dataclasses
import os
import shutil

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


ALL = ('stage1', 'stage2', 'baseline')
FEATURES = {
    'stage2_init': Feature('train', 'stage2_init', 'random', 'stage1', ('stage2',)),
    'halo': Feature('spec', 'halo', 0, 4, ('stage2',)),
    'refine_budget': Feature('spec', 'refine_budget', 'image', 'batch', ()),
    'input_norm': Feature('spec', 'input_norm', 'none', 'standardize', ALL),
    'patch_sampling': Feature('train', 'patch_sampling', 'random', 'entropy_weighted',
                              ('stage2',)),
    'rotate': Feature('train', 'rotate', False, True, ALL),
    'brightness_contrast': Feature('train', 'brightness_contrast', 0.0, 0.1, ALL),
    'gamma': Feature('train', 'gamma', 0.0, 0.2, ALL),
    'lr_schedule': Feature('train', 'lr_schedule', 'constant', 'cosine', ALL),
    'select_checkpoint': Feature('train', 'select_checkpoint', 'last', 'best', ()),
}
COLUMNS = (('feature', 'feature', 's'), ('state', 'state', 's'), ('value', 'value', 's'),
           ('soft Dice', 'soft_dice', '.4f'), ('hard Dice', 'hard_dice', '.4f'),
           ('seam Dice', 'seam_soft_dice', '.4f'), ('GFLOPs', 'gflops', '.4g'),
           ('baseline hard Dice', 'baseline_hard_dice', '.4f'))


def variants(s: Settings, names) -> list:
  """[(feature, state, value, is the workdir's own)] for each feature: its off and on values."""
  out = []
  for name in names:
    f = FEATURES[name]
    current = getattr(getattr(s, f.section), f.field)
    on = current if current != f.off else f.on
    for state, value in (('off', f.off), ('on', on)):
      out.append((name, state, value, value == current))
  return out


def run(s: Settings, workdir: str) -> dict:
  """Trains and evaluates the other state of each feature; returns {'rows', 'files'}."""
  trained = Run(workdir).trained_networks()
  if 'stage1' not in trained:
    raise CheckpointError(f'{workdir} has no trained stage 1: run --mode=train first.')
  main = jax.process_index() == 0
  todo = []  # (feature, state, value, its folder, its settings; None: the workdir's own results).
  for name, state, value, own in variants(s, s.ablation_features):
    where, vs = workdir, None
    if not own:  # Every variant is checked before anything is written (train.preflight).
      feature = FEATURES[name]
      where = os.path.join(workdir, 'ablation', f'{name}-{state}')
      vs = s.vary(feature.section, **{feature.field: value})
      networks = tuple(n for n in vs.train.networks if n in feature.retrains)
      if networks:  # (The networks it keeps are copied from the workdir: not checked here.)
        vs = vs.vary('train', networks=networks)
        train.training_data(vs)
    todo.append((name, state, value, where, vs))
  own_results = evaluate.run(s, workdir)
  rows = []
  for name, state, value, where, vs in todo:
    results = own_results
    if vs is not None:
      retrains = FEATURES[name].retrains
      for network in trained:  # What the feature does not change is copied, not retrained.
        target = Run(where).network_dir(network)
        if models.parse(network)[0] not in retrains and not os.path.exists(target) and main:
          shutil.copytree(Run(workdir).network_dir(network), target)
      if retrains:
        vs = train.train(vs, where)
      else:
        Run(where).save_settings(vs)
      results = evaluate.run(vs, where)
    row = report.find(results['rows'], 'two_stage', s.spec.num_patches)
    dense = report.find(results['rows'], 'baseline') or {}
    if row is not None:
      rows.append({'feature': name, 'state': state, 'value': str(value), 'workdir': where,
                   **{k: row.get(k) for k in ('soft_dice', 'hard_dice', 'iou', 'seam_soft_dice',
                                              'gflops')},
                   'baseline_hard_dice': dense.get('hard_dice')})
  out = {'num_patches': s.spec.num_patches, 'rows': rows, 'files': []}
  if main:
    from iterseg import plots  # pylint: disable=g-import-not-at-top
    path, results_path = (os.path.join(workdir, f) for f in ('ablation.json', 'results.json'))
    files.atomic_write_json(path, rows)
    merged = {k: v for k, v in own_results.items() if k != 'files'}  # What results.json holds.
    files.atomic_write_json(results_path, {**merged, 'ablation': rows})
    out['files'] = [path, results_path,
                    plots.plot_ablation(rows, os.path.join(workdir, 'ablation.png'))]
    print(f'Ablation at Np={s.spec.num_patches} (two-stage, test split):')
    print(report.format_table(rows, COLUMNS))
    print('Wrote ' + ', '.join(out['files']))
  return out
