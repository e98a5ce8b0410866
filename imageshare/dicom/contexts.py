"""Presentation contexts to propose when sending stored instances."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

MAX_CONTEXTS = 128


def accepted_syntaxes(all_syntaxes: list[str]) -> list[str]:
    """The transfer syntaxes we accept, in preference order (pynetdicom accepts the first of
    ours that the requestor proposed): lossless compressed first, so that what the sender
    holds arrives as it is, then uncompressed (explicit before implicit), lossy last, so a
    sender that could compress lossily on request is never asked to."""
    uncompressed = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
    lossy = {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    }

    def rank(uid: str) -> int:
        if uid in uncompressed:
            return 1 + uncompressed.index(uid)
        return 10 if uid in lossy else 0

    return sorted(all_syntaxes, key=rank)


def storage_contexts_for(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), plus an uncompressed fallback
    per SOP class, within the 128 contexts an association may propose."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for sop_class, syntax in sorted(pairs):
        wanted = (syntax,) if syntax not in uncompressed else uncompressed
        for syntaxes in (wanted, uncompressed):
            key = (sop_class, tuple(syntaxes))
            if key not in seen and len(contexts) < MAX_CONTEXTS:
                seen.add(key)
                contexts.append(build_context(sop_class, list(syntaxes)))
    return contexts
