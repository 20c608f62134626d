"""`tachyon trt build`: a TensorRT plan from an ONNX model, for the `tensorrt_plan` platform.

    tachyon trt build --onnx model.onnx --repository model_repository --model mlp_trt \\
        --max-batch 512 --opt-batch 64 [--no-fp16] [--workspace-bytes N]

parses the ONNX graph with TensorRT's ONNX parser, builds an engine with FP16 and one
optimization profile over batch sizes min..max (tuned at opt), and writes it as the
next version `<repository>/<model>/<n>/model.plan`, with a config.pbtxt (platform, the
max_batch_size, dynamic batching on) when the model has none; the server completes inputs
and outputs from the engine. A plan runs only on the GPU model and TensorRT version that built
it: build on the serving host (or the same GPU and image).

FP16: TensorRT 10 takes `BuilderFlag.FP16` and picks FP16 kernels where they are faster;
TensorRT 11 removed the flag (every network is strongly typed: a layer runs in its tensors'
types), so there the graph is converted to float16 first, with float32 inputs and outputs kept
(ONNX Runtime's converter, as `tachyon optimize --to float16`): the served config is the same.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.backends import _cudart
from server.backends.tensorrt_api import RECORDER, create, import_tensorrt, logger, use_device
from server.model_config import ConfigError

COMMAND = "tachyon trt build"
Shape = tuple[int, ...]


class BuildError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class BatchRange:
    low: int
    opt: int
    high: int

    def check(self) -> None:
        if not 1 <= self.low <= self.opt <= self.high:
            raise BuildError(
                f"batch sizes --min-batch {self.low} --opt-batch {self.opt} --max-batch "
                f"{self.high} are invalid, expected 1 <= min <= opt <= max"
            )


def onnx_inputs(path: Path) -> list[tuple[str, Shape]]:
    """The graph inputs that are not initializers, with -1 for dynamic dimensions."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except DecodeError as exc:
        raise BuildError(f"{path} is not an ONNX model ({exc}), expected a .onnx file") from None
    initializers = {t.name for t in graph.initializer}
    found = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        found.append((value.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                        for d in dims)))
    return found


def profile_shapes(
    inputs: list[tuple[str, Shape]], batch: BatchRange
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes of each input: the batch range on the first dimension, which
    must be dynamic; every other dimension must be fixed."""
    batch.check()
    shapes = {}
    for name, dims in inputs:
        if not dims or dims[0] != -1:
            raise BuildError(
                f"input '{name}' has shape {list(dims)}, expected a dynamic first (batch) "
                "dimension"
            )
        if any(d < 1 for d in dims[1:]):
            raise BuildError(
                f"input '{name}' has shape {list(dims)}, expected fixed sizes after the batch "
                "dimension"
            )
        rest = dims[1:]
        shapes[name] = ((batch.low, *rest), (batch.opt, *rest), (batch.high, *rest))
    return shapes


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def config_text(model: str, max_batch_size: int) -> str:
    return (
        f'name: "{model}"\nplatform: "tensorrt_plan"\nmax_batch_size: {max_batch_size}\n'
        "dynamic_batching { }\n"
    )


def fp16_by_flag(trt: Any) -> bool:
    """Whether this TensorRT allows FP16 kernels by a builder flag (10.x; removed in 11)."""
    return hasattr(trt.BuilderFlag, "FP16")


def float16_graph(onnx_path: Path) -> bytes:
    """The model with float16 weights and arithmetic, float32 inputs and outputs kept (Cast
    nodes at the edges), serialized: what a strongly typed TensorRT builds FP16 kernels from."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    return bytes(model.SerializeToString())


def _float16(onnx_path: Path) -> bytes:
    try:
        return float16_graph(onnx_path)
    except ValueError as exc:  # e.g. over protobuf's 2 GB once the weights are inline
        raise BuildError(
            f"cannot convert {onnx_path} to float16 for TensorRT ({exc}), expected a model "
            "under 2 GB (or --no-fp16 for float32)"
        ) from None


def build_plan(
    onnx_path: Path, batch: BatchRange, fp16: bool = True, workspace_bytes: int = 0
) -> bytes:
    """The serialized engine (needs the tensorrt package and a GPU). ConfigError when
    TensorRT or CUDA cannot start, BuildError when the model cannot be built."""
    shapes = profile_shapes(onnx_inputs(onnx_path), batch)
    trt = import_tensorrt(COMMAND)
    if _cudart.available():  # else TensorRT's own runtime says what is wrong
        use_device(COMMAND, 0)
    builder = create(trt, "Builder", COMMAND)
    network = builder.create_network(0)  # 10.x: explicit batch is the only mode; 11.x: typed
    parser = _parse(trt, network, onnx_path, fp16 and not fp16_by_flag(trt))
    config = _config(trt, builder, shapes, fp16, workspace_bytes)
    serialized: Any = builder.build_serialized_network(network, config)
    del parser  # held through the build: the network's weights live in the parser
    if serialized is None:
        said = RECORDER.reason("TensorRT gave no reason")
        raise BuildError(f"TensorRT could not build an engine from {onnx_path}: {said}")
    return bytes(serialized)


def _parse(trt: Any, network: Any, onnx_path: Path, to_float16: bool) -> Any:
    parser = trt.OnnxParser(network, logger(trt))
    graph = _float16(onnx_path) if to_float16 else onnx_path.read_bytes()
    if not parser.parse(graph, str(onnx_path)):  # the path finds external weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    return parser


def _config(
    trt: Any, builder: Any, shapes: dict[str, tuple[Shape, Shape, Shape]], fp16: bool,
    workspace_bytes: int,
) -> Any:
    """The builder config: workspace, FP16 by flag where TensorRT has one, one profile."""
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and fp16_by_flag(trt):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        try:
            profile.set_shape(name, low, opt, high)
        except ValueError as exc:  # TensorRT's check of the shapes against the network
            raise BuildError(f"input '{name}': profile {low} / {opt} / {high}: {exc}") from None
    if config.add_optimization_profile(profile) < 0:
        said = RECORDER.reason("TensorRT gave no reason")
        raise BuildError(f"TensorRT refused the optimization profile {shapes}: {said}")
    return config


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trt", help="TensorRT plans (needs the tensorrt extra and a GPU)")
    commands = p.add_subparsers(dest="trt_command", required=True, metavar="COMMAND")
    b = commands.add_parser(
        "build", help="build model.plan from an ONNX model into a new version",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--onnx", type=Path, required=True, help="the ONNX model")
    b.add_argument("--repository", type=Path, required=True, help="the model repository")
    b.add_argument("--model", required=True, help="the model's name in the repository")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=0, help="0: --max-batch")
    b.add_argument("--max-batch", type=int, default=64)
    b.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="FP16 kernels (TensorRT 11: the graph converted to float16, float32 "
                   "inputs and outputs kept)")
    b.add_argument("--workspace-bytes", type=int, default=0, help="0: TensorRT's default")


def run(args: argparse.Namespace) -> int:
    batch = BatchRange(args.min_batch, args.opt_batch or args.max_batch, args.max_batch)
    model_dir = args.repository / args.model
    try:
        plan = build_plan(args.onnx, batch, args.fp16, args.workspace_bytes)
    except (BuildError, ConfigError, OSError) as exc:  # ConfigError: TensorRT, CUDA
        print(f"tachyon: {exc}", file=sys.stderr)
        return 2
    version = model_dir / str(next_version(model_dir))
    version.mkdir(parents=True)
    (version / "model.plan").write_bytes(plan)
    config = model_dir / "config.pbtxt"
    if not config.exists():
        config.write_text(config_text(args.model, batch.high), encoding="utf-8")
    print(f"wrote {version / 'model.plan'} ({len(plan):,} bytes), batch {batch.low}.."
          f"{batch.high} (opt {batch.opt}), fp16 {args.fp16}")
    return 0
