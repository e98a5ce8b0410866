"""Encoding and decoding multipart/related bodies in tests (independent of the server's code)."""

from __future__ import annotations

import re

import httpx


def encode_multipart(parts: list[bytes], boundary: str = "test-boundary-1234") -> tuple[bytes, str]:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def parse_multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of every part, split on the boundary as RFC 2046 says."""
    assert response.status_code == 200, response.text[:500]
    match = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"])
    assert match, response.headers["content-type"]
    delimiter = b"--" + match.group(1).encode()
    chunks = response.content.split(b"\r\n" + delimiter)
    first = chunks[0]
    assert first.startswith(delimiter)
    chunks[0] = first[len(delimiter):]
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, body))
    return parts
