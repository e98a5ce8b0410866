"""Reading values out of DICOM JSON (PS3.18 F.2) as stored in the index."""

from __future__ import annotations

from typing import Any

from imageshare.domain.identifiers import is_valid_nhs_number

NHS_ISSUER = "NHS"


def text_of(element: dict[str, Any] | None) -> str:
    """The first value of a DICOM JSON element as text (a person name's alphabetic form)."""
    if not element:
        return ""
    values = element.get("Value") or []
    if not values:
        return ""
    first = values[0]
    return str(first.get("Alphabetic", "")) if isinstance(first, dict) else str(first)


def all_text(element: dict[str, Any] | None) -> str:
    """Every value of a DICOM JSON element, joined with commas."""
    if not element:
        return ""
    return ", ".join(
        str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)
        for v in element.get("Value") or []
    )


def nhs_number_of(attrs: dict[str, Any]) -> str:
    """The patient's NHS number: the Patient ID issued by ``NHS``, or an Other Patient ID
    issued by NHS (or, without an issuer, one that passes the NHS check digit)."""
    if text_of(attrs.get("00100021")).upper() == NHS_ISSUER:
        return text_of(attrs.get("00100020"))
    for item in (attrs.get("00101002") or {}).get("Value") or []:
        value = text_of(item.get("00100020"))
        issuer = text_of(item.get("00100021")).upper()
        if issuer == NHS_ISSUER or (not issuer and is_valid_nhs_number(value)):
            return value
    return ""
