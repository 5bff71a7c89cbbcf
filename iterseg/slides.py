"""Where native inference reads pixels from and writes them to, in bounded memory.

A source gives an image's size, its block-mean thumbnail and any region of it:
  `ArraySource`  an image in RAM (uint8 [H, W, 3]);
  `TiffSource`   a TIFF, BigTIFF or OME-TIFF (tiled or in strips, pyramidal or not) through tifffile:
                 only the file's tiles under a region are decoded (an LRU cache keeps the recent ones,
                 `decoded` counts them), and the thumbnail comes from the pyramid level whose
                 downsample divides the factor (block means of it; never a coarser level), else from
                 one streaming pass of bands.
A sink takes the output in bands of rows, top to bottom:
  `MemorySink`   the probabilities [H, W, C] in RAM, written in place as one band (`rows` None);
  `SlideSink`    a mask (and optionally uint8 probabilities) written as a tiled, compressed
                 pyramidal OME-TIFF: each finished band's tiles are encoded and saved under
                 `<output>.partial/` (so a killed job resumes from the bands already there), and the
                 file is assembled from them at the end, the pixel size of the input carried over.
`write_pyramid` writes any image given in bands as such a TIFF (the synthetic slides of the
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

TIFF_SUFFIXES = ('.tif', '.tiff', '.btf', '.tf8', '.svs')
TILE = 512  # Side of the tiles iterseg writes.


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

  def region(self, y: int, x: int, side: int):
    """(uint8 [side, side, 3], valid bool [side, side]) at (y, x): a view where it is inside."""
    if 0 <= y and y + side <= self.height and 0 <= x and x + side <= self.width:
      return self.image[y:y + side, x:x + side], True  # Most tiles: a plain slice.
    return _cut(lambda y0, y1, x0, x1: self.image[y0:y1, x0:x1], self.height, self.width, y, x,
                side)

  def close(self) -> None:
    pass


class TiffSource:
  """A TIFF read a file tile (or strip) at a time: uint8, 1, 3 or 4 samples (grey is repeated,
  alpha dropped). `decoded`: full-resolution pixels decoded so far (each file tile once while it
  stays in the cache of `cache_mb`), `thumbnail_decoded` those of them the thumbnail read."""

  def __init__(self, path, cache_mb: int = 192):
    import tifffile  # pylint: disable=g-import-not-at-top
    self.path = Path(path)
    try:
      self.tif = tifffile.TiffFile(self.path)
      series = self.tif.series[0]
      self.levels = [level.keyframe for level in series.levels]
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as e:
      raise DataError(f'cannot read TIFF {path}: {e}') from e
    page = self.levels[0]
    self.height, self.width = int(page.imagelength), int(page.imagewidth)
    for level in self.levels:
      if level.dtype != np.uint8 or level.samplesperpixel not in (1, 3, 4) or (
          level.samplesperpixel > 1 and level.planarconfig != 1) or level.imagedepth != 1:
        raise DataError(f'cannot read TIFF {path}: iterseg reads 8-bit grey, RGB or RGBA images '
                        f'with interleaved samples; this one has dtype {level.dtype}, '
                        f'{level.samplesperpixel} samples, planar config {level.planarconfig}. '
                        f'Convert it, e.g. with tifffile or vips.')
    self.resolution = _resolution(page, self.tif)
    self.fd = os.open(self.path, os.O_RDONLY)
    self.cache, self.lock, self.decoded = collections.OrderedDict(), threading.Lock(), 0
    self.cache_bytes, self.cached, self.thumbnail_decoded = cache_mb * 2 ** 20, 0, 0

  def close(self) -> None:
    self.tif.close()
    os.close(self.fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _grid(self, level: int):
    """(segment height, segment width, segments per row) of a level: tiles, or strips."""
    page = self.levels[level]
    if page.is_tiled:
      return page.tilelength, page.tilewidth, -(-page.imagewidth // page.tilewidth)
    return page.rowsperstrip, page.imagewidth, 1

  def _segment(self, level: int, index: int) -> np.ndarray:
    """uint8 [sh, sw, 3] of segment `index` (cached)."""
    key = (level, index)
    with self.lock:
      if key in self.cache:
        self.cache.move_to_end(key)
        return self.cache[key]
    page = self.levels[level]
    sh, sw, per_row = self._grid(level)
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = os.pread(self.fd, count, offset) if count else None
    try:
      segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
    except (ValueError, NotImplementedError, RuntimeError, zlib.error) as e:  # Codecs' errors.
      raise DataError(f'cannot decode {self.path} (tile {index} of level {level}): {e}') from e
    segment = (np.zeros((sh, sw, 3), np.uint8) if segment is None else
               np.asarray(segment).reshape(shape[1], shape[2], -1))
    samples = segment.shape[-1]
    segment = np.repeat(segment, 3, -1) if samples == 1 else segment[..., :3]
    with self.lock:
      if level == 0:  # The segment's pixels inside the image.
        ty, tx = index // per_row * sh, index % per_row * sw
        self.decoded += (min(sh, self.height - ty) * min(sw, self.width - tx))
      self.cache[key] = segment
      self.cached += segment.nbytes
      while self.cached > self.cache_bytes and len(self.cache) > 1:
        self.cached -= self.cache.popitem(last=False)[1].nbytes
    return segment

  def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
    """uint8 [y1 - y0, x1 - x0, 3] of a level, inside its image: only the segments under it."""
    page = self.levels[level]
    sh, sw, per_row = self._grid(level)
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    for r in range(y0 // sh, -(-y1 // sh)):
      for c in range(x0 // sw, -(-x1 // sw)):
        segment = self._segment(level, r * per_row + c)
        ty, tx = r * sh, c * sw
        a0, a1 = max(y0, ty), min(y1, ty + sh, page.imagelength)
        b0, b1 = max(x0, tx), min(x1, tx + sw, page.imagewidth)
        out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = segment[a0 - ty:a1 - ty, b0 - tx:b1 - tx]
    return out

  def region(self, y: int, x: int, side: int):
    return _cut(self.read, self.height, self.width, y, x, side)

  def thumbnail(self, factor: int, rows=None) -> np.ndarray:
    """float32 [ceil(H/f), ceil(W/f), 3] (or its rows (a, b)): block means of the finest level
    whose downsample d divides f (a pyramid level, or the image itself), read in bands of 64 f / d
    rows."""
    level, d = 0, 1
    for i, page in enumerate(self.levels[1:], 1):
      ratio = self.width / page.imagewidth
      near = round(ratio)
      if (abs(ratio - near) < 1e-6 and factor % near == 0 and
          page.imagelength == -(-self.height // near) and page.imagewidth == -(-self.width // near)):
        level, d = i, near
    f, page = factor // d, self.levels[level]
    h, w = page.imagelength, page.imagewidth
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


def is_slide(path) -> bool:
  """Whether native predict reads `path` through TiffSource: a TIFF that is tiled, pyramidal, or
  above Pillow's decompression-bomb limit (a plain small TIFF is read whole, as any image)."""
  if Path(path).suffix.lower() not in TIFF_SUFFIXES:
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
  as a tiled pyramidal OME-TIFF (BigTIFF), holding only a band and the lower levels' encoded tiles:
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
  head = next(tiles)  # The first band tells the channels.
  metadata = {'axes': 'YXS' if channels[0] else 'YX'}
  if resolution:
    metadata.update(PhysicalSizeX=resolution['x'], PhysicalSizeY=resolution['y'],
                    PhysicalSizeXUnit=resolution['unit'], PhysicalSizeYUnit=resolution['unit'])

  def write(f):
    with tifffile.TiffWriter(f, bigtiff=True, ome=True) as tif:
      options = dict(tile=(tile, tile), dtype=np.uint8, compression=compression,
                     photometric='rgb' if channels[0] else 'minisblack')
      tif.write(itertools.chain([head], tiles), shape=shape(0), subifds=levels, metadata=metadata, **options)
      for level in range(1, levels + 1):
        tif.write(iter(lower[level - 1]), shape=shape(level), subfiletype=1, metadata=None,
                  **options)

  files.atomic_write(path, write, 'wb')


class MemorySink:
  """The probabilities [H, W, C] in RAM: one band, the whole (bucket-padded) output buffer."""
  rows = None

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
  into a tiled pyramidal OME-TIFF at `path` (uint8: 0 / 255 for one class, else class ids), with
  `probabilities` also the foreground's (or each class's) probability x 255 at `<stem>_prob...`.

  Finished bands are kept under `<path>.partial/` with a manifest of `key` (what made them: the
  input, the method, the settings): a later run with the same key resumes from them, another key
  starts over. `close()` assembles the file(s) and removes the folder.

  With `share` = (index, count), the band i belongs to process i % count (alternate bands: the
  tissue, hence the refined tiles, spans many bands, so each process gets its part of it, and the
  split depends on nothing computed): `done` holds for the others' bands, `made` counts this
  process's saved in this run. `<path>.partial/` must then be on storage every process sees, made
  by one process before the others open it."""

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
    """band: the probabilities [>= r, >= W, C] (device or host) of rows y0 .. y0 + r, encoded
    and saved in a thread while the next band is made (one band in flight)."""
    self.wait()
    self.pending = self.pool.submit(self._save, y0, band)
    self.made += 1

  def wait(self) -> None:
    """Until the band in flight is saved (its error raised here)."""
    if self.pending is not None:
      pending, self.pending = self.pending, None
      pending.result()

  def _save(self, y0: int, band) -> None:
    probs = np.asarray(band)[0, :min(self.rows, self.height - y0), :self.width]
    if probs.shape[-1] == 1:
      mask = (probs[..., 0] > 0.5).astype(np.uint8) * np.uint8(255)
    else:
      mask = np.argmax(probs, -1).astype(np.uint8)
    outputs = {'mask': mask}
    if self.probabilities:
      p = probs[..., 0] if probs.shape[-1] == 1 else probs[..., :3]
      outputs['prob'] = np.rint(p * 255).astype(np.uint8)
    arrays = {}
    for name, rows in outputs.items():
      encoded = _encode([t for r0 in range(0, len(rows), TILE) for t in _tiles(rows[r0:r0 + TILE],
                                                                               TILE)], 'zlib')
      arrays[f'{name}_tiles'] = np.frombuffer(b''.join(encoded), np.uint8)
      arrays[f'{name}_sizes'] = np.array([len(e) for e in encoded], np.int64)
      arrays[f'{name}_down'] = rows[::2, ::2]
    files.atomic_write(self._part(y0), lambda f: np.savez(f, **arrays), 'wb')
    if self.progress:
      self.progress(len(probs))

  def outputs(self) -> dict:
    paths = {'mask': self.path}
    if self.probabilities:
      paths['prob'] = self.path.with_name(self.path.name.replace('_mask', '_prob'))
    return paths

  def close(self) -> dict:
    """Assembles the OME-TIFF(s) from the finished bands; {kind: path}."""
    self.wait()
    self.pool.shutdown()
    paths = self.outputs()
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
    shutil.rmtree(self.partial)
    return {k: str(p) for k, p in paths.items()}
