#include "bytes_codec.hpp"

#include "byte_sources.hpp"
#include "bytes_list.hpp"
#include "bytes_wire.hpp"
#include "gil.hpp"
#include "py_buffer.hpp"
#include "spans.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace tachyon {

namespace {

// numpy arrays (of any dimension) are flattened in C order so that their elements, not their
// rows, are serialized. Lists and tuples skip the attribute probes.
nb::object flatten_if_array(nb::handle items) {
  PyObject* obj = items.ptr();
  if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
    return nb::borrow(items);
  }
  if (nb::hasattr(items, "__array_interface__") && nb::hasattr(items, "ravel")) {
    return items.attr("ravel")("C");
  }
  return nb::borrow(items);
}

void check_count(std::int64_t count) {
  if (count < -1) {
    throw nb::value_error(
        ("count must be -1 (all elements) or >= 0, got " + std::to_string(count)).c_str());
  }
}

// Scans `view` (releasing the GIL for large buffers); ValueError when malformed.
bytes_wire::ScanResult checked_scan(const BufferView& view, std::int64_t count,
                                    std::vector<Span>* spans) {
  bytes_wire::ScanResult result;
  {
    ReleaseGilIf nogil(worth_releasing_gil(view.size()));
    result = bytes_wire::scan(view.data(), view.size(), count, spans);
  }
  if (result.status != bytes_wire::ScanStatus::kOk) {
    throw nb::value_error(bytes_wire::describe(result, count, view.size()).c_str());
  }
  return result;
}

}  // namespace

nb::bytes encode_bytes(nb::handle items) {
  const nb::object seq = flatten_if_array(items);
  const ByteSources sources(seq, "items", StrPolicy::kUtf8);
  const std::vector<ByteRange>& ranges = sources.ranges();
  for (std::size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].size > bytes_wire::kMaxElementBytes) {
      throw nb::value_error(("items[" + std::to_string(i) + "] is " +
                             std::to_string(ranges[i].size) +
                             " bytes; a BYTES element holds at most 4294967295")
                                .c_str());
    }
  }
  const std::size_t prefixes = ranges.size() * bytes_wire::kPrefixBytes;
  if (sources.total_bytes() > static_cast<std::size_t>(PY_SSIZE_T_MAX) - prefixes) {
    throw std::overflow_error("encoded BYTES tensor would exceed PY_SSIZE_T_MAX bytes");
  }
  const std::size_t total = sources.total_bytes() + prefixes;
  nb::bytes out = nb::steal<nb::bytes>(
      PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total)));
  if (!out.is_valid()) {
    throw nb::python_error();
  }
  auto* dst = reinterpret_cast<unsigned char*>(PyBytes_AS_STRING(out.ptr()));
  {
    ReleaseGilIf nogil(worth_releasing_gil(total));
    for (const ByteRange& r : ranges) {
      bytes_wire::store_le32(dst, static_cast<std::uint32_t>(r.size));
      dst += bytes_wire::kPrefixBytes;
      if (r.size != 0) {
        std::memcpy(dst, r.data, r.size);
        dst += r.size;
      }
    }
  }
  return out;
}

nb::list decode_bytes(nb::handle buf, std::int64_t count) {
  check_count(count);
  const BufferView view(buf.ptr(), Access::kRead);
  std::vector<Span> spans;
  // Every element takes at least 4 bytes, which bounds the reservation whatever `count` says.
  const std::size_t most = view.size() / bytes_wire::kPrefixBytes;
  spans.reserve(count < 0 ? std::min<std::size_t>(most, 1024)
                          : std::min<std::size_t>(most, static_cast<std::uint64_t>(count)));
  const bytes_wire::ScanResult result = checked_scan(view, count, &spans);
  return bytes_list(view.data(), spans, result.payload_bytes);
}

std::size_t bytes_sizes(nb::handle buf) {
  const BufferView view(buf.ptr(), Access::kRead);
  return checked_scan(view, -1, nullptr).elements;
}

}  // namespace tachyon
