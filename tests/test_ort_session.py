"""A GPU plan whose execution provider does not come up is never silently a CPU session:
KIND_GPU fails its load naming ONNX Runtime's reason, KIND_AUTO warns and runs on the CPU,
and TensorRT falls back to the CUDA EP with the CUDA EP's own device. Runs on the host's real
ONNX Runtime: a CPU build lacks the GPU providers, and onnxruntime-gpu on a host without a
driver cannot start them; both are ways a GPU plan does not come up."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from server import gpus
from server.backends.ort_providers import CPU, CUDA, TENSORRT, plan_providers
from server.backends.ort_session import create_session
from server.model_config import ConfigError, ModelSpec, parse_config, to_spec

from .conftest import BUNDLED

MODEL = BUNDLED / "identity_fp32" / "1" / "model.onnx"
GPU_EPS = [TENSORRT, CUDA, CPU]
TRT = ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
       'parameters { key: "precision_mode" value: "FP16" } }, { name: "cuda" parameters { '
       'key: "gpu_mem_limit" value: "1000000" } } ] } }')

pytestmark = [
    pytest.mark.skipif(gpus.visible_gpus() > 0, reason="checks a host where no GPU EP comes up"),
    # a CPU build warns that it lacks the providers asked for, then leaves them out
    pytest.mark.filterwarnings("ignore:Specified provider"),
]


def spec_of(name: str, group: str, extra: str = TRT) -> ModelSpec:
    text = (BUNDLED / "identity_fp32" / "config.pbtxt").read_text().replace(
        'name: "identity_fp32"', f'name: "{name}"')
    return to_spec(parse_config(f"{text}\n{group}\n{extra}", name), "onnxruntime",
                   visible_gpus=lambda: 2)


def test_kind_gpu_fails_its_load_naming_the_device_and_why() -> None:
    spec = spec_of("gpu_trt", "instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]")
    plan = plan_providers(spec, GPU_EPS, 0, MODEL.parent, visible_gpus=2)
    assert plan.names == GPU_EPS
    with pytest.raises(ConfigError) as info:
        create_session(ort, MODEL, ort.SessionOptions(), plan, spec, 0)
    text = str(info.value)
    # after TensorRT, the CUDA EP was tried on the instance's own GPU
    assert text.startswith("model 'gpu_trt': instance_group kind KIND_GPU, but ONNX Runtime's "
                           "CUDAExecutionProvider did not come up on GPU 1: ")
    # a CPU build: the provider library is not there; onnxruntime-gpu without a driver: CUDA's
    assert "libonnxruntime_providers_cuda.so does not load" in text or "CUDA failure" in text


def test_kind_auto_warns_and_runs_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_of("auto_trt", "instance_group [ { kind: KIND_AUTO } ]")
    plan = plan_providers(spec, GPU_EPS, 0, MODEL.parent, visible_gpus=2)
    with caplog.at_level(logging.WARNING, logger="server.backends.ort_session"):
        session, used = create_session(ort, MODEL, ort.SessionOptions(), plan, spec, 0)
    assert used.names == [CPU] and session.get_providers() == [CPU]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("model 'auto_trt' instance 0: the TensorRT EP did not come up (")
    assert warnings[0].endswith("), running on the CUDA EP")
    assert warnings[1].startswith("model 'auto_trt' instance 0: the CUDA EP did not come up (")
    assert warnings[1].endswith("), running on the CPU")
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(session.run(["OUTPUT0"], {"INPUT0": x})[0], x)


def test_a_cpu_plan_is_opened_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_of("cpu", "instance_group [ { kind: KIND_CPU } ]", extra="")
    plan = plan_providers(spec, GPU_EPS, 0, MODEL.parent, visible_gpus=2)
    with caplog.at_level(logging.WARNING, logger="server.backends.ort_session"):
        session, used = create_session(ort, MODEL, ort.SessionOptions(), plan, spec, 0)
    assert used is plan and session.get_providers() == [CPU] and not caplog.records
