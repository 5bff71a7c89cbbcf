"""PH2 at native size (resolution='native'): the 575 x 766 dermoscopy images are not squashed to
768^2, and Dice is computed on the annotators' masks at that size.

Training sees 256 x 256 crops (hi_size); stage 1 at 1/8 (32 px per crop), stage-2 tiles of 64 px
with an 8-px halo; inference takes each image at its own size.
"""

from iterseg.configs import default, ph2


def get_config():
  return default.native(ph2.get_config())
