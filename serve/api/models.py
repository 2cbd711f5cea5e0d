"""`/v1/models`: the names this server answers to, as OpenAI's list and model objects, so
`client.models.list()` and `client.models.retrieve(id)` work and a client can discover what to
send as `model`. One model per server; each `--served-model-name` alias is listed as its own entry
(as vLLM lists them), all with the same `root`, the checkpoint they serve."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from serve.api.errors import OPENAI_PREFIX, SafeJSONResponse, error_response, error_responses

models_router = APIRouter(prefix="/v1/models", tags=["models"])
OWNER = "reelserve"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    """When this server started (unix seconds)."""
    owned_by: str = OWNER
    root: str
    """The checkpoint served: its Hugging Face id or folder name (reelserve extension, as vLLM's)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_cards(request: Request) -> list[ModelCard]:
    state = request.app.state
    return [ModelCard(id=name, created=state.started_at, root=state.model_root) for name in state.model_names]


def model_not_found(name: str) -> JSONResponse:
    """OpenAI's answer to a model it does not serve: a 404 naming the `model` parameter."""
    message = f"The model {name!r} does not exist on this server; GET /v1/models lists the names it serves"
    return error_response(OPENAI_PREFIX, 404, message, param="model", code="model_not_found")


@models_router.get("", responses={200: {"model": ModelList}, **error_responses(500, openai=True)})
async def list_models(request: Request) -> JSONResponse:
    cards = [card.model_dump() for card in model_cards(request)]
    return SafeJSONResponse({"object": "list", "data": cards})


# `:path`: a Hugging Face id has a slash (`Wan-AI/Wan2.2-T2V-A14B-Diffusers`).
@models_router.get("/{model_id:path}", responses={200: {"model": ModelCard}, **error_responses(404, 500, openai=True)})
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    for card in model_cards(request):
        if card.id == model_id:
            return SafeJSONResponse(card.model_dump())
    return model_not_found(model_id)
