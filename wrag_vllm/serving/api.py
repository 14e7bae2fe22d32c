"""`vllm.endpoint_plugins` entry point: the WRAG front end inside vLLM's API server.

vLLM 0.32 loads an endpoint plugin only when it is named in VLLM_PLUGINS (e.g. VLLM_PLUGINS=wrag);
the entry point is a zero-argument factory returning an object with `name`, `required_tasks`,
`attach_router(app)` and `async init_state(engine_client, state, args)`
(vllm.plugins.endpoint_plugins.interface.EndpointPlugin).

Request path (POST /v1/chat/completions, /v1/completions, /v1/responses):
    ASGI middleware reads the JSON body → validates `vllm_xargs` wrag_* (HTTP 400 on error) →
    retrieval in a worker thread (query = completion prompt, or the chat's last user turn;
    the API server's event loop and the engine loop keep running) → writes the resolved Plan into
    vllm_xargs["wrag_plan"] → vLLM builds the request (extra_args carry the plan to the engine) →
    the response carries `x-wrag-shards: id=weight,...` (or "-"), `x-wrag-scores: id=cosine,...`,
    `x-wrag-method`, `x-wrag-source`;
    every request is logged with its plan.

Admin routes (answer 401 without a valid key when the server has --api-key / VLLM_API_KEY,
exactly like vLLM's /v1 routes):
    GET    /wrag/shards                 list shards
    POST   /wrag/shards                 {"path", "description"?, "samples"?, "id"?} add a shard
                                        file or PEFT directory on the server's file system
    DELETE /wrag/shards/{id}            remove
    POST   /wrag/retrieve               {"text", "top_k"?, "threshold"?} → the plan retrieval makes
    GET    /wrag/config                 the effective WRAG configuration
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, HTTPException, Request  # module level: routes' annotations resolve here
from fastapi.responses import JSONResponse

from ..errors import WragError
from .config import WragConfig
from .resolver import Resolver
from .xargs import PLAN_KEY, RequestControls, RequestError, parse_controls

log = logging.getLogger("vllm.wrag")
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def query_text(path: str, body: dict) -> str | None:
    """Completions: the prompt (first one of a batch). Chat: the last user turn. Responses: input."""
    def content_text(c):
        if isinstance(c, str):
            return c
        if isinstance(c, list):
            return "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") in
                             ("text", "input_text") and isinstance(p.get("text"), str)) or None
        return None

    if path.endswith("/chat/completions"):
        for m in reversed(body.get("messages") or []):
            if isinstance(m, dict) and m.get("role") == "user":
                return content_text(m.get("content"))
        return None
    if path.endswith("/completions"):
        p = body.get("prompt")
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and isinstance(p[0], str):
            return p[0]
        return None
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        for m in reversed(inp):
            if isinstance(m, dict) and m.get("role") == "user":
                return content_text(m.get("content"))
    return None


def _error_body(msg: str, param: str | None, code: int = 400) -> bytes:
    return json.dumps({"error": {"message": msg, "type": "BadRequestError" if code == 400 else "InternalServerError",
                                 "param": param, "code": code}}).encode()


class WragEndpoint:
    name = "wrag"
    required_tasks = ("generate",)

    def __init__(self):
        self.cfg: WragConfig | None = None
        self.resolver: Resolver | None = None
        # Threads mostly wait on the embedding batch led by one of them (resolver.EmbedBatcher).
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="wrag-retrieve")
        self.tokens: list[str] = []
        self.metrics = None

    # ------------------------------------------------------------------ EndpointPlugin
    def attach_router(self, app) -> None:
        app.include_router(self._router())
        from .chat_page import chat_router  # the chat page, GET /wrag/chat (static files in the package)
        app.include_router(chat_router())
        app.add_middleware(WragMiddleware, plugin=self)

    async def init_state(self, engine_client, state, args) -> None:
        import vllm.envs as envs
        from .metrics import front_metrics

        self.cfg = WragConfig.from_sources(getattr(args, "additional_config", None) or {})
        # The API server process runs no model; its only torch work is the query embedding. One
        # intra-op thread keeps it at ~20 ms instead of 100-1000 ms when it competes with the
        # engine's threads for the same cores.
        import torch
        torch.set_num_threads(1)
        self.resolver = Resolver(self.cfg)
        self.tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        self.metrics = front_metrics()
        if self.cfg.enabled:
            await asyncio.get_running_loop().run_in_executor(self.executor, lambda: self.resolver.store)
            log.info("WRAG: front end ready (store %s, top_k %d, method %s)", self.cfg.store,
                     self.cfg.top_k, self.cfg.method)

    @property
    def active(self) -> bool:
        return self.cfg is not None and self.cfg.enabled

    async def run(self, fn, *a):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *a)

    # ------------------------------------------------------------------ admin routes
    def _check_key(self, request) -> None:
        if not self.tokens:
            return
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        auth = AuthenticationMiddleware(None, self.tokens)
        if not auth.verify_token(request.headers):
            raise HTTPException(status_code=401, detail="Unauthorized")

    def _router(self):
        router = APIRouter()
        plugin = self

        def need_active():
            if not plugin.active:
                raise HTTPException(status_code=409, detail="WRAG is disabled on this server")

        def bad(e: Exception, status=400):
            return JSONResponse(status_code=status, content={"error": {"message": str(e), "type": "BadRequestError",
                                                                       "code": status}})

        @router.get("/wrag/config")
        async def wrag_config(request: Request):
            plugin._check_key(request)
            return {"enabled": plugin.active, **(plugin.cfg.to_dict() if plugin.cfg else {})}

        @router.get("/wrag/shards")
        async def list_shards(request: Request):
            plugin._check_key(request)
            need_active()

            def do(st):
                return {"generation": getattr(st, "generation", None), "shards": st.list()}
            return JSONResponse(json.loads(json.dumps(await plugin.run(plugin.resolver.with_store, do),
                                                      default=str)))

        @router.post("/wrag/shards")
        async def add_shard(request: Request):
            plugin._check_key(request)
            need_active()
            try:
                body = await request.json()
                if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                    raise WragError('body must be a JSON object with "path" (a shard file or PEFT directory)')
                meta = await plugin.run(plugin._add, body)
            except (WragError, ValueError) as e:
                return bad(e)
            log.info("WRAG: shard %s added through the admin route", meta.get("id"))
            return JSONResponse(json.loads(json.dumps(meta, default=str)))

        @router.delete("/wrag/shards/{shard_id}")
        async def remove_shard(shard_id: str, request: Request):
            plugin._check_key(request)
            need_active()

            def do(st):
                st.remove(shard_id)
                return {"removed": shard_id, "generation": getattr(st, "generation", None)}
            try:
                out = await plugin.run(plugin.resolver.with_store, do)
            except WragError as e:
                return bad(e, 404 if "unknown" in str(e).lower() or "no shard" in str(e).lower() else 400)
            log.info("WRAG: shard %s removed through the admin route", shard_id)
            return out

        @router.post("/wrag/retrieve")
        async def retrieve(request: Request):
            plugin._check_key(request)
            need_active()
            try:
                body = await request.json()
                if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                    raise RequestError('body must be a JSON object with "text"')
                xargs = {k: body[k] for k in ("top_k", "threshold", "method") if k in body}
                controls = parse_controls({f"wrag_{k}": v for k, v in xargs.items()}, plugin.cfg)
                plan = await plugin.run(plugin.resolver.resolve, body["text"], controls)
            except (WragError, ValueError) as e:
                return bad(e)
            return plan.summary()

        return router

    def _add(self, body: dict) -> dict:
        from pathlib import Path

        from ..peft_io import shard_from_path

        if not Path(body["path"]).exists():  # say where the path was looked up
            raise WragError(f"no such shard file or PEFT directory on the server: {body['path']}")
        samples = body.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise WragError('"samples" must be a list of strings')

        def add(st):
            shard = shard_from_path(body["path"], st.base, shard_id=body.get("id") or None,
                                    description=body.get("description") or None, samples=samples)
            return st.add(shard)
        return self.resolver.with_store(add)

    # ------------------------------------------------------------------ per request
    async def plan_for(self, path: str, body: dict):
        """(new body, plan) or raises RequestError."""
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise RequestError("vllm_xargs must be a JSON object", "vllm_xargs")
        xargs = dict(xargs or {})
        controls: RequestControls = parse_controls(xargs, self.cfg)
        text = None if (controls.explicit or controls.off) else query_text(path, body)
        t0 = time.perf_counter()
        plan = await self.run(self.resolver.resolve, text, controls)
        if plan.source == "retrieved" or text is not None:
            self.metrics.retrieval.observe(time.perf_counter() - t0)
        xargs[PLAN_KEY] = plan.to_json()
        body["vllm_xargs"] = xargs
        return body, plan


class WragMiddleware:
    """Pure ASGI (streams untouched): rewrites the body of generate requests, adds headers."""

    def __init__(self, app, plugin: WragEndpoint):
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or not self.plugin.active
                or scope["path"].removeprefix(scope.get("root_path", "")) not in GENERATE_PATHS):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        plan = None
        if isinstance(body, dict):
            try:
                body, plan = await self.plugin.plan_for(path, body)
                raw = json.dumps(body).encode()
            except RequestError as e:
                self.plugin.metrics.rejected.inc()
                log.info("WRAG: request refused: %s", e)
                return await self._respond(send, 400, _error_body(str(e), getattr(e, "param", None)))
            except Exception as e:  # store/embedder failure: a server error, said plainly
                log.exception("WRAG: retrieval failed")
                return await self._respond(send, 500, _error_body(f"WRAG retrieval failed: {e}", None, 500))
            self.plugin.metrics.requests.labels(plan.source).inc()
            self.plugin.metrics.shards.observe(len(plan.ids))
            log.info("WRAG: %s -> shards %s method %s (%s)", path, plan.header(), plan.method, plan.source)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=headers)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start" and plan is not None:
                h = list(msg.get("headers", []))
                h += [(b"x-wrag-shards", plan.header().encode()), (b"x-wrag-method", plan.method.encode()),
                      (b"x-wrag-source", plan.source.encode()),
                      (b"x-wrag-scores", plan.scores_header().encode())]
                msg = dict(msg, headers=h)
            await send(msg)

        await self.app(scope, replay, send_with_headers)

    @staticmethod
    async def _respond(send, status: int, body: bytes):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def register_routes() -> WragEndpoint:
    """Entry point (vllm.endpoint_plugins: wrag): a zero-argument factory, as vLLM expects."""
    return WragEndpoint()
