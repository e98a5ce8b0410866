"""Presentation contexts: what the listener accepts, and what to propose when sending stored
instances. The conformance statement is generated from these tables."""

from __future__ import annotations

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

MAX_CONTEXTS = 128
# Transfer syntaxes the listener accepts for verification and query/retrieve.
LISTENER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
# SOP classes the listener serves as SCP besides storage (which takes every storage SOP class,
# private ones included, in the transfer syntax the sender proposes first).
SCP_SOP_CLASSES = (
    Verification,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)


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
