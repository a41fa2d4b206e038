"""`python -m workbench serve`: an OpenAI-compatible chat-completions endpoint for a checkpoint.

POST /v1/chat/completions (messages, temperature, top_p, max_tokens, seed, n, logprobs,
top_logprobs) and GET /v1/models: what external evaluation tools (AlpacaEval, Arena-Hard) and the
workbench's HTTP judge call. Binds to 127.0.0.1 unless told otherwise; with INSPO_SERVE_API_KEY set,
requests must carry it as a bearer token.
"""

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
    model: str = opt("", "checkpoint directory (a run's final/ or any causal LM)")
    host: str = opt("127.0.0.1", "interface to bind (127.0.0.1 keeps it local)")
    port: int = opt(8000, "port")
    name: str | None = opt(None, "model name reported by /v1/models (default: the directory name)")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own code")
    max_new_tokens: int = opt(512, "cap on max_tokens per request")

    def __post_init__(self):
        if not self.model:
            raise ValueError("serve needs --model PATH (a checkpoint directory)")


def build_app(cfg: ServeConfig):
    from fastapi import FastAPI, Header, HTTPException

    from inspo_core.generation import sampling_kwargs
    from inspo_core.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code).eval()
    name = cfg.name or os.path.basename(os.path.normpath(cfg.model))
    lock = threading.Lock()  # one generation at a time: the model is shared
    api_key = os.environ.get("INSPO_SERVE_API_KEY")

    app = FastAPI(title="InSPO Workbench serve")

    def check_key(authorization: str | None):
        if api_key and authorization != f"Bearer {api_key}":
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    @app.get("/v1/models")
    def models(authorization: str | None = Header(default=None)):
        check_key(authorization)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "inspo-workbench"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, authorization: str | None = Header(default=None)):
        check_key(authorization)
        if not req.messages:
            raise HTTPException(status_code=400, detail="messages must not be empty")
        if not 0 <= req.top_logprobs <= 20 or not 1 <= req.n <= 16:
            raise HTTPException(status_code=400, detail="top_logprobs must be 0..20 and n 1..16")
        msgs = [m.model_dump() for m in req.messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok("\n".join(m["content"] for m in msgs), return_tensors="pt")
        sampling = sampling_kwargs(tok, temperature=req.temperature, top_p=req.top_p,
                                   max_new_tokens=min(req.max_tokens, cfg.max_new_tokens), n=req.n)
        with lock, torch.no_grad():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = model.generate(**enc, **sampling, output_scores=req.logprobs, return_dict_in_generate=True)
        start = enc["input_ids"].shape[1]
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

    print(f"[inspo] serving {cfg.model} at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")
