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
* **Consistency models** (``s.cm``, issue 17 point 4): consistency distillation from the
  pre-trained clean ADM (the start checkpoint) as the teacher, clean (``cd_clean``) and with the
  DPM arms' fast AT (``cd_at``: K=3, step 0.1, radius 0.1, the teacher's Heun step from the
  perturbed point), plus the ablation ``cd_at_teacher_clean`` (the teacher's step from the clean
  point; seed 0). N = 1,000 minibatches of 32 each (configs/experiments/mnist_cd_finetune.py),
  three seeds, scored by cm_onestep at NFE 1 and cm_multistep at NFE 2 and 4 (the same fd_mnist,
  confidence and x_T as the DPM cells), and the students' robustness (seed 0).
  Cost on 2 CPU cores, estimated from s / minibatch measured interleaved with the clean DPM
  fine-tuning step (2 simulated devices, shared cores): clean CD 1.8x, CD + fast AT 4.7x, the
  clean-teacher ablation 3.6x that step, whose 0.41-0.52 s docs/RESULTS.md measured: about
  0.85, 2.2 and 1.7 s per minibatch, i.e. 14 + 37 min per seed and 28 min for the ablation,
  about 3 h of training for the CM stage; its sampling (7 network evaluations per sample) is
  minutes.
"""
import pathlib
import runpy

_BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("mnist.py")))
_AT = _BASE["_AT"]
_RADII = {"fast_at_r005": 0.05, "fast_at_r02": 0.2, "fast_at_r04": 0.4}  # fast_at: 0.1
# The CM arms (overrides of the CD config); the DPM arms' fast AT without its DPM-only target_type.
_CD_AT = {k: v for k, v in _AT.items() if k != "target_type"}
CM_ARMS = {
    "cd_clean": {"overrides": {"adv": {"kind": "none", "steps": 1}}},
    "cd_at": {"overrides": {"adv": _CD_AT, "cm": {"teacher_from_perturbed": True}}},
    "cd_at_teacher_clean": {"overrides": {"adv": _CD_AT, "cm": {"teacher_from_perturbed": False}},
                            "seeds": (0,)},
}


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
    s.cm = {
        "enabled": True,
        "config": "configs/experiments/mnist_cd_finetune.py", "overrides": {},
        "num_minibatches": 1000,         # per CM arm
        "checkpoints": 4,
        "arm_order": ("cd_clean", "cd_at", "cd_at_teacher_clean"),
        "arms": CM_ARMS,
        "baseline": "cd_clean",          # the paired differences are against it
        "seeds": (),                     # () = spec.seeds; training seed s: config.seed = 100 + s
        "samplers": ("cm_onestep", "cm_multistep"),
        "nfes": (1, 2, 4),               # cm_onestep at 1, cm_multistep at the others
        "robustness": True,
        "robustness_seeds": (),          # () = spec.eval.robustness_seeds
    }
    return s
