"""The one table of data.path schemes (lctrain.data.sources): building, path resolution and
config validation all read it, so a source added to the table is accepted, checked and built
everywhere without another edit."""

from __future__ import annotations

from pathlib import Path

import pytest

from lctrain.config import RunConfig, validate
from lctrain.data import build_data, load_documents, sources
from lctrain.data.sources import DataSource, allowed_forms, check_data_path, resolve_path, source_for
from lctrain.errors import ConfigError


def test_every_scheme_has_one_entry(tmp_path):
    assert [s.name for s in sources.SOURCES] == ["synthetic", "megatron", "hf", "files"]
    for path, name in [("synthetic:mqar?num_pairs=4", "synthetic"), ("megatron:data/x", "megatron"),
                       ("hf:owner/name", "hf"), ("pd_english", "files"), (str(tmp_path), "files")]:
        assert source_for(path).name == name
    assert resolve_path("pd_english").name == "pd_english.jsonl.gz" and resolve_path(str(tmp_path)) == tmp_path
    assert resolve_path("hf:owner/name") == "hf:owner/name"  # read by datasets when loaded
    forms = allowed_forms()
    assert forms.startswith("a built-in corpus name (pd_english)")
    assert all(s.prefix in forms for s in sources.SOURCES)
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        check_data_path("synthetic:mqar?colour=3")
    with pytest.raises(ConfigError, match="no Megatron indexed dataset"):
        check_data_path(f"megatron:{tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="does not exist; data.path must be a built-in corpus name") as e:
        check_data_path(str(tmp_path / "none.jsonl"))
    assert "synthetic:" in str(e.value) and "megatron:" in str(e.value) and "hf:" in str(e.value)
    with pytest.raises(ValueError, match="synthetic data source, not documents"):
        load_documents("synthetic:mqar")


def test_a_source_added_to_the_table_is_validated_resolved_and_built(tmp_path, monkeypatch):
    built = []

    def resolve(path: str) -> str:
        if not path[len("ones:"):].isdigit():
            raise ConfigError(f"data.path={path!r}: ones:<count>")
        return path

    def build(data_cfg, seq_len, vocab_size, cache_dir, rank):
        built.append((data_cfg.path, seq_len, vocab_size, rank))
        return "tokenizer", ["train"] * int(data_cfg.path[len("ones:"):]), []

    ones = DataSource("ones", "ones:", "ones:<count>", resolve, build)
    monkeypatch.setattr(sources, "SOURCES", (ones, *sources.SOURCES))
    cfg = RunConfig()
    cfg.data.path = "ones:3"
    validate(cfg)  # config validation reads the table
    assert resolve_path("ones:3") == "ones:3" and "ones:<count>" in allowed_forms()
    tok, train, val = build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, Path(tmp_path))
    assert (tok, train, val) == ("tokenizer", ["train"] * 3, [])
    assert built == [("ones:3", cfg.data.seq_len, cfg.model.vocab_size, 0)]
    cfg.data.path = "ones:x"
    with pytest.raises(ConfigError, match="ones:<count>"):
        validate(cfg)
    with pytest.raises(ValueError, match="ones data source, not documents"):
        load_documents("ones:3")
