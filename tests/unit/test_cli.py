"""The one command line: import with a summary, node registry, audit export."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

from tests.factory import ct_series


def imageshare(tmp_path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"IMAGESHARE_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin",
           "IMAGESHARE_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "imageshare", *args], env=env, text=True,
                          capture_output=True, check=check, timeout=120)


def test_import_prints_a_summary_and_audit_export_lists_every_store(tmp_path):
    ct_series(tmp_path / "in", count=3, patient_id="CLI1")
    result = imageshare(tmp_path, "import", "--quiet", str(tmp_path / "in"))
    assert result.stdout.startswith("3 stored, 0 duplicates")
    lines = imageshare(tmp_path, "audit", "export").stdout.splitlines()
    stores = [json.loads(line) for line in lines if '"instance.store"' in line]
    assert len(stores) == 3
    assert {e["patient_id"] for e in stores} == {"CLI1"}
    assert all(e["actor"] == "system:cli" and e["outcome"] == "success" for e in stores)
    table = imageshare(tmp_path, "audit", "export", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [r["action"] for r in rows].count("instance.store") == 3


def test_nodes_are_added_listed_and_refused_twice(tmp_path):
    imageshare(tmp_path, "node", "add", "PACS1", "--host", "10.0.0.5", "--port", "104",
               "--name", "Main PACS")
    again = imageshare(tmp_path, "node", "add", "PACS1", "--host", "h", "--port", "1",
                       check=False)
    assert again.returncode == 2 and "registered already" in again.stderr
    bad = imageshare(tmp_path, "node", "add", "WAY_TOO_LONG_AE_TITLE", "--host", "h",
                     "--port", "104", check=False)
    assert bad.returncode == 2 and "AE title" in bad.stderr
    listed = imageshare(tmp_path, "node", "list").stdout
    assert "PACS1\t10.0.0.5:104" in listed


def test_openapi_document_needs_an_account(client, anonymous):
    assert anonymous.get("/api/openapi.json").status_code == 401
    paths = client.get("/api/openapi.json").json()["paths"]
    assert "/dicomweb/studies" in paths and "/api/nodes" in paths
