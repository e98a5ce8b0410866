"""Bits of native pixel data outside Bits Stored: retired overlays (Overlay Bit Position) and
anything else can hide there, invisible to a viewer and to OCR. They are put in canonical form:
zero, or copies of the sign bit for signed values stored from bit 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class StoredBits:
    """Where the stored bits of each native sample are."""

    allocated: int
    stored: int
    high: int
    signed: bool
    big_endian: bool = False

    @classmethod
    def of(cls, ds: Dataset, big_endian: bool = False) -> StoredBits | None:
        """The layout of ``ds``'s native pixel data when some bits are unused (else None)."""
        try:
            allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
            high = int(ds.get("HighBit", stored - 1))
            signed = int(ds.get("PixelRepresentation", 0)) == 1
        except (AttributeError, TypeError, ValueError):
            return None
        if allocated not in (8, 16, 32) or not 0 < stored < allocated \
                or not stored - 1 <= high < allocated:
            return None
        return cls(allocated, stored, high, signed, big_endian)

    def canonical(self, data: bytes) -> tuple[bytes, bool]:
        """``data`` (whole samples) with the unused bits canonical, and whether any changed."""
        order = ">" if self.big_endian else "<"
        samples = np.frombuffer(data, f"{order}u{self.allocated // 8}")
        kind = samples.dtype.type
        low = self.high - self.stored + 1
        full = (1 << self.allocated) - 1
        mask = ((1 << self.stored) - 1) << low
        if self.signed and low == 0:  # the bits from the sign bit up: all 0 or all 1
            top = samples >> kind(self.high)
            if not np.any((top != 0) & (top != kind(full >> self.high))):
                return data, False
            sign = top & kind(1)
            kept = (samples & kind(mask)) | (sign * kind(full & ~mask))
        else:
            if not np.any(samples & kind(full & ~mask)):
                return data, False
            kept = samples & kind(mask)
        return kept.astype(samples.dtype).tobytes(), True
