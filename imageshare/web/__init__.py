"""ASGI adapter: DICOMweb, the JSON API and health checks, behind one authorisation check."""
