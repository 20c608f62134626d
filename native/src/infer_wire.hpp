// ModelInferRequest / ModelInferResponse on the protobuf wire, for the native request path:
// a bounds-checked reader that accepts only "plain" requests and a writer that produces the
// bytes upb produces for a response of raw tensors. Free of any Python or nghttp2 dependency.
//
// Plain means what the native request path can answer by itself: no parameters (request,
// input or output), every input in raw_input_contents (no typed `contents`), no groups.
// Anything else, malformed input included, is "not plain" and goes to the Python path, which
// keeps its own messages for it. Field numbers are those of protos/inference.proto.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tachyon::infer_wire {

struct WireInput {
  std::string_view name;
  std::string_view datatype;
  std::vector<std::int64_t> shape;
};

struct PlainRequest {
  std::string_view model_name;
  std::string_view model_version;
  std::string_view id;
  std::vector<WireInput> inputs;
  std::vector<std::string_view> outputs;  // requested output names, in request order
  std::vector<std::string_view> raw;      // raw_input_contents, views of the message
};

// A cursor over one protobuf message; every read checks the bounds.
class Reader {
 public:
  Reader(const char* data, std::size_t size)
      : p_(reinterpret_cast<const std::uint8_t*>(data)), end_(p_ + size) {}

  bool done() const { return p_ == end_; }

  bool varint(std::uint64_t& out) {
    out = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ == end_) {
        return false;
      }
      const std::uint8_t byte = *p_++;
      out |= static_cast<std::uint64_t>(byte & 0x7F) << shift;
      if (byte < 0x80) {
        return true;
      }
    }
    return false;  // more than 10 bytes
  }

  bool bytes(std::string_view& out) {
    std::uint64_t length = 0;
    if (!varint(length) || length > static_cast<std::uint64_t>(end_ - p_)) {
      return false;
    }
    out = std::string_view(reinterpret_cast<const char*>(p_), static_cast<std::size_t>(length));
    p_ += length;
    return true;
  }

  // Skips one field's value of `wire` type; false on groups or truncation.
  bool skip(std::uint32_t wire) {
    std::uint64_t ignored = 0;
    std::string_view view;
    switch (wire) {
      case 0: return varint(ignored);
      case 1: return advance(8);
      case 2: return bytes(view);
      case 5: return advance(4);
      default: return false;
    }
  }

 private:
  bool advance(std::size_t n) {
    if (n > static_cast<std::size_t>(end_ - p_)) {
      return false;
    }
    p_ += n;
    return true;
  }

  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

// Reads a field key; false at a malformed key (field number 0 or above 2^29-1).
inline bool read_key(Reader& r, std::uint32_t& field, std::uint32_t& wire) {
  std::uint64_t key = 0;
  if (!r.varint(key) || key > 0xFFFFFFFFu) {
    return false;
  }
  field = static_cast<std::uint32_t>(key >> 3);
  wire = static_cast<std::uint32_t>(key & 7);
  return field != 0;
}

// Whether `text` is well-formed UTF-8 (what upb checks on proto3 string fields).
inline bool valid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t extra = 0;
    std::uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (extra >= n - i) {
      return false;
    }
    for (std::size_t k = 1; k <= extra; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) {
        return false;
      }
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    const std::uint32_t min = extra == 1 ? 0x80 : extra == 2 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += extra + 1;
  }
  return true;
}

// Appends a shape's values: packed (wire type 2) or one unpacked value (wire type 0).
inline bool read_shape(Reader& r, std::uint32_t wire, std::vector<std::int64_t>& shape) {
  std::uint64_t value = 0;
  if (wire == 0) {
    if (!r.varint(value)) {
      return false;
    }
    shape.push_back(static_cast<std::int64_t>(value));
    return true;
  }
  std::string_view packed;
  if (wire != 2 || !r.bytes(packed)) {
    return false;
  }
  Reader inner(packed.data(), packed.size());
  while (!inner.done()) {
    if (!inner.varint(value)) {
      return false;
    }
    shape.push_back(static_cast<std::int64_t>(value));
  }
  return true;
}

inline bool parse_input(std::string_view data, WireInput& out) {
  Reader r(data.data(), data.size());
  while (!r.done()) {
    std::uint32_t field = 0;
    std::uint32_t wire = 0;
    if (!read_key(r, field, wire)) {
      return false;
    }
    if (field == 1 && wire == 2) {
      if (!r.bytes(out.name)) {
        return false;
      }
    } else if (field == 2 && wire == 2) {
      if (!r.bytes(out.datatype)) {
        return false;
      }
    } else if (field == 3) {
      if (!read_shape(r, wire, out.shape)) {
        return false;
      }
    } else if (field == 4 || field == 5) {
      return false;  // parameters or typed contents: not plain
    } else if (!r.skip(wire)) {
      return false;
    }
  }
  return true;
}

inline bool parse_output(std::string_view data, std::string_view& name) {
  Reader r(data.data(), data.size());
  while (!r.done()) {
    std::uint32_t field = 0;
    std::uint32_t wire = 0;
    if (!read_key(r, field, wire)) {
      return false;
    }
    if (field == 1 && wire == 2) {
      if (!r.bytes(name)) {
        return false;
      }
    } else if (field == 2) {
      return false;  // parameters (classification, binary_data, ...): not plain
    } else if (!r.skip(wire)) {
      return false;
    }
  }
  return true;
}

// Parses a ModelInferRequest; false when it is malformed or not plain. Views point into
// `data`, which must outlive `out`. Strings keep protobuf's last-one-wins; unknown fields are
// skipped as upb skips them.
inline bool parse_plain_request(const char* data, std::size_t size, PlainRequest& out) {
  Reader r(data, size);
  while (!r.done()) {
    std::uint32_t field = 0;
    std::uint32_t wire = 0;
    if (!read_key(r, field, wire)) {
      return false;
    }
    std::string_view value;
    if (wire == 2 && field >= 1 && field <= 7) {
      if (!r.bytes(value)) {
        return false;
      }
      switch (field) {
        case 1: out.model_name = value; break;
        case 2: out.model_version = value; break;
        case 3: out.id = value; break;
        case 4: return false;  // request parameters: priority, timeout, shared memory, ...
        case 5:
          out.inputs.emplace_back();
          if (!parse_input(value, out.inputs.back())) {
            return false;
          }
          break;
        case 6:
          out.outputs.emplace_back();
          if (!parse_output(value, out.outputs.back())) {
            return false;
          }
          break;
        default: out.raw.push_back(value); break;
      }
    } else if (field >= 1 && field <= 7) {
      return false;  // a known field with the wrong wire type
    } else if (!r.skip(wire)) {
      return false;
    }
  }
  return valid_utf8(out.model_name) && valid_utf8(out.model_version) && valid_utf8(out.id);
}

// -- writing -------------------------------------------------------------------------------

inline void put_varint(std::string& out, std::uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

inline std::size_t varint_size(std::uint64_t value) {
  std::size_t n = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++n;
  }
  return n;
}

inline void put_key(std::string& out, std::uint32_t field, std::uint32_t wire) {
  put_varint(out, (static_cast<std::uint64_t>(field) << 3) | wire);
}

inline void put_bytes(std::string& out, std::uint32_t field, const char* data, std::size_t size) {
  put_key(out, field, 2);
  put_varint(out, size);
  out.append(data, size);
}

inline void put_string(std::string& out, std::uint32_t field, std::string_view text) {
  put_bytes(out, field, text.data(), text.size());
}

// One output of a response: its name, datatype, shape and raw bytes (a view).
struct OutputSlice {
  std::string_view name;
  std::string_view datatype;
  std::vector<std::int64_t> shape;
  const char* data = nullptr;
  std::size_t size = 0;
};

inline std::size_t tensor_size(const OutputSlice& o, std::size_t& packed) {
  packed = 0;
  for (const std::int64_t d : o.shape) {
    packed += varint_size(static_cast<std::uint64_t>(d));
  }
  std::size_t n = 0;
  for (const std::string_view text : {o.name, o.datatype}) {
    n += text.empty() ? 0 : 1 + varint_size(text.size()) + text.size();
  }
  if (!o.shape.empty()) {
    n += 1 + varint_size(packed) + packed;
  }
  return n;
}

// Appends a ModelInferResponse (fields in number order, empty proto3 strings and empty packed
// shapes left out, as upb writes them) to `out`.
inline void write_response(std::string& out, std::string_view model_name,
                           std::string_view model_version, std::string_view id,
                           const std::vector<OutputSlice>& outputs) {
  if (!model_name.empty()) {
    put_string(out, 1, model_name);
  }
  if (!model_version.empty()) {
    put_string(out, 2, model_version);
  }
  if (!id.empty()) {
    put_string(out, 3, id);
  }
  for (const OutputSlice& o : outputs) {
    std::size_t packed = 0;
    put_key(out, 5, 2);
    put_varint(out, tensor_size(o, packed));
    if (!o.name.empty()) {
      put_string(out, 1, o.name);
    }
    if (!o.datatype.empty()) {
      put_string(out, 2, o.datatype);
    }
    if (!o.shape.empty()) {
      put_key(out, 3, 2);
      put_varint(out, packed);
      for (const std::int64_t d : o.shape) {
        put_varint(out, static_cast<std::uint64_t>(d));
      }
    }
  }
  for (const OutputSlice& o : outputs) {
    put_bytes(out, 6, o.data, o.size);
  }
}

// The size write_response() appends, to reserve it once.
inline std::size_t response_size(std::string_view model_name, std::string_view model_version,
                                 std::string_view id, const std::vector<OutputSlice>& outputs) {
  const auto field = [](std::size_t len) { return 1 + varint_size(len) + len; };
  std::size_t n = 0;
  n += model_name.empty() ? 0 : field(model_name.size());
  n += model_version.empty() ? 0 : field(model_version.size());
  n += id.empty() ? 0 : field(id.size());
  for (const OutputSlice& o : outputs) {
    std::size_t packed = 0;
    n += field(tensor_size(o, packed)) + field(o.size);
  }
  return n;
}

}  // namespace tachyon::infer_wire
