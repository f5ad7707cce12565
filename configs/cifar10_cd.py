"""Clean consistency distillation on CIFAR-10 from the ADM teacher of cifar10_adm.py (the
baseline of cifar10_cd_at.py; see there for the assumptions).

  atdiff train --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd \
      --config.data.data_dir=/path/to/tfds --config.teacher.workdir=runs/cifar10_adm
"""
import pathlib
import runpy

_ADM = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_adm.py")))


def get_config():
    c = _ADM["get_config"]()         # the teacher's network
    c.model.dropout = 0.0
    cm = c.cm
    cm.kind = "cd"
    cm.init_from_teacher = True
    cm.teacher_from_perturbed = True
    cm.loss_norm, cm.solver, cm.weight_schedule = "l2", "heun", "uniform"
    cm.sigma_min, cm.sigma_max, cm.rho, cm.sigma_data = 0.002, 80.0, 7.0, 0.5
    cm.target_ema_mode, cm.scale_mode = "fixed", "fixed"
    cm.start_ema = 0.95
    cm.start_scales = cm.end_scales = 18
    c.adv.kind, c.adv.steps = "none", 1
    c.optim.lr, c.optim.weight_decay = 4e-4, 0.0
    t = c.train
    t.global_batch_size = 512
    t.num_minibatches = 800_000
    t.ema_rates = (0.9999,)
    t.sampler, t.sample_steps = "cm_onestep", 2
    c.teacher.workdir = ""           # --config.teacher.workdir=runs/cifar10_adm
    return c
