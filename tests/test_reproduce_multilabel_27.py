"""Issue 27 item 7: the multilabel reproduction (`auditkit reproduce multilabel`) on a tiny budget: one
seed, a tenth of the canvases, one epoch each; it checks the pipeline (shortcut model -> per-finding
audit -> repair -> audit) and the report's keys, not the numbers (docs/reproductions.md has those)."""

from __future__ import annotations

from auditkit.data import AuditDataset, open_dataset
from auditkit.reproduce import MULTILABEL_RECIPE, REPRODUCTIONS, markdown, multilabel


def _tiny() -> AuditDataset:
    data = open_dataset("builtin:multilabel-mnist")
    return AuditDataset(data.records[::10], data.info, channels=data.channels, image_size=data.image_size)


def test_multilabel_reproduction_pipeline_and_keys():
    steps = []
    result = multilabel([0], steps.append, dataset=_tiny(), recipe={"train": {"epochs": 1}, "repair": {"epochs": 1}},
                        bootstrap=50)
    assert "multilabel" in REPRODUCTIONS and len(steps) == REPRODUCTIONS["multilabel"][1]
    method = MULTILABEL_RECIPE["method"]
    assert list(result.accuracy) == ["shortcut model", method]
    for case in result.accuracy:
        assert set(result.accuracy[case]) == {"contaminated", "permuted", "clean"}
        assert all(len(v) == 1 for v in result.accuracy[case].values())
        for key in ("reliant", "gap to permuted", "gap to permuted low", "gap to permuted high", "gap to clean",
                    "gap to clean low", "gap to clean high"):
            assert len(result.extra[case][key]) == 1
    assert {"others' AUROC change (min)", "goal met", "seconds"} <= set(result.extra[method])
    low, value, high = (result.extra[method][f"gap to permuted{s}"][0] for s in (" low", "", " high"))
    assert low <= value <= high
    document = result.as_dict()
    assert document["data"] == "builtin:multilabel-mnist" and document["seeds"] == [0]
    table = markdown(result)
    assert "gap to permuted [95 % CI]" in table and f"| 0 | {method} |" in table


def test_an_inconclusive_finding_is_not_tabled_as_not_reliant():
    from auditkit.reproduce import Reproduction, _multilabel_row, multilabel_markdown

    out = Reproduction("multilabel", [0])
    gap = (0.045, (-0.01, 0.1))
    numbers = {"seven": {"verdict": "inconclusive", "auroc": {"contaminated": 0.9, "permuted": 0.85, "clean": 0.86},
                         "gap": {"permuted": gap, "clean": gap}}}
    _multilabel_row(out, "energy", numbers, {})
    row = multilabel_markdown(out).splitlines()[2]
    assert "| inconclusive |" in row and "not reliant" not in row
