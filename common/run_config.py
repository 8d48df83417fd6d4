"""Flower run-config values before parsing: defaults from ``pyproject.toml``, overrides, renamed keys.

Defaults live only in ``[tool.flwr.app.config]``; :mod:`common.config` turns the
final flat mapping into typed settings, once.
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from common.errors import ConfigError

Scalar = bool | int | float | str
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def load_default_run_config(pyproject: Path = PYPROJECT) -> dict[str, Scalar]:
    """The defaults of ``[tool.flwr.app.config]``, flattened the way Flower does."""
    with pyproject.open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return flatten(table)


def with_defaults(run_config: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """``run_config`` completed with the ``pyproject.toml`` defaults of the keys it lacks.

    An app given an empty or partial run config (as some Flower tooling passes) runs
    with the defaults; a key the defaults do not know is still refused.
    """
    return merge_overrides(_cached_defaults(), run_config)


@functools.cache
def _cached_defaults() -> dict[str, Scalar]:
    return load_default_run_config()


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Flatten nested TOML tables into dotted keys."""
    out: dict[str, Scalar] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = cast(Scalar, value)
    return out


def parse_override(text: str) -> tuple[str, Scalar]:
    """Parse one ``key=value`` override; the value is read as a TOML value.

    Bare words that are not valid TOML (``mode=local``) are taken as strings.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: lists and tables are not supported, got {raw!r}")
    if not isinstance(value, (bool, int, float, str)):  # TOML dates/times: keep the text
        value = raw.strip()
    return key, cast(Scalar, value)


def merge_overrides(
    base: Mapping[str, Scalar], overrides: Mapping[str, Scalar]
) -> dict[str, Scalar]:
    """``base`` updated with ``overrides``; an override of an unknown key is an error."""
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise unknown_key_error(unknown[0], base)
    return {**base, **overrides}


# Keys of earlier fedrec versions, refused with the name that replaced them.
RENAMED_KEYS = {
    **{
        f"privacy.{name}": f"privacy.local.{name}"
        for name in ("unit", "noise-multiplier", "clip", "target-epsilon", "delta", "batch-size", "max-positives")
    },
    **{f"privacy.{name}": f"privacy.local.optimizer.{name}" for name in ("lr", "user-lr", "user-epochs")},
    **{
        f"privacy.central-{name}": f"privacy.central.{name}"
        for name in ("noise-multiplier", "clip", "sample-rate", "target-epsilon", "delta")
    },
}


def unknown_key_error(key: str, known: Iterable[str] = ()) -> ConfigError:
    """The error for an unknown key; a key of an earlier version names its new name."""
    if key in RENAMED_KEYS:
        return ConfigError(f"config key {key!r} was renamed: use {RENAMED_KEYS[key]!r}")
    listing = f"; known keys: {', '.join(sorted(known))}" if known else ""
    return ConfigError(f"unknown config key {key!r}{listing}")


def collect_overrides(overrides: list[str] | None, named: Mapping[str, Scalar | None]) -> dict[str, Scalar]:
    """Named options, then ``-c`` overrides in order (a later one wins); ``data.path`` made absolute.

    Each ``-c`` is ``key=value`` or a TOML file of overrides. Named options that are
    ``None`` (not given) are left out.
    """
    values: dict[str, Scalar] = {k: v for k, v in named.items() if v is not None}
    for text in overrides or []:
        if text.endswith(".toml") and "=" not in text:
            values.update(load_override_file(Path(text)))
        else:
            key, value = parse_override(text)
            values[key] = value
    if isinstance(values.get("data.path"), str) and values["data.path"]:
        values["data.path"] = str(Path(str(values["data.path"])).expanduser().resolve())
    return values


def load_override_file(path: Path) -> dict[str, Scalar]:
    """Overrides from a TOML file (nested tables or dotted keys), as ``flwr run -c`` takes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return flatten(table)


class ConfigReader:
    """Typed access to a flat config mapping that remembers which keys were read.

    Every accessor names the key in its :class:`ConfigError`; :meth:`reject_unknown`
    refuses the keys nobody read (naming a renamed key's new name).
    """

    def __init__(self, values: Mapping[str, Scalar]) -> None:
        self._values = values
        self._read: set[str] = set()

    def _get(self, key: str) -> Scalar:
        if key not in self._values:
            raise ConfigError(f"{key}: missing setting (see [tool.flwr.app.config])")
        self._read.add(key)
        return self._values[key]

    def int(self, key: str, *, lo: int | None = None, hi: int | None = None) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"{key}: must be {bounds}, got {value}")
        return value

    def float(
        self,
        key: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        too_low = lo is not None and (number <= lo if lo_open else number < lo)
        if too_low or (hi is not None and number > hi):
            low = f"> {lo}" if lo_open else f">= {lo}"
            bounds = low if hi is None else f"{low} and <= {hi}"
            raise ConfigError(f"{key}: must be {bounds}, got {value}")
        return number

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value

    def str(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> Any:  # type: ignore[valid-type]
        value = self.str(key)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
        return value

    def int_list(self, key: str) -> tuple[int, ...]:  # type: ignore[valid-type]
        text = self.str(key)
        try:
            widths = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(
                f"{key}: expected comma-separated integers, got {text!r}"
            ) from None
        if not widths or min(widths) < 1:
            raise ConfigError(f"{key}: widths must be positive, got {text!r}")
        return widths

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._values) - self._read)
        if unknown:
            raise unknown_key_error(unknown[0])
