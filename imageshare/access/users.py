"""User accounts (argon2id password hashes, optional TOTP second factor) and personal API
tokens (stored as hashes)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, bindparam, func, insert, select, true, update
from sqlalchemy.exc import IntegrityError, OperationalError

from imageshare.access.lockout import Lockout
from imageshare.access.policy import ACCOUNT_ROLES, ENROLLING, effective_role
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import ANONYMOUS, SYSTEM, Actor
from imageshare.domain.errors import (
    Forbidden,
    ImageShareError,
    LinkGone,
    NotFound,
    TooManyRequests,
)
from imageshare.domain.identifiers import is_email_address
from imageshare.notify import Mailer
from imageshare.storage.index.database import run_read, take_write_lock
from imageshare.storage.index.schema import (
    account_invites,
    api_tokens,
    email_confirmations,
    nodes,
    users,
)
from imageshare.storage.secret_box import SecretBox

_hasher = PasswordHasher()
_CACHE_SECONDS = 300.0
# How precisely an API token's last use is recorded (one write a minute, not one a request).
TOKEN_USE_RESOLUTION = timedelta(seconds=60)
# A person's live (unrevoked) API tokens: a stolen session cannot mint tokens without end.
# Counted in the transaction that makes a token (those made on the server's command line are
# counted but never refused).
MAX_LIVE_TOKENS = 50
log = logging.getLogger(__name__)
TOTP_ISSUER = "ImageShare"
# A link that confirms an address an account set for itself: how long it works, how soon
# another may be mailed, and how many may be mailed to one account in a day.
CONFIRM_LINK_HOURS = 24
CONFIRM_LINK_INTERVAL = timedelta(seconds=60)
CONFIRM_LINKS_PER_DAY = 5
# What became of a link after an address change or a request for one: mailed; not mailed
# because ImageShare sends no e-mail with links (no SMTP host or no IMAGESHARE_PUBLIC_URL), or
# because links were asked for too often; none due (no address, or the address is confirmed).
LinkOutcome = Literal["sent", "no-mail", "throttled", "none"]


@dataclass(frozen=True)
class Account:
    """A user account as administrators see it (no secrets)."""

    username: str
    role: str
    disabled: bool
    locked: bool
    two_factor: bool
    created_at: datetime
    tokens: int
    email: str = ""
    site_node: str = ""  # a ``site`` account's connected site (AE title), "" when unlinked
    # True when ``email`` counts for what is addressed to it: set by an administrator, bound
    # by an invitation, or confirmed through the link mailed to it.
    email_verified: bool = False


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise ImageShareError("a password needs at least 8 characters")


class UserDirectory:
    """Creates users, checks passwords and API tokens, and turns them into Actors."""

    def __init__(self, engine: Engine, secrets_box: SecretBox,
                 audit: AuditTrail | None = None) -> None:
        self._engine = engine
        self._audit = audit
        self.lockout = Lockout(engine)
        self._box = secrets_box
        # Recent password checks (time, actor, stored hash); a hit still asks the index that
        # the hash and role are unchanged, so a change made on another instance counts at once.
        self._verified: dict[tuple[str, bytes], tuple[float, Actor, str]] = {}
        self._lock = threading.Lock()

    def add(self, username: str, password: str, role: str, email: str = "",
            site_node: str = "", temporary: bool = False) -> None:
        """Create a user; raises ImageShareError for an unknown role or a taken name.

        A ``site`` account (another hospital's ImageShare) is tied to the connected site it
        speaks for: ``site_node``, the AE title of a registered node. Made without one it may
        store (into the inbox) but send no site-to-site message until linked
        (:meth:`link_site`). A ``temporary`` password (generated and shown to an
        administrator) must be changed before the account does anything else."""
        _check_new_user(username, role)
        _check_password(password)
        if site_node and role != "site":
            raise ImageShareError("only a site account is linked to a connected site")
        try:
            with self._engine.begin() as conn:
                linked = _registered_node(conn, site_node) if site_node else ""
                if role == "site":
                    _refuse_name_of_another_site(conn, username, linked or None)
                _insert_user(conn, username, password, role, email)
                if temporary:
                    conn.execute(update(users).where(users.c.username == username)
                                 .values(must_change_password=True))
                if linked:
                    conn.execute(update(users).where(users.c.username == username)
                                 .values(site_node=linked))
        except IntegrityError as exc:
            raise ImageShareError(f"user {username!r} exists already") from exc

    def link_site(self, username: str, ae_title: str) -> str:
        """Tie the ``site`` account ``username`` to the connected site ``ae_title`` (a
        registered node); "" unlinks it. Returns the node's AE title as registered."""
        with self._engine.begin() as conn:
            role = conn.execute(select(users.c.role).where(users.c.username == username)
                                ).scalar()
            if role is None:
                raise NotFound(f"no user {username!r}")
            if role != "site":
                raise ImageShareError(f"{username!r} is not a site account (role {role})")
            linked = _registered_node(conn, ae_title) if ae_title.strip() else ""
            if linked:
                _refuse_name_of_another_site(conn, username, linked)
            conn.execute(update(users).where(users.c.username == username)
                         .values(site_node=linked))
        self.forget_cached(username)
        return linked

    def site_node(self, username: str) -> str:
        """The connected site a ``site`` account speaks for ("" when unlinked or when its
        node is no longer registered)."""
        return linked_site(self._engine, username)

    def ensure_admin(self, password: str) -> str | None:
        """Create ``admin`` if there are no users; returns a generated password, if any."""
        with self._engine.connect() as conn:
            if conn.execute(select(users.c.pk).limit(1)).first() is not None:
                return None
        generated = None
        if not password:
            generated = password = secrets.token_urlsafe(15)
        self.add("admin", password, "admin")
        return generated

    def authenticate(
        self, username: str, password: str, source: str = "", code: str | None = None
    ) -> Actor | None:
        """The user's Actor when the password is right and the account enabled, else None.

        An account with two-factor sign-in also needs its current TOTP ``code``; without one
        (HTTP Basic) it is refused: such accounts use API tokens for programs. Every failure
        counts towards the lockout and gives the same answer.
        """
        verified = self._verify(username, password, source, code, defer_code=False)
        return verified[0] if verified else None

    def sign_in(self, username: str, password: str, source: str = "") -> tuple[Actor, str] | None:
        """Check a browser sign-in's password: (Actor, stage) or None (same for every failure).

        The stage is ``full``; ``code`` when the account's TOTP code must follow
        (:meth:`check_code`); ``enrol`` when an administrator has yet to set up two-factor
        sign-in, which is required for administrators.
        """
        verified = self._verify(username, password, source, None, defer_code=True)
        if verified is None or verified[0].role == "site":
            # A site account is a machine (STOW-RS and the exchange API): it has no pages to
            # use, so it gets no browser session (the same answer as a wrong password).
            return None
        actor, has_code = verified
        if has_code:
            return actor, "code"
        return actor, "enrol" if actor.role == ENROLLING else "full"

    def check_code(self, username: str, code: str, source: str = "") -> bool:
        """True when ``code`` is the user's current TOTP code; a wrong one counts as a failed
        sign-in from ``source``."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.totp_secret, users.c.disabled)
                               .where(users.c.username == username)).first()
        if row is None or row.disabled or self.lockout.locked(row.pk, source):
            return False
        if not self._accept_code(row.pk, row.totp_secret, code):
            self.lockout.failed(row.pk, source)
            return False
        self.lockout.cleared(row.pk, source)
        return True

    def _verify(self, username: str, password: str, source: str, code: str | None,
                defer_code: bool) -> tuple[Actor, bool] | None:
        """(Actor, whether a TOTP code is still due) when the credentials are right."""
        cache_key = (username, hashlib.sha256(password.encode()).digest())
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(cache_key)
        if (code is None and hit and now - hit[0] < _CACHE_SECONDS
                and self._still_allowed(username, source, hit[2], hit[1].role)):
            return Actor("user", hit[1].name, hit[1].role, source), False
        with self._engine.connect() as conn:
            row = conn.execute(
                select(users.c.pk, users.c.password_hash, users.c.role, users.c.disabled,
                       users.c.totp_enabled, users.c.totp_secret, users.c.must_change_password)
                .where(users.c.username == username)
            ).first()
        if row is None:
            _hasher.hash(password)  # same cost for unknown users
            return None
        locked = self.lockout.locked(row.pk, source)
        try:
            _hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            self.lockout.failed(row.pk, source)
            return None
        if row.disabled or locked:
            return None  # the same answer as a wrong password
        actor = Actor("user", username, effective_role(
            row.role, row.totp_enabled, must_change_password=row.must_change_password), source)
        if row.totp_enabled:
            if defer_code:
                return actor, True
            if code is None or not self._accept_code(row.pk, row.totp_secret, code):
                self.lockout.failed(row.pk, source)
                return None
        self.lockout.cleared(row.pk, source)
        if not row.totp_enabled:
            with self._lock:
                self._verified[cache_key] = (now, actor, row.password_hash)
        return actor, False

    def _accept_code(self, user_pk: int, secret: str | None, code: str) -> bool:
        """True for the current (or adjacent) TOTP code, used at most once."""
        code = code.strip().replace(" ", "")
        if not secret or not code.isdigit():
            return False
        totp = pyotp.TOTP(self._box.open(secret))
        step_now = int(time.time()) // totp.interval
        for step in (step_now, step_now - 1, step_now + 1):
            if totp.generate_otp(step) == code:
                with self._engine.begin() as conn:
                    used = conn.execute(
                        update(users).where(users.c.pk == user_pk)
                        .where((users.c.totp_last_step.is_(None))
                               | (users.c.totp_last_step < step))
                        .values(totp_last_step=step)
                    ).rowcount
                return used == 1
        return False

    def _still_allowed(self, username: str, source: str, password_hash: str, role: str) -> bool:
        """Not disabled, locked (from ``source``), given a second factor, a new password or
        another role since the password was last checked (cheap, no argon2)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.disabled, users.c.totp_enabled,
                                      users.c.password_hash, users.c.role,
                                      users.c.must_change_password)
                               .where(users.c.username == username)).first()
        if (row is None or row.disabled or row.totp_enabled
                or row.password_hash != password_hash
                or effective_role(row.role, row.totp_enabled,
                                  must_change_password=row.must_change_password) != role):
            return False
        return not self.lockout.locked(row.pk, source)

    def invite(self, email: str, invited_by: str, role: str = "reviewer",
               days: int = 14, share_pk: int | None = None) -> str:
        """A one-time invitation for ``email`` to create an account with ``role``; returns
        its secret (only the hash is kept). ``share_pk`` binds it to the identifiable share
        that the new account is to receive."""
        with self._engine.begin() as conn:
            return self.new_invitation(conn, email, invited_by, role, days, share_pk)[1]

    def new_invitation(self, conn: Connection, email: str, invited_by: str,
                       role: str = "reviewer", days: int = 14, share_pk: int | None = None
                       ) -> tuple[int, str]:
        """:meth:`invite` within the caller's transaction ``conn``: (the invitation's row
        key, its secret), so that what the invitation is for can be stored with it, once."""
        if role not in ("reviewer", "patient"):
            raise ImageShareError("only reviewers and patients are invited by link")
        secret = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        pk = conn.execute(insert(account_invites).values(
            token_hash=secret_hash(secret), email=email.strip()[:254], role=role,
            invited_by=invited_by, created_at=now, expires_at=now + timedelta(days=days),
            share_pk=share_pk).returning(account_invites.c.pk)).scalar_one()
        return int(pk), secret

    def invitation(self, secret: str) -> tuple[str, str] | None:
        """(e-mail, role) of a live invitation, else None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(account_invites).where(
                account_invites.c.token_hash == secret_hash(secret))).mappings().first()
        if (row is None or row["used_at"] is not None
                or as_utc(row["expires_at"]) <= datetime.now(UTC)):
            return None
        return row["email"], row["role"]

    def accept_invitation(self, secret: str, username: str, password: str) -> str:
        """Create the invited account (once: the invitation is used up in the transaction
        that makes the account, so two acceptances cannot both make one); returns its role.

        The invitation records the account made with it (``accepted_by``): what the
        invitation was for (a patient's record, a share) belongs to that account alone."""
        found = self.invitation(secret)
        if found is None:
            raise ImageShareError("this invitation has expired or was used already")
        email, role = found
        username = username.strip()
        _check_new_user(username, role)
        _check_password(password)
        try:
            with self._engine.begin() as conn:
                taken = conn.execute(update(account_invites).where(
                    account_invites.c.token_hash == secret_hash(secret),
                    account_invites.c.used_at.is_(None)).values(
                    used_at=datetime.now(UTC), accepted_by=username)).rowcount
                if not taken:
                    raise ImageShareError("this invitation has expired or was used already")
                _insert_user(conn, username, password, role, email)
        except IntegrityError as exc:  # a taken name: the invitation stays usable
            raise ImageShareError(f"user {username!r} exists already") from exc
        return role

    def set_email(self, username: str, email: str) -> None:
        """An administrator's setting (or, with "", clearing) of the address the user's
        notifications go to: it counts as confirmed at once (what is addressed to it is the
        account's), and any confirmation link mailed earlier stops working. Raises
        ImageShareError for an address that is not valid, NotFound for no such user."""
        email = _valid_email(email)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
            if user_pk is None:
                raise NotFound("no such user")
            conn.execute(update(users).where(users.c.pk == user_pk).values(
                email=email, email_verified_at=now if email else None))
            _void_links(conn, user_pk, now)

    def change_own_email(self, username: str, current: str, email: str,
                         source: str = "", *, mailer: Mailer | None = None,
                         link_base: str = "", actor: Actor = SYSTEM) -> LinkOutcome:
        """The user's own change of e-mail address; the current password must be right (a
        wrong one counts towards the account's lockout from ``source``, and a locked
        account gets the same answer). Raises ImageShareError.

        A new address is unconfirmed: notifications go to it, but what is addressed to it
        (shares sent to it) is the account's only after the person follows the one-time link
        mailed to it (:meth:`confirm_email`) through ``mailer``, starting ``link_base``
        (IMAGESHARE_PUBLIC_URL). Links mailed for an earlier address stop working. Giving
        the address the account has already changes nothing. Returns what became of the
        link."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.password_hash, users.c.disabled,
                                      users.c.email, users.c.email_verified_at)
                               .where(users.c.username == username)).first()
        if row is None:
            _hasher.hash(current)  # same cost for unknown users
            raise ImageShareError("the current password is wrong")
        locked = self.lockout.locked(row.pk, source)
        try:
            _hasher.verify(row.password_hash, current)
        except (VerificationError, InvalidHashError) as exc:
            self.lockout.failed(row.pk, source)
            raise ImageShareError("the current password is wrong") from exc
        if locked or row.disabled:
            raise ImageShareError("the current password is wrong")
        email = _valid_email(email)
        if email == (row.email or "") and (row.email_verified_at is not None or not email):
            return "none"
        if email == (row.email or ""):  # the same unconfirmed address: one more link, if due
            return self._mail_link(row.pk, username, email, mailer, link_base, actor)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(update(users).where(users.c.pk == row.pk)
                         .values(email=email, email_verified_at=None))
            _void_links(conn, row.pk, now)
        if not email:
            return "none"
        return self._mail_link(row.pk, username, email, mailer, link_base, actor)

    def send_confirmation(self, username: str, *, mailer: Mailer | None, link_base: str,
                          actor: Actor = SYSTEM) -> str:
        """Mail a new link that confirms the user's unconfirmed address (earlier ones stop
        working); returns the address. Raises ImageShareError when there is nothing to
        confirm or no e-mail can be sent, TooManyRequests when a link was mailed less than a
        minute ago or five in the last day (audited)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.email, users.c.email_verified_at)
                               .where(users.c.username == username)).first()
        if row is None:
            raise NotFound("no such user")
        if not row.email:
            raise ImageShareError("your account has no e-mail address to confirm")
        if row.email_verified_at is not None:
            raise ImageShareError("your e-mail address is confirmed already")
        outcome = self._mail_link(row.pk, username, row.email, mailer, link_base, actor)
        if outcome == "throttled":
            raise TooManyRequests("a confirmation link was mailed a moment ago: wait a minute "
                                  f"(at most {CONFIRM_LINKS_PER_DAY} a day), then ask again")
        if outcome == "no-mail":
            raise ImageShareError(_NO_MAIL)
        return str(row.email)

    def _mail_link(self, user_pk: int, username: str, email: str, mailer: Mailer | None,
                   link_base: str, actor: Actor) -> LinkOutcome:
        """Make a confirmation link for ``email`` and mail it (earlier links are void), unless
        no e-mail with links can be sent or links were asked for too often (audited)."""
        if mailer is None or not mailer.settings.enabled or not link_base:
            return "no-mail"
        secret = secrets.token_urlsafe(32)  # 256 bits
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            # Two requests at once count one after the other: the user's row is locked first.
            take_write_lock(conn)
            conn.execute(select(users.c.pk).where(users.c.pk == user_pk).with_for_update())
            made = conn.execute(select(email_confirmations.c.created_at).where(
                email_confirmations.c.user_pk == user_pk,
                email_confirmations.c.created_at > now - timedelta(days=1))).scalars().all()
            if made and (len(made) >= CONFIRM_LINKS_PER_DAY
                         or max(as_utc(m) for m in made) > now - CONFIRM_LINK_INTERVAL):
                self._record(AuditEvent(actor=actor, action="user.email-link",
                                        outcome="failure",
                                        detail={"user": username, "reason": "too often"}),
                             conn)
                return "throttled"
            _void_links(conn, user_pk, now)
            conn.execute(insert(email_confirmations).values(
                user_pk=user_pk, email=email, token_hash=secret_hash(secret), created_at=now,
                expires_at=now + timedelta(hours=CONFIRM_LINK_HOURS)))
            self._record(AuditEvent(actor=actor, action="user.email-link", outcome="success",
                                    detail={"user": username}), conn)
        mailer.send(
            email, "Confirm your e-mail address on ImageShare",
            f"The ImageShare account \"{username}\" gave this address as its own. If that "
            "was you, confirm it here, signed in as that account (the link works once, for "
            f"{CONFIRM_LINK_HOURS} hours):\n{link_base.rstrip('/')}"
            f"/account/email/confirm/{secret}\n\nUntil it is confirmed, nothing addressed to "
            "you is shown to that account. If it was not you, ignore this message.\n\n"
            "This message contains no patient information.\n")
        return "sent"

    def confirmation_for(self, secret: str, username: str) -> str:
        """The address a live confirmation link of ``username``'s would confirm. Raises
        LinkGone (expired, used, replaced, not valid) or Forbidden (another account's link),
        each with a message for the user; nothing is changed."""
        with self._engine.connect() as conn:
            return str(_live_link(conn, secret, username, datetime.now(UTC)).email)

    def confirm_email(self, secret: str, actor: Actor) -> str:
        """Follow a confirmation link mailed to an address ``actor`` set for itself: the
        address then counts for what is addressed to it. Returns the address. The link works
        once, for 24 hours, for the account that asked for it and only while it is that
        account's newest link for its current address; anything else raises LinkGone or
        Forbidden with a message for the user. Both outcomes are audited."""
        now = datetime.now(UTC)
        try:
            with self._engine.begin() as conn:
                link = _live_link(conn, secret, actor.name, now)
                taken = conn.execute(update(email_confirmations).where(
                    email_confirmations.c.pk == link.pk, email_confirmations.c.used_at.is_(None),
                    email_confirmations.c.voided_at.is_(None)).values(used_at=now)).rowcount
                confirmed = taken and conn.execute(update(users).where(
                    users.c.pk == link.user_pk, users.c.email == link.email).values(
                    email_verified_at=now)).rowcount
                if not confirmed:  # another request took it (or changed the address) meanwhile
                    raise LinkGone(_USED)
                self._record(AuditEvent(actor=actor, action="user.email-confirm",
                                        outcome="success", detail={"user": actor.name}), conn)
        except (LinkGone, Forbidden) as exc:
            self._record(AuditEvent(actor=actor, action="user.email-confirm", outcome="failure",
                                    detail={"user": actor.name, "reason": str(exc)[:120]}))
            raise
        return str(link.email)

    def _record(self, event: AuditEvent, conn: Connection | None = None) -> None:
        if self._audit is not None:
            self._audit.record(event, conn)

    def email_of(self, username: str) -> str:
        """The user's e-mail address, confirmed or not ("" when none is known): where the
        user's notifications go."""
        with self._engine.connect() as conn:
            return conn.execute(select(users.c.email).where(users.c.username == username)
                                ).scalar() or ""

    def verified_email_of(self, username: str) -> str:
        """The user's e-mail address when it is confirmed, else "": the only address for
        which anything addressed to it (a share) is the user's."""
        with self._engine.connect() as conn:
            return conn.execute(select(users.c.email).where(
                users.c.username == username, users.c.email_verified_at.is_not(None))
            ).scalar() or ""

    def confirmation_pending(self, username: str) -> datetime | None:
        """When the user's live confirmation link (for the current, unconfirmed address) was
        mailed; None when there is none."""
        now = datetime.now(UTC)
        with self._engine.connect() as conn:
            made = conn.execute(select(func.max(email_confirmations.c.created_at)).select_from(
                email_confirmations.join(users, users.c.pk == email_confirmations.c.user_pk))
                .where(users.c.username == username, users.c.email_verified_at.is_(None),
                       email_confirmations.c.email == users.c.email,
                       email_confirmations.c.used_at.is_(None),
                       email_confirmations.c.voided_at.is_(None),
                       email_confirmations.c.expires_at > now)).scalar()
        return as_utc(made) if made is not None else None

    def forget_cached(self, username: str) -> None:
        """Drop remembered password checks of ``username`` (after a change to the account)."""
        with self._lock:
            for key in [k for k in self._verified if k[0] == username]:
                del self._verified[key]

    # -- administration ------------------------------------------------------------------

    def accounts(self, username: str | None = None) -> list[Account]:
        """Every account, by name (or only the one named ``username``)."""
        now = datetime.now(UTC)
        tokens = (select(func.count(api_tokens.c.pk))
                  .where(api_tokens.c.user_pk == users.c.pk)
                  .where(api_tokens.c.revoked_at.is_(None)).scalar_subquery())
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(users.c.pk, users.c.username, users.c.role, users.c.disabled,
                       users.c.locked_until, users.c.totp_enabled, users.c.created_at,
                       users.c.email, users.c.email_verified_at, users.c.site_node,
                       tokens.label("tokens"))
                .where(users.c.username == username if username is not None else true())
                .order_by(users.c.username)
            ).all()
        locked = self.lockout.locked_accounts()
        return [
            Account(r.username, r.role, r.disabled,
                    r.pk in locked or (r.locked_until is not None
                                       and as_utc(r.locked_until) > now),
                    r.totp_enabled, as_utc(r.created_at), r.tokens, r.email or "",
                    r.site_node or "", bool(r.email and r.email_verified_at is not None))
            for r in rows
        ]

    def account(self, username: str) -> Account:
        """One account; raises NotFound."""
        for account in self.accounts(username):
            return account
        raise NotFound(f"no user {username!r}")

    def _change(self, username: str, **values: object) -> None:
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(users).where(users.c.username == username).values(**values)
            ).rowcount
        if not changed:
            raise NotFound(f"no user {username!r}")
        self.forget_cached(username)

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable (sessions and tokens stop working at once) or enable an account."""
        self._change(username, disabled=disabled)

    def set_role(self, username: str, role: str) -> None:
        """Give ``username`` another role."""
        if role not in ACCOUNT_ROLES:
            raise ImageShareError(f"unknown role {role!r}; roles: {', '.join(ACCOUNT_ROLES)}")
        # A new role starts unlinked: a site account is linked to its site deliberately.
        self._change(username, role=role, site_node="")

    def set_password(self, username: str, password: str, *, reset_two_factor: bool = False,
                     revoke_tokens: bool = False, actor: Actor = SYSTEM,
                     temporary: bool = False) -> None:
        """Set a new password and lift a lockout; optionally remove the second factor (lost
        phone), which the user must then set up again, and revoke every live API token
        (an administrator's reset: whoever held the password may have made them), each
        revocation audited as ``actor``'s. A ``temporary`` password (one an administrator
        gives) lets the account do nothing but choose its own; any other clears that."""
        _check_password(password)
        values: dict[str, object] = {
            "password_hash": _hasher.hash(password), "failed_logins": 0, "locked_until": None,
            "must_change_password": temporary,
        }
        if reset_two_factor:
            values.update(totp_enabled=False, totp_secret=None, totp_last_step=None)
        self._change(username, **values)
        with self._engine.connect() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
        if user_pk is not None:
            self.lockout.clear_all(user_pk)
        if revoke_tokens:
            for token in self.tokens(username):
                if token["revoked_at"] is None:
                    with contextlib.suppress(NotFound):  # revoked meanwhile
                        self.revoke_token(username, int(str(token["pk"])), actor=actor)

    def change_own_password(self, username: str, current: str, new: str,
                            source: str = "") -> None:
        """The user's own password change; the current password must be right. Raises
        ImageShareError otherwise (see :meth:`check_current_password`)."""
        self.check_current_password(username, current, source)
        self.set_password(username, new)

    def check_current_password(self, username: str, current: str, source: str = "") -> None:
        """Re-authentication before a change a session alone may not make (a new password, a
        new API token): raises ImageShareError unless ``current`` is the password. A wrong
        one counts towards the account's lockout from ``source`` like a wrong sign-in, and a
        locked or disabled account gets the same answer: a held session is no password
        oracle."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.password_hash, users.c.disabled)
                               .where(users.c.username == username)).first()
        if row is None:
            _hasher.hash(current)  # same cost for unknown users
            raise ImageShareError("the current password is wrong")
        locked = self.lockout.locked(row.pk, source)
        try:
            _hasher.verify(row.password_hash, current)
        except (VerificationError, InvalidHashError) as exc:
            self.lockout.failed(row.pk, source)
            raise ImageShareError("the current password is wrong") from exc
        if locked or row.disabled:
            raise ImageShareError("the current password is wrong")

    # -- two-factor sign-in ---------------------------------------------------------------

    def seal_stored_secrets(self) -> int:
        """Encrypt TOTP secrets still stored in plaintext (written by an older version);
        returns how many were sealed."""
        sealed = 0
        with self._engine.begin() as conn:
            rows = conn.execute(select(users.c.pk, users.c.totp_secret)
                                .where(users.c.totp_secret.is_not(None))).all()
            for row in rows:
                if row.totp_secret and not SecretBox.is_sealed(row.totp_secret):
                    conn.execute(update(users).where(users.c.pk == row.pk)
                                 .values(totp_secret=self._box.seal(row.totp_secret)))
                    sealed += 1
        return sealed

    def two_factor_enabled(self, username: str) -> bool:
        """True when ``username`` signs in with a TOTP code."""
        with self._engine.connect() as conn:
            return bool(conn.execute(select(users.c.totp_enabled)
                                     .where(users.c.username == username)).scalar())

    def begin_two_factor(self, username: str) -> str:
        """A new TOTP secret for ``username`` (not yet in force); returns its otpauth:// URI
        for an authenticator app."""
        if self.two_factor_enabled(username):
            raise ImageShareError("two-factor sign-in is already set up")
        secret = pyotp.random_base32()
        self._change(username, totp_secret=self._box.seal(secret))  # encrypted at rest
        return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)

    def pending_two_factor(self, username: str, key: str) -> str | None:
        """The otpauth:// URI of the set-up of ``username`` still waiting for its first code,
        when ``key`` (:func:`two_factor_key` of the URI shown) names it; else None (none is
        pending, it is in force, or another set-up was started since). A page shows the same
        key again after a wrong code with it, never a key it did not show."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.totp_secret, users.c.totp_enabled)
                               .where(users.c.username == username)).first()
        if row is None or row.totp_enabled or not row.totp_secret or not key:
            return None
        uri = pyotp.TOTP(self._box.open(row.totp_secret)).provisioning_uri(
            name=username, issuer_name=TOTP_ISSUER)
        return uri if hmac.compare_digest(two_factor_key(uri), key[:64]) else None

    def confirm_two_factor(self, username: str, code: str, key: str | None = None) -> None:
        """Put the pending TOTP secret in force once the user proves it with a code. With
        ``key`` (what the set-up page showed, :func:`two_factor_key`), only that set-up: one
        started again meanwhile (by another session holding the password) is refused, so
        nobody's phone but the one that scanned the page protects the account."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.totp_secret, users.c.totp_enabled)
                               .where(users.c.username == username)).first()
        if row is None or not row.totp_secret:
            raise ImageShareError("start setting up two-factor sign-in first")
        if row.totp_enabled:
            raise ImageShareError("two-factor sign-in is already set up")
        if key is not None and self.pending_two_factor(username, key) is None:
            raise ImageShareError(TWO_FACTOR_RESTARTED)
        if not self._accept_code(row.pk, row.totp_secret, code):
            raise ImageShareError("that code is not right; check the phone's clock and retry")
        with self._engine.begin() as conn:
            # In force only if the secret proven is still the pending one.
            changed = conn.execute(update(users).where(
                users.c.pk == row.pk, users.c.totp_secret == row.totp_secret,
                users.c.totp_enabled.is_(False)).values(totp_enabled=True)).rowcount
        self.forget_cached(username)
        if not changed:
            raise ImageShareError(TWO_FACTOR_RESTARTED)

    # -- API tokens -----------------------------------------------------------------------

    def tokens(self, username: str) -> list[dict[str, object]]:
        """The user's tokens (names and times, never secrets), newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(api_tokens.c.pk, api_tokens.c.name, api_tokens.c.created_at,
                       api_tokens.c.last_used_at, api_tokens.c.revoked_at, api_tokens.c.origin)
                .join(users, users.c.pk == api_tokens.c.user_pk)
                .where(users.c.username == username).order_by(api_tokens.c.pk.desc())
            ).all()
        return [dict(r._mapping) for r in rows]

    def revoke_token(self, username: str, token_pk: int, actor: Actor = SYSTEM) -> None:
        """Revoke one of the user's own tokens for good (``actor``'s ``token.revoke``,
        audited)."""
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
            changed = conn.execute(
                update(api_tokens).where(api_tokens.c.pk == token_pk)
                .where(api_tokens.c.user_pk == user_pk).where(api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            ).rowcount
            if changed and self._audit is not None:
                self._audit.record(AuditEvent(actor=actor, action="token.revoke",
                                              outcome="success", detail={"token": token_pk}),
                                   conn)
        if not changed:
            raise NotFound("no such token")

    def create_token(self, username: str, name: str, origin: str = "web",
                     actor: Actor = SYSTEM) -> str:
        """A new API token for ``username``; only its hash is kept, so show it once
        (``actor``'s ``token.create``, audited).

        ``origin`` is ``cli`` for tokens made on the server's command line (they work for an
        administrator who has no second factor yet: machines), else ``web``."""
        secret = "is_" + secrets.token_urlsafe(32)
        live = 0
        with self._engine.begin() as conn:
            # The count and the new token in one transaction, the account's row locked first
            # (SQLite: the write lock), so that tokens asked for at once count one by one.
            take_write_lock(conn)
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   .with_for_update()).scalar()
            if user_pk is None:
                raise ImageShareError(f"no user {username!r}")
            if origin != "cli":
                live = conn.execute(select(func.count()).select_from(api_tokens).where(
                    api_tokens.c.user_pk == user_pk,
                    api_tokens.c.revoked_at.is_(None))).scalar_one()
            if live < MAX_LIVE_TOKENS:
                conn.execute(
                    insert(api_tokens).values(
                        user_pk=user_pk, name=name[:128], token_hash=secret_hash(secret),
                        created_at=datetime.now(UTC),
                        origin="cli" if origin == "cli" else "web",
                    )
                )
                self._record(AuditEvent(actor=actor, action="token.create",
                                        outcome="success", detail={"name": name[:128]}),
                             conn)
        if live >= MAX_LIVE_TOKENS:
            self._record(AuditEvent(actor=actor, action="token.create", outcome="failure",
                                    detail={"name": name[:128]}))
            raise ImageShareError(f"this account has {live} live API tokens, the most it "
                                  "may hold: revoke one on the account page first")
        return secret

    def authenticate_token(self, secret: str, source: str = "") -> Actor | None:
        """The Actor owning a valid (not expired, not revoked) token, else None."""
        now = datetime.now(UTC)
        # Looked up in the database on every request (no cache: a revocation or a disabled
        # account counts at once on every instance), as one statement without a transaction
        # around it.
        row = run_read(self._engine, lambda conn: conn.execute(
            _TOKEN_LOOKUP, {"token_hash": secret_hash(secret)}).first())
        if row is None or row.revoked_at is not None or row.disabled:
            return None
        if row.expires_at is not None and as_utc(row.expires_at) <= now:
            return None
        if row.last_used_at is None or now - as_utc(row.last_used_at) > TOKEN_USE_RESOLUTION:
            self._stamp_token_use(row.pk, now)
        return Actor("user", row.username,
                     effective_role(row.role, row.totp_enabled, row.origin == "cli",
                                    row.must_change_password), source)


    def _stamp_token_use(self, pk: int, now: datetime) -> None:
        # When a token was last used is bookkeeping: a request is not refused because the
        # stamp could not be written (the request's own audit row decides that).
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    update(api_tokens).where(api_tokens.c.pk == pk).values(last_used_at=now)
                )
        except OperationalError as exc:
            log.warning("could not record when an API token was last used (%s)",
                        type(exc).__name__)


_TOKEN_LOOKUP = (
    select(api_tokens.c.pk, api_tokens.c.expires_at, api_tokens.c.revoked_at,
           api_tokens.c.origin, api_tokens.c.last_used_at, users.c.username, users.c.role,
           users.c.disabled, users.c.totp_enabled, users.c.must_change_password)
    .join(users, users.c.pk == api_tokens.c.user_pk)
    .where(api_tokens.c.token_hash == bindparam("token_hash"))
)


def linked_site(engine: Engine, username: str) -> str:
    """The AE title of the connected site the ``site`` account ``username`` is linked to, ""
    when unlinked, not a site account, or its node is no longer registered."""
    row = run_read(engine, lambda conn: conn.execute(
        select(nodes.c.ae_title).select_from(users.join(
            nodes, func.upper(nodes.c.ae_title) == func.upper(users.c.site_node)))
        .where(users.c.username == username, users.c.role == "site",
               users.c.site_node != "")).first())
    return str(row.ae_title) if row is not None else ""


def _registered_node(conn: Connection, ae_title: str) -> str:
    """The AE title of the registered node ``ae_title`` (case-insensitively); raises
    ImageShareError when there is none."""
    found = conn.execute(select(nodes.c.ae_title).where(
        func.upper(nodes.c.ae_title) == ae_title.strip().upper())).scalars().all()
    if len(found) != 1:
        raise ImageShareError(f"no connected site {ae_title.strip()!r}: register its node "
                              "first (imageshare node add)")
    return str(found[0])


def _refuse_name_of_another_site(conn: Connection, username: str, linked: str | None) -> None:
    """Raises ImageShareError when the site account ``username`` is spelled like a registered
    node other than the one it is linked to (``linked``; None: made without a link): what
    a sender stores waits in the inbox under its name, so the two would mix."""
    named = conn.execute(select(nodes.c.ae_title).where(
        func.upper(nodes.c.ae_title) == username.strip().upper())).scalar()
    if named is not None and (linked is None or linked.upper() != named.upper()):
        raise ImageShareError(
            f"a site account named {username!r} speaks only for the connected site "
            f"{named!r} (what each sender stores waits under its name): link it to "
            f"{named!r} or choose another name")


# Unicode categories no user name holds: control and format characters, line and paragraph
# separators.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def one_line(text: str, limit: int = 128) -> str:
    """``text`` as one line for an e-mail the hospital sends: its line breaks and other
    control characters become spaces (a name its owner chose cannot add lines of its own),
    at most ``limit`` characters."""
    cleaned = "".join(" " if unicodedata.category(c) in _NOT_IN_NAMES else c for c in text)
    return " ".join(cleaned.split())[:limit]


# Names the archive acts under itself (the system actor, the owner of periodic jobs, the
# anonymous caller), never given to an account.
RESERVED_NAMES = frozenset({SYSTEM.name, "system", ANONYMOUS.name})


def _check_new_user(username: str, role: str) -> None:
    if role not in ACCOUNT_ROLES:
        raise ImageShareError(f"unknown role {role!r}; roles: {', '.join(ACCOUNT_ROLES)}")
    if not username or len(username) > 128 or username != username.strip():
        raise ImageShareError("a username has 1 to 128 characters, no surrounding spaces")
    if any(unicodedata.category(c) in _NOT_IN_NAMES for c in username):
        # A name is shown in pages, audit reports and the hospital's e-mails ("... has shared
        # images with you"): line breaks and other control characters would let its owner
        # write lines of their own there.
        raise ImageShareError("a username has no line breaks or other control characters")
    if name_fold(username) in {name_fold(name) for name in RESERVED_NAMES}:
        # Names ImageShare itself acts under (periodic jobs are owned by "system"): an
        # account of that name would pass as it.
        raise ImageShareError(f"the username {username!r} is reserved")


TWO_FACTOR_RESTARTED = ("two-factor set-up was started again (in another window or by "
                        "someone else holding your password): start again here and scan the "
                        "new code")


def two_factor_key(uri: str) -> str:
    """What a set-up page carries to name the TOTP key it showed (its otpauth:// URI): a
    digest, not the key itself."""
    return hashlib.sha256(uri.encode()).hexdigest()


# Letters of other scripts (and Latin letters outside ASCII) that read as an ASCII letter in
# the fonts pages, audit reports and e-mails use (after case folding): a name written with
# them passes for the ASCII name (Cyrillic "а" in "аdmin", Turkish dotless "ı" in "admın",
# Greek "ο" in "dοc"). From Unicode's confusables (UTS #39), the letters names are made of.
_READS_AS = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "һ": "h", "і": "i", "ӏ": "l", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x",
    "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y", "ҽ": "e", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ϲ": "c", "ϳ": "j",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g", "զ": "q",
    # Latin letters beyond ASCII (dotless i and j, small capitals, IPA forms)
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ɪ": "i", "ʋ": "u", "ɛ": "e", "ɔ": "c",
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s",
    "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ĸ": "k", "ƚ": "l",
})


def name_fold(username: str) -> str:
    """A user name as people read it: compatibility forms (full-width letters, ligatures),
    case, accents and other combining marks, and letters of other scripts that look like
    Latin ones (:data:`_READS_AS`) do not tell two names apart."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", username).casefold())
    bare = "".join(c for c in folded if unicodedata.category(c) not in ("Mn", "Me"))
    return unicodedata.normalize("NFKC", bare.casefold().translate(_READS_AS))


def _refuse_look_alike(conn: Connection, username: str) -> None:
    """Raises ImageShareError when an account exists whose name reads the same as
    ``username`` (``Admin``, full-width ``ａｄｍｉｎ`` beside ``admin``): one would pass for the
    other in pages, audit reports and e-mails."""
    folded = name_fold(username)
    for existing in conn.execute(select(users.c.username)).scalars():
        if name_fold(existing) == folded:
            raise ImageShareError(f"user {username!r} exists already")


def _insert_user(conn: Connection, username: str, password: str, role: str,
                 email: str) -> None:
    """A new account; its address (given by an administrator, or bound by the invitation it
    was made with) counts as confirmed. Raises ImageShareError for a name that reads as an
    existing one's."""
    take_write_lock(conn)
    _refuse_look_alike(conn, username)
    now = datetime.now(UTC)
    email = email.strip()[:254]
    conn.execute(insert(users).values(
        username=username, password_hash=_hasher.hash(password), role=role, disabled=False,
        created_at=now, email=email, email_verified_at=now if email else None))


_NO_MAIL = ("ImageShare cannot mail the confirmation link: an administrator has not set up "
            "e-mail with links (IMAGESHARE_SMTP_HOST and IMAGESHARE_PUBLIC_URL)")
_USED = "This confirmation link was used already."


def _valid_email(email: str) -> str:
    """``email`` without surrounding spaces; raises ImageShareError when it is not valid."""
    email = email.strip()
    if email and (len(email) > 254 or not is_email_address(email)):
        raise ImageShareError("that e-mail address is not valid")
    return email


def _void_links(conn: Connection, user_pk: int, now: datetime) -> None:
    """Links mailed earlier to the account stop working (a new address or a new link)."""
    conn.execute(update(email_confirmations).where(
        email_confirmations.c.user_pk == user_pk, email_confirmations.c.used_at.is_(None),
        email_confirmations.c.voided_at.is_(None)).values(voided_at=now))


def _live_link(conn: Connection, secret: str, username: str, now: datetime) -> Any:
    """The confirmation link row for ``secret`` when ``username`` may follow it now; raises
    LinkGone or Forbidden saying why not."""
    link = conn.execute(
        select(email_confirmations, users.c.username, users.c.email.label("current"))
        .join(users, users.c.pk == email_confirmations.c.user_pk)
        .where(email_confirmations.c.token_hash == secret_hash(secret))).first()
    if link is None:
        raise LinkGone("This confirmation link is not valid: check that the whole link was "
                       "opened, or ask for a new one under \"Shared with me\".")
    if link.username != username:
        raise Forbidden("This link confirms the address of another account: sign in as the "
                        "account that asked for it, then open the link again.")
    if link.used_at is not None:
        raise LinkGone(_USED)
    if link.voided_at is not None or link.current != link.email:
        raise LinkGone("This confirmation link was replaced: the address was changed again or "
                       "a newer link was mailed. Use the newest link.")
    if as_utc(link.expires_at) <= now:
        raise LinkGone(f"This confirmation link has expired (links work for "
                       f"{CONFIRM_LINK_HOURS} hours): ask for a new one under \"Shared with "
                       "me\" or on your account page.")
    return link


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def secret_hash(secret: str) -> str:
    """What is stored of a token or session secret (high-entropy, so SHA-256 suffices)."""
    return hashlib.sha256(secret.encode()).hexdigest()
