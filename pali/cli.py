"""Command-line flags derived from a config dataclass: one field, one flag, its docstring as the help.

    parser = argparse.ArgumentParser(...)
    add_config_flags(parser, TrainConfig, groups={"data": ("data", "eval_data")}, skip={"model_overrides"})
    cfg = config_from_args(TrainConfig, parser.parse_args())

Field `warmup_steps: int = 50` becomes `--warmup-steps INT` (default 50). Rules, from the annotation:
`bool` defaulting to False -> `--name` (store_true), defaulting to True -> `--no-name` (store_false);
`Literal[...]` -> choices; `list[str]` -> one or more values; `dict` -> a JSON object; `X | None` -> X.
The help text is the attribute docstring under the field (PEP 257 style, as the configs are written).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal right after its definition}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class statement
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _json_object(text: str) -> dict:
    """argparse type: a JSON object (`{"caption": 2}`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; expected an object")
    return value


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _flag_kwargs(tp: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field of type `tp` with `default`."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": "store_false" if default else "store_true"}
    if origin is Literal:
        return {"choices": list(typing.get_args(tp)), "type": type(typing.get_args(tp)[0])}
    if origin is list:
        return {"nargs": "+", "type": (typing.get_args(tp) or (str,))[0]}
    if origin is dict or tp is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"no command-line rule for a field of type {tp!r}; add one to pali.cli._flag_kwargs or skip it")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, groups: Mapping[str, Iterable[str]] = (),
                     skip: Iterable[str] = (), hidden: Iterable[str] = (), flag_names: Mapping[str, str] = (),
                     default_group: str = "other") -> None:
    """Add one flag per field of dataclass `cls` to `parser`, under argument groups.

    groups: group title -> field names, in the order the flags are listed (fields not named go to
        `default_group`, in declaration order); skip: fields without a flag; hidden: flags left out of
        `--help` (testing aids); flag_names: field -> flag, where the flag is not `--field-name`.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in set(skip)}
    groups, hidden, flag_names = dict(groups), set(hidden), dict(flag_names)
    placed = [n for names in groups.values() for n in names]
    unknown = sorted(set(placed) - set(fields))
    if unknown:
        raise ValueError(f"groups name fields {unknown} that {cls.__name__} does not have (or that are skipped)")
    rest = [n for n in fields if n not in placed]
    for title, names in [*groups.items(), (default_group, rest)]:
        if not names:
            continue
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = _flag_kwargs(hints[name], default)
            flag = flag_names.get(name) or (f"--no-{name}" if kwargs.get("action") == "store_false"
                                            else f"--{name}").replace("_", "-")
            helptext = argparse.SUPPRESS if name in hidden else docs.get(name, "")
            group.add_argument(flag, dest=name, default=default, help=helptext, **kwargs)


def config_from_args(cls: type, ns: argparse.Namespace, **extra: Any) -> Any:
    """An instance of dataclass `cls` from the parsed flags of `add_config_flags` (plus `extra` fields)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    return cls(**{**values, **extra})
