"""--mode=predict: segment image files of any size with the trained two-stage method.

  files --read threads: header checked, decoded (iterseg.data.common's contract), prepared-->
  `segment` (native.image_files: square, batches resized to hi through two_stage over every local
  device; native, one image at its own size) --> probabilities --writer threads: resized to each
  file's size (square), threshold / argmax, encode--> outputs

One pipeline whatever the resolution: only `segment` differs.

Written per input image `<stem>` into predict.output (default `<workdir>/predictions`), as
predict.outputs selects:
  <stem>_mask.png     binary: 0 / 255 (foreground where p > 0.5); num_classes > 1: class ids (uint8).
  <stem>_prob.png     binary: the foreground probability as a 16-bit grey PNG, value = round(p * 65535).
  <stem>_probs.npy    num_classes > 1 (instead of _prob.png): float32 [h, w, C] class probabilities.
  <stem>_overlay.png  the image with the mask tinted and the patches stage 2 refined outlined (yellow).
At resolution='native', a slide (`slides.is_slide`: a tiled or pyramidal TIFF, a Zarr store, an
OpenSlide format) is read and written out of core (`predict_slide`): `<stem>_mask.ome.tif` (or
.ome.zarr, predict.slide_format), `<stem>_prob.ome.tif` and a small `<stem>_overlay.png`.
A folder is read non-recursively (so an output folder inside it is never read); files whose
extension Pillow does not know are skipped. Output names never collide (`output_names`): a stem that
two inputs share (a.png, a.jpg) gives way to the full file name (a_png, a_jpg), and a name still
taken (by a_png.png, or a file differing only in case) gets a short hash of its file name. Each
image's outputs are replaced whole or not at all (a full disk leaves its previous set).

Memory stays bounded whatever the number of files: a few batches are read ahead and a few written
behind. Ctrl-C or SIGTERM stops within about a second (the batch in flight is dropped), writes
`summary.json` for what was done and says how to go on: `predict.skip_existing=True` skips every
input whose outputs all exist. A file that cannot be read or written is reported and the others go
on; `summary.json` lists every input with its outputs or its error, and the run fails (PredictError)
if any image failed.
"""

import collections
import concurrent.futures
import hashlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from iterseg import checkpoints, files, hooks, models, native, slides
from iterseg.data import common
from iterseg.errors import InputError, Interrupted, PredictError
from iterseg.run import Run
from iterseg.settings import Settings

TINTS = np.array([(0, 255, 0), (0, 160, 255), (255, 0, 0), (255, 0, 255), (255, 128, 0),
                  (0, 255, 255), (128, 0, 255), (255, 255, 255)], np.float32)
OUTLINE = (255, 255, 0)
SLIDE_SUFFIXES = {'tiff': '.ome.tif', 'zarr': '.ome.zarr'}  # predict.slide_format: the outputs'.


# --- Inputs -------------------------------------------------------------------------------------------


def list_inputs(path, exclude: Optional[str] = None) -> list:
  """The image files at `path` (a file or Zarr store, or a folder's image files and Zarr stores
  sorted by name); InputError if none.

  Files inside `exclude` (the output folder) are never inputs.
  """
  if not str(path):
    raise InputError('config.predict.input is empty: set --config.predict.input=<an image file or a '
                     'folder of images>.')
  path = Path(os.path.expanduser(str(path)))
  if not path.exists():
    raise InputError(f'config.predict.input={path} does not exist: point it at an image file or a '
                     f'folder of images.')
  if path.is_file() or slides.is_zarr(path):
    return [path]
  extensions = ({ext.lower() for ext in Image.registered_extensions()} | set(slides.TIFF_SUFFIXES) |
                set(slides.OPENSLIDE_SUFFIXES))
  outside = lambda p: exclude is None or Path(os.path.realpath(p)).parent != Path(
      os.path.realpath(exclude))
  found = sorted(p for p in path.iterdir() if not p.name.startswith('.') and outside(p) and (
      (p.is_file() and p.suffix.lower() in extensions) or slides.is_zarr(p)))
  if not found:
    raise InputError(f'no image files in folder {path} (looked for extensions Pillow reads, e.g. '
                     f'.png .jpg .tif .bmp): put images there or point config.predict.input at a file.')
  return found


def output_names(paths: Sequence[Path]) -> list:
  """The output stem of each input, distinct even on a case-insensitive file system: the file's
  stem; where two inputs share one, their full names with '.' -> '_' (a.png -> a_png); where that is
  still taken, the full name and 8 hex digits of its hash (a_png-1f3a...)."""
  names = [p.stem[:-4] if p.stem.lower().endswith('.ome') else p.stem for p in paths]  # a.ome.tif
  for _ in range(2):  # Stems, then full names, for every name that is not unique yet.
    counts = collections.Counter(map(str.casefold, names))
    names = [p.name.replace('.', '_') if counts[n.casefold()] > 1 else n
             for p, n in zip(paths, names)]
  counts = collections.Counter(map(str.casefold, names))
  names = [f'{n}-{hashlib.sha1(p.name.encode()).hexdigest()[:8]}' if counts[n.casefold()] > 1 else n
           for p, n in zip(paths, names)]
  if len(set(map(str.casefold, names))) != len(names):  # Only a sha1 collision could do this.
    raise InputError(f'input file names that cannot be told apart: {sorted(map(str, paths))[:5]}')
  return names


# --- Outputs ------------------------------------------------------------------------------------------


def resize_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] float32 -> [height, width, C], bilinear per channel (Pillow, as the image resize)."""
  if probs.shape[:2] == (height, width):
    return np.clip(probs, 0.0, 1.0)
  channels = [Image.fromarray(np.ascontiguousarray(probs[..., c], np.float32), mode='F')
              .resize((width, height), Image.Resampling.BILINEAR) for c in range(probs.shape[-1])]
  return np.clip(np.stack([np.asarray(c) for c in channels], -1), 0.0, 1.0)


def to_mask(probs: np.ndarray) -> np.ndarray:
  """uint8 [h, w]: binary {0, 1} (p > 0.5), or class ids (argmax) for several classes."""
  if probs.shape[-1] == 1:
    return (probs[..., 0] > 0.5).astype(np.uint8)
  return np.argmax(probs, -1).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, boxes, alpha: float = 0.45) -> np.ndarray:
  """uint8 [h, w, 3]: foreground tinted (binary: green; classes: one colour each) and the boxes
  (y0, x0, y1, x1), ends excluded, of the patches stage 2 refined outlined in yellow."""
  h, w = mask.shape
  out = image.copy()
  fg = mask > 0  # Only the foreground pixels are blended (the rest is copied as it is).
  tint = TINTS[(mask[fg].astype(np.int64) - 1) % len(TINTS)]
  out[fg] = ((1 - alpha) * image[fg] + alpha * tint).round().astype(np.uint8)
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  line = max(1, round(min(h, w) / 256))
  for y0, x0, y1, x1 in boxes:
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=OUTLINE, width=line)
  return np.asarray(pil)


def output_paths(output: Path, stem: str, outputs: Sequence[str], *, binary: bool = True,
                 slide_format: Optional[str] = None) -> dict:
  """{kind: path} of the outputs of one input named `stem`: PNGs (and .npy), or with `slide_format`
  (predict.slide_format) a slide's pyramidal OME-TIFFs or OME-Zarrs and a small overlay PNG."""
  suffix = SLIDE_SUFFIXES[slide_format] if slide_format else '.png'
  probs = f'{stem}_prob{suffix}' if binary or slide_format else f'{stem}_probs.npy'
  paths = {'mask': output / f'{stem}_mask{suffix}', 'probs': output / probs,
           'overlay': output / f'{stem}_overlay.png'}
  return {kind: p for kind, p in paths.items() if kind in outputs}


def save_outputs(output: Path, stem: str, image: np.ndarray, result: dict, *,
                 outputs: Sequence[str] = ('mask', 'probs', 'overlay'), compression: int = 0,
                 stopped=None) -> Optional[dict]:
  """Writes the selected outputs of one image (result: {'probs', 'mask', 'boxes'}); returns {kind:
  path}. The set is replaced whole or not at all: each output is written to a temporary file, and
  only once all are complete do they take their final names together (`files.replace_all`; a set a
  kill cut in two is completed by the next run's `files.recover`); on any failure the temporary
  files are removed and the previous set is left as it was. `stopped` is asked before each output:
  once it holds, nothing is kept and None is returned (the image counts as not done)."""
  probs, mask = result['probs'], result['mask']
  binary = probs.shape[-1] == 1
  paths = output_paths(output, stem, outputs, binary=binary)
  tmps = {kind: Path(files.temporary(p)) for kind, p in paths.items()}
  png = {'format': 'PNG', 'compress_level': compression}
  writers = {
      # The mask at least at level 1: 2 ms, and 100x smaller than stored.
      'mask': lambda f: Image.fromarray(mask * np.uint8(255) if binary else mask).save(
          f, format='PNG', compress_level=max(compression, 1)),
      'probs': (lambda f: Image.fromarray(np.round(probs[..., 0] * 65535).astype(np.uint16)).save(
          f, **png)) if binary else (lambda f: np.save(f, probs.astype(np.float32))),
      'overlay': lambda f: Image.fromarray(overlay(image, mask, result['boxes'])).save(f, **png)}
  try:
    for kind in paths:
      if stopped is not None and stopped():
        return None
      with open(tmps[kind], 'wb') as f:
        writers[kind](f)
    files.replace_all({tmps[kind]: p for kind, p in paths.items()})
  finally:
    for t in tmps.values():
      if t.exists():
        t.unlink()
  return {kind: str(p) for kind, p in paths.items()}


def predict_slide(model, path: Path, output: Path, stem: str, outputs: Sequence[str], stopped,
                  progress: bool = True, slide_format: str = 'tiff',
                  share: tuple = (0, 1)) -> Optional[dict]:
  """Native two-stage on a slide (`slides.is_slide`), out of core: read a file tile at a time
  (`slides.open_source`), the mask (and the probabilities) written by bands (`slides.SlideSink`),
  and an overlay PNG of at most 1024 px a side. A stopped job keeps its finished bands and returns
  None; the same command then resumes from them. Returns the record, or raises DataError /
  InputError naming the file.

  Under several processes (`share`: this process's index, their count), each runs stage 1 and
  makes its share of the bands into the output folder, which must be storage they all see; once
  all are done, process 0 assembles the file(s) and returns the record ('bands': how many each
  process made), the others {}. One stopped stops all (None); one failed raises on the first
  such process, {} on the others."""
  index, count = share
  source = slides.open_source(path)  # Every process reads the same file: the same error.
  try:
    paths = output_paths(output, stem, outputs, slide_format=slide_format)
    stat = path.stat()
    key = {'input': str(path.resolve()), 'bytes': stat.st_size, 'mtime': stat.st_mtime,
           'spec': repr(model.spec)}
    mask = output_paths(output, stem, ('mask',), slide_format=slide_format)['mask']  # Always made.
    make = lambda: slides.SlideSink(mask, source.height, source.width, key, rows=model.band_rows,
                                    probabilities='probs' in outputs,
                                    resolution=source.resolution, share=share)
    sink, error = None, None
    try:  # Process 0 makes the folder (a stale one cleared) that the others then open.
      sink = make() if index == 0 and not stopped() else None
    except OSError as e:
      error = e
    states = _gather([error is not None, stopped()], count)
    if states.any():  # Failed (raised on process 0, {} elsewhere), or stopped (None).
      return _raise(error) if states[:, 0].any() else None
    sink = sink or make()
    if sink.resumed and index == 0:
      print(f'{path}: resuming from {sink.resumed} band(s) written before.')
    left = sum(min(sink.rows, source.height - y0) for y0 in range(0, source.height, sink.rows)
               if not sink.done(y0))
    bar = tqdm(total=left * source.width, desc=path.name, unit='px', unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    sink.progress = lambda rows: bar.update(rows * source.width)
    try:
      pred = model.two_stage(source, sink=sink, stop=stopped)
      sink.wait()  # The band in flight is finished: a resumed job starts after it.
    except (ValueError, OSError) as e:  # DataError, InputError: the file, and why.
      pred, error = None, e
    bar.close()
    states = _gather([error is not None, pred is None, sink.made], count)  # Once all are done.
    if states[:, 0].any():  # Raised on the first process that failed, {} on the others.
      return _raise(error if index == np.argmax(states[:, 0]) else None)
    if states[:, 1].any():
      return None
    if index:
      return {}
    _replace_slide(sink, paths, lambda staged: _slide_overlay(staged['overlay'], pred,
                                                              staged['mask'], model.spec))
    return {'input': str(path), 'height': source.height, 'width': source.width,
            'refined_patches': pred.stats['refined'], 'tiles': pred.stats['tiles'],
            'decoded': source.decoded / (source.height * source.width),
            **({'bands': states[:, 2].tolist()} if count > 1 else {}),
            **{k: str(p) for k, p in paths.items()}}
  finally:
    source.close()


def _replace_slide(sink, paths: dict, overlay) -> None:
  """A slide's outputs, replaced whole (`files.replace_all`): assembled from the sink's bands in a
  staging folder beside them, with the overlay if asked for (`overlay({kind: staged path})`), then
  renamed into place together; the bands are removed after."""
  final = dict(sink.outputs(), **{k: p for k, p in paths.items() if k == 'overlay'})
  staging = Path(files.temporary(Path(final['mask'])))
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir()
  try:
    staged = {k: staging / Path(p).name for k, p in final.items()}
    sink.assemble({k: staged[k] for k in sink.outputs()})
    if 'overlay' in staged:
      overlay(staged)
    files.replace_all({staged[k]: final[k] for k in final})
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  shutil.rmtree(sink.partial)


def _raise(error: Optional[Exception]) -> dict:
  """Raises `error`; {} if None (another process failed, and says so)."""
  if error is not None:
    raise error
  return {}


def _gather(values: Sequence[int], count: int) -> np.ndarray:
  """int [count, len(values)]: the values of every process (a barrier when count > 1)."""
  if count == 1:
    return np.asarray([values])
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))


def _slide_overlay(path: Path, pred, mask_path: str, spec) -> None:
  """The overlay of a slide at 1 / d (d = f * preview_step): the stage-1 thumbnail, the mask's
  pyramid level at d (strided, as the levels are), the refined tiles outlined where they are at
  least 4 px."""
  image, d = pred.preview, spec.downscale * pred.stats['preview_step']
  with slides.open_source(mask_path) as written:
    level = min(round(math.log2(d)), len(written.sizes) - 1)
    h, w = written.sizes[level]
    mask = written.read(0, h, 0, w, level)[..., 0]
  h, w = min(len(image), len(mask)), min(image.shape[1], mask.shape[1])
  mask = (mask[:h, :w] > 0).astype(np.uint8) if spec.num_classes == 1 else mask[:h, :w]
  t = spec.patch_size / d  # Tiles under 4 px at this scale would hide the image: not outlined.
  boxes = [(int(r * t), int(c * t), int((r + 1) * t), int((c + 1) * t))
           for r, c in zip(*np.nonzero(pred.refined))] if t >= 4 else []
  files.atomic_write(path, lambda f: Image.fromarray(overlay(image[:h, :w], mask, boxes)).save(
      f, format='PNG'), 'wb')


# --- The pipeline -------------------------------------------------------------------------------------


def _chunks(items: Sequence, size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def read_input(path: Path, segment):
  """(uint8 [h, w, 3] as read, what `segment` takes of it), or the error naming the file: the
  header is checked first (`segment.check`), so an image too large is refused before decoding."""
  segment.check(path)
  image = common.read_image(path)
  return image, segment.prepare(image)


def predict_files(segment, paths: Sequence[Path], output, *, names: Optional[Sequence[str]] = None,
                  outputs: Sequence[str] = ('mask', 'probs', 'overlay'), compression: int = 0,
                  workers: Optional[int] = None, progress: bool = True, stop=None,
                  skip_existing: bool = False, ahead: int = 2, slide_format: str = 'tiff',
                  share: tuple = (0, 1)) -> tuple:
  """Segments every file with `segment` (native.image_files: the paper's square protocol in
  batches, or native resolution an image at a time) and writes its outputs, at the file's size,
  into `output`: (records, interrupted).

  records: one per file done, in order: {'input', 'height', 'width', 'refined_patches', 'tiles',
  <kind>: path}, {'input', 'error'}, or {'input', 'skipped', <kind>: path} (skip_existing and every
  output there). interrupted: the signal's name if `stop` (hooks.StopSignals) received one, else
  None; the files not reached then have no record. Slides are split by bands over the processes
  (`share`, see predict_slide): process 0 alone records them.

  `names` are the output stems (default output_names(paths)). Reading runs `ahead` batches ahead in
  `workers` threads and at most 2 batches are written behind, so memory does not grow with the
  number of files.
  """
  paths = [Path(p) for p in paths]
  output = Path(output)
  files.check_writable(output)
  files.recover(output)  # Image sets a killed run left half replaced.
  workers = workers or min(8, (os.cpu_count() or 1) + 2)
  stems = dict(zip(paths, names or output_names(paths)))
  batch_size = segment.batch_size
  records = {}
  stopped = lambda: stop is not None and stop.received is not None

  def write(path, image, probs, refined):
    try:
      h, w = image.shape[:2]
      full = resize_probs(probs, h, w)
      result = {'probs': full, 'mask': to_mask(full), 'boxes': segment.boxes(refined, h, w)}
      written = save_outputs(output, stems[path], image, result, outputs=outputs,
                             compression=compression, stopped=stopped)
      if written is None:
        return None  # Stopped while saving: not done, its outputs not written.
      return {'input': str(path), 'height': h, 'width': w,
              'refined_patches': int(refined.sum()), 'tiles': int(refined.size), **written}
    except OSError as e:
      return {'input': str(path), 'error': f'cannot write its outputs to {output} '
                                           f'({files.describe_os_error(e)})'}

  large = {p for p in paths if segment.slide(p)}  # Read and written out of core, one at a time.
  todo = _to_do(paths, output, stems, outputs, segment.num_classes == 1, skip_existing, records,
                large, slide_format)
  for path in large if share[0] else ():
    records.pop(path, None)
  bar = tqdm(total=len(paths), initial=len(records), desc='predict', unit='image',
             disable=not progress, dynamic_ncols=True)
  chunks = iter(list(_chunks([p for p in todo if p not in large], batch_size)))
  reads, writes = collections.deque(), collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='iterseg-read') as readers, \
      concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='iterseg-write') as writers:

    def read_ahead():
      while len(reads) < ahead and not stopped():
        chunk = next(chunks, None)
        if chunk is None:
          return
        reads.append([(p, readers.submit(read_input, p, segment)) for p in chunk])

    def collect(block: bool):
      while writes and (block or writes[0][1].done()):
        path, future = writes.popleft()
        if not future.cancelled() and future.result() is not None:
          records[path] = future.result()
          bar.update(1)

    read_ahead()
    while reads and not stopped():
      good = []
      for path, future in reads.popleft():
        read = _wait(future, stopped)
        if read is None:
          break
        if isinstance(read, Exception):
          records[path] = {'input': str(path), 'error': ' '.join(str(read).split())}
          bar.update(1)
        else:
          good.append((path, *read))
      read_ahead()
      if not good or stopped():
        continue
      results = segment([prepared for _, _, prepared in good], stopped)
      if results is None:
        break  # Stopped: the batch in flight is dropped.
      collect(block=len(writes) >= 2 * batch_size)
      for (path, image, _), (probs, refined) in zip(good, results):
        writes.append((path, writers.submit(write, path, image, probs, refined)))
      del good, results
      collect(block=False)
    for batch in reads:  # Stopped: reads not started are cancelled, the others dropped.
      for _, future in batch:
        future.cancel()
    if stopped():  # Writes not started are dropped too; those in flight finish (no half files).
      for _, future in writes:
        future.cancel()
    collect(block=True)
  elsewhere = None
  for path in (p for p in todo if p in large):  # Every process: stopped, it says so there.
    try:
      record = predict_slide(segment.model, path, output, stems[path], outputs, stopped, progress,
                             slide_format, share)
    except ValueError as e:  # DataError, InputError: the file, and why.
      record = {'input': str(path), 'error': ' '.join(str(e).split())}
    except OSError as e:
      record = {'input': str(path), 'error': f'cannot write its outputs to {output} '
                                             f'({files.describe_os_error(e)})'}
    if record is None:  # Stopped (here or on another process): its finished bands are kept, and
      elsewhere = 'another process stopped'  # the same command resumes from them.
      break
    if record:  # {}: another process records it.
      records[path] = record
    bar.update(1)
  bar.close()
  return [records[p] for p in paths if p in records], stop.received if stopped() else elsewhere


def _to_do(paths, output: Path, stems: dict, outputs, binary: bool, skip_existing: bool,
           records: dict, large=(), slide_format: str = 'tiff') -> list:
  """The paths to segment; with skip_existing, those whose outputs all exist get a 'skipped'
  record in `records` instead (`large`: the slides among them)."""
  todo = []
  for path in paths:
    existing = output_paths(output, stems[path], outputs, binary=binary,
                            slide_format=slide_format if path in large else None)
    if skip_existing and all(p.exists() for p in existing.values()):
      records[path] = {'input': str(path), 'skipped': 'its outputs exist',
                       **{k: str(p) for k, p in existing.items()}}
    else:
      todo.append(path)
  return todo


def _wait(future, stopped, poll: float = 0.05):
  """A read's result; the error that names the file (DataError, OSError) as a value; or None as
  soon as `stopped` holds."""
  while True:
    try:
      return future.result(timeout=poll)
    except concurrent.futures.TimeoutError:
      if stopped():
        return None
    except (ValueError, OSError) as e:  # DataError is a ValueError: the file, and why.
      return e


def throughput(s: Settings, *, num_images: int = 48, size=(575, 766)) -> dict:
  """predict's end-to-end images/s on `num_images` random JPEG files of `size` (h, w), files in
  and outputs (predict.outputs) out, beside the segmenting call alone on the same images, read
  before. Random weights: speed does not depend on them. Written in a temporary folder, then
  deleted."""
  import tempfile  # pylint: disable=g-import-not-at-top
  nets = models.random_networks(s.spec, jax.random.key(s.seed))
  s = s.with_placeholder_statistics()
  rng = np.random.default_rng(0)
  segment = native.image_files(nets, s, s.predict.batch_size)
  kwargs = dict(outputs=s.predict.outputs, compression=s.predict.png_compression, progress=False)
  with tempfile.TemporaryDirectory(prefix='iterseg-predict-') as folder:
    inputs = Path(folder) / 'in'
    inputs.mkdir()
    for i in range(num_images):
      Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inputs / f'{i:04d}.jpg')
    paths = list_inputs(inputs)
    predict_files(segment, paths[:segment.batch_size], Path(folder) / 'warm', **kwargs)
    start = time.perf_counter()
    predict_files(segment, paths, Path(folder) / 'out', **kwargs)
    seconds = time.perf_counter() - start
    prepared = [read_input(p, segment)[1] for p in paths]
  start = time.perf_counter()
  for chunk in _chunks(prepared, segment.batch_size):
    segment(chunk, lambda: False)
  alone = time.perf_counter() - start
  return {'num_images': num_images, 'size': f'{size[0]}x{size[1]}', 'outputs': list(s.predict.outputs),
          'batch_size': segment.batch_size, 'images_per_s': num_images / seconds,
          'compiled_images_per_s': num_images / alone}


def write_summary(output: Path, part: dict, process: int, processes: int) -> str:
  """Writes summary.json; under several processes, this process's part summary.<process>.json,
  and whichever process finds every part of this run (`part['run']`) written last merges them into
  summary.json (no process waits for another: one interrupted or failed never holds the others; a
  part an earlier run left is never merged). Returns summary.json."""
  summary = os.path.join(output, 'summary.json')
  if processes == 1:
    files.atomic_write_json(summary, part)
    return summary
  files.atomic_write_json(os.path.join(output, f'summary.{process}.json'), part)
  parts = [os.path.join(output, f'summary.{i}.json') for i in range(processes)]
  fields = {'images': [{'input': str}], 'failed': files.COUNT, 'skipped': files.COUNT,
            'total': files.COUNT, 'interrupted': (str, None), 'compiles': (files.COUNT, None),
            'run': files.COUNT}
  fix = ('delete it and run the same command again with --config.predict.skip_existing=True '
         '(only what is missing is segmented)')
  loaded = [files.read_json(p, fix, PredictError, fields) for p in parts if os.path.exists(p)]
  if len(loaded) == processes and all(one['run'] == part['run'] for one in loaded):
    merged = dict(loaded[0], processes=processes)
    merged['images'] = sorted((r for one in loaded for r in one['images']), key=lambda r: r['input'])
    for key in ('failed', 'skipped', 'total'):
      merged[key] = sum(one[key] for one in loaded)
    merged['interrupted'] = next((one['interrupted'] for one in loaded if one['interrupted']), None)
    merged['compiles'] = None if loaded[0]['compiles'] is None else max(
        one['compiles'] for one in loaded)
    files.atomic_write_json(summary, merged)
  return summary


def run(s: Settings, workdir: str) -> dict:
  """--mode=predict: predict.input -> predict.output (default <workdir>/predictions).

  Uses the networks trained in `workdir`, stage 2 at config.num_patches, or at the operating point
  of --mode=calibrate when the workdir has one (a line says so). Everything is checked before the
  output folder is made. Under several processes, each takes every P-th file (names are decided
  over all of them) and a share of every slide's bands (`predict_slide`), and summary.json merges
  their parts (`write_summary`). Returns {'output',
  'num_patches', 'images': [record], 'failed', 'skipped', 'images_per_s', 'summary'}; raises PredictError after writing everything else if a file failed,
  and Interrupted (after writing summary.json) on Ctrl-C or SIGTERM.
  """
  point = Run(workdir).operating_point()
  s = Run(workdir).inference_settings(s, fallback=False)
  output = Path(os.path.expanduser(s.predict.output or os.path.join(workdir, 'predictions')))
  paths = list_inputs(s.predict.input, exclude=str(output))
  names = dict(zip(paths, output_names(paths)))
  nets = checkpoints.load_networks(workdir, s, num_patches=[s.spec.num_patches], strict=True)
  if point is not None:
    print(f'Using the calibrated operating point of {workdir}/calibration.json: {point}.')
  files.check_writable(output)
  segment = native.image_files(nets, s, s.predict.batch_size)
  index, count = jax.process_index(), jax.process_count()
  shared = {p for p in paths if segment.slide(p)}  # Split by bands, the other images by file.
  plain = set([p for p in paths if p not in shared][index::count])
  mine = [p for p in paths if p in shared or p in plain]
  start = time.perf_counter()
  common_args = dict(names=[names[p] for p in mine], outputs=s.predict.outputs,
                     compression=s.predict.png_compression, progress=index == 0,
                     skip_existing=s.predict.skip_existing, slide_format=s.predict.slide_format,
                     share=(index, count))
  run_id = time.time_ns() % 2 ** 31  # Names this run's summary parts (process 0's).
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    run_id = int(multihost_utils.broadcast_one_to_all(np.int32(run_id)))
  with hooks.StopSignals() as stop:
    records, interrupted = predict_files(segment, mine, output, stop=stop, **common_args)
  if index:
    mine = [p for p in mine if p not in shared]  # Process 0 records the slides.
  compiles = segment.compiles
  seconds = time.perf_counter() - start
  failed = [r for r in records if 'error' in r]
  skipped = [r for r in records if 'skipped' in r]
  summary = write_summary(output, {
      'num_patches': s.spec.num_patches, 'outputs': s.predict.outputs, 'images': records,
      'failed': len(failed), 'skipped': len(skipped), 'total': len(mine),
      'interrupted': interrupted, 'resolution': s.spec.resolution, 'compiles': compiles,
      'run': run_id}, index, count)
  done = len(records) - len(failed)
  if interrupted:
    raise Interrupted(f'interrupted ({interrupted}) with {done} of {len(mine)} image(s) done; their '
                      f'outputs are in {output} and listed in {summary}. Rerun the same command with '
                      f'--config.predict.skip_existing=True to segment the other '
                      f'{len(mine) - len(records)}.')
  print(f'Segmented {done - len(skipped)} of {len(records)} image(s) in {seconds:.1f} s '
        f'({(len(records) - len(skipped)) / seconds:.1f} images/s) with the two-stage method at '
        f'Np={s.spec.num_patches}' + (f'; {len(skipped)} skipped (outputs exist)' if skipped else '')
        + (f'; {compiles} compilations' if compiles is not None else '')
        + f'; outputs in {output}, summary in {summary}')
  if failed:
    for r in failed:
      print(f'  failed: {r["input"]}: {r["error"]}')
    raise PredictError(f'{len(failed)} of {len(records)} image(s) failed (listed above and in '
                       f'{summary}), e.g. {failed[0]["input"]}: {failed[0]["error"]}')
  return {'output': str(output), 'num_patches': s.spec.num_patches, 'images': records,
          'failed': failed, 'skipped': skipped, 'images_per_s': len(records) / seconds,
          'summary': summary, 'compiles': compiles}
