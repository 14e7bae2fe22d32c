"""ASGI helpers of the front end and the admin routes: a body read once and handed on, forms
parsed from such a body, JSON error responses in OpenAI's shape."""
from __future__ import annotations

import json

from starlette.requests import Request


def replay(raw: bytes, receive=None):
    """An ASGI `receive` that yields `raw` as the whole body once, then defers to `receive`
    (the client's own channel, for disconnects) or reports a disconnect."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive() if receive is not None else {"type": "http.disconnect"}

    return receive_again


async def parse_form(scope, raw: bytes, **limits):
    """The multipart form of a body already read (starlette's parser; ValueError-like on bad input)."""
    return await Request(scope, replay(raw)).form(**limits)


def error_body(msg: str, param: str | None, code: int = 400) -> bytes:
    kind = {400: "BadRequestError", 401: "AuthenticationError"}.get(code, "InternalServerError")
    return json.dumps({"error": {"message": msg, "type": kind, "param": param, "code": code}}).encode()


async def respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
