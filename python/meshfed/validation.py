"""Pydantic validation errors as the one line a user reads: the field, then what is wrong with it.

Pydantic's own text spans several lines and its first message alone ("Input
should be less than or equal to 1000000") does not say which field it is
about. Every place that shows a model's :class:`~pydantic.ValidationError` to a
person (the CLI, logs of ``zone.toml`` and catalog sources) goes through
:func:`describe_validation_error`; the API's 422 keeps the structured
``loc``/``msg`` list (``api/limits.py``).
"""

from __future__ import annotations

from pydantic import ValidationError

# Characters of a message or location part kept: a value may come from a peer or a catalog and be huge.
_MAX_TEXT = 200
_MAX_PART = 64


def describe_validation_error(err: ValidationError, where: str = "") -> str:
    """``where.field[3].name: message`` for the first error, with how many more there are."""
    first = err.errors(include_url=False, include_input=False)[0]
    path = where
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{str(part)[:_MAX_PART]}" if path else str(part)[:_MAX_PART]
    message = str(first["msg"]).removeprefix("Value error, ")[:_MAX_TEXT]
    more = err.error_count() - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{path}: {message}{suffix}" if path else f"{message}{suffix}"


__all__ = ["describe_validation_error"]
