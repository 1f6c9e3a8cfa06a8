"""The decode step compiled ahead of time with AOTInductor, one shared library per (batch, cache length).

`torch.compile` leaves Python in every decoding step: TorchDynamo checks its guards (one per weight tensor) before
each call, about 1.5 ms of a 9 ms step on 2 CPU cores. Here the step is exported once per shape
(`torch.export`), compiled by AOTInductor into a `.pt2` package, and replayed through its C++ runner, so a step is
one call into compiled code. bench/decode.py, 2-core AMD EPYC, int4 SmolLM2, batch 1: 140.6 tokens/s against
torch.compile's 120.3 (bench/results/decode.json).

The KV cache tensors are inputs of the exported step (mutated in place), so the eager prefill and the compiled
decode share one cache; the cache must have exactly the compiled shape (`exact_cache`, see
`Transformer.setup_caches(exact=True)`). The weights are compiled into the library: packages are keyed by a digest
of the weights, the model's structure, the source of the modules the step runs, the torch version and the CPU's
vector ISA, and stored under `cache_dir` (SIEVE_HOME/cache/aot from the CLI and the service), so a process that
finds its package loads it in a fraction of a second instead of compiling (35-120 s on 2 cores, by host).
Each loaded package holds its own copy of the weights the step reads (about 190 MB for int4 SmolLM2); at most
`max_loaded` stay loaded.

Compile time (session 28, int4 SmolLM2, 2 AMD EPYC threads, fresh inductor cache: 50 s) is not cut by compiling one
layer and reusing it: `torch.compiler.nested_compile_region` survives only a strict `torch.export`, and AOTInductor's
C++ wrapper then fails ("codegen invoke_subgraph is not implemented for cpp wrapper"). Neither
`aot_inductor.compile_wrapper_opt_level="O0"` (49.9 s) nor `aot_inductor.precompile_headers=False` (52.1 s) helps.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .model import Transformer

SOURCES = ("model.py", "rope.py", "quant.py", "aot.py")  # the code an exported step runs (part of the key)


def hash_state(h, module: nn.Module) -> None:
    """Feed every tensor of the module's state dict (name, dtype, shape, bytes) to the hash `h`."""
    for name, tensor in sorted(module.state_dict().items()):
        if tensor is None:
            continue
        t = tensor.detach().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class _DecodeProgram(nn.Module):
    """What gets exported: `Transformer.decode_step` with the KV cache as inputs."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, slot, key_mask, caches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        return self.model.decode_step(tokens, positions, slot, key_mask, caches)


class AotDecodeStep:
    """Called like `model.decode_step(tokens, positions, slot, key_mask)` on the model's attached cache; compiles
    (or loads) the package for the call's (batch, cache length) on first use."""

    exact_cache = True  # DecodeCursor allocates the cache at exactly the step's shape

    def __init__(self, model: Transformer, cache_dir: Path | None = None, *, max_loaded: int = 4,
                 on_compile: Callable[[str], None] | None = None):
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="sieve-aot-"))
        self.max_loaded = max_loaded
        self.on_compile = on_compile
        self._runners: OrderedDict[tuple[int, int], Callable] = OrderedDict()
        self._digest: str | None = None
        self.compiled: list[Path] = []  # packages this process compiled (the rest were loaded from cache_dir)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                 key_mask: torch.Tensor) -> torch.Tensor:
        caches = self.model.cache_tensors()
        shape = tuple(key_mask.shape)
        cache_shape = (caches[0][0].shape[0], caches[0][0].shape[2])
        if cache_shape != shape:
            raise ValueError(f"the compiled decode step needs a KV cache of exactly {shape[0]} x {shape[1]} slots "
                             f"(the key mask's shape), found {cache_shape[0]} x {cache_shape[1]}: allocate it with "
                             "setup_caches(..., exact=True)")
        runner = self._runners.get(shape)
        if runner is None:
            runner = self._runner(shape, (tokens, positions, slot, key_mask, caches))
        else:
            self._runners.move_to_end(shape)
        return runner(tokens, positions, slot, key_mask, caches)

    def package_path(self, batch: int, length: int) -> Path:
        return self.cache_dir / f"decode-b{batch}-l{length}-{self.digest()[:24]}.pt2"

    def digest(self) -> str:
        """What the compiled library depends on: weights, module structure, source, torch, CPU vector ISA."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=32)
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            m = self.model
            h.update(f"torch {torch.__version__} isa {pick_vec_isa()} exact_topk {m.exact_topk} "
                     f"dtype {m.tok_embeddings.weight.dtype}".encode())
            h.update(repr(m).encode())
            h.update(repr(m.args).encode())
            h.update(m.inv_freq.detach().cpu().numpy().tobytes())
            here = Path(__file__).parent
            for name in SOURCES:
                h.update((here / name).read_bytes())
            hash_state(h, m)
            self._digest = h.hexdigest()
        return self._digest

    def _runner(self, shape: tuple[int, int], example: tuple) -> Callable:
        path = self.package_path(*shape)
        if not path.exists():
            if self.on_compile is not None:
                self.on_compile(f"compiling the decode step for batch {shape[0]}, {shape[1]} cache slots (once; "
                                f"cached in {self.cache_dir})")
            self._compile(example, path)
        runner = torch._inductor.aoti_load_package(str(path))
        self._runners[shape] = runner
        while len(self._runners) > self.max_loaded:
            self._runners.popitem(last=False)
        return runner

    def _compile(self, example: tuple, path: Path) -> None:
        model = self.model
        attached = [layer.attention.kv_cache for layer in model.layers]
        try:
            # the cache goes in as inputs: the exported module must not also hold it as buffers
            for layer in model.layers:
                layer.attention.kv_cache = None
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices
                program = torch.export.export(_DecodeProgram(model), example, strict=False)
        finally:
            for layer, cache in zip(model.layers, attached):
                layer.attention.kv_cache = cache
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)  # atomic: a concurrent process sees the whole package or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.compiled.append(path)
