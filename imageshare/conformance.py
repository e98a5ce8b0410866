"""The DICOM conformance statement (``docs/conformance.md``), generated from the tables the
code itself uses: presentation contexts, transfer syntaxes and codecs, matching rules and
indexed keys, DICOMweb routes and media types, limits, DIMSE statuses and STOW-RS reasons.

``imageshare conformance`` prints it; a test keeps the file in step with the code.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from pydicom.datadict import keyword_for_tag
from pydicom.uid import UID, AllTransferSyntaxes

from imageshare.archive.dicom_json import BULK_DATA_THRESHOLD
from imageshare.archive.matching import MATCHING_RULES, MAX_WILDCARD_PATTERN
from imageshare.archive.query import INDEXED_KEYS
from imageshare.archive.rendering import MAX_RENDERED_FRAMES
from imageshare.archive.transcode import (
    COMPRESSED_MEDIA_TYPES,
    CONVERSION_TARGETS,
    can_decode,
    can_encode,
)
from imageshare.dicom.contexts import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    LISTENER_SYNTAXES,
    SCP_SOP_CLASSES,
    STORAGE_RECOGNITION,
)
from imageshare.dicom.statuses import STATUSES
from imageshare.settings import setting_docs
from imageshare.web.dicomweb import RESOURCE_MEDIA_TYPES, STOW_REASONS, router

_INTRO = """\
# ImageShare DICOM conformance statement

This statement is generated from ImageShare's own tables by `imageshare conformance`; a test
fails when it and the code disagree. It follows the outline of PS3.2 for the DICOM listener
(one Application Entity, default title `IMAGESHARE`, port 11112) and the DICOMweb origin
server under `/dicomweb` (PS3.18).

Where PS3.4 and PS3.18 leave a choice, ImageShare answers as Orthanc and dcm4chee do, so that
existing clients work unchanged; where they differ from the standard, the standard wins (see
*Matching*).
"""


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(cell).replace("|", "\\|").replace("\n", " ") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wrapped(text: str, width: int = 92) -> str:
    """``text`` as a Markdown paragraph of lines at most ``width`` characters long."""
    return textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False)


def _name(uid: str) -> str:
    return UID(uid).name or uid


def _network() -> str:
    rows = [(_name(uid), f"`{uid}`", "SCP", ", ".join(_name(s) for s in LISTENER_SYNTAXES))
            for uid in SCP_SOP_CLASSES]
    rows.append(("Every storage SOP class (private ones too)", "any", "SCP",
                 "the sender's first proposal of a standard transfer syntax; stored byte for byte"))
    rows.append(("Every storage SOP class of the stored instances", "as stored",
                 "SCU (C-MOVE sub-operations)",
                 "the stored syntax, plus Explicit and Implicit VR Little Endian, plus "
                 "(one context per SOP class) every other syntax the instances can be "
                 "converted to"))
    rows.append(("Every storage SOP class of the stored instances", "as stored",
                 "SCU (C-GET, on the requester's association)",
                 "what the requester accepted"))
    return "## DICOM network services\n\n" + _table(
        ("SOP class", "UID", "role", "transfer syntaxes"), rows) + "\n\n" + _wrapped(
        STORAGE_RECOGNITION) + """

An instance is sent as stored when the receiver accepted its syntax; otherwise it is decoded
and encoded again in a syntax the receiver accepted for its SOP class (Explicit VR Little
Endian first); big-endian, compressed and deflated instances all reach receivers that take
only Implicit VR Little Endian. A C-MOVE proposes to its destination, for each SOP class,
the stored syntaxes, the uncompressed ones, and one context of every other syntax the
instances can be converted to (Deflated, Big Endian, RLE, JPEG-LS Lossless, JPEG 2000
Lossless): a receiver taking only JPEG-LS or JPEG 2000 Lossless gets the instances converted
to it. An instance that cannot be converted is offered as stored, and only its sub-operation
fails. A destination that answers the association but accepts none of the contexts proposed
gets no A801 (it is known and answered): the C-MOVE ends `A702` with every instance counted
failed and listed in the Failed SOP Instance UID List, Error Comment `destination accepted
none of the SOP classes/syntaxes offered`.

ImageShare's Implementation Class UID is
`""" + IMPLEMENTATION_CLASS_UID + """`
and its Implementation Version Name `""" + IMPLEMENTATION_VERSION_NAME + """`, in every
association it accepts or requests (listener, C-MOVE sub-operations, exchange with other
sites) and in the File Meta Information of the instances the listener receives.

C-STORE checks that the data set is the instance the request announced: a SOP Class UID other
than the Affected SOP Class UID is refused with `A900`, a SOP Instance UID other than the
Affected SOP Instance UID with `C000`; nothing is stored and the refusal is audited. An
instance whose SOP Instance UID is stored already is a duplicate (Success, the stored copy
kept) when its data set is the stored one: the File Meta Information (group 0002: source AE
title, implementation) is not compared (PS3.10 7.1), so a C-STORE and a STOW-RS of the same
instance agree. In another transfer syntax it is the same instance when every other attribute
is equal and its pixels decode equal; pixels that do not decode here within 32 MiB are not
compared (equal attributes suffice). Other content under a stored SOP Instance UID is refused
with `0111` (C-STORE) or Failure Reason `0111` (STOW-RS), Error Comment `stored copy kept`;
the stored copy stays. A Part 10 file (STOW-RS, import, upload) whose File Meta Information
names another SOP Class or Instance than its data set, or none, is stored with its Media
Storage SOP Class and Instance UIDs set from the data set; the data set is kept byte for byte.

A C-STORE sub-operation of a C-MOVE this archive asked for (Move Originator AE title: ours)
may bring only the studies this archive is retrieving from the calling site; an instance of
any other study is refused with `A900` and audited, whatever the site's registration would
let it store unasked.

The relational option of SOP Class Extended Negotiation (PS3.7 D.3.3.5: byte 1 of the
Service Class Application Information, relational-queries for C-FIND and relational-retrieval
for C-MOVE and C-GET) is accepted on every Patient Root and Study Root model when proposed;
every other option, combined date-time matching, fuzzy semantic matching of names, timezone
query adjustment and enhanced multi-frame conversion, is answered 0, not supported. A request
that leaves out the unique key of a level above its own (PS3.4 C.4.1.2.1, C.4.2.2.1,
C.4.3.2.1: `StudyInstanceUID` above SERIES, `StudyInstanceUID` and `SeriesInstanceUID` above
IMAGE, and on the Patient Root model `PatientID` above STUDY too), or gives it as a wildcard
or a list, is answered as a relational one by default, negotiated or not, as Orthanc answers
it: findscu and many scripts cannot negotiate the option. With `dicom_strict_hierarchy`
(`IMAGESHARE_DICOM_STRICT_HIERARCHY`) such a request is refused unless the option was
negotiated, with `A900` (Identifier does not match SOP Class) before anything is matched or
sent, the key in the Error Comment (`Missing StudyInstanceUID (0020,000D) for a SERIES level
query`, or `... give one value, no wildcards`) and in the Offending Element (0000,0901), as
dcm4che's `dcmqrscp` answers. The usual sequence of a viewer (STUDY level by patient, then
SERIES with the Study Instance UID, then IMAGE with the Study and Series Instance UIDs) is
hierarchical either way.

C-STORE Priority: a node registered with an inbox (another hospital) that stores with
Priority HIGH makes its study an urgent arrival in the inbox (the team alerted once, by
e-mail to `IMAGESHARE_EXCHANGE_TEAM_EMAIL`); MEDIUM and LOW are routine. Priority changes
nothing else.
"""


def _transfer_syntaxes() -> str:
    rows = []
    for uid in AllTransferSyntaxes:
        syntax = UID(uid)
        if syntax.is_retired and uid not in LISTENER_SYNTAXES:
            continue
        rows.append((
            syntax.name, f"`{uid}`", "yes",
            "yes" if can_decode(uid) else "no",
            "yes" if can_encode(uid) else "no",
            COMPRESSED_MEDIA_TYPES.get(uid, "application/octet-stream"),
        ))
    return "## Transfer syntaxes\n\n" + _table(
        ("transfer syntax", "UID", "stored as received", "decoded here",
         "converted to on request", "frames / bulk data media type"), rows) + f"""

WADO-RS and DIMSE retrieval convert to: {", ".join(_name(u) for u in CONVERSION_TARGETS)}.
A WADO-RS request for any other syntax is answered 406, unless one of the requested instances
is stored in it (the others then come as stored, labelled with their own syntax).
"""


def _matching() -> str:
    rules = _table(("matching", "applies to", "rule"),
                   ((r.kind, r.applies_to, r.rule) for r in MATCHING_RULES))
    keys = [(level, f"({tag[:4]},{tag[4:]})", keyword_for_tag(int(tag, 16)))
            for level, tag in INDEXED_KEYS]
    return "## Query matching (C-FIND and QIDO-RS)\n\n" + rules + """

The same engine answers C-FIND (Patient Root and Study Root, every level) and QIDO-RS. These
keys are matched in the index; any other key is matched on the stored attributes of its
level (and, at instance level, on the stored header):

""" + _table(("level", "tag", "attribute"), keys) + """

Compared with Orthanc 1.10 (which compares date and time keys as text): ImageShare also finds
values stored with other precision (`1430` for `143000`) and times within the bound's own
span (`-1430` includes 14:30:00; `143000` includes 14:30:00.5), and matches lists of times
and wildcards inside lists. Everything Orthanc finds, ImageShare finds.

Return keys carry the stored value or zero length, never a default (PS3.4 C.4.1.1.3.2,
PS3.18): Number of Frames is the stored value when it is more than 1, or when the stored
header is read for another key; else zero length (the index keeps 1 for an instance without
one). Numbers of related studies, series and instances, Modalities and SOP Classes in Study,
Retrieve AE Title, Instance Availability and Available Transfer Syntax are the archive's own.

C-FIND answers are written in the Specific Character Set the request named when every value
of the answer fits it (the default repertoire, `ISO_IR 100` to `ISO_IR 166` single-byte sets,
`GB18030`, `GBK`): a workstation that knows only Latin-1 reads its own. An answer that needs
more, or a request naming ISO 2022 code extensions, is written in UTF-8 (`ISO_IR 192`).

A C-FIND with more matches than `IMAGESHARE_QIDO_MAX_LIMIT` sends that many and then ends with
`A700` (Refused: Out of Resources), Error Comment `more than N matches; narrow the query`,
never with Success; exactly that many matches end with `0000`. QIDO-RS answers that many and
a `Warning: 299` header saying there are more; exactly that many come without a Warning.
"""


def _dicomweb() -> str:
    rows = []
    # A HEAD route answers with its GET route's function: shown on the GET route's row.
    heads = {getattr(r, "path", "") for r in router.routes
             if set(getattr(r, "methods", []) or []) == {"HEAD"}}
    for route in router.routes:
        path = getattr(route, "path", "")
        methods = sorted(set(getattr(route, "methods", []) or []) - {"HEAD"})
        if not methods:
            continue
        if "GET" in methods and path in heads:
            methods.append("HEAD")
        rows.append((", ".join(methods), f"`{path}`", getattr(route, "summary", "") or ""))
    media = _table(("resource", "media types (Accept)"),
                   ((name, "; or ".join(types)) for name, types in RESOURCE_MEDIA_TYPES.items()))
    return "## DICOMweb resources\n\n" + _table(("method", "path", "transaction"), rows) + """

BulkDataURIs name their attribute's path: `bulkdata/TAG` at the top level, or
`bulkdata/SEQTAG/ITEM/TAG` (items numbered from 1) inside sequences, at any depth. URLs in
answers (Retrieve URL, BulkDataURI) start with `IMAGESHARE_PUBLIC_URL` when it is set, else
with the request's Host only when it names this server at the port it listens on (its
configured host, localhost, the machine's names and addresses), otherwise with the listening
address: never a forged Host. Behind a reverse proxy, set the public URL. `.../bulkdata` of a
study, series or instance answers all bulk data of its instances, each part's
Content-Location the BulkDataURI the metadata gives it (PS3.18 10.4.3.3.5).

Every part of a WADO-RS multipart/related answer has a Content-Location (PS3.18 8.6,
10.4.3.3.5): a part of bulk data, the BulkDataURI its element has in the metadata (pixel data
sent one part per compressed frame: each part its frame's URL, `.../frames/{n}`); a part of a
frames answer, its frame's URL; an instance of a study, series or instance answer, the
instance's WADO-RS URL.

### Media types

""" + media + """

Accept headers are honoured in order of quality; a request nothing can answer is refused with
406 and a problem document. Every part of a WADO-RS answer is known to be producible before
the first byte is sent: an instance that cannot be converted to the syntax asked for is sent
as stored, labelled with its real transfer syntax. A search with no match is 200 with `[]`.

Default transfer syntax (PS3.18 8.7.3.4): a WADO-RS study, series or instance asked for
without a transfer-syntax parameter (no Accept header, `*/*`, or
`multipart/related; type="application/dicom"` alone) comes in Explicit VR Little Endian
`1.2.840.10008.1.2.1`, decompressed as needed; so does a WADO-URI object
(`contentType=application/dicom`) without `transferSyntax`. Only `transfer-syntax=*` (or
naming the stored syntax) gives the stored bytes unchanged. An instance that cannot be
decompressed here (video, or a codec ImageShare lacks) comes as stored, labelled so.

HEAD on an instance or on metadata answers GET's status and headers without the body, under
the same permission; no instance is read or converted for it, and it is audited as a metadata
read.

Bulk data asked for with a bare `Accept: application/octet-stream` comes as one single-part
body (pixel data: every frame, uncompressed little endian); otherwise in multipart/related.
One frame (`frames/3`) asked for in a single-part media type (a bare
`application/octet-stream`, `image/jls`, `image/jp2`, `image/dicom-rle`, or `image/jpeg`,
with or without a transfer-syntax parameter) comes as that one body, in the representation
the multipart/related form of the type gives, with the transfer syntax in its Content-Type;
a single-part type is for a single response item only (PS3.18 10.4.4), so for a frame list
of several it is passed over, and when only such types were acceptable the answer is 406
saying that several frames come in multipart/related only. `image/jpeg` without a transfer
syntax is JPEG Lossless (PS3.18 Table 8.7.3-5), which ImageShare does not write: frames not
stored as JPEG are refused 406, and the answer names `image/jpeg;
transfer-syntax=1.2.840.10008.1.2.4.50` (lossy, 8-bit pixels) and the frame's rendered
resource (`.../frames/{n}/rendered`, image/jpeg or image/png), where a frame is an image to
look at.

QIDO-RS query parameters are attribute keywords or tags (`PatientName`, `00100010`, a path
into a sequence with `.`) and the reserved parameters `limit`, `offset`, `includefield`,
`fuzzymatching`, `accept` and `charset`; any other name (a typo such as `PatientNmae`, a
keyword in the wrong case) is refused with 400 naming it, as is an unknown keyword in
`includefield`. Ignored, a misspelt patient filter would answer every study the caller may
see.

Rendered resources (and WADO-URI images) refuse with 400 and the reason, before anything is
read or audited: a `window` that is not `center,width` or `center,width,function` (function
`linear`, `linear-exact` or `sigmoid`, PS3.3 C.11.2.1.3), a centre or width that is not a
finite number, a width below 1 (linear) or not above 0 (the others); a `quality` (WADO-URI
`imageQuality`) that is not a whole number from 1 to 100; a WADO-URI `windowCenter` without
`windowWidth` or the other way round. The window function asked for is the one applied.
Without one, a greyscale frame is shown through its modality LUT (rescale; in an enhanced
multi-frame instance its own Shared or Per-frame Functional Groups' rescale and window), then
the header's first window with its VOI LUT Function, else its VOI LUT Sequence, else the range
of the frame's values, mapped onto the full grey range as DCMTK's `dcmj2pnm` does; MONOCHROME1
is inverted; PALETTE COLOR goes through its palette (segmented palettes too). A compressed
frame whose codestream (JPEG, JPEG-LS, JPEG 2000, HTJ2K) claims more rows, columns or
components than the header is refused with 422 before it is decoded.

WADO-URI `anonymize` is refused with 400 and audited as a refusal (`access.denied`): ImageShare
never serves identifiable data to a caller who asked for it de-identified. De-identified copies
are made by an export (`POST /api/studies/{study}/exports`, de-identified with a profile by
default).

STOW-RS parts must each be application/dicom: a part with another Content-Type
(application/octet-stream included) fails with `C000` and is not stored, while the other parts
are (202); a part without a Content-Type is taken as the request's type, application/dicom.
"""


def _limits() -> str:
    settings = {name: (env, default, help_text)
                for name, env, default, help_text in setting_docs()}
    rows = [(f"`{env}`", f"`{default}`", help_text)
            for name, (env, default, help_text) in settings.items()
            if name in ("qido_max_limit", "max_associations", "max_pdu_size", "dicom_timeout",
                        "store_from_any_ae", "check_calling_host",
                        "check_called_ae")]
    rows += [
        ("wildcard pattern length", f"`{MAX_WILDCARD_PATTERN}`",
         "Longest key with `*` or `?` (longer ones are refused with a reason)."),
        ("inline binary in metadata", f"`{BULK_DATA_THRESHOLD}` bytes",
         "Longer binary values are given as BulkDataURIs."),
        ("rendered frames per request", f"`{MAX_RENDERED_FRAMES}`",
         "Most frames one rendered answer (multipart or animated GIF) holds."),
    ]
    return "## Limits\n\n" + _table(("limit", "default", "meaning"), rows) + "\n"


def _statuses() -> str:
    dimse = _table(("service", "status", "category", "meaning", "answered when"),
                   ((s.service, f"`{s.code:04X}`", s.category, s.meaning, s.when)
                    for s in STATUSES))
    stow = _table(("reason", "kind", "meaning", "given when"),
                  ((f"`{r.code:04X}`", r.kind, r.meaning, r.when) for r in STOW_REASONS))
    return "## DIMSE statuses\n\n" + dimse + """

Refusals carry an Error Comment with the reason where pynetdicom allows one. A request is
served only on a presentation context negotiated for its Affected SOP Class UID (`0122`
otherwise). The final C-MOVE or C-GET response (Success, Warning, Failure) counts the
completed, failed and warning sub-operations only: the Number of Remaining Sub-operations is
given in Pending and Canceled responses (PS3.4 C.4.2.1.6).

## STOW-RS results

""" + stow + """

The answer is 200 when every part was stored, 202 when some were, 409 when none was; parts
that failed are listed in Failed SOP Sequence with their reason and an Error Comment. The
study's Retrieve URL is given only when something of one study was stored.
"""


def statement() -> str:
    """The whole conformance statement in Markdown."""
    return "\n".join((_INTRO, _network(), _transfer_syntaxes(), _matching(), _dicomweb(),
                      _limits(), _statuses())).rstrip() + "\n"
