"""What every explorer route shares: reading numbers and forms from a request, and turning an exception into a
status and a message (a page or JSON; never a traceback, which goes to the server's log)."""

from __future__ import annotations

import sys
import traceback
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import FeaturekitError
from . import live, queries


def whole_number(text: str, what: str, not_found: bool = False) -> int:
    """`text` as an int ≥ 0, else NotFound (a path part: `not_found`) or BadRequest naming `what`."""
    if not text.strip().isdigit() or len(text) > 12:
        raise (queries.NotFound if not_found else queries.BadRequest)(f"{what} must be a whole number ≥ 0, not {text[:40]!r}")
    return int(text)


async def read_form(request: Request) -> dict[str, str]:
    """The query parameters, and for a POST its url-encoded body on top (the body's size is bounded by `Guard`)."""
    values = dict(request.query_params)
    if request.method == "POST":
        body = await request.body()
        try:
            values.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64))
        except (UnicodeDecodeError, ValueError) as err:
            raise queries.BadRequest(f"the form could not be read ({err})") from None
    return values


def failure(err: Exception, failed: str) -> tuple[int, str]:
    """(status, message) for an exception: NotFound 404, TooLarge 413, BadRequest 400, another FeaturekitError 500
    with its message, anything else 500 with "`failed` (TypeName)" — its traceback printed to the log."""
    if isinstance(err, queries.NotFound):
        return 404, str(err)
    if isinstance(err, live.TooLarge):
        return 413, str(err)
    if isinstance(err, queries.BadRequest):
        return 400, str(err)
    if isinstance(err, FeaturekitError):
        return 500, str(err)
    traceback.print_exception(err, file=sys.stderr)
    return 500, f"{failed} ({type(err).__name__}); the server's log has the details"


def json_failure(err: Exception, failed: str) -> JSONResponse:
    """`failure` as {"error": message} with its status."""
    status, message = failure(err, failed)
    return JSONResponse({"error": message}, status_code=status)
