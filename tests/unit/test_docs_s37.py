"""What README.md and docs/*.md tell a new PACS manager to type works as written: the
exchange walkthrough, the retention example, key rotation without blob encryption, backups
and the de-identification secret, DCMTK's query model, `make run`'s data folder and the
reference scale-out deployment's start."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageshare.cli import main
from imageshare.dicom.statuses import STORE_NOT_AUTHORISED

ROOT = Path(__file__).resolve().parents[2]
GENERATED = re.compile(r"<!-- (commands|settings):start -->.*?<!-- \1:end -->", re.S)


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """`imageshare` sets the umask to 077 when it runs; the test process keeps its own."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


def _doc(name: str) -> str:
    """A document without its generated blocks, whitespace collapsed to single spaces."""
    return " ".join(GENERATED.sub("", (ROOT / name).read_text()).split())


def _shell_lines(name: str) -> Iterator[list[str]]:
    """Each command line of the first ```sh block of a document, as argv after `imageshare`."""
    text = (ROOT / name).read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, f"{name} has no shell block"
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        at = [i for i, w in enumerate(words) if w.endswith("imageshare")]
        if at:
            yield words[at[0] + 1:]


def test_exchange_walkthrough_run_as_written_ties_every_site_account_to_its_site(
        tmp_path, monkeypatch, capsys):
    """docs/exchange.md's commands, typed in order, leave no site account unlinked (an
    unlinked one has every announcement, receipt, request and answer refused)."""
    monkeypatch.setenv("IMAGESHARE_NEW_USER_PASSWORD", "a long enough site password 37")
    monkeypatch.setenv("IMAGESHARE_LOG_LEVEL", "WARNING")
    made = []
    for argv in _shell_lines("docs/exchange.md"):
        argv = [str(tmp_path / a.removeprefix("./")) if a.startswith("./var") else a
                for a in argv]
        assert main(argv) == 0, argv
        made += [argv[2]] if argv[:2] == ["user", "add"] else []
    out = capsys.readouterr().out
    assert len(made) == 2, made
    assert "not linked to a connected site" not in out
    assert out.count("speaking for") == 2


def test_readme_retention_run_examples_are_accepted(tmp_path):
    """Every `retention run --at` example in the README runs (a future moment is refused)."""
    examples = re.findall(r"retention run --at (\S+?)`", _doc("README.md"))
    assert examples
    for moment in examples:
        assert main(["retention", "run", "--at", moment,
                     "--data-dir", str(tmp_path / "data")]) == 0, moment


def test_key_rotation_without_blob_encryption_is_described_as_it_behaves(tmp_path, capsys):
    """On an installation without blob encryption `storage seal` seals the index secrets
    (and says the blobs are not encrypted); governance.md says what it prints."""
    assert main(["storage", "seal", "--quiet", "--data-dir", str(tmp_path / "data")]) == 0
    said = capsys.readouterr().out
    governance = " ".join(_doc("docs/governance.md").split())
    for line in ("blobs are not encrypted here",
                 "every secret in the index is sealed under the current secret key: retired "
                 "secret keys may be removed"):
        assert line in said and line in governance


def test_backup_leaves_the_deid_secret_out_and_the_readme_says_to_keep_it(tmp_path):
    data = tmp_path / "data"
    assert main(["db", "upgrade", "--data-dir", str(data)]) == 0
    (data / "deid-secret").write_text("s37" * 20)
    assert main(["backup", str(tmp_path / "backup"), "--quiet", "--data-dir", str(data)]) == 0
    assert not [p for p in (tmp_path / "backup").rglob("*") if "deid-secret" in p.name]
    readme = _doc("README.md")
    backup = readme[readme.index("**Backup, restore and scrub**"):]
    backup = backup[:backup.index("`imageshare restore SRC")]
    assert "`deid-secret`" in backup and "`IMAGESHARE_DEID_SECRET`" in backup
    assert "cp -p secret-key deid-secret" in readme


def test_readme_dcmtk_advice_matches_the_listener():
    """findscu examples name a model the listener offers (DCMTK's default, worklist, fails),
    and the status the README says dcmsend counts as unknown is the one a refusal sends."""
    readme = _doc("README.md")
    finds = re.findall(r"`findscu [^`]*`", readme)
    assert finds and all(re.search(r" -[SP] ", f) for f in finds), finds
    code = f"{STORE_NOT_AUTHORISED.code:04X}"
    assert f"status {code}, {STORE_NOT_AUTHORISED.meaning}" in readme


def test_make_run_takes_its_data_folder_as_the_readme_says():
    """`make run` keeps its data where IMAGESHARE_DATA_DIR says (it passed ./var whatever
    the environment said), DATA_DIR= wins over it, and the README says both."""
    def data_dir(env: dict[str, str], *args: str) -> str:
        shown = subprocess.run(["make", "-n", "-s", "run", *args], cwd=ROOT, text=True,
                               capture_output=True, env=env, check=True)
        [serve] = [line for line in shown.stdout.splitlines() if " serve " in line]
        return serve.split("--data-dir ", 1)[1].split()[0]

    quiet = {k: v for k, v in os.environ.items() if k != "IMAGESHARE_DATA_DIR"}
    assert data_dir(quiet) == "./var"
    with_env = {**quiet, "IMAGESHARE_DATA_DIR": "/srv/imageshare-env"}
    assert data_dir(with_env) == "/srv/imageshare-env"
    assert data_dir(with_env, "DATA_DIR=/srv/chosen") == "/srv/chosen"
    readme = _doc("README.md")
    assert "`IMAGESHARE_DATA_DIR=/srv/imageshare make run`" in readme
    assert "`make run DATA_DIR=/srv/imageshare`" in readme


def test_scale_out_start_names_every_address_the_haproxy_example_reads():
    cfg = "\n".join(line for line in (ROOT / "docs/scale-out/haproxy.cfg").read_text()
                    .splitlines() if not line.lstrip().startswith("#"))
    wanted = set(re.findall(r'"\$\{([A-Z_]+)\}"', cfg))
    assert wanted >= {"LB_HTTP", "LB_DICOM", "INSTANCE_A_DICOM"}
    text = (ROOT / "docs/scale-out.md").read_text()
    start = text[text.index("## Starting it"):text.index("## What every instance needs")]
    assert {name for name in wanted if f"{name}=" in start} == wanted
    assert "haproxy -f docs/scale-out/haproxy.cfg" in start
    if "send-proxy" not in cfg:
        assert "`send-proxy-v2`" in start and "IMAGESHARE_DICOM_PROXY_PROTOCOL=true" in start


def test_architecture_names_modules_and_classes_that_exist():
    """docs/architecture.md's `module.py: Name` references point at real code."""
    text = (ROOT / "docs/architecture.md").read_text()
    refs = re.findall(r"`([a-z_/]+\.py): ([A-Za-z_]+)", text)
    assert len(refs) >= 8
    for module, name in refs:
        path = ROOT / "imageshare" / module
        assert path.exists(), module
        assert re.search(rf"^\s*(class|def) {name}\b", path.read_text(), re.M), (module, name)
