"""The accountant: reference values, composition of histories, budget checks, calibration."""

import math

import pytest

from common.privacy.accounting import (
    MechanismUse,
    calibrate_noise,
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
    assert default_delta(1000) == pytest.approx(1000**-1.1)
