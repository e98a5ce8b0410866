"""The contexts proposed to send stored instances (C-MOVE sub-operations, pushes): every
(SOP class, transfer syntax) pair has its own before any uncompressed fallback takes one of
the 128 places."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from imageshare.dicom.contexts import MAX_CONTEXTS, storage_contexts_for


def _covered(contexts, pairs) -> set[tuple[str, str]]:
    offered = {(str(c.abstract_syntax), str(t)) for c in contexts for t in c.transfer_syntax}
    return {p for p in pairs if p in offered}


def test_a_hundred_pairs_each_get_a_context_within_the_limit():
    pairs = {(f"1.2.826.0.1.3680043.8.498.1.{i}", str(JPEGBaseline8Bit)) for i in range(100)}
    contexts = storage_contexts_for(pairs)
    assert len(contexts) == MAX_CONTEXTS
    assert _covered(contexts, pairs) == pairs


def test_few_pairs_also_get_an_uncompressed_fallback_per_class():
    pairs = {("1.2.840.10008.5.1.4.1.1.6.1", str(JPEGBaseline8Bit)),
             ("1.2.840.10008.5.1.4.1.1.2", str(ExplicitVRLittleEndian))}
    contexts = storage_contexts_for(pairs)
    assert _covered(contexts, pairs) == pairs
    us = [c for c in contexts if c.abstract_syntax == "1.2.840.10008.5.1.4.1.1.6.1"]
    assert [list(map(str, c.transfer_syntax)) for c in us] == [
        [str(JPEGBaseline8Bit)], ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]]
    assert len(contexts) == 3  # CT's own context is its uncompressed one
