// The native request path's planning: which ModelInfer calls the extension answers by itself
// (plain requests to a registered model version, valid against its spec), grouped into chunks
// (one model version and one non-batch shape per chunk, at most max_batch_size rows), and the
// responses cut from a chunk's batched outputs. Free of any Python dependency; the bindings
// (infer_router_py.cpp) copy the inputs into Python buffers and hand chunks to the batcher.
#pragma once

#include "grpc_frontend.hpp"
#include "infer_wire.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tachyon::infer {

struct TensorSpec {
  std::string name;
  std::string datatype;            // the KServe name, e.g. "FP32"
  std::vector<std::int64_t> dims;  // without the batch dimension; -1 is variable
  std::size_t itemsize = 0;        // bytes per element (fixed-size datatypes only)
};

// One model version the native path serves, as Python registered it.
struct ModelEntry {
  std::uint64_t token = 0;  // Python's handle for this registration
  std::string name;
  std::string version;  // decimal, as responses carry it
  std::int64_t max_batch_size = 0;
  std::uint64_t max_request_bytes = 0;  // per input, as --max-request-bytes bounds it
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
};

using EntryPtr = std::shared_ptr<const ModelEntry>;

// Requests whose message is larger than this stay on the Python path, which reads large
// tensors without copies.
inline constexpr std::size_t kMaxPlainMessageBytes = 1 << 20;

// Registered versions by (model name, version string); "" is the version an empty (or "-1")
// model_version resolves to.
class Registry {
 public:
  void add(const std::string& name, const std::string& version, EntryPtr entry);
  void clear() { entries_.clear(); }
  const EntryPtr* find(std::string_view name, std::string_view version) const;
  bool empty() const { return entries_.empty(); }

 private:
  std::unordered_map<std::string, EntryPtr> entries_;
};

// One call answered natively: the request (owned) and how it maps onto its model's spec.
struct PlannedCall {
  std::uint64_t call_id = 0;
  std::unique_ptr<std::string> message;  // owned: `request` views it
  infer_wire::PlainRequest request;
  std::int64_t rows = 1;
  std::vector<std::uint16_t> input_of;  // spec input index -> request input index
  std::vector<std::uint16_t> outputs;   // spec output indexes, in response order
};

// Calls of one model version and one non-batch shape, to run as one queue entry.
struct Chunk {
  EntryPtr model;
  std::vector<std::int64_t> inner;  // the non-batch dims of every input, concatenated
  std::vector<PlannedCall> calls;
  std::int64_t rows = 0;
  std::vector<std::size_t> input_bytes;  // per spec input, the sum over calls
  std::vector<bool> wanted;              // per spec output: some call asked for it
};

// Checks a parsed request against its model's spec; false unless it is valid and plain. Fills
// call.rows, call.input_of, call.outputs and `inner`.
bool match(const ModelEntry& model, PlannedCall& call, std::vector<std::int64_t>& inner);

struct PlanStats {
  std::uint64_t calls = 0;   // calls planned natively
  std::uint64_t chunks = 0;  // chunks they formed
};

// Moves every plain ModelInfer call among `items` to `chunks` (the others stay, in order).
void plan(std::vector<grpc::ReadyItem>& items, const Registry& registry,
          std::vector<Chunk>& chunks, PlanStats& stats);

// One batched output of a chunk, as the backend produced it.
struct BatchedOutput {
  const char* data = nullptr;  // null: not computed
  std::size_t size = 0;
  std::vector<std::int64_t> shape;
};

// Cuts `outputs` (one per spec output) into each call's rows and appends its framed
// ModelInferResponse to `out`. The caller checked every wanted output's size against `rows`.
void respond(const Chunk& chunk, const std::vector<BatchedOutput>& outputs,
             std::vector<grpc::Response>& out);

}  // namespace tachyon::infer
