"""Experiment stage 1 (issue 7; the paper's recipe, docs/method.md "Hyper-parameters", at MNIST
scale): the clean ADM every arm fine-tunes from.

The MNIST default's network (32/32/64 channels, 8 GroupNorm groups, attention at 8x8) trained
clean, long enough to make good digits: 10,000 minibatches of 32 (= 10,000 AdamW updates) at a
constant lr of 1e-3 after a 200-update warm-up, EMA 0.999. The paper's pre-training uses the
uniform timestep sampler (guided-diffusion's image_train.py default); its AT fine-tuning the
loss-second-moment one (configs/experiments/mnist_arms.py). Every 500th checkpoint is kept so
the starting point can be chosen by quality (`atdiff experiment` reports fd_mnist and confidence
of each).
"""
import pathlib
import runpy

_BASE = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "mnist_adm.py"))


def get_config():
    c = _BASE["get_config"]()          # the MNIST default network, adv.kind = "none"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.train.global_batch_size = 32
    c.train.num_minibatches = 10000
    c.train.ema_rates = (0.999,)
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 100     # all of them: the start is chosen by quality
    c.train.sample_every = 1000
    return c
