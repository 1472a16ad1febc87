"""TAP, the Targeted Activation Penalty (TAP paper, AAAI 2024, Eq. 7-8): the mean over targeted layers
of the batch-mean penalty on positive activations inside the downscaled mask, through the fused
kernels. First-order only: a TAP step costs about a plain step."""

from __future__ import annotations

from dataclasses import dataclass, field


from ...errors import ParameterError
from ...ops import tap_loss
from ...ops.dilation import NEEDS_RECEPTIVE_FIELDS, SCHEDULES, kernel_sizes
from ...training import Objective
from .base import MethodSpec


@dataclass
class TapObjective(Objective):
    layers: tuple[str, ...] = ()
    kernel_size: int | tuple[int, ...] = 3  # κ, or one k per layer (then `dilation` is not used)
    dilation: str = "auto"  # auditkit/ops/dilation.py
    receptive_fields: tuple[float, ...] | None = None  # per layer, in pixels of `field_resolution`
    field_resolution: int = 0
    # Which part of signed token features is penalised (TOKEN_ACTIVATIONS): "relu" (TAP's relu(A), a
    # CNN's), "abs" (|A| = relu(A) + relu(-A): both signs, the same kernel twice).
    activation: str = "relu"
    name = "tap"
    # The penalty reads the token maps only: the network goes on from a ViT layer's own sequence, and
    # the penalty's gradient is added to it in place of the map's (ops/tap.py, no copies).
    rebuild_maps = False
    _kernels: dict = field(default_factory=dict, repr=False)

    def kernel_sizes_for(self, mask_size: tuple[int, int], layer_sizes: list[tuple[int, int]]) -> list[int]:
        """k_l of Eq. 7 for each targeted layer (cached per geometry: the same every batch)."""
        key = (mask_size, tuple(layer_sizes))
        if key not in self._kernels:
            if isinstance(self.kernel_size, tuple):
                self._kernels[key] = list(self.kernel_size)
            else:
                fields = None
                if self.receptive_fields is not None:  # measured at the network's resolution
                    scale = max(mask_size) / self.field_resolution
                    fields = [r * scale for r in self.receptive_fields]
                self._kernels[key] = kernel_sizes(self.dilation, self.kernel_size, mask_size, layer_sizes, fields)
        return self._kernels[key]

    def loss(self, model, batch, logits, activations):
        masks = model.masks_for_network(batch.masks) if hasattr(model, "masks_for_network") else batch.masks
        sizes = [(int(a.shape[2]), int(a.shape[3])) for a in activations]
        kernels = self.kernel_sizes_for((int(masks.shape[-2]), int(masks.shape[-1])), sizes)
        return tap_loss(activations, masks, kernels, defer_gradient=True, absolute=self.activation == "abs")


@dataclass(frozen=True)
class TapOptions:
    layers: tuple[str, ...] | None = None  # targeted layers (default: the model's preset)
    kernel_size: int | tuple[int, ...] = 3  # κ, the max pool of the mask downscaling (Eq. 7), or one per layer
    # How the dilation grows with depth (auditkit/ops/dilation.py): auto (receptive when the receptive
    # fields fit in the image, else fixed; measured), fixed (Eq. 7), receptive, cumulative.
    dilation: str = "auto"
    # What TAP penalises on a transformer's token maps, whose features are signed (docs/repair.md, "TAP on
    # vision transformers"): auto (qkv on a ViT, abs on a Swin or a torchvision ViT, relu on a CNN), relu
    # (relu of the targeted blocks' outputs, TAP's Eq. 7 as on a CNN), abs (|A| of those outputs), mlp
    # (relu of the hidden units after the MLP's activation inside each targeted block) or qkv (|A| of the
    # attention's input projections, what other tokens read, in every block up to the last targeted one).
    tokens: str = "auto"

    def validate(self) -> None:
        sizes = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,)
        if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
            raise ParameterError("kernel_size", f"must be an integer >= 1, or one per layer; got {self.kernel_size!r}")
        if self.dilation not in (*SCHEDULES, "auto"):
            raise ParameterError("dilation", f"must be one of auto, {', '.join(SCHEDULES)}; got {self.dilation!r}")
        if self.tokens not in ("auto", *TOKEN_ACTIVATIONS):
            raise ParameterError("tokens", f"must be one of auto, {', '.join(TOKEN_ACTIVATIONS)}; got {self.tokens!r}")


TOKEN_ACTIVATIONS = ("relu", "abs", "mlp", "qkv")
# The choice for transformer layers, measured on decoy MNIST with vit-digits (docs/repair.md): the
# attention's input projections; where a block has none as a module on the token grid (torchvision's
# nn.MultiheadAttention, EVA's functional qkv, Swin's windows), |A| of the block outputs.
TRANSFORMER_TOKENS = "qkv"
TRANSFORMER_FALLBACK = "abs"
_PROJECTIONS = ("qkv", "qk", "q", "k", "v", "q_proj", "k_proj", "v_proj")


def _is_transformer(model) -> bool:
    from ...models.tokens import is_transformer

    return is_transformer(getattr(model, "net", model))


def _mlp_activation(model, layer: str) -> str:
    """The last element-wise activation inside an MLP of ``layer`` (timm ``blocks.i.mlp.act``, torchvision's
    ``mlp.1``, a Swin stage's last block's): its output is the block's hidden units as a token map."""
    from torch import nn

    from ...models.hooks import resolve_layer_calls, split_call

    module_name = split_call(resolve_layer_calls(model, [layer])[0])[0]
    found = [name for name, module in model.get_submodule(module_name).named_modules()
             if isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Mish, nn.Hardswish, nn.ReLU6))
             and "mlp" in name.split(".")]
    if not found:
        raise ParameterError("tokens", f"is mlp but layer '{layer}' holds no MLP with an element-wise activation; "
                             "use relu or abs")
    return f"{module_name}.{found[-1]}"


def _attention_inputs(model, layers: tuple[str, ...]) -> tuple[str, ...] | None:
    """The attention input projections (timm ``blocks.i.attn.qkv``; ConViT's ``qk`` and ``v``) of every
    block of the targeted blocks' sequence up to the last targeted one (attention in any earlier block
    can carry a masked token's content to the class token), when each is a module whose output reads
    as a token map; else None."""
    from torch import nn

    from ...models.hooks import split_call
    from ...models.tokens import MapViews

    blocks: list[str] = []
    for layer in layers:
        name = split_call(layer)[0]
        parent, _, index = name.rpartition(".")
        if not index.isdigit():
            return None
        for i in range(int(index) + 1):
            if f"{parent}.{i}" not in blocks:
                blocks.append(f"{parent}.{i}")
    found = []
    for block in blocks:
        inside = [f"{block}.{n}" for n, m in model.get_submodule(block).named_modules()
                  if isinstance(m, nn.Linear) and n.rpartition(".")[2] in _PROJECTIONS and "attn" in n.split(".")]
        if not inside:
            return None
        found += inside
    views = MapViews(model, found)
    if any(layout is None or layout.kind != "sequence" for layout in views.layouts):
        return None
    return tuple(found)


def build(model, options: TapOptions, teacher) -> TapObjective:
    layers = options.layers if options.layers is not None else tuple(model.meta.target_layers)
    if not layers:
        raise ParameterError("layers", "is empty and the model has no preset: name the layers TAP should target")
    if isinstance(options.kernel_size, tuple) and len(options.kernel_size) != len(layers):
        raise ParameterError("kernel_size", f"gives {len(options.kernel_size)} sizes for {len(layers)} targeted layers "
                             f"({', '.join(layers)}); give one, or one per layer")
    from ...models.hooks import resolve_layer_calls

    layers = tuple(resolve_layer_calls(model, layers))  # full names ("net." optional), as every consumer reads them
    tokens = options.tokens
    if tokens == "auto":
        tokens = TRANSFORMER_TOKENS if _is_transformer(model) else "relu"
    if tokens == "mlp":
        layers = tuple(_mlp_activation(model, layer) for layer in layers)
    elif tokens == "qkv":
        projections = _attention_inputs(model, layers)
        if projections is None and options.tokens == "qkv":
            raise ParameterError("tokens", "is qkv but the targeted blocks have no attention input projection module "
                                 "that runs on the token grid (torchvision's nn.MultiheadAttention, EVA's functional "
                                 "qkv, Swin's windows); use abs")
        layers, tokens = (projections, "abs") if projections is not None else (layers, TRANSFORMER_FALLBACK)
    fields, resolution = None, 0
    if options.dilation in NEEDS_RECEPTIVE_FIELDS and not isinstance(options.kernel_size, tuple):
        from ...models.presets import receptive_fields

        resolution = _network_resolution(model)
        fields = tuple(receptive_fields(model, list(layers), model.meta.in_channels, resolution))
    return TapObjective(layers=tuple(layers), kernel_size=options.kernel_size, dilation=options.dilation,
                        receptive_fields=fields, field_resolution=resolution,
                        activation="abs" if tokens in ("abs", "qkv") else "relu")


def _network_resolution(model) -> int:
    """The side of the images the network sees (the model may upsample small inputs)."""
    height, width = model.meta.input_size
    minimum = getattr(model, "min_input_size", 1) or 1
    return max(height, width, minimum)


SPEC = MethodSpec(
    name="tap",
    rank=0,
    auto_rank=0,
    summary="penalise positive activations inside the masked region at the targeted layers (TAP Eq. 7-8)",
    masks="spurious",
    teacher="annotates",
    default_lambda=0.1,
    # Teacher masks cover far more of the image than an artefact's ground truth (17-73 % against 2 % on
    # decoy MNIST), so the same lambda penalises far more activation, much of it on the object. The TAP
    # paper lowers TAP's lambda 10-100x for teacher annotations (App. C, Tables 2-3; MNIST 1e-3 -> 1e-4).
    teacher_mask_lambda=0.01,
    # On a ViT TAP penalises |A| of the attention's input projections (docs/repair.md, "TAP on vision
    # transformers"): on decoy MNIST with vit-digits λ 0.1 left the model reliant at every token choice,
    # λ 1 cleared 3 seeds of 4, λ 1.5 the fourth too (docs/reproductions.md).
    transformer_lambda=1.5,
    # TAP App. C searches 1e-9 .. 1; the top decades are where its chosen values lie for small networks.
    sweep=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    # The dilation matters more than λ for thin artefacts (docs/repair.md, "Which method for which shortcut").
    sweep_options={"dilation": SCHEDULES},
    training={"epochs": 3, "grad_clip": 0.0, "schedule": "constant"},
    options=TapOptions,
    build=build,
    # Object masks are refused: D(M) max-pools the mask (Eq. 7), so the complement of an object grows
    # over the object at coarse layers and TAP would penalise the evidence it should keep.
    complement_unsound="its max-pooled downscaling would spread the object's complement over the object "
    "at coarse layers; rrr and energy take object masks",
    doc="docs/methods/tap.md",
)
