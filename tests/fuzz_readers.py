"""What test_fuzz reads each image file with: imports no jax, so its memory server starts fast."""

from iterseg import slides
from iterseg.data import common


def read_slide(path):
  """A TIFF opened as a slide (slides.TiffSource), and a region of it read."""
  with slides.TiffSource(path) as source:
    return source.region(0, 0, 64)


READERS = (common.read_image, common.header_size, common.read_binary_mask, read_slide)
