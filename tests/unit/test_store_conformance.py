"""Storage conformance: what counts as the same instance stored again (the data set, not the
file meta), what a C-STORE of other content or of a data set that is not the announced
instance answers, who ImageShare says it is on the wire, and why a C-MOVE has no
destination."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import func, select

from imageshare.dicom.contexts import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from imageshare.storage.index.schema import audit_events, instances
from tests.factory import ct_series
from tests.listener import listening
from tests.multipart_helpers import encode_multipart

ACTOR = cli_actor()
KEPT = "stored copy kept: this UID is stored with other content"


def _count(archive) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(instances)).scalar_one()


def _store_events(archive) -> list[tuple[str, str]]:
    with archive.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(audit_events.c.outcome, audit_events.c.detail)
            .where(audit_events.c.action == "instance.store")).all()]


def _with_meta(path: Path, target: Path, **meta: str) -> Path:
    """The instance at ``path`` with other File Meta Information values (data set unchanged)."""
    ds = dcmread(path)
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    ds.save_as(target)  # as it is: enforcing the file format would set the meta's UIDs again
    return target


@pytest.fixture
def ct(tmp_path) -> Path:
    return ct_series(tmp_path / "ct", count=1)[0]


@pytest.fixture
def scu():
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    return ae


# -- D3: the same data set under other file meta is the same instance ---------------------------

def test_the_same_data_set_with_other_file_meta_is_a_duplicate(archive, ct, tmp_path):
    archive.ingest.store_copy(ct, ACTOR)
    other = _with_meta(ct, tmp_path / "other.dcm", SourceApplicationEntityTitle="ELSEWHERE",
                       ImplementationClassUID="1.2.3.4", ImplementationVersionName="OTHER_1")
    assert other.read_bytes() != ct.read_bytes()
    assert archive.ingest.store_copy(other, ACTOR).outcome == "duplicate"
    assert _count(archive) == 1


def test_the_same_instance_in_another_transfer_syntax_is_a_duplicate(archive, ct, tmp_path):
    archive.ingest.store_copy(ct, ACTOR)
    for syntax in (ImplicitVRLittleEndian, RLELossless):
        ds = dcmread(ct)
        if syntax.is_compressed:
            ds.compress(syntax, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        target = tmp_path / f"{syntax.name}.dcm"
        ds.save_as(target, implicit_vr=syntax.is_implicit_VR, little_endian=True,
                   enforce_file_format=True)
        assert archive.ingest.store_copy(target, ACTOR).outcome == "duplicate", syntax.name


@pytest.mark.parametrize("implicit", [False, True])
def test_an_instance_with_or_without_trailing_padding_is_a_duplicate(archive, ct, tmp_path,
                                                                   implicit):
    """Data Set Trailing Padding (FFFC,FFFC) has no meaning (PS3.10 7.2) and DCMTK's storescu
    drops it: the same instance sent on by it and by another program is one instance, and
    other pixels behind the same padding are still other content."""
    ds = dcmread(ct)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    plain, padded = tmp_path / "plain.dcm", tmp_path / "padded.dcm"
    ds.save_as(plain, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    ds.DataSetTrailingPadding = b"\0" * 64
    ds.save_as(padded, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    assert archive.ingest.store_copy(padded, ACTOR).outcome == "stored"
    assert archive.ingest.store_copy(plain, ACTOR).outcome == "duplicate"
    ds.DataSetTrailingPadding = b"\0" * 8
    ds.save_as(tmp_path / "other-padding.dcm", implicit_vr=implicit, little_endian=True,
               enforce_file_format=True)
    assert archive.ingest.store_copy(tmp_path / "other-padding.dcm", ACTOR
                                     ).outcome == "duplicate"
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 1
    ds.PixelData = bytes(pixels)
    ds.save_as(tmp_path / "changed.dcm", implicit_vr=implicit, little_endian=True,
               enforce_file_format=True)
    assert archive.ingest.store_copy(tmp_path / "changed.dcm", ACTOR).outcome == "kept_first"
    assert _count(archive) == 1


def test_other_pixels_in_another_transfer_syntax_are_other_content(archive, ct, tmp_path):
    archive.ingest.store_copy(ct, ACTOR)
    ds = dcmread(ct)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert archive.ingest.store_copy(tmp_path / "rle.dcm", ACTOR).outcome == "kept_first"


def test_stow_of_an_instance_received_by_c_store_is_a_success(archive, client, ct, scu):
    with listening(archive, "PROBE") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        assert assoc.send_c_store(dcmread(ct)).Status == 0x0000
        assoc.release()
    body, content_type = encode_multipart([ct.read_bytes()])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type, "Accept":
                                    "application/dicom+json"})
    assert response.status_code == 200, response.text
    assert _count(archive) == 1


# -- D4: other content under a stored UID is a failure the sender sees --------------------------

def test_c_store_of_other_content_under_a_stored_uid_answers_0111(archive, ct, scu):
    archive.ingest.store_copy(ct, ACTOR)
    changed = dcmread(ct)
    changed.StudyDescription = "Changed content"
    with listening(archive, "PROBE") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        status = assoc.send_c_store(changed)
        assoc.release()
    assert status.Status == 0x0111
    assert status.ErrorComment == KEPT
    assert _count(archive) == 1
    assert any('"kept_first"' in detail for _outcome, detail in _store_events(archive))
    (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                      sop_uids=[str(changed.SOPInstanceUID)])
    with archive.retrieve.open(inst) as fh:
        assert fh.read() == ct.read_bytes()


# -- D2: the data set must be the instance the command announced --------------------------------

@pytest.mark.parametrize(("meta", "code", "named"), [
    ({"MediaStorageSOPClassUID": MRImageStorage}, 0xA900, "SOP Class UID"),
    ({"MediaStorageSOPInstanceUID": "1.2.826.0.1.3680043.8.498.1"}, 0xC000,
     "SOP Instance UID"),
])
def test_a_data_set_that_is_not_the_announced_instance_is_refused(
        archive, ct, scu, tmp_path, monkeypatch, meta, code, named):
    # pynetdicom's C-STORE of a file sent as it is takes the command's UIDs from its meta
    # information.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    lying = _with_meta(ct, tmp_path / "lying.dcm", **meta)
    before = len(_store_events(archive))
    with listening(archive, "PROBE") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        status = assoc.send_c_store(lying)
        assoc.release()
    assert status.Status == code
    assert named in status.ErrorComment
    assert _count(archive) == 0
    events = _store_events(archive)[before:]
    assert [outcome for outcome, _detail in events] == ["refused"]
    assert named in events[0][1]


# -- D8: ImageShare's own implementation identity ------------------------------------------------

def test_associations_and_received_files_name_imageshare(archive, ct, scu):
    with listening(archive, "PROBE") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert assoc.send_c_store(dcmread(ct)).Status == 0x0000
        assoc.release()
    assert IMPLEMENTATION_VERSION_NAME.startswith("IMAGESHARE_")
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16 and IMPLEMENTATION_CLASS_UID.is_valid
    (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                      sop_uids=[str(dcmread(ct).SOPInstanceUID)])
    with archive.retrieve.open(inst) as fh:
        meta = dcmread(fh, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


# -- C-MOVE without a destination says why -------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("destination", "comment"), [
    ("NOBODY", "destination AE title not registered"),
    ("DEADNODE", "destination did not accept the association"),
    # registered for DICOM TLS, and no TLS set up here: never reached in plain text
    ("TLSNODE", "destination is reached over DICOM TLS, which is not set up here"),
])
def test_c_move_without_a_destination_says_why(archive, ct, scu, destination, comment):
    archive.ingest.store_copy(ct, ACTOR)
    archive.nodes.add(Node("DEADNODE", "127.0.0.1", _free_port()))
    archive.nodes.add(Node("TLSNODE", "127.0.0.1", _free_port(), tls=True))
    query = dcmread(ct, stop_before_pixels=True)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = query.StudyInstanceUID
    with listening(archive, "PROBE") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        answers = list(assoc.send_c_move(identifier, destination,
                                         StudyRootQueryRetrieveInformationModelMove))
        assoc.release()
    final = answers[-1][0]
    assert final.Status == 0xA801
    assert final.ErrorComment == comment
