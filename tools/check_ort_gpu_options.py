#!/usr/bin/env python
"""Feed every option Tachyon's config mapping produces to a real onnxruntime-gpu, on a host
without a GPU. Run it through ``scripts/check-ort-gpu-options`` (which installs the wheels and
the stand-in driver and TensorRT libraries it needs).

ONNX Runtime parses an execution provider's options before it touches the device: a session
that then fails at ``cudaSetDevice`` (or comes up, on a GPU host) accepted them, and any other
error is a mapping bug. Each config key is tried alone, with sample values of its type, through
``plan_providers`` (so what is fed is exactly what the server would pass). Exit status: 0 all
accepted, 1 some refused (listed), 2 the check cannot tell (an EP's library did not load, or a
made-up key was not refused).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from server.backends import ort_providers as op
from server.model_config import ModelSpec, parse_config, to_spec

BASE = ("max_batch_size: 8 input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [16] }] "
        "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [16] }] "
        "instance_group [{ kind: KIND_GPU }] ")
# sample values per check; keys whose values have a format of their own get theirs
SAMPLES = {id(op.BOOL): ["1", "0", "true", "FALSE"], id(op.INT): ["-1", "2"],
           id(op.COUNT): ["0", "5"], id(op.STR): ["x"], id(op.ANY_STR): ["", "x"]}
SPECIAL = {
    "precision_mode": ["FP32", "FP16", "BF16", "INT8"],
    "max_workspace_size_bytes": ["1073741824"],
    "trt_tactic_sources": ["-CUDNN,+CUBLAS"],
    "trt_profile_min_shapes": ["INPUT0:1x16"],
    "trt_profile_opt_shapes": ["INPUT0:4x16"],
    "trt_profile_max_shapes": ["INPUT0:8x16"],
    "trt_op_types_to_exclude": ["", "NonZero,NonMaxSuppression"],
    "trt_preview_features": ["ALIASED_PLUGIN_IO_10_03"],
    "arena_extend_strategy": ["0", "1", "kNextPowerOfTwo", "kSameAsRequested"],
    "cudnn_conv_algo_search": ["0", "1", "2", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"],
}
# what ONNX Runtime says once it has parsed the options and reaches the device
DEVICE_ERRORS = ("CUDA failure", "cudaSetDevice", "cudaGetDeviceCount")


def model(folder: Path) -> Path:
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, 16])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["INPUT0"], ["OUTPUT0"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.save(proto, folder / "model.onnx")
    return folder / "model.onnx"


def spec(accelerator: str, key: str, value: str) -> ModelSpec:
    text = (BASE + "optimization { execution_accelerators { gpu_execution_accelerator [{ "
            f"name: '{accelerator}' parameters {{ key: '{key}' value: '{value}' }} }}] }} }}")
    return to_spec(parse_config(text, "m"), "onnxruntime", visible_gpus=lambda: 1)


def verdict(path: Path, provider: str, options: dict[str, str]) -> str:
    """'accepted', 'not loaded' (the EP's library did not load), or ONNX Runtime's refusal."""
    try:
        session = ort.InferenceSession(str(path), providers=[provider],
                                       provider_options=[options], enable_fallback=0)
    except Exception as exc:  # ONNX Runtime's Fail / EPFail / RuntimeError
        text = " ".join(str(exc).split())
        if any(marker in text for marker in DEVICE_ERRORS):
            return "accepted"
        for start in ("FAIL : ", "[ERROR]", "Invalid TensorRT"):
            text = text[text.rfind(start):] if start in text else text
        return text[:300]
    return "accepted" if provider in session.get_providers() else "not loaded"


def check(path: Path, accelerator: str, provider: str, keys: list[str]) -> list[str]:
    refused = []
    for key in keys:
        check = op.CUDA_OPTIONS.get(key) or op.TRT_OPTIONS.get(key) \
            or op.TRT_RENAMED.get(key, ("", op.STR))[1]
        for value in SPECIAL.get(key) or SAMPLES[id(check)]:
            plan = op.plan_providers(spec(accelerator, key, value), [op.TENSORRT, op.CUDA, op.CPU],
                                     0, path.parent / "1")
            options = dict(plan.providers)[provider]
            if provider == op.CUDA:
                # the CUDA EP's device_id parser calls CUDA: parsed first, its failure would hide
                # the other option's parse (checked alone in main)
                options.pop("device_id")
            result = verdict(path, provider, options)
            print(f"{provider[:-17]:9} {key}={value!r:24} -> {options}: {result}")
            if result == "not loaded":
                sys.exit(f"{provider}'s library did not load: the check cannot tell (see above)")
            if result != "accepted":
                refused.append(f"{key}={value!r} -> {options}: {result}")
    return refused


def main() -> int:
    print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
    with tempfile.TemporaryDirectory() as folder:
        path = model(Path(folder))
        for provider in (op.CUDA, op.TENSORRT):
            made_up = verdict(path, provider, {"tachyon_made_up_key": "1"})
            if made_up in ("accepted", "not loaded"):
                print(f"{provider}: a made-up key was {made_up}: the check cannot tell")
                return 2
        refused = [f"device_id: {result}" for result in
                   [verdict(path, op.CUDA, {"device_id": "0"})] if result != "accepted"]
        refused += check(path, "cuda", op.CUDA, list(op.CUDA_OPTIONS))
        trt_keys = ["precision_mode", *op.TRT_RENAMED, *op.TRT_OPTIONS]
        refused += check(path, "tensorrt", op.TENSORRT, trt_keys)
    print(f"\n{len(refused)} refused by ONNX Runtime {ort.__version__}")
    for line in refused:
        print("  " + line)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
