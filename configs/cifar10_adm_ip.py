"""The DDPM-IP baseline on CIFAR-10 (docs/method.md, "Baselines"): input perturbation gamma = 0.1,
target = eps, fine-tuning the same clean checkpoint for the same number of minibatches as ADM-AT."""
import pathlib
import runpy

_CLEAN = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_adm.py")))


def get_config():
    c = _CLEAN["get_config"]()
    c.diffusion.input_perturb = 0.1
    c.train.num_minibatches = 200_000
    return c
