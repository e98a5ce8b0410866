"""The audit trail: the ONE function that records every access to patient data."""
