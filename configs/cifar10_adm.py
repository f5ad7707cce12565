"""ADM on CIFAR-10 exactly as the authors' script (IDDPM architecture; docs/method.md,
"Hyper-parameters"), clean training (the baseline).

Data: TFDS `cifar10` prepared as array_record in --config.data.data_dir (see README, "Datasets").
"""
import pathlib
import runpy

_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config():
    c = _DEFAULT["get_config"]()
    c.data.dataset = "cifar10"
    c.data.random_flip = True
    m = c.model
    m.image_size, m.in_channels = 32, 3
    m.num_channels = 128
    m.channel_mult = "1,2,2,2"
    m.num_res_blocks = 3
    m.attention_resolutions = "16,8"
    m.num_head_channels = 32
    m.resblock_updown = True
    m.use_new_attention_order = True
    m.use_scale_shift_norm = True
    m.dropout = 0.3
    m.learn_sigma = True
    m.class_cond = False
    m.dtype = "bfloat16"            # the authors train in fp16; bf16 is the TPU/GPU equivalent
    g = c.diffusion
    g.steps, g.noise_schedule = 1000, "cosine"
    g.rescale_learned_sigmas = True
    g.schedule_sampler = "loss-second-moment"
    c.adv.kind, c.adv.steps = "none", 1
    c.optim.lr, c.optim.weight_decay = 1e-4, 0.0
    t = c.train
    t.global_batch_size = 128
    t.num_minibatches = 250_000     # the authors' clean pre-training length
    t.ema_rates = (0.9999,)
    t.log_every = 100
    t.checkpoint_every = 10_000
    t.sample_every = 10_000
    t.sampler, t.sample_steps = "ddim", 50
    return c
