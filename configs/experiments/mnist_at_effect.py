"""Does AT help a DPM? The MNIST comparison of configs/experiments/mnist.py with the timestep-
sampler confound removed, a 4x longer fine-tune and a sweep of the perturbation radius (issue 17):
`atdiff experiment --spec=configs/experiments/mnist_at_effect.py --root=runs/experiments/at_effect`
(resumable: it takes several sessions on 2 CPU cores; the report is rewritten after each seed).

What differs from mnist.py (whose 500-minibatch run docs/RESULTS.md reports):

* **Uniform t in every arm.** With the loss-second-moment sampler, the arms that make 3 optimizer
  updates per minibatch (fast AT, clean with 3x the minibatches) leave its uniform warm-up at
  other minibatches than clean and DDPM-IP do, so the arms differed in their timestep
  distribution as well as in AT; the fast-AT seed spread there was 26% against clean's 6.6%.
* **N = 2,000 fine-tuning minibatches** per arm (clean with 3x: 6,000), 20 checkpoints per arm
  (the equal-wall-clock reading and the check that the clean arm is still improving or has
  converged use them).
* **The radius sweep** (the paper's alpha plot): fast AT at adv_max_norm 0.05, 0.1 (``fast_at``),
  0.2 and 0.4 per-pixel RMS, with the ascent step equal to the radius as in the released recipe.
* PGD-AT and the one-seed uniform-t ablation of mnist.py are left out (every arm is uniform now).
* IDDPM, DDIM and DPM-Solver++ at NFE 5 and 10 (the fewest-NFE cells carry the comparison) and
  at 20 and 50 (where the arms meet); ES is left out.
"""
import pathlib
import runpy

_BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
_AT = _BASE["_AT"]
_RADII = {"fast_at_r005": 0.05, "fast_at_r02": 0.2, "fast_at_r04": 0.4}  # fast_at: 0.1


def get_config():
    s = _BASE["get_config"]()
    s.finetune.overrides = {"diffusion": {"schedule_sampler": "uniform"}}
    s.finetune.num_minibatches = 2000
    s.finetune.checkpoints = 20
    for name, r in _RADII.items():
        s.arms[name] = {"overrides": {"adv": dict(_AT, max_norm=r, step_size=r)},
                        "minibatch_factor": 1}
    s.arm_order = ("clean", "ddpm_ip", "fast_at", "clean_kx", *_RADII)
    s.eval.samplers = ("iddpm", "ddim", "dpm_solver")
    s.eval.nfes = (5, 10, 20, 50)
    return s
