"""Real model code (Hugging Face transformers, tiny random configs) through the backend."""

from __future__ import annotations

import pytest
import torch

import tilebackend
from tilebackend.codegen import _common

transformers = pytest.importorskip("transformers")

VOCAB = 101


def _model(name: str, attn: str):
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=VOCAB,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model


def _logits(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    "name, attn, expected",
    [
        (
            "gpt2",
            "eager",
            {"layer_norm": 5, "addmm": 8, "bmm": 4, "softmax": 2, "mm": 1}
            | {"fused_add_layer_norm": 4, "fused_scale_mask_softmax": 2, "fused_mm_epilogue": 2},
        ),
        (
            "bert",
            "sdpa",
            # (the embeddings' LayerNorm(tokens + positions [1, S, H]) is an add+norm too)
            {"layer_norm": 5, "addmm": 12, "fused_add_layer_norm": 5, "fused_mm_epilogue": 2}
            | {"grouped_mm": 2},  # query, key and value linears: one launch a layer
        ),
        (
            "llama",
            "eager",
            {"rms_norm_llama": 5, "mm": 15, "bmm": 4, "softmax": 2}
            | {"fused_add_rms_norm": 4, "fused_scale_mask_softmax": 2}
            | {"fused_dual_mm_epilogue": 2}  # SwiGLU: gate and up GEMMs in one launch
            | {"grouped_mm": 2},
        ),
    ],
)
def test_hf_inference_matches_eager(poison, name, attn, expected):
    model = _model(name, attn).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(lambda ids: _logits(model, ids), backend=backend)
    with torch.no_grad():
        with _common.count_launches() as launches:
            out = compiled(ids)
        ref = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert backend.report.counts == expected, str(backend.report)
    # one launch per replaced anchor; a fusion absorbs its anchor, so it adds no launch,
    # a dual GEMM runs two anchors in one launch, a grouped one three (q, k, v)
    anchors = sum(v for k, v in expected.items() if not k.startswith(("fused_", "grouped_")))
    saved = expected.get("fused_dual_mm_epilogue", 0) + 2 * expected.get("grouped_mm", 0)
    assert sum(launches.values()) == anchors - saved
    assert launches["grouped_mm"] == expected.get("grouped_mm", 0)
    if "fused_dual_mm_epilogue" in expected:
        assert launches["dual_mm_epilogue"] == expected["fused_dual_mm_epilogue"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_training_step_gradients_match_eager(poison, name):
    model = _model(name, "eager").train()
    ids = torch.randint(0, VOCAB, (2, 7))
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(lambda ids: _logits(model, ids), backend=backend)
    with _common.count_launches() as launches:
        compiled(ids).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _logits(model, ids).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    norm_bwd = "layer_norm_bwd" if name == "gpt2" else "rms_norm_bwd"
    # the softmax backward absorbs the scale of the forward's prologue
    for k in (norm_bwd, "scale_mask_softmax_bwd", "mm"):
        assert launches[k] >= 1, (k, dict(launches))
    assert backend.report.counts["fused_softmax_backward"] == 2, str(backend.report)
    if name == "llama":  # q/k/v's and gate/up's weight gradients: one launch each a layer
        bwd = [g.counts.get("grouped_mm", 0) for g in backend.report.graphs if g.name == "backward"]
        assert bwd == [4] and launches["grouped_mm"] == 6, (bwd, dict(launches))


def test_gpt2_training_with_attention_dropout_fuses_and_repeats(poison):
    """Attention and residual dropouts on: the attention's is one kernel each way per
    layer, each residual one is drawn in its GEMM's epilogue (which also writes the mask);
    the same seed, the same step."""
    model = _model("gpt2", "eager").train()
    for m in model.modules():
        for name in ("attn_dropout", "resid_dropout", "dropout"):
            if isinstance(getattr(m, name, None), torch.nn.Dropout):
                getattr(m, name).p = 0.1
    ids = torch.randint(0, VOCAB, (2, 7))
    torch._dynamo.reset()
    backend = tilebackend.TileBackend(options={"fallback": "eager"})
    compiled = torch.compile(lambda ids: _logits(model, ids), backend=backend)
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        with _common.count_launches() as launches:
            compiled(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    counts = backend.report.counts
    assert counts["fused_softmax_dropout"] == 2 and counts["fused_softmax_backward"] == 2
    assert launches["scale_mask_softmax_dropout_fwd"] == 2, dict(launches)
    assert launches["scale_mask_softmax_bwd"] == 2, dict(launches)
    # c_proj of the attention and of the MLP, per layer: dropout in the epilogue
    drawn = [
        r
        for g in backend.report.graphs
        for r in g.replacements
        if r.pattern == "fused_mm_epilogue" and '"rand"' in str(r.scalars.get("expr"))
    ]
    assert len(drawn) == 4 and all(r.scalars.get("extra_outputs") for r in drawn)
    fwd = [g for g in backend.report.graphs if g.name == "forward"]
    assert fwd and not any("native_dropout.default" in g.code for g in fwd)
    assert launches["mm_epilogue_multi"] >= 4 and launches["dropout_keep"] == 0
    for n, g in grads[0].items():
        assert torch.isfinite(g).all(), n
        torch.testing.assert_close(grads[1][n], g, atol=0, rtol=0, msg=n)
    # and the dropout is live: without it the gradients differ
    model.eval()
    model.zero_grad()
    _logits(model, ids).square().mean().backward()
    diff = max((p.grad - grads[0][n]).abs().max().item() for n, p in model.named_parameters())
    assert diff > 1e-6


def test_vit_with_interpolated_positions_trains_dynamic_as_static(poison):
    """A ViT with interpolated position embeddings under ``dynamic=True`` (H and W
    symbolic): each linear's view of its input had its own size nodes, so the views were
    not merged and the q/k/v weight gradients of a layer were not grouped.  The launches
    are the static compile's."""
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=False)
    x = torch.randn(2, 3, 32, 32)

    def fn(x):
        return model(x, interpolate_pos_encoding=True).last_hidden_state

    runs = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        backend = tilebackend.TileBackend(options={"fallback": "eager"})
        with _common.count_launches() as launches:
            torch.compile(fn, backend=backend, dynamic=dynamic)(x).sum().backward()
        runs[dynamic] = dict(launches)
    assert runs[True] == runs[False], runs
    assert runs[True]["grouped_mm"] >= 4, runs  # q/k/v forward and dW, per layer
