"""SecAgg+ state machines without Flower's runtime: sums, dropouts, thresholds, what the server sees."""

import dataclasses

import numpy as np
import pytest

from common.config import AppConfig
from common.errors import ConfigError
from common.run_config import load_default_run_config
from common.secagg import check_compatible
from common.secagg.protocol import (
    COLLECT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    ClientProtocol,
    SecAggError,
    SecAggParams,
    ServerProtocol,
    default_threshold,
)
from common.secagg.quantize import QuantSpec


def run(vectors, *, drop=None, threshold=None, clip_range=1.0, seen=None, rng=None):
    """Run one secure sum over in-memory clients; ``drop`` = {stage: nodes that stop answering there}."""
    drop = drop or {}
    rng = rng or np.random.default_rng(5)
    nodes = tuple(sorted(vectors))
    d = next(iter(vectors.values())).size
    params = SecAggParams(
        1, threshold or default_threshold(len(nodes)), QuantSpec(clip_range, 32, len(nodes)), d, nodes
    )
    server, clients = ServerProtocol(params), {n: ClientProtocol(n) for n in nodes}

    def answer(stage, payloads, act):
        out = {n: act(n, p) for n, p in payloads.items() if n not in drop.get(stage, ())}
        if seen is not None:
            seen[stage] = out
        return out

    server.receive_keys(answer(SETUP, dict.fromkeys(nodes, server.setup_payload()), lambda n, p: clients[n].setup(p)))
    server.receive_shares(answer(SHARE_KEYS, server.share_keys_payloads(), lambda n, p: clients[n].share_keys(p)))
    server.receive_masked(
        answer(COLLECT, server.collect_payloads(), lambda n, p: clients[n].collect(p, vectors[n]))
    )
    return server.receive_unmask(answer(UNMASK, server.unmask_payloads(), lambda n, p: clients[n].unmask(p)))


def test_three_silos_sum_by_hand():
    vectors = {1: np.array([0.5, -0.25]), 2: np.array([0.25, 0.25]), 3: np.array([-1.0, 1.0])}
    out = run(vectors)
    assert out.survivors == (1, 2, 3) and out.dropped == {}
    np.testing.assert_allclose(out.total, [-0.25, 1.0], atol=out.error_bound)
    # Δ = S·r / 2^30 = 3 / 2^30; three silos within ½ step each (+ float64's 2^-20 steps)
    assert out.error_bound == pytest.approx(3 * (3.0 / 2**30) * (0.5 + 2**-20))


@pytest.mark.parametrize("split", [(0.3, 0.3, 0.3), (0.9, 0.0, 0.0), (-2.1, 1.5, 1.5)])
def test_the_released_sum_is_a_function_of_the_exact_sum_only(split):
    # the protocol's own dithers (from the pairs' ECDH secrets): whatever the split of 0.9 grid
    # steps over three silos, the decoded sum is ⌊2.4 − V⌋ steps, V ~ Irwin-Hall(2):
    # P(2) = 0.4²/2 = 0.08, P(0) = 0.6²/2 = 0.18, P(1) = 0.74 (tests/common/test_secagg_quantize.py)
    step = QuantSpec(1.0, 32, 3).step
    d = 100_000  # each coordinate draws its own dithers
    out = run({n + 1: np.full(d, s * step) for n, s in enumerate(split)})
    k = np.rint(out.total / step)
    for value, p in {0: 0.18, 1: 0.74, 2: 0.08}.items():  # binomial std <= 0.0014; 5 of them
        assert abs(np.mean(k == value) - p) < 0.007, (split, value)
    assert set(np.unique(k)) <= {0, 1, 2}


def test_a_dropped_silos_dithers_are_removed_and_the_sum_stays_unbiased(rng):
    d = 60_000
    vectors = {n: rng.uniform(-1, 1, d) for n in range(1, 6)}
    out = run(vectors, drop={COLLECT: {2}})  # 2 shared keys, so the others' dithers hold its pairs
    err = out.total - sum(vectors[n] for n in (1, 3, 4, 5))
    step = QuantSpec(1.0, 32, 5).step
    assert np.abs(err).max() < out.error_bound
    assert abs(err.mean()) < 5 * 2 * step / np.sqrt(d)  # within n/2 = 2 steps: std < 2 steps


def test_random_vectors_of_five_silos_within_the_bound(rng):
    vectors = {n: rng.uniform(-1, 1, 5000) for n in range(1, 6)}
    out = run(vectors)
    assert np.abs(out.total - sum(vectors.values())).max() < out.error_bound


@pytest.mark.parametrize(
    ("stage", "in_sum"),
    [(SETUP, (1, 2, 4, 5)), (SHARE_KEYS, (1, 2, 4, 5)), (COLLECT, (1, 2, 4, 5)), (UNMASK, (1, 2, 3, 4, 5))],
)
def test_a_silo_dropping_at_any_stage_leaves_the_sum_of_the_others(rng, stage, in_sum):
    vectors = {n: rng.uniform(-1, 1, 3000) for n in range(1, 6)}
    out = run(vectors, drop={stage: {3}})
    assert out.survivors == in_sum  # dropping at unmask: its masked vector is already in the sum
    assert out.dropped == {stage: (3,)}
    assert np.abs(out.total - sum(vectors[n] for n in in_sum)).max() < out.error_bound


def test_dropping_after_sharing_keys_removes_that_silos_pairwise_masks(rng):
    vectors = {n: rng.uniform(-1, 1, 3000) for n in range(1, 6)}
    out = run(vectors, drop={COLLECT: {2, 4}}, threshold=3)
    assert out.survivors == (1, 3, 5)
    assert np.abs(out.total - vectors[1] - vectors[3] - vectors[5]).max() < out.error_bound


@pytest.mark.parametrize("stage", [SETUP, SHARE_KEYS, COLLECT, UNMASK])
def test_fewer_survivors_than_the_threshold_is_an_error_never_a_sum(rng, stage):
    vectors = {n: rng.uniform(-1, 1, 100) for n in range(1, 6)}  # t = 3
    with pytest.raises(SecAggError, match=rf"{stage}: 2 of 5 nodes answered, fewer than the threshold 3"):
        run(vectors, drop={stage: {1, 2, 3}})


def three_silos_up_to_collect(d, rng):
    """Three silos with random vectors of length ``d`` through setup and share-keys; their collect replies."""
    vectors = {n: rng.uniform(-1, 1, d) for n in range(1, 4)}
    params = SecAggParams(1, 2, QuantSpec(1.0, 32, 3), d, (1, 2, 3))
    server, clients = ServerProtocol(params), {n: ClientProtocol(n) for n in (1, 2, 3)}
    server.receive_keys({n: clients[n].setup(server.setup_payload()) for n in clients})
    server.receive_shares({n: c.share_keys(server.share_keys_payloads()[n]) for n, c in clients.items()})
    replies = {n: c.collect(server.collect_payloads()[n], vectors[n]) for n, c in clients.items()}
    return server, clients, replies


def test_a_silo_sending_random_words_gets_the_sum_refused_not_released(rng):
    server, clients, replies = three_silos_up_to_collect(1000, rng)
    replies[2] = {**replies[2], "masked": rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)}
    server.receive_masked(replies)
    with pytest.raises(SecAggError, match=r"unmask: total: \d+ of 1000 coordinates lie beyond ±S·r = ±3"):
        server.receive_unmask({n: c.unmask(server.unmask_payloads()[n]) for n, c in clients.items()})


def test_what_the_server_receives_from_a_silo_is_uncorrelated_with_its_vector(rng):
    d = 20_000
    vectors = {n: rng.uniform(-1, 1, d) for n in range(1, 5)}
    seen: dict = {}
    run(vectors, seen=seen)
    masked = seen[COLLECT][2]["masked"].astype(np.float64)
    corr = np.corrcoef(masked, vectors[2])[0, 1]
    # under independence corr ~ N(0, 1/d): |corr| < 5/sqrt(d) = 0.035 fails with probability < 1e-6
    assert abs(corr) < 5 / np.sqrt(d)
    # uniform on Z_2^32: mean 2^31 within 5 standard errors (2^32/sqrt(12 d))
    assert abs(masked.mean() - 2**31) < 5 * 2**32 / np.sqrt(12 * d)
    # the same statistic on the unmasked quantised vector finds the vector: the check can fail
    unmasked = (vectors[2] + 1.0) / 2.0
    assert np.corrcoef(unmasked, vectors[2])[0, 1] > 0.99
    # nothing else the server got from the silo carries data: public keys and ciphertexts only
    assert set(seen[SETUP][2]) == {"round", "pk1", "pk2"} and set(seen[SHARE_KEYS][2]) == {"round", "dsts", "ctxts"}


def test_a_client_refuses_to_reveal_both_shares_of_one_node(rng):
    server, clients, replies = three_silos_up_to_collect(10, rng)
    server.receive_masked(replies)
    with pytest.raises(SecAggError, match="both alive and dropped"):
        clients[1].unmask({"round": 1, "alive": [1, 2, 3], "dropped": [2]})
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[1].unmask({"round": 1, "alive": [1], "dropped": [2, 3]})


def test_stages_out_of_order_and_other_rounds_are_refused(rng):
    client = ClientProtocol(1)
    with pytest.raises(SecAggError, match="expected 'setup'"):
        client.share_keys({"round": 1, "ids": [], "pk1": [], "pk2": []})
    params = SecAggParams(4, 2, QuantSpec(1.0, 32, 2), 3, (1, 2))
    client.setup(params.to_payload())
    with pytest.raises(SecAggError, match="round 5 but node 1 runs round 4"):
        client.share_keys({"round": 5, "ids": [], "pk1": [], "pk2": []})


def test_client_state_survives_a_round_trip(rng):
    params = SecAggParams(2, 2, QuantSpec(1.0, 32, 3), 4, (1, 2, 3))
    clients = {n: ClientProtocol(n) for n in (1, 2, 3)}
    server = ServerProtocol(params)
    server.receive_keys({n: c.setup(server.setup_payload()) for n, c in clients.items()})
    server.receive_shares({n: c.share_keys(server.share_keys_payloads()[n]) for n, c in clients.items()})
    restored = ClientProtocol.from_state(clients[1].to_state())
    assert restored == clients[1]


@pytest.mark.parametrize(("threshold", "nodes"), [(1, (1, 2, 3)), (4, (1, 2, 3)), (2, (1,)), (2, (1, 1, 2))])
def test_bad_protocol_parameters_are_named(threshold, nodes):
    with pytest.raises(SecAggError, match="threshold|nodes"):
        SecAggParams(1, threshold, QuantSpec(1.0, 32, 5), 10, nodes)


def test_default_threshold_is_a_strict_majority():
    assert [default_threshold(n) for n in (2, 3, 4, 5, 20)] == [2, 2, 3, 3, 11]


def _settings(**strategy):
    cfg = AppConfig.from_run_config(load_default_run_config())
    return dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, **strategy))


def test_secure_aggregation_refuses_defences_that_read_single_updates():
    with pytest.raises(ConfigError) as err:
        check_compatible(
            _settings(aggregator="trimmed-mean", norm_action="reject", reject_opposed=True), secure_aggregation=True
        )
    message = str(err.value)
    for key in ("strategy.aggregator", "strategy.norm-action", "strategy.reject-opposed"):
        assert key in message


def test_secure_aggregation_with_plain_fedavg_is_accepted_and_off_means_no_check():
    check_compatible(_settings(aggregator="fedavg", norm_action="none", reject_opposed=False), secure_aggregation=True)
    check_compatible(_settings(aggregator="krum"), secure_aggregation=False)


def test_flowers_prg_folds_the_seed_to_32_bits_fedrecs_does_not():
    """Why common.secagg does not use flwr's pseudo_rand_gen (docs/secure-aggregation.md)."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from common.secagg.protocol import prg

    a, b = bytes(32), b"\x01\x02\x03\x04" * 2 + bytes(24)  # both XOR-fold to the same 32-bit seed (0)
    np.testing.assert_array_equal(pseudo_rand_gen(a, 2**32, [(8,)])[0], pseudo_rand_gen(b, 2**32, [(8,)])[0])
    assert not np.array_equal(prg(a, 8, np.uint32), prg(b, 8, np.uint32))
    np.testing.assert_array_equal(prg(b, 8, np.uint32), prg(b, 8, np.uint32))  # deterministic in the key
