"""Adversarial perturbation of x_t: l2/linf steps and projections, fast-AT / PGD / random drivers."""
from atdiff_jax.adversarial.driver import fast_at, pgd_at, run_adversary, value_and_grads
from atdiff_jax.adversarial.perturb import (AdversaryConfig, ascent_step, per_example_l2,
                                            project)

__all__ = ["AdversaryConfig", "fast_at", "pgd_at", "run_adversary", "value_and_grads",
           "ascent_step", "project", "per_example_l2"]
