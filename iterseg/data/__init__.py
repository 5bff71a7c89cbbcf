"""Datasets (TFDS builders written without TensorFlow) and the input pipeline.

  prepare(spec)              generate the dataset `spec` (a plans.DataSpec) names once; counts and %Fg
                             (one run at a time: another preparing it too waits, see PREPARE_WAIT_S)
  load_split(spec, split)    random-access examples of 'train' or 'test' (prepares first if needed)
  pipeline.batches(...)      shuffled, sharded, prefetched [devices, batch, ...] numpy batches

Datasets (config.data.name): 'ph2', 'retina', 'kitti', 'folder' (read from config.data.manual_dir) and
'synthetic' (generated, the default). Each example:
  {'image': uint8 [hi, hi, 3], 'mask': uint8 [hi, hi] class ids (binary: {0, 1}),
   'original_size': int32 [2] (height, width before the resize),
   'name': str (source dataset / file name, e.g. 'DRIVE/21_training.tif'; folder: the file name)}

Prepared data lives in `<data_dir>/<dataset>/<config name>/<version>/` (see `builder.py`). The builder
modules (and tensorflow_datasets) are imported only when a dataset is built; TensorFlow never is.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import math
import os
from typing import Any

import numpy as np

from iterseg import lock
from iterseg.errors import DataError
from iterseg.plans import DATASETS

__all__ = ['DataError', 'prepare', 'load_split', 'make_builder']

SPLITS = ('train', 'test')
PREPARE_WAIT_S = 30 * 60  # How long a run waits for another that prepares the same dataset.


def make_builder(spec):
  """The TFDS builder of the dataset `spec` (a plans.DataSpec) names: `Builder` of the module
  iterseg.data.<name>, one per name of plans.DATASETS. Nothing is written.

  A dataset read from files is named by their fingerprint (see builder.py, "Identity"): with
  manual_dir, that of its files now; without, the one folder already prepared for these settings.
  """
  if spec.name not in DATASETS:
    raise DataError(f'unknown dataset config.data.name={spec.name!r}; choose one of {DATASETS}')
  cls = importlib.import_module(f'iterseg.data.{spec.name}').Builder
  kwargs = dict(data_dir=_expand(spec.data_dir), file_format='array_record',
                manual_dir=spec.manual_dir)
  config = cls.config_from(spec)
  if not cls.SOURCE_FILES:
    return cls(config=config, **kwargs)
  if spec.manual_dir:
    fingerprint = cls(config=config, **kwargs).source_fingerprint()
    name = f'{config.name}_src{fingerprint}'
  else:
    name = _the_prepared_one(cls, config, spec, cls(config=config, **kwargs).download_hint())
  return cls(config=dataclasses.replace(config, name=name), **kwargs)


def _the_prepared_one(cls, config, spec, hint: str) -> str:
  """The config name of the one dataset prepared for `config` in data_dir (any fingerprint)."""
  root = os.path.join(_expand(spec.data_dir), cls.name)
  found = sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(config.name) + '_src*', '*',
                                        'dataset_info.json')))
  names = sorted({os.path.basename(os.path.dirname(os.path.dirname(p))) for p in found})
  if len(names) == 1:
    return names[0]
  if not names:
    raise DataError(f'{cls.name}: no prepared dataset for these settings in {root} '
                    f'({config.name}_src*): set config.data.manual_dir to the raw files to prepare '
                    f'it ({hint}).')
  raise DataError(f'{cls.name}: {len(names)} datasets prepared from different files for these '
                  f'settings in {root} ({", ".join(names)}): set config.data.manual_dir to the raw '
                  f'files, which picks (or prepares) theirs.')


def prepare(spec) -> dict[str, Any]:
  """Prepares the dataset at spec.hi_size once (idempotent), with a progress bar per split.

  Returns {'dataset', 'train', 'test' (example counts), 'fg_percent' (mean over all examples of the % of
  foreground pixels: paper Table 1 column %Fg), 'path' (the prepared folder)}.
  """
  builder = make_builder(spec)
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
  return {
      'dataset': f'{builder.name}/{builder.builder_config.name}',
      **{split: builder.info.splits[split].num_examples for split in SPLITS},
      'fg_percent': round(float(builder.info.metadata['fg_percent']), 2),
      'path': str(builder.data_dir),
  }


def _say_if_the_source_changed(builder):
  """One line when other files were prepared before for the same settings: the new ones get their
  own folder (nothing is overwritten) and the change is not silent."""
  name = builder.builder_config.name
  if '_src' not in name:
    return
  base = name.rsplit('_src', 1)[0]
  root = os.path.dirname(os.path.dirname(builder.data_dir))
  others = sorted(d for d in glob.glob(os.path.join(glob.escape(root), glob.escape(base) + '_src*'))
                  if os.path.basename(d) != name)
  if others:
    print(f'iterseg: the raw files in {builder.manual_dir} differ from those prepared before for '
          f'these settings ({", ".join(others)}): a file was changed, added or removed, or they come '
          f'from another folder. Preparing them into {builder.data_dir}.')


def load_split(spec, split: str) -> 'Examples':
  """Random-access examples of `split` ('train' | 'test'): len(), [i]; prepares the dataset if needed.

  With several JAX processes (every process calls this), process 0 prepares while the others wait,
  so that processes sharing data_dir never write it at once; a process whose data_dir is not shared
  with process 0 (a local disk) then prepares its own copy.
  """
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
  for path in builder.info.splits[split].filepaths:
    if not os.path.isfile(path) or not os.path.getsize(path):
      raise DataError(f'the prepared dataset {folder} is incomplete: {path} is missing or empty. '
                      f'{_reprepare(folder, spec)}')
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except  # TFDS and array_record raise many types.
    raise DataError(f'the prepared dataset {folder} cannot be read ({_short(e)}). '
                    f'{_reprepare(folder, spec)}') from e
  return Examples(source, folder, _reprepare(folder, spec))


def holdout_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices [ceil(fraction * num_examples)], a seeded random subset of range(N): the share
  of the train split that --mode=calibrate measures on (and train.exclude_holdout leaves out)."""
  count = min(num_examples, math.ceil(round(fraction * num_examples, 9)))
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, size=count, replace=False)).astype(np.int64)


class Subset:
  """The examples of `source` at `indices`, in order (a sequence, as the data sources are)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[self.indices[index]]

  def __iter__(self):
    return (self.source[i] for i in self.indices)


def _reprepare(folder: str, spec) -> str:
  how = '' if spec.name == 'synthetic' else ' with config.data.manual_dir set to the raw files'
  return f'Delete that folder and run again{how}: it is prepared anew.'


def _short(error: Exception) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())[:160]}'


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
    raise error or DataError(f'process 0 could not prepare {spec.name} in '
                             f'{spec.data_dir}; its log says why.')


def is_prepared(builder) -> bool:
  """Whether the builder's data is complete: TFDS writes dataset_info.json last, in a temporary folder
  that it renames only when every split is written."""
  return os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))


class Examples:
  """A TFDS data source whose examples have 'name' as str (TFDS gives bytes). Sequence-like. A read
  that fails (a damaged file) is a DataError naming the prepared folder and how to recover."""

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
    return _fix(example)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f'Examples({self.source!r})'


def _fix(example: dict[str, Any]) -> dict[str, Any]:
  name = example['name']
  return dict(example, name=name.decode() if isinstance(name, bytes) else str(name))


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))

