"""--mode=predict: segment image files of any size with the trained two-stage method.

  file (any size, any mode Pillow reads) --RGB, bilinear resize--> [hi, hi, 3] --iterseg.infer-->
  probabilities [hi, hi, C] --bilinear resize back--> [h, w, C] --threshold 0.5 / argmax--> mask [h, w]

Written per input image `<stem>` into config.predict.output (default `<workdir>/predictions`):
  <stem>_mask.png     binary: 0 / 255 (foreground where p > 0.5); num_classes > 1: class ids (uint8).
  <stem>_prob.png     binary: the foreground probability as a 16-bit grey PNG, value = round(p * 65535).
  <stem>_probs.npy    num_classes > 1 (instead of _prob.png): float32 [h, w, C] class probabilities.
  <stem>_overlay.png  the image with the mask tinted and the patches stage 2 refined outlined (yellow),
                      all in the original image's coordinates.
A folder is read non-recursively; files whose extension Pillow does not know (README.txt, hidden files)
are skipped. Two inputs with the same stem (a.png, a.jpg) are named by their full file name (a_png).
Each image's outputs are written to temporary names and renamed only once all of them are complete, so
an interrupted run never leaves a partial file under a final name.
"""

import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import iterseg
from iterseg import evaluate, inference

TINTS = np.array([(0, 255, 0), (0, 160, 255), (255, 0, 0), (255, 0, 255), (255, 128, 0),
                  (0, 255, 255), (128, 0, 255), (255, 255, 255)], np.float32)
OUTLINE = (255, 255, 0)


# --- Inputs -------------------------------------------------------------------------------------------


def image_extensions() -> set[str]:
  """Lower-case file extensions Pillow can open ('.png', '.jpg', '.tif', ...)."""
  return {ext.lower() for ext in Image.registered_extensions()}


def list_inputs(path) -> list[Path]:
  """The image files at `path` (a file, or a folder's image files sorted by name); ValueError if none."""
  if not str(path):
    raise ValueError('config.predict.input is empty: set --config.predict.input=<an image file or a '
                     'folder of images>.')
  path = Path(os.path.expanduser(str(path)))
  if not path.exists():
    raise ValueError(f'config.predict.input={path} does not exist: point it at an image file or a '
                     f'folder of images.')
  if path.is_file():
    return [path]
  extensions = image_extensions()
  files = sorted(p for p in path.iterdir()
                 if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in extensions)
  if not files:
    raise ValueError(f'no image files in folder {path} (looked for extensions Pillow reads, e.g. '
                     f'.png .jpg .tif .bmp): put images there or point config.predict.input at a file.')
  return files


def read_image(path: Path, *, decode: bool = True) -> Optional[np.ndarray]:
  """uint8 [h, w, 3] RGB from any mode (grey, palette, RGBA: alpha dropped); ValueError naming the
  file if Pillow cannot read it. decode=False only checks that the header is readable."""
  try:
    with Image.open(path) as image:
      if not decode:
        return None
      image.load()
      if image.mode != 'RGB':
        image = image.convert('RGB')
      return np.asarray(image, np.uint8)
  except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot read image {path} ({type(e).__name__}: {e}): remove it from the input '
                     f'or convert it to PNG/JPEG.') from e


def output_stems(files: Sequence[Path]) -> list[str]:
  """File stems, or full names with '.' -> '_' for stems that two inputs share."""
  stems = [f.stem for f in files]
  return [f.name.replace('.', '_') if stems.count(s) > 1 else s for f, s in zip(files, stems)]


# --- Segmentation -------------------------------------------------------------------------------------


def resize_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] float32 -> [height, width, C], bilinear per channel (Pillow, as the image resize)."""
  channels = [Image.fromarray(np.ascontiguousarray(probs[..., c], np.float32), mode='F')
              .resize((width, height), Image.Resampling.BILINEAR) for c in range(probs.shape[-1])]
  return np.clip(np.stack([np.asarray(c) for c in channels], -1), 0.0, 1.0)


def segment(params: dict, image: np.ndarray, config) -> dict:
  """Two-stage segmentation of one uint8 [h, w, 3] image of any size, mapped back to [h, w].

  Returns {'probs': float32 [h, w, C], 'mask': uint8 [h, w] (binary {0, 1}; else class ids),
  'refined': int [k'] grid indices (row-major, Np x Np) of the patches stage 2 recomputed}.
  """
  spec = inference.spec_from_config(config)
  h, w = image.shape[:2]
  small = np.asarray(Image.fromarray(image).resize((spec.hi_size, spec.hi_size),
                                                   Image.Resampling.BILINEAR))
  pred = iterseg.infer(params, small[None].astype(np.float32) / 255.0, config)
  pred = jax.device_get(pred)
  probs = resize_probs(np.asarray(pred.probs[0]), h, w)
  if spec.num_classes == 1:
    mask = (probs[..., 0] > 0.5).astype(np.uint8)
  else:
    mask = np.argmax(probs, -1).astype(np.uint8)
  refined = np.asarray(pred.refined[0])
  if spec.threshold is not None:  # Only the chosen patches that were unsure enough were refined.
    refined = refined[np.asarray(pred.scores[0])[refined] >= spec.threshold]
  return {'probs': probs, 'mask': mask, 'refined': refined}


def overlay(image: np.ndarray, mask: np.ndarray, refined: np.ndarray, num_patches: int,
            alpha: float = 0.45) -> np.ndarray:
  """uint8 [h, w, 3]: foreground tinted (binary: green; classes: one colour each) and the refined
  patches of the Np x Np grid outlined, scaled to the image's own size."""
  h, w = mask.shape
  tint = TINTS[(mask.astype(np.int64) - 1) % len(TINTS)]
  fg = (mask > 0)[..., None]
  out = np.where(fg, (1 - alpha) * image + alpha * tint, image).round().astype(np.uint8)
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  line = max(1, round(min(h, w) / 256))
  for index in np.asarray(refined).tolist():
    r, c = divmod(int(index), num_patches)
    x0, x1 = round(c * w / num_patches), round((c + 1) * w / num_patches) - 1
    y0, y1 = round(r * h / num_patches), round((r + 1) * h / num_patches) - 1
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=OUTLINE, width=line)
  return np.asarray(pil)


# --- Writing ------------------------------------------------------------------------------------------


def _tmp(path: Path) -> Path:
  return path.with_name(f'.{path.name}.{os.getpid()}.tmp')


def save_outputs(output: Path, stem: str, image: np.ndarray, result: dict, num_patches: int) -> dict:
  """Writes the mask, probability map and overlay of one image; returns {kind: path}."""
  probs, mask = result['probs'], result['mask']
  binary = probs.shape[-1] == 1
  paths = {'mask': output / f'{stem}_mask.png',
           'probs': output / (f'{stem}_prob.png' if binary else f'{stem}_probs.npy'),
           'overlay': output / f'{stem}_overlay.png'}
  tmps = {kind: _tmp(p) for kind, p in paths.items()}
  try:
    Image.fromarray(mask * np.uint8(255) if binary else mask).save(tmps['mask'], format='PNG')
    if binary:
      Image.fromarray(np.round(probs[..., 0] * 65535).astype(np.uint16)).save(tmps['probs'],
                                                                             format='PNG')
    else:
      with open(tmps['probs'], 'wb') as f:
        np.save(f, probs.astype(np.float32))
    Image.fromarray(overlay(image, mask, result['refined'], num_patches)).save(tmps['overlay'],
                                                                             format='PNG')
    for kind, p in paths.items():  # Only now do complete files take the final names.
      os.replace(tmps[kind], p)
  finally:
    for t in tmps.values():
      if t.exists():
        t.unlink()
  return {kind: str(p) for kind, p in paths.items()}


def predict_files(params: dict, config, files: Sequence[Path], output, *,
                  progress: bool = True) -> list[dict]:
  """Segments every file (each checked readable first) and writes its outputs into `output`."""
  files = [Path(f) for f in files]
  for f in files:  # Fail on an unreadable file before any work (headers only; decoding comes later).
    read_image(f, decode=False)
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  written = []
  for f, stem in tqdm(list(zip(files, output_stems(files))), desc='predict', unit='image',
                      disable=not progress):
    image = read_image(f)
    result = segment(params, image, config)
    paths = save_outputs(output, stem, image, result, int(config.num_patches))
    written.append({'input': str(f), 'height': image.shape[0], 'width': image.shape[1],
                    'refined_patches': len(result['refined']), **paths})
  return written


def run(config, workdir: str) -> dict:
  """--mode=predict: config.predict.input -> config.predict.output (default <workdir>/predictions).

  Uses the networks trained in `workdir`, stage 2 at config.num_patches. Returns {'output',
  'num_patches', 'images': [{'input', 'height', 'width', 'refined_patches', 'mask', 'probs',
  'overlay'}]}.
  """
  files = list_inputs(config.predict.input)
  params, saved = iterseg.load(workdir, int(config.num_patches))
  evaluate.check_same_geometry(config, saved, workdir)
  output = Path(os.path.expanduser(config.predict.output or os.path.join(workdir, 'predictions')))
  main = jax.process_index() == 0
  if not main:  # Every process would write the same files.
    return {'output': str(output), 'num_patches': int(config.num_patches), 'images': []}
  images = predict_files(params, config, files, output)
  print(f'Segmented {len(images)} image(s) with the two-stage method at Np={config.num_patches}; '
        f'masks, probability maps and overlays in {output}')
  return {'output': str(output), 'num_patches': int(config.num_patches), 'images': images}
