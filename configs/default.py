"""Default configuration: every option of `atdiff train`, documented.

Experiment configs import this module, call `get_config()` and override fields. Any field can also
be overridden on the command line: `atdiff train --config=configs/mnist_adm_at.py
--config.adv.steps=5 --config.train.global_batch_size=64`. Invalid values are rejected at start-up
with the option's name and the allowed values (atdiff_jax/train/build.py: validate_config).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42                      # base seed: params init, data order, every random draw

    # ---------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.dataset = "mnist32"            # TFDS name; "mnist32" is built offline by `atdiff data prepare`
    d.data_dir = ""                  # TFDS data_dir ("" = <workdir>/../data: runs/data for runs/X)
    d.split = "train"                # TFDS split to train on (slices such as "train[:90%]" work)
    d.random_flip = False            # random horizontal flips (CIFAR-10: True; digits: False)
    d.worker_count = 0               # grain worker processes (0 = in-process)

    # ---------------------------------------------------------------- model (guided-diffusion create_model)
    c.model = m = ml_collections.ConfigDict()
    m.image_size = 32                # image side in pixels (other sizes are centre-cropped/resized)
    m.in_channels = 1                # image channels (1 for MNIST, 3 for RGB)
    m.num_channels = 64              # model_channels
    m.num_res_blocks = 2             # residual blocks per resolution
    m.channel_mult = ""              # "" = guided-diffusion's default for the image size, or "1,2,2"
    m.attention_resolutions = "16,8"  # resolutions (pixels) that get self-attention
    m.num_heads = 4                  # attention heads (used when num_head_channels = -1)
    m.num_head_channels = -1         # -1 = use num_heads; else channels per head (overrides num_heads)
    m.num_heads_upsample = -1        # -1 = num_heads
    m.use_scale_shift_norm = True    # the timestep embedding scales and shifts the res-block norm
    m.resblock_updown = False        # residual blocks (not plain conv/pool) for up/downsampling
    m.use_new_attention_order = False  # split qkv before the heads (QKVAttention), not legacy
    m.dropout = 0.1                  # dropout rate in the residual blocks (training only)
    m.learn_sigma = True             # 2x output channels, hybrid loss (mse + vb)
    m.class_cond = False             # class-conditional model (needs labels in the data)
    m.num_classes = 10               # classes when class_cond
    m.dtype = "float32"              # compute dtype: "float32" or "bfloat16" (params stay float32)
    m.use_checkpoint = False         # rematerialise res/attention blocks (memory for compute)
    m.norm_groups = 32               # GroupNorm groups (32 = guided-diffusion). Use fewer for narrow
                                     # models: 32 channels / 32 groups is a per-channel norm that
                                     # erases each image's mean (grey sample backgrounds); 8 fixes it

    # ---------------------------------------------------------------- diffusion (create_gaussian_diffusion)
    c.diffusion = g = ml_collections.ConfigDict()
    g.steps = 1000                   # T: timesteps of the training chain
    g.noise_schedule = "cosine"      # "linear" | "cosine"
    g.sigma_small = False            # fixed variance type when learn_sigma=False
    g.use_kl = False                 # train on the variational bound only
    g.predict_xstart = False         # the network predicts x_0 instead of epsilon
    g.rescale_timesteps = False      # feed t * 1000 / T to the network instead of t
    g.rescale_learned_sigmas = True  # loss = mse + vb (RESCALED_MSE)
    g.schedule_sampler = "uniform"   # "uniform" | "loss-second-moment"
    g.input_perturb = 0.0            # DDPM-IP gamma (baseline); 0 = off

    # -------------------------------------- adversarial training (docs/method.md: Fast AT, PGD AT)
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
    o.lr = 1e-4                      # peak learning rate (after the warm-up)
    o.weight_decay = 0.0             # decoupled weight decay (torch.optim.AdamW semantics)
    o.b1 = 0.9                       # Adam beta1
    o.b2 = 0.999                     # Adam beta2
    o.eps = 1e-8                     # Adam epsilon
    o.warmup_steps = 0               # linear warm-up over this many optimizer updates
    o.decay = "none"                 # after the warm-up: "none" (constant lr) | "cosine" |
                                     # "linear", down to end_lr_factor * lr at decay_steps
    o.decay_steps = 0                # optimizer updates (warm-up included) at which the
                                     # decay ends (then constant); needed by a decay
    o.end_lr_factor = 0.0            # the final lr as a fraction of optim.lr
    o.grad_clip = 0.0                # global-norm clipping; 0 = off (the authors use none)

    # ---------------------------------------------------------------- training loop
    c.train = t = ml_collections.ConfigDict()
    t.global_batch_size = 128        # over all devices and processes
    t.microbatches = 1               # gradient accumulation: the batch is split into this many parts
    t.num_minibatches = 100_000      # training length, counted in minibatches as the paper does
    t.ema_rates = (0.9999,)          # one EMA copy of the params per rate, updated after every
                                     # optimizer update; samples and grids use the first
    t.log_every = 100                # minibatches between metric writes
    t.checkpoint_every = 1000        # minibatches between checkpoints
    t.keep_checkpoints = 3           # newest checkpoints kept (older ones go after a newer save)
    t.sample_every = 5000            # minibatches between EMA sample grids (0 = never)
    t.num_samples = 64               # images in each sample grid
    t.sampler = "ddim"               # sampler for the grids: "ddim" | "iddpm" | "dpm_solver" (DPM);
                                     # "cm_onestep" | "cm_multistep" (consistency models)
    t.sample_steps = 50              # sampler steps (network evaluations) of the grids
    t.label_dropout = 0.0            # DPM, class_cond: probability of replacing a label by the
                                     # null class num_classes - 1 (classifier-free guidance
                                     # training; the labels must be < num_classes - 1, so
                                     # MNIST/CIFAR-10 need num_classes = 11)

    # ---------------------------------------------------------------- initialisation / fine-tuning
    c.init = i = ml_collections.ConfigDict()
    i.checkpoint = ""                # guided-diffusion .pt to start from (the paper fine-tunes)
    i.checkpoint_sha256 = ""         # optional sha256 of that file
    i.ema_checkpoint = ""            # optional .pt of EMA weights to start the EMA from
    i.ema_checkpoint_sha256 = ""     # optional sha256 of that file
    i.workdir = ""                   # or an atdiff_jax DPM run to start from (the experiment's
                                     # fine-tuning arms): its params and one EMA copy become this
                                     # run's params and EMA copies; optimizer, timestep sampler and
                                     # counters start fresh (as the paper's fine-tuning does).
                                     # The network options must equal the source run's
    i.step = -1                      # which checkpoint of init.workdir (-1 = the newest)
    i.ema_rate = 0.0                 # which EMA copy of init.workdir (0 = its first ema_rates)

    # ------------------------------ consistency models (docs/method.md: AT for consistency models)
    # cm.kind = "none" trains the DPM above. Otherwise the run trains a consistency model (the
    # student) with the same data, adversary (adv.*: K inner updates with δ on the student's input;
    # adv.target_type is a DPM option, see teacher_from_perturbed), optimizer and loop; its EMA
    # copies (train.ema_rates) are what `atdiff sample` uses (--sampler=cm_onestep|cm_multistep).
    # diffusion.schedule_sampler is unused; diffusion.* must describe the teacher's chain for lcm.
    c.cm = cm = ml_collections.ConfigDict()
    cm.kind = "none"                 # "none" (DPM) | "cd" (Karras/EDM consistency distillation
                                     # from the DPM in teacher.workdir, via vp_denoiser) | "ct"
                                     # (consistency training, no teacher) | "lcm" (LCM-style
                                     # distillation in VP space: DDIM skipping-step solver, CFG,
                                     # Huber loss; see cm.lcm)
    cm.init_from_teacher = True      # start the student (and its target/EMA) from the teacher's
                                     # EMA params (ct: only when teacher.workdir is set); then
                                     # config.model must describe the teacher's network (checked)
    cm.teacher_from_perturbed = True  # AT: the teacher's ODE/DDIM step starts from x_t + δ, so the
                                     # target moves with δ, the analogue of the DPM recipe's
                                     # delta_detach (target ε + δ/sqrt(1 - abar) moves with δ): a
                                     # perturbed input is mapped along the trajectory through it,
                                     # not onto the clean point's. False: the step starts from the
                                     # clean x_t (the target ignores δ). The paper leaves it open.
    # The target network θ⁻ = EMA of the student (stop-gradient), updated after EVERY optimizer
    # update, i.e. after each of the K inner updates of fast AT (each is a full update, as in the
    # DPM recipe). Its rate and the number of discretisation points N follow openai CM's
    # create_ema_and_scales_fn, evaluated at the minibatch count:
    cm.target_ema_mode = "fixed"     # "fixed" | "adaptive" (CT: rate from N)
    cm.start_ema = 0.95              # target EMA rate (CD in the paper: 0.95; LCM: 0.95)
    cm.scale_mode = "fixed"          # "fixed" | "progressive" (CT) | "progdist"
    cm.start_scales = 40             # N (CD: 18 or 40); first N for progressive
    cm.end_scales = 40               # last N for progressive
    cm.total_steps = 0               # minibatches of the progressive schedule (0: num_minibatches)
    cm.distill_steps_per_iter = 50000  # progdist only
    # cd / ct (Karras/EDM parameterisation; δ lives in the EDM scale of x_t = x0 + sigma z)
    cm.loss_norm = "l2"              # cd/ct: "l2" | "l1" | "l2-32" | "pseudo_huber";
                                     # lcm: "l2" | "huber"
    cm.huber_c = 0.0                 # pseudo-Huber c; 0 = the default (cd/ct: 0.00054 sqrt(H W C);
                                     # lcm: 0.001)
    cm.solver = "heun"               # cd: "heun" | "euler" (ct: the Euler step with x0)
    cm.sigma_min = 0.002             # smallest sigma; a VP teacher is clamped to its own sigma
                                     # range (cosine, T=1000: from 0.006), below it its t=0
                                     # prediction is used
    cm.sigma_max = 80.0              # largest sigma
    cm.rho = 7.0                     # Karras rho of the sigma discretisation
    cm.sigma_data = 0.5              # sigma_data of the EDM c_skip / c_out / c_in scalings
    cm.weight_schedule = "uniform"   # "uniform" | "snr" | "snr+1" | "karras" | "truncated-snr"
    # lcm (VP parameterisation; δ lives in VP scale like the DPM's)
    cm.lcm = lcm = ml_collections.ConfigDict()
    lcm.skip = 20                    # k: DDIM timesteps t_n = n k - 1 of the teacher's chain
    lcm.timestep_scaling = 10.0      # s in the boundary scalings c_skip = sd^2/((t s)^2 + sd^2)
                                     # and c_out = t s / sqrt((t s)^2 + sd^2)
    lcm.sigma_data = 0.5             # sd in those scalings
    lcm.guidance = False             # classifier-free guidance: w ~ U[w_min, w_max] fed to the
                                     # student through a guidance embedding; the teacher must be
                                     # class-conditional and trained with train.label_dropout > 0
                                     # (its null class num_classes - 1 is the unconditional
                                     # branch): eps = eps_c + w (eps_c - eps_null)
    lcm.w_min = 0.0                  # smallest guidance scale w drawn in training
    lcm.w_max = 2.0                  # largest guidance scale w drawn in training
    lcm.sample_w = 1.0               # w of `atdiff sample` and the grids (in [w_min, w_max])
    lcm.guidance_embed_dim = 256     # width of the sinusoidal w embedding

    # ---------------------------------------------------------------- teacher (cm.kind cd / lcm)
    c.teacher = tc = ml_collections.ConfigDict()
    tc.workdir = ""                  # a DPM run directory (cm.kind="none"): its EMA params are
                                     # restored with restore_for_sampling, on any device count
    tc.ema_rate = 0.0                # which EMA copy (0 = the teacher run's first ema_rates)
    tc.step = -1                     # which checkpoint (-1 = the newest)

    # ---------------------------------------------------------------- parallelism
    c.mesh = s = ml_collections.ConfigDict()
    s.fsdp = 1                       # devices that shard the params (FSDP); the rest is data-parallel
    return c
