"""A run directory is never written by two commands at once, and what it holds survives.

A second command on a directory in use, a read-only or full disk and an option out of
range all fail with a clear message (exit code 2, no traceback) naming the directory,
file or option, and leave every file already there byte-identical.
"""

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from common.rundir import RunDir, RunDirError
from deployment.launcher import write_run_config
from deployment.processes import processes_using

runner = CliRunner()

SMALL = ["-c", "data.synthetic.num-users=60", "-c", "data.synthetic.num-items=200"]
ENOSPC = os.strerror(errno.ENOSPC)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _saved_run(run_dir: Path) -> dict[str, bytes]:
    """A directory holding a finished round of an earlier run; returns its files."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "seconds": 1.0}) + "\n")
    (run_dir / "state.json").write_text(json.dumps({"last-completed-round": 1}) + "\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "round-0001.npz").write_bytes(b"\x93NUMPY not really")
    return _files(run_dir)


def _resumable_run(run_dir: Path) -> dict[str, bytes]:
    """A saved simulation that ``--resume`` accepts up to launching Flower."""
    from common.run_config import load_default_run_config

    _saved_run(run_dir)
    run_config = {**load_default_run_config(), "data.synthetic.num-users": 60, "data.synthetic.num-items": 200}
    run_config.update({"num-server-rounds": 3, "run-dir": str(run_dir)})
    (run_dir / "config.json").write_text(json.dumps({"run-config": run_config, "run-uid": "u1", "versions": {}}))
    (run_dir / "simulation.json").write_text(json.dumps({"clients": 2}) + "\n")
    return _files(run_dir)


def _fail_os_open(monkeypatch: pytest.MonkeyPatch, error: int, match: Callable[[str], bool]) -> None:
    """Make ``os.open`` (files, locks, atomic writes' temporary files) fail for matching paths."""
    real = os.open

    def fake(path: str | os.PathLike[str], flags: int, *args: object, **kwargs: object) -> int:
        if match(os.fspath(path)):
            raise OSError(error, os.strerror(error), os.fspath(path))
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake)


def _error_line(result: Result) -> str:
    return " ".join(result.output.split())  # rich may break a long line; compare words


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A run directory (with an earlier run's files) whose lock this test holds."""
    run_dir = tmp_path / "run"
    _resumable_run(run_dir)
    with RunDir(run_dir).locked():
        yield run_dir


# ------------------------------------------------------------------ the lock


def test_the_lock_is_exclusive_and_names_the_holder(tmp_path: Path):
    # Arrange
    run = RunDir(tmp_path / "run")
    # Act / Assert
    with run.locked():
        assert run.lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunDirError, match=rf"is in use by another fedrec process \(pid {os.getpid()}\)"):
            with run.locked():
                pass
    with run.locked():  # released on exit
        pass


@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "--silos", "2", *SMALL],
        ["deploy", "local", "--silos", "2", *SMALL],
        ["centralized", "--model", "popularity", *SMALL],
    ],
    ids=["simulate", "deploy-local", "centralized"],
)
def test_a_run_directory_in_use_is_refused_and_left_as_it_is(held: Path, command: list[str]):
    # Arrange
    before = _files(held)
    # Act
    result = runner.invoke(app, [*command, "--run-dir", str(held)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{held} is in use by another fedrec process (pid {os.getpid()})" in _error_line(result)
    assert "Traceback" not in result.output
    assert _files(held) == before


def test_resume_of_a_run_directory_in_use_writes_nothing(held: Path):
    # Arrange
    before = _files(held)
    # Act
    result = runner.invoke(app, ["simulate", "--resume", str(held)])
    # Assert
    assert result.exit_code == 2, result.output
    assert "is in use by another fedrec process" in _error_line(result)
    assert _files(held) == before
    assert not RunDir(held).resume_overrides.exists()


# ------------------------------------------------------------------ read-only and full disks


def test_a_read_only_file_system_is_a_clear_error(tmp_path: Path, monkeypatch):
    # Arrange: the run directory's parent is on a read-only file system (EROFS). A real
    # chmod 0555 directory does not stop root, who runs CI here, so the error is injected.
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "kept.txt").write_text("earlier results\n")
    run_dir = parent / "run"
    real_mkdir = Path.mkdir
    message = os.strerror(errno.EROFS)

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == run_dir:
            raise OSError(errno.EROFS, message, str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    # Act
    result = runner.invoke(app, ["simulate", "--silos", "2", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir}: cannot write ({message})" in _error_line(result)
    assert (parent / "kept.txt").read_text() == "earlier results\n"


def test_a_full_disk_when_creating_the_run_directory_is_a_clear_error(tmp_path: Path, monkeypatch):
    # Arrange
    run_dir = tmp_path / "run"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == run_dir:
            raise OSError(errno.ENOSPC, ENOSPC, str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    # Act
    result = runner.invoke(app, ["centralized", "--model", "popularity", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir}: cannot write ({ENOSPC})" in _error_line(result)
    assert not run_dir.exists()


def test_a_full_disk_for_the_lock_file_is_a_clear_error(tmp_path: Path, monkeypatch):
    # Arrange: a directory with an earlier run's files
    run_dir = tmp_path / "other"
    before = _saved_run(run_dir)
    _fail_os_open(monkeypatch, errno.ENOSPC, lambda p: p.endswith("fedrec.lock"))
    # Act
    result = runner.invoke(app, ["simulate", "--silos", "2", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir / 'fedrec.lock'}: cannot write ({ENOSPC})" in _error_line(result)
    assert _files(run_dir) == before


def test_a_full_disk_for_the_credentials_keeps_the_existing_ca_and_starts_nothing(tmp_path: Path, monkeypatch):
    # Arrange: the CA of an earlier deployment is already there
    from deployment.pki import create_ca

    run_dir = tmp_path / "run"
    create_ca(run_dir / "credentials")
    before = _files(run_dir)
    _fail_os_open(monkeypatch, errno.ENOSPC, lambda p: Path(p).name.startswith(".server.key."))
    # Act
    result = runner.invoke(app, ["deploy", "local", "--silos", "2", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir / 'credentials' / 'server.key'}: cannot write ({ENOSPC})" in _error_line(result)
    after = _files(run_dir)
    assert {k: after[k] for k in before} == before  # the CA is byte-identical
    assert not (run_dir / "credentials" / "server.key").exists()
    assert not any(".server.key." in name for name in after)  # no temporary file left
    assert not (run_dir / "logs" / "superlink.log").exists()  # no SuperLink started


def test_a_full_disk_for_the_superlink_log_is_a_clear_error_and_starts_nothing(tmp_path: Path, monkeypatch):
    # Arrange
    run_dir = tmp_path / "run"
    real_open = Path.open

    def open_(self: Path, mode: str = "r", *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self.name == "superlink.log" and "w" in mode:
            raise OSError(errno.ENOSPC, ENOSPC, str(self))
        return real_open(self, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", open_)
    # Act
    result = runner.invoke(app, ["simulate", "--silos", "2", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir / 'flower' / 'superlink.log'}: cannot write ({ENOSPC})" in _error_line(result)
    assert processes_using(str(run_dir)) == []
    assert not RunDir(run_dir).holds_run()


def test_a_full_disk_for_the_resume_settings_leaves_the_saved_run_intact(tmp_path: Path, monkeypatch):
    # Arrange
    run_dir = tmp_path / "run"
    before = _resumable_run(run_dir)
    _fail_os_open(monkeypatch, errno.ENOSPC, lambda p: Path(p).name.startswith(".resume-overrides.toml."))
    # Act
    result = runner.invoke(app, ["simulate", "--resume", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir / 'resume-overrides.toml'}: cannot write ({ENOSPC})" in _error_line(result)
    after = _files(run_dir)
    assert {k: after[k] for k in before} == before
    assert set(after) == {*before, "fedrec.lock"}


def test_a_run_config_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    # Arrange
    path = tmp_path / "run-config.toml"
    write_run_config(path, {"num-server-rounds": 3})
    before = path.read_bytes()
    _fail_os_open(monkeypatch, errno.ENOSPC, lambda p: Path(p).name.startswith(".run-config.toml."))
    # Act
    with pytest.raises(OSError, match=ENOSPC) as caught:
        write_run_config(path, {"num-server-rounds": 5})
    # Assert
    assert caught.value.filename == str(path)
    assert path.read_bytes() == before


def test_a_full_disk_while_centralized_writes_its_run_directory_keeps_no_partial_file(tmp_path: Path, monkeypatch):
    # Arrange: centralized writes a simulation's run directory (RunRecorder); config.json comes first
    run_dir = tmp_path / "run"
    _fail_os_open(monkeypatch, errno.ENOSPC, lambda p: Path(p).name.startswith(".config.json."))
    # Act
    result = runner.invoke(app, ["centralized", "--model", "popularity", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir / 'config.json'}: cannot write ({ENOSPC})" in _error_line(result)
    assert sorted(_files(run_dir)) == ["fedrec.lock"]


def test_a_full_disk_for_the_flwr_run_log_is_reported_and_the_output_still_read(tmp_path: Path, monkeypatch):
    # Arrange: a stand-in for `flwr` that prints three lines; its log is /dev/full
    import deployment.launcher as launcher

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\necho one\necho two\necho three\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(launcher, "flower_bin", lambda name: str(fake))
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Act
    run = launcher.start_flwr_run(home, log=Path("/dev/full"))
    code = run.wait(30)
    # Assert
    assert code == 0
    assert run.log_error == f"/dev/full: cannot write ({ENOSPC}); the log stops here"
    assert "".join(run.lines) == f"ERROR: {run.log_error}\none\ntwo\nthree\n"  # nothing lost on screen


# ------------------------------------------------------------------ nothing overwritten


def test_centralized_refuses_a_run_directory_that_holds_a_run(tmp_path: Path):
    # Arrange
    run_dir = tmp_path / "run"
    before = _saved_run(run_dir)
    # Act
    result = runner.invoke(app, ["centralized", "--model", "popularity", *SMALL, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"{run_dir} already holds a run (metrics.jsonl exists)" in _error_line(result)
    after = _files(run_dir)
    assert {k: after[k] for k in before} == before


def test_centralized_writes_whole_lines_and_a_summary(tmp_path: Path):
    # Act
    result = runner.invoke(app, ["centralized", "--epochs", "2", *SMALL, "-c", "model.dim=4",
                                 "--run-dir", str(tmp_path / "run")])
    # Assert
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]  # round records, one per epoch
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best-epoch"] in (1, 2)


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["centralized", "--epochs", "0"], "--epochs"),
        (["centralized", "--epochs", "-1"], "--epochs"),
        (["simulate", "--silos", "0"], "--silos"),
        (["simulate", "--silos", "-3"], "--silos"),
        (["simulate", "--rounds", "0"], "--rounds"),
        (["simulate", "--cpus-per-client", "0"], "--cpus-per-client"),
        (["simulate", "--cpus-per-client", "-1"], "--cpus-per-client"),
        (["deploy", "local", "--silos", "0"], "--silos"),
        (["deploy", "local", "--rounds", "-2"], "--rounds"),
        (["deploy", "local", "--superexec-poll", "0"], "--superexec-poll"),
    ],
)
def test_zero_or_negative_counts_are_refused_naming_the_option(tmp_path: Path, command: list[str], option: str):
    # Arrange: an earlier run's files
    run_dir = tmp_path / "run"
    before = _saved_run(run_dir)
    # Act
    result = runner.invoke(app, [*command, "--run-dir", str(run_dir)])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert _files(run_dir) == before


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--silos", "0"], "--silos"),
        (["--silos", "2", "--seed", "-1"], "--seed"),
        (["--silos", "2", "--eval-negatives", "0"], "--eval-negatives"),
    ],
)
def test_data_prepare_refuses_out_of_range_counts_naming_the_option(tmp_path: Path, args: list[str], option: str):
    # Arrange
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    # Act
    result = runner.invoke(app, ["data", "prepare", str(log), "--out", str(tmp_path / "out"), *args])
    # Assert
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "out").exists()


def test_resume_with_another_number_of_silos_is_refused(tmp_path: Path):
    # Arrange
    run_dir = tmp_path / "run"
    before = _resumable_run(run_dir)
    # Act
    result = runner.invoke(app, ["simulate", "--resume", str(run_dir), "--silos", "3"])
    # Assert
    assert result.exit_code == 2, result.output
    assert "--silos 3: the run to resume has 2 clients" in _error_line(result)
    assert _files(run_dir) == before


@pytest.mark.parametrize("epochs", [0, -1])
def test_the_centralized_baseline_refuses_fewer_than_one_epoch(epochs: int):
    from common.config import AppConfig
    from common.errors import ConfigError
    from common.run_config import load_default_run_config
    from simulations.centralized import run_centralized

    cfg = AppConfig.from_run_config(load_default_run_config())
    with pytest.raises(ConfigError, match=rf"epochs must be an integer >= 1, got {epochs}"):
        run_centralized(cfg, epochs)


def test_resume_with_another_model_is_refused_before_anything_starts(tmp_path: Path):
    # Arrange: the saved run trained the default model (mf)
    run_dir = tmp_path / "run"
    before = _resumable_run(run_dir)
    # Act
    result = runner.invoke(app, ["simulate", "--resume", str(run_dir), "--model", "neumf"])
    # Assert
    assert result.exit_code == 2, result.output
    assert "--resume: model.name was 'mf', not 'neumf'" in _error_line(result)
    assert _files(run_dir) == before
