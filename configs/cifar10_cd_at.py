"""Consistency distillation with fast AT on CIFAR-10 from the ADM teacher of cifar10_adm.py.

  atdiff train --config=configs/cifar10_cd_at.py --workdir=runs/cifar10_cd_at \
      --config.data.data_dir=/path/to/tfds --config.teacher.workdir=runs/cifar10_adm

Assumptions (the paper's CM settings are unknown; docs/method.md, "What is inferred"): openai's
CIFAR-10 CD recipe (Song et al. 2023: N = 18, Heun, target EMA 0.95, sigma 0.002..80, rho 7,
uniform weights, batch 512, lr 4e-4, 800k iterations, sampling EMA 0.9999) with these changes: the
teacher is the VP ADM of cifar10_adm.py wrapped by vp_denoiser (not an EDM network), the student is
that network initialised from the teacher's EMA params, the distance is l2 (LPIPS needs pretrained
weights this project does not ship), no dropout, AdamW without weight decay; AT is the DPM recipe
(K = 3, step 0.1, radius 0.1 sqrt(D), δ on the student's input in EDM scale, teacher step from
the perturbed point), so 800k minibatches are 2.4M optimizer updates.
"""
import pathlib
import runpy

_CLEAN = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_cd.py")))


def get_config():
    c = _CLEAN["get_config"]()
    a = c.adv
    a.kind, a.steps, a.step_size, a.max_norm = "fast", 3, 0.1, 0.1
    a.norm, a.radius_scaling = "l2", "sqrt_dim"
    return c
