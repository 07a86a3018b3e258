import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cifarkit
from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.serve.export import OnnxModel, export
from cifarkit.weights import load


@pytest.fixture(scope="module")
def real_images(tiny_run):
    from cifarkit.trust.analysis import load_test_split
    x, y = load_test_split(tiny_run)
    return x[:64], y[:64]


def _logits(model, x_uint8):
    with torch.no_grad():
        return model.net.eval()(model.normalize(x_uint8)).float()


def test_safetensors_round_trip_gives_the_same_logits(tiny_run, tmp_path, real_images):
    out = export(tiny_run, "safetensors", tmp_path / "m.safetensors")
    a, b = load(tiny_run), cifarkit.load(out)
    assert b.meta["model"] == "fast" and b.classes == a.classes and b.mean == a.mean
    assert "cifarkit_version" in b.meta and b.meta["input_size"] == "32"
    assert b.temperature == a.temperature != 1.0                     # the calibration travels with the weights
    assert b.meta["calibration_fitted_on"] == a.meta["calibration_fitted_on"]
    assert torch.equal(_logits(a, real_images[0]), _logits(b, real_images[0]))


def test_onnx_matches_calibrated_pytorch_on_random_and_real_images_at_any_batch_size(tiny_run, tmp_path,
                                                                                     real_images):
    path = export(tiny_run, "onnx", tmp_path / "m.onnx")
    assert path.is_file() and not list(tmp_path.glob("*.data"))        # one file, no external data
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path))
    meta = sess.get_modelmeta().custom_metadata_map
    m = load(tiny_run)
    assert json.loads(meta["classes"]) == m.classes and json.loads(meta["mean"]) == m.mean
    assert m.temperature != 1.0 and float(meta["temperature"]) == m.temperature  # tiny_run was calibrated
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), real_images[0], real_images[0][:1]):
        ref = _logits(m, x).numpy() / m.temperature                  # the graph divides by T
        inp = (x.astype(np.float32) / 255).transpose(0, 3, 1, 2)     # [0, 1], normalized inside
        got = sess.run(None, {"image": np.ascontiguousarray(inp)})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
        assert np.abs(OnnxModel(path).probabilities(x).numpy() - m.probabilities(x).numpy()).max() < 1e-4


def test_hub_folder_has_a_model_card_with_the_real_numbers_and_loads_in_one_call(tiny_run, tmp_path, real_images):
    out = export(tiny_run, "hub", tmp_path / "hub")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    res = json.loads((tiny_run / "results.json").read_text())
    card = (out / "README.md").read_text()
    assert f"{res['test_acc']:.2%}" in card and "Data: CIFAR-10, JPEG-q75 copy" in card
    assert f"T = {res['temperature']:.3f}, fitted on the validation split" in card
    for name in ("README.md", "results.json", "config.json"):  # nothing of this machine's file system
        assert res["data"] not in (out / name).read_text() and "/tmp/" not in (out / name).read_text(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "fast" and len(cfg["classes"]) == 10
    model = cifarkit.load(out)
    assert not model.net.training and next(model.net.parameters()).device.type == "cpu"
    assert torch.equal(_logits(model, real_images[0]), _logits(load(tiny_run), real_images[0]))


def test_unknown_format_and_foreign_files_are_clear_errors(tiny_run, tmp_path):
    with pytest.raises(CifarkitError, match="safetensors, onnx, hub"):
        export(tiny_run, "pickle", tmp_path / "x")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CifarkitError, match="no cifarkit metadata"):
        cifarkit.load(other)
    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_bytes(b"nope")
    with pytest.raises(CifarkitError, match="cannot load ONNX"):
        OnnxModel(not_onnx)


def test_predict_over_a_folder_with_a_corrupt_file(tiny_run, tmp_path, real_images, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(real_images[0][:5]):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    onnx_path = export(tiny_run, "onnx", tmp_path / "m.onnx")
    rows = {}
    for model in (str(tiny_run), str(onnx_path)):
        out_csv = tmp_path / f"p{len(rows)}.csv"
        assert main(["predict", model, str(folder), "--top-k", "2", "--batch-size", "2", "--csv", str(out_csv)]) == 0
        err = capsys.readouterr().err
        assert "corrupt.jpg" in err
        with open(out_csv) as f:
            rows[model] = list(csv.DictReader(f))
        assert len(rows[model]) == 5 and set(rows[model][0]) == {"image", "class_1", "prob_1", "class_2", "prob_2",
                                                                 "ood_score", "unknown"}
    torch_rows, onnx_rows = rows.values()
    assert [r["class_1"] for r in torch_rows] == [r["class_1"] for r in onnx_rows]
    assert [r["unknown"] for r in torch_rows] == [r["unknown"] for r in onnx_rows]   # the same verdicts
    assert main(["predict", str(tiny_run), str(tmp_path / "nothing-here")]) == 2
