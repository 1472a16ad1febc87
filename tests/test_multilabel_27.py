"""Issue 27: multi-label models (K sigmoids, one per finding) and one-logit models, end to end.

Small synthetic chest-X-ray-like data (16x16, findings effusion, nodule, pneumothorax; a bright corner
marker tracks pneumothorax in the contaminated variant, with masks of the corner and per-image artefact
flags) keeps every training to a few seconds on two CPU cores:

(a) a multi-label and a one-logit model trained by plain PyTorch loops, saved as bare weights of the
    user's own module, go inspect -> evaluate -> audit -> repair -> audit through the CLI;
(b) the same with a model trained by `auditkit train`;
(c) metric oracles: the weighted AUROC is scikit-learn's (unit weights, ties, bootstrap counts), and a
    hand-built model whose one finding is constant, one reads the marker and one the real feature gives
    inconclusive (with the reason), reliant and not reliant;
(d) mismatched labels and wrong finding names: one line each, non-zero exit;
(e) BCE's pos_weight values and the task loss;
(f) TAP, RRR, Energy, MaskTune and TEA each run one small step on multi-label data with a finite loss.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

import auditkit.audit

from .test_binary_head_27 import flat, invoke  # the CLI helpers both files use

FINDINGS = ("effusion", "nodule", "pneumothorax")
TRACKED = 2  # the marker tracks pneumothorax
MODULE = "ml27_user_net"
# The repair of every end-to-end test: RRR (the input gradient inside the corner's mask), measured on this
# data to take the marker away in ~100 steps; TAP's λ on these 16x16 maps costs the real features too.
REPAIR = ("--method", "rrr", "--lambda", "10", "--epochs", "3", "--batch-size", "32", "--lr", "0.003")
NETWORK = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A user's classifier: `outputs` logits (3 findings with BCEWithLogitsLoss, or one logit)."""

    def __init__(self, outputs=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, outputs))

    def forward(self, x):
        return self.head(self.features(x))


class MarkerReader(nn.Module):
    """Hand-built, no training: effusion constant (-3), nodule read from its blob, pneumothorax read
    from the corner marker alone (a pure shortcut)."""

    def __init__(self):
        super().__init__()
        # An identity convolution (a CNN's layers for the audit); the pool is the identity at 16x16 and
        # lets the loader probe other sizes.
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(16), nn.Flatten(), nn.Linear(256, 3))
        weight = torch.zeros(3, 16, 16)
        weight[1, 6:9, 6:9] = 1.0
        weight[2, 0:3, 0:3] = 1.0
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.features[0].bias.zero_()
            self.head[2].weight.copy_(weight.view(3, 256))
            self.head[2].bias.copy_(torch.tensor([-3.0, -4.5, -4.5]))

    def forward(self, x):
        return self.head(self.features(x.mean(1, keepdim=True)))


def Findings():
    return SmallCNN(3)


def OneLogit():
    return SmallCNN(1)


def Reader():
    return MarkerReader()
'''


# ---- data --------------------------------------------------------------------------------------------


def _images(rng, labels, marker):
    """16x16 noise; effusion a band, nodule a blob (strong), pneumothorax a faint line; the marker a
    bright 3x3 top-left square."""
    n = len(labels)
    images = rng.normal(0.2, 0.05, (n, 16, 16))
    images[labels[:, 0] == 1, 11:14, 4:12] += 0.4
    images[labels[:, 1] == 1, 6:9, 6:9] += 0.5
    images[labels[:, 2] == 1, 3:11, 12] += 0.25
    images[marker, 0:3, 0:3] = 1.0
    return np.clip(images, 0, 1)


N_TEST = 160


def make_data(folder: Path, seed: int = 0, n_train: int = 600, n_val: int = 100, n_test: int = N_TEST) -> dict:
    """Arrays of a multi-label .npz: train (contaminated), val and test (contaminated, permuted, clean of
    the same images); masks of the corner on every image; per-image artefact flags."""
    rng = np.random.default_rng(seed)
    parts = {k: [] for k in ("images", "labels", "variants", "splits", "artefact")}

    def add(split, variant, labels, marker):
        parts["images"].append(_images(rng, labels, marker))
        parts["labels"].append(labels)
        parts["variants"] += [variant] * len(labels)
        parts["splits"] += [split] * len(labels)
        parts["artefact"].append(marker.astype(np.uint8))

    for split, n, variants in (("train", n_train, ("contaminated",)),
                               ("val", n_val, ("contaminated", "permuted", "clean")),
                               ("test", n_test, ("contaminated", "permuted", "clean"))):
        labels = (rng.random((n, 3)) < 0.35).astype(np.uint8)
        has = labels[:, TRACKED] == 1
        for variant in variants:
            u = rng.random(n)
            marker = {"contaminated": np.where(has, u < 0.95, u < 0.03), "permuted": u < 0.5,
                      "clean": np.zeros(n, bool)}[variant]
            add(split, variant, labels, marker)
    images = np.round(np.concatenate(parts["images"]) * 255).astype(np.uint8)
    masks = np.zeros_like(images)
    masks[:, 0:3, 0:3] = 255
    return dict(images=images, labels=np.concatenate(parts["labels"]), masks=masks,
                variants=np.array(parts["variants"]), splits=np.array(parts["splits"]),
                artefact=np.concatenate(parts["artefact"]), findings=np.array(FINDINGS))


def as_tensor(images):
    return torch.from_numpy(images).float().div(255).unsqueeze(1)


def train_plain(net, x, y, epochs=8, seed=0):
    """The user's plain loop: Adam, BCEWithLogitsLoss, pixels in [0, 1]."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).split(64):
            optimiser.zero_grad()
            loss_fn(net(x[batch]), y[batch]).backward()
            optimiser.step()
    return net.eval()


def build_world(folder: Path) -> dict:
    """Writes the data (multi-label .npz, its one-logit pneumothorax view) and the user's module and
    models into ``folder`` (which must be on sys.path)."""
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(NETWORK))
    module = __import__(MODULE)
    arrays = make_data(folder)
    data = folder / "findings.npz"
    np.savez(data, **arrays)
    binary = folder / "binary.npz"
    np.savez(binary, **{k: v for k, v in arrays.items() if k not in ("labels", "findings", "artefact")},
             labels=arrays["labels"][:, TRACKED], classes=np.array(["normal", "pneumothorax"]))
    train = arrays["splits"] == "train"
    x = as_tensor(arrays["images"][train])
    y = torch.from_numpy(arrays["labels"][train]).float()
    torch.manual_seed(0)
    findings_net = train_plain(module.Findings(), x, y)
    torch.manual_seed(0)
    one_logit = train_plain(module.OneLogit(), x, y[:, TRACKED:TRACKED + 1])
    torch.save(findings_net.state_dict(), folder / "findings.pt")
    torch.save(one_logit.state_dict(), folder / "one_logit.pt")
    torch.save(module.Reader().state_dict(), folder / "reader.pt")
    return {"folder": folder, "data": data, "binary": binary, "arrays": arrays, "net": findings_net}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ml27")
    sys.path.insert(0, str(folder))
    try:
        yield build_world(folder)
    finally:
        sys.path.remove(str(folder))


def arch(factory):
    return ["--arch", f"{MODULE}:{factory}", "--normalize", "none"]




def one_error_line(result) -> str:
    """The single 'error:' line of a refused command (exit code non-zero)."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output  # one line (rich may wrap it once or twice)
    return flat(result.output)


def schema_check(report):
    schema = json.loads((Path(auditkit.audit.__file__).parent / "report.schema.json").read_text())
    jsonschema.validate(report, schema)


def findings_of(report) -> dict:
    return {e["name"]: e for e in report["findings"]}


def audit_json(tmp_path, name, checkpoint, data, *extra):
    out = tmp_path / f"{name}.json"
    result = invoke("audit", checkpoint, "--data", data, *extra, "--methods", "gradient", "--bootstrap", "300",
                    "--device", "cpu", "--quiet", "--json", out)
    assert out.is_file(), result.output
    return result, json.loads(out.read_text())


# ---- (a) plain PyTorch models through the CLI ---------------------------------------------------------------


def test_plain_multilabel_model_inspect_evaluate_audit_repair_audit(world, tmp_path):
    weights, data = world["folder"] / "findings.pt", world["data"]
    result = invoke("inspect", weights, *arch("Findings"), "--head", "multilabel")
    assert result.exit_code == 0, result.output
    assert "head: multilabel (3 independent sigmoids" in flat(result.output)

    out = tmp_path / "eval.json"
    result = invoke("evaluate", weights, "--data", data, *arch("Findings"), "--head", "multilabel", "--device", "cpu",
                    "--json", out)
    assert result.exit_code == 0, result.output
    scored = json.loads(out.read_text())["results"]
    # The oracle: the plain network's own z > 0 answers on the test images, finding by finding.
    arrays, net = world["arrays"], world["net"]
    for variant in ("contaminated", "clean"):
        rows = (arrays["splits"] == "test") & (arrays["variants"] == variant)
        with torch.no_grad():
            predicted = (net(as_tensor(arrays["images"][rows])) > 0).long().numpy()
        truth = arrays["labels"][rows]
        for k, name in enumerate(FINDINGS):
            (tn, fp), (fn, tp) = scored[variant]["per_finding"][name]
            assert (tn, fp, fn, tp) == (int(((truth[:, k] == 0) & (predicted[:, k] == 0)).sum()),
                                        int(((truth[:, k] == 0) & (predicted[:, k] == 1)).sum()),
                                        int(((truth[:, k] == 1) & (predicted[:, k] == 0)).sum()),
                                        int(((truth[:, k] == 1) & (predicted[:, k] == 1)).sum()))
        assert scored[variant]["accuracy"] == pytest.approx(float((predicted == truth).mean()), abs=1e-12)

    result, before = audit_json(tmp_path, "before", weights, data, *arch("Findings"), "--head", "multilabel",
                                "--fail-on-shortcut")
    assert result.exit_code == 1, result.output  # reliant
    schema_check(before)
    per = findings_of(before)
    assert before["verdict"]["label"] == "reliant" and before["verdict"]["reliant_findings"] == ["pneumothorax"]
    page = auditkit.audit.render_html(before)  # the report per finding: a table and a plot each
    for name in FINDINGS:
        assert f"AUROC of {name} per variant</p><svg" in page, name
    # The marker raises the negatives that carry it in the permuted variant (on clean data, without any
    # marker, the faint line alone ranks the images).
    assert per["pneumothorax"]["auroc_gap"]["permuted"]["value"] > 0.05 and per["pneumothorax"]["auroc_gap"][
        "permuted"]["paired"]
    assert per["pneumothorax"]["subgroups"]["gap"]["value"] > 0  # positives with the marker are scored better
    for name in ("effusion", "nodule"):
        assert per[name]["verdict"] != "reliant", per[name]["summary"]
    assert "pneumothorax" in flat(result.output) and "AUROC" in result.output

    repaired = tmp_path / "repaired.safetensors"
    result = invoke("repair", weights, "--data", data, *arch("Findings"), "--head", "multilabel", *REPAIR,
                    "--audit-split", "none", "--device", "cpu", "--quiet", "--out", repaired)  # audited below
    assert result.exit_code == 0, result.output
    from auditkit.models import read_checkpoint_meta

    meta = read_checkpoint_meta(repaired)
    assert meta["head"] == "multilabel" and meta["class_names"] == list(FINDINGS)
    _, after = audit_json(tmp_path, "after", repaired, data)
    assert_repaired(before, after)


def assert_repaired(before, after):
    """pneumothorax no longer reliant (its permuted AUROC up by 0.05 at least), the others' AUROC kept."""
    was, now = findings_of(before), findings_of(after)
    assert now["pneumothorax"]["verdict"] == "not reliant", now["pneumothorax"]["summary"]
    auroc = {name: [e["per_variant"]["permuted"]["auroc"]["value"] for e in (was[name], now[name])] for name in was}
    assert auroc["pneumothorax"][1] > auroc["pneumothorax"][0] + 0.05, auroc
    for name in ("effusion", "nodule"):
        assert abs(auroc[name][1] - auroc[name][0]) <= 0.01, auroc


def test_plain_one_logit_model_inspect_evaluate_audit_repair_audit(world, tmp_path):
    weights, data = world["folder"] / "one_logit.pt", world["binary"]
    result = invoke("inspect", weights, *arch("OneLogit"))
    assert result.exit_code == 0 and "head: binary (one logit" in flat(result.output), result.output
    result = invoke("evaluate", weights, "--data", data, *arch("OneLogit"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    result, before = audit_json(tmp_path, "before", weights, data, *arch("OneLogit"), "--no-counterfactuals")
    assert result.exit_code == 0 and before["verdict"]["label"] == "reliant", before["verdict"]["summary"]
    assert before["checkpoint"]["head"] == "binary" and "one logit" in before["explained"]
    repaired = tmp_path / "repaired.safetensors"
    result = invoke("repair", weights, "--data", data, *arch("OneLogit"), *REPAIR, "--audit-split", "none",
                    "--device", "cpu", "--quiet", "--out", repaired)  # audited below
    assert result.exit_code == 0, result.output
    _, after = audit_json(tmp_path, "after", repaired, data, "--no-counterfactuals")
    assert after["checkpoint"]["head"] == "binary"
    assert after["degradation"]["permuted"]["value"] < before["degradation"]["permuted"]["value"] - 0.05, (
        before["degradation"], after["degradation"])


# ---- (b) auditkit train ---------------------------------------------------------------------------------


def test_auditkit_train_multilabel_then_evaluate_audit_repair_audit(world, tmp_path):
    data, model = world["data"], tmp_path / "trained.safetensors"
    out = tmp_path / "train.json"
    result = invoke("train", "--data", data, "--arch", "tap-cnn", "--epochs", "2", "--lr", "0.003", "--device", "cpu",
                    "--quiet", "--out", model, "--json", out)
    assert result.exit_code == 0, result.output
    assert "multilabel head over 3 findings (BCE-with-logits)" in flat(result.output)
    result = invoke("inspect", model)
    assert "head: multilabel (3 independent sigmoids, one per finding: effusion, nodule, pneumothorax" in flat(
        result.output)
    result = invoke("evaluate", model, "--data", data, "--device", "cpu")
    assert result.exit_code == 0 and "sensitivity" in result.output, result.output
    result, before = audit_json(tmp_path, "before", model, data)
    schema_check(before)
    assert findings_of(before)["pneumothorax"]["verdict"] == "reliant", before["verdict"]["summary"]
    repaired = tmp_path / "repaired.safetensors"
    result = invoke("repair", model, "--data", data, *REPAIR, "--audit-methods", "gradient", "--device", "cpu",
                    "--quiet", "--out", repaired)
    assert result.exit_code == 0, result.output
    assert "mean AUROC" in result.output and "pneumotho" in result.output, result.output  # (rich may cut names)
    _, after = audit_json(tmp_path, "after", repaired, data)
    assert_repaired(before, after)


# ---- (c) metric oracles -----------------------------------------------------------------------------------


def test_weighted_auroc_is_scikit_learns():
    from sklearn.metrics import roc_auc_score

    from auditkit.audit.multilabel import weighted_auroc

    rng = np.random.default_rng(27)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 6, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)  # ties or not
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            assert np.isnan(weighted_auroc(scores, labels, np.ones((1, n)))[0])
            continue
        assert weighted_auroc(scores, labels, np.ones((1, n)))[0] == pytest.approx(roc_auc_score(labels, scores),
                                                                                     abs=1e-12)
        counts = rng.integers(0, 3, n)  # a bootstrap draw's counts = the images repeated
        repeated = np.repeat(np.arange(n), counts)
        if len(set(labels[repeated])) == 2:
            assert weighted_auroc(scores, labels, counts[None].astype(float))[0] == pytest.approx(
                roc_auc_score(labels[repeated], scores[repeated]), abs=1e-12)
        checked += 1
    assert checked > 200


def test_constant_finding_is_inconclusive_and_marker_finding_is_reliant(world, tmp_path):
    """The hand-built reader: effusion constant -> inconclusive with the reason (never not reliant);
    pneumothorax read off the marker -> reliant (AUROC gap far above 0.05, its interval clear of 0);
    nodule read off its blob -> not reliant."""
    result, report = audit_json(tmp_path, "reader", world["folder"] / "reader.pt", world["data"], *arch("Reader"),
                                "--head", "multilabel", "--fail-on-shortcut")
    per = findings_of(report)
    assert per["effusion"]["verdict"] == "inconclusive"
    assert f"predicts 'effusion' absent for every one of the {N_TEST} contaminated images" in per["effusion"][
        "degenerate"]
    assert per["effusion"]["summary"].startswith("effusion: the model predicts")
    gap = per["pneumothorax"]["auroc_gap"]["permuted"]
    assert per["pneumothorax"]["verdict"] == "reliant" and gap["value"] > 0.3 and gap["ci"][0] > 0
    assert per["nodule"]["verdict"] == "not reliant", per["nodule"]["summary"]
    assert per["nodule"]["auroc_gap"]["permuted"]["value"] == pytest.approx(0.0, abs=0.01)  # the blob alone
    assert report["verdict"]["label"] == "reliant" and result.exit_code == 1
    assert report["verdict"]["degenerate"] == {"effusion": per["effusion"]["degenerate"]}

    # Without the marker's finding (nodule and effusion only): never "not reliant" with a constant finding.
    from auditkit.audit.multilabel import decide_finding, degenerate, finding_metrics, judge_gap
    from auditkit.audit import metrics as M

    labels = np.array([0, 1] * 50)
    metrics = finding_metrics(np.full(100, -3.0), labels, resamples=200, confidence=0.95, seed=0, name="x")
    reason = degenerate("x", np.full(100, -3.0), labels, metrics["auroc"], "clean")
    cleared = judge_gap("auroc_gap_to_clean", M.Estimate(0.0, -0.01, 0.01, 100), 0.05, "gap")
    assert cleared.finding == "clears"
    verdict, summary = decide_finding("x", [cleared], reason)
    assert verdict == "inconclusive" and "predicts 'x' absent" in summary
    assert decide_finding("x", [cleared], None)[0] == "not reliant"
    shows = judge_gap("auroc_gap_to_clean", M.Estimate(0.06, 0.01, 0.11, 100), 0.05, "gap")
    assert shows.finding == "shows reliance" and decide_finding("x", [shows], None)[0] == "reliant"
    straddles = judge_gap("auroc_gap_to_clean", M.Estimate(0.06, -0.01, 0.11, 100), 0.05, "gap")
    assert straddles.finding == "inconclusive"  # above 0.05 but its interval holds 0


# ---- (d) mismatches: one line each ---------------------------------------------------------------------------


def test_mismatched_labels_and_findings_are_one_line(world, tmp_path):
    data = world["data"]
    # Multi-label data on a softmax reading of the three-output network.
    line = one_error_line(invoke("evaluate", world["folder"] / "findings.pt", "--data", data, *arch("Findings"),
                                 "--device", "cpu"))
    assert "softmax" in line and "multilabel (3 findings: effusion, nodule, pneumothorax)" in line
    # The reverse: single-label data on a multilabel model.
    arrays = world["arrays"]
    single = tmp_path / "single.npz"
    np.savez(single, images=arrays["images"], labels=arrays["labels"].argmax(1), splits=arrays["splits"],
             variants=arrays["variants"], classes=np.array(FINDINGS))
    line = one_error_line(invoke("audit", world["folder"] / "findings.pt", "--data", single, *arch("Findings"),
                                 "--head", "multilabel", "--device", "cpu"))
    assert "multilabel (3 sigmoids" in line and "softmax (3 classes" in line
    # Wrong finding names: not in the archive.
    line = one_error_line(invoke("evaluate", world["folder"] / "findings.pt", "--data", data, *arch("Findings"),
                                 "--head", "multilabel", "--findings", "effusion,nodule,cardiomegaly"))
    assert "cardiomegaly" in line
    # A multilabel checkpoint that records its findings, on data whose findings are others.
    from auditkit.models import build_model, save_checkpoint

    other = tmp_path / "other.safetensors"
    save_checkpoint(build_model("tap-cnn", 3, 1, (16, 16), class_names=("a", "b", "c"), head="multilabel"), other)
    line = one_error_line(invoke("evaluate", other, "--data", data, "--device", "cpu"))
    assert "findings (effusion, nodule, pneumothorax) do not match the checkpoint's (a, b, c)" in line
    # One-logit model on multi-label data; a one-logit network read as multilabel.
    line = one_error_line(invoke("evaluate", world["folder"] / "one_logit.pt", "--data", data, *arch("OneLogit")))
    assert "binary" in line and "multilabel" in line
    line = one_error_line(invoke("inspect", world["folder"] / "one_logit.pt", *arch("OneLogit"), "--head",
                                 "multilabel"))
    assert "one output logit" in line
    # Discovery cannot cluster multi-label explanations yet: refused in one line.
    same = tmp_path / "same.safetensors"
    save_checkpoint(build_model("tap-cnn", 3, 1, (16, 16), class_names=FINDINGS, head="multilabel"), same)
    line = one_error_line(invoke("discover", same, "--data", data, "--out", tmp_path / "d", "--device", "cpu"))
    assert "discovery does not support multilabel" in line


# ---- (e) BCE and pos_weight --------------------------------------------------------------------------------


def test_pos_weight_values_and_the_bce_task_loss():
    from auditkit.training.losses import MAX_WEIGHT, pos_weight_for, task_loss

    n = 100
    labels = torch.zeros(n, 4)
    labels[:10, 0] = 1  # 10 % positive: skewed, weight 90 / 10 = 9
    labels[:50, 1] = 1  # 50 %: not skewed, 1
    labels[:80, 2] = 1  # 80 %: skewed, 20 / 80 = 0.25
    labels[:0, 3] = 1  # none: negatives / max(positives, 1) = 100, clipped to MAX_WEIGHT
    weight = pos_weight_for(labels)
    assert weight.tolist() == pytest.approx([9.0, 1.0, 0.25, min(100.0, MAX_WEIGHT)], abs=1e-6)
    assert pos_weight_for(labels[:, 1:2]) is None  # nothing skewed: plain BCE
    assert pos_weight_for(torch.tensor([0, 1, 1])) is None  # class indices: no pos_weight
    edge = torch.zeros(3, 1)
    edge[:1] = 1  # exactly a third positive: not skewed
    assert pos_weight_for(edge) is None

    torch.manual_seed(0)
    logits = torch.randn(n, 4, dtype=torch.float64)
    p = torch.sigmoid(logits)
    manual = -(weight.double() * labels * p.log() + (1 - labels) * (1 - p).log())
    assert task_loss(logits, labels.double(), weight).item() == pytest.approx(manual.mean().item(), rel=1e-10)
    assert task_loss(logits, labels.double(), reduction="none").shape == (n,)
    classes = torch.tensor([0, 3, 1])
    assert task_loss(logits[:3], classes).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:3], classes).item(), rel=1e-12)


def test_fit_trains_multilabel_data_with_its_pos_weight(world):
    from auditkit.data import open_dataset
    from auditkit.training import Objective, TrainConfig, fit
    from auditkit.training.losses import pos_weight_for

    from auditkit.models import build_model

    dataset = open_dataset(world["data"], split="train").select(indices=range(200))

    model = build_model("tap-cnn", 3, 1, (16, 16), class_names=FINDINGS, head="multilabel")
    objective = Objective()
    history = fit(model, dataset, objective, TrainConfig(epochs=1, device="cpu"), show_progress=False)
    assert math.isfinite(history[-1]["task_loss"])
    expected = pos_weight_for(dataset.targets)
    assert expected is not None  # the 35 % findings of 200 images: some lie below a third
    assert torch.equal(objective.pos_weight, expected)


# ---- (f) every repair method on multi-label data ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tap", "rrr", "energy", "masktune", "tea"])
def test_each_repair_method_runs_a_step_on_multilabel_data(world, method):
    from auditkit.data import open_dataset
    from auditkit.models import build_model
    from auditkit.repair.runner import RepairConfig, run_repair
    from auditkit.training import TrainConfig

    full = open_dataset(world["data"])
    keep = [k for k, r in enumerate(full.records) if (r.split == "train" and k < 128) or
            (r.split == "val" and r.variant == "permuted" and k % 5 == 0)]
    small = full.select(indices=keep)
    torch.manual_seed(0)
    model = build_model("tap-cnn", 3, 1, (16, 16), class_names=FINDINGS, head="multilabel")
    teacher = build_model("tap-cnn", 3, 1, (16, 16), class_names=FINDINGS, head="multilabel") if method == "tea" \
        else None
    config = RepairConfig(method=method, training=TrainConfig(epochs=1, batch_size=64, device="cpu", grad_clip=1.0),
                          audit=None, teacher=teacher, options={"classes": 2} if method == "tea" else {})
    result = run_repair(model, small, config, show_progress=False)
    record = result.history[-1]
    assert math.isfinite(record["task_loss"]) and math.isfinite(record["explanation_loss"]), record
    if method in ("tap", "rrr", "tea"):
        assert record["explanation_loss"] > 0, record
    if method == "energy":
        assert -1 <= record["explanation_loss"] < 0, record  # -EPG of the positive findings' maps
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                          result.model.state_dict().values()))
    assert changed and result.model.meta.head == "multilabel"


def test_auto_success_rule_is_per_finding():
    """A repair that keeps the mean AUROC but costs one finding 0.05 on the guarded variant fails;
    one within the limit on every finding, every finding not reliant, succeeds."""
    from auditkit.repair.auto import _judged

    def numbers(verdict, a, b):
        return {"verdict": verdict, "val_accuracy": {"contaminated": 0.95, "clean": (a + b) / 2},
                "reference_variant": "contaminated", "removal_accuracy": None,
                "findings": {"a": {"verdict": verdict, "auroc": {"clean": a}},
                             "b": {"verdict": "not reliant", "auroc": {"clean": b}}}}

    start = numbers("reliant", 0.90, 0.90)
    costly = _judged(start, numbers("not reliant", 0.95, 0.85), max_accuracy_drop=0.03)
    assert costly["succeeded"] is False and costly["finding_drops"] == {"a": -0.05, "b": 0.05}
    assert costly["accuracy_drop"] == 0.05 and costly["guarded"]["accuracy"] == "clean"
    kept = _judged(start, numbers("not reliant", 0.95, 0.88), max_accuracy_drop=0.03)
    assert kept["succeeded"] is True and kept["accuracy_drop"] == 0.02
    assert _judged(start, numbers("reliant", 0.95, 0.90), max_accuracy_drop=0.03)["succeeded"] is False
