"""Strict config loading, overrides, validation messages and resolve()."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from yuanlfa.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["tiny", "yuan2-2b", "yuan2-51b", "yuan2-102b"]

# Facts from docs/yuan2_facts.md 1 (the Yuan 2.0 report): layers, hidden, heads, seq, micro,
# global, lr.
PAPER = {
    "yuan2-2b": (24, 2048, 32, 8192, 2, 384, 2e-4, 2e-5),
    "yuan2-51b": (42, 8192, 64, 4096, 1, 1152, 9e-5, 9e-6),
    "yuan2-102b": (84, 8192, 64, 4096, 1, 1152, 3e-5, 3e-6),
}


def tiny_dict() -> dict:
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def assert_one_line_error(exc: pytest.ExceptionInfo, *fields: str) -> str:
    """The message must be a single line (it goes straight to a console) naming each field."""
    msg = str(exc.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for name in fields:
        assert name in msg, f"{name!r} not named in {msg!r}"
    return msg


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    m = cfg.model
    # The shared Yuan 2.0 architecture facts.
    assert m.norm_eps == 1e-6 and m.rope_base == 10000.0 and m.tie_embeddings and m.lfa
    assert m.ffn_size == 4 * m.hidden_size
    if name in PAPER:
        layers, hidden, heads, seq, micro, glob, lr, min_lr = PAPER[name]
        assert (m.num_layers, m.hidden_size, m.num_heads) == (layers, hidden, heads)
        assert m.vocab_size == 135040 and m.vocab_size % 128 == 0 and m.vocab_size >= 134953
        t = cfg.train
        assert (t.seq_length, t.micro_batch_size, t.global_batch_size) == (seq, micro, glob)
        assert math.isclose(cfg.optim.lr, lr) and math.isclose(cfg.optim.min_lr, min_lr)
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
        assert cfg.optim.clip_grad == 1.0
        assert cfg.optim.warmup_steps == (1900 if name == "yuan2-2b" else 1300)


def test_released_pipeline_splits() -> None:
    cfg51 = load_config(CONFIGS / "yuan2-51b.yaml")
    assert cfg51.parallel.pp == 16
    assert cfg51.parallel.pipeline_blocks == (2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2)
    cfg102 = load_config(CONFIGS / "yuan2-102b.yaml")
    assert cfg102.parallel.pp == 32
    assert cfg102.parallel.pipeline_blocks == (2,) * 10 + (3,) * 20 + (2, 2)
    # The paper's 102B run: PP32 x TP1 x DP3 = 96 devices.
    assert cfg102.parallel.tp == 1
    assert resolve(cfg102, world_size=96).parallel.dp == 3


def test_configs_are_frozen(tiny_cfg: Config) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_cfg.model.hidden_size = 128  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_cfg.train = None  # type: ignore[misc]


def test_tiny_cfg_fixture(tiny_cfg: Config) -> None:
    m = tiny_cfg.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.vocab_size) == (64, 2, 4, 128)
    assert tiny_cfg.parallel.dp == 1


@pytest.mark.parametrize(
    ("data", "typo", "suggestion"),
    [
        ({"model": {"hiden_size": 64}}, "model.hiden_size", "model.hidden_size"),
        ({"train": {"step": 3}}, "train.step", "train.steps"),
        ({"parallel": {"pipeline_block": [1]}}, "parallel.pipeline_block", "pipeline_blocks"),
        ({"modle": {}}, "modle", "model"),
    ],
)
def test_unknown_key_names_nearest(data: dict, typo: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    msg = assert_one_line_error(exc, typo)
    # The suggestion must appear as a separate mention, not only as part of the typo itself.
    assert msg.replace(typo, "", 1).count(suggestion) >= 1, msg


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    data = tiny_dict()
    data["model"]["hiden_size"] = data["model"].pop("hidden_size")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_one_line_error(exc, "model.hiden_size", "model.hidden_size")


def test_unknown_key_through_override() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "tiny.yaml", ["train.stepz=3"])
    assert_one_line_error(exc, "train.stepz", "train.steps")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"num_layers": "four"}}, "model.num_layers"),
        ({"model": {"num_layers": 2.5}}, "model.num_layers"),
        ({"model": {"num_layers": True}}, "model.num_layers"),
        ({"model": {"lfa": "yes"}}, "model.lfa"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"lr": [1]}}, "optim.lr"),
        ({"parallel": {"schedule": "pipedream"}}, "parallel.schedule"),
        ({"parallel": {"pipeline_blocks": 3}}, "parallel.pipeline_blocks"),
        ({"parallel": {"pipeline_blocks": [1, "x"]}}, "parallel.pipeline_blocks"),
        ({"data": {"path": {"a": 1}}}, "data.path"),
        ({"model": [1, 2]}, "model"),
    ],
)
def test_wrong_type_names_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert_one_line_error(exc, field)


def test_numbers_widen_losslessly() -> None:
    cfg = config_from_dict({"optim": {"lr": 1}, "train": {"steps": 5.0}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert isinstance(cfg.train.steps, int) and cfg.train.steps == 5


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"optim": {"min_lr": "1e-5"}}, "optim.min_lr", "drop the quotes"),
        ({"train": {"steps": "5"}}, "train.steps", "drop the quotes"),
        ({"train": {"steps": 5.5}}, "train.steps", "an integer"),
        ({"data": {"split": 1}}, "data.split", "quote it"),
        ({"data": {"tokenizer": True}}, "data.tokenizer", "quote it"),
        ({"model": {"lfa": "yes"}}, "model.lfa", "true or false"),
        ({"model": {"lfa": 1}}, "model.lfa", "true or false"),
    ],
)
def test_values_of_another_type_are_refused(data: dict, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert_one_line_error(exc, field, hint)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        # YAML 1.1 reads these as the base-60 integers 28861 and 5410: they stay text here, and
        # the split's own check refuses the colons.
        ("data:\n  split: 8:1:1\n", "data.split"),
        ("data:\n  split: 90:10\n", "data.split"),
        # YAML 1.1 reads on/no as booleans: here they are text, refused for a string field
        # only by its own check, and for a boolean field by the type.
        ("model:\n  lfa: on\n", "model.lfa"),
        ("train:\n  steps: 1_000\n", "train.steps"),
    ],
)
def test_yaml_1_1_scalars_are_not_coerced(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_one_line_error(exc, field)


def test_yaml_1_2_scalars_keep_their_types(tmp_path: Path) -> None:
    # What YAML 1.1 leaves a string (1e-3 without a dot) is the number a user meant.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  min_lr: 0\ndata:\n  split: 8,1,1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.data.split == "8,1,1"


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train:\n  steps: 3\noptim:\n  lr: 1.0\ntrain:\n  steps: 4\n", "'train'", "1 and 5"),
        ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n", "'steps'", "2 and 4"),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(
    tmp_path: Path, text: str, key: str, lines: str
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_one_line_error(exc, str(path), key, f"lines {lines}")


def test_invalid_yaml_is_one_line_with_the_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_one_line_error(exc, str(path), "line 3")


def test_binary_file_as_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert_one_line_error(exc, str(path))


@pytest.mark.parametrize("layout", ["Et*2|t*2L", "Et|t|t|tL"])
def test_pipeline_layout_with_pp_1_is_refused(layout: str) -> None:
    # Like a block list of several stages: a layout for another pp is a mistake, not ignored.
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "tiny.yaml", ["parallel.pp=1", f"parallel.pipeline_layout={layout}"])
    assert_one_line_error(exc, "parallel.pipeline_layout", "parallel.pp")
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "tiny.yaml", ["parallel.pp=1", "parallel.pipeline_blocks=[2,2]"])
    assert_one_line_error(exc, "parallel.pipeline_blocks")


def test_dotted_overrides() -> None:
    base = load_config(CONFIGS / "tiny.yaml")
    assert base.train.steps != 20
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.steps=20"])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    # Everything else is untouched.
    assert dataclasses.replace(cfg, train=base.train) == base


def test_list_override_pipeline_blocks() -> None:
    cfg = load_config(
        CONFIGS / "tiny.yaml", ["parallel.pp=4", "parallel.pipeline_blocks=[2,1,1,0]"]
    )
    assert cfg.model.num_layers == 4
    assert cfg.parallel.pp == 4
    assert cfg.parallel.pipeline_blocks == (2, 1, 1, 0)
    # Later overrides win and types come from YAML parsing (a float stays a float).
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.lr=1e-3", "optim.lr=5.0e-4"])
    assert cfg.optim.lr == 5e-4


@pytest.mark.parametrize("text", ["train.steps", "train..steps=3", "train.steps.x=3"])
def test_malformed_override_fails(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "tiny.yaml", [text])
    assert "\n" not in str(exc.value)


def test_config_to_dict_round_trips() -> None:
    cfg = load_config(CONFIGS / "yuan2-51b.yaml")
    data = config_to_dict(cfg)
    assert data["parallel"]["pipeline_blocks"] == list(cfg.parallel.pipeline_blocks)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        # Hidden not divisible by heads.
        (["model.hidden_size=100", "model.num_heads=3"], ["model.hidden_size", "model.num_heads"]),
        (["optim.lr=-0.001", "optim.min_lr=0"], ["optim.lr"]),
        # Block list not summing to the layers (4).
        (["parallel.pp=4", "parallel.pipeline_blocks=[2,1,1,1]"], ["parallel.pipeline_blocks"]),
        # Block list length not matching pp.
        (["parallel.pp=4", "parallel.pipeline_blocks=[2,2]"], ["parallel.pipeline_blocks"]),
        (["parallel.pp=2", "parallel.pipeline_blocks=[1,1,1,1]"], ["parallel.pipeline_blocks"]),
        # tp not dividing the heads (4).
        (["parallel.tp=3"], ["parallel.tp", "model.num_heads"]),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            ["train.global_batch_size", "train.micro_batch_size"],
        ),
        (["parallel.pp=3"], ["parallel.pp"]),
        (["model.num_layers=0"], ["model.num_layers"]),
        (["optim.min_lr=1.0"], ["optim.min_lr"]),
        (["optim.beta2=1.0"], ["optim.beta2"]),
    ],
)
def test_validation_errors_are_one_line_and_name_the_field(
    overrides: list[str], fields: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert_one_line_error(exc, *fields)


def test_config_error_is_a_value_error() -> None:
    # Callers that catch ValueError for bad input keep working.
    assert issubclass(ConfigError, ValueError)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert_one_line_error(exc, "nope.yaml")


def padded_vocab(tokenizer_vocab: int, tp: int) -> int:
    multiple = 128 if 128 % tp == 0 else 128 * tp
    return math.ceil(tokenizer_vocab / multiple) * multiple


@pytest.mark.parametrize(
    ("tp", "pp", "world", "dp"),
    [(1, 1, 1, 1), (1, 1, 2, 2), (2, 1, 2, 1), (2, 2, 8, 2), (1, 2, 4, 2)],
)
def test_resolve_derives_dp_and_pads_vocab(tp: int, pp: int, world: int, dp: int) -> None:
    # Batch sizes chosen so that every dp here divides the global batch.
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [f"parallel.tp={tp}", f"parallel.pp={pp}", "train.micro_batch_size=1"],
    )
    assert cfg.model.vocab_size is None and cfg.parallel.dp is None
    out = resolve(cfg, world_size=world, tokenizer_vocab=262)
    assert out.parallel.dp == world // (tp * pp) == dp
    assert out.model.vocab_size == padded_vocab(262, tp)
    assert out.model.vocab_size % 128 == 0 and out.model.vocab_size % tp == 0
    # Nothing else changes.
    assert dataclasses.replace(out, parallel=cfg.parallel, model=cfg.model) == cfg


def test_resolve_vocab_examples() -> None:
    # 262 byte-level tokens need three 128-blocks, whatever the (power-of-two) tp: the model
    # must not change with the layout.
    assert padded_vocab(262, 1) == 384 and padded_vocab(262, 2) == 384
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.tp=2"])
    assert resolve(cfg, 2, tokenizer_vocab=262).model.vocab_size == 384
    cfg3 = load_config(CONFIGS / "tiny.yaml", ["parallel.tp=1"])
    assert resolve(cfg3, 1, tokenizer_vocab=262).model.vocab_size == 384
    assert resolve(cfg, 2, tokenizer_vocab=256).model.vocab_size == 256


def test_resolve_keeps_an_explicit_vocab() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.vocab_size=1000"])
    assert resolve(cfg, 1, tokenizer_vocab=262).model.vocab_size == 1000
    with pytest.raises(ConfigError) as exc:
        resolve(cfg, 1, tokenizer_vocab=1001)
    assert_one_line_error(exc, "model.vocab_size")


def test_resolve_null_vocab_needs_tokenizer() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml")
    with pytest.raises(ConfigError) as exc:
        resolve(cfg, 1)
    assert_one_line_error(exc, "model.vocab_size")


@pytest.mark.parametrize(("tp", "pp", "world"), [(2, 1, 3), (2, 2, 6), (1, 4, 2)])
def test_resolve_rejects_world_not_multiple_of_model_parallel(tp: int, pp: int, world: int) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    with pytest.raises(ConfigError) as exc:
        resolve(cfg, world_size=world, tokenizer_vocab=262)
    assert_one_line_error(exc, str(world))


def test_resolve_rejects_inconsistent_explicit_dp() -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.dp=2", "train.micro_batch_size=1"])
    assert resolve(cfg, 2, tokenizer_vocab=262).parallel.dp == 2
    with pytest.raises(ConfigError) as exc:
        resolve(cfg, 4, tokenizer_vocab=262)
    assert_one_line_error(exc, "parallel.dp")


def test_resolve_revalidates_batch_against_dp() -> None:
    # tiny: global 16, micro 8; dp=4 would need a multiple of 32.
    cfg = load_config(CONFIGS / "tiny.yaml")
    with pytest.raises(ConfigError) as exc:
        resolve(cfg, world_size=4, tokenizer_vocab=262)
    assert_one_line_error(exc, "train.global_batch_size")
