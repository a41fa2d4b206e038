"""`python -m workbench serve`: an OpenAI-compatible chat-completions endpoint for a checkpoint.

POST /v1/chat/completions (messages, temperature, top_p, max_completion_tokens / max_tokens, stop, seed,
n, logprobs, top_logprobs, stream, stream_options.include_usage) and GET /v1/models: what external
evaluation tools (AlpacaEval, Arena-Hard), the official `openai` client and the workbench's HTTP judge
call. `stream: true` answers with server-sent `chat.completion.chunk` events ending in `data: [DONE]`;
a client that goes away stops its generation at the next token. Log-probs are the model's own
(log_softmax of the raw logits), whatever the temperature and top_p used to sample. Binds to 127.0.0.1
unless told otherwise; with an API key (--api_key, or INSPO_SERVE_API_KEY) requests must carry it as a
bearer token, checked before the body is read.

Bounded: a prompt longer than `max_input_tokens` (default: the model's context), or one that cannot fit
the context together with the tokens asked for, is refused with 400 before it reaches the model;
requests beyond `max_queue` waiting ones get 429; parameters are validated as the OpenAI API does (400
naming the field), and a field that would change the output but is not implemented here
(presence_penalty, logit_bias, tools, response_format other than text, ...) is refused with 400, never
dropped."""

import json
import math
import os
import queue
import threading
import time
import uuid

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from workbench.serve_config import ServeConfig


DEFAULT_MAX_TOKENS = 128  # when the request names no max_tokens / max_completion_tokens
# Fields of the OpenAI API that cannot change the output: accepted whatever their value.
HARMLESS_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                   "parallel_tool_calls"}
# Fields this server does not implement, with the values that mean "off" (null always does). Any other
# value, and any field named nowhere here, is refused: dropping it would answer a different request.
NEUTRAL_VALUES = {"presence_penalty": [0], "frequency_penalty": [0], "logit_bias": [{}], "tools": [[]],
                  "tool_choice": ["none", "auto"], "functions": [[]], "function_call": ["none"],
                  "response_format": [{"type": "text"}], "modalities": [["text"]]}


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked against the lists above, never dropped silently

    model: str | None = None
    messages: list[Message]
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, body):
        """The API takes null for "the default" on every optional field."""
        if isinstance(body, dict):
            return {k: v for k, v in body.items() if v is not None or k not in cls.model_fields}
        return body

    @property
    def budget_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def not_unicode(text: str) -> str | None:
    """The first lone surrogate in `text` (valid JSON, but not text a tokenizer can read), else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return repr(text[e.start])


def validate(req: ChatRequest) -> list[str]:
    """Problems with a request's parameters, each naming its field (OpenAI's rules)."""
    problems = []
    if not req.messages:
        problems.append("messages: must not be empty")
    for i, m in enumerate(req.messages):
        for field in ("role", "content"):
            if bad := not_unicode(getattr(m, field)):
                problems.append(f"messages.{i}.{field}: contains a lone surrogate {bad}, which is not Unicode text")
    if not math.isfinite(req.temperature) or not 0 <= req.temperature <= 2:
        problems.append(f"temperature: must be a number in [0, 2], got {req.temperature}")
    if not math.isfinite(req.top_p) or not 0 < req.top_p <= 1:
        problems.append(f"top_p: must be in (0, 1], got {req.top_p}")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field)
        if value is not None and value < 1:
            problems.append(f"{field}: must be >= 1, got {value}")
    if None not in (req.max_tokens, req.max_completion_tokens) and req.max_tokens != req.max_completion_tokens:
        problems.append(f"max_completion_tokens: {req.max_completion_tokens} disagrees with max_tokens "
                        f"{req.max_tokens}; send one of them")
    stops = req.stops
    if len(stops) > 4:
        problems.append(f"stop: at most 4 stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        problems.append("stop: stop strings must not be empty")
    if any(not_unicode(s) for s in stops):
        problems.append("stop: contains a lone surrogate, which is not Unicode text")
    if not 1 <= req.n <= 16:
        problems.append(f"n: must be in 1..16, got {req.n}")
    elif req.n > 1 and req.temperature == 0:
        problems.append("n: more than one choice needs sampling (temperature > 0); greedy decoding gives one answer")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        problems.append(f"seed: must be an integer in [-2^63, 2^64), got {req.seed}")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= 20:
            problems.append(f"top_logprobs: must be in 0..20, got {req.top_logprobs}")
        elif req.top_logprobs and not req.logprobs:
            problems.append("top_logprobs: needs logprobs: true")
    if req.stream_options is not None:
        if not req.stream:
            problems.append("stream_options: only with stream: true")
        elif set(req.stream_options) - {"include_usage"} or not isinstance(
                req.stream_options.get("include_usage", False), bool):
            problems.append(f"stream_options: only include_usage (true/false) is supported, got {req.stream_options}")
    for field, value in (req.model_extra or {}).items():
        if field in HARMLESS_FIELDS or value is None or value in NEUTRAL_VALUES.get(field, []):
            continue
        problems.append(f"{field}: not implemented by this server (it would change the output), got "
                        f"{json.dumps(value)[:80]}")
    return problems


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """[n, V] logits -> [n, V] probabilities restricted to the smallest set of tokens holding top_p of
    the mass (the most likely token always stays)."""
    probs = torch.softmax(logits, -1)
    if top_p < 1:
        ranked, order = probs.sort(-1, descending=True)
        ranked[ranked.cumsum(-1) - ranked >= top_p] = 0  # the mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    return probs


@torch.no_grad()
def sample_steps(model, ids: list[int], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 generator: torch.Generator):
    """Yield per new position the chosen tokens [n] and the model's own log-probs [n, V] (log_softmax of
    the raw logits, before temperature and top-p: what the OpenAI API reports). n rows of one prompt,
    so no padding; the caller stops when every row is finished."""
    x = torch.tensor([ids] * n, device=next(model.parameters()).device)
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logp = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()
        if temperature == 0:
            chosen = logp.argmax(-1)
        else:
            chosen = torch.multinomial(nucleus(logp / temperature, top_p), 1, generator=generator)[:, 0]
        yield chosen, logp
        x = chosen[:, None].to(x.device)


class Choice:
    """One answer being decoded: its text (cut before the first stop string), token count, log-probs,
    and how much of the text a stream has already sent."""

    def __init__(self, index: int, tok, *, stops: list[str], end_ids: set[int], top_logprobs: int | None):
        self.index, self.tok, self.stops, self.end_ids, self.top = index, tok, stops, end_ids, top_logprobs
        self.ids: list[int] = []
        self.text, self.sent, self.tokens, self.finish = "", 0, 0, None
        self.logprobs: list[dict] = []
        self.unsent_logprobs: list[dict] = []

    def entry(self, tid: int, logp: torch.Tensor) -> dict:
        token = self.tok.decode([tid])
        e = {"token": token, "logprob": float(logp[tid]), "bytes": list(token.encode("utf-8"))}
        if self.top is not None:
            vals, idx = logp.topk(self.top)
            e["top_logprobs"] = [{"token": (t := self.tok.decode([j])), "logprob": float(v),
                                  "bytes": list(t.encode("utf-8"))} for v, j in zip(vals.tolist(), idx.tolist())]
        return e

    def add(self, tid: int, logp: torch.Tensor | None) -> None:
        """logp: [V], the model's own log-probs at this position (None: not asked for)."""
        self.tokens += 1
        if logp is not None:
            e = self.entry(tid, logp)
            self.logprobs.append(e)
            self.unsent_logprobs.append(e)
        if tid in self.end_ids:
            self.finish = "stop"
            return
        self.ids.append(tid)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        cuts = [self.text.find(s) for s in self.stops if s in self.text]
        if cuts:
            self.text, self.finish = self.text[:min(cuts)], "stop"

    def take(self) -> str:
        """Text a stream may send now: held back while it could still become (part of) a stop string or
        ends in an unfinished UTF-8 character; all of it once the choice is finished."""
        end = len(self.text)
        if self.finish is None:
            end -= max((len(s) for s in self.stops), default=1) - 1
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta


def build_app(cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from inspo_core.generation import context_length
    from inspo_core.models import load_model, load_tokenizer

    from inspo_core.catalog import resolve_model

    source = resolve_model(cfg.model, cfg.cache_dir)
    tok = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
    model = load_model(source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code).eval()
    name = cfg.name or os.path.basename(os.path.normpath(cfg.model))
    lock = threading.Lock()  # one generation at a time: the model is shared
    waiting = threading.BoundedSemaphore(cfg.max_queue)
    api_key = cfg.api_key or os.environ.get("INSPO_SERVE_API_KEY")
    max_input = cfg.max_input_tokens or context_length(model)

    app = FastAPI(title="InSPO Workbench serve")

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                                   "param": param}})

    @app.middleware("http")
    async def check_key(request: Request, call_next):  # before the body is read or parsed
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(x) for x in first.get("loc", [])[1:]) or "body"
        return error(400, f"{field}: {first.get('msg', 'invalid request body')}", field)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "inspo-workbench"}]}

    end_ids = {tok.eos_token_id} - {None}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    end_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
    context = context_length(model)

    def decode(req: ChatRequest, ids: list[int], max_new: int, on_step=None, cancelled=lambda: False) -> list[Choice]:
        """The request's choices, decoded under the model lock; `on_step(choice)` after each new token."""
        generator = torch.Generator()
        if req.seed is not None:
            generator.manual_seed(req.seed)
        else:
            generator.seed()
        choices = [Choice(i, tok, stops=req.stops, end_ids=end_ids,
                          top_logprobs=req.top_logprobs if req.logprobs else None) for i in range(req.n)]
        with lock:
            steps = sample_steps(model, ids, n=req.n, temperature=req.temperature, top_p=req.top_p,
                                 max_new_tokens=max_new, generator=generator)
            for chosen, logp in steps:
                for c in choices:
                    if c.finish is None:
                        c.add(int(chosen[c.index]), logp[c.index] if req.logprobs else None)
                        if on_step:
                            on_step(c)
                if all(c.finish for c in choices) or cancelled():
                    break
            steps.close()
        for c in choices:
            if c.finish is None:
                c.finish = "length"
                if on_step:
                    on_step(c)
        return choices

    def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        problems = validate(req)
        if problems:
            return error(400, "; ".join(problems), problems[0].split(":")[0])
        msgs = [m.model_dump() for m in req.messages]
        chars = sum(len(m["content"]) for m in msgs)
        if chars > 32 * max_input:  # no tokenizer yields fewer than 1 token per 32 characters of text
            return error(400, f"messages: {chars} characters is beyond the input limit of {max_input} tokens",
                         "messages")
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok("\n".join(m["content"] for m in msgs))["input_ids"]
        start = len(ids)
        if start > max_input:
            return error(400, f"messages: the prompt has {start} tokens, more than the limit of {max_input}",
                         "messages")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:  # as the API does: as much as the context (and this server's cap) leaves
            max_new = min(DEFAULT_MAX_TOKENS, cfg.max_new_tokens, context - start)
            if max_new < 1:
                return error(400, f"messages: the prompt has {start} tokens and fills the model's context of "
                             f"{context} tokens", "messages")
        else:
            max_new = min(asked, cfg.max_new_tokens)
            if start + max_new > context:  # eval refuses the same case (inspo_core.generation.prompt_ids)
                return error(400, f"{req.budget_field}: the prompt has {start} tokens; with {max_new} new tokens it "
                             f"exceeds the model's context of {context} tokens", req.budget_field)
        if not waiting.acquire(blocking=False):
            return error(429, f"busy: {cfg.max_queue} requests are already waiting; retry later")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": name}
        if req.stream:
            return stream(req, ids, max_new, head)
        try:
            choices = decode(req, ids, max_new)
        finally:
            waiting.release()
        return {**head, "object": "chat.completion", "usage": usage(start, choices), "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
             **({"logprobs": {"content": c.logprobs}} if req.logprobs else {})} for c in choices]}

    def stream(req: ChatRequest, ids: list[int], max_new: int, head: dict):
        """Server-sent events in the chat.completion.chunk format, ending in `data: [DONE]`. The model runs in
        its own thread; a client that goes away stops it at the next token."""
        import anyio
        from fastapi.responses import StreamingResponse

        events: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
            return {**head, "object": "chat.completion.chunk", "choices": [{
                "index": index, "delta": delta, "finish_reason": finish,
                "logprobs": {"content": logprobs} if logprobs is not None else None}]}

        def on_step(c: Choice) -> None:
            text, lps = c.take(), c.unsent_logprobs
            c.unsent_logprobs = []
            if text or lps:
                events.put(chunk(c.index, {"content": text}, logprobs=lps if req.logprobs else None))
            if c.finish:
                events.put(chunk(c.index, {}, c.finish))

        def produce() -> None:
            try:
                for i in range(req.n):
                    events.put(chunk(i, {"role": "assistant", "content": ""}))
                choices = decode(req, ids, max_new, on_step, cancel.is_set)
                if (req.stream_options or {}).get("include_usage"):
                    events.put({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": usage(len(ids), choices)})
                events.put("[DONE]")
            except Exception as e:  # the status is sent already: the API's in-stream error event
                events.put({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
            finally:
                waiting.release()
                events.put(None)

        threading.Thread(target=produce, daemon=True).start()

        async def body():
            try:
                while (item := await anyio.to_thread.run_sync(events.get, abandon_on_cancel=True)) is not None:
                    yield f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"
            finally:
                cancel.set()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    if not (cfg.api_key or os.environ.get("INSPO_SERVE_API_KEY")):
        print("[inspo] warning: serving without an API key; anyone who can reach the port can use the model "
              "(set INSPO_SERVE_API_KEY or --api_key)", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[inspo] warning: binding to {cfg.host}, reachable from other machines", flush=True)
    print(f"[inspo] serving {cfg.model} at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")
