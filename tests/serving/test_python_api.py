"""The walk-through of docs/python-api.md runs as written (simulate -> load -> recommend)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_python_api_walkthrough_runs(tmp_path, monkeypatch, capsys):
    text = (REPO / "docs" / "python-api.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "test HR@10 after the last round:" in out and "new user:" in out and "centralized test HR@10:" in out
    assert (tmp_path / "runs" / "notebook" / "final.npz").is_file()
    assert (tmp_path / "runs" / "notebook-centralized" / "final.npz").is_file()
