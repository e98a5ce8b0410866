"""Reviewers' comments as DICOM Comprehensive SR in the study they are about, so that PACS and
other viewers see them too (highdicom builds the document)."""

from __future__ import annotations

import io

from pydicom import Dataset
from pydicom.uid import generate_uid

from imageshare import __version__

# (code value, coding scheme, meaning)
COMMENT = ("121106", "DCM", "Comment")
SOURCE = ("121112", "DCM", "Source of Measurement")
NARRATIVE = ("18782-3", "LN", "Radiology Study observation (narrative)")
SERIES_NUMBER = 9903


def comment_document(source: Dataset, body: str, author: str, about_image: bool) -> bytes:
    """A Comprehensive SR (Part 10 bytes) holding ``body`` by ``author``, referencing the image
    or clip ``source`` when the comment is about it."""
    import highdicom as hd  # loaded by the processes that write comments, not every process
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        ContentItem,
        ImageContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    items: list[ContentItem] = [TextContentItem(
        name=CodedConcept(*COMMENT), value=f"{author}: {body}"[:10_000],
        relationship_type=RelationshipTypeValues.CONTAINS)]
    if about_image:
        items.append(ImageContentItem(
            name=CodedConcept(*SOURCE), referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS))
    root = ContainerContentItem(name=CodedConcept(*NARRATIVE))
    root.ContentSequence = items  # type: ignore[assignment]  # pydicom accepts a list
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="ImageShare", is_complete=True, is_final=False, is_verified=False,
        series_description="Reviewer comments")
    sr.SoftwareVersions = __version__
    out = io.BytesIO()
    sr.save_as(out, enforce_file_format=True)
    return out.getvalue()
