"""The DATA stream as the gateway reads it: dot-unstuffing in any chunking, long lines, the end marker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmtp_gateway.ingress import DataDecoder
from tests.lmtp_client import dot_stuff

lines = st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=40).map(
    lambda ls: b"".join(line + b"\r\n" for line in ls)
)


@settings(max_examples=300)
@given(lines, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50), st.binary(max_size=30))
def test_data_decoder_round_trips_any_chunking(message: bytes, cuts: list[int], after: bytes) -> None:
    wire = dot_stuff(message) + after
    decoder, out, position = DataDecoder(), b"", 0
    for size in cuts * (len(wire) // max(sum(cuts), 1) + 1):
        if decoder.done or position >= len(wire):
            break
        out += decoder.feed(wire[position : position + size])
        position += size
    assert decoder.done
    assert out == message
    assert decoder.leftover + wire[position:] == after
    assert not decoder.line_too_long


def test_data_decoder_flags_long_lines_and_still_finds_the_end() -> None:
    decoder = DataDecoder(max_line=100)
    out = decoder.feed(b"short\r\n" + b"x" * 5000)
    out += decoder.feed(b"y" * 5000 + b"\r\nafter\r\n.\r\nQUIT\r\n")
    assert decoder.done and decoder.line_too_long
    assert decoder.leftover == b"QUIT\r\n"
    assert b"x" not in out  # the long line was not buffered
