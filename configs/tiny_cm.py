"""A tiny consistency-distillation run for tests and smoke runs: the tiny DPM (configs/tiny.py) as
the teacher, CD with N = 10, fast AT with K = 2; set --config.teacher.workdir to a tiny DPM run."""
import pathlib
import runpy

_TINY = runpy.run_path(str(pathlib.Path(__file__).with_name("tiny.py")))


def get_config():
    c = _TINY["get_config"]()
    c.cm.kind = "cd"
    c.cm.start_scales = c.cm.end_scales = 10
    c.cm.start_ema = 0.9
    c.adv.kind, c.adv.steps = "fast", 2
    c.train.ema_rates = (0.9,)
    c.train.sampler = "cm_onestep"
    c.train.sample_steps = 2
    c.teacher.workdir = ""          # a tiny DPM run (atdiff train --config=configs/tiny.py)
    return c
