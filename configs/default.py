"""The paper's recipe: every field that iterseg reads, with its default.

Variants (`ph2.py`, `retina.py`, `kitti.py`, `demo.py`) import this file and override a few fields.
Any field can be overridden on the command line, e.g. `--config.train.batch_size=8`; an unknown key is
an error.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameter init, augmentation and stage-2 patch sampling.

  # --- Geometry (read by iterseg.infer) -------------------------------------------------------
  c.resolution = 'square'  # 'square': every image resized to hi_size x hi_size (the paper);
  # 'native': each image at its own size and aspect (times data.scale). Then hi_size is the side of
  # the training crops, hi_size / stage1_size the factor stage 1 downscales by, hi_size / num_patches
  # the side of a stage-2 tile, refine_count the tiles per crop stage 2 trains on, and inference
  # takes any H x W (see c.native).
  c.hi_size = 768  # Every image is resized to hi_size x hi_size (paper Table 1).
  c.stage1_size = c.get_ref('hi_size') // 8  # Stage 1 sees the image at this side (authors: hi // 8).
  c.num_classes = 1  # 1 = binary (sigmoid); more = softmax over classes.
  c.num_patches = 8  # Np: the map is cut into Np x Np patches of side hi_size / Np.
  c.refine_count = config_dict.placeholder(int)  # Patches refined per image; None = Np (authors).
  c.score = 'entropy'  # Patch uncertainty: 'entropy' | 'margin' | 'distance' (authors), or
  # 'learned': stage 1's own predicted share of wrong pixels in the patch (needs model.error_head).
  c.stage2_uses_coarse = True  # Stage 2 also sees the stage-1 probabilities (False = authors).
  c.threshold = config_dict.placeholder(float)  # A chosen patch scoring below this keeps stage 1's
  # probabilities. Stage 2 still runs on all refine_count patches: it changes the result, not the cost.
  c.halo = 0  # Stage 2 sees each patch with this many real neighbouring pixels; only the centre is
  # written back (the U-Net paper's overlap-tile). 0 = bare patches (authors).
  c.refine_budget = 'image'  # 'image': refine_count patches per image (authors); 'batch': the
  # B * refine_count least confident patches over the whole batch.

  # --- U-Net (paper Sec. 4, "Model") ----------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.width = 64  # Channels of the first encoder convolution; doubled at each level.
  c.model.depth = 5  # Number of stride-2 convolutions (and transposed convolutions).
  c.model.dtype = 'float32'  # The convolutions' and activations': 'float32' | 'bfloat16' (GPU/TPU
  # matrix units). Parameters, optimizer state, the loss, probabilities and patch scores stay float32,
  # so checkpoints are the same whichever dtype trained them.
  c.model.input_norm = 'none'  # 'none' (authors) | 'standardize': (x - input_mean) / input_std per
  # channel before any network (low-contrast images such as fundus photographs learn). The statistics
  # are the training images', fixed, so a crop in training and the same pixels at inference (any
  # size, any tile) are the same input, and brightness/contrast augmentation is not undone.
  c.model.input_mean = config_dict.placeholder(tuple)  # (R, G, B) in [0, 1]; None: --mode=train
  c.model.input_std = config_dict.placeholder(tuple)  # measures them on the train split and saves them
  # with the run (config.json), where evaluate, predict and iterseg.load read them.
  c.model.error_head = False  # Stage 1 also predicts, per stage-1 pixel, the share of the
  # full-resolution pixels under it that its upsampled map gets wrong (for score='learned').

  # --- Data ----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic'  # 'ph2' | 'retina' | 'kitti' | 'folder' | 'synthetic'.
  c.data.manual_dir = ''  # Folder holding the official archives (unpacked), for real datasets.
  c.data.data_dir = '~/tensorflow_datasets'  # Where prepared datasets are written.
  c.data.split_seed = 123  # Random 70/30 train/test split (authors' seed).
  c.data.train_fraction = 0.7
  c.data.num_examples = 200  # Synthetic only: how many images to generate.
  c.data.kitti_label_ids = (26, 27, 28, 29, 30, 31)  # KITTI: Cityscapes ids counted as "vehicle".
  c.data.scale = 1.0  # Native: every image and mask scaled by this factor when prepared (aspect kept).
  c.data.synthetic_sides = (1024, 2048)  # Native synthetic: each side drawn in this range (px).
  c.data.synthetic_kind = 'lesions'  # Synthetic: 'lesions' (blobs and a few curves, as PH2) |
  # 'vessels' (fundus-like vessel trees 1-3 px wide, as RETINA; square only).

  # --- Training (paper Sec. 4, "Training") ---------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.networks = ('stage1', 'stage2', 'baseline')  # What --mode=train trains, in this order.
  c.train.batch_size = 64  # Global batch, split over all devices of all hosts.
  c.train.learning_rate = 1e-4  # Adam.
  c.train.lr_schedule = 'constant'  # 'constant' (authors) | 'cosine' (decay to 0 after warm-up).
  c.train.warmup_steps = 0  # Linear warm-up from 0 over this many steps.
  c.train.stage1_epochs = 200
  c.train.stage2_epochs = 1000
  c.train.baseline_epochs = 200
  c.train.num_patches_list = (2, 4, 8, 16)  # Stage 2 is trained once per Np in this list.
  c.train.patch_sampling = 'random'  # 'random' (authors) | 'entropy_weighted' | 'top'.
  c.train.stage2_init = 'random'  # 'random' (authors' 2022 code) | 'stage1' (their follow-up).
  c.train.error_weight = 1.0  # model.error_head: weight of its loss (binary cross-entropy against
  # the measured share of wrong pixels) beside stage 1's segmentation loss.
  c.train.exclude_holdout = False  # True: train without the calibrate.holdout share of the train
  # split, so that --mode=calibrate measures on images no network saw (False: all, as the paper).
  c.train.select_checkpoint = 'last'  # 'last' (the paper) | 'best': each checkpoint is scored on
  # the validation images (that holdout, so it needs exclude_holdout=True) by its hard Dice at
  # inference, as --mode=evaluate measures it, and the modes load the best step of each network
  # (stage 2 learns from the best stage 1). Training resumes from the latest either way.
  c.train.focal_alpha = 0.25
  c.train.focal_gamma = 2.0
  c.train.head_bias_prior = config_dict.placeholder(float)  # Binary: start every pixel at this
  # foreground probability (the focal-loss paper's prior init); None = zero bias (authors).
  c.train.flip = True  # Horizontal flip, p = 0.5.
  c.train.brightness_contrast = 0.1  # Brightness and contrast shifts in +-this, p = 0.5 each.
  c.train.gamma = 0.0  # Gamma jitter, p = 0.5: images ** e^U(-gamma, gamma) (0: none, the paper).
  c.train.rotate = True  # Rotation in +-180 degrees, p = 0.5 (biomedical data only).
  c.train.log_every = 50  # Steps between metric lines.
  c.train.checkpoint_every = 500  # Steps between checkpoints (and one at the end).
  c.train.keep_checkpoints = 3
  c.train.profile_steps = ()  # (first, last): a jax.profiler trace of those stage-1 steps.

  # --- Native resolution (resolution='native': inference on any H x W) ------------------------
  c.native = ml_collections.ConfigDict()
  c.native.refine_fraction = 0.1  # Share of the tiles that stage 2 refines: the least confident.
  # With a threshold, only those of them that score at least the threshold (fewer tiles, less time).
  c.native.chunk = 32  # Tiles per stage-2 call: the compute follows the tiles refined, in steps of this.
  c.native.bucket = 64  # Stage 1's input is padded to a multiple of this (downscaled px): one compile
  # per bucket, not per image size.
  c.native.window = 0  # The dense reference: the baseline U-Net on windows of this side (0 = hi_size)
  c.native.overlap = 0.25  # overlapping by this share (MONAI's sliding_window_inference default),
  c.native.blend = 'gaussian'  # weighted by a Gaussian (sigma: 1/8 of the window) or 'constant'.
  c.native.max_pixels = 0  # Refuse larger images before any work (0: what the free memory can hold).

  # --- Evaluation and benchmark ---------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.fov = 'none'  # 'dark_border': the metrics also inside each image's field of view (fundus).
  c.eval.errors = False  # errors/<name>.png: each test image's false positives and negatives.
  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.batch_sizes = config_dict.placeholder(tuple)  # None: (1,) on CPU, (1, 16) elsewhere.
  c.benchmark.repeats = 10  # Timed calls per measurement (after one warm-up); the median is kept.
  c.benchmark.sliding_window = config_dict.placeholder(bool)  # Also time every patch through
  # stage 2. None: on CPU up to Np = 8 only (slow past it), everywhere else for every Np.
  c.benchmark.max_seconds = 180.0  # Time budget: what would not fit is skipped (and reported).
  c.benchmark.native_sides = (1024, 2048, 4096, 8192, 16384)  # resolution='native': sides timed.
  # resolution='native': sides of synthetic pyramidal TIFF slides timed out of core, file to file.
  c.benchmark.slide_sides = ()
  c.benchmark.peak_tflops = config_dict.placeholder(float)  # For utilisation: the device's peak
  # TFLOP/s at model.dtype. None: known GPUs and TPUs by their device_kind, none on CPU.
  c.benchmark.train = False  # Also time each network's pmapped training step (steps/s, images/s).
  c.export = ml_collections.ConfigDict()  # --mode=export: a jax.export artifact of two-stage.
  c.export.batch_size = 1  # Its fixed batch of images [B, hi_size, hi_size, 3] uint8.
  c.export.platforms = ('cpu', 'cuda')  # What it runs on (lowered here, whatever this machine is).
  c.export.output = ''  # Where ('' = <workdir>/export).
  c.predict = ml_collections.ConfigDict()
  c.predict.input = ''  # An image file or a folder of images (any size, any format Pillow reads).
  c.predict.output = ''  # Where masks, probability maps and overlays go ('' = <workdir>/predictions).
  c.predict.batch_size = 8  # Images per compiled call, split over the local devices.
  c.predict.outputs = ('mask', 'probs', 'overlay')  # Any of these.
  c.predict.png_compression = 0  # zlib level 0-9 of the probability and overlay PNGs: 0 (stored)
  # writes them 2x faster than 1, 1.5-1.7x larger (masks always use at least 1: 3 KiB, 2 ms).
  c.predict.skip_existing = False  # Skip inputs whose outputs all exist (go on after Ctrl-C).
  c.predict.slide_format = 'tiff'  # A slide's mask and probabilities (resolution='native'):
  # 'tiff' (pyramidal OME-TIFFs, <stem>_mask.ome.tif) or 'zarr' (OME-Zarr 0.4, <stem>_mask.ome.zarr).

  # --- Calibration (--mode=calibrate: the operating point of k and threshold per Np) ------------
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.holdout = 0.2  # Share of the train split (seeded by `seed`) the sweep runs on.
  c.calibrate.refine_counts = config_dict.placeholder(tuple)  # k swept; None: 1, 2, 4, ... up to
  # Np * Np, and Np itself (counts above Np * Np are skipped for that Np).
  c.calibrate.thresholds = (None,)  # Thresholds swept (None: no threshold).
  c.calibrate.target = 'dice_drop'  # 'dice_drop': fewest GFLOPs within max_dice_drop of the
  # baseline's soft Dice; 'latency': best soft Dice within latency_budget_ms per image.
  c.calibrate.max_dice_drop = 0.01
  c.calibrate.latency_budget_ms = config_dict.placeholder(float)  # Needed for target 'latency'.
  c.calibrate.refine_fractions = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # Native: shares of tiles.
  c.ablation = ml_collections.ConfigDict()
  c.ablation.features = ('stage2_init', 'halo', 'refine_budget')  # --mode=ablate: each off and on
  # (also 'input_norm', which retrains every network).
  return c


def native(c: ml_collections.ConfigDict, *, crop: int = 256, downscale: int = 8, tile: int = 64,
           halo: int = 8) -> ml_collections.ConfigDict:
  """`c` at resolution='native': training crops of `crop` px, stage 1 at 1 / downscale, stage-2
  tiles of `tile` px with `halo` px of context (tile + 2 halo a multiple of 2**depth, so that the
  halo costs only its own pixels)."""
  c.resolution = 'native'
  c.hi_size = crop
  c.stage1_size = crop // downscale
  c.num_patches = crop // tile
  c.halo = halo
  c.train.num_patches_list = (crop // tile,)
  return c
