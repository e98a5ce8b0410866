"""Several HTTP processes keep even shares of the open connections."""

from __future__ import annotations

import multiprocessing

from imageshare.web.balance import ConnectionShares


def test_a_process_over_an_even_share_knows_it_and_the_others_see_room_at_once():
    counts = multiprocessing.get_context("spawn").Array("i", 2, lock=False)
    first, second = ConnectionShares(counts, 0), ConnectionShares(counts, 1)
    for _ in range(4):
        first.opened()
    for _ in range(2):
        second.opened()
    assert first.over_share() and not second.over_share()  # 4 of 6: more than 3
    first.closed()  # the connection it lets go
    assert not first.over_share() and not second.over_share()  # 3 and 2 of 5: up to 3 each
    second.opened()
    assert not first.over_share() and not second.over_share()  # 3 and 3


def test_odd_totals_round_up_and_counts_never_go_below_zero():
    counts = multiprocessing.get_context("spawn").Array("i", 2, lock=False)
    only = ConnectionShares(counts, 0)
    only.opened()
    assert not only.over_share()  # 1 of 1: the share of 2 processes rounds up to 1
    only.opened()
    assert only.over_share()  # 2 of 2 while the other process has room
    only.closed()
    only.closed()
    only.closed()
    assert list(counts) == [0, 0]
