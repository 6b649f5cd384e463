"""Command lines built from typed dataclasses: the one idiom of every script of the project.

A script describes its settings once, as a dataclass whose fields carry their help text in :func:`option`; this
module turns that into an ``argparse`` parser and back into an instance of the dataclass::

    @dataclass
    class Settings:
        input_dir: Path = option(help="folder of .h5 files")                         # no default: required
        output_dir: Path = option("./out", help="where results go", aliases=("--output_root",))
        resolution: int = option(320, help="image side", unit="px", aliases=("--crop_size",))
        views: list[str] | None = option(None, help="views to keep")                 # a list
        overwrite: bool = option(False, help="recompute finished slices")            # a flag

    settings = cli.parse(Settings, argv)

What every such command line does:

- ``--help`` shows every option with its help text, unit and default (flags have none) and the script's docstring.
- The flag is ``--{field name}``; ``aliases`` are further names of the same setting (the house's consistent names
  beside the reference's, e.g. ``--output_dir`` and ``--output_root``).
- Lists (``list[X]``, ``tuple[X, ...]``) take space-separated values, commas accepted too: ``--views sax lax``,
  ``--views sax,lax`` and ``--views sax, lax`` are the same list.
- ``--config FILE`` reads a JSON object of the same fields (a run's ``run_config.json`` / ``settings.json``, or one
  written by hand; an alias without its dashes names its field too). Precedence: field default < file < values
  given on the command line. A key that is not a field is refused (one line naming every such key, exit status 2),
  except the keys a saved file records that are not settings (:data:`RECORDED_KEYS`, plus a dataclass's own
  ``CONFIG_RECORDED_KEYS``), which are ignored. A dataclass may translate the keys of its saved files with a
  ``config_from_saved(data) -> data`` classmethod (e.g. a saved ``save_png: true`` is the flag ``--no_png`` absent).
- A required option (a field without a default) makes the dataclass ``kw_only`` when it follows defaulted fields.
- Bad values (unknown flag, wrong type, not a choice, missing required option, unusable ``--config`` file) exit with
  status 2 and one ``{prog}: error: ...`` line (no usage block, no traceback).

A flag (a ``bool`` field, default ``False``) set to ``true`` in a ``--config`` file cannot be switched off on the
command line: edit the file. Arguments added to the parser by hand (``add_argument`` on the result of
:func:`build_parser`) keep working: their values are set as attributes on the returned dataclass and listed in
:attr:`Parsed.extras`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Keys that saved settings files record but that are not settings: the file's format version and content hashes.
#: ``--config`` ignores them (every other unknown key is refused).
RECORDED_KEYS: frozenset[str] = frozenset({"version", "hash", "sha256", "fingerprint"})

CONFIG_FLAG = "--config"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    aliases: Sequence[str] = (),
    choices: Iterable[Any] | None = None,
    unit: str | None = None,
    group: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    allow_empty: bool = False,
    split_commas: bool = True,
    positional: bool = False,
    default_text: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that carries its command-line description.

    Args:
        default: the value when neither the command line nor ``--config`` gives one; leave out for a required option.
            A mutable default (a list) is copied per instance.
        help: one sentence for ``--help``.
        aliases: more flag names of the same setting, e.g. ``("--output_root",)``.
        choices: the allowed values (of every element, for a list).
        unit: shown after the help text, e.g. ``"px"``, ``"ms"``.
        group: the ``--help`` section (the parser's ``group_titles`` may give it a longer title).
        metavar: the value's name in ``--help``.
        parse: converts one command-line token (default: the field's type, e.g. ``int``).
        allow_empty: a list option that may be given with no value (``--drop_metadata_keys`` alone = empty list).
        split_commas: a list whose values may hold commas themselves (``KEY=VALUE`` pairs) sets this False.
        positional: a positional argument instead of ``--name`` (lists only: ``make_metadata_stats.py a.csv b.csv``).
        default_text: how ``--help`` states the default when the value alone does not say it (e.g. ``"the run's
            own"`` for a ``None`` resolved later).
        default_factory: as :func:`dataclasses.field`.
    """
    meta = {"help": help, "aliases": tuple(aliases), "choices": None if choices is None else tuple(choices),
            "unit": unit, "group": group, "metavar": metavar, "parse": parse, "allow_empty": allow_empty,
            "split_commas": split_commas, "positional": positional, "default_text": default_text}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------------
# field types
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Kind:
    """What a field's annotation means for the command line."""

    base: Any  # element type for lists, else the type (int, float, str, Path, bool, tuple, dict)
    is_list: bool
    as_tuple: bool
    optional: bool


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(cls: type, f: dataclasses.Field) -> _Kind:
    annotation = _hints(cls)[f.name]
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return _Kind(args[0] if args else str, True, origin is tuple, optional)
        return _Kind(tuple, False, True, optional)  # a fixed-size tuple: needs a ``parse`` of its own
    return _Kind(origin or annotation, False, False, optional)


def _convert_token(kind: _Kind, f: dataclasses.Field, text: str) -> Any:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse(text)
    if kind.base is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    try:
        return kind.base(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid {kind.base.__name__} value: {text!r}") from None


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(_format_default(v) for v in value) if value else "empty"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


# ---------------------------------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------------------------------

class _ListAction(argparse.Action):
    """Collects space- and comma-separated values into one flat list (a repeated flag: the last one wins)."""

    def __init__(self, *args: Any, convert: Callable[[str], Any], allowed: tuple | None, split: bool = True,
                 as_tuple: bool = False, **kwargs: Any) -> None:
        self.convert = convert
        self.allowed = allowed
        self.split = split
        self.as_tuple = as_tuple
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        out = []
        for token in values if isinstance(values, list) else [values]:
            for part in token.split(",") if self.split else [token]:
                part = part.strip()
                if not part:
                    continue
                try:
                    value = self.convert(part)
                except argparse.ArgumentTypeError as err:
                    parser.error(f"argument {option_string or self.dest}: {err}")
                if self.allowed is not None and value not in self.allowed:
                    parser.error(f"argument {option_string or self.dest}: invalid choice: {value!r} (choose from "
                                 f"{', '.join(map(str, self.allowed))})")
                out.append(value)
        if not out and self.nargs == "+":
            parser.error(f"argument {option_string or self.dest}: expected at least one value")
        setattr(namespace, self.dest, tuple(out) if self.as_tuple else out)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``{prog}: error: ... (see --help)`` and exit status 2, no usage block."""

    def error(self, message: str) -> typing.NoReturn:
        fail(self.prog, f"{message} (see --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the script docstring's layout; the defaults are written into each help line by :func:`build_parser`."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=118)


def build_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    group_titles: Mapping[str, str] | None = None,
    config_help: str | None = None,
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one option per field of the dataclass ``cls``, plus ``--config FILE``.

    ``parser.parse_args([])`` gives the fields' defaults (``None`` for a required one, which :func:`parse` refuses);
    ``--help`` states each default in the help line.
    """
    parser = _Parser(prog=prog, description=description or cls.__doc__, formatter_class=_HelpFormatter)
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help=(config_help or "JSON object of these options (e.g. saved by an earlier run, or "
                              "written by hand); options given on the command line override it") + " (default: none)")
    titles = dict(group_titles or {})
    groups: dict[str | None, Any] = {None: parser}
    used = {f.metadata.get("group") for f in dataclasses.fields(cls)}
    for name, title in titles.items():  # sections in the order of group_titles (None: the main section), then others
        if name in used and name is not None:
            groups[name] = parser.add_argument_group(title)
    order = {name: i for i, name in enumerate(titles)}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: order.get(f.metadata.get("group"), len(order)))
    for f in ordered:  # options in the order of their sections (a subclass's fields come after its bases')
        if not f.init:
            continue
        meta = f.metadata
        group_name = meta.get("group")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(titles.get(group_name, group_name))
        target = groups[group_name]
        kind = _kind(cls, f)
        default = _field_default(f)
        help_text = meta.get("help", "")
        if meta.get("unit"):
            help_text += f" [{meta['unit']}]"
        names = [f"--{f.name}", *meta.get("aliases", ())]
        if kind.base is bool and not kind.is_list:
            if default not in (False, MISSING):
                raise TypeError(f"{cls.__name__}.{f.name}: a flag must default to False")
            target.add_argument(*names, dest=f.name, action="store_true", default=False, help=help_text)
            continue
        choices = meta.get("choices")
        if kind.is_list and choices:
            help_text += f" (choices: {', '.join(map(str, choices))})"
        if default is MISSING:
            help_text += " (required)"
        else:
            help_text += f" (default: {meta.get('default_text') or _format_default(default)})"
        shown = None if default is MISSING else default  # a required option is checked by parse_with_sources
        if kind.is_list:
            convert = (lambda text, k=kind, fl=f: _convert_token(k, fl, text))
            nargs = "*" if meta.get("allow_empty") or meta.get("positional") else "+"
            kwargs = dict(action=_ListAction, nargs=nargs, convert=convert, allowed=choices,
                          split=meta.get("split_commas", True), as_tuple=kind.as_tuple, default=shown,
                          help=help_text, metavar=meta.get("metavar") or f.name.upper().rstrip("S"))
            if meta.get("positional"):
                target.add_argument(f.name, **kwargs)
            else:
                target.add_argument(*names, dest=f.name, **kwargs)
        else:
            convert = (lambda text, k=kind, fl=f: _convert_token(k, fl, text))
            convert.__name__ = getattr(kind.base, "__name__", "value")  # argparse names the type in its errors
            target.add_argument(*names, dest=f.name, type=convert, choices=choices, default=shown,
                                metavar=meta.get("metavar") or (None if choices else f.name.upper()), help=help_text)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# parsing: defaults < --config file < command line
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Parsed:
    """The result of :func:`parse_with_sources`.

    Attributes:
        config: the dataclass instance.
        given: field names the command line gave explicitly.
        from_file: field names the ``--config`` file gave (after its translation).
        extras: values of arguments added to the parser by hand (not fields), by destination.
    """

    config: Any
    given: frozenset[str]
    from_file: frozenset[str]
    extras: dict[str, Any]

    @property
    def set_explicitly(self) -> frozenset[str]:
        """Field names that the command line or the ``--config`` file gave (not a default)."""
        return self.given | self.from_file


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be used (its message is one line, meant for the user)."""


def _coerce(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """A JSON value of the ``--config`` file as the field's type (``ConfigFileError`` when it is not one)."""
    kind = _kind(cls, f)
    choices = f.metadata.get("choices")

    def bad(expected: str) -> ConfigFileError:
        return ConfigFileError(f"{f.name}: expected {expected}, got {json.dumps(value)}")

    def one(v: Any) -> Any:
        base = kind.base
        if base is bool:
            if not isinstance(v, bool):
                raise bad("true or false")
            return v
        if base is int:
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
                raise bad("an integer")
            return int(v)
        if base is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("a number")
            return float(v)
        if base in (str, Path):
            if not isinstance(v, str):
                raise bad("a string")
            return f.metadata["parse"](v) if f.metadata.get("parse") else base(v)
        if f.metadata.get("parse") and isinstance(v, str):
            return f.metadata["parse"](v)
        if base is tuple and isinstance(v, list):
            return tuple(v)
        if base is dict and isinstance(v, dict):
            return dict(v)
        raise bad(getattr(base, "__name__", str(base)))

    if value is None:
        if kind.optional or _field_default(f) is None:
            return None
        raise bad("a value (not null)")
    if kind.is_list:
        if isinstance(value, str) and f.metadata.get("split_commas", True):  # "4,8" as on the command line
            try:
                out = [_convert_token(kind, f, v.strip()) for v in value.split(",") if v.strip()]
            except argparse.ArgumentTypeError as err:
                raise ConfigFileError(f"{f.name}: {err}") from None
        elif isinstance(value, list):
            out = [one(v) for v in value]
        else:
            raise bad("a list")
        if choices is not None and any(v not in choices for v in out):
            raise ConfigFileError(f"{f.name}: {out} holds a value not in {list(choices)}")
        return tuple(out) if kind.as_tuple else out
    out = one(value)
    if choices is not None and out not in choices:
        raise ConfigFileError(f"{f.name}: {out!r} is not one of {list(choices)}")
    return out


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings of a ``--config`` JSON file, as the fields of ``cls`` (typed, unknown keys refused).

    Raises:
        ConfigFileError: unreadable file, not a JSON object, a key that is not a field of ``cls`` (all such keys
            named), or a value of the wrong type.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigFileError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ConfigFileError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must hold a JSON object of settings, not {type(data).__name__}")
    translate = getattr(cls, "config_from_saved", None)
    if translate is not None:
        try:
            data = translate(dict(data))
        except ValueError as err:
            raise ConfigFileError(f"{path}: {err}") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    by_alias = {a.lstrip("-"): f.name for f in fields.values() for a in f.metadata.get("aliases", ())}
    for key in [k for k in data if k in by_alias and k not in fields]:  # a hand-written file may use an alias
        name = by_alias[key]
        if name in data:
            raise ConfigFileError(f"{path}: {key} and {name} are the same setting; give one")
        data[name] = data.pop(key)
    ignored = RECORDED_KEYS | frozenset(getattr(cls, "CONFIG_RECORDED_KEYS", ()))
    unknown = sorted(k for k in data if k not in fields and k not in ignored)
    if unknown:
        raise ConfigFileError(f"{path}: unknown setting(s) {', '.join(unknown)} (not options of this command)")
    out = {}
    for key, value in data.items():
        if key in fields:
            try:
                out[key] = _coerce(cls, fields[key], value)
            except ConfigFileError as err:
                raise ConfigFileError(f"{path}: {err}") from None
    return out


def fail(prog: str, message: str) -> typing.NoReturn:
    """A bad argument: one ``{prog}: error: ...`` line on stderr and exit status 2 (no usage dump, no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _exit(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    fail(parser.prog, message)


def _explicit(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """What the command line gave explicitly: a second parse with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_known_args(argv)[0])
    finally:
        for action, default in saved:
            action.default = default


def parse_with_sources(
    cls: type[T],
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    layers: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
) -> Parsed:
    """Parse ``argv`` into ``cls``: field defaults, then the ``--config`` file, then the command line.

    Args:
        cls: the dataclass.
        argv: the arguments (default: ``sys.argv[1:]``).
        parser: a parser from :func:`build_parser` (perhaps with arguments added by hand); default: a fresh one.
        layers: ``(from_file, given) -> values`` to put something between the file and the command line (e.g. a
            named preset); default: ``{**from_file, **given}``.

    Raises:
        SystemExit: status 2 with one line for bad arguments or an unusable ``--config`` file (0 for ``--help``).
    """
    parser = parser or build_parser(cls)
    args = None if argv is None else list(argv)
    namespace = vars(parser.parse_args(args))  # --help, and argparse's own errors (exit 2)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    config_path = namespace.pop("config", None)
    extras = {k: v for k, v in namespace.items() if k not in fields}
    given = {k: v for k, v in _explicit(parser, args).items() if k in fields}
    from_file: dict[str, Any] = {}
    if config_path is not None:
        try:
            from_file = read_config_file(cls, config_path)
        except ConfigFileError as err:
            _exit(parser, f"--config {err}")
    values = layers(from_file, given) if layers else {**from_file, **given}
    missing = [f"--{name}" if not f.metadata.get("positional") else name for name, f in fields.items()
               if name not in values and _field_default(f) is MISSING]
    if missing:
        _exit(parser, f"the following arguments are required: {', '.join(missing)}")
    try:
        config = cls(**values)
    except (TypeError, ValueError) as err:
        _exit(parser, " ".join(str(err).split()))
    for name, value in extras.items():  # hand-added arguments ride along (e.g. sharding options)
        setattr(config, name, value)
    return Parsed(config, frozenset(given), frozenset(from_file), extras)


def parse(cls: type[T], argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> T:
    """:func:`parse_with_sources` without the bookkeeping: just the dataclass instance."""
    return parse_with_sources(cls, argv, parser).config
