"""Integration: the builders on the real sample files in ../shared/data/samples (skipped when absent)."""

from pathlib import Path

import numpy as np
import pytest

import fixtures
from iterseg import data
from iterseg.data import pipeline

SAMPLES = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'samples'
HI = 64

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f'no real data samples at {SAMPLES}')


def prepare_all(tmp_path, name, **data_fields):
  config = fixtures.config(tmp_path / 'tfds', name, SAMPLES, hi_size=HI, **data_fields)
  stats = data.prepare(config)
  examples = [e for split in ('train', 'test') for e in data.load_split(config, split)]
  for example in examples:
    assert example['image'].shape == (HI, HI, 3) and example['mask'].shape == (HI, HI)
    assert set(np.unique(example['mask'])) <= {0, 1}
  return stats, {e['name']: e for e in examples}


def test_ph2_samples(tmp_path):
  stats, examples = prepare_all(tmp_path, 'ph2')
  assert (stats['train'], stats['test']) == (2, 1)
  assert sorted(examples) == ['PH2/IMD003.bmp', 'PH2/IMD004.bmp', 'PH2/IMD006.bmp']
  assert tuple(examples['PH2/IMD003.bmp']['original_size']) == (574, 765)
  assert 5 < stats['fg_percent'] < 60  # Lesions: a sizeable blob (paper: 31.4 % over all 200).


def test_retina_samples_drive_and_stare(tmp_path):
  stats, examples = prepare_all(tmp_path, 'retina')
  assert sorted(examples) == ['DRIVE/21_training.tif', 'DRIVE/22_training.tif', 'STARE/im0002.ppm.gz',
                              'STARE/im0003.ppm.gz']
  assert (stats['train'], stats['test']) == (3, 1)
  assert tuple(examples['DRIVE/21_training.tif']['original_size']) == (584, 565)
  assert tuple(examples['STARE/im0002.ppm.gz']['original_size']) == (605, 700)
  assert 2 < stats['fg_percent'] < 20  # Thin vessels (paper: 7.3 %).


def test_kitti_samples(tmp_path):
  stats, examples = prepare_all(tmp_path, 'kitti')
  assert sorted(examples) == ['KITTI/000000_10.png', 'KITTI/000001_10.png']
  assert tuple(examples['KITTI/000000_10.png']['original_size']) == (370, 1224)
  assert 0.5 < stats['fg_percent'] < 30  # Vehicles (paper: 6.6 %).


def test_samples_feed_the_pipeline(tmp_path):
  config = fixtures.config(tmp_path / 'tfds', 'retina', SAMPLES, hi_size=HI)
  source = data.load_split(config, 'train')
  batch = next(pipeline.batches(source, batch_size=2, seed=0, epoch=0, num_local_devices=2,
                                process_count=1, process_index=0))
  assert batch['image'].shape == (2, 1, HI, HI, 3) and batch['mask'].shape == (2, 1, HI, HI)
  names = [b['name'].tolist() for b in pipeline.eval_batches(data.load_split(config, 'test'), 4)]
  assert len(sum(names, [])) == 1


@pytest.mark.parametrize('name, sizes', [
    ('kitti', {'KITTI/000000_10.png': (370, 1224), 'KITTI/000001_10.png': (370, 1224)}),
    ('ph2', {'PH2/IMD003.bmp': (574, 765), 'PH2/IMD004.bmp': (574, 765),
             'PH2/IMD006.bmp': (574, 765)}),
])
def test_samples_at_native_resolution_keep_their_size_and_aspect(tmp_path, name, sizes):
  from iterseg import settings  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny  # pylint: disable=g-import-not-at-top
  config = tiny(**{'resolution': 'native', 'hi_size': 64, 'stage1_size': 8, 'num_patches': 2,
                   'train.num_patches_list': (2,), 'native.bucket': 8, 'data.name': name,
                   'data.manual_dir': str(SAMPLES), 'data.data_dir': str(tmp_path / 'tfds')})
  spec = settings.from_config(config).data
  data.prepare(spec)
  examples = {e['name']: e for split in ('train', 'test') for e in data.load_split(spec, split)}
  assert {n: e['mask'].shape for n, e in examples.items()} == sizes  # Not squashed.
  for e in examples.values():
    assert e['image'].shape[:2] == e['mask'].shape == tuple(e['original_size'])
