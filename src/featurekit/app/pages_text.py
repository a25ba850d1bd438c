"""The explorer's run pages: overview, feature list, search, feature page (text and vision runs), try a text, steer,
a transcoder feature's connections. A mixin of `server.Explorer`, which gives `run`, `page`, `runs` and `models`."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from ..errors import FeaturekitError
from ..features.store import FeatureStore
from . import connections as connections_mod
from . import live, queries, views
from .http import read_form, whole_number
from .runs import Run
from .vision import VisionRun


class RunPages:
    async def overview(self, request: Request) -> Response:
        run = self.run(request)
        if isinstance(run, VisionRun):
            return self.page("vision_overview.html", request, run, section="overview", v=run.overview())

        def build() -> dict:
            return {"curves": views.curves(run.metrics()), "density": views.density_histogram(run.densities()),
                    "evaluations": run.evaluations(),
                    "n_live": run.n_live(), "config_text": json.dumps(run.config, indent=2, ensure_ascii=False)}

        return self.page("overview.html", request, run, section="overview", **await run_in_threadpool(build))

    async def eval_plot(self, request: Request) -> Response:
        """/r/RUN/evals/NAME.png: the plot `featurekit eval --suite ...` wrote beside an evaluation's JSON."""
        run = self.run(request)
        png = await run_in_threadpool(run.eval_plot, request.path_params["name"])
        if png is None:
            raise queries.NotFound(f"{run.name} has no plot of an evaluation named {request.path_params['name']!r}")
        return Response(png, media_type="image/png", headers={"cache-control": "no-store"})

    async def features(self, request: Request) -> Response:
        run = self.run(request)
        p = request.query_params
        data = await run_in_threadpool(queries.feature_list, run, p.get("sort", "density"), p.get("order", "desc") != "asc",
                                       whole_number(p.get("page", "1"), "page"), p.get("live", "1") != "0")
        return self.page("features.html", request, run, section="features", data=data, sorts=queries.SORT_LABELS)

    async def search(self, request: Request) -> Response:
        run = self.run(request)
        q, by = request.query_params.get("q", ""), request.query_params.get("by", "auto")
        data = await run_in_threadpool(queries.search, run, q, by)
        if "redirect" in data:
            return RedirectResponse(views.url("r", run.name, "f", data["redirect"]), status_code=303)
        return self.page("search.html", request, run, section="features", data=data, q=q, kinds=queries.SEARCH_KINDS)

    async def feature(self, request: Request) -> Response:
        run = self.run(request)
        feature = whole_number(request.path_params["feature"], "feature id", not_found=True)
        if isinstance(run, VisionRun):
            f = await run_in_threadpool(run.feature, feature)
            hist = views.act_histogram(f["hist"], run.meta.get("hist_edges") or [], f["density"]) if f.get("hist") is not None else None
            return self.page("vision_feature.html", request, run, section="features", f=f, fid=feature, hist=hist)
        page = await run_in_threadpool(queries.feature_page, run, feature)
        others = await run_in_threadpool(self.nearest_in_other_runs, run, feature)
        return self.page("feature.html", request, run, section="features", f=page, others=others,
                         hist=views.act_histogram(page["hist"], run.meta.get("hist_edges") or [], page["density"]),
                         fid=feature)

    async def feature_json(self, request: Request) -> Response:
        run = self.run(request)
        page = await run_in_threadpool(queries.feature_page, run, whole_number(request.path_params["feature"], "feature id", True))
        page.pop("groups", None)
        return JSONResponse(page)

    def nearest_in_other_runs(self, run: Run, feature: int) -> list[dict]:
        """For every other run on the same model and decoder site: its features nearest by decoder cosine."""
        out = []
        for other in self.runs.peers(run):
            try:
                near = self.runs.nearest(run, feature, other)
            except (FeaturekitError, OSError) as err:
                out.append({"run": other, "error": str(err), "rows": []})
                continue
            summaries = other.query(FeatureStore.summaries, [f for f, _ in near])
            out.append({"run": other, "error": None, "rows": [{"id": f, "cos": c, **summaries.get(f, {})} for f, c in near]})
        return out

    async def try_text(self, request: Request) -> Response:
        run = self.run(request)
        form = await read_form(request)
        text = form.get("text", "")
        result = await run_in_threadpool(live.text_codes, self.models, run, text) if text else None
        summaries = {}
        if result is not None:
            ids = {f for row in result.per_token for f, *_ in row} | {f for f, *_ in result.on_text}
            summaries = await run_in_threadpool(run.query, FeatureStore.summaries, ids)
        return self.page("try.html", request, run, section="try", text=text, result=result, summaries=summaries,
                         limits=live, loaded=self.models.loaded(run))

    async def steer(self, request: Request) -> Response:
        run = self.run(request)
        form = await read_form(request)
        rows = [(form.get(f"f{i}", ""), form.get(f"s{i}", "1")) for i in range(live.MAX_STEER_FEATURES + 4)
                if f"f{i}" in form or f"s{i}" in form]
        prompt = form.get("prompt", "")
        new_tokens = whole_number(form.get("n", "24"), "new tokens")
        result = None
        if prompt and any(f.strip() for f, _ in rows):
            features = live.parse_steering(rows, run.n_latents)
            result = await run_in_threadpool(live.steer_text, self.models, run, prompt, features, new_tokens)
        rows = (rows + [("", "1")] * live.MAX_STEER_FEATURES)[:live.MAX_STEER_FEATURES]
        return self.page("steer.html", request, run, section="steer", prompt=prompt, rows=rows, n=new_tokens, result=result,
                         limits=live, loaded=self.models.loaded(run))

    async def connections(self, request: Request) -> Response:
        run = self.run(request)
        feature = whole_number(request.path_params["feature"], "feature id", not_found=True)
        mig = request.query_params.get("mig") == "1"
        data = await run_in_threadpool(connections_mod.connections, self.models, self.runs, run, feature, mig=mig)
        return self.page("connections.html", request, run, section="features", fid=feature, c=data, mig=mig)
