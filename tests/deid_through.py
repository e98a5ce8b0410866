"""De-identifying a data set through the product path in tests, and what the independent
verifier finds in the output: shared by the de-identification sweeps."""

from __future__ import annotations

import io

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian

from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier, Outcome
from imageshare.verify import Verifier
from imageshare.verify.identity import keep_for_options

SECRET = b"deid-sweep-secret-0123456789abcdef"


def file_bytes(ds: Dataset, big_endian: bool = False) -> bytes:
    """``ds`` as the bytes of a DICOM file (Explicit VR Big Endian when asked)."""
    buffer = io.BytesIO()
    if big_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def written(ds: Dataset, profile: Profile, verified: bool = True) -> tuple[Outcome, bytes]:
    """``ds`` saved as a file and de-identified (and, unless told not to, verified)."""
    target = io.BytesIO()
    outcome = Deidentifier(profile, Pseudonyms(SECRET),
                           verifier=Verifier(ocr="never") if verified else None).write(
        io.BytesIO(file_bytes(ds)), target)
    return outcome, target.getvalue()


def findings(source: Dataset, output: bytes, profile: Profile) -> list[str]:
    """What the verifier finds in ``output`` (bytes of a file) against ``source``."""
    verifier = Verifier(ocr="never")
    identity = verifier.identity([source], keep_for_options(profile.options))
    return [str(f) for f in verifier.check_dicom(io.BytesIO(output), identity, "output")]


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def content_item(relationship: str, value_type: str, concept: tuple[str, str, str],
                 **values: object) -> Dataset:
    """A report content item of ``concept`` (value, scheme, meaning) with ``values``."""
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = Sequence([code(*concept)])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item
