"""The de-identification verifier: an independent check of everything that leaves ImageShare
de-identified. It compares each output with its source and shares nothing with the
de-identification engine (:mod:`imageshare.deid`): its own list of identifying attributes, its
own matching and its own OCR reading. Whatever it finds holds the file back.
"""

from imageshare.verify.identity import SourceIdentity
from imageshare.verify.scan import Finding, Verifier

__all__ = ["Finding", "SourceIdentity", "Verifier"]
