"""--mode=predict: segment image files of any size with the trained two-stage method.

  files --read threads: decode (iterseg.data.common's contract), resize to hi--> uint8 batches
  --two_stage over every local device--> probabilities --writer threads: resize back to each
  file's size, threshold / argmax, encode--> outputs

Written per input image `<stem>` into predict.output (default `<workdir>/predictions`), as
predict.outputs selects:
  <stem>_mask.png     binary: 0 / 255 (foreground where p > 0.5); num_classes > 1: class ids (uint8).
  <stem>_prob.png     binary: the foreground probability as a 16-bit grey PNG, value = round(p * 65535).
  <stem>_probs.npy    num_classes > 1 (instead of _prob.png): float32 [h, w, C] class probabilities.
  <stem>_overlay.png  the image with the mask tinted and the patches stage 2 refined outlined (yellow).
A folder is read non-recursively (so an output folder inside it is never read); files whose
extension Pillow does not know are skipped. Two inputs with the same stem (a.png, a.jpg) are named by
their full file name (a_png). Each image's outputs take their final names only once all are complete.
A file that cannot be read or written is reported and the others go on; `summary.json` lists every
input with its outputs or its error, and the run fails (PredictError) if any image failed.
"""

import concurrent.futures
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from iterseg import checkpoints, files, inference, models
from iterseg.data import common, pipeline
from iterseg.errors import InputError, PredictError
from iterseg.models import Networks
from iterseg.settings import Settings, Spec

TINTS = np.array([(0, 255, 0), (0, 160, 255), (255, 0, 0), (255, 0, 255), (255, 128, 0),
                  (0, 255, 255), (128, 0, 255), (255, 255, 255)], np.float32)
OUTLINE = (255, 255, 0)


# --- Inputs -------------------------------------------------------------------------------------------


def list_inputs(path, exclude: Optional[str] = None) -> list:
  """The image files at `path` (a file, or a folder's image files sorted by name); InputError if none.

  Files inside `exclude` (the output folder) are never inputs.
  """
  if not str(path):
    raise InputError('config.predict.input is empty: set --config.predict.input=<an image file or a '
                     'folder of images>.')
  path = Path(os.path.expanduser(str(path)))
  if not path.exists():
    raise InputError(f'config.predict.input={path} does not exist: point it at an image file or a '
                     f'folder of images.')
  if path.is_file():
    return [path]
  extensions = {ext.lower() for ext in Image.registered_extensions()}
  outside = lambda p: exclude is None or Path(os.path.realpath(p)).parent != Path(
      os.path.realpath(exclude))
  found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith('.') and
                 p.suffix.lower() in extensions and outside(p))
  if not found:
    raise InputError(f'no image files in folder {path} (looked for extensions Pillow reads, e.g. '
                     f'.png .jpg .tif .bmp): put images there or point config.predict.input at a file.')
  return found


def output_stems(paths: Sequence[Path]) -> list:
  """File stems, or full names with '.' -> '_' for stems that two inputs share."""
  stems = [p.stem for p in paths]
  return [p.name.replace('.', '_') if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def read_resized(path: Path, hi_size: int):
  """(uint8 [h, w, 3] as read, uint8 [hi, hi, 3] resized bilinear), or the error naming the file."""
  image = common.read_image(path)
  return image, common.resize_image(image, hi_size)


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


def overlay(image: np.ndarray, mask: np.ndarray, refined: np.ndarray, num_patches: int,
            alpha: float = 0.45) -> np.ndarray:
  """uint8 [h, w, 3]: foreground tinted (binary: green; classes: one colour each) and the refined
  patches (grid indices, row-major) of the Np x Np grid outlined, scaled to the image's own size."""
  h, w = mask.shape
  out = image.copy()
  fg = mask > 0  # Only the foreground pixels are blended (the rest is copied as it is).
  tint = TINTS[(mask[fg].astype(np.int64) - 1) % len(TINTS)]
  out[fg] = ((1 - alpha) * image[fg] + alpha * tint).round().astype(np.uint8)
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  line = max(1, round(min(h, w) / 256))
  for index in np.asarray(refined).tolist():
    r, c = divmod(int(index), num_patches)
    x0, x1 = round(c * w / num_patches), round((c + 1) * w / num_patches) - 1
    y0, y1 = round(r * h / num_patches), round((r + 1) * h / num_patches) - 1
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=OUTLINE, width=line)
  return np.asarray(pil)


def _tmp(path: Path) -> Path:
  return path.with_name(f'.{path.name}.{os.getpid()}.tmp')


def save_outputs(output: Path, stem: str, image: np.ndarray, result: dict, num_patches: int, *,
                 outputs: Sequence[str] = ('mask', 'probs', 'overlay'),
                 compression: int = 0) -> dict:
  """Writes the selected outputs of one image; returns {kind: path}. All of them take their final
  names together, once every one is complete, so a failure leaves the previous ones as they were."""
  probs, mask = result['probs'], result['mask']
  binary = probs.shape[-1] == 1
  paths = {'mask': output / f'{stem}_mask.png',
           'probs': output / (f'{stem}_prob.png' if binary else f'{stem}_probs.npy'),
           'overlay': output / f'{stem}_overlay.png'}
  paths = {kind: p for kind, p in paths.items() if kind in outputs}
  tmps = {kind: _tmp(p) for kind, p in paths.items()}
  png = {'format': 'PNG', 'compress_level': compression}
  try:
    if 'mask' in paths:  # At least level 1: 2 ms, and 100x smaller than stored.
      Image.fromarray(mask * np.uint8(255) if binary else mask).save(
          tmps['mask'], format='PNG', compress_level=max(compression, 1))
    if 'probs' in paths and binary:
      Image.fromarray(np.round(probs[..., 0] * 65535).astype(np.uint16)).save(tmps['probs'], **png)
    elif 'probs' in paths:
      with open(tmps['probs'], 'wb') as f:
        np.save(f, probs.astype(np.float32))
    if 'overlay' in paths:
      Image.fromarray(overlay(image, mask, result['refined'], num_patches)).save(tmps['overlay'],
                                                                               **png)
    for kind, p in paths.items():  # Only now do complete files take the final names.
      os.replace(tmps[kind], p)
  finally:
    for t in tmps.values():
      if t.exists():
        t.unlink()
  return {kind: str(p) for kind, p in paths.items()}


# --- The pipeline -------------------------------------------------------------------------------------


def _sharding(batch: int):
  """Splits a batch over the local devices when it divides evenly (else one device)."""
  devices = jax.local_devices()
  if len(devices) > 1 and batch % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  return jax.sharding.SingleDeviceSharding(devices[0])


def _chunks(items: Sequence, size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def predict_files(nets: Networks, spec: Spec, paths: Sequence[Path], output, *,
                  batch_size: int = 8, outputs: Sequence[str] = ('mask', 'probs', 'overlay'),
                  compression: int = 0, workers: Optional[int] = None,
                  progress: bool = True) -> list:
  """Segments every file and writes its outputs into `output`; one record per file, in order:
  {'input', 'height', 'width', 'refined_patches', <kind>: path} or {'input', 'error'}.

  Reading runs `workers` batches ahead in threads; each batch of `batch_size` images is split over
  the local devices (padded to a full batch, so one compilation serves all); writing runs in
  threads while the next batch is computed.
  """
  paths = [Path(p) for p in paths]
  output = Path(output)
  files.check_writable(output)
  workers = workers or min(8, (os.cpu_count() or 1) + 2)
  stems = dict(zip(paths, output_stems(paths)))
  sharding = _sharding(batch_size)
  params = inference.replicate_like(nets.at(spec.num_patches),
                                    jax.device_put(np.zeros(batch_size), sharding))
  records = {}

  def write(path, image, probs, refined):
    try:
      h, w = image.shape[:2]
      full = resize_probs(probs, h, w)
      result = {'probs': full, 'mask': to_mask(full), 'refined': np.flatnonzero(refined)}
      written = save_outputs(output, stems[path], image, result, spec.num_patches,
                             outputs=outputs, compression=compression)
      return {'input': str(path), 'height': h, 'width': w,
              'refined_patches': int(refined.sum()), **written}
    except OSError as e:
      return {'input': str(path), 'error': f'cannot write its outputs to {output} '
                                           f'({files.describe_os_error(e)})'}

  bar = tqdm(total=len(paths), desc='predict', unit='image', disable=not progress,
             dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='iterseg-read') as readers, \
      concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='iterseg-write') as writers:
    reads = [[readers.submit(read_resized, p, spec.hi_size) for p in chunk]
             for chunk in _chunks(paths, batch_size)]
    pending = []
    for chunk, futures in zip(_chunks(paths, batch_size), reads):
      good = []
      for path, future in zip(chunk, futures):
        try:
          good.append((path, *future.result()))
        except (ValueError, OSError) as e:  # DataError is a ValueError: the file, and why.
          records[path] = {'input': str(path), 'error': ' '.join(str(e).split())}
          bar.update(1)
      if not good:
        continue
      padded = pipeline.pad_batch(np.stack([small for _, _, small in good]), batch_size)
      pred = inference.two_stage(params, jax.device_put(padded, sharding), spec)
      probs, refined = jax.device_get((pred.probs, pred.refined))
      for i, (path, image, _) in enumerate(good):
        pending.append((path, writers.submit(write, path, image, probs[i], refined[i])))
      while pending and pending[0][1].done():
        path, future = pending.pop(0)
        records[path] = future.result()
        bar.update(1)
    for path, future in pending:
      records[path] = future.result()
      bar.update(1)
  bar.close()
  return [records[p] for p in paths]


def throughput(s: Settings, *, num_images: int = 48, size=(575, 766)) -> dict:
  """predict's end-to-end images/s on `num_images` random JPEG files of `size` (h, w), files in
  and outputs (predict.outputs) out, beside the compiled two-stage function alone at the same batch
  size. Random weights: speed does not depend on them. Written in a temporary folder, then deleted."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax.random  # pylint: disable=g-import-not-at-top
  nets = models.random_networks(s.spec, jax.random.key(s.seed))
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory(prefix='iterseg-predict-') as folder:
    inputs = Path(folder) / 'in'
    inputs.mkdir()
    for i in range(num_images):
      Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inputs / f'{i:04d}.jpg')
    paths = list_inputs(inputs)
    kwargs = dict(batch_size=s.predict.batch_size, outputs=s.predict.outputs,
                  compression=s.predict.png_compression, progress=False)
    predict_files(nets, s.spec, paths[:s.predict.batch_size], Path(folder) / 'warm', **kwargs)
    start = time.perf_counter()
    predict_files(nets, s.spec, paths, Path(folder) / 'out', **kwargs)
    seconds = time.perf_counter() - start
  batch = jax.device_put(rng.integers(0, 256, (s.predict.batch_size, s.spec.hi_size,
                                               s.spec.hi_size, 3), dtype=np.uint8))
  params = nets.at(s.spec.num_patches)
  jax.block_until_ready(inference.two_stage(params, batch, s.spec))
  calls = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(inference.two_stage(params, batch, s.spec))
    calls.append(time.perf_counter() - start)
  return {'num_images': num_images, 'size': f'{size[0]}x{size[1]}', 'outputs': list(s.predict.outputs),
          'batch_size': s.predict.batch_size, 'images_per_s': num_images / seconds,
          'compiled_images_per_s': s.predict.batch_size / float(np.median(calls))}


def run(s: Settings, workdir: str) -> dict:
  """--mode=predict: predict.input -> predict.output (default <workdir>/predictions).

  Uses the networks trained in `workdir`, stage 2 at config.num_patches, or at the operating point
  of --mode=calibrate when the workdir has one (a line says so). Under several processes,
  each takes every P-th file. Returns {'output', 'num_patches', 'images': [record], 'failed',
  'images_per_s', 'summary'}; raises PredictError after writing everything else if a file failed.
  """
  point = checkpoints.operating_point(workdir)
  s = checkpoints.inference_settings(workdir, s, fallback=False)
  if point is not None:
    print(f'Using the calibrated operating point of {workdir}/calibration.json: {point}.')
  output = Path(os.path.expanduser(s.predict.output or os.path.join(workdir, 'predictions')))
  paths = list_inputs(s.predict.input, exclude=str(output))
  files.check_writable(output)
  nets = checkpoints.load_networks(workdir, s, num_patches=[s.spec.num_patches], strict=True)
  mine = paths[jax.process_index()::jax.process_count()]
  start = time.perf_counter()
  records = predict_files(nets, s.spec, mine, output, batch_size=s.predict.batch_size,
                          outputs=s.predict.outputs, compression=s.predict.png_compression,
                          progress=jax.process_index() == 0)
  seconds = time.perf_counter() - start
  failed = [r for r in records if 'error' in r]
  name = 'summary.json' if jax.process_count() == 1 else f'summary.{jax.process_index()}.json'
  summary = os.path.join(output, name)
  files.atomic_write_json(summary, {'num_patches': s.spec.num_patches, 'outputs': s.predict.outputs,
                                    'images': records, 'failed': len(failed)})
  print(f'Segmented {len(records) - len(failed)} of {len(records)} image(s) in {seconds:.1f} s '
        f'({len(records) / seconds:.1f} images/s) with the two-stage method at '
        f'Np={s.spec.num_patches}; outputs in {output}, summary in {summary}')
  if failed:
    for r in failed:
      print(f'  failed: {r["input"]}: {r["error"]}')
    raise PredictError(f'{len(failed)} of {len(records)} image(s) failed (listed above and in '
                       f'{summary}), e.g. {failed[0]["input"]}: {failed[0]["error"]}')
  return {'output': str(output), 'num_patches': s.spec.num_patches, 'images': records,
          'failed': failed, 'images_per_s': len(records) / seconds, 'summary': summary}
