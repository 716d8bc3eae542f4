"""The piece bookkeeping of ``appliance.torrent.source``: pieces arriving rarest-first, in any
order, are read back only for chunks that became whole, and dropped once delivered."""

from __future__ import annotations

import random

from appliance.torrent.source import _Pieces, _Span

PIECE = 16 * 1024


def _spans() -> list[_Span]:
    # 40 chunks of 3.5 pieces each, back to back: neighbours share a boundary piece.
    length = 7 * PIECE // 2
    return [_Span(f"{i:064x}", length, i * length, PIECE) for i in range(40)]


def test_pieces_in_any_order_are_held_only_for_whole_chunks() -> None:
    spans = _spans()
    pieces = _Pieces(spans)
    order = sorted(pieces.users)
    random.Random(7).shuffle(order)
    delivered: list[str] = []
    most_held = 0
    for piece in order:
        for wanted in pieces.had(piece):
            pieces.read(wanted, bytes([wanted % 256]) * PIECE)
        most_held = max(most_held, len(pieces.held))
        for span in pieces.complete():
            assert all(p in pieces.held for p in span.pieces)
            delivered.append(span.digest)
            pieces.delivered(span)
    assert sorted(delivered) == sorted(s.digest for s in spans)
    assert pieces.held == {} and pieces.users == {}
    # Scattered arrival: far fewer pieces held at once than the 141 the chunks cover.
    assert most_held < 40


def test_a_failed_read_is_asked_again_when_the_piece_is_had_again() -> None:
    spans = _spans()[:1]
    pieces = _Pieces(spans)
    first, *rest = spans[0].pieces
    for piece in rest:
        assert pieces.had(piece) == []
    wanted = pieces.had(first)
    assert sorted(wanted) == list(spans[0].pieces)
    pieces.read_failed(first)
    for piece in rest:
        pieces.read(piece, b"x" * PIECE)
    assert pieces.complete() == []
    assert pieces.had(first) == [first]  # the next have-scan
    pieces.read(first, b"y" * PIECE)
    assert pieces.complete() == spans
