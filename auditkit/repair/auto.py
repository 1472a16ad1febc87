"""A repair that proves itself: the verdict on validation data decides whether a repair worked, and
``method="auto"`` tries the methods in order of cost until one does.

    decision = decision_audit(model, dataset, config)          # behavioural audit of the val split
    result = run_auto_repair(model, dataset, config)           # TAP (λ and dilation swept), RRR, TEA, ...
    result.document["attempts"]                                # every attempt with its numbers

The decision uses only the behavioural tests of the audit (degradation to the permuted/clean
variants, else the counterfactuals; auditkit/audit/verdict.py) on the validation split, so the test
split stays for the proof: the before/after audit of the kept model. An attempt succeeds when the
verdict is "not reliant" and the accuracy that does not come from the shortcut fell by at most
``max_accuracy_drop`` from the input model's (:func:`guarded_accuracy`: clean, else permuted, else the
mask-removed counterfactual, else contaminated; removing a shortcut must lower the contaminated
accuracy the shortcut inflated, so guarding that one would fail the repairs that work best); the
first success is kept. A multilabel model succeeds per finding: every finding not reliant, and no
finding's AUROC on the guarded variant lower by more than ``max_accuracy_drop``. When none succeeds,
the attempt with the highest worst-variant validation accuracy is kept and ``succeeded`` is False.
The order (TAP, RRR, TEA, Energy, MaskTune) is the measured cost order of docs/repair.md's table,
held by each method's spec (``MethodSpec.auto_rank``; ``AUTO_ORDER`` reads it). TEA uses the given
teacher, else one trained by the one recipe (repair/teacher.py ``TEACHER_RECIPE``) when the training
split has a permuted or clean variant; with neither it is skipped with ``TEA_NEEDS``, one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..audit import AuditConfig, run_audit
from ..audit.runner import AuditReport
from ..distributed import Context
from ..errors import AuditkitError, ParameterError
from .methods import AUTO_ORDER, METHODS, MethodSpec
from .runner import RepairConfig, RepairResult, check_data, has_annotated_masks, run_repair
from .teacher import TEA_NEEDS, TEACHER_RECIPE, teacher_variant, train_teacher


@dataclass(frozen=True)
class AutoConfig:
    order: tuple[str, ...] = AUTO_ORDER  # methods to try, cheapest first
    max_accuracy_drop: float = 0.03  # the most the guarded validation accuracy may fall (absolute; guarded_accuracy)

    def validate(self) -> None:
        unknown = [m for m in self.order if m not in METHODS]
        if unknown:
            raise ParameterError("order", f"names an unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}")
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ParameterError("max_accuracy_drop", f"must lie in [0, 1]; got {self.max_accuracy_drop}")


def decision_audit(model, dataset, config: RepairConfig, context: Context | None = None) -> AuditReport:
    """The behavioural audit that decides whether ``model`` still relies on the annotated signal: the
    validation split (the audit split when there is none), no attribution maps, no pictures."""
    split = _decision_split(dataset, config)
    base = config.audit or AuditConfig()
    audit = AuditConfig(methods=(), layers=(), examples=0, precision=base.precision, seed=base.seed,
                        thresholds=base.thresholds, batch_size=base.batch_size)
    return run_audit(model, dataset.select(split=split), audit, context=context)


def repair_decision(before, after, dataset, config: RepairConfig, max_accuracy_drop: float,
                    context: Context | None = None) -> dict:
    """Whether a repair worked, decided on the validation split: the repaired model ``after`` is not
    reliant (behavioural audit) and lost at most ``max_accuracy_drop`` of the guarded accuracy (the
    accuracy the shortcut did not give: :func:`guarded_accuracy`) against ``before``. A collapsed model
    is also "not reliant" (it no longer reads anything), which is why the drop counts. Returns
    {verdict, split, val_accuracy, reference_variant, guarded, accuracy_drop, succeeded}."""
    start = _numbers(decision_audit(before, dataset, config, context))
    numbers = _numbers(decision_audit(after, dataset, config, context))
    return {**numbers, "split": _decision_split(dataset, config), **_judged(start, numbers, max_accuracy_drop)}


def _decision_split(dataset, config: RepairConfig) -> str:
    return config.val_split if config.val_split in dataset.splits else config.audit_split


def guarded_accuracy(numbers: dict) -> dict:
    """The validation accuracy a repair must keep: the one the shortcut did not give.

    ``numbers`` is :func:`_numbers` of a decision audit. In order of preference: the ``clean`` variant
    (no signal at all), the ``permuted`` one (signal decorrelated from the label), the accuracy with
    the masked region filled with background (the audit's removal counterfactual), and only when none
    of these was measured the reference (contaminated) variant, whose accuracy includes whatever the
    shortcut contributes. Returns {accuracy, value, why}; ``accuracy`` names the measure (a variant or
    "removal counterfactual")."""
    accuracy = numbers["val_accuracy"]
    for variant, why in (("clean", "the clean variant carries no signal"),
                         ("permuted", "the permuted variant decorrelates the signal from the label")):
        if accuracy.get(variant) is not None:
            return {"accuracy": variant, "value": accuracy[variant], "why": why}
    if numbers.get("removal_accuracy") is not None:
        return {"accuracy": "removal counterfactual", "value": numbers["removal_accuracy"],
                "why": "no clean or permuted variant: the masked region filled with background"}
    reference = numbers["reference_variant"]
    return {"accuracy": reference, "value": accuracy.get(reference),
            "why": f"no clean or permuted variant and no masks: {reference} accuracy, which includes what the "
                   "shortcut contributes"}


def _guarded_value(numbers: dict, measure: str):
    if measure == "removal counterfactual":
        return numbers.get("removal_accuracy")
    return numbers["val_accuracy"].get(measure)


def _judged(start: dict, numbers: dict, max_accuracy_drop: float) -> dict:
    """The one success rule of a repair: not reliant, and at most ``max_accuracy_drop`` of the guarded
    validation accuracy lost (``start``/``numbers``: _numbers before/after; the measure is chosen on
    ``start`` and read from both, so before and after compare like with like). A multilabel model: per
    finding (:func:`_judged_findings`)."""
    if start.get("findings") is not None and numbers.get("findings") is not None:
        return _judged_findings(start, numbers, max_accuracy_drop)
    guarded = guarded_accuracy(start)
    after = _guarded_value(numbers, guarded["accuracy"])
    if guarded["value"] is None or after is None:
        # Nothing comparable was measured (e.g. a variant without samples): no accuracy can prove the repair kept it.
        return {"guarded": guarded, "accuracy_drop": None, "succeeded": False}
    drop = guarded["value"] - after
    return {"guarded": guarded, "accuracy_drop": round(drop, 4),
            "succeeded": numbers["verdict"] == "not reliant" and drop <= max_accuracy_drop}


def _judged_findings(start: dict, numbers: dict, max_accuracy_drop: float) -> dict:
    """The success rule of a multilabel repair, per finding: every finding not reliant (the audit's verdict
    is "not reliant" only then), and no finding's AUROC on the guarded variant (clean, else permuted, else
    the reference variant: :func:`guarded_accuracy` on the mean AUROC) fell by more than
    ``max_accuracy_drop``; ``accuracy_drop`` is the largest finding's drop, ``finding_drops`` each one."""
    guarded = {**guarded_accuracy(start), "metric": "AUROC per finding"}
    measure = guarded["accuracy"]
    drops = {}
    for name, before in start["findings"].items():
        was, now = before["auroc"].get(measure), (numbers["findings"].get(name) or {}).get("auroc", {}).get(measure)
        drops[name] = None if was is None or now is None else round(was - now, 4)
    if not drops or any(d is None for d in drops.values()):
        return {"guarded": guarded, "accuracy_drop": None, "finding_drops": drops, "succeeded": False}
    worst = max(drops.values())
    return {"guarded": guarded, "accuracy_drop": worst, "finding_drops": drops,
            "succeeded": numbers["verdict"] == "not reliant" and worst <= max_accuracy_drop}


def _numbers(report: AuditReport) -> dict:
    data = report.data
    accuracy = {k: None if v.get("value") is None else round(v["value"], 4)
                for k, v in data["task"]["per_variant"].items()}
    removal = (data.get("counterfactual") or {}).get("removal") or {}
    after = removal.get("after")
    numbers = {"verdict": report.verdict, "val_accuracy": accuracy, "reference_variant": data["reference_variant"],
               "removal_accuracy": None if after is None else round(float(after), 4)}
    if data.get("findings") is not None:  # multilabel: val_accuracy is the mean AUROC; per finding here
        numbers["findings"] = {
            e["name"]: {"verdict": e["verdict"],
                        "auroc": {v: None if m["auroc"]["value"] is None else round(m["auroc"]["value"], 4)
                                  for v, m in e["per_variant"].items()}}
            for e in data["findings"]}
    return numbers


def _unavailable(spec: MethodSpec, dataset, config: RepairConfig) -> str | None:
    """Why ``spec`` cannot run on this data with this config (None: it can)."""
    if spec.teacher == "required" and config.teacher is None and teacher_variant(dataset, config.train_split) is None:
        return TEA_NEEDS  # neither given nor trainable: no permuted or clean variant to train one on
    try:
        check_data(dataset, replace(config, method=spec.name, lam="default"))
    except Exception as error:  # noqa: BLE001 - the one-line reason is the point
        return str(error).split("\n")[0]
    return None


def run_auto_repair(
    model,
    dataset,
    config: RepairConfig,
    auto: AutoConfig = AutoConfig(),
    *,
    training_for: Callable[[MethodSpec], object] | None = None,
    options_for: Callable[[MethodSpec], dict] | None = None,
    context: Context | None = None,
    show_progress: bool = True,
    on_attempt: Callable[[dict], None] | None = None,
) -> RepairResult:
    """Tries ``auto.order``'s methods on copies of ``model`` until one leaves it not reliant on the
    validation split without losing more than ``auto.max_accuracy_drop`` of the guarded accuracy;
    returns that repair (or the best attempt), with before/after proof audits on the audit split
    and ``document["attempts"]``. ``training_for(spec)`` / ``options_for(spec)`` give each method's
    training settings and options (default: the method's own). TAP sweeps λ and its dilation."""
    auto.validate()
    context = context or Context()
    started = time.perf_counter()
    before_val = decision_audit(model, dataset, config, context)
    start = _numbers(before_val)
    # Ground-truth masks beat a teacher's (the teacher then serves TEA only), unless they are all empty.
    has_masks = has_annotated_masks(dataset.select(split=config.train_split))
    attempts: list[dict] = []
    recipe_teacher = None  # trained once, by the one recipe, when a method needs a teacher and none was given
    kept: tuple[RepairResult, dict] | None = None
    best: tuple[RepairResult, dict] | None = None
    for name in auto.order:
        spec = METHODS[name]
        reason = _unavailable(spec, dataset, config)
        if reason is not None:
            attempts.append({"method": name, "skipped": reason})
            continue
        training = training_for(spec) if training_for else None
        teacher, teacher_row = config.teacher, {"source": "given"}
        if spec.teacher == "required" and teacher is None:
            # No --teacher, but a decorrelated variant (``_unavailable``): the one recipe trains it
            # (repair/teacher.py; the teacher of the kinds table and of `reproduce colored`).
            trained_at = time.perf_counter()
            try:
                recipe_teacher = recipe_teacher or _recipe_teacher(model, dataset, config, training, show_progress)
            except AuditkitError as error:  # e.g. an architecture auditkit cannot build anew
                attempts.append({"method": name, "skipped": f"{TEA_NEEDS} (training one here failed: "
                                                            f"{str(error).splitlines()[0]})"})
                continue
            teacher = recipe_teacher
            teacher_row = {"source": "trained", "variant": teacher_variant(dataset, config.train_split),
                           "recipe": TEACHER_RECIPE.as_dict(), "seconds": round(time.perf_counter() - trained_at, 1)}
        attempt_config = replace(
            config, method=name, lam="auto" if spec.sweep_options else "default",
            options=options_for(spec) if options_for else {},
            training=training, audit=None, teacher=teacher,
            teacher_name=config.teacher_name if teacher is config.teacher else "trained by auto (TEACHER_RECIPE)",
            annotation=None if has_masks else config.annotation)
        tried = time.perf_counter()
        result = run_repair(model, dataset, attempt_config, context=context, show_progress=show_progress)
        numbers = _numbers(decision_audit(result.model, dataset, config, context))
        row = {"method": name, "lambda": result.lam, "options": result.document["options"],
               **({"teacher": teacher_row} if spec.teacher == "required" else {}), **numbers,
               **_judged(start, numbers, auto.max_accuracy_drop), "seconds": round(time.perf_counter() - tried, 1)}
        attempts.append(row)
        if on_attempt is not None:
            on_attempt(row)
        worst = _worst(numbers["val_accuracy"])
        if best is None or worst > _worst(best[1]["val_accuracy"]):
            best = (result, row)
        if row["succeeded"]:
            kept = (result, row)
            break
    if best is None:
        raise ParameterError("method", "auto found no method that can run on this data: "
                             + "; ".join(f"{a['method']} {a['skipped']}" for a in attempts))
    result, row = kept or best
    # The proof: the input and the kept model audited on the audit split (as any repair is).
    audited = config.audit is not None and config.audit_split in dataset.splits
    audit_data = dataset.select(split=config.audit_split) if audited else None
    if audit_data is not None:
        result.before = run_audit(model, audit_data, config.audit, context=context)
        result.after = run_audit(result.model, audit_data, config.audit, context=context)
    result.document.update({
        "method": row["method"],
        "auto": {"succeeded": kept is not None, "chosen": row["method"], "max_accuracy_drop": auto.max_accuracy_drop,
                 "guarded": guarded_accuracy(start), "before": start, "order": list(auto.order)},
        "attempts": attempts,
        "seconds": round(time.perf_counter() - started, 2),
        **result.summary(),
        "before_audit": result.before.data if result.before is not None else None,
        "after_audit": result.after.data if result.after is not None else None,
    })
    return result


def _recipe_teacher(model, dataset, config: RepairConfig, training, show_progress: bool):
    """The teacher of ``TEACHER_RECIPE``: the student's architecture on the train split's decorrelated
    variant, on the student's device, seeded like the repair (so a rerun trains the same teacher)."""
    from ..device import model_device

    return train_teacher(dataset, model.meta.arch, training.seed if training is not None else 0,
                         split=config.train_split, device=model_device(model),
                         precision=training.precision if training is not None else "auto", show_progress=show_progress)


def _worst(accuracy: dict) -> float:
    """The lowest measured accuracy of a decision audit (variants without a value do not count)."""
    values = [v for v in accuracy.values() if v is not None]
    return min(values) if values else float("-inf")


__all__ = ["AUTO_ORDER", "AutoConfig", "decision_audit", "guarded_accuracy", "run_auto_repair"]
