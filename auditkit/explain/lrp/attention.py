"""AttnLRP for transformers: LRP as modified gradients, scoped to one call.

Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers"
(ICML 2024, arXiv:2402.05602). In gradient x input form, relevance at a tensor t is R_t = t ⊙ g_t,
where g is a *modified* gradient: each rule changes the backward of the operations it covers and
everything else keeps its plain gradient. The forward pass is the network's own, on its own kernels
(fused ``scaled_dot_product_attention`` included), so one explanation costs about a forward and a
backward pass, batched, for K targets at once.

The rules (the table ``GRADIENT_RULES`` below; tests/test_attnlrp_25.py checks each against a float64
implementation of the explicit rules and against LXT):

- linear layers and convolutions z = W a + b: the epsilon rule, R_a = a ⊙ Wᵀ(R / (z + ε·sign z)),
  as the gradient arriving at z scaled by z / (z + ε·sign z) (sign(0) = +1);
- LayerNorm / RMSNorm / GroupNorm: the std is a constant in the backward (identity rule on the
  division, z-rule on the centering and the affine map; AttnLRP §3.3 "normalisation");
- element-wise activations y = f(x) (GELU, SiLU, tanh, sigmoid, ...): the identity rule R_x = R_y,
  i.e. g_x = g_y ⊙ y / x (AttnLRP Eq. 9);
- softmax: the plain gradient: times the input it equals AttnLRP's softmax rule
  R_x = x ⊙ (R − s Σ R) (Prop. 3.1), so it needs no change;
- products of two tensors that both depend on the input (q·kᵀ, attention·v, gates): the uniform
  rule, half the relevance to each operand (AttnLRP Eq. 7): each operand's gradient halved. On the
  fused attention kernel out = softmax(s·q kᵀ) v that makes g_q and g_k a quarter and g_v a half
  of the plain ones; an operand that does not depend on the input (a learned query) is a weight:
  plain gradient;
- everything else (residual additions, reshapes, token concatenation, pooling, position embeddings,
  LayerScale, interpolation): the plain gradient, i.e. the z-rule (learned constants such as the
  class token and the position embedding absorb their share).

Scope: the rules act only inside :func:`attn_lrp`, through a ``TorchFunctionMode`` (thread-local):
nothing is patched, the model's modules, parameters and modes are left as they were, and any other
model in the process computes plain gradients. Whether a tensor depends on the input is tracked by
the mode (an attribute on the tensors the call creates), so a product with a parameter is never
mistaken for an attention product.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .registry import UnsupportedLayerError
from .rules import epsilon_ratio

_MARK = "_auditkit_relevant"  # set on every tensor the explained call derives from its input


def _relevant(value) -> bool:
    return isinstance(value, Tensor) and getattr(value, _MARK, False)


def _any_relevant(args, kwargs) -> bool:
    for value in args:
        if isinstance(value, Tensor):
            if getattr(value, _MARK, False):
                return True
        elif isinstance(value, (list, tuple)):
            if any(_relevant(v) for v in value):
                return True
    return any(_relevant(v) for v in kwargs.values()) if kwargs else False


def _mark(value) -> None:
    if isinstance(value, Tensor):
        setattr(value, _MARK, True)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Tensor):
                setattr(v, _MARK, True)


# ---- the modified backward passes ------------------------------------------------------------------


# The rules' Functions return a detached alias of their input (same storage and version counter, no
# autograd view): a view made inside a custom Function cannot be modified in place later and costs
# view bookkeeping in the backward; an in-place change of a value a rule saved is still caught by
# autograd's version check (and reported in one line by attn_lrp).


class _ScaleGradient(torch.autograd.Function):
    """Forward: the tensor; relevance backward: its gradient times ``factor`` (the uniform rule's share)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float, state: "_AttnLRP") -> Tensor:
        ctx.factor, ctx.state = factor, state
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad * ctx.factor if ctx.state.relevance_pass else grad), None, None


class _IdentityRule(torch.autograd.Function):
    """y = f(x) computed outside (its graph kept for a differentiable explanation); the backward to x
    is g ⊙ y / x (AttnLRP Eq. 9), nothing flows through f's own derivative. ``ratio(x, y)`` gives
    y / x (SiLU's in closed form, sigmoid(x): one kernel, exact at 0; GELU's Φ(x) is slower than
    the division on CPU, where erf is decomposed)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, ratio: Callable, state: "_AttnLRP") -> Tensor:
        ctx.save_for_backward(x, y)
        ctx.ratio, ctx.state = ratio, state
        return y.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.state.relevance_pass:
            return None, grad, None, None  # any other backward: f's own derivative
        x, y = ctx.saved_tensors
        if ctx.ratio is _ratio and not torch.is_grad_enabled():
            # (g ⊙ y) / x with two new tensors instead of four: on CPU the allocations of these
            # activation-sized tensors cost more than the arithmetic (measured on ViT-Tiny's MLP).
            return (grad * y).div_(_nonzero(x)), None, None, None
        return grad * ctx.ratio(x, y), None, None, None


def _nonzero(x: Tensor) -> Tensor:
    """x, with 1 where x = 0 exactly (R_x = x ⊙ g = 0 there whatever the ratio; dividing by 1 keeps it
    finite): x + 1 - |sign x|, exact, and arithmetic only: a comparison and ``where`` took 3.4x as
    long on CPU (1.41 against 0.42 ms for 8x197x768 floats, one thread)."""
    return torch.sign(x).abs_().neg_().add_(1).add_(x)


def _ratio(x: Tensor, y: Tensor) -> Tensor:
    return y / _nonzero(x)


def _silu_ratio(x: Tensor, y: Tensor) -> Tensor:
    return torch.sigmoid(x)  # silu(x) = x σ(x)


class _NormRule(torch.autograd.Function):
    """y = norm(x) computed outside by the fused kernel; the backward to x treats the std as a
    constant: g_x = (w ⊙ g)/σ − mean(w ⊙ g)/σ over the normalised dims (no mean for RMSNorm).
    ``rstd`` (1/σ from the forward kernel) is used when the explanation need not be differentiable;
    otherwise σ is recomputed from x in the backward, so a loss on the heatmap sees its dependence
    on the parameters (TEA)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight, dims: tuple, eps: float, centred: bool, groups: int,
                rstd, state: "_AttnLRP") -> Tensor:
        ctx.save_for_backward(x, weight if weight is not None else x.new_ones(()),
                              rstd if rstd is not None else x.new_ones(()))
        ctx.dims, ctx.eps, ctx.centred, ctx.groups, ctx.state = dims, eps, centred, groups, state
        ctx.has_weight, ctx.has_rstd = weight is not None, rstd is not None
        return y.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        nothing = (None,) * 8
        if not ctx.state.relevance_pass:
            return None, grad, *nothing[1:]  # any other backward: the norm's own derivative
        x, weight, rstd = ctx.saved_tensors
        if ctx.groups:  # GroupNorm: weight per channel, statistics per (sample, group)
            n, c = x.shape[:2]
            shape = (1, c) + (1,) * (x.dim() - 2)
            scaled = grad * weight.view(shape) if ctx.has_weight else grad
            xg, sg = x.reshape(n, ctx.groups, -1), scaled.reshape(n, ctx.groups, -1)
            std = (xg.var(dim=2, unbiased=False, keepdim=True) + ctx.eps).sqrt()
            return ((sg - sg.mean(dim=2, keepdim=True)) / std).view_as(x), *nothing
        scaled = grad * weight if ctx.has_weight else grad
        if ctx.centred:
            scaled = scaled - scaled.mean(dim=ctx.dims, keepdim=True)
        if ctx.has_rstd and not torch.is_grad_enabled():
            return scaled.mul_(rstd), *nothing
        if ctx.centred:
            std = (x.var(dim=ctx.dims, unbiased=False, keepdim=True) + ctx.eps).sqrt()
        else:
            std = (x.pow(2).mean(dim=ctx.dims, keepdim=True) + ctx.eps).sqrt()
        return scaled / std, *nothing


def _epsilon_hook(z: Tensor, epsilon: float, state: "_AttnLRP") -> None:
    """The epsilon rule on z: in the relevance pass, the gradient arriving at z (from all its readers)
    times z/(z + ε·sign z); any other backward through z is left alone."""
    version = z._version
    held = state.hold(z)

    def hook(grad: Tensor) -> Tensor | None:
        if not state.relevance_pass:
            return None
        z = held[0]
        if z._version != version:
            raise UnsupportedLayerError("AttnLRP: a linear layer's output was modified in place later in the "
                                       "forward pass; make that operation out of place")
        differentiable = torch.is_grad_enabled()
        ratio = epsilon_ratio(grad, z, epsilon, differentiable)  # g / (z + ε·sign z), one kernel
        return ratio * z if differentiable else ratio.mul_(z)

    z.register_hook(hook)


# ---- the rules: (mode, func, args, kwargs) -> output, called when an argument is relevant ------------


def _linear(mode: "_AttnLRP", func, args, kwargs):
    out = func(*args, **kwargs)
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if _relevant(weight):  # both operands depend on the input: a product, not a layer
        raise UnsupportedLayerError("AttnLRP: a linear layer whose weight depends on the input is not supported")
    if mode.epsilon and isinstance(out, Tensor) and out.requires_grad:
        _epsilon_hook(out, mode.epsilon, mode)
    return out


def _product(mode: "_AttnLRP", func, args, kwargs):
    """A product of tensors: the uniform rule when several depend on the input, else a linear map."""
    relevant = [i for i, a in enumerate(args) if _relevant(a)]
    if len(relevant) < 2:
        out = func(*args, **kwargs)
        if func in _WEIGHTED_PRODUCTS and mode.epsilon and isinstance(out, Tensor) and out.requires_grad:
            _epsilon_hook(out, mode.epsilon, mode)  # x @ W: a linear layer written by hand
        return out
    if getattr(func, "__name__", "").endswith("_") or func in _IN_PLACE_PRODUCTS:
        raise UnsupportedLayerError(f"AttnLRP: an in-place product of two input-dependent tensors "
                                    f"({getattr(func, '__name__', func)}) is not supported; make it out of place")
    share = 1.0 / len(relevant)
    args = tuple(_ScaleGradient.apply(a, share, mode) if i in relevant else a for i, a in enumerate(args))
    return func(*args, **kwargs)


def _einsum(mode: "_AttnLRP", func, args, kwargs):
    operands = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else tuple(args[1])
    relevant = [op for op in operands if _relevant(op)]
    if len(relevant) < 2:
        out = func(*args, **kwargs)
        if mode.epsilon and isinstance(out, Tensor) and out.requires_grad:
            _epsilon_hook(out, mode.epsilon, mode)
        return out
    share = 1.0 / len(relevant)
    return func(args[0], *[_ScaleGradient.apply(op, share, mode) if _relevant(op) else op for op in operands], **kwargs)


def _divide(mode: "_AttnLRP", func, args, kwargs):
    """a / b with both input-dependent (a normalisation written by hand): b is a constant."""
    if len(args) > 1 and _relevant(args[1]) and _relevant(args[0]):  # in place too (ConViT: attn /= sum)
        return func(args[0], args[1].detach(), *args[2:], **kwargs)
    return func(*args, **kwargs)


def _activation(mode: "_AttnLRP", func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    if kwargs.get("inplace"):  # F.* pass their options as keywords to the mode
        # Computed out of place: the rule needs x as it was (callers use the returned value).
        kwargs = {**kwargs, "inplace": False}
    y = func(*args, **kwargs)
    if not (isinstance(y, Tensor) and y.requires_grad and x.requires_grad):
        return y
    return _IdentityRule.apply(x, y, _silu_ratio if func is F.silu else _ratio, mode)


def _layer_norm(mode: "_AttnLRP", func, args, kwargs):
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if not x.requires_grad:
        return func(*args, **kwargs)
    shape = tuple(shape) if isinstance(shape, (list, tuple, torch.Size)) else (int(shape),)
    y, _mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)  # the fused kernel, and 1/σ
    dims = tuple(range(-len(shape), 0))
    return _NormRule.apply(x, y, weight, dims, eps, True, 0, None if mode.create_graph else rstd, mode)


def _rms_norm(mode: "_AttnLRP", func, args, kwargs):
    y = func(*args, **kwargs)
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[3] if len(args) > 3 else kwargs.get("eps")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if not (y.requires_grad and x.requires_grad):
        return y
    dims = tuple(range(-len(tuple(shape)), 0)) if isinstance(shape, (list, tuple, torch.Size)) else (-1,)
    return _NormRule.apply(x, y, weight, dims, eps, False, 0, None, mode)


def _group_norm(mode: "_AttnLRP", func, args, kwargs):
    y = func(*args, **kwargs)
    x, groups = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if not (y.requires_grad and x.requires_grad):
        return y
    return _NormRule.apply(x, y, weight, (), eps, True, int(groups), None, mode)


def _attention(mode: "_AttnLRP", func, args, kwargs):
    """softmax(s·q kᵀ + mask) v on the fused kernel: the uniform rule at both products."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[names[i]] for i in range(3))
    scores_relevant = _relevant(q) or _relevant(k)
    outer = 0.5 if scores_relevant and _relevant(v) else 1.0  # attention · v
    inner = 0.5 if _relevant(q) and _relevant(k) else 1.0  # q · kᵀ
    q = _ScaleGradient.apply(q, outer * inner, mode) if _relevant(q) else q
    k = _ScaleGradient.apply(k, outer * inner, mode) if _relevant(k) else k
    v = _ScaleGradient.apply(v, outer, mode) if _relevant(v) else v
    rest = {key: value for key, value in kwargs.items() if key not in names}
    if mode.create_graph:  # the fused kernels have no double backward: the composite math kernel
        with sdpa_kernel(SDPBackend.MATH):
            return func(q, k, v, *args[3:], **rest)
    return func(q, k, v, *args[3:], **rest)


def _multi_head_attention(mode: "_AttnLRP", func, args, kwargs):
    """``nn.MultiheadAttention``'s functional form, written with the calls the rules cover (its own
    body dispatches back to the mode, so it is not re-entered): in-projection, heads, attention,
    out-projection. Options it cannot honour here are refused in one line."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = dict(zip(names, args))
    a.update(kwargs)
    if a.get("bias_k") is not None or a.get("bias_v") is not None or a.get("add_zero_attn"):
        raise UnsupportedLayerError("AttnLRP: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    if a.get("use_separate_proj_weight"):
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        weights = a["in_proj_weight"].chunk(3)
    biases = a["in_proj_bias"].chunk(3) if a.get("in_proj_bias") is not None else (None,) * 3
    call = mode.apply_rule
    query, key, value = a["query"], a["key"], a["value"]  # (L, N, E), or (L, E) unbatched
    batched = query.dim() == 3
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
    length, n, embed = query.shape
    heads = a["num_heads"]
    q, k, v = (call(F.linear, (t, w, b), {}) for t, w, b in zip((query, key, value), weights, biases))

    def split(t: Tensor) -> Tensor:  # (L, N, E) -> (N, heads, L, E/heads)
        return call(Tensor.permute, (call(Tensor.reshape, (t, t.shape[0], n, heads, embed // heads), {}),
                                     (1, 2, 0, 3)), {})

    mask = a.get("attn_mask")
    padding = a.get("key_padding_mask")
    if padding is not None:
        padding = F._canonical_mask(mask=padding, mask_name="key_padding_mask", other_type=None, other_name="",
                                    target_type=q.dtype).view(n, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
    if mask is not None and mask.dim() == 3:
        mask = mask.view(n, heads, *mask.shape[1:])
    qh, kh, vh = split(q), split(k), split(v)
    need_weights = a.get("need_weights", True)
    if need_weights:  # the explicit path: the weights are returned, so they are computed
        scores = call(torch.matmul, (call(Tensor.mul, (qh, 1.0 / math.sqrt(embed // heads)), {}),
                                     call(Tensor.transpose, (kh, -2, -1), {})), {})
        if mask is not None:
            scores = call(Tensor.add, (scores, mask), {})
        weights_out = call(torch.softmax, (scores, -1), {})
        out = call(torch.matmul, (weights_out, vh), {})
    else:
        out = call(F.scaled_dot_product_attention, (qh, kh, vh), {"attn_mask": mask,
                                                                   "is_causal": bool(a.get("is_causal"))})
        weights_out = None
    out = call(Tensor.reshape, (call(Tensor.permute, (out, (2, 0, 1, 3)), {}), length, n, embed), {})
    out = call(F.linear, (out, a["out_proj_weight"], a.get("out_proj_bias")), {})
    if weights_out is not None and a.get("average_attn_weights", True):
        weights_out = weights_out.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        weights_out = weights_out.squeeze(0) if weights_out is not None else None
    return out, weights_out


_ACTIVATIONS = (F.gelu, F.silu, F.mish, F.hardswish, F.elu, F.selu, F.celu, F.softplus, F.hardsigmoid, F.hardtanh,
                F.relu6, F.tanh, F.sigmoid, torch.tanh, torch.sigmoid, Tensor.tanh, Tensor.sigmoid, torch.erf,
                Tensor.erf)
_WEIGHTED_PRODUCTS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm,
                      torch.mm, Tensor.mm}
_IN_PLACE_PRODUCTS = {Tensor.__imul__}

#: The gradient-form rule table: function -> rule, applied when one of its arguments depends on the
#: input. Functions not listed keep their plain gradient (the z-rule).
GRADIENT_RULES: dict[Callable, Callable] = {
    **dict.fromkeys((F.linear, F.conv1d, F.conv2d, F.conv3d), _linear),
    **dict.fromkeys((*_WEIGHTED_PRODUCTS, torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.mul_,
                     Tensor.__imul__), _product),
    torch.einsum: _einsum,
    **dict.fromkeys((torch.div, Tensor.div, Tensor.__truediv__, Tensor.div_, Tensor.__itruediv__, torch.true_divide),
                    _divide),
    **dict.fromkeys(_ACTIVATIONS, _activation),
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.scaled_dot_product_attention: _attention,
    F.multi_head_attention_forward: _multi_head_attention,
}
if hasattr(F, "rms_norm"):
    GRADIENT_RULES[F.rms_norm] = _rms_norm


class _AttnLRP(TorchFunctionMode):
    """The rules, active for one explanation: every call whose arguments depend on the input goes
    through its rule (or plainly), and its outputs are marked as depending on the input."""

    def __init__(self, epsilon: float, create_graph: bool) -> None:
        super().__init__()
        self.epsilon, self.create_graph = epsilon, create_graph
        # True only while attn_lrp's own backward passes run: the rules change those; any later
        # backward through the same graph (a loss on the logits, the second-order pass of a loss on
        # the heatmap) sees the network's true derivatives.
        self.relevance_pass = False
        # The outputs the ε hooks read. A hook registered on z cannot hold z itself: that cycle
        # (z -> hook -> z) keeps every explanation's graph alive until Python's cyclic collector runs
        # (+36 MB per call of 64 vit-digits images, measured); ``release`` drops them when the call ends.
        self._held: list[list[Tensor]] = []

    def hold(self, tensor: Tensor) -> list[Tensor]:
        held = [tensor]
        self._held.append(held)
        return held

    def release(self) -> None:
        for held in self._held:
            held.clear()
        self._held.clear()

    def apply_rule(self, func, args, kwargs):
        if not _any_relevant(args, kwargs):
            return func(*args, **kwargs)
        rule = GRADIENT_RULES.get(func)
        out = func(*args, **kwargs) if rule is None else rule(self, func, args, kwargs)
        _mark(out)
        if out is None and args and isinstance(args[0], Tensor):  # __setitem__: the target now holds input
            _mark(args[0])
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.apply_rule(func, args, kwargs or {})


# ---- the entry -------------------------------------------------------------------------------------


def attn_lrp(
    net: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    epsilon: float,
    create_graph: bool = False,
    select: Callable = lambda output: output,
) -> tuple[Tensor, Tensor]:
    """(relevance (N, K, C, H, W) of the input pixels for each target, logits (N, classes)).

    ``net`` maps x (N, C, H, W) to an output from which ``select`` takes the logits (N, classes);
    ``targets`` (N, K) are class indices; relevance starts at the target logit (R = z_t) and flows
    back by the rules in the module docstring, computed as x ⊙ g with one forward pass and K
    backward passes (no per-sample loop). ``create_graph=True`` keeps the result differentiable in
    the parameters (TEA). UnsupportedLayerError (one line) for a construct the rules do not cover.
    """
    n, k = targets.shape
    leaf = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
    setattr(leaf, _MARK, True)
    rules = _AttnLRP(epsilon, create_graph)
    try:
        with torch.enable_grad(), rules:
            logits = select(net(leaf))
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
            gave = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise UnsupportedLayerError(f"AttnLRP needs logits (N, classes); the network gave {gave}")
        if not logits.requires_grad:
            raise UnsupportedLayerError("no relevance reached the network input (is the output independent of it?)")
        maps = []
        rules.relevance_pass = True
        for j in range(k):
            start = torch.zeros_like(logits).scatter_(1, targets[:, j:j + 1], 1.0)
            (grad,) = torch.autograd.grad(logits, leaf, start, retain_graph=create_graph or j < k - 1,
                                          create_graph=create_graph)
            maps.append(leaf * grad if create_graph else leaf.detach() * grad)
        rules.relevance_pass = False
    except RuntimeError as error:  # autograd's refusal of an in-place change of a rule's output
        if "custom Function" in str(error) or "modified by an inplace operation" in str(error):
            raise UnsupportedLayerError("AttnLRP: the network modifies a layer's output in place after a rule "
                                        "read it; make that operation out of place") from error
        raise
    finally:
        rules.relevance_pass = False
        rules.release()
        if leaf is x:
            delattr(x, _MARK)
    return torch.stack(maps, dim=1), (logits if create_graph else logits.detach())


# Module class names that mark a transformer: attention blocks and norms over token features.
_ATTENTION_CLASS = re.compile(r"Attention|Transformer|Attn")
_CNN_ATTENTION_CLASS = re.compile(r"(Channel|Spatial)Attention|AttentionGate|GateAttention|SplitAttn|EcaModule|"
                                  r"CbamModule|SEModule|SqueezeExcite")
_USES_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def uses_attention(net: nn.Module) -> bool:
    """Whether ``net`` has attention layers (``nn.MultiheadAttention`` or a module whose class says
    Attention / Transformer, except CNN channel/spatial attention): explained by AttnLRP. Cached
    per network object (its module types do not change in place)."""
    found = _USES_ATTENTION.get(net)
    if found is None:  # a network that asks for the rules (a transformers CNN that torch.fx cannot trace) too
        from ...models.tokens import sequence_grid

        # A module that states its token grid too: timm's ConViT (classes ConVit, GPSA, MHSA).
        found = _USES_ATTENTION[net] = bool(getattr(net, "lrp_by_rules", False)) or any(
            isinstance(m, nn.MultiheadAttention)
            or (_ATTENTION_CLASS.search(type(m).__name__) and not _CNN_ATTENTION_CLASS.search(type(m).__name__))
            or sequence_grid(m) is not None
            for m in net.modules())
    return found


def attention_maps(model: nn.Module, x: Tensor, targets: Tensor, *, epsilon: float,
                   create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(AttnLRP heatmaps (N, K, H, W), logits (N, classes)): :func:`attn_lrp` summed over channels.
    For an auditkit model, the relevance of the normalised input pixels (the model's resize is part
    of the explained network: its plain gradient is the z-rule), its output adapter picks the logits
    and a one-logit head is explained through its two-class view [-z/2, z/2] (models/outputs.py)."""
    from ...models import AuditModel
    from ..validate import check_logits, check_targets, logits_from

    n = targets.shape[0]
    if isinstance(model, AuditModel):
        from ...models.outputs import binary_view

        binary = model.meta.head == "binary"

        def net(inputs: Tensor):
            return model.net(model._upsample_to_min_size(inputs))

        def select(output):
            logits = model.network_logits(output)
            return binary_view(logits) if binary else logits

        inputs = (x - model.mean) / model.std
    else:
        net, select, inputs = model, logits_from, x

    def checked(output):
        logits = select(output)
        check_targets(targets, n, check_logits(logits, n))
        return logits

    relevance, logits = attn_lrp(net, inputs, targets, epsilon=epsilon, create_graph=create_graph, select=checked)
    return relevance.sum(dim=2), logits
