"""DICOM JSON (PS3.18 F.2) and DICOM XML (PS3.19 Native DICOM Model): reading values out
of stored JSON, and building both from stored data sets so that no stored value can make an
answer fail.

A value that cannot be converted for its VR is sent as it was stored where the format allows
(DICOM JSON permits strings for IS and DS), or is left out of that answer with a warning in
the log naming the instance and the attribute by UID and tag (never the value).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from imageshare.domain.identifiers import is_valid_nhs_number

log = logging.getLogger("imageshare.dicom_json")

NHS_ISSUER = "NHS"
BULK_DATA_THRESHOLD = 65536
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_STRING_VRS = frozenset({"IS", "DS"})
NATIVE_DICOM_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

# A BulkDataURI names a path to its attribute: "00420011" at the top level, or
# "54000100/1/54001010" (sequence tag, 1-based item number, tag, ...) inside sequences.
BulkUri = Callable[[str], str]


def text_of(element: dict[str, Any] | None) -> str:
    """The first value of a DICOM JSON element as text (a person name's alphabetic form)."""
    if not element:
        return ""
    values = element.get("Value") or []
    if not values:
        return ""
    return _value_text(values[0])


def _value_text(value: Any) -> str:
    """One DICOM JSON value as text: a person name's alphabetic form; "" for an empty value
    among several (null, PS3.18 F.2.5)."""
    if value is None:
        return ""
    return str(value.get("Alphabetic", "")) if isinstance(value, dict) else str(value)


def all_text(element: dict[str, Any] | None) -> str:
    """Every value of a DICOM JSON element, joined with commas (empty values left out)."""
    if not element:
        return ""
    return ", ".join(text for text in map(_value_text, element.get("Value") or []) if text)


def nhs_number_of(attrs: dict[str, Any]) -> str:
    """The patient's NHS number: the Patient ID issued by ``NHS``, or an Other Patient ID
    issued by NHS (or, without an issuer, one that passes the NHS check digit)."""
    if text_of(attrs.get("00100021")).upper() == NHS_ISSUER:
        return text_of(attrs.get("00100020"))
    for item in (attrs.get("00101002") or {}).get("Value") or []:
        value = text_of(item.get("00100020"))
        issuer = text_of(item.get("00100021")).upper()
        if issuer == NHS_ISSUER or (not issuer and is_valid_nhs_number(value)):
            return value
    return ""


# -- a reason as an Error Comment -------------------------------------------------------------

LO_MAX = 64  # characters of an LO value, Error Comment (0000,0902) included
_CUT_MARK = "..."  # ASCII: a DIMSE command set's Error Comment has no other repertoire


def error_comment(reason: str, most: int = LO_MAX) -> str:
    """``reason`` as an Error Comment (an LO value, PS3.5 6.2): one line, no backslash (LO's
    value separator), at most ``most`` characters; a longer reason is cut at the last word
    that fits and ends with ``...``, never in the middle of a word."""
    text = " ".join(reason.replace("\\", "/").split())
    if len(text) <= most:
        return text
    room = most - len(_CUT_MARK)
    head = text[:room + 1]  # one more: does the cut fall just before a space?
    cut = head[:room] if head[room:] == " " else head[:room].rsplit(" ", 1)[0]
    if len(cut) < room // 2:  # one very long word: cut it rather than say almost nothing
        cut = text[:room]
    return cut.rstrip(" ,;:(") + _CUT_MARK


# -- building DICOM JSON from a data set ---------------------------------------------------


def left_out(instance: str, path: str, vr: str, reason: str) -> None:
    """Log that an attribute was left out of an answer (UIDs and tags only, no values)."""
    log.warning("instance %s: attribute %s (%s) left out of the answer: %s",
                instance or "(unknown)", path, vr or "?", reason)


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _binary_vr(vr: str) -> str:
    """A definite binary VR for an ambiguous dictionary VR such as ``OB or OW``."""
    if vr in BINARY_VRS:
        return vr
    return "OW" if "OW" in vr else "OB"


def _is_binary(vr: str) -> bool:
    return vr in BINARY_VRS or (" or " in vr and ("OB" in vr or "OW" in vr) and "US" not in vr)


def _json_safe(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_json_safe(v) for v in value.values())
    if isinstance(value, list):
        return all(_json_safe(v) for v in value)
    return True


def _as_stored_numbers(element: DataElement) -> list[str] | None:
    """The values of an IS/DS element as the strings that were stored."""
    value = element.value
    values = list(value) if isinstance(value, list | tuple) or type(value).__name__ == \
        "MultiValue" else [value]
    texts = []
    for one in values:
        if one is None:
            continue
        original = getattr(one, "original_string", None)
        texts.append(str(original if original is not None else one).strip())
    return texts if all(_json_safe(t) for t in texts) else None


def _whole_numbers(element: DataElement) -> bool:
    """True when every value of an IS element is a whole number (or empty), as IS must be;
    False for a stored value such as ``1.5``, which pydicom keeps as a fraction."""
    value = element.value
    values = list(value) if isinstance(value, list | tuple) or type(value).__name__ == \
        "MultiValue" else [value]
    return all(one is None or one == "" or isinstance(one, int) for one in values)


def _with_nulls(element: DataElement) -> dict[str, Any] | None:
    """A multi-valued PN, IS or DS element some of whose values are empty (``A^B\\\\C^D``)
    as DICOM JSON, each empty value null (PS3.18 F.2.5), which pydicom's writer cannot do
    (it fails, and the element was left out or sent as strings); None for any other
    element. A number that is not valid for its VR goes out as the string stored."""
    value, vr = element.value, str(element.VR)
    if vr not in ("PN", "IS", "DS") or not (isinstance(value, list | tuple) or type(
            value).__name__ == "MultiValue"):
        return None
    values = list(value)
    if not any(one is None or str(one).strip() == "" for one in values):
        return None
    out: list[Any] = []
    for one in values:
        if one is None or str(one).strip() == "":
            out.append(None)
        elif vr == "PN":
            out.append(DataElement(element.tag, vr, one).to_json_dict(None, 0)["Value"][0])
        elif vr == "IS" and isinstance(one, int):
            out.append(int(one))
        elif vr == "DS" and isinstance(one, float) and math.isfinite(one):
            out.append(float(one))
        else:
            original = getattr(one, "original_string", None)
            out.append(str(original if original is not None else one).strip())
    return {"vr": vr, "Value": out}


def _raw_number_strings(raw: RawDataElement) -> list[str] | None:
    value = raw.value
    if not isinstance(value, bytes):
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return [v.strip() for v in text.strip(" \0").split("\\")]


class _Builder:
    def __init__(self, bulk_uri: BulkUri | None, threshold: int, instance: str,
                 quiet: bool = False) -> None:
        self.bulk_uri = bulk_uri
        self.threshold = threshold
        self.instance = instance
        # The caller logs what it does with a top-level attribute left out (inside a
        # sequence, whatever is left out is logged here).
        self.quiet = quiet

    def left_out(self, path: str, vr: str, reason: str) -> None:
        if not self.quiet or "/" in path:
            left_out(self.instance, path, vr, reason)

    def dataset(self, ds: Dataset, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tag in sorted(ds.keys()):
            key = f"{int(tag):08X}"
            path = prefix + key
            try:
                element = self.element(ds, tag, path)
            except Exception as exc:  # noqa: BLE001 - one bad value leaves out one attribute
                self.left_out(path, "", type(exc).__name__)
                continue
            if element is not None:
                out[key] = element
        return out

    def element(self, ds: Dataset, tag: Any, path: str) -> dict[str, Any] | None:
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            vr = str(raw.VR) if raw.VR else _dictionary_vr(int(tag))
            if vr == "UN":  # pydicom reads a UN value of a known attribute with its real VR
                vr = _dictionary_vr(int(tag))
            if _is_binary(vr):
                length = raw.length
                if raw.value is None or length == 0xFFFFFFFF or length > self.threshold:
                    return self._bulk(_binary_vr(vr), path)
        try:
            converted = ds[tag]
        except Exception as exc:  # noqa: BLE001 - the value cannot be read for its VR
            if isinstance(raw, RawDataElement) and (raw.VR in NUMBER_STRING_VRS):
                values = _raw_number_strings(raw)
                if values is not None:
                    return {"vr": str(raw.VR), "Value": values} if values != [""] else {
                        "vr": str(raw.VR)}
            self.left_out(path, str(getattr(raw, "VR", "") or ""),
                     type(exc).__name__)
            return None
        vr = str(converted.VR)
        if vr == "SQ":
            items = [self.dataset(item, f"{path}/{number}/")
                     for number, item in enumerate(converted.value or [], start=1)]
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        if _is_binary(vr):
            value = converted.value
            if value is None or len(value) == 0:
                return {"vr": _binary_vr(vr)}
            if len(value) > self.threshold:
                return self._bulk(_binary_vr(vr), path)
            if not isinstance(value, bytes | bytearray):
                self.left_out(path, vr, "binary value of an unexpected type")
                return None
            return {"vr": _binary_vr(vr), "InlineBinary": base64.b64encode(value).decode()}
        with_nulls = _with_nulls(converted)
        if with_nulls is not None:
            if _json_safe(with_nulls):
                return with_nulls
            self.left_out(path, vr, "value not representable in DICOM JSON")
            return None
        if vr == "IS" and not _whole_numbers(converted):
            # pydicom reads a stored "1.5" as a number that its JSON writer cuts to 1: a
            # value that is not a whole number goes out as it was stored, never changed.
            values = _as_stored_numbers(converted)
            if values is not None:
                return {"vr": vr, "Value": values} if any(values) else {"vr": vr}
        try:
            element = converted.to_json_dict(None, self.threshold)
        except Exception as exc:  # noqa: BLE001 - invalid for its VR
            if vr in NUMBER_STRING_VRS:
                values = _as_stored_numbers(converted)
                if values is not None:
                    return {"vr": vr, "Value": values} if any(values) else {"vr": vr}
            self.left_out(path, vr, type(exc).__name__)
            return None
        if not _json_safe(element):
            if vr in NUMBER_STRING_VRS:
                values = _as_stored_numbers(converted)
                if values is not None:
                    return {"vr": vr, "Value": values}
            self.left_out(path, vr, "value not representable in DICOM JSON")
            return None
        return element

    def _bulk(self, vr: str, path: str) -> dict[str, Any] | None:
        if self.bulk_uri is None:
            return None
        return {"vr": vr, "BulkDataURI": self.bulk_uri(path)}


def dataset_json(
    ds: Dataset, bulk_uri: BulkUri | None = None, threshold: int = BULK_DATA_THRESHOLD,
    instance: str = "",
) -> dict[str, Any]:
    """DICOM JSON of ``ds`` that cannot fail on a stored value.

    Binary values longer than ``threshold`` bytes (at any depth) become BulkDataURIs named
    by ``bulk_uri(path)``, or are left out when ``bulk_uri`` is None; they are never read.
    ``instance`` (a SOP Instance UID) names the instance in warnings.
    """
    return _Builder(bulk_uri, threshold, instance).dataset(ds, "")


def element_json(ds: Dataset, tag: int, instance: str = "") -> dict[str, Any] | None:
    """DICOM JSON of the one attribute ``tag`` of ``ds``, exactly as :func:`dataset_json`
    writes it (so that QIDO-RS and the WADO-RS metadata agree: a non-integer IS as the
    string stored, an empty value among several as null); binary values over the bulk data
    threshold are left out. None when the value cannot be written for its VR (nothing is
    logged for the attribute itself: the caller decides what to do and says so)."""
    builder = _Builder(None, BULK_DATA_THRESHOLD, instance, quiet=True)
    try:
        return builder.element(ds, tag, f"{int(tag):08X}")
    except Exception:  # noqa: BLE001 - one bad value: the caller leaves it out or keeps it
        return None


def safe_json(attrs: dict[str, Any], instance: str = "", check_values: bool = True
              ) -> dict[str, Any]:
    """Stored DICOM JSON with every element that JSON cannot carry left out (with a warning):
    non-finite numbers, strings that are not Unicode.

    ``check_values=False`` keeps only the shape (elements and sequence items that are
    objects) and leaves the values unchecked, for a caller that renders with
    :func:`json_bytes` (which refuses what JSON cannot carry) and calls this again with the
    check when it is refused."""
    out = {}
    for tag, element in attrs.items():
        if not isinstance(element, dict):
            continue
        if element.get("vr") == "SQ":
            items = [safe_json(item, instance, check_values)
                     for item in element.get("Value") or [] if isinstance(item, dict)]
            out[tag] = {**element, "Value": items} if items else {"vr": "SQ"}
        elif not check_values or _json_safe(element):
            out[tag] = element
        else:
            left_out(instance, tag, str(element.get("vr", "")),
                     "value not representable in DICOM JSON")
    return out


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; raises ValueError (UnicodeEncodeError included) for
    a non-finite number or a string that is not Unicode, which JSON cannot carry."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


# -- DICOM XML (PS3.19 Native DICOM Model) ----------------------------------------------------

_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _xml_safe(text: str) -> bool:
    return all(
        c in "\t\n\r" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
        or "\U00010000" <= c <= "\U0010ffff"
        for c in text
    )


def _private_creator(attrs: dict[str, Any], tag: str) -> str | None:
    group, element = int(tag[:4], 16), int(tag[4:], 16)
    if group % 2 == 0 or element < 0x1000:
        return None
    creator = attrs.get(f"{group:04X}{element >> 8:04X}")
    return text_of(creator) or None


def _xml_values(parent: ET.Element, vr: str, values: list[Any]) -> None:
    for number, value in enumerate(values, start=1):
        if vr == "PN":
            name = ET.SubElement(parent, "PersonName", number=str(number))
            if value is None:  # an empty value among others: an empty PersonName
                continue
            groups = value if isinstance(value, dict) else {"Alphabetic": str(value)}
            for group in ("Alphabetic", "Ideographic", "Phonetic"):
                if not groups.get(group):
                    continue
                node = ET.SubElement(name, group)
                for component, part in zip(_PN_COMPONENTS, str(groups[group]).split("^"),
                                           strict=False):
                    if part:
                        ET.SubElement(node, component).text = part
        else:
            node = ET.SubElement(parent, "Value", number=str(number))
            node.text = "" if value is None else str(value)


def _xml_dataset(parent: ET.Element, attrs: dict[str, Any], instance: str) -> None:
    for tag, element in sorted(attrs.items()):
        vr = str(element.get("vr", "UN"))
        keyword = keyword_for_tag(int(tag, 16)) if len(tag) == 8 else ""
        node_attrs = {"tag": tag, "vr": vr}
        if keyword:
            node_attrs["keyword"] = keyword
        creator = _private_creator(attrs, tag)
        if creator:
            node_attrs["privateCreator"] = creator
        texts: Iterable[str] = []
        if vr != "SQ":
            values = element.get("Value") or []
            texts = [str(v.get(g, "")) for v in values if isinstance(v, dict)
                     for g in ("Alphabetic", "Ideographic", "Phonetic")] + [
                str(v) for v in values if not isinstance(v, dict)]
        if not all(_xml_safe(t) for t in texts) or not _xml_safe(creator or ""):
            left_out(instance, tag, vr, "value not representable in XML")
            continue
        node = ET.SubElement(parent, "DicomAttribute", node_attrs)
        if vr == "SQ":
            for number, item in enumerate(element.get("Value") or [], start=1):
                _xml_dataset(ET.SubElement(node, "Item", number=str(number)), item, instance)
        elif "BulkDataURI" in element:
            ET.SubElement(node, "BulkData", uri=str(element["BulkDataURI"]))
        elif "InlineBinary" in element:
            ET.SubElement(node, "InlineBinary").text = str(element["InlineBinary"])
        else:
            _xml_values(node, vr, list(element.get("Value") or []))


def native_dicom_xml(attrs: dict[str, Any], instance: str = "") -> bytes:
    """One data set as a PS3.19 Native DICOM Model XML document (UTF-8)."""
    root = ET.Element("NativeDicomModel", xmlns=NATIVE_DICOM_NAMESPACE)
    _xml_dataset(root, attrs, instance)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
