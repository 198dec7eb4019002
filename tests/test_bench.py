"""bench.py runs end to end (tiny settings), writes the JSON schema, and survives a broken variant.
Speed itself is never asserted here: the figures live in BENCHMARKS.md."""
import json

import numpy as np
import pytest
import torch

import bench
import models
import timing

FIELDS = {"task", "model", "device", "backend", "batch_size", "threads", "metric", "value", "unit"}
# bn_fc: the cheapest model to train and run (the bench code is the same for every model)
TINY = ["--model", "bn_fc", "--device", "cpu", "--steps", "2", "--repeats", "1", "--calls", "3"]


def test_bench_writes_every_record_it_promises(tmp_path, mnist_dir, capsys):
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--data-dir", mnist_dir, "--variant", "eager", "amp", "--backend", "eager", "onnxruntime",
                       "pt2", "--json", str(out)])
    got = json.loads(out.read_text())
    env = got["environment"]
    for key in ("cpu", "cores", "threads", "gpu", "python", "torch", "torchvision", "onnxruntime", "git_commit", "date"):
        assert key in env
    recs = got["records"]
    assert all(FIELDS <= set(r) for r in recs)
    train_r = [(r["backend"], r["variant"]) for r in recs if r["task"] == "train"]
    assert train_r == [("sources-pipeline", "eager"), ("fast-pipeline", "eager"), ("fast-pipeline", "amp")]
    assert sum(r.get("best", False) for r in recs) == 1
    infer = {(r["backend"], r["threads"], r["batch_size"], r["metric"]) for r in recs if r["task"] == "infer"}
    threads = sorted({1, torch.get_num_threads()})
    backends = ("eager", "onnxruntime", "pt2")
    assert infer == {(b, t, bs, m) for b in backends for t in threads
                     for bs, m in ((1, "p50_ms"), (1, "p99_ms"), (1024, "images_per_s"))} | \
        {(b, None, None, m) for b in backends for m in ("load_ms", "file_bytes")}  # of the file each runs from
    assert all(r["value"] > 0 for r in recs)
    p = {r["metric"]: r["value"] for r in recs if r["backend"] == "eager" and r["threads"] == 1}
    assert p["p50_ms"] <= p["p99_ms"]
    table = capsys.readouterr().out
    assert "| bn_fc | cpu |" in table and "onnxruntime" in table and env["skipped"] == []
    assert "| load ms | file |" in table and " kB |" in table


def test_a_failing_variant_is_reported_not_fatal(tmp_path, mnist_dir, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here\nsecond line")
    monkeypatch.setattr(models, "compile_model", broken)
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--data-dir", mnist_dir, "--task", "train", "--variant", "compile", "--json", str(out)])
    got = json.loads(out.read_text())
    assert [r["backend"] for r in got["records"]] == ["sources-pipeline"]
    assert got["environment"]["skipped"] == ["train bn_fc cpu fast-pipeline/compile: RuntimeError: no compiler here"]
    printed = capsys.readouterr().out
    assert "| bn_fc | cpu |" in printed and "not measured:" in printed


@pytest.mark.parametrize("args, message", [
    (["--device", "mps"], "device 'mps' is not present"),
    (["--model", "resnet50"], "unknown model"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--json", "/nonexistent/dir/b.json"], "cannot write --json"),
])
def test_bad_input_is_one_line(args, message, mnist_dir):
    with pytest.raises(SystemExit) as e:
        bench.main(["--data-dir", mnist_dir] + args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cuda_graphs_that_inductor_skipped_are_flagged(tmp_path, mnist_dir, monkeypatch):
    """A 'cudagraphs' figure that ran without graphs says so (simulated on CPU: no GPU in CI)."""
    from torch._dynamo.utils import counters

    class CompiledWithoutGraphs(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            counters["inductor"]["cudagraph_skips"] += 1   # what inductor does on a call it will not graph
            return self.model(x)

    def compile_without_graphs(model, cudagraphs=True):
        return CompiledWithoutGraphs(model)
    monkeypatch.setattr(models, "compile_model", compile_without_graphs)
    monkeypatch.setitem(timing.VARIANTS, "cudagraphs", ({"compile", "cudagraphs"}, ("cpu",)))
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--data-dir", mnist_dir, "--task", "train", "--variant", "cudagraphs", "--json", str(out)])
    got = json.loads(out.read_text())
    fast = [r for r in got["records"] if r["backend"] == "fast-pipeline"]
    assert len(fast) == 1 and "torch.compile alone" in fast[0]["note"]
    assert got["environment"]["skipped"][0].startswith("train bn_fc cpu fast-pipeline/cudagraphs: inductor skipped")


def test_a_failing_export_costs_only_its_backend(tmp_path, mnist_dir, monkeypatch):
    import artifacts

    def broken(*a, **k):
        raise ValueError("exporter broke")
    monkeypatch.setattr(artifacts, "write_onnx", broken)
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--data-dir", mnist_dir, "--task", "infer", "--backend", "eager", "onnxruntime",
                       "--json", str(out)])
    got = json.loads(out.read_text())
    assert {r["backend"] for r in got["records"]} == {"eager"}
    assert got["environment"]["skipped"] == ["infer bn_fc cpu onnxruntime: ValueError: exporter broke"]


def test_onnxruntime_on_cuda_keeps_data_on_the_gpu():
    """On CUDA, ORT is timed with IO binding on device pointers (the work the torch backends do),
    not numpy in and out; checked with a stand-in session, since CI has no GPU."""
    calls = []

    class Binding:
        def bind_input(self, *a):
            calls.append(("in", a))

        def bind_output(self, *a):
            calls.append(("out", a))

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, b):
            calls.append(("run",))

    x1, xb = torch.rand(1, 1, 28, 28), torch.rand(4, 1, 28, 28)
    run1, runb = timing.ort_runners(Session(), "CUDAExecutionProvider", x1, xb)
    run1()
    assert calls[0] == ("in", ("image", "cuda", 0, np.float32, [1, 1, 28, 28], x1.data_ptr()))
    assert calls[1][0] == "out" and calls[1][1][:2] == ("log_probs", "cuda") and calls[-1] == ("run",)


@pytest.mark.slow
def test_aoti_backend_times_a_package_and_reports_its_file(tmp_path, mnist_dir, aoti_package, monkeypatch):
    """The aoti backend runs what aoti_load_package gives back and reports the package's size; the
    session's bn_fc package stands in for a second minute-long compile (bench never compares outputs)."""
    import shutil
    from pathlib import Path

    import artifacts
    package = Path(aoti_package[0])
    monkeypatch.setattr(artifacts, "write_aoti", lambda module, path, meta, device="cpu": shutil.copy(package, path))
    out = tmp_path / "bench.json"
    bench.main(TINY[:1] + ["bn_fc"] + TINY[2:] + ["--data-dir", mnist_dir, "--task", "infer", "--backend", "aoti",
                                                  "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["environment"]["skipped"] == []
    metrics = {(r["threads"], r["metric"]): r["value"] for r in got["records"] if r["backend"] == "aoti"}
    assert metrics[(None, "file_bytes")] == package.stat().st_size and metrics[(None, "load_ms")] > 0
    assert metrics[(1, "p50_ms")] > 0 and metrics[(1, "images_per_s")] > 0


def test_a_run_stopped_part_way_keeps_what_it_measured(tmp_path, mnist_dir, monkeypatch, capsys):
    """The H100 run's bench was cut short twice (time box, a C++ abort in inductor): the JSON holds
    every model finished before, marked partial; the table has no empty training section."""
    def fake_infer(name, device, threads, opts):
        if name == "gap10k":
            raise KeyboardInterrupt
        for m in ("p50_ms", "p99_ms"):
            yield "record", dict(task="infer", model=name, device="cpu", backend="eager", threads=1, batch_size=1,
                                 metric=m, value=1.0, unit="ms")
        yield "skipped", f"infer {name}: skipped one"
    monkeypatch.setattr(bench, "bench_infer", fake_infer)
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--task", "infer", "--device", "cpu", "--model", "bn_fc", "gap10k", "--data-dir", mnist_dir,
                    "--json", str(out)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted: {out} holds what was measured before"
    got = json.loads(out.read_text())
    assert got["environment"]["partial"] is True and got["environment"]["skipped"] == ["infer bn_fc: skipped one"]
    assert [r["model"] for r in got["records"]] == ["bn_fc", "bn_fc"]
    assert bench.markdown([]) == "" and "Training" not in bench.markdown(got["records"] + [
        dict(task="infer", model="bn_fc", device="cpu", backend="eager", threads=1, batch_size=1024,
             metric="images_per_s", value=5.0, unit="images/s")])
