// Python bindings of the native request path: server._native.InferRouter and InferChunk.
#include "infer_router_py.hpp"

#include "gil.hpp"
#include "grpc_frontend.hpp"
#include "grpc_frontend_py.hpp"
#include "infer_router.hpp"
#include "py_buffer.hpp"

#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace tachyon {
namespace {

using namespace nb::literals;

using grpc::GrpcFrontend;
using infer::Chunk;

// (name, datatype, dims, itemsize)
using TensorTuple = std::tuple<std::string, std::string, std::vector<std::int64_t>, std::size_t>;
// (token, name, version, keys, max_batch_size, max_request_bytes, inputs, outputs)
using ModelTuple = std::tuple<std::uint64_t, std::string, std::string, std::vector<std::string>,
                              std::int64_t, std::uint64_t, std::vector<TensorTuple>,
                              std::vector<TensorTuple>>;

struct PyChunk {
  PyChunk(Chunk&& c, nb::list i) : chunk(std::move(c)), inputs(std::move(i)) {}
  PyChunk(PyChunk&&) = default;
  PyChunk(const PyChunk&) = delete;  // nanobind must know: vector<PlannedCall> only moves
  PyChunk& operator=(const PyChunk&) = delete;
  PyChunk& operator=(PyChunk&&) = default;

  Chunk chunk;
  nb::list inputs;  // one bytes object per spec input: the calls' rows, in call order
};

class InferRouter {
 public:
  void set_models(const std::vector<ModelTuple>& models) {
    infer::Registry registry;
    for (const auto& [token, name, version, keys, max_batch, max_bytes, inputs, outputs] :
         models) {
      auto entry = std::make_shared<infer::ModelEntry>();
      entry->token = token;
      entry->name = name;
      entry->version = version;
      entry->max_batch_size = max_batch;
      entry->max_request_bytes = max_bytes;
      entry->inputs = specs(inputs, "inputs");
      entry->outputs = specs(outputs, "outputs");
      for (const std::string& key : keys) {
        registry.add(name, key, entry);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    registry_ = std::move(registry);
  }

  nb::tuple take(GrpcFrontend& fe) {
    std::vector<grpc::ReadyItem> items;
    std::vector<Chunk> chunks;
    {
      nb::gil_scoped_release nogil;
      fe.take(items);
      std::lock_guard<std::mutex> lock(mu_);
      infer::plan(items, registry_, chunks, stats_);
    }
    nb::list py_items = ready_items_to_python(items);
    nb::list py_chunks;
    std::vector<PyChunk*> made;
    std::size_t total = 0;
    for (Chunk& chunk : chunks) {
      PyChunk value{std::move(chunk), nb::list()};
      for (const std::size_t bytes : value.chunk.input_bytes) {
        PyObject* buffer = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(bytes));
        if (buffer == nullptr) {
          throw nb::python_error();
        }
        value.inputs.append(nb::steal(buffer));
        total += bytes;
      }
      nb::object obj = nb::cast(std::move(value), nb::rv_policy::move);
      made.push_back(nb::inst_ptr<PyChunk>(obj));
      py_chunks.append(obj);
    }
    if (!made.empty()) {
      fill(made, total);
    }
    return nb::make_tuple(py_items, py_chunks);
  }

  // Answers every call of `chunk` from its batched `outputs` (one per spec output, None where
  // no call asked for it).
  void respond(GrpcFrontend& fe, const PyChunk& py, nb::handle outputs) {
    const Chunk& chunk = py.chunk;
    const auto& specs = chunk.model->outputs;
    nb::object seq = nb::steal(PySequence_Fast(outputs.ptr(), "outputs must be a sequence"));
    if (!seq.is_valid()) {
      throw nb::python_error();
    }
    if (static_cast<std::size_t>(PySequence_Fast_GET_SIZE(seq.ptr())) != specs.size()) {
      throw nb::value_error(("respond(): expected " + std::to_string(specs.size()) +
                             " outputs (one per model output)").c_str());
    }
    const std::unique_ptr<BufferView[]> views(new BufferView[specs.size()]);
    std::vector<infer::BatchedOutput> batched(specs.size());
    for (std::size_t o = 0; o < specs.size(); ++o) {
      if (!chunk.wanted[o]) {
        continue;
      }
      PyObject* item = PySequence_Fast_GET_ITEM(seq.ptr(), static_cast<Py_ssize_t>(o));
      views[o].acquire(item, Access::kRead);
      batched[o] = batched_output(views[o].raw(), chunk, specs[o]);
    }
    std::vector<grpc::Response> responses;
    {
      ReleaseGilIf nogil(true);
      responses.reserve(chunk.calls.size());
      infer::respond(chunk, batched, responses);
      fe.respond(std::move(responses));
    }
  }

  // Answers every call of `chunk` with the error `status` (a gRPC code) and `message`.
  static void fail(GrpcFrontend& fe, const PyChunk& py, int status, const std::string& message) {
    if (status <= 0 || status > 16) {
      throw nb::value_error("fail(): status must be a gRPC error code 1..16");
    }
    std::vector<grpc::Response> responses(py.chunk.calls.size());
    for (std::size_t i = 0; i < responses.size(); ++i) {
      responses[i].call_id = py.chunk.calls[i].call_id;
      responses[i].final = true;
      responses[i].status = status;
      responses[i].status_message = message;
    }
    nb::gil_scoped_release nogil;
    fe.respond(std::move(responses));
  }

  nb::dict stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    nb::dict out;
    out["calls"] = stats_.calls;
    out["chunks"] = stats_.chunks;
    return out;
  }

 private:
  static std::vector<infer::TensorSpec> specs(const std::vector<TensorTuple>& tuples,
                                              const char* what) {
    std::vector<infer::TensorSpec> out;
    for (const auto& [name, datatype, dims, itemsize] : tuples) {
      if (itemsize == 0) {
        throw nb::value_error((std::string(what) + ": '" + name + "' needs a fixed-size "
                               "datatype (itemsize > 0)").c_str());
      }
      if (out.size() >= UINT16_MAX) {
        throw nb::value_error((std::string(what) + ": too many tensors").c_str());
      }
      out.push_back({name, datatype, dims, itemsize});
    }
    return out;
  }

  // Copies each call's raw tensors into its chunk's input buffers.
  static void fill(const std::vector<PyChunk*>& made, std::size_t total) {
    std::vector<char*> dest;
    for (PyChunk* py : made) {
      for (const nb::handle input : py->inputs) {
        dest.push_back(PyBytes_AS_STRING(input.ptr()));
      }
    }
    ReleaseGilIf nogil(worth_releasing_gil(total));
    std::size_t d = 0;
    for (PyChunk* py : made) {
      const Chunk& chunk = py->chunk;
      for (std::size_t s = 0; s < chunk.input_bytes.size(); ++s, ++d) {
        char* out = dest[d];
        for (const infer::PlannedCall& call : chunk.calls) {
          const std::string_view raw = call.request.raw[call.input_of[s]];
          std::memcpy(out, raw.data(), raw.size());
          out += raw.size();
        }
      }
    }
  }

  static infer::BatchedOutput batched_output(const Py_buffer& view, const Chunk& chunk,
                                             const infer::TensorSpec& spec) {
    infer::BatchedOutput out;
    out.data = static_cast<const char*>(view.buf);
    out.size = static_cast<std::size_t>(view.len);
    for (int d = 0; d < view.ndim; ++d) {
      out.shape.push_back(static_cast<std::int64_t>(view.shape[d]));
    }
    if (static_cast<std::size_t>(view.itemsize) != spec.itemsize) {
      throw nb::value_error(("output '" + spec.name + "' has " + std::to_string(view.itemsize) +
                             "-byte elements, expected " + std::to_string(spec.itemsize) +
                             " (" + spec.datatype + ")").c_str());
    }
    if (chunk.model->max_batch_size > 0 && (view.ndim == 0 || view.shape[0] != chunk.rows)) {
      throw nb::value_error(("output '" + spec.name + "' does not have " +
                             std::to_string(chunk.rows) + " rows (the chunk's)").c_str());
    }
    return out;
  }

  mutable std::mutex mu_;
  infer::Registry registry_;
  infer::PlanStats stats_;
};

nb::tuple shape_of(const PyChunk& py, std::size_t s, std::size_t& inner_at) {
  const Chunk& chunk = py.chunk;
  const auto& dims = chunk.model->inputs[s].dims;
  const bool batched = chunk.model->max_batch_size > 0;
  nb::list shape;
  if (batched) {
    shape.append(chunk.rows);
  }
  for (std::size_t d = 0; d < dims.size(); ++d) {
    shape.append(chunk.inner[inner_at++]);
  }
  return nb::tuple(shape);
}

// The parser alone, for its tests: None when not plain, else (model_name, model_version, id,
// [(name, datatype, shape)], [output names], [raw bytes]).
nb::object plain_infer_request(nb::bytes message) {
  infer_wire::PlainRequest r;
  if (!infer_wire::parse_plain_request(message.c_str(), message.size(), r)) {
    return nb::none();
  }
  // Tensor names are not checked for UTF-8 (a bad one matches no model): shown replaced.
  const auto str = [](std::string_view v) {
    return nb::steal<nb::str>(
        PyUnicode_DecodeUTF8(v.data(), static_cast<Py_ssize_t>(v.size()), "replace"));
  };
  nb::list inputs;
  for (const auto& in : r.inputs) {
    nb::list shape;
    for (const std::int64_t d : in.shape) {
      shape.append(d);
    }
    inputs.append(nb::make_tuple(str(in.name), str(in.datatype), nb::tuple(shape)));
  }
  nb::list outputs;
  for (const auto name : r.outputs) {
    outputs.append(str(name));
  }
  nb::list raw;
  for (const auto v : r.raw) {
    raw.append(nb::bytes(v.data(), v.size()));
  }
  return nb::make_tuple(str(r.model_name), str(r.model_version), str(r.id), inputs, outputs,
                        raw);
}

// The writer alone, for its tests: a ModelInferResponse of raw outputs
// [(name, datatype, shape, bytes)].
nb::bytes infer_response(const std::string& model_name, const std::string& version,
                         const std::string& id,
                         const std::vector<std::tuple<std::string, std::string,
                                                      std::vector<std::int64_t>, nb::bytes>>& outputs) {
  std::vector<infer_wire::OutputSlice> slices;
  for (const auto& [name, datatype, shape, data] : outputs) {
    slices.push_back({name, datatype, shape, data.c_str(), data.size()});
  }
  std::string out;
  out.reserve(infer_wire::response_size(model_name, version, id, slices));
  infer_wire::write_response(out, model_name, version, id, slices);
  return nb::bytes(out.data(), out.size());
}

}  // namespace

void register_infer_router(nb::module_& m) {
  m.def("plain_infer_request", &plain_infer_request, "message"_a,
        nb::sig("def plain_infer_request(message: bytes) -> tuple[str, str, str, "
                "list[tuple[str, str, tuple[int, ...]]], list[str], list[bytes]] | None"),
        "The native request path's ModelInferRequest reader (for tests): None unless the\n"
        "message parses and is plain, else (model_name, model_version, id, inputs, outputs,\n"
        "raw_input_contents).");
  m.def("infer_response", &infer_response, "model_name"_a, "model_version"_a, "id"_a,
        "outputs"_a,
        nb::sig("def infer_response(model_name: str, model_version: str, id: str, outputs: "
                "collections.abc.Sequence[tuple[str, str, collections.abc.Sequence[int], "
                "bytes]]) -> bytes"),
        "The native request path's ModelInferResponse writer (for tests).");

  nb::class_<PyChunk>(m, "InferChunk",
                      "ModelInfer calls to one model version, answered by the native request\n"
                      "path: their inputs coalesced row-wise, one buffer per model input.")
      .def_prop_ro("token", [](const PyChunk& c) { return c.chunk.model->token; },
                   "The registration token of the model version (InferRouter.set_models).")
      .def_prop_ro("count", [](const PyChunk& c) { return c.chunk.calls.size(); },
                   "How many calls (requests) the chunk holds.")
      .def_prop_ro("rows", [](const PyChunk& c) { return c.chunk.rows; },
                   "Rows in all (the batch dimension; 1 per call for a model without batching).")
      .def_prop_ro(
          "call_ids",
          [](const PyChunk& c) {
            nb::list ids;
            for (const auto& call : c.chunk.calls) {
              ids.append(call.call_id);
            }
            return ids;
          },
          nb::sig("def call_ids(self) -> list[int]"))
      .def_prop_ro("inputs", [](const PyChunk& c) { return c.inputs; },
                   nb::sig("def inputs(self) -> list[bytes]"),
                   "One bytes object per model input (the model's order): every call's rows.")
      .def_prop_ro(
          "shapes",
          [](const PyChunk& c) {
            nb::list out;
            std::size_t at = 0;
            for (std::size_t s = 0; s < c.chunk.model->inputs.size(); ++s) {
              out.append(shape_of(c, s, at));
            }
            return out;
          },
          nb::sig("def shapes(self) -> list[tuple[int, ...]]"),
          "The shape of each input buffer.")
      .def_prop_ro(
          "outputs",
          [](const PyChunk& c) {
            nb::list out;
            for (std::size_t o = 0; o < c.chunk.wanted.size(); ++o) {
              if (c.chunk.wanted[o]) {
                out.append(o);
              }
            }
            return out;
          },
          nb::sig("def outputs(self) -> list[int]"),
          "Indexes of the model outputs some call asked for (the model's order).")
      .def(
          "messages",
          [](const PyChunk& c) {
            nb::list out;
            for (const auto& call : c.chunk.calls) {
              out.append(nb::make_tuple(call.call_id,
                                        nb::bytes(call.message->data(), call.message->size())));
            }
            return out;
          },
          nb::sig("def messages(self) -> list[tuple[int, bytes]]"),
          "Each call's request message, for the Python path.");

  nb::class_<InferRouter>(m, "InferRouter",
                          "Plans the native request path: take() parses plain ModelInfer\n"
                          "requests to registered model versions and coalesces them into\n"
                          "InferChunks; respond() cuts the batched outputs into each call's\n"
                          "ModelInferResponse.")
      .def(nb::init<>())
      .def("set_models", &InferRouter::set_models, "models"_a,
           nb::sig("def set_models(self, models: collections.abc.Sequence[tuple[int, str, str, "
                   "collections.abc.Sequence[str], int, int, collections.abc.Sequence[tuple[str, "
                   "str, collections.abc.Sequence[int], int]], collections.abc.Sequence[tuple["
                   "str, str, collections.abc.Sequence[int], int]]]]) -> None"),
           "Replace the registered model versions: (token, name, version, keys,\n"
           "max_batch_size, max_request_bytes, inputs, outputs), each tensor (name, datatype,\n"
           "dims without the batch dimension, itemsize). A request's model_version is looked\n"
           "up in keys (\"\" stands for an empty model_version and \"-1\").")
      .def("take", &InferRouter::take, "frontend"_a,
           nb::sig("def take(self, frontend: GrpcFrontend) -> tuple[list[tuple[int, str, bytes, "
                   "int, tuple[tuple[str, str], ...] | None]], list[InferChunk]]"),
           "GrpcFrontend.take(), with the plain ModelInfer calls to registered versions\n"
           "taken out as InferChunks (the other items as take() gives them).")
      .def("respond", &InferRouter::respond, "frontend"_a, "chunk"_a, "outputs"_a,
           nb::sig("def respond(self, frontend: GrpcFrontend, chunk: InferChunk, outputs: "
                   "collections.abc.Sequence[collections.abc.Buffer | None]) -> None"),
           "Answer every call of the chunk from the batched outputs (one C-contiguous buffer\n"
           "per model output in its wire datatype, None where chunk.outputs lacks it).\n"
           "ValueError when an output has the wrong element size or row count.")
      .def_static("fail", &InferRouter::fail, "frontend"_a, "chunk"_a, "status"_a, "message"_a,
                  "Answer every call of the chunk with a gRPC error status and message.")
      .def("stats", &InferRouter::stats, nb::sig("def stats(self) -> dict[str, int]"),
           "calls and chunks planned natively so far.");
}

}  // namespace tachyon
