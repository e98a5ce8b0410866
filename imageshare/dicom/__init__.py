"""pynetdicom adapter: the DICOM listener (SCP) and talking to remote nodes (SCU)."""
