"""The semantic-search example: the tokenizer and lookup backends in-process on the real
all-MiniLM-L6-v2 tokenizer.json, the embedding graph (MiniLM + pooling + normalisation) against
a numpy reference, the FAISS index of the standard library's docstrings finding the obvious
answer, and the models and the `semantic_search` ensemble through a real server.

The repository is the bundled one when `tools/make_semantic_search.py` has built it there (the
set-up does) from the installed inputs; else the tests build their own in a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server import model_config
from server.backends import factory
from server.backends.lookup import LookupBackend
from server.backends.tokenizer import TokenizerBackend, load_tokenizer
from server.model_config import ConfigError, ModelSpec
from tests.conftest import BUNDLED, ROOT, RunningServer, ServerFactory

JSON_QUERY = "read a JSON document from a file"
STEPS = ("minilm_tokenizer", "minilm_embed", "stdlib_docs", "docs_lookup")
TOKEN_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
CLS, SEP = 101, 102


def _load_tool() -> ModuleType:
    path = ROOT / "tools" / "make_semantic_search.py"
    spec = importlib.util.spec_from_file_location("make_semantic_search", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="session")
def search_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if tool.is_up_to_date(BUNDLED):
        return BUNDLED
    repo = tmp_path_factory.mktemp("semantic_search_repo")
    tool.build(repo)
    return repo


@pytest.fixture(scope="module")
def server(search_repo: Path, start_server: ServerFactory) -> RunningServer:
    return start_server(search_repo)


@pytest.fixture(scope="module")
def corpus(search_repo: Path) -> list[str]:
    texts: list[str] = json.loads((search_repo / "docs_lookup" / "1" / "texts.json").read_text())
    return texts


def spec_of(text: str, name: str, version_dir: Path | None = None) -> ModelSpec:
    """What the manager does with a config: parse, complete when incomplete, validate."""
    config = model_config.parse_config(text, name)
    backend = model_config.backend_of(config, version_dir)
    if not model_config.is_complete(config):
        assert version_dir is not None
        factory(backend).complete_config(config, version_dir, 8)
    return model_config.to_spec(config, backend)


def texts_array(*texts: str | bytes) -> np.ndarray:
    items = [t.encode() if isinstance(t, str) else t for t in texts]
    return np.array(items, dtype=object).reshape(-1, 1)


# -- the tokenizer backend -------------------------------------------------------------------


def tokenizer_backend(config: str | None = None) -> TokenizerBackend:
    version_dir = tool.tokenizer_source().parent  # holds tokenizer.json
    spec = spec_of(config or tool.tokenizer_config(), "tok", version_dir)
    backend = TokenizerBackend(spec, version_dir)
    backend.load()
    return backend


def test_tokenizer_pads_to_the_longest_text_of_the_batch() -> None:
    backend = tokenizer_backend()
    texts = ["Hello, world!", JSON_QUERY, ""]
    out = backend.execute({"TEXT": texts_array(*texts)}, list(TOKEN_OUTPUTS))
    reference = load_tokenizer(tool.tokenizer_source())
    reference.no_padding()
    expected = [e.ids for e in reference.encode_batch(texts)]
    longest = max(len(ids) for ids in expected)
    for name in TOKEN_OUTPUTS:
        assert out[name].dtype == np.int64 and out[name].shape == (3, longest)
    for row, ids in enumerate(expected):
        assert ids[0] == CLS and ids[-1] == SEP
        assert out["input_ids"][row, : len(ids)].tolist() == ids
        assert not out["input_ids"][row, len(ids) :].any()  # [PAD] is 0
        assert out["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (longest - len(ids))
    assert not out["token_type_ids"].any()
    assert out["input_ids"][2].tolist()[:2] == [CLS, SEP]  # the empty text


def test_tokenizer_truncates_to_max_length() -> None:
    config = tool.tokenizer_config().replace('string_value: "128"', 'string_value: "8"')
    backend = tokenizer_backend(config)
    out = backend.execute({"TEXT": texts_array("word " * 50, "short")}, ["input_ids"])
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][0, -1] == SEP


def test_tokenizer_refuses_text_that_is_not_utf8() -> None:
    backend = tokenizer_backend()
    inputs = {"TEXT": texts_array("fine", b"\xff\xfe broken")}
    for call in (lambda: backend.check_request(inputs), lambda: backend.execute(inputs, [])):
        with pytest.raises(ValueError, match="element 1 is not UTF-8"):
            call()


def test_tokenizer_completes_its_config() -> None:
    spec = spec_of('backend: "tokenizer"', "tok", tool.tokenizer_source().parent)
    assert spec.max_batch_size == 8
    assert [(t.name, t.datatype.value, t.dims) for t in spec.inputs] == [("TEXT", "BYTES", (1,))]
    assert [(t.name, t.datatype.value, t.dims) for t in spec.outputs] == [
        (name, "INT64", (-1,)) for name in TOKEN_OUTPUTS
    ]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"TEXT" data_type: TYPE_STRING', '"TEXT" data_type: TYPE_FP32', "expected TYPE_STRING"),
        ("TYPE_STRING dims: [ 1 ]", "TYPE_STRING dims: [ 4 ]", "expected [1]"),
        ('"attention_mask" data_type', '"mask" data_type', "not produced by a tokenizer"),
        ('"input_ids" data_type: TYPE_INT64', '"input_ids" data_type: TYPE_FP32', "TYPE_INT64"),
        (
            '"token_type_ids" data_type: TYPE_INT64 dims: [ -1 ]',
            '"token_type_ids" data_type: TYPE_INT64 dims: [ 128 ]',
            "expected [-1]",
        ),
        ('string_value: "128"', 'string_value: "0"', "max_length '0' is invalid"),
    ],
)
def test_tokenizer_config_errors_name_the_field(old: str, new: str, message: str) -> None:
    config = tool.tokenizer_config()
    assert old in config
    with pytest.raises(ConfigError, match=re.escape(message)):
        tokenizer_backend(config.replace(old, new))


def test_tokenizer_file_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    backend = TokenizerBackend(spec_of(tool.tokenizer_config(), "tok"), tmp_path)
    with pytest.raises(ConfigError, match=r"cannot read .* as a tokenizer\.json"):
        backend.load()


# -- the lookup backend ----------------------------------------------------------------------


def lookup_backend(tmp_path: Path, texts: Any, config: str | None = None) -> LookupBackend:
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    backend = LookupBackend(spec_of(config or tool.lookup_config(), "lookup"), tmp_path)
    backend.load()
    return backend


def test_lookup_answers_the_text_of_each_id(tmp_path: Path) -> None:
    backend = lookup_backend(tmp_path, ["zero", "один", "two"])
    ids = np.array([[2, 0, -1], [1, 1, 0]], dtype=np.int64)
    out = backend.execute({"IDS": ids}, ["TEXTS"])["TEXTS"]
    assert out.shape == (2, 3) and out.dtype == object
    assert out.tolist() == [[b"two", b"zero", b""], ["один".encode(), "один".encode(), b"zero"]]


@pytest.mark.parametrize("bad", [3, -2])
def test_lookup_refuses_ids_outside_the_texts(tmp_path: Path, bad: int) -> None:
    backend = lookup_backend(tmp_path, ["zero", "one", "two"])
    ids = np.array([[0, 1], [2, bad]], dtype=np.int64)
    with pytest.raises(ValueError, match=rf"holds id {bad} at \[1, 1\], expected -1 .* or 0..2"):
        backend.check_request({"IDS": ids})
    with pytest.raises(ValueError, match=f"holds id {bad}"):
        backend.execute({"IDS": ids}, ["TEXTS"])


@pytest.mark.parametrize(
    ("texts", "message"),
    [({"a": 1}, "holds a dict, expected a JSON list"), (["a", 2], "item 1 is 2, expected a str")],
)
def test_lookup_texts_file_errors(tmp_path: Path, texts: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lookup_backend(tmp_path, texts)


def test_lookup_config_errors(tmp_path: Path) -> None:
    config = tool.lookup_config().replace("TYPE_STRING dims: [ 10 ]", "TYPE_STRING dims: [ 5 ]")
    with pytest.raises(ConfigError, match=r"dims \[5\] do not match input 'IDS' dims \[10\]"):
        lookup_backend(tmp_path, ["a"], config)
    config = tool.lookup_config().replace("TYPE_INT64", "TYPE_FP32")
    with pytest.raises(ConfigError, match="expected TYPE_INT64 or TYPE_INT32"):
        lookup_backend(tmp_path, ["a"], config)


# -- the embedding model and the index -------------------------------------------------------


def numpy_pooling(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize, as plain numpy."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    result: np.ndarray = pooled / np.clip(norms, 1e-12, None)
    return result


def test_embedding_graph_equals_numpy_pooling_of_the_raw_model(search_repo: Path) -> None:
    texts = ["hi", JSON_QUERY, "Recursively copy a directory tree " * 6]
    backend = tokenizer_backend()
    feed = backend.execute({"TEXT": texts_array(*texts)}, list(TOKEN_OUTPUTS))
    hidden = tool.session(tool.model_source()).run(None, feed)[0]
    wrapped = tool.session(search_repo / "minilm_embed" / "1" / "model.onnx")
    embedding = wrapped.run(["EMBEDDING"], feed)[0]
    assert embedding.shape == (3, 384) and embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, numpy_pooling(hidden, feed["attention_mask"]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-6)
    alone = wrapped.run(["EMBEDDING"], backend.execute({"TEXT": texts_array("hi")}, [*feed]))[0]
    np.testing.assert_allclose(alone[0], embedding[0], atol=1e-5)  # padding does not count


def test_index_finds_the_json_docstring(search_repo: Path, corpus: list[str]) -> None:
    import faiss

    index = faiss.read_index(str(search_repo / "stdlib_docs" / "1" / "index.faiss"))
    assert index.ntotal == len(corpus) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    query = tool.embed(
        search_repo / "minilm_embed" / "1" / "model.onnx",
        search_repo / "minilm_tokenizer" / "1" / "tokenizer.json",
        [JSON_QUERY, "copy a directory tree"],
    )
    scores, ids = index.search(query, 3)
    assert corpus[ids[0, 0]].startswith("json.load: ")
    assert corpus[ids[1, 0]].startswith("shutil.copytree: ")
    assert (scores[:, 0] > 0.5).all() and (np.diff(scores, axis=1) <= 0).all()


def test_corpus_is_the_standard_library_in_a_fixed_order(corpus: list[str]) -> None:
    again = tool.collect_corpus()
    assert again == corpus
    assert 2000 <= len(corpus) <= 4000
    assert len(set(corpus)) == len(corpus)
    names = [text.split(": ", 1)[0] for text in corpus]
    assert {"json", "json.load", "os.path.join", "shutil.copytree", "math.sqrt"} <= set(names)


def test_the_configs_parse_and_the_ensemble_has_an_empty_version(search_repo: Path) -> None:
    for name in (*STEPS, "semantic_search"):
        config = model_config.read_config(search_repo / name)
        assert config is not None and config.name == name
    ensemble = search_repo / "semantic_search"
    assert [p.name for p in ensemble.iterdir() if p.is_dir()] == ["1"]
    assert not any((ensemble / "1").iterdir())


# -- through a real server -------------------------------------------------------------------


def infer(client: Any, module: Any, model: str, tensors: dict[str, np.ndarray]) -> Any:
    inputs = []
    for name, array in tensors.items():
        datatype = (
            "BYTES" if array.dtype == object else ("FP32" if array.dtype.kind == "f" else "INT64")
        )
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs)


def test_each_step_serves_and_chains_by_hand(server: RunningServer, corpus: list[str]) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for name in STEPS:
        assert client.is_model_ready(name), name
    query = texts_array(JSON_QUERY, "compress data with gzip")
    tokens = infer(client, grpcclient, "minilm_tokenizer", {"TEXT": query})
    feed = {name: tokens.as_numpy(name) for name in TOKEN_OUTPUTS}
    embedding = infer(client, grpcclient, "minilm_embed", feed).as_numpy("EMBEDDING")
    assert embedding.shape == (2, 384)
    found = infer(client, grpcclient, "stdlib_docs", {"QUERY": embedding})
    ids = found.as_numpy("IDS")
    assert ids.shape == (2, 10)
    texts = infer(client, grpcclient, "docs_lookup", {"IDS": ids}).as_numpy("TEXTS")
    assert texts.tolist() == [[corpus[i].encode() for i in row] for row in ids]
    assert texts[0, 0].startswith(b"json.load: ") and texts[1, 0].startswith(b"gzip.compress: ")


def test_tokenizer_step_answers_invalid_argument_for_bad_utf8(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        infer(client, grpcclient, "minilm_tokenizer", {"TEXT": texts_array(b"\xc3\x28")})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "is not UTF-8" in str(info.value.message())


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_semantic_search_ensemble(server: RunningServer, corpus: list[str], transport: str) -> None:
    module: Any = grpcclient if transport == "grpc" else httpclient
    client = module.InferenceServerClient(
        server.grpc_url if transport == "grpc" else server.http_url
    )
    assert client.is_model_ready("semantic_search")
    query = texts_array(JSON_QUERY, "compute the square root of a number")
    result = infer(client, module, "semantic_search", {"QUERY_TEXT": query})
    ids, scores, texts = (result.as_numpy(n) for n in ("IDS", "SCORES", "TEXTS"))
    assert ids.shape == scores.shape == texts.shape == (2, 10)
    assert texts.tolist() == [[corpus[i].encode() for i in row] for row in ids]
    assert (np.diff(scores, axis=1) <= 0).all() and (scores[:, 0] > 0.5).all()
    assert any(text.startswith(b"json.") for text in texts[0, :3])
    assert texts[0, 0].startswith(b"json.load: ")
    assert texts[1, 0].startswith(b"math.sqrt: ")


def test_the_tool_rebuilds_only_when_asked(tmp_path: Path, search_repo: Path) -> None:
    assert tool.is_up_to_date(search_repo)
    copy = tmp_path / "repo"
    shutil.copytree(search_repo, copy, ignore=shutil.ignore_patterns("minilm_embed"))
    assert not tool.is_up_to_date(copy)  # a file is missing
    assert tool.main(["--out", str(search_repo)]) == 0  # up to date: nothing happens
