"""Slides in other formats behind the same source: Zarr and OME-Zarr read a chunk at a time (and
written as the output), OpenSlide's formats read a file tile at a time; one factory picks."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from iterseg import checkpoints, errors, native, predict, settings, slides
from tests.test_native import images, native_workdir  # noqa: F401 (a fixture)
from tests.test_slides import Bands, model, pixels_under  # noqa: F401 (a fixture)

PIXEL = {'x': 0.25, 'y': 0.5, 'unit': 'µm'}


def blocky(height, width, block, seed=0):
  """uint8 [height, width, 3], constant in block x block squares: its block means are whole."""
  (small,) = images((height // block, width // block), seed=seed)
  return small.repeat(block, 0).repeat(block, 1)


def write_ome_zarr(path, levels, chunk=64):
  """An OME-Zarr 0.5 (Zarr v3), axes tczyx, of the images `levels` [h, w, 3]: level i at 1 / 4^i."""
  group = zarr.open_group(path, mode='w', zarr_format=3)
  datasets = []
  for i, level in enumerate(levels):
    array = group.create_array(str(i), shape=(1, 3, 1, *level.shape[:2]), dtype='uint8',
                               chunks=(1, 3, 1, chunk, chunk))
    array[:] = level.transpose(2, 0, 1)[None, :, None]
    datasets.append({'path': str(i), 'coordinateTransformations': [
        {'type': 'scale', 'scale': [1, 1, 1, PIXEL['y'] * 4 ** i, PIXEL['x'] * 4 ** i]}]})
  axes = [{'name': 't', 'type': 'time'}, {'name': 'c', 'type': 'channel'},
          {'name': 'z', 'type': 'space', 'unit': 'micrometer'}] + [
              {'name': n, 'type': 'space', 'unit': 'micrometer'} for n in 'yx']
  group.attrs['ome'] = {'version': '0.5', 'multiscales': [{'axes': axes, 'datasets': datasets}]}
  return path


@pytest.mark.parametrize('zarr_format', [2, 3])
def test_a_zarr_region_decodes_only_the_chunks_under_it(tmp_path, zarr_format):
  (image,) = images((300, 200))
  path = tmp_path / 'plain.zarr'
  zarr.create_array(path, shape=image.shape, chunks=(64, 64, 3), dtype='uint8',
                    zarr_format=zarr_format)[:] = image
  with slides.open_source(path) as source:
    assert isinstance(source, slides.ZarrSource) and source.resolution is None
    tile, valid = source.region(-5, 180, 40)
    np.testing.assert_array_equal(tile[5:, :20], image[:35, 180:])
    assert valid[5:, :20].all() and not valid[:5].any() and not valid[:, 20:].any()
    assert source.decoded == 64 * 64 + 64 * 8  # The chunks (0, 2) and (0, 3) (8 columns inside).
    source.region(10, 140, 20)
    assert source.decoded == 64 * 64 + 64 * 8  # Cached.
  grey = tmp_path / 'grey.zarr'
  zarr.create_array(grey, shape=(300, 200), chunks=(64, 64), dtype='uint8',
                    zarr_format=zarr_format)[:] = image[..., 0]
  with slides.ZarrSource(grey) as source:
    np.testing.assert_array_equal(source.region(0, 0, 20)[0], image[:20, :20, :1].repeat(3, -1))


def test_the_ome_zarr_thumbnail_comes_from_the_pyramid_level_and_equals_the_block_means(tmp_path):
  image = blocky(256, 192, 4)
  path = write_ome_zarr(tmp_path / 'pyramid.ome.zarr', [image, image[::4, ::4]])
  source = slides.open_source(path)
  assert source.sizes == [(256, 192), (64, 48)] and source.resolution == PIXEL
  np.testing.assert_allclose(source.thumbnail(8), slides.thumbnail(image, 8), atol=1e-6)
  np.testing.assert_allclose(source.thumbnail(4, rows=(3, 9)), slides.thumbnail(image, 4)[3:9],
                             atol=1e-6)
  assert source.decoded == 0  # Only the level at 1/4 was read.
  np.testing.assert_allclose(source.thumbnail(2), slides.thumbnail(image, 2), atol=1e-6)
  assert source.decoded == 256 * 192  # 4 does not divide 2: the image itself, never a coarser level.


def test_two_stage_on_a_zarr_source_equals_two_stage_in_ram(model, tmp_path):  # noqa: F811
  (image,) = images((1100, 700), seed=3)
  path = tmp_path / 'slide.zarr'  # No pyramid: the thumbnail in one pass.
  zarr.create_array(path, shape=image.shape, chunks=(128, 128, 3), dtype='uint8')[:] = image
  in_ram = model.two_stage(image)
  bands = Bands(model.band_rows, len(image))
  with slides.open_source(path) as source:
    pred = model.two_stage(source, sink=bands)
  np.testing.assert_array_equal(pred.refined, in_ram.refined)
  np.testing.assert_allclose(bands.probs(image.shape[1]), in_ram.probs, atol=1e-6)
  assert source.decoded - source.thumbnail_decoded == pixels_under(pred.refined, 1100, 700)


def test_predict_writes_an_ome_zarr_mask_of_a_zarr_slide_with_its_pixel_size(
    native_workdir, tmp_path):  # noqa: F811
  from tests.helpers import set_fields  # pylint: disable=g-import-not-at-top
  config, workdir = native_workdir
  (image,) = images((600, 400), seed=5)
  folder = tmp_path / 'in'
  slides.write_pyramid(folder / 'slide.ome.zarr', 600, 400,
                       (image[y:y + 128] for y in range(0, 600, 128)), tile=128, levels=0,
                       resolution=PIXEL)  # RGB: written channels first (NGFF's order).
  assert predict.list_inputs(folder) == [folder / 'slide.ome.zarr']  # A folder that is one input.
  config = set_fields(config.copy_and_resolve_references(), **{
      'predict.input': str(folder), 'predict.output': str(tmp_path / 'out'),
      'predict.slide_format': 'zarr'})
  s = settings.from_config(config)
  (record,) = predict.run(s, str(workdir))['images']
  assert record['mask'] == str(tmp_path / 'out' / 'slide_mask.ome.zarr')
  trained = native.NativeModel(checkpoints.load_networks(str(workdir), s, num_patches=[2]), s.spec)
  expected = ((trained.two_stage(image).probs[..., 0] > 0.5) * 255).astype(np.uint8)
  written = zarr.open_group(record['mask'], mode='r')
  np.testing.assert_array_equal(written['0'][:], expected)
  np.testing.assert_array_equal(written['1'][:], expected[::2, ::2])
  assert written.attrs['multiscales'][0]['version'] == '0.4'
  with slides.open_source(record['mask']) as mask:
    assert mask.resolution == PIXEL and mask.sizes == [(600, 400), (300, 200)]
  assert zarr.open(record['probs'], mode='r')['0'].shape == (600, 400)
  assert Path(record['overlay']).exists() and not list((tmp_path / 'out').glob('.*'))


def test_a_damaged_or_unsupported_zarr_store_is_one_line_naming_it(tmp_path):
  (image,) = images((100, 100))
  path = tmp_path / 'a.zarr'
  zarr.create_array(path, shape=image.shape, chunks=(64, 64, 3), dtype='uint8')[:] = image
  chunk = next(p for p in (path / 'c').rglob('*') if p.is_file())
  chunk.write_bytes(b'not a chunk')
  with slides.open_source(path) as source, pytest.raises(errors.DataError) as e:
    source.region(0, 0, 100)
  bad = {'chunk': str(e.value)}
  (path / 'zarr.json').write_text('{')
  group = zarr.open_group(tmp_path / 'b.zarr', mode='w')
  zarr.create_array(tmp_path / 'c.zarr', shape=(8, 8), dtype='uint16')
  for name in ('a.zarr', 'b.zarr', 'c.zarr'):
    with pytest.raises(errors.DataError) as e:
      slides.open_source(tmp_path / name)
    bad[name] = str(e.value)
  assert all(str(tmp_path) in line and '\n' not in line for line in bad.values()), bad
  assert 'multiscales' in bad['b.zarr'] and 'uint16' in bad['c.zarr'], bad
  del group


def test_zarr_stores_and_openslide_formats_are_slides_each_one_input(tmp_path):
  (tmp_path / 'a.ome.zarr').mkdir()
  (tmp_path / 'b.ndpi').write_bytes(b'')
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'c.txt').write_text('')
  assert predict.list_inputs(tmp_path) == [tmp_path / 'a.ome.zarr', tmp_path / 'b.ndpi']
  assert predict.list_inputs(tmp_path / 'a.ome.zarr') == [tmp_path / 'a.ome.zarr']
  assert predict.output_names([tmp_path / 'a.ome.zarr', tmp_path / 'd.ome.tif']) == ['a', 'd']
  assert slides.is_slide(tmp_path / 'a.ome.zarr') and slides.is_slide(tmp_path / 'b.ndpi')
  assert not slides.is_slide(tmp_path / 'notes')


def test_without_openslide_its_formats_name_the_extra_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'openslide', None)  # `import openslide` fails.
  (tmp_path / 'a.ndpi').write_bytes(b'')
  with pytest.raises(errors.DataError, match=r"a\.ndpi.*pip install 'iterseg\[slides\]'"):
    slides.open_source(tmp_path / 'a.ndpi')


def test_openslide_reads_a_generic_tiled_tiff_a_tile_at_a_time(tmp_path):
  pytest.importorskip('openslide')
  image = blocky(200, 300, 2, seed=1)
  path = tmp_path / 'generic.tif'
  with tifffile.TiffWriter(path) as tif:  # Levels as further pages, as OpenSlide reads them.
    options = dict(tile=(64, 64), photometric='rgb', compression='zlib')
    tif.write(image, resolution=(40000, 40000), resolutionunit='CENTIMETER', **options)
    tif.write(image[::2, ::2], subfiletype=1, metadata=None, **options)
  source = slides.OpenSlideSource(path)
  assert source.sizes == [(200, 300), (100, 150)]
  assert source.resolution == {'x': 0.25, 'y': 0.25, 'unit': 'µm'}
  tile, valid = source.region(150, 270, 40)
  np.testing.assert_array_equal(tile[:, :30], image[150:190, 270:])
  assert valid[:, :30].all() and not valid[:, 30:].any() and not tile[:, 30:].any()
  assert source.decoded == 64 * 44  # The file tile (2, 4): 64 rows, 44 columns inside.
  np.testing.assert_allclose(source.thumbnail(4), slides.thumbnail(image, 4), atol=1e-6)
  assert source.decoded == 64 * 44  # The thumbnail came from the level at 1/2.
  source.close()


def test_a_zarr_output_replaces_the_previous_one_whole(tmp_path):
  path = tmp_path / 'm.ome.zarr'
  for value in (255, 0):
    mask = np.full((70, 50), value, np.uint8)
    slides.write_pyramid(path, 70, 50, iter([mask[:64], mask[64:]]), tile=64)
    np.testing.assert_array_equal(zarr.open_group(path, mode='r')['0'][:], mask)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m.ome.zarr']
  assert json.loads((path / '0' / '.zarray').read_text())['chunks'] == [64, 64]
  assert not list((path / '0').glob('[0-9]*'))  # Tiles of zeros are left to zarr's fill value.
