"""Builds a Deidentifier from the settings: profile by name, installation secret, regions,
and the verifier that checks every copy it writes."""

from __future__ import annotations

from pathlib import Path

from imageshare.deid.pixels import BurnedInTextCleaner, load_regions
from imageshare.deid.profiles import load_profiles
from imageshare.deid.pseudonyms import Pseudonyms, installation_secret
from imageshare.deid.service import Deidentifier
from imageshare.domain.errors import ImageShareError
from imageshare.settings import Settings
from imageshare.verify import Verifier


def deidentifier_for(settings: Settings, profile_name: str) -> Deidentifier:
    """A Deidentifier with the named profile; raises ImageShareError for an unknown name."""
    profiles = load_profiles(Path(settings.deid_profiles_file)
                             if settings.deid_profiles_file else None)
    profile = profiles.get(profile_name)
    if profile is None:
        raise ImageShareError(f"unknown profile {profile_name!r}; profiles: "
                              + ", ".join(sorted(profiles)))
    secret = installation_secret(settings.data_dir, settings.deid_secret)
    regions = load_regions(Path(settings.deid_regions_file)
                           if settings.deid_regions_file else None)
    return Deidentifier(profile, Pseudonyms(secret), BurnedInTextCleaner(regions),
                        verifier=Verifier())
