"""Recipe loading, composition and start-up errors (each must name the key and what is allowed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lctrain.config import ConfigError, ParallelConfig, available_recipes, load_config
from lctrain.parallel.mesh import resolve_dims
from tests.conftest import REPO


def test_recipe_and_scale_compose():
    cfg = load_config(["recipe=hybrid_gdn_3to1"])
    assert cfg.recipe == "hybrid_gdn_3to1" and cfg.scale == "cpu"
    assert cfg.model.layer_pattern == "GGGA" and cfg.model.d_model == 256
    big = load_config(["recipe=hybrid_gdn_3to1", "scale=340m"])
    assert (big.model.d_model, big.model.n_layers, big.scale) == (1024, 24, "340m")
    assert big.model.layer_pattern == "GGGA"  # architecture still from the recipe
    huge = load_config(["recipe=hybrid_gdn_3to1", "scale=1.3b"])
    assert (huge.model.d_model, huge.model.n_layers) == (2048, 24)


def test_overrides_win_and_required_keys_exist():
    args = [
        "recipe=hybrid_gdn_3to1", "train.max_steps=7", "train.out_dir=/tmp/x", "train.seed=3",
        "train.checkpoint_every=5", "train.resume=none", "train.eval_every=4", "train.global_batch_size=32",
        "train.micro_batch_size=4", "data.seq_len=128",
    ]
    cfg = load_config(args)
    t = cfg.train
    assert (t.max_steps, t.out_dir, t.seed, t.checkpoint_every, t.resume, t.eval_every) == (7, "/tmp/x", 3, 5, "none", 4)
    assert (t.global_batch_size, t.micro_batch_size, cfg.data.seq_len) == (32, 4, 128)


def test_all_recipes_load():
    names = available_recipes()
    assert {"hybrid_gdn_3to1", "gdn", "transformer"} <= set(names)
    for name in names:
        load_config([f"recipe={name}"])


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["recipe=nope"], ["unknown recipe 'nope'", "hybrid_gdn_3to1"]),
        (["recipe=hybrid_gdn_3to1", "train.max_stepz=3"], ["train.max_stepz", "max_steps"]),
        (["recipe=hybrid_gdn_3to1", "trian.max_steps=3"], ["'trian'", "train"]),
        (["recipe=hybrid_gdn_3to1", "train.max_steps=ten"], ["train.max_steps", "ten"]),
        (["recipe=hybrid_gdn_3to1", "model.kernels=cuda"], ["model.kernels", "auto, triton, torch"]),
        (["recipe=hybrid_gdn_3to1", "model.n_layers=6"], ["model.n_layers", "GGGA"]),
        (["recipe=hybrid_gdn_3to1", "model.layer_pattern=GXA"], ["model.layer_pattern", "G (Gated DeltaNet)"]),
        (["recipe=hybrid_gdn_3to1", "model.attn.num_kv_heads=3"], ["model.attn.num_kv_heads", "num_heads=4"]),
        (["recipe=hybrid_gdn_3to1", "model.gdn_num_heads=8"], ["model.gdn_num_heads", "renamed", "model.gdn.num_heads"]),
        (["recipe=hybrid_gdn_3to1", "model.num_heads=8"], ["renamed", "model.attn.num_heads", "model.lightning.num_heads"]),
        (["recipe=hybrid_gdn_3to1", "model.gdn.num_head=8"], ["model.gdn.num_head", "keys allowed in section 'model.gdn'"]),
        (["recipe=hybrid_gdn_3to1", "model.gdn.expand_v=0.3"], ["model.gdn.expand_v", "integer"]),
        (["recipe=hybrid_gdn_3to1", "scale=huge"], ["unknown scale 'huge'", "340m"]),
        (["recipe=hybrid_gdn_3to1", "train.global_batch_size=12", "train.micro_batch_size=8"],
         ["train.global_batch_size", "micro_batch_size=8"]),
        (["recipe=hybrid_gdn_3to1", "optim.schedule=linear"], ["optim.schedule", "cosine, wsd, constant"]),
        (["recipe=hybrid_gdn_3to1", "max_steps"], ["key=value"]),
        ([], ["no recipe", "hybrid_gdn_3to1"]),
    ],
)
def test_config_errors_name_key_and_allowed(args, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_impossible_mesh():
    with pytest.raises(ConfigError, match=r"dp_degree=3 x parallel.cp_degree=1 = 3 but 4 processes"):
        resolve_dims(ParallelConfig(dp_degree=3), 4)
    with pytest.raises(ConfigError, match="cp_degree=3 does not divide the world size 4"):
        resolve_dims(ParallelConfig(cp_degree=3), 4)
    dims = resolve_dims(ParallelConfig(), 4)
    assert (dims.dp, dims.cp) == (4, 1)


def test_launcher_prints_config_error_and_exits_2():
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "recipe=hybrid_gdn_3to1", "train.bogus=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.bogus'" in proc.stderr and "Traceback" not in proc.stderr
