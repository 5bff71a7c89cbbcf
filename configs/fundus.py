"""A native-resolution recipe for thin structures in real high-resolution images (fundus vessels).

  python launch.py --config=configs/fundus.py --config.data.manual_dir=<images/ and masks/ folder>

Point it at a folder of image/mask pairs (data.name='folder', any size: each image is segmented at
its own). Each choice, against configs/native_demo.py (synthetic blobs), for vessels 3-20 px wide:
- stage 1 at 1/4, not 1/8: at 1/8 a 3-px vessel is under half a stage-1 pixel and stage 1 cannot
  see it (configs/retina_vessels.py measured +0.15 hard Dice for 1/4 at the square protocol);
- tiles of 64 px with a 16-px halo: a vessel leaving a tile keeps its context;
- inputs standardised with the training images' statistics (fundus images are dark and
  low-contrast; the same statistics in training and inference);
- flips, 90-degree rotations and brightness/contrast jitter (vessels have no preferred direction;
  fixed statistics do not undo the jitter);
- lr 3e-3 after a 100-step warm-up, cosine decay;
- stage 2 starts from stage 1 and learns from the most uncertain tiles (entropy-weighted);
- the baseline trains on as many pixels as stage 2 (a quarter of its steps: stage 2 sees 4 tiles
  of 64 px per 256-px crop), so the dense reference is trained on equal footing;
- a validation split (calibrate.holdout, seeded, left out of training) chooses each network's
  checkpoint (the best hard Dice at inference) and --mode=calibrate's budget; never the test split.
Sized for under 30 minutes on 2 CPU cores, training and evaluation; on a GPU raise the epochs.
"""

from iterseg.configs import default


def get_config():
  c = default.native(default.get_config(), crop=256, downscale=4, tile=64, halo=16)
  c.data.name = 'folder'
  c.data.train_fraction = 0.7
  c.refine_count = 4  # Tiles per crop that stage 2 trains on.
  c.model.width = 8
  c.model.depth = 4
  c.model.input_norm = 'standardize'
  c.train.batch_size = 8
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 100
  c.train.lr_schedule = 'cosine'
  c.train.flip = True
  c.train.rotate = True
  c.train.brightness_contrast = 0.2
  c.train.stage2_init = 'stage1'
  c.train.patch_sampling = 'entropy_weighted'
  c.train.stage1_epochs = 3000
  c.train.stage2_epochs = 6000
  c.train.baseline_epochs = 1500  # As many training pixels as stage 2.
  c.train.exclude_holdout = True
  c.train.select_checkpoint = 'best'
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.eval.batch_size = 1
  c.eval.fov = 'dark_border'
  c.eval.errors = True
  c.native.refine_fraction = 0.15
  c.calibrate.refine_fractions = (0.05, 0.1, 0.15, 0.2, 0.3)
  return c
