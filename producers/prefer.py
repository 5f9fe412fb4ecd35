"""The ``Prefer`` request header (RFC 7240), as far as ``wait`` goes.

A preference is a hint: a header that does not parse, or a ``wait`` whose value is not
delta-seconds, is ignored, never refused (RFC 7240 section 2). Only the first ``wait`` counts,
and a value over the server's limit is capped to it, not refused.

    Prefer     = 1#preference
    preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )
    parameter  = token [ BWS "=" BWS word ]
    word       = token / quoted-string
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_WORD = rf"(?:{_TOKEN}|{_QUOTED})"
_PAIR = rf"({_TOKEN})(?:[ \t]*=[ \t]*({_WORD}))?"
_PREFERENCE = re.compile(rf"[ \t]*{_PAIR}(?:[ \t]*;(?:[ \t]*{_PAIR})?)*[ \t]*")
# commas inside a quoted-string do not separate preferences
_ELEMENT = re.compile(rf'(?:{_QUOTED}|[^,"])+')
_DELTA_SECONDS = re.compile(r"[0-9]+")


def preferences(headers: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """Each well-formed preference of the ``Prefer`` header fields: its lower-cased name and
    its value (unquoted), in order. Malformed elements are skipped."""
    for header in headers:
        for element in _ELEMENT.findall(header):
            match = _PREFERENCE.fullmatch(element)
            if match is None:
                continue
            name, value = match.group(1), match.group(2)
            if value is not None and value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            yield name.lower(), value


def wait_preference(headers: Iterable[str], *, limit: int) -> int | None:
    """The seconds ``Prefer: wait=N`` asks for, capped at ``limit``; None when the header
    has no usable ``wait`` (absent, or its first occurrence is not delta-seconds)."""
    for name, value in preferences(headers):
        if name != "wait":
            continue
        if value is None or _DELTA_SECONDS.fullmatch(value) is None:
            return None
        return min(int(value), limit) if len(value) < 10 else limit
    return None
