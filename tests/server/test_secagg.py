"""Secure sums over fedrec's in-process Grid, through the real ClientApp's ``query.secagg`` handler."""

import numpy as np
import pytest
from flwr.app import Message

from client.app import app as client_app
from client.secagg import STATE_INPUT, STATE_PROTOCOL, stage_input
from common.run_config import load_default_run_config
from common.secagg import wire
from common.secagg.protocol import COLLECT, SHARE_KEYS, UNMASK, SecAggError
from common.secagg.quantize import QuantSpec
from server.secagg import secure_sum
from tests.fakes import LocalGrid


def _grid(num_nodes, d, rng, server_round=1, drop=None, on_reply=None):
    grid = LocalGrid(client_app, load_default_run_config(), num_nodes, on_reply=on_reply, drop=drop)
    vectors = {n: rng.uniform(-1, 1, d) for n in grid.contexts}
    for n, context in grid.contexts.items():
        stage_input(context, server_round, vectors[n])
    return grid, vectors


def _stage(msg: Message) -> str:
    return wire.decode(msg.content, "test")[0]


@pytest.mark.parametrize("num_nodes", [3, 5])
def test_secure_sum_equals_the_plain_sum_within_the_bound(rng, num_nodes):
    grid, vectors = _grid(num_nodes, 2000, rng)
    out = secure_sum(grid, list(grid.contexts), quant=QuantSpec(1.0, 32, num_nodes), vector_length=2000, server_round=1)
    assert out.survivors == tuple(range(1, num_nodes + 1)) and out.dropped == {}
    assert np.abs(out.total - sum(vectors.values())).max() < out.error_bound
    for context in grid.contexts.values():  # keys, shares and the vector are gone once the sum is done
        assert STATE_PROTOCOL not in context.state.config_records and STATE_INPUT not in context.state.array_records


def test_a_silo_beyond_the_range_says_so_and_the_sum_still_holds_it(rng, caplog):
    grid, vectors = _grid(3, 100, rng)
    vectors[2] = vectors[2] * 1.5  # beyond r = 1, within S·r = 3 in total
    stage_input(grid.contexts[2], 1, vectors[2])
    with caplog.at_level("WARNING", logger="flwr"):
        out = secure_sum(grid, [1, 2, 3], quant=QuantSpec(1.0, 32, 3), vector_length=100, server_round=1)
    assert np.abs(out.total - sum(vectors.values())).max() < out.error_bound  # not clipped
    beyond = int(np.sum(np.abs(vectors[2]) > 1.0))
    assert beyond > 0 and f"{beyond} of this silo's 100 coordinates lie beyond the range r = 1" in caplog.text


def test_the_masked_vector_on_the_wire_is_uncorrelated_with_the_silos_vector(rng):
    d = 20_000
    replies = []
    grid, vectors = _grid(4, d, rng, on_reply=replies.append)
    secure_sum(grid, [1, 2, 3, 4], quant=QuantSpec(1.0, 32, 4), vector_length=d, server_round=1)
    (masked,) = [
        wire.decode(r.content, "test")[1]["masked"]
        for r in replies
        if _stage(r) == COLLECT and r.metadata.src_node_id == 3
    ]
    assert masked.dtype == np.uint32 and masked.size == d
    # under independence the correlation is N(0, 1/d): 5 standard errors
    assert abs(np.corrcoef(masked.astype(np.float64), vectors[3])[0, 1]) < 5 / np.sqrt(d)


def test_a_silo_dropping_mid_round_after_sharing_keys_leaves_the_sum_of_the_others(rng):
    grid, vectors = _grid(5, 1000, rng, drop=lambda node, msg: node == 2 and _stage(msg) == COLLECT)
    out = secure_sum(grid, [1, 2, 3, 4, 5], quant=QuantSpec(1.0, 32, 5), vector_length=1000, server_round=1)
    assert out.survivors == (1, 3, 4, 5) and out.dropped == {COLLECT: (2,)}
    assert np.abs(out.total - sum(vectors[n] for n in (1, 3, 4, 5))).max() < out.error_bound


def test_too_few_survivors_is_an_error_and_no_sum(rng):
    grid, _ = _grid(5, 100, rng, drop=lambda node, msg: node in (1, 2, 3) and _stage(msg) == SHARE_KEYS)
    with pytest.raises(SecAggError, match="share-keys: 2 of 5 nodes answered, fewer than the threshold 3"):
        secure_sum(grid, [1, 2, 3, 4, 5], quant=QuantSpec(1.0, 32, 5), vector_length=100, server_round=1)


def test_a_silo_without_a_vector_for_the_round_is_dropped_not_summed(rng):
    grid, vectors = _grid(4, 100, rng, server_round=7)
    stage_input(grid.contexts[4], 6, vectors[4])  # stale: staged for another round
    out = secure_sum(grid, [1, 2, 3, 4], quant=QuantSpec(1.0, 32, 4), vector_length=100, server_round=7)
    assert out.survivors == (1, 2, 3) and out.dropped == {COLLECT: (4,)}
    assert np.abs(out.total - vectors[1] - vectors[2] - vectors[3]).max() < out.error_bound


def test_a_wrong_length_vector_makes_that_silo_drop(rng):
    grid, vectors = _grid(3, 50, rng)
    stage_input(grid.contexts[1], 1, np.zeros(49))
    out = secure_sum(grid, [1, 2, 3], quant=QuantSpec(1.0, 32, 3), vector_length=50, server_round=1)
    assert out.survivors == (2, 3)


def test_one_distributed_dp_round_end_to_end(rng):
    """Poisson-sample users in each silo, clip, add noise shares, secure-sum, divide by q·N_total."""
    from common.privacy import distributed as dd
    from common.secagg.quantize import range_for

    silos, users_per_silo, d, clip, t = 4, 50, 300, 1.0, 1
    q = dd.sample_rate(40, silos * users_per_silo)  # 40 expected users of 200
    deltas = {n: rng.normal(0, 0.5, (users_per_silo, d)) for n in range(1, silos + 1)}

    def run_round(sigma, seed):
        share = dd.noise_share_std(sigma, clip, silos, t)
        grid = LocalGrid(client_app, load_default_run_config(), silos)
        clipped_sum = np.zeros(d)
        for n, context in grid.contexts.items():
            local = np.random.default_rng([seed, n])
            picked = dd.poisson_sample(users_per_silo, q, local)
            clipped_sum += sum((dd.clip_to_norm(deltas[n][u], clip) for u in picked), np.zeros(d))
            stage_input(context, 1, dd.silo_contribution((deltas[n][u] for u in picked), d, clip, share, local))
        r = range_for(clip * users_per_silo, share, d)
        out = secure_sum(grid, list(grid.contexts), quant=QuantSpec(r, 32, silos), vector_length=d, server_round=1)
        return dd.server_average(out.total, q * silos * users_per_silo), clipped_sum / 40, out.error_bound / 40

    released, expected, bound = run_round(0.0, 1)
    assert np.abs(released - expected).max() < bound  # no noise: exactly the clipped average up to quantisation
    assert np.abs(expected).max() > 0.01  # and that average is not trivially zero
    noisy, expected, _ = run_round(2.0, 2)
    # all 4 silos present: noise std σC·sqrt(S/(S−T)) / (q·N) = 2·sqrt(4/3)/40 = 0.0577; 300 coordinates,
    # relative standard error of the sample std 1/sqrt(600) = 4%; tolerance 15%
    assert np.std(noisy - expected) == pytest.approx(2.0 * np.sqrt(4 / 3) / 40, rel=0.15)


def test_before_unmask_runs_after_collect_and_before_any_unmask_message_with_the_sums_members(rng):
    # Arrange: node 2 stops at collect (not in the sum), node 5 at unmask (its masked vector is in)
    sent: list[str] = []

    def drop(node, msg):
        sent.append(_stage(msg))
        return (node == 2 and _stage(msg) == COLLECT) or (node == 5 and _stage(msg) == UNMASK)

    grid, vectors = _grid(5, 200, rng, drop=drop)
    seen = []

    def before_unmask(survivors, dropped):
        seen.append((survivors, dict(dropped), list(sent)))

    # Act
    out = secure_sum(grid, [1, 2, 3, 4, 5], quant=QuantSpec(1.0, 32, 5), vector_length=200, server_round=1,
                     before_unmask=before_unmask)  # fmt: skip
    # Assert: called once, when every collect message but no unmask message had gone out
    ((survivors, dropped, sent_then),) = seen
    assert survivors == (1, 3, 4, 5) == out.survivors and dropped == {COLLECT: (2,)}
    assert sent_then.count(COLLECT) == 5 and UNMASK not in sent_then and UNMASK in sent
    assert out.dropped == {COLLECT: (2,), UNMASK: (5,)}
    assert np.abs(out.total - sum(vectors[n] for n in (1, 3, 4, 5))).max() < out.error_bound


def test_a_failing_before_unmask_stops_the_sum_before_any_unmask_message(rng):
    sent: list[str] = []
    grid, _ = _grid(3, 20, rng, drop=lambda node, msg: sent.append(_stage(msg)) or False)

    def refuse(survivors, dropped):
        raise RuntimeError("the ledger could not be written")

    with pytest.raises(RuntimeError, match="ledger could not be written"):
        secure_sum(grid, [1, 2, 3], quant=QuantSpec(1.0, 32, 3), vector_length=20, server_round=1,
                   before_unmask=refuse)  # fmt: skip
    assert UNMASK not in sent and sent.count(COLLECT) == 3
