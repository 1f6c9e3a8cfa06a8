"""llama.cpp side of bench/decode.py: a standalone script run with the llama-cpp-python venv's interpreter.

    .peers/llama/bin/python bench/llama_worker.py '{"op": "info", "model": "/path/x.gguf", "threads": 2}'
    .peers/llama/bin/python bench/llama_worker.py --serve < jobs.jsonl      # one JSON job per line, one reply each

Every job is a JSON object with "op" and the settings "model" (GGUF path), "threads" (n_threads and
n_threads_batch) and optionally "flash_attn" (bool, default false: llama-cpp-python's default). The model is
loaded once per (n_ctx, logits_all) and kept while serving. Token ids come from the caller (Sieve's tokenizer),
so both sides see exactly the same inputs. Replies are one JSON object each ({"error": "..."} on failure);
times are measured here, so the pipe and JSON costs of the caller are not in them.

ops:
    info          {} -> llama-cpp-python version, n_vocab, llama.cpp's system info (CPU features it uses)
    prefill       {"ids": [...]} -> seconds of `llm.eval(ids)` after `llm.reset()` (last-token logits only)
    decode        {"ids": [...], "new_tokens": N} -> seconds of N single-token decode steps, each `llm.eval([t])` and
                  an argmax over the logits; the prompt's eval and the first token's argmax are untimed.
                  Also "tokens": the N + 1 greedy tokens
    decode_batch  {"prompts": [[...], ...], "new_tokens": N} -> the same for B sequences decoded together through
                  the low-level batch API (one llama_decode of B tokens per step, one KV sequence per prompt)
    greedy        {"prompts": [[...], ...], "new_tokens": N} -> "tokens": greedy continuation of each prompt alone
    nll           {"windows": [[...], ...]} -> summed next-token NLL (natural log) and the count of predicted tokens
                  over the windows, each evaluated from an empty cache with logits for every position
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

_MODELS: dict[tuple, object] = {}


def _llama(job: dict, n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    key = (job["model"], n_ctx, logits_all, job["threads"], bool(job.get("flash_attn", False)))
    if key not in _MODELS:
        _MODELS[key] = Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx),
                             logits_all=logits_all, n_threads=job["threads"], n_threads_batch=job["threads"],
                             flash_attn=bool(job.get("flash_attn", False)), verbose=False)
    return _MODELS[key]


def _ctx_len(n: int) -> int:
    """n_ctx for n tokens: a multiple of 256, at least 512."""
    return max(512, -(-n // 256) * 256)


def _last_logits(llm, i: int = -1) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def op_info(job: dict) -> dict:
    import llama_cpp

    llm = _llama(job, 512, False)
    return {"llama_cpp_python": llama_cpp.__version__, "n_vocab": llm.n_vocab(),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def op_prefill(job: dict) -> dict:
    ids = job["ids"]
    llm = _llama(job, _ctx_len(len(ids)), False)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": len(ids)}


def op_decode(job: dict) -> dict:
    ids, n = job["ids"], job["new_tokens"]
    llm = _llama(job, _ctx_len(len(ids) + n + 1), False)
    llm.reset()
    llm.eval(ids)
    tok = int(_last_logits(llm).argmax())
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
        out.append(tok)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "decode_steps": n, "tokens": out}


def op_greedy(job: dict) -> dict:
    outs = []
    for ids in job["prompts"]:
        r = op_decode({**job, "ids": ids, "new_tokens": job["new_tokens"] - 1})
        outs.append(r["tokens"])
    return {"tokens": outs}


def op_decode_batch(job: dict) -> dict:
    """B sequences in one context (n_seq_max = B, a KV stream of `per_seq` cells each), decoded in lockstep."""
    import llama_cpp

    prompts, n = job["prompts"], job["new_tokens"]
    b = len(prompts)
    base = _llama(job, 512, False)  # the loaded model; this op makes its own context on it
    per_seq = _ctx_len(max(map(len, prompts)) + n + 1)
    total_prompt = sum(map(len, prompts))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = per_seq * b
    params.n_batch = max(total_prompt, b)
    params.n_ubatch = min(512, params.n_batch)
    params.n_seq_max = b
    params.n_threads = params.n_threads_batch = job["threads"]
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if job.get("flash_attn")
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(base.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, b)
    n_vocab = base.n_vocab()

    def logits(i: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    def decode() -> None:
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    try:
        # prompts: every sequence's tokens in one batch, logits at each sequence's last token (untimed)
        batch.n_tokens = total_prompt
        j, last = 0, []
        for s, ids in enumerate(prompts):
            for p, t in enumerate(ids):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, p, 1
                batch.seq_id[j][0] = s
                batch.logits[j] = p == len(ids) - 1
                j += 1
            last.append(j - 1)
        decode()
        toks = [int(logits(i).argmax()) for i in last]
        out = [[t] for t in toks]
        t0 = time.perf_counter()
        for step in range(n):
            batch.n_tokens = b
            for s in range(b):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = toks[s], len(prompts[s]) + step, 1
                batch.seq_id[s][0] = s
                batch.logits[s] = True
            decode()
            toks = [int(logits(s).argmax()) for s in range(b)]
            for s in range(b):
                out[s].append(toks[s])
        seconds = time.perf_counter() - t0
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {"seconds": seconds, "decode_steps": n, "batch": b, "tokens": out}


def op_nll(job: dict) -> dict:
    windows = job["windows"]
    llm = _llama(job, _ctx_len(max(map(len, windows))), True)
    total, count, t0 = 0.0, 0, time.perf_counter()
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        scores = llm.scores  # [n_ctx, vocab] float32; rows < len(ids) filled
        targets = np.asarray(ids[1:])
        for s in range(0, len(ids) - 1, 256):
            e = min(len(ids) - 1, s + 256)
            logits = scores[s:e].astype(np.float64)
            m = logits.max(-1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
            total += float((lse - logits[np.arange(e - s), targets[s:e]]).sum())
        count += len(ids) - 1
    return {"nll": total, "count": count, "seconds": time.perf_counter() - t0}


OPS = {"info": op_info, "prefill": op_prefill, "decode": op_decode, "decode_batch": op_decode_batch,
       "greedy": op_greedy, "nll": op_nll}


def handle(job: dict) -> dict:
    try:
        return OPS[job["op"]](job)
    except Exception as e:  # reported to the caller, which decides what to skip
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] != "--serve":
        print(json.dumps(handle(json.loads(args[0]))), flush=True)
        return
    if not args:  # one job on stdin
        print(json.dumps(handle(json.loads(sys.stdin.read()))), flush=True)
        return
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(handle(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
