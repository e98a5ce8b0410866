"""De-identification profiles: the PS3.15 Basic Profile plus a set of its options, named.

The options are those of PS3.15 E.3; named profiles (``basic``, ``teaching``, ``research``,
``accreditation``) are defaults that an installation can redefine or extend in a TOML file::

    [profiles.mdt]
    options = ["retain_modified_dates", "retain_patient_characteristics", "clean_descriptors",
               "clean_pixel_data"]
    description = "Cases shown at the multidisciplinary meeting"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from imageshare.domain.errors import ConfigurationError

OPTIONS: dict[str, tuple[str, str]] = {
    # option -> (code in CID 7050, meaning)
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates "
                                    "Option"),
    "retain_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified "
                                        "Dates Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")


@dataclass(frozen=True)
class Profile:
    """A named set of PS3.15 options applied on top of the Basic Profile."""

    name: str
    options: frozenset[str]
    description: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"profile {self.name!r}: unknown options {', '.join(unknown)}; known: "
                + ", ".join(OPTIONS))
        if {"retain_full_dates", "retain_modified_dates"} <= self.options:
            raise ConfigurationError(
                f"profile {self.name!r}: full and modified dates exclude each other")

    def has(self, option: str) -> bool:
        """True when the profile includes ``option``."""
        return option in self.options


def _profile(name: str, description: str, *options: str) -> Profile:
    return Profile(name, frozenset(options), description)


DEFAULT_PROFILES: dict[str, Profile] = {
    p.name: p for p in (
        _profile("basic", "PS3.15 Basic Profile; burned-in text cleaned and verified",
                 "clean_pixel_data"),
        _profile("teaching", "Teaching files: intervals and patient characteristics kept, "
                 "descriptions, structured content, graphics and pixels cleaned",
                 "retain_modified_dates", "retain_patient_characteristics",
                 "clean_descriptors", "clean_structured_content", "clean_graphics",
                 "clean_pixel_data"),
        _profile("research", "Research: as teaching, plus device identity and safe private "
                 "attributes", "retain_modified_dates", "retain_patient_characteristics",
                 "retain_device_identity", "retain_safe_private", "clean_descriptors",
                 "clean_structured_content", "clean_graphics", "clean_pixel_data"),
        _profile("accreditation", "Accreditation review of scans: which machine, intervals "
                 "and patient characteristics kept", "retain_modified_dates",
                 "retain_patient_characteristics", "retain_device_identity",
                 "clean_descriptors", "clean_structured_content", "clean_graphics",
                 "clean_pixel_data"),
    )
}


def load_profiles(path: Path | None) -> dict[str, Profile]:
    """The default profiles, with those of the TOML file at ``path`` added or replacing."""
    profiles = dict(DEFAULT_PROFILES)
    if path is None or not str(path):
        return profiles
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read de-identification profiles {path}: {exc}"
                                 ) from exc
    for name, spec in (data.get("profiles") or {}).items():
        options = spec.get("options", [])
        if not isinstance(options, list):
            raise ConfigurationError(f"profile {name!r}: options must be a list")
        profiles[name] = Profile(name, frozenset(options), str(spec.get("description", "")))
    return profiles
