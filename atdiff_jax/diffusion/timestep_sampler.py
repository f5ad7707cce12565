"""Timestep samplers with purely functional state: uniform and loss-second-moment importance.

The loss-second-moment sampler (IDDPM) keeps the last ``history`` losses of every timestep; once
every timestep has a full history it samples t with probability proportional to
sqrt(E[loss_t^2]) (mixed with ``uniform_prob`` of the uniform law) and returns importance weights
``1 / (T p_t)`` so that the weighted loss stays unbiased. Until then it samples uniformly with
weight 1. In adversarial training the state is updated with the adversarial per-example losses at
every inner step (K times per minibatch), as the authors' loop does.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

# config.diffusion.schedule_sampler (image samplers are atdiff_jax.samplers)
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


@flax.struct.dataclass
class LossHistory:
    """State of the loss-second-moment sampler."""
    losses: jax.Array   # [T, history] float32, most recent last once full
    counts: jax.Array   # [T] int32, number of losses recorded (saturates at history)


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
    """Samples training timesteps and importance weights.

    Attributes:
      kind: ``"uniform"`` or ``"loss-second-moment"``.
      num_timesteps: T.
      history: losses kept per timestep (loss-second-moment).
      uniform_prob: mass mixed in from the uniform law once warmed up.
    """

    kind: str
    num_timesteps: int
    history: int = 10
    uniform_prob: float = 0.001

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLERS:
            raise ValueError(f"schedule_sampler must be one of {TIMESTEP_SAMPLERS}, got "
                             f"{self.kind!r}")
        if self.num_timesteps < 1 or self.history < 1 or not 0 <= self.uniform_prob <= 1:
            raise ValueError("TimestepSampler needs num_timesteps >= 1, history >= 1 and "
                             "0 <= uniform_prob <= 1")

    def init(self) -> LossHistory:
        return LossHistory(losses=jnp.zeros((self.num_timesteps, self.history), jnp.float32),
                           counts=jnp.zeros((self.num_timesteps,), jnp.int32))

    def probabilities(self, state: LossHistory) -> jax.Array:
        """The sampling law over timesteps, [T] float32 (uniform until warmed up)."""
        uniform = jnp.full((self.num_timesteps,), 1.0 / self.num_timesteps, jnp.float32)
        if self.kind == "uniform":
            return uniform
        w = jnp.sqrt(jnp.mean(jnp.square(state.losses), axis=-1))
        w = w / jnp.sum(w)
        w = w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        warmed_up = jnp.all(state.counts == self.history)
        return jnp.where(warmed_up, w / jnp.sum(w), uniform)

    def sample(self, state: LossHistory, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """Timesteps [B] int32 and importance weights [B] float32 (all 1 for the uniform law)."""
        if self.kind == "uniform":
            t = jax.random.randint(rng, (batch_size,), 0, self.num_timesteps, dtype=jnp.int32)
            return t, jnp.ones((batch_size,), jnp.float32)
        p = self.probabilities(state)
        t = jax.random.choice(rng, self.num_timesteps, (batch_size,), p=p).astype(jnp.int32)
        return t, 1.0 / (self.num_timesteps * p[t])

    def sample_per_example(self, state: LossHistory, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Like :meth:`sample` with one key per example ([B] keys), so that each example's draw
        depends on its own key only (and not on the batch size or the device layout)."""
        if self.kind == "uniform":
            t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.num_timesteps, jnp.int32))(keys)
            return t, jnp.ones(t.shape, jnp.float32)
        p = self.probabilities(state)
        logits = jnp.log(p)
        t = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys).astype(jnp.int32)
        return t, 1.0 / (self.num_timesteps * p[t])

    def update(self, state: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
        """Records per-example ``losses`` [B] at timesteps ``t`` [B], in batch order.

        Examples are applied one after another (a timestep may occur several times in a batch);
        a no-op for the uniform sampler.
        """
        if self.kind == "uniform":
            return state

        def record(st, tl):
            ti, loss = tl
            row, count = st.losses[ti], st.counts[ti]
            full = count >= self.history
            shifted = jnp.concatenate([row[1:], loss[None]])
            filled = row.at[jnp.minimum(count, self.history - 1)].set(loss)
            row = jnp.where(full, shifted, filled)
            return LossHistory(losses=st.losses.at[ti].set(row),
                               counts=st.counts.at[ti].set(jnp.minimum(count + 1, self.history))), None

        state, _ = jax.lax.scan(record, state, (t.astype(jnp.int32),
                                                jax.lax.stop_gradient(losses).astype(jnp.float32)))
        return state
