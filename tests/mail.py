"""A real SMTP server for tests (aiosmtpd on loopback) that keeps every message it receives."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from email.message import Message

from tests.peers import free_port


class MailSink:
    """The SMTP server's handler: every message received, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.recipients: list[list[str]] = []  # each message's envelope recipients
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        with self.arrived:
            self.messages.append(message_from_bytes(envelope.content))
            self.recipients.append(list(envelope.rcpt_tos))
            self.arrived.notify_all()
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        """The messages sent to ``address`` so far."""
        with self.arrived:
            return [m for m in self.messages if address in m["To"]]

    def bodies(self, address: str) -> list[str]:
        """The decoded bodies of the messages sent to ``address`` so far."""
        return [m.get_payload(decode=True).decode() for m in self.to(address)]

    def wait_for(self, address: str, count: int = 1, timeout: float = 30.0) -> list[Message]:
        """The messages to ``address`` once there are ``count`` (or when ``timeout`` ends)."""
        with self.arrived:
            self.arrived.wait_for(
                lambda: sum(address in m["To"] for m in self.messages) >= count,
                timeout=timeout)
        return self.to(address)


@contextmanager
def smtp_server() -> Iterator[tuple[MailSink, int]]:
    """A running SMTP server on 127.0.0.1: its sink and port."""
    from aiosmtpd.controller import Controller

    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()
