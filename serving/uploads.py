"""How the service reads what a client sent: a multipart upload's file name, a raw body."""
from __future__ import annotations

import tempfile
from pathlib import Path

from starlette.requests import Request

from serving.guards import TooLarge, too_large


def upload_name(path: Path) -> str:
    """The client's file name of an upload that BentoML saved as a temporary file.

    BentoML (pinned 1.4.39; no public API gives the name) keeps it as the suffix of
    ``tempfile.NamedTemporaryFile``: "tmp" + 8 random characters + name.
    """
    prefix = tempfile.gettempprefix()
    name = path.name
    return (name[len(prefix) + 8:] or "upload") if name.startswith(prefix) and len(name) >= len(prefix) + 8 else name


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes (chunked uploads
    carry no Content-Length, so the guard in front cannot tell beforehand)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(too_large(len(body), limit))
    return bytes(body)
