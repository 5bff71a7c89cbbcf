"""Segmenting images, whatever the protocol: the one module that evaluate, calibrate, benchmark,
predict and export go through (`segmenter`, `benchmark_cases`, `image_files`, `one_call`).

The paper's square protocol resizes every image to hi_size and segments a batch in one compiled
call, `inference.two_stage`. At resolution='native', `NativeModel` segments an image of any size
in bounded memory with the same steps (`inference.normalize`, `stage1_outputs`, `tile_scores`,
`select`, `stage2_logits`, `paste`):

  image [H, W, 3] uint8 --mean of f x f blocks (host)--> thumbnail [h, w, 3], padded to a
  bucket --stage 1--> low-resolution probabilities [h, w, C] --mean uncertainty of each tile's
  (T/f)^2 low-res pixels--> the least confident tiles (native.refine_fraction, threshold)
  --stage 2 on chunks of native.chunk tiles (the last one cut to a multiple of chunk / 4) of
  T + 2 halo px, with the coarse probabilities upsampled for each--> the tiles' probabilities
  output [H, W, C] float32, a device buffer written in place: the coarse probabilities upsampled
  (`inference.bilinear`) in bands of rows, the refined tiles pasted over them (`inference.paste`).

f = hi_size / stage1_size and T = hi_size / num_patches, the geometry stage 1 and stage 2 were
trained at (on crops of hi_size). No U-Net activation ever has the image's size: memory is the
image, the output and a working set of one band and one chunk. The compute follows the tiles
refined: stage 2 runs ceil(tiles / chunk) times. Each function is compiled once per size bucket
(stage 1, the bands and the paste per padded size, stage 2 per chunk size), not per image size;
`Compiled` counts them. `sliding_window` is the fair dense reference at the same scale: the
baseline U-Net on overlapping windows blended, as MONAI's `sliding_window_inference` does.
"""

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from iterseg import flops, inference, methods, metrics, models, slides
from iterseg.data import common, pipeline
from iterseg.errors import InputError, SettingsError
from iterseg.models import Networks
from iterseg.spec import Spec

BAND_ROWS = 512  # Rows of the output made by one call (the coarse map, upsampled).
STAGE1_WINDOW, STAGE1_HALO = 1024, 32  # A larger thumbnail: stage 1 on windows of it (px).
WINDOWS = 8  # Dense windows a call of the sliding window.


@dataclasses.dataclass
class NativePrediction:
  """What native two-stage inference returns for one image of H x W.

  probs:   [H, W, C] float32, stage 1 upsampled everywhere, stage 2 in the refined tiles
           (read-only: the device's output as numpy, on a CPU its buffer itself; np.array(probs)
           to write into it).
  coarse:  [ceil(H/f), ceil(W/f), C] float32, stage 1's own (low-resolution) probabilities.
  scores:  [gh, gw] tile uncertainty (gh = ceil(H/T)); higher = less sure.
  refined: [gh, gw] bool, the tiles stage 2 recomputed.
  preview: uint8 [h', w', 3], the thumbnail every `stats['preview_step']`-th px (an overlay's).
  stats:   {'tiles', 'refined', 'stage2_calls', 'gflops' (what ran: stage 1, every stage-2 call,
           the bands), 'seconds': {'stage1', 'stage2', 'bands'}} (stage 2 and the bands are
           dispatched async: time the call to know how long it took).
  """
  probs: np.ndarray
  coarse: np.ndarray
  scores: np.ndarray
  refined: np.ndarray
  stats: dict
  preview: Optional[np.ndarray] = None  # uint8: the thumbnail, every 2^k-th px, <= 1024 px a side.


class Compiled:
  """A jitted function compiled ahead of time once per input shape (a size bucket): its executables
  and XLA's FLOPs per call, shared by every NativeModel of the same Spec (`steps`)."""

  def __init__(self, fn, donate=(), **static):
    self.fn, self.donate, self.static, self.cache = fn, donate, static, {}

  def key(self, *args) -> tuple:
    return tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))

  def executable(self, *args) -> tuple:
    """(the executable for args' shapes, its FLOPs per call), compiled the first time; args may be
    arrays or jax.ShapeDtypeStructs."""
    key = self.key(*args)
    if key not in self.cache:
      compiled = jax.jit(self.fn, static_argnames=tuple(self.static),
                         donate_argnums=self.donate).lower(*args, **self.static).compile()
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
  """The compiled steps of one Spec, made once per process: {'stage1', 'stage1_window', 'scores',
  'order', 'stage2', 'window', 'band', 'paste', 'quantize'} (they depend on shapes and the spec,
  not on the parameters' values); 'band' and 'paste' write into the output they are given
  (donated: in place)."""
  return {'stage1': Compiled(_stage1, spec=spec), 'stage2': Compiled(_stage2, spec=spec),
          'stage1_window': Compiled(_stage1_window, spec=spec),
          'scores': Compiled(_scores, spec=spec), 'order': Compiled(_order, spec=spec),
          'window': Compiled(_window, spec=spec), 'band': Compiled(_band, (0,), spec=spec),
          'paste': Compiled(_paste, (0,), spec=spec), 'quantize': Compiled(_quantize, spec=spec)}


# --- The steps, each jitted per bucket ------------------------------------------------------------


def _stage1(params, thumb, size, *, spec: Spec):
  """thumb [bh, bw, 3] (the thumbnail [h, w] padded to a bucket; size = (h, w)) -> stage 1's
  outputs on it [bh, bw, C (+1)], past (h, w) the last row and column repeated (so that every
  upsampling near the image's edge sees its own border; `_repeat_edges`), ranked: (low-resolution
  probabilities [bh, bw, C]; tile scores [gbh, gbw] (gbh = bh / cell); `_order` of them)."""
  probs = _stage1_window(params, thumb, spec=spec)
  rows = jnp.minimum(jnp.arange(probs.shape[0]), size[0] - 1)
  cols = jnp.minimum(jnp.arange(probs.shape[1]), size[1] - 1)
  probs = probs[rows][:, cols]
  scores = _scores(probs, spec=spec)
  return probs[..., :spec.num_classes], scores, _order(scores, size, spec=spec)


def _repeat_edges(probs: np.ndarray, h: int, w: int) -> None:
  """probs [bh, bw, ...] past (h, w) set to its last row and column inside, in place: what
  `_stage1` does on the device, for the windowed stage 1's host map (no copy of it)."""
  probs[h:] = probs[h - 1]
  probs[:, w:] = probs[:, w - 1:w]


def _stage1_window(params, thumb, *, spec: Spec):
  """Stage 1 on thumb [bh, bw, 3] (a whole thumbnail, or a window of one) -> its outputs [bh, bw,
  C (+1)] (`inference.stage1_outputs`)."""
  logits = models.unet(spec, 'stage1').apply({'params': params},
                                             inference.normalize(thumb, spec)[None])
  return inference.stage1_outputs(logits, spec)[0]


def _scores(probs, *, spec: Spec):
  """Stage 1's outputs [r, bw, C (+1)] (whole cells of rows) -> their tile scores [r / cell,
  bw / cell]: each tile's from its own cell, so a large map is scored a band at a time."""
  return inference.tile_scores(probs[None], spec)[0]


def _order(scores, size, *, spec: Spec):
  """Tile scores [gbh, gbw] -> every tile of the bucket's grid ranked, least sure first, by
  `inference.select`: flat indices [gbh * gbw], the tiles past the image's (size = (h, w) of the
  map) last."""
  cell = spec.patch_size // spec.downscale
  inside = ((jnp.arange(scores.shape[0])[:, None] < -(-size[0] // cell)) &
            (jnp.arange(scores.shape[1])[None, :] < -(-size[1] // cell)))
  order, _ = inference.select(jnp.where(inside, scores, -jnp.inf).reshape(1, -1), scores.size)
  return order[0]


def _band(out, rows, offset, y0, *, spec: Spec):
  """out [1, Hb, Wb, C] (the output, bucket-padded) with its rows y0 .. y0 + R (R = min(BAND_ROWS,
  Hb)) set to the coarse map: rows [L, Wb / f, C], the low-resolution rows around the band, upsampled
  from `offset` (the band's first row, in native px from rows' first)."""
  band = inference.bilinear(rows, spec.downscale, offset, 0, min(BAND_ROWS, out.shape[1]),
                            out.shape[2])
  return jax.lax.dynamic_update_slice(out, band[None], (0, y0, 0, 0))


def _paste(out, probs, rows, cols, count, *, spec: Spec):
  """out [1, Hb, Wb, C] with the first `count` tiles of probs [K, T, T, C] written at (rows, cols)
  [K] each: `inference.paste`, as the square protocol pastes its patches."""
  del spec
  return inference.paste(out, probs, (jnp.zeros_like(rows), rows, cols), count)


def _quantize(out, *, spec: Spec) -> dict:
  """A band of the output [1, R, Wb, C] -> its uint8 outputs [R, Wb] (`slides.quantize`)."""
  del spec
  return slides.quantize(out[0], jnp)


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


thumbnail = slides.thumbnail


def _preview(thumb: np.ndarray, first: int, step: int) -> np.ndarray:
  """uint8: the rows and columns of thumb (rows first .. of the thumbnail) at multiples of step."""
  return np.rint(thumb[-first % step::step, ::step] * 255).astype(np.uint8)


def _bucket(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


def _around(low: np.ndarray, start: int, side: int, factor: int):
  """(the L = ceil(side / f) + 3 low-resolution rows (or columns) that native px start .. start +
  side interpolate from, clipped to the map: a slice where none is clipped (most tiles: no copy),
  else indices [L]; the offset of `start` from the first of them, in native px, in [f, 2f))."""
  first, n = start // factor - 1, low.shape[0]
  count = _low_rows(side, factor)
  if 0 <= first and first + count <= n:
    return slice(first, first + count), start - first * factor
  return np.clip(np.arange(first, first + count), 0, n - 1), start - first * factor


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
        f'about {_mpx(fits)}): free memory, or cut the image into parts of at most '
        f'{fits // width} rows of {width} px.')


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
    self.stage2_params = None if nets.stage1 is None else nets.stage2.get(spec.num_patches)
    shared = steps(dataclasses.replace(spec, refine_fraction=1.0, threshold=None))  # Any budget.
    self.stage1, self.stage2 = _Used(shared['stage1']), _Used(shared['stage2'])
    self.window, self.band = _Used(shared['window']), _Used(shared['band'])
    self.paste, self.quantize = _Used(shared['paste']), _Used(shared['quantize'])
    self.stage1_window = _Used(shared['stage1_window'])
    self.scores, self.order = _Used(shared['scores']), _Used(shared['order'])

  @property
  def compiles(self) -> int:
    """Compilations this model's images need (a fresh process makes them once): stage 1 and the
    bands per (height, width) bucket, the paste per bucket and chunk size, stage 2 per chunk size
    (at most 4), the dense windows once."""
    return sum(step.compiles for step in vars(self).values() if isinstance(step, _Used))

  @property
  def chunk_sizes(self) -> tuple:
    """Stage 2's batch sizes: native.chunk tiles a call, and for an image's last chunk the
    multiples of chunk / 4 (so at most chunk / 4 - 1 tiles of a call are padding)."""
    k = self.spec.chunk
    step = max(1, k // 4)
    return tuple(range(step, k, step)) + (k,)

  def warm(self, height: int, width: int, rows: Optional[int] = None) -> float:
    """Compiles stage 1 and the bands for an image of height x width (its buckets; output bands
    of `rows`, default all), and stage 2 at every chunk size, without running anything; the
    seconds it took (0 when compiled before)."""
    spec, f = self.spec, self.spec.downscale
    bh, bw = _bucket(-(-height // f), spec.bucket), _bucket(-(-width // f), spec.bucket)
    shaped = jax.ShapeDtypeStruct
    f32 = lambda *shape: shaped(shape, jnp.float32)  # What each step is compiled for.
    i32 = lambda *shape: shaped(shape, jnp.int32)
    start = time.perf_counter()
    out = f32(1, rows or bh * f, bw * f, spec.num_classes)
    if self.nets.stage1 is not None and max(bh, bw) <= STAGE1_WINDOW:
      self.stage1.warm(self.nets.stage1, f32(bh, bw, 3), i32(2))
    elif self.nets.stage1 is not None:
      side = STAGE1_WINDOW + 2 * STAGE1_HALO
      self.stage1_window.warm(self.nets.stage1, f32(side, side, 3))
      self.scores.warm(f32(STAGE1_WINDOW, bw, spec.num_classes + spec.error_head))
      cell = spec.patch_size // spec.downscale
      self.order.warm(f32(bh // cell, bw // cell), i32(2))
    if self.nets.stage1 is not None:
      low_rows = _low_rows(min(BAND_ROWS, out.shape[1]), f)
      self.band.warm(out, f32(low_rows, bw, spec.num_classes), i32(), i32())
    if self.stage2_params is not None:
      for size in self.chunk_sizes:
        self.stage2.warm(self.stage2_params, *self._chunk(size))
        tile = spec.patch_size
        self.paste.warm(out, f32(size, tile, tile, spec.num_classes), i32(size), i32(size), i32())
    if self.nets.baseline is not None:
      side = spec.window_side
      self.window.warm(self.nets.baseline, shaped((WINDOWS, side, side, 3), jnp.uint8),
                       shaped((WINDOWS, side, side), jnp.bool_))
    return time.perf_counter() - start

  def _chunk(self, size: int) -> tuple:
    """Zeros for one stage-2 call of `size` tiles: (tiles [K, S, S, 3] uint8, valid [K, S, S],
    patches [K, L, L, C] float32, offsets [K, 2] int32) (see _stage2)."""
    spec = self.spec
    side, span = spec.stage2_side, _low_rows(spec.stage2_side, spec.downscale)
    return (np.zeros((size, side, side, 3), np.uint8), np.zeros((size, side, side), bool),
            np.zeros((size, span, span, spec.num_classes), np.float32),
            np.zeros((size, 2), np.int32))

  @property
  def band_rows(self) -> int:
    """Rows of an output band written to a sink of bands (`slides.SlideSink`): whole tiles, and
    whole tiles of the file written."""
    return math.lcm(self.spec.patch_size, slides.TILE)

  def low_resolution(self, source):
    """Stage 1 on the source's thumbnail: (low-resolution probabilities [bh, bw, C]
    (bucket-padded), (tile scores [gbh, gbw], their ranking [gbh * gbw]; see _stage1), h, w,
    seconds, FLOPs). A thumbnail of at most STAGE1_WINDOW px a side (in its bucket) is one call
    (`_stage1`); a larger one is read in bands of windows that overlap by STAGE1_HALO px (stage 1
    on each, their centres kept), so that no activation grows with the image, then ranked."""
    spec, f = self.spec, self.spec.downscale
    start = time.perf_counter()
    h, w = -(-source.height // f), -(-source.width // f)
    bh, bw = _bucket(h, spec.bucket), _bucket(w, spec.bucket)
    self.preview_step = 2 ** max(0, math.ceil(math.log2(max(h, w) / 1024)))
    size = jnp.asarray([h, w], jnp.int32)
    if max(bh, bw) <= STAGE1_WINDOW:
      padded = np.zeros((bh, bw, 3), np.float32)
      padded[:h, :w] = thumb = source.thumbnail(f)
      self.preview = _preview(thumb, 0, self.preview_step)
      (low, scores, order), flops = self.stage1(self.nets.stage1, jnp.asarray(padded), size)
    else:
      probs, flops = self._windows(source, h, w, bh, bw)
      _repeat_edges(probs, h, w)
      parts = [self.scores(probs[r:r + STAGE1_WINDOW]) for r in range(0, bh, STAGE1_WINDOW)]
      scores = jnp.concatenate([p for p, _ in parts])  # Small: a score a tile.
      order, order_flops = self.order(scores, size)
      low = probs[..., :spec.num_classes]  # The host map itself (a view).
      flops += sum(call for _, call in parts) + order_flops
    low = np.asarray(low)  # Small: the image / f^2.
    return low, (scores, order), h, w, time.perf_counter() - start, flops

  def _windows(self, source, h: int, w: int, bh: int, bw: int) -> tuple:
    """Stage 1's outputs [bh, bw, C (+1)] from windows of S + 2 halo px (S = STAGE1_WINDOW) over
    the bucket-padded thumbnail, each kept for its S x S centre block, read a band of windows at a
    time; FLOPs. A window is moved inside the bucket where it would stick out, so the image's own
    edges are the U-Net's edges, as in one call on the whole thumbnail."""
    f, side = self.spec.downscale, STAGE1_WINDOW
    span = side + 2 * STAGE1_HALO
    starts = lambda n: [(c, min(max(c - STAGE1_HALO, 0), max(n - span, 0)))
                        for c in range(0, n, side)]  # (centre block, window start).
    probs, flops, previews = None, 0.0, []
    band = np.zeros((span, max(bw, span), 3), np.float32)
    for r0, wr in starts(bh):
      band[:] = 0
      a, b = wr, min(wr + span, h)
      if a < b:
        thumb = source.thumbnail(f, rows=(a, b))
        band[:b - a, :w] = thumb
        previews.append(_preview(thumb[r0 - a:min(r0 + side, b) - a], r0, self.preview_step))
      for c0, wc in starts(bw):
        out, call = self.stage1_window(self.nets.stage1, band[:, wc:wc + span])
        out = np.asarray(out)
        if probs is None:
          probs = np.empty((bh, bw, out.shape[-1]), np.float32)
        rows, cols = min(side, bh - r0), min(side, bw - c0)
        probs[r0:r0 + rows, c0:c0 + cols] = out[r0 - wr:r0 - wr + rows, c0 - wc:c0 - wc + cols]
        flops += call
    self.preview = np.concatenate([p for p in previews if len(p)])
    return probs, flops

  def coarse(self, low: np.ndarray, y0: int = 0, rows: Optional[int] = None, stop=None) -> tuple:
    """(a band of the output [1, rows, Wb, C] on the device (default: all of it, Hb rows),
    holding the coarse map of rows y0 .. y0 + rows: low [bh, bw, C] upsampled BAND_ROWS rows a
    call; seconds, FLOPs). One compilation per bucket. `stop` is asked between calls: the band is
    then None."""
    f, (bh, bw) = self.spec.downscale, low.shape[:2]
    rows = rows or bh * f
    start, flops = time.perf_counter(), 0.0
    out = jnp.empty((1, rows, bw * f, low.shape[2]), jnp.float32)
    step = min(BAND_ROWS, rows)
    for y in range(0, rows, step):
      if stop is not None and stop():
        return None, time.perf_counter() - start, flops
      y = min(y, rows - step)  # The last call ends with the band.
      around, offset = _around(low, y0 + y, step, f)
      out, call = self.band(out, low[around], np.asarray(offset, np.int32), np.int32(y))
      flops += call
    return out, time.perf_counter() - start, flops

  def _check(self, image, sink, extra_per_pixel: int = 0) -> tuple:
    """(the image as a source, the sink, default a MemorySink); the output in RAM must fit
    (InputError before any work)."""
    sink = sink or slides.MemorySink()
    source = image if hasattr(image, 'region') else slides.ArraySource(_as_uint8(image))
    if sink.rows is None:
      check_fits(source.height, source.width, self.spec, extra_per_pixel=extra_per_pixel)
    return source, sink

  def two_stage(self, image, *, refine_fraction: Optional[float] = None,
                threshold: Any = 'config', stop=None, sink=None) -> Optional[NativePrediction]:
    """Two-stage segmentation of one image: uint8 [H, W, 3] or a `slides` source (see the module
    docstring); probs in the returned prediction, or written to `sink` by bands (probs None).

    refine_fraction and threshold override native.refine_fraction and the config's threshold
    (None: no threshold); the tiles refined are the ceil(fraction * tiles) least confident, less
    those scoring below the threshold. `stop`, a callable, is asked after stage 1, between the
    bands and between stage-2 chunks: when it says True, None is returned at once.
    """
    if self.stage2_params is None:
      raise InputError(f'native two-stage inference needs stage 1 and stage 2 at '
                       f'Np={self.spec.num_patches}; the networks have {self.nets.names()}.')
    source, sink = self._check(image, sink)
    spec = self.spec
    height, width = source.height, source.width
    fraction = spec.refine_fraction if refine_fraction is None else refine_fraction
    threshold = spec.threshold if threshold == 'config' else threshold
    low, (scores, order), h, w, *stage1 = self.low_resolution(source)
    if stop is not None and stop():
      return None
    tile = spec.patch_size
    gh, gw = -(-height // tile), -(-width // tile)
    rows, cols = np.divmod(np.asarray(order)[:gh * gw], scores.shape[1])  # The image's tiles first.
    scores = np.asarray(scores)[:gh, :gw]
    chosen = (rows * gw + cols)[:math.ceil(fraction * gh * gw)]
    if threshold is not None:
      chosen = chosen[scores.reshape(-1)[chosen] >= threshold]
    refined = np.zeros(gh * gw, bool)
    refined[chosen] = True
    stats = self._bands(source, low, chosen, gw, sink, stop, stage1)
    if stats is None:
      return None
    return NativePrediction(probs=self._result(sink, height, width), coarse=low[:h, :w],
                            scores=scores, refined=refined.reshape(gh, gw),
                            stats=dict(stats, tiles=gh * gw, refined=int(len(chosen)),
                                       preview_step=self.preview_step), preview=self.preview)

  def _bands(self, source, low, chosen, gw: int, sink, stop, stage1) -> Optional[dict]:
    """Writes the output to `sink` band by band (one band in RAM): the coarse map, then stage 2
    on the `chosen` tiles of the band (flat indices into the gw-wide grid), chunk by chunk, pasted
    over it. Bands the sink has (a resumed job) are skipped. The stats, stage 1's `stage1` =
    (seconds, FLOPs) among them, or None once stopped."""
    spec, f = self.spec, self.spec.downscale
    tile, side, halo, k = spec.patch_size, spec.stage2_side, spec.halo, spec.chunk
    rows = sink.rows or low.shape[0] * f
    seconds, flops, calls = {'bands': 0.0, 'stage2': 0.0, 'write': 0.0}, [0.0, 0.0], 0
    top = chosen // gw * tile
    for y0 in range(0, source.height if sink.rows else 1, rows):
      if sink.done(y0):
        continue
      out, band_seconds, band_flops = self.coarse(low, y0, rows, stop)
      if out is None:
        return None
      seconds['bands'] += band_seconds
      flops[0] += band_flops
      start = time.perf_counter()
      cells = chosen[(top >= y0) & (top < y0 + rows)] if sink.rows else chosen
      cells = cells[np.lexsort((cells // gw, cells % gw))]  # Column by column: a file's tiles
      # are read while they are in the reader's cache, whatever the image's width.
      boxes = lambda part: [(int(i) // gw * tile - halo, int(i) % gw * tile - halo, side)
                            for i in part]
      source.prefetch(boxes(cells[:k]))
      for c0 in range(0, len(cells), k):  # Stage 2 computes a chunk while the next is read.
        if stop is not None and stop():
          return None
        part = cells[c0:c0 + k]
        source.prefetch(boxes(cells[c0 + k:c0 + 2 * k]))
        tiles, valid, patches, offsets = self._chunk(
            min(n for n in self.chunk_sizes if n >= len(part)))
        corners = np.zeros((2, len(tiles)), np.int32)
        for i, cell_index in enumerate(part):
          r, c = divmod(int(cell_index), gw)
          corners[:, i] = r * tile - y0, c * tile
          y, x = r * tile - halo, c * tile - halo
          tiles[i], valid[i] = source.region(y, x, side)
          (ys, oy), (xs, ox) = _around(low, y, side, f), _around(low[0], x, side, f)
          patches[i] = low[ys][:, xs]  # Edge values past the map.
          offsets[i] = (oy, ox)
        probs, call = self.stage2(self.stage2_params, tiles, valid, patches, offsets)
        out, _ = self.paste(out, probs, *corners, np.int32(len(part)))
        flops[1] += call
        calls += 1
      seconds['stage2'] += time.perf_counter() - start
      start = time.perf_counter()
      sink.put(y0, self.quantize(out)[0] if sink.quantized else out)
      seconds['write'] += time.perf_counter() - start
    gflops = {'stage2': flops[1] / 1e9, 'bands': flops[0] / 1e9, 'stage1': stage1[1] / 1e9}
    return {'stage2_calls': calls, 'seconds': dict(seconds, stage1=stage1[0]), 'gflops': gflops}

  @staticmethod
  def _result(sink, height: int, width: int) -> Optional[np.ndarray]:
    """The probabilities [H, W, C] a MemorySink holds (on a CPU, the device's buffer itself)."""
    return None if sink.rows else np.asarray(sink.buffer)[0, :height, :width]

  def stage1_only(self, image, *, sink=None) -> NativePrediction:
    """Stage 1 alone, upsampled to the image's size: probs [H, W, C] float32 (or to `sink`)."""
    source, sink = self._check(image, sink)
    low, _, h, w, *stage1 = self.low_resolution(source)
    stats = self._bands(source, low, np.zeros(0, np.int64), 1, sink, None, stage1)
    del stats['stage2_calls'], stats['gflops']['stage2'], stats['seconds']['stage2']
    return NativePrediction(probs=self._result(sink, source.height, source.width),
                            coarse=low[:h, :w], scores=None, refined=None, stats=stats)

  def run(self, key: str, image, sink=None) -> NativePrediction:
    """The method `key` names ('baseline': the sliding window; 'stage1'; 'two_stage_np<N>')."""
    if key == 'baseline':
      return self.sliding_window(image, sink=sink)
    if key == 'stage1':
      return self.stage1_only(image, sink=sink)
    return self.two_stage(image, sink=sink)

  def sliding_window(self, image, *, batch: int = WINDOWS, sink=None,
                     stop=None) -> Optional[NativePrediction]:
    """The baseline U-Net on windows of native.window px overlapping by native.overlap, each pixel
    the mean of the windows over it weighted by `blend_weights` (MONAI's sliding_window_inference,
    mode native.blend); probs [H, W, C] float32 (coarse, scores and refined None), or written to
    `sink` by bands: then the sums are kept for a band and the rows its windows reach, and only the
    windows reaching a band the sink has not (`done`) run. `stop` is asked between calls (None)."""
    if self.nets.baseline is None:
      raise InputError(f'the dense reference needs the baseline; the networks have '
                       f'{self.nets.names()}.')
    source, sink = self._check(image, sink, extra_per_pixel=4)
    spec = self.spec
    height, width, side = source.height, source.width, spec.window_side
    rows = sink.rows or height
    todo = {y0 for y0 in range(0, height, rows) if not sink.done(y0)}
    across = _starts(width, side, spec.overlap)
    corners = [(y, x) for y in _starts(height, side, spec.overlap)
               if todo & set(range(y // rows * rows, min(y + side, height), rows)) for x in across]
    span = min(height, rows + side)  # Rows of sums held: a band and the rows its windows reach.
    out = np.zeros((span, width, spec.num_classes), np.float32)
    total = np.zeros((span, width), np.float32)
    weights = blend_weights(side, spec.blend)
    start, flops, pending, done = time.perf_counter(), 0.0, None, [0, 0]  # Rows final, row out[0].

    def flush(final: int):
      """Puts the bands to do of rows that no window still to come reaches, and shifts the sums."""
      while done[0] + rows <= final or (final == height and done[0] < height):
        n, i = min(rows, height - done[0]), done[0] - done[1]
        if done[0] in todo:
          sink.put(done[0], (out[i:i + n] / total[i:i + n, :, None])[None])
        done[0] += n
      shift = min(done[0] - done[1], span)
      if shift:
        out[:span - shift], total[:span - shift] = out[shift:], total[shift:]
        out[span - shift:], total[span - shift:] = 0, 0
      done[1] = done[0]

    def add(chunk, probs):
      probs = np.asarray(probs)
      for i, (y, x) in enumerate(chunk):
        flush(y)
        h, w = min(side, height - y), min(side, width - x)
        y -= done[1]
        out[y:y + h, x:x + w] += probs[i, :h, :w] * weights[:h, :w, None]
        total[y:y + h, x:x + w] += weights[:h, :w]

    for c0 in range(0, len(corners), batch):  # Batch i is added while i + 1 computes.
      if stop is not None and stop():
        return None
      chunk = corners[c0:c0 + batch]
      windows = np.zeros((batch, side, side, 3), np.uint8)
      valid = np.zeros((batch, side, side), bool)
      for i, (y, x) in enumerate(chunk):
        windows[i], valid[i] = source.region(y, x, side)
      probs, call = self.window(self.nets.baseline, windows, valid)
      flops += call
      if pending is not None:
        add(*pending)
      pending = chunk, probs
    if pending is not None:
      add(*pending)
    if sink.rows:
      flush(height)
    else:
      out /= total[..., None]
      sink.put(0, out[None])
    return NativePrediction(probs=self._result(sink, height, width), coarse=None, scores=None,
                            refined=None, stats={
                                'windows': len(corners), 'gflops': {'dense': flops / 1e9},
                                'seconds': {'dense': time.perf_counter() - start}})


def blend_weights(side: int, blend: str) -> np.ndarray:
  """float32 [side, side]: how much a window's pixel counts where windows overlap. 'gaussian':
  MONAI's importance map, exp(-d^2 / (2 sigma^2)) from the centre with sigma = side / 8, at most 1,
  at least its smallest non-zero value; 'constant': 1 (a plain mean)."""
  if blend == 'constant':
    return np.ones((side, side), np.float32)
  d = (np.arange(side) - (side - 1) / 2) / (0.125 * side)
  g = np.exp(-0.5 * d ** 2)
  weights = np.outer(g, g) / g.max() ** 2
  return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


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


# --- What evaluate and calibrate run, whatever the protocol ---------------------------------------


class Square:
  """The paper's protocol as the modes run it: batches of up to `batch_size` images at hi_size (a
  partial batch padded to the first one's size, so nothing recompiles), each `methods.Method` one
  compiled call a batch. `measure(batch)` -> {key: {name: [one value per image]}}: the metrics,
  with fov=True also inside each image's field of view ('fov_<metric>'), the seam metrics
  (`metrics.seam_band`, at the method's Np or `seam_np`), 'refined_fraction', 'gflops'
  (`gflops[key]`, the paper's accounting, where given) and 'seconds' (the batch's blocked call
  shared by its images)."""

  def __init__(self, comparison, num_classes: int, *, batch_size: int, seam_np=None,
               gflops=None, compiled_gflops=None, nets=None, s=None):
    self.comparison, self.num_classes, self.batch_size = list(comparison), num_classes, batch_size
    self.seam_np, self.gflops, self.compiled_gflops = seam_np, gflops or {}, compiled_gflops or {}
    self.nets, self.s, self.bands, self.padded, self.warmed = nets, s, {}, None, False
    self.keys = [m.key for m in self.comparison]

  def batches(self, examples):
    return pipeline.eval_batches(examples, self.batch_size)

  def _arrays(self, batch):
    self.padded = max(self.padded or 0, len(batch['image']))  # A first batch short of a skip.
    return (jnp.asarray(pipeline.pad_batch(np.asarray(batch['image']), self.padded)),
            jnp.asarray(pipeline.pad_batch(np.asarray(batch['mask']), self.padded)))

  def warm(self, batch) -> None:
    """Compiles every method on the first batch (one call each), so that no timed call compiles."""
    if not self.warmed:
      images, _ = self._arrays(batch)
      for m in self.comparison:
        jax.block_until_ready(m(images))
      self.warmed = True

  def measure(self, batch, *, fov: bool = False, keep=None) -> dict:
    """`keep(key, i, probs)`, where given, is handed each image's probabilities [H, W, C]."""
    b = len(batch['image'])
    images, masks = self._arrays(batch)
    inside = jnp.asarray(metrics.field_of_view(np.asarray(images))) if fov else None  # Padded.
    out = {}
    for m in self.comparison:
      start = time.perf_counter()
      probs, fraction = jax.block_until_ready(m(images))
      values = {'seconds': [(time.perf_counter() - start) / b] * b}
      for name, v in jax.device_get(metrics.image_metrics(probs, masks, self.num_classes)).items():
        values[name] = v[:b].tolist()
      if fov:
        fovs = jax.device_get(metrics.image_metrics(probs, masks, self.num_classes, inside))
        values.update({f'fov_{k}': v[:b].tolist() for k, v in fovs.items()})
      for i in range(b if keep else 0):
        keep(m.key, i, np.asarray(probs[i]))
      n = m.num_patches or self.seam_np
      if n:
        hi = images.shape[1]
        if n not in self.bands:
          self.bands[n] = jnp.asarray(metrics.seam_band(hi, n, max(2, hi // n // 8)))
        band = self.bands[n]
        seam = jax.device_get(metrics.image_metrics(probs, masks, self.num_classes, band))
        values.update({f'seam_{k}': seam[k][:b].tolist() for k in ('soft_dice', 'hard_dice')})
      if fraction is not None:
        values['refined_fraction'] = np.asarray(fraction)[:b].tolist()
      if m.key in self.gflops:
        values['gflops'] = [self.gflops[m.key]] * b
      out[m.key] = values
    return out

  def only(self, key: str) -> 'Square':
    return Square([m for m in self.comparison if m.key == key], self.num_classes,
                  batch_size=self.batch_size, seam_np=self.seam_np, gflops=self.gflops,
                  compiled_gflops=self.compiled_gflops, nets=self.nets, s=self.s)

  def at(self, point: dict) -> 'Square':
    """Two-stage alone at an operating point (`POINT_FIELDS`)."""
    spec = self.s.at_operating_point(point).spec
    method = methods.two_stage(self.nets, spec)
    counts = flops.network_flops(self.s, [spec.num_patches])
    return Square([method], self.num_classes, batch_size=self.batch_size,
                  gflops={method.key: counts.two_stage(spec) / 1e9})

  def sweep(self, plan) -> list:
    """The operating points calibrate measures: every k (`refine_counts`) and threshold at each Np
    with a stage 2."""
    n_list = sorted(self.nets.stage2) if self.nets.stage1 is not None else []
    return [{'num_patches': n, 'refine_count': k, 'refine_fraction': None, 'threshold': t}
            for n in n_list for k in refine_counts(n, plan.refine_counts) for t in plan.thresholds]


def refine_counts(num_patches: int, configured=None) -> list:
  """The k swept at Np: `configured` up to Np * Np, or 1, 2, 4, ... up to Np * Np and Np itself."""
  cells = num_patches * num_patches
  if configured is not None:
    return sorted({int(k) for k in configured if 1 <= k <= cells})
  return sorted({2 ** i for i in range(cells.bit_length()) if 2 ** i <= cells} | {num_patches})


class Native:
  """resolution='native' as the modes run it: one image a batch at its own size, each method of a
  NativeModel ('baseline': the sliding window; 'stage1'; 'two_stage_np<N>'), every size bucket
  compiled before it is timed. `measure(batch)` as `Square.measure`, with 'gflops' what ran."""

  def __init__(self, model: NativeModel, num_classes: int, keys=None, s=None):
    self.model, self.num_classes, self.s, self.batch_size = model, num_classes, s, 1
    two_stage = methods.method_key('two_stage', model.spec.num_patches)
    present = {'baseline': model.nets.baseline is not None, 'stage1': model.nets.stage1 is not None,
               two_stage: model.stage2_params is not None}
    self.keys = [k for k, ok in present.items() if ok and (keys is None or k in keys)]
    self.compiled_gflops = {}

  def batches(self, examples):
    for e in examples:
      yield {'image': [e['image']], 'mask': [e['mask']], 'name': [str(e['name'])]}

  def warm(self, batch) -> None:
    self.model.warm(*batch['mask'][0].shape)

  def measure(self, batch, *, fov: bool = False, keep=None) -> dict:
    image, mask, out = batch['image'][0], batch['mask'][0], {}
    inside = metrics.field_of_view(image) if fov else None
    for key in self.keys:
      start = time.perf_counter()
      pred = self.model.run(key, image)  # Returns once its probabilities are ready.
      seconds = time.perf_counter() - start
      values = {k: [v] for k, v in metrics.one_image_metrics(pred.probs, mask,
                                                             self.num_classes).items()}
      if fov:
        values.update({f'fov_{k}': [v] for k, v in metrics.one_image_metrics(
            pred.probs, mask, self.num_classes, inside).items()})
      if keep:
        keep(key, 0, pred.probs)
      values.update({k: [v] for k, v in _ran(pred).items() if v is not None})
      values['seconds'] = [seconds]  # The call, not its stats: stage 2 and the bands run async.
      out[key] = values
    return out

  def only(self, key: str) -> 'Native':
    return Native(self.model, self.num_classes, [key], self.s)

  def at(self, point: dict) -> 'Native':
    """Two-stage alone at an operating point (the compiled steps are shared)."""
    spec = self.s.at_operating_point(point).spec
    nets = self.model.nets.at(spec.num_patches)
    return Native(NativeModel(nets, spec), self.num_classes,
                  [methods.method_key('two_stage', spec.num_patches)], self.s)

  def sweep(self, plan) -> list:
    """Every refine_fraction and threshold of the plan at the trained Np."""
    return [{'num_patches': self.model.spec.num_patches, 'refine_count': None,
             'refine_fraction': f, 'threshold': t}
            for f in plan.refine_fractions for t in plan.thresholds]


def segmenter(nets: Networks, s, *, batch_size: Optional[int] = None):
  """What evaluate and calibrate run under `s`: Square (every method of `nets` at hi_size, with
  the paper's FLOP accounting and XLA's count of each compiled function) or Native."""
  if s.spec.resolution == 'native':
    return Native(NativeModel(nets, s.spec), s.spec.num_classes, s=s)
  comparison = methods.methods(nets, s)
  nps = sorted(nets.stage2) if nets.stage1 is not None else []
  counts = flops.network_flops(s, nps)
  gflops = {'baseline': counts.baseline / 1e9, 'stage1': counts.stage1 / 1e9}
  compiled = dict(gflops)
  for n in nps:
    key = methods.method_key('two_stage', n)
    gflops[key] = counts.two_stage(s.spec_for(n)) / 1e9
    count = flops.two_stage_compiled_flops(s.spec_for(n))
    compiled[key] = None if count is None else count / 1e9
  return Square(comparison, s.spec.num_classes, batch_size=batch_size or s.eval.batch_size,
                seam_np=s.spec.num_patches, gflops=gflops, compiled_gflops=compiled, nets=nets,
                s=s)


# --- What the benchmark times, whatever the protocol ----------------------------------------------


@dataclasses.dataclass
class Timed:
  """One method on one benchmark input: compile() -> seconds (0 if compiled before), call() ->
  {'gflops': per call (None where XLA gives none), 'refined_fraction' (None for one-stage methods),
  'probs': [H, W, C] for scoring (None without a mask)}, blocked on."""
  name: str
  num_patches: Optional[int]
  compile: Any
  call: Any

  @property
  def key(self) -> str:
    return methods.method_key(self.name, self.num_patches)


@dataclasses.dataclass
class Case:
  """One benchmark input: `label` ('batch 2', '4096x4096'), `size` ('HxW'), `batch_size` images of
  `pixels` in all; make() -> (methods [Timed], mask packed into bits or None, extra () -> dict or
  None: what else this input shows)."""
  label: str
  size: str
  batch_size: int
  pixels: int
  make: Any


def square_cases(comparison, hi_size: int, batch_sizes) -> list:
  """The square protocol's inputs: a batch of random uint8 images [b, hi, hi, 3] per batch size,
  each method of `comparison` compiled ahead of time (`jit(...).lower(...).compile()`)."""

  def make(b):
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (b, hi_size, hi_size, 3), np.uint8))
    return [_aot(m, images) for m in comparison], None, lambda: None

  return [Case(f'batch {b}', f'{hi_size}x{hi_size}', b, b * hi_size ** 2,
               functools.partial(make, int(b))) for b in batch_sizes]


def _aot(method, images) -> Timed:
  compiled = {}

  def compile_():
    start = time.perf_counter()
    compiled['fn'] = method.lower(images).compile()
    compiled['flops'] = flops.compiled_flops(compiled['fn'])
    return time.perf_counter() - start

  def call():
    _, fraction = jax.block_until_ready(compiled['fn'](method.params, images))
    return {'gflops': None if compiled['flops'] is None else compiled['flops'] / 1e9,
            'refined_fraction': None if fraction is None else float(np.mean(fraction)),
            'probs': None}

  return Timed(method.name, method.num_patches, compile_, call)


def native_cases(model: NativeModel, sides) -> list:
  """Native resolution's inputs: a synthetic scene of side x side per side (scene indices from
  10 000: never seen in training), two-stage and the dense sliding window ('baseline') on it; the
  extra, up to 4096 px: the stage-2 time a threshold at the median score of the refined tiles
  saves."""
  from iterseg.data import synthetic  # pylint: disable=g-import-not-at-top

  def make(side):
    scene = synthetic.make_highres_example(10_000 + side, side, side)
    image, mask = scene['image'], np.packbits(scene['mask'] > 0, axis=1)  # The mask in 1/8.
    del scene
    last = {}

    def two_stage():
      pred = model.two_stage(image)
      last['pred'] = dataclasses.replace(pred, probs=None, coarse=None)  # The stats and tiles.
      return dict(_ran(pred), probs=pred.probs)

    def dense():
      pred = model.sliding_window(image)
      return dict(_ran(pred), probs=pred.probs)

    def saving():  # At the sizes where it is cheap.
      return _threshold_saving(model, image, last.get('pred')) if side <= 4096 else None

    timed = [Timed('two_stage', model.spec.num_patches, lambda: model.warm(side, side), two_stage)]
    if model.nets.baseline is not None:
      timed.append(Timed('baseline', None, lambda: model.warm(side, side), dense))
    return timed, mask, saving

  return [Case(f'{side}x{side}', f'{side}x{side}', 1, side * side, functools.partial(make, side))
          for side in sides]


def slide_cases(model: NativeModel, sides, folder: Optional[str] = None) -> list:
  """Slides out of core, file to file: a synthetic pyramidal TIFF of side x side per side
  (`synthetic.write_slide`: JPEG tiles of 512 where imagecodecs is installed, else deflate; a third
  tissue), written into `folder` (default: a temporary one, removed at exit) when the case is
  made. Two-stage and the dense sliding window each read it through `slides.TiffSource` and write
  the mask with `slides.SlideSink` (assembled); each call starts afresh (no resume). The extra:
  the share of full-resolution pixels two-stage decoded and the tissue's share."""
  import atexit  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from iterseg.data import synthetic  # pylint: disable=g-import-not-at-top
  if folder is None and sides:
    folder = tempfile.mkdtemp(prefix='iterseg-slides-')
    atexit.register(shutil.rmtree, folder, True)
  codec = 'jpeg' if importlib.util.find_spec('imagecodecs') else 'zlib'

  def make(side):
    path = Path(folder) / f'slide_{side}.ome.tif'
    tissue = synthetic.write_slide(path, side, compression=codec)['tissue']
    shown = {}

    def run(method):
      source = slides.TiffSource(path)
      out = Path(folder) / f'slide_{side}_{method}_mask.ome.tif'
      shutil.rmtree(out.with_name(out.name + '.partial'), ignore_errors=True)  # Never resumed.
      sink = slides.SlideSink(out, side, side, {'method': method}, rows=model.band_rows)
      pred = model.run(method, source, sink)
      sink.close()
      source.close()
      out.unlink()
      shown[method] = source.decoded / side ** 2
      return dict(_ran(pred), probs=None, decoded=shown[method])

    warm = lambda: model.warm(side, side, model.band_rows)
    timed = [Timed('two_stage', model.spec.num_patches, warm,
                   lambda: run(methods.method_key('two_stage', model.spec.num_patches)))]
    if model.nets.baseline is not None:
      timed.append(Timed('baseline', None, warm, lambda: run('baseline')))
    return timed, None, lambda: {'size': f'{side}x{side} slide', 'codec': codec,
                                 'tissue': tissue, 'decoded': dict(shown)}

  return [Case(f'{side}x{side} slide', f'{side}x{side}', 1, side * side,
               functools.partial(make, side)) for side in sides]


def _ran(pred: NativePrediction) -> dict:
  """{'gflops': what ran, 'refined_fraction': the tiles stage 2 refined, None for one stage}."""
  return {'gflops': sum(pred.stats['gflops'].values()),
          'refined_fraction': None if pred.refined is None else (
              pred.stats['refined'] / pred.stats['tiles'])}


def _threshold_saving(model: NativeModel, image: np.ndarray, pred) -> Optional[dict]:
  """Two-stage again with a threshold at the median score of the tiles `pred` refined (about half
  of them are refined), and once more without it: the seconds of each whole call (blocked: stage
  2 runs async, so its own stats undercount it) and the stage-2 FLOPs; None for too few tiles."""
  if pred is None:
    return None
  chosen = pred.scores.reshape(-1)[pred.refined.reshape(-1)]
  if len(chosen) < 2 * model.spec.chunk:
    return None
  threshold = float(np.median(chosen))
  runs = []
  for t in (None, threshold):
    start = time.perf_counter()
    runs.append((model.two_stage(image, threshold=t), time.perf_counter() - start))
  (pred, before), (again, after) = runs
  return {'size': f'{image.shape[0]}x{image.shape[1]}', 'threshold': threshold,
          'tiles': [pred.stats['refined'], again.stats['refined']],
          'seconds': [before, after], 'cut': 1 - after / before,
          'gflops': [pred.stats['gflops']['stage2'], again.stats['gflops']['stage2']]}


def benchmark_cases(nets: Networks, s, *, batch_sizes, sliding_window_nps) -> list:
  """What --mode=benchmark times under `s`: `square_cases` (every method of `nets`, and the
  sliding window that refines every patch at `sliding_window_nps`, at each batch size) or
  `native_cases` (benchmark.native_sides)."""
  if s.spec.resolution == 'native':
    model = NativeModel(nets, s.spec)
    return (native_cases(model, s.benchmark.native_sides) +
            slide_cases(model, s.benchmark.slide_sides))
  comparison = [m for m in methods.methods(nets, s, sliding_window=True)
                if m.name != 'sliding_window' or m.num_patches in sliding_window_nps]
  return square_cases(comparison, s.spec.hi_size, batch_sizes)


def one_call(s):
  """The square protocol's compiled two-stage function (`inference.two_stage`), which --mode=export
  serialises; SettingsError at resolution='native', whose inference is a host-driven loop over each
  image's size buckets and tiles, not one graph."""
  if s.spec.resolution == 'native':
    raise SettingsError("config.resolution='native' cannot be exported: its inference loops over "
                        'the tiles of each image on the host. Export a square config.')
  return inference.two_stage


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
    self.num_classes, self.num_patches = s.spec.num_classes, s.spec.num_patches
    self.sharding = _sharding(batch_size)
    self.params = inference.replicate_like(nets.at(s.spec.num_patches),
                                           jax.device_put(np.zeros(batch_size), self.sharding))

  def check(self, path) -> None:
    """Any image file is resized; a Zarr store or an OpenSlide format is an InputError (Pillow
    cannot read them: they are read out of core, at resolution='native' only)."""
    if slides.is_zarr(path) or Path(path).suffix.lower() in slides.OPENSLIDE_SUFFIXES:
      raise InputError(f'{path} is a slide, which iterseg reads out of core at '
                       f"resolution='native' only (e.g. configs/native_demo.py); this config "
                       f'resizes every image to hi_size. Use a native config, or convert it to '
                       f'an image file.')

  def slide(self, path) -> bool:
    """Never out of core: every image is resized."""
    del path
    return False

  def prepare(self, image: np.ndarray) -> np.ndarray:
    return common.resize_image(image, self.spec.hi_size)

  def boxes(self, refined: np.ndarray, height: int, width: int) -> list:
    """(y0, x0, y1, x1) of each refined patch (refined [Np*Np] bool), its grid scaled to the
    file's height x width."""
    n = self.num_patches
    edge = lambda i, size: round(i * size / n)
    return [(edge(r, height), edge(c, width), edge(r + 1, height), edge(c + 1, width))
            for r, c in map(lambda i: divmod(int(i), n), np.flatnonzero(refined))]

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

  @property
  def compiles(self) -> int:
    return self.model.compiles

  def check(self, path) -> None:
    check_fits(*common.header_size(path), self.model.spec, decoded=False)

  def slide(self, path) -> bool:
    """Whether `path` is read and written out of core (`slides.is_slide`: predict.predict_slide)."""
    return slides.is_slide(path)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    return image

  def boxes(self, refined: np.ndarray, height: int, width: int) -> list:
    """(y0, x0, y1, x1) of each refined tile (refined [gh, gw] bool), cut at the image's edge."""
    tile = self.model.spec.patch_size
    return [(r * tile, c * tile, min((r + 1) * tile, height), min((c + 1) * tile, width))
            for r, c in zip(*np.nonzero(refined))]

  def __call__(self, inputs: list, stopped) -> Optional[list]:
    """[(probs [H, W, C], refined [gh, gw] bool)]; None once `stopped` holds (asked between
    stage-2 chunks)."""
    pred = self.model.two_stage(inputs[0], stop=stopped)
    return None if pred is None else [(pred.probs, pred.refined)]


def image_files(nets: Networks, s, batch_size: int):
  """How image files are segmented under `s`: SquareFiles or NativeFiles (one protocol:
  check(path), prepare(image), __call__(inputs, stopped), boxes(refined, h, w) (the overlay's),
  batch_size, num_classes, compiles)."""
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
