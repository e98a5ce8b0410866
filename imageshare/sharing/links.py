"""Share links: what was shared, with whom, for how long, and every use of it.

A link carries a random token (256 bits; only its SHA-256 is stored) and is opened with a
passcode (argon2-hashed, shown once to the sender). Ten wrong passcodes lock the link. The
recipient sees the shared instances under the UIDs of the share (new ones when it is
de-identified); anything else does not exist for them.

An identifiable share names an existing user account (or an e-mail address, whose invitation
makes the account that receives it). Its items reach that account, with the share's rights
(view, comment, download) and nothing more, once the recipient, signed in, has given the
link's passcode: through the link and through the archive's own routes alike.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, exists, insert, literal, or_, select, update

from imageshare.access.passcodes import (
    count_try,
    forget_tries,
    hash_passcode,
    lock_when_used_up,
    passcode_matches,
)
from imageshare.access.policy import fully_signed_in
from imageshare.access.scope import COMMENT, DOWNLOAD, VIEW, Grant
from imageshare.access.sessions import LIFETIME as SESSION_LIFETIME
from imageshare.access.users import UserDirectory, as_utc, one_line, secret_hash
from imageshare.archive.ingest import IngestService
from imageshare.archive.retrieve import RetrieveService, StoredInstance
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.deid.identity import field_naming_the_patient
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier, seekable
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    Forbidden,
    ImageShareError,
    LinkGone,
    NotFound,
    PublicUrlMissing,
)
from imageshare.domain.identifiers import is_email_address
from imageshare.jobs import JobQueue
from imageshare.notify import Mailer, Notifier
from imageshare.sharing.reports import comment_document
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import (
    account_invites,
    instances,
    patients,
    share_comments,
    share_feedback,
    share_items,
    share_sessions,
    shares,
    studies,
    users,
)

log = logging.getLogger("imageshare.sharing")
# The longest comment, feedback text or sign-off note (longer ones are refused, not cut).
MAX_TEXT = 10_000
# The same comment or feedback sent again within this time is one form sent twice.
RESUBMIT_WINDOW = timedelta(minutes=10)
_SWEEP_SECONDS = 600  # how often an instance serving shares tidies its local copies
_PASSCODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


@dataclass(frozen=True)
class NewShare:
    """What a user asks to share and how."""

    study_uid: str
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    recipient_email: str = ""
    recipient_user: str = ""
    days: int = 30
    allow_download: bool = False
    allow_comment: bool = True
    deidentified: bool = True
    profile: str = "teaching"
    message: str = ""
    title: str = ""
    # What the case is (e.g. a case's description) and the sender's own reading of it: the
    # reviewer sees both.
    description: str = ""
    interpretation: str = ""
    # Further (study, series, instance) selections, e.g. the items of a case; empty UIDs
    # mean all of the study or series.
    selection: tuple[tuple[str, str, str], ...] = ()
    # Why: "care" (direct care), "teaching" or "research"; identifiable teaching and research
    # shares need the patient's consent.
    purpose: str = "care"


SHARE_PURPOSES = ("care", "teaching", "research")


@dataclass(frozen=True)
class CreatedShare:
    """A new share: the link's token and passcode are shown once, here."""

    public_id: str
    token: str
    passcode: str
    expires_at: datetime

    @property
    def path(self) -> str:
        """The link's path (no patient data in it)."""
        return f"/s/{self.token}"


@dataclass(frozen=True)
class Share:
    """A share as stored."""

    pk: int
    public_id: str
    owner: str
    title: str
    message: str
    recipient_email: str
    recipient_user: str
    allow_download: bool
    allow_comment: bool
    deidentified: bool
    profile: str
    failed_attempts: int
    locked: bool
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    reviewed_at: datetime | None
    opened_at: datetime | None
    description: str = ""
    interpretation: str = ""
    signed_off_at: datetime | None = None
    sign_off_note: str = ""

    @property
    def state(self) -> str:
        """active, expired, revoked or locked."""
        if self.revoked_at is not None:
            return "revoked"
        if self.locked:
            return "locked"
        if as_utc(self.expires_at) <= datetime.now(UTC):
            return "expired"
        return "active"

    def opens_for(self, user: Actor | None) -> bool:
        """Whether the link may be opened (and used) by a browser signed in as ``user``: a
        de-identified share by anyone with its passcode; an identifiable one only by its
        named recipient, fully signed in (a session still owing its TOTP code, or an
        administrator yet to set up a second factor, is not)."""
        if self.deidentified:
            return True
        return (user is not None and fully_signed_in(user)
                and user.name == self.recipient_user)

    def actor(self, source: str) -> Actor:
        """The party using this share's link, with the share's rights."""
        return Actor("share", self.public_id, "share-recipient", source,
                     grants=self.rights - {VIEW})

    @property
    def rights(self) -> frozenset[str]:
        """view, and comment and download when the share allows them."""
        return frozenset({VIEW} | ({COMMENT} if self.allow_comment else set())
                         | ({DOWNLOAD} if self.allow_download else set()))


@dataclass(frozen=True)
class ShareItem:
    """One shared instance, with its real and its public UIDs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    public_study_uid: str
    public_series_uid: str
    public_sop_uid: str
    held_back: bool


def _share(row: Any) -> Share:
    return from_row(Share, row)


def _named(share: Share) -> dict[str, str]:
    """What an audit event of a link's use adds about who used it: the user account an
    identifiable share names (only they, signed in, can use its link), so that the trail
    says which person saw the patient's images; nothing for a de-identified share."""
    if share.deidentified or not share.recipient_user:
        return {}
    return {"user": share.recipient_user}


class ShareService:
    """Creates, opens, scopes and revokes shares; everything audited."""

    def __init__(self, engine: Engine, retrieve: RetrieveService, audit: AuditTrail,
                 notifier: Notifier, deidentifier: Callable[[str], Deidentifier],
                 pseudonyms: Callable[[], Pseudonyms], cache_dir: Path, default_days: int,
                 max_days: int, ingest: IngestService | None = None,
                 users: UserDirectory | None = None, public_url: str = "",
                 jobs: JobQueue | None = None) -> None:
        self._ingest = ingest
        self._jobs = jobs
        self._users = users
        self.public_url = public_url.rstrip("/")
        self._engine = engine
        self._retrieve = retrieve
        self._audit = audit
        self.notifier = notifier
        self._deidentifier = deidentifier
        self._pseudonyms = pseudonyms
        self._cache = cache_dir
        self.default_days = default_days
        self.max_days = max_days
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._last_sweep = float("-inf")  # time.monotonic() of the last remove_ended_copies()
        self._sweep_guard = threading.Lock()
        # Asked before an identifiable teaching or research share: (study, purpose, actor),
        # raising when the patient has not consented (the composition root sets it).
        self.consent_check: Callable[[str, str, Actor], None] | None = None

    @property
    def mailer(self) -> Mailer:
        """The e-mail sender."""
        return self.notifier.mailer

    def link_base(self) -> str:
        """The address links in e-mails start with (IMAGESHARE_PUBLIC_URL, never a request's
        Host header); raises PublicUrlMissing while it is not set."""
        if not self.public_url:
            raise PublicUrlMissing(
                "e-mails with links cannot be sent until an administrator sets "
                "IMAGESHARE_PUBLIC_URL (the address people use to reach ImageShare); nothing "
                "was created or sent")
        return self.public_url

    # -- creating ---------------------------------------------------------------------------

    def create(self, request: NewShare, owner: Actor,
               allowed_studies: Collection[str] | None) -> CreatedShare:
        """Share the requested instances; raises ImageShareError for a bad request."""
        days = request.days or self.default_days
        if not 1 <= days <= self.max_days:
            raise ImageShareError(f"a share lasts 1 to {self.max_days} days")
        for name, text, limit in (("title", request.title, 128),
                                  ("message", request.message, 4000),
                                  ("description", request.description, MAX_TEXT),
                                  # a teaching case's findings, differential and
                                  # diagnosis together
                                  ("interpretation", request.interpretation, 4 * MAX_TEXT)):
            if len(text.strip()) > limit:
                raise ImageShareError(f"the {name} may have at most {limit:,} characters "
                                      f"(this has {len(text.strip()):,}); nothing was shared")
        email = request.recipient_email.strip()
        if email and not is_email_address(email):
            raise ImageShareError("the recipient's e-mail address is not valid")
        recipient_user = request.recipient_user.strip()
        if not request.deidentified and not (recipient_user or email):
            raise ImageShareError("identifiable shares are only for a named user account, "
                                  "who signs in to open them, or for an e-mail address "
                                  "invited to make that account")
        if recipient_user and self._users is not None:
            try:
                account = self._users.account(recipient_user)
            except NotFound as exc:
                raise ImageShareError(f"there is no user account {recipient_user!r}; share "
                                      "with an existing account, or with an e-mail address "
                                      "to invite") from exc
            if account.disabled:
                raise ImageShareError(f"the account {recipient_user!r} is disabled")
        if request.purpose not in SHARE_PURPOSES:
            raise ImageShareError(f"a share is for one of: {', '.join(SHARE_PURPOSES)}")
        if request.deidentified:
            self._deidentifier(request.profile)  # unknown profile: refused now
        elif request.purpose != "care":
            if self.consent_check is None:
                raise ImageShareError("consent cannot be checked here: share de-identified")
            for study_uid in dict.fromkeys([request.study_uid, *(
                    study for study, _series, _sop in request.selection)]):
                if study_uid:
                    self.consent_check(study_uid, request.purpose, owner)
        wanted = [(request.study_uid, request.series_uids, request.sop_uids)] + [
            (study, (series,) if series else (), (sop,) if sop else ())
            for study, series, sop in request.selection]
        found_by_sop: dict[str, StoredInstance] = {}
        for study_uid, series_uids, sop_uids in wanted:
            if not study_uid:
                continue
            for inst in self._retrieve.select(
                    owner, "share.create", study_uids=[study_uid],
                    series_uids=list(series_uids), sop_uids=list(sop_uids),
                    allowed_studies=allowed_studies):
                found_by_sop.setdefault(inst.sop_uid, inst)
        found = list(found_by_sop.values())
        if not found:
            raise NotFound("nothing to share")
        _refuse_unmatched(request, found)
        if request.deidentified:
            self._refuse_words_naming_the_patient(found, {
                "title": request.title, "message": request.message,
                "description": request.description,
                "interpretation": request.interpretation})
        token = secrets.token_urlsafe(32)
        passcode = "".join(secrets.choice(_PASSCODE_ALPHABET) for _ in range(10))
        public_id = secrets.token_hex(8)
        now = datetime.now(UTC)
        expires = now + timedelta(days=days)
        pseudonyms = self._pseudonyms() if request.deidentified else None

        def public(uid: str) -> str:
            return pseudonyms.uid(uid) if pseudonyms else uid

        with self._engine.begin() as conn:
            share_pk = conn.execute(insert(shares).values(  # type: ignore[index]  # an INSERT has a key
                public_id=public_id, token_hash=secret_hash(token), owner=owner.name,
                title=(request.title.strip() or "Shared images"), message=request.message,
                recipient_email=email[:254], recipient_user=recipient_user[:128],
                passcode_hash=hash_passcode(passcode), allow_download=request.allow_download,
                allow_comment=request.allow_comment,
                deidentified=request.deidentified,
                profile=request.profile if request.deidentified else "",
                failed_attempts=0, locked=False, created_at=now, expires_at=expires,
                description=request.description.strip(),
                interpretation=request.interpretation.strip(), purpose=request.purpose,
            )).inserted_primary_key[0]
            conn.execute(insert(share_items), [
                {"share_pk": share_pk, "study_uid": i.study_uid, "series_uid": i.series_uid,
                 "sop_uid": i.sop_uid, "public_study_uid": public(i.study_uid),
                 "public_series_uid": public(i.series_uid),
                 "public_sop_uid": public(i.sop_uid), "held_back": False}
                for i in found
            ])
            # One event per study shared (a case may gather several patients' studies):
            # each patient's access report shows that their images were shared.
            per_study: dict[tuple[str, str], int] = {}
            for inst in found:
                key = (inst.study_uid, inst.patient_id)
                per_study[key] = per_study.get(key, 0) + 1
            for (study_uid, patient_id), count in per_study.items():
                self._audit.record(AuditEvent(
                    actor=owner, action="share.create", outcome="success",
                    patient_id=patient_id, study_uid=study_uid, instance_count=count,
                    detail={"share": public_id, "deidentified": request.deidentified,
                            "download": request.allow_download,
                            "comment": request.allow_comment, "days": days,
                            "recipient": "e-mail" if email else (
                                "user" if request.recipient_user else "link"),
                            "purpose": request.purpose}, at=now), conn=conn)
        return CreatedShare(public_id, token, passcode, expires)

    def _refuse_words_naming_the_patient(self, found: Collection[StoredInstance],
                                         texts: dict[str, str]) -> None:
        """ImageShareError (naming the field, never the identifier) when a text the sender
        wrote for a de-identified share names a patient of the shared images."""
        texts = {name: text for name, text in texts.items() if text.strip()}
        if not texts:
            return
        name = field_naming_the_patient(self._retrieve.patients_headers(found), texts)
        if name:
            raise ImageShareError(
                f"the {name} names the patient (a name, an identifier or the birth date), and "
                "the share is de-identified: reword it; nothing was shared")

    def create_and_send(self, request: NewShare, owner: Actor,
                        allowed_studies: Collection[str] | None) -> CreatedShare:
        """Create the share, e-mail its link to the recipient's address, if any (and, for an
        identifiable share to an address, the invitation to make the account that is to
        receive it), and queue the making of its de-identified copies (a job of the owner's).
        With an address but no IMAGESHARE_PUBLIC_URL nothing is created. The one call every
        way of sharing uses."""
        email = request.recipient_email.strip()
        if email:
            self.link_base()
        created = self.create(request, owner, allowed_studies)
        if email:
            self.invite(created, email, self.link_base() + created.path, owner.name)
            if not request.deidentified and not request.recipient_user.strip():
                self.invite_account(self.by_public_id(created.public_id, owner.name), owner)
        if request.deidentified and self._jobs is not None:
            # The "share" job kind prepares the copies (registered by the app's housekeeping).
            self._jobs.submit(owner.name, "share", "Preparing de-identified copies",
                              {"share": created.public_id}, notify=False)
        return created

    def invite(self, created: CreatedShare, email: str, url: str, sender: str) -> None:
        """E-mail the link (never the passcode, never patient data) to the recipient."""
        self.mailer.send(
            email, "Images have been shared with you on ImageShare",
            f"{one_line(sender)} has shared medical images with you on ImageShare.\n\n"
            f"Open them here: {url}\n\n"
            "You will need the passcode, which the sender gives you separately (by phone or "
            "text message).\nThe link works until "
            f"{created.expires_at.astimezone(UTC):%d %B %Y, %H:%M} UTC, and no longer.\n\n"
            "This message contains no patient information.\n")

    def invite_account(self, share: Share, owner: Actor) -> None:
        """E-mail the share's recipient an invitation to make a reviewer account. For an
        identifiable share sent to an address, the invitation is bound to the share: the
        account made with it (and no other) becomes the share's named recipient."""
        if not share.recipient_email:
            raise ImageShareError("the share has no recipient e-mail address to invite")
        if self._users is None:
            raise ImageShareError("invitations are not available here")
        base = self.link_base()
        bound = not share.deidentified and not share.recipient_user
        secret = self._users.invite(share.recipient_email, owner.name,
                                    share_pk=share.pk if bound else None)
        self.mailer.send(
            share.recipient_email, "You are invited to an ImageShare account",
            f"{one_line(owner.name)} invites you to create an ImageShare account, to see what "
            "is shared with you.\n\nCreate it here (the link works once, for 14 days): "
            f"{base}/invite/{secret}\n\nThis message contains no patient information.\n")
        self._audit.record(AuditEvent(actor=owner, action="user.invite", outcome="success",
                                      detail={"share": share.public_id, "bound": bound}))

    def username_reserved(self, username: str) -> bool:
        """True when a share names ``username`` as its recipient: an invitation cannot make
        an account of that name (it would receive the share)."""
        with self._engine.connect() as conn:
            return conn.execute(select(shares.c.pk).where(
                shares.c.recipient_user == username.strip()).limit(1)).first() is not None

    def accept_invitation(self, secret: str, username: str, password: str,
                          source: str) -> str:
        """Make the invited account; an invitation bound to an identifiable share makes its
        account that share's recipient. Returns the account's role."""
        if self._users is None:
            raise ImageShareError("invitations are not available here")
        username = username.strip()
        if self.username_reserved(username):
            self._audit.record(AuditEvent(
                actor=Actor("anonymous", username[:64], source=source, registered=False),
                action="user.accept-invite", outcome="failure",
                detail={"reason": "a share names this user name"}))
            raise ImageShareError("that user name is not available; choose another")
        with self._engine.connect() as conn:
            share_pk = conn.execute(select(account_invites.c.share_pk).where(
                account_invites.c.token_hash == secret_hash(secret))).scalar()
        role = self._users.accept_invitation(secret, username, password)
        actor = Actor("user", username, role, source)
        self._audit.record(AuditEvent(actor=actor, action="user.accept-invite",
                                      outcome="success"))
        if share_pk is not None:
            with self._engine.begin() as conn:
                bound = conn.execute(update(shares).where(
                    shares.c.pk == share_pk, shares.c.recipient_user == "")
                    .values(recipient_user=username)).rowcount
                public_id = conn.execute(select(shares.c.public_id)
                                         .where(shares.c.pk == share_pk)).scalar()
                self._audit.record(AuditEvent(
                    actor=actor, action="share.bind", outcome="success" if bound else "failure",
                    detail={"share": public_id}), conn=conn)
        return role

    # -- opening ----------------------------------------------------------------------------

    def by_token(self, token: str) -> Share:
        """The share behind a link; NotFound for an unknown token, LinkGone when it ended."""
        if not token or len(token) > 128:
            raise NotFound("no such link")
        with self._engine.connect() as conn:
            row = conn.execute(select(shares).where(shares.c.token_hash == secret_hash(token))
                               ).mappings().first()
        if row is None:
            raise NotFound("no such link")
        share = _share(row)
        if share.state != "active":
            raise LinkGone(f"this link has been {share.state}" if share.state != "expired"
                           else "this link has expired")
        return share

    def by_public_id(self, public_id: str, owner: str) -> Share:
        """One of ``owner``'s shares; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(shares).where(shares.c.public_id == public_id,
                                                    shares.c.owner == owner)).mappings().first()
        if row is None:
            raise NotFound("no such share")
        return _share(row)

    def check_passcode(self, share: Share, passcode: str, source: str) -> bool:
        """True for the right passcode; wrong ones count, and the tenth locks the link. Each
        try is counted before the passcode is checked (and uncounted when right), so that
        tries sent at the same moment cannot get past the ten between them; a locked link
        refuses even the right passcode."""
        actor = share.actor(source)
        with self._engine.begin() as conn:
            tries = count_try(conn, shares, share.pk)
        if tries is None:  # locked meanwhile (or by the tries in flight)
            self._audit.record(AuditEvent(
                actor=actor, action="share.passcode", outcome="failure",
                detail={"share": share.public_id, "locked": True}))
            return False
        if not passcode_matches(self._passcode_hash(share.pk), passcode):
            with self._engine.begin() as conn:
                locked = lock_when_used_up(conn, shares, share.pk, tries)
                self._audit.record(AuditEvent(
                    actor=actor, action="share.passcode", outcome="failure",
                    detail={"share": share.public_id, "failures": tries,
                            "locked": locked}), conn=conn)
            if locked:
                self.notifier.notify(share.owner, "share.locked",
                                     "A share link was locked after ten wrong passcodes",
                                     f"/shares/{share.public_id}")
            return False
        with self._engine.begin() as conn:
            if not forget_tries(conn, shares, share.pk):
                return False
            if not share.deidentified:
                # The named recipient (the caller checked the signed-in account) gave the
                # passcode: from now on the share's items reach their account.
                conn.execute(update(shares).where(shares.c.pk == share.pk,
                                                  shares.c.opened_at.is_(None))
                             .values(opened_at=datetime.now(UTC)))
        self._audit.record(AuditEvent(actor=actor, action="share.open", outcome="success",
                                      detail={"share": share.public_id, **_named(share)}))
        return True

    def _passcode_hash(self, share_pk: int) -> str:
        with self._engine.connect() as conn:
            return conn.execute(select(shares.c.passcode_hash).where(shares.c.pk == share_pk)
                                ).scalar_one()

    def start_session(self, share: Share) -> tuple[str, str]:
        """A browser session for an opened link: (cookie secret, CSRF token)."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            conn.execute(insert(share_sessions).values(
                share_pk=share.pk, token_hash=secret_hash(secret), csrf_token=csrf,
                created_at=datetime.now(UTC)))
        return secret, csrf

    def session(self, share: Share, secret: str) -> str | None:
        """The CSRF token of the live link session with this cookie secret, or None. A link
        session lasts :data:`~imageshare.access.sessions.LIFETIME` (as a staff session): a
        browser left with the case open asks for the passcode again after that."""
        if not secret:
            return None
        with self._engine.connect() as conn:
            return conn.execute(select(share_sessions.c.csrf_token).where(
                share_sessions.c.share_pk == share.pk,
                share_sessions.c.token_hash == secret_hash(secret),
                share_sessions.c.created_at > datetime.now(UTC) - SESSION_LIFETIME)).scalar()

    # -- what the recipient sees -------------------------------------------------------------

    def items(self, share: Share) -> list[ShareItem]:
        """Every shared instance (held-back ones included, marked)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(share_items).where(share_items.c.share_pk == share.pk)
                                .order_by(share_items.c.pk)).mappings().all()
        return [from_row(ShareItem, r) for r in rows]

    def item(self, share: Share, public_study: str, public_series: str | None,
             public_sop: str | None) -> list[ShareItem]:
        """The shared instances under these public UIDs; NotFound for anything not shared."""
        found = [i for i in self.items(share) if i.public_study_uid == public_study
                 and (public_series is None or i.public_series_uid == public_series)
                 and (public_sop is None or i.public_sop_uid == public_sop)
                 and not i.held_back]
        if not found:
            raise NotFound("no such study, series or instance")
        return found

    def stored(self, share: Share, item: ShareItem) -> StoredInstance:
        """The archive's record of a shared instance (not audited: callers audit the use)."""
        return self._retrieve.select(share.actor("internal"), "share.resolve",
                                     sop_uids=[item.sop_uid], audit=False)[0]

    def content(self, share: Share, item: ShareItem) -> Path | None:
        """A local file with what the recipient may see of ``item``: the de-identified copy
        or the stored instance (its own file in a local store, else a local copy). None when
        the instance was held back by de-identification.

        Copies are kept under ``share-cache/<share>/<public SOP UID>/`` named by the blob key
        (and digest) they were made from: a corrected instance has a new key, so its old
        copy is never served, on any instance, and is removed when the new one is made.
        Copies appear whole (written under a temporary name, then renamed)."""
        self._sweep_now_and_then()
        inst = self.stored(share, item)
        folder = self._item_folder(share, item)
        if not share.deidentified:
            path = self._retrieve.local_file(inst, folder)
            if path.parent == folder:
                _forget_other_copies(folder, keep=path)
            return path
        target = folder / inst.copy_name
        with self._lock_for(str(target)):
            if target.exists():
                return target
            folder.mkdir(parents=True, exist_ok=True)
            # A file of this writer's own (another process may make the same copy at the
            # same moment; the one renamed last wins, both whole), de-identified and checked
            # by the verifier before the copy can be served.
            fd, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=".part")
            partial = Path(name)
            try:
                with self._retrieve.open(inst) as fp, seekable(fp) as source, \
                        open(fd, "w+b") as out:
                    outcome = self._deidentifier(share.profile).write(source, out)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            if outcome.held_back:
                partial.unlink(missing_ok=True)
                _forget_other_copies(folder, keep=None)
                with self._engine.begin() as conn:
                    conn.execute(update(share_items).where(
                        share_items.c.share_pk == share.pk,
                        share_items.c.public_sop_uid == item.public_sop_uid).values(
                        held_back=True))
                return None
            partial.replace(target)
            _forget_other_copies(folder, keep=target)
            return target

    def _item_folder(self, share: Share, item: ShareItem) -> Path:
        """Where this instance keeps its local copies of one shared item."""
        return self._cache / share.public_id / item.public_sop_uid

    def remove_copies(self, public_id: str) -> None:
        """Remove this instance's local copies of a share's items (all of them)."""
        if public_id and "/" not in public_id and public_id not in (".", ".."):
            shutil.rmtree(self._cache / public_id, ignore_errors=True)

    def remove_ended_copies(self) -> int:
        """Remove this instance's local copies that may no longer be served: every copy of a
        share that was revoked, expired, locked or deleted, of an item no longer in its share,
        and of an instance's bytes since replaced (a correction); returns how many shares'
        copies went. Safe to run at any time on every instance (each has its own
        ``share-cache``)."""
        self._last_sweep = time.monotonic()
        if not self._cache.is_dir():
            return 0
        try:
            folders = {p.name: p for p in self._cache.iterdir()}
        except FileNotFoundError:
            return 0
        if not folders:
            return 0
        names = list(folders)
        rows: dict[str, Share] = {}
        current: dict[tuple[int, str], str] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(names), 500):
                rows.update((r.public_id, _share(r)) for r in conn.execute(
                    select(shares).where(shares.c.public_id.in_(names[start:start + 500]))
                ).mappings())
            live_pks = [s.pk for s in rows.values() if s.state == "active"]
            for start in range(0, len(live_pks), 500):
                for row in conn.execute(
                        select(share_items.c.share_pk, share_items.c.public_sop_uid,
                               instances.c.blob_key, instances.c.sha256)
                        .join(instances, instances.c.sop_uid == share_items.c.sop_uid,
                              isouter=True)
                        .where(share_items.c.share_pk.in_(live_pks[start:start + 500]))):
                    current[(row.share_pk, row.public_sop_uid)] = _copy_name(
                        row.blob_key, row.sha256)
        removed = 0
        for name, folder in folders.items():
            share = rows.get(name)
            if share is None or share.state != "active" or not folder.is_dir():
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                removed += 1
                continue
            try:
                entries = list(folder.iterdir())
            except (FileNotFoundError, NotADirectoryError):  # revoked meanwhile
                continue
            for entry in entries:
                wanted = current.get((share.pk, entry.name))
                if not entry.is_dir() or not wanted:
                    # an item no longer shared, or a copy in the layout before copies were
                    # named by their blob key
                    _remove(entry)
                    continue
                _forget_other_copies(entry, keep=entry / wanted, stale_after=3600,
                                     young=_SWEEP_SECONDS / 10)
        return removed

    def _sweep_now_and_then(self) -> None:
        """Every instance that serves shares tidies its own copies now and then (the
        periodic job runs on one instance only)."""
        if time.monotonic() - self._last_sweep < _SWEEP_SECONDS:
            return
        if not self._sweep_guard.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._last_sweep >= _SWEEP_SECONDS:
                self.remove_ended_copies()
        except Exception:  # noqa: BLE001 - tidying must not fail what is being served
            self._last_sweep = time.monotonic()
            log.warning("could not tidy the share copies in %s", self._cache, exc_info=True)
        finally:
            self._sweep_guard.release()

    def prepare(self, share: Share) -> int:
        """Make every de-identified copy now (after creation); returns how many were held
        back."""
        held = 0
        for item in self.items(share):
            if self.content(share, item) is None:
                held += 1
        return held

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def record(self, share: Share, actor: Actor, action: str, item: ShareItem | None = None,
               count: int = 1, **detail: Any) -> None:
        """Audit a use of the share (the owner sees these as the share's accesses). A use of
        one item names its study; a use of the whole share (the case viewed, downloaded,
        commented on, reviewed, signed off) names every study it holds, one event each at
        the same moment (a patient's access report finds them by study; :meth:`accesses`
        lists the use once), the instance count of each being that study's share of
        ``count`` when there are several."""
        if item is not None:
            targets = [(item.study_uid, count)]
        else:
            per_study: dict[str, int] = {}
            for shared in self.items(share):
                if not shared.held_back:
                    per_study[shared.study_uid] = per_study.get(shared.study_uid, 0) + 1
            targets = ([(study, count if len(per_study) == 1 else n)
                        for study, n in per_study.items()] or [("", count)])
        at = datetime.now(UTC)
        for study_uid, instance_count in targets:
            self._audit.record(AuditEvent(
                actor=actor, action=action, outcome="success", study_uid=study_uid,
                instance_count=instance_count,
                detail={"share": share.public_id, **_named(share), **detail},
                at=at))

    # -- recipient's words ------------------------------------------------------------------

    def comment(self, share: Share, actor: Actor, body: str, public_sop_uid: str = "") -> None:
        """A recipient's comment on the case or on one shared image or clip (one the
        recipient can see: not one held back by de-identification). The same words on the
        same image again within :data:`RESUBMIT_WINDOW` are a form sent twice: kept once."""
        body = body.strip()
        if not body or len(body) > MAX_TEXT:
            raise ImageShareError("a comment has 1 to 10,000 characters")
        self._clip(share, public_sop_uid)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            kept = conn.execute(insert(share_comments).from_select(
                ["share_pk", "public_sop_uid", "author", "body", "created_at"],
                select(*(literal(v, share_comments.c[k].type) for k, v in (
                    ("share_pk", share.pk), ("public_sop_uid", public_sop_uid),
                    ("author", share.recipient_email or "reviewer"), ("body", body),
                    ("created_at", now))))
                .where(~exists().where(
                    share_comments.c.share_pk == share.pk,
                    share_comments.c.public_sop_uid == public_sop_uid,
                    share_comments.c.body == body,
                    share_comments.c.created_at > now - RESUBMIT_WINDOW)))).rowcount
        if not kept:
            return
        self.record(share, actor, "share.comment", image=bool(public_sop_uid))
        self._store_as_sr(share, actor, body, public_sop_uid)
        self.notifier.notify(share.owner, "share.comment",
                             "A reviewer commented on images you shared",
                             f"/shares/{share.public_id}")

    def _store_as_sr(self, share: Share, actor: Actor, body: str, public_sop_uid: str) -> None:
        """Keep the comment as a Structured Report in the real study (PACS and viewers see
        it); a failure is audited and does not lose the comment, which is already kept."""
        if self._ingest is None:
            return
        items = self.items(share)
        item = next((i for i in items if i.public_sop_uid == public_sop_uid), items[0])
        try:
            source = self._retrieve.header(item.sop_uid)
            if source is None:
                return
            document = comment_document(source, body, share.recipient_email or "reviewer",
                                        bool(public_sop_uid))
            self._ingest.store_stream(io.BytesIO(document), actor,
                                      expected_study=item.study_uid)
        except Exception as exc:  # noqa: BLE001 - recorded; the comment itself is kept
            self._audit.record(AuditEvent(actor=actor, action="share.comment.sr",
                                          outcome="failure", study_uid=item.study_uid,
                                          detail={"share": share.public_id,
                                                  "error": type(exc).__name__}))

    def give_feedback(self, share: Share, actor: Actor, view_obtained: str,
                      image_quality: str | int, findings: str, agreement: str,
                      comments: str, public_sop_uid: str = "") -> None:
        """Structured review (point-of-care ultrasound accreditation) of the case, or of one
        clip (``public_sop_uid``): every choice must be made (nothing is preset), or nothing
        is kept. A signed-off case takes no more feedback (the logbook's record is final)."""
        if share.signed_off_at is not None:
            raise ImageShareError("this case was signed off: it takes no more feedback")
        if view_obtained not in ("yes", "partly", "no"):
            raise ImageShareError("say whether the view was obtained: yes, partly or no")
        try:
            quality = int(image_quality)
        except (TypeError, ValueError):
            quality = 0
        if not 1 <= quality <= 5:
            raise ImageShareError("grade the image quality from 1 to 5")
        if agreement not in ("agree", "disagree", "unsure"):
            raise ImageShareError("say whether you agree with the sender's interpretation: "
                                  "agree, disagree or unsure")
        findings, comments = findings.strip(), comments.strip()
        for name, text in (("findings", findings), ("comments", comments)):
            if len(text) > MAX_TEXT:
                raise ImageShareError(f"the {name} may have at most 10,000 characters (this "
                                      f"has {len(text):,}); nothing was kept")
        item = self._clip(share, public_sop_uid)
        now = datetime.now(UTC)
        values = {"share_pk": share.pk, "reviewer": share.recipient_email or "reviewer",
                  "view_obtained": view_obtained, "image_quality": quality,
                  "findings": findings, "agreement": agreement, "comments": comments,
                  "public_sop_uid": public_sop_uid}
        with self._engine.begin() as conn:
            # The same feedback again within RESUBMIT_WINDOW is the form sent twice.
            kept = conn.execute(insert(share_feedback).from_select(
                [*values, "created_at"],
                select(*(literal(v, share_feedback.c[k].type) for k, v in values.items()),
                       literal(now, share_feedback.c.created_at.type))
                .where(~exists().where(
                    *(share_feedback.c[k] == v for k, v in values.items()),
                    share_feedback.c.created_at > now - RESUBMIT_WINDOW),
                    # a sign-off made since this share was read is final all the same
                    ~exists().where(shares.c.pk == share.pk,
                                    shares.c.signed_off_at.is_not(None))))).rowcount
            if not kept:
                if conn.execute(select(shares.c.signed_off_at).where(
                        shares.c.pk == share.pk)).scalar() is not None:
                    raise ImageShareError(
                        "this case was signed off: it takes no more feedback")
                return
            conn.execute(update(shares).where(shares.c.pk == share.pk).values(reviewed_at=now))
        self.record(share, actor, "share.feedback", item, clip=bool(public_sop_uid))
        self.notifier.notify(share.owner, "share.feedback",
                             "A reviewer gave feedback on a case you shared",
                             f"/shares/{share.public_id}")

    def _clip(self, share: Share, public_sop_uid: str) -> ShareItem | None:
        """The shared item a comment or feedback is on (None: the whole case); NotFound for
        an image that is not in the share."""
        if not public_sop_uid:
            return None
        item = next((i for i in self.items(share) if i.public_sop_uid == public_sop_uid
                     and not i.held_back), None)
        if item is None:
            raise NotFound("no such image in this share")
        return item

    def sign_off(self, share: Share, actor: Actor, note: str) -> None:
        """The mentor's final sign-off of the case (once; after feedback was given)."""
        note = note.strip()
        if len(note) > MAX_TEXT:
            raise ImageShareError(f"a sign-off note may have at most 10,000 characters (this "
                                  f"has {len(note):,}); the case was not signed off")
        if share.signed_off_at is not None:
            raise ImageShareError("this case was signed off already")
        if not self.feedback(share):
            raise ImageShareError("give feedback on the case before signing it off")
        with self._engine.begin() as conn:
            # Only the first of two sign-offs sent together counts (the second is refused,
            # the first one's note kept).
            signed = conn.execute(update(shares).where(
                shares.c.pk == share.pk, shares.c.signed_off_at.is_(None)).values(
                signed_off_at=datetime.now(UTC), sign_off_note=note)).rowcount
        if not signed:
            raise ImageShareError("this case was signed off already")
        self.record(share, actor, "share.signoff")
        self.notifier.notify(share.owner, "share.signoff",
                             "A mentor signed off a case you shared",
                             f"/shares/{share.public_id}")

    def clip_names(self, share: Share) -> ClipNames:
        """A name for each shared image, clip or other object, by its public SOP Instance UID
        ("Series 1, image 2"; "Series 2, report"), for the owner and the reviewer alike (no
        patient data); with what the share holds counted by kind (:class:`ClipNames`): a
        report or key images note is named as such, never counted as an image."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(share_items.c.public_series_uid, share_items.c.public_sop_uid,
                       share_items.c.held_back, instances.c.sop_class_uid, instances.c.rows)
                .select_from(share_items.outerjoin(
                    instances, instances.c.sop_uid == share_items.c.sop_uid))
                .where(share_items.c.share_pk == share.pk)
                .order_by(share_items.c.pk)).all()
        names = ClipNames()
        series_order: dict[str, int] = {}
        counts: dict[tuple[str, str], int] = {}
        alone: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.public_series_uid, _kind(row.sop_class_uid, row.rows))
            alone[key] = alone.get(key, 0) + 1
        for series_uid, sop_uid, held_back, sop_class, image_rows in rows:
            kind = _kind(sop_class, image_rows)
            names.kinds[kind] = names.kinds.get(kind, 0) + 1
            if held_back:
                continue
            number = series_order.setdefault(series_uid, len(series_order) + 1)
            counts[(series_uid, kind)] = counts.get((series_uid, kind), 0) + 1
            names[sop_uid] = (f"Series {number}, {kind}" if kind != "image"
                              and alone[(series_uid, kind)] == 1
                              else f"Series {number}, {kind} {counts[(series_uid, kind)]}")
        return names

    def comments(self, share: Share) -> list[dict[str, Any]]:
        """Comments on the share, oldest first."""
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(share_comments).where(share_comments.c.share_pk == share.pk)
                .order_by(share_comments.c.pk)).mappings()]

    def feedback(self, share: Share) -> list[dict[str, Any]]:
        """Feedback given on the share, oldest first."""
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                select(share_feedback).where(share_feedback.c.share_pk == share.pk)
                .order_by(share_feedback.c.pk)).mappings()]

    # -- owner ------------------------------------------------------------------------------

    def owned(self, owner: str) -> list[Share]:
        """The owner's shares, newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(shares).where(shares.c.owner == owner)
                                .order_by(shares.c.pk.desc())).mappings().all()
        return [_share(r) for r in rows]

    def end_patients_shares(self, conn: Connection, study_uids: list[str],
                            actor: Actor) -> int:
        """End, in ``conn``'s transaction, the live shares patients made of ``study_uids``
        (the studies were filed under another patient: they are no longer the sharer's to
        show); each is audited as revoked with the reason. Returns how many."""
        now = datetime.now(UTC)
        ended = list(conn.execute(
            select(shares.c.pk, shares.c.public_id).where(
                shares.c.revoked_at.is_(None), shares.c.expires_at > now,
                shares.c.owner.in_(select(users.c.username).where(users.c.role == "patient")),
                shares.c.pk.in_(select(share_items.c.share_pk).where(
                    share_items.c.study_uid.in_(study_uids))))).tuples())
        for pk, public_id in ended:
            conn.execute(update(shares).where(shares.c.pk == pk).values(revoked_at=now))
            self._audit.record(AuditEvent(
                actor=actor, action="share.revoke", outcome="success",
                detail={"share": public_id,
                        "reason": "the study was filed under another patient"}), conn=conn)
        for _pk, public_id in ended:
            self.remove_copies(public_id)
        return len(ended)

    def patient_studies(self, patient_id: str, issuer: str) -> list[str]:
        """The study UIDs of one patient record."""
        with self._engine.connect() as conn:
            return list(conn.execute(
                select(studies.c.study_uid).join(patients, patients.c.pk == studies.c.patient_pk)
                .where(patients.c.patient_id == patient_id, patients.c.issuer == issuer)
            ).scalars())

    def end_shares_of(self, study_uids: list[str], reason: str, actor: Actor) -> int:
        """End every live share holding any of ``study_uids`` (de-identified teaching copies
        whose patient withdrew teaching consent); each is audited as revoked with
        ``reason``. Returns how many."""
        if not study_uids:
            return 0
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            ended = list(conn.execute(
                select(shares.c.pk, shares.c.public_id).where(
                    shares.c.revoked_at.is_(None), shares.c.expires_at > now,
                    shares.c.pk.in_(select(share_items.c.share_pk).where(
                        share_items.c.study_uid.in_(study_uids))))).tuples())
            for pk, public_id in ended:
                conn.execute(update(shares).where(shares.c.pk == pk).values(revoked_at=now))
                self._audit.record(AuditEvent(
                    actor=actor, action="share.revoke", outcome="success",
                    detail={"share": public_id, "reason": reason}), conn=conn)
        for _pk, public_id in ended:
            self.remove_copies(public_id)
        return len(ended)

    def end_for_withdrawn_consent(self, patient_id: str, issuer: str, purpose: str,
                                  actor: Actor) -> int:
        """End the patient's live identifiable shares made for ``purpose`` (the patient
        withdrew or refused that consent); each is audited as revoked with the reason.
        Returns how many."""
        now = datetime.now(UTC)
        of_patient = (select(studies.c.study_uid)
                      .join(patients, patients.c.pk == studies.c.patient_pk)
                      .where(patients.c.patient_id == patient_id, patients.c.issuer == issuer))
        with self._engine.begin() as conn:
            ended = list(conn.execute(
                select(shares.c.pk, shares.c.public_id).where(
                    shares.c.purpose == purpose, ~shares.c.deidentified,
                    shares.c.revoked_at.is_(None), shares.c.expires_at > now,
                    shares.c.pk.in_(select(share_items.c.share_pk).where(
                        share_items.c.study_uid.in_(of_patient.scalar_subquery())))))
                .tuples())
            for pk, public_id in ended:
                conn.execute(update(shares).where(shares.c.pk == pk).values(revoked_at=now))
                self._audit.record(AuditEvent(
                    actor=actor, action="share.revoke", outcome="success",
                    patient_id=patient_id,
                    detail={"share": public_id,
                            "reason": f"the patient's consent to {purpose} was withdrawn"}),
                    conn=conn)
        for _pk, public_id in ended:
            self.remove_copies(public_id)
        return len(ended)

    def revoke(self, public_id: str, owner: Actor) -> None:
        """End a share for good."""
        share = self.by_public_id(public_id, owner.name)
        if share.revoked_at is not None:
            self.remove_copies(share.public_id)
            return
        with self._engine.begin() as conn:
            conn.execute(update(shares).where(shares.c.pk == share.pk)
                         .values(revoked_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=owner, action="share.revoke",
                                          outcome="success",
                                          detail={"share": public_id}), conn=conn)
        self.remove_copies(share.public_id)

    def accesses(self, share: Share, limit: int = 200) -> list[dict[str, Any]]:
        """Every use of the link, newest first: once each (a use of a share of several
        studies is recorded once per study, at the same moment)."""
        seen: set[tuple[str, str, str, str]] = set()
        uses = []
        for event in self._audit.events(limit=limit, detail=("share", share.public_id)):
            if event["detail"].get("share") != share.public_id:
                continue
            use = (str(event.get("actor") or ""), str(event.get("source") or ""),
                   str(event["action"]), str(event["at"]))
            if use not in seen:
                seen.add(use)
                uses.append(event)
        return uses

    def visits(self, share: Share, limit: int = 5000,
               gap: timedelta = timedelta(minutes=30)) -> list[dict[str, Any]]:
        """Uses of the link grouped per visit (the same party from the same address, with no
        pause longer than ``gap``), newest first: who, from where, when it began and ended,
        and how many images were viewed, downloads, comments, feedback and marks."""
        events = sorted(self.accesses(share, limit), key=lambda e: e["at"])
        open_visits: dict[tuple[str, str], dict[str, Any]] = {}
        done: list[dict[str, Any]] = []
        counted = {"share.view": "views", "share.render": "images", "share.download":
                   "downloads", "share.comment": "comments", "share.feedback": "feedback",
                   "share.annotate": "marks", "share.signoff": "signoffs",
                   "share.passcode": "wrong_passcodes", "share.open": "opens"}
        for event in events:
            who = (str(event.get("actor") or ""), str(event.get("source") or ""))
            at = as_utc(event["at"]) if isinstance(event["at"], datetime) else event["at"]
            visit = open_visits.get(who)
            if visit is None or not isinstance(at, datetime) or at - visit["last"] > gap:
                visit = {"who": "the link's recipient" if event.get("actor_kind") == "share"
                         else (who[0] or "someone"),
                         "source": who[1], "first": at, "last": at,
                         **{name: 0 for name in counted.values()}, "other": []}
                open_visits[who] = visit
                done.append(visit)
            visit["last"] = at
            name = counted.get(event["action"])
            if name is not None:
                visit[name] += 1
            elif event["action"] not in visit["other"]:
                visit["other"].append(event["action"])
        for visit in done:
            visit["summary"] = _visit_summary(visit)
        return list(reversed(done))

    def grants_for(self, actor: Actor) -> tuple[Grant, ...]:
        """The items of live identifiable shares naming this user account that they opened
        with the passcode, each with its share's rights (the policy lets the user reach
        exactly these, and nothing else)."""
        if actor.kind != "user":
            return ()
        now = datetime.now(UTC)
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(share_items.c.study_uid, share_items.c.series_uid, share_items.c.sop_uid,
                       shares.c.allow_comment, shares.c.allow_download)
                .join(shares, shares.c.pk == share_items.c.share_pk)
                .where(shares.c.recipient_user == actor.name, shares.c.deidentified.is_(False),
                       shares.c.opened_at.is_not(None), share_items.c.held_back.is_(False),
                       shares.c.revoked_at.is_(None), shares.c.locked.is_(False),
                       shares.c.expires_at > now)).all()
        rights: dict[tuple[str, str, str], set[str]] = {}
        for row in rows:
            found = rights.setdefault((row.study_uid, row.series_uid, row.sop_uid), {VIEW})
            if row.allow_comment:
                found.add(COMMENT)
            if row.allow_download:
                found.add(DOWNLOAD)
        return tuple(Grant(study, series, sop, frozenset(r))
                     for (study, series, sop), r in rights.items())

    def received(self, username: str) -> list[Share]:
        """Live shares naming this user, or sent to their e-mail address once it is confirmed
        (set by an administrator, bound by an invitation, or proven through the link mailed
        to it: an address an account typed for itself is not yet its own), newest first."""
        confirmed = (select(users.c.email).where(
            users.c.username == username, users.c.email != "",
            users.c.email_verified_at.is_not(None)).scalar_subquery())
        with self._engine.connect() as conn:
            rows = conn.execute(select(shares).where(or_(
                shares.c.recipient_user == username, shares.c.recipient_email == confirmed))
                .order_by(shares.c.pk.desc())).mappings().all()
        return [s for s in (_share(r) for r in rows) if s.state == "active"]

    def notify_expiring(self, within: timedelta = timedelta(days=3)) -> int:
        """Tell owners about shares ending soon (once each); returns how many. Also removes
        this instance's local copies of shares that ended (:meth:`remove_ended_copies`)."""
        try:
            self.remove_ended_copies()
        except OSError:  # tidying must not stop the notices
            log.warning("could not tidy the share copies in %s", self._cache, exc_info=True)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            rows = conn.execute(select(shares.c.pk, shares.c.owner, shares.c.public_id).where(
                shares.c.revoked_at.is_(None), shares.c.expiry_notified.is_(False),
                shares.c.expires_at <= now + within, shares.c.expires_at > now)).all()
            for row in rows:
                conn.execute(update(shares).where(shares.c.pk == row.pk)
                             .values(expiry_notified=True))
        for row in rows:
            self.notifier.notify(row.owner, "share.expiring", "A share link expires soon",
                                 f"/shares/{row.public_id}")
        return len(rows)


# What an instance that is not an image is, in a clinician's words, by its SOP Class UID
# (DICOM PS3.4 Annex B): the first prefix that matches names it.
_NOT_IMAGES = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "key images note"),  # Key Object Selection Document
    ("1.2.840.10008.5.1.4.1.1.88.", "report"),  # Structured Reports
    ("1.2.840.10008.5.1.4.1.1.11.", "saved view"),  # Presentation States
    ("1.2.840.10008.5.1.4.1.1.104.", "document"),  # Encapsulated PDF, CDA
)


def _kind(sop_class_uid: str | None, rows: int | None) -> str:
    """"image" for an instance with pixels (or one no longer in the index), else what it
    is: "report", "key images note", "saved view", "document" or "other object"."""
    for prefix, name in _NOT_IMAGES:
        if sop_class_uid and (sop_class_uid == prefix or sop_class_uid.startswith(prefix)
                              and prefix.endswith(".")):
            return name
    return "other object" if sop_class_uid and rows is None else "image"


class ClipNames(dict[str, str]):
    """A share's names of its objects by public SOP Instance UID, and ``kinds``: how many of
    each kind the share holds ("image", "report", ...; held-back ones included)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, int] = {}

    @property
    def images(self) -> int:
        """How many images (stills, loops or videos) the share holds."""
        return self.kinds.get("image", 0)

    @property
    def summary(self) -> str:
        """What the share holds, in words: "1 image, 1 report and 1 key images note"."""
        order = ("image", "report", "key images note", "saved view", "document",
                 "other object")
        parts = [f"{n} {kind if n == 1 else kind + 's'}" for kind in order
                 if (n := self.kinds.get(kind, 0)) or kind == "image"]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _copy_name(blob_key: str | None, sha256: str | None) -> str:
    """The name of a local copy made from this blob (as :attr:`StoredInstance.copy_name`);
    empty when the instance is gone."""
    if not blob_key:
        return ""
    return StoredInstance("", "", "", blob_key, 0, 1, "", "", "", sha256).copy_name


def _forget_other_copies(folder: Path, keep: Path | None, stale_after: float = 0,
                         young: float = 0) -> None:
    """Remove the copies in an item's folder other than ``keep`` (made from bytes since
    replaced). Another writer's unfinished file is left alone unless older than
    ``stale_after`` seconds (a writer that died); with ``young``, so is any copy made less
    than that many seconds ago (the sweep's view of the index may be older than it)."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    now = time.time()
    for entry in entries:
        if keep is not None and entry.name == keep.name:
            continue
        unfinished = entry.name.endswith(".part")
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if (unfinished and (not stale_after or age < stale_after)) or age < young:
            continue
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _visit_summary(visit: dict[str, Any]) -> str:
    """What happened in one visit, in words."""
    words = [
        ("opens", "opened with the passcode", False), ("views", "viewed the case", False),
        ("images", "{} image(s) shown", True), ("downloads", "{} download(s)", True),
        ("comments", "{} comment(s)", True), ("feedback", "{} feedback", True),
        ("marks", "saved marks", False), ("signoffs", "signed off", False),
        ("wrong_passcodes", "{} wrong passcode(s)", True)]
    done = [text.format(visit[key]) if counted else text
            for key, text, counted in words if visit[key]]
    done += [str(action) for action in visit["other"]]
    return ", ".join(done)


def require_owner(share: Share, actor: Actor) -> None:
    """Raise Forbidden unless ``actor`` owns ``share``."""
    if actor.kind != "user" or share.owner != actor.name:
        raise Forbidden("this is not your share")


def _refuse_unmatched(request: NewShare, found: Collection[StoredInstance]) -> None:
    """ImageShareError when a series or instance the sender named is not among what the share
    would hold (not in the study, or not theirs to share): the sender would believe it shared
    what it did not, so nothing is shared. The reason counts them (no UIDs echoed)."""
    series_found = {i.series_uid for i in found}
    sops_found = {i.sop_uid for i in found}
    series_missing = set(request.series_uids) - series_found
    sops_missing = set(request.sop_uids) - sops_found
    if series_missing or sops_missing:
        parts = ([f"{len(series_missing)} of the series"] if series_missing else []) + (
            [f"{len(sops_missing)} of the images"] if sops_missing else [])
        verb = "is" if len(series_missing) + len(sops_missing) == 1 else "are"
        raise ImageShareError(f"{' and '.join(parts)} asked for {verb} not in this study (or "
                              "not yours to share); nothing was shared")
