"""De-identification: PS3.15 profiles, pseudonyms, burned-in text, reports."""
