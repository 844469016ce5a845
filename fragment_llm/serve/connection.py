"""The HTTP/1.1 connection, below the app: deadlines and refusals uvicorn lacks.

uvicorn (with h11) waits for a request's headers for as long as a client cares to send
them, one byte at a time ("slowloris"): a few hundred such connections hold every
connection the server allows (`limit_concurrency`), and nobody else gets in. Its
keep-alive timer does not help: any byte that arrives cancels it. This protocol adds:

- a deadline for the headers (`HEADER_TIMEOUT_S` from the connection's start or from
  the end of the previous response), after which the client gets a 408 and the
  connection is closed;
- the end of a connection whose response was sent before its body was read (a 413,
  a 408, a 401 before the body): otherwise a client could keep sending a body that is
  read and thrown away, forever. Not at once: the rest of the body is read and dropped
  for up to `LINGER_S` or `LINGER_BYTES` ("lingering close"), because closing a socket
  with unread bytes sends a reset, and a reset can destroy the response before the
  client has read it. A body that does end within those limits leaves a kept-alive
  connection open for the client's next request, as before;
- requests that are not HTTP refused in OpenAI's error shape, with the security
  headers every other response carries, rather than uvicorn's plain text.

The body has its own deadline, in the app (serve/body.py), where a 408 can be sent.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fragment_llm.serve import guard
from fragment_llm.serve.errors import ApiError

HEADER_TIMEOUT_S = 10.0
LINGER_S = 2.0
LINGER_BYTES = 16 << 20


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a lingering close, and refusals in
    OpenAI's shape (see the module docstring)."""

    header_timeout_s = HEADER_TIMEOUT_S  # a class attribute, so a test can shorten it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        # uvicorn closes the transport itself after answering a request that said
        # `Connection: close` (urllib's always do); through this wrapper, that lingers too.
        self._socket = transport
        self.transport = _LingeringClose(transport, self)  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_bytes = 0  # while lingering: what may still be read and dropped
        self._close_after_linger = False
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            self._drain(data)
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request line and headers
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._socket.is_closing() or self._linger_timer is not None:
            return
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before its body was read: the rest is read and dropped.
            self._linger(close_after=False)
        elif self.conn.their_state is h11.IDLE:
            self._await_headers()  # the next request on this connection

    def close_when_drained(self) -> None:
        """Close now, or, while the request's body is still arriving, once the rest of
        it has been read and dropped (within `LINGER_S` and `LINGER_BYTES`)."""
        if self._linger_timer is not None:
            self._close_after_linger = True
        elif self._socket.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            self._socket.close()
        else:
            self._linger(close_after=True)

    def _linger(self, close_after: bool) -> None:
        self._close_after_linger = close_after
        self._linger_bytes = LINGER_BYTES
        self._linger_timer = self.loop.call_later(LINGER_S, self._socket.close)
        self.flow.resume_reading()  # uvicorn pauses reading a body that nobody reads

    def _drain(self, data: bytes) -> None:
        """Drop the unread body; at its end, close or go on to the next request."""
        self._linger_bytes -= len(data)
        if self._linger_bytes < 0:
            self._socket.close()
            return
        self.conn.receive_data(data)
        try:
            while (event := self.conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.EndOfMessage):
                    break
            else:
                return  # more of the body to come
        except h11.RemoteProtocolError:
            self._socket.close()
            return
        self._linger_timer.cancel()  # type: ignore[union-attr]
        self._linger_timer = None
        if self._close_after_linger or self.conn.our_state is not h11.DONE:
            self._socket.close()
            return
        self.conn.start_next_cycle()
        self._await_headers()
        self.handle_events()  # a next request that came with the body's end

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not an HTTP/1.1 request (uvicorn logged why, not what)."""
        body = json.dumps(ApiError(400, "the request is not valid HTTP/1.1").body()).encode()
        self._send_and_close(400, body)

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        error = ApiError(408, f"the request's headers did not arrive within "
                              f"{self.header_timeout_s:g} s", code="request_timeout")
        # Written past h11, which sends no response before a request: the connection
        # ends here anyway.
        body = json.dumps(error.body()).encode()
        head = [b"HTTP/1.1 408 Request Timeout", *_header_lines(len(body))]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()

    def _send_and_close(self, status: int, body: bytes) -> None:
        response = h11.Response(status_code=status, headers=_headers(len(body)))
        self.transport.write(self.conn.send(response))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


class _LingeringClose:
    """A transport whose `close()` is the protocol's `close_when_drained()`."""

    def __init__(self, transport: asyncio.BaseTransport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_when_drained()


def _headers(length: int) -> list[tuple[bytes, bytes]]:
    """The headers of a response sent from here: JSON, closing, and the security ones."""
    pairs = {"content-type": "application/json", "content-length": str(length),
             "connection": "close", **guard.COMMON_HEADERS,
             "content-security-policy": guard.API_POLICY}
    return [(name.encode(), value.encode()) for name, value in pairs.items()]


def _header_lines(length: int) -> list[bytes]:
    return [name + b": " + value for name, value in _headers(length)]
