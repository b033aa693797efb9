"""Typed config schemas: dataclass fields with a doc string and allowed ranges, YAML -> dataclass coercion, range
checks, ``--set key.sub=value`` overrides, ``${VAR:-default}`` expansion and a generated markdown key reference.

A config class is a plain dataclass whose fields are made with :func:`option`::

    @dataclass
    class TrainConfig:
        lr: float = option(0.01, doc="peak learning rate after warm-up", gt=0)

:func:`from_dict` turns a parsed YAML mapping into such an object (unknown keys and wrong types are errors naming
``prefix.key``), :func:`check` tests every field against its range / choices (for lists: every element), and a
class's own ``validate(prefix)`` adds the cross-field rules (e.g. an HU window ``lo < hi``). Every error is a
``ValueError`` whose message is one sentence naming the key, e.g. ``data.std[0] must be > 0, got 0``.

Why hand-written rather than pydantic: this is the lowest layer of the library (models, engine and applications
import it), so it stays on the standard library plus PyYAML; the whole job is ~300 lines; and the messages keep our
one-sentence ``key must be ..., got ...`` form instead of pydantic's multi-line error reports, which the CLI would
have to re-format. Plain dataclasses also keep ``dataclasses.asdict`` / ``Cls(**d)`` working for the configs stored
inside shipped model files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Callable, Iterable, Sequence

import yaml

__all__ = ["option", "from_dict", "check", "apply_overrides", "build_config", "expand_env", "reference", "field_doc"]

_META = "medetect"  # key of our metadata inside dataclasses.field(metadata=...)


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    path: bool = False,
) -> Any:
    """A ``dataclasses.field`` carrying a doc string and the allowed values.

    ``gt / ge / lt / le``: numeric bounds (for a list: of every element, nested lists included); ``choices``: allowed
    values (for a list: of every element); ``path``: a file or folder (``${VAR}`` / ``${VAR:-default}`` expanded and,
    when relative, resolved against the YAML file's folder by :func:`resolve_paths`)."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le,
            "choices": tuple(choices) if choices is not None else None, "path": path}
    kw: dict[str, Any] = {"metadata": {_META: meta}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        if isinstance(default, (list, dict, set)):
            value = default
            kw["default_factory"] = lambda: _copy(value)
        else:
            kw["default"] = default
    return dataclasses.field(**kw)


def _copy(v: Any) -> Any:
    if isinstance(v, list):
        return [_copy(x) for x in v]
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    return v


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get(_META, {})


def field_doc(cls: type, name: str) -> str:
    """The doc string of field ``name`` of config class ``cls`` ('' when it has none)."""
    return next((_meta(f).get("doc", "") for f in dataclasses.fields(cls) if f.name == name), "")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ============================================================================================ types


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def _optional(tp: Any) -> bool:
    return tp is Any or (_is_union(tp) and type(None) in typing.get_args(tp))


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {float: "number", int: "integer", bool: "true/false", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _expected(tp: Any) -> str:
    """``tp`` as the object of "must be ...": a number, an integer, a list of number or a number, ..."""
    if _is_union(tp):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return f"a {_type_name(tp)}"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, "a mapping")


def _hints(cls: type) -> dict[str, Any]:
    """Field types of a config dataclass; each inherited field's annotation is read in its own class's module (a
    task's config may extend another's)."""
    return typing.get_type_hints(cls)


# ============================================================================================ from_dict


_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key} must be {_expected(tp)}, got null")
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:
                continue
        raise ValueError(f"{key} must be {_expected(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, base=base)
    if value is None:
        raise ValueError(f"{key} must be {_expected(tp)}, got null")
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string: accept exponent numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be {_expected(tp)}, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, raw: Any, prefix: str = "", base: Any = None) -> Any:
    """``cls(**raw)`` with every value coerced to its field's type (ints become floats where a float is expected,
    nested dataclasses are built recursively). Keys not in ``raw`` keep the value of ``base`` (an instance of
    ``cls``) or, without one, the field's default; a nested section starts from its field's default object, so a
    section whose default is not its class's defaults (LUNA's detector) is only changed where ``raw`` says.
    ``None`` (an empty YAML section) gives the defaults. Unknown keys and wrong types are errors naming
    ``prefix.key``; ranges are not checked here (see :func:`check`)."""
    if raw is None:
        return base if base is not None else cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix or 'the config'} must be a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in set(raw) - set(names))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ValueError(f"unknown config key {_join(prefix, unknown[0])}; allowed keys{where}: {sorted(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in raw.items():
        sub = None
        if (v is None or isinstance(v, dict)) and dataclasses.is_dataclass(hints[k]):  # from the section's default
            sub = getattr(base, k) if base is not None else _field_default(fields[k])
            sub = sub if dataclasses.is_dataclass(sub) else None
        kw[k] = _coerce(v, hints[k], _join(prefix, k), base=sub)
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)


# ============================================================================================ check


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def _check_value(v: Any, meta: dict, key: str) -> None:
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_value(x, meta, f"{key}[{i}]")
        return
    if v is None:
        return
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {_fmt(v)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    for _op, bound, ok in (
        (">", meta.get("gt"), lambda a, b: a > b),
        (">=", meta.get("ge"), lambda a, b: a >= b),
        ("<", meta.get("lt"), lambda a, b: a < b),
        ("<=", meta.get("le"), lambda a, b: a <= b),
    ):
        if bound is not None and not ok(v, bound):  # NaN fails every comparison
            raise ValueError(f"{key} must be {_range_text(meta)}, got {_fmt(v)}")


def _range_text(meta: dict) -> str:
    lo = (">", meta["gt"]) if meta.get("gt") is not None else (">=", meta["ge"]) if meta.get("ge") is not None else None
    hi = ("<", meta["lt"]) if meta.get("lt") is not None else ("<=", meta["le"]) if meta.get("le") is not None else None
    if lo and hi:
        left = "(" if lo[0] == ">" else "["
        right = ")" if hi[0] == "<" else "]"
        return f"in {left}{_fmt(lo[1])}, {_fmt(hi[1])}{right}"
    op, b = lo or hi
    return f"{op} {_fmt(b)}"


def check(obj: Any, prefix: str = "") -> None:
    """Check every field of the config object ``obj`` against its :func:`option` range / choices (for lists: every
    element) and its type's nullability (``None`` only for ``Optional`` fields). Nested config objects are checked
    through their own ``validate(prefix)`` when they have one (which should call :func:`check` itself), otherwise
    through :func:`check`. Raises ``ValueError`` naming the key (e.g. ``data.std[0] must be > 0, got 0``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = _join(prefix, f.name)
        v = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        if v is None:
            if not _optional(tp):
                raise ValueError(f"{key} must be {_expected(tp)}, got null")
            continue
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            validate = getattr(v, "validate", None)
            validate(key) if callable(validate) else check(v, key)
            continue
        _check_value(v, _meta(f), key)


# ============================================================================================ overrides


def _parse_set(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"--set {item!r} must have the form key.sub=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ValueError(f"--set {item!r} has an empty key (expected key.sub=value)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--set {key}: the value {text!r} is not valid YAML ({first})") from e
    return [p.strip() for p in parts], value


def _schema_of(cls: type | None, parts: list[str], item: str) -> None:
    """Raise when the dotted key ``parts`` names no field of ``cls`` (nested dataclasses followed)."""
    if cls is None:
        return
    tp: Any = cls
    for depth, p in enumerate(parts):
        # Optional[Dataclass] -> Dataclass
        if _is_union(tp):
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            tp = inner[0] if inner else tp
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is dict:
                return  # free-form mapping: any sub-key
            where = ".".join(parts[:depth])
            raise ValueError(f"--set {'.'.join(parts)}: {where} is a {_type_name(tp)}, it has no sub-key {p!r}")
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if p not in names:
            where = ".".join(parts[:depth])
            raise ValueError(f"--set {'.'.join(parts)}: unknown config key {'.'.join(parts[:depth + 1])}; "
                             f"allowed keys{' in ' + where if where else ''}: {sorted(names)}")
        tp = _hints(tp)[p]


def apply_overrides(raw: dict, sets: Iterable[str], schema: type | None = None) -> dict:
    """A copy of the parsed YAML mapping ``raw`` with ``--set key.sub=value`` overrides applied (``value`` is parsed
    as YAML: ``lr=1e-3``, ``levels=[2, 3]``, ``cache_dir=null``). With ``schema`` (the config class), a key that
    names no field is an error naming it; without, unknown keys are caught later by :func:`from_dict`."""
    out = _copy(raw if raw is not None else {})
    if not isinstance(out, dict):
        raise ValueError(f"the config must be a mapping of keys, got {type(out).__name__}")
    for item in sets:
        parts, value = _parse_set(item)
        _schema_of(schema, parts, item)
        node = out
        for depth, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {'.'.join(parts)}: {'.'.join(parts[:depth + 1])} is not a mapping "
                                 f"(it is {nxt!r})")
            node = nxt
        node[parts[-1]] = value
    return out


# ============================================================================================ env expansion, paths

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, key: str = "value", env: typing.Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (default when VAR is unset or empty, as in the shell). An unset
    ``${VAR}`` without a default is an error naming ``key``. ``$VAR`` without braces is left alone."""
    env = os.environ if env is None else env

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        val = env.get(name)
        if val:
            return val
        if default is not None:
            return default
        raise ValueError(f"{key}: environment variable {name} is not set (write ${{{name}:-default}} to give a default)")

    return _VAR.sub(sub, text)


def resolve_paths(obj: Any, base_dir: os.PathLike | str | None, prefix: str = "") -> None:
    """In place: expand ``${VAR}`` in every ``path=True`` field (nested configs included) and make relative paths
    absolute against ``base_dir`` (the YAML file's folder; ``None`` leaves them relative)."""
    from pathlib import Path

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            resolve_paths(v, base_dir, key)
            continue
        if not _meta(f).get("path") or v is None:
            continue

        def one(s: str, k: str) -> str:
            s = expand_env(s, k)
            if s and base_dir is not None and not Path(s).expanduser().is_absolute():
                return str((Path(base_dir) / s).resolve())
            return str(Path(s).expanduser()) if s else s

        if isinstance(v, list):
            setattr(obj, f.name, [one(s, f"{key}[{i}]") for i, s in enumerate(v)])
        else:
            setattr(obj, f.name, one(v, key))


# ============================================================================================ reference


def _default_text(v: Any) -> str:
    if v is dataclasses.MISSING:
        return "(required)"
    return "`" + yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip() + "`"


def _allowed_text(meta: dict) -> str:
    parts = []
    if any(meta.get(k) is not None for k in ("gt", "ge", "lt", "le")):
        parts.append(_range_text(meta))
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    if meta.get("path"):
        parts.append("path (relative to the YAML; `${VAR:-default}` expanded)")
    return "; ".join(parts)


def reference(cls: type, prefix: str = "") -> str:
    """A markdown table of every key of ``cls`` (nested sections flattened to dotted keys): key, type, default,
    allowed range / choices, doc. Defaults are read from ``cls()`` when it can be built without arguments, so a
    section whose default differs from its class's defaults (e.g. LUNA's detector) shows the real values."""
    try:
        instance = cls()
    except TypeError:
        instance = None
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    rows += _rows(cls, prefix, instance)
    return "\n".join(rows) + "\n"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _rows(cls: type, prefix: str, instance: Any) -> list[str]:
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = _join(prefix, f.name)
        meta = _meta(f)
        value = getattr(instance, f.name) if instance is not None else _field_default(f)
        doc = meta.get("doc", "").replace("|", "\\|").replace("\n", " ")
        if dataclasses.is_dataclass(tp):
            out.append(f"| `{key}` | section | | | {doc} |")
            out += _rows(tp, key, value if value is not dataclasses.MISSING else None)
            continue
        cells = [_type_name(tp), _default_text(value), _allowed_text(meta)]
        cells = [c.replace("|", "\\|") for c in cells]
        out.append(f"| `{key}` | {cells[0]} | {cells[1]} | {cells[2]} | {doc} |")
    return out


def build_config(cls: type, raw: Any, base_dir: os.PathLike | str | None = None) -> Any:
    """The checked config object of schema ``cls`` for a parsed mapping ``raw``: the schema's own ``prepare(raw)``
    hook first (older key spellings), then :func:`from_dict`, paths expanded and resolved against ``base_dir``, and
    ``validate()``. Every mistake is a ``ValueError`` naming the key."""
    prepare = getattr(cls, "prepare", None)
    if prepare is not None:
        raw = prepare(raw)
    cfg = from_dict(cls, raw)
    resolve_paths(cfg, base_dir)
    cfg.validate()
    return cfg
