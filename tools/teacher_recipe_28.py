"""Issue 28, item 4: TEA and ``--method auto`` on coloured backgrounds with the one teacher recipe.

The kinds table's coloured-background rows (auditkit/reproduce.py ``kinds``: tap-cnn, shortcut model
trained on the contaminated variant) with the teacher of ``auditkit.repair.teacher.TEACHER_RECIPE``;
one seed per process so seeds can run side by side on a small CPU:

    python tools/teacher_recipe_28.py --seed 0 --out results/teacher-recipe-seed0.json

Writes test accuracy per variant of the shortcut model, the teacher, TEA and auto, the validation
verdicts, auto's chosen method and the seconds of each step.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from auditkit.data import open_dataset
from auditkit.repair import AutoConfig, RepairConfig, run_auto_repair
from auditkit.repair.teacher import TEACHER_RECIPE, train_teacher
from auditkit.reproduce import KINDS, _copy, _verdict, _variants, repair_model, trained
from auditkit.training import TrainConfig, evaluate


def accuracy(model, test) -> dict:
    return {k: round(float(v.accuracy), 4) for k, v in _variants(evaluate(model, test)).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="coloured-background", choices=sorted(KINDS))
    parser.add_argument("--arch", default="tap-cnn")
    parser.add_argument("--cases", default="tea,auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = open_dataset(KINDS[args.kind])
    test = data.select(split="test")
    row: dict = {"kind": args.kind, "arch": args.arch, "seed": args.seed, "recipe": TEACHER_RECIPE.train_options()
                 | {"fraction": TEACHER_RECIPE.fraction, "variants": list(TEACHER_RECIPE.variants)}}

    def step(name, work):
        started = time.perf_counter()
        model = work()
        row[name] = {"test": accuracy(model, test), "seconds": round(time.perf_counter() - started, 1)}
        if name != "teacher":
            row[name]["not_reliant_val"] = _verdict(model, data, __import__("auditkit.reproduce").reproduce.Compute())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1))  # after every step: a killed run keeps what it measured
        print(name, row[name], flush=True)
        return model

    shortcut = step("shortcut", lambda: trained(data, args.arch, "contaminated", args.seed))
    teacher = step("teacher", lambda: train_teacher(data, args.arch, args.seed))
    cases = args.cases.split(",")
    if "tea" in cases:
        step("tea", lambda: repair_model(_copy(shortcut), data, "tea", args.seed, teacher=teacher))
    if "auto" in cases:
        training = TrainConfig(seed=args.seed)

        def auto():
            result = run_auto_repair(_copy(shortcut), data, RepairConfig(audit=None, teacher=teacher), AutoConfig(),
                                     training_for=lambda spec: replace(training, **{"data_order": "permutation",
                                                                                     **spec.training}),
                                     show_progress=False)
            row["auto_chosen"] = result.document["auto"]["chosen"]
            row["auto_attempts"] = [{k: a.get(k) for k in ("method", "lambda", "verdict", "val_accuracy", "succeeded",
                                                            "skipped", "seconds")} for a in result.document["attempts"]]
            return result.model

        step("auto", auto)


if __name__ == "__main__":
    main()
