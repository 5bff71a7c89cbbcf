"""Integration: the vessel recipe (configs/retina_vessels.py) learns on the real DRIVE and STARE
samples in ../shared/data/samples (skipped when absent), where the paper's recipe predicts all
background (hard Dice 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT.parent / 'shared' / 'data' / 'samples'

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SAMPLES / 'DRIVE').is_dir(),
                                 reason=f'no real data samples at {SAMPLES}')]


def test_the_vessel_recipe_learns_vessels_on_the_samples(tmp_path):
  """The baseline U-Net at hi 256, width 8, 300 steps on the 3 training samples; hard Dice on the
  held-out image (DRIVE 22). All-background scores 0."""
  flags = [f'--workdir={tmp_path}/run', f'--config.data.manual_dir={SAMPLES}',
           f'--config.data.data_dir={tmp_path}/tfds', '--config.hi_size=256',
           '--config.model.width=8', "--config.train.networks=('baseline',)",
           '--config.train.batch_size=3', '--config.train.baseline_epochs=300',
           '--config.train.log_every=50', '--config.train.checkpoint_every=1000']
  result = subprocess.run([sys.executable, 'launch.py', '--config=configs/retina_vessels.py',
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))  # 1 device.
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / 'run' / 'results.json').read_text())['rows']
  baseline = next(r for r in rows if r['method'] == 'baseline')
  print(f'vessel recipe, held-out hard Dice {baseline["hard_dice"]:.3f}, '
        f'soft {baseline["soft_dice"]:.3f}')
  assert baseline['hard_dice'] > 0.2
