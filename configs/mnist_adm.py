"""Clean ADM on MNIST: the embedded default without adversarial training (the baseline)."""
import pathlib
import runpy

_AT = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist_adm_at.py")))


def get_config():
    c = _AT["get_config"]()
    c.adv.kind = "none"
    c.adv.steps = 1
    return c
