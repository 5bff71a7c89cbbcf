"""Datasets (TFDS builders written without TensorFlow) and the input pipeline.

  prepare(spec)            prepare the dataset `spec` (a plans.DataSpec) names, once (a run that
                           prepares it too waits, see PREPARE_WAIT_S); its counts and %Fg
  load_split(spec, split)  random-access examples of 'train' or 'test' (prepared first if needed)
  pipeline.batches(...)    shuffled, sharded, prefetched [devices, batch, ...] numpy batches

Datasets (config.data.name): 'ph2', 'retina', 'kitti', 'folder' (read from config.data.manual_dir)
and 'synthetic' (generated, the default). Each example: {'image': uint8 [hi, hi, 3], 'mask': uint8
[hi, hi] class ids (binary: {0, 1}), 'original_size': int32 [2] (height, width before the resize),
'name': str (e.g. 'DRIVE/21_training.tif'; folder: the file name)}. Prepared data lives in
`<data_dir>/<dataset>/<config name>/<version>/` (`builder.py`); the builder modules (and
tensorflow_datasets) are imported only when a dataset is built, TensorFlow never.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import glob
import importlib
import math
import os
from typing import Any

import numpy as np

from iterseg import files, lock
from iterseg.errors import DataError
from iterseg.plans import DATASETS

__all__ = ['DataError', 'prepare', 'load_split', 'make_builder']

SPLITS = ('train', 'test')
PREPARE_WAIT_S = 30 * 60  # How long a run waits for another that prepares the same dataset.


def make_builder(spec):
  """The TFDS builder of the dataset `spec` (a plans.DataSpec) names; writes nothing. A dataset of
  files is named by the fingerprint of manual_dir's files, else by the one prepared (builder.py)."""
  if spec.name not in DATASETS:
    raise DataError(f'unknown dataset config.data.name={spec.name!r}; choose one of {DATASETS}')
  cls = importlib.import_module(f'iterseg.data.{spec.name}').Builder
  kwargs = dict(data_dir=_expand(spec.data_dir), file_format='array_record',
                manual_dir=spec.manual_dir)
  config = cls.config_from(spec)
  builder = _opened(cls, config, kwargs, spec)
  if not cls.SOURCE_FILES:
    return builder
  name = (f'{config.name}_src{builder.source_fingerprint()}' if spec.manual_dir
          else _the_prepared_one(builder))
  return _opened(cls, dataclasses.replace(config, name=name), kwargs, spec)


_COUNT = (files.COUNT, files.Rule(lambda v: isinstance(v, str) and v.isdecimal(), 'digits'))
_INFO_SCHEMA = {'splits': [{'name': str, 'shardLengths': [_COUNT]}]}  # TFDS's JSON of a proto.
_METADATA_SCHEMA = {'fg_percent': files.number(0, 100),
                    'ambiguous_mask_pixels': (files.COUNT, *files.MAYBE),
                    'bad_cases': ({}, *files.MAYBE)}  # {name: reason}


def _opened(cls, config, kwargs: dict, spec):
  """cls(config=config, **kwargs), its prepared dataset's dataset_info.json and metadata.json (TFDS
  reads them as the builder starts) checked first: DataError naming the file, the field and how
  to recover."""
  folder = os.path.join(kwargs['data_dir'], cls.name, config.name, str(cls.VERSION))
  if os.path.isfile(os.path.join(folder, 'dataset_info.json')):  # Prepared (TFDS writes it last).
    fix = _recover(spec, folder)
    info = files.read_json(os.path.join(folder, 'dataset_info.json'), fix, DataError, _INFO_SCHEMA)
    missing = sorted(set(SPLITS) - {split['name'] for split in info['splits']})
    if missing:
      raise DataError(f'{folder}/dataset_info.json cannot be read (no split {missing[0]!r}): '
                      f'{fix}.')
    files.read_json(os.path.join(folder, 'metadata.json'), fix, DataError, _METADATA_SCHEMA)
  return cls(config=config, **kwargs)


def _recover(spec, folder: str) -> str:
  how = '' if spec.name == 'synthetic' else ' with config.data.manual_dir set to the raw files'
  return f'delete {folder} and run again{how}: it is prepared anew'


def _sources(root: str, name: str) -> list[str]:
  """The folders `<root>/<name>_src*`: the same settings prepared from different files, sorted."""
  return sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(name) + '_src*')))


def _the_prepared_one(builder) -> str:
  """The config name of the one dataset prepared for the builder's settings (any fingerprint)."""
  root, name = os.path.join(builder.data_dir_root, builder.name), builder.builder_config.name
  names = [os.path.basename(folder) for folder in _sources(root, name)
           if glob.glob(os.path.join(glob.escape(folder), '*', 'dataset_info.json'))]
  if len(names) == 1:
    return names[0]
  if not names:
    raise DataError(f'{builder.name}: no prepared dataset for these settings in {root} '
                    f'({name}_src*): set config.data.manual_dir to the raw files to prepare it '
                    f'({builder.download_hint()}).')
  raise DataError(f'{builder.name}: {len(names)} datasets prepared from different files for these '
                  f'settings in {root} ({", ".join(names)}): set config.data.manual_dir to the raw '
                  f'files, which picks (or prepares) theirs.')


def prepare(spec) -> dict[str, Any]:
  """Prepares the dataset once (idempotent; a progress bar per split): {'dataset', 'train', 'test'
  (example counts), 'fg_percent' (mean % of foreground pixels: Table 1's %Fg),
  'ambiguous_mask_pixels' (mask pixels far from both 0 and the top, e.g. JPEG's), 'path'}."""
  builder = make_builder(spec)
  if not is_prepared(builder) and os.path.isdir(builder.data_dir):  # TFDS renames it in when done.
    raise DataError(f'the prepared dataset {builder.data_dir} is incomplete: its dataset_info.json '
                    f'is missing. Delete that folder and run again: it is prepared anew.')
  if not is_prepared(builder):
    builder.find_cases()  # Fail on missing or misplaced files before TFDS announces anything.
    # The lock sits beside the dataset's folder (<data_dir>/<dataset>/<config name>/.iterseg.lock).
    with lock.DataLock(os.path.dirname(builder.data_dir), wait_s=PREPARE_WAIT_S):
      if is_prepared(builder):  # By the run this one waited for.
        builder = make_builder(spec)
      else:
        _say_if_the_source_changed(builder)
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        tfds.disable_progress_bar()  # The builder shows one bar per split: more than TFDS's.
        try:
          builder.download_and_prepare()
        finally:
          tfds.enable_progress_bar()
        _refuse_bad_cases(builder)
  info = builder.info
  return {'dataset': f'{builder.name}/{builder.builder_config.name}',
          **{split: info.splits[split].num_examples for split in SPLITS},
          'fg_percent': round(float(info.metadata['fg_percent']), 2),
          'ambiguous_mask_pixels': int(info.metadata.get('ambiguous_mask_pixels', 0)),
          'path': str(builder.data_dir)}


def _refuse_bad_cases(builder):
  """After a prepare that left cases out: each named with its reason, then a DataError (the exit
  status says so), the dataset kept, prepared from the good cases."""
  bad = dict(builder.info.metadata.get('bad_cases', {}))
  if bad:
    for name, reason in bad.items():
      print(f'  left out {name}: {reason}')
    total = sum(builder.info.splits[split].num_examples for split in SPLITS) + len(bad)
    raise DataError(f'{len(bad)} of {total} cases could not be read and were left out (listed '
                    f'above), e.g. {next(iter(bad))}: {next(iter(bad.values()))}; the dataset in '
                    f'{builder.data_dir} holds the other {total - len(bad)}. Fix or remove those '
                    f'files and run again (changed files are prepared anew), or go on: the next '
                    f'command uses the dataset as it is.')


def _say_if_the_source_changed(builder):
  """One line when other files were prepared for these settings before: the change is not silent."""
  name = builder.builder_config.name
  if '_src' not in name:
    return
  root = os.path.join(builder.data_dir_root, builder.name)
  others = [f for f in _sources(root, name.rsplit('_src', 1)[0]) if os.path.basename(f) != name]
  if others:
    print(f'iterseg: the raw files in {builder.manual_dir} differ from those prepared before for '
          f'these settings ({", ".join(others)}): a file was changed, added or removed, or they '
          f'come from another folder. Preparing them into {builder.data_dir}.')


def is_prepared(builder) -> bool:
  """Whether the builder's data is complete (TFDS writes dataset_info.json last)."""
  return os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))


def load_split(spec, split: str) -> Examples:
  """Random-access examples of `split` ('train' | 'test'): len(), [i]; prepares them if needed.
  With several JAX processes (each calls this), process 0 prepares while the others wait, so that
  no two write a shared data_dir at once; one whose data_dir is not shared then prepares its own."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    _prepare_on_process_0(spec)
  builder = make_builder(spec)
  if not is_prepared(builder):
    prepare(spec)
    builder = make_builder(spec)
  folder = str(builder.data_dir)
  recover = _recover(spec, 'that folder').capitalize() + '.'
  for path in builder.info.splits[split].filepaths:
    if not os.path.isfile(path) or not os.path.getsize(path):
      raise DataError(f'the prepared dataset {folder} is incomplete: {path} is missing or empty. '
                      f'{recover}')
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except  # TFDS and array_record raise many types.
    raise DataError(f'the prepared dataset {folder} cannot be read ({_short(e)}). {recover}') from e
  return Examples(source, folder, recover)


def _prepare_on_process_0(spec):
  """Process 0 prepares while the other processes wait for it, and its error stops them all."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = None
  if jax.process_index() == 0:
    try:
      if not is_prepared(make_builder(spec)):
        prepare(spec)
    except Exception as e:  # pylint: disable=broad-except  # Raised once the others know.
      error = e
  if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
    raise error or DataError(f'process 0 could not prepare {spec.name} in {spec.data_dir}; its '
                             f'log says why.')


class Examples(collections.abc.Sequence):
  """A TFDS data source whose examples have 'name' as str (TFDS gives bytes). A read that fails (a
  damaged file) is a DataError naming the prepared folder and how to recover."""

  def __init__(self, source, folder: str = '', recover: str = ''):
    self.source, self.folder, self.recover = source, folder, recover

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} examples')
    try:
      example = self.source[int(index) % len(self)]
    except Exception as e:  # pylint: disable=broad-except  # array_record, zlib, TFDS decoding.
      raise DataError(f'example {index} of the prepared dataset {self.folder} cannot be read '
                      f'({_short(e)}). {self.recover}') from e
    name = example['name']
    return dict(example, name=name.decode() if isinstance(name, bytes) else str(name))

  def __repr__(self) -> str:
    return f'Examples({self.source!r})'


def holdout_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices [ceil(fraction * num_examples)], a seeded random subset of range(N): the share
  of the train split that --mode=calibrate measures on (and train.exclude_holdout leaves out)."""
  count = min(num_examples, math.ceil(round(fraction * num_examples, 9)))
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, size=count, replace=False)).astype(np.int64)


class Subset(collections.abc.Sequence):
  """The examples of `source` at `indices`, in order (a sequence, as the data sources are)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[self.indices[index]]


def _short(error: Exception) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())[:160]}'


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))
