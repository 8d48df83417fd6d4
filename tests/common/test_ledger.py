"""The hash-chained privacy ledger: append, verify, and detect every kind of tampering."""

import itertools
import json
from pathlib import Path

import pytest

from common.privacy.ledger import (
    GENESIS,
    Chain,
    LedgerError,
    LedgerFile,
    encode,
    line_hash,
    read_ledger,
)


def _ledger(path: Path, n: int = 5) -> LedgerFile:
    led = LedgerFile(path, "silo-0")
    for r in range(1, n + 1):
        led.append("dp-sgd", r, **{"noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10, "epsilon": 0.1 * r})
    return led


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{x}\n" for x in lines))


def test_appended_ledger_reads_back_verified_and_chained(tmp_path):
    led = _ledger(tmp_path / "l.jsonl")
    chain = read_ledger(tmp_path / "l.jsonl", "silo-0")
    assert len(chain) == 5 and chain.head == led.head
    events = chain.events("dp-sgd")
    assert [e["round"] for e in events] == [1, 2, 3, 4, 5]
    assert events[0]["prev"] == GENESIS
    lines = _lines(tmp_path / "l.jsonl")
    for before, after in itertools.pairwise(lines):
        assert json.loads(after)["prev"] == line_hash(before)
    assert {"dp-accounting", "opacus", "torch", "flwr"} <= set(events[0]["versions"])


def test_reopened_ledger_continues_the_chain(tmp_path):
    _ledger(tmp_path / "l.jsonl", 2)
    again = LedgerFile(tmp_path / "l.jsonl", "silo-0")
    again.append("budget-decline", 3, epsilon=0.2)
    assert len(read_ledger(tmp_path / "l.jsonl", "silo-0")) == 3


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_editing_a_line_is_detected_at_the_next_line(tmp_path, index):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    lines = _lines(path)
    event = json.loads(lines[index])
    event["noise-multiplier"] = 5.0
    lines[index] = encode(event)
    _write(path, lines)
    with pytest.raises(LedgerError) as info:
        read_ledger(path, "silo-0")
    assert info.value.line == index + 2 and f"line {index + 1} was edited" in str(info.value)


def test_editing_a_line_in_place_without_reencoding_is_detected(tmp_path):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    lines = _lines(path)
    lines[2] = lines[2].replace('"steps":10', '"steps": 1')
    _write(path, lines)
    with pytest.raises(LedgerError, match="line 3"):
        read_ledger(path, "silo-0")


@pytest.mark.parametrize("index", [0, 2, 3])
def test_deleting_a_line_is_detected_and_named(tmp_path, index):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    lines = _lines(path)
    del lines[index]
    _write(path, lines)
    with pytest.raises(LedgerError) as info:
        read_ledger(path, "silo-0")
    assert info.value.line == index + 1 and "seq" in info.value.reason


def test_reordering_lines_is_detected_and_named(tmp_path):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    with pytest.raises(LedgerError) as info:
        read_ledger(path, "silo-0")
    assert info.value.line == 2


def test_truncated_last_line_is_reported_not_dropped(tmp_path):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(LedgerError, match="line 5: last line is incomplete"):
        read_ledger(path, "silo-0")


def test_garbage_line_and_wrong_owner_are_named(tmp_path):
    path = tmp_path / "l.jsonl"
    _ledger(path, 2)
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(LedgerError, match="line 3: not valid JSON"):
        read_ledger(path, "silo-0")
    _ledger(tmp_path / "m.jsonl", 1)
    with pytest.raises(LedgerError, match="owner"):
        read_ledger(tmp_path / "m.jsonl", "silo-1")


def test_extend_rejects_lines_that_do_not_continue_the_chain_and_writes_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    led = _ledger(path, 2)
    before = path.read_bytes()
    other = Chain("silo-0")
    other.append("dp-sgd", 1, epsilon=9.0)
    with pytest.raises(LedgerError):
        led.extend(other.lines)
    assert path.read_bytes() == before and len(led) == 2
    # Lines chained to the real head are accepted.
    follower = Chain("silo-0", led.chain.lines)
    new = follower.append("dp-sgd", 3, epsilon=0.3)
    led.extend([new])
    assert len(read_ledger(path, "silo-0")) == 3


def test_replay_fails_a_ledger_whose_delta_is_not_below_one_over_n(tmp_path):
    """The audit refuses δ ≥ 1/N (a mechanism that publishes one unit's data is allowed there)."""
    from common.privacy.accounting import epsilon
    from common.privacy.events import MechanismUse, PrivacyRelease
    from common.privacy.replay import replay

    def chain(population: int):
        c = Chain("silo-0")
        c.append_release(
            PrivacyRelease(
                owner="silo-0", server_round=1, kind="dp-sgd", unit="user", accountant="rdp", delta=0.01,
                delta_rule="configured", epsilon=epsilon([MechanismUse(1.0, 0.1, 10)], 0.01, "rdp"),
                target_epsilon=0.0, noise_multiplier=1.0, sample_rate=0.1, clip=1.0, population=population,
                steps=10, total_steps=10, rounds_trained=1, released="shared model",
            )
        )
        return c

    ok: list = []
    replay(chain(50), tmp_path / "a", ok, {}, "metrics.jsonl")  # 1/N = 0.02 > δ
    assert ok == []
    bad: list = []
    replay(chain(100), tmp_path / "b", bad, {}, "metrics.jsonl")  # 1/N = 0.01 = δ
    assert [p.category for p in bad] == ["overrun"] and "not below 1/N = 0.01" in bad[0].message
