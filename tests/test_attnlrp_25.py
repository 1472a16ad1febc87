"""Issue 25 item 3: test oracles for AttnLRP (Achtibat et al., ICML 2024, arXiv:2402.05602).

``auditkit.explain.lrp.attention.attn_lrp`` computes AttnLRP in gradient x input form. The oracle
below recomputes the same relevance EXPLICITLY, rule by rule, in float64, from the equations: a
small re-implementation of the forward of the test networks (reading the modules' weights; its
logits are asserted equal to the modules' logits first), then the backward relevance pass, one rule
per operation. Autograd is never run through a network for the oracle; the only transposed map
borrowed from torch is ``conv_transpose2d`` = Wᵀs of the ONE patch-embedding convolution.

A second, independent oracle is LXT (``lxt.efficient``, used as a library): on a tiny ViT built
from test-local module classes, ONLY those classes are patched with LXT's primitives, and
gradient x input through that copy is AttnLRP at ε = 0.

Tolerances (float64 everywhere): oracle and implementation evaluate the same rules in different
orders, so they differ by roundoff (~1e-16 relative per operation) amplified by the divisions
(by z + ε·sign z, y, u, O, S), which on these random networks stays far below 1e-9 of the map's
scale. We assert ``rtol=1e-6, atol=1e-9 * max|R_oracle|``: a thousand-fold margin over roundoff,
while any rule error (a missing 1/2 of the uniform rule, gradient instead of the softmax rule,
ε on the wrong layer, relevance through σ, ...) changes the map by O(1) of its scale.
"""

from __future__ import annotations

import pytest
import timm
import timm.layers
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.vision_transformer as tv_vit
from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
from lxt.efficient.rules import divide_gradient

RTOL = 1e-6
ATOL_REL = 1e-9  # absolute tolerance as a fraction of max|R_oracle|
LXT_ATOL_REL = 1e-6  # against LXT, whose identity rule divides by input + 1e-10 (see below)


# ================================================================================================
# Oracle, part 1: the rules, one function per rule (float64 tensors in, float64 tensors out)
# ================================================================================================


def _sign0(z: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1."""
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _psum(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum (the ledger of relevance absorbed by each step)."""
    return t.reshape(t.shape[0], -1).sum(1)


def rule_eps_linear(a, weight, z, r_z, eps):
    """ε rule of z = W a + b:  R_a = a ⊙ Wᵀ (R_z / (z + ε·sign z));  the bias absorbs its share."""
    return a * ((r_z / (z + eps * _sign0(z))) @ weight)


def rule_eps_patch_conv(x, weight, z, r_z, eps, stride):
    """ε rule of the patch-embedding conv z = W * x + b (kernel = stride, no overlap):
    R_x = x ⊙ Wᵀ (R_z / (z + ε·sign z)); Wᵀs of this one conv is its transposed convolution."""
    s = r_z / (z + eps * _sign0(z))
    return x * F.conv_transpose2d(s, weight, stride=stride)


def rule_z_sum(a, total, r_total):
    """z rule of a sum total = a + b + ...:  R_a = a ⊙ R / total."""
    return a * r_total / total


def rule_layer_norm(cache, r_y):
    """LayerNorm y = w ⊙ n + b, n = u / σ, u = x − μ:
    affine z rule      R_n = n ⊙ w ⊙ R_y / y        (the bias b absorbs its share)
    identity rule      R_u = R_n                     (the division by σ)
    centering z rule   R_x_i = Σ_j x_i (δ_ij − 1/D) R_u_j / u_j = x_i (t_i − mean_j t_j), t = R_u / u
    """
    x, u, n, w, y = cache["x"], cache["u"], cache["n"], cache["w"], cache["y"]
    r_n = n * w * r_y / y if w is not None else n * r_y / y
    r_u = r_n
    t = r_u / u
    return x * (t - t.mean(-1, keepdim=True))


def rule_identity(r_out, x_in, lxt_shift=0.0):
    """Element-wise activation (GELU): identity rule R_in = R_out.
    (``lxt_shift`` > 0 only to emulate LXT's implementation, whose gradient x input form divides by
    input + 1e-10: R_in = R_out · x / (x + 1e-10).)"""
    return r_out if lxt_shift == 0.0 else r_out * x_in / (x_in + lxt_shift)


def rule_attention(q, k, v, scale, s_mat, a_mat, o_mat, r_o):
    """One head (batched over N, heads): S = s·q kᵀ, A = softmax(S), O = A v.

    uniform rule on O = A v (no ε), X = R_O / (2 O):
        R_A_ij = Σ_c A_ij v_jc R_O_ic / (2 O_ic) = A_ij (X vᵀ)_ij
        R_v_jc = Σ_i A_ij v_jc R_O_ic / (2 O_ic) = v_jc (Aᵀ X)_jc
    softmax rule (AttnLRP Prop. 3.1), per row i:
        R_S_i = S_i ⊙ (R_A_i − A_i Σ_j R_A_ij)
    uniform rule on S = s·q kᵀ, Y = R_S / (2 S):
        R_q_id = Σ_j s q_id k_jd R_S_ij / (2 S_ij) = q_id s (Y k)_id
        R_k_jd = Σ_i s q_id k_jd R_S_ij / (2 S_ij) = k_jd s (Yᵀ q)_jd
    """
    x = r_o / (2 * o_mat)
    r_a = a_mat * (x @ v.transpose(-1, -2))
    r_v = v * (a_mat.transpose(-1, -2) @ x)
    r_s = s_mat * (r_a - a_mat * r_a.sum(-1, keepdim=True))
    y = r_s / (2 * s_mat)
    r_q = q * (scale * (y @ k))
    r_k = k * (scale * (y.transpose(-1, -2) @ q))
    return r_q, r_k, r_v, r_a, r_s


# ================================================================================================
# Oracle, part 2: a float64 pre-norm ViT forward over a plain description of the weights
# ================================================================================================
# P = {patch: (W, b, p), cls: (1,1,D) | None, pos: (1,L,D) | None,
#      blocks: [{ln1, attn: bool, qkv: (W, b), heads, proj: (W, b), ls1, ln2, fc1, fc2, ls2, gelu}],
#      norm: ln | None, pool: "token" | "avg", prefix: int, fc_norm: ln | None, head: (W, b)}
# ln = (weight | None, bias | None, eps); ls = gamma | None (LayerScale).


def _lin(a, wb):
    w, b = wb
    return a @ w.T + (b if b is not None else 0)


def _ln_forward(x, ln):
    w, b, eps = ln
    mu = x.mean(-1, keepdim=True)
    u = x - mu
    sigma = torch.sqrt((u * u).mean(-1, keepdim=True) + eps)
    n = u / sigma
    y = n * w if w is not None else n
    if b is not None:
        y = y + b
    return y, {"x": x, "u": u, "n": n, "w": w, "y": y}


def oracle_forward(P, x):
    c = {"x": x}
    w, b, p = P["patch"]
    z = F.conv2d(x, w, b, stride=p)
    c["patch_z"] = z
    h = z.flatten(2).transpose(1, 2)
    N, D = h.shape[0], h.shape[2]
    if P["cls"] is not None:
        h = torch.cat([P["cls"].expand(N, -1, -1), h], dim=1)
    c["pre_pos"] = h
    if P["pos"] is not None:
        h = h + P["pos"]
    c["blocks"] = []
    for B in P["blocks"]:
        bc = {"h_in": h}
        L = h.shape[1]
        if B["attn"]:
            n1, bc["ln1"] = _ln_forward(h, B["ln1"])
            qkv = _lin(n1, B["qkv"])
            H = B["heads"]
            d = D // H
            q, k, v = qkv.reshape(N, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            scale = d**-0.5
            s_mat = scale * (q @ k.transpose(-1, -2))
            a_mat = torch.softmax(s_mat, dim=-1)
            o_mat = a_mat @ v
            o = o_mat.transpose(1, 2).reshape(N, L, D)
            pr = _lin(o, B["proj"])
            g = pr * B["ls1"] if B["ls1"] is not None else pr
            bc.update(n1=n1, qkv=qkv, q=q, k=k, v=v, scale=scale, S=s_mat, A=a_mat, O=o_mat, o=o, pr=pr, g=g)
            h = h + g
        bc["h_mid"] = h
        n2, bc["ln2"] = _ln_forward(h, B["ln2"])
        f1 = _lin(n2, B["fc1"])
        act = F.gelu(f1, approximate=B["gelu"])
        f2 = _lin(act, B["fc2"])
        g2 = f2 * B["ls2"] if B["ls2"] is not None else f2
        bc.update(n2=n2, f1=f1, act=act, f2=f2, g2=g2)
        h = h + g2
        bc["h_out"] = h
        c["blocks"].append(bc)
    c["h_final"] = h
    if P["norm"] is not None:
        h, c["norm"] = _ln_forward(h, P["norm"])
    c["h_normed"] = h
    if P["pool"] == "token":
        pooled = h[:, 0]
    else:
        pooled = h[:, P["prefix"] :].mean(dim=1)
    c["pooled"] = pooled
    if P["fc_norm"] is not None:
        pooled, c["fc_norm"] = _ln_forward(pooled, P["fc_norm"])
    c["head_in"] = pooled
    logits = _lin(pooled, P["head"])
    c["logits"] = logits
    return logits, c


def _oracle_backward(P, c, r_logits, eps, ledger, lxt_shift=0.0):
    """The explicit relevance pass, last operation first. ``ledger[step]`` accumulates, per
    sample, Σ R_out − Σ R_in of the non-conservative steps (what the bias, ε, the softmax rule,
    the class token and the position embedding absorb)."""

    def led(key, r_out, r_in):
        ledger[key] = ledger.get(key, 0) + _psum(r_out) - _psum(r_in)

    def linear(a, wb, z, r_z):
        r_a = rule_eps_linear(a, wb[0], z, r_z, eps)
        led("linear bias + eps", r_z, r_a)
        return r_a

    def layer_norm(cache, r_y):
        r_x = rule_layer_norm(cache, r_y)
        led("layernorm bias", r_y, r_x)
        return r_x

    r = linear(c["head_in"], P["head"], c["logits"], r_logits)
    if P["fc_norm"] is not None:
        r = layer_norm(c["fc_norm"], r)
    h = c["h_normed"]
    r_h = torch.zeros_like(h)
    if P["pool"] == "token":  # selecting the class token: all of R to token 0
        r_h[:, 0] = r
    else:  # mean pooling over the tokens after the prefix: z rule, R_x_l = (x_l / L) R / mean
        toks = h[:, P["prefix"] :]
        r_h[:, P["prefix"] :] = rule_z_sum(toks / toks.shape[1], c["pooled"].unsqueeze(1), r.unsqueeze(1))
    if P["norm"] is not None:
        r_h = layer_norm(c["norm"], r_h)
    for B, bc in zip(reversed(P["blocks"]), reversed(c["blocks"])):
        # residual h_out = h_mid + g2: z rule
        r_mid = rule_z_sum(bc["h_mid"], bc["h_out"], r_h)
        r_g2 = rule_z_sum(bc["g2"], bc["h_out"], r_h)
        # LayerScale g2 = γ ⊙ f2 (an element-wise linear map): z rule R_f2 = γ f2 R / g2 (= R)
        r_f2 = bc["f2"] * B["ls2"] * r_g2 / bc["g2"] if B["ls2"] is not None else r_g2
        r_act = linear(bc["act"], B["fc2"], bc["f2"], r_f2)
        r_f1 = rule_identity(r_act, bc["f1"], lxt_shift)
        r_n2 = linear(bc["n2"], B["fc1"], bc["f1"], r_f1)
        r_mid = r_mid + layer_norm(bc["ln2"], r_n2)
        if B["attn"]:
            r_in = rule_z_sum(bc["h_in"], bc["h_mid"], r_mid)
            r_g = rule_z_sum(bc["g"], bc["h_mid"], r_mid)
            r_pr = bc["pr"] * B["ls1"] * r_g / bc["g"] if B["ls1"] is not None else r_g
            r_o = linear(bc["o"], B["proj"], bc["pr"], r_pr)
            N, L, D = r_o.shape
            H = B["heads"]
            r_o_mat = r_o.reshape(N, L, H, D // H).transpose(1, 2)  # reshape: relevance moves along
            r_q, r_k, r_v, r_a, r_s = rule_attention(
                bc["q"], bc["k"], bc["v"], bc["scale"], bc["S"], bc["A"], bc["O"], r_o_mat
            )
            led("softmax rule", r_a, r_s)
            r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(N, L, 3 * D)
            r_n1 = linear(bc["n1"], B["qkv"], bc["qkv"], r_qkv)
            r_h = r_in + layer_norm(bc["ln1"], r_n1)
        else:
            r_h = r_mid
    if P["pos"] is not None:  # h = pre_pos + pos: z rule, pos absorbs its share
        r_pre = rule_z_sum(c["pre_pos"], c["pre_pos"] + P["pos"], r_h)
        led("position embedding", r_h, r_pre)
        r_h = r_pre
    if P["cls"] is not None:  # concat with the learned class token: the class token absorbs R[:, 0]
        led("class token", r_h[:, :1], r_h[:, :0])
        r_h = r_h[:, 1:]
    z = c["patch_z"]
    r_z = r_h.transpose(1, 2).reshape(z.shape)  # flatten/transposes: relevance moves along
    w, b, p = P["patch"]
    r_x = rule_eps_patch_conv(c["x"], w, z, r_z, eps, p)
    led("linear bias + eps", r_z, r_x)
    return r_x


def oracle_relevance(P, x, targets, eps, ledger=None, lxt_shift=0.0):
    """(N, K, C, H, W) relevance of x for each target column; start R = z_t at column t, else 0."""
    logits, c = oracle_forward(P, x)
    out = []
    for kk in range(targets.shape[1]):
        t = targets[:, kk]
        r0 = torch.zeros_like(logits)
        rows = torch.arange(logits.shape[0])
        r0[rows, t] = logits[rows, t]
        led = {} if ledger is None else ledger.setdefault(kk, {})
        out.append(_oracle_backward(P, c, r0, eps, led, lxt_shift))
    return torch.stack(out, dim=1), logits


# ================================================================================================
# Reading the test networks' weights into P
# ================================================================================================


def _ln_params(m):
    if isinstance(m, nn.Identity):
        return None
    assert isinstance(m, nn.LayerNorm), type(m)
    return (m.weight, m.bias, m.eps)


def _wb(m):
    assert isinstance(m, nn.Linear), type(m)
    return (m.weight, m.bias)


def _gelu(m):
    assert isinstance(m, nn.GELU), type(m)
    return m.approximate


def params_timm(model):
    pe = model.patch_embed
    assert isinstance(pe.norm, nn.Identity) and isinstance(model.norm_pre, nn.Identity)
    assert model.reg_token is None and not model.no_embed_class and model.attn_pool is None
    blocks = []
    for blk in model.blocks:
        at = blk.attn
        assert isinstance(at.q_norm, nn.Identity) and isinstance(at.norm, nn.Identity) and at.gate is None
        assert isinstance(blk.mlp.norm, nn.Identity)
        blocks.append(
            {
                "ln1": _ln_params(blk.norm1),
                "attn": True,
                "qkv": _wb(at.qkv),
                "heads": at.num_heads,
                "proj": _wb(at.proj),
                "ls1": None if isinstance(blk.ls1, nn.Identity) else blk.ls1.gamma,
                "ln2": _ln_params(blk.norm2),
                "fc1": _wb(blk.mlp.fc1),
                "fc2": _wb(blk.mlp.fc2),
                "gelu": _gelu(blk.mlp.act),
                "ls2": None if isinstance(blk.ls2, nn.Identity) else blk.ls2.gamma,
            }
        )
    return {
        "patch": (pe.proj.weight, pe.proj.bias, pe.patch_size[0]),
        "cls": model.cls_token,
        "pos": model.pos_embed,
        "blocks": blocks,
        "norm": _ln_params(model.norm),
        "pool": model.global_pool,
        "prefix": model.num_prefix_tokens,
        "fc_norm": _ln_params(model.fc_norm),
        "head": _wb(model.head),
    }


def params_torchvision(model):
    blocks = []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        assert mha._qkv_same_embed_dim and mha.batch_first and mha.bias_k is None
        mlp = layer.mlp
        blocks.append(
            {
                "ln1": _ln_params(layer.ln_1),
                "attn": True,
                "qkv": (mha.in_proj_weight, mha.in_proj_bias),
                "heads": mha.num_heads,
                "proj": (mha.out_proj.weight, mha.out_proj.bias),
                "ls1": None,
                "ln2": _ln_params(layer.ln_2),
                "fc1": _wb(mlp[0]),
                "fc2": _wb(mlp[3]),
                "gelu": _gelu(mlp[1]),
                "ls2": None,
            }
        )
    return {
        "patch": (model.conv_proj.weight, model.conv_proj.bias, model.patch_size),
        "cls": model.class_token,
        "pos": model.encoder.pos_embedding,
        "blocks": blocks,
        "norm": _ln_params(model.encoder.ln),
        "pool": "token",
        "prefix": 1,
        "fc_norm": None,
        "head": _wb(model.heads.head),
    }


def params_tiny(model):
    blocks = []
    for blk in model.blocks:
        blocks.append(
            {
                "ln1": _ln_params(blk.norm1) if blk.attn is not None else None,
                "attn": blk.attn is not None,
                "qkv": _wb(blk.attn.qkv) if blk.attn is not None else None,
                "heads": blk.attn.num_heads if blk.attn is not None else None,
                "proj": _wb(blk.attn.proj) if blk.attn is not None else None,
                "ls1": None,
                "ln2": _ln_params(blk.norm2),
                "fc1": _wb(blk.fc1),
                "fc2": _wb(blk.fc2),
                "gelu": _gelu(blk.act),
                "ls2": None,
            }
        )
    return {
        "patch": (model.patch.weight, model.patch.bias, model.patch.stride[0]),
        "cls": model.cls_token,
        "pos": model.pos_embed,
        "blocks": blocks,
        "norm": _ln_params(model.norm),
        "pool": model.pool,
        "prefix": 1 if model.cls_token is not None else 0,
        "fc_norm": None,
        "head": _wb(model.head),
    }


# ================================================================================================
# Test networks
# ================================================================================================


@torch.no_grad()
def _randomize(model, seed, zero_bias=False):
    """Seeded random weights of unit-scale activations (torchvision zero-initialises its head and
    class token; timm its LayerScale to a constant): every parameter drawn afresh."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        rnd = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if "token" in leaf or "pos_emb" in leaf:
            val = 0.5 * rnd
        elif leaf == "gamma":
            val = 0.5 + 0.2 * rnd
        elif p.dim() >= 2:
            val = rnd / p[0].numel() ** 0.5
        elif "bias" in leaf:
            val = torch.zeros_like(rnd) if zero_bias else 0.2 * rnd
        else:  # LayerNorm weight
            val = 1.0 + 0.2 * rnd
        p.copy_(val.to(p.dtype))
    return model


def make_timm(global_pool="token", init_values=None, fused=True, seed=0, zero_bias=False, **kw):
    model = timm_vit.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=5,
        in_chans=3, global_pool=global_pool, init_values=init_values, **kw,
    ).double()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return _randomize(model, seed, zero_bias).eval()


def make_torchvision(seed=1):
    model = tv_vit.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).double()
    return _randomize(model, seed).eval()


class _Attn(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (looked up at call time)."""

    lxt = False

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, L, D = x.shape
        q, k, v = self.qkv(x).reshape(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.lxt:  # as lxt.efficient.patches.wrap_attention_forward
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(N, L, D))


class _LXTLayerNorm(nn.LayerNorm):
    pass


class _LXTGELU(nn.GELU):
    pass


class _LXTAttn(_Attn):
    lxt = True


# LXT patches only these test-local subclasses (class attributes of classes defined here).
patch_method(layer_norm_forward, _LXTLayerNorm)
patch_method(non_linear_forward, _LXTGELU, keep_original=True)

PLAIN = (nn.LayerNorm, nn.GELU, _Attn)
LXT = (_LXTLayerNorm, _LXTGELU, _LXTAttn)


class _Block(nn.Module):
    def __init__(self, dim, heads, classes, attn=True):
        super().__init__()
        ln, act, att = classes
        self.norm1 = ln(dim, eps=1e-6) if attn else None
        self.attn = att(dim, heads) if attn else None
        self.norm2 = ln(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = act()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A pre-norm ViT of test-local classes (16x16 input, patch 4, width 16, 2 heads)."""

    def __init__(self, classes=PLAIN, depth=2, attn=True, cls_token=True, pos_embed=True, pool="token"):
        super().__init__()
        ln = classes[0]
        dim = 16
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 16 + int(cls_token), dim)) if pos_embed else None
        self.blocks = nn.Sequential(*[_Block(dim, 2, classes, attn) for _ in range(depth)])
        self.norm = ln(dim, eps=1e-6)
        self.pool = pool
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        h = self.norm(self.blocks(h))
        h = h[:, 0] if self.pool == "token" else h[:, 1 if self.cls_token is not None else 0 :].mean(1)
        return self.head(h)


def make_tiny(classes=PLAIN, seed=2, zero_bias=False, **kw):
    return _randomize(TinyViT(classes, **kw).double(), seed, zero_bias).eval()


def _inputs(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def _targets(n, k, classes=5, seed=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n, k), generator=g)


def _attn_lrp():
    from auditkit.explain.lrp.attention import attn_lrp

    return attn_lrp


def _assert_maps_close(got, want, what, atol_rel=ATOL_REL):
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(
        got, want, rtol=RTOL, atol=atol_rel * scale,
        msg=lambda m: f"{what}: max|diff| = {diff:.3e}, max|R| = {scale:.3e}\n{m}",
    )


def _lxt_relevance(model, x, targets):
    """Gradient x input through the LXT-patched copy, one backward per target column."""
    out = []
    for kk in range(targets.shape[1]):
        xx = x.clone().requires_grad_(True)
        logits = model(xx)
        logits.gather(1, targets[:, kk : kk + 1]).sum().backward()
        out.append((xx.grad * xx).detach())
    return torch.stack(out, dim=1)


TIMM_VARIANTS = [
    pytest.param("token", None, True, id="timm-token-fused"),
    pytest.param("token", None, False, id="timm-token-explicit"),
    pytest.param("avg", 0.5, True, id="timm-avg-layerscale-fused"),
    pytest.param("token", 0.5, False, id="timm-token-layerscale-explicit"),
]
EPSILONS = [pytest.param(1e-9, id="eps1e-9"), pytest.param(0.1, id="eps0.1")]


# ================================================================================================
# Tests of the oracle itself (they need no auditkit code)
# ================================================================================================


@pytest.mark.parametrize(("pool", "init_values", "fused"), TIMM_VARIANTS)
def test_oracle_forward_equals_timm(pool, init_values, fused):
    model = make_timm(pool, init_values, fused)
    x = _inputs()
    with torch.no_grad():
        want = model(x)
        got, _ = oracle_forward(params_timm(model), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_oracle_forward_equals_torchvision():
    model = make_torchvision()
    x = _inputs()
    with torch.no_grad():
        want = model(x)
        got, _ = oracle_forward(params_torchvision(model), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw", [{}, {"pool": "avg"}, {"attn": False, "cls_token": False, "pos_embed": False, "pool": "avg"}]
)
def test_oracle_forward_equals_tiny(kw):
    x = _inputs()
    plain = make_tiny(PLAIN, **kw)
    patched = make_tiny(LXT, **kw)
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(patched(x), want, rtol=1e-12, atol=1e-12)
        got, _ = oracle_forward(params_tiny(plain), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"pool": "avg"}])
def test_oracle_equals_lxt_at_eps_zero(kw):
    """Cross-check of the two oracles: the explicit rules at ε = 0 equal gradient x input through
    the LXT-patched tiny ViT. LXT's identity rule divides by input + 1e-10; emulating that shift
    the two agree to ~1e-16 (asserted at the standard tolerance); with the exact identity rule they
    differ by that shift alone, up to 1e-10/min|GELU input| (min ≈ 2e-5 here) per unit: measured
    3e-8 of the map's scale, asserted below LXT_ATOL_REL."""
    x, targets = _inputs(), _targets(3, 2)
    want = _lxt_relevance(make_tiny(LXT, **kw), x, targets)
    P = params_tiny(make_tiny(PLAIN, **kw))
    emulated, _ = oracle_relevance(P, x, targets, eps=0.0, lxt_shift=1e-10)
    _assert_maps_close(emulated, want, f"oracle (LXT shift) vs LXT {kw}")
    exact, _ = oracle_relevance(P, x, targets, eps=0.0)
    _assert_maps_close(exact, want, f"oracle vs LXT {kw}", atol_rel=LXT_ATOL_REL)


def test_oracle_is_not_plain_gradient_times_input():
    """Sanity: the rules differ from plain gradient x input by O(1) (so the tolerance separates them)."""
    model = make_timm()
    x, targets = _inputs(), _targets(3, 1)
    got, _ = oracle_relevance(params_timm(model), x, targets, eps=0.0)
    xx = x.clone().requires_grad_(True)
    model(xx).gather(1, targets).sum().backward()
    plain = (xx.grad * xx).unsqueeze(1)
    assert (got - plain).abs().max() > 0.05 * got.abs().max()


def test_oracle_eps_matters():
    P = params_timm(make_timm())
    x, targets = _inputs(), _targets(3, 1)
    small, _ = oracle_relevance(P, x, targets, eps=1e-9)
    large, _ = oracle_relevance(P, x, targets, eps=0.1)
    assert (small - large).abs().max() > 1e-3 * small.abs().max()


# ================================================================================================
# attn_lrp against the oracles
# ================================================================================================


def _assert_matches_oracle(model, params, eps, what):
    x, targets = _inputs(), _targets(3, 2)
    want, want_logits = oracle_relevance(params, x, targets, eps)
    got, logits = _attn_lrp()(model, x, targets, epsilon=eps, create_graph=False)
    torch.testing.assert_close(logits.detach(), want_logits.detach(), rtol=1e-12, atol=1e-12)
    _assert_maps_close(got.detach(), want.detach(), what)


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize(("pool", "init_values", "fused"), TIMM_VARIANTS)
def test_timm_matches_oracle(pool, init_values, fused, eps):
    model = make_timm(pool, init_values, fused)
    _assert_matches_oracle(model, params_timm(model), eps, f"timm {pool} ls={init_values} fused={fused} eps={eps}")


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize(("pool", "init_values"), [("token", None), ("avg", 0.5)])
def test_timm_fused_equals_explicit(pool, init_values, eps):
    x, targets = _inputs(), _targets(3, 2)
    fused, _ = _attn_lrp()(make_timm(pool, init_values, True), x, targets, epsilon=eps)
    explicit, _ = _attn_lrp()(make_timm(pool, init_values, False), x, targets, epsilon=eps)
    _assert_maps_close(fused.detach(), explicit.detach(), f"timm fused vs explicit {pool} eps={eps}")


@pytest.mark.parametrize("eps", EPSILONS)
def test_torchvision_matches_oracle(eps):
    model = make_torchvision()
    _assert_matches_oracle(model, params_torchvision(model), eps, f"torchvision eps={eps}")


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("kw", [{}, {"pool": "avg"}])
def test_tiny_sdpa_matches_oracle(kw, eps):
    model = make_tiny(PLAIN, **kw)
    x, targets = _inputs(), _targets(3, 2)
    want, _ = oracle_relevance(params_tiny(model), x, targets, eps)
    got, _ = _attn_lrp()(model, x, targets, epsilon=eps)
    _assert_maps_close(got.detach(), want.detach(), f"tiny sdpa {kw} eps={eps}")


@pytest.mark.parametrize("kw", [{}, {"pool": "avg"}])
def test_matches_lxt(kw):
    """LXT (ε = 0 in linear layers) on the patched copy vs attn_lrp at ε = 1e-12 on the plain copy
    (ε changes each unit by 1e-12/|z|; LXT's 1e-10 shift in the identity rule by 1e-10/|input|,
    measured 3e-8 of the scale between the oracle and LXT: hence LXT_ATOL_REL)."""
    x, targets = _inputs(), _targets(3, 2)
    want = _lxt_relevance(make_tiny(LXT, **kw), x, targets)
    got, _ = _attn_lrp()(make_tiny(PLAIN, **kw), x, targets, epsilon=1e-12)
    _assert_maps_close(got.detach(), want, f"attn_lrp vs LXT {kw}", atol_rel=LXT_ATOL_REL)


# ================================================================================================
# Targets, batches, side effects
# ================================================================================================


@pytest.mark.parametrize("make", [make_timm, make_torchvision], ids=["timm", "torchvision"])
def test_three_targets_equal_three_single_calls(make):
    model = make()
    x, targets = _inputs(), _targets(3, 3)
    together, _ = _attn_lrp()(model, x, targets, epsilon=1e-9)
    assert together.shape == (3, 3, 3, 16, 16)
    for kk in range(3):
        single, _ = _attn_lrp()(model, x, targets[:, kk : kk + 1], epsilon=1e-9)
        _assert_maps_close(together[:, kk : kk + 1].detach(), single.detach(), f"target column {kk}")


@pytest.mark.parametrize("make", [make_timm, make_torchvision], ids=["timm", "torchvision"])
def test_batch_equals_per_sample(make):
    model = make()
    x, targets = _inputs(), _targets(3, 2)
    batch, logits = _attn_lrp()(model, x, targets, epsilon=1e-9)
    for n in range(3):
        one, one_logits = _attn_lrp()(model, x[n : n + 1], targets[n : n + 1], epsilon=1e-9)
        _assert_maps_close(batch[n : n + 1].detach(), one.detach(), f"sample {n}")
        torch.testing.assert_close(logits[n : n + 1].detach(), one_logits.detach(), rtol=1e-12, atol=1e-12)


def _snapshot(model):
    return {
        "params": {k: (v.detach().clone(), v.requires_grad, v.grad) for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "fused": {k: m.fused_attn for k, m in model.named_modules() if hasattr(m, "fused_attn")},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})))
            for k, m in model.named_modules()
        },
        "classes": {k: type(m) for k, m in model.named_modules()},
        "forwards": {k: m.__dict__.get("forward") for k, m in model.named_modules()},
    }


@pytest.mark.parametrize("make", [make_timm, make_torchvision], ids=["timm", "torchvision"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_model_unchanged(make, train):
    model = make()
    model.register_buffer("probe", torch.arange(4, dtype=torch.float64))
    model.train(train)
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    before = _snapshot(model)
    x = _inputs()
    x_before, x_attrs = x.clone(), dict(x.__dict__)
    _attn_lrp()(model, x, _targets(3, 2), epsilon=1e-9)
    after = _snapshot(model)
    assert torch.equal(x, x_before) and dict(x.__dict__) == x_attrs and not x.requires_grad and x.grad is None
    for key in ("training", "fused", "hooks", "classes", "forwards"):
        assert after[key] == before[key], key
    for k, (v, rg, grad) in before["params"].items():
        v2, rg2, grad2 = after["params"][k]
        assert torch.equal(v, v2) and rg == rg2, k
        assert grad is None and grad2 is None, f"{k}: .grad written"
    for k, v in before["buffers"].items():
        assert torch.equal(v, after["buffers"][k]), k


def _global_objects():
    return {
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "F.multi_head_attention_forward": F.multi_head_attention_forward,
        "F.layer_norm": F.layer_norm,
        "F.gelu": F.gelu,
        "F.linear": F.linear,
        "F.conv2d": F.conv2d,
        "F.softmax": F.softmax,
        "torch.matmul": torch.matmul,
        "torch.softmax": torch.softmax,
        "torch.Tensor.softmax": torch.Tensor.softmax,
        "torch.Tensor.__matmul__": torch.Tensor.__matmul__,
        "nn.LayerNorm.forward": nn.LayerNorm.forward,
        "nn.GELU.forward": nn.GELU.forward,
        "nn.Linear.forward": nn.Linear.forward,
        "nn.Conv2d.forward": nn.Conv2d.forward,
        "nn.MultiheadAttention.forward": nn.MultiheadAttention.forward,
        "nn.Dropout.forward": nn.Dropout.forward,
        "nn.Module.__call__": nn.Module.__call__,
        "nn.Module._call_impl": nn.Module._call_impl,
        "timm.Attention.forward": timm.layers.Attention.forward,
        "timm.Block.forward": timm_vit.Block.forward,
        "timm.Mlp.forward": timm.layers.Mlp.forward,
        "timm.LayerScale.forward": timm.layers.LayerScale.forward,
        "timm.LayerNorm.forward": timm.layers.LayerNorm.forward,
        "timm.VisionTransformer.forward": timm_vit.VisionTransformer.forward,
        "tv.EncoderBlock.forward": tv_vit.EncoderBlock.forward,
        "tv.VisionTransformer.forward": tv_vit.VisionTransformer.forward,
        "global hooks": tuple(
            len(getattr(torch.nn.modules.module, name, {}))
            for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                         "_global_backward_pre_hooks", "_global_module_registration_hooks")
        ),
        "grad enabled": torch.is_grad_enabled(),
    }


def _plain_grads(model, x):
    model.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    out = model(xx)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    grads["input"] = xx.grad.clone()
    model.zero_grad(set_to_none=True)
    return grads


def test_nothing_patched_outside_the_call():
    other_timm, other_tv = make_timm(seed=11), make_torchvision(seed=12)
    x = _inputs(2)
    before_objects = _global_objects()
    before = [_plain_grads(other_timm, x), _plain_grads(other_tv, x)]
    attn_lrp = _attn_lrp()
    attn_lrp(make_timm(), _inputs(), _targets(3, 2), epsilon=1e-9)
    attn_lrp(make_timm(fused=False), _inputs(), _targets(3, 2), epsilon=1e-9)
    attn_lrp(make_torchvision(), _inputs(), _targets(3, 2), epsilon=1e-9)
    attn_lrp(make_tiny(), _inputs(), _targets(3, 2), epsilon=1e-9)
    after_objects = _global_objects()
    changed = [k for k, v in before_objects.items() if v is not after_objects[k] and v != after_objects[k]]
    assert not changed, changed
    after = [_plain_grads(other_timm, x), _plain_grads(other_tv, x)]
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            assert torch.equal(b[k], a[k]), k


# ================================================================================================
# Conservation
# ================================================================================================


def test_conservation_exact_without_attention_class_token_position_embedding():
    """Bias-free, no class token, no position embedding, no attention (so no softmax rule): every
    remaining rule (ε rule at ε = 1e-12 with zero bias, LayerNorm z/identity/centering rules with
    zero bias, identity rule, residual z rule, mean pooling) is conservative, so
    Σ R_input = z_t up to ε/|z| ≈ 1e-12 relative per layer."""
    model = make_tiny(PLAIN, zero_bias=True, attn=False, cls_token=False, pos_embed=False, pool="avg")
    x, targets = _inputs(), _targets(3, 2)
    ledger = {}
    want, logits = oracle_relevance(params_tiny(model), x, targets, 1e-12, ledger)
    z_t = logits.gather(1, targets)
    torch.testing.assert_close(want.flatten(2).sum(2), z_t, rtol=1e-9, atol=0)
    got, _ = _attn_lrp()(model, x, targets, epsilon=1e-12)
    torch.testing.assert_close(got.detach().flatten(2).sum(2), z_t.detach(), rtol=1e-9, atol=0)


def _conservation_report(P, x, targets):
    ledger = {}
    rel, logits = oracle_relevance(P, x, targets, 1e-12, ledger)
    z_t = logits.gather(1, targets)
    total = rel.flatten(2).sum(2)
    for kk in range(targets.shape[1]):  # the ledger identity: z_t = Σ R_input + Σ absorbed
        absorbed = sum(ledger[kk].values())
        torch.testing.assert_close(total[:, kk] + absorbed, z_t[:, kk], rtol=1e-9, atol=1e-12)
    return rel, z_t, ledger


@pytest.mark.parametrize("make", ["timm", "timm-avg", "tiny-no-cls-no-pos"])
def test_conservation_measured_bias_free(make):
    """Bias-free networks with attention: Σ R_input / z_t is NOT 1 even without class token and
    position embedding, because the softmax rule R_S_i = S_i ⊙ (R_A_i − A_i Σ_j R_A_ij) is not
    conservative (Σ_j R_S_ij = Σ_j S_ij R_A_ij − (Σ_j A_ij S_ij) Σ_j R_A_ij). The oracle keeps a
    ledger of what each non-conservative step absorbs; asserted: z_t = Σ R_input + Σ ledger exactly
    (all other rules conserve), the linear/LayerNorm entries vanish (bias-free, ε = 1e-12), and
    attn_lrp's Σ R_input equals the oracle's."""
    if make == "timm":
        model = make_timm(zero_bias=True, seed=3)
        P = params_timm(model)
    elif make == "timm-avg":
        model = make_timm("avg", 0.5, zero_bias=True, seed=3)
        P = params_timm(model)
    else:
        model = make_tiny(PLAIN, zero_bias=True, cls_token=False, pos_embed=False, pool="avg")
        P = params_tiny(model)
    x, targets = _inputs(), _targets(3, 2)
    rel, z_t, ledger = _conservation_report(P, x, targets)
    for kk, led in ledger.items():
        for key in ("linear bias + eps", "layernorm bias"):
            assert led[key].abs().max() <= 1e-9 * z_t[:, kk].abs().max(), (key, led[key])
        ratio = rel[:, kk].flatten(1).sum(1) / z_t[:, kk]
        print(f"{make} target col {kk}: sum(R)/z_t = {ratio.tolist()}; "
              + "; ".join(f"{k}: {(v / z_t[:, kk]).tolist()}" for k, v in led.items()))
    got, _ = _attn_lrp()(model, x, targets, epsilon=1e-12)
    torch.testing.assert_close(
        got.detach().flatten(2).sum(2), rel.flatten(2).sum(2), rtol=1e-6, atol=1e-9 * z_t.abs().max().item()
    )


def test_lxt_patching_stays_on_the_test_classes():
    """LXT's primitives sit on the test-local subclasses only; torch's classes are untouched."""
    a, b = make_tiny(PLAIN), make_tiny(LXT)
    assert type(a.norm).forward is nn.LayerNorm.forward and type(a.blocks[0].act).forward is nn.GELU.forward
    assert type(b.norm).forward is layer_norm_forward and type(b.blocks[0].act).forward is non_linear_forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_identity_rules_safe_denominator_is_x_with_one_at_exact_zeros(dtype):
    # GELU's identity rule divides by its input; the arithmetic form must equal where(x == 0, 1, x) on
    # every value, signed zeros, infinities, NaN and subnormals included.
    from auditkit.explain.lrp.attention import _nonzero

    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), tiny / 4, -tiny / 4, 3e-3], dtype=dtype)
    x = torch.cat([x, torch.randn(64, generator=torch.Generator().manual_seed(11)).to(dtype)])
    got, want = _nonzero(x), torch.where(x == 0, torch.ones_like(x), x)
    assert torch.equal(got, want)
    assert torch.isnan(_nonzero(torch.tensor([float("nan")], dtype=dtype))).all()


@pytest.mark.parametrize("create_graph", [False, True])
def test_an_explanation_frees_its_graph_without_the_cyclic_collector(create_graph):
    # An ε hook that holds the tensor it is registered on makes a cycle: the whole graph of every call
    # then lives until Python's cyclic collector runs (+36 MB per call of 64 vit-digits images).
    import gc
    import weakref

    from auditkit.explain.lrp.attention import attn_lrp

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, in_chans=1, img_size=32,
                            embed_dim=32, depth=2, num_heads=2).eval()
    outputs = []
    handle = net.blocks[0].mlp.fc1.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        relevance, logits = attn_lrp(net, torch.rand(2, 1, 32, 32), torch.tensor([[0], [2]]), epsilon=1e-6,
                                     create_graph=create_graph)
        assert len(outputs) == 1
        del relevance, logits
        assert outputs[0]() is None
    finally:
        handle.remove()
        if was_enabled:
            gc.enable()
