"""The unit of work's named states and the moves between them that are legal."""

from __future__ import annotations

import enum


class Transaction(enum.Enum):
    """Where the unit's transaction stands; the legal moves are in TRANSACTION_MOVES."""

    NONE = "none"  # no transaction open: the next transactional statement BEGINs one
    OPEN = "open"  # BEGIN answered; statements run inside the transaction
    # BEGIN or COMMIT was cancelled midway, so whether a transaction is open is unknown: no
    # statement may run (it could land in autocommit) and nothing may commit; the clean-up's
    # ROLLBACK closes whatever is open and leaves the connection usable.
    INTERRUPTED = "interrupted"
    BROKEN = "broken"  # the connection failed or was cut: nothing more runs; it is discarded


class Lifecycle(enum.Enum):
    """Where the unit itself stands: ACTIVE, then ENDED, possibly then ABANDONED."""

    ACTIVE = "active"  # statements of its request run in it
    ENDED = "ended"  # end() was called: later statements run outside it
    # end() gave up waiting for a statement still running in a child task: the connection was
    # cut, and that task returns it on its way out.
    ABANDONED = "abandoned"


_NONE, _OPEN = Transaction.NONE, Transaction.OPEN
_INTERRUPTED, _BROKEN = Transaction.INTERRUPTED, Transaction.BROKEN
_ACTIVE, _ENDED, _ABANDONED = Lifecycle.ACTIVE, Lifecycle.ENDED, Lifecycle.ABANDONED

TRANSACTION_MOVES: dict[Transaction, frozenset[Transaction]] = {
    _NONE: frozenset({_OPEN, _INTERRUPTED, _BROKEN}),
    # COMMIT answered (whatever it said) or ROLLBACK done; COMMIT cancelled; connection lost.
    _OPEN: frozenset({_NONE, _INTERRUPTED, _BROKEN}),
    _INTERRUPTED: frozenset({_NONE, _BROKEN}),
    _BROKEN: frozenset(),
}
LIFECYCLE_MOVES: dict[Lifecycle, frozenset[Lifecycle]] = {
    _ACTIVE: frozenset({_ENDED}),
    _ENDED: frozenset({_ABANDONED}),
    _ABANDONED: frozenset(),
}
