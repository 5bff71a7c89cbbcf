"""--mode=export: the compiled two-stage function as a `jax.export` artifact that serves without iterseg.

Writes into export.output (default <workdir>/export):
  two_stage.jax   the serialized jax.export.Exported of two-stage inference for a fixed batch of
                  images [B, hi, hi, 3] uint8, stage 1 and stage 2 at the operating point (the whole
                  adaptive pipeline, top-k and patch copies included, as one StableHLO graph), for
                  every platform of export.platforms (e.g. cpu and cuda, from a CPU-only machine);
  params.npz      its parameters: the arguments before the images, in order (arr_0, arr_1, ...);
  model.json      what it takes and gives: input shape and dtype, outputs, the operating point (Np,
                  k, threshold), the geometry, iterseg's and jax's versions, the files' sha256.

Serving needs only jax and numpy (the README's "Serving an export" block):

  exported = jax.export.deserialize(open('two_stage.jax', 'rb').read())
  params = [p[f'arr_{i}'] for i in range(len(p.files))]     # p = np.load('params.npz')
  probs, scores, refined = exported.call(params, images)   # images: uint8 [B, hi, hi, 3]

At resolution='native' inference is a host-driven loop over size buckets, not one graph: it is not
exported (export refuses it in one line).
"""

import hashlib
import importlib.metadata
import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from iterseg import checkpoints, files, native
from iterseg.errors import SettingsError
from iterseg.models import Networks
from iterseg.run import Run
from iterseg.settings import Settings

ARTIFACT, PARAMS, DESCRIPTION = 'two_stage.jax', 'params.npz', 'model.json'


def export(nets: Networks, s: Settings, folder: str) -> dict:
  """Writes the artifact of two-stage inference at s.spec with `nets`'s stage 1 and stage 2 into
  `folder` (see the module docstring); returns model.json's content and 'files'."""
  spec, batch = s.spec, s.export.batch_size
  two_stage = native.one_call(s)  # The compiled function of the square protocol.
  leaves, tree = jax.tree.flatten(nets.at(spec.num_patches))

  def serve(flat, images):
    pred = two_stage(jax.tree.unflatten(tree, flat), images, spec)
    return pred.probs, pred.scores, pred.refined

  images = jax.ShapeDtypeStruct((batch, spec.hi_size, spec.hi_size, 3), jnp.uint8)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  exported = jax.export.export(jax.jit(serve), platforms=tuple(s.export.platforms))(shapes, images)
  files.check_writable(folder)
  others = sorted(n for n in set(os.listdir(folder)) - {ARTIFACT, PARAMS, DESCRIPTION}
                  if not n.startswith('.'))
  if others:
    raise SettingsError(f'config.export.output={folder} holds other files ({", ".join(others[:3])}'
                        f'): an export replaces its folder whole; choose a new or empty folder.')
  blob = bytes(exported.serialize())
  buffer = io.BytesIO()
  np.savez(buffer, *[np.asarray(x) for x in leaves])
  out_shapes = [(list(a.shape), str(a.dtype)) for a in exported.out_avals]
  description = {
      'input': {'shape': [batch, spec.hi_size, spec.hi_size, 3], 'dtype': 'uint8',
                'range': '0..255 (RGB)'},
      'outputs': {name: {'shape': shape, 'dtype': dtype} for name, (shape, dtype) in zip(
          ('probs', 'scores', 'refined'), out_shapes)},
      'operating_point': {'num_patches': spec.num_patches, 'refine_count': spec.refine_count,
                          'threshold': spec.threshold},
      'geometry': spec.geometry(), 'dtype': spec.dtype, 'platforms': list(exported.platforms),
      'num_params': len(leaves),
      'versions': {'iterseg': _version(), 'jax': jax.__version__,
                   'serialization': exported.calling_convention_version},
      'sha256': {ARTIFACT: hashlib.sha256(blob).hexdigest(),
                 PARAMS: hashlib.sha256(buffer.getvalue()).hexdigest()},
  }
  with files.replaced_folder(folder) as tmp:  # The new set whole, or the previous one.
    for name, data in ((ARTIFACT, blob), (PARAMS, buffer.getvalue())):
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    files.atomic_write_json(os.path.join(tmp, DESCRIPTION), description)
  paths = {name: os.path.join(folder, name) for name in (ARTIFACT, PARAMS, DESCRIPTION)}
  return dict(description, files=list(paths.values()),
              bytes={ARTIFACT: len(blob), PARAMS: len(buffer.getvalue())})


def run(s: Settings, workdir: str) -> dict:
  """--mode=export: the workdir's networks at its operating point (as `iterseg.load` takes them)."""
  s = Run(workdir).inference_settings(s, fallback=False)
  nets = checkpoints.load_networks(workdir, s, num_patches=[s.spec.num_patches], strict=True)
  folder = os.path.expanduser(s.export.output or os.path.join(workdir, 'export'))
  result = export(nets, s, folder)
  sizes = ', '.join(f'{name} {size / 2 ** 20:.1f} MiB' for name, size in result['bytes'].items())
  print(f'Exported two-stage inference (batch {s.export.batch_size} of {s.spec.hi_size}^2 uint8, '
        f'Np={s.spec.num_patches}, k={s.spec.refine_count}) for {"/".join(result["platforms"])} '
        f'into {folder}: {sizes}.')
  return result


def _version() -> str:
  try:
    return importlib.metadata.version('iterseg')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'
