#include "grpc_frontend_py.hpp"

#include "gil.hpp"
#include "grpc_frontend.hpp"
#include "grpc_wire.hpp"

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace tachyon {
namespace {

using grpc::GrpcFrontend;
using grpc::ReadyItem;
using grpc::Response;

constexpr long kMaxStatusCode = 16;  // UNAUTHENTICATED, the last gRPC status code

// Builds [(call_id, method, message, kind), ...]. Large messages are copied into their bytes
// objects after all of them exist, with the GIL released.
nb::list ready_items_to_python(const std::vector<ReadyItem>& items) {
  nb::list out = nb::steal<nb::list>(PyList_New(static_cast<Py_ssize_t>(items.size())));
  if (!out.is_valid()) {
    throw nb::python_error();
  }
  struct Deferred {
    char* dest;
    const std::string* source;
  };
  std::vector<Deferred> deferred;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const ReadyItem& item = items[i];
    PyObject* tuple = PyTuple_New(4);
    if (tuple == nullptr) {
      throw nb::python_error();
    }
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), tuple);  // freed with the list
    const auto size = static_cast<Py_ssize_t>(item.message.size());
    PyObject* message = nullptr;
    if (worth_releasing_gil(item.message.size())) {
      message = PyBytes_FromStringAndSize(nullptr, size);
      if (message != nullptr) {
        deferred.push_back({PyBytes_AS_STRING(message), &item.message});
      }
    } else {
      message = PyBytes_FromStringAndSize(item.message.data(), size);
    }
    PyObject* fields[4] = {
        PyLong_FromUnsignedLongLong(item.call_id),
        // Method names come from the client's :path; undecodable bytes must not raise here.
        PyUnicode_DecodeUTF8(item.method.data(), static_cast<Py_ssize_t>(item.method.size()),
                             "replace"),
        message,
        PyLong_FromLong(static_cast<long>(item.kind)),
    };
    bool failed = false;
    for (Py_ssize_t f = 0; f < 4; ++f) {
      failed = failed || fields[f] == nullptr;
      PyTuple_SET_ITEM(tuple, f, fields[f]);  // a null slot is allowed in a tuple being freed
    }
    if (failed) {
      throw nb::python_error();
    }
  }
  if (!deferred.empty()) {
    ReleaseGilIf nogil(true);  // every deferred copy is large
    for (const Deferred& d : deferred) {
      std::memcpy(d.dest, d.source->data(), d.source->size());
    }
  }
  return out;
}

std::uint64_t call_id_of(PyObject* obj) {
  const unsigned long long id = PyLong_AsUnsignedLongLong(obj);
  if (id == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
    throw nb::python_error();
  }
  return id;
}

// Converts the application's responses. A message of at least kGilReleaseBytes is framed
// after the loop, with the GIL released; `keep` holds those bytes objects meanwhile, so no
// other thread can free one by mutating the caller's sequence.
class ResponseBuilder {
 public:
  explicit ResponseBuilder(std::size_t count) { responses_.resize(count); }

  Response& at(std::size_t i) { return responses_[i]; }

  void set_message(std::size_t i, PyObject* message, const char* what) {
    if (message == Py_None) {
      return;
    }
    if (!PyBytes_Check(message)) {
      throw nb::type_error(
          (std::string(what) + ": a message must be bytes or None, got " +
           Py_TYPE(message)->tp_name)
              .c_str());
    }
    const auto size = static_cast<std::size_t>(PyBytes_GET_SIZE(message));
    if (size > UINT32_MAX) {
      throw nb::value_error((std::string(what) + ": a gRPC message holds at most 4294967295 "
                             "bytes, got " + std::to_string(size)).c_str());
    }
    if (worth_releasing_gil(size)) {
      keep_.push_back(nb::borrow(message));
      deferred_.push_back({i, PyBytes_AS_STRING(message), size});
      return;
    }
    responses_[i].framed = grpc_wire::frame(PyBytes_AS_STRING(message),
                                            static_cast<std::uint32_t>(size));
  }

  std::vector<Response> finish() {
    if (!deferred_.empty()) {
      ReleaseGilIf nogil(true);
      for (const Deferred& d : deferred_) {
        responses_[d.index].framed = grpc_wire::frame(d.data, static_cast<std::uint32_t>(d.size));
      }
    }
    return std::move(responses_);
  }

 private:
  struct Deferred {
    std::size_t index;
    const char* data;
    std::size_t size;
  };
  std::vector<Response> responses_;
  std::vector<nb::object> keep_;
  std::vector<Deferred> deferred_;
};

nb::object fast_sequence(nb::handle items, const char* what) {
  nb::object seq = nb::steal(PySequence_Fast(items.ptr(), what));
  if (!seq.is_valid()) {
    throw nb::python_error();
  }
  return seq;
}

PyObject* tuple_item(PyObject* item, Py_ssize_t size, const char* what) {
  if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != size) {
    throw nb::type_error(what);
  }
  return item;
}

void respond(GrpcFrontend& fe, nb::handle items) {
  static constexpr const char* kWhat =
      "respond() takes a sequence of (call_id, message | None, status, status_message) tuples";
  const nb::object seq = fast_sequence(items, kWhat);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  ResponseBuilder builder(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = tuple_item(PySequence_Fast_GET_ITEM(seq.ptr(), i), 4, kWhat);
    Response& r = builder.at(static_cast<std::size_t>(i));
    r.call_id = call_id_of(PyTuple_GET_ITEM(item, 0));
    r.final = true;
    const long status = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
    if (status == -1 && PyErr_Occurred() != nullptr) {
      throw nb::python_error();
    }
    if (status < 0 || status > kMaxStatusCode) {
      throw nb::value_error(
          ("respond(): status must be a gRPC status code 0..16, got " + std::to_string(status))
              .c_str());
    }
    r.status = static_cast<int>(status);
    PyObject* text = PyTuple_GET_ITEM(item, 3);
    Py_ssize_t text_size = 0;
    const char* utf8 = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &text_size) : nullptr;
    if (utf8 == nullptr) {
      if (PyErr_Occurred() == nullptr) {
        throw nb::type_error("respond(): status_message must be a str");
      }
      throw nb::python_error();
    }
    r.status_message.assign(utf8, static_cast<std::size_t>(text_size));
    if (status == 0) {  // an error status is answered trailers-only: no message
      builder.set_message(static_cast<std::size_t>(i), PyTuple_GET_ITEM(item, 1), "respond()");
    }
  }
  fe.respond(builder.finish());
}

void send_stream(GrpcFrontend& fe, nb::handle items) {
  static constexpr const char* kWhat =
      "send_stream() takes a sequence of (call_id, message) tuples";
  const nb::object seq = fast_sequence(items, kWhat);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  ResponseBuilder builder(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = tuple_item(PySequence_Fast_GET_ITEM(seq.ptr(), i), 2, kWhat);
    PyObject* message = PyTuple_GET_ITEM(item, 1);
    if (message == Py_None) {
      throw nb::type_error("send_stream(): a message must be bytes, got None");
    }
    builder.at(static_cast<std::size_t>(i)).call_id = call_id_of(PyTuple_GET_ITEM(item, 0));
    builder.set_message(static_cast<std::size_t>(i), message, "send_stream()");
  }
  fe.respond(builder.finish());
}

}  // namespace

void register_grpc_frontend(nb::module_& m) {
  using namespace nb::literals;
  nb::class_<GrpcFrontend>(
      m, "GrpcFrontend",
      "A gRPC server transport (cleartext HTTP/2, nghttp2) on its own I/O thread.\n\n"
      "Complete calls are queued as ready items and announced on ``fileno()``; the\n"
      "application drains them with ``take()`` and answers many calls per ``respond()``.\n"
      "gzip / deflate messages are inflated here; messages above ``max_message_bytes``\n"
      "(RESOURCE_EXHAUSTED), unknown encodings (UNIMPLEMENTED), expired grpc-timeouts\n"
      "(DEADLINE_EXCEEDED) and malformed framing are answered here, never delivered.")
      .def(
          "__init__",
          [](GrpcFrontend* self, const std::string& host, int port, std::size_t max_message_bytes,
             const std::string& service, const std::vector<std::string>& streaming_methods,
             const std::vector<std::string>& extra_services) {
            if (port < 0 || port > 65535) {
              throw nb::value_error(("port must be 0..65535, got " + std::to_string(port)).c_str());
            }
            if (max_message_bytes == 0) {
              throw nb::value_error("max_message_bytes must be positive");
            }
            // nanobind constructs bound objects in place, in storage it owns.
            if (service.empty() || service.find('/') != std::string::npos) {
              throw nb::value_error(("service must be a name without '/', got '" + service +
                                     "'").c_str());
            }
            for (const std::string& extra : extra_services) {
              if (extra.empty() || extra.find('/') != std::string::npos || extra == service) {
                throw nb::value_error(("extra_services: '" + extra + "' is not a service name "
                                       "other than the primary one").c_str());
              }
            }
            grpc::FrontendOptions options;
            options.host = host;
            options.port = port;
            options.max_message_bytes = max_message_bytes;
            options.service = service;
            options.extra_services = extra_services;
            options.streaming_methods = streaming_methods;
            // nanobind constructs bound objects in place, in storage it owns.
            new (self) GrpcFrontend(std::move(options));
          },
          "host"_a, "port"_a, "max_message_bytes"_a,
          "service"_a = "inference.GRPCInferenceService",
          "streaming_methods"_a = std::vector<std::string>{"ModelStreamInfer"},
          "extra_services"_a = std::vector<std::string>{})
      .def(
          "start",
          [](GrpcFrontend& fe) {
            try {
              fe.start();
            } catch (const std::system_error& e) {
              PyErr_SetObject(PyExc_OSError,
                              nb::make_tuple(e.code().value(), e.what()).ptr());
              throw nb::python_error();
            }
          },
          "Bind, listen and start the I/O thread. OSError when the address cannot be bound.")
      .def_prop_ro("port", &GrpcFrontend::port, "The bound port (the configured one before start).")
      .def("fileno", &GrpcFrontend::notify_fd,
           "An eventfd, readable while ready items wait; take() resets it.")
      .def(
          "take",
          [](GrpcFrontend& fe) {
            std::vector<ReadyItem> items;
            fe.take(items);
            return ready_items_to_python(items);
          },
          nb::sig("def take(self) -> list[tuple[int, str, bytes, int]]"),
          "Drain the ready items (non-blocking): (call_id, method, message, kind) with kind 0 a\n"
          "unary request, 1 a message of a streaming call, 2 its client half-closed, 3 the call\n"
          "is gone (client reset or disconnected, deadline passed, or failed in the transport):\n"
          "forget it. method is bare for the primary service, \"<service>/<method>\" else.")
      .def("respond", &respond, "items"_a,
           nb::sig("def respond(self, items: collections.abc.Sequence[tuple[int, bytes | None, "
                   "int, str]]) -> None"),
           "Finish calls: (call_id, message or None, status, status_message) each. A unary\n"
           "call gets its message then the status; status != 0 is sent trailers-only (the\n"
           "message is ignored). A streaming call gets the message (if any) after the ones sent\n"
           "with send_stream(), then the status. Unknown or finished calls are dropped.")
      .def("send_stream", &send_stream, "items"_a,
           nb::sig("def send_stream(self, items: collections.abc.Sequence[tuple[int, bytes]]) "
                   "-> None"),
           "Send (call_id, message) on streaming calls, keeping them open (also after the\n"
           "client half-closed, until respond() sends the final status).")
      .def("shutdown", &GrpcFrontend::shutdown, nb::call_guard<nb::gil_scoped_release>(),
           "Stop accepting; GOAWAY(2^31-1) and a PING, then on its ack (at most 1 s) the final\n"
           "GOAWAY: started calls go on, later streams are refused (REFUSED_STREAM).")
      .def("stop", &GrpcFrontend::stop, "grace_s"_a = 0.0,
           nb::call_guard<nb::gil_scoped_release>(),
           "shutdown(), wait up to grace_s seconds for open calls to finish and flush, then\n"
           "close every socket and join the I/O thread. Idempotent.")
      .def("active_calls", &GrpcFrontend::active_calls, "Calls whose HTTP/2 stream is open.");
}

}  // namespace tachyon
