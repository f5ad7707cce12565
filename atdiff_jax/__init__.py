"""atdiff_jax: diffusion and consistency models with adversarial training of x_t.

Subpackages (math at the bottom, trainer above, CLI on top):

* ``atdiff_jax.diffusion``   -- schedules, forward process, losses, timestep samplers, samplers.
* ``atdiff_jax.adversarial`` -- perturbation math and the K-step "fast" AT driver.
* ``atdiff_jax.models``      -- the ADM UNet (Flax Linen).
* ``atdiff_jax.convert``     -- guided-diffusion / AT_Diff PyTorch weights -> Flax params.
"""

__version__ = "0.1.0"
