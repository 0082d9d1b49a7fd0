"""metrics.json: concurrent writers (a stage and its side process) lose no update."""

import multiprocessing as mp

from sskd.metrics import read_metrics, update_metrics


def _writer(path: str, prefix: str, n: int) -> None:
    for i in range(n):
        update_metrics(path, "models", f"{prefix}{i}", {"AP": float(i)})


def test_two_processes_updating_the_same_file_keep_every_entry(tmp_path):
    path = tmp_path / "metrics.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), p, 40)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    models = read_metrics(path)["models"]
    assert len(models) == 80
    assert models["a39"] == {"AP": 39.0} and models["b0"] == {"AP": 0.0}


def test_remove_metrics_drops_only_the_listed_entries(tmp_path):
    from sskd.metrics import remove_metrics
    path = tmp_path / "metrics.json"
    assert remove_metrics(path, {"models": ["x"]})["models"] == {}  # no file: nothing to do
    update_metrics(path, "models", "a", {"AP": 1.0})
    update_metrics(path, "models", "b", {"AP": 2.0})
    update_metrics(path, "pseudo_labels", "a", {"AP": 3.0})
    update_metrics(path, "stages", "refine", {"seconds": 1.0})
    remove_metrics(path, {"models": ["a", "missing"], "pseudo_labels": ["a"], "nope": ["a"]})
    data = read_metrics(path)
    assert data["models"] == {"b": {"AP": 2.0}} and data["pseudo_labels"] == {}
    assert data["stages"] == {"refine": {"seconds": 1.0}}
