"""Vision transformers (issue 25 item 6): AttnLRP against a gradient and against LXT, TAP on patch
tokens against a plain step, measured interleaved (benchmarks/_timing.interleaved_ratio).

Network: timm's ``vit_tiny_patch16_224`` (random weights, float32, 224x224, 196 patch tokens and a
class token; fused ``scaled_dot_product_attention``).

* ``attnlrp`` / ``gradient``: forward + AttnLRP (auditkit.explain.lrp.attention.attn_lrp, one target
  per image) over forward + the input gradient of the same logit, at 1x224^2 and 8x224^2, with
  epsilon 1e-6 (explain's default) and 0 (no epsilon hooks: the floor of the rules' cost).
* ``attnlrp`` / ``lxt``: against LXT 2.1's efficient AttnLRP where it covers the network: the same
  ViT-Tiny built with LXT-patched LayerNorm and GELU subclasses (timm takes ``norm_layer`` and
  ``act_layer``; LXT patches only these benchmark-local classes, never nn.LayerNorm process-wide),
  gradient x input. LXT has no rule for timm's fused attention (its plain gradient flows there),
  so this compares the cost of the rules, not their maps.
* ``tap_step`` / ``plain_step``: one Adam step of cross-entropy + 0.1 x TAP over one plain
  cross-entropy step, batch 8x224^2, a 32x32 mask in a corner; TAP as ``auditkit repair`` builds it
  (repair/methods/tap.py): the default on a ViT, |A| of the attention's qkv projections of blocks
  1-12 (|A| = relu(A) + relu(-A), the fused kernel twice), and relu of the preset's block outputs
  (blocks 6, 9, 12) for comparison; deferred gradients either way.

Goals (reported, not asserted): AttnLRP <= 1.15x a gradient, TAP step <= 1.05x a plain step.

Run: python -m pytest benchmarks/test_vit_bench.py -q -s   (one thread: OMP_NUM_THREADS=1 or the
machine's load decides)
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from auditkit.explain.lrp.attention import attn_lrp

from ._timing import interleaved_ratio
from .conftest import REPORTS

PAIRS = 5
BATCHES = (1, 8)


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs).eval()


def _inputs(batch: int):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 10, (batch, 1), generator=g)


def input_gradient(net, x, targets):
    leaf = x.detach().requires_grad_(True)
    logits = net(leaf)
    (grad,) = torch.autograd.grad(logits.gather(1, targets).sum(), leaf)
    return grad * leaf


def ours(epsilon: float):
    def run(net, x, targets):
        return attn_lrp(net, x, targets, epsilon=epsilon)[0]
    return run


def _lxt_vit() -> nn.Module:
    from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method

    class LXTLayerNorm(nn.LayerNorm):
        pass

    class LXTGELU(nn.GELU):
        pass

    patch_method(layer_norm_forward, LXTLayerNorm)
    patch_method(non_linear_forward, LXTGELU, keep_original=True)
    return _vit(norm_layer=LXTLayerNorm, act_layer=LXTGELU)


RATIOS: dict[str, float] = {}


def _keep(record, name: str, value: float) -> None:
    RATIOS[name] = value
    record("vit", name, value)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_attnlrp_over_a_gradient(record, batch, epsilon):
    net = _vit()
    x, targets = _inputs(batch)
    ours(epsilon)(net, x, targets), input_gradient(net, x, targets)  # warm-up: one-time costs outside the pairs
    ratio = interleaved_ratio(lambda: ours(epsilon)(net, x, targets), lambda: input_gradient(net, x, targets),
                              PAIRS, "cpu")
    _keep(record, f"AttnLRP eps={epsilon:g} / gradient, ViT-Tiny {batch}x224^2", ratio)


@pytest.mark.parametrize("batch", BATCHES)
def test_attnlrp_over_lxt(record, batch):
    net, lxt = _vit(), _lxt_vit()
    lxt.load_state_dict(net.state_dict())
    x, targets = _inputs(batch)
    want = input_gradient(lxt, x, targets)
    got = ours(0.0)(net, x, targets)[:, 0].sum(1)
    assert got.shape == want.sum(1).shape
    ratio = interleaved_ratio(lambda: ours(1e-6)(net, x, targets), lambda: input_gradient(lxt, x, targets),
                              PAIRS, "cpu")
    _keep(record, f"AttnLRP eps=1e-6 / LXT (LayerNorm, GELU), ViT-Tiny {batch}x224^2", ratio)


def tap_and_plain_steps(model, objective, x, labels, masks, autocast=contextlib.nullcontext):
    """(tap, plain): one Adam step of cross-entropy + 0.1 x ``objective`` (TAP as a repair builds it),
    and one of cross-entropy alone, each under ``autocast()``; also the GPU check's (gpu_bench.py)."""
    from auditkit.models import capture_activations

    batch = SimpleNamespace(masks=masks)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-6)

    def step(penalised: bool) -> None:
        with autocast():
            if penalised:
                with capture_activations(model, objective.layers, rebuild=objective.rebuild_maps) as maps:
                    logits = model(x)
                loss = nn.functional.cross_entropy(logits, labels) + 0.1 * objective.loss(model, batch, logits, maps)
            else:
                loss = nn.functional.cross_entropy(model(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return (lambda: step(True)), (lambda: step(False))


@pytest.mark.parametrize("tokens", ["qkv", "relu"])
def test_tap_step_over_a_plain_step(record, tokens):
    from auditkit.models import build_model
    from auditkit.repair.methods.tap import TapOptions, build

    torch.manual_seed(0)
    model = build_model("timm:vit_tiny_patch16_224", 10, 3, (224, 224)).train()
    objective = build(model, TapOptions(tokens=tokens), None)
    x, targets = _inputs(8)
    masks = torch.zeros(8, 1, 224, 224)
    masks[:, :, :32, :32] = 1
    tap, plain = tap_and_plain_steps(model, objective, x, targets[:, 0], masks)
    plain(), tap()
    what = {"qkv": "|A| of qkv, blocks 1-12 (default)", "relu": "relu of block outputs 6, 9, 12"}[tokens]
    _keep(record, f"TAP step ({what}) / plain step, ViT-Tiny 8x224^2", interleaved_ratio(tap, plain, PAIRS, "cpu"))


def _report(terminal, _results):
    if not RATIOS:
        return
    terminal.write_sep("=", f"vision transformers: interleaved ratios ({torch.get_num_threads()} threads)")
    for name, value in RATIOS.items():
        goal = 1.05 if name.startswith("TAP") else (1.15 if "gradient" in name else None)
        verdict = "" if goal is None else (" (goal <= %.2f: %s)" % (goal, "met" if value <= goal else "missed"))
        terminal.write_line(f"{name}: {value:.3f}x{verdict}")


REPORTS.append(_report)
