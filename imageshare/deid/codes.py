"""Which coded entries may leave a de-identified data set: codes of the standard's context
groups (DCM, SCT and its older SRT form, LOINC, UCUM, RadLex, ...) as listed in pydicom's copy
of PS3.16, with the standard's own meaning. Anything else (private or local schemes, codes the
context groups do not list, or a standard code with a site's own meaning) cannot be shown to be
safe and is replaced.
"""

from __future__ import annotations

import threading

DUMMY_CODE = ("REMOVED", "99DEID", "Removed by de-identification")
_UCUM_CHARACTERS = set("0123456789.*/^()[]%'-+ ")
_lock = threading.Lock()
_index: dict[tuple[str, str], str] | None = None


def _build() -> dict[tuple[str, str], str]:
    from pydicom.sr._concepts_dict import concepts
    from pydicom.sr._snomed_dict import mapping

    index: dict[tuple[str, str], str] = {}
    for scheme, names in concepts.items():
        for codes in names.values():
            for value, (meaning, _cids) in codes.items():  # type: ignore[attr-defined]  # pydicom types its private concept table as object
                index[(scheme, value)] = meaning
    for sct, srt in mapping.get("SCT", {}).items():
        meaning = index.get(("SCT", sct))
        if meaning is not None:
            index[("SRT", srt)] = meaning
            index[("SNM3", srt)] = meaning
    return index


def _standard_codes() -> dict[tuple[str, str], str]:
    global _index
    if _index is None:
        with _lock:
            if _index is None:
                _index = _build()
    return _index


def standard_meaning(scheme: str, value: str) -> str | None:
    """The standard meaning of code ``value`` in ``scheme``, or None when the code is not one
    of the standard's context groups (a private or local code, or an unknown one)."""
    scheme, value = scheme.strip(), value.strip()
    if not scheme or not value or scheme.startswith("99"):
        return None
    meaning = _standard_codes().get((scheme, value))
    if meaning is not None:
        return meaning[:64]
    if scheme == "UCUM" and len(value) <= 16 and _plausible_unit(value):
        return value  # UCUM units are built, not listed; their meaning is the unit itself
    return None


def _plausible_unit(value: str) -> bool:
    """A UCUM unit such as ``mm``, ``cm2``, ``mL/s`` or ``[hnsf'U]``: no annotations in braces
    (free text), no word of five letters or more."""
    run = 0
    for c in value:
        if c.isalpha():
            run += 1
            if run >= 5:
                return False
        else:
            run = 0
            if c not in _UCUM_CHARACTERS:
                return False
    return True
