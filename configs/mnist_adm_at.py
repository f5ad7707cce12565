"""The embedded default: ADM + fast adversarial training (K=3, step 0.1, radius 0.1) on MNIST.

Sized to run in about 10 minutes on 2 CPU cores (250 minibatches = 750 AdamW updates, measured
2.4 s per minibatch): `bash launch/local.sh`, or
`atdiff train --config=configs/mnist_adm_at.py --workdir=runs/mnist_adm_at`.
At that length the EMA samples are digit-like strokes, not yet clean digits; train longer with
`--config.train.num_minibatches=N` (the run resumes from its last checkpoint).
"""
import pathlib
import runpy

_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config():
    c = _DEFAULT["get_config"]()
    c.data.dataset = "mnist32"
    c.model.image_size = 32
    c.model.in_channels = 1
    c.model.num_channels = 32
    c.model.channel_mult = "1,2,2"
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = "8"
    c.model.num_head_channels = 32
    c.model.dropout = 0.0            # a 10-minute run does not overfit; dropout masks cost CPU time
    c.model.resblock_updown = True
    c.model.use_new_attention_order = True
    c.diffusion.steps = 1000
    c.diffusion.noise_schedule = "cosine"
    c.adv.kind = "fast"
    c.adv.steps = 3
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.global_batch_size = 32
    c.train.num_minibatches = 250
    c.train.ema_rates = (0.99,)      # a short run: the EMA must follow the last few hundred updates
    c.train.log_every = 25
    c.train.checkpoint_every = 50
    c.train.sample_every = 125
    c.train.num_samples = 64
    c.train.sampler = "ddim"
    c.train.sample_steps = 50
    return c
