"""`fedrec simulate`'s cluster and GPU options, and its progress display."""

from __future__ import annotations

import io
import json
import socket

import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json
from rich.console import Console

from cli.progress import RunProgress, eta_text, rounds_done
from cli.simulate import check_local_gpu, check_ray_address, federation_config
from common.errors import ConfigError


def _as_flower_reads_it(text: str):
    """What `flwr run --federation-config TEXT` sends to the SuperLink (Flower's own parsing)."""
    values = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    return simulation_config_from_json(values)


def test_gpus_per_client_reaches_flowers_client_resources() -> None:
    sim = _as_flower_reads_it(federation_config(8, 2, 0.25))
    assert sim.num_supernodes == 8
    assert sim.client_resources_num_cpus == 2
    assert sim.client_resources_num_gpus == pytest.approx(0.25)
    whole = _as_flower_reads_it(federation_config(3, 1, 1.0))
    assert whole.client_resources_num_gpus == pytest.approx(1.0)


def test_no_gpus_leaves_flowers_default() -> None:
    text = federation_config(3, 1, 0.0)
    assert "gpus" not in text
    assert not _as_flower_reads_it(text).HasField("client_resources_num_gpus")
    with pytest.raises(ConfigError, match="--gpus-per-client must be >= 0"):
        federation_config(3, 1, -0.5)


def test_gpus_without_cuda_is_refused(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--gpus-per-client 0.5: this machine has no CUDA device"):
        check_local_gpu(0.5)


def test_ray_address_must_be_host_port_with_a_listener() -> None:
    for bad in ("nohost", "ray://1.2.3.4:10001", ":6379", "host:port"):
        with pytest.raises(ConfigError, match="expected host:port"):
            check_ray_address(bad)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"--ray-address 127.0.0.1:{port}: no Ray head answers there"):
        check_ray_address(f"127.0.0.1:{port}")
    check_ray_address(None)
    check_ray_address("auto")


def test_rounds_done_reads_the_largest_completed_round(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    assert rounds_done(metrics) == 0  # not there yet
    metrics.write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n" + '{"round": 3')
    assert rounds_done(metrics) == 2  # the half-written line does not count


def test_eta_from_mean_round_time() -> None:
    assert eta_text(0.0, 0, 5) == "ETA ?"
    assert eta_text(20.0, 2, 3) == "ETA 30s"
    assert eta_text(100.0, 1, 2) == "ETA 3m20s"


def test_plain_progress_lines_when_not_a_terminal(tmp_path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    metrics = tmp_path / "metrics.jsonl"
    now = [0.0]
    with RunProgress(console, total_rounds=4, metrics=metrics, clock=lambda: now[0]) as progress:
        progress.phase("starting the SuperLink")
        progress._rounds_started = 0.0  # as watch() sets it, without the polling thread
        now[0] = 10.0
        metrics.write_text(json.dumps({"round": 1}) + "\n")
        progress.poll()
        now[0] = 20.0
        metrics.write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
        progress.poll()
        progress.poll()  # nothing new: no line
        now[0] = 21.0
        metrics.write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
        progress.poll()  # later rounds' ETA from the end of round 1 (it paid for start-up): 5.5 s per round
    lines = out.getvalue().splitlines()
    assert lines == [
        "… starting the SuperLink",
        "round 1/4 done, 10 s elapsed, ETA 30s",
        "round 2/4 done, 20 s elapsed, ETA 20s",
        "round 3/4 done, 21 s elapsed, ETA 6s",
    ]


def test_terminal_progress_draws_a_bar(tmp_path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"round": 1}) + "\n")
    with RunProgress(console, total_rounds=2, metrics=metrics) as progress:
        progress.phase("starting Ray and 3 clients")
        progress.poll()
    text = out.getvalue()
    assert "1/2" in text and "rounds" in text and "━" in text
