"""The framework's own cost per request, for ``benchmarks/serve_load.py``: a BentoML service
configured as ``serving.service`` is (``ServeParams.process_config``) whose POST
/raw/classify reads the body and answers a fixed JSON. No decoding, no model, no guard: what a
request costs before any of the service's own work, so ``serve_load.py`` can say how high a/c
could go on these cores with a model of a given cost.

    bentoml serve serve_floor:Floor   (from benchmarks/; serve_load.py starts it itself)
"""
from __future__ import annotations

import sys
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_section  # noqa: E402
from serving.schemas import ServeParams  # noqa: E402

_SERVE = load_section("serve", ServeParams, Path(__file__).resolve().parents[1] / "params.yaml")


async def _classify(request: Request) -> Response:
    await request.body()
    return Response(b'{"label":"0"}', media_type="application/json")


@bentoml.service(name="floor", **_SERVE.process_config())
@bentoml.asgi_app(Starlette(routes=[Route("/classify", _classify, methods=["POST"])]), path="/raw")
class Floor:
    @bentoml.api
    def ping(self) -> str:  # BentoML needs one API on a service
        return "ok"
