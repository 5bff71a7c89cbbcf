"""The TFDS builder that every iterseg dataset shares (TensorFlow-free).

A dataset subclasses `SegmentationBuilder` and says only where its cases are (`list_cases`) and, when it is
not "non-zero = foreground", how its masks read (`read_mask`). This class does the rest, the same way for
every dataset:

  cases   `find_cases` keeps the listed cases that have both an image and a mask. A case missing its mask
          (or a mask whose image is missing) is SKIPPED, with one warning that lists the skipped cases; a
          dataset left with no case is a DataError naming manual_dir. A missing folder (no annotation
          folder at all) stays a DataError: that is a wrong layout, not a gap in the data.
  split   sorted case names -> `common.split_names` (np.random.default_rng(split_seed), 70/30 by default);
  resize  each image to hi_size x hi_size with a bilinear (area-like when shrinking) filter, each mask with
          nearest neighbour, keeping the original (height, width); at native resolution each keeps its
          own size and aspect, times data.scale (variable-size examples);
  write   `tfds.features.Tensor` features (uint8, zlib), `file_format='array_record'`, read back with
          `builder.as_data_source(split)`. TFDS writes into a temporary `incomplete.*` folder that is renamed
          only when every split is complete, and removed when generation fails, so a failed prepare never
          leaves a dataset that loads.

Identity. Whatever changes the stored arrays is in the builder config and hence in the folder name:
`<data_dir>/<dataset>/hi<hi_size>_seed<split_seed>_frac<train_fraction>[_<extra>]_src<fingerprint>/
<version>/`, e.g. `ph2/hi768_seed123_frac0.7_src3f9a1c07d2/1.0.0`. The fingerprint (`source_fingerprint`)
hashes the raw files a dataset reads, each by its path under manual_dir, size and modification time:
files from another folder, or a file changed, added or removed, give another folder, prepared anew
beside the old one; the same files moved elsewhere give the same folder. Without manual_dir (train
later on prepared data), the one folder prepared for these settings is used, and more than one is a
DataError asking for manual_dir. Generated datasets (synthetic) have no source files and no
fingerprint.
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


class _HideCustomConfigWarning(std_logging.Filter):
  """TFDS warns 'Using custom data configuration' for each config not listed in BUILDER_CONFIGS. Ours
  are all made from the iterseg config (see `config_from`), so the warning would only be noise."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


std_logging.getLogger('absl').addFilter(_HideCustomConfigWarning())


@dataclasses.dataclass(eq=False)
class SegmentationConfig(tfds.core.BuilderConfig):
  """What the stored examples depend on (besides the raw files). Its `name` encodes all of it."""

  hi_size: int = 768  # 0: native resolution (each image at its own size, times `scale`).
  split_seed: int = 123
  train_fraction: float = 0.7
  scale: float = 1.0


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: examples {'image': uint8 [hi, hi, 3], 'mask': uint8 [hi, hi], 'original_size': int32 [2]
  (height, width), 'name': str}, in splits 'train' and 'test'.

  Not registered in the TFDS registry (`skip_registration`): iterseg builds its builders explicitly (see
  `iterseg.data.make_builder`), and names like 'kitti' would clash with TFDS's own datasets.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIG_CLASS = SegmentationConfig
  HOMEPAGES: tuple[str, ...] = ()  # Official pages (the paper's footnotes), for docs and error messages.
  LAYOUT = ''  # The unpacked archive's layout under manual_dir, for error messages.
  SOURCE_FILES = True  # Read from manual_dir (a fingerprint of the files names the folder).
  DESCRIPTION = ''
  # TFDS looks for checksum files beside a builder's code; there are none (nothing is downloaded). Saying
  # so also skips TFDS 4.9.10's lookup of the `importlib_resources` backport, which current etils no
  # longer installs (ModuleNotFoundError in download_and_prepare for builders defined in a package).
  code_path = None

  def __init__(self, *, manual_dir: str | Path = '', **kwargs):
    """kwargs go to `tfds.core.GeneratorBasedBuilder` (config, data_dir, file_format, ...).

    manual_dir: the folder holding the unpacked official archive(s); only read while preparing.
    """
    self.manual_dir = Path(manual_dir).expanduser() if manual_dir else None
    super().__init__(**kwargs)
    self._original_state['manual_dir'] = manual_dir  # TFDS pickles a builder by re-calling __init__.

  @classmethod
  def config_from(cls, config) -> SegmentationConfig:
    """The builder config for an iterseg `plans.DataSpec`."""
    return cls.BUILDER_CONFIG_CLASS(**cls._config_fields(config), name=cls._config_name(config))

  @classmethod
  def _config_fields(cls, spec) -> dict[str, Any]:
    return dict(hi_size=spec.side, split_seed=spec.split_seed,
                train_fraction=spec.train_fraction, scale=1.0 if spec.side else spec.scale)

  @classmethod
  def _config_name(cls, spec) -> str:
    size = f'hi{spec.side}' if spec.side else f'native_x{spec.scale:g}'
    return f'{size}_seed{spec.split_seed}_frac{spec.train_fraction:g}'

  def _info(self) -> tfds.core.DatasetInfo:
    hi = self.builder_config.hi_size or None  # None: native, every example its own size.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        homepage=self.HOMEPAGES[0] if self.HOMEPAGES else None,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(hi, hi, 3), dtype=np.uint8, encoding='zlib'),
            'mask': tfds.features.Tensor(shape=(hi, hi), dtype=np.uint8, encoding='zlib'),
            'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
            'name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'mask'),
        # Store examples in generation order, i.e. sorted by name, not in TFDS's key-hash order: evaluation
        # then lists cases in a stable, readable order (training shuffles anyway).
        disable_shuffling=True,
        # Filled while generating: 'fg_percent' (mean over all examples of the % of foreground pixels,
        # the paper's Table 1 column %Fg) and 'manual_dir'.
        metadata=tfds.core.MetadataDict(),
    )

  # --- What a dataset defines -------------------------------------------------------------------------

  def list_cases(self) -> dict[str, Case]:
    """{name: Case} for every case in the raw data, incomplete ones too (a None image or mask)."""
    raise NotImplementedError

  def find_cases(self) -> dict[str, Any]:
    """{name: case} of the cases to store; `load_example(name, case)` decodes one.

    Files datasets: `list_cases` less the incomplete cases, which are skipped with one warning (see the
    module docstring); DataError naming manual_dir when none is left. Generated datasets override this.
    """
    cases, skipped = common.complete_cases(self.list_cases())
    if not cases:
      detail = f' (all {len(skipped)} lack a file: {self._describe(skipped)})' if skipped else ''
      raise DataError(f'{self.name}: no case with both an image and a mask in {self.manual_dir}{detail}')
    if skipped and skipped != getattr(self, '_warned_skipped', None):  # prepare() lists cases twice.
      self._warned_skipped = skipped
      logging.warning('%s: skipped %d of %d cases that lack an image or a mask in %s: %s', self.name,
                      len(skipped), len(skipped) + len(cases), self.manual_dir, self._describe(skipped))
    return cases

  @staticmethod
  def _describe(skipped: dict[str, str]) -> str:
    """'PH2/IMD003.bmp (no mask), ...' (the first 10, then 'and N more')."""
    return common.list_names(f'{name} ({why})' for name, why in sorted(skipped.items()))

  def read_mask(self, path: Path) -> np.ndarray:
    """uint8 [h, w] class ids of the mask file at `path` (default: any non-zero pixel is 1)."""
    return common.read_binary_mask(path)

  def load_example(self, name: str, case: Case) -> dict[str, Any]:
    """The stored example of one case (see the class docstring)."""
    return common.make_example(common.read_image(case.image), self.read_mask(case.mask), name=name,
                               size=self.builder_config.hi_size or None,
                               scale=self.builder_config.scale, image_path=case.image,
                               mask_path=case.mask)

  # --- Shared machinery -------------------------------------------------------------------------------

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
    if not cases:
      raise DataError(f'{self.name}: no cases found in {self.manual_dir}')
    splits = common.split_names(cases, seed=self.builder_config.split_seed,
                                train_fraction=self.builder_config.train_fraction)
    self.info.metadata['manual_dir'] = str(self.manual_dir or '')
    fg_percents = []  # Shared by both splits: the metadata ends as the mean over all examples.
    return {split: self._generate_examples({n: cases[n] for n in names}, split, fg_percents)
            for split, names in splits.items()}

  def _generate_examples(self, cases: dict[str, Any], split: str, fg_percents: list[float]):
    for name, case in tqdm.tqdm(cases.items(), desc=f'{self.name} {split}', unit='image'):
      example = self.load_example(name, case)
      fg_percents.append(100.0 * float(np.mean(example['mask'] > 0)))
      self.info.metadata['fg_percent'] = float(np.mean(fg_percents))
      yield name, example

  def source_fingerprint(self) -> str:
    """10 hex digits of a hash over every raw file the dataset reads (complete and incomplete cases):
    its path relative to manual_dir, its size and its modification time (ns)."""
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
