"""The consistency-model stage of an experiment (``spec.cm``, issue 17): consistency distillation
from the pre-trained clean ADM (configs/experiments/mnist_pretrain.py) as the teacher.

configs/mnist_cd.py (Karras CD, N = 18, Heun teacher steps, l2, target EMA 0.95, lr 1e-4, the
student initialised from the teacher's EMA params) with the pre-training's network and chain:
the student copies the teacher's params, so its network must be the teacher's
(``train.build.check_teacher_config``; `atdiff experiment` checks it before anything trains).
`atdiff experiment` sets the teacher (``<root>/pretrain`` at the start checkpoint), the seed,
the length and the checkpoints; each CM arm adds its options (adv.* for AT,
cm.teacher_from_perturbed).
"""
import pathlib
import runpy

import ml_collections

_CD = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "mnist_cd.py"))
_PRE = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_pretrain.py")))


def get_config():
    c = _CD["get_config"]()             # clean CD (adv.kind = "none")
    pre = _PRE["get_config"]()
    c.model = ml_collections.ConfigDict(pre.model.to_dict())          # the teacher's network
    c.diffusion = ml_collections.ConfigDict(pre.diffusion.to_dict())  # and chain
    c.train.log_every = 50
    c.train.sample_every = 0
    return c
