"""Clean consistency distillation on MNIST (the baseline of configs/mnist_cd_at.py)."""
import pathlib
import runpy

_AT = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_cd_at.py")))


def get_config():
    c = _AT["get_config"]()
    c.adv.kind = "none"
    c.adv.steps = 1
    return c
