"""GPU paths of fedrec on CUDA, with a short benchmark (``benchmarks/gpu_check.sh`` runs this).

    python -m benchmarks.gpu_check            # fails (exit 1) with a clear message without CUDA

Checks, each on ``cuda`` against the same computation on the CPU:

1. plain training steps (``common.training.train_epochs``) run on CUDA and leave
   the model's parameters on CUDA;
2. the DP step (:class:`common.privacy.dpsgd.SparseDPSGD`) with clipping and noise
   from a CUDA generator, its per-sample norms equal to the CPU's (rtol 1e-4);
3. full-ranking evaluation (:func:`common.evaluation.evaluation_sums`) on CUDA gives
   the CPU's hit counts (ranks can differ only on float ties) and a NeuMF block
   within the memory budget;
then times the DP step (MF and NeuMF, B = 1024, 1+4 items, 3,706 and 1M items) and
NeuMF full ranking (2,000 users x 20,000 items) on CUDA and prints a table.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch


def _sync() -> None:
    torch.cuda.synchronize()


def _timed(step, repeats: int) -> float:  # noqa: ANN001
    for _ in range(3):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync()
    return (time.perf_counter() - start) / repeats * 1000


def _dp_engine(model, device, seed=0):  # noqa: ANN001, ANN202
    from common.privacy.dpsgd import SparseDPSGD

    return SparseDPSGD(
        model, noise_multiplier=1.0, clip=1.0, lr=0.05, expected_batch_size=1024,
        private_tables=model.user_tables, private_lr=0.05,
        generator=torch.Generator(device=device).manual_seed(seed),
    )


def check_dp_step(name: str, items: int, device: torch.device) -> tuple[float, float]:
    """Per-sample norms on CUDA equal the CPU's; returns (CUDA ms/step, CPU ms/step)."""
    from torch.nn.functional import binary_cross_entropy_with_logits

    from common.models import build_model

    users = 6040 if items <= 10_000 else 10_000
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, users, (1024,), generator=g)
    i = torch.randint(0, items, (1024, 5), generator=g)
    labels = torch.zeros(1024, 5)
    labels[:, 0] = 1
    times, norms = [], []
    for dev in (device, torch.device("cpu")):
        torch.manual_seed(0)
        model = build_model(name, users, items, 64, (128, 64, 32)).to(dev)  # type: ignore[arg-type]
        engine = _dp_engine(model, dev)
        uu, ii, ll = u.to(dev), i.to(dev), labels.to(dev)

        def loss(rows, model=model, ll=ll):  # noqa: ANN001, ANN202
            return binary_cross_entropy_with_logits(model.score_rows(rows), ll, reduction="none").sum(1)

        engine.step(uu, ii, loss)
        norms.append(engine.last_norms.cpu())
        if dev.type == "cuda":
            times.append(_timed(lambda engine=engine, uu=uu, ii=ii, loss=loss: engine.step(uu, ii, loss), 20))
        else:
            start = time.process_time()
            for _ in range(5):
                engine.step(uu, ii, loss)
            times.append((time.process_time() - start) / 5 * 1000)
        assert next(model.parameters()).device.type == dev.type
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=1e-6)
    return times[0], times[1]


def check_training(device: torch.device) -> None:
    """train_epochs on CUDA keeps the model there and lowers the loss like the CPU."""
    from benchmarks.eval_memory import synthetic_split
    from common.config import AppConfig
    from common.models import build_model
    from common.run_config import load_default_run_config
    from common.training import train_epochs

    cfg = AppConfig.from_run_config(load_default_run_config())
    split = synthetic_split(200, 500)
    torch.manual_seed(0)
    model = build_model("mf", 200, 500, 16).to(device)
    stats = train_epochs(model, split, cfg.train, epochs=2, rng=np.random.default_rng(0), device=device)
    assert next(model.parameters()).device.type == "cuda"
    print(f"training on CUDA: 2 epochs, stats {stats}")


def check_evaluation(device: torch.device) -> float:
    """NeuMF full ranking on CUDA equals the CPU's hits; returns CUDA seconds at 2k x 20k."""
    from benchmarks.eval_memory import synthetic_split
    from common.evaluation import EvalProtocol, evaluation_sums
    from common.models import build_model

    split = synthetic_split(300, 3000)
    pop = np.bincount(split.train_item, minlength=3000).astype(np.float64)
    sums = []
    for dev in (device, torch.device("cpu")):
        torch.manual_seed(0)
        model = build_model("neumf", 300, 3000, 64).to(dev)
        sums.append(evaluation_sums(model, split, EvalProtocol(memory_mb=64), pop, dev))
    for key in ("test-hits@10", "val-hits@10", "test-full-recall@10", "test-full-recall@20"):
        diff = abs(float(sums[0][key]) - float(sums[1][key]))  # type: ignore[arg-type]
        assert diff <= 1, (key, sums[0][key], sums[1][key])  # float ties only
    big = synthetic_split(2000, 20_000)
    pop = np.bincount(big.train_item, minlength=20_000).astype(np.float64)
    model = build_model("neumf", 2000, 20_000, 64).to(device)
    torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    evaluation_sums(model, big, EvalProtocol(), pop, device)
    _sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"NeuMF full ranking 2,000 x 20,000 on CUDA: {seconds:.1f} s, peak CUDA memory {peak:.0f} MiB")
    return seconds


def main() -> int:
    """Run the checks; exit 1 with a clear message when CUDA is missing or a check fails."""
    if not torch.cuda.is_available():
        print("gpu_check: FAILED — no CUDA device (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    device = torch.device("cuda")
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    check_training(device)
    rows = []
    for name, items in (("mf", 3706), ("mf", 1_000_000), ("neumf", 3706), ("neumf", 1_000_000)):
        cuda_ms, cpu_ms = check_dp_step(name, items, device)
        rows.append((name, items, cuda_ms, cpu_ms))
    seconds = check_evaluation(device)
    print("\n| model | items | DP step CUDA ms | DP step CPU ms (1 thread) | CPU / CUDA |")
    print("|---|---:|---:|---:|---:|")
    for name, items, cuda_ms, cpu_ms in rows:
        print(f"| {name} | {items:,} | {cuda_ms:.2f} | {cpu_ms:.1f} | {cpu_ms / cuda_ms:.1f}× |")
    print(f"\nNeuMF full ranking, 2,000 users x 20,000 items, CUDA: {seconds:.1f} s")
    print("gpu_check: OK (training, DP step, evaluation on CUDA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
