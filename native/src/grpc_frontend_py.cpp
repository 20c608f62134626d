#include "grpc_frontend_py.hpp"

#include "gil.hpp"
#include "grpc_frontend.hpp"
#include "grpc_wire.hpp"

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
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

// A call's kept request headers: ((name, value), ...) as latin-1 str (metadata as grpc.aio
// gives it), an empty tuple when there are none; None on items after a call's first.
PyObject* metadata_to_python(const ReadyItem& item) {
  if (!item.first) {
    return Py_NewRef(Py_None);
  }
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(item.metadata.size()));
  if (out == nullptr) {
    return nullptr;
  }
  for (std::size_t i = 0; i < item.metadata.size(); ++i) {
    const auto& [name, value] = item.metadata[i];
    PyObject* pair = Py_BuildValue("(NN)",
        PyUnicode_DecodeLatin1(name.data(), static_cast<Py_ssize_t>(name.size()), nullptr),
        PyUnicode_DecodeLatin1(value.data(), static_cast<Py_ssize_t>(value.size()), nullptr));
    if (pair == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), pair);
  }
  return out;
}

}  // namespace

// Builds [(call_id, method, message, kind, metadata), ...]. Large messages are copied into their
// bytes objects after all of them exist, with the GIL released.
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
    PyObject* tuple = PyTuple_New(5);
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
    PyObject* fields[5] = {
        PyLong_FromUnsignedLongLong(item.call_id),
        // Method names come from the client's :path; undecodable bytes must not raise here.
        PyUnicode_DecodeUTF8(item.method.data(), static_cast<Py_ssize_t>(item.method.size()),
                             "replace"),
        message,
        PyLong_FromLong(static_cast<long>(item.kind)),
        metadata_to_python(item),
    };
    bool failed = false;
    for (Py_ssize_t f = 0; f < 5; ++f) {
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

namespace {

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

// server._native.GrpcKeepalive: Triton's --grpc-keepalive-* / --grpc-http2-* flags (keepalive.hpp).
void register_keepalive(nb::module_& m) {
  using namespace nb::literals;
  using std::chrono::milliseconds;
  nb::class_<grpc::KeepaliveOptions>(
      m, "GrpcKeepalive",
      "Keepalive and PING policy of every connection, with grpc-core's server semantics and\n"
      "Triton's defaults (times in milliseconds).")
      .def(
          "__init__",
          [](grpc::KeepaliveOptions* self, long long time_ms, long long timeout_ms,
             bool permit_without_calls, int max_pings_without_data,
             long long min_recv_ping_interval_without_data_ms, int max_ping_strikes) {
            if (time_ms < 1 || timeout_ms < 1) {
              throw nb::value_error("keepalive time and timeout must be at least 1 ms");
            }
            if (max_pings_without_data < 0 || min_recv_ping_interval_without_data_ms < 0 ||
                max_ping_strikes < 0) {
              throw nb::value_error("PING limits must not be negative");
            }
            grpc::KeepaliveOptions options;
            options.time = milliseconds(time_ms);
            options.timeout = milliseconds(timeout_ms);
            options.permit_without_calls = permit_without_calls;
            options.max_pings_without_data = max_pings_without_data;
            options.min_recv_ping_interval_without_data =
                milliseconds(min_recv_ping_interval_without_data_ms);
            options.max_ping_strikes = max_ping_strikes;
            new (self) grpc::KeepaliveOptions(options);
          },
          "time_ms"_a = 7'200'000, "timeout_ms"_a = 20'000, "permit_without_calls"_a = false,
          "max_pings_without_data"_a = 2, "min_recv_ping_interval_without_data_ms"_a = 300'000,
          "max_ping_strikes"_a = 2)
      .def_prop_ro("time_ms", [](const grpc::KeepaliveOptions& o) { return o.time.count(); })
      .def_prop_ro("timeout_ms",
                   [](const grpc::KeepaliveOptions& o) { return o.timeout.count(); })
      .def_ro("permit_without_calls", &grpc::KeepaliveOptions::permit_without_calls)
      .def_ro("max_pings_without_data", &grpc::KeepaliveOptions::max_pings_without_data)
      .def_prop_ro("min_recv_ping_interval_without_data_ms",
                   [](const grpc::KeepaliveOptions& o) {
                     return o.min_recv_ping_interval_without_data.count();
                   })
      .def_ro("max_ping_strikes", &grpc::KeepaliveOptions::max_ping_strikes);
}

void register_grpc_frontend(nb::module_& m) {
  using namespace nb::literals;
  register_keepalive(m);
  nb::class_<GrpcFrontend>(
      m, "GrpcFrontend",
      "A gRPC server transport (HTTP/2 on nghttp2, cleartext or TLS) on its own I/O thread.\n\n"
      "Complete calls are queued as ready items and announced on ``fileno()``; the\n"
      "application drains them with ``take()`` and answers many calls per ``respond()``.\n"
      "gzip / deflate messages are inflated here; messages above ``max_message_bytes``\n"
      "(RESOURCE_EXHAUSTED), unknown encodings (UNIMPLEMENTED), expired grpc-timeouts\n"
      "(DEADLINE_EXCEEDED) and malformed framing are answered here, never delivered.")
      .def(
          "__init__",
          [](GrpcFrontend* self, const std::string& host, int port, std::size_t max_message_bytes,
             const std::string& service, const std::vector<std::string>& streaming_methods,
             const std::vector<std::string>& extra_services,
             const std::vector<std::string>& metadata_prefixes, const std::string& server_cert,
             const std::string& server_key, const std::string& root_cert, bool mutual,
             double tls_handshake_timeout_s, bool reuse_port, std::size_t max_connections,
             std::size_t max_buffered_bytes, std::size_t max_connection_buffered_bytes,
             const grpc::KeepaliveOptions& keepalive, std::size_t io_threads) {
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
            if (server_cert.empty() != server_key.empty()) {
              throw nb::value_error("TLS needs both server_cert and server_key");
            }
            if ((mutual || !root_cert.empty()) && server_cert.empty()) {
              throw nb::value_error("mutual TLS and root_cert need server_cert and server_key");
            }
            if (mutual && root_cert.empty()) {
              throw nb::value_error("mutual TLS needs root_cert, the CA client certificates "
                                    "are checked against");
            }
            if (!(tls_handshake_timeout_s > 0.0 && tls_handshake_timeout_s <= 3600.0)) {
              throw nb::value_error("tls_handshake_timeout_s must be in (0, 3600]");
            }
            for (const std::string& prefix : metadata_prefixes) {
              if (prefix.empty()) {
                throw nb::value_error("metadata_prefixes: an empty prefix would keep every "
                                      "header");
              }
            }
            grpc::FrontendOptions options;
            options.host = host;
            options.port = port;
            options.max_message_bytes = max_message_bytes;
            options.service = service;
            options.extra_services = extra_services;
            options.streaming_methods = streaming_methods;
            options.metadata_prefixes = metadata_prefixes;
            options.tls = {server_cert, server_key, root_cert, mutual};
            options.tls_handshake_timeout_s = tls_handshake_timeout_s;
            options.reuse_port = reuse_port;
            options.max_connections = max_connections;
            options.max_buffered_bytes = max_buffered_bytes;
            options.max_connection_buffered_bytes = max_connection_buffered_bytes;
            options.keepalive = keepalive;
            if (io_threads < 1 || io_threads > grpc::kMaxIoThreads) {
              throw nb::value_error(("io_threads must be 1.." +
                                     std::to_string(grpc::kMaxIoThreads) + ", got " +
                                     std::to_string(io_threads)).c_str());
            }
            options.io_threads = io_threads;
            // nanobind constructs bound objects in place, in storage it owns.
            new (self) GrpcFrontend(std::move(options));
          },
          "host"_a, "port"_a, "max_message_bytes"_a,
          "service"_a = "inference.GRPCInferenceService",
          "streaming_methods"_a = std::vector<std::string>{"ModelStreamInfer"},
          "extra_services"_a = std::vector<std::string>{},
          "metadata_prefixes"_a = std::vector<std::string>{}, "server_cert"_a = "",
          "server_key"_a = "", "root_cert"_a = "", "mutual"_a = false,
          "tls_handshake_timeout_s"_a = 10.0, "reuse_port"_a = false,
          "max_connections"_a = 10000, "max_buffered_bytes"_a = 0,
          "max_connection_buffered_bytes"_a = 0, "keepalive"_a = grpc::KeepaliveOptions(),
          "io_threads"_a = 1,
          "With server_cert and server_key (PEM files) the front end serves TLS 1.2+ and\n"
          "requires ALPN h2; with mutual, clients must present a certificate that chains to\n"
          "root_cert; a handshake not done within tls_handshake_timeout_s is disconnected.\n"
          "ValueError when a file does not load. Request headers whose names start\n"
          "with one of metadata_prefixes reach take() with the call's first item.\n"
          "reuse_port sets SO_REUSEPORT. Beyond max_connections (0: no limit) connections are\n"
          "closed with GOAWAY(ENHANCE_YOUR_CALM). Request bytes held for take(), in all and\n"
          "per connection, are bounded by max_buffered_bytes and\n"
          "max_connection_buffered_bytes (0: from max_message_bytes): beyond them a\n"
          "connection is not read until take() drains. keepalive: a GrpcKeepalive.\n"
          "io_threads: I/O threads, each with its own SO_REUSEPORT listener on the port;\n"
          "take() drains them all.")
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
          nb::sig("def take(self) -> list[tuple[int, str, bytes, int, "
                  "tuple[tuple[str, str], ...] | None]]"),
          "Drain the ready items (non-blocking): (call_id, method, message, kind, metadata) with\n"
          "kind 0 a unary request, 1 a message of a streaming call, 2 its client half-closed, 3\n"
          "the call is gone (client reset or disconnected, deadline passed, or failed in the\n"
          "transport): forget it. method is bare for the primary service,\n"
          "\"<service>/<method>\" else. metadata: on a call's first item, its request headers\n"
          "named by metadata_prefixes as ((name, value), ...), possibly empty; None on later\n"
          "items.")
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
      .def("active_calls", &GrpcFrontend::active_calls, "Calls whose HTTP/2 stream is open.")
      .def(
          "failure",
          [](const GrpcFrontend& fe) -> nb::object {
            const std::string failure = fe.failure();
            if (failure.empty()) {
              return nb::none();
            }
            return nb::str(failure.c_str(), failure.size());
          },
          nb::sig("def failure(self) -> str | None"),
          "Why the I/O thread stopped on its own (fileno() turns readable when it does), or\n"
          "None: nothing is served after a failure, the application should exit.")
      .def(
          "stats",
          [](const GrpcFrontend& fe) {
            const grpc::FrontendStats s = fe.stats();
            nb::dict out;
            out["connections"] = s.connections;
            out["paused_connections"] = s.paused_connections;
            out["buffered_bytes"] = s.buffered_bytes;
            return out;
          },
          nb::sig("def stats(self) -> dict[str, int]"),
          "The I/O thread's state as of its last turn: connections (open, closing included),\n"
          "paused_connections (not read until take() drains them), buffered_bytes (request\n"
          "bytes held for take(): messages arriving and complete ones not taken).")
      .def("inject_failure", &GrpcFrontend::inject_failure, "message"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "For tests: the I/O thread fails with `message` on its next turn.");
}

}  // namespace tachyon
