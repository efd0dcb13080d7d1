"""`pipeline serve RUN`: the run's finished stages behind an OpenAI-compatible API, and a page at / to compare two.

    GET  /v1/models              every finished model stage (pretrain or base, sft, dpo, rl) as a model id
    POST /v1/chat/completions    model, messages, temperature, top_p, max_tokens, stop, seed, stream
    GET  /                       the comparison page (static/index.html)

Every refused request gets a 4xx in OpenAI's error shape, {"error": {"message", "type", "param", "code"}},
and the server keeps serving. The body is parsed here rather than by FastAPI, so that its size is capped
before it is read whole and each refusal carries OpenAI's shape rather than FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import threading
import time
import uuid
from importlib.resources import files
from pathlib import Path
from typing import Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from pipeline.chat import Sampling
from pipeline.serve.models import RequestError, StageModels, generate, prompt_and_budget

MAX_BODY_BYTES = 1_000_000
log = logging.getLogger("pipeline.serve")
_workers: set = set()


# ---------------------------------------------------------------- the request


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": accepted, not used
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # OpenAI's list of parts, text only

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, content):
        if not isinstance(content, (str, list)):  # refused here, so the error does not name pydantic's union branches
            raise ValueError("content must be a string or a list of text parts")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat request, the fields this server acts on; others (user, logprobs, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0 = greedy; default 1
    top_p: float | None = Field(None, gt=0, le=1)  # default 1 (off)
    max_tokens: int | None = Field(None, ge=1)  # the upper bound is what the model's context leaves
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = Field(None, validate_default=True)  # up to 4 strings; read as a list
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # what a torch generator takes; default: a fresh random seed
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one reply per request

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def conversation(self) -> list[dict]:
        """The messages as the renderer takes them; refuses an order a chat template cannot render."""
        roles = [m.role for m in self.messages]
        turns = roles[1:] if roles[0] == "system" else roles
        for i, role in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                at = i + len(roles) - len(turns)
                after = f"after {article(turns[i - 1])} turn" if i else "first"
                raise RequestError(f"messages[{at}] is {article(role)} message, but {article(expected)} message must "
                                   f"come {after}: "
                                   "an optional system message, then user and assistant in turn, ending with user.",
                                   f"messages[{at}].role")
        if not turns or turns[-1] != "user":
            raise RequestError("The messages must end with a user message.", "messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def sampling(self, max_new_tokens: int) -> Sampling:
        temperature = 1.0 if self.temperature is None else self.temperature
        seed = secrets.randbits(63) if self.seed is None else self.seed
        return Sampling(max_new_tokens=max_new_tokens, greedy=temperature == 0, temperature=temperature or 1.0,
                        top_p=1.0 if self.top_p is None else self.top_p, seed=seed)


def article(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    # a message can quote the request (a model name), and JSON's \ud800 escape gives a string UTF-8 cannot encode
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def refusal(exc: RequestError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code), status_code=exc.status)


async def read_request(request: Request) -> ChatRequest:
    # A body over the limit is still read to its end (and dropped), up to a far larger bound: a server that
    # answers before the client has sent everything leaves most clients with a broken pipe, not the 413.
    too_large = RequestError(f"The body is over the limit of {MAX_BODY_BYTES} bytes.", code="request_too_large",
                             status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 8 * MAX_BODY_BYTES:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > 8 * MAX_BODY_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise too_large
    try:
        data = json.loads(body)
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise RequestError(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        raise RequestError(f"{where or 'body'}: {first['msg']}", where or None) from None


# ---------------------------------------------------------------- responses


def completion(request: ChatRequest, reply, reply_id: str, created: int) -> dict:
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": usage(reply),
    }


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def chunk(request: ChatRequest, reply_id: str, created: int, delta: dict, finish: str | None = None) -> str:
    body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"


async def stream_reply(request: ChatRequest, loaded, prompt, sampling, reply_id: str, created: int,
                       turn: asyncio.Lock):
    """Server-sent events as OpenAI streams them: a role chunk, text chunks, a finish chunk, [DONE].
    The generation runs in a worker thread, once it has the model's `turn`, and hands text over through a queue;
    if the client goes away, the generation stops at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def hand_over(kind: str, value) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def work():
        try:
            hand_over("done", generate(loaded, prompt, sampling, request.stop,
                                       on_text=lambda text: hand_over("text", text), cancelled=cancelled))
        except Exception as exc:
            log.exception("generation failed")
            hand_over("error", exc)

    await turn.acquire()
    worker = asyncio.ensure_future(anyio.to_thread.run_sync(work))
    _workers.add(worker)  # held until done: a client that goes away leaves it to finish its last token
    worker.add_done_callback(_workers.discard)
    worker.add_done_callback(lambda _: turn.release())  # the model's turn passes on when its thread is done
    try:
        yield chunk(request, reply_id, created, {"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield chunk(request, reply_id, created, {"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                break
            else:
                yield chunk(request, reply_id, created, {}, value.finish_reason)
                if request.stream_options and request.stream_options.include_usage:
                    body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                            "model": request.model, "choices": [], "usage": usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()


async def cancel_when_gone(http: Request, cancelled: threading.Event) -> None:
    """Set `cancelled` once the client of a request has gone away (checked 5 times a second): a plain request's
    generation, waiting for the model or under way, then stops instead of writing a reply nobody reads."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.2)
    cancelled.set()


# ---------------------------------------------------------------- the app


def create_app(run_dir: str | Path, api_key: str | None = None) -> FastAPI:
    api_key = api_key or None  # an empty key is no key
    models = StageModels(run_dir)
    app = FastAPI(title="pipeline serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    page = files("pipeline.serve").joinpath("static/index.html").read_text()
    # Requests for one model wait for their turn here, on the event loop, not in a worker thread blocked on the
    # model's lock: 40 requests queued for one stage held anyio's 40 threads, and every other request (another
    # stage, /v1/models, the key check) stalled until they were done. Handlers that do not block are async.
    turns: dict[str, asyncio.Lock] = {}

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].encode(), api_key.encode()):
            raise RequestError("Missing or wrong API key: send the header 'Authorization: Bearer KEY'.",
                               code="invalid_api_key", status=401)

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @api.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in models.names()]}

    @api.get("/models/{name}")
    async def get_model(name: str):
        models.check(name)
        return model_card(name)

    def model_card(name: str) -> dict:
        created = int((models.run_dir / name / "stage.json").stat().st_mtime)
        return {"id": name, "object": "model", "created": created, "owned_by": models.run_dir.name}

    @api.post("/chat/completions")
    async def chat_completions(http: Request):
        request = await read_request(http)
        messages = request.conversation()
        models.check(request.model)  # refuse an unknown model before loading anything

        def prepare():  # loading and tokenizing take a while: off the event loop, like the generation
            loaded = models.get(request.model)
            return loaded, *prompt_and_budget(loaded, messages, request.max_completion_tokens or request.max_tokens)

        turn = turns.setdefault(request.model, asyncio.Lock())
        cancelled = threading.Event()  # the client has gone away (a stream watches for that itself once it runs)
        watch = asyncio.ensure_future(cancel_when_gone(http, cancelled))
        try:
            async with turn:
                loaded, prompt, budget = await anyio.to_thread.run_sync(prepare)
            sampling = request.sampling(budget)
            reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if request.stream:
                return StreamingResponse(stream_reply(request, loaded, prompt, sampling, reply_id, created, turn),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            async with turn:
                reply = await anyio.to_thread.run_sync(generate, loaded, prompt, sampling, request.stop, None,
                                                       cancelled)
        finally:
            watch.cancel()
        return completion(request, reply, reply_id, created)

    app.include_router(api)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.exception_handler(RequestError)
    async def refused(_, exc: RequestError):
        return refusal(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):  # no such route (404), wrong method (405)
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):  # a bug of ours: logged with its traceback, answered in shape
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> int:
    import uvicorn

    from pipeline.errors import PipelineError

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise PipelineError(f"{run_dir}: not a run folder (no recipe.yaml); run a recipe first")
    stages = StageModels(run_dir).names()
    if not stages:
        raise PipelineError(f"{run_dir}: no finished model stage (pretrain, base, sft, dpo or rl) to serve")
    listening = listen_socket(host, port)
    if not api_key and not _loopback(listening.getsockname()[0]):
        print(f"warning: --host {host} takes requests from other machines and no --api-key (or PIPELINE_API_KEY) "
              "is set: anyone who can reach this port can use the models", flush=True)
    print(f"serving {', '.join(stages)} from {run_dir} at http://{host}:{port}/ (API: http://{host}:{port}/v1"
          f"{', key required' if api_key else ''}); models load on first use")
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir, api_key), host=host, port=port, log_level="info"))
    server.run(sockets=[listening])
    return 0


def _loopback(address: str) -> bool:
    """Whether a bound address only takes this machine's connections (127.0.0.0/8, ::1)."""
    import ipaddress

    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def listen_socket(host: str, port: int):
    """A socket bound to host:port, handed to uvicorn: a port in use or an address this machine does not have is
    a one-line error here, before the models are named as served (uvicorn would log it and exit with code 3)."""
    import socket

    from pipeline.errors import PipelineError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PipelineError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may rebind at once
    try:
        listening.bind(address)
    except OSError as exc:
        listening.close()
        fix = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host and --port"
        raise PipelineError(f"cannot listen on {host}:{port}: {exc.strerror}; {fix}") from None
    return listening
