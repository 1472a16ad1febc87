"""Issue 27, items 1 and 4 for one-logit binary heads, from the command line.

A pneumonia-vs-normal style classifier with ONE output logit, trained by a plain PyTorch loop with
BCEWithLogitsLoss on data with a planted shortcut (a bright corner marker on every 'pneumonia' image
of the contaminated variant), saved as bare weights of the user's own module (no num_classes
argument: the case auditkit used to accept and read with argmax over one output). auditkit must see
it as binary: inspect says so, evaluate scores (z > 0), the audit finds the shortcut, TAP repairs it
and the repaired checkpoint keeps one output. Data of three classes, and a model at chance, are
refused or left inconclusive in one line."""

from __future__ import annotations

import json
import sys
import textwrap

from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import auditkit.audit
from auditkit.cli import app

runner = CliRunner()
CLASSES = ("normal", "pneumonia")
MODULE = "binhead27_user_net"  # the user's own module, imported by --arch MODULE:Factory
NETWORK = '''
import torch
from torch import nn


class OneLogitCNN(nn.Module):
    """A user's binary classifier: one output logit, trained with BCEWithLogitsLoss."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 1))

    def forward(self, x):
        return self.head(self.features(x))


def Factory():
    return OneLogitCNN()
'''


def images_for(rng, labels, marker):
    """16x16 grey images: a faint vertical (pneumonia) or horizontal (normal) bar in noise, and a bright
    4x4 corner marker where ``marker`` is set."""
    n = len(labels)
    images = rng.normal(0.3, 0.1, (n, 16, 16))
    for k in range(n):
        at = rng.integers(5, 11)
        if labels[k] == 1:
            images[k, 4:12, at] += 0.15
        else:
            images[k, at, 4:12] += 0.15
        if marker[k]:
            images[k, :4, :4] = 1.0
    return np.clip(images, 0, 1)


def shortcut_data(folder, seed=0, n_train=800, n_test=300, n_val=None, name="xray.npz"):
    """An .npz with train/val (contaminated) and test (contaminated, permuted, clean) splits, masks of the
    marker's corner on every image, classes normal, pneumonia (``n_val``: default n_test // 2). Returns
    (path, arrays)."""
    rng = np.random.default_rng(seed)
    parts = {"images": [], "labels": [], "variants": [], "splits": []}

    def add(split, variant, labels, marker):
        parts["images"].append(images_for(rng, labels, marker))
        parts["labels"].append(labels)
        parts["variants"] += [variant] * len(labels)
        parts["splits"] += [split] * len(labels)

    for split, n in (("train", n_train), ("val", n_test // 2 if n_val is None else n_val)):
        labels = rng.integers(0, 2, n)
        add(split, "contaminated", labels, labels == 1)
    labels = rng.integers(0, 2, n_test)
    add("test", "contaminated", labels, labels == 1)
    add("test", "permuted", labels, rng.integers(0, 2, n_test) == 1)
    add("test", "clean", labels, np.zeros(n_test, bool))
    images = np.round(np.concatenate(parts["images"]) * 255).astype(np.uint8)
    masks = np.zeros_like(images)
    masks[:, :4, :4] = 1
    arrays = dict(images=images, labels=np.concatenate(parts["labels"]), masks=masks,
                  variants=np.array(parts["variants"]), splits=np.array(parts["splits"]), classes=np.array(CLASSES))
    path = folder / name
    np.savez(path, **arrays)
    return path, arrays


def as_tensor(images):
    return torch.from_numpy(images).float().div(255).unsqueeze(1)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """(weights.pt, data.npz, arrays, the plain loop's (z > 0) test accuracy per variant)."""
    folder = tmp_path_factory.mktemp("binary27")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(NETWORK))
    sys.path.insert(0, str(folder))
    try:
        module = __import__(MODULE)
        data, arrays = shortcut_data(folder)
        train = arrays["splits"] == "train"
        x, y = as_tensor(arrays["images"][train]), torch.from_numpy(arrays["labels"][train]).float()
        torch.manual_seed(0)
        net = module.Factory()
        optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(6):  # the plain loop of a user's script: pixels in [0, 1], no normalisation
            for batch in torch.randperm(len(y)).split(64):
                optimiser.zero_grad()
                loss_fn(net(x[batch]).squeeze(1), y[batch]).backward()
                optimiser.step()
        net.eval()
        accuracy = {}
        with torch.no_grad():
            for variant in ("contaminated", "permuted", "clean"):
                rows = (arrays["splits"] == "test") & (arrays["variants"] == variant)
                z = net(as_tensor(arrays["images"][rows])).squeeze(1)
                accuracy[variant] = float(((z > 0).long().numpy() == arrays["labels"][rows]).mean())
        weights = folder / "weights.pt"
        torch.save(net.state_dict(), weights)
        yield weights, data, arrays, accuracy
    finally:
        sys.path.remove(str(folder))


def user_args():
    return ["--arch", f"{MODULE}:Factory", "--normalize", "none"]


def flat(text):
    """The output as one line (rich wraps long lines at the terminal's width)."""
    return " ".join(text.split())


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_the_two_class_view_is_the_sigmoid_model_exactly():
    from auditkit.models.outputs import binary_view

    z = torch.linspace(-30, 30, 601, dtype=torch.float64)
    view = binary_view(z)
    probabilities = view.softmax(1)
    assert torch.allclose(probabilities[:, 1], torch.sigmoid(z), atol=1e-6, rtol=0)
    assert torch.allclose(probabilities[:, 0], 1 - torch.sigmoid(z), atol=1e-6, rtol=0)
    for label in (0, 1):
        target = torch.full_like(z, float(label))
        ce = F.cross_entropy(view, target.long(), reduction="none")
        bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
        assert torch.allclose(ce, bce, atol=1e-6, rtol=0)
    assert torch.equal(view.argmax(1), (z > 0).long())
    assert torch.equal(view[:, 1], z / 2) and torch.equal(view[:, 0], -z / 2)


def test_inspect_states_binary(user_model):
    weights, _, _, _ = user_model
    result = invoke("inspect", weights, *user_args())
    assert result.exit_code == 0, result.output
    assert "head: binary (one logit, sigmoid; class 1 = the data's second class when z > 0)" in flat(result.output)
    result = invoke("inspect", weights, *user_args(), "--json", "-")
    report = json.loads(result.output[result.output.index("{"):])
    assert report["head"] == "binary" and report["num_classes"] == 2


def test_evaluate_scores_z_above_zero(user_model, tmp_path):
    weights, data, _, accuracy = user_model
    out = tmp_path / "eval.json"
    result = invoke("evaluate", weights, "--data", data, *user_args(), "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    scored = {k: v["accuracy"] for k, v in json.loads(out.read_text())["results"].items()}
    assert scored == pytest.approx(accuracy, abs=1e-9)
    assert accuracy["contaminated"] > 0.9 and accuracy["permuted"] < accuracy["contaminated"] - 0.1  # a shortcut


def test_audit_finds_the_shortcut_then_tap_repairs_it_keeping_one_output(user_model, tmp_path):
    weights, data, _, _ = user_model
    out = tmp_path / "audit.json"
    result = invoke("audit", weights, "--data", data, *user_args(), "--fail-on-shortcut", "--methods",
                    "gradient,lrp_epsilon", "--bootstrap", "200", "--device", "cpu", "--json", out)
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    assert report["verdict"]["label"] == "reliant" and report["verdict"]["at_chance"] is None
    assert report["checkpoint"]["head"] == "binary"
    jsonschema.validate(report, json.loads((Path(auditkit.audit.__file__).parent / "report.schema.json").read_text()))

    repaired = tmp_path / "repaired.safetensors"
    result = invoke("repair", weights, "--data", data, *user_args(), "--method", "tap", "--epochs", "2",
                    "--audit-methods", "gradient", "--device", "cpu", "--quiet", "--out", repaired)
    assert result.exit_code == 0, result.output
    from auditkit.models import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(repaired)
    assert meta["head"] == "binary" and meta["class_names"] == list(CLASSES)
    model = load_checkpoint(repaired)
    assert model.net.head[-1].out_features == 1  # the user's network, unchanged: one output
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        z = model.net(x)
        assert z.shape == (3, 1) and torch.allclose(model(x), torch.cat([-z / 2, z / 2], 1))
    result = invoke("inspect", repaired)
    assert "head: binary (one logit, sigmoid; class 1 = pneumonia when z > 0)" in flat(result.output)


def test_three_classes_on_a_one_logit_model_is_one_line(user_model, tmp_path):
    weights, _, arrays, _ = user_model
    data = tmp_path / "three.npz"
    labels = arrays["labels"].copy()
    labels[::3] = 2
    np.savez(data, images=arrays["images"], labels=labels, splits=arrays["splits"], variants=arrays["variants"],
             classes=np.array([*CLASSES, "covid"]))
    result = invoke("evaluate", weights, "--data", data, *user_args(), "--device", "cpu")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    line = errors[0]
    assert "one output logit" in line and "3 classes" in line and "covid" in line, result.output


def test_softmax_head_on_a_one_logit_network_is_refused(user_model):
    weights, _, _, _ = user_model
    result = invoke("inspect", weights, *user_args(), "--head", "softmax")
    assert result.exit_code == 2 and "--head is softmax" in flat(result.output), result.output
    result = invoke("inspect", weights, *user_args(), "--head", "multilabel")
    # Multilabel heads exist now (issue 27): a one-logit network still cannot be one, said in one line.
    assert result.exit_code == 2 and "--head is multilabel but the network has one output logit" in flat(
        result.output), result.output


def test_a_model_at_chance_is_inconclusive(user_model, tmp_path):
    """Labels that the images do not follow (shuffled): predictions vary (the marker), accuracy is chance,
    and the degradation tests find nothing. Never 'not reliant': inconclusive, exit 3 under the gate."""
    weights, _, arrays, _ = user_model
    rng = np.random.default_rng(1)
    test = arrays["splits"] == "test"
    keep = test & np.isin(arrays["variants"], ["contaminated", "clean"])
    n = int((arrays["variants"][keep] == "contaminated").sum())
    random_labels = np.tile(rng.integers(0, 2, n), 2)
    data = tmp_path / "chance.npz"
    np.savez(data, images=arrays["images"][keep], labels=random_labels, variants=arrays["variants"][keep],
             classes=np.array(CLASSES))
    out = tmp_path / "chance.json"
    result = invoke("audit", weights, "--data", data, *user_args(), "--split", "all", "--fail-on-shortcut",
                    "--methods", "gradient", "--bootstrap", "200", "--device", "cpu", "--json", out)
    report = json.loads(out.read_text())
    assert report["verdict"]["label"] == "inconclusive", report["verdict"]
    assert report["verdict"]["at_chance"] and "chance" in report["verdict"]["summary"]
    assert result.exit_code == 3, result.output


def test_at_chance_and_decide():
    from auditkit.audit.verdict import INCONCLUSIVE, at_chance, decide

    labels = np.array([0, 1] * 200)
    assert at_chance(labels, labels) is None  # perfect
    assert at_chance(labels, np.zeros_like(labels)) is not None  # the majority answer: balanced accuracy 0.5
    assert at_chance(labels, np.random.default_rng(0).integers(0, 2, len(labels))) is not None
    assert decide([], chance="x")[0] == INCONCLUSIVE


def test_other_routes_read_one_logit_as_binary(user_model, tmp_path):
    """A zoo network's bare weights with one output (the class count read off the classifier), a whole
    pickled module, and --head binary on a softmax network (refused in one line)."""
    import warnings

    from auditkit.models import build_model, load_checkpoint
    from auditkit.models.architectures import TapCNN
    from auditkit.models.outputs import HeadError, use_head

    torch.save(TapCNN(1, 1).state_dict(), tmp_path / "tap.pt")
    weights, _, _, _ = user_model
    module = __import__(MODULE)
    net = module.Factory()
    net.load_state_dict(torch.load(weights))
    torch.save(net, tmp_path / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo = load_checkpoint(tmp_path / "tap.pt", arch="tap-cnn")
        whole = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    for model in (zoo, whole):
        assert model.meta.head == "binary" and model.meta.num_classes == 2
        assert model(torch.rand(2, 1, 16, 16)).shape == (2, 2)
    softmax = build_model("tap-cnn", 2, 1, (16, 16))
    assert softmax.meta.head == "softmax"
    with pytest.raises(HeadError, match="last layer has 2 outputs"):
        use_head(softmax, "binary")


@pytest.mark.parametrize("method", ["lrp_epsilon", "gradient", "gradcam"])
def test_explanations_of_a_one_logit_model(method):
    """Class 1 is explained through z/2 and class 0 through -z/2: maps linear in the explained logit are
    halves of the map of z and each other's negation (Grad-CAM's ReLU keeps only its own sign's part)."""
    from auditkit.explain import attribute
    from auditkit.models import build_model

    torch.manual_seed(0)
    model = build_model("tap-cnn", 1, 1, (16, 16)).double().eval()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    maps = attribute(model, x, torch.tensor([[0, 1]] * 3), method)
    assert maps.shape == (3, 2, 16, 16) and maps.abs().sum() > 0
    if method != "gradcam":
        assert torch.allclose(maps[:, 0], -maps[:, 1], atol=1e-9)


class _TwoClassesWithASideHead(nn.Module):
    """A two-class softmax network that registers a one-output side head after its classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.quality = nn.Linear(4, 1)  # registered last; not what the forward returns

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_a_side_head_registered_last_is_not_read_as_binary(tmp_path):
    """What the forward returns decides the head, not the last registered Linear (review of issue 27)."""
    import warnings

    from auditkit.models import load_checkpoint
    from auditkit.models.outputs import one_logit_network, output_width

    torch.manual_seed(0)
    net = _TwoClassesWithASideHead()
    assert output_width(net, 1, (16, 16)) == 2 and not one_logit_network(net, 1, (16, 16))
    torch.save(net, tmp_path / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert model.meta.head == "softmax" and model.meta.num_classes == 2
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(model(x), net(x))


def test_below_chance_is_at_chance_too():
    """A model below chance (a one-logit model read with the wrong sign) is no evidence either."""
    from auditkit.audit.verdict import at_chance

    labels = np.array([0, 1] * 200)
    flipped = 1 - labels
    flipped[:20] = labels[:20]  # 5 % right: far below chance
    assert at_chance(labels, flipped) is not None and "below chance" in at_chance(labels, flipped)
    ten_class_guesses = np.random.default_rng(1).integers(0, 10, len(labels))  # 2-class data, 10-class model
    assert at_chance(labels, ten_class_guesses) is not None


def test_auditkit_train_on_binary_data_gives_a_one_logit_model(tmp_path):
    """Binary data trains a one-logit (BCE) model by default; --head refuses what the labels cannot train."""
    out = tmp_path / "one.safetensors"
    result = runner.invoke(app, ["train", "--data", "builtin:binary-mnist", "--arch", "tap-cnn", "--epochs", "1",
                                 "--fraction", "0.1", "--test-split", "none", "--val-split", "none", "--quiet",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    from auditkit.models.loading import load_model

    model = load_model(out)
    assert model.meta.head == "binary" and model.meta.class_names == ("other", "seven")
    assert model.net(torch.zeros(2, 1, 28, 28)).shape == (2, 1)  # one logit per image
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)  # the two-class view
    # ... and goes evaluate -> audit -> repair -> audit like any checkpoint (one epoch on a tenth: the
    # verdicts are not asserted, the head and the chain are).
    result = invoke("evaluate", out, "--data", "builtin:binary-mnist", "--device", "cpu")
    assert result.exit_code == 0 and "contaminated" in result.output, result.output
    audited = tmp_path / "before.json"
    result = invoke("audit", out, "--data", "builtin:binary-mnist", "--methods", "gradient", "--no-counterfactuals",
                    "--device", "cpu", "--json", audited)
    assert result.exit_code == 0, result.output
    report = json.loads(audited.read_text())
    assert report["checkpoint"]["head"] == "binary" and "one logit" in report["explained"]
    repaired = tmp_path / "repaired.safetensors"
    result = invoke("repair", out, "--data", "builtin:binary-mnist", "--method", "tap", "--epochs", "1",
                    "--audit-split", "none", "--device", "cpu", "--quiet", "--out", repaired)
    assert result.exit_code == 0, result.output
    assert load_model(repaired).meta.head == "binary"
    result = invoke("audit", repaired, "--data", "builtin:binary-mnist", "--methods", "gradient",
                    "--no-counterfactuals", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for data, head, message in [("builtin:decoy-mnist", "binary", "binary (one logit) but the data has 10 classes"),
                                ("builtin:binary-mnist", "multilabel", "cannot be trained on binary labels")]:
        bad = runner.invoke(app, ["train", "--data", data, "--arch", "tap-cnn", "--epochs", "1", "--head", head,
                                  "--out", str(tmp_path / f"{head}.safetensors")])
        assert bad.exit_code != 0 and message in bad.output, bad.output
        assert "Traceback" not in bad.output and not (tmp_path / f"{head}.safetensors").exists()
