"""Request body parsers."""

import codecs
import json
import math
from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError


def _refuse_non_finite(text: str) -> float:
    raise ValueError(f"Out of range float values are not JSON compliant: {text!r}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999: valid JSON syntax, but no double can hold it
        _refuse_non_finite(text)
    return value


class JSONParser(parsers.JSONParser):
    """Strict JSON: no NaN/Infinity, no numbers beyond the float range, no nesting deeper than Python can parse.

    Each of these would otherwise surface later as a server error: non-finite numbers cannot be rendered back as
    JSON or stored by PostgreSQL, and deep nesting raises RecursionError inside the parser.
    """

    def parse(self, stream: IO[bytes], media_type: str | None = None, parser_context: Mapping | None = None) -> Any:
        """Parse the body, answering 400 for anything that is not strict JSON."""
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            reader = codecs.getreader(encoding)(stream)
            return json.load(reader, parse_constant=_refuse_non_finite, parse_float=_finite_float)
        except RecursionError:
            raise ParseError("JSON parse error - the document is nested too deeply.") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
