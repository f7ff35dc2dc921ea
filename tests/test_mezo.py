"""MeZO on plain numpy objectives: no llama.cpp involved."""

import math

import numpy as np
import pytest

from edgezo.mezo import (Cone, MezoConfig, NonFiniteLoss, PerturbedParams, StepRecord, apply_update, direction,
                         direction_seed, initial_momentum, learning_rate_at, mezo_step, zo_step)


def quadratic(params):
    """L(theta) = 0.5 * sum_i c_i |theta_i - 1|^2 with a different curvature per tensor."""
    return sum(0.5 * c * float(np.sum((params[k].astype(np.float64) - 1.0) ** 2))
               for c, k in zip((1.0, 3.0), ("a", "b")))


def make_theta(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}


def test_projected_gradient_is_the_directional_derivative_on_average():
    # For a quadratic the central difference is exact: g = grad . z, and E[g z] = grad.
    theta = make_theta()
    grad = {"a": 1.0 * (theta["a"] - 1.0), "b": 3.0 * (theta["b"] - 1.0)}
    n = 4000
    estimate = {k: np.zeros_like(v, dtype=np.float64) for k, v in theta.items()}
    eps = 1e-3
    for step in range(n):
        seed = direction_seed(7, step, 0)
        g = (quadratic(PerturbedParams(theta, seed, eps)) - quadratic(PerturbedParams(theta, seed, -eps))) / (2 * eps)
        z = {k: direction(seed, i, v.shape) for i, (k, v) in enumerate(theta.items())}
        exact = sum(float(np.sum(grad[k] * z[k])) for k in theta)
        assert g == pytest.approx(exact, rel=1e-3, abs=1e-3)  # one direction: g is the directional derivative
        for k in theta:
            estimate[k] += g * z[k] / n
    for k in theta:  # average over directions: unbiased for the gradient (tolerance ~ 4 standard errors)
        err = np.abs(estimate[k] - grad[k]).max()
        scale = math.sqrt(sum(float(np.sum(g_ ** 2)) for g_ in grad.values()) / n)
        assert err < 5 * scale


def test_perturbation_never_modifies_theta():
    theta = make_theta()
    before = {k: v.copy() for k, v in theta.items()}
    view = PerturbedParams(theta, seed=123, scale=0.5)
    assert all(not np.array_equal(view[k], before[k]) for k in theta)
    for k in theta:
        np.testing.assert_array_equal(theta[k], before[k])  # bit-exact: "restore" is a no-op


def test_direction_depends_only_on_seed_and_tensor_index():
    a = PerturbedParams(make_theta(), seed=5, scale=1.0)
    b = PerturbedParams(make_theta(), seed=5, scale=1.0)
    np.testing.assert_array_equal(a["b"], b["b"])  # any access order
    np.testing.assert_array_equal(a["a"], b["a"])
    assert not np.array_equal(PerturbedParams(make_theta(), seed=6, scale=1.0)["a"], a["a"])


def test_mezo_descends_a_quadratic():
    theta = make_theta()
    config = MezoConfig(learning_rate=0.02, eps=1e-3, n_directions=4)
    start = quadratic(theta)
    for step in range(300):
        mezo_step(theta, quadratic, config, run_seed=0, step=step, total_steps=300)
    assert quadratic(theta) < 0.05 * start


def test_replay_from_log_is_bit_exact():
    theta = make_theta()
    config = MezoConfig(learning_rate=0.01, eps=1e-3, n_directions=2, weight_decay=0.1)
    records = [mezo_step(theta, quadratic, config, run_seed=3, step=s, total_steps=20) for s in range(20)]
    replayed = make_theta()
    for r in records:  # only (seeds, projected grads, lr) from the log
        apply_update(replayed, StepRecord(step=r.step, lr=r.lr, seeds=r.seeds, projected_grads=r.projected_grads), config)
    for k in theta:
        np.testing.assert_array_equal(theta[k], replayed[k])


def test_weight_decay_shrinks_parameters_when_loss_is_flat():
    theta = make_theta()
    config = MezoConfig(learning_rate=0.1, eps=1e-2, weight_decay=0.5)
    before = sum(float(np.sum(v ** 2)) for v in theta.values())
    mezo_step(theta, lambda p: 1.0, config, run_seed=0, step=0, total_steps=1)  # g = 0: only decay acts
    after = sum(float(np.sum(v ** 2)) for v in theta.values())
    assert after == pytest.approx(before * (1 - 0.1 * 0.5) ** 2, rel=1e-5)


def test_non_finite_loss_raises_and_leaves_theta_untouched():
    theta = make_theta()
    before = {k: v.copy() for k, v in theta.items()}
    with pytest.raises(NonFiniteLoss, match="not finite"):
        mezo_step(theta, lambda p: float("nan"), MezoConfig(), run_seed=0, step=0, total_steps=1)
    for k in theta:
        np.testing.assert_array_equal(theta[k], before[k])


@pytest.mark.parametrize("schedule, step, expected", [
    ("constant", 50, 1.0),   # flat after warmup
    ("linear", 55, 0.5),     # halfway through the 90 post-warmup steps
    ("cosine", 55, 0.5),     # cos(pi/2) = 0 -> half
    ("linear", 4, 0.5),      # warmup: (4 + 1) / 10
    ("cosine", 100, 0.0),    # ends at zero
])
def test_schedules(schedule, step, expected):
    config = MezoConfig(learning_rate=1.0, schedule=schedule, warmup_steps=10)
    assert learning_rate_at(config, step, total_steps=100) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0}, "learning rate"),
    ({"eps": -1}, "eps"),
    ({"n_directions": 0}, "n_directions"),
    ({"schedule": "exponential"}, "exponential"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(Exception, match=message):
        MezoConfig(**kwargs)


# ---- FZOO (one-sided Rademacher, std-normalised) -------------------------------------------------------------
def test_rademacher_directions_are_plus_minus_one_and_seeded():
    z = direction(11, 0, (64, 8), rademacher=True)
    assert set(np.unique(z)) == {-1.0, 1.0} and z.dtype == np.float32
    np.testing.assert_array_equal(z, direction(11, 0, (64, 8), rademacher=True))
    assert abs(float(z.mean())) < 0.1


def test_fzoo_step_follows_its_formula_and_replays_bit_exactly():
    config = MezoConfig(learning_rate=0.05, eps=1e-3, n_directions=4, estimator="fzoo")
    theta, replayed = make_theta(), make_theta()
    before = {k: v.astype(np.float64) for k, v in theta.items()}
    record = zo_step(theta, quadratic, config, run_seed=3, step=0, total_steps=10)
    assert record.loss_center == pytest.approx(quadratic(make_theta())) and record.loss == record.loss_center
    assert len(record.losses_plus) == 4 and not record.losses_minus
    sigma = np.std(record.losses_plus)
    assert record.projected_grads == pytest.approx([(loss - record.loss_center) / sigma for loss in record.losses_plus])
    # theta <- theta - lr * sum_k (l_k - l_0) / (n sigma) u_k
    expected = {k: v.copy() for k, v in before.items()}
    for seed, g in zip(record.seeds, record.projected_grads):
        for i, k in enumerate(theta):
            expected[k] -= 0.05 * g / 4 * direction(seed, i, theta[k].shape, rademacher=True)
    for k in theta:
        np.testing.assert_allclose(theta[k], expected[k], rtol=1e-5, atol=1e-6)
    apply_update(replayed, StepRecord(step=0, lr=record.lr, seeds=record.seeds,
                                      projected_grads=record.projected_grads), config)
    for k in theta:
        np.testing.assert_array_equal(theta[k], replayed[k])


def test_fzoo_descends_a_quadratic():
    config = MezoConfig(learning_rate=0.02, eps=1e-2, n_directions=8, estimator="fzoo")
    theta = make_theta()
    start = quadratic(theta)
    for step in range(300):
        zo_step(theta, quadratic, config, run_seed=0, step=step, total_steps=300)
    assert quadratic(theta) < 0.2 * start


def test_fzoo_needs_two_directions_and_skips_a_step_without_spread():
    with pytest.raises(Exception, match="n_directions must be >= 2"):
        MezoConfig(estimator="fzoo", n_directions=1)
    theta = make_theta()
    before = {k: v.copy() for k, v in theta.items()}
    record = zo_step(theta, lambda params: 1.0, MezoConfig(estimator="fzoo", n_directions=3), 0, 0, 1)
    assert record.projected_grads == [0.0, 0.0, 0.0]  # all losses equal: sigma = 0, no step
    for k in theta:
        np.testing.assert_array_equal(theta[k], before[k])


def test_fzoo_reports_a_non_finite_loss_without_touching_theta():
    theta = make_theta()
    before = {k: v.copy() for k, v in theta.items()}
    losses = iter([1.0, 2.0, math.nan])
    with pytest.raises(NonFiniteLoss, match="step 1: loss is not finite \\(L2 = nan\\)"):
        zo_step(theta, lambda params: next(losses), MezoConfig(estimator="fzoo", n_directions=3), 0, 0, 1)
    for k in theta:
        np.testing.assert_array_equal(theta[k], before[k])


# ---- ConMeZO ----------------------------------------------------------------------------------------------------
CONE = MezoConfig(learning_rate=0.01, eps=1e-3, estimator="conmezo")


def test_conmezo_first_step_is_mezos_and_starts_the_momentum():
    """While the momentum is zero the cone is the whole space: step 1 equals MeZO's, and m = (1 - beta) g z."""
    theta, plain = make_theta(), make_theta()
    momentum = initial_momentum(theta)
    record = mezo_step(theta, quadratic, CONE, run_seed=1, step=0, total_steps=10, momentum=momentum)
    mezo_step(plain, quadratic, MezoConfig(learning_rate=0.01, eps=1e-3), run_seed=1, step=0, total_steps=10)
    for i, k in enumerate(theta):
        np.testing.assert_array_equal(theta[k], plain[k])
        z = direction(record.seeds[0], i, theta[k].shape)
        np.testing.assert_allclose(momentum[k], (1 - 0.99) * record.projected_grads[0] * z, rtol=1e-5)


def test_cone_directions_keep_their_angle_to_the_momentum():
    rng = np.random.default_rng(0)
    momentum = {"a": rng.standard_normal((300, 200)).astype(np.float32), "b": rng.standard_normal(5000).astype(np.float32)}
    cone = Cone.around(momentum, CONE)
    theta = {k: np.zeros_like(v) for k, v in momentum.items()}
    z = np.concatenate([PerturbedParams(theta, 7, 1.0, cone=cone)[k].ravel() for k in theta])
    m = np.concatenate([v.ravel() for v in momentum.values()])
    cosine = float(z @ m) / (np.linalg.norm(z) * np.linalg.norm(m))
    assert cosine == pytest.approx(math.cos(1.35), abs=0.01)  # u is nearly orthogonal to m in 65,000 dimensions
    assert np.linalg.norm(z) == pytest.approx(math.sqrt(m.size), rel=0.01)  # as long as a Gaussian direction


def test_conmezo_replays_bit_exactly_from_the_log_with_its_momentum():
    theta, momentum = make_theta(), initial_momentum(make_theta())
    config = MezoConfig(learning_rate=0.01, eps=1e-3, n_directions=2, weight_decay=0.1, estimator="conmezo")
    records = [zo_step(theta, quadratic, config, 3, s, 20, momentum) for s in range(20)]
    replayed, replayed_momentum = make_theta(), initial_momentum(make_theta())
    for r in records:  # only (seeds, projected grads, lr) from the log, in order
        apply_update(replayed, StepRecord(step=r.step, lr=r.lr, seeds=r.seeds, projected_grads=r.projected_grads),
                     config, replayed_momentum)
    for k in theta:
        np.testing.assert_array_equal(theta[k], replayed[k])
        np.testing.assert_array_equal(momentum[k], replayed_momentum[k])


def test_conmezo_beats_mezo_where_the_gradient_keeps_its_direction():
    """A linear slope in 2,000 dimensions: the gradient never turns, so the cone around the momentum finds it and
    each step goes further than MeZO's along the same random directions."""
    slope = np.random.default_rng(5).standard_normal(2000).astype(np.float64)

    def linear(params):
        return float(params["w"].astype(np.float64) @ slope)

    results = {}
    for estimator in ("mezo", "conmezo"):
        theta = {"w": np.zeros(2000, dtype=np.float32)}
        momentum = initial_momentum(theta) if estimator == "conmezo" else None
        config = MezoConfig(learning_rate=1e-4, eps=1e-3, estimator=estimator)
        for step in range(200):
            zo_step(theta, linear, config, 0, step, 200, momentum)
        results[estimator] = linear(theta)
    assert results["conmezo"] < 2 * results["mezo"] < 0  # both descend; ConMeZO over 2x as far (2.8x measured)


def test_conmezo_leaves_theta_and_momentum_untouched_on_a_non_finite_loss():
    theta = make_theta()
    momentum = {k: np.ones_like(v) for k, v in theta.items()}
    before = {k: v.copy() for k, v in theta.items()}
    with pytest.raises(NonFiniteLoss):
        mezo_step(theta, lambda p: float("inf"), CONE, run_seed=0, step=0, total_steps=1, momentum=momentum)
    for k in theta:
        np.testing.assert_array_equal(theta[k], before[k])
        np.testing.assert_array_equal(momentum[k], np.ones_like(theta[k]))
