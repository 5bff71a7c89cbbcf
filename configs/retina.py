"""RETINA: DRIVE + STARE + CHASE_DB1 vessels (paper Table 1: 66 images, hi_size 768, 7.3 % fg).

The manual folder holds whichever of DRIVE/, STARE/, CHASE_DB1/ you have.
"""

from iterseg.configs import default


def get_config():
  c = default.get_config()
  c.data.name = 'retina'
  c.hi_size = 768
  return c
