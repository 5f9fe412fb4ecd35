"""The Prefer header parser (RFC 7240): what ``wait`` a header asks for, and what it ignores."""

from __future__ import annotations

import pytest

from producers.prefer import preferences, wait_preference


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        (["wait=5"], 5),
        (["WAIT=5"], 5),  # preference names are case-insensitive
        (["wait = 5"], 5),  # BWS around "="
        (['wait="7"'], 7),  # word = token / quoted-string
        (["respond-async, wait=10"], 10),
        (["return=minimal; foo=bar, wait=3;x"], 3),
        (["wait=0"], 0),
        (["wait=60"], 60),
        (["wait=61"], 60),  # over the limit: capped, not refused
        (["wait=999"], 60),
        (["wait=" + "9" * 5000], 60),  # far too many digits for int(): still capped
        (["wait=2", "wait=9"], 2),  # only the first occurrence counts, across fields
        (["respond-async", "wait=4"], 4),  # several fields are one list
        (['handling=lenient; note="a, b", wait=8'], 8),  # a comma in a quoted string
    ],
)
def test_wait_is_read_and_capped(headers: list[str], wait: int) -> None:
    assert wait_preference(headers, limit=60) == wait


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [""],
        ["respond-async"],
        ["wait"],  # no value
        ["wait="],
        ["wait=-1"],
        ["wait=1.5"],  # delta-seconds are whole
        ["wait=5s"],
        ["wait=ten"],
        ["wait=1e3"],
        ['wait="5'],  # an unclosed quote
        ["wait=5 6"],
        ["wait=\x00"],
        ["=5"],
        [";;;,,,"],
        ["w\u00e4it=5"],  # not a token
        ["wait=abc, wait=5"],  # the first wait decides: it is malformed, so none
    ],
)
def test_a_malformed_wait_is_ignored(headers: list[str]) -> None:
    assert wait_preference(headers, limit=60) is None


def test_other_preferences_are_read_with_their_values() -> None:
    got = list(preferences(['Return=minimal; a="x\\"y", respond-async, bad pref, wait=1']))
    assert got == [("return", "minimal"), ("respond-async", None), ("wait", "1")]
