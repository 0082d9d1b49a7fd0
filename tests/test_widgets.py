import numpy as np
import pytest
from PIL import Image

from sskd import widgets
from sskd.config import Config
from sskd.data.records import Dataset, ImageRecord, Instance


def box(y0, y1, x0, x1, size=24):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def browse_data(tmp_path):
    pseudo, gt = [], []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((24, 24, 3), 60 + 50 * i, np.uint8)).save(p)
        pseudo.append(ImageRecord(str(p), 24, 24, 10 + i, [
            Instance.from_mask(box(0, 8, 0, 8), 0, 0.9),
            Instance.from_mask(box(10, 20, 10, 20), 1, 0.5),
            Instance.from_mask(box(0, 6, 14, 22), 0, 0.35)][: 3 - i]))
        gt.append(ImageRecord(str(p), 24, 24, 10 + i, [Instance.from_mask(box(0, 8, 0, 8), 0)]))
    return pseudo, Dataset(gt, ["circle", "square"], "unlabeled")


def test_browser_threshold_and_image_sliders_redraw(browse_data):
    pseudo, gt = browse_data
    w = widgets.pseudo_label_browser(pseudo, gt=gt, threshold=0.3)
    assert w.shown == 3 and len(w.figure.axes) == 2  # teacher | ground truth
    assert w.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    first_png = w.image.value
    assert "3 of 3 pseudo-labels shown, 1 ground-truth instances" in w.info.value

    w.threshold_slider.value = 0.6
    assert w.shown == 1
    assert w.image.value != first_png
    assert "1 of 3 pseudo-labels shown" in w.info.value
    assert w.figure.axes[0].get_title() == "teacher (score >= 0.60)"

    w.image_slider.value = 1
    assert "image #11" in w.info.value and "1 of 2 pseudo-labels shown" in w.info.value
    assert w.image_slider.max == 1


def test_browser_without_ground_truth_and_custom_loader(browse_data):
    pseudo, _ = browse_data
    calls = []

    def loader(rec):
        calls.append(rec.image_id)
        return np.zeros((24, 24, 3), np.uint8)

    w = widgets.pseudo_label_browser(pseudo, classes=["circle", "square"], loader=loader)
    assert len(w.figure.axes) == 1 and calls == [10]
    assert "ground-truth" not in w.info.value
    with pytest.raises(ValueError, match="no records"):
        widgets.pseudo_label_browser([])


def test_loss_weight_picker_overrides_follow_the_controls():
    cfg = Config()
    p = widgets.loss_weight_picker(cfg, "demo")
    assert p.overrides == {}
    assert "no changes" in p.summary.value
    assert p.sliders["transfer.l_pxl"].value == pytest.approx(cfg.stages.transfer.l_pxl)

    p.sliders["transfer.l_pxl"].value = 0.2
    assert p.overrides == {"stages.transfer.l_pxl": 0.2}
    assert "0.20·L_pxl" in p.summary.value
    assert "sskd run --name demo -p stages.transfer.l_pxl 0.2</code> (re-executes " \
        "03_knowledge_transfer" in p.summary.value

    p.enabled["adapt_1b"].value = False
    assert p.overrides == {"stages.adapt_1b.enabled": False, "stages.transfer.l_pxl": 0.2}
    assert "teacher, adapted (stage 1) (<code>stages.adapt_1b</code>): off" in p.summary.value
    assert "re-executes 02_teacher_adaptation" in p.summary.value

    p.sliders["transfer.l_pxl"].value = cfg.stages.transfer.l_pxl  # back to the config value
    assert p.overrides == {"stages.adapt_1b.enabled": False}


def test_loss_weight_picker_extends_slider_range_for_large_weights():
    cfg = Config()
    cfg.stages.transfer.l_semi = 3.0
    p = widgets.loss_weight_picker(cfg)
    assert p.sliders["transfer.l_semi"].value == 3.0 and p.overrides == {}
    assert "refine.l_pxl" in p.sliders and "teacher_supervised" in p.enabled


def test_live_progress_is_a_tqdm_bar():
    bar = widgets.live_progress(5, "train", disable=False)
    bar.update(2)
    assert (bar.n, bar.total, bar.desc) == (2, 5, "train")
    bar.close()
