"""TAP on a transformer's token maps without copies (issue 25 item 4, the TAP-step goal): captured with
``rebuild=False`` the network goes on from each layer's own token sequence, the map is a marked view
of it, and ``tap_loss(defer_gradient=True)`` adds the penalty's gradient to the sequence's gradient in
one pass. Oracle: the same loss written with autograd on the maps of the rebuilding capture, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auditkit.models import capture_activations
from auditkit.ops import tap_loss
from auditkit.ops.downscale_mask import downscale_masks
from tests.test_tokens_25 import KINDS, _timm

SEED = 7


def _penalty_reference(maps, masks, kernel, absolute):
    sizes = [(int(a.shape[2]), int(a.shape[3])) for a in maps]
    weights = downscale_masks(masks, sizes, [kernel] * len(maps), torch.float64)
    value = (lambda a: a.abs()) if absolute else torch.relu
    return sum((w[:, None] * value(a)).sum() for w, a in zip(weights, maps)) / (len(maps) * masks.shape[0])


def _gradients(net, layers, images, labels, masks, *, rebuild, absolute):
    net.zero_grad()
    with capture_activations(net, layers, rebuild=rebuild) as maps:
        logits = net(images)
    if rebuild:
        penalty = _penalty_reference(maps, masks, 3, absolute)
    else:
        penalty = tap_loss(maps, masks, 3, defer_gradient=True, absolute=absolute)
    (nn.functional.cross_entropy(logits, labels) + 0.7 * penalty).backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    return logits.detach(), penalty.detach(), grads


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_deferred_penalty_on_token_sequences_equals_autograd_on_maps(kind, absolute):
    build, channels, size, layer, _shape, _prefix = KINDS[kind]
    net = build().double().eval()  # eval: no dropout draws, so the two passes are the same network
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(3, channels, *size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (3,), generator=generator)
    masks = torch.zeros(3, 1, *size, dtype=torch.float64)
    masks[0, :, : size[0] // 3, : size[1] // 2] = 1
    masks[1] = torch.rand(1, *size, generator=generator, dtype=torch.float64)  # soft weights
    wanted = _gradients(net, [layer], images, labels, masks, rebuild=True, absolute=absolute)
    got = _gradients(net, [layer], images, labels, masks, rebuild=False, absolute=absolute)
    assert torch.equal(got[0], wanted[0])  # the network goes on unchanged from its own sequence
    assert torch.allclose(got[1], wanted[1], rtol=1e-12, atol=0)
    assert len(got[2]) == len(wanted[2])
    for mine, theirs in zip(got[2], wanted[2]):
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)


def test_the_map_of_a_sequence_is_a_marked_view_and_no_copy_is_made():
    net = _timm("vit_tiny_patch16_224", dynamic_img_size=True, embed_dim=32, depth=2, num_heads=2).train()
    raw = []
    handle = net.blocks[0].attn.qkv.register_forward_hook(lambda _m, _a, out: raw.append(out))
    with capture_activations(net, ["blocks.0.attn.qkv"], rebuild=False) as maps:
        net(torch.rand(2, 1, 32, 32))
    handle.remove()
    (feature_map,) = maps
    assert feature_map.untyped_storage().data_ptr() == raw[-1].untyped_storage().data_ptr()
    tokens, prefix = feature_map._auditkit_tokens
    assert tokens is raw[-1] and prefix == 1
    # A penalty the network's gradient never reaches is refused in one line, not silently dropped.
    with capture_activations(net, ["blocks.1.attn.qkv"], rebuild=False) as maps:
        net(torch.rand(2, 1, 32, 32))
    loss = tap_loss(maps, torch.ones(2, 1, 32, 32), 3, defer_gradient=True)
    tokens = maps[0]._auditkit_tokens[0]
    assert tokens.requires_grad
    with pytest.raises(RuntimeError, match="only through the penalty"):
        torch.autograd.grad(loss, tokens)


def test_a_deferred_step_frees_its_graph_without_the_cyclic_collector():
    # A hook that holds the tensor it is registered on makes a cycle: each step's graph (every saved
    # activation) then lives until Python's cyclic collector runs (it leaked 570 MB an epoch of vit-digits).
    import gc
    import weakref

    net = _timm("vit_tiny_patch16_224", dynamic_img_size=True, embed_dim=32, depth=2, num_heads=2).train()
    masks = torch.ones(2, 1, 32, 32)
    for layer in ("blocks.0.attn.qkv", "blocks.1"):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with capture_activations(net, [layer], rebuild=False) as maps:
                logits = net(torch.rand(2, 1, 32, 32))
            tokens = weakref.ref(maps[0]._auditkit_tokens[0])
            (logits.sum() + tap_loss(maps, masks, 3, defer_gradient=True, absolute=True)).backward()
            del maps, logits
            assert tokens() is None, layer
        finally:
            if was_enabled:
                gc.enable()
