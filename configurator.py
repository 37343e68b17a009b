"""
Chapter: settings and the command line, shared by every script (train.py, eval.py, split.py, ...).

nanoGPT's convention, one for every CLI: a script's settings are one dataclass; config files (plain Python
assignments, e.g. config/demo_moe.py) and then `--key=value` arguments override its defaults, left to right.

    python train.py config/demo_dense.py --max_steps=100 --weights=sheared

A value is read as a Python literal when it is one (`100`, `2e-4`, `True`, `{'code': 0.5}`), else kept as
text (a path). Each value is checked against the field's type: `--max_steps=2.5` is refused, not rounded,
and a mistyped key gets "did you mean". A setting's valid range or choices are declared beside it:

    learning_rate: float = setting(2e-4, gt=0)
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))

and checked once, after the last override (`check_ranges`), for every script. Every float must be finite.
Code past this boundary trusts its settings; only checks that relate settings to data (a seq_len against
the model's positions) stay in the scripts.

User errors (bad input, not bugs) are raised as `UserError` anywhere in a script; `run_cli` prints them as
ONE line `script.py: error: ...` and exits with code 2. Anything else is a bug and keeps its traceback.
"""
import contextlib
import difflib
import math
import os
import sys
import types
import typing
from ast import literal_eval
from dataclasses import field, fields

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """Bad input from the user: a wrong path, a value out of range, a file that is not what it claims.
    The message names the input, what is wrong and the fix; `run_cli` prints it as one line, exit code 2."""


def need(ok, message):
    """Raise UserError(message) unless ok: the scripts' checks that relate settings to each other or to data."""
    if not ok:
        raise UserError(message)


@contextlib.contextmanager
def user_input(what):
    """Errors of the libraries that read an input (sample.py, model.py, ...) become one-line UserErrors
    naming `what` (e.g. "--src=PATH"), unless the message already does."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what}: {e}" if what not in str(e) else str(e)) from e


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    prog = os.path.basename(sys.argv[0]) or "python"
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)


def setting(default, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with its valid values declared beside it (None = any value of the type).
    Ranges apply to numbers; None as a value (for `int | None` fields) is always allowed."""
    return field(default=default, metadata=dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt))


def describe_range(m):
    """The declared range as text: 'one of a, b', '> 0', 'in [0, 1)'."""
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo = f"[{m['ge']}" if m.get("ge") is not None else f"({m['gt']}" if m.get("gt") is not None else None
    hi = f"{m['le']}]" if m.get("le") is not None else f"{m['lt']})" if m.get("lt") is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
    return ""


def in_range(value, m):
    if m.get("choices"):
        return value in m["choices"]
    return ((m.get("ge") is None or value >= m["ge"]) and (m.get("gt") is None or value > m["gt"]) and
            (m.get("le") is None or value <= m["le"]) and (m.get("lt") is None or value < m["lt"]))


def check_ranges(cfg):
    """Refuse a value outside its declared range, and any float that is nan or infinite."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name}={value} must be a finite number")
        if value is None or isinstance(value, bool) or not f.metadata:
            continue
        if not in_range(value, f.metadata):
            raise UserError(f"--{f.name}={value!r} must be {describe_range(f.metadata)}")
    return cfg


def parse_value(text):
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a path, a domain-weight string like 'a=0.5,b=0.5', ...


def _allowed_types(field):
    """The field's annotation as a tuple of plain types: `int | None` -> (int, NoneType)."""
    t = field.type
    if isinstance(t, str):  # postponed annotations: fall back to the default's type
        return None
    args = typing.get_args(t) if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union else (t,)
    return tuple(typing.get_origin(a) or a for a in args)


def set_key(cfg, key, value, where):
    """Set one setting after checking its name and type; the error names where the value came from."""
    by_name = {f.name: f for f in fields(cfg)}
    if key not in by_name:
        close = difflib.get_close_matches(key, list(by_name), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else \
            f"valid keys: {', '.join(by_name)}"
        raise UserError(f"unknown setting {key!r} ({where}): {hint}")
    allowed = _allowed_types(by_name[key]) or (type(getattr(cfg, key)),)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if str in allowed and not isinstance(value, str) and not any(isinstance(value, a) for a in allowed):
        value = str(value)  # --out=123 is a path named "123"
    ok = any((a is type(None) and value is None) or
             (a is not type(None) and isinstance(value, a) and not (a is int and isinstance(value, bool)))
             for a in allowed)
    if not ok:
        names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
        raise UserError(f"--{key} ({where}) must be {names}, got {value!r}")
    setattr(cfg, key, value)


def find_config_file(arg):
    """A config file as given, else relative to the project's folder (so scripts run from anywhere)."""
    if not arg.endswith(".py") and os.path.exists(arg):
        raise UserError(f"{arg!r}: config files are Python files (*.py); settings are passed as --key=value")
    for path in (arg, os.path.join(HERE, arg), os.path.join(HERE, "config", arg),
                 os.path.join(HERE, "config", arg + ".py")):
        if os.path.isfile(path):
            return path
    have = sorted(os.listdir(os.path.join(HERE, "config")))
    raise UserError(f"config file {arg!r} not found (configs in {os.path.join(HERE, 'config')}: {have}); "
                    f"settings are passed as --key=value")


def load_config(cfg, argv, doc="", aliases=None):
    """Apply config files and --key=value arguments to the dataclass instance `cfg`, left to right.
    `aliases` maps a bare flag to a setting, e.g. {"resume": ("init_from", "resume")}; a bare --flag
    otherwise switches a boolean on. -h / --help prints the doc and every key with its default."""
    aliases = aliases or {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc)
            print("settings (--key=value), defaults and valid values:\n" + "\n".join(
                f"  --{f.name}={getattr(cfg, f.name)!r}" + (f"  ({describe_range(f.metadata)})" if f.metadata else "")
                for f in fields(cfg)))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq and key in aliases:
                key, value = aliases[key]
            elif not eq and not isinstance(getattr(cfg, key, False), bool):
                raise UserError(f"{arg} needs a value: --{key}=VALUE (settings are passed as --key=value)")
            else:
                value = parse_value(text) if eq else True
            set_key(cfg, key, value, f"from {arg}")
        else:
            path = find_config_file(arg)
            namespace = {"__file__": path}
            try:
                with open(path, encoding="utf-8") as f:
                    exec(compile(f.read(), path, "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - whatever a config file does wrong is the user's to fix
                raise UserError(f"config file {path} cannot be run as Python ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}): fix the file") from None
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or isinstance(value, types.ModuleType):
                    continue  # helpers and imports inside a config file are not settings
                set_key(cfg, key, value, f"in {path}")
    return check_ranges(cfg)
