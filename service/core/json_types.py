"""Field types for request bodies that read JSON's numbers the way JSON Schema does.

The request bodies validate in pydantic's strict mode, so that ``true`` is not ``1`` and
``"7"`` is not ``7``. Strict mode also rejects a float for an ``int``, but JSON has one number
type and JSON Schema (draft 6 on, and so OpenAPI 3.1) counts any number with a zero
fractional part as an integer: ``6511.0`` satisfies ``{"type": "integer"}``, and clients that
hold every number as a double (JavaScript, many JSON libraries) send it that way. An API whose
document says "integer" must take it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def _integral_number(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        if value.is_integer():
            return int(value)
        # The same error type and words as pydantic's lax mode: the field and the cause.
        raise PydanticCustomError(
            "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        )
    # Anything else (booleans, strings, infinities, null) is left to the strict check.
    return value


INTEGRAL_FLOAT_AS_INT = BeforeValidator(_integral_number)
"""The validator alone, for an integer whose bounds share its ``Annotated`` (a list's items,
a union's member): after the bounds, ``Annotated[int, Field(ge=0), INTEGRAL_FLOAT_AS_INT]``.
Bounds given after it would wrap it, and pydantic, which still enforces them there, writes
them into the JSON Schema as ``"ge"`` and ``"le"``, not ``minimum`` and ``maximum``."""

JSONInt = Annotated[int, INTEGRAL_FLOAT_AS_INT]
"""An ``int`` that also takes an integer-valued float (``6511.0``, as the integer ``6511``);
fractional numbers, booleans and strings stay errors. Its JSON Schema is ``integer``: a
before-validator leaves the schema of the type it wraps. For a model field, whose
``Field(ge=..., le=...)`` pydantic applies under the field's validators."""

JSONIntOrNone = Annotated[int | None, INTEGRAL_FLOAT_AS_INT]
"""``JSONInt | None`` for a model field, with the validator around the whole union: spelled
``JSONInt | None``, the field's bounds would reach the member behind its validator and leave
the JSON Schema (see :data:`INTEGRAL_FLOAT_AS_INT`)."""
