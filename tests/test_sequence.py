"""Sequence models: each equation pinned to a reference (torch built-ins, the formula, the survey's example)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raycraft.config import from_dict
from raycraft.data.base import DataConfig
from raycraft.data.text import TokenWindows, strip_markdown, text_splits
from raycraft.errors import UserError
from raycraft.models.attention import (
    Attention,
    RelativeBias,
    blocked_attention,
    masked_attention,
    orthogonal_gaussian,
    pattern_mask,
    performer_attention,
    rotary,
    sinusoidal_table,
)
from raycraft.models.rnn import AWDLSTMConfig, ElmanLayer, LSTMLayer, RNNConfig, RNNLanguageModel
from raycraft.models.tokenizers import BPETokenizer, CharTokenizer, load, save
from raycraft.models.transformer import LoRALinear, MoE, MoEConfig, Transformer, TransformerConfig
from raycraft.text.step import LanguageModelStep, generate

TEXT = """First Witch:
When shall we three meet again
In thunder, lightning, or in rain?

Second Witch:
When the hurlyburly's done,  When the battle's lost and won.
"""


# --- tokenizers -------------------------------------------------------------------------------------------

def test_bpe_survey_example_first_merges():
    tok = BPETokenizer.train("low lower lowest", 13)  # alphabet " elorstw", </w>, 4 merges
    assert tok.merge_strings()[:2] == ["l o", "lo w"]
    assert [tok.symbols[i] for i in tok.encode("lower ")] == ["lowe", "r</w>"]


def naive_bpe(text: str, vocab_size: int) -> list[str]:
    """Reference: recount every pair over the corpus before each merge (the survey's plain loop)."""
    tok = BPETokenizer(sorted(set(text)), [])
    words = Counter(tuple(tok.symbols[i] for i in tok._word_symbols(w)) for w in __import__("re").findall(
        r"\S+ ?|\s", text))
    merges = []
    rank = {s: i for i, s in enumerate(tok.symbols)}
    while len(rank) < vocab_size:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:], strict=False):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], rank[p[0]], rank[p[1]]))
        merges.append(f"{best[0]} {best[1]}")
        rank[best[0] + best[1]] = len(rank)
        new = Counter()
        for w, f in words.items():
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(best[0] + best[1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            new[tuple(out)] += f
        words = new
    return merges


def test_bpe_incremental_counts_match_a_full_rescan_per_merge():
    text = TEXT * 3 + "lower lowest newer newest wider widest low low"
    assert BPETokenizer.train(text, 90).merge_strings() == naive_bpe(text, 90)


def test_bpe_round_trip_save_load(tmp_path):
    tok = BPETokenizer.train(TEXT, 80)
    for s in (TEXT, "  When\n\nthe rain  lost ", "x" if "x" in TEXT else "W"):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(TEXT)) < len(TEXT) / 2  # merges compress
    save(tok, tmp_path / "t.json")
    again = load(tmp_path / "t.json")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.symbols == tok.symbols


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.train(TEXT)
    assert tok.decode(tok.encode("When")) == "When"
    with pytest.raises(UserError, match=r"--prompt: characters '\$Z'"):
        tok.encode("Z$When")


# --- data ---------------------------------------------------------------------------------------------------

def test_windows_batch_by_index_with_shifted_targets():
    ds = TokenWindows(torch.arange(20), seq_len=4)
    assert len(ds) == 4
    x, y = ds[torch.tensor([0, 2])]
    assert x.tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]] and torch.equal(y, x + 1)


def test_markdown_stripped_and_split_by_document():
    assert strip_markdown("# Play\n\n**ROMEO**  \nBut soft!  \n\n_Exit_\n") == "Play\n\nROMEO:\nBut soft!\n\nExit\n"
    docs = [f"doc {i} " * 50 for i in range(10)]
    splits = text_splits(docs, DataConfig(seq_len=8, val_fraction=0.2, test_fraction=0.2))
    lengths = [len(s.tokens) for s in (splits.train, splits.val, splits.test)]
    assert lengths == [6 * 300, 2 * 300, 2 * 300]  # whole documents of 300 characters: 2 test, 2 val, 6 train
    assert splits.info["vocab_size"] == len(set("".join(docs)))


# --- positions and attention ----------------------------------------------------------------------------

def test_sinusoidal_table_matches_formula():
    n, d = 50, 16
    P = sinusoidal_table(n, d)
    for i in (0, 1, 7, 49):
        for k in range(d // 2):
            assert P[i, 2 * k].item() == pytest.approx(math.sin(i / 10000 ** (2 * k / d)), abs=1e-5)
            assert P[i, 2 * k + 1].item() == pytest.approx(math.cos(i / 10000 ** (2 * k / d)), abs=1e-5)


def test_rotary_scores_depend_only_on_offset():
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    s = (rotary(q) @ rotary(k).transpose(-2, -1))[0, 0]
    assert torch.allclose(s[3, 1], s[10, 8], atol=1e-5) and torch.allclose(s[5, 5], s[0, 0], atol=1e-5)
    assert not torch.allclose(s[3, 1], s[3, 2], atol=1e-3)


def test_relative_bias_buckets_exact_near_and_shared_far():
    rb = RelativeBias(n_heads=2, n_buckets=8, max_distance=64, causal=True)
    b = rb.bucket(-torch.arange(100))
    assert b[:4].tolist() == [0, 1, 2, 3] and b.max() == 7 and b[64:].unique().tolist() == [7]
    assert rb(5, torch.device("cpu")).shape == (2, 5, 5)


@pytest.mark.parametrize("causal", [True, False])
def test_multi_head_full_attention_matches_torch(causal):
    torch.manual_seed(0)
    d, h, T = 32, 4, 10
    ours = Attention(d, h, "full", causal, max_len=T)
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        ref.out_proj.weight.copy_(ours.o.weight)
        ref.out_proj.bias.copy_(ours.o.bias)
    x = torch.randn(2, T, d)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_masked_attention_is_the_formula_and_equals_sdpa():
    q, k, v = torch.randn(3, 2, 2, 9, 8).unbind(0)
    bias = torch.randn(2, 9, 9)
    mask = pattern_mask("sliding", 9, True, 3, 0, None, torch.device("cpu"))
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + bias
    formula = torch.softmax(scores.masked_fill(~mask, -math.inf), -1) @ v
    assert torch.allclose(masked_attention(q, k, v, mask, bias, 0.0), formula, atol=1e-5)
    full = pattern_mask("full", 9, True, 3, 0, None, torch.device("cpu"))
    assert torch.allclose(masked_attention(q, k, v, full, None, 0.0),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("kind", ["sliding", "bigbird"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T, window", [(100, 16), (64, 16), (5, 8)])
def test_blocked_sparse_attention_equals_the_masked_reference(kind, causal, T, window):
    """The blockwise computation gives the outputs and gradients of the mask over the full T x T scores, for
    lengths that fill whole blocks or not, with the global and random keys of BigBird counted once each."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    n_global = 2 if kind == "bigbird" else 0
    random_keys = torch.randint(0, 1 << 30, (T + 3, 3)) if kind == "bigbird" else None
    mask = pattern_mask(kind, T, causal, window, n_global, random_keys, torch.device("cpu"))
    expected = masked_attention(q, k, v, mask, None, 0.0)
    out = blocked_attention(q, k, v, window, causal, n_global, random_keys)
    assert torch.allclose(out, expected, atol=1e-12)
    grads = torch.autograd.grad((out * expected.detach()).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected.detach()).sum(), (q, k, v))
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.allclose(g, e, atol=1e-12)


def test_the_attention_layer_takes_the_blocked_path_and_agrees_with_its_mask():
    torch.manual_seed(0)
    blocked = Attention(16, 2, "bigbird", True, max_len=40, window=8)
    masked = Attention(16, 2, "bigbird", True, max_len=40, window=8, blockwise=False)
    masked.load_state_dict(blocked.state_dict())
    x = torch.randn(2, 40, 16)
    assert torch.allclose(blocked(x), masked(x), atol=1e-5)


def test_sparse_patterns():
    cpu = torch.device("cpu")
    sliding = pattern_mask("sliding", 8, False, 2, 0, None, cpu)
    assert sliding[4].nonzero().flatten().tolist() == [3, 4, 5]
    big = pattern_mask("bigbird", 8, False, 2, 1, torch.tensor([[5]] * 8), cpu)
    assert big[4].nonzero().flatten().tolist() == [0, 3, 4, 5] and big[0].all() and big[:, 0].all()
    assert big[1, 5]  # the random key
    assert not pattern_mask("bigbird", 8, True, 2, 1, None, cpu).triu(1).any()


def test_performer_converges_to_softmax_attention_as_features_grow():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=g) * 0.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    exact_causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    errors = []
    for m in (8, 64, 512, 8192):
        W = orthogonal_gaussian(m, 16, torch.Generator().manual_seed(1))
        errors.append((performer_attention(q, k, v, W, causal=False) - exact).norm() / exact.norm())
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.05, errors
    causal = performer_attention(q, k, v, W, causal=True)
    assert (causal - exact_causal).norm() / exact_causal.norm() < 0.05


def test_linformer_with_identity_projections_is_full_attention():
    torch.manual_seed(0)
    attn = Attention(16, 2, "linformer", False, max_len=12, proj_len=12)
    with torch.no_grad():
        attn.E.copy_(torch.eye(12))
        attn.F.copy_(torch.eye(12))
    full = Attention(16, 2, "full", False, max_len=12)
    full.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 12, 16)
    assert torch.allclose(attn(x), full(x), atol=1e-5)


# --- transformer variants ------------------------------------------------------------------------------

def test_lora_merged_equals_unmerged_and_only_adapters_train():
    torch.manual_seed(0)
    model = Transformer(from_dict(TransformerConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                                                     "lora": {"rank": 4}}), vocab=20, max_len=8).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.B)
    x = torch.randint(0, 20, (3, 8))
    unmerged = model(x)
    base_out = Transformer(from_dict(TransformerConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32}),
                           vocab=20, max_len=8).eval()
    base_out.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(base_out(x), unmerged, atol=1e-4)  # the adapters change the output ...
    model.merge_lora()
    assert torch.allclose(model(x), unmerged, atol=1e-5)  # ... and merging keeps it


def test_moe_top_k_routing_and_balance_loss():
    torch.manual_seed(0)
    moe = MoE(8, 16, MoEConfig(experts=4, top_k=1, balance_coef=0.5))
    x = torch.randn(2, 5, 8)
    y, aux = moe(x)
    p = torch.softmax(moe.W_r(x), -1)
    top = p.argmax(-1)
    for b, t in [(0, 0), (1, 3)]:  # Switch: the top expert's output times its probability... renormalised to 1
        assert torch.allclose(y[b, t], moe.experts[int(top[b, t])](x[b, t]), atol=1e-5)
    f = F.one_hot(top, 4).float().flatten(0, 1).mean(0)
    assert aux.item() == pytest.approx(0.5 * 4 * (f * p.flatten(0, 1).mean(0)).sum().item(), rel=1e-5)
    _, uniform = MoE(8, 16, MoEConfig(experts=4, top_k=4, balance_coef=0.5))(x)
    assert uniform.item() == pytest.approx(0.5, rel=1e-5)  # every expert chosen: f_e = 1/E, sum P_e = 1


@pytest.mark.parametrize("variant", [
    {"norm_position": "post", "norm": "dyt"}, {"position": "learned"}, {"position": "rotary", "attention": "bigbird"},
    {"position": "relative", "attention": "sliding"}, {"attention": "performer"},
    {"attention": "linformer", "causal": False}, {"moe": {"experts": 2, "top_k": 1}}])
def test_transformer_variants_learn_a_tiny_sequence(variant):
    torch.manual_seed(0)
    cfg = from_dict(TransformerConfig, {"d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64, "dropout": 0.0,
                                        "window": 4, **variant})
    model = Transformer(cfg, vocab=6, max_len=16)
    x = torch.arange(16).remainder(6).repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits, aux = model(x, with_aux=True)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert loss.item() < 0.5, variant


def test_causal_model_ignores_the_future():
    torch.manual_seed(0)
    model = Transformer(from_dict(TransformerConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                                                     "position": "relative"}), vocab=10, max_len=8).eval()
    x = torch.randint(0, 10, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 10
    assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-5)


@pytest.mark.parametrize("bad, words", [
    ({"n_heads": 3}, ["n_heads", "d_model=128"]), ({"lora": {"rank": 200}}, ["lora.rank", "200"]),
    ({"attention": "linformer"}, ["causal"]), ({"attention": "performer", "position": "relative"}, ["relative"]),
    ({"attention": "perf"}, ["attention", "'perf'", "performer"]), ({"attn_dropout": 1.0}, ["attn_dropout", "1.0"])])
def test_bad_transformer_config(bad, words):
    with pytest.raises(UserError) as err:
        from_dict(TransformerConfig, bad)
    assert all(w in str(err.value) for w in words), err.value


def test_attention_dropout_follows_dropout_unless_set():
    def rates(**keys) -> set[tuple[float, float]]:
        model = Transformer(from_dict(TransformerConfig, {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                                                         **keys}), vocab=10, max_len=8)
        return {(b.attn.dropout, b.drop.p) for b in model.blocks}

    assert rates(dropout=0.3) == {(0.3, 0.3)}
    assert rates(dropout=0.3, attn_dropout=0.0) == {(0.0, 0.3)}
    model = Transformer(from_dict(TransformerConfig, {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                                                     "dropout": 0.5, "attn_dropout": 0.0}), vocab=10, max_len=8)
    x = torch.randint(0, 10, (2, 8))
    attn = model.blocks[0].attn.train()
    h = torch.randn(2, 8, 16)
    assert torch.equal(attn(h), attn(h))  # the weights are not dropped
    assert not torch.equal(model.train()(x), model(x))  # the residual branches are


# --- recurrent models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, ref, W_x, W_h", [
    (LSTMLayer(5, 7), nn.LSTM(5, 7, batch_first=True), lambda m: m.W, lambda m: m.U),
    (ElmanLayer(5, 7), nn.RNN(5, 7, batch_first=True), lambda m: m.W_xh, lambda m: m.W_hh.weight)],
    ids=["lstm_vs_torch_lstm", "elman_vs_torch_rnn"])
def test_recurrent_layer_matches_torch_with_copied_weights(ours, ref, W_x, W_h):
    with torch.no_grad():
        ref.weight_ih_l0.copy_(W_x(ours).weight)
        ref.weight_hh_l0.copy_(W_h(ours))
        ref.bias_ih_l0.copy_(W_x(ours).bias)
        ref.bias_hh_l0.zero_()
    x = torch.randn(3, 11, 5)
    assert torch.allclose(ours(x), ref(x)[0], atol=1e-5)


def test_truncated_bptt_cuts_gradients_beyond_the_window():
    torch.manual_seed(0)
    layer = LSTMLayer(3, 4)
    x = torch.randn(1, 12, 3, requires_grad=True)
    layer(x, bptt=4)[0, -1].sum().backward()
    assert x.grad[0, :8].abs().sum() == 0 and x.grad[0, 8:].abs().sum() > 0
    x.grad = None
    layer(x)[0, -1].sum().backward()
    assert x.grad[0, 0].abs().sum() > 0


def test_awd_lstm_ties_weights_and_drops_connections_only_in_training():
    torch.manual_seed(0)
    model = RNNLanguageModel("lstm", AWDLSTMConfig(d_embed=8, hidden=16, layers=2), vocab_size=11)
    assert model.W_hy.weight is model.E.weight
    x = torch.randint(0, 11, (2, 6))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.allclose(model(x), model(x))
    plain = RNNLanguageModel("elman", RNNConfig(d_embed=8, hidden=16), vocab_size=11)
    assert plain(x).shape == (2, 6, 11)


# --- the language-model step and sampling ---------------------------------------------------------------

def test_step_metrics_and_greedy_sampling():
    torch.manual_seed(0)
    step = LanguageModelStep()
    model = RNNLanguageModel("lstm", RNNConfig(d_embed=8, hidden=16, dropout=0.0), vocab_size=5)
    x = torch.randint(0, 5, (2, 6))
    sums = step.eval_batch(model, (x, x))
    assert sums["n"] == 12
    out = step.finalize({"loss": 1.5, "s_per_token": 0.01})
    assert out["perplexity"] == pytest.approx(math.exp(1.5)) and out["tokens_per_s"] == pytest.approx(100)
    greedy = generate(model, [1, 2], 5, context=4, temperature=0)
    assert greedy == generate(model, [1, 2], 5, context=4, temperature=1.0, top_k=1)
    ids = [1, 2]
    for _ in range(5):  # greedy decoding by hand, with the same 4-token context
        ids.append(int(model(torch.tensor([ids[-4:]]))[0, -1].argmax()))
    assert greedy == ids[2:]
