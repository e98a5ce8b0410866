"""ATNA against a real audit repository: Debian's rsyslog receiving RFC 5425 syslog over TLS
(test CA, client certificate checked), every message a schema-valid DICOM audit message; the
repository stopped and started again loses nothing and receives nothing twice.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imageshare.app import atna_sender
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.storage.index.schema import audit_events
from tests.conftest import make_archive, require
from tests.peers import free_port, wait_for_port
from tests.pki import make_pki
from tests.unit.test_atna import audit_schema

RSYSLOGD = Path("/usr/sbin/rsyslogd")
GTLS = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
BOM = "\ufeff"


class Rsyslog:
    """rsyslogd with its own configuration: one TLS input written to one file."""

    def __init__(self, folder: Path, ca: Path, cert: Path, key: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.out = folder / "received.log"
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.config = folder / "rsyslog.conf"
        self.config.write_text(f"""
global(workDirectory="{work}" maxMessageSize="256k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{self.port}" address="127.0.0.1" ruleset="atna")
ruleset(name="atna") {{
  action(type="omfile" file="{self.out}" template="RSYSLOG_SyslogProtocol23Format")
}}
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        self.process = subprocess.Popen(
            [str(RSYSLOGD), "-n", "-f", str(self.config), "-i", str(self.folder / "pid")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)
        self.process = None

    def messages(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []


def _wait_for(condition, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the audit repository did not receive everything in time")
        time.sleep(0.2)


@pytest.fixture
def repository(tmp_path):
    require(RSYSLOGD.exists() and GTLS.exists(),
            "rsyslog with TLS (Debian packages rsyslog, rsyslog-gnutls)")
    pki = make_pki(tmp_path / "pki")
    running = Rsyslog(tmp_path / "rsyslog", pki.ca, pki.orthanc.cert, pki.orthanc.key).start()
    yield running, pki
    running.stop()


def test_every_event_reaches_rsyslog_once_and_in_order_across_a_repository_outage(
        repository, tmp_path):
    rsyslog, pki = repository
    archive = make_archive(tmp_path, atna_host="127.0.0.1", atna_port=rsyslog.port,
                           atna_ca_file=str(pki.ca), atna_audit_source_id="RVJ-IMAGESHARE",
                           atna_client_certificate=str(pki.client.cert),
                           atna_client_private_key=str(pki.client.key))
    sender = atna_sender(archive)
    assert sender is not None
    sender.start()
    clinician = Actor("user", "dr.who", "clinician", "10.1.2.3")
    uids = [f"1.2.826.0.1.3680043.10.543.{i}" for i in range(30)]

    def view(uid: str) -> None:
        archive.audit.record(AuditEvent(clinician, "study.view", "success", patient_id="943",
                                        study_uid=uid, instance_count=2))

    def rows() -> int:
        with archive.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(audit_events)).scalar()

    def timed(uid: str) -> float:
        started = time.monotonic()
        view(uid)
        return time.monotonic() - started

    try:
        while_up = max(timed(uid) for uid in uids[:10])
        _wait_for(lambda: len(rsyslog.messages()) == rows())
        rsyslog.stop()
        while_down = max(timed(uid) for uid in uids[10:25])
        archive.audit.record(AuditEvent(clinician, "session.end", "success"))
        # The request path never waits for the repository (a TCP connect to a closed port,
        # or a TLS timeout, would): recording is as quick as while it was up.
        assert while_down < max(1.0, 5 * while_up)
        time.sleep(3)  # the sender finds the repository down and keeps the events
        rsyslog.start()
        for uid in uids[25:]:
            view(uid)
        _wait_for(lambda: len(rsyslog.messages()) >= rows())
        time.sleep(1.5)  # nothing more (no duplicate) arrives
    finally:
        sender.stop()
    lines = rsyslog.messages()
    assert len(lines) == rows()
    schema = audit_schema()
    from lxml import etree

    seen = []
    for line in lines:
        header, _, xml = line.partition(BOM)
        # RFC 5424 as rsyslog parsed it: <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD
        assert header.startswith("<85>1 ") and " imageshare " in header
        assert header.split(" ")[5] == "IHE+RFC-3881"
        doc = etree.fromstring(xml.encode())
        assert schema.validate(doc), schema.error_log
        assert doc.find("AuditSourceIdentification").get("AuditSourceID") == "RVJ-IMAGESHARE"
        for obj in doc.iterfind("ParticipantObjectIdentification"):
            if obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180":
                seen.append(obj.get("ParticipantObjectID"))
    assert seen == uids  # each exactly once, in the order recorded
