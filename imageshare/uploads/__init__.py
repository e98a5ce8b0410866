"""Uploads from people and partners: invitations, resumable receiving (tus), everything made
DICOM for review, the QC queue, and patients' own access."""
