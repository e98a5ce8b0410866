"""A throwaway certificate authority made with openssl for TLS tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    """A private key and its certificate (PEM files)."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class Pki:
    """A CA, identities it signed, and an identity from another (untrusted) CA."""

    ca: Path
    server: Identity
    client: Identity
    orthanc: Identity
    rogue: Identity


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> Identity:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return Identity(key, cert)


def _signed(folder: Path, name: str, ca: Identity) -> Identity:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr), cwd=folder)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert),
             cwd=folder)
    return Identity(key, cert)


def make_pki(folder: Path) -> Pki:
    """A CA with server, client and Orthanc identities, and a rogue CA's client identity."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    rogue_ca = _ca(folder, "rogue-ca")
    return Pki(
        ca=ca.cert, server=_signed(folder, "imageshare", ca),
        client=_signed(folder, "dcmtk", ca), orthanc=_signed(folder, "orthanc", ca),
        rogue=_signed(folder, "rogue", rogue_ca),
    )
