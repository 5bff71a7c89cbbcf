"""Datasets (TFDS builders written without TensorFlow) and the input pipeline.

  prepare(spec)              generate the dataset `spec` (a settings.DataSpec) names once; counts and %Fg
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

import importlib
import os
from typing import Any

import numpy as np

from iterseg.errors import DataError
from iterseg.settings import DATASETS

__all__ = ['DataError', 'prepare', 'load_split', 'make_builder']

SPLITS = ('train', 'test')


def make_builder(spec):
  """The TFDS builder of the dataset `spec` (a settings.DataSpec) names: `Builder` of the module
  iterseg.data.<name>, one per name of settings.DATASETS. Nothing is read or written."""
  if spec.name not in DATASETS:
    raise DataError(f'unknown dataset config.data.name={spec.name!r}; choose one of {DATASETS}')
  cls = importlib.import_module(f'iterseg.data.{spec.name}').Builder
  return cls(config=cls.config_from(spec), data_dir=_expand(spec.data_dir),
             file_format='array_record', manual_dir=spec.manual_dir)


def prepare(spec) -> dict[str, Any]:
  """Prepares the dataset at spec.hi_size once (idempotent), with a progress bar per split.

  Returns {'dataset', 'train', 'test' (example counts), 'fg_percent' (mean over all examples of the % of
  foreground pixels: paper Table 1 column %Fg), 'path' (the prepared folder)}.
  """
  builder = make_builder(spec)
  if is_prepared(builder):
    builder.check_source()
  else:
    builder.find_cases()  # Fail on missing or misplaced files before TFDS announces anything.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()  # The builder shows one bar per split, which says more than TFDS's.
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
  return Examples(builder.as_data_source(split))


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
  """A TFDS data source whose examples have 'name' as str (TFDS gives bytes). Sequence-like."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} examples')
    return _fix(self.source[int(index) % len(self)])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f'Examples({self.source!r})'


def _fix(example: dict[str, Any]) -> dict[str, Any]:
  name = example['name']
  return dict(example, name=name.decode() if isinstance(name, bytes) else str(name))


def _expand(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))

