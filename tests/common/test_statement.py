"""The privacy statement: one sentence per owner, from hand-written releases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.privacy.events import PrivacyRelease
from common.privacy.ledger import Chain
from common.privacy.statement import (
    format_delta,
    format_epsilon,
    run_releases,
    server_sentence,
    silo_sentence,
    statements,
)
from common.rundir import RunDir
from tests.fakes import SGD_RELEASED, dp_sgd_release


def _release(round_: int, epsilon: float, **changes) -> PrivacyRelease:
    owner = str(changes.pop("owner", "silo-2"))
    return dp_sgd_release(owner, round_, epsilon, **changes)


def _trained(rounds: int, **changes) -> list[PrivacyRelease]:
    return [_release(r, 0.791 * r, **changes) for r in range(1, rounds + 1)]


def _decline(round_: int, epsilon: float, if_trained: float, **changes) -> PrivacyRelease:
    values = {"total_steps": 60, "rounds_trained": 10, **changes}
    return _release(round_, epsilon, kind="budget-decline", steps=0, epsilon_if_trained=if_trained, **values)


def test_formats_epsilon_to_three_digits_and_delta_with_a_short_exponent():
    assert [format_epsilon(x) for x in (0.7341, 7.9123, 12.345, 265.4, float("inf"))] == [
        "0.734", "7.91", "12.3", "265", "∞",
    ]
    assert [format_delta(x) for x in (1e-5, 5.291e-4, 0.001, 0.0218)] == ["1e-5", "0.00053", "0.001", "0.022"]


def test_a_silo_that_trained_every_round_states_unit_epsilon_delta_accountant_relation_n_and_release():
    text = silo_sentence(_trained(10))
    assert text == (
        "silo 2: user-level (ε = 7.91, δ = 1e-5) under PLD accounting for the zero-out relation over "
        f"its 189 users, covering 10 rounds of DP-SGD that released {SGD_RELEASED}; nothing else it sent "
        "derived from its users' data."
    )


def test_a_weak_delta_is_named_with_its_bound():
    # N = 189: 1/(10N) = 5.29e-4; δ = 1e-3 is above it (and below 1/N = 5.29e-3).
    text = silo_sentence(_trained(2, delta=1e-3, delta_rule="configured (above 1/(10N) = 0.000529 ...: weak)"))
    assert "(ε = 1.58, δ = 0.001, weak: above 1/(10N) = 0.00053)" in text
    assert "weak" not in silo_sentence(_trained(2, delta=5e-4, delta_rule="configured"))


def test_declines_after_training_name_the_rounds_and_the_budget():
    rels = [*_trained(10), _decline(11, 7.91, 8.3), _decline(12, 7.91, 8.3)]
    text = silo_sentence(rels)
    assert "(ε = 7.91, δ = 1e-5)" in text and "covering 10 rounds of DP-SGD" in text
    assert "; it declined rounds 11–12 (one more round would have reached ε = 8.30 > its budget 8);" in text
    assert text.endswith("nothing else it sent derived from its users' data.")


def test_a_silo_that_only_declined_released_nothing():
    text = silo_sentence([_decline(1, 0.0, 9.1, total_steps=0, rounds_trained=0)])
    assert text == (
        "silo 2: declined round 1 (one more round would have reached ε = 9.10 > its budget 8) under a "
        "user-level budget (δ = 1e-5, PLD, zero-out relation over its 189 users), so nothing it sent "
        "derived from its users' data."
    )


def test_interaction_unit_counts_interaction_slots():
    text = silo_sentence(_trained(1, unit="interaction", population=4012))
    assert text.startswith("silo 2: interaction-level (ε = 0.791, δ = 1e-5)")
    assert "over its 4,012 interaction slots" in text


def test_noisy_evaluations_are_counted_next_to_the_training_rounds():
    # Releases of each mechanism kind are counted by kind, each with its own released text.
    evaluations = [_evaluation(r, 0.8 * r + 0.05) for r in (4, 8, 10)]
    rels = sorted([*_trained(10), *evaluations], key=lambda r: (r.server_round, r.kind != "dp-sgd"))
    text = silo_sentence(rels)
    assert "(ε = 8.05, δ = 1e-5)" in text  # the largest ε: the last composition
    assert (
        f"covering 10 rounds of DP-SGD that released {SGD_RELEASED}, and 3 noisy evaluations that "
        "released noisy evaluation sums (val/test users, hits@k, ndcg@k); nothing else" in text
    )


def _evaluation(round_: int, epsilon: float) -> PrivacyRelease:
    return _release(
        round_, epsilon, kind="dp-evaluation", noise_multiplier=5.0, sample_rate=1.0, steps=1,
        total_steps=6 * round_ + 1, released="noisy evaluation sums (val/test users, hits@k, ndcg@k)",
    )


def test_central_dp_is_client_level_over_the_roster_of_silos_and_says_whom_it_trusts():
    rels = [
        _release(r, 0.5 * r, owner="server", kind="dp-fedavg", unit="client", population=4, delta=0.025,
                 steps=1, total_steps=r, released="shared model parameters after the round",
                 expected_batch_size=None)
        for r in (1, 2, 3)
    ]
    text = server_sentence(rels)
    assert text == (
        "server: client-level (ε = 1.50, δ = 0.025) under PLD accounting for the zero-out relation over its "
        "roster of 4 silos, covering 3 rounds of DP-FedAvg that released shared model parameters after the "
        "round; nothing else it released derived from the silos' updates (the server itself sees each "
        "silo's update before noise and is trusted with it)."
    )
    assert "already the silos' DP-SGD outputs" in server_sentence(rels, silos_noised=True)


def test_no_release_says_no_guarantee_covers_it():
    assert silo_sentence([], owner="silo-3") == (
        "silo 3: its ledger holds no privacy release, so no differential-privacy guarantee covers what it sent."
    )
    with pytest.raises(ValueError, match="no owner"):
        silo_sentence([])
    with pytest.raises(ValueError, match="several owners"):
        silo_sentence([_release(1, 0.1), _release(1, 0.1, owner="silo-1")])


def test_statements_order_silos_then_server_and_cover_every_mode():
    silo = {f"silo-{k}": [replace(r, owner=f"silo-{k}") for r in _trained(2)] for k in (10, 2)}
    server = [
        _release(1, 0.4, owner="server", kind="dp-fedavg", unit="client", population=2, delta=0.01,
                 steps=1, total_steps=1, expected_batch_size=None)
    ]
    none = statements({}, "none")
    assert len(none) == 1 and none[0].startswith("No differential privacy")
    local = statements(silo, "local")
    assert [s.split(":")[0] for s in local] == ["silo 2", "silo 10"]
    both = statements({**silo, "server": server}, "local+central")
    assert [s.split(":")[0] for s in both] == ["silo 2", "silo 10", "server"]
    assert "already the silos' DP-SGD outputs" in both[-1]
    central = statements({"server": server}, "central")
    assert len(central) == 1 and central[0].startswith("server: client-level")
    # A central run that stopped before its first release still says the server released nothing.
    assert statements({}, "central") == [server_sentence([])]
    broken = statements({"silo-2": silo["silo-2"]}, "local", problems={"silo-5": "line 3: edited"})
    assert broken[1] == "silo 5: its ledger does not verify (line 3: edited), so no statement is made from it."


def test_run_releases_reads_each_ledger_and_names_the_one_that_does_not_verify(tmp_path: Path):
    run = RunDir(tmp_path)
    run.ledger_dir.mkdir()
    chain = Chain("silo-0")
    for rel in _trained(2, owner="silo-0"):
        chain.append_release(rel)
    chain.append("round-commit", 2, silos={})
    run.silo_ledger(0).write_text("".join(f"{line}\n" for line in chain.lines))
    run.silo_ledger(1).write_text('{"not": "a ledger line"}\n')
    found, problems = run_releases(run)
    assert [r.server_round for r in found["silo-0"]] == [1, 2]
    assert found["silo-0"][1].epsilon == pytest.approx(1.582)
    assert set(problems) == {"silo-1"} and problems["silo-1"].startswith("line 1: ")
