"""The GPU check refuses clearly, with exit code 1, where there is no CUDA device."""

import torch

from benchmarks.gpu_check import main


def test_without_cuda_the_check_fails_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main() == 1
    assert "gpu_check: FAILED — no CUDA device" in capsys.readouterr().err
