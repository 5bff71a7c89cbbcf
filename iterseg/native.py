"""Two-stage segmentation of an image of any size, in bounded memory (resolution='native').

  image [H, W, 3] uint8 --mean of f x f blocks (host)--> thumbnail [h, w, 3], padded to a
  bucket --stage 1--> low-resolution probabilities [h, w, C] --mean uncertainty of each tile's
  (T/f)^2 low-res pixels--> the least confident tiles (native.refine_fraction, threshold)
  --stage 2 on chunks of native.chunk tiles (the last one cut to a multiple of chunk / 4) of
  T + 2 halo px, with the coarse probabilities upsampled for each--> the tiles' probabilities
  output [H, W, C] float32: the coarse probabilities upsampled (`inference.bilinear`) in bands of
  rows, the refined tiles written over them.

f = hi_size / stage1_size and T = hi_size / num_patches, the geometry stage 1 and stage 2 were
trained at (on crops of hi_size). No U-Net activation ever has the image's size: memory is the
image, the output and a working set of one band and one chunk. The compute follows the tiles
refined: stage 2 runs ceil(tiles / chunk) times. Each function is compiled once per size bucket
(stage 1's padded input, the bands' padded width, stage 2's chunk sizes), not per image size;
`Compiled` counts them.

`sliding_window` is the fair dense reference at the same scale: the baseline U-Net on overlapping
windows averaged, as MONAI's `sliding_window_inference` does (mode 'constant').
"""

from concurrent import futures
import dataclasses
import functools
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from iterseg import flops, inference, models
from iterseg.data import common, pipeline
from iterseg.errors import InputError
from iterseg.models import Networks
from iterseg.spec import Spec

BAND_ROWS = 512  # Rows of the output made by one call (the coarse map, upsampled).


@dataclasses.dataclass
class NativePrediction:
  """What native two-stage inference returns for one image of H x W.

  probs:   [H, W, C] float32, stage 1 upsampled everywhere, stage 2 in the refined tiles.
  coarse:  [ceil(H/f), ceil(W/f), C] float32, stage 1's own (low-resolution) probabilities.
  scores:  [gh, gw] tile uncertainty (gh = ceil(H/T)); higher = less sure.
  refined: [gh, gw] bool, the tiles stage 2 recomputed.
  stats:   {'tiles', 'refined', 'stage2_calls', 'gflops' (what ran: stage 1, every stage-2 call,
           the bands), 'seconds': {'stage1', 'stage2', 'bands'}}.
  """
  probs: np.ndarray
  coarse: np.ndarray
  scores: np.ndarray
  refined: np.ndarray
  stats: dict


class Compiled:
  """A jitted function compiled ahead of time once per input shape (a size bucket): its executables
  and XLA's FLOPs per call, shared by every NativeModel of the same Spec (`steps`)."""

  def __init__(self, fn, **static):
    self.fn, self.static, self.cache = fn, static, {}

  def key(self, *args) -> tuple:
    return tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))

  def executable(self, *args) -> tuple:
    """(the executable for args' shapes, its FLOPs per call), compiled the first time; args may be
    arrays or jax.ShapeDtypeStructs."""
    key = self.key(*args)
    if key not in self.cache:
      compiled = jax.jit(self.fn, static_argnames=tuple(self.static)).lower(
          *args, **self.static).compile()
      self.cache[key] = (compiled, flops.compiled_flops(compiled) or 0.0)
    return self.cache[key]

  def __call__(self, *args):
    compiled, count = self.executable(*args)
    return compiled(*args), count


class _Used:
  """One NativeModel's view of a shared Compiled: counts the shapes this model needed."""

  def __init__(self, compiled: Compiled):
    self.compiled, self.keys = compiled, set()

  def __call__(self, *args):
    self.keys.add(self.compiled.key(*args))
    return self.compiled(*args)

  def warm(self, *args) -> None:
    """Compiles for args' shapes (arrays or jax.ShapeDtypeStructs) without running."""
    self.keys.add(self.compiled.key(*args))
    self.compiled.executable(*args)

  @property
  def compiles(self) -> int:
    return len(self.keys)


@functools.lru_cache(maxsize=16)
def steps(spec: Spec) -> dict:
  """The compiled steps of one Spec, made once per process: {'stage1', 'stage2', 'window',
  'band'} (they depend on shapes and the spec, not on the parameters' values)."""
  return {'stage1': Compiled(_stage1, spec=spec), 'stage2': Compiled(_stage2, spec=spec),
          'window': Compiled(_window, spec=spec), 'band': Compiled(_band, spec=spec)}


# --- The steps, each jitted per bucket ------------------------------------------------------------


def _stage1(params, thumb, size, *, spec: Spec):
  """thumb [bh, bw, 3] (the thumbnail [h, w] padded to a bucket; size = (h, w)) -> (low-resolution
  probabilities [bh, bw, C], the rows and columns past (h, w) repeating the last ones, so that
  every upsampling near the image's edge sees its own border; tile scores [gbh, gbw] (gbh = bh /
  cell); every tile of the bucket's grid ranked, least sure first, by `inference.select`: flat
  indices [gbh * gbw] into that grid, the tiles past the image's last.
  """
  logits = models.unet(spec, 'stage1').apply({'params': params},
                                             inference.normalize(thumb, spec)[None])
  probs = inference.stage1_outputs(logits, spec)[0]
  rows = jnp.minimum(jnp.arange(probs.shape[0]), size[0] - 1)
  cols = jnp.minimum(jnp.arange(probs.shape[1]), size[1] - 1)
  low = probs[rows][:, cols]
  scores = inference.tile_scores(low[None], spec)[0]
  cell = spec.patch_size // spec.downscale
  inside = ((jnp.arange(scores.shape[0])[:, None] < -(-size[0] // cell)) &
            (jnp.arange(scores.shape[1])[None, :] < -(-size[1] // cell)))
  order, _ = inference.select(jnp.where(inside, scores, -jnp.inf).reshape(1, -1), scores.size)
  return low[..., :spec.num_classes], scores, order[0]


def _band(rows, offset, *, spec: Spec):
  """rows [L, bw, C]: low-resolution rows around a band; offset: the band's first row, in native
  px from rows' first -> the band at full resolution [BAND_ROWS, bw * f, C]."""
  f = spec.downscale
  return inference.bilinear(rows, f, offset, 0, BAND_ROWS, rows.shape[1] * f)


def _stage2(params, tiles, valid, patches, offsets, *, spec: Spec):
  """Stage 2 on a chunk: tiles [K, S, S, 3] uint8 with their halo (S = T + 2 halo), valid [K, S, S]
  (inside the image), patches [K, L, L, C] the low-resolution probabilities around each and
  offsets [K, 2] of the tile in them (native px) -> probabilities of the tile centres [K, T, T, C].
  The shapes depend on the chunk only: one compilation serves every image."""
  side = tiles.shape[1]
  x = inference.normalize(tiles, spec)
  if spec.stage2_uses_coarse:
    coarse = jax.vmap(lambda p, o: inference.bilinear(p, spec.downscale, o[0], o[1], side, side))(
        patches, offsets)
    x = jnp.concatenate([x, coarse], -1)
  x = x * valid[..., None]  # Zeros past the image's border, as `inference.cut` pads.
  return models.probabilities(inference.stage2_logits(params, x, spec))


def _window(params, windows, valid, *, spec: Spec):
  """The baseline on windows [K, R, R, 3] uint8 -> probabilities [K, R, R, C]."""
  x = inference.normalize(windows, spec) * valid[..., None]
  return models.probabilities(models.unet(spec).apply({'params': params}, x))


# --- On the host ----------------------------------------------------------------------------------


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


def _cut(image: np.ndarray, y: int, x: int, side: int):
  """(uint8 [side, side, 3], bool [side, side]): image[y:y + side, x:x + side], zeros outside."""
  h, w = image.shape[:2]
  tile = np.zeros((side, side, 3), np.uint8)
  valid = np.zeros((side, side), bool)
  y0, y1, x0, x1 = max(y, 0), min(y + side, h), max(x, 0), min(x + side, w)
  if y0 < y1 and x0 < x1:
    tile[y0 - y:y1 - y, x0 - x:x1 - x] = image[y0:y1, x0:x1]
    valid[y0 - y:y1 - y, x0 - x:x1 - x] = True
  return tile, valid


def _bucket(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


def _around(low: np.ndarray, start: int, side: int, factor: int):
  """(indices [L] of the low-resolution rows (or columns) that native px start .. start + side
  interpolate from, clipped to the map, with L = ceil(side / f) + 3; the offset of `start` from
  the first of them, in native px, in [f, 2f))."""
  first = start // factor - 1
  count = _low_rows(side, factor)
  return np.clip(np.arange(first, first + count), 0, low.shape[0] - 1), start - first * factor


def _low_rows(side: int, factor: int) -> int:
  """Low-resolution rows (or columns) that `side` native px upsampled by `factor` read from, from
  one row before the first (see _around): ceil(side / f) + 3."""
  return -(-side // factor) + 3


def memory_available() -> int:
  """Bytes this process can still allocate without swapping (psutil's `available`)."""
  return psutil.virtual_memory().available


def check_fits(height: int, width: int, spec: Spec, *, decoded: bool = True,
               extra_per_pixel: int = 0) -> None:
  """InputError, before any work, if an image of height x width cannot be segmented here: above
  native.max_pixels, or its output (float32 probabilities; plus the decoded image when `decoded` is
  False, i.e. still to be read) would not fit in the free memory with a working set."""
  pixels = height * width
  channels = spec.num_classes
  per_pixel = 4 * channels + extra_per_pixel + (0 if decoded else 3)
  working = 256 * 2 ** 20 + BAND_ROWS * width * 4 * (channels + 3)
  needed = pixels * per_pixel + working
  size = f'an image of {width} x {height} ({_mpx(pixels)})'
  if spec.max_pixels and pixels > spec.max_pixels:
    raise InputError(f'{size} is above config.native.max_pixels={spec.max_pixels} '
                     f'({_mpx(spec.max_pixels)}): raise it to at least {pixels}, or set it to 0 '
                     f'to go by the free memory.')
  free = memory_available()
  if not spec.max_pixels and needed > free:
    fits = max((free - working) // per_pixel, 0)
    raise InputError(
        f'{size} needs about {needed / 2 ** 30:.1f} GB for its {channels}-class probabilities'
        f'{"" if decoded else " and its pixels"}, but {free / 2 ** 30:.1f} GB are free (enough for '
        f'about {_mpx(fits)} at this width): free memory, or cut the image into parts of at most '
        f'that many pixels.')


def _mpx(pixels: int) -> str:
  return f'{pixels / 1e6:.3g} Mpx'


# --- The method -----------------------------------------------------------------------------------


class NativeModel:
  """Stage 1 and a stage 2 (and the baseline, for `sliding_window`) with their compiled steps.

    model = NativeModel(nets, s.spec)      # nets: Networks with stage 1 and stage 2 at Np
    pred = model.two_stage(image)                 # image: uint8 [H, W, 3], any H x W
    probs = model.sliding_window(image)           # the dense reference, [H, W, C]
  """

  def __init__(self, nets: Networks, spec: Spec):
    self.spec, self.nets = spec, nets
    self.stage2_params = None
    if nets.stage1 is not None and spec.num_patches in nets.stage2:
      self.stage2_params = nets.stage2[spec.num_patches]
    shared = steps(spec)
    self.stage1, self.stage2 = _Used(shared['stage1']), _Used(shared['stage2'])
    self.window, self.band = _Used(shared['window']), _Used(shared['band'])

  @property
  def compiles(self) -> int:
    """Compilations this model's images need (a fresh process makes them once): stage 1 per
    (height, width) bucket, the bands per width bucket, stage 2 per chunk size (at most 4), the
    dense windows once."""
    return (self.stage1.compiles + self.stage2.compiles + self.window.compiles +
            self.band.compiles)

  @property
  def chunk_sizes(self) -> tuple:
    """Stage 2's batch sizes: native.chunk tiles a call, and for an image's last chunk the
    multiples of chunk / 4 (so at most chunk / 4 - 1 tiles of a call are padding)."""
    k = self.spec.chunk
    step = max(1, k // 4)
    return tuple(range(step, k, step)) + (k,)

  def warm(self, height: int, width: int) -> float:
    """Compiles stage 1 and the bands for an image of height x width (its buckets), and stage 2
    at every chunk size, without running anything; the seconds it took (0 when compiled before)."""
    spec, f = self.spec, self.spec.downscale
    bh, bw = _bucket(-(-height // f), spec.bucket), _bucket(-(-width // f), spec.bucket)
    shaped = jax.ShapeDtypeStruct
    start = time.perf_counter()
    self.stage1.warm(self.nets.stage1, shaped((bh, bw, 3), jnp.float32), shaped((2,), jnp.int32))
    self.band.warm(shaped((_low_rows(BAND_ROWS, f), bw, spec.num_classes), jnp.float32),
                   shaped((), jnp.int32))
    if self.stage2_params is not None:
      for size in self.chunk_sizes:
        self.stage2.warm(self.stage2_params, *self._chunk(size))
    return time.perf_counter() - start

  def _chunk(self, size: int) -> tuple:
    """Zeros for one stage-2 call of `size` tiles: (tiles [K, S, S, 3] uint8, valid [K, S, S],
    patches [K, L, L, C] float32, offsets [K, 2] int32) (see _stage2)."""
    spec = self.spec
    side, span = spec.stage2_side, _low_rows(spec.stage2_side, spec.downscale)
    return (np.zeros((size, side, side, 3), np.uint8), np.zeros((size, side, side), bool),
            np.zeros((size, span, span, spec.num_classes), np.float32),
            np.zeros((size, 2), np.int32))

  def low_resolution(self, image: np.ndarray):
    """Stage 1 on the image's thumbnail: (low-resolution probabilities [bh, bw, C]
    (bucket-padded), (tile scores [gbh, gbw], their ranking [gbh * gbw]; see _stage1), h, w,
    seconds, FLOPs)."""
    spec = self.spec
    start = time.perf_counter()
    thumb = thumbnail(image, spec.downscale)
    h, w = thumb.shape[:2]
    bh, bw = _bucket(h, spec.bucket), _bucket(w, spec.bucket)
    padded = np.zeros((bh, bw, 3), np.float32)
    padded[:h, :w] = thumb
    (low, scores, order), flops = self.stage1(self.nets.stage1, jnp.asarray(padded),
                                              jnp.asarray([h, w], jnp.int32))
    low = np.asarray(low)  # Small: the image / f^2.
    return low, (scores, order), h, w, time.perf_counter() - start, flops

  def coarse_into(self, out: np.ndarray, low: np.ndarray) -> tuple:
    """out [H, W, C] <- the coarse map (low [bh, bw, C]) upsampled, in bands of BAND_ROWS rows;
    (seconds, flops). One compilation per bucket width."""
    height, width = out.shape[:2]
    f = self.spec.downscale
    start, flops, pending = time.perf_counter(), 0.0, None

    def copy(y0, band):
      n = min(BAND_ROWS, height - y0)
      out[y0:y0 + n] = np.asarray(band)[:n, :width]

    for y0 in range(0, height, BAND_ROWS):  # Band i is copied while i + 1 computes.
      rows, offset = _around(low, y0, BAND_ROWS, f)
      band, call = self.band(jnp.asarray(low[rows]), jnp.asarray(offset, jnp.int32))
      flops += call
      if pending is not None:
        copy(*pending)
      pending = y0, band
    copy(*pending)
    return time.perf_counter() - start, flops

  def two_stage(self, image: np.ndarray, *, refine_fraction: Optional[float] = None,
                threshold: Any = 'config', stop=None) -> Optional[NativePrediction]:
    """Two-stage segmentation of one image uint8 [H, W, 3] (see the module docstring).

    refine_fraction and threshold override native.refine_fraction and the config's threshold
    (None: no threshold); the tiles refined are the ceil(fraction * tiles) least confident, less
    those scoring below the threshold. `stop`, a callable, is asked between stage-2 chunks: when it
    says True, None is returned at once.
    """
    if self.stage2_params is None:
      raise InputError(f'native two-stage inference needs stage 1 and stage 2 at '
                       f'Np={self.spec.num_patches}; the networks have {self.nets.names()}.')
    image = _as_uint8(image)
    spec = self.spec
    height, width = image.shape[:2]
    check_fits(height, width, spec)
    fraction = spec.refine_fraction if refine_fraction is None else refine_fraction
    threshold = spec.threshold if threshold == 'config' else threshold
    low, (scores, order), h, w, s1_seconds, s1_flops = self.low_resolution(image)

    tile = spec.patch_size
    gh, gw = -(-height // tile), -(-width // tile)
    rows, cols = np.divmod(np.asarray(order)[:gh * gw], scores.shape[1])  # The image's tiles first.
    scores = np.asarray(scores)[:gh, :gw]
    chosen = (rows * gw + cols)[:math.ceil(fraction * gh * gw)]
    if threshold is not None:
      chosen = chosen[scores.reshape(-1)[chosen] >= threshold]
    refined = np.zeros(gh * gw, bool)
    refined[chosen] = True

    out = np.empty((height, width, spec.num_classes), np.float32)
    band_seconds, band_flops = self.coarse_into(out, low)
    start, s2_flops, calls = time.perf_counter(), 0.0, 0
    side, halo, k, f = spec.stage2_side, spec.halo, spec.chunk, spec.downscale
    span = _low_rows(side, f)
    margin = halo // f + 2  # Low-res rows a tile's patch may start above the map (edge values).
    padded = np.pad(low, ((margin, margin + span), (margin, margin + span), (0, 0)), mode='edge')
    pending = None  # The chunk stage 2 computes (dispatched asynchronously) while the next is cut.
    for c0 in range(0, len(chosen), k):
      if stop is not None and stop():
        return None
      cells = chosen[c0:c0 + k]
      tiles, valid, patches, offsets = self._chunk(
          min(n for n in self.chunk_sizes if n >= len(cells)))
      for i, cell_index in enumerate(cells):
        r, c = divmod(int(cell_index), gw)
        y, x = r * tile - halo, c * tile - halo
        if 0 <= y and y + side <= height and 0 <= x and x + side <= width:
          tiles[i], valid[i] = image[y:y + side, x:x + side], True  # Most tiles: a plain slice.
        else:
          tiles[i], valid[i] = _cut(image, y, x, side)
        ty, tx = y // f - 1, x // f - 1  # The patch's first low-res row and column (see _around).
        patches[i] = padded[ty + margin:ty + margin + span, tx + margin:tx + margin + span]
        offsets[i] = (y - ty * f, x - tx * f)
      probs, call = self.stage2(self.stage2_params, jnp.asarray(tiles), jnp.asarray(valid),
                                jnp.asarray(patches), jnp.asarray(offsets))
      s2_flops += call
      calls += 1
      if pending is not None:
        _paste(out, *pending, gw, tile)
      pending = cells, probs
    if pending is not None:
      _paste(out, *pending, gw, tile)
    s2_seconds = time.perf_counter() - start
    return NativePrediction(
        probs=out, coarse=low[:h, :w], scores=scores, refined=refined.reshape(gh, gw),
        stats={'tiles': gh * gw, 'refined': int(len(chosen)), 'stage2_calls': calls,
               'gflops': {'stage1': s1_flops / 1e9, 'stage2': s2_flops / 1e9,
                          'bands': band_flops / 1e9},
               'seconds': {'stage1': s1_seconds, 'stage2': s2_seconds, 'bands': band_seconds}})

  def stage1_only(self, image: np.ndarray) -> NativePrediction:
    """Stage 1 alone, upsampled to the image's size: probs [H, W, C] float32."""
    image = _as_uint8(image)
    check_fits(*image.shape[:2], self.spec)
    low, _, h, w, s1_seconds, s1_flops = self.low_resolution(image)
    out = np.empty((*image.shape[:2], self.spec.num_classes), np.float32)
    band_seconds, band_flops = self.coarse_into(out, low)
    return NativePrediction(probs=out, coarse=low[:h, :w], scores=None, refined=None, stats={
        'gflops': {'stage1': s1_flops / 1e9, 'bands': band_flops / 1e9},
        'seconds': {'stage1': s1_seconds, 'bands': band_seconds}})

  def sliding_window(self, image: np.ndarray, *, batch: int = 8) -> NativePrediction:
    """The baseline U-Net on windows of native.window px overlapping by native.overlap, each pixel
    the mean of the windows over it (MONAI's sliding_window_inference, mode 'constant'); probs
    [H, W, C] float32 (coarse, scores and refined None)."""
    if self.nets.baseline is None:
      raise InputError(f'the dense reference needs the baseline; the networks have '
                       f'{self.nets.names()}.')
    image = _as_uint8(image)
    spec = self.spec
    height, width = image.shape[:2]
    check_fits(height, width, spec, extra_per_pixel=1)
    side = spec.window_side
    corners = [(y, x) for y in _starts(height, side, spec.overlap)
               for x in _starts(width, side, spec.overlap)]
    out = np.zeros((height, width, spec.num_classes), np.float32)
    count = np.zeros((height, width), np.uint8)
    start, flops, pending = time.perf_counter(), 0.0, None

    def add(chunk, probs):
      probs = np.asarray(probs)
      for i, (y, x) in enumerate(chunk):
        rows, cols = min(side, height - y), min(side, width - x)
        out[y:y + rows, x:x + cols] += probs[i, :rows, :cols]
        count[y:y + rows, x:x + cols] += 1

    for c0 in range(0, len(corners), batch):  # Batch i is added while i + 1 computes.
      chunk = corners[c0:c0 + batch]
      windows = np.zeros((batch, side, side, 3), np.uint8)
      valid = np.zeros((batch, side, side), bool)
      for i, (y, x) in enumerate(chunk):
        windows[i], valid[i] = _cut(image, y, x, side)
      probs, call = self.window(self.nets.baseline, jnp.asarray(windows), jnp.asarray(valid))
      flops += call
      if pending is not None:
        add(*pending)
      pending = chunk, probs
    add(*pending)
    out /= count[..., None]
    return NativePrediction(probs=out, coarse=None, scores=None, refined=None, stats={
        'windows': len(corners), 'gflops': {'dense': flops / 1e9},
        'seconds': {'dense': time.perf_counter() - start}})


def _paste(out: np.ndarray, cells: np.ndarray, probs, grid_width: int, tile: int) -> None:
  """out [H, W, C] <- probs [K, T, T, C] (a stage-2 chunk, waited for here) at the tiles `cells`
  (flat indices into the grid of tiles, grid_width a row), cropped at the image's edge."""
  height, width = out.shape[:2]
  probs = np.asarray(probs)
  for i, cell_index in enumerate(cells):
    r, c = divmod(int(cell_index), grid_width)
    y, x = r * tile, c * tile
    out[y:y + tile, x:x + tile] = probs[i, :min(tile, height - y), :min(tile, width - x)]


def _starts(size: int, side: int, overlap: float) -> list:
  """Window starts along one axis: every round(side * (1 - overlap)) px, the last flush with the end."""
  if size <= side:
    return [0]
  step = max(1, round(side * (1 - overlap)))
  starts = list(range(0, size - side + 1, step))
  return starts if starts[-1] == size - side else starts + [size - side]


def _as_uint8(image) -> np.ndarray:
  """uint8 [H, W, 3] from uint8, or floats in [0, 1] (InputError for anything else)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise InputError(f'an image must be [H, W, 3] (any H x W), got shape {image.shape}.')
  if image.dtype == np.uint8:
    return image
  if image.dtype.kind != 'f':
    raise InputError(f'an image must be uint8 or floats in [0, 1], got dtype {image.dtype}.')
  inference.check_range(float(image.min()), float(image.max()))
  return np.rint(image * 255).astype(np.uint8)


def infer(params: Networks, images, config, *, num_patches: Optional[int] = None,
          check_values: Optional[bool] = None):
  """`iterseg.infer`: at resolution='native', two-stage segmentation of one image [H, W, 3] (any
  size; uint8 or floats in [0, 1]) -> NativePrediction, or of a list of images of any sizes -> a
  list; at the paper's square protocol, `inference.infer` (a batch [B, hi, hi, 3] -> Prediction).
  num_patches: the tile grid stage 2 was trained on (native has one: another is an InputError).
  check_values: native float images are always checked on the host (they become uint8 there)."""
  s = inference.settings_of(config)
  if s.spec.resolution != 'native':
    return inference.infer(params, images, s, num_patches=num_patches, check_values=check_values)
  if num_patches is not None and int(num_patches) != s.spec.num_patches:
    raise InputError(f'num_patches={num_patches}: at native resolution stage 2 works on the tiles '
                     f'it was trained on (num_patches={s.spec.num_patches}, tiles of '
                     f'{s.spec.patch_size} px); leave num_patches out.')
  del check_values  # Always checked: see the docstring.
  inference.check_params(params, s.spec, 'stage1')
  inference.check_params(params, s.spec, 'stage2')
  model = NativeModel(params, s.spec)
  if isinstance(images, (list, tuple)):
    return [model.two_stage(image) for image in images]
  return model.two_stage(images)


def infer_baseline(params: Networks, images, config, *, check_values: Optional[bool] = None):
  """`iterseg.infer_baseline`: the baseline U-Net; at resolution='native' as a sliding window over
  one image of any size (probabilities [H, W, C]) or a list of them, else `inference.infer_baseline`
  on a batch [B, hi, hi, 3]."""
  s = inference.settings_of(config)
  if s.spec.resolution != 'native':
    return inference.infer_baseline(params, images, s, check_values=check_values)
  inference.check_params(params, s.spec, 'baseline')
  model = NativeModel(params, s.spec)
  if isinstance(images, (list, tuple)):
    return [model.sliding_window(image).probs for image in images]
  return model.sliding_window(images).probs


# --- Image files of any size, whatever the protocol (--mode=predict) ------------------------------


class SquareFiles:
  """The paper's protocol on files of any size: each image resized to hi_size x hi_size (bilinear),
  `batch_size` of them a call of the compiled two_stage over the local devices; the probabilities
  come back at hi_size (the caller resizes them to the file's size)."""

  def __init__(self, nets: Networks, s, batch_size: int):
    self.spec, self.batch_size, self.compiles = s.spec, batch_size, None
    self.num_classes, self.grid = s.spec.num_classes, {'num_patches': s.spec.num_patches}
    self.sharding = _sharding(batch_size)
    self.params = inference.replicate_like(nets.at(s.spec.num_patches),
                                           jax.device_put(np.zeros(batch_size), self.sharding))

  def check(self, path) -> None:
    """Any size is resized."""

  def prepare(self, image: np.ndarray) -> np.ndarray:
    return common.resize_image(image, self.spec.hi_size)

  def __call__(self, inputs: list, stopped) -> Optional[list]:
    """[(probs [hi, hi, C], refined [Np*Np] bool)] of each input; None once `stopped` holds (the
    batch in flight is dropped)."""
    padded = pipeline.pad_batch(np.stack(inputs), self.batch_size)
    pred = inference.two_stage(self.params, jax.device_put(padded, self.sharding), self.spec)
    if not wait_ready(pred.probs, stopped):
      return None
    probs, refined = jax.device_get((pred.probs, pred.refined))
    return [(probs[i], refined[i]) for i in range(len(inputs))]


class NativeFiles:
  """Native resolution on files of any size: one image a call of NativeModel.two_stage, at its own
  size; an image too large for the free memory is refused from its header, before it is decoded."""

  def __init__(self, nets: Networks, s, batch_size: int = 1):
    del batch_size  # One image at a time: its tiles are the batch.
    self.model = NativeModel(nets, s.spec)
    self.batch_size, self.num_classes = 1, s.spec.num_classes
    self.grid = {'tile': s.spec.patch_size}

  @property
  def compiles(self) -> int:
    return self.model.compiles

  def check(self, path) -> None:
    check_fits(*common.header_size(path), self.model.spec, decoded=False)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    return image

  def __call__(self, inputs: list, stopped) -> Optional[list]:
    """[(probs [H, W, C], refined [gh, gw] bool)]; None once `stopped` holds (asked between
    stage-2 chunks)."""
    pred = self.model.two_stage(inputs[0], stop=stopped)
    return None if pred is None else [(pred.probs, pred.refined)]


def image_files(nets: Networks, s, batch_size: int):
  """How image files are segmented under `s`: SquareFiles or NativeFiles (one protocol:
  check(path), prepare(image), __call__(inputs, stopped), batch_size, num_classes, grid (the
  overlay's), compiles)."""
  return (NativeFiles if s.spec.resolution == 'native' else SquareFiles)(nets, s, batch_size)


def _sharding(batch: int):
  """Splits a batch over the local devices when it divides evenly (else one device)."""
  devices = jax.local_devices()
  if len(devices) > 1 and batch % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  return jax.sharding.SingleDeviceSharding(devices[0])


def wait_ready(array, stopped, poll: float = 0.02) -> bool:
  """Waits for a device array; False (without waiting longer) once `stopped` holds."""
  while not array.is_ready():
    if stopped():
      return False
    time.sleep(poll)
  return True
