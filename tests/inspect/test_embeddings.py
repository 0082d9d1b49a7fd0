"""sskd.inspect.embeddings: mask pooling (values), stored embeddings, brain visualizations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sskd.inspect import embeddings as emb


def test_pool_instance_embeddings_weights_by_covered_area():
    # 2-d embedding on a 2 x 2 grid: left column e0, right column e1.
    embed = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],
                          [[0.0, 1.0], [0.0, 1.0]]])                     # D x h x w = 2 x 2 x 2
    masks = torch.zeros(3, 8, 8)
    masks[0, :, :4] = 1          # exactly the left half -> e0
    masks[1, :4, 2:6] = 1        # straddles the columns evenly -> (e0 + e1) / sqrt 2
    masks[2, 0, 7] = 1           # one pixel in the right column -> e1
    out = emb.pool_instance_embeddings(embed, masks)
    assert out.shape == (3, 2)
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    assert torch.allclose(out[2], torch.tensor([0.0, 1.0]))
    assert emb.pool_instance_embeddings(embed, torch.zeros(0, 8, 8)).shape == (0, 2)
    img = emb.pool_image_embedding(embed)
    assert torch.allclose(img, torch.tensor([1.0, 1.0]) / 2 ** 0.5)


def test_model_without_weak_head_is_a_clear_error():
    class NoHead(torch.nn.Module):
        def forward(self, images, embeddings="none"):
            return type("Out", (), {"embed_weak": None})()

    with pytest.raises(ValueError, match="no weak projection head"):
        emb.weak_embeddings(NoHead(), torch.zeros(1, 3, 8, 8))


def test_method_choice_and_small_set_parameters(monkeypatch):
    import importlib.util

    has_umap = importlib.util.find_spec("umap") is not None
    assert emb.visualization_method("auto") == ("umap" if has_umap else "pca")
    assert emb.visualization_method("tsne") == "tsne"
    with pytest.raises(ValueError, match="auto\\|pca\\|umap\\|tsne"):
        emb.visualization_method("lle")
    if not has_umap:
        with pytest.raises(ValueError, match="pip install umap-learn"):
            emb.visualization_method("umap")
    kw = emb.method_kwargs("tsne", n_points=7, dim=128)
    assert kw["pca_dims"] == 7 and kw["perplexity"] == pytest.approx(2.0)
    assert emb.method_kwargs("tsne", 1000, 16)["pca_dims"] == 16
    assert emb.method_kwargs("tsne", 1000, 128)["perplexity"] == 30.0
    assert emb.method_kwargs("umap", 5, 8)["num_neighbors"] == 4
    assert emb.method_kwargs("pca", 5, 8) == {}


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_stored_instance_embeddings_cluster_by_class(exported, kit, key):
    """The colour embedder: pooled over the right pixels, circles (red) and squares (green)
    form two tight, well separated clusters; misplaced masks would pull in grey background."""
    attr = f"emb_{key}"
    labels, vecs = exported.values(["ground_truth.detections.label",
                                    f"ground_truth.detections.{attr}"], unwind=True)
    assert len(vecs) == 15 and all(len(v) == 4 for v in vecs)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vecs)
    circles = [v for lab, v in zip(labels, vecs) if lab == "circle"]
    squares = [v for lab, v in zip(labels, vecs) if lab == "square"]
    red = np.array(kit.COLOURS["circle"] + (0.05 * 255,), float)
    green = np.array(kit.COLOURS["square"] + (0.05 * 255,), float)
    assert min(_cos(v, red) for v in circles) > 0.9
    assert min(_cos(v, green) for v in squares) > 0.9
    assert max(_cos(c, s) for c in circles for s in squares) < 0.6
    # every image and every instance of every field got one
    assert exported.count(attr) == 10
    for f in ("pl_teacher_zero_shot", "pred_student_refined"):
        assert exported.count(f"{f}.detections.{attr}") == exported.count(f"{f}.detections")


def test_visualizations_are_stored_for_images_and_instances(exported):
    runs = set(exported.list_brain_runs())
    for key in ("teacher", "student"):
        assert {f"viz_{key}_images", f"viz_{key}_ground_truth",
                f"viz_{key}_pl_teacher_zero_shot"} <= runs
        res = exported.load_brain_results(f"viz_{key}_images")
        assert res.points.shape == (10, 2) and np.isfinite(res.points).all()
        res = exported.load_brain_results(f"viz_{key}_ground_truth")
        assert res.points.shape == (15, 2)
        assert exported.get_brain_info(f"viz_{key}_ground_truth").config.method == "pca"
    # PCA of two colour clusters: the first axis separates circles from squares
    res = exported.load_brain_results("viz_teacher_ground_truth")
    ids = exported.values("ground_truth.detections.id", unwind=True)
    labels = dict(zip(ids, exported.values("ground_truth.detections.label", unwind=True)))
    xs = {lab: [p[0] for i, p in zip(res.current_label_ids, res.current_points) if labels[i] == lab]
          for lab in ("circle", "square")}
    assert max(xs["circle"]) < min(xs["square"]) or max(xs["square"]) < min(xs["circle"])


def test_tsne_on_a_small_set(exported):
    done = emb.compute_visualizations(exported, "student", label_fields=["pl_teacher_adapted"],
                                      method="tsne")
    assert done == {"viz_student_images": 10, "viz_student_pl_teacher_adapted": 6}
    res = exported.load_brain_results("viz_student_pl_teacher_adapted")
    assert res.points.shape == (6, 2) and np.isfinite(res.points).all()
    assert exported.get_brain_info("viz_student_pl_teacher_adapted").config.method == "tsne"


def test_real_mask2former_embeddings(exported, mongod):
    """The kit's own student, if registered: pooled vectors have its embedding size, unit norm."""
    import sskd.models  # noqa: F401  (registers the built-in models)
    from sskd.models.base import build_model, list_models

    if "mask2former" not in list_models():
        pytest.skip("sskd.models has no 'mask2former' registered yet")
    torch.manual_seed(0)
    model = build_model("mask2former", 2, size="tiny")
    view = exported.match_tags("val")
    counts = emb.compute_embeddings(view, model, "m2f", label_fields=["ground_truth"],
                                    input_size=64)
    assert counts == {"images": 4, "ground_truth": 7}
    vecs = view.values("ground_truth.detections.emb_m2f", unwind=True)
    dim = model(torch.zeros(1, 3, 64, 64), embeddings="weak").embed_weak.shape[1]
    assert len(vecs) == 7 and all(len(v) == dim for v in vecs)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vecs)
    assert exported.match_tags("val", bool=False).count("emb_m2f") == 0
