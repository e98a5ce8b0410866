"""Notifications in the app and by e-mail (SMTP). Texts never carry patient data: they say
that something happened and link to the place where a signed-in user can see it."""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

from sqlalchemy import Engine, func, insert, select, update

from imageshare.storage.index.schema import notifications

log = logging.getLogger("imageshare.mail")


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
        """Queue one message."""
        if not self.settings.enabled or not to:
            return
        message = EmailMessage()
        message["From"] = self.settings.sender
        message["To"] = to
        message["Subject"] = subject
        message.set_content(body)
        self._pool.submit(self._deliver, message)

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
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("e-mail could not be sent: %s", type(exc).__name__)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued messages are sent (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=timeout)


class Notifier:
    """In-app notifications for users, with an e-mail copy when the user has an address."""

    def __init__(self, engine: Engine, mailer: Mailer, email_of: Callable[[str], str],
                 public_url: str = "") -> None:
        self._engine = engine
        self.mailer = mailer
        self._email_of = email_of
        self._public_url = public_url.rstrip("/")

    def notify(self, username: str, kind: str, text: str, link: str, url: str = "") -> None:
        """Tell ``username`` that something happened (``text`` must carry no patient data).

        The e-mail copy links to ``link`` on IMAGESHARE_PUBLIC_URL; without it, it carries no
        link (links are never built from a request's Host header)."""
        with self._engine.begin() as conn:
            conn.execute(insert(notifications).values(
                username=username, kind=kind, text=text[:512], link=link[:512],
                created_at=datetime.now(UTC)))
        address = self._email_of(username)
        if address:
            target = url or (self._public_url + link if self._public_url else "")
            where = (f"Open ImageShare to see it: {target}" if target
                     else "Sign in to ImageShare to see it.")
            self.mailer.send(address, f"ImageShare: {text}"[:200],
                             f"{text}\n\n{where}\n\n"
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
