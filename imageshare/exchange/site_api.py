"""Talking to another ImageShare over its site API (JSON under ``/api/exchange``, with the
credentials registered for the site), and the messages that must arrive (a transfer's
announcement, a receipt, the answer to a request for prior imaging), delivered by the durable
job queue: kept in the index across restarts and tried again while the other site is down."""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from imageshare.domain.errors import ImageShareError, SiteUnreachable
from imageshare.exchange.nodes import Node, NodeRegistry, forbidden_address
from imageshare.jobs import Job, JobQueue

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("imageshare.exchange")
GIVE_UP_AFTER = timedelta(days=3)
# (purpose's ref, state, what to tell people) after each try: delivered, retrying, refused,
# undeliverable, failed.
Outcome = Callable[[str, str, str], None]


ANSWER_MAX_BYTES = 64 << 10  # the site API answers a message with a few lines of JSON


def post_json(url: str, body: dict[str, Any], headers: dict[str, str], auth: Any,
              timeout: float, verify: ssl.SSLContext | bool) -> httpx.Response:
    """POST ``body`` as JSON to another site and read its answer: no redirect followed (the
    3xx is the answer), at most :data:`ANSWER_MAX_BYTES` of it read and in at most
    ``timeout`` seconds all told; a longer or slower answer raises :class:`SiteUnreachable`
    (an endless answer never fills our memory). Raises ``httpx.HTTPError`` when the site
    cannot be reached."""
    import httpx  # loaded by the processes that talk to other sites

    deadline = time.monotonic() + timeout
    transport = httpx.HTTPTransport(verify=verify)
    # Every connection's peer is checked before anything is sent on it: a site's name that
    # resolves to a link-local (metadata) address now is never spoken to.
    transport._pool._network_backend = _guarded_backend()  # noqa: SLF001 - httpx has no option
    with httpx.Client(timeout=timeout, transport=transport,
                      follow_redirects=False) as client, \
            client.stream("POST", url, json=body, headers=headers, auth=auth) as answer:
        declared = answer.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > ANSWER_MAX_BYTES:
            raise SiteUnreachable("the site answered with far more than a message's answer")
        content = bytearray()
        for chunk in answer.iter_bytes():
            content += chunk
            if len(content) > ANSWER_MAX_BYTES:
                raise SiteUnreachable("the site answered with far more than a message's "
                                      "answer")
            if time.monotonic() > deadline:
                raise SiteUnreachable("the site took too long to answer")
    return httpx.Response(answer.status_code, headers=answer.headers, content=bytes(content),
                          request=answer.request)


def _guarded_backend() -> Any:
    """httpcore's network backend, refusing (:class:`SiteUnreachable`) a connection whose
    peer is an address no site may have (:func:`imageshare.exchange.nodes.forbidden_address`),
    closed before a byte is sent."""
    import httpcore

    class Guarded(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                        local_address: str | None = None, socket_options: Any = None
                        ) -> httpcore.NetworkStream:
            stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
            peer = stream.get_extra_info("socket").getpeername()[0]
            why = forbidden_address(str(peer))
            if why:
                stream.close()
                raise SiteUnreachable(f"the site {why}: not connected to")
            return stream

    return Guarded()


def site_api_base(node: Node) -> str:
    """The site's address (its DICOMweb URL without ``/dicomweb``); empty without one."""
    return node.dicomweb_url.rstrip("/").removesuffix("/dicomweb") if node.dicomweb_url else ""


class SiteApi:
    """Posts JSON to other ImageShare sites, now or (``queue``) durably with retries."""

    def __init__(self, nodes: NodeRegistry, jobs: JobQueue, tls: ssl.SSLContext | None = None,
                 retry_delays: tuple[float, ...] = (2.0, 10.0, 30.0),
                 give_up_after: timedelta = GIVE_UP_AFTER) -> None:
        self._nodes = nodes
        self._jobs = jobs
        self._tls = tls
        self._delays = retry_delays or (30.0,)
        self._give_up = give_up_after
        self._outcomes: dict[str, Outcome] = {}
        jobs.register("site-message", self._handle)

    def on_outcome(self, purpose: str, outcome: Outcome) -> None:
        """Call ``outcome(ref, state, detail)`` after each try of a ``purpose`` message."""
        self._outcomes[purpose] = outcome

    def post(self, node: Node, path: str, body: dict[str, Any], timeout: float = 15.0
             ) -> httpx.Response:
        """POST ``body`` to ``path`` of the site's API now. Raises :class:`SiteUnreachable`
        when the site cannot be reached, :class:`ImageShareError` when it has no address."""
        import httpx  # loaded by the processes that talk to other sites

        base = site_api_base(node)
        if not base:
            raise ImageShareError(f"{node.label} has no ImageShare address registered")
        headers, auth = node.credentials()
        try:
            return post_json(f"{base}{path}", body, headers, auth, timeout,
                             self._tls if self._tls is not None else True)
        except SiteUnreachable as exc:
            raise SiteUnreachable(f"{node.label}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise SiteUnreachable(f"{node.label} could not be reached") from exc

    def queue(self, site: str, path: str, body: dict[str, Any], purpose: str, ref: str,
              owner: str, description: str) -> None:
        """Deliver ``body`` to ``site`` in the background until it is taken (or refused, or
        :data:`GIVE_UP_AFTER` has passed); ``on_outcome`` handlers hear of each try."""
        self._jobs.submit(owner, "site-message", description[:200], {
            "id": secrets.token_hex(8), "site": site, "path": path, "body": body,
            "purpose": purpose, "ref": ref, "round": 0, "owner": owner,
            "description": description[:200],
            "first": datetime.now(UTC).isoformat()}, notify=False)

    def _tell(self, params: dict[str, Any], state: str, detail: str) -> None:
        outcome = self._outcomes.get(params["purpose"])
        if outcome is not None:
            outcome(params["ref"], state, detail[:500])

    def _handle(self, job: Job, params: dict[str, Any]) -> None:
        """One try of a queued message (on whichever instance leased it)."""
        node = self._nodes.find(params["site"])
        if node is None or not node.dicomweb_url:
            job.summary = "the site has no ImageShare address registered"
            self._tell(params, "undeliverable", "the site has no ImageShare address "
                       "registered here: tell them by phone or e-mail")
            return
        try:
            answer = self.post(node, params["path"], params["body"])
            code = answer.status_code
        except SiteUnreachable:
            code = 0
        if 200 <= code < 300:
            job.summary = f"delivered to {node.label}"
            self._tell(params, "delivered", f"delivered to {node.label}")
            return
        if code in (0, 429) or code >= 500:  # down, busy or broken for now: try again later
            started = datetime.fromisoformat(params["first"])
            if datetime.now(UTC) - started > self._give_up:
                job.summary = f"{node.label} did not answer; given up"
                self._tell(params, "failed", f"{node.label} did not answer for "
                           f"{self._give_up.days} days: tell them by phone or e-mail")
                return
            round_ = int(params.get("round", 0)) + 1
            delay = self._delays[min(round_ - 1, len(self._delays) - 1)]
            self._jobs.submit_once(f"site-message:{params['id']}:{round_}", "site-message",
                                   params["description"], {**params, "round": round_},
                                   owner=params["owner"], delay=delay)
            reason = "could not be reached" if code == 0 else f"answered HTTP {code}"
            job.summary = f"{node.label} {reason}; trying again in {delay:g} s"
            log.info("site message to %s: %s; retry %d", node.ae_title, reason, round_)
            self._tell(params, "retrying", f"{node.label} {reason}; trying again")
            return
        what = {401: "refused our credentials", 403: "does not let our account do this",
                404: "does not know it (not ImageShare, or an older version)"
                }.get(code, f"refused it (HTTP {code})")
        job.summary = f"{node.label} {what}"
        self._tell(params, "refused", f"{node.label} {what}")
