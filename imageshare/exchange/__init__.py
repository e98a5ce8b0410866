"""Exchange with other sites: the registry of connected DICOM / DICOMweb nodes."""
