"""Exports: folders, ZIP (optionally AES-encrypted), DICOMDIR media, MP4 cine, PNG/JPEG stills."""
