"""Tests of the typed run-config and node-config parsers."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

import common
from common.config import AppConfig, NodeConfig
from common.errors import ConfigError
from common.run_config import load_default_run_config, merge_overrides, parse_override

REPO = Path(__file__).resolve().parents[2]

Scalar = bool | int | float | str


@pytest.fixture
def defaults() -> dict[str, Scalar]:
    return load_default_run_config()


def _with(defaults: dict[str, Scalar], **changes: Scalar) -> dict[str, Scalar]:
    # Keyword names use "__" for "." and "_" for "-": train__lr -> train.lr
    out = dict(defaults)
    for name, value in changes.items():
        out[name.replace("__", ".").replace("_", "-")] = value
    return out


def test_package_is_imported_from_this_repo() -> None:
    # Arrange
    package_file = Path(common.__file__).resolve()
    # Act
    relative = package_file.relative_to(REPO)  # raises if outside the repo
    # Assert
    assert relative == Path("common/__init__.py")


def test_pyproject_defaults_parse_and_match_the_toml() -> None:
    # Arrange
    with (REPO / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    # Act
    cfg = AppConfig.from_run_config(load_default_run_config())
    # Assert
    assert cfg.num_server_rounds == table["num-server-rounds"]
    assert cfg.seed == table["seed"]
    assert cfg.data.dataset == table["data"]["dataset"]
    assert cfg.data.synthetic.num_users == table["data"]["synthetic"]["num-users"]
    assert cfg.model.mlp_layers == tuple(
        int(w) for w in table["model"]["mlp-layers"].split(",")
    )
    assert cfg.train.lr == table["train"]["lr"]
    assert cfg.eval.full_ranking is table["eval"]["full-ranking"]
    assert cfg.strategy.timeout == table["strategy"]["timeout"]


def test_flattened_defaults_use_dotted_keys(defaults: dict[str, Scalar]) -> None:
    # Assert
    assert "data.synthetic.num-items" in defaults
    assert "train.lr" in defaults
    assert not any(isinstance(v, dict) for v in defaults.values())


def test_unknown_key_is_rejected_by_name(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = {**defaults, "train.learning-rate": 0.1}
    # Act / Assert
    with pytest.raises(ConfigError, match="train.learning-rate"):
        AppConfig.from_run_config(cfg)


def test_missing_key_is_rejected_by_name(defaults: dict[str, Scalar]) -> None:
    # Arrange
    del defaults["eval.k"]
    # Act / Assert
    with pytest.raises(ConfigError, match=r"eval\.k: missing"):
        AppConfig.from_run_config(defaults)


def test_bool_is_not_an_int(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, train__batch_size=True)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"train\.batch-size: expected an integer"):
        AppConfig.from_run_config(cfg)


def test_float_is_not_an_int(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, num_server_rounds=3.0)
    # Act / Assert
    with pytest.raises(ConfigError, match="num-server-rounds: expected an integer"):
        AppConfig.from_run_config(cfg)


def test_bool_is_not_a_float(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, train__lr=True)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        AppConfig.from_run_config(cfg)


def test_int_is_widened_to_float(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, train__lr=1, strategy__timeout=60)
    # Act
    parsed = AppConfig.from_run_config(cfg)
    # Assert
    assert parsed.train.lr == 1.0 and isinstance(parsed.train.lr, float)
    assert parsed.strategy.timeout == 60.0 and isinstance(parsed.strategy.timeout, float)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_is_rejected(defaults: dict[str, Scalar], value: float) -> None:
    # Arrange
    cfg = _with(defaults, strategy__timeout=value)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"strategy\.timeout: must be finite"):
        AppConfig.from_run_config(cfg)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.lr", 0.0),
        ("train.l2", -0.1),
        ("strategy.fraction-train", 1.5),
        ("strategy.fraction-train", 0.0),
        ("strategy.fraction-evaluate", -0.01),
        ("data.dirichlet-alpha", 0.0),
        ("num-server-rounds", 0),
        ("seed", -1),
        ("data.synthetic.num-items", 199),
    ],
)
def test_out_of_range_is_rejected_by_name(
    defaults: dict[str, Scalar], key: str, value: Scalar
) -> None:
    # Arrange
    cfg = {**defaults, key: value}
    # Act / Assert
    with pytest.raises(ConfigError, match=f"{key}: must be"):
        AppConfig.from_run_config(cfg)


def test_range_bounds_are_inclusive_where_documented(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(
        defaults,
        strategy__fraction_train=1.0,
        strategy__fraction_evaluate=0.0,
        train__l2=0.0,
        seed=0,
    )
    # Act
    parsed = AppConfig.from_run_config(cfg)
    # Assert
    assert parsed.strategy.fraction_train == 1.0
    assert parsed.strategy.fraction_evaluate == 0.0
    assert parsed.train.l2 == 0.0


def test_bad_choice_names_allowed_values(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, model__name="xyz")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"model\.name: expected one of mf, neumf, hybrid-mf; got 'xyz'"):
        AppConfig.from_run_config(cfg)


def test_string_setting_rejects_a_number(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, data__path=3)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"data\.path: expected a string"):
        AppConfig.from_run_config(cfg)


def test_bool_setting_rejects_an_int(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, eval__full_ranking=1)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"eval\.full-ranking: expected true or false"):
        AppConfig.from_run_config(cfg)


@pytest.mark.parametrize("text", ["64,,32", "64,a", "", "64,0", "-8"])
def test_bad_mlp_layers_string_is_rejected(defaults: dict[str, Scalar], text: str) -> None:
    # Arrange
    cfg = _with(defaults, model__mlp_layers=text)
    # Act / Assert
    with pytest.raises(ConfigError, match=r"model\.mlp-layers"):
        AppConfig.from_run_config(cfg)


def test_neumf_needs_an_even_first_mlp_width(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, model__name="neumf", model__mlp_layers="63,16")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"model\.mlp-layers: the first width must be even"):
        AppConfig.from_run_config(cfg)


def test_mlp_layers_parse_to_ints(defaults: dict[str, Scalar]) -> None:
    # Arrange
    cfg = _with(defaults, model__name="neumf", model__mlp_layers="32, 16,8")
    # Act
    parsed = AppConfig.from_run_config(cfg)
    # Assert
    assert parsed.model.mlp_layers == (32, 16, 8)


@pytest.mark.parametrize("dataset", ["ml-100k", "csv", "parquet"])
def test_non_synthetic_dataset_needs_a_path(
    defaults: dict[str, Scalar], dataset: str
) -> None:
    # Arrange
    cfg = _with(defaults, data__dataset=dataset, data__path="")
    # Act / Assert
    with pytest.raises(ConfigError, match=r"data\.path"):
        AppConfig.from_run_config(cfg)
    assert AppConfig.from_run_config({**cfg, "data.path": "x"}).data.path == "x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed=7", ("seed", 7)),
        ("train.lr=0.01", ("train.lr", 0.01)),
        ("train.lr=1e-3", ("train.lr", 0.001)),
        ("eval.full-ranking=false", ("eval.full-ranking", False)),
        ('model.name="neumf"', ("model.name", "neumf")),
        ("model.name='mf'", ("model.name", "mf")),
        ("model.name=neumf", ("model.name", "neumf")),
        ("data.path=../shared/data/ml-100k", ("data.path", "../shared/data/ml-100k")),
        (" seed = 3 ", ("seed", 3)),
        ("model.mlp-layers=64,32", ("model.mlp-layers", "64,32")),
        ("run-dir=", ("run-dir", "")),
    ],
)
def test_parse_override_reads_toml_values(text: str, expected: tuple[str, Scalar]) -> None:
    # Act
    key, value = parse_override(text)
    # Assert
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["seed", "=3", " =3", "x=[1, 2]", "x={a = 1}"])
def test_malformed_override_is_rejected(text: str) -> None:
    # Act / Assert
    with pytest.raises(ConfigError):
        parse_override(text)


def test_merge_overrides_applies_known_and_rejects_unknown(
    defaults: dict[str, Scalar],
) -> None:
    # Act
    merged = merge_overrides(defaults, {"train.lr": 0.5})
    # Assert
    assert merged["train.lr"] == 0.5 and defaults["train.lr"] != 0.5
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        merge_overrides(defaults, {"train.lrr": 0.5})


def test_override_round_trip_through_parser(defaults: dict[str, Scalar]) -> None:
    # Arrange
    overrides = dict(parse_override(t) for t in ["model.name=neumf", "train.local-epochs=3"])
    # Act
    cfg = AppConfig.from_run_config(merge_overrides(defaults, overrides))
    # Assert
    assert cfg.model.name == "neumf"
    assert cfg.train.local_epochs == 3


def test_node_config_parses_and_data_path_is_optional() -> None:
    # Act
    node = NodeConfig.from_node_config({"partition-id": 2, "num-partitions": 3})
    with_path = NodeConfig.from_node_config(
        {"partition-id": 0, "num-partitions": 1, "data-path": "/d"}
    )
    # Assert
    assert node == NodeConfig(partition_id=2, num_partitions=3, data_path="")
    assert with_path.data_path == "/d"


@pytest.mark.parametrize(("pid", "n"), [(3, 3), (-1, 3), (0, 0)])
def test_node_config_partition_id_out_of_range(pid: int, n: int) -> None:
    # Act / Assert
    with pytest.raises(ConfigError, match="partition"):
        NodeConfig.from_node_config({"partition-id": pid, "num-partitions": n})


def test_node_config_ignores_keys_flower_adds() -> None:
    # Arrange
    node_config = {"partition-id": 0, "num-partitions": 2, "extra": 1}
    # Act
    parsed = NodeConfig.from_node_config(node_config)
    # Assert
    assert parsed.num_partitions == 2


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"privacy.mode": "local", "privacy.local.noise-multiplier": 0.0, "privacy.local.target-epsilon": 0.0}, "privacy.local.noise-multiplier"),
        ({"privacy.mode": "central", "privacy.central.noise-multiplier": 0.0, "privacy.central.target-epsilon": 0.0}, "privacy.central.noise-multiplier"),
        ({"privacy.mode": "central", "strategy.fraction-train": 0.5}, "strategy.fraction-train"),
        ({"privacy.mode": "everywhere"}, "privacy.mode"),
        ({"privacy.local.unit": "item"}, "privacy.local.unit"),
        ({"privacy.local.clip": 0.0}, "privacy.local.clip"),
        ({"privacy.central.sample-rate": 1.5}, "privacy.central.sample-rate"),
        ({"privacy.local.delta": 0.9}, "privacy.local.delta"),
        ({"privacy.mode": "local", "data.partition": "by-user"}, "privacy.mode"),
    ],
)
def test_privacy_settings_are_validated_by_name(defaults: dict[str, Scalar], changes: dict[str, Scalar], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AppConfig.from_run_config({**defaults, **changes})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("privacy.noise-multiplier", "privacy.local.noise-multiplier"),
        ("privacy.user-lr", "privacy.local.optimizer.user-lr"),
        ("privacy.central-clip", "privacy.central.clip"),
    ],
)
def test_a_renamed_key_is_refused_naming_its_new_name(old: str, new: str) -> None:
    # Arrange
    base = load_default_run_config()

    # Act / Assert
    with pytest.raises(ConfigError, match=f"'{old}' was renamed: use '{new}'"):
        merge_overrides(base, {old: 1.0})
    with pytest.raises(ConfigError, match=f"'{old}' was renamed: use '{new}'"):
        AppConfig.from_run_config({**base, old: 1.0})
