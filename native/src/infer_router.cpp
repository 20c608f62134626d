#include "infer_router.hpp"

#include "grpc_wire.hpp"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>

namespace tachyon::infer {
namespace {

std::string key_of(std::string_view name, std::string_view version) {
  std::string key;
  key.reserve(name.size() + 1 + version.size());
  key.append(name);
  key.push_back('\0');
  key.append(version);
  return key;
}

int find_spec(const std::vector<TensorSpec>& specs, std::string_view name) {
  for (std::size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].name == name) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

// The elements of `shape`, or 0 when a dimension is not positive or the tensor would span
// more than `max_bytes` at `itemsize` bytes an element.
std::uint64_t elements(const std::vector<std::int64_t>& shape, std::size_t itemsize,
                       std::uint64_t max_bytes) {
  std::uint64_t count = 1;
  const std::uint64_t limit = max_bytes / itemsize;
  for (const std::int64_t d : shape) {
    if (d < 1 || static_cast<std::uint64_t>(d) > limit || count > limit / d) {
      return 0;
    }
    count *= static_cast<std::uint64_t>(d);
  }
  return count;
}

bool match_inputs(const ModelEntry& model, PlannedCall& call, std::vector<std::int64_t>& inner) {
  const infer_wire::PlainRequest& r = call.request;
  const std::size_t n = model.inputs.size();
  if (r.inputs.size() != n || r.raw.size() != n || n == 0) {
    return false;
  }
  const bool batched = model.max_batch_size > 0;
  call.input_of.assign(n, UINT16_MAX);
  call.rows = 1;
  for (std::size_t i = 0; i < n; ++i) {
    const int s = find_spec(model.inputs, r.inputs[i].name);
    if (s < 0 || call.input_of[s] != UINT16_MAX) {
      return false;
    }
    call.input_of[s] = static_cast<std::uint16_t>(i);
  }
  inner.clear();
  for (std::size_t s = 0; s < n; ++s) {
    const TensorSpec& spec = model.inputs[s];
    const std::size_t i = call.input_of[s];
    const infer_wire::WireInput& in = r.inputs[i];
    const std::size_t lead = batched ? 1 : 0;
    if (in.datatype != spec.datatype || in.shape.size() != spec.dims.size() + lead) {
      return false;
    }
    for (std::size_t d = 0; d < spec.dims.size(); ++d) {
      if (spec.dims[d] != -1 && in.shape[d + lead] != spec.dims[d]) {
        return false;
      }
    }
    const std::uint64_t count = elements(in.shape, spec.itemsize, model.max_request_bytes);
    if (count == 0 || r.raw[i].size() != count * spec.itemsize) {
      return false;
    }
    if (batched) {
      const std::int64_t rows = in.shape[0];
      if (rows > model.max_batch_size || (s > 0 && rows != call.rows)) {
        return false;
      }
      call.rows = rows;
    }
    inner.insert(inner.end(), in.shape.begin() + static_cast<std::ptrdiff_t>(lead),
                 in.shape.end());
  }
  return true;
}

bool match_outputs(const ModelEntry& model, PlannedCall& call) {
  const auto& requested = call.request.outputs;
  call.outputs.clear();
  if (requested.empty()) {
    for (std::size_t o = 0; o < model.outputs.size(); ++o) {
      call.outputs.push_back(static_cast<std::uint16_t>(o));
    }
    return true;
  }
  for (const std::string_view name : requested) {
    const int o = find_spec(model.outputs, name);
    if (o < 0 || std::find(call.outputs.begin(), call.outputs.end(), o) != call.outputs.end()) {
      return false;
    }
    call.outputs.push_back(static_cast<std::uint16_t>(o));
  }
  return true;
}

// The open chunk a call joins, or a new one.
Chunk& chunk_for(std::vector<Chunk>& chunks, std::size_t first, const EntryPtr& model,
                 const std::vector<std::int64_t>& inner, std::int64_t rows) {
  const std::int64_t cap = std::max<std::int64_t>(model->max_batch_size, 1);
  // The latest chunk of this model and shape: earlier ones of the same key are full.
  for (std::size_t i = chunks.size(); i-- > first;) {
    Chunk& c = chunks[i];
    if (c.model == model && c.inner == inner) {
      if (c.rows + rows <= cap) {
        return c;
      }
      break;
    }
  }
  Chunk& c = chunks.emplace_back();
  c.model = model;
  c.inner = inner;
  c.input_bytes.assign(model->inputs.size(), 0);
  c.wanted.assign(model->outputs.size(), false);
  return c;
}

}  // namespace

void Registry::add(const std::string& name, const std::string& version, EntryPtr entry) {
  entries_[key_of(name, version)] = std::move(entry);
}

const EntryPtr* Registry::find(std::string_view name, std::string_view version) const {
  if (version == "-1") {
    version = std::string_view();
  }
  const auto it = entries_.find(key_of(name, version));
  return it == entries_.end() ? nullptr : &it->second;
}

bool match(const ModelEntry& model, PlannedCall& call, std::vector<std::int64_t>& inner) {
  return match_inputs(model, call, inner) && match_outputs(model, call);
}

void plan(std::vector<grpc::ReadyItem>& items, const Registry& registry,
          std::vector<Chunk>& chunks, PlanStats& stats) {
  if (registry.empty()) {
    return;
  }
  const std::size_t first = chunks.size();
  std::vector<std::int64_t> inner;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    grpc::ReadyItem& item = items[i];
    const EntryPtr* model = nullptr;
    PlannedCall call;
    if (item.kind == grpc::ItemKind::kUnary && item.method == "ModelInfer" &&
        item.message.size() <= kMaxPlainMessageBytes) {
      call.message = std::make_unique<std::string>(std::move(item.message));
      if (infer_wire::parse_plain_request(call.message->data(), call.message->size(),
                                          call.request)) {
        model = registry.find(call.request.model_name, call.request.model_version);
      }
      if (model == nullptr || !match(**model, call, inner)) {
        item.message = std::move(*call.message);  // back to the Python path as it came
        model = nullptr;
      }
    }
    if (model == nullptr) {
      if (kept != i) {
        items[kept] = std::move(item);
      }
      ++kept;
      continue;
    }
    call.call_id = item.call_id;
    Chunk& chunk = chunk_for(chunks, first, *model, inner, call.rows);
    chunk.rows += call.rows;
    for (std::size_t s = 0; s < chunk.input_bytes.size(); ++s) {
      chunk.input_bytes[s] += call.request.raw[call.input_of[s]].size();
    }
    for (const std::uint16_t o : call.outputs) {
      chunk.wanted[o] = true;
    }
    chunk.calls.push_back(std::move(call));
    ++stats.calls;
  }
  items.resize(kept);
  stats.chunks += chunks.size() - first;
}

void respond(const Chunk& chunk, const std::vector<BatchedOutput>& outputs,
             std::vector<grpc::Response>& out) {
  const ModelEntry& model = *chunk.model;
  const bool batched = model.max_batch_size > 0;
  std::vector<infer_wire::OutputSlice> slices;
  std::int64_t offset = 0;
  for (const PlannedCall& call : chunk.calls) {
    slices.clear();
    for (const std::uint16_t o : call.outputs) {
      const BatchedOutput& batch = outputs[o];
      infer_wire::OutputSlice& slice = slices.emplace_back();
      slice.name = model.outputs[o].name;
      slice.datatype = model.outputs[o].datatype;
      slice.shape = batch.shape;
      if (batched) {
        const std::size_t row_bytes = batch.size / static_cast<std::size_t>(chunk.rows);
        slice.shape[0] = call.rows;
        slice.data = batch.data + row_bytes * static_cast<std::size_t>(offset);
        slice.size = row_bytes * static_cast<std::size_t>(call.rows);
      } else {
        slice.data = batch.data;
        slice.size = batch.size;
      }
    }
    offset += call.rows;
    const infer_wire::PlainRequest& r = call.request;
    const std::size_t size = infer_wire::response_size(model.name, model.version, r.id, slices);
    grpc::Response& response = out.emplace_back();
    response.call_id = call.call_id;
    response.final = true;
    if (size > UINT32_MAX) {
      response.status = grpc_wire::kResourceExhausted;  // the send limit's code
      response.status_message = "Sent message larger than max (" + std::to_string(size) +
                                " vs. 4294967295)";
      continue;
    }
    response.status = grpc_wire::kOk;
    response.framed.reserve(grpc_wire::kPrefixBytes + size);
    response.framed.resize(grpc_wire::kPrefixBytes);
    grpc_wire::write_prefix(response.framed.data(), static_cast<std::uint32_t>(size));
    infer_wire::write_response(response.framed, model.name, model.version, r.id, slices);
  }
}

}  // namespace tachyon::infer
