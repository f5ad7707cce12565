"""Default configuration: every option of `atdiff train`, documented.

Experiment configs import this module, call `get_config()` and override fields. Any field can also
be overridden on the command line: `atdiff train --config=configs/mnist_adm_at.py
--config.adv.steps=5 --config.train.global_batch_size=64`. Invalid values are rejected at start-up
with the option's name and the allowed values (atdiff_jax/train/experiment.py: validate_config).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42                      # base seed: params init, data order, every random draw

    # ---------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.dataset = "mnist32"            # TFDS name; "mnist32" is built offline by `atdiff data prepare`
    d.data_dir = ""                  # TFDS data_dir ("" = <workdir>/../data, i.e. ./data for ./runs/X)
    d.split = "train"
    d.random_flip = False            # random horizontal flips (CIFAR-10: True; digits: False)
    d.worker_count = 0               # grain worker processes (0 = in-process)

    # ---------------------------------------------------------------- model (guided-diffusion create_model)
    c.model = m = ml_collections.ConfigDict()
    m.image_size = 32
    m.in_channels = 1
    m.num_channels = 64              # model_channels
    m.num_res_blocks = 2
    m.channel_mult = ""              # "" = guided-diffusion's default for the image size, or "1,2,2"
    m.attention_resolutions = "16,8"  # resolutions (pixels) that get self-attention
    m.num_heads = 4
    m.num_head_channels = -1         # -1 = use num_heads; else channels per head (overrides num_heads)
    m.num_heads_upsample = -1        # -1 = num_heads
    m.use_scale_shift_norm = True
    m.resblock_updown = False
    m.use_new_attention_order = False
    m.dropout = 0.1
    m.learn_sigma = True             # 2x output channels, hybrid loss (mse + vb)
    m.class_cond = False             # class-conditional model (needs labels in the data)
    m.num_classes = 10               # classes when class_cond
    m.dtype = "float32"              # compute dtype: "float32" or "bfloat16" (params stay float32)
    m.use_checkpoint = False         # rematerialise res/attention blocks (memory for compute)

    # ---------------------------------------------------------------- diffusion (create_gaussian_diffusion)
    c.diffusion = g = ml_collections.ConfigDict()
    g.steps = 1000
    g.noise_schedule = "cosine"      # "linear" | "cosine"
    g.sigma_small = False            # fixed variance type when learn_sigma=False
    g.use_kl = False                 # train on the variational bound only
    g.predict_xstart = False
    g.rescale_timesteps = False
    g.rescale_learned_sigmas = True  # loss = mse + vb (RESCALED_MSE)
    g.schedule_sampler = "uniform"   # "uniform" | "loss-second-moment"
    g.input_perturb = 0.0            # DDPM-IP gamma (baseline); 0 = off

    # ---------------------------------------------------------------- adversarial training (SPEC §2)
    c.adv = a = ml_collections.ConfigDict()
    a.kind = "fast"                  # "fast" (paper) | "pgd" | "random" (control) | "none" (clean)
    a.steps = 3                      # K: inner steps = optimizer updates per minibatch (fast)
    a.step_size = 0.1                # adv_lr: l2 length of each ascent step
    a.max_norm = 0.1                 # adv_max_norm: radius = max_norm * sqrt(H*W*C) (l2, sqrt_dim)
    a.norm = "l2"                    # "l2" | "linf"
    a.radius_scaling = "sqrt_dim"    # "sqrt_dim" (authors) | "absolute"
    a.target_type = "delta_detach"   # "delta_detach" (released) | "delta" | "original"
    a.grad_scale = 1.0               # 2**-20 reproduces the reference's fp32 quirk

    # ---------------------------------------------------------------- optimizer (AdamW)
    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-4
    o.weight_decay = 0.0
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.warmup_steps = 0               # linear warm-up over this many optimizer updates
    o.grad_clip = 0.0                # global-norm clipping; 0 = off (the authors use none)

    # ---------------------------------------------------------------- training loop
    c.train = t = ml_collections.ConfigDict()
    t.global_batch_size = 128        # over all devices and processes
    t.microbatches = 1               # gradient accumulation: the batch is split into this many parts
    t.num_minibatches = 100_000      # training length, counted in minibatches as the paper does
    t.ema_rates = (0.9999,)
    t.log_every = 100                # minibatches between metric writes
    t.checkpoint_every = 1000        # minibatches between checkpoints
    t.keep_checkpoints = 3
    t.sample_every = 5000            # minibatches between EMA sample grids (0 = never)
    t.num_samples = 64               # images in each sample grid
    t.sampler = "ddim"               # sampler for the grids: "ddim" | "iddpm" | "dpm_solver"
    t.sample_steps = 50

    # ---------------------------------------------------------------- initialisation / fine-tuning
    c.init = i = ml_collections.ConfigDict()
    i.checkpoint = ""                # guided-diffusion .pt to start from (the paper fine-tunes)
    i.checkpoint_sha256 = ""         # optional sha256 of that file
    i.ema_checkpoint = ""            # optional .pt of EMA weights to start the EMA from
    i.ema_checkpoint_sha256 = ""

    # ---------------------------------------------------------------- parallelism
    c.mesh = s = ml_collections.ConfigDict()
    s.fsdp = 1                       # devices that shard the params (FSDP); the rest is data-parallel
    return c
