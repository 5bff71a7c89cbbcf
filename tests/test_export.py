"""Readiness for accelerators: bfloat16 compute with float32 parameters, the jax.export artifact that
serves without iterseg, and utilisation against a device's peak in the benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iterseg
from iterseg import benchmark, cli, errors, export, models, settings, state, train
from tests.helpers import save_random_networks, set_fields, tiny
from tests.launch_runs import COMPILE_FLAGS

ROOT = Path(__file__).resolve().parent.parent


def serving_example() -> str:
  """The python block under the README's 'Serving an export' heading."""
  text = (ROOT / 'README.md').read_text().split('### Serving an export', 1)[1]
  return text.split('```python\n', 1)[1].split('```', 1)[0]


# --- bfloat16 ----------------------------------------------------------------------------------------


def test_bfloat16_computes_in_bfloat16_but_keeps_float32_parameters_and_outputs():
  fp32 = settings.from_config(tiny())
  bf16 = settings.from_config(tiny(**{'model.dtype': 'bfloat16'}))
  params = models.init_unet(jax.random.key(0), fp32.spec, 'baseline')
  same = models.init_unet(jax.random.key(0), bf16.spec, 'baseline')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(same))
  jax.tree.map(np.testing.assert_array_equal, params, same)  # The same checkpoint either way.
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  low = models.unet(bf16.spec).apply({'params': params}, x)
  high = models.unet(fp32.spec).apply({'params': params}, x)
  assert low.dtype == jnp.float32  # Logits come back as float32 for the loss and sigmoid.
  assert 0 < float(jnp.abs(low - high).max()) < 0.1  # bf16 rounding, not another network.
  text = jax.jit(lambda p, x: models.unet(bf16.spec).apply({'params': p}, x)).lower(
      params, x).as_text()
  assert 'bf16' in text


def test_a_bfloat16_training_step_keeps_float32_state_and_its_checkpoint_loads_in_float32(tmp_path):
  from iterseg import checkpoints  # pylint: disable=g-import-not-at-top
  from iterseg.data import pipeline  # pylint: disable=g-import-not-at-top
  from iterseg.data.synthetic import make_synthetic_example  # pylint: disable=g-import-not-at-top
  bf16 = settings.from_config(tiny(**{'model.dtype': 'bfloat16'}))
  source = [make_synthetic_example(i, 64) for i in range(8)]
  batch = next(iter(pipeline.batches(source, batch_size=8, seed=0, epoch=0)))
  fresh = state.create_train_state(bf16.train, bf16.spec, 'baseline')
  stepped, metrics = train.make_train_step('baseline', bf16.spec, bf16.train, 1)(fresh, batch,
                                                                                  None)
  assert np.isfinite(float(metrics['loss']))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((stepped.params,
                                                              stepped.opt_state[0].mu)))
  save_random_networks(tiny(**{'model.dtype': 'bfloat16'}), tmp_path)
  nets = checkpoints.load_networks(str(tmp_path), settings.from_config(tiny()))  # float32 config.
  assert nets.baseline is not None


# --- Export ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  config = tiny(num_patches=4, refine_count=3, **{'train.num_patches_list': (4,),
                                                  'export.batch_size': 2})
  save_random_networks(config, root / 'run')
  result = cli.run('export', config, str(root / 'run'))
  return config, root, result


def test_the_export_describes_itself(exported):
  _, root, result = exported
  folder = root / 'run' / 'export'
  description = json.loads((folder / 'model.json').read_text())
  assert description['input'] == {'shape': [2, 64, 64, 3], 'dtype': 'uint8', 'range': '0..255 (RGB)'}
  assert description['outputs']['probs']['shape'] == [2, 64, 64, 1]
  assert description['outputs']['refined']['dtype'] == 'bool'
  assert description['operating_point'] == {'num_patches': 4, 'refine_count': 3, 'threshold': None}
  assert description['platforms'] == ['cpu', 'cuda']  # Lowered for a GPU on this CPU machine.
  import hashlib  # pylint: disable=g-import-not-at-top
  for name, digest in description['sha256'].items():
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
  assert result['bytes']['two_stage.jax'] > 0


def test_the_readme_serving_example_needs_only_jax_and_numpy_and_gives_infer_s_probabilities(
    exported, tmp_path):
  config, root, _ = exported
  os.symlink(root / 'run' / 'export', tmp_path / 'export')
  script = serving_example() + '\nnp.save("probs.npy", np.asarray(probs))\n'
  (tmp_path / 'serve.py').write_text(script)
  blocked = ('iterseg', 'flax', 'optax', 'orbax', 'tensorflow_datasets', 'grain', 'ml_collections')
  wrapper = (f'import sys\nfor m in {blocked!r}:\n  sys.modules[m] = None\n'
             'exec(open("serve.py").read())\n')
  result = subprocess.run([sys.executable, '-c', wrapper], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH='', JAX_PLATFORMS='cpu',
                                   XLA_FLAGS=COMPILE_FLAGS))  # One device.
  assert result.returncode == 0, result.stderr[-3000:]
  images = np.zeros((2, 64, 64, 3), np.uint8)  # What the example feeds.
  params, _ = iterseg.load(str(root / 'run'))
  expected = np.asarray(iterseg.infer(params, images, config).probs)
  np.testing.assert_allclose(np.load(tmp_path / 'probs.npy'), expected, atol=1e-6)


def test_the_round_trip_gives_infer_s_probabilities_on_real_images(exported):
  config, root, _ = exported
  folder = root / 'run' / 'export'
  loaded = jax.export.deserialize((folder / 'two_stage.jax').read_bytes())
  with np.load(folder / 'params.npz') as p:
    params = [p[f'arr_{i}'] for i in range(len(p.files))]
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  probs, scores, refined = loaded.call(params, images)
  nets, _ = iterseg.load(str(root / 'run'))
  pred = iterseg.infer(nets, images, config)
  np.testing.assert_allclose(probs, pred.probs, atol=1e-6)
  np.testing.assert_array_equal(refined, pred.refined)
  np.testing.assert_allclose(scores, pred.scores, atol=1e-6)


def test_an_export_that_fails_half_way_leaves_the_previous_one_whole(exported, tmp_path,
                                                                      monkeypatch):
  """Disk full while the new set is written: the folder keeps the previous complete export, never
  new weights beside the old model.json; a folder of other files is refused, not replaced."""
  import errno  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  config, root, _ = exported
  folder = shutil.copytree(root / 'run' / 'export', tmp_path / 'export')
  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  s = settings.from_config(set_fields(config.copy_and_resolve_references(), refine_count=5))
  nets = models.random_networks(s.spec, jax.random.key(7))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(export.files, 'atomic_write_json', full)
  with pytest.raises(OSError, match='No space left'):
    export.export(nets, s, str(folder))
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
  assert sorted(os.listdir(tmp_path)) == ['export']  # No temporary folder left behind.
  monkeypatch.undo()
  export.export(nets, s, str(folder))  # Once there is room: the new set, whole.
  assert json.loads((folder / 'model.json').read_text())['operating_point']['refine_count'] == 5
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  with pytest.raises(errors.SettingsError, match='holds other files .*notes.txt.*choose a new or '
                     'empty folder'):
    export.export(nets, s, str(tmp_path / 'mine'))
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
  export.export(nets, s, str(tmp_path / 'new'))  # What the line says.
  assert sorted(os.listdir(tmp_path / 'new')) == ['model.json', 'params.npz', 'two_stage.jax']


def test_a_native_config_is_not_exported(tmp_path):
  config = tiny(**{'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
                   'train.num_patches_list': (2,), 'native.bucket': 8})
  s = settings.from_config(config)
  with pytest.raises(errors.SettingsError, match="resolution='native' cannot be exported"):
    export.export(models.random_networks(s.spec, jax.random.key(0)), s, str(tmp_path))


# --- Utilisation -------------------------------------------------------------------------------------


def test_the_peak_comes_from_the_config_or_the_device_kind():
  s = settings.from_config(tiny(**{'model.dtype': 'bfloat16'}))
  assert benchmark.peak_tflops(s, 'NVIDIA H200') == 989.0
  assert benchmark.peak_tflops(settings.from_config(tiny()), 'NVIDIA H100 80GB HBM3') == 67.0
  assert benchmark.peak_tflops(s, 'TPU v5 lite') == 197.0
  assert benchmark.peak_tflops(s, 'cpu') is None
  assert benchmark.peak_tflops(settings.from_config(tiny(**{'benchmark.peak_tflops': 2.5})),
                               'cpu') == 2.5


def test_the_training_speed_of_each_network_against_the_peak():
  s = settings.from_config(tiny(**{'benchmark.repeats': 2}))
  rows = benchmark.training_speed(s, 0.5, networks=('stage1', 'baseline'), progress=False)
  trained = {r['method']: r for r in rows}
  assert set(trained) == {'stage1', 'baseline'}
  for r in trained.values():
    assert r['batch_size'] == 8 and r['steps_per_s'] == pytest.approx(1e3 / r['step_ms'])
    assert r['images_per_s'] == pytest.approx(8 * r['steps_per_s'])
    assert r['gflops_per_step'] > 0 and 0 < r['peak_fraction'] < 1
    assert r['peak_fraction'] == pytest.approx(r['achieved_gflops_per_s'] / 1e3 / 0.5 /
                                               jax.local_device_count())
  assert trained['baseline']['gflops_per_step'] > trained['stage1']['gflops_per_step']
