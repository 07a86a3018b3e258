import pytest
import math

import lightning as L
from matplotlib.figure import Figure

from cifarkit.data import CIFARDataModule
from cifarkit.lr_finder import find_lr, save_lr_find
from cifarkit.models import build_model
from cifarkit.module import LitClassifier
from cifarkit.presets import TrainConfig


@pytest.mark.slow
def test_range_test_returns_a_finite_suggestion_a_curve_and_a_figure(image_folder, tmp_path):
    L.seed_everything(0)
    dm = CIFARDataModule(str(image_folder), batch_size=8, val_size=0).prepare()
    net = build_model("custom_resnet", len(dm.classes))
    module = LitClassifier(net, len(dm.classes), TrainConfig(lr=1e-3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lr, curve, fig = find_lr(module, dm, dict(accelerator="cpu", enable_progress_bar=False,
                                             default_root_dir=str(tmp_path)),
                             min_lr=1e-5, max_lr=1.0, num_training=20)
    assert math.isfinite(lr) and 1e-5 <= lr <= 1.0
    assert isinstance(fig, Figure) and len(curve["lr"]) == len(curve["loss"]) > 5
    assert all(b <= a * 1.0001 for a, b in zip(curve["lr"][1:], curve["lr"][:-1]))  # increasing
    for k, v in net.state_dict().items():            # the sweep leaves the weights as they were
        assert (v == before[k]).all(), k
    save_lr_find(tmp_path, curve, fig)
    assert (tmp_path / "lr_find.png").stat().st_size > 1000
