"""yuanlfa-convert-args: a Megatron-LM or Yuan 2.0 launch script (or a flag list) -> a YAML config.

Every flag of the script ends in exactly one of three lists: converted (a config key, written
with the flag it came from as a comment), already yuanlfa's behaviour, or not convertible (with
the reason). Nothing is dropped silently: the last two lists are written as comments under the
config and summarized on stderr. The flag table is ``yuanlfa.config.megatron_flags``.

    yuanlfa-convert-args pretrain_yuan2.0_2.1B.sh -o yuan2-2b.yaml
    yuanlfa-convert-args --flags "--num-layers 24 --hidden-size 2048 --swiglu"
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from yuanlfa.cli.common import add_debug_arg, run
from yuanlfa.config import Config, ConfigError, config_from_dict
from yuanlfa.config.megatron_flags import ABSENT, ABSENT_DEFAULTS, BY_FLAG

_MISSING = object()


@dataclass
class Conversion:
    """The result: config keys with their source flags, and every flag not converted."""

    values: dict[str, object] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    # (flag with its values, why): flags that state what yuanlfa always does.
    same: list[tuple[str, str]] = field(default_factory=list)
    # (flag with its values, why): flags (or absent flags' defaults) yuanlfa cannot reproduce.
    unconverted: list[tuple[str, str]] = field(default_factory=list)

    def nested(self) -> dict[str, dict[str, object]]:
        """{section: {key: value}} in the schema's order of sections and keys."""
        out: dict[str, dict[str, object]] = {}
        for section, cls in typing.get_type_hints(Config).items():
            names = [f.name for f in fields(cls)]
            keys = {n: self.values.get(f"{section}.{n}", _MISSING) for n in names}
            keys = {n: v for n, v in keys.items() if v is not _MISSING}
            if keys:
                out[section] = keys
        return out


# --- reading a launch script -------------------------------------------------------------------

_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)$")
_LAUNCHERS = ("torchrun", "python", "python3", "deepspeed", "srun", "mpirun", "exec")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:\[@\]|\[\*\])?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _assignments(text: str) -> dict[str, str]:
    """Shell variables: NAME=value, NAME="multi-line words", NAME=( array ); raw text."""
    variables: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _ASSIGN.match(lines[i])
        i += 1
        if not match:
            continue
        name, append, rest = match.group(1), match.group(2), match.group(3)
        before = variables.get(name, "") + "\n" if append else ""
        for opener, closer in (("(", ")"), ('"', '"'), ("'", "'")):
            if rest.startswith(opener) and not _closed(rest[1:], closer):
                body = [rest[1:]]
                while i < len(lines) and not _closed(lines[i], closer):
                    body.append(lines[i])
                    i += 1
                if i < len(lines):
                    body.append(lines[i].split(closer, 1)[0])
                    i += 1
                variables[name] = before + "\n".join(body)
                break
        else:
            if rest[:1] in "(\"'":
                closer = rest[0] if rest[0] != "(" else ")"
                variables[name] = before + rest[1:].rsplit(closer, 1)[0]
            else:
                # NAME=<Specify path> and NAME=value # comment: one word for the launch line.
                variables[name] = shlex.quote(rest.split(" #", 1)[0].strip())
    return variables


def _closed(text: str, closer: str) -> bool:
    return closer in text.split("#", 1)[0] if closer == ")" else closer in text


def _expand(text: str, variables: dict[str, str], depth: int = 0) -> str:
    if depth > 8:
        return text

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            return m.group(0)
        return _expand(variables[name], variables, depth + 1)

    return _VAR.sub(sub, text)


def _words(text: str) -> list[str]:
    # Per line, so that a '#' comment inside an array or a quoted variable ends at its line.
    words: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            words += shlex.split(line, comments=True)
        except ValueError:
            words += line.split("#", 1)[0].split()
    return [w for w in words if w != "\\"]


def flags_from_script(text: str) -> list[str]:
    """The words passed to the training script (after ``something.py``) on the launch line
    (torchrun / python / deepspeed ...), variables expanded."""
    variables = _assignments(text)
    for line in reversed(text.replace("\\\n", " ").splitlines()):
        words = line.split("#", 1)[0].split()
        if not words or words[0] not in _LAUNCHERS:
            continue
        expanded = _words(_expand(line, variables))
        for i, word in enumerate(expanded):
            if word.endswith(".py"):
                return expanded[i + 1 :]
    raise ConfigError(
        "no launch line (torchrun/python/deepspeed running a .py script) found; pass the "
        "flags with --flags '...' instead"
    )


def parse_flags(words: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Group words into flags and their values, in order; words before any flag are refused."""
    order: list[str] = []
    flags: dict[str, list[str]] = {}
    current: str | None = None
    for word in words:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            current = name.replace("_", "-")
            if current not in flags:
                order.append(current)
            flags[current] = [value] if eq else []
        elif current is None:
            raise ConfigError(f"{word!r} comes before any --flag; pass flags only")
        else:
            flags[current].append(word)
    return order, flags


# --- converting ---------------------------------------------------------------------------------


def convert(words: list[str]) -> Conversion:
    """Map flags (as words) to config keys; nothing is dropped without a reason."""
    order, flags = parse_flags(words)
    out = Conversion()
    for name in order:
        values = flags[name]
        shown = " ".join([name, *values])
        entry = BY_FLAG.get(name)
        if entry is None:
            out.unconverted.append((shown, "unknown to yuanlfa-convert-args: check it by hand"))
        elif entry.kind == "no":
            out.unconverted.append((shown, entry.why))
        elif entry.kind == "same":
            if entry.accepted is None or (values and values[0] in entry.accepted):
                out.same.append((shown, entry.why))
            else:
                want = " or ".join(entry.accepted)
                out.unconverted.append((shown, f"yuanlfa supports only {want}: {entry.why}"))
        else:
            result = _mapped(entry, values, flags)
            if isinstance(result, str):
                out.unconverted.append((shown, result))
            else:
                for key, value in result.items():
                    out.values[key] = value
                    out.sources[key] = shown
                if not result:
                    out.same.append((shown, "resumes from checkpoint.dir, the --save path"))
    for alternatives, why in ABSENT:
        if not any(a in flags for a in alternatives):
            out.unconverted.append((f"(no {' / '.join(alternatives)})", why))
    for flag, key, value in ABSENT_DEFAULTS:
        if flag not in flags and key not in out.values:
            out.values[key] = value
            out.sources[key] = f"no {flag}: Megatron's default"
    return out


def _mapped(entry, values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    if entry.convert is not None:
        try:
            return entry.convert(values, flags)
        except (ValueError, IndexError):
            # A number that is not one (an unexpanded $VAR, a missing value): listed, not fatal.
            return f"cannot read its value {' '.join(values)!r}"
    if entry.const is not None:
        if values:
            return f"takes no value, got {' '.join(values)!r}"
        return {entry.keys[0]: entry.const}
    if len(values) != 1:
        return f"expects one value, got {len(values)}"
    return {entry.keys[0]: _scalar(values[0])}


def _scalar(text: str) -> object:
    """A flag's value typed as the shell meant it: 24 and 1e-1 are numbers (YAML 1.1 would keep
    1e-1 a string, which the strict config loader refuses for a number field), the rest text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_loads(conv: Conversion) -> None:
    """Load the converted keys as yuanlfa-train will (a ConfigError if they do not) and keep
    the loaded, typed values (0.3e-5 as a number, a block list as a list).

    A tokenizer file that is not on this machine (the scripts' ``<Specify path>``) is not the
    conversion's fault: it is checked as byte here and named in the output."""
    data = conv.nested()
    tokenizer = str(data.get("data", {}).get("tokenizer", ""))
    if ":" in tokenizer and not Path(tokenizer.split(":", 1)[1]).exists():
        data["data"] = {**data["data"], "tokenizer": "byte"}
        conv.unconverted.append(
            (f"data.tokenizer: {tokenizer}", "this file does not exist here; fix the path")
        )
    cfg = config_from_dict(data)
    for key in conv.values:
        if key == "data.tokenizer":
            continue
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        conv.values[key] = list(value) if isinstance(value, tuple) else value


def render(conv: Conversion, source: str) -> str:
    """The YAML config with the source flag of each key, then the flags not converted."""
    lines = [f"# Converted by yuanlfa-convert-args from {source}."]
    for section, keys in conv.nested().items():
        lines.append(f"{section}:")
        for name, value in keys.items():
            text = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
            text = text[1:-1] if text.startswith("{") else text
            lines.append(f"  {text:<40} # {conv.sources[f'{section}.{name}']}")
    if conv.same:
        lines.append("")
        lines.append(f"# Already how yuanlfa works ({len(conv.same)}):")
        lines += [f"#   {flag}: {why}" for flag, why in conv.same]
    if conv.unconverted:
        lines.append("")
        lines.append(f"# NOT converted ({len(conv.unconverted)}): check each before training")
        lines += [f"#   {flag}: {why}" for flag, why in conv.unconverted]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="yuanlfa-convert-args",
        description="Convert a Megatron-LM / Yuan 2.0 launch script or flag list to a config.",
    )
    parser.add_argument("script", nargs="?", help="launch script (.sh); '-' reads stdin")
    parser.add_argument("--flags", help="a flag list instead of a script, e.g. '--lr 2e-4 ...'")
    parser.add_argument("-o", "--output", help="write the YAML here (default: stdout)")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any flag could not be converted"
    )
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-convert-args", lambda: _run(args), args)


def _run(args: argparse.Namespace) -> int:
    if (args.script is None) == (args.flags is None):
        raise ConfigError("give a launch script or --flags '...', one of the two")
    if args.flags is not None:
        words, source = shlex.split(args.flags, comments=True), "a flag list"
    elif args.script == "-":
        words, source = flags_from_script(sys.stdin.read()), "stdin"
    else:
        path = Path(args.script)
        if not path.is_file():
            raise ConfigError(f"launch script {args.script!r} not found")
        words, source = flags_from_script(path.read_text(errors="replace")), path.name
    conv = convert(words)
    check_loads(conv)
    text = render(conv, source)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    print(
        f"converted {len(conv.sources)} keys; {len(conv.same)} flags already yuanlfa's "
        f"behaviour; {len(conv.unconverted)} not converted (listed in the YAML's comments)",
        file=sys.stderr,
    )
    for flag, why in conv.unconverted:
        print(f"  not converted: {flag}: {why}", file=sys.stderr)
    return 1 if args.strict and conv.unconverted else 0


if __name__ == "__main__":
    sys.exit(main())
