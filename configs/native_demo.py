"""The native-resolution demo: synthetic 1k-2k images segmented at their own size, CPU minutes.

  python launch.py --config=configs/native_demo.py                    # train, then evaluate
  python launch.py --config=configs/native_demo.py --mode=benchmark   # 1k^2 .. 16k^2 vs the dense

Training sees random 256 x 256 crops (hi_size): stage 1 their 1/8 thumbnails (32 x 32), stage 2 four
tiles of 64 px (num_patches 4) per crop with an 8-px halo, the baseline whole crops. Inference takes
any H x W: stage 1 on the image / 8, stage 2 on the least confident tenth of its 64-px tiles.
"""

from iterseg.configs import default


def get_config():
  c = default.native(default.get_config(), crop=256, downscale=8, tile=64, halo=8)
  c.data.name = 'synthetic'
  c.data.num_examples = 40
  c.data.synthetic_sides = (1024, 2048)
  c.refine_count = 4  # Tiles per crop that stage 2 trains on.
  c.model.width = 8
  c.model.depth = 4
  c.train.stage2_init = 'stage1'
  c.train.patch_sampling = 'entropy_weighted'
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.rotate = False
  c.train.stage1_epochs = 1500  # One step per epoch (28 training images, batch 16); cheap at 1/8.
  c.train.stage2_epochs = 300
  c.train.baseline_epochs = 300
  c.train.log_every = 25
  c.train.checkpoint_every = 300
  c.eval.batch_size = 1
  c.native.refine_fraction = 0.1
  c.calibrate.refine_fractions = (0.05, 0.1, 0.15, 0.2, 0.3)
  c.calibrate.thresholds = (None, 0.02, 0.05, 0.08)  # The share, capped, of tiles this unsure.
  return c
