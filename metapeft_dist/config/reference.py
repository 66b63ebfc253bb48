"""The spec reference page (docs/job-spec.md), generated from the schema's help strings.

    python -m metapeft_dist.config > docs/job-spec.md
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from metapeft_dist.config.loader import join_path
from metapeft_dist.config.schema import JobSpec, to_plain


def reference() -> str:
    """The spec reference in Markdown, generated from the dataclasses' help strings."""
    out = ["# Job spec reference", "",
           "Generated from `metapeft_dist/config.py`; every key, its type, default and "
           "meaning.", ""]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            named = typing.get_origin(tp) is dict  # a named set of sections: NAME in the path
            sub = [] if named else [a for a in (typing.get_args(tp) or (tp,))
                                    if dataclasses.is_dataclass(a)]
            if named:
                nested.append((typing.get_args(tp)[1], join_path(prefix, f"{f.name}.NAME")))
            if f.default is not dataclasses.MISSING:
                default = "unset" if f.default is None else f"`{to_plain(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = "section" if sub else f"`{to_plain(f.default_factory())}`"
            else:
                default = "**required**"
            rows.append(f"| `{join_path(prefix, f.name)}` | {_type_label(tp)} | {default} | "
                        f"{f.metadata.get('help', '')} |")
            if sub:
                nested.append((sub[0], join_path(prefix, f.name)))
        out.extend([f"## `{prefix or 'top level'}`", "", (cls.__doc__ or "").strip(), "",
                    "| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""])
        for sub_cls, sub_prefix in nested:
            walk(sub_cls, sub_prefix)

    walk(JobSpec, "")
    return "\n".join(out).replace("\n\n\n", "\n\n")


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_label(a) for a in args if a is not type(None)) + " (optional)"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_type_label(args[0])}"
    if origin is dict:
        return f"mapping of name to {_type_label(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))
