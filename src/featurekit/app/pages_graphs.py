"""The explorer's graph pages: the served attribution graphs, one graph's viewer, and interventions on it (JSON).
A mixin of `server.Explorer`, which gives `page`, `runs` and `graphs`."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import graphs as graphs_mod
from . import queries
from .http import json_failure


class GraphPages:
    async def graph_list(self, request: Request) -> Response:
        return self.page("graphs.html", request, section="graphs")

    async def graph_view(self, request: Request) -> Response:
        graph = self.graphs.get(request.path_params["graph"])
        layout = await run_in_threadpool(graph.layout, self.runs)
        return self.page("graph.html", request, section="graphs", graph=graph, g=layout, limits=graphs_mod)

    async def intervene(self, request: Request) -> Response:
        """JSON in, JSON out; an error is {"error": message} with its status (400, 404, 413, 500)."""
        try:
            graph = self.graphs.get(request.path_params["graph"])
            try:
                body = json.loads(await request.body())
            except (UnicodeDecodeError, ValueError):
                raise queries.BadRequest('the request body is not JSON: send {"clamps": [{"node": ID, "value": V}]}') from None
            clamps = graphs_mod.parse_clamps(body, graph)
            return JSONResponse(await run_in_threadpool(graph.intervener.intervene, clamps), headers={"cache-control": "no-store"})
        except Exception as err:  # noqa: BLE001 — every failure is a JSON message (`http.failure`)
            return json_failure(err, "the intervention failed")
