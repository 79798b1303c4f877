"""the mail outbox, account tokens (password reset, email verification), users.email_verified_at

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_TYPES_BEFORE = (
    "'register', 'login_succeeded', 'login_failed', 'logout', 'logout_all', "
    "'session_revoked', 'password_changed', 'login_throttled'"
)
_EVENT_TYPES_AFTER = _EVENT_TYPES_BEFORE + ", 'password_reset', 'email_verified'"


def upgrade() -> None:
    # NULL: the address was never shown to belong to the account holder.
    op.execute("ALTER TABLE users ADD COLUMN email_verified_at timestamptz")
    # Mail written in a request's own transaction, so it leaves if and only if that committed.
    # A row is pending while sent_at and failed_at are both NULL; next_attempt_at is when it is
    # due, and while a worker delivers it, the end of that worker's lease. `context` holds what
    # the template needs (a token among it) and is emptied once the row is sent or failed.
    op.execute(
        """
        CREATE TABLE mail_outbox (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid REFERENCES users (id) ON DELETE CASCADE,
            kind text NOT NULL,
            recipient text NOT NULL,
            context jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            sent_at timestamptz,
            failed_at timestamptz,
            last_error text
        )
        """
    )
    # The workers' poll: only pending rows are in it, so an idle poll reads an empty index.
    op.execute(
        "CREATE INDEX mail_outbox_due_idx ON mail_outbox (next_attempt_at) "
        "WHERE sent_at IS NULL AND failed_at IS NULL"
    )
    # Per-account throttles count an account's recent mail of a kind; the cascade uses it too.
    op.execute("CREATE INDEX mail_outbox_user_kind_idx ON mail_outbox (user_id, kind, created_at)")
    op.execute("CREATE INDEX mail_outbox_created_at_idx ON mail_outbox (created_at)")
    # Single-use tokens mailed to an account; only their SHA-256 is stored.
    op.execute(
        """
        CREATE TABLE account_tokens (
            token_hash bytea PRIMARY KEY,
            user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            purpose text NOT NULL CHECK (purpose IN ('password_reset', 'verify_email')),
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX account_tokens_user_purpose_idx ON account_tokens (user_id, purpose)")
    op.execute("CREATE INDEX account_tokens_expires_at_idx ON account_tokens (expires_at)")
    op.execute("ALTER TABLE auth_events DROP CONSTRAINT auth_events_type_check")
    op.execute(
        "ALTER TABLE auth_events ADD CONSTRAINT auth_events_type_check "
        f"CHECK (type IN ({_EVENT_TYPES_AFTER}))"
    )


def downgrade() -> None:
    # Events of the new types cannot stay under the old constraint.
    op.execute("DELETE FROM auth_events WHERE type IN ('password_reset', 'email_verified')")
    op.execute("ALTER TABLE auth_events DROP CONSTRAINT auth_events_type_check")
    op.execute(
        "ALTER TABLE auth_events ADD CONSTRAINT auth_events_type_check "
        f"CHECK (type IN ({_EVENT_TYPES_BEFORE}))"
    )
    op.execute("DROP TABLE account_tokens")
    op.execute("DROP TABLE mail_outbox")
    op.execute("ALTER TABLE users DROP COLUMN email_verified_at")
