"""The dataset builders on tiny fixtures in the official layouts: counts, splits, masks, sizes, errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures
from iterseg import data
from iterseg.data import common
from iterseg.data import pipeline
from iterseg.data.common import DataError
from iterseg.data.synthetic import make_synthetic_example

HI = 32


def prepare_and_read(config):
  stats = data.prepare(config)
  examples = {split: list(data.load_split(config, split)) for split in ('train', 'test')}
  return stats, examples


def check_examples(examples, hi=HI, original_size=(fixtures.HEIGHT, fixtures.WIDTH)):
  for example in examples:
    assert example['image'].shape == (hi, hi, 3) and example['image'].dtype == np.uint8
    assert example['mask'].shape == (hi, hi) and example['mask'].dtype == np.uint8
    assert set(np.unique(example['mask'])) <= {0, 1}
    assert example['original_size'].dtype == np.int32
    assert tuple(example['original_size']) == original_size
    assert isinstance(example['name'], str)


# --- Split ---------------------------------------------------------------------------------------------


def test_split_is_70_30_disjoint_and_reproducible():
  names = [f'case{i:03d}' for i in range(200)]
  split = common.split_names(names, seed=123, train_fraction=0.7)
  assert (len(split['train']), len(split['test'])) == (140, 60)
  assert not set(split['train']) & set(split['test'])
  assert sorted(split['train'] + split['test']) == names
  assert common.split_names(names[::-1], seed=123, train_fraction=0.7) == split  # Order-free.
  assert common.split_names(names, seed=124, train_fraction=0.7) != split


def test_split_keeps_both_sides_nonempty():
  assert common.split_names(['a', 'b'], seed=0, train_fraction=0.7) in (
      {'train': ['a'], 'test': ['b']}, {'train': ['b'], 'test': ['a']})
  with pytest.raises(DataError, match='at least 2'):
    common.split_names(['a'], seed=0, train_fraction=0.7)


# --- Resize --------------------------------------------------------------------------------------------


def test_resize_smooths_images_and_keeps_mask_ids():
  checker = (np.indices((40, 48)).sum(0) % 2 * 255).astype(np.uint8)
  image = common.resize_image(np.repeat(checker[..., None], 3, -1), 10)
  assert image.shape == (10, 10, 3) and 100 < image.mean() < 155 and image.std() < 30  # Averaged.
  ids = np.where(np.indices((40, 48)).sum(0) % 3 == 0, 5, 0).astype(np.uint8)
  mask = common.resize_mask(ids, 10)
  assert mask.shape == (10, 10) and set(np.unique(mask)) == {0, 5}  # Ids, never blends of them.


# --- PH2 -----------------------------------------------------------------------------------------------


def test_ph2_reads_1bit_and_rgb_masks_and_ignores_non_cases(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=6)
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  stats, examples = prepare_and_read(config)
  assert (stats['train'], stats['test']) == (4, 2)  # round(6 * 0.7) = 4.
  assert stats['fg_percent'] == pytest.approx(fixtures.FG_PERCENT, abs=0.5)
  names = [e['name'] for e in examples['train'] + examples['test']]
  assert sorted(names) == [f'PH2/IMD{i + 2:03d}.bmp' for i in range(6)]
  check_examples(examples['train'] + examples['test'])
  rgb_case = next(e for e in examples['train'] + examples['test'] if e['name'] == 'PH2/IMD003.bmp')
  assert rgb_case['mask'].mean() == pytest.approx(fixtures.FG_PERCENT / 100, abs=0.01)


def test_prepare_is_idempotent_and_split_reproducible(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=6)
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  first = data.prepare(config)
  info = Path(first['path']) / 'dataset_info.json'
  stamp = info.stat().st_mtime_ns
  assert data.prepare(config) == first
  assert info.stat().st_mtime_ns == stamp  # Not regenerated.
  # Loading needs no manual_dir once prepared.
  config = dataclasses.replace(config, manual_dir='')
  train = [e['name'] for e in data.load_split(config, 'train')]
  # The same split when generated again elsewhere; another seed gives another split at another path.
  again = fixtures.config(tmp_path / 'tfds2', 'ph2', manual)
  assert [e['name'] for e in data.load_split(again, 'train')] == train
  other = fixtures.config(tmp_path / 'tfds', 'ph2', manual, split_seed=7)
  assert data.prepare(other)['path'] != first['path']
  other_train = [e['name'] for e in data.load_split(other, 'train')]
  assert len(other_train) == len(train) and other_train != train


def test_a_prepared_dataset_without_its_dataset_info_is_named_and_deleting_it_recovers(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=4)
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  folder = Path(data.prepare(config)['path'])
  (folder / 'dataset_info.json').unlink()
  with pytest.raises(data.DataError, match=r'dataset_info.json is missing\. Delete that folder') as e:
    data.load_split(config, 'train')
  assert '\n' not in str(e.value) and str(folder) in str(e.value)
  shutil.rmtree(folder)  # Doing what it says works.
  assert len(data.load_split(config, 'train')) + len(data.load_split(config, 'test')) == 4


def _edit_json(name, **fields):
  def edit(folder):
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
  return edit


@pytest.mark.parametrize('damage, words', [
    (lambda folder: (folder / 'dataset_info.json').write_text('{"splits": ['),
     'dataset_info.json cannot be read (Expecting value'),  # Truncated: a TFDS ParseError before.
    (_edit_json('metadata.json', fg_percent='17'), "metadata.json cannot be read (fg_percent='17' "
                                                   'is not valid (a finite number in [0, 100]))'),
    (_edit_json('metadata.json', fg_percent=-5.0), 'fg_percent=-5.0 is not valid'),
    (lambda folder: (folder / 'metadata.json').unlink(), 'metadata.json cannot be read ([Errno 2]'),
    (_edit_json('dataset_info.json', splits=[]),
     "dataset_info.json cannot be read (no split 'test')"),
], ids=['info-truncated', 'fg-mistyped', 'fg-out-of-range', 'metadata-missing', 'no-splits'])
def test_a_damaged_prepared_dataset_names_the_file_and_the_field_and_deleting_it_recovers(
    tmp_path, damage, words):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=4)
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  folder = Path(data.prepare(config)['path'])
  damage(folder)
  for step in (lambda: data.prepare(config), lambda: data.load_split(config, 'train')):
    with pytest.raises(data.DataError) as e:
      step()
    assert words in str(e.value) and '\n' not in str(e.value)
    assert f'delete {folder} and run again with config.data.manual_dir set' in str(e.value)
  shutil.rmtree(folder)  # Doing what it says works.
  assert data.prepare(config)['train'] + data.prepare(config)['test'] == 4


def test_data_prepared_from_another_folder_is_never_read_for_this_one(tmp_path, capsys):
  """Folder B prepared into a data_dir that holds A's: B gets its own folder and B's images."""
  for folder, seed in (('a', 0), ('b', 1)):
    for stem in 'pqr':
      fixtures.save(Image.fromarray(fixtures.rgb(seed * 10 + ord(stem))),
                    tmp_path / folder / 'images' / f'{stem}.png')
      fixtures.save(Image.fromarray(fixtures.binary()), tmp_path / folder / 'masks' / f'{stem}.png')
  spec = lambda folder: fixtures.config(tmp_path / 'tfds', 'folder', tmp_path / folder)
  first = data.prepare(spec('a'))
  second = data.prepare(spec('b'))
  assert first['path'] != second['path']
  assert 'differ from those prepared before' in capsys.readouterr().out
  for folder, seed in (('a', 0), ('b', 1)):
    example = data.load_split(spec(folder), 'train')[0]
    stem = example['name'].split('.')[0]
    resized = common.resize_image(fixtures.rgb(seed * 10 + ord(stem)), 32)
    np.testing.assert_array_equal(example['image'], resized)
  with pytest.raises(DataError, match=r'2 datasets prepared from different files .*manual_dir'):
    data.load_split(dataclasses.replace(spec('a'), manual_dir=''), 'train')


@pytest.mark.parametrize('name', ['ph2', 'retina', 'kitti', 'folder'])
def test_a_change_of_any_raw_file_gives_another_prepared_dataset(tmp_path, name):
  write = {'ph2': fixtures.write_ph2, 'retina': lambda r: fixtures.write_chase(
      fixtures.write_stare(fixtures.write_drive(r))), 'kitti': fixtures.write_kitti,
           'folder': fixtures.write_folder}[name]
  manual = tmp_path / 'raw'
  write(manual)
  spec = fixtures.config(tmp_path / 'tfds', name, manual)
  before = data.make_builder(spec).builder_config.name
  assert '_src' in before and data.make_builder(spec).builder_config.name == before
  case = next(iter(data.make_builder(spec).list_cases().values()))
  for path in (case.mask, case.image):  # A mask, then an image, each changed in place.
    path.write_bytes(path.read_bytes() + b'\0')
    after = data.make_builder(spec).builder_config.name
    assert after != before
    before = after


def test_hi_size_is_part_of_the_prepared_dataset_identity(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=3)
  small = data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', manual, hi_size=16))
  large = data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', manual, hi_size=24))
  assert small['path'] != large['path']
  assert data.load_split(fixtures.config(tmp_path / 'tfds', 'ph2', hi_size=24), 'test')[0]['image'].shape \
      == (24, 24, 3)


# --- RETINA --------------------------------------------------------------------------------------------


def test_retina_combines_drive_stare_chase(tmp_path):
  manual = tmp_path / 'raw'
  fixtures.write_drive(manual)
  fixtures.write_stare(manual)
  fixtures.write_chase(manual)
  stats, examples = prepare_and_read(fixtures.config(tmp_path / 'tfds', 'retina', manual))
  everything = examples['train'] + examples['test']
  assert sorted(e['name'] for e in everything) == [
      'CHASE_DB1/Image_01L.jpg', 'DRIVE/01_test.tif', 'DRIVE/21_training.tif', 'DRIVE/22_training.tif',
      'STARE/im0001.ppm.gz', 'STARE/im0002.ppm']
  assert (stats['train'], stats['test']) == (4, 2)
  check_examples(everything)
  for example in everything:  # GIF palettes, grey PPM, 1-bit PNG: all the left 12 of 48 columns.
    assert example['mask'].mean() == pytest.approx(fixtures.FG_PERCENT / 100, abs=0.01), example['name']


def test_retina_with_one_subset_and_drive_test_without_labels(tmp_path):
  manual = fixtures.write_drive(tmp_path / 'raw', test_manual=False)
  stats = data.prepare(fixtures.config(tmp_path / 'tfds', 'retina', manual))
  assert stats['train'] + stats['test'] == 2  # The two training images; test has no 1st_manual.


# --- KITTI ---------------------------------------------------------------------------------------------


def test_kitti_vehicle_mask_from_label_ids(tmp_path):
  manual = fixtures.write_kitti(tmp_path / 'raw', num_frames=3)
  stats, examples = prepare_and_read(fixtures.config(tmp_path / 'tfds', 'kitti', manual))
  assert (stats['train'], stats['test']) == (2, 1)
  check_examples(examples['train'] + examples['test'])
  assert stats['fg_percent'] == pytest.approx(100 * 3 / 8, abs=0.5)  # Ids 26, 27, 31 of the 8.
  mask = examples['test'][0]['mask']
  assert (mask[:, :4] == 1).all() and (mask[:, 4:8] == 0).all()  # 26 is a vehicle, 7 is not.
  cars_only = fixtures.config(tmp_path / 'tfds', 'kitti', manual, kitti_label_ids=(26,))
  stats_cars = data.prepare(cars_only)
  assert stats_cars['path'] != stats['path']
  assert stats_cars['fg_percent'] == pytest.approx(100 / 8, abs=0.5)


# --- Folder --------------------------------------------------------------------------------------------


def test_folder_reads_mixed_formats_exactly(tmp_path):
  cases = fixtures.write_folder(tmp_path / 'raw', size=HI)
  stats, examples = prepare_and_read(fixtures.config(tmp_path / 'tfds', 'folder', tmp_path / 'raw'))
  assert stats['train'] + stats['test'] == len(cases) == 7
  everything = {e['name']: e for e in examples['train'] + examples['test']}
  assert sorted(everything) == ['a.png', 'b.bmp', 'c.tif', 'd.jpg', 'e.png', 'f.ppm.gz', 'g.png']
  check_examples(everything.values(), original_size=(HI, HI))
  for name, example in everything.items():
    image, mask = cases[name.split('.')[0]]
    np.testing.assert_array_equal(example['mask'], mask, err_msg=name)
    if not name.endswith('.jpg'):  # Same size: stored as read, losslessly.
      np.testing.assert_array_equal(example['image'], image, err_msg=name)


def test_folder_multiclass_keeps_ids(tmp_path):
  root = tmp_path / 'raw'
  ids = np.arange(HI * HI).reshape(HI, HI) % 3
  for stem in ('x', 'y'):
    fixtures.save(Image.fromarray(fixtures.rgb(1, HI, HI)), root / 'images' / f'{stem}.png')
    fixtures.save(Image.fromarray(ids.astype(np.uint8)), root / 'masks' / f'{stem}.png')
  config = fixtures.config(tmp_path / 'tfds', 'folder', root)
  config = dataclasses.replace(config, num_classes=3)
  np.testing.assert_array_equal(data.load_split(config, 'train')[0]['mask'], ids)
  config = dataclasses.replace(config, num_classes=2)
  with pytest.raises(DataError, match='outside'):
    data.prepare(config)


# --- Synthetic -----------------------------------------------------------------------------------------


def test_synthetic_example_is_deterministic_and_binary():
  a, b = make_synthetic_example(3, 64), make_synthetic_example(3, 64)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['mask'], b['mask'])
  assert a['image'].shape == (64, 64, 3) and a['image'].dtype == np.uint8
  assert set(np.unique(a['mask'])) == {0, 1}
  assert not np.array_equal(make_synthetic_example(4, 64)['mask'], a['mask'])
  rng = np.random.default_rng(3)
  np.testing.assert_array_equal(make_synthetic_example(rng, 64)['mask'], a['mask'])


def _upsampled_eighth(mask):
  """What a perfect stage 1 at 1/8 resolution gives back at full size: area-down, bilinear-up, > 0.5."""
  s = mask.shape[0]
  low = mask.reshape(s // 8, 8, s // 8, 8).mean(axis=(1, 3)).astype(np.float32)
  return np.asarray(Image.fromarray(low, 'F').resize((s, s), Image.Resampling.BILINEAR)) > 0.5


def test_synthetic_detail_is_lost_at_one_eighth_and_local():
  dices, error_patches, fg = [], [], []
  for i in range(20):
    mask = make_synthetic_example(i, 128)['mask'].astype(bool)
    coarse = _upsampled_eighth(mask)
    dices.append(2 * (coarse & mask).sum() / (coarse.sum() + mask.sum()))
    errors = (coarse != mask).reshape(8, 16, 8, 16).sum(axis=(1, 3))
    error_patches.append((errors > 0).sum())
    fg.append(100 * mask.mean())
  assert 10 <= np.mean(fg) <= 30 and min(fg) > 5
  assert np.mean(dices) < 0.95  # Stage 1 alone misses the ragged border and the curves...
  assert np.mean(dices) > 0.8  # ...but gets the blob.
  assert np.mean(error_patches) <= 26  # What it misses lies in a minority of the 64 patches.


def test_synthetic_builder_counts(tmp_path):
  config = fixtures.config(tmp_path / 'tfds', 'synthetic', hi_size=HI, num_examples=10)
  stats, examples = prepare_and_read(config)
  assert (stats['train'], stats['test']) == (7, 3)
  check_examples(examples['train'] + examples['test'], original_size=(HI, HI))
  assert 5 < stats['fg_percent'] < 35
  first = next(e for e in examples['train'] + examples['test'] if e['name'] == 'synthetic/00000')
  np.testing.assert_array_equal(first['mask'], make_synthetic_example(0, HI)['mask'])


def test_pipeline_reads_a_prepared_dataset_identically_with_threads(tmp_path):
  config = fixtures.config(tmp_path / 'tfds', 'synthetic', hi_size=HI, num_examples=12)
  source = data.load_split(config, 'train')  # 8 examples.
  kwargs = dict(batch_size=4, seed=3, epoch=1, num_local_devices=2, process_index=0, process_count=1)
  serial = list(pipeline.batches(source, num_workers=1, prefetch=0, **kwargs))
  threaded = list(pipeline.batches(source, num_workers=4, **kwargs))
  assert len(serial) == len(threaded) == 2
  for a, b in zip(serial, threaded):
    assert a['image'].shape == (2, 2, HI, HI, 3)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
  names = sum((b['name'].tolist() for b in pipeline.eval_batches(source, 3)), [])
  assert names == sorted(names) == [e['name'] for e in source]  # Stored in name order.


# --- Errors --------------------------------------------------------------------------------------------


def test_missing_manual_dir_names_path_and_download_page(tmp_path):
  with pytest.raises(DataError, match=r'no prepared dataset.*set config.data.manual_dir.*fc\.up\.pt'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', ''))
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match=f'{missing}.*does not exist.*fc\\.up\\.pt'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', missing))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match=r'PH2 Dataset images.*fc\.up\.pt'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', tmp_path / 'empty'))
  with pytest.raises(DataError, match=r'DRIVE.*STARE.*CHASE_DB1.*grand-challenge'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'retina', tmp_path / 'empty'))
  with pytest.raises(DataError, match=r'data_semantics.*cvlibs'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'kitti', tmp_path / 'empty'))


def skip_warnings(caplog):
  return [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]


def test_a_case_missing_its_mask_is_skipped_with_one_warning(tmp_path, caplog):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=4)
  next(manual.rglob('IMD003_lesion.bmp')).unlink()
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  with caplog.at_level('WARNING'):
    stats, examples = prepare_and_read(config)
  assert stats['train'] + stats['test'] == 3
  assert 'PH2/IMD003.bmp' not in {e['name'] for e in examples['train'] + examples['test']}
  warnings = skip_warnings(caplog)
  assert len(warnings) == 1, warnings  # Once, though prepare lists the cases twice.
  assert 'skipped 1 of 4' in warnings[0] and 'PH2/IMD003.bmp (no mask)' in warnings[0]
  # A STARE label without its image and a CHASE_DB1 image without its annotation: skipped too.
  caplog.clear()
  fixtures.write_stare(tmp_path / 'retina')
  fixtures.write_chase(tmp_path / 'retina')
  fixtures.save(Image.fromarray(fixtures.rgb(9)), tmp_path / 'retina' / 'CHASE_DB1' / 'Image_02R.JPG')
  (tmp_path / 'retina' / 'STARE' / 'stare-images' / 'im0002.ppm').unlink()
  with caplog.at_level('WARNING'):
    stats = data.prepare(fixtures.config(tmp_path / 'tfds', 'retina', tmp_path / 'retina'))
  assert stats['train'] + stats['test'] == 2
  (warning,) = skip_warnings(caplog)
  assert 'CHASE_DB1/Image_02R.JPG (no mask), STARE/im0002.ppm (no image)' in warning


def test_no_case_with_a_mask_is_an_error_naming_the_folder(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=3)
  for lesion in manual.rglob('*_lesion.bmp'):
    lesion.unlink()
  with pytest.raises(DataError, match=f'no case with both an image and a mask in {manual} '
                                      r'\(all 3 lack a file: PH2/IMD002.bmp \(no mask\)'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', manual))


def test_extensions_match_in_any_case(tmp_path):
  for name, write, count in (('ph2', fixtures.write_ph2, 6), ('kitti', fixtures.write_kitti, 3),
                             ('folder', fixtures.write_folder, 7)):
    write(tmp_path / name)
    manual = fixtures.upper_extensions(tmp_path / name)
    stats = data.prepare(fixtures.config(tmp_path / 'tfds', name, manual))
    assert stats['train'] + stats['test'] == count, name
  assert (tmp_path / 'ph2' / 'PH2Dataset' / 'PH2 Dataset images' / 'IMD002' / 'IMD002_lesion' /
          'IMD002_lesion.BMP').is_file()
  retina = tmp_path / 'retina'
  fixtures.write_drive(retina)
  fixtures.write_stare(retina)
  fixtures.write_chase(retina)
  fixtures.upper_extensions(retina)
  examples = data.load_split(fixtures.config(tmp_path / 'tfds', 'retina', retina), 'train')
  test = data.load_split(fixtures.config(tmp_path / 'tfds', 'retina', retina), 'test')
  assert sorted(e['name'] for e in list(examples) + list(test)) == [
      'CHASE_DB1/Image_01L.JPG', 'DRIVE/01_test.TIF', 'DRIVE/21_training.TIF', 'DRIVE/22_training.TIF',
      'STARE/im0001.PPM.GZ', 'STARE/im0002.PPM']
  for example in list(examples) + list(test):
    assert example['mask'].mean() == pytest.approx(fixtures.FG_PERCENT / 100, abs=0.01), example['name']


def test_an_unreadable_image_is_named_left_out_and_prepared_again_once_fixed(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=6)
  broken = next(manual.rglob('IMD006.bmp'))
  good = broken.read_bytes()
  broken.write_bytes(good[:200])  # Truncated.
  config = fixtures.config(tmp_path / 'tfds', 'ph2', manual)
  with pytest.raises(DataError, match=f'1 of 6 cases .*cannot read image {broken}'):
    data.prepare(config)
  left = data.prepare(config)  # The next command goes on with the 5 good cases.
  assert left['train'] + left['test'] == 5
  broken.write_bytes(good)  # Fixed: another source, prepared anew with all 6.
  again = data.prepare(config)
  assert again['train'] + again['test'] == 6 and again['path'] != left['path']
  assert not list((tmp_path / 'tfds').rglob('incomplete.*'))  # No temporary folder left.


def test_size_mismatch_names_both_files(tmp_path):
  manual = fixtures.write_ph2(tmp_path / 'raw', num_cases=3)
  lesion = next(manual.rglob('IMD003_lesion.bmp'))
  Image.fromarray(fixtures.binary(30, 48)).convert('1').save(lesion)
  with pytest.raises(DataError, match=r'mismatch.*IMD003\.bmp is 48x40.*IMD003_lesion\.bmp is 48x30'):
    data.prepare(fixtures.config(tmp_path / 'tfds', 'ph2', manual))


def test_folder_errors_and_unpaired_files(tmp_path, caplog):
  root = tmp_path / 'raw'
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  config = fixtures.config(tmp_path / 'tfds', 'folder', root)
  with pytest.raises(DataError, match=f'no images found in {root / "images"}'):
    data.prepare(config)
  for stem in 'abc':
    fixtures.save(Image.fromarray(fixtures.rgb(0)), root / 'images' / f'{stem}.png')
  with pytest.raises(DataError, match=f'no case with both an image and a mask in {root}'):
    data.prepare(config)
  for stem in 'acz':
    fixtures.save(Image.fromarray(fixtures.binary()), root / 'masks' / f'{stem}.png')
  with caplog.at_level('WARNING'):
    stats = data.prepare(config)  # a and c; b has no mask, z no image.
  assert stats['train'] + stats['test'] == 2
  (warning,) = skip_warnings(caplog)
  assert 'b.png (no mask), z.png (no image)' in warning
  with pytest.raises(DataError, match='elsewhere'):
    data.prepare(fixtures.config(tmp_path / 'tfds2', 'folder', tmp_path / 'elsewhere'))


def test_unknown_dataset_and_split():
  config = dataclasses.replace(fixtures.config('/tmp/unused', 'synthetic'), name='mnist')
  with pytest.raises(ValueError, match='unknown dataset'):
    data.make_builder(config)
  with pytest.raises(ValueError, match='split'):
    data.load_split(fixtures.config('/tmp/unused', 'synthetic'), 'validation')


# --- No TensorFlow -------------------------------------------------------------------------------------


def test_tensorflow_is_never_imported(tmp_path):
  """Prepare and read (synthetic and PH2) in a fresh interpreter: TensorFlow must stay out."""
  fixtures.write_ph2(tmp_path / 'raw', num_cases=3)
  script = textwrap.dedent(f"""
      import sys
      sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
      import fixtures
      from iterseg import data
      from iterseg.data import pipeline
      for name in ('synthetic', 'ph2'):
        config = fixtures.config({str(tmp_path / 'tfds')!r}, name, {str(tmp_path / 'raw')!r},
                                 num_examples=4)
        data.prepare(config)
        source = data.load_split(config, 'train')
        next(pipeline.batches(source, batch_size=2, seed=0, epoch=0, num_local_devices=1))
        next(pipeline.eval_batches(data.load_split(config, 'test'), 1))
      loaded = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))
      assert not loaded, loaded
      print('OK')
  """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env,
                          timeout=120)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]
