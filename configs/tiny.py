"""A tiny model for tests and smoke runs: 16x16 MNIST, a few minibatches, compiles in seconds."""
import pathlib
import runpy

_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config():
    c = _DEFAULT["get_config"]()
    c.model.image_size = 16
    c.model.num_channels = 32
    c.model.channel_mult = "1,2"
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = "8"
    c.model.num_head_channels = 32
    c.model.dropout = 0.0
    c.diffusion.steps = 100
    c.train.global_batch_size = 8
    c.train.num_minibatches = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.sample_every = 0
    c.train.num_samples = 4
    c.train.sample_steps = 5
    return c
