// libFuzzer target: the native request path's reader and planner (infer_wire.hpp,
// infer_router.cpp) over arbitrary ModelInferRequest bytes, and its response writer.
//
// Input: the request message. Checks, besides the sanitizers:
//   - every view the reader returns lies inside the message;
//   - plan() keeps or takes every item exactly once; a chunk holds at most max_batch_size rows,
//     its input byte counts are the sums of its calls' raw tensors, and every call of a chunk
//     has that chunk's non-batch shape;
//   - respond() gives each call one framed response whose prefix declares its exact size.
#include "grpc_wire.hpp"
#include "infer_router.hpp"
#include "infer_wire.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace iw = tachyon::infer_wire;
namespace inf = tachyon::infer;
namespace grpc = tachyon::grpc;

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "infer_router: %s\n", what);
    std::abort();
  }
}

bool inside(std::string_view view, const char* data, std::size_t size) {
  return view.empty() || (view.data() >= data && view.data() + view.size() <= data + size);
}

std::shared_ptr<const inf::ModelEntry> model() {
  auto m = std::make_shared<inf::ModelEntry>();
  m->token = 1;
  m->name = "m";
  m->version = "1";
  m->max_batch_size = 4;
  m->max_request_bytes = 1 << 16;
  m->inputs = {{"A", "FP32", {-1}, 4}, {"B", "INT8", {2}, 1}};
  m->outputs = {{"Y", "FP32", {-1}, 4}, {"Z", "INT8", {2}, 1}};
  return m;
}

void check_reader(const char* data, std::size_t size) {
  iw::PlainRequest r;
  if (!iw::parse_plain_request(data, size, r)) {
    return;
  }
  require(inside(r.model_name, data, size) && inside(r.model_version, data, size) &&
              inside(r.id, data, size),
          "a string view lies outside the message");
  for (const auto& in : r.inputs) {
    require(inside(in.name, data, size) && inside(in.datatype, data, size),
            "an input view lies outside the message");
  }
  for (const auto raw : r.raw) {
    require(inside(raw, data, size), "a raw view lies outside the message");
  }
}

void check_plan(const char* data, std::size_t size) {
  inf::Registry registry;
  const auto entry = model();
  registry.add("m", "", entry);
  registry.add("m", "1", entry);
  std::vector<grpc::ReadyItem> items;
  for (std::uint64_t id = 1; id <= 3; ++id) {
    items.push_back({id, "ModelInfer", std::string(data, size), grpc::ItemKind::kUnary});
  }
  items.push_back({9, "ModelReady", std::string(data, size), grpc::ItemKind::kUnary});
  std::vector<inf::Chunk> chunks;
  inf::PlanStats stats;
  inf::plan(items, registry, chunks, stats);
  std::size_t calls = 0;
  for (const inf::Chunk& chunk : chunks) {
    require(chunk.rows >= 1 && chunk.rows <= entry->max_batch_size, "chunk rows out of bounds");
    std::vector<std::size_t> bytes(entry->inputs.size(), 0);
    std::int64_t rows = 0;
    for (const inf::PlannedCall& call : chunk.calls) {
      std::vector<std::int64_t> inner;
      inf::PlannedCall copy;
      copy.request = call.request;
      require(inf::match(*entry, copy, inner) && inner == chunk.inner,
              "a call does not match its chunk");
      for (std::size_t s = 0; s < bytes.size(); ++s) {
        bytes[s] += call.request.raw[call.input_of[s]].size();
      }
      rows += call.rows;
    }
    require(rows == chunk.rows && bytes == chunk.input_bytes, "chunk sums differ");
    calls += chunk.calls.size();
    // Outputs as an identity would produce them: rows x inner bytes, zeros.
    std::vector<std::string> buffers(entry->outputs.size());
    std::vector<inf::BatchedOutput> outputs(entry->outputs.size());
    for (std::size_t o = 0; o < outputs.size(); ++o) {
      outputs[o].shape = {chunk.rows, o == 0 ? chunk.inner[0] : 2};
      buffers[o].assign(static_cast<std::size_t>(outputs[o].shape[0] * outputs[o].shape[1]) *
                            entry->outputs[o].itemsize, '\0');
      outputs[o].data = buffers[o].data();
      outputs[o].size = buffers[o].size();
    }
    std::vector<grpc::Response> responses;
    inf::respond(chunk, outputs, responses);
    require(responses.size() == chunk.calls.size(), "not one response per call");
    for (const grpc::Response& r : responses) {
      require(r.framed.size() >= tachyon::grpc_wire::kPrefixBytes, "response without prefix");
      const auto* p = reinterpret_cast<const unsigned char*>(r.framed.data());
      const std::size_t declared = (std::size_t{p[1]} << 24) | (std::size_t{p[2]} << 16) |
                                   (std::size_t{p[3]} << 8) | p[4];
      require(declared + 5 == r.framed.size(), "the prefix does not declare the size");
    }
  }
  require(calls == stats.calls && calls + items.size() == 4, "an item was lost or doubled");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* text = reinterpret_cast<const char*>(data);
  check_reader(text, size);
  check_plan(text, size);
  return 0;
}
