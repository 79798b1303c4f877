"""admin roles, disabled accounts, last login, and who did what in the audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_TYPES_BEFORE = (
    "register",
    "login_succeeded",
    "login_failed",
    "logout",
    "logout_all",
    "session_revoked",
    "password_changed",
    "login_throttled",
    "password_reset",
    "email_verified",
)
# Written down here, not imported from sparc.audit: a migration must not change with the code.
_EVENT_TYPES_AFTER = (
    *_EVENT_TYPES_BEFORE,
    "login_refused_disabled",
    "account_erased",
    "admin_user_created",
    "admin_user_disabled",
    "admin_user_enabled",
    "admin_sessions_revoked",
    "admin_user_promoted",
    "admin_user_demoted",
    "admin_user_erased",
)


def _type_check(types: Sequence[str]) -> str:
    listed = ", ".join(f"'{name}'" for name in types)
    return (
        f"ALTER TABLE auth_events ADD CONSTRAINT auth_events_type_check CHECK (type IN ({listed}))"
    )


def upgrade() -> None:
    op.execute("ALTER TABLE users ADD COLUMN is_admin boolean NOT NULL DEFAULT false")
    # Disabled while disabled_at is set and disabled_until is unset or still ahead.
    op.execute("ALTER TABLE users ADD COLUMN disabled_at timestamptz")
    op.execute("ALTER TABLE users ADD COLUMN disabled_until timestamptz")
    op.execute("ALTER TABLE users ADD COLUMN last_login_at timestamptz")
    # The admin who acted (NULL: the account's own action, or the CLI's); `via` says whether it
    # came over HTTP or from `sparc users` on the host.
    op.execute(
        "ALTER TABLE auth_events ADD COLUMN actor_id uuid REFERENCES users (id) ON DELETE SET NULL"
    )
    op.execute(
        "ALTER TABLE auth_events ADD COLUMN via text NOT NULL DEFAULT 'http'"
        " CHECK (via IN ('http', 'cli'))"
    )
    # An erasure finds the events of the account, those it did as an admin, and those naming its
    # email's digest through these, not by reading a year of events.
    op.execute("CREATE INDEX auth_events_actor_id_idx ON auth_events (actor_id)")
    op.execute(
        "CREATE INDEX auth_events_email_hash_idx ON auth_events (email_hash)"
        " WHERE email_hash IS NOT NULL"
    )
    op.execute("ALTER TABLE auth_events DROP CONSTRAINT auth_events_type_check")
    op.execute(_type_check(_EVENT_TYPES_AFTER))


def downgrade() -> None:
    # Events of the new types cannot be kept under the old constraint.
    listed = ", ".join(f"'{name}'" for name in _EVENT_TYPES_BEFORE)
    op.execute(f"DELETE FROM auth_events WHERE type NOT IN ({listed})")
    op.execute("ALTER TABLE auth_events DROP CONSTRAINT auth_events_type_check")
    op.execute(_type_check(_EVENT_TYPES_BEFORE))
    op.execute("DROP INDEX auth_events_email_hash_idx")
    op.execute("DROP INDEX auth_events_actor_id_idx")
    op.execute("ALTER TABLE auth_events DROP COLUMN via")
    op.execute("ALTER TABLE auth_events DROP COLUMN actor_id")
    for column in ("last_login_at", "disabled_until", "disabled_at", "is_admin"):
        op.execute(f"ALTER TABLE users DROP COLUMN {column}")
