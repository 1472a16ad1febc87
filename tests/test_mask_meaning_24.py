"""Issue 24, item 4: masks say what they mark, end to end.

A dataset carries ``mask_meaning`` (auditkit/data/meaning.py): "spurious" (say artefact) or "object".
Every consumer — TAP, RRR, Energy, MaskTune, the audit, discovery, the report — takes masks of either
meaning and uses them as they are, their complement, or refuses in one line naming the option.
Boxes mark the artefact by default (docs/data.md); dataset.json and --masks-mark override it.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from auditkit.audit import AuditConfig, print_summary, render_html, run_audit
from auditkit.audit.runner import OBJECT_MASKS
from auditkit.cli import app
from auditkit.data import AuditDataset, DatasetInfo, Record, open_dataset, write_dataset
from auditkit.data.meaning import NAMES, OBJECT, SPURIOUS, complement, mask_meaning, masks_marking
from auditkit.discover import DiscoveryConfig, DiscoveryReport, proposed_dataset, run_discovery
from auditkit.errors import ParameterError
from auditkit.repair import METHODS, RepairConfig
from auditkit.repair.auto import _unavailable
from auditkit.repair.runner import check_data, run_repair, training_data, validation_data
from auditkit.repair.teacher import AnnotationConfig, annotate
from auditkit.training import TrainConfig

from .test_audit_29 import FAST, PatchReader, audit_model, evidence, patch_data
from .test_cli_data_train import error_line
from .test_data_readers import write_png

runner = CliRunner()
SIDE = 8


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def toy(meaning: str, masks: list | None = None, splits=None) -> AuditDataset:
    """8x8 grey images of two classes; by default each mask marks the top-left 2x2 patch."""
    rng = np.random.default_rng(0)
    if masks is None:
        masks = []
        for _ in range(6):
            mask = np.zeros((SIDE, SIDE), np.uint8)
            mask[:2, :2] = 255
            masks.append(mask)
    records = [Record(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8), k % 2, m, "contaminated", "",
                      (splits or ["train"] * len(masks))[k]) for k, m in enumerate(masks)]
    return AuditDataset(records, DatasetInfo("toy", "memory", ("a", "b"), mask_meaning=meaning))


def mask_pixels(dataset: AuditDataset, k: int) -> np.ndarray:
    return dataset[k].mask[0].numpy()


# ---- one place defines the meanings ---------------------------------------------------------------


@pytest.mark.parametrize("name, stored", [("artefact", SPURIOUS), ("Artifact", SPURIOUS), ("spurious", SPURIOUS),
                                          ("shortcut", SPURIOUS), ("object", OBJECT), (" OBJECT ", OBJECT)])
def test_the_names_users_write_are_read(name, stored):
    assert mask_meaning(name) == stored and set(NAMES.values()) == {SPURIOUS, OBJECT}


def test_an_unknown_meaning_is_one_line_naming_the_option():
    with pytest.raises(ParameterError) as caught:
        mask_meaning("background")
    assert one_line(caught.value) == "`mask_meaning` must be artefact (or spurious) or object; got 'background'"


def test_the_complement_is_taken_within_the_image():
    patch = np.zeros((SIDE, SIDE), np.uint8)
    patch[:2, :2] = 255
    soft = np.full((SIDE, SIDE), 0.75, np.float32)
    data = toy(OBJECT, [patch, soft, None, np.zeros((SIDE, SIDE), np.uint8)])
    flipped = complement(data, SPURIOUS)
    assert flipped.info.mask_meaning == SPURIOUS and data.info.mask_meaning == OBJECT  # the input is unchanged
    assert mask_pixels(flipped, 0)[:2, :2].max() == 0 and mask_pixels(flipped, 0).sum() == SIDE * SIDE - 4
    assert np.allclose(mask_pixels(flipped, 1), 0.25, atol=1 / 255)  # soft masks stay soft
    assert flipped.records[2].mask is None  # no mask: still none
    assert flipped.records[3].mask is None  # no object marked says nothing about the artefact: no mask
    # The other way an empty artefact mask means no artefact: the object may be anywhere.
    back = complement(toy(SPURIOUS, [np.zeros((SIDE, SIDE), np.uint8)]), OBJECT)
    assert back.info.mask_meaning == OBJECT and mask_pixels(back, 0).min() == 1.0


def test_masks_marking_passes_converts_or_refuses():
    spurious, objects = toy(SPURIOUS), toy(OBJECT)
    assert masks_marking(spurious, SPURIOUS, "x", convert=False) is spurious
    assert masks_marking(objects, SPURIOUS, "x", convert=True).info.mask_meaning == SPURIOUS
    with pytest.raises(ParameterError) as caught:
        masks_marking(objects, SPURIOUS, "the test", convert=False, why="because")
    assert one_line(caught.value) == ("`mask_meaning` is 'object' (the masks mark the object), but the test needs "
                                      "masks of the artefact (because); if they mark the artefact, set it to artefact")


# ---- readers: boxes default to the artefact; dataset.json and the option override -----------------


def boxes_csv(folder, meta: dict | None = None):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        write_png(folder / name, rng.integers(0, 255, (10, 12), dtype=np.uint8))
    (folder / "boxes.csv").write_text("path,label,x0,y0,x1,y1\na.png,dog,0,0,2,3\nb.png,cat,4,4,8,8\n")
    if meta is not None:
        (folder / "dataset.json").write_text(json.dumps(meta))
    return folder / "boxes.csv"


def test_boxes_mark_the_artefact_by_default(tmp_path):
    data = open_dataset(boxes_csv(tmp_path))
    assert data.info.mask_meaning == SPURIOUS and data.summary()["mask_meaning"] == SPURIOUS


@pytest.mark.parametrize("written, stored", [("object", OBJECT), ("artefact", SPURIOUS), ("spurious", SPURIOUS)])
def test_a_dataset_json_beside_the_boxes_says_what_they_mark(tmp_path, written, stored):
    path = boxes_csv(tmp_path, {"mask_meaning": written})
    assert open_dataset(path).info.mask_meaning == stored
    # The option wins over the file.
    other = "artefact" if stored == OBJECT else "object"
    assert open_dataset(path, mask_meaning=other).info.mask_meaning == mask_meaning(other)


def test_a_bad_meaning_in_dataset_json_names_the_file(tmp_path):
    path = boxes_csv(tmp_path, {"mask_meaning": "backgrund"})
    with pytest.raises(ParameterError, match=r"got 'backgrund' \(in .*dataset.json\)") as caught:
        open_dataset(path)
    one_line(caught.value)


def test_every_layout_reads_and_writes_the_meaning(tmp_path):
    data = toy(OBJECT, splits=["train"] * 6)
    folder = write_dataset(data, tmp_path / "folder")
    assert open_dataset(folder).info.mask_meaning == OBJECT  # manifest folder + dataset.json
    npz = write_dataset(data, tmp_path / "npz", fmt="npz")
    assert open_dataset(npz).info.mask_meaning == OBJECT  # a folder with dataset.npz + dataset.json
    assert open_dataset("builtin:decoy-digits").info.mask_meaning == SPURIOUS
    assert open_dataset("builtin:decoy-digits", mask_meaning="object").info.mask_meaning == OBJECT


# ---- repair: TAP refuses, RRR and Energy convert, MaskTune ignores ---------------------------------


def prepared(method: str, data: AuditDataset, model=None) -> AuditDataset:
    config = RepairConfig(method=method)
    options = config.spec.make_options({})
    training = replace(config.training_config(), device="cpu")  # (run_repair resolves "auto" first)
    train, _ = training_data(data, config, model, options, training, False)
    return train


def test_tap_takes_artefact_masks_as_they_are():
    data = toy(SPURIOUS)
    train = prepared("tap", data)
    assert train.info.mask_meaning == SPURIOUS and np.array_equal(mask_pixels(train, 0), mask_pixels(data, 0))


def test_tap_refuses_object_masks_in_one_line_naming_the_option():
    with pytest.raises(ParameterError) as caught:
        check_data(toy(OBJECT), RepairConfig(method="tap"))
    message = one_line(caught.value)
    assert message.startswith("`mask_meaning` is 'object' (the masks mark the object), but tap needs masks of the "
                              "artefact (its max-pooled downscaling")
    assert message.endswith("rrr and energy take object masks); if they mark the artefact, set it to artefact")
    # --method auto skips TAP with that reason and goes on to RRR, which can use them.
    assert _unavailable(METHODS["tap"], toy(OBJECT), RepairConfig()).startswith("`mask_meaning` is 'object'")
    assert _unavailable(METHODS["rrr"], toy(OBJECT), RepairConfig()) is None


@pytest.mark.parametrize("method", ["rrr", "energy"])
@pytest.mark.parametrize("meaning", [SPURIOUS, OBJECT])
def test_rrr_and_energy_get_masks_of_what_they_need(method, meaning):
    data = toy(meaning)
    train = prepared(method, data)
    needed = METHODS[method].masks
    assert train.info.mask_meaning == needed
    given = mask_pixels(data, 0)
    expected = given if meaning == needed else 1.0 - given
    assert np.allclose(mask_pixels(train, 0), expected)


@pytest.mark.parametrize("meaning", [SPURIOUS, OBJECT])
def test_masktune_reads_no_masks_whatever_they_mark(meaning):
    model = audit_model(PatchReader(), ("a", "b"))
    train = prepared("masktune", toy(meaning), model)
    assert len(train) == 6 and all(r.mask is None for r in train.records)


@pytest.mark.parametrize("method, trained", [("rrr", SPURIOUS), ("energy", OBJECT), ("masktune", None)])
def test_the_repair_document_states_what_the_masks_marked(method, trained):
    model = audit_model(PatchReader(), ("a", "b"))
    config = RepairConfig(method=method, training=TrainConfig(epochs=1, batch_size=4, device="cpu"), audit=None)
    result = run_repair(model, toy(OBJECT), config, show_progress=False)
    assert result.document["mask_meaning"] == {"data": OBJECT, "trained": trained}


def test_teacher_masks_mark_the_artefact():
    """A teacher marks what it finds irrelevant: artefact masks, so TAP takes them even when the data's
    own masks mark the object."""
    teacher = audit_model(PatchReader(), ("a", "b"))
    annotated, stats = annotate(teacher, toy(OBJECT), AnnotationConfig(tau=0.5), show_progress=False)
    assert annotated.info.mask_meaning == SPURIOUS
    # The teacher reads the patch alone, so it marks everything else: the object patch's complement, which
    # is what its recall and precision are scored against (against the patch itself both would be 0).
    assert stats["recall"] == pytest.approx(1.0) and stats["precision"] == pytest.approx(1.0)
    _, as_artefact = annotate(teacher, toy(SPURIOUS), AnnotationConfig(tau=0.5), show_progress=False)
    assert as_artefact["recall"] == 0.0
    config = RepairConfig(method="tap", teacher=teacher, annotation=AnnotationConfig(tau=0.5))
    train, _ = training_data(toy(OBJECT), config, None, config.spec.make_options({}), config.training_config(), False)
    assert train.info.mask_meaning == SPURIOUS


def test_the_counterfactual_validation_removes_everything_but_the_object():
    patch = np.zeros((SIDE, SIDE), np.uint8)
    patch[:2, :2] = 255
    splits = ["train"] * 3 + ["val"] * 3
    for meaning in (SPURIOUS, OBJECT):
        data = toy(meaning, [patch] * 6, splits)
        val = validation_data(data, RepairConfig(method="rrr"), seed=0)
        kept = (slice(0, 2), slice(0, 2)) if meaning == OBJECT else (slice(2, None), slice(2, None))
        for k in range(3):
            assert np.allclose(val[k].image[0][kept].numpy(), data[3 + k].image[0][kept].numpy(), atol=1 / 255)


# ---- the audit and its report ---------------------------------------------------------------------


def test_the_audit_with_artefact_masks_runs_every_test_and_says_so():
    report = run_audit(audit_model(PatchReader(), ("a", "b")), patch_data([0, 1] * 10), AuditConfig(**FAST))
    tests = evidence(report)
    assert report.data["data"]["mask_meaning"] == SPURIOUS
    assert tests["swap_flip_rate"]["finding"] == tests["removal_drop"]["finding"] == "shows reliance"
    assert any("lies in the mask" in line for line in report.data["verdict"]["supporting"])
    assert "masks of the artefact" in render_html(report.data)


def test_the_audit_with_object_masks_measures_the_share_inside_the_object_and_no_swap():
    data = patch_data([0, 1] * 10)
    data.info.mask_meaning = OBJECT
    report = run_audit(audit_model(PatchReader(), ("a", "b")), data, AuditConfig(**FAST))
    tests = evidence(report)
    assert report.data["data"]["mask_meaning"] == OBJECT
    for name in ("swap_flip_rate", "removal_drop"):
        assert tests[name]["finding"] == "not run" and tests[name]["reason"] == OBJECT_MASKS
    assert "\n" not in OBJECT_MASKS and "--masks-mark" in OBJECT_MASKS and "mask_meaning" in OBJECT_MASKS
    assert report.data["counterfactual"] == {} and report.verdict == "inconclusive"
    # Localisation: the share of the (patch-reading) model's attribution inside the object mask.
    share = report.data["localisation"]["gradient"]["original"]["energy_in_mask"]["value"]
    assert share == pytest.approx(1.0)
    assert any("lies in the object" in line for line in report.data["verdict"]["supporting"])
    page = render_html(report.data)
    assert "masks of the object" in page and "inside the mask (the object)" in page
    console = Console(file=io.StringIO(), width=200, record=True)
    print_summary(report, console)
    assert "(the object)" in console.export_text()


def test_an_unknown_meaning_stops_the_audit_in_one_line():
    data = patch_data([0, 1] * 4)
    data.info.mask_meaning = "background"
    with pytest.raises(ParameterError, match="got 'background'"):
        run_audit(audit_model(PatchReader(), ("a", "b")), data, AuditConfig(**FAST))


# ---- discovery: its masks mark the artefact, the data's own are never mixed in ---------------------


def with_object_masks(data: AuditDataset) -> AuditDataset:
    records = []
    for k, r in enumerate(data.records):
        mask = np.zeros(data.image_size, np.uint8)
        mask[k % 4 : k % 4 + 3, :3] = 255
        records.append(Record(r.image, r.label, mask, r.variant, r.group, r.split))
    info = DatasetInfo(data.info.name, data.info.source, data.classes, mask_meaning=OBJECT)
    return AuditDataset(records, info, channels=data.channels, image_size=data.image_size)


def test_proposed_masks_mark_the_artefact_and_replace_object_masks():
    data = with_object_masks(toy(SPURIOUS))
    proposal = np.zeros((SIDE, SIDE), np.float32)
    proposal[6:, 6:] = 1.0
    proposed = proposed_dataset(data, DiscoveryReport({}, {1: proposal}))
    assert proposed.info.mask_meaning == SPURIOUS
    assert proposed.records[0].mask is None  # the object mask is not kept as if it marked an artefact
    assert np.array_equal(mask_pixels(proposed, 1), proposal)


def test_the_discovery_document_says_what_its_masks_and_the_datas_mark():
    from .test_discover_29 import FAST as DISCOVER_FAST
    from .test_discover_29 import bar_model, bars_dataset

    data = with_object_masks(bars_dataset())
    report = run_discovery(bar_model(), data, DiscoveryConfig(**DISCOVER_FAST))
    masks = report.data["masks"]
    assert masks["mask_meaning"] == SPURIOUS
    assert masks["input_masks"] == {"images": len(data), "mask_meaning": OBJECT, "kept": False}
    assert proposed_dataset(data, report).info.mask_meaning == SPURIOUS


# ---- the command line: one shared option ------------------------------------------------------------


def test_data_show_states_the_meaning_and_takes_the_option(tmp_path):
    path = boxes_csv(tmp_path)
    shown = runner.invoke(app, ["data", "show", str(path)])
    assert shown.exit_code == 0 and "with masks of the artefact" in " ".join(shown.output.split())
    result = runner.invoke(app, ["data", "show", str(path), "--masks-mark", "object", "--json", "-"])
    assert result.exit_code == 0 and json.loads(result.output)["mask_meaning"] == OBJECT
    bad = runner.invoke(app, ["data", "show", str(path), "--masks-mark", "objects"])
    assert bad.exit_code == 2
    assert error_line(bad) == "error: --masks-mark must be artefact (or spurious) or object; got 'objects'"


def test_repair_tap_on_object_masks_fails_in_one_line_naming_the_flag(digits_checkpoint, tmp_path):
    result = runner.invoke(app, ["repair", str(digits_checkpoint), "--data", "builtin:decoy-digits", "--method", "tap",
                                 "--masks-mark", "object", "--out", str(tmp_path / "out.safetensors"), "--quiet"])
    assert result.exit_code == 2
    assert error_line(result).startswith("error: --masks-mark is 'object' (the masks mark the object), but tap needs")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("flag, meaning", [([], SPURIOUS), (["--masks-mark", "object"], OBJECT)])
def test_audit_takes_the_option_and_its_json_states_the_meaning(digits_checkpoint, flag, meaning):
    result = runner.invoke(app, ["audit", str(digits_checkpoint), "--data", "builtin:decoy-digits", "--methods",
                                 "gradient", "--bootstrap", "50", "--examples", "0", "--json", "-", *flag])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["data"]["mask_meaning"] == meaning
    swap = next(e for e in report["verdict"]["evidence"] if e["test"] == "swap_flip_rate")
    assert (swap["finding"] == "not run") == (meaning == OBJECT)


def test_discover_takes_the_option():
    from auditkit.cli.discover import discover

    assert "masks_mark" in discover.__wrapped__.__code__.co_varnames
