"""Refusals as the OpenAI API shapes them: an HTTP status and
`{"error": {"message", "type", "param", "code"}}`.

Every way a request can fail ends as an `ApiError` (or is turned into one by the app's
handlers), so a client always gets this shape, never a traceback. `message` follows the
project's rule for errors: one line, naming the field and the rule it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fragment_llm.safety.text import escape_for_display

# OpenAI's `type` for each status the server sends.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    503: "server_error", 504: "server_error",
}
MAX_MESSAGE_CHARS = 500


@dataclass
class ApiError(Exception):
    """A refusal: `status` and the OpenAI error fields; `headers` for e.g. Retry-After."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, dict[str, str | None]]:
        # Messages may quote what a client sent (a field's name, a model id): escaped and
        # cut, so an error can neither inject control characters nor echo megabytes.
        message = escape_for_display(self.message)[:MAX_MESSAGE_CHARS]
        return {"error": {"message": message,
                          "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
