"""One probe forward pass of a network and the size it sees: below presets.py and tokens.py, which
both probe networks (presets for the layers' shapes, tokens for which dim holds the channels)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError


class ProbeFailed(ModelError):
    """The network's forward pass failed on a probe image of ``size`` (H, W)."""

    def __init__(self, net: nn.Module, size: tuple[int, int], reason: str) -> None:
        self.size, self.reason = size, reason
        super().__init__(f"{type(net).__name__} failed on a {size[0]}x{size[1]} probe image ({reason})")


def _hw(size) -> tuple[int, int]:
    """(H, W) of a size given as one side or a pair."""
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def run_probe(net: nn.Module, in_channels: int, size) -> None:
    """One no-grad eval-mode forward pass of a zero image of ``size`` (the net's mode restored);
    ProbeFailed in one line when the network fails on it."""
    height, width = _hw(size)
    was_training = net.training
    parameter = next(iter(net.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_channels, height, width, device=device, dtype=dtype))
    except ModelError:  # auditkit's own one line (an AuditModel's output check): as it is
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the user's network: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProbeFailed(net, (height, width), first[:160]) from error
    finally:
        net.train(was_training)


def network_size(input_size, min_input_size: int = 1) -> tuple[int, int]:
    """The (H, W) a network sees for images of ``input_size``: a shorter side below
    ``min_input_size`` is brought up to it, keeping the aspect ratio (AuditModel's upsampling rule)."""
    height, width = _hw(input_size)
    minimum, shorter = max(1, int(min_input_size)), min(height, width)
    if shorter >= minimum:
        return height, width
    return -(-height * minimum // shorter), -(-width * minimum // shorter)  # integer ceil
