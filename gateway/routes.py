"""The OpenAI endpoints: request bodies in, `chat.completion` / `text_completion` objects or SSE
chunks out."""

from __future__ import annotations

import json
import secrets
import time
from collections import defaultdict
from typing import AsyncIterator

import msgspec
from aiohttp import web
from pydantic import ValidationError

from ..proto.messages import DeltaChunk, FinalChunk, Usage
from ..proto.subjects import check_model_name
from .errors import APIError, from_validation, invalid
from .generations import Generations, merge_choices, new_request_id, new_traceparent
from .metrics import MODEL_KEY
from .schemas import ChatCompletionRequest, CompletionRequest, _Common

CONFIG = web.AppKey("config", object)
GENERATIONS = web.AppKey("generations", Generations)

WORKER_HEADER = "X-Chatfabric-Worker"  # which worker(s) served the response

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> dict:
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(
            413,
            f"Request body is {request.content_length} bytes; the limit is {limit} bytes.",
            code="request_too_large",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large") from None
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"Request body is not valid JSON: {err}") from None
    except RecursionError:
        raise invalid("Request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object.")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse(model_cls: type[_Common], body: dict) -> _Common:
    """Validate an OpenAI body and the sampling parameters of each of its choices."""
    try:
        parsed = model_cls.model_validate(body)
        for index in range(parsed.n):
            parsed.sampling(index)
    except ValidationError as err:
        raise from_validation(err, renames=_renames(body)) from None
    except RecursionError:
        raise invalid("Request body is nested too deeply.") from None
    return parsed


def _renames(body: dict) -> dict[str, str]:
    """SamplingParams says max_tokens where the client may have sent max_completion_tokens."""
    return {"max_tokens": "max_completion_tokens"} if body.get("max_completion_tokens") is not None else {}


def check_limits(body: _Common, config, max_model_len: int) -> None:
    """Bound the work one request can ask for: prompts, choices and forced tokens."""
    prompts = len(body.prompts()) if isinstance(body, CompletionRequest) else 1
    if prompts > config.max_prompts:
        raise invalid(f"At most {config.max_prompts} prompts are allowed per request, got {prompts}.",
                      param="prompt")
    if prompts * body.n > config.max_choices:
        raise invalid(
            f"This request asks for {prompts * body.n} completions ({prompts} prompts x n={body.n}); "
            f"at most {config.max_choices} are allowed per request.",
            param="n",
        )
    if body.min_tokens >= max_model_len:
        raise invalid(
            f"min_tokens ({body.min_tokens}) must be less than the model's context length ({max_model_len}).",
            param="min_tokens",
        )


def check_api_key(request: web.Request) -> None:
    """Raise 401 unless API keys are off or the request carries one of them."""
    keys = request.app[CONFIG].api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
    if not any(secrets.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# -- response shapes ------------------------------------------------------------------------


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}

    def delta(self, index: int, text: str) -> dict:
        return {"index": index, "delta": {"content": text}, "finish_reason": None, "logprobs": None}

    def closing(self, index: int, finish: str) -> dict:
        return {"index": index, "delta": {}, "finish_reason": finish, "logprobs": None}


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, echo: dict[int, str]):
        self.echo = echo  # choice index -> prompt text to put in front

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "text": self.echo.get(index, "") + text, "finish_reason": finish, "logprobs": None}

    def opening(self, index: int) -> dict | None:
        if index in self.echo:
            return self.delta(index, self.echo[index])
        return None

    def delta(self, index: int, text: str) -> dict:
        return {"index": index, "text": text, "finish_reason": None, "logprobs": None}

    def closing(self, index: int, finish: str) -> dict:
        return {"index": index, "text": "", "finish_reason": finish, "logprobs": None}


def total_usage(finals: dict[int, FinalChunk], first_of_prompt: set[int]) -> dict:
    """Prompt tokens once per prompt (not per choice), completion tokens over every choice."""
    prompt = sum(f.usage.prompt_tokens for i, f in finals.items() if i in first_of_prompt)
    completion = sum(f.usage.completion_tokens for f in finals.values())
    return msgspec.structs.asdict(Usage(prompt_tokens=prompt, completion_tokens=completion,
                                        total_tokens=prompt + completion))


# -- the shared response path ---------------------------------------------------------------


async def respond(
    request: web.Request,
    body: _Common,
    streams: list[AsyncIterator],
    shape,
    first_of_prompt: set[int],
) -> web.StreamResponse:
    response_id = shape.id_prefix + new_request_id()
    created = int(time.time())
    head = {"id": response_id, "created": created, "model": body.model}
    events = merge_choices(streams)
    if not body.stream:
        texts: dict[int, list[str]] = defaultdict(list)
        finals: dict[int, FinalChunk] = {}
        async for index, chunk in events:
            if isinstance(chunk, DeltaChunk):
                texts[index].append(chunk.text)
            else:
                finals[index] = chunk
        choices = [shape.choice(i, "".join(texts[i]), finals[i].finish_reason) for i in range(len(streams))]
        return web.json_response(
            {**head, "object": shape.object, "choices": choices, "usage": total_usage(finals, first_of_prompt)},
            headers={WORKER_HEADER: ",".join(sorted({f.worker_id for f in finals.values()}))},
        )
    return await stream_sse(request, body, events, shape, head, len(streams), first_of_prompt)


async def stream_sse(request, body, events, shape, head, n_choices, first_of_prompt) -> web.StreamResponse:
    iterator = events.__aiter__()
    try:
        # Wait for the first event before sending headers, so an early failure keeps its status.
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if first is not None:
        headers[WORKER_HEADER] = first[1].worker_id
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    usage_field = {"usage": None} if body.include_usage else {}

    async def send(choices: list[dict], **extra) -> None:
        payload = {**head, "object": shape.chunk_object, "choices": choices, **usage_field, **extra}
        await response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")

    finals: dict[int, FinalChunk] = {}
    try:
        for index in range(n_choices):
            opening = shape.opening(index)
            if opening is not None:
                await send([opening])
        pending = [first] if first is not None else []
        while True:
            item = pending.pop() if pending else await _next(iterator)
            if item is None:
                break
            index, chunk = item
            if isinstance(chunk, DeltaChunk):
                if chunk.text:
                    await send([shape.delta(index, chunk.text)])
            else:
                finals[index] = chunk
                await send([shape.closing(index, chunk.finish_reason)])
        if body.include_usage:
            await send([], usage=total_usage(finals, first_of_prompt))
    except APIError as err:
        await response.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
    finally:
        await iterator.aclose()
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _next(iterator):
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


# -- endpoints ------------------------------------------------------------------------------


async def accept(request: web.Request, model_cls: type[_Common]):
    """Validate the body and check its model is served: (body, generations, traceparent)."""
    body = parse(model_cls, await read_json(request))
    generations = request.app[GENERATIONS]
    await generations.check_model(body.model)
    request[MODEL_KEY] = body.model  # served: a bounded metrics label
    check_limits(body, request.app[CONFIG], generations.registry.max_model_len(body.model))
    return body, generations, new_traceparent(request.headers.get("traceparent"))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, generations, traceparent = await accept(request, ChatCompletionRequest)
    messages = body.chat_messages()
    streams = [
        generations.choice_stream(body.model, body.sampling(i), messages=messages, traceparent=traceparent)
        for i in range(body.n)
    ]
    return await respond(request, body, streams, ChatShape(), first_of_prompt={0})


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body, generations, traceparent = await accept(request, CompletionRequest)
    streams, echo, first_of_prompt = [], {}, set()
    for p, prompt in enumerate(body.prompts()):
        first_of_prompt.add(p * body.n)
        for j in range(body.n):
            if body.echo:
                echo[p * body.n + j] = prompt
            streams.append(
                generations.choice_stream(body.model, body.sampling(j), prompt=prompt, traceparent=traceparent)
            )
    return await respond(request, body, streams, CompletionShape(echo), first_of_prompt)


def model_object(name: str, cards) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": int(min(c.started_at for c in cards)),
        "owned_by": "chatfabric",
        "max_model_len": min(m.context_length for c in cards for m in c.models if m.name == name),
        "workers": len(cards),
        "capacity": sum(c.capacity for c in cards),
        "in_flight": sum(c.in_flight for c in cards),
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = request.app[GENERATIONS].registry.models()
    data = [model_object(name, cards) for name, cards in sorted(models.items())]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        check_model_name(name)
    except ValueError as err:
        raise invalid(f"Invalid model name: {err}.", param="model") from None
    generations = request.app[GENERATIONS]
    await generations.check_model(name)
    return web.json_response(model_object(name, generations.registry.models()[name]))


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Status for anyone (load balancers, probes); worker details only for API key holders
    when keys are configured."""
    generations = request.app[GENERATIONS]
    connected = generations.bus.connected
    body = {"status": "ok" if connected else "degraded", "nats": "connected" if connected else "disconnected"}
    if _may_see_details(request):
        body["models"] = sorted(generations.registry.models())
        body["workers"] = [
            {**c.model_dump(include={"worker_id", "backend", "device", "capacity", "in_flight",
                                     "kv_cache_tokens", "kv_free_tokens"}),
             "models": [m.name for m in c.models]}
            for c in generations.registry.live_cards()
        ]
    return web.json_response(body, status=200 if connected else 503)


def _may_see_details(request: web.Request) -> bool:
    try:
        check_api_key(request)
    except APIError:
        return False
    return True
