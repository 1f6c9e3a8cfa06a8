"""Backbone decode and prefill speed and quantization quality on CPU: Sieve vs llama.cpp vs HF transformers.

All on SmolLM2-135M-Instruct from the packaged Q4_1 GGUF, in one run, with the systems' repetitions interleaved:

    sieve-fp32        Sieve's decoder, fp32 weights (the GGUF dequantized), eager
    sieve-int8        weight-only int8 after activation-aware channel equalization (`apply_speed_options(model,
                      quant="int8")`, as the CLI and the service run it), decode step compiled by
                      `compile_decode`'s default (AOTInductor on CPU, backbone/aot.py)
    sieve-int8-rtn    the same without equalization: plain round-to-nearest per channel (quality rows only)
    sieve-int4        int4 g32 body + int8 prefill head + int4 decode head (`quantize(model, "int4")`), compiled
    sieve-int4-inductor  the same int4 model, decode step compiled with torch.compile instead (decode rows only)
    sieve-int4-eager  the same int4 model, not compiled (decode rows only: prefill and quality are sieve-int4's)
    hf-transformers   HF LlamaForCausalLM, fp32 weights (the same GGUF dequantized), eager
    llama.cpp         llama-cpp-python on the GGUF as is, in its own venv (.peers/llama) through bench/llama_worker.py,
                      a subprocess that takes one job at a time, so it never runs at the same time as the others

Speed (tokens/s): batch-1 greedy decode of `--decode-tokens` new tokens; batch-8 decode (8 prompts of different
lengths, left-padded); prefill of `--prefill-lengths` tokens of WikiText-2 (last-position logits only). Decode time
counts decode steps only: every system generates N + 1 tokens and the clock runs from the first generated token
(prefill and its sampling done) to the last, i.e. N single-token forward passes plus N argmaxes.
Quality: WikiText-2 raw test perplexity on `--ppl-windows` non-overlapping 2048-token windows (the same token ids
for every system: Sieve's tokenizer, fed to llama.cpp as ids), and greedy agreement with sieve-fp32 over 32 tokens
on `--agreement-prompts` chat prompts (the first WikiText test lines of >= 20 words).

Prints a table, writes bench/results/NAME.json and NAME.png. The machine should be otherwise idle (about 15-20
minutes on 2 threads, the compile warm-ups included; AOTInductor libraries are compiled into a temporary folder,
so every run pays their compilation during its warm-ups):

    python bench/decode.py --threads 2                                 # bench/results/decode.json
    python bench/decode.py --quick --threads 1 --name decode-smoke     # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_results  # noqa: E402
from sieve.backbone import load_backbone, stream  # noqa: E402
from sieve.backbone.generate import compile_decode, generate, left_pad  # noqa: E402
from sieve.backbone.quant import quant_summary  # noqa: E402
from sieve.backbone.runtime import apply_speed_options  # noqa: E402

from sieve.registry import resolve_backbone  # noqa: E402
from sieve.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "llama_worker.py"
LLAMA_PYTHON = ROOT / ".peers" / "llama" / "bin" / "python"
HF, LLAMA = "hf-transformers", "llama.cpp"
SIEVE_SYSTEMS = ("sieve-fp32", "sieve-int8", "sieve-int4", "sieve-int4-inductor", "sieve-int4-eager")
DECODE_ONLY = ("sieve-int4-inductor", "sieve-int4-eager")  # prefill and quality rows are sieve-int4's
QUALITY_SYSTEMS = ("sieve-fp32", "sieve-int8", "sieve-int8-rtn", "sieve-int4")
DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

# one decoding run: -> (seconds counted, generated tokens of row 0 or None)
Run = Callable[[], tuple[float, list[int] | None]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp n_threads")
    ap.add_argument("--decode-tokens", type=int, default=128, help="new tokens per decode run (batch 1 and batch 8)")
    ap.add_argument("--batch", type=int, default=8, help="prompts of the batched decode run")
    ap.add_argument("--prefill-lengths", default="512,2048", help="prefill lengths in tokens, comma separated")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions per system (median reported)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 test windows for perplexity")
    ap.add_argument("--ppl-window", type=int, default=2048, help="tokens per perplexity window")
    ap.add_argument("--agreement-prompts", type=int, default=20)
    ap.add_argument("--agreement-tokens", type=int, default=32)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON, help="python of the llama-cpp-python venv")
    ap.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp flash attention (off by default, "
                    "as in llama-cpp-python)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: 16 decode tokens, prefill 128, "
                    "1 perplexity window of 256 tokens, 3 agreement prompts, 2 repetitions")
    ap.add_argument("--name", default="decode")
    args = ap.parse_args()
    if args.quick:
        args.decode_tokens, args.prefill_lengths, args.repeat = 16, "128", 2
        args.ppl_windows, args.ppl_window, args.agreement_prompts = 1, 256, 3
    torch.set_num_threads(args.threads)
    # Several compiled models and shapes share `Transformer.decode_step`'s code object: keep every recompile static
    # (otherwise the second shape or model seen gets a dynamic-shape graph) and let all of them stay cached.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    from rich.console import Console

    console = Console()
    bench = Bench(args, console)
    try:
        if not args.skip_quality:
            bench.quality()
        if not args.skip_speed:
            bench.speed()
    finally:
        if bench.llama is not None:
            bench.llama.close()
    bench.report()


class LlamaPeer:
    """bench/llama_worker.py in the llama-cpp-python venv, serving one JSON job per line."""

    def __init__(self, python: Path, gguf: Path, threads: int, flash_attn: bool):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(python), str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.settings = {"model": str(gguf), "threads": threads, "flash_attn": flash_attn}
        self.info = self("info")

    def __call__(self, op: str, **job) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **self.settings, **job}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"llama.cpp worker exited ({self.proc.poll()}): {self.log.read()[-2000:]}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"llama.cpp worker, {op}: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


class Bench:
    def __init__(self, args, console):
        self.args, self.console = args, console
        self.rows: list[dict] = []
        self.notes: dict[str, str] = {}
        self.systems: dict[str, str] = {}
        self.path = resolve_backbone("smollm2-135m-instruct")
        self.home = Settings().home / "cache"
        self._sieve: dict[str, object] = {}
        self._hf = None
        with console.status("loading sieve-fp32 and tokenizing WikiText-2 test"):
            fp32 = self.sieve("sieve-fp32")
            self.tok = self.bb.tokenizer
            self.pad = self.tok.pad_id
            data = Settings().data_path() / "text" / "wikitext-2-raw" / "test.txt"
            text = data.read_text()
            self.wiki = self.tok.encode(text)
            self.lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 20]
        console.log(f"wikitext-2-raw test: {len(self.wiki)} tokens; model {fp32.num_parameters() / 1e6:.0f}M params")
        self.llama = self._start_llama()

    # -- systems --------------------------------------------------------------------------------------------------

    def sieve(self, system: str):
        """The Transformer of a Sieve system, loaded (and quantized, compiled) on first use."""
        if system not in self._sieve:
            bb = load_backbone(self.path, home=self.home, device="cpu", dtype="float32")
            scheme = {"sieve-int8": "int8", "sieve-int8-rtn": "int8", "sieve-int4": "int4",
                      "sieve-int4-inductor": "int4", "sieve-int4-eager": "int4"}.get(system)
            # the service's path (int8: channels equalized first), except sieve-int8-rtn; fp32 stays unpacked
            apply_speed_options(bb.model, quant=scheme, pack=False, calibration_dir=self.home / "calibration",
                                equalize_int8=system != "sieve-int8-rtn")
            backend = {"sieve-int8": "aot", "sieve-int8-rtn": "aot", "sieve-int4": "aot",
                       "sieve-int4-inductor": "inductor"}.get(system)
            if backend:
                compile_decode(bb.model, backend=backend)
            q = quant_summary(bb.model)
            weights = "fp32 (the GGUF dequantized)" if not scheme else (
                f"{q['scheme']} body, {q['lm_head']} head, decode head {q['decode_lm_head']}")
            if scheme == "int8":
                weights += f", channels {q.get('int8_channels', 'plain round-to-nearest')}"
            how = {"aot": "decode step compiled by AOTInductor (backbone/aot.py)",
                   "inductor": "decode step torch.compile'd (inductor, C++ wrapper)"}.get(backend, "eager")
            self.systems[system] = f"Sieve, {weights}, {how}"
            if system == "sieve-fp32":
                self.bb = bb
            self._sieve[system] = bb.model
        return self._sieve[system]

    def hf(self):
        if self._hf is None:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                      dtype=torch.float32).eval()
            hf.generation_config.eos_token_id = None  # every run generates all its tokens
            hf.generation_config.pad_token_id = self.pad
            import transformers

            self.systems[HF] = f"HF transformers {transformers.__version__} LlamaForCausalLM, fp32 (the GGUF " \
                               "dequantized), eager, attn_implementation=" + str(hf.config._attn_implementation)
            self._hf = hf
        return self._hf

    def _start_llama(self) -> LlamaPeer | None:
        if self.args.no_llama:
            self.notes["llama.cpp"] = "left out (--no-llama)"
            return None
        if not self.args.llama_python.exists():
            msg = (f"llama.cpp rows skipped: no llama-cpp-python venv at {self.args.llama_python} "
                   "(make peers)")
            self.console.print(f"[yellow]{msg}[/]")
            self.notes["llama.cpp"] = msg
            return None
        with self.console.status("starting the llama.cpp worker"):
            peer = LlamaPeer(self.args.llama_python, self.path, self.args.threads, self.args.llama_flash_attn)
        self.systems[LLAMA] = (f"llama-cpp-python {peer.info['llama_cpp_python']}, the Q4_1 GGUF as is, n_threads="
                               f"{self.args.threads}, flash_attn={self.args.llama_flash_attn}")
        self.notes["llama.cpp cpu features"] = peer.info["system_info"]
        return peer

    # -- quality --------------------------------------------------------------------------------------------------

    def quality(self) -> None:
        a, c = self.args, self.console
        windows = [self.wiki[i * a.ppl_window: (i + 1) * a.ppl_window] for i in range(a.ppl_windows)]
        windows = [w for w in windows if len(w) == a.ppl_window]
        setting = f"wikitext-2-raw test, {len(windows)} x {a.ppl_window}-token windows"
        for system in (*QUALITY_SYSTEMS, LLAMA):
            if system == LLAMA and self.llama is None:
                continue
            t0 = time.perf_counter()
            with c.status(f"perplexity, {setting}: {system}"):
                if system == LLAMA:
                    r = self.attempt(LLAMA, lambda: self.llama("nll", windows=windows))
                    if r is None:
                        continue
                    nll, count = r["nll"], r["count"]
                else:
                    model = self.sieve(system)
                    nll, count = 0.0, 0
                    for w in windows:
                        s, n = window_nll(model, w)
                        nll, count = nll + s, count + n
            self.add(system, "perplexity", setting, round(math.exp(nll / count), 4), dataset="wikitext-2-raw",
                     split="test", windows=len(windows), window=a.ppl_window, tokens_scored=count,
                     seconds=round(time.perf_counter() - t0, 1))

        prompts = [self.bb.encode_prompt(" ".join(ln.split()[:60])) for ln in self.lines[: a.agreement_prompts]]
        k = a.agreement_tokens
        setting = f"{len(prompts)} chat prompts x {k} greedy tokens vs sieve-fp32"
        outs: dict[str, list[list[int]]] = {}
        found: list[tuple] = []
        for system in (*QUALITY_SYSTEMS, LLAMA):
            if system == LLAMA and self.llama is None:
                continue
            with c.status(f"greedy agreement, {setting}: {system} (the first compiled call compiles)"):
                if system == LLAMA:
                    r = self.attempt(LLAMA, lambda: self.llama("greedy", prompts=prompts, new_tokens=k))
                    if r is None:
                        continue
                    outs[system] = r["tokens"]
                else:
                    model = self.sieve(system)
                    outs[system] = [generate(model, [p], max_new_tokens=k, pad_id=self.pad)[0] for p in prompts]
            if system != "sieve-fp32":
                found.append((system, *agreement(outs["sieve-fp32"], outs[system])))
        for system, exact, _ in found:
            self.add(system, "greedy_exact_match", setting, round(exact, 4), prompts=len(prompts), tokens=k)
        for system, _, prefix in found:
            self.add(system, "greedy_mean_prefix_tokens", setting, round(prefix, 2), prompts=len(prompts), tokens=k)

    # -- speed ----------------------------------------------------------------------------------------------------

    def speed(self) -> None:
        a = self.args
        n = a.decode_tokens
        for t in map(int, a.prefill_lengths.split(",")):
            ids = torch.tensor([self.wiki[:t]])
            runs: dict[str, Run] = {s: self._sieve_prefill(s, ids) for s in SIEVE_SYSTEMS if s not in DECODE_ONLY}
            runs[HF] = self._hf_prefill(ids)
            if self.llama is not None:
                runs[LLAMA] = lambda ids=ids: (self.llama("prefill", ids=ids[0].tolist())["seconds"], None)
            for system, (s, _) in self.paired(f"prefill {t} tokens", runs).items():
                self.add(system, "prefill_tokens_per_s", f"{t} tokens of WikiText-2", round(t / s, 1),
                         tokens=t, median_ms=round(s * 1e3, 1))

        prompt = self.bb.encode_prompt(DECODE_PROMPT)
        runs = {s: self._sieve_decode(s, [prompt]) for s in SIEVE_SYSTEMS}
        runs[HF] = self._hf_decode([prompt])
        if self.llama is not None:
            runs[LLAMA] = lambda: self._llama_decode("decode", ids=prompt)
        setting = f"batch 1, {n} new tokens after a {len(prompt)}-token chat prompt"
        results = self.paired(setting, runs)
        ref = results["sieve-fp32"][1]
        for system, (s, toks) in results.items():
            self.add(system, "decode_tokens_per_s", setting, round(n / s, 1), batch=1, new_tokens=n,
                     prompt_tokens=len(prompt), median_decode_ms=round(s * 1e3, 1),
                     same_prefix_as_sieve_fp32=None if system == "sieve-fp32" else common_prefix(ref, toks))

        words = [4 + 8 * i for i in range(a.batch)]
        prompts = [self.bb.encode_prompt(" ".join(ln.split()[:w])) for ln, w in zip(self.lines, words)]
        runs = {s: self._sieve_decode(s, prompts) for s in SIEVE_SYSTEMS}
        runs[HF] = self._hf_decode(prompts)
        if self.llama is not None:
            runs[LLAMA] = lambda: self._llama_decode("decode_batch", prompts=prompts)
        lengths = sorted(map(len, prompts))
        setting = (f"batch {len(prompts)}, {n} new tokens each after chat prompts of {lengths[0]}-{lengths[-1]} "
                   "tokens")
        for system, (s, _) in self.paired(setting, runs).items():
            self.add(system, "decode_tokens_per_s", setting, round(len(prompts) * n / s, 1), batch=len(prompts),
                     new_tokens=n, prompt_tokens=lengths, median_decode_ms=round(s * 1e3, 1))
        if self.llama is not None:
            self.notes["llama.cpp batch decode"] = (
                f"batch {len(prompts)}: one llama_decode of {len(prompts)} tokens per step, one KV sequence per "
                "prompt (n_seq_max = batch), through llama-cpp-python's low-level API (bench/llama_worker.py)")

    def _sieve_prefill(self, system: str, ids: torch.Tensor) -> Run:
        model = self.sieve(system)
        last = torch.tensor([ids.shape[1] - 1])

        def run():
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(ids, return_hidden=False, logits_at=last)
            return time.perf_counter() - t0, None
        return run

    def _hf_prefill(self, ids: torch.Tensor) -> Run:
        hf = self.hf()

        def run():
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf(ids, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t0, None
        return run

    def _sieve_decode(self, system: str, prompts: list[list[int]]) -> Run:
        model, n = self.sieve(system), self.args.decode_tokens

        def run():
            times, row0 = [], []
            for step in stream(model, prompts, max_new_tokens=n + 1, pad_id=self.pad):
                times.append(time.perf_counter())  # after the prefill (first step) or a decode step, and argmax
                row0.append(int(step.tokens[0]))
            assert len(times) == n + 1, f"{system} generated {len(times)} tokens, not {n + 1}"
            return times[-1] - times[0], row0
        return run

    def _hf_decode(self, prompts: list[list[int]]) -> Run:
        from transformers.generation.streamers import BaseStreamer

        hf, n = self.hf(), self.args.decode_tokens
        ids, mask = left_pad(prompts, self.pad)
        mask = torch.ones_like(ids) if mask is None else mask

        class Clock(BaseStreamer):
            """Times every `put`: the prompt (before prefill), then each generated token."""

            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        def run():
            clock = Clock()
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n + 1,
                                  min_new_tokens=n + 1, streamer=clock)
            assert len(clock.times) == n + 2, f"hf generated {len(clock.times) - 1} tokens, not {n + 1}"
            return clock.times[-1] - clock.times[1], out[0, ids.shape[1]:].tolist()
        return run

    def _llama_decode(self, op: str, **job) -> tuple[float, list[int] | None]:
        r = self.llama(op, new_tokens=self.args.decode_tokens, **job)
        toks = r["tokens"][0] if op == "decode_batch" else r["tokens"]
        return r["seconds"], toks

    def paired(self, what: str, runs: dict[str, Run]) -> dict[str, tuple[float, list[int] | None]]:
        """Like common.timeit_paired (warm up every system, then repetitions interleaved A B C A B C, medians),
        but each run reports the seconds to count: decode runs leave out their prefill, and llama.cpp's worker
        times itself, so the pipe to it is not counted."""
        runs = dict(runs)
        times: dict[str, list[float]] = {s: [] for s in runs}
        last: dict[str, list[int] | None] = {}
        t0 = time.perf_counter()
        with self.console.status(what) as status:
            for system, run in list(runs.items()):
                status.update(f"{what}: warming up {system} (a compiled system compiles at a new shape)")
                if self.attempt(system, run) is None:
                    del runs[system], times[system]
            for i in range(self.args.repeat):
                for system, run in list(runs.items()):
                    status.update(f"{what}: {system}, repetition {i + 1}/{self.args.repeat}")
                    out = self.attempt(system, run)
                    if out is None:
                        del runs[system], times[system]
                        continue
                    times[system].append(out[0])
                    last[system] = out[1]
        self.console.log(f"{what}: {time.perf_counter() - t0:.0f} s")
        return {s: (statistics.median(ts), last[s]) for s, ts in times.items()}

    def attempt(self, system: str, fn: Callable[[], object]):
        """fn(); when llama.cpp's worker fails, its rows are left out from then on (with a note) and -> None."""
        if system != LLAMA:
            return fn()
        if self.llama is None:
            return None
        try:
            return fn()
        except (RuntimeError, OSError, ValueError) as e:
            msg = f"llama.cpp left out from here on after an error: {e}"
            self.console.print(f"[yellow]{msg}[/]")
            self.notes["llama.cpp"] = msg
            self.llama.close()
            self.llama = None
            return None

    # -- output ---------------------------------------------------------------------------------------------------

    def add(self, system: str, metric: str, setting: str, value: float, **extra) -> None:
        row = {"system": system, "metric": metric, "setting": setting, "value": value, "threads": self.args.threads,
               **extra}
        self.rows.append(row)
        self.console.log(f"{metric} | {setting} | {system}: {value}")

    def report(self) -> None:
        from rich.table import Table

        add_ratios(self.rows)
        a = self.args
        device = device_name("cpu") + f", torch.set_num_threads({a.threads}), llama.cpp n_threads={a.threads}"
        table = Table(title=f"SmolLM2-135M decode / prefill / quality\n{device}")
        for col in ("measure", "system", "value", "vs llama.cpp", "vs HF"):
            table.add_column(col, justify="left" if col in ("measure", "system") else "right")
        previous = None
        for r in self.rows:
            if previous is not None and label(r) != previous:
                table.add_section()
            previous = label(r)
            table.add_row(label(r), r["system"], str(r["value"]), fmt_ratio(r.get("vs_llama_cpp")),
                          fmt_ratio(r.get("vs_hf_transformers")))
        self.console.print(table)
        self.notes.update({
            "decode timing": "every system generates N + 1 greedy tokens and the clock runs from the first generated "
            "token (prefill and its argmax done) to the last: N single-token forward passes and argmaxes. Sieve: "
            "timestamps at sieve.backbone.stream's yields; HF: a generate() streamer's put() calls (the first put is "
            "the prompt, the second the first generated token); llama.cpp: the worker evals the prompt, takes the "
            "argmax, then times N x (llm.eval([token]) + argmax of the logits).",
            "prefill timing": "one forward pass over the tokens with last-position logits: Sieve model(ids, "
            "logits_at=[T-1]) without KV cache; HF model(ids, use_cache=False, logits_to_keep=1); llama.cpp "
            "llm.eval(ids) after llm.reset() (n_batch = n_ctx, n_ubatch 512, logits_all off). Quantized Sieve models "
            "prefill with their bf16 dequantized weight copies (rows >= 32), made during the warm-up.",
            "ratios": "vs_llama_cpp / vs_hf_transformers = value / that system's value for the same metric and "
            "setting (speed: > 1 is faster; perplexity: < 1 is lower)",
            "repetitions": f"{a.repeat} interleaved repetitions after one warm-up run per system; medians",
            "sieve-int4-eager, sieve-int4-inductor": "prefill and quality rows are sieve-int4's (the same weights "
            "and eager prefill path)",
            "perplexity": "the same Sieve-tokenized ids for every system, no BOS added, non-overlapping windows from "
            "the start of test.txt, every position after a window's first token scored (llama.cpp: logits_all, NLL "
            "computed by the worker from llm.scores)",
            "greedy agreement": "prompts: the first WikiText-2 test lines of >= 20 words, cut to 60 words, as one "
            "chat user turn; each prompt alone (batch 1), no stop tokens; compared token by token with sieve-fp32 "
            "(eager); sieve-int8/int4 decode with their compiled step",
            "compiled decode": "sieve-int8/int4: AOTInductor, one library per (model, batch, cache length), "
            "compiled during the warm-up into a temporary folder; sieve-int4-inductor: torch.compile with "
            "torch._dynamo.config.automatic_dynamic_shapes = False (each shape its own static graph)",
        })
        out = write_results(a.name, self.rows, device)
        payload = json.loads(out.read_text())
        payload.update({"systems": self.systems, "notes": self.notes})
        out.write_text(json.dumps(payload, indent=1) + "\n")
        if any(r["metric"].endswith("tokens_per_s") for r in self.rows):
            plot(self.rows, out.with_suffix(".png"), device)
        self.console.print(f"wrote {out}")


@torch.inference_mode()
def window_nll(model, ids: list[int], chunk: int = 512) -> tuple[float, int]:
    """Summed next-token NLL of one window, and how many tokens it predicted. The LM head (`model.head`, what
    `model(ids).logits` returns) is applied in chunks of positions: the vocabulary is 49K wide."""
    x = torch.tensor([ids])
    h = model(x, return_logits=False).hidden_states[0]  # [T, dim]
    total = 0.0
    for s in range(0, len(ids) - 1, chunk):
        e = min(len(ids) - 1, s + chunk)
        logits = model.head(h[s:e])
        total += torch.nn.functional.cross_entropy(logits, x[0, s + 1: e + 1], reduction="sum").item()
    return total, len(ids) - 1


def common_prefix(a: list[int] | None, b: list[int] | None) -> int | None:
    if a is None or b is None:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """-> (fraction of prompts whose tokens equal the reference's, mean length of the matching prefix)."""
    prefixes = [common_prefix(r, o) for r, o in zip(reference, other, strict=True)]
    exact = [r == o for r, o in zip(reference, other, strict=True)]
    return sum(exact) / len(exact), sum(prefixes) / len(prefixes)


def add_ratios(rows: list[dict]) -> None:
    """vs_llama_cpp / vs_hf_transformers: value over that system's value for the same metric and setting."""
    by_key = {(r["metric"], r["setting"], r["system"]): r["value"] for r in rows}
    for r in rows:
        for base, key in ((LLAMA, "vs_llama_cpp"), (HF, "vs_hf_transformers")):
            b = by_key.get((r["metric"], r["setting"], base))
            if b and r["system"] != base and r["metric"] in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                                             "perplexity"):
                r[key] = round(r["value"] / b, 3)


def label(row: dict) -> str:
    """A short name of a row's metric and setting for the console table (the JSON keeps the full setting)."""
    m = row["metric"]
    if m == "decode_tokens_per_s":
        return f"decode tok/s, batch {row['batch']}"
    if m == "prefill_tokens_per_s":
        return f"prefill tok/s, {row['tokens']} tok"
    if m == "perplexity":
        return f"perplexity, {row['windows']} x {row['window']}"
    if m == "greedy_exact_match":
        return f"greedy = fp32, {row['prompts']} prompts"
    if m == "greedy_mean_prefix_tokens":
        return f"greedy prefix of {row['tokens']}"
    return m


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [*SIEVE_SYSTEMS, LLAMA, HF]
    panels = [("decode (greedy)", "decode_tokens_per_s"), ("prefill", "prefill_tokens_per_s")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (title, metric) in zip(axes, panels):
        groups = list(dict.fromkeys(r["setting"] for r in rows if r["metric"] == metric))
        present = [s for s in systems if any(r["system"] == s and r["metric"] == metric for r in rows)]
        width = 0.8 / max(1, len(present))
        for i, system in enumerate(present):
            vals = {r["setting"]: r["value"] for r in rows if r["system"] == system and r["metric"] == metric}
            xs = [g + (i - (len(present) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, [vals.get(g, 0) for g in groups], width, label=system, color=f"C{systems.index(system)}")
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.set_xticks(range(len(groups)), [g.split(" after")[0] for g in groups], fontsize=7)
        ax.set_ylabel("tokens / s")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M on CPU: Sieve vs llama.cpp vs HF transformers\n{device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
