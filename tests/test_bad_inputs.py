"""Malformed and untrusted inputs, as a new user meets them: every command answers with one line
on stderr naming the culprit, a non-zero exit, within seconds, no traceback, and every file that
existed before is byte-identical afterwards (issue 22; docs/errors.md lists what users see).

Commands run in-process (their ``main``) except where a crash of the process must be caught
(SentencePiece files)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from yuanlfa.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from yuanlfa.checkpoint.files import write_text_atomic
from yuanlfa.checkpoint.storage import forget_metadata
from yuanlfa.cli import common
from yuanlfa.cli.info import main as info
from yuanlfa.cli.preprocess import main as preprocess
from yuanlfa.cli.reshard import main as reshard
from yuanlfa.cli.train_tokenizer import main as train_tokenizer
from yuanlfa.config import Config, ConfigError, config_from_dict, config_to_dict
from yuanlfa.config.preflight import check_backends, check_inputs, check_outputs
from yuanlfa.data import DataError, IndexedDatasetBuilder, MMapIndexedDataset
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train.optimizer import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SPM = ROOT / "tests" / "data" / "yuan_tokenizer" / "tokenizer.model"
MODEL = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 128}
SECONDS = 20  # "within seconds": generous for 2 shared CI cores, far below any hang


# ----------------------------------------------------------------------------------- helpers


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def clean_error(
    command: Callable[[list[str]], int], argv: list[str], capsys, *culprits: str
) -> str:
    """Run ``command(argv)`` in-process; it must fail with exit status 2 and one stderr line
    naming every culprit, without a traceback, within SECONDS. Returns the line."""
    capsys.readouterr()
    start = time.monotonic()
    rc = command(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for culprit in culprits:
        assert culprit in err, f"{culprit!r} not named in {err!r}"
    assert elapsed < SECONDS, f"took {elapsed:.1f}s"
    return err


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model in all three formats: ours/, hf/, meg/ (tp 1, pp 2)."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = config_from_dict({"model": MODEL})
    model = create_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.optim)
    mesh = build_mesh(cfg.parallel, 1, 0)
    state = TrainingState(1, 0, config_to_dict(cfg.model), {})
    save_checkpoint(root / "ours", model, opt, state, mesh, cfg.model, {"tp": 1})
    common_args = ["--input", str(root / "ours"), "--quiet"]
    assert reshard([*common_args, "--output", str(root / "hf"), "--to", "hf"]) == 0
    assert (
        reshard(
            [*common_args, "--output", str(root / "meg"), "--to", "megatron"]
            + ["--target-tp", "1", "--target-pp", "2"]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("data") / "docs"
    with IndexedDatasetBuilder(prefix) as builder:
        for n in range(1, 40):
            builder.add_document(list(range(n)))
    return prefix


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------ property: truncated copies of every file kind

CUTS = (0.0, 0.02, 0.5, 0.97)  # fractions of the file kept


def _cut(path: Path, frac: float) -> None:
    data = path.read_bytes()
    keep = int(len(data) * frac)
    path.write_bytes(data[: min(keep, len(data) - 1)])


# (format directory, file inside it, reshard flags)
CHECKPOINT_FILES = [
    ("ours", "step_0000001/.metadata", ["--to", "hf"]),
    ("ours", "step_0000001/__0_0.distcp", ["--to", "hf"]),
    ("ours", "step_0000001/meta.json", ["--to", "hf"]),
    ("hf", "model-00001-of-00001.safetensors", ["--to", "yuanlfa"]),
    ("hf", "model.safetensors.index.json", ["--to", "yuanlfa"]),
    ("hf", "config.json", ["--to", "yuanlfa"]),
    ("meg", "iter_0000001/mp_rank_00_000/model_optim_rng.pt", ["--to", "yuanlfa"]),
    ("meg", "iter_0000001/mp_rank_00_001/model_optim_rng.pt", ["--to", "yuanlfa"]),
]


@pytest.mark.parametrize(("fmt", "rel", "flags"), CHECKPOINT_FILES, ids=lambda v: str(v))
def test_truncated_checkpoint_files_are_clean_errors(
    checkpoints: Path, tmp_path: Path, capsys, fmt: str, rel: str, flags: list[str]
) -> None:
    for frac in CUTS:
        case = tmp_path / f"cut{frac}"
        src = copy_of(checkpoints / fmt, case)
        _cut(src / rel, frac)
        forget_metadata()
        before = tree_digest(case)
        out = case / "out"
        argv = ["--input", str(src), "--output", str(out), "--quiet", *flags]
        clean_error(reshard, argv, capsys, str(src / rel))
        assert tree_digest(case) == before, f"{rel} cut at {frac}: files changed or left behind"


@pytest.mark.parametrize(
    ("fmt", "rel", "named"),
    [
        # The pointer files: a cut that leaves a valid name is no error; one that does not is
        # named. "step_0000001\n" cut to "step_0" names a missing checkpoint.
        ("ours", "latest", "latest"),
        ("meg", "latest_checkpointed_iteration.txt", "latest_checkpointed_iteration.txt"),
    ],
)
def test_truncated_pointer_files(
    checkpoints: Path, tmp_path: Path, capsys, fmt: str, rel: str, named: str
) -> None:
    src = copy_of(checkpoints / fmt, tmp_path)
    (src / rel).write_text("")
    to = "hf" if fmt == "ours" else "yuanlfa"
    argv = ["--input", str(src), "--output", str(tmp_path / "out"), "--to", to, "--quiet"]
    before = tree_digest(tmp_path)
    clean_error(reshard, argv, capsys, named)
    assert tree_digest(tmp_path) == before


def test_truncated_rng_file_is_named_on_resume(tmp_path: Path) -> None:
    cfg = config_from_dict({"model": MODEL})
    model = create_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.optim)
    mesh = build_mesh(cfg.parallel, 1, 0)
    state = TrainingState(1, 0, config_to_dict(cfg.model), {})
    path = save_checkpoint(tmp_path / "ckpt", model, opt, state, mesh, cfg.model, {"tp": 1})
    rng = next((path / "rng").iterdir())
    for frac in CUTS:
        data = rng.read_bytes()
        _cut(rng, frac)
        before = tree_digest(tmp_path)
        with pytest.raises(Exception) as exc:  # noqa: PT011 - the type is checked below
            load_checkpoint(path, model, opt, config_to_dict(cfg.model), mesh, cfg.model)
        assert common.expected(common.unwrap(exc.value)), repr(exc.value)
        message = common.message(common.unwrap(exc.value))
        assert rng.name in message and "\n" not in message, message
        assert tree_digest(tmp_path) == before
        rng.write_bytes(data)


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_truncated_bin_idx_are_data_errors(dataset: Path, tmp_path: Path, suffix: str) -> None:
    for frac in CUTS:
        prefix = tmp_path / f"cut{frac}" / "docs"
        prefix.parent.mkdir()
        for s in (".bin", ".idx"):
            shutil.copy(f"{dataset}{s}", f"{prefix}{s}")
        _cut(Path(f"{prefix}{suffix}"), frac)
        before = tree_digest(prefix.parent)
        with pytest.raises(DataError) as exc:
            MMapIndexedDataset(str(prefix))
        assert str(prefix) in str(exc.value) and "\n" not in str(exc.value)
        assert tree_digest(prefix.parent) == before


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_truncated_data_through_yuanlfa_train(
    dataset: Path, tmp_path: Path, capsys, suffix: str
) -> None:
    from yuanlfa.cli.train import main as train

    prefix = tmp_path / "docs"
    for s in (".bin", ".idx"):
        shutil.copy(f"{dataset}{s}", f"{prefix}{s}")
    _cut(Path(f"{prefix}{suffix}"), 0.5)
    before = tree_digest(tmp_path)
    argv = ["--config", str(TINY), "--quiet", "--set", f"data.path={prefix}"]
    argv += ["data.num_workers=0", "train.steps=1", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    clean_error(train, argv, capsys, f"{prefix}{suffix}")
    assert tree_digest(tmp_path) == before


def test_truncated_sentencepiece_models_are_clean_errors(tmp_path: Path) -> None:
    # A subprocess: sentencepiece segfaults on some files, which must be refused before.
    text = tmp_path / "in.txt"
    text.write_text("hello world\n")
    for frac in CUTS:
        model = tmp_path / f"cut{frac}.model"
        model.write_bytes(SPM.read_bytes())
        _cut(model, frac)
        before = tree_digest(tmp_path)
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "yuanlfa.cli.preprocess", "--input", str(text)]
            + ["--output-prefix", str(tmp_path / "o" / "x"), "--quiet"]
            + ["--tokenizer", f"sentencepiece:{model}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert time.monotonic() - start < SECONDS
        err = done.stderr.strip()
        assert done.returncode == 2, (frac, done.returncode, err[-400:])
        assert "Traceback" not in err and len(err.splitlines()) == 1 and str(model) in err, err
        assert tree_digest(tmp_path) == before


def test_truncated_hugging_face_tokenizer_files_are_clean_errors(tmp_path: Path, capsys) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eod>"])
    tok.train_from_iterator(["hello world, hello tokenizer"] * 20, trainer)
    good = tmp_path / "good.json"
    tok.save(str(good))
    text = tmp_path / "in.txt"
    text.write_text("hello world\n")
    for frac in CUTS:
        directory = tmp_path / f"cut{frac}"
        directory.mkdir()
        shutil.copy(good, directory / "tokenizer.json")
        _cut(directory / "tokenizer.json", frac)
        before = tree_digest(tmp_path)
        argv = ["--input", str(text), "--output-prefix", str(tmp_path / "o" / "x"), "--quiet"]
        argv += ["--tokenizer", f"huggingface:{directory}"]
        clean_error(preprocess, argv, capsys, str(directory / "tokenizer.json"))
        assert tree_digest(tmp_path) == before


def test_truncated_configs_are_clean_errors_or_load(tmp_path: Path, capsys) -> None:
    # A YAML file cut anywhere is either still a valid config (cut at a line end) or one line
    # naming the file or the field; never a traceback.
    text = TINY.read_bytes()
    for cut in range(0, len(text), max(1, len(text) // 23)):
        path = tmp_path / "cut.yaml"
        path.write_bytes(text[:cut])
        capsys.readouterr()
        rc = info(["--config", str(path), "--json"])
        err = capsys.readouterr().err.strip()
        assert rc in (0, 2), (cut, rc, err)
        assert "Traceback" not in err
        if rc == 2:
            assert len(err.splitlines()) == 1 and err.startswith("yuanlfa-info: "), err


# ------------------------------------------------------------------- specific inputs, one each


def test_missing_metadata_and_data_file_are_named(checkpoints: Path, tmp_path: Path, capsys):
    for name in (".metadata", "__0_0.distcp"):
        src = copy_of(checkpoints / "ours", tmp_path / name)
        (src / "step_0000001" / name).unlink()
        forget_metadata()
        argv = ["--input", str(src), "--output", str(tmp_path / name / "o"), "--to", "hf"]
        clean_error(reshard, [*argv, "--quiet"], capsys, str(src / "step_0000001" / name))


def test_missing_hf_shard_is_named(checkpoints: Path, tmp_path: Path, capsys) -> None:
    src = copy_of(checkpoints / "hf", tmp_path)
    shard = src / "model-00001-of-00001.safetensors"
    shard.unlink()
    argv = ["--input", str(src), "--output", str(tmp_path / "o"), "--to", "yuanlfa", "--quiet"]
    clean_error(reshard, argv, capsys, str(shard))
    assert not (tmp_path / ".o.tmp").exists()


def test_missing_megatron_stage_directory_is_named(
    checkpoints: Path, tmp_path: Path, capsys
) -> None:
    src = copy_of(checkpoints / "meg", tmp_path)
    shutil.rmtree(src / "iter_0000001" / "mp_rank_00_001")
    argv = ["--input", str(src), "--output", str(tmp_path / "o"), "--to", "yuanlfa", "--quiet"]
    err = clean_error(reshard, argv, capsys, "mp_rank_00_001")
    assert "blocks" not in err


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_reshard_output_overlapping_the_input_is_refused_even_with_force(
    checkpoints: Path, tmp_path: Path, capsys, where: str
) -> None:
    src = copy_of(checkpoints / "meg", tmp_path)
    out = {"same": src, "inside": src / "converted", "contains": tmp_path}[where]
    before = tree_digest(tmp_path)
    argv = ["--input", str(src), "--output", str(out), "--to", "hf", "--force", "--quiet"]
    clean_error(reshard, argv, capsys, "--output", "input")
    assert tree_digest(tmp_path) == before


def test_reshard_output_that_is_a_file(checkpoints: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    argv = ["--input", str(checkpoints / "ours"), "--output", str(out), "--to", "hf"]
    clean_error(reshard, [*argv, "--force", "--quiet"], capsys, str(out), "is a file")
    assert out.read_text() == "keep me"


def test_megatron_of_another_model_with_force_keeps_the_output_and_leaves_no_debris(
    checkpoints: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "prev_import"
    out.mkdir()
    (out / "keep").write_text("previous import")
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_heads: 4\n")
    before = tree_digest(tmp_path)
    argv = ["--input", str(checkpoints / "meg"), "--output", str(out), "--to", "yuanlfa"]
    err = clean_error(
        reshard, [*argv, "--config", str(other), "--force", "--quiet"], capsys, "model_optim_rng"
    )
    assert "CheckpointException" not in err
    assert tree_digest(tmp_path) == before  # no .prev_import.tmp, the old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.yaml", "prev_import"]


@pytest.mark.parametrize("name", ["corpus.txt.gz", "corpus.jsonl.gz"])
def test_compressed_input_is_refused_by_preprocess_and_tokenizer_training(
    tmp_path: Path, capsys, name: str
) -> None:
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        f.write('{"text": "hello"}\n' * 100)
    before = tree_digest(tmp_path)
    out = str(tmp_path / "out" / "x")
    clean_error(preprocess, ["--input", str(path), "--output-prefix", out], capsys, name, "gunzip")
    argv = ["--input", str(path), "--output-prefix", out, "--vocab-size", "300"]
    clean_error(train_tokenizer, argv, capsys, name, "gzip")
    assert tree_digest(tmp_path) == before


def test_info_world_size_zero_names_the_flag(capsys) -> None:
    err = clean_error(info, ["--config", str(TINY), "--world-size", "0"], capsys, "--world-size")
    assert "parallel.dp" not in err


def test_duplicate_config_key_through_the_cli(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text() + "\ntrain:\n  steps: 3\n")
    clean_error(info, ["--config", str(path)], capsys, str(path), "'train'", "twice")


def test_sexagesimal_split_through_the_cli(capsys) -> None:
    clean_error(info, ["--config", str(TINY), "--set", "data.split=8:1:1"], capsys, "data.split")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("checkpoint.dir={file}", "checkpoint.dir"),
        ("logging.jsonl={dir}", "logging.jsonl"),
        ("logging.jsonl={file}/log.jsonl", "logging.jsonl"),
        ("logging.tensorboard_dir={file}/tb", "logging.tensorboard_dir"),
        ("data.cache_dir={file}", "data.cache_dir"),
        ("data.path={dir}/nothing", "data.path"),
        ("checkpoint.init_from={dir}/nothing", "checkpoint.init_from"),
    ],
)
def test_outputs_and_inputs_checked_before_work(
    tmp_path: Path, capsys, override: str, field: str
) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    text = override.format(file=file, dir=tmp_path)
    clean_error(info, ["--config", str(TINY), "--set", text], capsys, field)
    assert file.read_text() == "x"


def test_unwritable_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: let access() answer as for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: Path(p) != locked and real(p, m))
    for cfg, field in (
        ({"logging": {"jsonl": str(locked / "log.jsonl")}}, r"logging\.jsonl"),
        ({"checkpoint": {"dir": str(locked / "ckpt")}}, r"checkpoint\.dir"),
        ({"logging": {"tensorboard_dir": str(locked)}}, r"logging\.tensorboard_dir"),
    ):
        with pytest.raises(ConfigError, match=field + r".*not writable"):
            check_outputs(config_from_dict(cfg))


def test_yuanlfa_train_checks_outputs_before_work(tmp_path: Path, capsys) -> None:
    from yuanlfa.cli.train import main as train

    file = tmp_path / "ckpt"
    file.write_text("not a directory")
    argv = ["--config", str(TINY), "--quiet", "--set", f"checkpoint.dir={file}"]
    clean_error(train, argv, capsys, "checkpoint.dir", str(file))
    assert file.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_good_outputs_pass_and_create_nothing(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "checkpoint": {"dir": str(tmp_path / "a" / "ckpt")},
            "logging": {"jsonl": str(tmp_path / "b" / "log.jsonl")},
        }
    )
    check_outputs(cfg)
    check_inputs(cfg)
    assert list(tmp_path.iterdir()) == []


def _flash(**train: str) -> Config:
    return config_from_dict({"model": {"attention_backend": "flash"}, "train": train})


def test_flash_backend_checked_with_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"model\.attention_backend.*flash-attn"):
        check_backends(_flash(), cuda=True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"model\.attention_backend.*CUDA"):
        check_backends(_flash(), cuda=False)
    with pytest.raises(ConfigError, match=r"model\.attention_backend.*train\.device"):
        check_backends(_flash(device="cpu"), cuda=True)
    with pytest.raises(ConfigError, match=r"model\.attention_backend.*precision"):
        check_backends(_flash(precision="fp32"), cuda=True)
    check_backends(_flash(), cuda=True)
    check_backends(_flash(), cuda=None)  # yuanlfa-info: the device is not this machine
    with pytest.raises(ConfigError, match=r"train\.device"):
        check_backends(config_from_dict({"train": {"device": "cuda"}}), cuda=False)


# ----------------------------------------------------------------- the shared CLI error helper


def test_checkpoint_exception_is_unwrapped_to_its_cause(capsys) -> None:
    from yuanlfa.checkpoint import CheckpointError

    def body() -> int:
        inner = CheckpointError("/x/y.distcp: truncated")
        raise CheckpointException("CheckpointException ranks:{0}", {0: (inner, None)})

    assert common.run("yuanlfa-x", body) == 2
    assert capsys.readouterr().err == "yuanlfa-x: /x/y.distcp: truncated\n"


def test_a_bug_is_one_line_with_status_1_and_debug_shows_the_traceback(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def body() -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv("YUANLFA_DEBUG", raising=False)
    assert common.run("yuanlfa-x", body) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "ZeroDivisionError" in err and "--debug" in err
    monkeypatch.setenv("YUANLFA_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        common.run("yuanlfa-x", body)


def test_debug_flag_on_every_cli() -> None:
    # The real commands show the traceback with --debug (the error is raised, not printed).
    with pytest.raises(ConfigError):
        info(["--config", "/nonexistent.yaml", "--debug"])


def test_os_errors_name_the_path(capsys) -> None:
    def body() -> int:
        raise PermissionError(13, "Permission denied", "/root/out.bin")

    assert common.run("yuanlfa-x", body) == 2
    assert capsys.readouterr().err == "yuanlfa-x: /root/out.bin: permission denied\n"


# --------------------------------------------------------------------- files follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "latest", "step_0000001\n")
        with IndexedDatasetBuilder(tmp_path / "docs") as builder:
            builder.add_document([1, 2, 3])
    finally:
        os.umask(old)
    for name in ("latest", "docs.bin", "docs.idx"):
        mode = (tmp_path / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"


def test_checkpoint_and_conversion_files_follow_the_umask(checkpoints: Path) -> None:
    # The fixtures were written under the test process's umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in checkpoints.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_cluster_file_through_yuanlfa_train(tmp_path: Path, capsys) -> None:
    """``yuanlfa-train --cluster FILE`` replaces the config's cluster section: the file's own
    mistakes are named, before any data is read or any output written."""
    from yuanlfa.cli.train import main as train

    base = ["--config", str(TINY), "--quiet", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    clean_error(train, [*base, "--cluster", str(tmp_path / "none.yaml")], capsys, "none.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("groups:\n  - {device: h100-81g, nodes: 1, devices_per_node: 1}\n")
    clean_error(train, [*base, "--cluster", str(unknown)], capsys, "cluster.groups[0].device")
    two = tmp_path / "two.yaml"
    two.write_text("cluster:\n  groups:\n    - {device: cpu, nodes: 1, devices_per_node: 2}\n")
    message = clean_error(train, [*base, "--cluster", str(two)], capsys, "2 devices")
    assert "launch 2" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.yaml", "unknown.yaml"]  # no ckpt
