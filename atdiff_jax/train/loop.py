"""The training loop (``train``) and restoring a run (``restore_state``, sampling).

Every process runs the same program. The state lives on a (data, fsdp) mesh over all devices of
all processes; each process feeds its slice of the global batch. A workdir with checkpoints is
resumed automatically (state, data-iterator position and RNG counters), which gives bit-identical
parameters to an uninterrupted run. SIGTERM (preemption) makes every process save at the next step
boundary and exit cleanly. Workdirs are ``etils.epath`` paths: local, or a URL such as
``gs://bucket/run`` (:func:`atdiff_jax.paths.workdir_path`).

A consistency-model run (``config.cm.kind != "none"``) restores its DPM teacher's EMA params from
``config.teacher.workdir`` (``restore_for_sampling``; checked against the run's config before
anything is written), places them on the mesh like params, and passes them to every step as a
non-donated input; the student starts from them when ``config.cm.init_from_teacher``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from atdiff_jax import samplers as samples_lib
from atdiff_jax.convert.guided_diffusion import load_torch_state_dict, params_from_state_dict
from atdiff_jax.data.pipeline import DataError, DataStateMismatchError, create_train_iterator
from atdiff_jax.paths import workdir_path
from atdiff_jax.train import checkpoint as ckpt
from atdiff_jax.train import sharding
from atdiff_jax.train.build import (ConfigError, Experiment, build_experiment, build_optimizer,
                                    check_init_config, check_teacher_config, cm_kind,
                                    lr_schedule, resume_data_error)
from atdiff_jax.train.objectives import step_schedule
from atdiff_jax.train.state import (TrainState, create_state, ema_key, init_params, init_state,
                                   merge_teacher_params)
from atdiff_jax.train.step import make_train_step


class EmaRateError(ConfigError):
    """The EMA rate asked for is not one of the run's ``train.ema_rates``."""


# Metrics that are counters or schedules: logged at their last value, not averaged over the window.
_COUNTERS = ("skipped_updates", "optimizer_updates", "lr", "num_scales", "target_ema")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen DPM teacher of a consistency-model run."""
    model: Any          # its UNetModel
    diffusion: Any      # its training chain (GaussianDiffusion)
    params: Any         # its EMA params (on this host's first device)
    config: ml_collections.ConfigDict
    workdir: str


def load_teacher(config: ml_collections.ConfigDict) -> Teacher | None:
    """The teacher of a CM run (None for DPM runs and for CT without a teacher workdir).

    Raises:
      ConfigError: the workdir has no checkpoints, is not a DPM run, lacks the EMA rate or does
        not fit the run's config (one message saying what to change).
    """
    kind = cm_kind(config)
    if kind == "none" or (kind == "ct" and not config.teacher.workdir):
        return None
    workdir = workdir_path(config.teacher.workdir)
    steps, teacher_config = [], None
    step = None if config.teacher.step == -1 else int(config.teacher.step)
    if ckpt.checkpoint_dir(workdir).is_dir():
        manager = ckpt.create_manager(workdir, read_only=True)
        try:
            steps = list(manager.all_steps())
            if steps and (step is None or step in steps):
                teacher_config = ckpt.restore_config(manager, max(steps) if step is None else step)
        finally:
            manager.close()
    if not steps:
        raise ConfigError(f"config.teacher.workdir={config.teacher.workdir!r} has no checkpoints "
                          f"(looked in {ckpt.checkpoint_dir(workdir)}); train the DPM teacher "
                          f"there first, e.g. atdiff train --config=configs/mnist_adm.py "
                          f"--workdir={config.teacher.workdir}")
    if teacher_config is None:
        raise ConfigError(f"config.teacher.step={step} is not a checkpoint of "
                          f"{config.teacher.workdir!r}; available: {steps} (-1 = the newest)")
    check_teacher_config(config, teacher_config, config.teacher.workdir)
    rate = float(config.teacher.ema_rate) or None
    try:
        model, params, experiment, teacher_config = restore_for_sampling(workdir, step, rate)
    except ValueError as e:
        if isinstance(e, ConfigError) and not isinstance(e, EmaRateError):
            raise
        raise ConfigError(f"config.teacher.ema_rate: {e}") from None
    logging.info("teacher: %s step %s (EMA %s)", workdir, step if step is not None else max(steps),
                 rate or teacher_config.train.ema_rates[0])
    return Teacher(model=model, diffusion=experiment.diffusion, params=params,
                   config=teacher_config, workdir=str(workdir))


def default_data_dir(workdir: str | os.PathLike) -> str:
    """``data`` beside the workdir: ``<cwd>/runs/data`` for ``runs/x``, ``gs://b/data`` for
    ``gs://b/x``."""
    return str(workdir_path(workdir).parent / "data")


class _Preemption:
    """Turns SIGTERM into a flag that all processes agree on at a step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def _initial_params(config, experiment: Experiment) -> tuple[Any, Any | None]:
    """Params (and optional EMA params) from a PyTorch ADM checkpoint or a fresh init."""
    rng = jax.random.key(config.seed)
    if not config.init.checkpoint:
        return init_params(experiment, rng), None
    module = experiment.model
    params = params_from_state_dict(
        load_torch_state_dict(config.init.checkpoint, sha256=config.init.checkpoint_sha256 or None),
        module)
    ema = None
    if config.init.ema_checkpoint:
        ema = params_from_state_dict(load_torch_state_dict(
            config.init.ema_checkpoint, sha256=config.init.ema_checkpoint_sha256 or None), module)
    logging.info("initialised from %s (EMA from %s); optimizer state fresh", config.init.checkpoint,
                 config.init.ema_checkpoint or "the params")
    return params, ema


def load_init_run(config) -> tuple[Any, Any] | None:
    """``(params, ema_params)`` on the host from ``config.init.workdir`` (None when unset).

    The source run's checkpoint ``init.step`` (-1: the newest) is restored whatever the device
    count it was written with; ``init.ema_rate`` picks its EMA copy (0: its first rate).
    """
    init = config.init
    if not init.get("workdir", ""):
        return None
    workdir = workdir_path(init.workdir)
    step = None if init.get("step", -1) == -1 else int(init.step)
    try:
        state, source_config = restore_state(workdir, step)
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"config.init.workdir={init.workdir!r}: cannot restore "
                          f"{'the newest checkpoint' if step is None else f'step {step}'}: {e}"
                          ) from None
    check_init_config(config, source_config, init.workdir)
    rate = float(init.get("ema_rate", 0.0)) or source_config.train.ema_rates[0]
    if ema_key(rate) not in state.ema:
        raise ConfigError(f"config.init.ema_rate={rate} is not an EMA rate of the run in "
                          f"{init.workdir} (it has {list(source_config.train.ema_rates)})")
    logging.info("initialised from %s step %d (params and EMA %s); optimizer, timestep sampler "
                 "and counters fresh", workdir, int(state.step), rate)
    return jax.device_get(state.params), jax.device_get(state.ema[ema_key(rate)])


def _abstract_state(experiment, optimizer) -> TrainState:
    """Shapes and dtypes of the train state (nothing is computed or allocated)."""
    return jax.eval_shape(functools.partial(init_state, experiment, optimizer),
                          jax.random.key(0))


def _put(host: Any, shardings: Any) -> Any:
    """Host arrays -> global arrays with ``shardings`` (each process puts its own shards)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        host, shardings)


def _initial_state(config, experiment, optimizer, shardings, teacher: Teacher | None = None
                   ) -> TrainState:
    """The state of a new run, placed on the mesh with ``shardings``.

    A fresh init runs as one jitted function straight into its shardings. Weights from a PyTorch
    checkpoint or a CM run's teacher are read on the host (never baked into a compiled program)
    and each process puts its shards of them on its devices.
    """
    from_teacher = (teacher is not None and experiment.cm is not None
                    and experiment.cm.init_from_teacher)
    if from_teacher:
        init = lambda: init_params(experiment, jax.random.key(config.seed))  # noqa: E731
        teacher_params = jax.device_get(teacher.params)
        params = merge_teacher_params(jax.eval_shape(init), teacher_params)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            # Params the teacher lacks (e.g. an LCM student's guidance_proj) need a real init
            # (compiling the UNet's init takes a while, so only then).
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            fresh = jax.device_get(jax.jit(init, out_shardings=local)())
            params = merge_teacher_params(fresh, teacher_params)
        host = jax.device_get(jax.jit(lambda p: create_state(experiment, optimizer, p))(params))
        logging.info("student initialised from the teacher's EMA params (%s)", teacher.workdir)
        return _put(host, shardings)
    from_run = load_init_run(config)
    if from_run is not None:
        return _put(jax.device_get(create_state(experiment, optimizer, *from_run)), shardings)
    if not config.init.checkpoint:
        return jax.jit(lambda: create_state(
            experiment, optimizer, _initial_params(config, experiment)[0]),
            out_shardings=shardings)()
    params, ema = _initial_params(config, experiment)
    return _put(jax.device_get(create_state(experiment, optimizer, params, ema)), shardings)


def check_data_fits_model(config: ml_collections.ConfigDict, meta) -> None:
    """The dataset's channels and classes fit ``config.model`` (else one ConfigError).

    A wrong channel count would fail deep inside the jitted step; labels >= num_classes would be
    clamped silently by the class embedding.
    """
    if meta is None:
        return
    name = config.data.dataset
    channels = meta.image_shape[-1]
    if channels is not None and channels != config.model.in_channels:
        raise ConfigError(f"config.model.in_channels is {config.model.in_channels}, but the images "
                          f"of {name!r} have {channels} channel(s): set "
                          f"--config.model.in_channels={channels}")
    if config.model.class_cond and meta.num_classes:
        guided = (cm_kind(config) == "lcm" and bool(config.cm.lcm.guidance))
        null = 1 if float(config.train.get("label_dropout", 0.0)) > 0 or guided else 0
        need = meta.num_classes + null
        if config.model.num_classes < need:
            why = " plus the null class num_classes - 1" if null else ""
            raise ConfigError(f"config.model.num_classes is {config.model.num_classes}, but "
                              f"{name!r} has {meta.num_classes} classes{why}: set "
                              f"--config.model.num_classes={need}")


def _write_grid(config, experiment, state, mesh, workdir, step, writer):
    rate = config.train.ema_rates[0]
    images, _ = samples_lib.generate(
        experiment.model, state.ema[ema_key(rate)], experiment.diffusion,
        num=config.train.num_samples, image_shape=experiment.image_shape,
        rng=jax.random.fold_in(jax.random.key(config.seed), 10_000_000 + step),
        sampler=config.train.sampler, steps=config.train.sample_steps,
        batch_size=config.train.num_samples, num_classes=experiment.sample_classes,
        cm=experiment.cm)
    if jax.process_index() == 0:
        tile = samples_lib.grid(images)
        samples_lib.save_png(tile, workdir / "samples" / f"ema_{step:08d}.png")
        writer.write_images(step, {"ema_samples": tile[None]})


def _train_iterator(config, data_dir: str, *, worker_count: int):
    """This process's iterator over the run's training minibatches (raises DataError)."""
    return create_train_iterator(
        dataset=config.data.dataset, data_dir=data_dir, split=config.data.split,
        global_batch_size=config.train.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        random_flip=config.data.random_flip, class_cond=config.model.class_cond,
        image_size=config.model.image_size, worker_count=worker_count)


def _sharded_train_step(config, experiment: Experiment, optimizer, mesh, shardings, teacher):
    """``train_step(state, batch, steps_done) -> (state, metrics)``: the loop's jitted step (state
    donated) on ``mesh``."""
    # The teacher is a non-donated input, sharded like params ({} without one); the schedule
    # (the CM target EMA rate and N; nothing for DPM) is computed on the host.
    teacher_params = {}
    if teacher is not None and experiment.cm.kind != "ct":
        host = jax.device_get(teacher.params)
        teacher_params = _put(host, sharding.params_shardings(host, mesh))
    jitted_step = jax.jit(
        make_train_step(experiment, optimizer, seed=config.seed, lr_fn=lr_schedule(config),
                        teacher_model=teacher.model if teacher else None,
                        teacher_diffusion=teacher.diffusion if teacher else None),
        in_shardings=(shardings, sharding.batch_sharding(mesh),
                      sharding.params_shardings(teacher_params, mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

    def train_step(state, batch, steps_done):
        schedule = step_schedule(experiment, steps_done)  # the same on every process
        schedule = _put(schedule, jax.tree.map(lambda _: sharding.replicated(mesh), schedule))
        return jitted_step(state, batch, teacher_params, schedule)

    return train_step


def loop_train_step(config: ml_collections.ConfigDict):
    """``(step, state, batch)`` of a DPM config as :func:`train` runs it: the loop's jitted step
    (the same program, so one compilation serves both through the persistent cache), the run's
    initial state (e.g. the start checkpoint of ``config.init.workdir``) and the first minibatch
    of its data; ``step(state, batch) -> (state, metrics)``. The experiment's equal wall-clock
    timing measures it."""
    experiment = build_experiment(config)
    if experiment.cm is not None:
        raise ConfigError("loop_train_step times DPM runs; this config is a consistency model "
                          f"(cm.kind={config.cm.kind!r})")
    optimizer = build_optimizer(config)
    mesh = sharding.create_mesh(config.mesh.fsdp)
    shardings = sharding.state_shardings(_abstract_state(experiment, optimizer), mesh)
    try:
        iterator = _train_iterator(config, config.data.data_dir, worker_count=0)
        batch = sharding.global_batch(next(iterator), mesh)
    except DataError as e:
        raise ConfigError(f"config.data: {e}") from None
    state = _initial_state(config, experiment, optimizer, shardings, None)
    train_step = _sharded_train_step(config, experiment, optimizer, mesh, shardings, None)
    return (lambda st, b: train_step(st, b, 0)), state, batch


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          restore_step: int | None = None) -> TrainState:
    """Trains (or resumes) ``config`` in ``workdir`` (local or e.g. ``gs://``); returns the final
    state."""
    experiment = build_experiment(config)   # validates the config first
    optimizer = build_optimizer(config)
    workdir = workdir_path(workdir)
    data_dir = config.data.data_dir or default_data_dir(workdir)
    if jax.device_count() % config.mesh.fsdp:
        raise ConfigError(f"config.mesh.fsdp ({config.mesh.fsdp}) must divide the number of "
                          f"devices ({jax.device_count()})")
    mesh = sharding.create_mesh(config.mesh.fsdp)
    if config.train.global_batch_size % jax.device_count():
        raise ConfigError(f"config.train.global_batch_size ({config.train.global_batch_size}) must "
                          f"be divisible by the number of devices ({jax.device_count()})")
    if (config.train.global_batch_size // config.train.microbatches) % jax.device_count():
        raise ConfigError("config.train.global_batch_size / config.train.microbatches must be "
                          f"divisible by the number of devices ({jax.device_count()})")
    ckpt.check_access(workdir)       # e.g. gs:// without credentials: one clear error
    teacher = load_teacher(config)   # CM runs: checked before anything is written

    try:
        iterator = _train_iterator(config, data_dir, worker_count=config.data.worker_count)
    except DataError as e:
        raise ConfigError(f"config.data: {e}") from None
    check_data_fits_model(config, iterator.meta)

    abstract = _abstract_state(experiment, optimizer)
    shardings = sharding.state_shardings(abstract, mesh)
    manager = ckpt.create_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    step_to_restore = restore_step if restore_step is not None else manager.latest_step()
    if step_to_restore is not None:
        state, data_state, _ = ckpt.restore(
            manager, step_to_restore, ckpt.abstract_with_shardings(abstract, shardings))
        try:
            iterator.set_state(data_state)
        except DataStateMismatchError as e:
            raise resume_data_error(e.mismatched, workdir, step_to_restore) from None
        logging.info("resumed from %s step %d", manager.directory, step_to_restore)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        state = _initial_state(config, experiment, optimizer, shardings, teacher)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json(indent=2))

    train_step = _sharded_train_step(config, experiment, optimizer, mesh, shardings, teacher)

    # clu's writers import TensorFlow (seconds): only training needs them, not restore/sampling
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0, asynchronous=False)
    total = config.train.num_minibatches
    start = int(state.step)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=config.train.log_every)
    pending: list[dict] = []
    step = start
    with _Preemption() as preemption:
        for step in range(start + 1, total + 1):
            try:
                batch = sharding.global_batch(next(iterator), mesh)
            except DataError as e:   # e.g. images of another dtype
                raise ConfigError(f"config.data: {e}") from None
            # the schedule of the minibatches done so far (state.step == step - 1)
            state, metrics = train_step(state, batch, step - 1)
            pending.append(metrics)
            if step % config.train.log_every == 0 or step == total:
                host = jax.device_get(pending)  # waits for the step: the timing below is real
                scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                scalars.update({k: float(host[-1][k]) for k in _COUNTERS if k in host[-1]})
                writer.write_scalars(step, scalars)
                pending = []
            # Every step (clu requires it); it only reports on log steps, after the wait above.
            report(step, time.time())
            if config.train.sample_every and step % config.train.sample_every == 0:
                _write_grid(config, experiment, state, mesh, workdir, step, writer)
            stop = preemption.agreed()
            if step % config.train.checkpoint_every == 0 or step == total or stop:
                ckpt.save(manager, step, state, iterator.get_state(), config)
            if stop:
                logging.warning("preempted: checkpoint %d written, exiting", step)
                break
    every = config.train.sample_every
    if step == total and total > start and every and total % every:  # a last grid at the end
        _write_grid(config, experiment, state, mesh, workdir, step, writer)
    writer.flush()
    manager.close()
    return state


def _restore_local(workdir: str, step: int | None
                   ) -> tuple[TrainState, Experiment, ml_collections.ConfigDict]:
    """``(state, experiment, config)`` of checkpoint ``step`` (default: newest) on one local device.

    Works whatever the device or process count the checkpoint was written with.
    """
    manager = ckpt.create_manager(workdir, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ckpt.CheckpointError(f"no checkpoint in {manager.directory}")
        config = ckpt.restore_config(manager, step)
        experiment = build_experiment(config)
        optimizer = build_optimizer(config)
        abstract = _abstract_state(experiment, optimizer)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = ckpt.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
        state, _, _ = ckpt.restore(manager, step, target)
    finally:
        manager.close()
    return state, experiment, config


def restore_state(workdir: str, step: int | None = None
                  ) -> tuple[TrainState, ml_collections.ConfigDict]:
    """``(state, config)``: the full train state of checkpoint ``step`` (default: the newest).

    The state (params, EMA copies, optimizer state, counters, timestep-sampler state) is placed on
    this process's first local device, whatever the device or process count it was written with.
    """
    state, _, config = _restore_local(workdir, step)
    return state, config


def restore_for_sampling(workdir: str, step: int | None = None, ema_rate: float | None = None
                         ) -> tuple[Any, Any, Experiment, ml_collections.ConfigDict]:
    """``(module, ema_params, experiment, config)`` from a run's checkpoint, on this host's devices.

    Works whatever the device or process count the checkpoint was written with. ``ema_rate`` picks
    the EMA copy (default: the first of ``config.train.ema_rates``).
    """
    state, experiment, config = _restore_local(workdir, step)
    rate = config.train.ema_rates[0] if ema_rate is None else ema_rate
    if ema_key(rate) not in state.ema:
        raise EmaRateError(f"ema_rate {rate} is not in this run; it has "
                           f"{list(config.train.ema_rates)}")
    return experiment.model, state.ema[ema_key(rate)], experiment, config
