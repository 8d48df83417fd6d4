"""The accountant: reference values, composition of histories, budget checks, calibration."""

import math

import pytest

from common.errors import ConfigError
from common.privacy.accounting import (
    DeltaChoice,
    MechanismUse,
    calibrate_noise,
    choose_delta,
    default_delta,
    epsilon,
    merged,
    would_exceed,
)


def test_reference_values_of_both_accountants():
    # σ=1, q=0.01, 1000 steps, δ=1e-5 (values measured with Opacus and dp-accounting).
    use = [MechanismUse(1.0, 0.01, 1000)]
    assert epsilon(use, 1e-5, "pld") == pytest.approx(1.8282, abs=0.01)
    assert epsilon(use, 1e-5, "rdp") == pytest.approx(2.1014, abs=0.01)


def test_history_of_rounds_equals_one_composition_of_all_steps():
    rounds = [MechanismUse(1.1, 0.05, 20) for _ in range(7)]
    assert epsilon(rounds, 1e-5) == pytest.approx(epsilon([MechanismUse(1.1, 0.05, 140)], 1e-5), rel=1e-9)
    assert merged(rounds) == [MechanismUse(1.1, 0.05, 140)]


def test_mixed_mechanisms_compose_and_grow():
    a, b = MechanismUse(1.0, 0.1, 10), MechanismUse(2.0, 0.2, 10)
    eps_a, eps_ab = epsilon([a], 1e-5), epsilon([a, b], 1e-5)
    assert 0 < eps_a < eps_ab
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([MechanismUse(0.0, 0.1, 1)], 1e-5) == math.inf


def test_budget_check_uses_the_round_that_would_exceed():
    spent = [MechanismUse(1.0, 0.1, 50)]
    planned = MechanismUse(1.0, 0.1, 50)
    eps_now, eps_next = epsilon(spent, 1e-5), epsilon([*spent, planned], 1e-5)
    budget = (eps_now + eps_next) / 2
    assert would_exceed(spent, planned, 1e-5, budget) == (True, pytest.approx(eps_next))
    assert would_exceed(spent, planned, 1e-5, eps_next + 1e-6)[0] is False


def test_calibrated_noise_meets_the_target_tightly():
    sigma = calibrate_noise(0.01, 1000, 1.0, 1e-5)
    assert sigma == pytest.approx(1.43, abs=0.03)  # PRV reference value for the same setting
    eps = epsilon([MechanismUse(sigma, 0.01, 1000)], 1e-5)
    assert 0.99 <= eps <= 1.0


def test_invalid_inputs_are_named():
    with pytest.raises(ValueError, match="sample rate"):
        MechanismUse(1.0, 0.0, 1)
    with pytest.raises(ValueError, match="target epsilon"):
        calibrate_noise(0.1, 10, 0.0, 1e-5)
    with pytest.raises(ValueError, match="population"):
        default_delta(0)


@pytest.mark.parametrize(
    ("num_units", "expected"),
    [
        (500, 1e-5),  # 500 users: 1/(10·500) = 2e-4, so the 1e-5 cap
        (10_000, 1e-5),  # the crossover: 1/(10·10,000) = 1e-5
        (200_000, 5e-7),  # 200,000 users (or interactions): 1/(10·200,000)
        (4, 1e-5),  # 4 silos: 1/40 = 0.025, so the cap (1/N^1.1 was 0.218)
    ],
)
def test_default_delta_is_the_smaller_of_1e5_and_a_tenth_of_1_over_n(num_units, expected):
    # Act / Assert
    assert default_delta(num_units) == pytest.approx(expected, rel=1e-12)
    assert num_units * default_delta(num_units) <= 0.1


def test_choose_delta_default_names_its_rule():
    # Act
    chosen = choose_delta(0.0, 500, key="privacy.local.delta", units="the silo's N users", owner="silo 1")
    # Assert
    assert chosen == DeltaChoice(1e-5, "min(1e-5, 1/(10N)) for the silo's N users", None)


@pytest.mark.parametrize(
    ("key", "num_units", "delta"),
    [("privacy.local.delta", 500, 0.002), ("privacy.local.delta", 500, 0.4), ("privacy.central.delta", 4, 0.25)],
)
def test_choose_delta_refuses_a_delta_of_at_least_1_over_n(key, num_units, delta):
    # Act / Assert: the message names the owner, the key, N and 1/N
    with pytest.raises(ConfigError) as info:
        choose_delta(delta, num_units, key=key, units="units", owner="silo 3")
    message = str(info.value)
    assert message.startswith(f"silo 3: {key} = {delta:g}")
    assert f"1/N = {1 / num_units:.3g} for N = {num_units}" in message


@pytest.mark.parametrize(("num_units", "delta"), [(500, 1e-3), (500, 0.00021), (4, 0.05), (4, 0.2499)])
def test_choose_delta_accepts_but_flags_a_delta_between_a_tenth_of_1_over_n_and_1_over_n(num_units, delta):
    # Act
    chosen = choose_delta(delta, num_units, key="privacy.central.delta", units="the N silos", owner="the server")
    # Assert
    assert chosen.delta == delta
    assert chosen.rule == f"configured (above 1/(10N) = {1 / (10 * num_units):.3g} for the N silos: weak)"
    assert chosen.warning is not None
    assert chosen.warning.startswith(f"the server: privacy.central.delta = {delta:g} is above 1/(10N)")


@pytest.mark.parametrize(("num_units", "delta"), [(500, 2e-4), (500, 1e-9), (4, 0.025)])
def test_choose_delta_accepts_a_delta_up_to_a_tenth_of_1_over_n_silently(num_units, delta):
    # Act
    chosen = choose_delta(delta, num_units, key="privacy.local.delta", units="units", owner="silo 0")
    # Assert
    assert chosen == DeltaChoice(delta, "configured", None)
