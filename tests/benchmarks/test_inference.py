"""Inference micro-benchmarks (not in the default run):

    pytest tests/benchmarks --benchmark-autosave            # save under .benchmarks/
    pytest tests/benchmarks --benchmark-compare             # compare with the last saved run
"""
import numpy as np
import pytest
import torch

import artifacts
import export
import models
import train

NAMES = list(models.RECIPES)


@pytest.fixture(scope="module", params=NAMES)
def exported(request, tmp_path_factory):
    name = request.param
    model = models.build_model(name).eval()
    module = artifacts.Exportable(model).eval()
    path = str(tmp_path_factory.mktemp("bench") / f"{name}.onnx")
    artifacts.write_onnx(module, path, artifacts.metadata(dict(model_name=name, test_acc=0.0, epoch=0)), 18)
    return name, module, path


@pytest.mark.parametrize("batch", [1, 1024])
@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("backend", ["eager", "torchscript", "compile", "onnxruntime"])
def test_infer(benchmark, exported, backend, batch, threads):
    name, module, path = exported
    threads = threads or torch.get_num_threads()
    benchmark.group = f"{name} batch {batch} threads {threads}"
    x = torch.rand(batch, 1, 28, 28)
    if backend == "onnxruntime":
        sess = artifacts.ort_session(path, threads)
        a = x.numpy()
        out = benchmark(lambda: sess.run(None, {"image": a})[0])
    else:
        make = {"eager": lambda: module, "torchscript": lambda: torch.jit.freeze(torch.jit.script(module)),
                "compile": lambda: models.compile_model(module)}
        fn = make[backend]()
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = benchmark(lambda: fn(x)).numpy()
        finally:
            torch.set_num_threads(old)
    with torch.inference_mode():
        want = module(x).numpy()
    assert out.shape == (batch, 10) and np.allclose(out, want, atol=1e-4)  # timed the right thing
