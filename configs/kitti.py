"""KITTI semantics, binary "vehicles" (paper Table 1: 200 frames, hi_size 512, 6.6 % foreground).

Driving scenes are not rotation invariant: no rotation augmentation (as the authors).
"""

from iterseg.configs import default


def get_config():
  c = default.get_config()
  c.data.name = 'kitti'
  c.hi_size = 512
  c.train.rotate = False
  return c
