"""Even shares of HTTP connections between the processes serving one port.

The processes accept from one listening socket, so a new connection goes to whichever
process takes it first (most often one that is not busy). A browser keeps its connections
open (six to one host) and sends every request of a page or an upload over them, so a process
that happened to take four of six would do twice its share for as long as they stay open.
Each process therefore counts its open connections in a table all of them see; one holding
more than its share closes a connection after answering a request on it (``Connection:
close``, which every HTTP/1.1 client follows by opening a new one), and the new connection
goes to a process with room.
"""

from __future__ import annotations

import math
from typing import Any


class ConnectionShares:
    """The open connections of each HTTP process of one server (``counts``: a table of ints
    shared between the processes, one slot each; ``slot``: this process's)."""

    def __init__(self, counts: Any, slot: int) -> None:
        self._counts = counts
        self._slot = slot

    def opened(self) -> None:
        """This process took a connection."""
        self._counts[self._slot] += 1

    def closed(self) -> None:
        """A connection of this process closed (or will, once its answer is sent)."""
        self._counts[self._slot] = max(0, self._counts[self._slot] - 1)

    def over_share(self) -> bool:
        """Whether this process holds more connections than an even share (rounded up) among
        the processes serving (a slot below zero: a process that no longer does)."""
        serving = [count for count in self._counts if count >= 0]
        return self._counts[self._slot] > math.ceil(sum(serving) / max(1, len(serving)))


GONE = -1  # the slot of a process that no longer serves
