"""`python -m workbench serve`: an OpenAI-compatible chat-completions endpoint for a checkpoint.

POST /v1/chat/completions (messages, temperature, top_p, max_tokens, seed, n, logprobs,
top_logprobs) and GET /v1/models: what external evaluation tools (AlpacaEval, Arena-Hard) and the
workbench's HTTP judge call. Binds to 127.0.0.1 unless told otherwise; with an API key (--api_key, or
INSPO_SERVE_API_KEY) requests must carry it as a bearer token, checked before the body is read.

Bounded: a prompt longer than `max_input_tokens` (default: the model's context) is refused with 400
before it reaches the model, requests beyond `max_queue` waiting ones get 429, and parameters are
validated as the OpenAI API does (400 naming the field).
"""

import math
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from inspo_core.config import opt


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message]
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 128
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class ServeConfig:
    model: str = opt("", "checkpoint directory (a run's final/ or any causal LM), a .gguf file or a name (smollm2)")
    cache_dir: str = opt(".cache/inspo", "where named models are materialised")
    host: str = opt("127.0.0.1", "interface to bind (127.0.0.1 keeps it local)")
    port: int = opt(8000, "port")
    name: str | None = opt(None, "model name reported by /v1/models (default: the directory name)")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own code")
    max_new_tokens: int = opt(512, "cap on max_tokens per request")
    max_input_tokens: int | None = opt(None, "refuse prompts longer than this (default: the model's context length)")
    max_queue: int = opt(8, "requests that may wait for the model at once; more get HTTP 429")
    api_key: str | None = opt(None, "bearer token clients must send (default: the environment variable "
                              "INSPO_SERVE_API_KEY; none: no authentication)")

    def __post_init__(self):
        if not self.model:
            raise ValueError("serve needs --model PATH (a checkpoint directory)")
        if self.max_queue < 1 or self.max_new_tokens < 1:
            raise ValueError("max_queue and max_new_tokens must be >= 1")


def validate(req: ChatRequest) -> list[str]:
    """Problems with a request's parameters, each naming its field (OpenAI's rules)."""
    problems = []
    if not req.messages:
        problems.append("messages: must not be empty")
    if not math.isfinite(req.temperature) or not 0 <= req.temperature <= 2:
        problems.append(f"temperature: must be a number in [0, 2], got {req.temperature}")
    if not math.isfinite(req.top_p) or not 0 < req.top_p <= 1:
        problems.append(f"top_p: must be in (0, 1], got {req.top_p}")
    if req.max_tokens < 1:
        problems.append(f"max_tokens: must be >= 1, got {req.max_tokens}")
    if not 1 <= req.n <= 16:
        problems.append(f"n: must be in 1..16, got {req.n}")
    elif req.n > 1 and req.temperature == 0:
        problems.append("n: more than one choice needs sampling (temperature > 0); greedy decoding gives one answer")
    if not 0 <= req.top_logprobs <= 20:
        problems.append(f"top_logprobs: must be in 0..20, got {req.top_logprobs}")
    return problems


def build_app(cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from inspo_core.generation import context_length, sampling_kwargs
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
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok("\n".join(m["content"] for m in msgs), return_tensors="pt")
        start = enc["input_ids"].shape[1]
        if start > max_input:
            return error(400, f"messages: the prompt has {start} tokens, more than the limit of {max_input}",
                         "messages")
        if not waiting.acquire(blocking=False):
            return error(429, f"busy: {cfg.max_queue} requests are already waiting; retry later")
        sampling = sampling_kwargs(tok, temperature=req.temperature, top_p=req.top_p,
                                   max_new_tokens=min(req.max_tokens, cfg.max_new_tokens), n=req.n)
        try:
            with lock, torch.no_grad():
                if req.seed is not None:
                    torch.manual_seed(req.seed)
                out = model.generate(**enc, **sampling, output_scores=req.logprobs, return_dict_in_generate=True)
        finally:
            waiting.release()
        choices = []
        for i, seq in enumerate(out.sequences):
            gen = seq[start:]
            ids = [t for t in gen.tolist() if t not in (tok.pad_token_id, tok.eos_token_id)]
            choice = {"index": i, "message": {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)},
                      "finish_reason": "stop" if tok.eos_token_id in gen.tolist() else "length"}
            if req.logprobs:
                content = []
                for step, scores in enumerate(out.scores):
                    if step >= len(gen) or gen[step].item() in (tok.pad_token_id,):
                        break
                    logp = torch.log_softmax(scores[i].float(), -1)
                    tid = gen[step].item()
                    entry = {"token": tok.decode([tid]), "logprob": float(logp[tid])}
                    if req.top_logprobs:
                        vals, idx = logp.topk(req.top_logprobs)
                        entry["top_logprobs"] = [{"token": tok.decode([j]), "logprob": float(v)}
                                                 for v, j in zip(vals.tolist(), idx.tolist())]
                    content.append(entry)
                    if tid == tok.eos_token_id:
                        break
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": start, "completion_tokens": int(sum(len(c) for c in out.sequences) - start * len(choices))}}

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
