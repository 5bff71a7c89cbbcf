"""Images larger than memory: TIFFs read a file tile at a time and the output written by bands as a
pyramidal OME-TIFF, resumable; the out-of-core result is the in-RAM one."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tifffile

from iterseg import checkpoints, errors, models, native, settings, slides
from tests.test_native import images, native_config, native_workdir  # noqa: F401 (a fixture)


class Bands:
  """A sink that keeps each band it is given (to compare with the output held in RAM)."""
  quantized = False

  def __init__(self, rows, height):
    self.rows, self.height, self.bands = rows, height, {}

  def done(self, y0):
    return False

  def put(self, y0, band):
    self.bands[y0] = np.array(np.asarray(band)[0, :min(self.rows, self.height - y0)])

  def probs(self, width):
    return np.concatenate([self.bands[y] for y in sorted(self.bands)])[:, :width]


@pytest.fixture(scope='module')
def model():
  s = settings.from_config(native_config(halo=4))
  return native.NativeModel(models.random_networks(s.spec, jax.random.key(0)), s.spec)


def write_tiff(path, image, *, tile=128, levels=0, compression='zlib'):
  slides.write_pyramid(path, *image.shape[:2], (image[y:y + tile] for y in range(
      0, len(image), tile)), tile=tile, levels=levels, compression=compression,
                       resolution={'x': 0.25, 'y': 0.25, 'unit': 'µm'})
  return path


@pytest.fixture(scope='module')
def slide(tmp_path_factory):
  (image,) = images((1100, 700), seed=3)
  return image, write_tiff(tmp_path_factory.mktemp('slide') / 'slide.ome.tif', image)


def test_a_tiff_region_decodes_only_the_file_tiles_under_it(slide):
  image, path = slide
  source = slides.TiffSource(path)
  tile, valid = source.region(-5, 250, 40)
  np.testing.assert_array_equal(tile[5:], image[:35, 250:290])
  assert not valid[:5].any() and valid[5:].all()
  assert source.decoded == 2 * 128 * 128  # The two file tiles of 128 px under columns 250 .. 290.
  source.region(0, 260, 20)
  assert source.decoded == 2 * 128 * 128  # Cached.
  source.close()


def test_prefetch_decodes_the_tiles_under_regions_in_threads_and_the_cut_reuses_them(slide):
  image, path = slide
  with slides.TiffSource(path) as source:
    source.prefetch([(-5, 250, 40), (300, 10, 20)])  # 2 file tiles, and 1.
    for future in list(source.loading.values()):
      future.result()
    assert source.decoded == 3 * 128 * 128 and not source.loading
    tile, _ = source.region(300, 10, 20)
    np.testing.assert_array_equal(tile, image[300:320, 10:30])
    assert source.decoded == 3 * 128 * 128  # Nothing decoded again.


def test_the_thumbnail_comes_from_the_pyramid_level_that_divides_the_factor(tmp_path):
  (image,) = images((600, 900), seed=1)
  path = write_tiff(tmp_path / 'pyramid.tif', image, levels=2)
  source = slides.TiffSource(path)
  assert len(source.levels) == 3
  thumb = source.thumbnail(8)
  assert source.decoded == 0  # Only the level at 1/4 was read.
  # Level 2 is the image's 2 x 2 means twice, rounded to uint8 each time: within 2 / 255.
  np.testing.assert_allclose(thumb, slides.thumbnail(image, 8), atol=2 / 255 + 1e-6)
  assert source.resolution == {'x': 0.25, 'y': 0.25, 'unit': 'µm'}
  source.close()


def test_out_of_core_two_stage_gives_the_in_ram_probabilities(model, slide):
  image, path = slide
  in_ram = model.two_stage(image)
  source = slides.TiffSource(path)
  bands = Bands(model.band_rows, len(image))
  pred = model.two_stage(source, sink=bands)
  assert pred.probs is None and len(bands.bands) == 3  # 1100 rows in bands of 512.
  np.testing.assert_array_equal(pred.refined, in_ram.refined)
  np.testing.assert_allclose(bands.probs(image.shape[1]), in_ram.probs, atol=1e-6)
  assert pred.stats['refined'] == in_ram.stats['refined']
  source.close()
  assert source.thumbnail_decoded == image.shape[0] * image.shape[1]  # No pyramid: one pass.
  assert source.decoded - source.thumbnail_decoded == pixels_under(pred.refined, *image.shape[:2])


def pixels_under(refined, height, width, file_tile=128, tile=32, halo=4):
  """The pixels of the file tiles under each refined tile and its halo, each file tile once: what
  stage 2 must decode, and all it may."""
  under = set()
  for r, c in zip(*np.nonzero(refined)):
    y0, x0 = max(r * tile - halo, 0), max(c * tile - halo, 0)
    y1, x1 = min((r + 1) * tile + halo, height) - 1, min((c + 1) * tile + halo, width) - 1
    under |= {(i, j) for i in range(y0 // file_tile, y1 // file_tile + 1)
              for j in range(x0 // file_tile, x1 // file_tile + 1)}
  return sum(min(file_tile, height - i * file_tile) * min(file_tile, width - j * file_tile)
             for i, j in under)


def test_out_of_core_sliding_window_gives_the_in_ram_probabilities(model, slide):
  image, path = slide
  bands = Bands(model.band_rows, len(image))
  with slides.TiffSource(path) as source:
    model.sliding_window(source, sink=bands)
  np.testing.assert_allclose(bands.probs(image.shape[1]), model.sliding_window(image).probs,
                             atol=1e-6)


def test_the_dense_reference_out_of_core_resumes_without_running_the_saved_bands_again(
    model, slide, tmp_path):
  """Stopped after its first band, the rerun runs only the windows that reach the bands not saved
  (those over the saved rows too, for their sums below) and writes the uninterrupted files."""
  image, path = slide
  out = tmp_path / 'dense_mask.ome.tif'
  make = lambda: slides.SlideSink(out, *image.shape[:2], {'method': 'baseline'},
                                  rows=model.band_rows, probabilities=True)
  read = lambda: [tifffile.imread(p) for p in (out, tmp_path / 'dense_prob.ome.tif')]
  with slides.TiffSource(path) as source:
    sink = make()
    whole = model.sliding_window(source, sink=sink)
    sink.close()
    expected = read()
    sink = make()
    assert model.sliding_window(source, sink=sink, stop=lambda: sink.made) is None  # Killed.
    sink.wait()
    again = make()
    assert again.resumed == 1
    pred = model.sliding_window(source, sink=again)
    again.close()
  for a, b in zip(read(), expected):
    np.testing.assert_array_equal(a, b)
  rows = native._starts(len(image), model.spec.window_side, model.spec.overlap)
  reaching = [y for y in rows if y + model.spec.window_side > model.band_rows]
  assert pred.stats['windows'] == whole.stats['windows'] * len(reaching) // len(rows) < (
      whole.stats['windows'])


def test_the_mask_is_written_as_a_pyramidal_ome_tiff_and_a_killed_job_resumes(model, slide,
                                                                               tmp_path):
  image, path = slide
  expected = ((model.two_stage(image).probs[..., 0] > 0.5) * 255).astype(np.uint8)
  out = tmp_path / 'slide_mask.ome.tif'
  key = {'input': str(path), 'method': 'two_stage'}
  source = slides.TiffSource(path)
  sink = slides.SlideSink(out, len(image), image.shape[1], key, rows=model.band_rows,
                          resolution=source.resolution)
  assert model.two_stage(source, sink=sink, stop=lambda: sink.done(0)) is None  # Killed.
  sink.wait()
  assert not out.exists() and sink.done(0) and not sink.done(1024)
  again = slides.SlideSink(out, len(image), image.shape[1], key, rows=model.band_rows,
                           resolution=source.resolution)
  assert again.resumed in (1, 2)  # The first band, and the second if it was in flight.
  model.two_stage(source, sink=again)
  assert again.close() == {'mask': str(out)}
  assert not again.partial.exists()
  with tifffile.TiffFile(out) as tif:
    levels = tif.series[0].levels
    np.testing.assert_array_equal(levels[0].asarray(), expected)
    assert [level.shape for level in levels] == [(1100, 700), (550, 350), (275, 175)]
  source.close()
  with slides.TiffSource(out) as written:
    assert written.resolution == {'x': 0.25, 'y': 0.25, 'unit': 'µm'}
  other = slides.SlideSink(out, len(image), image.shape[1], dict(key, method='stage1'),
                           rows=model.band_rows)
  assert other.resumed == 0  # Bands of another method are never reused.


def test_processes_sharing_a_slide_make_alternate_bands_of_the_one_file(model, slide, tmp_path):
  """The sinks of two processes (in turn here) on one output: process i makes bands i, i + 2, ...
  (the dense reference only the windows reaching them), a rerun only those not saved; process 0
  assembles the file one process makes."""
  image, path = slide
  for method in (model.two_stage, model.sliding_window):
    make = lambda share: slides.SlideSink(tmp_path / 'slide_mask.ome.tif', *image.shape[:2],
                                          {'method': method.__name__}, rows=model.band_rows,
                                          share=share)
    with slides.TiffSource(path) as source:
      sink = make((0, 1))
      whole = method(source, sink=sink)
      expected = tifffile.imread(sink.close()['mask'])
      sinks = [make((i, 2)) for i in range(2)]
      zero = method(source, sink=sinks[0])
      sinks[0].wait()
      assert sinks[0].made == 2 and method(source, sink=sinks[1], stop=lambda: True) is None
      sinks = [make((i, 2)) for i in range(2)]  # Process 1 was stopped: the job is run again.
      one = [method(source, sink=sink) for sink in sinks][1]
      sinks[1].wait()  # Then the barrier, and process 0 assembles.
    assert [sink.made for sink in sinks] == [0, 1] and sinks[1].resumed == 2  # Band 512 made.
    np.testing.assert_array_equal(tifffile.imread(sinks[0].close()['mask']), expected)
    if method == model.sliding_window:
      assert zero.stats['windows'] + one.stats['windows'] < 1.2 * whole.stats['windows']


def test_predict_segments_a_slide_out_of_core_beside_plain_images(native_workdir, slide, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from iterseg import predict  # pylint: disable=g-import-not-at-top
  from tests.helpers import set_fields  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  image, path = slide
  folder = tmp_path / 'in'
  folder.mkdir()
  (folder / 'slide.ome.tif').write_bytes(path.read_bytes())
  Image.fromarray(images((50, 90))[0]).save(folder / 'a.png')
  (folder / 'broken.tif').write_bytes(path.read_bytes()[:5000])  # Truncated: read as any image.
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(folder), 'predict.output': str(tmp_path / 'out')})
  s = settings.from_config(config)
  with pytest.raises(errors.PredictError, match='1 of 3 image'):
    predict.run(s, str(workdir))
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  records = {Path(r['input']).name: r for r in summary['images']}
  assert 'error' in records['broken.tif'] and 'mask' in records['a.png']
  record = records['slide.ome.tif']
  assert record['mask'].endswith('slide_mask.ome.tif') and 0 < record['decoded'] <= 2
  model = native.NativeModel(checkpoints.load_networks(str(workdir), s, num_patches=[2]), s.spec)
  expected = ((model.two_stage(image).probs[..., 0] > 0.5) * 255).astype(np.uint8)
  np.testing.assert_array_equal(tifffile.imread(record['mask']), expected)
  assert Image.open(record['overlay']).size == (-(-700 // 8), -(-1100 // 8))


def test_a_large_thumbnail_goes_through_stage_1_in_overlapping_windows(model, slide, monkeypatch):
  """Windows of 48 + 2 x 16 thumbnail px (at 1/8: 138 x 88 px, 3 x 2 windows) give stage 1's
  whole-thumbnail outputs (the halo covers this U-Net's reach), one compilation serves them all,
  and out of core reads the thumbnail a band of windows at a time."""
  image, path = slide
  whole = model.two_stage(image)
  monkeypatch.setattr(native, 'STAGE1_WINDOW', 48)
  monkeypatch.setattr(native, 'STAGE1_HALO', 16)
  windowed = native.NativeModel(model.nets, model.spec)
  pred = windowed.two_stage(image)
  assert windowed.stage1.compiles == 0 and windowed.stage1_window.compiles == 1
  np.testing.assert_allclose(pred.coarse, whole.coarse, atol=1e-5)
  np.testing.assert_array_equal(pred.refined, whole.refined)
  np.testing.assert_array_equal(pred.preview, whole.preview)
  bands = Bands(model.band_rows, len(image))
  with slides.TiffSource(path) as source:
    windowed.two_stage(source, sink=bands)
  np.testing.assert_allclose(bands.probs(image.shape[1]), pred.probs, atol=1e-6)


def test_a_slide_s_outputs_are_replaced_whole_or_not_at_all(native_workdir, slide, tmp_path,
                                                           monkeypatch):
  """A full disk as the slide's last output takes its name: the previous mask, probabilities and
  overlay stay, byte for byte, and nothing staged is left; the bands stay for the rerun."""
  import errno  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from iterseg import predict  # pylint: disable=g-import-not-at-top
  from tests.helpers import set_fields  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'slide.ome.tif').write_bytes(slide[1].read_bytes())
  out = tmp_path / 'out'
  s = settings.from_config(set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(tmp_path / 'in'), 'predict.output': str(out)}))
  predict.run(s, str(workdir))
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith('slide_')}
  assert sorted(before) == ['slide_mask.ome.tif', 'slide_overlay.png', 'slide_prob.ome.tif']
  (tmp_path / 'in' / 'slide.ome.tif').write_bytes(slide[1].read_bytes())  # Changed: made again.
  real = os.replace

  def replace(src, dst):
    if str(dst).endswith('slide_overlay.png'):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(src, dst)
  monkeypatch.setattr(os, 'replace', replace)
  with pytest.raises(errors.PredictError, match='cannot write its outputs to .* [(]disk full[)]'):
    predict.run(s, str(workdir))
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and
          p.name.startswith('slide_')} == before
  assert (out / 'slide_mask.ome.tif.partial').is_dir()
  assert not [p.name for p in out.iterdir() if p.name.startswith('.')]
