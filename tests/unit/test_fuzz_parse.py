"""Fuzzing the DICOM parse path with Hypothesis: the checked-in corpus (tests/data/fuzz) and
mutations of it through the C-STORE handler's parse, a STOW-RS part and import.

Whatever the bytes: no crash (only a refusal with a reason, or a store), no hang (a deadline
per example), no unbounded memory, no staging file left, and nothing broken stored: every
stored instance is byte-identical to what was sent and parses again completely. The number
of examples per target is ``IMAGESHARE_FUZZ_EXAMPLES`` (default 120); runs are
deterministic unless ``IMAGESHARE_FUZZ_RANDOM`` is set.
"""

from __future__ import annotations

import io
import os
import resource
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from sqlalchemy import select

from imageshare.archive.header import read_header
from imageshare.archive.importing import Importer
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ConflictingInstance, InvalidInstance
from imageshare.storage.index.schema import instances
from imageshare.web.dicomweb import _store_part_batch
from imageshare.web.multipart import PartSink
from tests.conftest import make_archive
from tests.multipart_helpers import encode_multipart

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CORPUS = Path(__file__).resolve().parent.parent / "data" / "fuzz"
SEEDS = {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.dcm"))}
ACTOR = cli_actor()
EXAMPLES = int(os.environ.get("IMAGESHARE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, database=None,
                derandomize=not os.environ.get("IMAGESHARE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
_LENGTHS = [0, 1, 2, 7, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A corpus file with one to four mutations."""
    data = bytearray(draw(st.sampled_from(sorted(SEEDS.values()))))
    for _ in range(draw(st.integers(1, 4))):
        if len(data) <= 140:
            break
        at = draw(st.integers(128, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "length", "splice", "zero"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "length":
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(_LENGTHS)) & (0xFFFF if width == 2 else 0xFFFFFFFF)
            data[at:at + width] = value.to_bytes(width, "little")
        elif kind == "splice":
            other = draw(st.sampled_from(sorted(SEEDS.values())))
            start = draw(st.integers(0, len(other) - 1))
            data[at:at + draw(st.integers(1, 64))] = other[start:start + 64]
        else:
            data[at:at + draw(st.integers(1, 32))] = bytes(32)
    return bytes(data)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator:
    built = make_archive(tmp_path_factory.mktemp("fuzz"), min_free_disk_mb=0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value it meets
        yield built
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    built.close()
    assert growth_mb < 400, f"fuzzing grew the process by {growth_mb:.0f} MB"


def _whole(archive) -> None:
    """Nothing half-stored: staging is empty, every blob is indexed, every indexed instance
    parses again completely."""
    assert not list(archive.ingest.staging_dir.iterdir())
    with archive.engine.connect() as conn:
        keys = set(conn.execute(select(instances.c.blob_key)).scalars())
    assert set(archive.blobs.keys()) == keys


def _check_stored(archive, data: bytes, sop_uid: str) -> None:
    (inst,) = archive.retrieve.select(ACTOR, "study.retrieve", sop_uids=[sop_uid], audit=False)
    with archive.retrieve.open(inst) as fh:
        stored = fh.read()
    if stored == data:  # (a duplicate UID keeps the first copy)
        read_header(archive.blobs.local_path(inst.blob_key))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_corpus_file_gets_its_verdict(archive, name):
    data = SEEDS[name]
    if name.startswith("refuse-"):
        with pytest.raises(InvalidInstance) as refused:
            archive.ingest.store_stream(io.BytesIO(data), ACTOR)
        assert len(str(refused.value)) > 10
    else:
        result = archive.ingest.store_stream(io.BytesIO(data), ACTOR)
        assert result.outcome in ("stored", "duplicate")
        _check_stored(archive, data, result.sop_instance_uid)
    _whole(archive)


@FUZZ
@given(data=mutated())
def test_c_store_parse_survives_any_bytes(archive, data):
    """The C-STORE handler stores the file pynetdicom received (store_staged)."""
    out, path = archive.ingest.staging_file()
    with out:
        out.write(data)
    try:
        result = archive.ingest.store_staged(path, ACTOR)
    except (InvalidInstance, ConflictingInstance) as exc:
        assert str(exc)
    else:
        _check_stored(archive, data, result.sop_instance_uid)
    finally:
        path.unlink(missing_ok=True)
    _whole(archive)


@FUZZ
@given(data=mutated())
def test_stow_part_survives_any_bytes(archive, data):
    body, content_type = encode_multipart([data])
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    sink = PartSink(boundary, archive.ingest.staging_file)
    sink.feed(body)
    sink.close()
    for ok, item in _store_part_batch(archive, "http://x/dicomweb", sink.parts, ACTOR, None):
        answer = Dataset()
        answer.ReferencedSOPSequence = [item] if ok else []
        answer.to_json_dict()  # the STOW-RS answer can always be written
        if ok:
            _check_stored(archive, data, str(item.ReferencedSOPInstanceUID))
        else:
            assert item.FailureReason and str(item.get("ErrorComment", ""))
    _whole(archive)


@FUZZ
@given(data=mutated())
def test_import_survives_any_bytes(archive, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("import")
    (folder / "file.dcm").write_bytes(data)
    report = Importer(archive.ingest).run([folder], ACTOR)
    handled = (report.stored + report.duplicates + report.kept_first + report.replaced
               + report.held + len(report.refused) + report.skipped)
    assert handled == 1
    assert all(reason for _label, reason in report.refused)
    _whole(archive)
