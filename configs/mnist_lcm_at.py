"""LCM-style consistency distillation with fast AT on MNIST from an ADM teacher (AT for CMs as
inferred by this project: docs/method.md, "AT for consistency models").

The VP version of configs/mnist_cd_at.py: the student keeps the teacher's VP parameterisation with
LCM's boundary scalings (sigma_data 0.5, timestep scaling 10), the teacher takes DDIM steps of
k = 20 timesteps (50 DDIM timesteps over T = 1000), pseudo-Huber loss (c = 0.001), target EMA 0.95,
no guidance (the MNIST teacher is unconditional), and the DPM recipe's AT on the student's VP
input with the teacher's step taken from the perturbed point.
  atdiff train --config=configs/mnist_lcm_at.py --workdir=runs/mnist_lcm_at \
      --config.teacher.workdir=runs/mnist_adm
  atdiff sample --workdir=runs/mnist_lcm_at --sampler=cm_multistep --steps=4
"""
import pathlib
import runpy

_CD = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_cd_at.py")))


def get_config():
    c = _CD["get_config"]()
    c.cm.kind = "lcm"
    c.cm.loss_norm = "huber"
    c.cm.huber_c = 0.001
    c.cm.lcm.skip = 20
    c.cm.lcm.timestep_scaling = 10.0
    c.cm.lcm.sigma_data = 0.5
    c.cm.lcm.guidance = False
    return c
