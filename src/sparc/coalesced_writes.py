"""Coalesced writes: what a connection is sent in one turn of the event loop goes out in one send.

uvicorn writes an answer's head and its body with a transport write each, and the event loop
sends each at once: two system calls and two TCP segments for every answer, where the client (or
the proxy in front) could take it in one. `CoalescingTransport` stands between uvicorn's HTTP
protocol and the connection's transport: it keeps the writes made during a turn and sends them
joined, when the answer is complete (`flush`, from the protocol), before the connection closes,
or at the latest at the end of the turn, so a streamed answer or a `100 Continue` never waits
for anything but the code that is running now; and as soon as they reach 64 KiB, so that a
body streamed fast still fills the real transport's buffer and flow control pauses its writer.
Everything else passes straight through.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

# What the end-of-turn send runs in: no request's context (copying one for each write would
# cost more than the send).
_NO_CONTEXT = contextvars.Context()
# Held writes are sent at once when they reach this many bytes: uvicorn's high-water mark, at
# which the real transport's buffer would begin to pause the writer.
FLUSH_AT_BYTES = 65536


class CoalescingTransport(asyncio.Transport):
    """A connection's transport, with the writes of one event-loop turn sent together."""

    __slots__ = ("_flush_handle", "_loop", "_pending", "_pending_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_handle: asyncio.Handle | None = None

    # -- writing --------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport.is_closing():
            self.flush()
            self._transport.write(data)  # what the transport does with it, as without us
            return
        # A caller's bytearray or memoryview may change before the send: keep a copy.
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= FLUSH_AT_BYTES:
            # A streamed body written fast: the real transport must see it, so that its buffer
            # fills and flow control pauses the writer, as it would without us.
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(
                self._flush_at_end_of_turn, context=_NO_CONTEXT
            )

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Send what was written so far, now."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_size = 0
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)  # uvloop: one writev, nothing copied

    def _flush_at_end_of_turn(self) -> None:
        self._flush_handle = None
        self.flush()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    # -- closing: what was written goes first, unless the connection is aborted ----------------

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # -- the rest, as the real transport has it -------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
