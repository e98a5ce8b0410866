"""The one command, ``imageshare``: each sub-command calls a service."""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imageshare import __version__
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ImageShareError
from imageshare.settings import Settings, load_settings, setting_docs
from imageshare.storage.files import PRIVATE_UMASK


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--data-dir", type=Path, help="data folder (IMAGESHARE_DATA_DIR)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageshare", description="ImageShare medical image exchange",
        epilog="Settings: " + ", ".join(env for _n, env, _d, _h in setting_docs()),
    )
    parser.add_argument("--version", action="version", version=f"imageshare {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server and the DICOM listener")
    _common(serve)
    serve.add_argument("--http-host", help="address of the web app (IMAGESHARE_HTTP_HOST)")
    serve.add_argument("--http-port", type=int, help="port of the web app and DICOMweb "
                       "(IMAGESHARE_HTTP_PORT)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (IMAGESHARE_DICOM_PORT)")
    serve.add_argument("--ae-title", help="this archive's AE title (IMAGESHARE_AE_TITLE)")
    serve.add_argument("--dicom-tls-port", type=int, help="DICOM TLS port (needs a certificate)")
    serve.add_argument("--tls-certificate", help="PEM certificate for HTTPS and DICOM TLS")
    serve.add_argument("--tls-private-key", help="PEM private key of the certificate")
    serve.add_argument("--tls-ca-file", help="PEM authorities trusted for peers")
    serve.add_argument("--tls-crl-file",
                       help="PEM revocation lists of those authorities (DICOM TLS peers)")

    user = sub.add_parser("user", help="manage user accounts").add_subparsers(
        dest="action", required=True
    )
    add = user.add_parser("add", help="create a user")
    _common(add)
    add.add_argument("username")
    add.add_argument("--role", default="clinician",
                     help="admin, clinician (the default), radiographer, sonographer, educator, "
                     "reviewer, patient, service (a machine) or site (another hospital)")
    add.add_argument("--email", default="", help="address for notifications")
    add.add_argument("--site", default="",
                     help="for --role site: the AE title of the connected site (a registered "
                     "node) this account speaks for")
    add.add_argument(
        "--password", help="password (else IMAGESHARE_NEW_USER_PASSWORD, else asked for)"
    )
    link = user.add_parser("link-site", help="tie a site account to its connected site")
    _common(link)
    link.add_argument("username")
    link.add_argument("ae_title", help="the AE title of a registered node ('' unlinks)")
    token = user.add_parser("token", help="create a personal API token for a user")
    _common(token)
    token.add_argument("username")
    token.add_argument("--name", default="cli",
                       help="the token's label, shown on the account page (default cli)")

    node = sub.add_parser("node", help="manage remote DICOM nodes").add_subparsers(
        dest="action", required=True
    )
    nadd = node.add_parser("add", help="register a remote DICOM AE / DICOMweb site")
    _common(nadd)
    nadd.add_argument("ae_title")
    nadd.add_argument("--host", required=True,
                      help="the host it calls from and is called at (checked on every call)")
    nadd.add_argument("--port", type=int, required=True,
                      help="its DICOM port (where C-MOVE sends to it)")
    nadd.add_argument("--dicomweb", default="", help="DICOMweb base URL of the site")
    nadd.add_argument("--name", default="", help="display name")
    nadd.add_argument("--no-query", action="store_true", help="may not query us")
    nadd.add_argument("--no-retrieve", action="store_true", help="may not retrieve from us")
    nadd.add_argument("--no-store", action="store_true", help="may not store to us")
    nadd.add_argument("--replace", action="store_true", help="update an existing node")
    nadd.add_argument("--no-search", action="store_true", help="do not search this site")
    nadd.add_argument("--no-retrieve-from", action="store_true",
                      help="do not retrieve from this site")
    nadd.add_argument("--no-send-to", action="store_true", help="do not send to this site")
    nadd.add_argument("--inbox", action="store_true",
                      help="another hospital: what it sends lands in the inbox for review "
                      "(and expires unless accepted); without it, studies from the node go "
                      "straight into the archive (a modality or the local PACS)")
    nadd.add_argument("--tls", action="store_true",
                      help="reach the node's DICOM port over TLS (BCP 195; its certificate "
                      "is checked against the system's authorities and IMAGESHARE_TLS_CA_FILE)")
    nadd.add_argument("--pin-certificate", default="", metavar="FILE_OR_SHA256",
                      help="with --tls: the only certificate this AE title is accepted with "
                      "when it calls us (a PEM/DER file, or its SHA-256 fingerprint); without "
                      "it any certificate the trusted authorities signed is accepted")
    nadd.add_argument("--dicomweb-auth", default="",
                      help="DICOMweb credentials: user:password or 'Bearer TOKEN'")
    nlist = node.add_parser("list", help="list registered nodes")
    _common(nlist)
    nrefused = node.add_parser(
        "refused", help="list DICOM callers that were refused (AE title, host, count, reason)")
    _common(nrefused)
    nrm = node.add_parser("remove", help="forget a node")
    _common(nrm)
    nrm.add_argument("ae_title")

    ehr = sub.add_parser(
        "ehr", help="electronic health records that launch ImageShare with signed URLs (/iid)"
    ).add_subparsers(dest="action", required=True)
    eadd = ehr.add_parser("add", help="register an EHR and print its new shared secret (once)")
    _common(eadd)
    eadd.add_argument("name")
    elist = ehr.add_parser("list", help="list registered EHRs")
    _common(elist)
    erm = ehr.add_parser("remove", help="forget an EHR (its launch URLs stop working)")
    _common(erm)
    erm.add_argument("name")

    imp = sub.add_parser("import", help="import files, folders, zip files and DICOMDIR media")
    _common(imp)
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--quiet", action="store_true", help="no progress bar")

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True
    )
    export = audit.add_parser("export", help="write audit events as JSON lines or CSV")
    _common(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="JSON lines (the default) or CSV")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.add_argument("--limit", type=int, default=1_000_000,
                        help="at most this many events, the newest (default 1000000)")
    averify = audit.add_parser(
        "verify", help="check the audit hash chain and its signed heads (exit 0 intact, "
        "1 tampering found)")
    _common(averify)
    head = audit.add_parser("head", help="export the signed audit chain head now")
    _common(head)
    events = audit.add_parser(
        "events", help="list the audit event catalogue (docs/audit-events.md)")
    events.add_argument("--markdown", action="store_true")

    db = sub.add_parser("db", help="the index database").add_subparsers(
        dest="action", required=True
    )
    up = db.add_parser("upgrade", help="apply schema migrations")
    _common(up)

    deid = sub.add_parser(
        "deidentify", help="de-identify files, folders, zips and DICOMDIR media (offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEIDENTIFY_EXIT_CODES)
    _common(deid)
    deid.add_argument("inputs", nargs="+", type=Path)
    deid.add_argument("--out", type=Path, required=True,
                      help="output folder (or .zip file with --format zip)")
    deid.add_argument("--profile", default="basic",
                      help="basic, teaching, research, accreditation or one of the file's")
    deid.add_argument("--format", choices=("folder", "zip", "dicomdir"), default="folder")
    deid.add_argument("--password", default="",
                      help="AES-encrypt the zip with this password (or IMAGESHARE_EXPORT_PASSWORD)")
    deid.add_argument("--report", type=Path,
                      help="also write the full report (with input paths) to this file")
    deid.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = sub.add_parser(
        "verify", help="check a de-identified export against its sources (with --source); "
        "without an export: every stored blob against its recorded digest (a scrub)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=VERIFY_EXIT_CODES)
    _common(verify)
    verify.add_argument("export", nargs="?", type=Path,
                        help="de-identified export: folder, zip, DICOM, PNG, JPEG, MP4 or PDF")
    verify.add_argument("--source", type=Path, action="append", default=[],
                        help="the original files, folders, zips or DICOMDIR media (repeatable)")
    verify.add_argument("--profile", default="basic",
                        help="the profile the export was made with (what it may keep)")
    verify.add_argument("--ocr", choices=("auto", "always", "never"), default="auto",
                        help="read pixels with OCR: auto (images that may carry text), "
                        "always, never")
    verify.add_argument("--password", default="",
                        help="password of an encrypted zip (or IMAGESHARE_EXPORT_PASSWORD)")
    verify.add_argument("--report", type=Path, help="write the findings as JSON to this file")

    backup = sub.add_parser(
        "backup", help="write a consistent snapshot of the index and the blobs to DEST while "
        "the server runs (incremental for blobs already there)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BACKUP_EXIT_CODES)
    _common(backup)
    backup.add_argument("dest", type=Path, help="backup folder (made if absent)")
    backup.add_argument("--quiet", action="store_true", help="no progress bar")
    restore = sub.add_parser(
        "restore", help="rebuild an empty installation (index and blobs) from a backup",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RESTORE_EXIT_CODES)
    _common(restore)
    restore.add_argument("src", type=Path, help="backup folder written by imageshare backup")
    restore.add_argument("--snapshot", default="", help="snapshot name (default: the latest)")
    restore.add_argument("--quiet", action="store_true", help="no progress bar")
    restore.add_argument(
        "--accept-unsigned", action="store_true",
        help="restore a backup whose manifest signature cannot be checked (made by an older "
             "version, or the installation key is lost); audited")

    storage = sub.add_parser("storage", help="the blob stores").add_subparsers(
        dest="action", required=True)
    seal = storage.add_parser(
        "seal", help="seal blobs written before encryption or under a retired secret key "
        "under the current key, each checked against its recorded digest",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SEAL_EXIT_CODES)
    _common(seal)
    seal.add_argument("--quiet", action="store_true", help="no progress bar")

    retention = sub.add_parser(
        "retention", help="retention classes and their rules").add_subparsers(
        dest="action", required=True)
    run_retention = retention.add_parser(
        "run", help="delete what its retention class lets go (never clinical, never on hold)")
    _common(run_retention)
    run_retention.add_argument("--at", default="",
                               help="act as if it were this past moment (ISO 8601)")
    show = retention.add_parser("show", help="a study's retention classes, holds and "
                                "whether it may be deleted")
    _common(show)
    show.add_argument("study_uid")
    rules = retention.add_parser("rules", help="list the retention policy rules")
    _common(rules)
    rule = retention.add_parser(
        "rule", help="set (or --remove) the class arrivals of a source, modality, collection "
        "or case type get")
    _common(rule)
    rule.add_argument("kind", choices=["source", "modality", "collection", "case_type"])
    rule.add_argument("value", help="AE title or account, modality code, collection or type")
    rule.add_argument("retention_class", nargs="?", default="",
                      help="clinical, temporary, teaching or research")
    rule.add_argument("--remove", action="store_true", help="remove the rule")
    rule.add_argument("--by", required=True, help="the administrator's account name")

    hold = sub.add_parser("hold", help="legal holds: nothing they cover is deleted"
                          ).add_subparsers(dest="action", required=True)
    place = hold.add_parser("place", help="place a legal hold on a patient or a study")
    _common(place)
    place.add_argument("--patient", default="", help="Patient ID")
    place.add_argument("--issuer", default="", help="issuer of the Patient ID")
    place.add_argument("--study", default="", help="Study Instance UID")
    place.add_argument("--reason", required=True)
    place.add_argument("--by", required=True, help="the administrator's account name")
    lift = hold.add_parser("lift", help="lift a legal hold")
    _common(lift)
    lift.add_argument("hold_id")
    lift.add_argument("--reason", required=True)
    lift.add_argument("--by", required=True, help="the administrator's account name")
    holds = hold.add_parser("list", help="list legal holds in force (--all: lifted too)")
    _common(holds)
    holds.add_argument("--all", action="store_true")

    deletion = sub.add_parser(
        "deletion", help="deleting a study: one administrator asks, another approves"
    ).add_subparsers(dest="action", required=True)
    ask = deletion.add_parser("request", help="ask for a study's deletion")
    _common(ask)
    ask.add_argument("study_uid")
    ask.add_argument("--reason", required=True)
    ask.add_argument("--by", required=True, help="the administrator's account name")
    for verb, text in (("approve", "approve a request (another administrator): the study is "
                        "deleted"), ("refuse", "refuse (or withdraw) a request")):
        decide = deletion.add_parser(verb, help=text)
        _common(decide)
        decide.add_argument("request_id")
        decide.add_argument("--note", default="")
        decide.add_argument("--by", required=True, help="the administrator's account name")
    again = deletion.add_parser(
        "allow-again", help="let a deleted study's instances be stored again (an approved "
        "deletion refuses them when they are sent again)")
    _common(again)
    again.add_argument("study_uid")
    again.add_argument("--reason", required=True)
    again.add_argument("--by", required=True, help="the administrator's account name")
    requests = deletion.add_parser("list", help="list deletion requests")
    _common(requests)
    requests.add_argument("--state", default="",
                          help="pending, deleted, refused or withdrawn (default: all)")

    sub.add_parser("conformance",
                   help="print the DICOM conformance statement (docs/conformance.md)")
    settings = sub.add_parser("settings", help="print every setting with its default")
    settings.add_argument("--markdown", action="store_true")
    sub.add_parser("commands", help="print every command with its options (the README's list)")
    return parser


_COMMON = ("--config", "--data-dir", "--help")


def _usage(action: argparse.Action) -> str:
    if not action.option_strings:
        name = str(action.metavar or action.dest).upper()
        return f"{name}..." if action.nargs in ("+", "*") else (
            f"[{name}]" if action.nargs == "?" else name)
    option = max(action.option_strings, key=len)
    if action.nargs == 0:
        text = option
    elif action.choices:
        text = f"{option} {{{','.join(str(c) for c in action.choices)}}}"
    else:
        text = f"{option} {str(action.metavar or action.dest).upper()}"
    return text if action.required else f"[{text}]"


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...]
            ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found: list[tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                inner = _leaves(child, (*words, name))
                found += inner or [(" ".join((*words, name)), helps.get(name, ""), child)]
    return found


def command_reference() -> str:
    """Every command with its arguments and what it does, from the argument parser (the
    README's command list; a test keeps them in step)."""
    lines = ["# Every command that uses an installation also takes --config FILE and",
             "# --data-dir DIR (else IMAGESHARE_CONFIG and IMAGESHARE_DATA_DIR, else ./var).",
             ""]
    for words, help_text, leaf in _leaves(_parser(), ("imageshare",)):
        arguments = [_usage(a) for a in leaf._actions
                     if not set(a.option_strings) & set(_COMMON)]
        line = words
        for argument in arguments:  # wrapped between arguments, under the first one
            if len(line) + 1 + len(argument) > 96:
                lines.append(line)
                line = " " * len(words)
            line += " " + argument
        lines += [line, f"    # {help_text}"]
    return "\n".join(lines) + "\n"


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": getattr(args, "data_dir", None),
        "http_host": getattr(args, "http_host", None),
        "http_port": getattr(args, "http_port", None),
        "dicom_port": getattr(args, "dicom_port", None),
        "ae_title": getattr(args, "ae_title", None),
        "dicom_tls_port": getattr(args, "dicom_tls_port", None),
        "tls_certificate": getattr(args, "tls_certificate", None),
        "tls_private_key": getattr(args, "tls_private_key", None),
        "tls_ca_file": getattr(args, "tls_ca_file", None),
        "tls_crl_file": getattr(args, "tls_crl_file", None),
    }
    return load_settings(overrides, config_file=getattr(args, "config", None))


def _print_settings(markdown: bool) -> None:
    if markdown:
        print("| setting | environment variable | default | meaning |")
        print("|---|---|---|---|")
    for name, env, default, help_text in setting_docs():
        if markdown:
            print(f"| `{name}` | `{env}` | `{default}` | {help_text} |")
        else:
            print(f"{env}={default}\n    {help_text}")


def _import(archive: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imageshare.archive.importing import Importer

    importer = Importer(archive.ingest)
    bar = tqdm(unit=" files", disable=args.quiet, file=sys.stderr, desc="importing")
    report = importer.run(list(args.paths), cli_actor(), progress=lambda _label: bar.update())
    bar.close()
    print(report.summary())
    for label, reason in report.refused:
        print(f"refused: {label}: {reason}")
    return 0 if not report.refused else 1


EXIT_WRITTEN, EXIT_FAILED, EXIT_USAGE, EXIT_HELD_BACK = 0, 1, 2, 3
DEIDENTIFY_EXIT_CODES = """exit codes:
  0  every input file was de-identified, verified and written
  3  some files were held back for review (their count is printed; the report says why);
     everything else was written
  1  failure: a file could not be read or de-identified, the output could not be written,
     or the export as a whole failed its check (nothing is left behind then)
  2  wrong usage (unknown option)"""
VERIFY_EXIT_CODES = """exit codes:
  0  nothing identifying of the sources was found in the export
     (without an export: every stored blob matches its recorded digest and size)
  3  identifying data was found (findings are printed and in --report)
     (without an export: corrupt or missing blobs were found; each is printed)
  1  failure (a source or the export could not be read; the index or store unreachable)
  2  wrong usage"""
BACKUP_EXIT_CODES = """exit codes:
  0  the snapshot is complete: the index and every blob it names, each with its digest
  1  failure, or an incomplete snapshot (blobs deleted meanwhile or not matching their
     digests are printed; run the backup again after checking with imageshare verify)
  2  wrong usage"""
SEAL_EXIT_CODES = """exit codes:
  0  every blob is sealed under the current secret key
  3  some blobs were refused and left as they are (each is printed with the reason: not
     matching the digest the index recorded, or opened by no key); check them with
     imageshare verify
  1  failure (the index or a store unreachable); running it again is safe
  2  wrong usage, or blobs are not encrypted (IMAGESHARE_ENCRYPT_BLOBS is off)"""
RESTORE_EXIT_CODES = """exit codes:
  0  the installation was rebuilt
  1  failure (the backup is damaged or incomplete, or the target is not empty); nothing
     of the index is half-written
  2  wrong usage"""


def _deidentify(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imageshare.deid.service import deidentify_inputs
    from imageshare.deid.setup import deidentifier_for
    from imageshare.export.writers import DicomdirWriter, FolderWriter, ZipWriter

    try:
        deidentifier = deidentifier_for(settings, args.profile)
        password = args.password or os.environ.get("IMAGESHARE_EXPORT_PASSWORD", "")
        if args.format == "zip":
            target = args.out if args.out.suffix.lower() == ".zip" else args.out / "export.zip"
            writer: Any = ZipWriter(target, password)
            report_path = target.with_name(target.stem + "-report.json")
        elif password:
            raise ImageShareError("--password needs --format zip")
        else:
            target = args.out
            writer = DicomdirWriter(args.out) if args.format == "dicomdir" else FolderWriter(
                args.out)
            report_path = args.out / "deidentification-report.json"
    except (ImageShareError, OSError) as exc:
        print(f"imageshare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    bar = tqdm(unit=" files", disable=args.quiet, file=sys.stderr, desc="de-identifying")
    report = deidentify_inputs(list(args.inputs), deidentifier, writer, progress=bar.update)
    bar.close()
    container = _check_container(deidentifier, list(args.inputs), target)
    if container:
        report.export_findings = [f.as_dict() for f in container]
        _remove_output(target, args.format)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report.write(report_path, with_inputs=False)
    if args.report:
        report.write(args.report, with_inputs=True)
    print(report.summary())
    print(f"report: {report_path}")
    for entry in report.files:
        if entry.get("held_back") or entry.get("error"):
            label = entry["input"] if args.report else "(see --report for input names)"
            print(f"{'held back' if entry.get('held_back') else 'failed'}: {label}: "
                  f"{entry.get('reason') or entry.get('error')}")
    if container:
        print("failed: the export as a whole carries identifying data and was removed: "
              + "; ".join(dict.fromkeys(str(f) for f in container)))
        return EXIT_FAILED
    if report.failed:
        return EXIT_FAILED
    if report.held_back:
        print(f"{report.held_back} file(s) held back for review (exit code {EXIT_HELD_BACK})")
        return EXIT_HELD_BACK
    return EXIT_WRITTEN


def _check_container(deidentifier: Any, inputs: list[Path], target: Path) -> list[Any]:
    """The verifier's check of the export as a whole (names, zip comment, DICOMDIR) against
    every source; each file in it was checked on its own before it was added."""
    if deidentifier.verifier is None or not target.exists():
        return []
    identity = _source_identity(inputs, deidentifier.keep)[0]
    return list(deidentifier.verifier.check_container(target, identity))


def _source_identity(inputs: list[Path], keep: frozenset[str]) -> tuple[Any, bool, int]:
    """The union of what the sources say about who they are; whether any may carry
    burned-in text; how many sources were read."""
    from pydicom import dcmread

    from imageshare.archive.importing import DicomInputs, ImportReport
    from imageshare.verify import SourceIdentity, Verifier

    identity = SourceIdentity(keep=keep)
    walker = DicomInputs()
    text_prone, count = False, 0
    try:
        for candidate in walker.candidates(inputs, ImportReport()):
            try:
                with candidate.open() as fp:
                    ds = dcmread(fp, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM: nothing to look for
                continue
            identity.add(ds)
            text_prone = text_prone or Verifier.text_prone(ds)
            count += 1
    finally:
        walker.close()
    return identity, text_prone, count


def _remove_output(target: Path, fmt: str) -> None:
    import shutil

    if fmt == "zip":
        target.unlink(missing_ok=True)
    elif target.is_dir():
        for child in target.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child.name != "deidentification-report.json":
                child.unlink()


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from imageshare.deid.profiles import load_profiles
    from imageshare.verify import Verifier
    from imageshare.verify.identity import keep_for_options

    if args.export is None:
        return _scrub(settings, args)
    if not args.source:
        print("imageshare verify: --source INPUT is needed (the original files the export was "
              "made from)", file=sys.stderr)
        return EXIT_USAGE
    if not args.export.exists():
        print(f"imageshare verify: no such export {args.export}", file=sys.stderr)
        return EXIT_FAILED
    profiles = load_profiles(Path(settings.deid_profiles_file)
                             if settings.deid_profiles_file else None)
    if args.profile not in profiles:
        print(f"imageshare verify: unknown profile {args.profile!r}", file=sys.stderr)
        return EXIT_FAILED
    identity, text_prone, count = _source_identity(
        list(args.source), keep_for_options(profiles[args.profile].options))
    if not count:
        print("imageshare verify: no readable DICOM file among the sources", file=sys.stderr)
        return EXIT_FAILED
    password = args.password or os.environ.get("IMAGESHARE_EXPORT_PASSWORD", "")
    findings = Verifier(ocr=args.ocr).check_path(args.export, identity, text_prone, password)
    if args.report:
        args.report.write_text(json.dumps(
            {"export": str(args.export), "sources": count, "profile": args.profile,
             "findings": [f.as_dict() for f in findings]}, indent=2))
    files = sorted({f.file for f in findings})
    for f in findings:
        print(f"finding: {f.file}: {f.kind} in {f.where}")
    print(f"{len(findings)} finding(s) in {len(files)} file(s); {count} source file(s) read")
    return EXIT_HELD_BACK if findings else EXIT_WRITTEN


def _bar(args: argparse.Namespace, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(unit=" blobs", disable=getattr(args, "quiet", False), file=sys.stderr,
                desc=desc)


def _set_total(bar: Any) -> Any:
    def total(n: int) -> None:
        bar.total = n
        bar.refresh()
    return total


def _scrub(settings: Settings, args: argparse.Namespace) -> int:
    from imageshare.app import build_archive
    from imageshare.audit.trail import AuditEvent
    from imageshare.storage.backup import scrub

    archive = build_archive(settings, upgrade=True)
    try:
        bar = _bar(args, "checking blobs")
        report = scrub(archive.engine, archive.blobs, bar.update, _set_total(bar))
        bar.close()
        archive.audit.record(AuditEvent(
            cli_actor(), "archive.verify", "success" if report.intact else "warning",
            instance_count=report.checked,
            detail={"checked": report.checked, "corrupt": len(report.corrupt),
                    "missing": len(report.missing) + len(report.wrong_size),
                    "recorded": report.recorded}))
    finally:
        archive.close()
    for sop_uid, key in report.corrupt:
        print(f"corrupt: blob {key} (instance {sop_uid}) does not match its recorded digest")
    for sop_uid, key in report.wrong_size:
        print(f"corrupt: blob {key} (instance {sop_uid}) has another size than recorded")
    for sop_uid, key in report.missing:
        print(f"missing: blob {key} (instance {sop_uid}) is not in the store")
    print(f"{report.checked} blob(s) checked ({report.bytes_read} bytes), "
          f"{len(report.corrupt) + len(report.wrong_size)} corrupt, {len(report.missing)} "
          f"missing, {report.recorded} digest(s) recorded for the first time")
    return EXIT_WRITTEN if report.intact else EXIT_HELD_BACK


def _backup(archive: Any, args: argparse.Namespace) -> int:
    from imageshare.app import ORIGINALS, blob_store, installation_key
    from imageshare.audit.trail import AuditEvent
    from imageshare.storage.backup import backup

    bar = _bar(args, "backing up blobs")
    try:
        report = backup(archive.engine, archive.blobs, args.dest, archive.settings.pg_bin_dir,
                        bar.update, _set_total(bar),
                        heads_file=archive.settings.resolved_audit_head_file,
                        originals=blob_store(archive.settings, beside=ORIGINALS),
                        manifest_key=installation_key(archive.settings))
    except ImageShareError as exc:
        print(f"imageshare backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    archive.audit.record(AuditEvent(
        cli_actor(), "archive.backup", "success" if report.complete else "warning",
        instance_count=report.blobs,
        detail={"destination": str(args.dest), "snapshot": report.snapshot.name,
                "blobs": report.blobs, "copied": report.copied,
                "missing": len(report.missing), "corrupt": len(report.corrupt)}))
    for key in report.missing:
        print(f"missing: blob {key} was deleted or lost while the backup ran")
    for key in report.corrupt:
        print(f"corrupt: blob {key} does not match its recorded digest (not backed up)")
    print(f"snapshot {report.snapshot.name} ({report.database} index): {report.blobs} blob(s), "
          f"{report.copied} copied ({report.bytes_copied} bytes), {report.reused} already in "
          f"the backup")
    return EXIT_WRITTEN if report.complete else EXIT_FAILED


def _storage_seal(settings: Settings, args: argparse.Namespace) -> int:
    """imageshare storage seal: blobs and the index's secrets, or (blobs not encrypted) the
    index's secrets only."""
    from imageshare.app import build_archive, seal_blob_stores
    from imageshare.governance.key_rotation import INDEX_SECRETS

    if not settings.encrypt_blobs:
        print("blobs are not encrypted here (IMAGESHARE_ENCRYPT_BLOBS is off): only the "
              "secrets in the index are sealed under the current key")
    archive = build_archive(settings, upgrade=True)
    try:
        bar = _bar(args, "sealing blobs" if settings.encrypt_blobs else "sealing secrets")
        try:
            done = seal_blob_stores(archive, cli_actor(), bar.update)
        except (ImageShareError, OSError) as exc:
            print(f"imageshare storage seal: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            bar.close()
    finally:
        archive.close()
    for store in done:
        what = "" if store.store == INDEX_SECRETS else " blob"
        for key, why in store.report.refused:
            print(f"refused: {store.store}{what} {key}: {why}")
        for key in store.unchecked:
            print(f"sealed without a recorded digest to check: {store.store} blob {key}")
    for store in done:
        r = store.report
        what = "secret(s)" if store.store == INDEX_SECRETS else "blob(s)"
        print(f"{store.store}: {r.checked} {what} checked, {r.already} already sealed under "
              f"the current key, {len(r.sealed)} sealed, {len(r.rekeyed)} sealed again from a "
              f"retired key, {len(r.refused)} refused")
    if any(s.report.refused for s in done):
        print("some were left as they are: with IMAGESHARE_ENCRYPTED_BLOBS_ONLY such blobs "
              "are refused, and a retired key must stay until they are dealt with")
        return EXIT_HELD_BACK
    if settings.encrypt_blobs:
        print("everything is sealed under the current secret key: "
              "IMAGESHARE_ENCRYPTED_BLOBS_ONLY may be set, and retired secret keys removed")
    else:
        print("every secret in the index is sealed under the current secret key: retired "
              "secret keys may be removed")
    return EXIT_WRITTEN


def _restore(settings: Settings, args: argparse.Namespace) -> int:
    from imageshare.app import (
        ORIGINALS,
        blob_store,
        build_archive,
        installation_key,
        installation_key_file,
        retired_installation_keys,
    )
    from imageshare.audit.chain import chain_problems
    from imageshare.audit.trail import AuditEvent
    from imageshare.storage.backup import SIGNED_BY_RETIRED, restore

    key_file = installation_key_file(settings)
    if not args.accept_unsigned and not settings.secret_key and not key_file.exists():
        # A new key would be made, and the backup's signature never match: say what to do.
        print("imageshare restore: the installation key of the installation that made the "
              f"backup is needed to check it: set IMAGESHARE_SECRET_KEY or put its key file "
              f"at {key_file} first (or, if it is lost, restore with --accept-unsigned)",
              file=sys.stderr)
        return EXIT_FAILED
    # A backup made before a key rotation is signed with a key now retired.
    retired = [] if args.accept_unsigned else retired_installation_keys(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    blobs = blob_store(settings)
    bar = _bar(args, "restoring blobs")
    try:
        report = restore(args.src, settings.resolved_database_url, blobs, args.snapshot,
                         settings.pg_bin_dir, bar.update, _set_total(bar),
                         trail_problems=chain_problems,
                         heads_file=settings.resolved_audit_head_file,
                         originals=blob_store(settings, beside=ORIGINALS),
                         manifest_key=None if args.accept_unsigned
                         else installation_key(settings), retired_manifest_keys=retired)
    except ImageShareError as exc:
        print(f"imageshare restore: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    archive = build_archive(settings, upgrade=True)
    try:
        archive.audit.record(AuditEvent(
            cli_actor(), "archive.restore", "success", instance_count=report.blobs,
            detail={"source": str(args.src), "snapshot": report.snapshot.name,
                    "blobs": report.blobs, "signature_checked": not args.accept_unsigned,
                    "signed_by": report.signed_by or None}))
    finally:
        archive.close()
    if report.signed_by:
        print("its manifest is signed with "
              + ("a retired secret key (a backup made before the key rotation)"
                 if report.signed_by == SIGNED_BY_RETIRED else "the current secret key"))
    print(f"restored snapshot {report.snapshot.name} ({report.database} index) with "
          f"{report.blobs} blob(s)")
    return EXIT_WRITTEN


def _audit_verify(archive: Any) -> int:
    """Exit 0: the chain is intact; 1: rows were edited, deleted, inserted or moved."""
    from imageshare.app import installation_key, retired_installation_keys
    from imageshare.audit.chain import head_key, verify_chain

    settings = archive.settings
    # After a key rotation, heads signed before it carry a retired key's signature.
    report = verify_chain(archive.engine, head_key(installation_key(settings)),
                          settings.resolved_audit_head_file,
                          [head_key(key) for key in retired_installation_keys(settings)])
    problems = report.problems
    for problem in problems:
        print(problem)
    if not problems:
        print(f"audit trail intact: {report.rows} row(s), head seq={report.head_seq}, "
              f"{report.heads_checked} signed head(s) checked")
        return 0
    print(f"audit trail TAMPERED: {len(problems)} problem(s) in {report.rows} row(s)")
    return 1


def _audit_export(archive: Any, args: argparse.Namespace) -> int:
    from imageshare.audit.reports import spreadsheet_safe
    from imageshare.audit.trail import AuditEvent

    events = list(archive.audit.events(limit=args.limit))
    archive.audit.record(
        AuditEvent(cli_actor(), "audit.export", "success", instance_count=len(events))
    )
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "jsonl":
            for event in reversed(events):
                event["at"] = event["at"].isoformat()
                out.write(json.dumps(event, sort_keys=True) + "\n")
        else:
            writer = csv.writer(out)
            columns = ["pk", "at", "actor", "actor_kind", "source", "action", "outcome",
                       "patient_id", "study_uid", "instance_count", "detail", "seq",
                       "prev_hash", "row_hash"]
            writer.writerow(columns)
            for event in reversed(events):
                event["at"] = event["at"].isoformat()
                event["detail"] = json.dumps(event["detail"], sort_keys=True)
                writer.writerow(spreadsheet_safe([str(event[c]) for c in columns]))
    finally:
        if args.out:
            out.close()
    return 0


def _pinned_certificate(value: str) -> str:
    """``--pin-certificate``: a certificate file's SHA-256 fingerprint, or the value itself (a
    fingerprint the registry checks)."""
    from imageshare.tls import certificate_file_fingerprint

    path = Path(value)
    return certificate_file_fingerprint(path) if value and path.is_file() else value


def _admin(name: str) -> Any:
    """The administrator named by ``--by`` (the service checks the account is one)."""
    from imageshare.domain.actors import Actor

    return Actor("user", name, "admin", "cli")


def _retention(archive: Any, args: argparse.Namespace) -> int:
    """imageshare retention | hold | deletion ..."""
    from datetime import UTC, datetime

    from imageshare.audit.trail import AuditEvent
    from imageshare.domain.errors import DeletionRefused, InvalidQuery

    service = archive.retention
    if args.command == "retention" and args.action == "run":
        try:
            moment = datetime.fromisoformat(args.at) if args.at else service.clock()
        except ValueError:
            raise InvalidQuery(f"--at takes a moment in ISO 8601 (e.g. 2026-01-31T00:00:00Z), "
                               f"not {args.at!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if moment > datetime.now(UTC):
            raise DeletionRefused("nothing was deleted: --at cannot be in the future (images "
                                  "would go before their retention period is over)")
        removed = service.run(cli_actor(), moment)
        print(f"{removed.instances} instance(s) of {len(removed.studies)} study(ies) removed; "
              f"{removed.kept} kept (legal hold, or their class keeps them)")
        return 0
    if args.command == "retention" and args.action == "show":
        shown = service.study_retention(args.study_uid)
        for c in shown.classes:
            until = f"{c.earliest:%Y-%m-%d}" if c.earliest else "not by time"
            print(f"{c.retention_class}\t{c.instances} instance(s)\tearliest deletion {until}"
                  f"\t{c.explanation}")
        for h in shown.holds:
            print(f"legal hold {h.public_id} on {h.covers} by {h.placed_by}: {h.reason}")
        print("may be deleted now (two administrators)" if shown.deletable_now
              else f"may not be deleted now: {shown.why_not}")
        return 0
    if args.command == "retention" and args.action == "rules":
        archive.audit.record(AuditEvent(cli_actor(), "retention.read", "success",
                                        detail={"list": "rules"}))
        for r in service.rules():
            print(f"{r.kind}\t{r.value}\t{r.retention_class}\t{r.created_by}")
        return 0
    if args.command == "retention" and args.action == "rule":
        if args.remove:
            service.remove_rule(args.kind, args.value, _admin_checked(archive, args.by))
            print(f"rule {args.kind}={args.value} removed")
        else:
            service.set_rule(args.kind, args.value, args.retention_class,
                             _admin_checked(archive, args.by))
            print(f"arrivals with {args.kind}={args.value} are {args.retention_class} now")
        return 0
    if args.command == "hold" and args.action == "place":
        placed = service.place_hold(_admin(args.by), args.reason, patient_id=args.patient,
                                    issuer=args.issuer, study_uid=args.study)
        print(f"legal hold {placed.public_id} placed on {placed.covers}")
        return 0
    if args.command == "hold" and args.action == "lift":
        lifted = service.lift_hold(args.hold_id, _admin(args.by), args.reason)
        print(f"legal hold {lifted.public_id} on {lifted.covers} lifted")
        return 0
    if args.command == "hold" and args.action == "list":
        archive.audit.record(AuditEvent(cli_actor(), "retention.read", "success",
                                        detail={"list": "holds"}))
        for h in service.holds(in_force_only=not args.all):
            state = "in force" if h.in_force else f"lifted by {h.lifted_by}"
            print(f"{h.public_id}\t{h.covers}\t{h.placed_by}\t{h.placed_at:%Y-%m-%d %H:%M}"
                  f"\t{state}\t{h.reason}")
        return 0
    if args.command == "deletion" and args.action == "request":
        asked = service.request_deletion(args.study_uid, _admin(args.by), args.reason)
        print(f"deletion request {asked.public_id}: another administrator must approve it")
        return 0
    if args.command == "deletion" and args.action == "approve":
        removed = service.approve_deletion(args.request_id, _admin(args.by), args.note)
        print(f"study deleted: {removed.instances} instance(s)")
        return 0
    if args.command == "deletion" and args.action == "allow-again":
        count = service.allow_study_again(args.study_uid, _admin_checked(archive, args.by),
                                          args.reason)
        if not count:
            print("no instance of this study is refused", file=sys.stderr)
            return 1
        print(f"{count} instance(s) of the study may be stored again")
        return 0
    if args.command == "deletion" and args.action == "refuse":
        decided = service.refuse_deletion(args.request_id, _admin(args.by), args.note)
        print(f"deletion request {decided.public_id} {decided.state}")
        return 0
    archive.audit.record(AuditEvent(cli_actor(), "retention.read", "success",
                                    detail={"list": "deletions"}))
    for d in service.deletion_requests(args.state):
        print(f"{d.public_id}\t{d.state}\t{d.study_uid}\t{d.requested_by}\t"
              f"{d.requested_at:%Y-%m-%d %H:%M}\t{d.decided_by}\t{d.reason}")
    return 0


def _admin_checked(archive: Any, name: str) -> Any:
    """The administrator named by ``--by``, refused unless the account is an administrator."""
    from imageshare.domain.errors import Forbidden

    if not any(a.username == name and a.role == "admin" and not a.disabled
               for a in archive.users.accounts()):
        raise Forbidden("--by must name an administrator's account")
    return _admin(name)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    # Everything ImageShare writes (index, blobs, exports, caches, staging) is patient data:
    # private to the service's user from the first file on.
    os.umask(PRIVATE_UMASK)
    args = _parser().parse_args(argv)
    if args.command == "settings":
        _print_settings(args.markdown)
        return 0
    if args.command == "audit" and args.action == "events":
        from imageshare.audit.events import CATALOGUE, markdown

        if args.markdown:
            sys.stdout.write(markdown())
        else:
            for e in sorted(CATALOGUE.values(), key=lambda e: e.action):
                print(f"{e.action}\t{e.event_id.code}\t{e.action_code}\t{e.description}")
        return 0
    if args.command == "commands":
        sys.stdout.write(command_reference())
        return 0
    if args.command == "conformance":
        from imageshare.conformance import statement

        sys.stdout.write(statement())
        return 0
    settings = _settings(args)
    from imageshare.app import configure_logging

    configure_logging(settings)
    if args.command == "serve":
        from imageshare.app import serve

        serve(settings)
        return 0
    if args.command == "deidentify":
        return _deidentify(settings, args)
    if args.command == "verify":
        return _verify(settings, args)
    if args.command == "restore":
        return _restore(settings, args)
    if args.command == "storage":
        return _storage_seal(settings, args)
    from imageshare.app import build_archive
    from imageshare.audit.trail import AuditEvent
    from imageshare.exchange.nodes import Node

    archive = build_archive(settings, upgrade=True)
    try:
        if args.command == "db":
            print("the index database is up to date")
            return 0
        if args.command == "user" and args.action == "add":
            password = args.password or os.environ.get("IMAGESHARE_NEW_USER_PASSWORD") or (
                getpass.getpass(f"password for {args.username}: ")
            )
            archive.users.add(args.username, password, args.role, args.email, args.site)
            archive.audit.record(AuditEvent(cli_actor(), "user.add", "success",
                                            detail={"username": args.username,
                                                    "role": args.role, "site": args.site}))
            print(f"user {args.username} ({args.role}) created"
                  + (f", speaking for {args.site}" if args.site else ""))
            if args.role == "site" and not args.site:
                print("warning: not linked to a connected site, so it may store but send no "
                      f"site-to-site message: imageshare user link-site {args.username} AE")
            return 0
        if args.command == "user" and args.action == "link-site":
            linked = archive.users.link_site(args.username, args.ae_title)
            archive.audit.record(AuditEvent(cli_actor(), "user.link-site", "success",
                                            detail={"username": args.username,
                                                    "site": linked}))
            print(f"site account {args.username} "
                  + (f"now speaks for {linked}" if linked else "is unlinked"))
            return 0
        if args.command == "user" and args.action == "token":
            print(archive.users.create_token(args.username, args.name, origin="cli",
                                             actor=cli_actor()))
            return 0
        if args.command == "node" and args.action == "add":
            node = Node(
                ae_title=args.ae_title, host=args.host, port=args.port,
                dicomweb_url=args.dicomweb, display_name=args.name,
                may_query=not args.no_query, may_retrieve=not args.no_retrieve,
                may_store=not args.no_store, searchable=not args.no_search,
                retrieve_from=not args.no_retrieve_from, send_to=not args.no_send_to,
                dicomweb_auth=args.dicomweb_auth, inbox=args.inbox, tls=args.tls,
                tls_certificate=_pinned_certificate(args.pin_certificate),
            )
            archive.nodes.add(node, replace=args.replace, actor=cli_actor())
            print(f"node {node.ae_title} registered ({node.host}:{node.port})")
            return 0
        if args.command == "node" and args.action == "list":
            for n in archive.nodes.all():
                print(f"{n.ae_title}\t{n.host}:{n.port}\t{n.dicomweb_url}\t{n.display_name}")
            return 0
        if args.command == "node" and args.action == "refused":
            for c in archive.refused_callers.all():
                print(f"{c.ae_title}\t{c.host}\t{c.count}\t{c.service}\t{c.reason}\t"
                      f"{c.last_seen:%Y-%m-%d %H:%M}")
            return 0
        if args.command == "node" and args.action == "remove":
            archive.nodes.remove(args.ae_title, cli_actor())
            print(f"node {args.ae_title} removed")
            return 0
        if args.command == "ehr" and args.action == "add":
            secret = archive.ehr_launches.add(args.name)
            print(f"EHR {args.name} registered; its shared secret (shown only now):")
            print(secret)
            return 0
        if args.command == "ehr" and args.action == "list":
            for system in archive.ehr_launches.systems():
                print(f"{system.name}\t{system.created_at:%Y-%m-%d %H:%M}")
            return 0
        if args.command == "ehr" and args.action == "remove":
            archive.ehr_launches.remove(args.name)
            print(f"EHR {args.name} removed")
            return 0
        if args.command == "import":
            return _import(archive, args)
        if args.command == "backup":
            return _backup(archive, args)
        if args.command == "audit" and args.action == "verify":
            return _audit_verify(archive)
        if args.command == "audit" and args.action == "head":
            from imageshare.app import export_audit_head

            signed = export_audit_head(archive)
            print(f"audit chain head seq={signed.seq} hash={signed.hash} signed at {signed.at} "
                  f"-> {settings.resolved_audit_head_file}")
            return 0
        if args.command == "audit":
            return _audit_export(archive, args)
        if args.command in ("retention", "hold", "deletion"):
            return _retention(archive, args)
    finally:
        archive.close()
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, and turn expected errors into a message and exit code 2."""
    try:
        return run(argv)
    except ImageShareError as exc:
        print(f"imageshare: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
