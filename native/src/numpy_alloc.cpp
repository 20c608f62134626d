#include "numpy_alloc.hpp"

#include <stdexcept>

namespace tachyon {

namespace {

PyObject* numpy_empty = nullptr;  // leaked strong reference to numpy.empty
PyObject* numpy_uint8 = nullptr;  // leaked strong reference to numpy.uint8

}  // namespace

void init_numpy_alloc() {
  if (numpy_empty != nullptr) {
    return;
  }
  nb::module_ numpy = nb::module_::import_("numpy");
  nb::object empty = numpy.attr("empty");
  nb::object uint8 = numpy.attr("uint8");
  numpy_empty = empty.release().ptr();
  numpy_uint8 = uint8.release().ptr();
}

nb::object new_uint8_array(std::size_t size) {
  if (numpy_empty == nullptr) {
    throw std::runtime_error("server._native: numpy allocator used before initialisation");
  }
  nb::object length = nb::steal(PyLong_FromSize_t(size));
  if (!length.is_valid()) {
    throw nb::python_error();
  }
  PyObject* args[] = {length.ptr(), numpy_uint8};
  nb::object array = nb::steal(PyObject_Vectorcall(numpy_empty, args, 2, nullptr));
  if (!array.is_valid()) {
    throw nb::python_error();
  }
  return array;
}

}  // namespace tachyon
