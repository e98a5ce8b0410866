"""Which coded entries may leave a de-identified data set: codes of the standard's context
groups (DCM, SCT and its older SRT form, LOINC, UCUM, RadLex, ...) as listed in pydicom's copy
of PS3.16, with the standard's own meaning; also the ECG leads in their SCP-ECG form (CID 3001
``SCPECG 5.6.3-9-N``, still sent by most electrocardiographs), which are the MDC leads ``2:N``,
and the SCP-ECG codes of the ECG annotations (CID 3335) and waveform durations (CID 3687) that
name an ECG's fiducial points and measurements (PR interval, QRS duration, QT interval).
Anything else (private or local schemes, codes the context groups do not list, or a standard
code with a site's own meaning) cannot be shown to be safe and is replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType

DUMMY_CODE = ("REMOVED", "99DEID", "Removed by de-identification")
_UCUM_CHARACTERS = set("0123456789.*/^()[]%'-+ ")
_lock = threading.Lock()
_index: dict[tuple[str, str], str] | None = None
ECG_LEADS_CID = 3001
SCPECG_LEAD_PREFIX = "5.6.3-9-"  # SCP-ECG lead N is MDC lead 2:N (PS3.16 CID 3001)
# PS3.16 CID 3335 ECG Annotations and CID 3687 Electrophysiology Waveform Durations in their
# SCPECG form (pydicom's copy of PS3.16 lists them in MDC only).
SCPECG_CODES: dict[str, str] = {
    "5.7.1-3": "Fiducial point", "D.4.1-J": "J point", "D.4.1-ST20": "J point + 20 msec",
    "D.4.1-ST60": "J point + 60 msec", "D.4.1-ST80": "J point +80 msec",
    "5.10.1.2": "Pacemaker spike, suppressed", "D.4.1-PR": "PR segment (isoelectric point)",
    "5.10.3-1": "P wave onset", "5.10.3-2": "P wave end", "D.4.1-P": "P wave peak",
    "5.10.3-3": "QRS onset", "5.10.3-4": "QRS end", "D.4.1-Q": "Q wave",
    "D.4.1-R": "R wave peak", "D.4.1-R2": "R' peak", "D.4.1-S": "S wave",
    "D.4.1-S2": "S' wave", "D.4.1-STE": "T wave onset", "D.4.1-T": "T wave peak",
    "5.10.3-5": "T wave end", "D.4.1-U": "U wave peak",
    "5.13.5-5": "P Duration", "5.13.5-7": "PR Interval", "5.13.5-9": "QRS Duration",
    "5.13.5-11": "QT Interval", "5.13.5-13": "Q Duration", "5.13.5-15": "R Duration",
    "5.13.5-17": "S Duration", "5.13.5-19": "R' Duration", "5.13.5-21": "S' Duration",
    "5.13.5-49": "Isoelectric Segment duration at the onset of QRS",
    "5.13.5-51": "Isoelectric Segment duration at the end of QRS",
    "5.13.5-53": "Intrisicoid Deflection duration",
}


def _build() -> dict[tuple[str, str], str]:
    from pydicom.sr._concepts_dict import concepts
    from pydicom.sr._snomed_dict import mapping

    index: dict[tuple[str, str], str] = {}
    for scheme, names in concepts.items():
        for codes in names.values():
            for value, (meaning, cids) in codes.items():  # type: ignore[attr-defined]  # pydicom types its private concept table as object
                index[(scheme, value)] = meaning
                if scheme == "MDC" and value.startswith("2:") and ECG_LEADS_CID in cids:
                    index[("SCPECG", SCPECG_LEAD_PREFIX + value[2:])] = meaning
    for value, meaning in SCPECG_CODES.items():
        index[("SCPECG", value)] = meaning
    for sct, srt in mapping.get("SCT", {}).items():
        meaning = index.get(("SCT", sct))
        if meaning is not None:
            index[("SRT", srt)] = meaning
            index[("SNM3", srt)] = meaning
    return index


def _standard_codes() -> dict[tuple[str, str], str]:
    global _index
    if _index is None:
        with _lock:
            if _index is None:
                _index = _build()
    return _index


def standard_meaning(scheme: str, value: str) -> str | None:
    """The standard meaning of code ``value`` in ``scheme``, or None when the code is not one
    of the standard's context groups (a private or local code, or an unknown one)."""
    scheme, value = scheme.strip(), value.strip()
    if not scheme or not value or scheme.startswith("99"):
        return None
    meaning = _standard_codes().get((scheme, value))
    if meaning is not None:
        return meaning[:64]
    if scheme == "UCUM" and len(value) <= 16 and _plausible_unit(value):
        return value  # UCUM units are built, not listed; their meaning is the unit itself
    return None


def _plausible_unit(value: str) -> bool:
    """A UCUM unit such as ``mm``, ``cm2``, ``mL/s`` or ``[hnsf'U]``: no annotations in braces
    (free text), no word of five letters or more."""
    run = 0
    for c in value:
        if c.isalpha():
            run += 1
            if run >= 5:
                return False
        else:
            run = 0
            if c not in _UCUM_CHARACTERS:
                return False
    return True


# Concepts (DCM) of report content items whose TEXT says who someone is, where they work or
# which device made the report (PS3.16 TID 1003 Person Observer, TID 1004 Device Observer,
# TID 1005 Procedure Context, TID 1007/1008 Subject, TID 1009 Specimen, TID 1010 Device
# Subject, TID 1020/1021 Person and Device Participant, TID 8001/8002 Specimen Preparation
# and Sampling): the one list the de-identifier works from. Each says what the text is and
# which option keeps it (None: none does):
# ``identifier`` a login or an ID (of a person, an order, a specimen), looked for elsewhere
# as a whole value; ``issuer`` the institution's name for an assigning authority (an HL7
# hierarchic designator), looked for elsewhere as a whole value; ``organisation`` an
# organisation's name, looked for elsewhere as the institution's name is; ``location`` and
# ``device`` only replaced in the report.
REPORT_IDENTIFIER, REPORT_ISSUER, REPORT_ORGANISATION = "identifier", "issuer", "organisation"
REPORT_LOCATION, REPORT_DEVICE = "location", "device"
_INSTITUTION, _DEVICE = "retain_institution_identity", "retain_device_identity"
IDENTIFYING_CONCEPTS: Mapping[tuple[str, str], tuple[str, str | None]] = MappingProxyType({
    ("DCM", "128774"): (REPORT_IDENTIFIER, None),  # Person Observer's Login Name
    ("DCM", "128775"): (REPORT_IDENTIFIER, None),  # Identifier within Person Observer's Role
    ("DCM", "121030"): (REPORT_IDENTIFIER, None),  # Subject ID (a fetus's label: kept)
    ("DCM", "113871"): (REPORT_IDENTIFIER, None),  # Person ID
    ("DCM", "121020"): (REPORT_IDENTIFIER, None),  # Placer Number
    ("DCM", "121021"): (REPORT_IDENTIFIER, None),  # Filler Number
    ("DCM", "121022"): (REPORT_IDENTIFIER, None),  # Accession Number
    ("DCM", "121041"): (REPORT_IDENTIFIER, None),  # Specimen Identifier
    ("DCM", "121040"): (REPORT_IDENTIFIER, None),  # Specimen Accession Number
    ("DCM", "111700"): (REPORT_IDENTIFIER, None),  # Specimen Container Identifier
    ("DCM", "111705"): (REPORT_IDENTIFIER, None),  # Parent Specimen Identifier
    ("DCM", "113872"): (REPORT_ISSUER, _INSTITUTION),  # Person ID Issuer
    ("DCM", "110190"): (REPORT_ISSUER, _INSTITUTION),  # Issuer of Identifier (TID 1005)
    ("DCM", "111724"): (REPORT_ISSUER, _INSTITUTION),  # Issuer of Specimen Identifier
    ("DCM", "111706"): (REPORT_ISSUER, _INSTITUTION),  # Issuer of Parent Specimen Identifier
    ("DCM", "121009"): (REPORT_ORGANISATION, _INSTITUTION),  # Person Observer's Organization
    ("DCM", "113873"): (REPORT_ORGANISATION, _INSTITUTION),  # Organization Name
    ("DCM", "121017"): (REPORT_LOCATION, _INSTITUTION),  # Device Observer Physical Location
    ("DCM", "121197"): (REPORT_LOCATION, _INSTITUTION),  # Device Subject Physical Location
    ("DCM", "121013"): (REPORT_DEVICE, _DEVICE),  # Device Observer Name
    ("DCM", "121016"): (REPORT_DEVICE, _DEVICE),  # Device Observer Serial Number
    ("DCM", "110119"): (REPORT_DEVICE, _DEVICE),  # Station AE Title
    ("DCM", "113877"): (REPORT_DEVICE, _DEVICE),  # Device Name
    ("DCM", "113880"): (REPORT_DEVICE, _DEVICE),  # Device Serial Number
    ("DCM", "121193"): (REPORT_DEVICE, _DEVICE),  # Device Subject Name
    ("DCM", "121196"): (REPORT_DEVICE, _DEVICE),  # Device Subject Serial Number
})
# TID 1008 Subject Context, Fetus: a Subject ID among these (the subject class Fetus, a
# fetus number, the other rows of TID 1008: Mother of fetus, Number of Fetuses) is the
# fetus's label ("Fetus A", "Twin 2"), which tells the fetuses of one report apart and names
# no one: kept (cleaned of identifiers as other text is).
SUBJECT_ID = ("DCM", "121030")
FETUS_CONTEXT = frozenset({
    ("DCM", "121037"),  # Fetus Number
    ("DCM", "121026"),  # Fetus (Subject Class)
    ("DCM", "121036"),  # Mother of fetus
    ("DCM", "121038"),  # Number of Fetuses
    ("LN", "11878-6"),  # Number of Fetuses by US
})
# Sections of an OB-GYN or fetal echo report (TID 5000, 5220) that are about one fetus: the
# Subject Context, Fetus (TID 1008) they include may be its Subject ID alone ("Fetus A", as
# ultrasound machines write it), which is that fetus's label.
FETAL_SECTIONS = frozenset(("DCM", code) for code in (
    "125001",  # Fetal Biometry Ratios
    "125002",  # Fetal Biometry
    "125003",  # Fetal Long Bones
    "125004",  # Fetal Cranium
    "125006",  # Biophysical Profile
    "125008",  # Fetus Summary
    "125009",  # Early Gestation
    "125015",  # Fetus Characteristics
    "125016",  # Fetal Measurements
))
