"""The explorer's web server: Starlette routes over the served runs, run by uvicorn (`serve`). The handlers live in
`pages_text` (run pages), `pages_graphs` and `pages_vision`; `http` maps errors to statuses.

Routes (a run is addressed by its name or index, `runs.py`):

    /                               the runs side by side (one run: its overview)
    /r/RUN/                         run overview: method, sites, metrics, training curves, density histogram, config,
                                    the evaluation suite's results and plots (/r/RUN/evals/NAME.png)
    /r/RUN/features?sort=&order=&page=&live=     the feature list (50 a page)
    /r/RUN/search?q=&by=auto|token|id|explanation
    /r/RUN/f/ID                     the feature page
    /r/RUN/api/features/ID          the same data as JSON
    /r/RUN/f/ID/connections         a transcoder feature's up- and downstream features in the other transcoder runs
                                    (virtual weights, `connections.py`)
    /r/RUN/try   (GET ?text=, POST)  features on each token of a text (the model runs live)
    /r/RUN/steer (GET, POST)        greedy continuation with features added, beside the plain one
    /g/                             the attribution graphs served (`serve --graphs G.json ...`, `graphs.py`)
    /g/GRAPH/                       the graph viewer: layer × position layout, hover, pruning sliders, pins
    /g/GRAPH/intervene (POST JSON)  set feature activations, get the replacement model's new top logits (JSON)
    /r/RUN/f/ID/heat/VIEW.png       a vision run's feature over a held-out view (drawn on request, `vision.py`)
    /r/RUN/f/ID/crop/I.png          the patches around its I-th top example
    /r/RUN/try-image?view=&feature=   a vision run: a held-out view's top features, one's heat-map over it
    /r/RUN/view/VIEW/ID.png         that heat-map
    /r/RUN/try-image/upload (POST image/png|jpeg bytes, ?feature=)  the same for an uploaded image (JSON)
    /static/NAME                    the stylesheet and script (package data)

Every response carries a Content-Security-Policy (scripts and styles from /static only, no inline script or
style), nosniff, no-referrer and frame-ancestors 'none'. Request bodies above `MAX_BODY` and query strings
above `MAX_QUERY` bytes are refused with 413/414; errors are pages with a message, never a traceback (the
server's log gets it). Nothing is ever written into a run folder.
"""

from __future__ import annotations

import functools
import html
import ipaddress
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import FeaturekitError
from . import live, queries, views
from .graphs import Graphs
from .http import failure
from .pages_graphs import GraphPages
from .pages_text import RunPages
from .pages_vision import VisionPages
from .runs import Run, Runs
from .vision import MAX_UPLOAD, VisionRun

MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
DEFAULT_PORT = 8765
VISION_PAGES = {"overview", "features", "search", "feature", "picture", "try_image", "view_picture", "upload_image"}
UPLOAD_PATH = "/try-image/upload"  # the one route whose body may be up to vision.MAX_UPLOAD bytes
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "x-frame-options": "DENY", "cross-origin-opener-policy": "same-origin"}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


class Explorer(RunPages, GraphPages, VisionPages):
    """The served runs and graphs, the live models, the error pages; the page handlers come from the mixins."""

    def __init__(self, runs: Runs, graphs: Graphs | None = None) -> None:
        self.runs = runs
        self.graphs = graphs if graphs is not None else Graphs([])
        self.models = live.Models()
        files = resources.files("featurekit.app") / "static"
        self.static = {f.name: (f.read_bytes(), STATIC_TYPES[Path(f.name).suffix])
                       for f in files.iterdir() if Path(f.name).suffix in STATIC_TYPES}

    def run(self, request: Request) -> Run:
        run = self.runs.get(request.path_params["run"])
        if run is None:
            raise queries.NotFound(f"no run {request.path_params['run']!r} is served here: the runs are "
                                   f"{', '.join(r.name for r in self.runs)}")
        if isinstance(run, VisionRun) and request.scope["endpoint"].__name__ not in VISION_PAGES:
            raise queries.BadRequest(f"{run.name} is a vision run: it has an overview and feature pages with pictures "
                                     f"({views.url('r', run.name, '')}), no text pages")
        return run

    def page(self, template: str, request: Request, run: Run | None = None, status: int = 200, **context: Any) -> HTMLResponse:
        text = views.render(template, runs=list(self.runs), graphs=list(self.graphs), run=run, path=request.url.path,
                            q=context.pop("q", ""),
                            section=context.pop("section", ""), **context)
        return HTMLResponse(text, status_code=status, headers={"cache-control": "no-store"})

    # -- pages (the rest: pages_text, pages_graphs, pages_vision) ----------------------------------------------
    async def index(self, request: Request) -> Response:
        if len(self.runs) == 0:
            return RedirectResponse("/g/", status_code=307)
        if len(self.runs) == 1 and not len(self.graphs):
            return RedirectResponse(views.url("r", self.runs.runs[0].name, ""), status_code=307)
        return self.page("index.html", request, section="runs")

    async def static_file(self, request: Request) -> Response:
        entry = self.static.get(request.path_params["name"])
        if entry is None:
            raise queries.NotFound(f"no file {request.path_params['name']!r} here")
        return Response(entry[0], media_type=entry[1], headers={"cache-control": "max-age=300"})

    # -- errors ---------------------------------------------------------------------------------------------------
    def error(self, request: Request, status: int, message: str) -> HTMLResponse:
        titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 413: "Input too large",
                  414: "Address too long", 500: "Server error"}
        run = self.runs.get(request.path_params.get("run", "")) if "run" in request.path_params else None
        try:
            return self.page("error.html", request, run, status=status, status_title=titles.get(status, "Error"),
                             code=status, message=message)
        except Exception:  # noqa: BLE001 — the error page itself failed: a bare one, still escaped
            traceback.print_exc(file=sys.stderr)
            return HTMLResponse(f"<!DOCTYPE html><title>{status}</title><h1>{status}</h1><p>{html.escape(message)}</p>",
                                status_code=status)

    def guarded(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint with its errors as pages, by `http.failure`."""
        @functools.wraps(endpoint)
        async def wrapped(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as err:  # noqa: BLE001 — every failure is a page (`http.failure`)
                return self.error(request, *failure(err, "the server failed on this request"))
        return wrapped

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"nothing is served at {request.url.path}", 405: f"{request.method} is not allowed here"}
        return self.error(request, exc.status_code, message.get(exc.status_code, exc.detail))


class Guard:
    """ASGI wrapper: refuses bodies above `max_body` (413) and query strings above `max_query` (414), and adds the
    security headers to every response, error pages included."""

    def __init__(self, app: Any, explorer: Explorer, max_body: int = MAX_BODY, max_query: int = MAX_QUERY) -> None:
        self.app, self.explorer, self.max_body, self.max_query = app, explorer, max_body, max_query

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        max_body = self.max_body if not scope.get("path", "").endswith(UPLOAD_PATH) else MAX_UPLOAD
        too_long = None
        if len(scope.get("query_string", b"")) > self.max_query:
            too_long = (414, f"the address's query is longer than {self.max_query // 1024} KiB")
        elif not length.isdigit() or int(length) > max_body:
            too_long = (413, f"the request body is larger than {max_body // 1024} KiB: send a shorter text or a smaller image")
        if too_long:
            request = Request(scope)
            response = self.explorer.error(request, *too_long)
            response.headers["connection"] = "close"
            await response(scope, receive, send_secured)
            return
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body:
                raise live.TooLarge(f"the request body is larger than {max_body // 1024} KiB: send a shorter text or a smaller image")
            return message

        await self.app(scope, bounded_receive, send_secured)


def create_app(runs: Runs, host: str = "127.0.0.1", graphs: Graphs | None = None) -> Guard:
    """The ASGI application serving `runs` and `graphs` (wrapped in `Guard`). Requests must name a loopback host when
    `host` is one (no DNS rebinding from a web page)."""
    ex = Explorer(runs, graphs)
    g = ex.guarded
    routes = [
        Route("/", g(ex.index)),
        Route("/static/{name}", g(ex.static_file)),
        Route("/r/{run}/", g(ex.overview)),
        Route("/r/{run}/features", g(ex.features)),
        Route("/r/{run}/evals/{name}.png", g(ex.eval_plot)),
        Route("/r/{run}/search", g(ex.search)),
        Route("/r/{run}/f/{feature}", g(ex.feature)),
        Route("/r/{run}/api/features/{feature}", g(ex.feature_json)),
        Route("/r/{run}/f/{feature}/heat/{n}.png", g(ex.picture)),
        Route("/r/{run}/f/{feature}/crop/{n}.png", g(ex.picture)),
        Route("/r/{run}/try-image", g(ex.try_image)),
        Route("/r/{run}" + UPLOAD_PATH, ex.upload_image, methods=["POST"]),
        Route("/r/{run}/view/{view}/{feature}.png", g(ex.view_picture)),
        Route("/r/{run}/f/{feature}/connections", g(ex.connections)),
        Route("/r/{run}/try", g(ex.try_text), methods=["GET", "POST"]),
        Route("/r/{run}/steer", g(ex.steer), methods=["GET", "POST"]),
        Route("/g/", g(ex.graph_list)),
        Route("/g/{graph}/", g(ex.graph_view)),
        Route("/g/{graph}/intervene", ex.intervene, methods=["POST"]),
    ]
    hosts = ["127.0.0.1", "localhost", host] if _loopback(host) and ":" not in host else ["*"]  # IPv6: Starlette reads "[::1]" badly
    app = Starlette(routes=routes, exception_handlers={HTTPException: ex.http_error},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
    return Guard(app, ex)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(paths: Sequence[str | Path], host: str = "127.0.0.1", port: int = DEFAULT_PORT, log: Callable[[str], None] = print,
          graph_paths: Sequence[str | Path] = ()) -> int:
    """Serve the runs in `paths` and the graph files in `graph_paths` until interrupted; prints the address first
    (`--port 0`: any free port)."""
    import uvicorn

    if not paths and not graph_paths:
        raise FeaturekitError("featurekit serve needs at least one run folder (or a graph file: --graphs G.json)")
    graphs = Graphs(graph_paths)
    named = {Path(p).resolve() for p in paths}
    extra: dict[Path, Path] = {}  # the stores of the graphs' set layers (`circuits features`), unless named already
    for run in (run for graph in graphs for run in graph.store_runs()):
        if run.resolve() not in named:
            extra.setdefault(run.resolve(), run)
    runs = Runs([*paths, *extra.values()], allow_empty=bool(graph_paths))
    if not _loopback(host):
        print(f"featurekit serve: warning: listening on {host}, not on loopback: anyone who can reach this machine on port "
              f"{port} can browse these runs and make the server run the model", file=sys.stderr, flush=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise FeaturekitError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port "
                              f"(--port 0 picks a free one)") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    for run in runs:
        sites = f"{run.site} → {run.output_site}" if run.output_site else run.site
        log(f"  {run.name}: {run.path} ({run.method}, {run.n_latents:,} features at {sites})")
    for graph in graphs:
        linked = graph.layer_runs(runs)
        log(f"  graph {graph.name}: {graph.path} ({len(graph.nodes):,} nodes, {len(graph.links):,} edges"
            + (f"; layers {sorted(linked)} link to runs" if linked else "") + f") at /g/{graph.name}/")
    log(f"featurekit explorer: http://{shown}:{bound}/  (Ctrl-C stops it)")
    sys.stdout.flush()
    config = uvicorn.Config(create_app(runs, host, graphs), log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            limit_concurrency=64, h11_max_incomplete_event_size=MAX_QUERY + 8 * 1024)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        runs.close()
    return 0
