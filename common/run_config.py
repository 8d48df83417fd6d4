"""Flower run-config values before parsing: defaults from ``pyproject.toml``, overrides, renamed keys.

Defaults live only in ``[tool.flwr.app.config]``; :mod:`common.config` turns the
final flat mapping into typed settings, once.
"""

from __future__ import annotations

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
