"""`vllm.endpoint_plugins` entry point: the WRAG front end inside vLLM's API server.

vLLM 0.32 loads an endpoint plugin only when it is named in VLLM_PLUGINS (e.g. VLLM_PLUGINS=wrag);
the entry point is a zero-argument factory returning an object with `name`, `required_tasks`,
`attach_router(app)` and `async init_state(engine_client, state, args)`
(vllm.plugins.endpoint_plugins.interface.EndpointPlugin).

Request path (every vLLM route that builds an engine request from client `vllm_xargs`, listed in
ROUTES; tests/test_security_serving.py checks the list against the server's own routes):
    ASGI middleware reads the JSON body → validates `vllm_xargs` wrag_* (HTTP 400 on error; the
    server's own keys wrag_plan / wrag_slots are refused) → retrieval in a worker thread (query =
    completion prompt; the last user turn of chat, Anthropic messages or responses input, then
    up to query_context_turns earlier user turns) →
    writes the resolved Plan, sealed (seal.py), into vllm_xargs["wrag_plan"] → vLLM builds the
    request (extra_args carry the plan to the engine) → the response carries
    `x-wrag-shards: id=weight,...` (or "-"), `x-wrag-scores: id=p,...` (relevance), `x-wrag-method`,
    `x-wrag-source` (explicit | retrieved | off | none, or failed when the request failed);
    every request is logged with its plan.
A completions request with several prompts (a list of strings; prompt_embeds count as prompts
without text) becomes one engine request per prompt in vLLM. Unless it names its shards or sets
wrag_off, each text prompt is retrieved separately (one batched embedding, at most max_prompts of
them) and vllm_xargs["wrag_plan"] is the list of their sealed plans in prompt order; the API
server's hook (hooks/prompts.py) hands engine request i plan i. Its x-wrag-shards, x-wrag-scores
and x-wrag-source then hold one value per prompt, in prompt order, separated by ";"
(wrag_headers). Token-id prompts have no text: one plan, no retrieval, for all of them.
With data parallelism (--data-parallel-size N > 1) the middleware also sets X-data-parallel-rank
from the resolved shard set (affinity.py), unless the client set it.
Routes where WRAG does not retrieve (token-in generate, render, audio) refuse wrag_* controls
with a 400.
Generate routes outside /v1 (SageMaker's /invocations, the token-in /inference/v1/generate),
which vLLM's own --api-key check does not cover, need the key too on a WRAG server.

The admin routes are in admin.py; the hand-offs (Plan, keys) in plan.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .affinity import HEADER as AFFINITY_HEADER
from .affinity import Affinity, set_key
from .asgi import error_body, parse_form, replay, respond
from .config import WragConfig
from .controls import RequestControls, RequestError, parse_controls
from .plan import PLAN_KEY, Plan, wrag_keys
from .resolver import Resolver

log = logging.getLogger("vllm.wrag")
# path -> how the front end treats it: "chat" / "completion" / "responses" / "messages" (retrieve
# from that body form), "invocations" (SageMaker: chat if the body has messages, else completion),
# "refuse" (no retrieval here: wrag_* controls get a 400)
ROUTES = {
    "/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses",
    "/v1/messages": "messages", "/invocations": "invocations",
    "/inference/v1/generate": "refuse", "/v1/audio/transcriptions": "refuse",
    "/v1/audio/translations": "refuse",
    # render routes return the engine request a token-in client would send: no WRAG controls there
    "/v1/chat/completions/render": "refuse", "/v1/completions/render": "refuse",
    "/v1/responses/render": "refuse", "/v1/messages/render": "refuse",
}
KEYED_OUTSIDE_V1 = ("/invocations", "/inference/v1/generate")


def query_text(kind: str, body: dict, context_turns: int = 0, max_chars: int = 1024) -> str | None:
    """What retrieval embeds for one query. Completions: the prompt (query_texts gives each
    prompt of a batch its own; here, the first text prompt of a list). Chat, messages and
    responses: the last user turn, then (newest first, one per line) up to `context_turns` earlier
    user turns while the text stays within `max_chars`, so a follow-up ("and how is it treated?")
    keeps the conversation's domain. The last turn comes first because the embedder truncates at
    its end: context is what gets cut, never the question. A last user turn without text: None."""
    def content_text(c):
        if isinstance(c, str):
            return c
        if isinstance(c, list):
            return "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") in
                             ("text", "input_text") and isinstance(p.get("text"), str)) or None
        return None

    def user_turns(msgs):
        turns = [content_text(m.get("content")) for m in (msgs if isinstance(msgs, list) else [])
                 if isinstance(m, dict) and m.get("role") == "user"]
        if not turns or not turns[-1]:
            return None
        out, size = [turns[-1]], len(turns[-1])
        for t in reversed(turns[-1 - context_turns:-1]):
            if t and size + 1 + len(t) <= max_chars:
                out.append(t)
                size += 1 + len(t)
        return "\n".join(out)

    if kind in ("chat", "messages"):
        return user_turns(body.get("messages"))
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and isinstance(p[0], str):
            return p[0]
        return None
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    return user_turns(inp)


def _completion_inputs(body: dict) -> list[str | None] | None:
    """The prompts of a completions body, one per engine request vLLM makes of it, in vLLM's order
    (prompt_embeds first, then the prompts): the text of a text prompt, None for an embeds or
    token-id prompt. None for a prompt form vLLM refuses (mixed lists, an empty list, ...)."""
    embeds = body.get("prompt_embeds")   # base64 bytes: one string, or a list of them
    out: list[str | None] = [None] * (len(embeds) if isinstance(embeds, list) else int(isinstance(embeds, str)))
    p = body.get("prompt")
    if p is None or isinstance(p, str):
        return out + ([p] if isinstance(p, str) else [])
    if not isinstance(p, list) or not p:
        return None
    if all(isinstance(x, str) for x in p):
        return out + list(p)
    if all(isinstance(x, int) for x in p):
        return out + [None]               # one prompt of token ids
    if all(isinstance(x, list) for x in p):
        return out + [None] * len(p)      # several prompts of token ids
    return None


def query_texts(kind: str, body: dict, context_turns: int = 0, max_chars: int = 1024) -> list[str | None]:
    """What retrieval embeds, one query per plan. A completions body vLLM serves as several engine
    requests, at least one of them a text prompt, gets one query per engine request, in order
    (None: a prompt without text; "" is a text prompt, retrieving nothing). Every other body — one
    prompt, chat, or a batch without text (token ids: one plan, no retrieval, serves it all) —
    gets one query, query_text's."""
    if kind == "completion":
        texts = _completion_inputs(body)
        if texts is not None and len(texts) > 1 and any(t is not None for t in texts):
            return texts
    return [query_text(kind, body, context_turns, max_chars)]


def wrag_headers(plans: list[Plan], failed: bool) -> list[tuple[bytes, bytes]]:
    """The x-wrag-* response headers. One plan: its values. Several (a completions request retrieved
    per prompt): x-wrag-shards, x-wrag-scores and x-wrag-source hold one value per prompt, in prompt
    order, separated by ";" (shard ids never contain one); x-wrag-method stays one value (the
    method is per request). A failed request (5xx) claims no shards: "-" and "failed" per prompt."""
    def each(value) -> bytes:
        return ";".join(value(p) for p in plans).encode()

    return [(b"x-wrag-shards", each(lambda p: "-" if failed else p.header())),
            (b"x-wrag-method", plans[0].method.encode()),
            (b"x-wrag-source", each(lambda p: "failed" if failed else p.source)),
            (b"x-wrag-scores", each(Plan.scores_header))]


def _kind(route: str, body: dict) -> str:
    kind = ROUTES[route]
    if kind == "invocations":  # vLLM tries the chat request type first, then completion
        return "chat" if "messages" in body else "completion"
    return kind


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
        self.affinity: Affinity | None = None  # with data parallelism: the engine of a shard set

    # ------------------------------------------------------------------ EndpointPlugin
    def attach_router(self, app) -> None:
        from .admin import Admin
        from .chat_page import chat_router  # the chat page, GET /wrag/chat (static files in the package)

        self.admin = Admin(self)
        app.include_router(self.admin.router())
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
        self.resolver = Resolver(self.cfg, watch=True)
        ranks = int(getattr(args, "data_parallel_size", 1) or 1)
        if self.cfg.dp_affinity and ranks > 1:
            self.affinity = Affinity(ranks, capacity=int(getattr(args, "max_num_seqs", None) or 256))
            log.info("WRAG: shard-affinity routing over %d data-parallel engines", ranks)
        self.tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        self.metrics = front_metrics()
        if self.cfg.admin_writes and not self.tokens:
            log.error("WRAG: admin_writes is set but the server has no --api-key: admin writes stay off")
        if self.cfg.enabled:
            from .hooks.prompts import install_prompt_plans
            install_prompt_plans()  # engine request i of a multi-prompt completions request: plan i
            # open the store and load the embedder now, not on the first request's path
            await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: self.resolver.store.embedder.embed(["warm up"]))
            log.info("WRAG: front end ready (top_k %d, method %s, admin writes %s)", self.cfg.top_k,
                     self.cfg.method, "on" if self.cfg.admin_writes and self.tokens else "off")

    @property
    def active(self) -> bool:
        return self.cfg is not None and self.cfg.enabled

    async def run(self, fn, *a):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *a)

    # ------------------------------------------------------------------ per request
    async def plan_for(self, kind: str, body: dict):
        """(new body, plans) or raises RequestError. plans: one per prompt of a completions request
        retrieved per prompt (query_texts), sealed as a list; else one, sealed as a string."""
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise RequestError("vllm_xargs must be a JSON object", "vllm_xargs")
        xargs = dict(xargs or {})
        controls: RequestControls = parse_controls(xargs, self.cfg)
        texts = [None] if (controls.explicit or controls.off) else \
            query_texts(kind, body, self.cfg.query_context_turns, 4 * self.cfg.query_max_tokens)
        if len(texts) > self.cfg.max_prompts:
            raise RequestError(f"this server retrieves shards for at most {self.cfg.max_prompts} prompts "
                               f"per completions request, got {len(texts)}: send fewer per request, or "
                               f"name the shards (wrag_shards) or set wrag_off for the batch", "prompt")
        t0 = time.perf_counter()
        plans = await self.run(self.resolver.resolve_many, texts, controls)
        if any(t is not None for t in texts):
            self.metrics.retrieval.observe(time.perf_counter() - t0)
        xargs[PLAN_KEY] = plans[0].sealed() if len(plans) == 1 else [p.sealed() for p in plans]
        body["vllm_xargs"] = xargs
        return body, plans


def _refused_controls(body, form_xargs=None) -> list[str]:
    """wrag_* keys a request sends on a route where WRAG does not retrieve."""
    if form_xargs is not None:
        try:
            xargs = json.loads(form_xargs) if isinstance(form_xargs, str) else None
        except (ValueError, RecursionError):
            xargs = None
        return wrag_keys(xargs if isinstance(xargs, dict) else {}) or (["wrag_*"] if "wrag_" in str(form_xargs) else [])
    if not isinstance(body, dict):
        return []
    sp = body.get("sampling_params")
    extra = sp.get("extra_args") if isinstance(sp, dict) else None
    return wrag_keys(body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else {}) + \
        wrag_keys(extra if isinstance(extra, dict) else {})


class WragMiddleware:
    """Pure ASGI (streams untouched): rewrites the body of generate requests, adds headers."""

    def __init__(self, app, plugin: WragEndpoint):
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope, receive, send):
        route = scope["path"].removeprefix(scope.get("root_path", "")) if scope["type"] == "http" else ""
        if route.startswith("/metrics") and self.plugin.metrics is not None:
            self.plugin.metrics.refresh_engine()  # several API servers: the engine gauges, fresh
        if scope.get("method") != "POST" or not self.plugin.active or route not in ROUTES:
            return await self.app(scope, receive, send)
        if route in KEYED_OUTSIDE_V1 and self.plugin.tokens:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
            from starlette.datastructures import Headers

            if not AuthenticationMiddleware(None, self.plugin.tokens).verify_token(Headers(scope=scope)):
                return await respond(send, 401, error_body("Unauthorized", None, 401))
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype == b"multipart/form-data":
            body, form_xargs = None, await self._form_xargs(scope, raw)
        else:
            form_xargs = None
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                body = None
            except RecursionError:
                return await respond(send, 400, error_body("the body nests JSON too deeply", None))
        plans = None
        if ROUTES[route] == "refuse":
            bad = _refused_controls(body, form_xargs)
            if bad:
                return await self._refuse(send, RequestError(
                    f"WRAG controls ({', '.join(bad)}) are not available on {route}: use /v1/completions or "
                    f"/v1/chat/completions", bad[0]))
        elif isinstance(body, dict):
            try:
                body, plans = await self.plugin.plan_for(_kind(route, body), body)
                raw = json.dumps(body).encode()
            except RequestError as e:
                return await self._refuse(send, e)
            except Exception as e:  # store/embedder failure: a server error, said plainly
                log.exception("WRAG: retrieval failed")
                return await respond(send, 500, error_body(f"WRAG retrieval failed: {e}", None, 500))
            for plan in plans:  # each prompt of a completions batch is an engine request of its own
                self.plugin.metrics.requests.labels(plan.source).inc()
                self.plugin.metrics.shards.observe(len(plan.ids))
            log.info("WRAG: %s -> shards %s method %s (%s)", route, ";".join(p.header() for p in plans),
                     plans[0].method, ";".join(p.source for p in plans))

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        rank = None
        key = set_key(plans) if plans is not None and self.plugin.affinity is not None else ""
        if key and not any(k.lower() == AFFINITY_HEADER for k, _ in headers):  # a router's choice stands
            rank = self.plugin.affinity.acquire(key)
            headers.append((AFFINITY_HEADER, str(rank).encode()))
        scope = dict(scope, headers=headers)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start" and plans is not None:
                failed = msg.get("status", 200) >= 500  # the engine refused or failed the request
                msg = dict(msg, headers=list(msg.get("headers", [])) + wrag_headers(plans, failed))
            await send(msg)

        try:
            await self.app(scope, replay(raw, receive), send_with_headers)
        finally:
            if rank is not None:
                self.plugin.affinity.release(rank)

    async def _refuse(self, send, e: RequestError):
        self.plugin.metrics.rejected.inc()
        log.info("WRAG: request refused: %s", e)
        return await respond(send, 400, error_body(str(e), e.param))

    @staticmethod
    async def _form_xargs(scope, raw: bytes):
        """The vllm_xargs field of a multipart form body (a JSON string), or None."""
        try:
            form = await parse_form(scope, raw)
        except Exception:  # noqa: BLE001 - a malformed form: vLLM answers it
            return None
        v = form.get("vllm_xargs")
        return v if isinstance(v, str) else None


def register_routes() -> WragEndpoint:
    """Entry point (vllm.endpoint_plugins: wrag): a zero-argument factory, as vLLM expects."""
    return WragEndpoint()
