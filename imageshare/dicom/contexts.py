"""Presentation contexts to propose when sending stored instances."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

MAX_CONTEXTS = 128


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
