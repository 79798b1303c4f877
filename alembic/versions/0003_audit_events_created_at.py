"""an index on auth_events.created_at, for the retention purge

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The purge deletes events past SPARC_AUDIT_RETENTION in batches: each batch finds its rows
    # through this index instead of scanning a year of events, including the last, empty one.
    op.execute("CREATE INDEX auth_events_created_at_idx ON auth_events (created_at)")


def downgrade() -> None:
    op.execute("DROP INDEX auth_events_created_at_idx")
