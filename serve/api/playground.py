"""The playground: a page at `/` to try the server in a browser, served by this app.

Plain HTML, JS and CSS shipped in the package (`static/`), no build step, nothing from other
origins. The page's own files are open to everyone (`PAGE_PATHS`, see `serve.api.access`): they
are the same for every caller and hold no data. Every job the page makes goes through the public
`/v1/videos` API with the key the user typed (`Authorization: Bearer`), and the form's bounds and
defaults come from `GET /playground/settings`, which needs that key like the API does.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from serve.api.params import BOUNDS, fill_defaults
from serve.api.routes import ConfigDep, SpecDep
from serve.api.schemas import MAX_SEED, GenerateRequest
from serve.sampling.presets import PRESETS

STATIC_DIR = Path(__file__).parent / "static"
# Nothing from other origins, no inline script or style (the page has none), media only from this
# origin or the blob URLs the page makes from downloaded videos; nobody may frame the page.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server serves its own page at once
}
# URL path -> (file in STATIC_DIR, media type)
PAGE_FILES = {
    "/": ("playground.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(PAGE_FILES)
# The request fields the form offers with the model's default filled in.
DEFAULTED_FIELDS = (*BOUNDS, "sampler")

playground_router = APIRouter(include_in_schema=False)


def _page_file(path: str):
    name, media_type = PAGE_FILES[path]

    async def serve_file() -> FileResponse:
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=PAGE_HEADERS)

    serve_file.__name__ = f"playground_{name.replace('.', '_')}"
    return serve_file


for _path in PAGE_FILES:
    playground_router.add_api_route(_path, _page_file(_path), methods=["GET"])


@playground_router.get("/playground/settings")
async def playground_settings(request: Request, spec: SpecDep, config: ConfigDep) -> JSONResponse:
    """What the form needs to know of this server: the served model, each field's bounds (the
    ones the server enforces) and default (as the server fills it in), and what it offers."""
    return JSONResponse(form_settings(request.app.state.model_name, spec, config))


def form_settings(model_name: str, spec, config) -> dict:
    limits = config.limits
    bounds = {name: [_bound(limits, low), _bound(limits, high)] for name, (low, high) in BOUNDS.items()}
    # The defaults of a request that sets nothing, filled by the very function the server uses.
    filled = fill_defaults(GenerateRequest(prompt="-"), spec)
    return {
        "model": model_name,
        "variant": spec.variant,
        "experts": len(spec.expert_names),
        "image_input": spec.image_input,
        "defaults": {name: filled[name] for name in DEFAULTED_FIELDS} | {"preset": config.sampling.preset},
        "bounds": bounds | {"seed": [0, str(MAX_SEED)]},  # as text: above 2**53 a JS number is inexact
        "max_prompt_chars": limits.max_prompt_chars,
        "max_image_bytes": limits.max_image_bytes,
        "samplers": list(get_args(get_args(GenerateRequest.model_fields["sampler"].annotation)[0])),
        "presets": sorted(PRESETS),
        "loras": bool(config.lora.dirs),
    }


def _bound(limits, bound: str | float) -> float:
    return getattr(limits, bound) if isinstance(bound, str) else bound
