"""σ calibration is solved once per distinct input and then read from the on-disk cache."""

from __future__ import annotations

import threading
import time

from common.privacy.accounting import calibrate_noise
from common.privacy.calibration_cache import calibrated
from common.privacy.events import MechanismUse


class CountingSolver:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple] = []
        self.delay = delay
        self.__module__ = "tests"
        self.__qualname__ = "CountingSolver"

    def __call__(self, q: float, steps: int, eps: float, delta: float, accountant: str = "pld", extra=()) -> float:
        self.calls.append((q, steps, eps, delta, accountant, extra))
        time.sleep(self.delay)
        return 0.5 + q + steps / 1000 + eps / 10  # a distinct value per input


def test_second_calibration_with_identical_inputs_does_not_call_the_solver(tmp_path) -> None:
    solver, said = CountingSolver(), []
    first = calibrated(solver, said.append, tmp_path)(0.01, 300, 2.0, 1e-5, "pld")
    # Act: a fresh wrapper (another silo, another run) with the same inputs
    second = calibrated(solver, said.append, tmp_path)(0.01, 300, 2.0, 1e-5, "pld")
    assert second == first == 0.5 + 0.01 + 0.3 + 0.2
    assert len(solver.calls) == 1
    assert said[0].startswith("σ calibration: cache miss") and said[1].startswith("σ calibration: cache hit")


def test_every_input_is_part_of_the_key(tmp_path) -> None:
    solver = CountingSolver()
    run = calibrated(solver, lambda _: None, tmp_path)
    base = (0.01, 300, 2.0, 1e-5, "pld")
    run(*base)
    variants = [
        (0.01 + 1e-12, 300, 2.0, 1e-5, "pld"),  # floats keyed exactly, not rounded
        (0.01, 301, 2.0, 1e-5, "pld"),
        (0.01, 300, 2.5, 1e-5, "pld"),
        (0.01, 300, 2.0, 1e-6, "pld"),
        (0.01, 300, 2.0, 1e-5, "rdp"),
    ]
    for args in variants:
        run(*args)
    run(*base, extra=(MechanismUse(5.0, 1.0, 1),))  # planned noisy evaluations
    assert len(solver.calls) == 1 + len(variants) + 1
    run(*base)
    assert len(solver.calls) == 1 + len(variants) + 1  # still a hit


def test_concurrent_silos_solve_once(tmp_path) -> None:
    solver = CountingSolver(delay=0.3)
    results: list[float] = []
    threads = [
        threading.Thread(target=lambda: results.append(calibrated(solver, lambda _: None, tmp_path)(0.02, 10, 1.0, 1e-5)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(solver.calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path) -> None:
    solver = CountingSolver()
    run = calibrated(solver, lambda _: None, tmp_path)
    run(0.01, 300, 2.0, 1e-5)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text("{not json")
    assert run(0.01, 300, 2.0, 1e-5) == 0.5 + 0.01 + 0.3 + 0.2
    assert len(solver.calls) == 2
    run(0.01, 300, 2.0, 1e-5)
    assert len(solver.calls) == 2
    assert not list(tmp_path.glob("*.tmp"))  # written by rename, no leftovers


def test_the_real_solver_cached_returns_its_own_value(tmp_path) -> None:
    direct = calibrate_noise(0.05, 100, 3.0, 1e-5, "rdp")
    run = calibrated(calibrate_noise, lambda _: None, tmp_path)
    assert run(0.05, 100, 3.0, 1e-5, "rdp") == direct
    assert run(0.05, 100, 3.0, 1e-5, "rdp") == direct
