"""The TFDS builder that every iterseg dataset shares (TensorFlow-free).

A dataset subclasses `SegmentationBuilder` and says where its cases are (`list_cases`) and, unless
"non-zero = foreground", how its masks read (`read_mask`). The rest is shared: `find_cases` skips
the cases that lack an image or a mask, with one warning (none left, or a missing folder, is a
DataError naming manual_dir); `common.split_names` splits; `common.make_example` resizes; TFDS
writes zlib `tfds.features.Tensor`s in array_record files (read back with `as_data_source(split)`)
into an `incomplete.*` folder renamed when complete: a failed prepare leaves no dataset that loads.

Identity. Whatever changes the stored arrays is in the builder config, hence in the folder name:
`<data_dir>/<dataset>/hi<hi_size>_seed<split_seed>_frac<train_fraction>[_<extra>]_src<fingerprint>/
<version>/`, e.g. `ph2/hi768_seed123_frac0.7_src3f9a1c07d2/1.0.0`. The fingerprint
(`source_fingerprint`) hashes each raw file's path under manual_dir, size and modification time:
other files, or a file changed, added or removed, are prepared anew beside the old folder; moved
files keep theirs. Without manual_dir, the one folder prepared for these settings is used (several:
a DataError asking for manual_dir). Generated datasets (synthetic) have no fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging as std_logging
import os
from pathlib import Path
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tqdm import auto as tqdm

from iterseg.data import common
from iterseg.data.common import Case, DataError


def _hide_custom_config_warning(record: std_logging.LogRecord) -> bool:
  """Drops TFDS's 'Using custom data configuration' warning: all our configs are (`config_from`)."""
  return not str(record.msg).startswith('Using custom data configuration')


std_logging.getLogger('absl').addFilter(_hide_custom_config_warning)


@dataclasses.dataclass(eq=False)
class SegmentationConfig(tfds.core.BuilderConfig):
  """What the stored examples depend on (besides the raw files). Its `name` encodes all of it."""

  hi_size: int = 768  # 0: native resolution (each image at its own size, times `scale`).
  split_seed: int = 123
  train_fraction: float = 0.7
  scale: float = 1.0


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: examples {'image': uint8 [hi, hi, 3], 'mask': uint8 [hi, hi], 'original_size':
  int32 [2] (height, width), 'name': str}, in splits 'train' and 'test'. Not in the TFDS registry
  (`make_builder` builds it; names like 'kitti' would clash with TFDS's own datasets)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIG_CLASS = SegmentationConfig
  HOMEPAGES: tuple[str, ...] = ()  # Official pages (the paper's footnotes), for error messages.
  LAYOUT = ''  # The unpacked archive's layout under manual_dir, for error messages.
  SOURCE_FILES = True  # Read from manual_dir (a fingerprint of the files names the folder).
  DESCRIPTION = ''
  # No checksum files beside the code (nothing is downloaded); saying so also skips TFDS 4.9.10's
  # import of the `importlib_resources` backport, which etils no longer installs.
  code_path = None

  def __init__(self, *, manual_dir: str | Path = '', **kwargs):
    """manual_dir: the unpacked official archive(s), read while preparing; kwargs go to TFDS."""
    self.manual_dir = Path(manual_dir).expanduser() if manual_dir else None
    super().__init__(**kwargs)
    self._original_state['manual_dir'] = manual_dir  # TFDS pickles it by re-calling __init__.

  @classmethod
  def config_from(cls, spec) -> SegmentationConfig:
    """The builder config for an iterseg `plans.DataSpec`, named by all it holds."""
    extra, suffix = cls.extra_config(spec)
    size = f'hi{spec.side}' if spec.side else f'native_x{spec.scale:g}'
    return cls.BUILDER_CONFIG_CLASS(
        name=f'{size}_seed{spec.split_seed}_frac{spec.train_fraction:g}{suffix}',
        hi_size=spec.side, split_seed=spec.split_seed, train_fraction=spec.train_fraction,
        scale=1.0 if spec.side else spec.scale, **extra)

  @classmethod
  def extra_config(cls, spec) -> tuple[dict[str, Any], str]:
    """A dataset's own config fields from `spec`, and the suffix they add to the config name."""
    return {}, ''

  def _info(self) -> tfds.core.DatasetInfo:
    hi = self.builder_config.hi_size or None  # None: native, every example its own size.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=next(iter(self.HOMEPAGES), None),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(hi, hi, 3), dtype=np.uint8, encoding='zlib'),
            'mask': tfds.features.Tensor(shape=(hi, hi), dtype=np.uint8, encoding='zlib'),
            'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
            'name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'mask'),
        disable_shuffling=True,  # Stored sorted by name: evaluation lists cases in a stable order.
        metadata=tfds.core.MetadataDict(),  # Filled in: 'fg_percent' (mean %Fg) and 'manual_dir'.
    )

  # --- What a dataset defines ---------------------------------------------------------------------

  def list_cases(self) -> dict[str, Case]:
    """{name: Case} for every case in the raw data, incomplete ones too (a None image or mask)."""
    raise NotImplementedError

  def find_cases(self) -> dict[str, Any]:
    """{name: case} to store, for `load_example(name, case)`: `list_cases` less the incomplete
    cases, skipped with one warning (none left: DataError). Generated datasets override it."""
    listed = self.list_cases()
    skipped = {name: 'no mask' if case.mask is None else 'no image'
               for name, case in listed.items() if case.mask is None or case.image is None}
    cases = {name: case for name, case in listed.items() if name not in skipped}
    detail = common.list_names(f'{name} ({why})' for name, why in sorted(skipped.items()))
    if not cases:
      raise DataError(f'{self.name}: no case with both an image and a mask in {self.manual_dir}'
                      + (f' (all {len(skipped)} lack a file: {detail})' if skipped else ''))
    if skipped and skipped != getattr(self, '_warned_skipped', None):  # prepare() lists twice.
      self._warned_skipped = skipped
      logging.warning('%s: skipped %d of %d cases that lack an image or a mask in %s: %s',
                      self.name, len(skipped), len(listed), self.manual_dir, detail)
    return cases

  def read_mask(self, path: Path) -> np.ndarray:
    """uint8 [h, w] class ids of the mask file at `path` (default: `common.binary_mask`, its
    ambiguous pixels counted in the metadata's 'ambiguous_mask_pixels')."""
    mask, ambiguous = common.binary_mask(path)
    metadata = self.info.metadata
    metadata['ambiguous_mask_pixels'] = metadata.get('ambiguous_mask_pixels', 0) + ambiguous
    return mask

  def load_example(self, name: str, case: Case) -> dict[str, Any]:
    """The stored example of one case, resized to hi_size x hi_size (bilinear, area-like when
    shrinking; masks nearest neighbour) or, at native resolution, times data.scale."""
    return common.make_example(common.read_image(case.image), self.read_mask(case.mask), name=name,
                               size=self.builder_config.hi_size or None,
                               scale=self.builder_config.scale, image_path=case.image,
                               mask_path=case.mask)

  # --- Shared machinery ---------------------------------------------------------------------------

  def download_hint(self) -> str:
    return f'download it from {" or ".join(self.HOMEPAGES)}' if self.HOMEPAGES else ''

  def manual_root(self) -> Path:
    """The manual_dir, checked to exist (DataError naming what is expected and where to get it)."""
    expected = f'the folder holding {self.LAYOUT}' if self.LAYOUT else 'the unpacked archive'
    if self.manual_dir is None:
      raise DataError(f'{self.name}: config.data.manual_dir is not set; set it to {expected} '
                      f'({self.download_hint()})')
    if not self.manual_dir.is_dir():
      raise DataError(f'{self.name}: manual_dir {self.manual_dir} does not exist; it should be '
                      f'{expected} ({self.download_hint()})')
    return self.manual_dir

  def missing(self, path: Path, what: str) -> DataError:
    """The error for an expected file or folder that is not there."""
    return DataError(f'{self.name}: missing {what}: expected {path} ({self.download_hint()})')

  def _split_generators(self, dl_manager):
    del dl_manager  # The raw files are read from self.manual_dir; nothing is downloaded.
    cases = self.find_cases()
    splits = common.split_names(cases, seed=self.builder_config.split_seed,
                                train_fraction=self.builder_config.train_fraction)
    self.info.metadata['manual_dir'] = str(self.manual_dir or '')
    fg_percents = []  # Shared by both splits: the metadata ends as the mean over all examples.
    return {split: self._generate_examples({n: cases[n] for n in names}, split, fg_percents)
            for split, names in splits.items()}

  def _generate_examples(self, cases: dict[str, Any], split: str, fg_percents: list[float]):
    """The examples of one split; a case that cannot be read (a damaged file, a mask of another
    size) is left out, its reason in the metadata's 'bad_cases' ({name: reason})."""
    for name, case in tqdm.tqdm(cases.items(), desc=f'{self.name} {split}', unit='image'):
      try:
        example = self.load_example(name, case)
      except DataError as e:
        bad = {**self.info.metadata.get('bad_cases', {}), name: ' '.join(str(e).split())}
        self.info.metadata['bad_cases'] = bad
        if all(n in bad for n in cases):
          raise DataError(f'no case of the {split} split can be read, e.g. {e}') from e
        continue
      fg_percents.append(100.0 * float(np.mean(example['mask'] > 0)))
      self.info.metadata['fg_percent'] = float(np.mean(fg_percents))
      yield name, example

  def source_fingerprint(self) -> str:
    """10 hex digits of a hash over every raw file the dataset reads (of complete and incomplete
    cases): its path relative to manual_dir, its size and its modification time (ns)."""
    root = self.manual_root()
    digest = hashlib.sha256()
    for name, case in sorted(self.list_cases().items()):
      for path in (case.image, case.mask):
        if path is None:
          digest.update(f'{name}\0-\n'.encode())
          continue
        info = os.stat(path)
        digest.update(f'{name}\0{os.path.relpath(path, root)}\0{info.st_size}\0'
                      f'{info.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:10]
