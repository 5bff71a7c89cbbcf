"""Bad input through the command line: exit status != 0, one `iterseg: error: ...` line that names the
thing and what to do, no traceback, and nothing good overwritten.

Covered elsewhere, through the library: NaN or inf images given to `iterseg.infer`
(test_inference.py::test_bad_images_get_a_clear_error), every data-layer error with its file names
(test_data.py: missing files and folders, truncated images, size mismatches), grey, palette and RGBA
inputs converted (test_data.py::test_folder_reads_mixed_formats_exactly,
test_predict.py::test_outputs_have_the_size_of_each_input_whatever_its_mode).
"""

import hashlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from iterseg import checkpoints, settings
from tests import launch_runs
from tests.conftest import tiny
from tests.launch_runs import STAGE2_STEPS, one_line_error


@pytest.fixture(scope='module')
def launch(tmp_path_factory):
  return launch_runs.launcher(tmp_path_factory)


@pytest.fixture
def trained(launch, tmp_path):
  """A copy of the session's trained tiny workdir, to damage or misuse."""
  return shutil.copytree(launch.reference(), tmp_path / 'trained')


def snapshot(folder) -> dict:
  """{relative path: sha1 of the content} of every file under `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def write_cases(root, shapes: dict) -> dict:
  """root/images/<stem>.png and root/masks/<stem>.png; shapes: {stem: (image mode, h, w, mask h)}."""
  rng = np.random.default_rng(0)
  paths = {}
  for stem, (mode, h, w, mask_h) in shapes.items():
    for kind in ('images', 'masks'):
      (root / kind).mkdir(parents=True, exist_ok=True)
    channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(root / 'images' / f'{stem}.png')
    mask = (rng.random((mask_h, w)) < 0.3).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / 'masks' / f'{stem}.png')
    paths[stem] = root / 'images' / f'{stem}.png'
  return paths


def prepare_folder(launch, tmp_path, manual_dir):
  return launch.run('--mode=prepare', '--config.data.name=folder', '--config.hi_size=32',
                    '--config.model.depth=2',
                    f'--config.data.manual_dir={manual_dir}', f'--config.data.data_dir={tmp_path}/tfds')


# --- Data -------------------------------------------------------------------------------------------


def test_a_missing_data_folder_is_named(launch, tmp_path):
  line = one_line_error(prepare_folder(launch, tmp_path, tmp_path / 'nowhere'))
  assert f'manual_dir {tmp_path / "nowhere"} does not exist' in line and 'images/' in line


def test_a_corrupted_image_is_named_and_nothing_is_prepared(launch, tmp_path):
  paths = write_cases(tmp_path / 'raw', {s: ('RGB', 40, 48, 40) for s in 'abc'})
  paths['b'].write_bytes(paths['b'].read_bytes()[:100])  # Truncated.
  line = one_line_error(prepare_folder(launch, tmp_path, tmp_path / 'raw'))
  assert f'cannot read image {paths["b"]}' in line
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))


def test_an_image_and_mask_of_different_sizes_are_both_named(launch, tmp_path):
  write_cases(tmp_path / 'raw', {'a': ('RGB', 40, 48, 40), 'b': ('RGB', 40, 48, 40),
                                 'c': ('RGB', 40, 48, 30)})
  line = one_line_error(prepare_folder(launch, tmp_path, tmp_path / 'raw'))
  assert 'size mismatch' in line and 'images/c.png is 48x40' in line and 'masks/c.png is 48x30' in line


def test_grey_and_rgba_images_are_converted_not_refused(launch, tmp_path):
  write_cases(tmp_path / 'raw', {'a': ('L', 40, 48, 40), 'b': ('RGBA', 40, 48, 40),
                                 'c': ('RGB', 40, 48, 40)})
  result = prepare_folder(launch, tmp_path, tmp_path / 'raw')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train: 2, test: 1' in result.stdout


# --- Config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize('flags, expected', [
    (['--config.train.nope=1'], '--config.train.nope: unknown config key'),
    (['--config.model.widht=8'], 'Did you mean "width"'),
    (['--config=configs/ph2.py', '--config.nope.deeper=1'], '--config.nope.deeper: unknown config key'),
])
def test_an_unknown_config_key_names_the_flag(launch, tmp_path, flags, expected):
  line = one_line_error(launch.run('--mode=prepare', *flags, f'--workdir={tmp_path}/run'))
  assert expected in line and 'configs/default.py' in line
  assert not (tmp_path / 'run').exists()


def test_hi_size_not_divisible_by_np_fails_before_touching_the_workdir(launch, trained):
  before = snapshot(trained)
  line = one_line_error(launch.run(*launch.tiny(trained), '--config.num_patches=5'))
  assert 'hi_size=64 is not divisible by num_patches (Np)=5' in line and 'divisors' in line
  assert snapshot(trained) == before


# --- Checkpoints ------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_config_is_refused(launch, trained):
  before = snapshot(trained)
  line = one_line_error(launch.run(*launch.tiny(trained), '--config.model.width=8'))
  assert 'config.model.width=8' in line and 'trained with 4' in line
  assert snapshot(trained) == before
  # Without the workdir's config.json to compare with, the checkpoint's own shapes say it.
  config = tiny(**{'model.width': 8})
  with pytest.raises(checkpoints.CheckpointError, match=r'stage1/4 was written with another config: '
                     r'\d+ arrays differ, e.g. params\.\S+ is \(\S+\) there but \(\S+\)'):
    checkpoints.load_network(str(trained), 'stage1', settings.from_config(config))


def test_a_truncated_checkpoint_is_named_and_deleting_it_resumes(launch, trained):
  step_dir = trained / 'checkpoints' / 'stage2_np4' / str(STAGE2_STEPS)
  for path in (step_dir / 'default' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  before = snapshot(trained)
  line = one_line_error(launch.run(*launch.tiny(trained)))
  assert f'{step_dir} is damaged or incomplete' in line and 'Delete that folder' in line
  assert snapshot(trained) == before
  shutil.rmtree(step_dir)  # As the message says: training resumes from the step before.
  result = launch.run(*launch.tiny(trained))
  assert result.returncode == 0, result.stderr[-3000:]
  reference = launch_runs.read_checkpoint(launch.reference(), 'stage2_np4', STAGE2_STEPS)
  resumed = launch_runs.read_checkpoint(trained, 'stage2_np4', STAGE2_STEPS)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


# --- Predict ----------------------------------------------------------------------------------------


def test_predict_on_an_empty_folder(launch, trained, tmp_path):
  (trained / 'predictions').mkdir()
  (trained / 'predictions' / 'earlier_mask.png').write_bytes(b'a result of an earlier run')
  (tmp_path / 'empty').mkdir()
  before = snapshot(trained)
  line = one_line_error(launch.run(*launch.tiny(trained), '--mode=predict',
                                   f'--config.predict.input={tmp_path / "empty"}'))
  assert f'no image files in folder {tmp_path / "empty"}' in line
  assert snapshot(trained) == before
