"""YAML files written by people, validated by pydantic, with errors that point at a line.

A technician with little training edits these files. Every problem is reported, not
just the first, as ``FILE:LINE: path.to.field: what is wrong (got X; allowed Y)``,
and an unknown key comes with a "did you mean" suggestion.
"""
from __future__ import annotations

import difflib
import reprlib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[Any, ...]


class YamlError(Exception):
    """All the problems found in one file, each already formatted with file and line."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def load_yaml(path: str | Path, text: str | None = None) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML and map every key/item path to its 1-based line."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise YamlError([f"{path}: file not found"]) from None
        except (OSError, UnicodeDecodeError) as e:
            raise YamlError([f"{path}: cannot read: {e}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlError([f"{path}:{line}: YAML syntax: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise YamlError([f"{path}: YAML syntax: {e}"]) from None
    except RecursionError:  # "[[[[..." thousands deep: PyYAML's composer recurses
        raise YamlError([f"{path}: YAML nested too deeply"]) from None
    except (ValueError, OverflowError) as e:  # a scalar PyYAML cannot build: 2026-13-01, 5000 digits
        bad = _unbuildable(node)
        where = f"{path}:{bad.start_mark.line + 1}: " if bad is not None else f"{path}: "
        got = f" (got {_short(bad.value)})" if bad is not None else ""
        raise YamlError([f"{where}cannot read this value: {e}{got}"]) from None
    lines: dict[Loc, int] = {}
    dups: list[str] = []
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _walk(node, (), lines, dups, path, set())
    if dups:
        raise YamlError(dups)
    return data, lines


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[str], path: Path,
          walked: set[int]) -> None:
    # an alias reuses its anchor's node: walk each node once, or nested aliases
    # ("billion laughs") take exponential time and a recursive anchor never ends
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else str(knode.start_mark)
            sub = (*loc, key)
            if key in seen:
                dups.append(
                    f"{path}:{knode.start_mark.line + 1}: {dotted(sub)}: key given twice "
                    "(the later value would silently win; keep one)"
                )
            seen.add(key)
            lines[sub] = knode.start_mark.line + 1
            _walk(vnode, sub, lines, dups, path, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*loc, i)
            lines[sub] = item.start_mark.line + 1
            _walk(item, sub, lines, dups, path, walked)


def _unbuildable(root: yaml.Node | None) -> yaml.ScalarNode | None:
    """The first scalar node whose value PyYAML's safe constructor refuses."""
    stack, seen = [root] if root is not None else [], set()
    builder = yaml.SafeLoader("")
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                builder.construct_object(node)
            except (ValueError, OverflowError, yaml.YAMLError):
                return node
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for kv in reversed(node.value) for n in reversed(kv))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


def dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def line_for(lines: dict[Loc, int], loc: Loc) -> int:
    """Line of the deepest known prefix of `loc` (a missing key points at its parent)."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)


def _short(value: Any, limit: int = 60) -> str:
    # reprlib bounds the work: a YAML alias bomb is a small graph with a huge repr()
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses > 4300 digits
        return f"an integer of {value.bit_length()} bits"
    try:
        r = repr(value) if isinstance(value, str | int | float | bool | None) else reprlib.repr(value)
    except ValueError:  # a huge int inside a list
        r = f"a {type(value).__name__}"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _field_names_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model reached by walking `loc`, for "did you mean" hints."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            f = tp.model_fields.get(part)
            if f is None:
                return []
            tp = f.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """Optional[X] / X | None / Annotated[X, ...] -> X (first model in a union)."""
    for _ in range(5):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else (args[0] if args else Any)
        else:
            break
    return tp


def _clean_loc(loc: Loc) -> Loc:
    # pydantic inserts validator/tag names into locations; keep only data keys
    return tuple(p for p in loc if isinstance(p, int) or not (
        "[" in str(p) or str(p).startswith(("function-", "tagged-union", "literal["))
    ))


def format_validation_error(
    path: Path, err: ValidationError, lines: dict[Loc, int], model: type[BaseModel]
) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = _clean_loc(e["loc"])
        etype = e["type"]
        ctx = e.get("ctx") or {}
        line = line_for(lines, loc)
        if etype == "extra_forbidden":
            key = loc[-1] if loc else "?"
            allowed = _field_names_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            msg = f"unknown key {key!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            if allowed:
                msg += f"; allowed keys: {', '.join(allowed)}"
        elif etype == "missing":
            msg = "required key is missing"
        elif etype in ("value_error", "assertion_error"):
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if not isinstance(e.get("input"), dict | list):
                msg += f" (got {_short(e.get('input'))})"
        else:
            msg = e["msg"]
            allowed = _allowed_text(etype, ctx)
            got = _short(e.get("input"))
            msg = f"{msg} (got {got}" + (f"; allowed {allowed})" if allowed else ")")
        out.append(f"{path}:{line}: {dotted(loc)}: {msg}")
    return out


def _allowed_text(etype: str, ctx: dict) -> str:
    if "expected" in ctx:
        return str(ctx["expected"])
    bounds = []
    for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if k in ctx:
            bounds.append(f"{sym} {ctx[k]}")
    if bounds:
        return " and ".join(bounds)
    if "pattern" in ctx:
        return f"text matching {ctx['pattern']}"
    if "min_length" in ctx or "max_length" in ctx:
        return f"length {ctx.get('min_length', 0)}..{ctx.get('max_length', '')}"
    if etype.startswith(("int_", "float_")):
        return "a number"
    if etype.startswith("bool"):
        return "true or false"
    if etype.startswith("string"):
        return "text"
    if etype.startswith("list"):
        return "a list"
    if etype.startswith(("dict", "model")):
        return "a mapping of keys"
    return ""


def load_model(path: str | Path, model: type[M], *, context: dict | None = None,
               text: str | None = None) -> M:
    """Load and validate; raise YamlError listing every problem with its line."""
    path = Path(path)
    data, lines = load_yaml(path, text)
    if data is None:
        raise YamlError([f"{path}:1: the file is empty"])
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise YamlError(format_validation_error(path, err, lines, model)) from None
