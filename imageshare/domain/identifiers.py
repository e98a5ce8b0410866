"""Identifiers of the hospital world: DICOM UIDs, NHS numbers, person names."""

from __future__ import annotations

import re
import unicodedata

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str | None) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return value is not None and 0 < len(value) <= 64 and bool(_UID.match(value))


def is_email_address(value: str) -> bool:
    """True when ``value`` looks like one e-mail address (local@host.domain, no spaces, at most
    254 characters); checked in one pass over at most 254 characters."""
    if not value or len(value) > 254 or any(c.isspace() for c in value):
        return False
    local, at, host = value.partition("@")
    if not at or not local or "@" in host:
        return False
    return "." in host[1:-1]


def is_valid_nhs_number(value: str) -> bool:
    """True when ``value`` is a ten-digit NHS number with a correct modulus-11 check digit."""
    digits = re.sub(r"[\s-]", "", value or "")
    if not re.fullmatch(r"\d{10}", digits):
        return False
    total = sum(int(d) * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(digits[9])


def normalise_name(value: str | None) -> str:
    """A person name folded for matching: accents removed, upper case, spaces squeezed.

    The DICOM component separator ``^`` and group separator ``=`` are kept, so that
    ``Müller^Jürgen`` and ``MULLER^JURGEN`` compare equal.
    """
    if not value:
        return ""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", stripped).strip().upper()


# What separates the parts of a DICOM person name (typed inside one part, it would move the
# rest of the name into another), and the invisible controls that make a name read as another
# (right-to-left overrides and isolates): each typed one is a space, or nothing.
_TYPED_NAME = str.maketrans({"^": " ", "=": " ", "\\": " ",
                             **dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])})


def typed_person_name(family: str, given: str, most: int = 400) -> str:
    """The DICOM person name (``Family^Given``) of a family and a given name as a person
    typed them in two fields. A name longer than a person name holds is kept whole (up to
    ``most`` characters), for the caller's check to refuse it with the reason: cut to fit,
    it would name someone else."""
    family, given = (" ".join(p.translate(_TYPED_NAME).split())[:most]
                     for p in (family, given))
    return f"{family}^{given}" if given else family

