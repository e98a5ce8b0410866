"""Which coded entries the verifier takes for the standard's own, and which Modality values are
the standard's defined terms: words that are no finding even when they equal a part of
someone's name (a patient called Lead, Mass or Peak; a Korean patient called Ko whose Key
Object Selection document's Modality is KO).

The verifier's own reading of PS3.16, kept apart from the de-identifier's on purpose: a code
item counts as standard when its scheme and value are a code of pydicom's copy of the context
groups and its meaning is that code's meaning (in any case); also the ECG leads in their
SCP-ECG form (``5.6.3-9-N``, MDC lead ``2:N`` of CID 3001) and the SCP-ECG codes of CID 3335
(ECG annotations) and CID 3687 (waveform durations), which pydicom lists in MDC only.
"""

from __future__ import annotations

import threading

# Modality (0008,0060) defined terms, PS3.3 C.7.3.1.1.1, current and retired.
MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC "
    "HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT "
    "PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN "
    "RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC CD DD DF DM EC FA "
    "FS LP MA MS OPR ST VF".split())
MODALITY_TAGS = frozenset({0x00080060, 0x00080061})  # Modality, Modalities in Study
CODE_VALUE, CODING_SCHEME, CODE_MEANING = 0x00080100, 0x00080102, 0x00080104
CODE_TAGS = frozenset({CODE_VALUE, CODING_SCHEME, CODE_MEANING})
# PS3.16 CID 3335 and CID 3687 in their SCPECG form: value -> meaning.
_SCPECG = {
    "5.7.1-3": "Fiducial point", "D.4.1-J": "J point", "D.4.1-ST20": "J point + 20 msec",
    "D.4.1-ST60": "J point + 60 msec", "D.4.1-ST80": "J point +80 msec",
    "5.10.1.2": "Pacemaker spike, suppressed", "D.4.1-PR": "PR segment (isoelectric point)",
    "5.10.3-1": "P wave onset", "5.10.3-2": "P wave end", "D.4.1-P": "P wave peak",
    "5.10.3-3": "QRS onset", "5.10.3-4": "QRS end", "D.4.1-Q": "Q wave",
    "D.4.1-R": "R wave peak", "D.4.1-R2": "R' peak", "D.4.1-S": "S wave",
    "D.4.1-S2": "S' wave", "D.4.1-STE": "T wave onset", "D.4.1-T": "T wave peak",
    "5.10.3-5": "T wave end", "D.4.1-U": "U wave peak", "5.13.5-5": "P Duration",
    "5.13.5-7": "PR Interval", "5.13.5-9": "QRS Duration", "5.13.5-11": "QT Interval",
    "5.13.5-13": "Q Duration", "5.13.5-15": "R Duration", "5.13.5-17": "S Duration",
    "5.13.5-19": "R' Duration", "5.13.5-21": "S' Duration",
    "5.13.5-49": "Isoelectric Segment duration at the onset of QRS",
    "5.13.5-51": "Isoelectric Segment duration at the end of QRS",
    "5.13.5-53": "Intrisicoid Deflection duration",
}
_lock = threading.Lock()
_meanings: dict[tuple[str, str], str] | None = None


def _read() -> dict[tuple[str, str], str]:
    from pydicom.sr._concepts_dict import concepts
    from pydicom.sr._snomed_dict import mapping

    found: dict[tuple[str, str], str] = {}
    for scheme, names in concepts.items():
        for codes in names.values():
            for value, (meaning, groups) in codes.items():  # type: ignore[attr-defined]  # pydicom types its concept table as object
                found[(scheme, value)] = meaning.casefold()
                if scheme == "MDC" and value.startswith("2:") and 3001 in groups:
                    found[("SCPECG", "5.6.3-9-" + value[2:])] = meaning.casefold()
    for value, meaning in _SCPECG.items():
        found[("SCPECG", value)] = meaning.casefold()
    for sct, srt in mapping.get("SCT", {}).items():
        if ("SCT", sct) in found:
            found[("SRT", srt)] = found[("SNM3", srt)] = found[("SCT", sct)]
    return found


def _index() -> dict[tuple[str, str], str]:
    global _meanings
    if _meanings is None:
        with _lock:
            if _meanings is None:
                _meanings = _read()
    return _meanings


def standard_code(scheme: str, value: str, meaning: str) -> bool:
    """True when (``scheme``, ``value``) is a code of the standard's context groups and
    ``meaning`` is its meaning (any case; a meaning cut at 64 characters counts)."""
    scheme, value, meaning = scheme.strip(" \0"), value.strip(" \0"), meaning.strip(" \0")
    if not scheme or not value or not meaning:
        return False
    known = _index().get((scheme, value))
    if known is None:
        return False
    meaning = meaning.casefold()
    return known == meaning or (len(meaning) == 64 and known.startswith(meaning))


def defined_modalities(text: str) -> bool:
    """True when every value of a Modality (or Modalities in Study) value is a defined term."""
    values = [v.strip(" \0") for v in text.split("\\")]
    return all(v in MODALITIES for v in values if v) and any(values)
