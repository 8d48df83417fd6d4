"""The personalization benchmark reports each model at its own best-validation round."""

from benchmarks.personalization import SETTINGS, best_round


def test_best_round_is_chosen_on_validation_only_earliest_on_ties():
    # Arrange: round 2 and 3 tie on global validation; round 3 has the best personalized validation.
    rounds = [
        {"round": 1, "evaluate": {"val-hr@10": 0.5, "personalized-val-hr@10": 0.6, "test-hr@10": 0.9}},
        {"round": 2, "evaluate": {"val-hr@10": 0.7, "personalized-val-hr@10": 0.6, "test-hr@10": 0.1}},
        {"round": 3, "evaluate": {"val-hr@10": 0.7, "personalized-val-hr@10": 0.8, "test-hr@10": 0.2}},
        {"round": 4, "evaluate": {}},
    ]
    # Act / Assert
    assert best_round(rounds, "")["round"] == 2
    assert best_round(rounds, "personalized-")["round"] == 3


def test_settings_are_iid_and_the_two_dirichlet_alphas():
    assert SETTINGS == {
        "iid": {"data.skew": "iid"},
        "dirichlet-0.1": {"data.skew": "dirichlet", "data.dirichlet-alpha": 0.1},
        "dirichlet-0.5": {"data.skew": "dirichlet", "data.dirichlet-alpha": 0.5},
    }


def test_js_divergence_by_hand():
    import math

    import numpy as np

    from benchmarks.personalization import js_divergence

    # Disjoint supports: ln 2; identical: 0; (1, 0) vs (1/2, 1/2): mid (3/4, 1/4),
    # 1/2·ln(4/3) + 1/2·(1/2·ln(2/3) + 1/2·ln 2).
    assert math.isclose(js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])), math.log(2))
    assert js_divergence(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0
    expected = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert math.isclose(js_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5])), expected)


def test_table_reports_personalized_at_the_globals_round_and_its_own_round_beside():
    from benchmarks.personalization import table

    # Global best round 20 (test 0.6352); the kept copies at round 20 score 0.6405; the round with the
    # best personalized validation, 16, scores 0.6172.
    result = {
        "global": (20, 0.6840, 0.6352, 0.3685),
        "paired": (20, 0.6872, 0.6405, 0.3754),
        "personalized": (16, 0.6900, 0.6172, 0.3568),
    }
    lines = table([("dirichlet-0.5", "(fixed)", result)])
    assert lines[2] == "| dirichlet-0.5 | (fixed) | global | 20 | 0.6840 | 0.6352 | 0.3685 | | |"
    assert lines[3] == (
        "| dirichlet-0.5 | (fixed) | personalized | 20 | 0.6872 | 0.6405 | 0.3754 | +0.0053 | 16, 0.6172 (-0.0180) |"
    )
