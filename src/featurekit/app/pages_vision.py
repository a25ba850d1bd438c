"""The explorer's vision pages: a feature's pictures (heat-maps, crops), try a held-out view, an uploaded image (JSON).
A mixin of `server.Explorer`, which gives `run` and `page`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import queries, views
from .http import json_failure, whole_number
from .vision import VisionRun


class VisionPages:
    async def picture(self, request: Request) -> Response:
        """A vision run's feature picture, drawn on request: /r/RUN/f/ID/heat/VIEW.png or /r/RUN/f/ID/crop/I.png."""
        run = self.run(request)
        if not isinstance(run, VisionRun):
            raise queries.NotFound(f"{run.name} is not a vision run: it has no pictures")
        feature = whole_number(request.path_params["feature"], "feature id", not_found=True)
        n = whole_number(request.path_params["n"], "picture number", not_found=True)
        draw = run.heat_png if request.url.path.rsplit("/", 2)[-2] == "heat" else run.crop_png
        png = await run_in_threadpool(draw, feature, n)
        return Response(png, media_type="image/png", headers={"cache-control": "max-age=300"})

    async def try_image(self, request: Request) -> Response:
        """A vision run's try page: ?view=N (a held-out view) &feature=F (its heat-map; default: the top feature)."""
        run = self.run(request)
        if not isinstance(run, VisionRun):
            raise queries.NotFound(f"{run.name} is not a vision run: try a text at {views.url('r', run.name, 'try')}")
        p = request.query_params
        view = whole_number(p["view"], "view") if p.get("view") else None
        choices = await run_in_threadpool(run.views)
        top = await run_in_threadpool(run.top_on_view, view) if view is not None else []
        feature = whole_number(p["feature"], "feature") if p.get("feature") else (top[0]["latent"] if top else None)
        if feature is not None and feature >= run.n_latents:
            raise queries.BadRequest(f"feature {feature} does not exist: this dictionary has {run.n_latents} (0 to {run.n_latents - 1})")
        return self.page("vision_try.html", request, run, section="try", choices=choices, view=view, top=top, feature=feature)

    async def view_picture(self, request: Request) -> Response:
        """/r/RUN/view/N/F.png: feature F's heat-map over held-out view N (any view, any feature)."""
        run = self.run(request)
        if not isinstance(run, VisionRun):
            raise queries.NotFound(f"{run.name} is not a vision run: it has no pictures")
        view = whole_number(request.path_params["view"], "view", not_found=True)
        feature = whole_number(request.path_params["feature"], "feature id", not_found=True)
        png = await run_in_threadpool(run.heat_png, feature, view, False)
        return Response(png, media_type="image/png", headers={"cache-control": "max-age=300"})

    async def upload_image(self, request: Request) -> Response:
        """POST an image's bytes (content-type image/png or image/jpeg; ?feature=F) → JSON {top, feature, heat}, or
        {"error": message} with 400/404/413."""
        try:
            run = self.run(request)
            if not isinstance(run, VisionRun):
                raise queries.NotFound(f"{run.name} is not a vision run: it takes no images")
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype not in ("image/png", "image/jpeg"):
                raise queries.BadRequest(f"send the image's bytes as image/png or image/jpeg, not {ctype[:60]!r}")
            p = request.query_params
            feature = whole_number(p["feature"], "feature") if p.get("feature") else None
            if feature is not None and feature >= run.n_latents:
                raise queries.BadRequest(f"feature {feature} does not exist: this dictionary has {run.n_latents} "
                                         f"(0 to {run.n_latents - 1})")
            data = await request.body()
            return JSONResponse(await run_in_threadpool(run.upload, data, feature), headers={"cache-control": "no-store"})
        except Exception as err:  # noqa: BLE001 — every failure is a JSON message (`http.failure`)
            return json_failure(err, "the image could not be scored")
