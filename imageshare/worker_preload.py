"""Imported last by the process the server's workers are forked from (the forkserver, after
the modules they run): what it imported is moved out of the garbage collector's reach, so
that a collection in a worker does not write to, and so copy, every page it shares with the
others."""

import gc

gc.freeze()
