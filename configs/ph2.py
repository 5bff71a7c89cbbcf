"""PH2 dermoscopy (paper Table 1: 200 images, hi_size 768, 31.4 % foreground).

  python launch.py --config=configs/ph2.py --mode=prepare --config.data.manual_dir=/data/PH2
  python launch.py --config=configs/ph2.py
"""

from iterseg.configs import default


def get_config():
  c = default.get_config()
  c.data.name = 'ph2'
  c.hi_size = 768
  return c
