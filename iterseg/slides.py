"""Where native inference reads pixels from and writes them to, in bounded memory.

A source gives an image's size, its block-mean thumbnail and any region of it:
  `ArraySource`     an image in RAM (uint8 [H, W, 3]);
  `FileSource`      a file read a segment (tile, strip or chunk) at a time: only the segments under a
                    region are decoded (an LRU cache keeps the recent ones, `decoded` counts them),
                    and the thumbnail comes from the pyramid level whose downsample divides the
                    factor (block means of it; never a coarser level), else from one streaming pass
                    of bands. `open_source` picks one of:
    `TiffSource`      a TIFF, BigTIFF, OME-TIFF or SVS (tiled or in strips) through tifffile;
    `ZarrSource`      a Zarr array or OME-Zarr image (v2 or v3) through zarr;
    `OpenSlideSource` the other whole-slide formats (.ndpi, .mrxs, .scn, ...) through OpenSlide.
A sink takes the output in bands of rows, top to bottom:
  `MemorySink`   the probabilities [H, W, C] in RAM, written in place as one band (`rows` None);
  `SlideSink`    a mask (and optionally uint8 probabilities) written as a tiled, compressed
                 pyramidal OME-TIFF, or OME-Zarr: each finished band's tiles are encoded and saved
                 under `<output>.partial/` (so a killed job resumes from the bands already there),
                 and the output is assembled from them at the end, the input's pixel size carried
                 over.
`write_pyramid` writes any image given in bands as such a file (the synthetic slides of the
benchmark are written with it, never held in RAM).
"""

import collections
from concurrent import futures
import itertools
import json
import math
import os
from pathlib import Path
import shutil
import threading
from typing import Iterator, Optional
import zlib

import numpy as np

from iterseg import files
from iterseg.errors import DataError

TIFF_SUFFIXES = ('.tif', '.tiff', '.btf', '.tf8', '.svs')  # Read with tifffile.
OPENSLIDE_SUFFIXES = ('.ndpi', '.mrxs', '.scn', '.vms', '.vmu', '.svslide', '.bif', '.czi')
UNITS = {'µm': 'micrometer', 'nm': 'nanometer', 'mm': 'millimeter', 'cm': 'centimeter',
         'm': 'meter'}  # The pixel size's units: OME-TIFF's symbols, NGFF's names.
SYMBOLS = {name: symbol for symbol, name in UNITS.items()}
TILE = 512  # Side of the tiles iterseg writes.
SEGMENT_BYTES = 2 ** 28  # The largest file tile or strip read (as RGB): 256 MB.


def thumbnail(image: np.ndarray, factor: int) -> np.ndarray:
  """float32 [ceil(H/f), ceil(W/f), 3] in [0, 1]: the mean of each f x f block of the uint8 image
  (of the pixels there are, in the last row and column of blocks), as training downscales its crops.
  Integer sums of contiguous rows, then strided adds of columns, in bands of 64 block rows on every
  core (numpy releases the GIL): 2.5x faster than Pillow's reduce and 15x faster than a float mean
  over reshaped blocks on one core, with a band's worth of memory per core."""
  h, w = image.shape[:2]
  out = np.empty((-(-h // factor), -(-w // factor), 3), np.float32)
  starts = range(0, h, 64 * factor)
  workers = min(len(starts), os.cpu_count() or 1)
  if workers > 1:
    with futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(lambda y0: _block_means(image, factor, y0, out), starts))
  else:
    for y0 in starts:
      _block_means(image, factor, y0, out)
  return out


def _block_means(image: np.ndarray, factor: int, y0: int, out: np.ndarray) -> None:
  """out[y0 / f : y0 / f + 64] <- the block means of image rows y0 .. y0 + 64 f (see thumbnail)."""
  w = image.shape[1]
  whole = w // factor * factor
  band = image[y0:y0 + 64 * factor]
  full = band.shape[0] // factor * factor
  rows_dtype = np.uint16 if factor <= 257 else np.uint32  # f rows of uint8 fit in 16 bits.
  parts = [(band[:full].reshape(-1, factor, w, 3).sum(1, dtype=rows_dtype), factor)] if full else []
  if band.shape[0] > full:  # The last, partial row of blocks.
    parts.append((band[full:].sum(0, dtype=rows_dtype)[None], band.shape[0] - full))
  row = y0 // factor
  for sums, rows in parts:
    n = len(sums)
    if whole:
      acc = sums[:, 0:whole:factor].astype(np.uint32)
      for k in range(1, factor):  # Strided adds: 3x faster than a reshaped sum.
        acc += sums[:, k:whole:factor]
      out[row:row + n, :w // factor] = acc * np.float32(1 / (rows * factor))
    if w > whole:
      out[row:row + n, -1] = sums[:, whole:].sum(1, dtype=np.uint32) * np.float32(
          1 / (rows * (w - whole)))
    out[row:row + n] *= np.float32(1 / 255)
    row += n


def _cut(read, height: int, width: int, y: int, x: int, side: int):
  """(uint8 [side, side, 3], bool [side, side]): the region at (y, x), zeros outside the image;
  read(y0, y1, x0, x1) gives the part inside."""
  tile = np.zeros((side, side, 3), np.uint8)
  valid = np.zeros((side, side), bool)
  y0, y1, x0, x1 = max(y, 0), min(y + side, height), max(x, 0), min(x + side, width)
  if y0 < y1 and x0 < x1:
    tile[y0 - y:y1 - y, x0 - x:x1 - x] = read(y0, y1, x0, x1)
    valid[y0 - y:y1 - y, x0 - x:x1 - x] = True
  return tile, valid


class ArraySource:
  """An image in RAM, uint8 [H, W, 3]."""

  def __init__(self, image: np.ndarray):
    self.image, (self.height, self.width) = image, image.shape[:2]
    self.resolution = None

  @property
  def decoded(self) -> int:
    return self.height * self.width

  def thumbnail(self, factor: int, rows=None) -> np.ndarray:
    """`thumbnail` of the image, or of its thumbnail rows (a, b)."""
    a, b = rows or (0, None)
    return thumbnail(self.image[a * factor:None if b is None else b * factor], factor)

  def prefetch(self, boxes) -> None:
    del boxes  # In RAM already.

  def region(self, y: int, x: int, side: int):
    """(uint8 [side, side, 3], valid bool [side, side]) at (y, x): a view where it is inside."""
    if 0 <= y and y + side <= self.height and 0 <= x and x + side <= self.width:
      return self.image[y:y + side, x:x + side], True  # Most tiles: a plain slice.
    return _cut(lambda y0, y1, x0, x1: self.image[y0:y1, x0:x1], self.height, self.width, y, x,
                side)

  def close(self) -> None:
    pass


_DECODERS = futures.ThreadPoolExecutor(2, thread_name_prefix='decode')  # FileSource.prefetch.


class FileSource:
  """What the file sources share: an image read a segment (a tile, strip or chunk of the file) at a
  time, through an LRU cache of `cache_mb`; regions cut from the segments under them; the thumbnail
  from the pyramid level whose downsample divides the factor, else one streaming pass of bands.

  A subclass gives `sizes`, the (h, w) of the image and of each pyramid level, `_grid(level)` (the
  segments' height and width) and `_load(level, r, c)` (uint8 [<= sh, <= sw, 3], the segment at row
  r, column c). `decoded`: full-resolution pixels decoded so far (each segment once while it stays
  cached), `thumbnail_decoded` those of them the thumbnail read; `resolution`: the physical pixel
  size {'x', 'y', 'unit'}, or None."""
  errors = (ValueError, RuntimeError, OSError, zlib.error)  # What codecs raise on damaged data.

  def __init__(self, path, sizes: list, resolution: Optional[dict], cache_mb: int):
    self.path, self.sizes, self.resolution = Path(path), sizes, resolution
    self.height, self.width = sizes[0]
    for level, (h, w) in enumerate(sizes):
      sh, sw = self._grid(level)
      if min(sh, h) * min(sw, w) * 3 > SEGMENT_BYTES:
        raise DataError(f'cannot read {path}: its tiles (or strips, or chunks) of {sw} x {sh} '
                        f'pixels are too large to read a part at a time. Re-tile it, e.g. `vips '
                        f'tiffsave {path} out.tif --tile --pyramid --bigtiff`.')
    self.cache, self.lock, self.decoded = collections.OrderedDict(), threading.Lock(), 0
    self.cache_bytes, self.cached, self.thumbnail_decoded = cache_mb * 2 ** 20, 0, 0
    self.loading = {}  # Segments being decoded in _DECODERS: their futures.

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def prefetch(self, boxes) -> None:
    """Starts decoding the segments under the regions `boxes` [(y, x, side)] that are not cached,
    in threads (the codecs release the GIL), so that reading overlaps the device's work."""
    (sh, sw), keys = self._grid(0), set()
    for y, x, side in boxes:
      rows = range(max(y, 0) // sh, -(-min(y + side, self.height) // sh))
      keys.update((0, r, c) for r in rows
                  for c in range(max(x, 0) // sw, -(-min(x + side, self.width) // sw)))
    with self.lock:
      for key in sorted(keys - set(self.cache) - set(self.loading)):
        self.loading[key] = _DECODERS.submit(self._fill, *key)

  def _segment(self, level: int, r: int, c: int) -> np.ndarray:
    """uint8 [<= sh, <= sw, 3] of a segment (cached, or decoded now or by `prefetch`)."""
    key = (level, r, c)
    with self.lock:
      if key in self.cache:
        self.cache.move_to_end(key)
        return self.cache[key]
      loading = self.loading.get(key)
    return self._fill(*key) if loading is None else loading.result()

  def _fill(self, level: int, r: int, c: int) -> np.ndarray:
    """Decodes a segment into the cache."""
    key = (level, r, c)
    try:
      segment = self._load(level, r, c)
    except self.errors as e:
      raise DataError(f'cannot decode {self.path} (tile {r}, {c} of level {level}): {e}') from e
    with self.lock:
      if level == 0:  # The segment's pixels inside the image.
        sh, sw = self._grid(0)
        self.decoded += min(sh, self.height - r * sh) * min(sw, self.width - c * sw)
      self.cache[key] = segment
      self.loading.pop(key, None)
      self.cached += segment.nbytes
      while self.cached > self.cache_bytes and len(self.cache) > 1:
        self.cached -= self.cache.popitem(last=False)[1].nbytes
    return segment

  def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
    """uint8 [y1 - y0, x1 - x0, 3] of a level, inside its image: only the segments under it."""
    (h, w), (sh, sw) = self.sizes[level], self._grid(level)
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    for r in range(y0 // sh, -(-y1 // sh)):
      for c in range(x0 // sw, -(-x1 // sw)):
        segment = self._segment(level, r, c)
        ty, tx = r * sh, c * sw
        a0, a1 = max(y0, ty), min(y1, ty + sh, h)
        b0, b1 = max(x0, tx), min(x1, tx + sw, w)
        out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = segment[a0 - ty:a1 - ty, b0 - tx:b1 - tx]
    return out

  def region(self, y: int, x: int, side: int):
    return _cut(self.read, self.height, self.width, y, x, side)

  def thumbnail(self, factor: int, rows=None) -> np.ndarray:
    """float32 [ceil(H/f), ceil(W/f), 3] (or its rows (a, b)): block means of the coarsest level
    whose downsample d divides f (a pyramid level, or the image itself; never one coarser than f),
    read in bands of 64 f / d rows."""
    level, d = 0, 1
    for i, (lh, lw) in enumerate(self.sizes[1:], 1):
      ratio = self.width / lw
      near = round(ratio)
      if (abs(ratio - near) < 1e-6 and factor % near == 0 and
          (lh, lw) == (-(-self.height // near), -(-self.width // near))):
        level, d = i, near
    f, (h, w) = factor // d, self.sizes[level]
    a, b = rows or (0, -(-h // f))
    out = np.empty((b - a, -(-w // f), 3), np.float32)
    step, before = 64 * f, self.decoded
    for y0 in range(a * f, min(b * f, h), step):
      band = self.read(y0, min(y0 + step, b * f, h), 0, w, level)
      out[y0 // f - a:y0 // f - a + -(-len(band) // f)] = thumbnail(band, f)
    self.thumbnail_decoded += self.decoded - before
    self.cache.clear()  # Stage 2 reads other tiles (or this level's are no use to it).
    self.cached = 0
    return out


def _rgb(pixels: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] of [h, w, S], S in (1, 3, 4): grey repeated, alpha dropped."""
  return np.repeat(pixels, 3, -1) if pixels.shape[-1] == 1 else pixels[..., :3]


def _unsupported(path, kind: str, has: str) -> DataError:
  return DataError(f'cannot read {kind} {path}: iterseg reads 8-bit grey, RGB or RGBA images; this '
                   f'one has {has}. Convert it, e.g. with tifffile or vips.')


class TiffSource(FileSource):
  """A TIFF, BigTIFF or OME-TIFF (tiled or in strips, pyramidal or not) read a file tile (or strip)
  at a time through tifffile: uint8, 1, 3 or 4 interleaved samples."""

  def __init__(self, path, cache_mb: int = 192):
    import tifffile  # pylint: disable=g-import-not-at-top
    try:
      self.tif = tifffile.TiffFile(path)
      self.levels = [level.keyframe for level in self.tif.series[0].levels]
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
      raise DataError(f'cannot read TIFF {path}: {e}') from e
    for page in self.levels:
      if page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4) or (
          page.samplesperpixel > 1 and page.planarconfig != 1) or page.imagedepth != 1:
        raise _unsupported(path, 'TIFF', f'dtype {page.dtype}, {page.samplesperpixel} samples, '
                           f'planar config {page.planarconfig} (1: interleaved)')
    super().__init__(path, [(int(p.imagelength), int(p.imagewidth)) for p in self.levels],
                     _resolution(self.levels[0], self.tif), cache_mb)
    self.fd = os.open(self.path, os.O_RDONLY)

  def close(self) -> None:
    self.tif.close()
    os.close(self.fd)

  def _grid(self, level: int) -> tuple:
    """(segment height, segment width) of a level: tiles, or strips."""
    page = self.levels[level]
    return (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip,
                                                                     page.imagewidth)

  def _load(self, level: int, r: int, c: int) -> np.ndarray:
    page, (sh, sw) = self.levels[level], self._grid(level)
    index = r * -(-page.imagewidth // sw) + c
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = os.pread(self.fd, count, offset) if count else None
    if count:  # Bounded before decoding; the last strip may be shorter, edge tiles are whole.
      rows = sh if page.is_tiled else min(sh, page.imagelength - index * sh)
      files.check_declared(rows * sw * page.samplesperpixel, len(data),
                            files.TIFF_RATIO.get(int(page.compression)), f'a {sw} x {sh} tile')
    segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
    if segment is None:  # A tile the file leaves out.
      return np.zeros((sh, sw, 3), np.uint8)
    return _rgb(np.asarray(segment).reshape(shape[1], shape[2], -1))


class ZarrSource(FileSource):
  """A Zarr array (uint8 [H, W] or [H, W, C]) or an OME-Zarr image (NGFF 0.4 or 0.5 multiscales:
  its datasets are the pyramid; axes such as yx, cyx or tczyx, read at t = z = 0, channels last),
  Zarr v2 or v3, read a chunk at a time through zarr; 1, 3 or 4 channels."""

  def __init__(self, path, cache_mb: int = 192):
    import zarr  # pylint: disable=g-import-not-at-top
    try:
      node, resolution = zarr.open(str(path), mode='r'), None
      if isinstance(node, zarr.Array):
        self.arrays, self.axes = [node], ['y', 'x', 'c'][:node.ndim]
      else:
        image = node.attrs.asdict()
        image = image.get('ome', image)  # NGFF 0.5 nests its metadata under 'ome'.
        if 'multiscales' not in image:
          raise LookupError('a group without OME-Zarr multiscales metadata')
        image = image['multiscales'][0]
        self.axes = [a if isinstance(a, str) else a['name'] for a in image['axes']]
        self.arrays = [node[d['path']] for d in image['datasets']]
        resolution = _ngff_resolution(image, self.axes)
    except (OSError, ValueError, LookupError, TypeError) as e:
      raise DataError(f'cannot read Zarr {path}: {e}') from e
    array = self.arrays[0]
    if not {'y', 'x'} <= set(self.axes) or any(a.ndim != len(self.axes) for a in self.arrays):
      raise DataError(f'cannot read Zarr {path}: its axes {self.axes} do not match its arrays '
                      f'{[a.shape for a in self.arrays]}: it needs y and x axes.')
    channels = array.shape[self.axes.index('c')] if 'c' in self.axes else 1
    if array.dtype != np.uint8 or channels not in (1, 3, 4):
      raise _unsupported(path, 'Zarr', f'dtype {array.dtype}, {channels} channels')
    iy, ix = self.axes.index('y'), self.axes.index('x')
    self.kept = [a for a in self.axes if a in ('y', 'x', 'c')]
    super().__init__(path, [(a.shape[iy], a.shape[ix]) for a in self.arrays], resolution,
                     cache_mb)

  def _grid(self, level: int) -> tuple:
    chunks = self.arrays[level].chunks
    return chunks[self.axes.index('y')], chunks[self.axes.index('x')]

  def _load(self, level: int, r: int, c: int) -> np.ndarray:
    (sh, sw), take = self._grid(level), {'c': slice(0, 3)}
    take.update(y=slice(r * sh, (r + 1) * sh), x=slice(c * sw, (c + 1) * sw))
    pixels = self.arrays[level][tuple(take.get(a, 0) for a in self.axes)]
    pixels = pixels.transpose([self.kept.index(a) for a in ('y', 'x', 'c') if a in self.kept])
    return _rgb(pixels if pixels.ndim == 3 else pixels[..., None])


class OpenSlideSource(FileSource):
  """A whole-slide image OpenSlide reads (.svs, .ndpi, .mrxs, .scn, ...; `pip install
  'iterseg[slides]'`), by `read_region` a file tile at a time (its tile size, else 512); pixels
  outside the scanned area (alpha 0) are white. Pyramid levels whose downsample is not a whole
  number are not used."""

  def __init__(self, path, cache_mb: int = 192):
    try:
      import openslide  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # openslide-python, or its library (openslide-bin), is missing.
      raise DataError(f"cannot read {path}: its format needs OpenSlide: pip install "
                      f"'iterseg[slides]' ({e})") from e
    self.errors = FileSource.errors + (openslide.OpenSlideError,)
    try:
      self.slide = openslide.OpenSlide(path)
    except (OSError, openslide.OpenSlideError) as e:
      raise DataError(f'cannot read {path} with OpenSlide: {e}') from e
    self.index = [i for i, d in enumerate(self.slide.level_downsamples) if d == round(d)]
    props = self.slide.properties
    mpp = [props.get(f'openslide.mpp-{k}') for k in ('x', 'y')]
    super().__init__(path, [self.slide.level_dimensions[i][::-1] for i in self.index],
                     None if None in mpp else {'x': float(mpp[0]), 'y': float(mpp[1]),
                                               'unit': 'µm'}, cache_mb)

  def close(self) -> None:
    self.slide.close()

  def _grid(self, level: int) -> tuple:
    props = self.slide.properties
    return tuple(int(props.get(f'openslide.level[{self.index[level]}].tile-{k}', TILE))
                 for k in ('height', 'width'))

  def _load(self, level: int, r: int, c: int) -> np.ndarray:
    (h, w), (sh, sw) = self.sizes[level], self._grid(level)
    i, y, x = self.index[level], r * sh, c * sw
    d = round(self.slide.level_downsamples[i])  # read_region takes level-0 coordinates.
    rgba = np.array(self.slide.read_region((x * d, y * d), i, (min(sw, w - x), min(sh, h - y))))
    rgba[rgba[..., 3] == 0] = 255
    return rgba[..., :3]


def _ngff_resolution(image: dict, axes: list) -> Optional[dict]:
  """The pixel size {'x', 'y', 'unit'} of an NGFF multiscales image: its first dataset's scale
  (times the image's own), where its y and x axes name the same length unit; else None."""
  scale = np.ones(len(axes))
  for t in (image['datasets'][0].get('coordinateTransformations', []) +
            image.get('coordinateTransformations', [])):
    if t.get('type') == 'scale' and 'scale' in t:
      scale *= t['scale']
  units = {a['name']: a.get('unit') for a in image['axes'] if isinstance(a, dict)}
  unit = SYMBOLS.get(units.get('x'))
  if unit is None or units.get('y') != units.get('x'):
    return None
  return {'x': float(scale[axes.index('x')]), 'y': float(scale[axes.index('y')]), 'unit': unit}


def _resolution(page, tif) -> Optional[dict]:
  """The physical pixel size {'x', 'y', 'unit'} of a TIFF (OME's PhysicalSize, else the resolution
  tags), or None."""
  if tif.is_ome and tif.ome_metadata:
    import re  # pylint: disable=g-import-not-at-top
    found = {k: re.search(rf'PhysicalSize{k.upper()}="([^"]+)"', tif.ome_metadata)
             for k in ('x', 'y')}
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
    if all(found.values()):
      return {'x': float(found['x'].group(1)), 'y': float(found['y'].group(1)),
              'unit': unit.group(1) if unit else 'µm'}
  tags = page.tags
  if 'XResolution' in tags and 'ResolutionUnit' in tags and int(tags['ResolutionUnit'].value) in (
      2, 3):
    per = {2: 25400.0, 3: 10000.0}[int(tags['ResolutionUnit'].value)]  # µm per inch, per cm.
    x, y = (tags[t].value for t in ('XResolution', 'YResolution'))
    return {'x': per * x[1] / x[0], 'y': per * y[1] / y[0], 'unit': 'µm'}
  return None


def is_zarr(path) -> bool:
  """Whether `path` is a Zarr store: a folder named *.zarr (*.ome.zarr)."""
  return Path(path).suffix.lower() == '.zarr' and Path(path).is_dir()


def is_slide(path) -> bool:
  """Whether native predict reads `path` out of core (`open_source`): a Zarr store, a file of an
  OpenSlide format, or a TIFF that is tiled, pyramidal, or above Pillow's decompression-bomb limit
  (a plain small TIFF is read whole, as any image)."""
  suffix = Path(path).suffix.lower()
  if is_zarr(path) or suffix in OPENSLIDE_SUFFIXES:
    return True
  if suffix not in TIFF_SUFFIXES:
    return False
  import tifffile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      page = series.levels[0].keyframe
      return bool(page.is_tiled or len(series.levels) > 1 or
                  page.imagelength * page.imagewidth > (Image.MAX_IMAGE_PIXELS or math.inf))
  except (OSError, ValueError, IndexError, tifffile.TiffFileError):
    return False  # Read as any image: its error then names the file.


def open_source(path, cache_mb: int = 192) -> FileSource:
  """The source of a slide: a Zarr store through zarr, a TIFF (.svs included) through tifffile,
  the other whole-slide formats through OpenSlide. DataError (one line) if it cannot be read."""
  if is_zarr(path):
    return ZarrSource(path, cache_mb)
  if Path(path).suffix.lower() in OPENSLIDE_SUFFIXES:
    return OpenSlideSource(path, cache_mb)
  return TiffSource(path, cache_mb)


# --- Writing --------------------------------------------------------------------------------------


def _encode(tiles, compression: str, workers: int = 2) -> list:
  """Each uint8 tile [T, T(, S)] encoded as TIFF segment bytes (zlib: deflate; jpeg: quality 90);
  a tile of zeros (a mask's background) is encoded once."""
  if compression == 'zlib':
    fn = lambda t: zlib.compress(np.ascontiguousarray(t).tobytes(), 1)
  else:
    import imagecodecs  # pylint: disable=g-import-not-at-top
    fn = lambda t: imagecodecs.jpeg_encode(np.ascontiguousarray(t), level=90)
  zeros = {}

  def encode(t):
    if t.any():
      return fn(t)
    key = (t.shape, t.dtype.str)
    if key not in zeros:
      zeros[key] = fn(t)
    return zeros[key]

  with futures.ThreadPoolExecutor(workers) as pool:  # The codecs release the GIL.
    return list(pool.map(encode, tiles))


def _tiles(band: np.ndarray, tile: int) -> list:
  """The tiles of a band [r <= T, W(, S)], left to right, zero-padded to T x T."""
  pad = [(0, tile - band.shape[0]), (0, -band.shape[1] % tile)] + [(0, 0)] * (band.ndim - 2)
  band = np.pad(band, pad)
  return [band[:, x:x + tile] for x in range(0, band.shape[1], tile)]


def _levels(height: int, width: int, tile: int) -> int:
  """Pyramid levels below the image: halving until the image fits one tile."""
  return max(0, math.ceil(math.log2(max(height, width) / tile)))


def write_pyramid(path, height: int, width: int, bands: Iterator[np.ndarray], *,
                  compression: str = 'zlib', tile: int = TILE, resolution=None,
                  levels: Optional[int] = None) -> None:
  """Writes an image given as bands of `tile` rows (uint8 [tile, W(, 3)], the last one shorter)
  as a tiled pyramidal OME-TIFF (BigTIFF), or an OME-Zarr if `path` ends in .zarr (zlib only),
  holding only a band and the lower levels' encoded tiles:
  each level is the one above it with every other row and column (masks keep their labels),
  or its 2 x 2 means for RGB. `bands` may also yield encoded level-0 tiles with the band's rows:
  (list of bytes, rows [r, W(, 3)] at level 1 or None)."""
  import tifffile  # pylint: disable=g-import-not-at-top
  levels = _levels(height, width, tile) if levels is None else levels
  lower = [[] for _ in range(levels)]  # Encoded tiles of each level below the first.
  pending = [None] * levels  # Rows of each level that do not fill a row of tiles yet.
  channels = [None]

  def down(rows: np.ndarray) -> np.ndarray:
    if rows.ndim == 2:
      return rows[::2, ::2]
    h2, w2 = -(-rows.shape[0] // 2), -(-rows.shape[1] // 2)
    padded = np.pad(rows, ((0, 2 * h2 - rows.shape[0]), (0, 2 * w2 - rows.shape[1]), (0, 0)),
                    mode='edge').astype(np.uint16)
    return ((padded[::2, ::2] + padded[1::2, ::2] + padded[::2, 1::2] + padded[1::2, 1::2] + 2)
            // 4).astype(np.uint8)

  def push(level: int, rows: Optional[np.ndarray], last: bool) -> None:
    """Adds rows to `level` (1-based), encoding every full row of tiles and passing rows down."""
    if level > levels:
      return
    if rows is not None:
      pending[level - 1] = rows if pending[level - 1] is None else np.concatenate(
          [pending[level - 1], rows])
    rows = pending[level - 1]
    while rows is not None and (len(rows) >= tile or (last and len(rows))):
      lower[level - 1].extend(_encode(_tiles(rows[:tile], tile), compression))
      push(level + 1, down(rows[:tile]), False)
      rows = rows[tile:] if len(rows) > tile else None
    pending[level - 1] = rows
    if last:
      push(level + 1, None, True)

  def first():  # Level 0's tiles; the levels below are made on the way (tifffile stops reading
    seen = 0      # this iterator at the last tile, so the last band finishes them first).
    for band in bands:
      if isinstance(band, tuple):
        encoded, next_rows = band
        channels[0] = channels[0] or (None if next_rows is None or next_rows.ndim == 2 else 3)
        seen += tile
      else:
        channels[0] = 3 if band.ndim == 3 else None
        encoded, next_rows = _encode(_tiles(band, tile), compression), (
            down(band) if levels else None)
        seen += len(band)
      push(1, next_rows, seen >= height)
      yield from encoded

  shape = lambda level: ((-(-height // 2 ** level), -(-width // 2 ** level)) +
                         ((3,) if channels[0] else ()))
  tiles = first()
  tiles = itertools.chain([next(tiles)], tiles)  # The first band tells the channels.
  if Path(path).suffix.lower() == '.zarr':
    if compression != 'zlib':
      raise ValueError(f'OME-Zarr is written with zlib chunks, not {compression}')
    return _write_zarr(path, [shape(level) for level in range(levels + 1)], [tiles] + lower, tile,
                       resolution)
  metadata = {'axes': 'YXS' if channels[0] else 'YX'}
  if resolution:
    metadata.update(PhysicalSizeX=resolution['x'], PhysicalSizeY=resolution['y'],
                    PhysicalSizeXUnit=resolution['unit'], PhysicalSizeYUnit=resolution['unit'])

  def write(f):
    with tifffile.TiffWriter(f, bigtiff=True, ome=True) as tif:
      options = dict(tile=(tile, tile), dtype=np.uint8, compression=compression,
                     photometric='rgb' if channels[0] else 'minisblack')
      tif.write(tiles, shape=shape(0), subifds=levels, metadata=metadata, **options)
      for level in range(1, levels + 1):
        tif.write(iter(lower[level - 1]), shape=shape(level), subfiletype=1, metadata=None,
                  **options)

  files.atomic_write(path, write, 'wb')


def _write_zarr(path, shapes: list, levels: list, tile: int, resolution=None) -> None:
  """An OME-Zarr (NGFF 0.4, Zarr v2) of each level's encoded tiles (zlib, row by row; level 0's
  may be an iterator that fills the others' lists), replaced whole: chunks of `tile`, channels
  first (as NGFF orders the axes), tiles of zeros left out (zarr fills them)."""
  channels = len(shapes[0]) == 3
  zeros = zlib.compress(bytes(tile * tile * (3 if channels else 1)), 1)
  unit = {'unit': UNITS[resolution['unit']]} if resolution and resolution['unit'] in UNITS else {}
  size = (resolution['y'], resolution['x']) if resolution else (1, 1)
  datasets = []
  with files.replaced_folder(path) as folder:
    for level, encoded in enumerate(levels):
      (h, w), per_row = shapes[level][:2], -(-shapes[level][1] // tile)
      for i, data in enumerate(encoded):
        if data == zeros:
          continue
        if channels:  # [T, T, 3] -> [3, T, T].
          data = zlib.compress(np.frombuffer(zlib.decompress(data), np.uint8).reshape(
              tile, tile, 3).transpose(2, 0, 1).tobytes(), 1)
        chunk = Path(folder, str(level), *(['0'] if channels else []), str(i // per_row),
                     str(i % per_row))
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(data)
      Path(folder, str(level)).mkdir(exist_ok=True)
      Path(folder, str(level), '.zarray').write_text(json.dumps({
          'zarr_format': 2, 'shape': [3] * channels + [h, w], 'chunks': [3] * channels + [tile] * 2,
          'dtype': '|u1', 'compressor': {'id': 'zlib', 'level': 1}, 'fill_value': 0,
          'order': 'C', 'filters': None, 'dimension_separator': '/'}))
      datasets.append({'path': str(level), 'coordinateTransformations': [
          {'type': 'scale', 'scale': [1] * channels + [s * 2 ** level for s in size]}]})
    axes = [{'name': 'c', 'type': 'channel'}] * channels + [
        dict(name=name, type='space', **unit) for name in ('y', 'x')]
    Path(folder, '.zgroup').write_text(json.dumps({'zarr_format': 2}))
    Path(folder, '.zattrs').write_text(json.dumps({'multiscales': [
        {'version': '0.4', 'axes': axes, 'datasets': datasets}]}))


def quantize(probs, xp=np, prob: bool = True) -> dict:
  """The uint8 outputs of probabilities [..., C] (numpy, or jax.numpy as `xp`): 'mask' (0 / 255
  where p > 0.5; class ids for several classes) and, with `prob`, 'prob' (round(p x 255) of the
  foreground, or of the first three classes)."""
  one = probs.shape[-1] == 1
  out = {'mask': (probs[..., 0] > 0.5).astype(xp.uint8) * xp.uint8(255) if one else xp.argmax(
      probs, -1).astype(xp.uint8)}
  if prob:
    out['prob'] = xp.rint((probs[..., 0] if one else probs[..., :3]) * 255).astype(xp.uint8)
  return out


class MemorySink:
  """The probabilities [H, W, C] in RAM: one band, the whole (bucket-padded) output buffer.
  A sink's `quantized` says whether it takes `quantize`d bands rather than probabilities."""
  rows, quantized = None, False

  def __init__(self):
    self.buffer = None

  def done(self, y0: int) -> bool:
    del y0
    return False

  def put(self, y0: int, band) -> None:
    del y0
    self.buffer = band


class SlideSink:
  """The mask of an image of height x width, written by bands of `rows` (a multiple of the tile)
  into a tiled pyramidal OME-TIFF at `path`, or an OME-Zarr if it ends in .zarr (uint8: 0 / 255
  for one class, else class ids), with `probabilities` also the foreground's (or each class's)
  probability x 255 at `<stem>_prob...`.

  Finished bands are kept under `<path>.partial/` with a manifest of `key` (what made them: the
  input, the method, the settings): a later run with the same key resumes from them, another key
  starts over. `close()` assembles the file(s) and removes the folder.

  With `share` = (index, count), the band i belongs to process i % count (alternate bands: the
  tissue, hence the refined tiles, spans many bands, so each process gets its part of it, and the
  split depends on nothing computed): `done` holds for the others' bands, `made` counts this
  process's saved in this run. `<path>.partial/` must then be on storage every process sees, made
  by one process before the others open it."""
  quantized = True

  def __init__(self, path, height: int, width: int, key: dict, *, rows: int = TILE,
               probabilities: bool = False, resolution=None, share: tuple = (0, 1)):
    self.path, self.height, self.width, self.rows = Path(path), height, width, rows
    self.probabilities, self.resolution, self.share, self.made = probabilities, resolution, share, 0
    self.partial = self.path.with_name(self.path.name + '.partial')
    manifest = self.partial / 'manifest.json'
    key = json.loads(json.dumps(dict(key, height=height, width=width, rows=rows,
                                     probabilities=probabilities)))
    if self.partial.exists():
      try:
        same = json.loads(manifest.read_text()) == key
      except (OSError, ValueError):
        same = False
      if not same:
        shutil.rmtree(self.partial)
    self.partial.mkdir(parents=True, exist_ok=True)
    if not manifest.exists():
      files.atomic_write_json(manifest, key)
    self.progress = None  # Called with the rows of each band saved.
    self.pool, self.pending = futures.ThreadPoolExecutor(1), None
    self.resumed = sum(1 for y0 in range(0, height, rows) if self._part(y0).exists())

  def _part(self, y0: int) -> Path:
    return self.partial / f'band_{y0:09d}.npz'

  def done(self, y0: int) -> bool:
    """Whether band y0 is not to be made here: saved, or another process's."""
    if self.pending is not None and self.pending.done():
      self.wait()
    return y0 // self.rows % self.share[1] != self.share[0] or self._part(y0).exists()

  def put(self, y0: int, band) -> None:
    """band: the probabilities [1, >= r, >= W, C] of rows y0 .. y0 + r, or their `quantize`d
    outputs (device or host), encoded and saved in a thread while the next band is made (one
    band in flight)."""
    self.wait()
    self.pending = self.pool.submit(self._save, y0, band)
    self.made += 1

  def wait(self) -> None:
    """Until the band in flight is saved (its error raised here)."""
    if self.pending is not None:
      pending, self.pending = self.pending, None
      pending.result()

  def _save(self, y0: int, band) -> None:
    n = min(self.rows, self.height - y0)
    outputs = band if isinstance(band, dict) else quantize(np.asarray(band)[0],
                                                           prob=self.probabilities)
    outputs = {k: np.asarray(v)[:n, :self.width] for k, v in outputs.items()
               if k == 'mask' or self.probabilities}
    arrays = {}
    for name, rows in outputs.items():
      encoded = _encode([t for r0 in range(0, len(rows), TILE) for t in _tiles(rows[r0:r0 + TILE],
                                                                               TILE)], 'zlib')
      arrays[f'{name}_tiles'] = np.frombuffer(b''.join(encoded), np.uint8)
      arrays[f'{name}_sizes'] = np.array([len(e) for e in encoded], np.int64)
      arrays[f'{name}_down'] = rows[::2, ::2]
    files.atomic_write(self._part(y0), lambda f: np.savez(f, **arrays), 'wb')
    if self.progress:
      self.progress(n)

  def outputs(self) -> dict:
    paths = {'mask': self.path}
    if self.probabilities:
      paths['prob'] = self.path.with_name(self.path.name.replace('_mask', '_prob'))
    return paths

  def assemble(self, paths: Optional[dict] = None) -> dict:
    """Writes the output(s) from the finished bands to `paths` ({kind: path}; `outputs()` by
    default), the bands kept; {kind: path}."""
    self.wait()
    self.pool.shutdown()
    paths = paths or self.outputs()
    for name, path in paths.items():

      def bands(name=name):
        for y0 in range(0, self.height, self.rows):
          with np.load(self._part(y0)) as part:
            data, sizes = part[f'{name}_tiles'], part[f'{name}_sizes']
            down = part[f'{name}_down']
          ends = np.cumsum(sizes)
          encoded = [data[e - s:e].tobytes() for s, e in zip(sizes, ends)]
          for r0 in range(0, min(self.rows, self.height - y0), TILE):  # Rows of tiles.
            per_row = -(-self.width // TILE)
            first = r0 // TILE * per_row
            yield encoded[first:first + per_row], down[r0 // 2:(r0 + TILE) // 2]

      write_pyramid(path, self.height, self.width, bands(), resolution=self.resolution)
    return {k: str(p) for k, p in paths.items()}

  def close(self) -> dict:
    """`assemble`, then the bands removed; {kind: path}."""
    paths = self.assemble()
    shutil.rmtree(self.partial)
    return paths
