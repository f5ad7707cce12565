"""Timestep samplers against a NumPy transcription of the IDDPM resampler's rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.diffusion.timestep_sampler import TimestepSampler


class NumpyLossSecondMoment:
    """The rules of IDDPM's LossSecondMomentResampler, written out in NumPy as an oracle."""

    def __init__(self, T, history=10, uniform_prob=0.001):
        self.T, self.h, self.u = T, history, uniform_prob
        self.losses = np.zeros((T, history))
        self.counts = np.zeros(T, dtype=int)

    def weights(self):
        if not (self.counts == self.h).all():
            return np.ones(self.T)
        w = np.sqrt(np.mean(self.losses ** 2, axis=-1))
        w = w / w.sum() * (1 - self.u) + self.u / self.T
        return w

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.h:
                self.losses[t, :-1] = self.losses[t, 1:]
                self.losses[t, -1] = loss
            else:
                self.losses[t, self.counts[t]] = loss
                self.counts[t] += 1


def test_uniform_sampler():
    s = TimestepSampler("uniform", 50)
    t, w = s.sample(s.init(), jax.random.key(0), 4096)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 49
    np.testing.assert_array_equal(w, 1.0)
    counts = np.bincount(np.asarray(t), minlength=50)
    assert counts.min() > 40 and counts.max() < 130
    state = s.init()
    assert s.update(state, t[:3], jnp.ones(3)) is state


def test_loss_second_moment_matches_oracle():
    T, H = 6, 3
    s = TimestepSampler("loss-second-moment", T, history=H, uniform_prob=0.01)
    oracle = NumpyLossSecondMoment(T, H, 0.01)
    state = s.init()
    update = jax.jit(s.update)
    rng = np.random.default_rng(0)
    warmed_at = None
    for step in range(12):
        # Batches with repeated timesteps: order within the batch matters once a row is full.
        ts = rng.integers(0, T, size=5)
        losses = rng.exponential(size=5) * (1 + ts)
        state = update(state, jnp.asarray(ts), jnp.asarray(losses, jnp.float32))
        oracle.update(ts, losses)
        np.testing.assert_array_equal(state.counts, oracle.counts)
        np.testing.assert_allclose(state.losses, oracle.losses, rtol=1e-6)
        w = oracle.weights()
        np.testing.assert_allclose(s.probabilities(state), w / w.sum(), rtol=1e-5)
        if warmed_at is None and (oracle.counts == H).all():
            warmed_at = step
    assert warmed_at is not None and warmed_at < 11  # the test reached the importance regime
    p = np.asarray(s.probabilities(state))
    t, w = s.sample(state, jax.random.key(1), 20000)
    freq = np.bincount(np.asarray(t), minlength=T) / 20000
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(w, 1.0 / (T * p[np.asarray(t)]), rtol=1e-6)
    # The importance weights make the weighted mean an unbiased estimate of the uniform mean.
    assert float(jnp.mean(w)) == pytest.approx(1.0, abs=0.03)


def test_sampler_before_warmup_is_uniform_with_unit_weights():
    s = TimestepSampler("loss-second-moment", 20)
    t, w = s.sample(s.init(), jax.random.key(2), 64)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_allclose(s.probabilities(s.init()), 1 / 20)


def test_bad_sampler_config():
    with pytest.raises(ValueError, match="schedule_sampler"):
        TimestepSampler("importance", 10)
    with pytest.raises(ValueError, match="history"):
        TimestepSampler("uniform", 10, history=0)
