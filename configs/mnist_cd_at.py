"""Consistency distillation (CD) with fast AT on MNIST from an ADM teacher (AT for CMs as
inferred by this project: docs/method.md, "AT for consistency models").

The teacher is a DPM run of the same network, e.g. the embedded default:
  atdiff train --config=configs/mnist_adm.py --workdir=runs/mnist_adm        (or mnist_adm_at.py)
  atdiff train --config=configs/mnist_cd_at.py --workdir=runs/mnist_cd_at \
      --config.teacher.workdir=runs/mnist_adm
  atdiff sample --workdir=runs/mnist_cd_at --sampler=cm_onestep    (or cm_multistep --steps=2)

Assumptions (the paper gives no CM settings for MNIST): the Karras CD of Song et al. (2023) with
the VP teacher wrapped by vp_denoiser (EDM scale, sigma in [0.002, 80], rho 7, Heun, l2, uniform
weights, N = 18, target EMA 0.95), the student initialised from the teacher's EMA params, and
the DPM recipe's AT (K = 3 inner updates, step 0.1, radius 0.1 sqrt(D), δ on the student's input,
the teacher's Heun step taken from the perturbed point). δ lives in the EDM scale of x_t = x0 +
sigma z, so the same l2 step is a smaller relative change at high noise than in the DPM's VP
scale. Sized like the default: 250 minibatches (750 AdamW updates) on 2 CPU cores.
"""
import pathlib
import runpy

_AT = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_adm_at.py")))


def get_config():
    c = _AT["get_config"]()         # the teacher's network (mnist_adm / mnist_adm_at)
    cm = c.cm
    cm.kind = "cd"
    cm.init_from_teacher = True
    cm.teacher_from_perturbed = True
    cm.loss_norm, cm.solver, cm.weight_schedule = "l2", "heun", "uniform"
    cm.sigma_min, cm.sigma_max, cm.rho, cm.sigma_data = 0.002, 80.0, 7.0, 0.5
    cm.target_ema_mode, cm.scale_mode = "fixed", "fixed"
    cm.start_ema = 0.95
    cm.start_scales = cm.end_scales = 18
    c.adv.kind, c.adv.steps, c.adv.step_size, c.adv.max_norm = "fast", 3, 0.1, 0.1
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.train.sampler = "cm_onestep"
    c.train.sample_steps = 2
    c.teacher.workdir = ""          # --config.teacher.workdir=runs/mnist_adm
    return c
