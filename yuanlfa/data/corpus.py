"""The embedded default corpus: the running interpreter's standard library sources.

Real text that exists wherever Python does, so training works out of the box with nothing to
download. It is tokenized once into a cache directory and reused.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from yuanlfa.data.indexed_dataset import DataError
from yuanlfa.data.preprocess import preprocess_files
from yuanlfa.data.special_tokens import Tokenizer
from yuanlfa.data.tokenizer import build_tokenizer

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone keeps concurrent builders safe.
    fcntl = None  # type: ignore[assignment]

# A fixed list keeps the corpus (about 7-8 MB) the same from run to run and machine to machine.
STDLIB_PACKAGES = (
    "asyncio",
    "collections",
    "concurrent",
    "email",
    "html",
    "http",
    "importlib",
    "json",
    "logging",
    "multiprocessing",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
    "xmlrpc",
)
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def default_corpus_files() -> list[Path]:
    """The ``.py`` files of the stdlib root and of STDLIB_PACKAGES, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    for package in STDLIB_PACKAGES:
        base = root / package
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise DataError(
            f"no Python sources found in {root} (this interpreter ships without them); "
            "give your own data with data.path or yuanlfa-preprocess --input"
        )
    return files


def default_cache_dir() -> Path:
    env = os.environ.get("YUANLFA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "yuanlfa"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_default_corpus(
    tokenizer: Tokenizer | str,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> str:
    """The ``.bin``/``.idx`` prefix of the default corpus, tokenizing it first if needed.

    Safe when several processes (e.g. all ranks of a job) call it at once: one builds under a
    file lock while the others wait, then find the finished pair.
    """
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{tokenizer.name}"
    prefix = cache / name

    def ready() -> bool:
        # Not with_suffix: the name's "py3.11" already contains a dot.
        return all(os.path.isfile(f"{prefix}{ext}") for ext in (".bin", ".idx"))

    if ready():
        return str(prefix)
    with _locked(cache / f"{name}.lock"):
        if not ready():
            # force: a crash between the two renames can leave a lone .bin behind.
            preprocess_files(
                default_corpus_files(), prefix, tokenizer, progress=progress, force=True
            )
    return str(prefix)
