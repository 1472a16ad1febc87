"""AttnLRP's engine (auditkit/explain/lrp/attention.py): the call's scope, differentiability, the
dispatch from lrp_epsilon, and the transformer families it runs on. The rule-by-rule equality with a
float64 implementation of the explicit rules and with LXT is in tests/test_attnlrp_25.py."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from auditkit.explain import attribute
from auditkit.explain.lrp import lrp_epsilon_and_logits
from auditkit.explain.lrp.attention import GRADIENT_RULES, attn_lrp, uses_attention
from auditkit.explain.lrp.registry import UnsupportedLayerError

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_vit(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=5)
    kwargs.update(options)
    return timm.models.VisionTransformer(**kwargs).eval()


def test_fused_and_explicit_attention_give_the_same_relevance():
    """timm's fused scaled_dot_product_attention and its hand-written softmax path: the uniform rule
    on the fused kernel (q, k a quarter, v a half) equals the rules on the explicit products."""
    net = tiny_vit().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1], [2, 3], [4, 0]])
    fused, _ = attn_lrp(net, x, targets, epsilon=1e-9)
    for block in net.blocks:
        block.attn.fused_attn = False
    explicit, _ = attn_lrp(net, x, targets, epsilon=1e-9)
    assert fused.abs().max() > 1e-6  # not all zero
    torch.testing.assert_close(fused, explicit, rtol=1e-9, atol=1e-12)


def test_multi_head_attention_with_and_without_weights():
    """nn.MultiheadAttention (torchvision's ViT) is explained through the same rules whether it
    computes its attention weights (explicit softmax) or not (fused kernel)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()

    class Net(nn.Module):
        def __init__(self, need_weights: bool):
            super().__init__()
            self.embed, self.mha, self.head, self.need_weights = nn.Linear(4, 8), mha, nn.Linear(8, 3), need_weights

        def forward(self, x):  # x (N, 1, 5, 4): five tokens of four features
            t = self.embed(x.squeeze(1))
            out, _ = self.mha(t, t, t, need_weights=self.need_weights)
            return self.head((out + t).mean(dim=1))

    with_weights, without = Net(True).double(), Net(False).double()
    without.embed, without.head = with_weights.embed, with_weights.head
    x = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    targets = torch.tensor([[0], [2]])
    a, logits_a = attn_lrp(with_weights, x, targets, epsilon=1e-9)
    b, logits_b = attn_lrp(without, x, targets, epsilon=1e-9)
    torch.testing.assert_close(logits_a, logits_b)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_k_targets_equal_single_calls_and_batch_equals_samples():
    net = tiny_vit(2)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[0, 4, 2], [1, 1, 3], [2, 0, 4]])
    together, logits = attn_lrp(net, x, targets, epsilon=1e-6)
    for j in range(3):
        alone, _ = attn_lrp(net, x, targets[:, j:j + 1], epsilon=1e-6)
        torch.testing.assert_close(together[:, j:j + 1], alone)
    for i in range(3):
        sample, _ = attn_lrp(net, x[i:i + 1], targets[i:i + 1], epsilon=1e-6)
        torch.testing.assert_close(together[i:i + 1], sample, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(logits, net(x))


def test_the_model_and_the_process_are_left_as_they_were():
    """Nothing patched outside the call: torch's functions and module classes are the same objects,
    the model's parameters, buffers, modes and requires_grad unchanged, and another model's
    gradients in the same process are the plain ones."""
    net = tiny_vit(3)
    net.blocks[1].train()  # a mixed mode is kept as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    functions = (F.scaled_dot_product_attention, F.layer_norm, F.gelu, F.linear, nn.LayerNorm.forward,
                 nn.GELU.forward, nn.Linear.forward, torch.matmul, torch.Tensor.__matmul__)
    other = tiny_vit(4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def other_grad():
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad(other(xi)[:, 1].sum(), xi)[0]

    plain = other_grad()
    attn_lrp(net, x, torch.tensor([[1], [2]]), epsilon=0.01)
    assert functions == (F.scaled_dot_product_attention, F.layer_norm, F.gelu, F.linear, nn.LayerNorm.forward,
                         nn.GELU.forward, nn.Linear.forward, torch.matmul, torch.Tensor.__matmul__)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert flags == [p.requires_grad for p in net.parameters()]
    assert modes == [m.training for m in net.modules()]
    torch.testing.assert_close(other_grad(), plain, rtol=0, atol=0)
    assert not hasattr(x, "_auditkit_relevant")


def test_logits_keep_their_true_gradient():
    """The logits returned with create_graph=True train the model with the network's own
    derivatives: the rules act only in the relevance pass (TEA's cross-entropy term)."""
    net = tiny_vit(5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 3])
    _, logits = attn_lrp(net, x, labels.view(-1, 1), epsilon=1e-6, create_graph=True)
    ours = torch.autograd.grad(F.cross_entropy(logits, labels), list(net.parameters()))
    plain = torch.autograd.grad(F.cross_entropy(net(x), labels), list(net.parameters()))
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)


def test_heatmap_loss_gradient_is_exact_float64():
    """A loss on the heatmap (TEA) differentiates the rules exactly: gradcheck of the relevance as a
    function of a LayerNorm weight, an MLP weight and the qkv weight, against finite differences."""
    net = tiny_vit(6, img_size=8, embed_dim=8, depth=1).double()
    torch.manual_seed(6)
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([[0], [2]])
    names = ("blocks.0.mlp.fc1.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight")
    params = dict(net.named_parameters())

    def relevance(*values):
        class Functional(nn.Module):
            def forward(self, inputs):
                return torch.func.functional_call(net, dict(zip(names, values)), (inputs,))

        return attn_lrp(Functional(), x, targets, epsilon=0.01, create_graph=True)[0]

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(relevance, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_lrp_epsilon_dispatches_transformers_and_keeps_cnns():
    vit = tiny_vit(7)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5)).eval()
    assert uses_attention(vit) and not uses_attention(cnn)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    maps = attribute(vit, x, target="pred", method="lrp_epsilon")
    direct, _ = attn_lrp(vit, x, vit(x).argmax(1, keepdim=True), epsilon=1e-6)
    torch.testing.assert_close(maps, direct.sum(dim=2))
    heat, logits = lrp_epsilon_and_logits(cnn, x, torch.tensor([[0], [1]]))
    assert heat.shape == (2, 1, 16, 16) and logits.shape == (2, 5)


@pytest.mark.parametrize("name, options, size", [
    ("deit_tiny_distilled_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("vit_small_patch14_reg4_dinov2", dict(patch_size=7, embed_dim=32, depth=2, num_heads=2), 28),
    ("eva02_tiny_patch14_224", dict(patch_size=7, embed_dim=32, depth=2, num_heads=2), 28),
    ("swin_tiny_patch4_window7_224", dict(patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                          num_heads=(1, 2)), 32),
    ("convit_tiny", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("deit3_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
])
def test_timm_transformer_families(name, options, size):
    """Each family runs batched with K targets, finite, one relevance map per target."""
    torch.manual_seed(8)
    net = timm.create_model(name, num_classes=4, img_size=size, **options).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(8))
    targets = torch.tensor([[0, 1], [2, 3]])
    relevance, logits = attn_lrp(net, x, targets, epsilon=1e-6)
    assert relevance.shape == (2, 2, 3, size, size) and torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0
    second, _ = attn_lrp(net, x, targets[:, 1:], epsilon=1e-6)
    torch.testing.assert_close(relevance[:, 1:], second)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_torchvision_transformers(name):
    torch.manual_seed(9)
    options = dict(image_size=32) if name == "vit_b_16" else {}
    net = getattr(torchvision.models, name)(num_classes=3, **options).eval()
    nn.init.normal_(list(net.modules())[-1].weight, std=0.1)  # torchvision starts the ViT head at zero
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    relevance, _ = attn_lrp(net, x, torch.tensor([[1]]), epsilon=1e-6)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


def test_an_in_place_change_of_a_rule_output_is_refused_in_one_line():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn_fc, self.head = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):  # x (N, 1, 3, 4)
            h = F.gelu(self.attn_fc(self.norm(x.squeeze(1))))
            h.mul_(2.0)  # changes GELU's output, which the identity rule reads (y / x)
            return self.head(h.mean(dim=1))

    class Attention(Block):  # named so that it is a transformer
        pass

    net = Attention().eval()
    x = torch.rand(2, 1, 3, 4)
    with pytest.raises(UnsupportedLayerError) as error:
        attn_lrp(net, x, torch.tensor([[0], [1]]), epsilon=0.01)
    assert "in place" in str(error.value) and "\n" not in str(error.value)


def test_rule_table_covers_the_transformer_operations():
    for func in (F.linear, F.layer_norm, F.gelu, F.silu, F.scaled_dot_product_attention, torch.matmul,
                 F.multi_head_attention_forward, torch.einsum):
        assert func in GRADIENT_RULES
