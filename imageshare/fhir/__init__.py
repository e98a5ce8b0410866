"""FHIR R4 resources built from the archive's index (no web framework here)."""
