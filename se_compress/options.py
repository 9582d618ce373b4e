"""CLI flags made from the stages' option models (recipe.py), and the options object made back from the parsed flags.

One field, one flag: `--` + the field name with '-' for '_' (or json_schema_extra `flag`), its description as the
help text, its default, and an argparse type chosen from its annotation and bounds, so a bad number is refused
while parsing with validate.py's one line (`--samples 0`: "must be at least 1 ..."):

    int >= 1 -> positive_int, >= 2 -> sequence_length, >= 0 -> non_negative_int
    float in (0, 1) -> open_fraction, (0, 1] -> fraction_up_to_one, > 0 -> positive_float
    Literal -> choices; list[Literal] or list[str] -> a comma list; bool -> a switch that flips the default
    json_schema_extra `cli_type`: a validate.py type by name (group_size)
"""
import argparse
import re
import types
import typing

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from . import validate
from .errors import SECompressError

_TYPES = {  # (annotation, bounds) -> argparse type
    (int, (("ge", 1),)): validate.positive_int,
    (int, (("ge", 2),)): validate.sequence_length,
    (int, (("ge", 0),)): validate.non_negative_int,
    (float, (("gt", 0), ("lt", 1))): validate.open_fraction,
    (float, (("gt", 0), ("le", 1))): validate.fraction_up_to_one,
    (float, (("gt", 0),)): validate.positive_float,
    (int, ()): int,
    (str, ()): str,
}


def _extra(field) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def flag(name: str, field) -> str:
    return _extra(field).get("flag", "--" + name.replace("_", "-"))


def default(field):
    """The field's default; a required field's is None (the flag is optional on the command line)."""
    return None if field.default is PydanticUndefined else field.default


def _bare(annotation):
    """int | None -> int."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _comma_list(choices: tuple | None, what: str):
    """'a,b' -> ['a', 'b']; with choices, '' is the first choice ('none') and an unknown item is refused."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if choices is None:
            return items
        items = items or [choices[0]]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} '{unknown[0]}': use a comma list of "
                                             f"{', '.join(choices)}")
        return items
    return parse


def argument(name: str, field) -> tuple[list, dict]:
    """add_argument's (flags, keywords) for one field."""
    annotation, extra = _bare(field.annotation), _extra(field)
    kw = dict(dest=name, help=(field.description or "").replace("%", "%%"))  # argparse formats help with %
    value = default(field)
    if annotation is bool:
        # a switch that turns a default-on field off (--asymmetric, --keep-attention) shows no "(default: True)";
        # left unset, from_args takes the field's default
        if value:
            kw.update(action="store_false", default=argparse.SUPPRESS)
        else:
            kw.update(action="store_true")
        return [flag(name, field)], kw
    if "cli_type" in extra:
        kw.update(type=getattr(validate, extra["cli_type"]), default=value)
    elif typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        kw.update(type=type(choices[0]), choices=list(choices), default=value)
    elif typing.get_origin(annotation) is list:
        item = typing.get_args(annotation)[0]
        choices = typing.get_args(item) if typing.get_origin(item) is typing.Literal else None
        if choices is None and item is not str:
            raise TypeError(f"{name}: no CLI type for {annotation}: add one to options.argument")
        kw.update(type=_comma_list(choices, field.title or name), default=",".join(map(str, value)), metavar="LIST")
    else:
        bounds = tuple((kind, getattr(m, kind)) for m in field.metadata for kind in ("ge", "gt", "le", "lt")
                       if isinstance(m, (Ge, Gt, Le, Lt)) and hasattr(m, kind))
        if (annotation, bounds) not in _TYPES:
            raise TypeError(f"{name}: no CLI type for {annotation} with bounds {bounds}: add one to options._TYPES")
        kw.update(type=_TYPES[annotation, bounds], default=value)
    return [flag(name, field)], kw


def add_options(parser, model: type[BaseModel], skip: tuple = ()) -> None:
    """Every field of `model` as a flag of `parser` (argparse subparser)."""
    for name, field in model.model_fields.items():
        if name not in skip:
            flags, kw = argument(name, field)
            parser.add_argument(*flags, **kw)


def from_args(model: type[BaseModel], args, what: str = "options"):
    """The options object of `model` from parsed flags; a broken rule between flags is one line naming them."""
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model.model_validate(values, context={"parsed_flags": True})
    except ValidationError as exc:
        err = exc.errors()[0]
        message = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
        for name, field in model.model_fields.items():  # the recipe's key names read as the CLI's flags
            message = re.sub(rf"\b{name}\b", flag(name, field), message)
        where = flag(err["loc"][0], model.model_fields[err["loc"][0]]) + " " if err["loc"] else ""
        raise SECompressError(f"{what}: {where}{message}") from None
