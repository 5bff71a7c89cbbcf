"""KITTI at its own aspect (resolution='native'): the 1242 x 375 frames are not squashed to 512^2.

Training sees 256 x 256 crops (hi_size) of the frames as they are; stage 1 at 1/8 (32 px per
crop), stage-2 tiles of 64 px with an 8-px halo; inference takes each frame at its own size.
"""

from iterseg.configs import default, kitti


def get_config():
  return default.native(kitti.get_config())
