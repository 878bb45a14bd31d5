"""End-to-end benchmarks on real models built from ``transformers`` configs.

Random weights (seeded) are saved once as users have them — a folder with
``config.json`` and ``model.safetensors`` — and every run loads from such a folder, so
``--checkpoint DIR`` points the same harness at a user's own checkpoint.  Dropout is
switched off (config and modules), so every provider computes the same function and the
error against eager means something in training too.

Per model and provider: median latency, tokens/s, compile time (cold: the first call;
warm: the first call again after ``torch._dynamo.reset()``, with the on-disk and tuning
caches filled), peak memory, max error against eager, and what the tile backend replaced.
Inference runs under ``torch.no_grad()``; a training step is forward + backward + an SGD
step (the loss is the model's own LM loss where it has one, else mean(out^2)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..codegen._common import count_launches
from . import common

#: name -> (config class, model class, full-size config, tiny config for CPU runs)
SPECS: dict[str, tuple[str, str, dict, dict]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {},  # GPT-2 small, 124M
        {
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "vocab_size": 100,
            "n_positions": 16,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        {},  # BERT-base
        {
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 100,
            "max_position_embeddings": 16,
        },
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {  # TinyLlama's shape with 8 layers: 2048 wide, GQA 32 query / 4 key-value heads
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 100,
            "max_position_embeddings": 16,
        },
    ),
    "vit": (
        "ViTConfig",
        "ViTModel",
        {},  # ViT-B/16 at 224
        {
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
    ),
}
#: model_type in a user's config.json -> the class to build (else AutoModelForCausalLM,
#: then AutoModel)
CLASS_BY_TYPE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM"}
CLASS_BY_TYPE["vit"] = "ViTModel"


def available() -> str | None:
    """None when transformers and safetensors import, else why not."""
    missing = []
    for mod in ("transformers", "safetensors"):
        try:
            __import__(mod)
        except Exception:
            missing.append(mod)
    return f"{' and '.join(missing)} not installed" if missing else None


def default_checkpoint_root() -> Path:
    return Path(os.environ.get("TILEBACKEND_BENCH_CKPT", Path(tempfile.gettempdir())))


def _no_dropout(config) -> None:
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    if hasattr(config, "use_cache"):
        config.use_cache = False


def build_config(name: str, profile: str):
    import transformers

    cfg_cls, _, full, tiny = SPECS[name]
    return getattr(transformers, cfg_cls)(**(full if profile == "anchor" else tiny))


def prepare_checkpoint(name: str, profile: str, root: Path, device: str) -> Path:
    """Write a random-weight checkpoint for built-in model ``name`` (once; reused after)."""
    import transformers

    config = build_config(name, profile)
    digest = hashlib.sha1(config.to_json_string().encode()).hexdigest()[:10]
    path = Path(root) / f"tilebackend-bench-{name}-{profile}-{digest}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, SPECS[name][1])
    with torch.device(device):
        model = cls(config)
    model.to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    if not (tmp / "model.safetensors").exists():  # a sharded save (large model)
        raise RuntimeError(f"expected {tmp}/model.safetensors after save_pretrained")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _state_dict_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json)")


def load_checkpoint(path: Path, device: str, dtype: torch.dtype, attn: str | None = None):
    """Build the model that ``path/config.json`` describes on ``device`` and load
    ``model.safetensors`` into it with ``safetensors``.  Returns (model, config, info)."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    _no_dropout(config)
    if attn:
        config._attn_implementation = attn
    cls = _model_class(config)
    with torch.device(device):
        model = cls(config)
    model.to(dtype)
    state: dict[str, torch.Tensor] = {}
    for f in _state_dict_files(path):
        state.update(load_file(str(f), device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefix = getattr(model, "base_model_prefix", "")
    if unexpected and prefix and hasattr(model, prefix):  # a base-model checkpoint
        missing2, unexpected2 = getattr(model, prefix).load_state_dict(state, strict=False)
        if len(unexpected2) < len(unexpected):
            missing, unexpected = missing2, unexpected2
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = _untied(model, missing)
    loader = "safetensors"
    if missing or unexpected:
        # the file uses other key names than this transformers version's modules (it
        # renames legacy keys while loading): let transformers load it
        del model, state
        kw = {"config": config}
        if attn:
            kw["attn_implementation"] = attn
        try:
            model = cls.from_pretrained(str(path), dtype=dtype, **kw)
        except TypeError:
            model = cls.from_pretrained(str(path), torch_dtype=dtype, **kw)
        model.to(device)
        loader = f"transformers from_pretrained ({len(missing)} missing / {len(unexpected)} unexpected keys for safetensors)"
        missing, unexpected = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    info = {
        "checkpoint": str(path),
        "model_class": type(model).__name__,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "loader": loader,
        "attn": getattr(config, "_attn_implementation", None),
    }
    return model, config, info


def _model_class(config):
    import transformers

    name = CLASS_BY_TYPE.get(config.model_type)
    if name:
        return getattr(transformers, name)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        mapping = getattr(auto, "_model_mapping", None)
        try:
            return mapping[type(config)]
        except Exception:
            continue
    raise ValueError(f"no model class for model_type {config.model_type!r}")


def _untied(model, missing: Sequence[str]) -> list[str]:
    """Missing keys that are not tied to a loaded parameter (GPT-2's lm_head is wte)."""
    if not missing:
        return []
    named = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for n, p in named.items() if n not in missing}
    return [k for k in missing if k not in named or id(named[k]) not in loaded]


def make_inputs(config, batch: int, seq: int, device: str, dtype: torch.dtype):
    """Model inputs and the number of tokens they hold."""
    g = torch.Generator(device="cpu").manual_seed(1)
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        pix = torch.randn(batch, config.num_channels, size, size, generator=g)
        tokens = batch * ((size // config.patch_size) ** 2 + 1)
        return {"pixel_values": pix.to(device=device, dtype=dtype)}, tokens
    vocab = getattr(config, "vocab_size", 100)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids}, batch * seq


@dataclasses.dataclass
class ModelJob:
    name: str  # e.g. "gpt2_b8_t512_infer"
    model: str  # "gpt2", ..., or the checkpoint folder's name
    mode: str  # "infer" | "train"
    checkpoint: Path | None  # None: a built-in model, its checkpoint written when first run
    profile: str = "anchor"
    ckpt_root: Path | None = None

    def path(self, device: str) -> Path:
        if self.checkpoint is None:
            root = self.ckpt_root or default_checkpoint_root()
            self.checkpoint = prepare_checkpoint(self.model, self.profile, root, device)
        return self.checkpoint


def _has_lm_loss(model) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _loss(out, use_labels: bool):
    if use_labels:
        return out.loss
    t = common.first_tensor(out)
    return t.float().pow(2).mean()


def run_job(
    job: ModelJob,
    providers: Sequence[str],
    *,
    device: str,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    attn: str | None,
    timing: common.Timing,
    budget: common.Budget,
    warm_compile: bool,
    sink: Callable[[dict], None],
    tile_options: dict | None = None,
) -> None:
    """Benchmark one model in one mode under each provider."""
    if not budget.allows(15.0):
        for provider in providers:
            base = {"suite": "model", "name": job.name, "model": job.model, "mode": job.mode}
            sink(common.skipped_row(base, provider, "time budget"))
        return
    model, config, info = load_checkpoint(job.path(device), device, dtype, attn)
    inputs, tokens = make_inputs(config, batch, seq, device, dtype)
    train = job.mode == "train"
    use_labels = train and _has_lm_loss(model) and "input_ids" in inputs
    if use_labels:
        inputs["labels"] = inputs["input_ids"]
    model.train(train)
    common.log(
        f"model {job.name}: {info['model_class']} {info['params_m']}M params, "
        f"attn={info['attn']}, loaded by {info['loader']}, {tokens} tokens"
    )
    base = {
        "suite": "model",
        "name": job.name,
        "model": job.model,
        "mode": job.mode,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "tokens": tokens,
        **info,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    init_state = (
        {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if train else {}
    )
    ref: Any = None  # eager output (CPU) / eager loss and grads
    cost = 60.0 if train else 25.0  # seconds a compile of this model may take
    for provider in providers:
        need = cost * (3 if provider in common.HEAVY else 1) if provider != "eager" else 5.0
        if not budget.allows(need):
            sink(common.skipped_row(base, provider, "time budget"))
            continue
        row = dict(base, provider=provider)
        try:
            compiled, backend = common.compile_provider(provider, model, tile_options)
            if train:
                opt = torch.optim.SGD(params, lr=1e-4)

                def grads_once(fn=compiled):
                    for p in params:
                        p.grad = None
                    loss = _loss(fn(**inputs), use_labels)
                    loss.backward()
                    return loss.detach()

                def step(fn=compiled, opt=opt):
                    loss = _loss(fn(**inputs), use_labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                with count_launches() as launches:  # the compile, and one real step
                    loss, first_s = common.timed_first_call(grads_once, device)
                grads = [p.grad.detach().to("cpu", copy=True) for p in params]
                if provider == "eager":
                    ref = (loss.float().item(), grads)
                elif ref is not None:
                    row.update(_train_errors(loss, grads, ref))
                del grads
                bench_fn = step
            else:

                def infer(fn=compiled):
                    with torch.no_grad():
                        return fn(**inputs)

                with count_launches() as launches:
                    out, first_s = common.timed_first_call(infer, device)
                t = common.first_tensor(out)
                if provider == "eager":
                    ref = t.detach().to("cpu", copy=True) if t is not None else None
                elif ref is not None:
                    row.update(common.errors(t, ref))
                del out, t
                bench_fn = infer
            if provider != "eager":
                row["compile_s"] = first_s
            if backend is not None:
                row["replaced"] = backend.report.counts
                row["n_replaced"] = sum(row["replaced"].values())
                row["tile_launches"] = dict(launches)
                row["tile_ran"] = sum(launches.values()) > 0
            if warm_compile and provider != "eager" and budget.allows(need):
                compiled2, _ = common.compile_provider(provider, model, tile_options)
                if train:
                    _, row["compile_warm_s"] = common.timed_first_call(
                        lambda: grads_once(compiled2), device
                    )
                else:
                    _, row["compile_warm_s"] = common.timed_first_call(
                        lambda: infer(compiled2), device
                    )
                bench_fn = (lambda: step(compiled2)) if train else (lambda: infer(compiled2))
            for p in params:
                p.grad = None
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ms = timing.median_ms(bench_fn, device)
            if str(device).startswith("cuda"):
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row["ms"] = ms
            row["tok_per_s"] = tokens / ms * 1e3
            row["status"] = "ok"
        except Exception as e:  # one provider failing must not stop the others
            row["status"] = "error"
            row["error"] = common.short_error(e)
        finally:
            if train:  # the optimizer steps changed the weights: restore them
                with torch.no_grad():
                    model.load_state_dict(init_state, strict=False)
                for p in params:
                    p.grad = None
            if provider != "eager":
                torch._dynamo.reset()
        sink(row)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def _train_errors(loss, grads: list[torch.Tensor], ref) -> dict[str, float]:
    ref_loss, ref_grads = ref
    loss_err = abs(loss.float().item() - ref_loss)
    grad_rel = 0.0
    for g, r in zip(grads, ref_grads):
        scale = r.float().abs().max().item() or 1.0
        grad_rel = max(grad_rel, (g.float() - r.float()).abs().max().item() / scale)
    return {
        "max_abs_err": loss_err,
        "rel_err": loss_err / abs(ref_loss) if ref_loss else loss_err,
        "grad_rel_err": grad_rel,
    }


def job_name(model: str, mode: str, batch: int, seq: int, is_vit: bool, image: int = 224) -> str:
    if is_vit:
        return f"{model}_b{batch}_i{image}_{mode}"
    return f"{model}_b{batch}_t{seq}_{mode}"


def plan_jobs(
    models: Sequence[str],
    train: Sequence[str],
    *,
    profile: str,
    batch: int,
    seq: int,
    device: str,
    checkpoint: str | None,
    ckpt_root: Path,
) -> list[ModelJob]:
    """The (model, mode) jobs in priority order: every model's inference, then training."""
    jobs: list[ModelJob] = []
    if checkpoint:
        path = Path(checkpoint)
        name = path.name.replace("-", "_").replace(".", "_") or "checkpoint"
        jobs.append(ModelJob(job_name(name, "infer", batch, seq, False), name, "infer", path))
        if train:
            jobs.append(ModelJob(job_name(name, "train", batch, seq, False), name, "train", path))
        return jobs
    for mode, names in (("infer", models), ("train", train)):
        for m in names:
            if m not in SPECS:
                raise ValueError(f"unknown model {m!r}; choose from {list(SPECS)}")
            image = SPECS[m][3]["image_size"] if m == "vit" and profile == "tiny" else 224
            job = ModelJob(
                job_name(m, mode, batch, seq, m == "vit", image), m, mode, None, profile, ckpt_root
            )
            jobs.append(job)
    return jobs
