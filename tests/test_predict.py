import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import iterseg
from iterseg import errors, predict, settings
from tests.helpers import set_fields, tiny
from tests.helpers import save_random_networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INPUTS = {  # file name: (mode, height, width)
    'odd.png': ('RGB', 37, 53),
    'grey.jpg': ('L', 40, 64),
    'alpha.png': ('RGBA', 50, 31),
    'square.bmp': ('RGB', 64, 64),  # Already hi_size: the probabilities come back unresampled.
}


def write_inputs(folder: Path):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for name, (mode, h, w) in INPUTS.items():
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(folder / name)
  (folder / 'README.txt').write_text('not an image: skipped')
  (folder / '.hidden.png').write_bytes(b'skipped too')


@pytest.fixture(scope='module')
def predicted(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  config = tiny(num_patches=4, **{'train.num_patches_list': (4,)})
  save_random_networks(config, root / 'run')
  write_inputs(root / 'in')
  config.predict.input = str(root / 'in')
  return config, root, predict.run(settings.from_config(config), str(root / 'run'))


def test_outputs_have_the_size_of_each_input_whatever_its_mode(predicted):
  config, root, result = predicted
  out = root / 'run' / 'predictions'
  assert result['output'] == str(out) and len(result['images']) == len(INPUTS)
  for name, (_, h, w) in INPUTS.items():
    stem = name.split('.')[0]
    mask = np.asarray(Image.open(out / f'{stem}_mask.png'))
    prob = Image.open(out / f'{stem}_prob.png')
    overlay = Image.open(out / f'{stem}_overlay.png')
    assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert prob.size == (w, h) and prob.mode.startswith('I')  # 16-bit grey.
    assert overlay.size == (w, h) and overlay.mode == 'RGB'
    p = np.asarray(prob).astype(np.float64) / 65535
    agree = (p > 0.5) == (mask == 255)
    assert agree[np.abs(p - 0.5) > 1e-4].all()  # The mask is the probability map thresholded.
  assert sorted(os.listdir(out)) == sorted([f'{n.split(".")[0]}_{k}.png' for n in INPUTS
                                            for k in ('mask', 'prob', 'overlay')] + ['summary.json'])


def test_an_input_at_hi_size_gets_the_probabilities_of_infer(predicted):
  config, root, _ = predicted
  params, _ = iterseg.load(str(root / 'run'), 4)
  image = np.asarray(Image.open(root / 'in' / 'square.bmp').convert('RGB'))
  pred = iterseg.infer(params, image[None], config)
  prob = np.asarray(Image.open(root / 'run' / 'predictions' / 'square_prob.png')) / 65535
  np.testing.assert_allclose(prob, np.asarray(pred.probs[0, ..., 0]), atol=1e-4)


def test_overlay_tints_the_mask_and_outlines_refined_patches_in_original_coordinates():
  image = np.zeros((10, 20, 3), np.uint8)
  mask = np.zeros((10, 20), np.uint8)
  mask[8:, 18:] = 1
  out = predict.overlay(image, mask, [(0, 0, 5, 10)])  # The top-left patch of 2 x 2: 5 x 10 px.
  yellow = np.array(predict.OUTLINE)
  for y, x in [(0, 0), (4, 9), (0, 9), (4, 0), (2, 0)]:
    np.testing.assert_array_equal(out[y, x], yellow)
  np.testing.assert_array_equal(out[2, 5], 0)  # Inside the patch: untouched.
  np.testing.assert_array_equal(out[7, 15], 0)  # Another patch: not refined.
  assert out[9, 19, 1] > 0 and out[9, 19, 0] == out[9, 19, 2] == 0  # Foreground tinted green.


def test_multiclass_outputs_are_class_ids_and_an_npy_of_probabilities(tmp_path):
  probs = np.random.default_rng(0).dirichlet(np.ones(3), (7, 9)).astype(np.float32)
  result = {'probs': probs, 'mask': probs.argmax(-1).astype(np.uint8), 'boxes': [(3, 4, 7, 9)]}
  paths = predict.save_outputs(tmp_path, 'x', np.zeros((7, 9, 3), np.uint8), result)
  np.testing.assert_array_equal(np.asarray(Image.open(paths['mask'])), result['mask'])
  np.testing.assert_array_equal(np.load(paths['probs']), probs)
  assert paths['probs'].endswith('x_probs.npy')


def _fail_at_the_second(monkeypatch, phase: str):
  """Makes the second output file of an image fail with a full disk, while it is written (a PNG
  encoder's write) or while it takes its final name (the rename)."""
  calls = []
  disk_full = OSError(errno.ENOSPC, 'No space left on device')
  if phase == 'writing':
    real_save = Image.Image.save

    def save(image, fp, *args, **kwargs):
      calls.append(fp)
      if len(calls) == 2:
        raise disk_full
      return real_save(image, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, 'save', save)
  else:
    real_replace = os.replace

    def replace(src, dst):
      output = str(src).endswith('.tmp') and not str(dst).endswith('.journal')
      calls.extend([src] if output else [])
      if len(calls) == 2 and output:
        raise disk_full
      return real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(os, 'rename', replace)


@pytest.mark.parametrize('phase', ['writing', 'renaming'])
def test_a_failure_at_the_second_output_keeps_the_previous_set_whole(tmp_path, monkeypatch, phase):
  """One image's outputs are replaced whole or not at all: a failure at its second file, while it
  is written or while it is renamed into place, leaves the previous set and no temporary file."""
  probs = np.full((6, 6, 1), 0.9, np.float32)
  good = {'probs': probs, 'mask': np.ones((6, 6), np.uint8), 'boxes': [(0, 0, 3, 3)]}
  image = np.zeros((6, 6, 3), np.uint8)
  paths = predict.save_outputs(tmp_path, 'x', image, good)
  before = {k: Path(p).read_bytes() for k, p in paths.items()}
  _fail_at_the_second(monkeypatch, phase)
  with pytest.raises(OSError, match='No space left'):
    predict.save_outputs(tmp_path, 'x', image, dict(good, probs=probs * 0, mask=good['mask'] * 0))
  assert {k: Path(p).read_bytes() for k, p in paths.items()} == before
  assert sorted(os.listdir(tmp_path)) == ['x_mask.png', 'x_overlay.png', 'x_prob.png']
  monkeypatch.undo()
  predict.save_outputs(tmp_path, 'x', image, dict(good, probs=probs * 0, mask=good['mask'] * 0))
  assert all(Path(p).read_bytes() != before[k] for k, p in paths.items())  # Then replaced whole.


_KILL_MID_SET = """
import os, signal, sys
import numpy as np
from pathlib import Path
from iterseg import predict
real, moved = os.replace, []
def replace(src, dst):  # SIGKILL once the first output has its new name, before the others.
  if len(moved) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  moved.append(src)
  return real(src, dst)
os.replace = replace
predict.save_outputs(Path(sys.argv[1]), 'x', np.zeros((6, 6, 3), np.uint8),
                     {'probs': np.zeros((6, 6, 1), np.float32), 'mask': np.zeros((6, 6), np.uint8),
                      'boxes': []})
"""


def test_a_set_killed_between_its_renames_is_completed_by_the_next_predict(trained_tiny, tmp_path):
  """SIGKILL after an image's first output took its new name: the next predict into that folder
  completes the set (all new), and no temporary file is left."""
  config, root = trained_tiny
  out = tmp_path / 'out'
  out.mkdir()
  old = predict.save_outputs(out, 'x', np.zeros((6, 6, 3), np.uint8), {
      'probs': np.ones((6, 6, 1), np.float32), 'mask': np.ones((6, 6), np.uint8), 'boxes': []})
  before = {k: Path(p).read_bytes() for k, p in old.items()}
  killed = subprocess.run([sys.executable, '-c', _KILL_MID_SET, str(out)], cwd=ROOT)
  assert killed.returncode == -signal.SIGKILL
  mixed = [k for k, p in old.items() if Path(p).exists() and Path(p).read_bytes() != before[k]]
  assert mixed == ['mask']  # Cut in two: the new mask beside the old others.
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'a.png')
  run_predict(config, root / 'run', input=str(tmp_path / 'a.png'), output=str(out))
  assert all(Path(p).read_bytes() != before[k] for k, p in old.items())  # x: the new set, whole.
  assert not [p.name for p in out.iterdir() if p.name.startswith('.')]


def test_summary_parts_merge_only_when_every_process_of_this_run_wrote_its_own(tmp_path):
  part = lambda run, n: {'images': [{'input': f'{run}-{i}'} for i in range(n)], 'failed': 0,
                         'skipped': 0, 'total': n, 'interrupted': None, 'compiles': None, 'run': run}
  predict.write_summary(tmp_path, part(7, 1), 1, 2)  # An earlier run's process 1.
  predict.write_summary(tmp_path, part(8, 2), 0, 2)  # This run's process 0: 1 is not done yet.
  assert not (tmp_path / 'summary.json').exists()
  predict.write_summary(tmp_path, part(8, 3), 1, 2)
  merged = json.loads((tmp_path / 'summary.json').read_text())
  assert merged['total'] == 5 and {r['input'][0] for r in merged['images']} == {'8'}


def test_a_full_disk_at_one_image_is_one_line_and_keeps_its_previous_outputs(trained_tiny, tmp_path,
                                                                             monkeypatch):
  config, root = trained_tiny
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.png'):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
  out = tmp_path / 'out'
  run_predict(config, root / 'run', input=str(tmp_path), output=str(out))
  before = {p.name: p.read_bytes() for p in out.glob('b_*')}
  Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / 'b.png')
  real_save = Image.Image.save

  def save(image, fp, *args, **kwargs):  # b's second output meets a full disk.
    if 'b_prob.png' in str(getattr(fp, 'name', fp)):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(image, fp, *args, **kwargs)
  monkeypatch.setattr(Image.Image, 'save', save)
  with pytest.raises(errors.PredictError) as e:
    run_predict(config, root / 'run', input=str(tmp_path), output=str(out))
  assert str(e.value).endswith(f'b.png: cannot write its outputs to {out} (disk full)')
  assert '\n' not in str(e.value)
  assert {p.name: p.read_bytes() for p in out.glob('b_*')} == before
  assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == []


def test_a_stop_while_saving_keeps_nothing_half_written(tmp_path):
  """The stop is asked before each output of an image: once it holds, the image counts as not
  done (None), and no output of it, new or temporary, is left."""
  probs = np.full((6, 6, 1), 0.9, np.float32)
  result = {'probs': probs, 'mask': np.ones((6, 6), np.uint8), 'boxes': []}
  asked = []
  for answer_at in (1, 2, 3):
    asked.clear()
    stopped = lambda: asked.append(1) or len(asked) >= answer_at
    assert predict.save_outputs(tmp_path, 'x', np.zeros((6, 6, 3), np.uint8), result,
                                stopped=stopped) is None
    assert os.listdir(tmp_path) == [] and len(asked) == answer_at
  paths = predict.save_outputs(tmp_path, 'x', np.zeros((6, 6, 3), np.uint8), result,
                               stopped=lambda: False)
  assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in paths.values())


def test_missing_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='config.predict.input is empty'):
    predict.list_inputs('')
  with pytest.raises(ValueError, match=f'{tmp_path / "nope"} does not exist'):
    predict.list_inputs(tmp_path / 'nope')


def test_a_folder_without_images_is_a_clear_error(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match=f'no image files in folder {tmp_path}'):
    predict.list_inputs(tmp_path)


def test_run_without_trained_networks_says_so(tmp_path):
  config = tiny()
  config.predict.input = str(tmp_path)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'a.png')
  with pytest.raises(ValueError, match='not a trained workdir'):
    predict.run(settings.from_config(config), str(tmp_path / 'run'))


@pytest.mark.parametrize('names', [
    ['a.png', 'a.jpg', 'b.png'],
    ['a.png', 'a.jpg', 'a_png.png'],  # a.png's full name is a_png: a_png.png's stem.
    ['A.png', 'a.jpg'],  # One output name on a case-insensitive file system.
    ['a.b.png', 'a_b.png', 'a_b_png.jpg', 'a.b.jpg'],
    ['x.tif', 'x.TIF'],
])
def test_output_names_never_collide(names):
  got = predict.output_names([Path(n) for n in names])
  assert len({g.casefold() for g in got}) == len(names), got
  assert predict.output_names([Path(n) for n in names]) == got  # Deterministic.
  if names == ['a.png', 'a.jpg', 'b.png']:
    assert got == ['a_png', 'a_jpg', 'b']  # Readable where possible.


def test_inputs_whose_names_collide_get_three_sets_of_outputs(trained_tiny, tmp_path):
  config, root = trained_tiny
  rng = np.random.default_rng(1)
  for name in ('a.png', 'a.jpg', 'a_png.png'):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(tmp_path), 'predict.output': str(tmp_path / 'out')})
  result = predict.run(settings.from_config(config), str(root / 'run'))
  written = [r[k] for r in result['images'] for k in ('mask', 'probs', 'overlay')]
  assert len(set(written)) == 9 and all(os.path.exists(p) for p in written)
  assert len(os.listdir(tmp_path / 'out')) == 10  # And summary.json.


@pytest.fixture(scope='module')
def trained_tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict2')
  config = tiny(num_patches=4, **{'train.num_patches_list': (4,)})
  save_random_networks(config, root / 'run')
  return config, root


def run_predict(config, workdir, **fields):
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    config.predict[key] = value
  return predict.run(settings.from_config(config), str(workdir))


def test_one_unreadable_file_does_not_stop_the_others(trained_tiny, tmp_path):
  config, root = trained_tiny
  rng = np.random.default_rng(0)
  for name in ('a.jpg', 'b.jpg', 'c.png'):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
  broken = tmp_path / 'b.jpg'
  broken.write_bytes(broken.read_bytes()[:200])  # Truncated.
  out = tmp_path / 'out'
  with pytest.raises(errors.PredictError, match=r'1 of 3 image\(s\) failed .*b\.jpg'):
    run_predict(config, root / 'run', input=str(tmp_path), output=str(out), batch_size=2)
  for stem in ('a', 'c'):
    for kind in ('mask', 'prob', 'overlay'):
      assert (out / f'{stem}_{kind}.png').exists()
  assert not list(out.glob('b_*'))
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['failed'] == 1 and [r['input'].endswith('b.jpg') for r in summary['images']] == [
      False, True, False]
  assert 'cannot read image' in summary['images'][1]['error']


def test_at_the_square_protocol_a_slide_is_named_as_native_only_and_the_others_go_on(trained_tiny,
                                                                                    tmp_path):
  config, root = trained_tiny
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'a.png')
  (tmp_path / 'b.ome.zarr').mkdir()
  (tmp_path / 'c.ndpi').write_bytes(b'')
  out = tmp_path / 'out'
  with pytest.raises(errors.PredictError, match=r'2 of 3 image\(s\) failed'):
    run_predict(config, root / 'run', input=str(tmp_path), output=str(out))
  records = json.loads((out / 'summary.json').read_text())['images']
  assert 'mask' in records[0]
  for record in records[1:]:
    assert "is a slide, which iterseg reads out of core at resolution='native' only" in (
        record['error'])


def test_a_16_bit_copy_of_an_image_gets_the_same_mask(trained_tiny, tmp_path):
  config, root = trained_tiny
  pixels = np.random.default_rng(1).integers(0, 256, (48, 40), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'eight.png')
  Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / 'sixteen.png')
  out = tmp_path / 'out'
  run_predict(config, root / 'run', input=str(tmp_path), output=str(out))
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'eight_prob.png')),
                                np.asarray(Image.open(out / 'sixteen_prob.png')))


def test_outputs_are_selectable_and_an_output_folder_inside_the_input_is_never_read(trained_tiny,
                                                                                     tmp_path):
  config, root = trained_tiny
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'a.png')
  out = tmp_path / 'masks'
  first = run_predict(config, root / 'run', input=str(tmp_path), output=str(out),
                      outputs=('mask',))
  assert sorted(os.listdir(out)) == ['a_mask.png', 'summary.json']
  again = run_predict(config, root / 'run', input=str(tmp_path), output=str(out),
                      outputs=('mask',))
  assert [r['input'] for r in again['images']] == [str(tmp_path / 'a.png')]
  assert [r['input'] for r in first['images']] == [str(tmp_path / 'a.png')]
  with pytest.raises(settings.SettingsError, match='must differ from config.predict.input'):
    run_predict(config, root / 'run', input=str(tmp_path), output=str(tmp_path))


def test_an_unwritable_output_folder_is_refused_before_any_work(trained_tiny, tmp_path):
  config, root = trained_tiny
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'a.png')
  (tmp_path / 'file').write_text('a file, not a folder')
  with pytest.raises(errors.WriteError, match='cannot write to .*file'):
    run_predict(config, root / 'run', input=str(tmp_path), output=str(tmp_path / 'file' / 'out'))


def many_inputs(folder: Path, count: int, size=(24, 30)) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(2)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')
  return folder


def test_predict_holds_only_a_few_batches_whatever_the_folder_size(trained_tiny, tmp_path,
                                                                    monkeypatch):
  """Memory does not grow with the folder: images read but not yet written never exceed the
  `ahead` batches read ahead + the one in hand + 2 written behind (here 5 batches of 2 of 40)."""
  config, root = trained_tiny
  inputs = many_inputs(tmp_path / 'in', 40)
  read, held = [], []
  real_read, real_save = predict.read_input, predict.save_outputs

  def save(*a, **k):
    held.append(len(read) - len(held))  # Read so far minus written so far (this one included).
    return real_save(*a, **k)

  monkeypatch.setattr(predict, 'read_input', lambda *a: (read.append(1), real_read(*a))[1])
  monkeypatch.setattr(predict, 'save_outputs', save)
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(inputs), 'predict.output': str(tmp_path / 'out'), 'predict.batch_size': 2})
  result = predict.run(settings.from_config(config), str(root / 'run'))
  assert len(result['images']) == 40 and len(read) == 40 and len(held) == 40
  assert max(held) <= (2 + 1 + 2) * 2


def test_ctrl_c_stops_predict_writes_the_summary_and_skip_existing_goes_on(trained_tiny, tmp_path,
                                                                            monkeypatch):
  config, root = trained_tiny
  inputs = many_inputs(tmp_path / 'in', 12)
  out = tmp_path / 'out'
  real_save = predict.save_outputs
  saved = []

  def save_then_ctrl_c(*args, **kwargs):
    paths = real_save(*args, **kwargs)
    saved.append(1)
    if len(saved) == 3:  # Ctrl-C after the third image is written (from a writer thread).
      os.kill(os.getpid(), signal.SIGINT)
    return paths
  monkeypatch.setattr(predict, 'save_outputs', save_then_ctrl_c)
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(inputs), 'predict.output': str(out), 'predict.batch_size': 2})
  with pytest.raises(errors.Interrupted) as stopped:
    predict.run(settings.from_config(config), str(root / 'run'))
  summary = json.loads((out / 'summary.json').read_text())
  done = [r for r in summary['images'] if 'mask' in r]
  message = str(stopped.value)
  assert summary['interrupted'] == 'SIGINT' and summary['total'] == 12 and 3 <= len(done) < 12
  assert f'{len(done)} of 12 image(s) done' in message and 'skip_existing=True' in message
  assert '\n' not in message
  for record in done:  # Every listed output is complete; no temporary file is left.
    assert all(os.path.getsize(record[k]) for k in ('mask', 'probs', 'overlay'))
  assert not [p for p in os.listdir(out) if p.endswith('.tmp')]
  monkeypatch.setattr(predict, 'save_outputs', real_save)
  config = set_fields(config, **{'predict.skip_existing': True})
  result = predict.run(settings.from_config(config), str(root / 'run'))
  assert len(result['skipped']) == len(done) and len(result['images']) == 12
  assert len([p for p in os.listdir(out) if p.endswith('_mask.png')]) == 12


@pytest.mark.parametrize('resolution', ['square', 'native'])
def test_an_image_above_pillows_decompression_limit_is_one_failed_record_and_the_rest_go_on(
    resolution, tmp_path, monkeypatch):
  """One pipeline for both protocols: the large image is named with its reason in summary.json, the
  images after it are segmented, and the run ends in PredictError (never a traceback)."""
  overrides = {'predict.batch_size': 2}
  if resolution == 'native':
    overrides.update({'resolution': 'native', 'stage1_size': 8, 'num_patches': 2,
                      'refine_count': 2, 'train.num_patches_list': (2,), 'native.bucket': 8})
  config = tiny(**overrides)
  save_random_networks(config, tmp_path / 'run')
  rng = np.random.default_rng(0)
  for name, side in (('a.png', 40), ('b.png', 400), ('c.png', 50), ('d.png', 60)):
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / name)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 70_000)  # b (160 000 px) is above twice this.
  config = set_fields(config, **{'predict.input': str(tmp_path), 'predict.output':
                                 str(tmp_path / 'out')})
  with pytest.raises(errors.PredictError, match='1 of 4 image.*b.png') as failed:
    predict.run(settings.from_config(config), str(tmp_path / 'run'))
  assert '\n' not in str(failed.value)
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  by_name = {Path(r['input']).name: r for r in summary['images']}
  assert 'decompression bomb' in by_name['b.png']['error'] and summary['failed'] == 1
  for name in ('a.png', 'c.png', 'd.png'):
    assert Path(by_name[name]['mask']).exists()


PART = {'images': [{'input': 'b.png'}], 'failed': 0, 'skipped': 0, 'total': 1, 'interrupted': None,
        'compiles': 3, 'run': 1}


@pytest.mark.parametrize('content, words', [
    ('{"images": [', 'Expecting value'),  # Truncated mid-write.
    (json.dumps(dict(PART, failed='0')), "failed='0' is not valid (a whole number >= 0)"),
    (json.dumps(dict(PART, total=-1)), 'total=-1 is not valid'),
    (json.dumps(dict(PART, images=[{'mask': 'b_mask.png'}])), 'images[0].input=(missing)'),
    (json.dumps({k: v for k, v in PART.items() if k != 'interrupted'}), 'interrupted=(missing)')],
    ids=['truncated', 'mistyped', 'out-of-range', 'a-record-without-input', 'a-field-missing'])
def test_a_damaged_summary_part_is_one_line_and_doing_what_it_says_merges(tmp_path, content, words):
  """Every file read back is checked: a part of another process's summary truncated mid-write, or
  with a field of another type or out of range, is named with what to do, never merged silently or
  shown as a traceback."""
  (tmp_path / 'summary.1.json').write_text(content)
  with pytest.raises(errors.PredictError, match=r'summary.1.json cannot be read .*delete it') as e:
    predict.write_summary(tmp_path, dict(PART, images=[{'input': 'a.png'}]), 0, 2)
  assert '\n' not in str(e.value) and words in str(e.value)
  (tmp_path / 'summary.1.json').unlink()  # What the line says: the rerun writes that part again.
  predict.write_summary(tmp_path, dict(PART, images=[{'input': 'a.png'}]), 0, 2)
  predict.write_summary(tmp_path, PART, 1, 2)
  merged = json.loads((tmp_path / 'summary.json').read_text())
  assert [r['input'] for r in merged['images']] == ['a.png', 'b.png'] and merged['total'] == 2
