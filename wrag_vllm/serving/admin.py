"""The /wrag admin routes of the API server, and who may use them.

    GET    /wrag/config                 the effective WRAG settings (no server paths)
    GET    /wrag/shards                 list shards (no server paths)
    POST   /wrag/retrieve               {"text", "top_k"?, "threshold"?, "method"?} → the plan retrieval makes
    GET    /wrag/chat/methods           methods a request may ask for (the chat page's selector)
    POST   /wrag/shards                 register a shard                         (writes: see below)
    DELETE /wrag/shards/{id}            remove a shard                           (writes: see below)

Every route follows --api-key (or VLLM_API_KEY): 401 without a valid bearer token when the server
has one. Writes are off unless the operator sets `admin_writes: true`, and then only on a server
with an API key (403 otherwise), as vLLM does for runtime adapter loading. POST /wrag/shards takes
    application/json       {"path", "id"?, "description"?, "samples"?, "queries"?}: a shard file or PEFT
                           directory on the server, inside one of the configured `admin_dirs`
    application/octet-stream  a shard file's bytes; ?id=&description= override its metadata
    multipart/form-data    `shard` (a shard file) or `adapter_config` + `adapter_model` (a PEFT
                           adapter's two files), plus optional `id`, `description`, `samples`, `queries`
                           (a JSON list of strings)
Any other content type gets 415, so a cross-site "simple" request (text/plain, forms with no
file) can never register a shard. A server path that cannot be registered, for whatever reason,
gets one message that says nothing about the file; responses never carry absolute paths.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request  # module level: routes' annotations resolve here
from fastapi.responses import JSONResponse

from ..errors import WragError
from .asgi import parse_form
from .controls import RequestError, parse_controls, request_methods

log = logging.getLogger("vllm.wrag")

NOT_LOADABLE = ("not a loadable shard file or PEFT adapter directory inside the server's admin_dirs "
                "(upload the file's bytes instead for a detailed reason)")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/]+/)+([^\s'\"/]*)")


def scrub(message: str) -> str:
    """An error message without absolute paths (each replaced by its last component)."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "/", message)


def public_meta(meta: dict) -> dict:
    """A shard's catalog row as the admin routes show it: no server paths."""
    out = {k: v for k, v in meta.items() if k != "path"}
    if isinstance(out.get("provenance"), dict):
        out["provenance"] = {k: v for k, v in out["provenance"].items() if k != "path"}
    return json.loads(json.dumps(out, default=str))


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": scrub(message), "type": "BadRequestError" if status < 500 else "InternalServerError",
        "code": status}})


async def json_body(request: Request) -> dict:
    """The JSON object of a request whose Content-Type is application/json (415 / 400 otherwise)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(status_code=415, detail="Content-Type must be application/json")
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HTTPException(status_code=400, detail="the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(status_code=400, detail="the body must be a JSON object")
    return body


async def limited_body(request: Request, limit: int) -> bytes:
    """The raw body, 413 past `limit` bytes (checked while reading, not only from Content-Length)."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(status_code=413, detail=f"upload larger than the server's max_upload_mb "
                                                    f"({limit >> 20} MiB)")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise HTTPException(status_code=413, detail=f"upload larger than the server's max_upload_mb "
                                                        f"({limit >> 20} MiB)")
        chunks.append(chunk)
    return b"".join(chunks)


def _texts(v, name: str) -> list[str]:
    """A list of strings (a JSON list in a form field) for `samples` / `queries`."""
    if v is None or v == "":
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            raise WragError(f'"{name}" must be a JSON list of strings') from None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise WragError(f'"{name}" must be a list of strings')
    return v


def _opt_str(v, name: str) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise WragError(f'"{name}" must be a string')
    return v


class Admin:
    """Route handlers; `plugin` is the WragEndpoint (config, resolver, tokens, executor)."""

    def __init__(self, plugin):
        self.plugin = plugin

    # ------------------------------------------------------------------ access
    def check_key(self, request: Request) -> None:
        tokens = self.plugin.tokens
        if not tokens:
            return
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        if not AuthenticationMiddleware(None, tokens).verify_token(request.headers):
            raise HTTPException(status_code=401, detail="Unauthorized")

    def need_active(self) -> None:
        if not self.plugin.active:
            raise HTTPException(status_code=409, detail="WRAG is disabled on this server")

    def need_writes(self) -> None:
        if not self.plugin.cfg.admin_writes:
            raise HTTPException(status_code=403, detail="admin writes are off on this server (the operator "
                                                        "enables them with the WRAG setting admin_writes)")
        if not self.plugin.tokens:
            raise HTTPException(status_code=403, detail="admin writes need a server started with --api-key")

    # ------------------------------------------------------------------ registration
    def _inside_admin_dirs(self, path: str) -> Path:
        p = Path(path).expanduser().resolve()
        for d in self.plugin.cfg.admin_dirs:
            root = Path(d).expanduser().resolve()
            if p == root or root in p.parents:
                return p
        raise WragError(NOT_LOADABLE)

    def add_from_path(self, body: dict) -> dict:
        from ..peft_io import shard_from_path

        if not isinstance(body.get("path"), str) or not body["path"]:
            raise WragError('the body must have "path" (a shard file or PEFT directory inside admin_dirs), '
                            'or upload the shard as multipart/form-data or application/octet-stream')
        fields = self._fields(body)
        path = self._inside_admin_dirs(body["path"])

        def add(st):
            try:
                shard = shard_from_path(path, st.base, **fields)
            except (WragError, OSError, ValueError):
                raise WragError(NOT_LOADABLE) from None
            return st.add(shard)
        return self.plugin.resolver.with_store(add)

    def add_from_files(self, files: dict[str, bytes], body: dict) -> dict:
        """files: {"shard": bytes} or {"adapter_config": bytes, "adapter_model": bytes}."""
        from ..peft_io import shard_from_path

        fields = self._fields(body)
        tmp = Path(tempfile.mkdtemp(prefix="wrag-upload-"))
        try:
            if "shard" in files:
                path = tmp / "upload.safetensors"
                path.write_bytes(files["shard"])
            elif {"adapter_config", "adapter_model"} <= set(files):
                path = tmp / "upload"
                path.mkdir()
                (path / "adapter_config.json").write_bytes(files["adapter_config"])
                (path / "adapter_model.safetensors").write_bytes(files["adapter_model"])
            else:
                raise WragError('upload a shard file as "shard", or a PEFT adapter as "adapter_config" '
                                '(adapter_config.json) + "adapter_model" (adapter_model.safetensors)')

            def add(st):
                try:
                    shard = shard_from_path(path, st.base, **fields)
                except (WragError, OSError, ValueError) as e:
                    raise WragError(str(e).replace(str(tmp) + "/", "")) from None
                shard.provenance.pop("path", None)
                return st.add(shard)
            return self.plugin.resolver.with_store(add)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _fields(body: dict) -> dict:
        return {"shard_id": _opt_str(body.get("id"), "id"),
                "description": _opt_str(body.get("description"), "description"),
                "samples": _texts(body.get("samples"), "samples"),
                "queries": _texts(body.get("queries"), "queries")}

    async def parse_upload(self, request: Request) -> tuple[dict[str, bytes] | None, dict]:
        """(files, fields) of POST /wrag/shards; files None for the JSON (server path) form."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return None, await json_body(request)
        limit = self.plugin.cfg.max_upload_mb << 20
        if ctype == "application/octet-stream":
            return {"shard": await limited_body(request, limit)}, dict(request.query_params)
        if ctype == "multipart/form-data":
            raw = await limited_body(request, limit)
            form = await parse_form(request.scope, raw, max_files=4, max_fields=16)
            files, fields = {}, {}
            for k, v in form.multi_items():
                if hasattr(v, "read"):
                    files[k] = await v.read()
                else:
                    fields[k] = v
            return files, fields
        raise HTTPException(status_code=415, detail="POST /wrag/shards takes application/json (a server path), "
                                                    "application/octet-stream or multipart/form-data (an upload)")

    # ------------------------------------------------------------------ router
    def router(self) -> APIRouter:
        router = APIRouter()
        plugin, admin = self.plugin, self

        @router.get("/wrag/config")
        async def wrag_config(request: Request):
            admin.check_key(request)
            d = plugin.cfg.to_dict() if plugin.cfg else {}
            if d:  # no server paths: the store's folder name, the number of admin folders
                d["store"] = Path(d["store"]).name
                d["admin_dirs"] = len(d["admin_dirs"])
            return {"enabled": plugin.active, **d}

        @router.get("/wrag/chat/methods", include_in_schema=False)
        async def chat_methods(request: Request):
            admin.check_key(request)
            admin.need_active()
            return JSONResponse({"methods": list(request_methods(plugin.cfg))}, headers={"Cache-Control": "no-cache"})

        @router.get("/wrag/shards")
        async def list_shards(request: Request):
            admin.check_key(request)
            admin.need_active()

            def do(st):
                return {"generation": st.generation, "shards": [public_meta(m) for m in st.list()]}
            return JSONResponse(await plugin.run(plugin.resolver.with_store, do))

        @router.post("/wrag/shards")
        async def add_shard(request: Request):
            admin.check_key(request)
            admin.need_active()
            admin.need_writes()
            files, fields = await admin.parse_upload(request)
            try:
                if files is None:
                    meta = await plugin.run(admin.add_from_path, fields)
                else:
                    meta = await plugin.run(admin.add_from_files, files, fields)
            except WragError as e:
                return error(400, str(e))
            log.info("WRAG: shard %s added through the admin route", meta.get("id"))
            return JSONResponse(public_meta(meta))

        @router.delete("/wrag/shards/{shard_id}")
        async def remove_shard(shard_id: str, request: Request):
            admin.check_key(request)
            admin.need_active()
            admin.need_writes()

            def do(st):
                if shard_id not in st:
                    return None
                st.remove(shard_id)
                return {"removed": shard_id, "generation": st.generation}
            try:
                out = await plugin.run(plugin.resolver.with_store, do)
            except WragError as e:
                return error(400, str(e))
            if out is None:
                return error(404, f"no shard {shard_id!r} in the store")
            log.info("WRAG: shard %s removed through the admin route", shard_id)
            return out

        @router.post("/wrag/retrieve")
        async def retrieve(request: Request):
            admin.check_key(request)
            admin.need_active()
            body = await json_body(request)
            try:
                if not isinstance(body.get("text"), str):
                    raise RequestError('body must be a JSON object with "text"')
                xargs = {f"wrag_{k}": body[k] for k in ("top_k", "threshold", "method") if k in body}
                controls = parse_controls(xargs, plugin.cfg)
                plan = await plugin.run(plugin.resolver.resolve, body["text"], controls)
            except WragError as e:
                return error(400, str(e))
            return plan.summary()

        return router
