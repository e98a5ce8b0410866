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
from imageshare.domain.errors import InvalidQuery, LinkGone

# How long the page links of a search made by POST can be followed.
PAGE_LINK_SECONDS = 3600
# Fields of a search (the form's and the URL's together): far more than any search needs.
MAX_SEARCH_FIELDS = 200
# The longest page token: its link (path, ``?_page=`` and the token) fits in the longest
# address the server takes (8 KiB). A longer ``_page`` is refused before it is decrypted.
MAX_PAGE_TOKEN = 7680


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

    def _link_token(self, query: str, actor: Actor) -> str:
        """:meth:`seal` for a page link the caller can follow: InvalidQuery (naming the
        limit) when following it would be refused, as the same search sent in a URL would
        be (more than :data:`MAX_SEARCH_FIELDS` parameters, the page's ``_count`` and
        ``_offset`` among them) or as an address too long for the server."""
        check_followable(query)
        token = self.seal(query, actor)
        if len(token) > MAX_PAGE_TOKEN:
            raise InvalidQuery("the search's parameters are too long for the links to its "
                               "pages (about 5 KB at most): send fewer or shorter ones")
        return token

    def open(self, token: str, actor: Actor) -> list[tuple[str, str]]:
        """The search parameters sealed in ``token``; LinkGone when it is not one of ours,
        is older than :data:`PAGE_LINK_SECONDS` or was made for another caller (all one
        answer)."""
        gone = LinkGone("this page link has expired or is not valid for this caller: "
                        "send the search again")
        if len(token) > MAX_PAGE_TOKEN:  # none of ours is longer: not worth decrypting
            raise gone
        try:
            payload = json.loads(self._fernet.decrypt(token.encode("ascii"),
                                                      ttl=PAGE_LINK_SECONDS))
            if not isinstance(payload, dict) or payload.get("who") != _who(actor):
                raise gone
            return parse_qsl(str(payload.get("q", "")), keep_blank_values=True,
                             max_num_fields=MAX_SEARCH_FIELDS)
        except (InvalidToken, UnicodeEncodeError, ValueError) as exc:
            raise gone from exc

    def relink(self, answer: dict[str, Any], base: str, actor: Actor) -> None:
        """Replace the query of each of ``answer``'s links by a sealed ``_page`` token;
        InvalidQuery when a link could not be followed (:meth:`_link_token`)."""
        for link in answer.get("link", []):
            query = urlsplit(link["url"]).query
            link["url"] = f"{base}?{urlencode({'_page': self._link_token(query, actor)})}"


def check_followable(query: str) -> None:
    """InvalidQuery naming the limit when a page link's ``query`` has more parameters than a
    search takes (its page's ``_count`` and ``_offset`` added to the search's own): the
    search is refused rather than answered with links that would be."""
    if len(parse_qsl(query, keep_blank_values=True)) > MAX_SEARCH_FIELDS:
        raise InvalidQuery(f"a search takes at most {MAX_SEARCH_FIELDS} parameters, the "
                           "_count and _offset of its page links among them")


def _who(actor: Actor) -> str:
    return f"{actor.kind}:{actor.name}"
