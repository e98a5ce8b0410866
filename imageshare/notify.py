"""Notifications in the app and by e-mail (SMTP). Texts never carry patient data: they say
that something happened and link to the place where a signed-in user can see it.

An e-mail leaves the hospital, so its subject and body never carry a notification's own
text (a job's error, a site's reason, a name someone chose): only a fixed sentence for the
kind of notification (:data:`MAIL_TEXTS`) and the link. A message goes to one address, on one
line of headers; an address or subject that would add recipients or header lines is not
sent (logged, never raised to the caller). A failing SMTP server never loses the in-app
notification, which is kept before the e-mail is queued, and never holds up the caller.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

from sqlalchemy import Engine, func, insert, select, update

from imageshare.storage.index.schema import notifications

log = logging.getLogger("imageshare.mail")

# What the e-mail copy of a notification says, by kind (the text itself stays in the app).
MAIL_TEXTS = {
    "job.done": "A job you started has finished.",
    "job.failed": "A job you started has failed.",
    "job.cancelled": "A job you started was cancelled.",
    "share.comment": "A reviewer commented on images you shared.",
    "share.feedback": "A reviewer left feedback on images you shared.",
    "share.signoff": "A reviewer signed off images you shared.",
    "share.locked": "A share link of yours was locked after wrong passcodes.",
    "share.expiring": "A share link of yours expires soon.",
    "exchange.request": "Another site answered your request for prior imaging.",
    "exchange.push": "A study you sent to another site has news.",
    "exchange.receipt": "Another site decided on a study you sent.",
}
MAIL_TEXT_OTHER = "Something on ImageShare needs your attention."
# Characters that never belong in one e-mail address as ImageShare sends it (no display
# name, no list, no comment, no quoting; an apostrophe, as in o'neill@, is a plain address).
_NOT_IN_ADDRESS = frozenset(" ,;:<>()[]\\\"")
MAX_ADDRESS = 254  # RFC 5321 (a path of 256 octets with its angle brackets)
MAX_SUBJECT = 200


def one_line(text: str, limit: int) -> str:
    """``text`` as one header line: control and line-separator characters become spaces,
    runs of spaces one space, at most ``limit`` characters."""
    cleaned = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return " ".join(cleaned.split())[:limit]


def plain_address(text: str) -> str | None:
    """``text`` when it is one plain e-mail address (``local@domain``, at most 254
    characters, no display name, list, comment or control character), else None."""
    address = text.strip()
    local, at, domain = address.rpartition("@")
    if (not at or not local or not domain or "@" in local or len(address) > MAX_ADDRESS
            or _NOT_IN_ADDRESS & set(address)
            or any(unicodedata.category(c)[0] in "CZ" for c in address)):
        return None
    return address


@dataclass(frozen=True)
class MailSettings:
    """How to reach the SMTP server."""

    host: str
    port: int = 25
    tls: str = "none"
    user: str = ""
    password: str = ""
    sender: str = "imageshare@localhost"

    @property
    def enabled(self) -> bool:
        """True when e-mail is configured."""
        return bool(self.host)


class Mailer:
    """Sends e-mail in the background; a failure is logged (without addresses or content)."""

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mail")

    def send(self, to: str, subject: str, body: str) -> None:
        """Queue one message to the one address ``to``; the subject is made one line. Never
        raises: a message that cannot be made or queued is logged and dropped (the caller's
        work, already done, stands)."""
        if not self.settings.enabled or not to:
            return
        address = plain_address(to)
        if address is None:
            log.warning("e-mail not sent: the recipient is not one plain e-mail address")
            return
        try:
            message = EmailMessage()
            message["From"] = self.settings.sender
            message["To"] = address
            message["Subject"] = one_line(subject, MAX_SUBJECT)
            message.set_content(body)
            self._pool.submit(self._deliver, message)
        except (ValueError, TypeError, RuntimeError) as exc:
            log.warning("e-mail not sent: %s", type(exc).__name__)

    def _deliver(self, message: EmailMessage) -> None:
        s = self.settings
        try:
            if s.tls == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.host, s.port, timeout=30, context=ssl.create_default_context())
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=30)
            with client:
                if s.tls == "starttls":
                    client.starttls(context=ssl.create_default_context())
                if s.user:
                    client.login(s.user, s.password)
                client.send_message(message)
        except Exception as exc:  # noqa: BLE001 - a background send: logged, never lost silently
            log.warning("e-mail could not be sent: %s", type(exc).__name__)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued messages are sent (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=timeout)


def _internal(link: str) -> str:
    """``link`` when it is a path on ImageShare (``/...``), else "": a notification never
    points elsewhere (``//host``, ``javascript:``)."""
    return link if link.startswith("/") and not link.startswith(("//", "/\\")) \
        and not any(unicodedata.category(c)[0] in "CZ" for c in link) else ""


class Notifier:
    """In-app notifications for users, with an e-mail copy when the user has an address."""

    def __init__(self, engine: Engine, mailer: Mailer, email_of: Callable[[str], str],
                 public_url: str = "") -> None:
        self._engine = engine
        self.mailer = mailer
        self._email_of = email_of
        self._public_url = public_url.rstrip("/")

    def notify(self, username: str, kind: str, text: str, link: str, url: str = "") -> None:
        """Tell ``username`` that something happened (``text`` must carry no patient data;
        ``link`` is a path on ImageShare, anything else is dropped).

        The e-mail copy says only what kind of thing happened (:data:`MAIL_TEXTS`) and links
        to ``link`` on IMAGESHARE_PUBLIC_URL (or to ``url``, an https/http address); without
        either it carries no link (links are never built from a request's Host header)."""
        link = _internal(link[:512])
        with self._engine.begin() as conn:
            conn.execute(insert(notifications).values(
                username=username, kind=kind, text=text[:512], link=link,
                created_at=datetime.now(UTC)))
        address = self._email_of(username)
        if address:
            if not url.startswith(("https://", "http://")):
                url = ""
            target = url or (self._public_url + link if self._public_url and link else "")
            where = (f"Open ImageShare to see it: {target}" if target
                     else "Sign in to ImageShare to see it.")
            said = MAIL_TEXTS.get(kind, MAIL_TEXT_OTHER)
            self.mailer.send(address, f"ImageShare: {said.rstrip('.')}",
                             f"{said}\n\n{where}\n\n"
                             "This message contains no patient information.\n")

    def unread(self, username: str) -> int:
        """How many notifications ``username`` has not read."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(notifications).where(
                notifications.c.username == username, notifications.c.read_at.is_(None))
            ).scalar() or 0)

    def recent(self, username: str, limit: int = 50) -> list[dict[str, object]]:
        """The user's notifications, newest first; they count as read afterwards."""
        with self._engine.begin() as conn:
            rows = conn.execute(select(notifications).where(
                notifications.c.username == username).order_by(notifications.c.pk.desc())
                .limit(limit)).mappings().all()
            conn.execute(update(notifications).where(notifications.c.username == username,
                                                     notifications.c.read_at.is_(None))
                         .values(read_at=datetime.now(UTC)))
        return [dict(r) for r in rows]
