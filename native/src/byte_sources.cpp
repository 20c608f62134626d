#include "byte_sources.hpp"

#include <memory>
#include <stdexcept>
#include <string>

namespace tachyon {

namespace {

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

bool is_single_bytes_like(PyObject* obj) {
  return PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj) ||
         PyUnicode_Check(obj);
}

}  // namespace

ByteSources::ByteSources(nb::handle seq, const char* what, StrPolicy strs) {
  const bool allow_str = strs == StrPolicy::kUtf8;
  const char* expected = allow_str ? "bytes, bytearray, memoryview, str or another buffer"
                                   : "a bytes-like object (buffer protocol)";
  if (is_single_bytes_like(seq.ptr())) {
    throw nb::type_error((std::string(what) + " must be a sequence of " +
                          (allow_str ? "bytes/str elements" : "buffers") + ", not a single " +
                          type_name(seq.ptr()))
                             .c_str());
  }
  // A private tuple of the elements (the same object when `seq` is a tuple): whatever Python
  // code runs from here on (a __buffer__ method, a finalizer run by the garbage collector)
  // cannot drop an element whose bytes we point at, with or without the GIL.
  items_ = nb::steal(PySequence_Tuple(seq.ptr()));
  if (!items_.is_valid()) {
    const bool iterable = Py_TYPE(seq.ptr())->tp_iter != nullptr || PySequence_Check(seq.ptr());
    if (iterable || !PyErr_ExceptionMatches(PyExc_TypeError)) {
      throw nb::python_error();  // e.g. an exception raised by a generator
    }
    PyErr_Clear();
    throw nb::type_error((std::string(what) + " must be an iterable, not " +
                          type_name(seq.ptr()))
                             .c_str());
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(items_.ptr());
  ranges_.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(items_.ptr(), i);
    ByteRange range{};
    if (PyBytes_Check(item)) {
      range = {reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(item)),
               static_cast<std::size_t>(PyBytes_GET_SIZE(item))};
    } else if (PyUnicode_Check(item)) {
      if (!allow_str) {
        throw nb::type_error((std::string(what) + "[" + std::to_string(i) + "] must be " +
                              expected + ", not str")
                                 .c_str());
      }
      Py_ssize_t size = 0;
      const char* utf8 = PyUnicode_AsUTF8AndSize(item, &size);
      if (utf8 == nullptr) {
        throw nb::python_error();
      }
      range = {reinterpret_cast<const unsigned char*>(utf8), static_cast<std::size_t>(size)};
    } else if (PyObject_CheckBuffer(item)) {
      if (!views_) {
        views_ = std::make_unique<BufferView[]>(static_cast<std::size_t>(n - i));
      }
      BufferView& view = views_[views_used_];
      view.acquire(item, Access::kRead);
      ++views_used_;
      range = {view.data(), view.size()};
    } else {
      throw nb::type_error((std::string(what) + "[" + std::to_string(i) + "] must be " +
                            expected + ", not " + type_name(item))
                               .c_str());
    }
    // Each size is <= PY_SSIZE_T_MAX, so this comparison cannot itself overflow.
    if (range.size > static_cast<std::size_t>(PY_SSIZE_T_MAX) - total_) {
      throw std::overflow_error(std::string(what) + " hold more than PY_SSIZE_T_MAX bytes");
    }
    total_ += range.size;
    ranges_.push_back(range);
  }
}

}  // namespace tachyon
