"""Consistent pseudonyms from a per-installation secret: the same patient always gets the same
pseudonymous ID and date offset, the same UID always the same replacement UID, and the same
label (a graphic layer, an AE title) always the same replacement label."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path

SECRET_FILE = "deid-secret"
_MIN_SHIFT_DAYS = 30
_SHIFT_SPAN_DAYS = 3650


def installation_secret(data_dir: Path, configured: str = "") -> bytes:
    """The de-identification secret: the configured one, else one kept in the data folder
    (made on first use, readable by the owner only)."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class Pseudonyms:
    """Keyed, repeatable replacements for patient IDs, UIDs and dates."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the de-identification secret is too short")
        self._secret = secret
        self._uids: dict[str, str] = {}

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def patient_id(self, patient_key: str) -> str:
        """A pseudonymous patient ID (``ANON`` and 10 letters/digits) for a patient key."""
        code = base64.b32encode(self._digest("patient", patient_key)).decode()[:10]
        return f"ANON{code}"

    def date_offset(self, patient_key: str) -> timedelta:
        """How far this patient's dates move back (30 days to about 10 years), always the
        same for the same patient, so intervals are kept."""
        n = int.from_bytes(self._digest("dates", patient_key)[:8], "big")
        return timedelta(days=-(_MIN_SHIFT_DAYS + n % _SHIFT_SPAN_DAYS))

    def label(self, prefix: str, original: str) -> str:
        """The replacement of a label that others refer to (a graphic layer, an AE title, a
        station name): ``prefix`` and 8 letters/digits derived from ``original`` (at most 16
        characters with a prefix of up to 8), always the same for the same label."""
        code = base64.b32encode(self._digest("label", original.strip())).decode()[:8]
        return f"{prefix}{code}"

    def uid(self, original: str) -> str:
        """The replacement of ``original``: a UID under 2.25 derived from it and the secret."""
        found = self._uids.get(original)
        if found is None:
            value = int.from_bytes(self._digest("uid", original.strip())[:16], "big")
            found = self._uids[original] = f"2.25.{value}"
            if len(self._uids) > 200_000:
                self._uids.clear()
        return found


def shift_date(value: str, offset: timedelta) -> str | None:
    """A DA value moved by ``offset``; None when it is not a full date. A date in the
    ACR-NEMA form (``2024.03.15``, which PS3.5 asks readers to accept) comes back as DICOM
    writes it (``YYYYMMDD``)."""
    text = value.strip()
    if len(text) == 10 and text[4] == text[7] == ".":
        text = text.replace(".", "")
    try:
        day = datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        day = None
    if day is None:
        return None
    return (day + offset).strftime("%Y%m%d")


def shift_datetime(value: str, offset: timedelta) -> str | None:
    """A DT value whose date part moves by ``offset`` (time and zone kept). A year or a
    month alone (``YYYY``, ``YYYYMM``, with or without a zone: PS3.5 lets a DT stop at any
    component) moves as the middle of its year or month does and keeps its precision. None
    if the date part cannot be read."""
    text = value.strip()
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits in (4, 6):
        zone = text[digits:]
        if zone and not (len(zone) == 5 and zone[0] in "+-" and zone[1:].isdigit()):
            return None
        middle = text[:4] + "0701" if digits == 4 else text[:6] + "15"
        shifted = shift_date(middle, offset)
        return None if shifted is None else shifted[:digits] + zone
    shifted = shift_date(text[:8], offset)
    if shifted is None:
        return None
    return shifted + text[8:]


def age_at(birth: str, on: str) -> str | None:
    """The DICOM age string (``042Y``) of someone born on ``birth`` on day ``on``."""
    try:
        born = datetime.strptime(birth[:8], "%Y%m%d").date()
        day = datetime.strptime(on[:8], "%Y%m%d").date()
    except ValueError:
        return None
    if day < born:
        return None
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    if years >= 2:
        return f"{min(years, 999):03d}Y"
    days = (day - born).days
    if days >= 60:
        return f"{days // 30:03d}M"
    return f"{days:03d}D"

