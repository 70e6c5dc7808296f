"""Flow matching and samplers on a case with a known answer: data ~ N(mu, sigma^2 I).

For ``x_t = (1 - t) x0 + t eps`` the marginal is ``N((1 - t) mu, v_t)`` with
``v_t = (1 - t)^2 sigma^2 + t^2``, and the exact velocity is
``u(x, t) = -mu + v_t' / (2 v_t) (x - (1 - t) mu)``. The network output is ``f = -u``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.diffusion import flow
from jaxdit.diffusion.samplers import cfg_model, sample, time_grid

MU, SIGMA = 1.5, 0.5


def exact_f(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    v = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    dv = -2 * (1 - t) * SIGMA ** 2 + 2 * t
    u = -MU + dv / (2 * v) * (x - (1 - t) * MU)
    return -u


def test_exact_velocity_is_the_flow_matching_optimum():
    # E[x0 - eps | x_t] equals the exact f: check by Monte Carlo regression at one t.
    key = jax.random.PRNGKey(0)
    x0 = MU + SIGMA * jax.random.normal(key, (200_000,))
    eps = jax.random.normal(jax.random.PRNGKey(1), (200_000,))
    t = jnp.full((200_000,), 0.3)
    xt = flow.interpolate(x0, eps, t)
    tgt = flow.target(x0, eps)
    slope, intercept = np.polyfit(np.asarray(xt), np.asarray(tgt), 1)
    probe = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(intercept + slope * probe, exact_f(probe, jnp.full((2,), 0.3)),
                               atol=0.01)


@pytest.mark.parametrize("method,steps,tol", [("euler", 400, 5e-3), ("heun", 40, 1e-3),
                                              ("midpoint", 40, 1e-3), ("dpmpp_2m", 80, 2e-3)])
def test_ode_maps_noise_to_data_deterministically(method, steps, tol):
    z = jnp.linspace(-2.0, 2.0, 9)[:, None]
    x = sample(exact_f, z, jax.random.PRNGKey(0), method=method, num_steps=steps)
    np.testing.assert_allclose(x, MU + SIGMA * z, atol=tol)


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    z = jnp.linspace(-2.0, 2.0, 9)[:, None]
    err = {m: float(jnp.abs(sample(exact_f, z, jax.random.PRNGKey(0), method=m, num_steps=10)
                            - (MU + SIGMA * z)).max()) for m in ("euler", "heun")}
    assert err["heun"] < 0.2 * err["euler"]


def test_second_order_solvers_converge_at_second_order():
    """Halving the step size divides the error by about 4 (Euler: by about 2)."""
    z = jnp.linspace(-2.0, 2.0, 9)[:, None]

    def err(method, n):
        return float(jnp.abs(sample(exact_f, z, jax.random.PRNGKey(0), method=method,
                                    num_steps=n, shift=2.0) - (MU + SIGMA * z)).max())

    for method in ("midpoint", "dpmpp_2m", "heun"):
        assert err(method, 10) / err(method, 20) > 3.0, method
    assert err("euler", 10) / err("euler", 20) < 2.5


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint"])
def test_sde_samples_have_the_data_distribution(method):
    z = jax.random.normal(jax.random.PRNGKey(3), (20_000, 1))
    x = sample(exact_f, z, jax.random.PRNGKey(4), method=method, sde=True, num_steps=200)
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) - SIGMA) < 0.02
    # Stochastic: not the deterministic ODE map.
    ode = sample(exact_f, z, jax.random.PRNGKey(4), method=method, num_steps=200)
    assert float(jnp.abs(x - ode).mean()) > 0.05


def test_shifted_time_grid_and_sampler_still_exact():
    g = time_grid(10, shift=3.0)
    assert g[0] == 1.0 and g[-1] == 0.0 and bool(jnp.all(jnp.diff(g) < 0))
    assert float(g[5]) > 0.5  # shift spends more steps near noise
    z = jnp.linspace(-2.0, 2.0, 5)[:, None]
    x = sample(exact_f, z, jax.random.PRNGKey(0), method="heun", num_steps=60, shift=3.0)
    np.testing.assert_allclose(x, MU + SIGMA * z, atol=2e-3)


def test_logit_normal_timesteps_and_shift():
    t = flow.sample_t(jax.random.PRNGKey(0), 100_000, mean=0.0, std=1.0)
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(jnp.median(t)) - 0.5) < 0.01
    logit = jnp.log(t / (1 - t))
    assert abs(float(logit.std()) - 1.0) < 0.02
    t_shift = flow.sample_t(jax.random.PRNGKey(0), 100_000, shift=3.0)
    assert float(jnp.median(t_shift)) > 0.7  # s t / (1 + (s-1) t) at t = 0.5 is 0.75
    with pytest.raises(ValueError, match="Unknown t sampler"):
        flow.sample_t(jax.random.PRNGKey(0), 4, kind="cosine")


def test_cfg_combines_conditional_and_unconditional_in_one_batch():
    calls = []

    def apply(x, t, cond):
        calls.append(x.shape[0])
        return x * 0 + cond["c"][:, None]

    cond, null = {"c": jnp.array([2.0, 2.0])}, {"c": jnp.array([1.0, 1.0])}
    f = cfg_model(apply, cond, null, scale=7.5)(jnp.zeros((2, 3)), jnp.zeros(2))
    np.testing.assert_allclose(f, 1.0 + 7.5 * (2.0 - 1.0))
    assert calls == [4]


def test_cfg_per_sample_scale_renorm_and_truncation():
    def apply(x, t, cond):
        return jnp.ones_like(x) * cond["c"][:, None]

    cond, null = {"c": jnp.array([2.0, 2.0, 2.0])}, {"c": jnp.array([1.0, 1.0, 1.0])}
    x, t = jnp.zeros((3, 4)), jnp.array([0.9, 0.9, 0.2])
    f = cfg_model(apply, cond, null, scale=jnp.array([1.0, 4.0, 4.0]))(x, t)
    np.testing.assert_allclose(f[:, 0], [2.0, 5.0, 5.0])
    # Renorm caps the guided norm at renorm x the conditional norm (2.0 per entry here).
    f = cfg_model(apply, cond, null, scale=4.0, renorm=1.0)(x, t)
    np.testing.assert_allclose(f, 2.0)
    # Truncation: guidance only while t > 1 - trunc; sample 3 (t=0.2) gets f_cond.
    f = cfg_model(apply, cond, null, scale=4.0, trunc=0.5)(x, t)
    np.testing.assert_allclose(f[:, 0], [5.0, 5.0, 2.0])
    sample_fn = jax.jit(lambda z: sample(cfg_model(apply, cond, null, scale=4.0, trunc=0.5),
                                         z, jax.random.PRNGKey(0), method="dpmpp_2m",
                                         num_steps=4))
    assert sample_fn(jnp.zeros((3, 4))).shape == (3, 4)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="Unknown sampler"):
        sample(exact_f, jnp.zeros((1, 1)), jax.random.PRNGKey(0), method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        sample(exact_f, jnp.zeros((1, 1)), jax.random.PRNGKey(0), num_steps=0)
    with pytest.raises(ValueError, match="deterministic"):
        sample(exact_f, jnp.zeros((1, 1)), jax.random.PRNGKey(0), method="dpmpp_2m", sde=True)
