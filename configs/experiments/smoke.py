"""A smoke version of configs/experiments/mnist.py (the same pipeline with tiny 16x16 models; run
by tests/test_study.py) plus the consistency-model stage of
configs/experiments/mnist_at_effect.py: `atdiff experiment --spec=configs/experiments/smoke.py
--root=/tmp/smoke`."""
import pathlib
import runpy

_FULL = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
_EFFECT = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_at_effect.py")))


def get_config():
    s = _FULL["get_config"]()
    # A high lr and a short EMA so that 2-6 updates visibly move the tiny model.
    tiny = {"train": {"global_batch_size": 8, "log_every": 1, "sample_every": 0,
                      "ema_rates": (0.5,)}, "optim": {"lr": 2e-3}}
    s.pretrain.config = "configs/tiny.py"
    s.pretrain.overrides = dict(tiny, adv={"kind": "none", "steps": 1},
                                train=dict(tiny["train"], num_minibatches=4, checkpoint_every=2))
    s.finetune.config = "configs/tiny.py"
    s.finetune.overrides = dict(tiny, diffusion={"schedule_sampler": "loss-second-moment"})
    s.finetune.num_minibatches = 2
    s.finetune.checkpoints = 2
    s.seeds = (0, 1)
    # The full spec's one-seed sampler ablation is left out (it is only an arm override), and
    # robustness runs on both seeds so that its mean ± std over seeds is exercised.
    s.arm_order = tuple(a for a in s.arm_order if a != "fast_at_uniform")
    s.eval.robustness_seeds = (0, 1)
    s.arms.pgd_at.seeds = (0,)
    s.wallclock.repeats = 2
    s.gate.nfe = 5
    s.gate.num_samples = 16
    s.eval.samplers = ("ddim", "dpm_solver")
    s.eval.nfes = (2, 4)
    s.eval.num_samples = 8
    s.eval.batch_size = 8
    s.eval.robustness_t = (10, 50)
    s.eval.robustness_radii = (0.0, 0.05)
    s.eval.robustness_images = 4
    s.eval.robustness_sizes = (0.0, 0.1)
    s.eval.robustness_samples = 8
    s.eval.robustness_nfe = 3
    s.eval.bootstrap = 20
    # The consistency-model stage of mnist_at_effect.py with tiny students (configs/tiny_cm.py,
    # the tiny DPM's network): every CM arm, 2 minibatches each.
    s.cm = _EFFECT["get_config"]().cm
    s.cm.config = "configs/tiny_cm.py"
    s.cm.overrides = {"train": dict(tiny["train"], ema_rates=(0.5,)), "optim": tiny["optim"]}
    s.cm.num_minibatches = 2
    s.cm.checkpoints = 1
    return s
