"""Item text encoding: the cache (key, hit), the missing-package hint, and a real tiny sentence-transformers model offline."""

from __future__ import annotations

import builtins
import logging

import numpy as np
import pytest

from common.data import text_embeddings as te
from common.errors import ConfigError
from tests.text_fixtures import tiny_sentence_model


class CountingEncoder:
    """A pure-Python stand-in for SentenceTransformer: vector = (len, vowels, words), normalised."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, sentences, **kwargs):
        self.calls += 1
        out = np.array([[len(s), sum(c in "aeiou" for c in s), len(s.split())] for s in sentences], dtype=np.float64)
        out += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


TEXTS = ["Heat (1995). Genres: Action, Crime", "Toy Story (1995). Genres: Animation", ""]


def test_second_call_is_a_cache_hit_and_logs_it(tmp_path, caplog) -> None:
    enc = CountingEncoder()
    first = te.encode_texts(TEXTS, "fixture", cache_dir=tmp_path, loaded=enc, identity="fixture-v1")
    assert not first.cache_hit and enc.calls == 1
    assert first.embeddings.shape == (3, 3) and first.embeddings.dtype == np.float32
    # "" -> (0+1, 0+1, 0+1) / sqrt(3)
    np.testing.assert_allclose(first.embeddings[2], np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    with caplog.at_level(logging.INFO, logger="fedrec.text"):
        second = te.encode_texts(TEXTS, "fixture", cache_dir=tmp_path, loaded=enc, identity="fixture-v1")
    assert second.cache_hit and enc.calls == 1, "a hit must not encode again"
    assert second.cache_file == first.cache_file
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    assert "text embeddings: cache hit" in caplog.text


def test_cache_key_changes_with_any_text_or_the_model() -> None:
    base = te.cache_key("files:abc", TEXTS)
    assert te.cache_key("files:abc", list(TEXTS)) == base
    assert te.cache_key("files:abd", TEXTS) != base
    assert te.cache_key("files:abc", [TEXTS[0], TEXTS[1] + " ", TEXTS[2]]) != base
    assert te.cache_key("files:abc", TEXTS[:2]) != base
    assert te.cache_key("files:abc", [TEXTS[1], TEXTS[0], TEXTS[2]]) != base  # order = item index
    # texts are length-prefixed: moving a boundary is a different key
    assert te.cache_key("m", ["ab", "c"]) != te.cache_key("m", ["a", "bc"])


def test_model_identity_follows_the_model_files(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-1")
    one = te.model_identity(str(model))
    assert one.startswith("files:") and te.model_identity(str(model)) == one
    (model / "model.safetensors").write_bytes(b"weights-2")
    assert te.model_identity(str(model)) != one
    assert te.model_identity("some-org/some-model") == "name:some-org/some-model"


def test_an_unreadable_cache_file_is_re_encoded(tmp_path) -> None:
    enc = CountingEncoder()
    first = te.encode_texts(TEXTS, "fixture", cache_dir=tmp_path, loaded=enc, identity="x")
    first.cache_file.write_bytes(b"not parquet")
    again = te.encode_texts(TEXTS, "fixture", cache_dir=tmp_path, loaded=enc, identity="x")
    assert not again.cache_hit and enc.calls == 2


def test_missing_package_names_the_extra(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_st(name, *args, **kwargs):
        if name.startswith("sentence_transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_st)
    with pytest.raises(te.MissingTextDependency, match=r'items.encoder: .*pip install "fedrec\[text\]"'):
        te.load_sentence_encoder("all-MiniLM-L6-v2")


def test_an_unloadable_model_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"items.encoder: cannot load sentence encoder .*not-a-model"):
        te.load_sentence_encoder(str(empty), device="cpu")


def test_a_local_sentence_transformers_model_encodes_offline_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tiny = tiny_sentence_model(tmp_path)
    first = te.encode_texts(TEXTS, str(tiny), cache_dir=tmp_path / "cache", device="cpu")
    assert first.embeddings.shape == (3, 8) and not first.cache_hit
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(first.embeddings[0], first.embeddings[1]), "different texts, different vectors"
    second = te.encode_texts(TEXTS, str(tiny), cache_dir=tmp_path / "cache", device="cpu")
    assert second.cache_hit
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    changed = te.encode_texts([*TEXTS[:2], "crime"], str(tiny), cache_dir=tmp_path / "cache", device="cpu")
    assert not changed.cache_hit and changed.cache_file != first.cache_file
