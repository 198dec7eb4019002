"""Inference micro-benchmarks (not in the default run):

    pytest tests/benchmarks --benchmark-autosave            # save under .benchmarks/
    pytest tests/benchmarks --benchmark-compare             # compare with the last saved run
"""
import numpy as np
import pytest
import torch

import artifacts
import models
import runfiles

NAMES = list(models.RECIPES)


@pytest.fixture(scope="module", params=NAMES)
def exported(request, tmp_path_factory):
    """Per model: the module, and its ONNX, torch.export and AOTInductor files (the AOTInductor compile
    takes about a minute per model on 2 cores)."""
    name = request.param
    model = models.build_model(name).eval()
    module = artifacts.Exportable(model).eval()
    meta = artifacts.metadata(runfiles.make_checkpoint(name, model.state_dict(), 0, 0.0, models.n_params(model)))
    folder = tmp_path_factory.mktemp("bench")
    paths = {fmt: str(folder / (name + artifacts.FORMATS[fmt])) for fmt in ("onnx", "pt2", "aoti")}
    artifacts.write_onnx(module, paths["onnx"], meta, 18)
    artifacts.write_pt2(module, paths["pt2"], meta)
    artifacts.write_aoti(module, paths["aoti"], meta)
    return name, module, paths


@pytest.mark.parametrize("batch", [1, 1024])
@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("backend", ["eager", "torchscript", "compile", "onnxruntime", "pt2", "aoti"])
def test_infer(benchmark, exported, backend, batch, threads):
    name, module, paths = exported
    threads = threads or torch.get_num_threads()
    benchmark.group = f"{name} batch {batch} threads {threads}"
    x = torch.rand(batch, 1, 28, 28)
    if backend == "onnxruntime":
        sess = artifacts.ort_session(paths["onnx"], threads)
        a = x.numpy()
        out = benchmark(lambda: sess.run(None, {"image": a})[0])
    else:
        from torch._inductor import aoti_load_package
        make = {"eager": lambda: module, "torchscript": lambda: torch.jit.freeze(torch.jit.script(module)),
                "compile": lambda: models.compile_model(module),
                "pt2": lambda: torch.export.load(paths["pt2"]).module(),
                "aoti": lambda: aoti_load_package(paths["aoti"])}  # dynamic_threads: obeys set_num_threads
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
