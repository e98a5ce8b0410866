"""Sealed page links of FHIR searches made by POST: the search's parameters (a patient's
identifier among them) stay out of URLs and the logs that keep them."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from cryptography.fernet import Fernet, InvalidToken

from imageshare.domain.actors import Actor
from imageshare.domain.errors import LinkGone

# How long the page links of a search made by POST can be followed.
PAGE_LINK_SECONDS = 3600
# Fields of a search (the form's and the URL's together): far more than any search needs.
MAX_SEARCH_FIELDS = 200


class PageSeal:
    """Page links of searches made by POST: the parameters (a patient's identifier among
    them) travel in the body so that they stay out of URLs and the logs that keep them, so
    the Bundle's self, next and previous links carry them sealed (encrypted and
    authenticated with a key derived from the installation key), for the same caller only
    and for :data:`PAGE_LINK_SECONDS`."""

    def __init__(self, key: bytes) -> None:
        derived = hashlib.sha256(b"imageshare fhir search pages\0" + key).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, query: str, actor: Actor) -> str:
        """A token holding the search ``query`` (a URL query string) for ``actor``."""
        payload = json.dumps({"q": query, "who": _who(actor)}, separators=(",", ":"))
        return self._fernet.encrypt(payload.encode()).decode("ascii")

    def open(self, token: str, actor: Actor) -> list[tuple[str, str]]:
        """The search parameters sealed in ``token``; LinkGone when it is not one of ours,
        is older than :data:`PAGE_LINK_SECONDS` or was made for another caller (all one
        answer)."""
        gone = LinkGone("this page link has expired or is not valid for this caller: "
                        "send the search again")
        try:
            payload = json.loads(self._fernet.decrypt(token.encode("ascii"),
                                                      ttl=PAGE_LINK_SECONDS))
        except (InvalidToken, UnicodeEncodeError, ValueError) as exc:
            raise gone from exc
        if not isinstance(payload, dict) or payload.get("who") != _who(actor):
            raise gone
        return parse_qsl(str(payload.get("q", "")), keep_blank_values=True,
                         max_num_fields=MAX_SEARCH_FIELDS)

    def relink(self, answer: dict[str, Any], base: str, actor: Actor) -> None:
        """Replace the query of each of ``answer``'s links by a sealed ``_page`` token."""
        for link in answer.get("link", []):
            query = urlsplit(link["url"]).query
            link["url"] = f"{base}?{urlencode({'_page': self.seal(query, actor)})}"


def _who(actor: Actor) -> str:
    return f"{actor.kind}:{actor.name}"
