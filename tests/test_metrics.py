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
