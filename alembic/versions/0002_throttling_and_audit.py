"""login throttling counters and the audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per throttled key ("account:<sha256 of the lowercased email>" or "ip:<address>"),
    # so unknown emails are throttled exactly like real ones and reveal nothing.
    op.execute(
        """
        CREATE TABLE login_throttles (
            key text PRIMARY KEY,
            failures integer NOT NULL DEFAULT 0,
            window_started_at timestamptz NOT NULL DEFAULT now(),
            lockouts integer NOT NULL DEFAULT 0,
            locked_until timestamptz
        )
        """
    )
    op.execute(
        """
        CREATE TABLE auth_events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            type text NOT NULL CHECK (type IN (
                'register', 'login_succeeded', 'login_failed', 'logout', 'logout_all',
                'session_revoked', 'password_changed', 'login_throttled'
            )),
            user_id uuid REFERENCES users (id) ON DELETE CASCADE,
            email_hash bytea,
            ip inet,
            user_agent text,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX auth_events_user_id_id_idx ON auth_events (user_id, id DESC)")


def downgrade() -> None:
    op.execute("DROP TABLE auth_events")
    op.execute("DROP TABLE login_throttles")
