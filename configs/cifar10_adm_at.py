"""ADM-AT on CIFAR-10 exactly as the authors' script (docs/method.md, "Hyper-parameters"): fast AT
(K=3, step 0.1, radius 0.1*sqrt(D), delta_detach) fine-tuning a clean ADM checkpoint for 200k
minibatches (= 600k AdamW updates).

Fine-tune from the authors' clean checkpoint (guided-diffusion .pt, optimizer state fresh, EMA
restored), e.g.
  atdiff train --config=configs/cifar10_adm_at.py --workdir=runs/cifar10_at \
    --config.init.checkpoint=results/cifar_adm/model250000.pt \
    --config.init.ema_checkpoint=results/cifar_adm/ema_0.9999_250000.pt
"""
import pathlib
import runpy

_CLEAN = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_adm.py")))


def get_config():
    c = _CLEAN["get_config"]()
    a = c.adv
    a.kind, a.steps, a.step_size, a.max_norm = "fast", 3, 0.1, 0.1
    a.norm, a.radius_scaling, a.target_type = "l2", "sqrt_dim", "delta_detach"
    c.train.num_minibatches = 200_000
    c.init.checkpoint = ""          # set to the clean model*.pt (see the docstring)
    c.init.ema_checkpoint = ""      # and its ema_0.9999_*.pt
    return c
