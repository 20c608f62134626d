#include "gather_scatter.hpp"

#include "byte_sources.hpp"
#include "bytes_list.hpp"
#include "gil.hpp"
#include "numpy_alloc.hpp"
#include "py_buffer.hpp"
#include "spans.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace tachyon {

namespace {

// Reads `sizes` (any iterable of integers, numpy integers included) with the GIL held. A private
// tuple keeps every element alive while __index__ (possibly Python code) runs.
std::vector<std::size_t> read_sizes(nb::handle sizes) {
  nb::object items = nb::steal(PySequence_Tuple(sizes.ptr()));
  if (!items.is_valid()) {
    throw nb::python_error();
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(items.ptr());
  std::vector<std::size_t> out;
  out.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Py_ssize_t v = PyNumber_AsSsize_t(PyTuple_GET_ITEM(items.ptr(), i), PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) {
      throw nb::python_error();
    }
    if (v < 0) {
      throw nb::value_error(
          ("sizes[" + std::to_string(i) + "] is negative (" + std::to_string(v) + ")").c_str());
    }
    out.push_back(static_cast<std::size_t>(v));
  }
  return out;
}

}  // namespace

nb::object gather(nb::handle parts) {
  const ByteSources sources(parts, "parts", StrPolicy::kReject);
  const std::size_t total = sources.total_bytes();
  nb::object array = new_uint8_array(total);
  {
    const BufferView target(array.ptr(), Access::kWrite);
    ReleaseGilIf nogil(worth_releasing_gil(total));  // re-acquired before `target` is released
    copy_ranges(sources.ranges(), target.mutable_data());
  }
  return array;
}

std::size_t gather_into(nb::handle parts, nb::handle out) {
  const ByteSources sources(parts, "parts", StrPolicy::kReject);
  const BufferView target(out.ptr(), Access::kWrite);
  const std::size_t total = sources.total_bytes();
  if (total > target.size()) {
    throw nb::value_error(("out holds " + std::to_string(target.size()) + " bytes but parts need " +
                           std::to_string(total) + " bytes")
                              .c_str());
  }
  {
    ReleaseGilIf nogil(worth_releasing_gil(total));
    move_ranges(sources.ranges(), target.mutable_data());
  }
  return total;
}

nb::list scatter(nb::handle batch, nb::handle sizes) {
  const std::vector<std::size_t> byte_sizes = read_sizes(sizes);
  const BufferView source(batch.ptr(), Access::kRead);
  const std::size_t len = source.size();
  std::size_t total = 0;
  bool saturated = false;
  for (const std::size_t size : byte_sizes) {
    if (size > SIZE_MAX - total) {
      saturated = true;
      break;
    }
    total += size;
  }
  if (saturated || total > len) {
    throw nb::value_error(("sizes sum to " +
                           (saturated ? "more than " + std::to_string(SIZE_MAX)
                                      : std::to_string(total)) +
                           " bytes but the buffer holds only " + std::to_string(len) + " bytes")
                              .c_str());
  }
  std::vector<Span> spans;
  spans.reserve(byte_sizes.size());
  std::size_t offset = 0;
  for (const std::size_t size : byte_sizes) {
    spans.push_back(Span{offset, size});
    offset += size;
  }
  return bytes_list(source.data(), spans, total);
}

}  // namespace tachyon
