"""``atdiff experiment``: the paper's comparison of arms (clean, AT, baselines) at MNIST scale.

* ``runner``: the spec (``configs/experiments/*.py``), its stages (pretrain, gate, timing, arms,
  the optional consistency-model arms, evaluation) in one resumable root directory, and the
  equal wall-clock timing;
* ``stats``: per-seed means, mean ± std over training seeds, paired differences and their
  bootstrap over the generated samples;
* ``render``: ``report.md``, ``results.json`` and the plots.
"""
from atdiff_jax.experiment.render import cm_nfes, cm_spec, write_report
from atdiff_jax.experiment.runner import (
    Run,
    StudyError,
    StudyInterrupted,
    apply_overrides,
    arm_config,
    cell_floor,
    check_cm_configs,
    cm_arm_config,
    cm_arm_seeds,
    cm_seeds,
    load_spec,
    measure_step_seconds,
    pretrain_config,
    run_experiment,
    validate_spec,
)
from atdiff_jax.experiment.stats import (
    bootstrap_differences,
    comparisons,
    mean_std,
    paired_bootstrap,
    paired_differences,
    summarize,
)

__all__ = ["Run", "StudyError", "StudyInterrupted", "apply_overrides", "arm_config",
           "bootstrap_differences", "cell_floor", "check_cm_configs", "cm_arm_config",
           "cm_arm_seeds", "cm_nfes", "cm_seeds", "cm_spec", "comparisons", "load_spec",
           "mean_std", "measure_step_seconds", "paired_bootstrap", "paired_differences",
           "pretrain_config", "run_experiment", "summarize", "validate_spec", "write_report"]
