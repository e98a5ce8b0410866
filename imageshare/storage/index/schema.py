"""Tables of the index. Every change here comes with an Alembic migration."""


from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

patients = Table(
    "patients",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default=""),
    Column("name", String(324), nullable=False, default=""),
    Column("name_norm", String(324), nullable=False, default=""),
    Column("birth_date", String(8), nullable=False, default=""),
    Column("sex", String(16), nullable=False, default=""),
    Column("attrs", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "issuer"),
    # On PostgreSQL the pattern operator class lets a name prefix (LIKE 'CAM%') use the index
    # under any collation; equality still does.
    Index(None, "name_norm", postgresql_ops={"name_norm": "varchar_pattern_ops"}),
    Index(None, "birth_date"),
)

patient_identifiers = Table(
    "patient_identifiers",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_pk", ForeignKey("patients.pk", ondelete="CASCADE"), nullable=False),
    Column("value", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default=""),
    Column("kind", String(16), nullable=False, default=""),
    UniqueConstraint("patient_pk", "value", "issuer"),
    Index(None, "value"),
)

studies = Table(
    "studies",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("patient_pk", ForeignKey("patients.pk"), nullable=False, index=True),
    Column("study_date", String(8), nullable=False, default=""),
    Column("study_time", String(16), nullable=False, default=""),
    Column("accession_number", String(16), nullable=False, default=""),
    Column("study_id", String(16), nullable=False, default=""),
    Column("description", String(64), nullable=False, default=""),
    Column("description_norm", String(64), nullable=False, default=""),
    Column("referring_name", String(324), nullable=False, default=""),
    Column("referring_norm", String(324), nullable=False, default=""),
    Column("modalities", String(128), nullable=False, default=""),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("attrs", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "study_date"),
    Index(None, "accession_number"),
    Index(None, "updated_at"),
)

series = Table(
    "series",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("series_uid", String(64), nullable=False, unique=True),
    Column("study_pk", ForeignKey("studies.pk"), nullable=False, index=True),
    Column("modality", String(16), nullable=False, default=""),
    Column("series_number", Integer, nullable=True),
    Column("description", String(64), nullable=False, default=""),
    Column("body_part", String(16), nullable=False, default=""),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("attrs", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "modality"),
)

instances = Table(
    "instances",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("series_pk", ForeignKey("series.pk"), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("transfer_syntax", String(64), nullable=False),
    Column("number_of_frames", Integer, nullable=False, default=1),
    Column("rows", Integer, nullable=True),
    Column("columns", Integer, nullable=True),
    Column("bits_allocated", Integer, nullable=True),
    Column("blob_key", String(64), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    # SHA-256 (hex) of the blob, recorded at ingest; NULL for instances stored before 0013.
    Column("sha256", String(64), nullable=True),
    Column("retention_class", String(32), nullable=False, default="clinical"),
    Column("received_from", String(128), nullable=False, default=""),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # When the retention class's own period began (an upload's quality review); NULL: not yet.
    Column("class_since", DateTime(timezone=True), nullable=True),
    Index(None, "sop_class_uid"),
)

users = Table(
    "users",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False),
    Column("role", String(32), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0, server_default="0"),
    Column("locked_until", DateTime(timezone=True), nullable=True),
    # Encrypted at rest (storage/secret_box.py), hence longer than the secret itself.
    Column("totp_secret", String(512), nullable=True),
    Column("totp_enabled", Boolean, nullable=False, default=False, server_default=false()),
    Column("totp_last_step", BigInteger, nullable=True),
    Column("email", String(254), nullable=False, default="", server_default=""),
    # When ``email`` was confirmed: set by an administrator, bound by an accepted invitation
    # or proven through a link mailed to it. NULL while an address the account set for itself
    # is unconfirmed: only a confirmed address receives what is addressed to it.
    Column("email_verified_at", DateTime(timezone=True), nullable=True),
    # A ``site`` account's connected site (the AE title of its node): the only site it may
    # speak for in site-to-site messages; "" for every other account and an unlinked one.
    Column("site_node", String(16), nullable=False, default="", server_default=""),
    # The password is a temporary one an administrator gave: the account may do nothing but
    # choose its own (cleared when it has).
    Column("must_change_password", Boolean, nullable=False, default=False,
           server_default=false()),
)

# Failed sign-ins per account and source address: a lockout holds only for the address that
# failed, so nobody elsewhere can lock an account out by guessing.
login_failures = Table(
    "login_failures",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", ForeignKey("users.pk", ondelete="CASCADE"), nullable=False),
    Column("source", String(255), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("locked_until", DateTime(timezone=True), nullable=True),
    Column("last_failure_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("user_pk", "source"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user_pk", ForeignKey("users.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("source", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("stage", String(16), nullable=False, default="full", server_default="full"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", ForeignKey("users.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    # "cli" for tokens made on the server's command line, "web" for the web app and API.
    Column("origin", String(8), nullable=False, default="web", server_default="web"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ae_title", String(16), nullable=False, unique=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("dicomweb_url", String(1024), nullable=False, default=""),
    Column("display_name", String(128), nullable=False, default=""),
    Column("may_query", Boolean, nullable=False, default=True),
    Column("may_retrieve", Boolean, nullable=False, default=True),
    Column("may_store", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # What we may do with the site (its own permissions towards us are the may_* columns).
    Column("searchable", Boolean, nullable=False, default=True, server_default=true()),
    Column("retrieve_from", Boolean, nullable=False, default=True, server_default=true()),
    Column("send_to", Boolean, nullable=False, default=True, server_default=true()),
    # DICOMweb credentials: "user:password" for HTTP Basic or "Bearer TOKEN", encrypted at
    # rest (storage/secret_box.py).
    Column("dicomweb_auth", String(2048), nullable=False, default="", server_default=""),
    # Studies this site sends us land in the inbox for review.
    Column("inbox", Boolean, nullable=False, default=False, server_default=false()),
    # We reach the site's DICOM AE over TLS (BCP 195).
    Column("tls", Boolean, nullable=False, default=False, server_default=false()),
    # SHA-256 of the certificate (DER) the node presents over DICOM TLS, lowercase hex;
    # empty: any certificate the trusted authorities signed.
    Column("tls_certificate", String(64), nullable=False, default="", server_default=""),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("actor", String(128), nullable=False),
    Column("actor_kind", String(16), nullable=False),
    Column("source", String(255), nullable=False, default=""),
    Column("action", String(64), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default="", index=True),
    Column("detail", Text, nullable=False, default=""),
    Column("instance_count", Integer, nullable=False, default=0),
    # Tamper evidence (imageshare/audit/chain.py): place in the chain and the SHA-256 links.
    Column("seq", BigInteger, nullable=True, index=True, unique=True),
    Column("prev_hash", String(64), nullable=True),
    Column("row_hash", String(64), nullable=True),
)

# The newest link of the audit chain (one row, id 1); writers lock it to extend the chain.
audit_chain_head = Table(
    "audit_chain_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# How far the audit trail was sent to the ATNA audit repository (one row, id 1), and which
# process holds the lease to send (one sender at a time, also with several instances).
atna_cursor = Table(
    "atna_cursor",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sent_seq", BigInteger, nullable=False),
    Column("owner", String(64), nullable=False, default=""),
    Column("lease_until", DateTime(timezone=True), nullable=True),
)

study_comments = Table(
    "study_comments",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_uid", String(64), nullable=False, default="", server_default=""),
    Column("author", String(128), nullable=False),
    Column("author_kind", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per changed attribute of a retrospective correction or merge (``change_id`` groups
# them). Plain UIDs, no foreign keys: the history outlives what it describes.
patient_changes = Table(
    "patient_changes",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("change_id", String(32), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("attribute", String(64), nullable=False),
    Column("old_value", String(324), nullable=False),
    Column("new_value", String(324), nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)

# Share links: the token and passcode are kept only as hashes.
shares = Table(
    "shares",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("owner", String(128), nullable=False, index=True),
    Column("title", String(128), nullable=False),
    Column("message", Text, nullable=False),
    Column("recipient_email", String(254), nullable=False),
    Column("recipient_user", String(128), nullable=False),
    Column("passcode_hash", String(256), nullable=False),
    Column("allow_download", Boolean, nullable=False),
    Column("deidentified", Boolean, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("failed_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("locked", Boolean, nullable=False, default=False, server_default=false()),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("reviewed_at", DateTime(timezone=True), nullable=True),
    Column("expiry_notified", Boolean, nullable=False, default=False, server_default=false()),
    Column("allow_comment", Boolean, nullable=False, default=True, server_default=true()),
    # When the named recipient of an identifiable share, signed in, first gave the passcode:
    # only then do the share's items reach their account.
    Column("opened_at", DateTime(timezone=True), nullable=True),
    # What the sender wrote about the case and their own reading of it (the reviewer sees
    # both), and the mentor's final sign-off (accreditation logbooks).
    Column("description", Text, nullable=False, default="", server_default=""),
    Column("interpretation", Text, nullable=False, default="", server_default=""),
    Column("signed_off_at", DateTime(timezone=True), nullable=True),
    Column("sign_off_note", Text, nullable=False, default="", server_default=""),
    # What an identifiable share is for (care, teaching, research): one for teaching or
    # research ends when the patient withdraws (or refuses) that consent.
    Column("purpose", String(16), nullable=False, default="care", server_default="care"),
)

# One row per shared instance, with the UIDs the recipient sees (new ones when de-identified).
share_items = Table(
    "share_items",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("share_pk", ForeignKey("shares.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("public_study_uid", String(64), nullable=False),
    Column("public_series_uid", String(64), nullable=False),
    Column("public_sop_uid", String(64), nullable=False),
    Column("held_back", Boolean, nullable=False, default=False, server_default=false()),
    UniqueConstraint("share_pk", "public_sop_uid"),
)

share_sessions = Table(
    "share_sessions",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("share_pk", ForeignKey("shares.pk", ondelete="CASCADE"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

share_comments = Table(
    "share_comments",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("share_pk", ForeignKey("shares.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("public_sop_uid", String(64), nullable=False),
    Column("author", String(128), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

share_feedback = Table(
    "share_feedback",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("share_pk", ForeignKey("shares.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("reviewer", String(128), nullable=False),
    Column("view_obtained", String(16), nullable=False),
    Column("image_quality", Integer, nullable=False),
    Column("findings", Text, nullable=False),
    Column("agreement", String(16), nullable=False),
    Column("comments", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The clip (the share's public SOP Instance UID) the feedback is on; empty: the case.
    Column("public_sop_uid", String(64), nullable=False, default="", server_default=""),
)

notifications = Table(
    "notifications",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("username", String(128), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("text", String(512), nullable=False),
    Column("link", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("read_at", DateTime(timezone=True), nullable=True),
)

# A user's own grouping of studies, series and images, filed in folders ("my archive").
cases = Table(
    "cases",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("owner", String(128), nullable=False, index=True),
    Column("title", String(128), nullable=False),
    Column("description", Text, nullable=False),
    Column("folder", String(128), nullable=False, default="", server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # "case" (a user's group of studies) or "teaching" (a de-identified teaching case).
    Column("kind", String(16), nullable=False, default="case", server_default="case"),
    Column("history", Text, nullable=False, default="", server_default=""),
    Column("findings", Text, nullable=False, default="", server_default=""),
    Column("diagnosis", Text, nullable=False, default="", server_default=""),
    Column("differential", Text, nullable=False, default="", server_default=""),
    Column("keywords", Text, nullable=False, default="", server_default=""),
    Column("modality", String(16), nullable=False, default="", server_default=""),
    Column("body_part", String(64), nullable=False, default="", server_default=""),
    Column("difficulty", String(16), nullable=False, default="", server_default=""),
    Column("collection", String(128), nullable=False, default="", server_default=""),
)

# Non-DICOM material of a case (PDF, photos, video, office documents), kept as it came, with
# the type sniffed from its content.
case_attachments = Table(
    "case_attachments",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("case_pk", ForeignKey("cases.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("title", String(128), nullable=False),
    Column("media_type", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("blob_key", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

case_items = Table(
    "case_items",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("case_pk", ForeignKey("cases.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False, default="", server_default=""),
    Column("sop_uid", String(64), nullable=False, default="", server_default=""),
    UniqueConstraint("case_pk", "study_uid", "series_uid", "sop_uid"),
)

# Arrows and length measurements drawn on an image (also stored as a DICOM presentation state).
annotations = Table(
    "annotations",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_uid", String(64), nullable=False),
    Column("frame", Integer, nullable=False),
    # Who: a username, or ``share:<public id>`` for a share link's recipient.
    Column("author", String(128), nullable=False),
    # How the author is shown to staff (a username or the recipient's e-mail address).
    Column("author_label", String(128), nullable=False, default="", server_default=""),
    Column("marks", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("sop_uid", "frame", "author"),
)

# One-time invitations for external reviewers to create their own account.
account_invites = Table(
    "account_invites",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("email", String(254), nullable=False),
    Column("role", String(32), nullable=False),
    Column("invited_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    # The identifiable share the new account is to receive (bound to this invitation).
    Column("share_pk", ForeignKey("shares.pk", ondelete="CASCADE"), nullable=True),
    # The account made with this invitation (set when it is used, in the same transaction).
    Column("accepted_by", String(128), nullable=False, default="", server_default=""),
)

# One-time links that confirm an address an account set for itself (only the hash of the
# secret is kept). A link works once, until it expires, and only while it is the account's
# newest for its current address (a new address or a new link voids it).
email_confirmations = Table(
    "email_confirmations",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("user_pk", ForeignKey("users.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("email", String(254), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Column("voided_at", DateTime(timezone=True), nullable=True),
)

# Studies received from other sites, waiting for staff to reconcile and accept (or reject).
inbox_items = Table(
    "inbox_items",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("site", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("instances", Integer, nullable=False, default=0, server_default="0"),
    Column("first_received", DateTime(timezone=True), nullable=False),
    Column("last_received", DateTime(timezone=True), nullable=False),
    Column("decided_by", String(128), nullable=False, default="", server_default=""),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    Column("note", Text, nullable=False, default="", server_default=""),
    # What travelled with the study from another ImageShare (its transfer announcement): the
    # sending site's AE title and name, priority, note and contact, and the transfer (and
    # request) it answers; the receipt sent back when it was decided.
    Column("origin", String(16), nullable=False, default="", server_default=""),
    Column("sender_name", String(128), nullable=False, default="", server_default=""),
    Column("priority", String(16), nullable=False, default="routine",
           server_default="routine"),
    Column("message", Text, nullable=False, default="", server_default=""),
    Column("contact", String(256), nullable=False, default="", server_default=""),
    Column("transfer_id", String(32), nullable=False, default="", server_default=""),
    Column("request_id", String(32), nullable=False, default="", server_default=""),
    Column("announced_at", DateTime(timezone=True), nullable=True),
    Column("receipt_state", String(16), nullable=False, default="", server_default=""),
    Column("receipt_detail", String(512), nullable=False, default="", server_default=""),
    UniqueConstraint("study_uid", "site"),
)

# Studies sent to other sites, with their delivery receipts.
transfers = Table(
    "transfers",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("study_uid", String(64), nullable=False),
    Column("site", String(16), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("note", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("sent", Integer, nullable=False, default=0, server_default="0"),
    Column("total", Integer, nullable=False, default=0, server_default="0"),
    Column("failed", Integer, nullable=False, default=0, server_default="0"),
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("reason", Text, nullable=False, default="", server_default=""),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Who to call about it, the request it answers, whether the receiving ImageShare took
    # its announcement, and the receipt it sent back (accepted or rejected, by whom, when).
    Column("contact", String(256), nullable=False, default="", server_default=""),
    Column("request_id", String(32), nullable=False, default="", server_default=""),
    Column("announced", String(16), nullable=False, default="", server_default=""),
    Column("receipt_outcome", String(16), nullable=False, default="", server_default=""),
    Column("receipt_by", String(128), nullable=False, default="", server_default=""),
    Column("receipt_at", DateTime(timezone=True), nullable=True),
    Column("receipt_note", Text, nullable=False, default="", server_default=""),
)

# The latest answer of each connected site about a patient (keyed "nhs:...", "id:...").
site_checks = Table(
    "site_checks",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_key", String(128), nullable=False),
    Column("site", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", String(256), nullable=False),
    Column("found", Integer, nullable=False),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    # What the site answered with (JSON list of studies, each with how it links to the
    # patient), for the live status per site on the study page.
    Column("studies", Text, nullable=False, default="[]", server_default="[]"),
    UniqueConstraint("patient_key", "site"),
)

# Temporary copies retrieved from other sites: where from, by whom, and until when kept.
retrieved_copies = Table(
    "retrieved_copies",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("site", String(16), nullable=False),
    Column("job_id", String(64), nullable=False, default="", server_default=""),
    Column("retrieved_by", String(128), nullable=False, default="", server_default=""),
    Column("retrieved_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("instances", Integer, nullable=False, default=0, server_default="0"),
)

# Requests for a patient's prior imaging: sent to other sites, or received from them.
imaging_requests = Table(
    "imaging_requests",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("direction", String(16), nullable=False),
    Column("site", String(64), nullable=False),
    Column("nhs_number", String(16), nullable=False),
    Column("hospital_number", String(64), nullable=False),
    Column("patient_name", String(324), nullable=False),
    Column("birth_date", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("priority", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The other site's id of the request (each side files it under its own id), and who
    # answered it when.
    Column("remote_id", String(32), nullable=False, default="", server_default=""),
    Column("answered_by", String(128), nullable=False, default="", server_default=""),
    Column("answered_at", DateTime(timezone=True), nullable=True),
)

# DICOM callers refused by the listener (unregistered AE title, wrong host, service not
# granted), one row per AE title and host, for an administrator to review and register.
refused_callers = Table(
    "refused_callers",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ae_title", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("service", String(16), nullable=False),
    Column("reason", String(128), nullable=False),
    Column("count", Integer, nullable=False, default=0, server_default="0"),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    UniqueConstraint("ae_title", "host"),
)

# Instances a transfer has delivered: retries and resumed transfers skip them.
transfer_deliveries = Table(
    "transfer_deliveries",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("transfer_pk", ForeignKey("transfers.pk", ondelete="CASCADE"), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("transfer_pk", "sop_uid"),
)

# Background work shared by every instance: one row per job, leased by the instance running
# it (lease_owner until lease_expires); a job whose lease ran out is taken again by another.
background_jobs = Table(
    "background_jobs",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("description", String(256), nullable=False),
    Column("params", JSON, nullable=False),
    Column("sealed_params", Text, nullable=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("run_after", DateTime(timezone=True), nullable=False),
    Column("done", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("summary", String(512), nullable=False),
    Column("error", String(512), nullable=False),
    Column("result", String(64), nullable=True),
    Column("started_by", String(128), nullable=False),
    Column("notify", Boolean, nullable=False),
    Column("dedupe_key", String(128), nullable=True, unique=True),
    Column("lease_owner", String(96), nullable=True),
    Column("lease_expires", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_background_jobs_state_run_after", "state", "run_after"),
)

# Failed sign-ins per source address (the throttle across accounts), shared by instances.
sign_in_failures = Table(
    "sign_in_failures",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("source", String(255), nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False),
    Index("ix_sign_in_failures_source_failed_at", "source", "failed_at"),
)

# Generation counters of what instances remember in memory (e.g. "parents": studies and series
# the index writer knows): a change bumps the counter, every instance forgets on seeing it.
cache_generations = Table(
    "cache_generations",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("generation", BigInteger, nullable=False),
)

# Electronic health records allowed to launch ImageShare with signed URLs (IHE IID): the
# shared secret is sealed with the installation key (storage/secret_box.py).
ehr_systems = Table(
    "ehr_systems",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("secret", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Nonces of signed launch URLs already used (each URL opens once); kept until they expire.
launch_nonces = Table(
    "launch_nonces",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("ehr", String(64), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    UniqueConstraint("ehr", "nonce"),
)

# Forms already handled: a key drawn for each rendering of a form that creates something (a
# share link, a teaching case), so that the same form sent twice (a double click, a resend
# after a dropped answer) creates it once; the second sending finds ``result``. A day long.
form_submissions = Table(
    "form_submissions",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("actor", String(128), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("form_key", String(64), nullable=False),
    Column("result", String(128), nullable=False, default="", server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    UniqueConstraint("actor", "kind", "form_key"),
)

# Uploads (issue 13): an invitation to upload for one person (or a staff import batch), with
# the patient's identity as the hospital knows it; only hashes of its token and passcode.
upload_invitations = Table(
    "upload_invitations",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # invitation | staff
    Column("token_hash", String(128), nullable=True, unique=True),
    Column("passcode_hash", String(256), nullable=False, default="", server_default=""),
    Column("created_by", String(128), nullable=False),
    Column("email", String(254), nullable=False, default="", server_default=""),
    Column("patient_name", String(324), nullable=False),
    Column("birth_date", String(8), nullable=False, default="", server_default=""),
    Column("nhs_number", String(16), nullable=False, default="", server_default=""),
    Column("hospital_number", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default="", server_default=""),
    Column("reference", String(256), nullable=False, default="", server_default=""),
    Column("expected_modality", String(16), nullable=False, default="", server_default=""),
    Column("expected_body_part", String(64), nullable=False, default="", server_default=""),
    Column("max_bytes", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # open | submitted | closed
    Column("message", Text, nullable=False, default="", server_default=""),
    Column("failed_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("locked", Boolean, nullable=False, default=False, server_default=false()),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("opened_at", DateTime(timezone=True), nullable=True),
    Column("submitted_at", DateTime(timezone=True), nullable=True),
)

# Browser sessions of people who opened an upload invitation with its passcode (one live
# session per invitation: opening it again ends the previous one).
upload_sessions = Table(
    "upload_sessions",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("invitation_pk", ForeignKey("upload_invitations.pk", ondelete="CASCADE"),
           nullable=False),
    Column("token_hash", String(128), nullable=False, unique=True),
    Column("csrf_token", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
)

# Files received for an invitation (tus uploads): progress, then what became of them.
upload_files = Table(
    "upload_files",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("invitation_pk", ForeignKey("upload_invitations.pk", ondelete="CASCADE"),
           nullable=False),
    Column("upload_id", String(64), nullable=False, unique=True),
    Column("round", Integer, nullable=False, default=1, server_default="1"),
    Column("path", String(1024), nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("offset", BigInteger, nullable=False, default=0, server_default="0"),
    Column("status", String(16), nullable=False),  # receiving | received | done | removed
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    # A DICOM file stored for review on arrival: its instance and the store's outcome
    # (stored, held, duplicate, ...); "" when it waits for the intake at Send.
    Column("sop_uid", String(64), nullable=False, default="", server_default=""),
    Column("outcome", String(16), nullable=False, default="", server_default=""),
    # What it showed (Send reports it from these, not reading it again); "" when unknown.
    Column("study_uid", String(64), nullable=False, default="", server_default=""),
    Column("identity", String(16), nullable=False, default="", server_default=""),
    Column("modality", String(16), nullable=False, default="", server_default=""),
    Column("body_part", String(64), nullable=False, default="", server_default=""),
    # A file announced again is found by its path; the size limit's sums read the index only.
    Index(None, "invitation_pk", "path"),
    Index(None, "invitation_pk", "status", "length", "round"),
    Index(None, "sop_uid"),  # which upload made an instance
)

# What each received file (or each file inside a received folder or zip) became.
upload_results = Table(
    "upload_results",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("invitation_pk", ForeignKey("upload_invitations.pk", ondelete="CASCADE"),
           nullable=False),
    Column("round", Integer, nullable=False),
    Column("label", String(1024), nullable=False),
    Column("kind", String(16), nullable=False),  # dicom | photo | video | pdf | refused
    Column("outcome", String(16), nullable=False),  # stored | held | duplicate | refused
    Column("detail", Text, nullable=False, default="", server_default=""),
    Column("identity", String(16), nullable=False, default="", server_default=""),
    Column("study_uid", String(64), nullable=False, default="", server_default=""),
    Column("sop_uid", String(64), nullable=False, default="", server_default=""),
    Column("modality", String(16), nullable=False, default="", server_default=""),
    Column("body_part", String(64), nullable=False, default="", server_default=""),
    Column("original_key", String(64), nullable=False, default="", server_default=""),
    Column("original_sha256", String(64), nullable=False, default="", server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "sop_uid"),  # which upload made an instance
)

# Patient accounts (role ``patient``) and the record they are the patient of; the account is
# bound when the person invited at ``email`` first signs in.
patient_accounts = Table(
    "patient_accounts",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("email", String(254), nullable=False),
    Column("username", String(128), nullable=False, default="", server_default=""),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default="", server_default=""),
    Column("invited_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The one-time account invitation sent for this record: the account made with it (its
    # ``accepted_by``), and no other, is bound to the record. Never matched by e-mail.
    Column("invite_pk", ForeignKey("account_invites.pk", ondelete="SET NULL"), nullable=True,
           index=True),
    Index("ix_patient_accounts_username", "username"),
)

# Retention policy: instances arriving from a source (AE title or account), of a modality, or
# made for a collection or case type get this retention class instead of ``clinical``.
retention_rules = Table(
    "retention_rules",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("value", String(128), nullable=False),
    Column("retention_class", String(32), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("kind", "value"),
)

# Legal holds on a patient (study_uid empty) or one study (patient_id empty): while one is in
# force (lifted_at NULL) nothing it covers is deleted, whatever its retention class.
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("issuer", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(128), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
    Column("lifted_by", String(128), nullable=False, default="", server_default=""),
    Column("lifted_at", DateTime(timezone=True), nullable=True),
    Column("lift_reason", Text, nullable=False, default="", server_default=""),
)

# Blobs the index let go of (a deleted instance, the old content of a corrected or replaced
# one), written in the transaction that let go of them and removed once the blob is gone:
# start-up recovery never indexes them again (a crash between the commit and the removal would
# bring deleted images back), and removes them for good. ``kept``: the old content of a study
# under a legal hold, kept as evidence until no hold covers ``study_uid``.
blob_tombstones = Table(
    "blob_tombstones",
    metadata,
    Column("blob_key", String(64), primary_key=True),
    Column("deleted_at", DateTime(timezone=True), nullable=False),
    Column("study_uid", String(64), nullable=False, default="", server_default="",
           index=True),
    Column("kept", Boolean, nullable=False, default=False, server_default=false()),
)

# Deletion of a study asked for by one administrator and approved (or refused) by another.
deletion_requests = Table(
    "deletion_requests",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("patient_id", String(64), nullable=False),
    # The Issuer of Patient ID of ``patient_id`` when it was asked for ("" when none).
    Column("patient_issuer", String(64), nullable=False, default="", server_default=""),
    Column("reason", Text, nullable=False),
    # pending, deleted, refused, cancelled
    Column("state", String(16), nullable=False),
    Column("requested_by", String(128), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("decided_by", String(128), nullable=False, default="", server_default=""),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    Column("note", Text, nullable=False, default="", server_default=""),
    Column("deleted", Integer, nullable=False, default=0, server_default="0"),
)

# Consent decisions per patient and purpose (teaching, research, publication); the newest row
# of a patient and purpose is in force, older ones are the history.
consents = Table(
    "consents",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
    Column("issuer", String(64), nullable=False),
    Column("purpose", String(16), nullable=False),
    # granted, refused, withdrawn
    Column("decision", String(16), nullable=False),
    # The day the patient decided (YYYY-MM-DD).
    Column("given_on", String(10), nullable=False),
    # form, verbal, electronic, other
    Column("source", String(16), nullable=False),
    Column("note", Text, nullable=False),
    Column("recorded_by", String(128), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# Instances a study deletion two administrators agreed on took away (IHE IOCM: rejected
# objects): a modality or workstation that sends one of them again is refused, so a
# wrong-patient image does not come back by a retry. An administrator can let a study's
# instances in again (``imageshare deletion allow-again``), which removes its rows.
rejected_instances = Table(
    "rejected_instances",
    metadata,
    Column("sop_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    # The deletion request that took it away (its public id).
    Column("request", String(32), nullable=False, default="", server_default=""),
    Column("rejected_at", DateTime(timezone=True), nullable=False),
)
