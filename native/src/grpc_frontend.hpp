// A gRPC server transport (HTTP/2 on nghttp2, cleartext or over TLS) that runs on its own I/O
// thread and hands complete calls to the embedding application in batches. Free of any Python
// dependency: the bindings (grpc_frontend_py.cpp) convert between these structs and Python
// objects.
//
// Threads: one I/O thread owns every socket, nghttp2 session and call. The application thread
// talks to it only through two queues guarded by one mutex: ready items (I/O -> application,
// announced on notify_fd()) and responses (application -> I/O, announced on an internal eventfd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "keepalive.hpp"
#include "tls.hpp"
#include "unique_fd.hpp"

namespace tachyon::grpc {

// What a ready item tells the application.
enum class ItemKind : int {
  kUnary = 0,          // a whole unary request: answer it with one final Response
  kStreamMessage = 1,  // one request message of a streaming call (the call stays open)
  kHalfClosed = 2,     // the client of a streaming call will send no more messages
  kCancelled = 3,      // the call is gone (client reset or disconnected, its grpc-timeout
                       // passed, or it failed in the transport): drop its state; responses to
                       // it are discarded
};

struct ReadyItem {
  std::uint64_t call_id;
  // The RPC: for the primary service its bare name ("ModelInfer"), for an extra service
  // "<service>/<method>" ("grpc.health.v1.Health/Check").
  std::string method;
  std::string message;  // the request message (empty unless kind is kUnary / kStreamMessage)
  ItemKind kind;
  // The call's request headers named by FrontendOptions::metadata_prefixes, in arrival order,
  // on its first item only (`first`): later items of a streaming call carry none.
  std::vector<std::pair<std::string, std::string>> metadata{};
  bool first = false;
};

// One response from the application to a call.
struct Response {
  std::uint64_t call_id = 0;
  std::string framed;  // one gRPC-framed message (grpc_wire::frame), or empty for none
  bool final = false;  // close the call with `status` after the message
  int status = 0;      // gRPC status code (final only)
  std::string status_message;
};

struct FrontendOptions {
  std::string host;
  int port = 0;  // 0: any free port (see GrpcFrontend::port())
  std::size_t max_message_bytes = 0;  // larger messages (either way): RESOURCE_EXHAUSTED
  std::string service;                // the primary service, e.g. "inference.GRPCInferenceService"
  std::vector<std::string> extra_services;  // more services, e.g. "grpc.health.v1.Health"
  // Streaming RPCs, named as ReadyItem::method names them. Any streaming kind (client, server or
  // bidirectional) is delivered alike: its messages, then its half-close.
  std::vector<std::string> streaming_methods;
  // Request headers kept for the application (ReadyItem::metadata): those whose name starts with
  // one of these, e.g. "triton-grpc-protocol-". A call carrying more than kMaxMetadataEntries of
  // them, or more than kMaxMetadataBytes (names and values), is refused (RESOURCE_EXHAUSTED).
  std::vector<std::string> metadata_prefixes;
  tls::ServerOptions tls;  // TLS when tls.enabled(); cleartext HTTP/2 otherwise
  // A TLS connection whose handshake is not done this long after accept is closed, so idle or
  // slow handshakes cannot pile up.
  double tls_handshake_timeout_s = 10.0;
  // SO_REUSEPORT: other processes may listen on the same port (--reuse-grpc-port).
  bool reuse_port = false;
  // Connections beyond this many are accepted and closed at once with GOAWAY(ENHANCE_YOUR_CALM,
  // "too many connections"); 0: no limit.
  std::size_t max_connections = 10000;
  // Request bytes held for the application (messages arriving, and complete ones not taken
  // yet), in total and per connection; 0: request_budget.hpp's default_budget(). Over either,
  // a connection is not read until the application takes what it holds.
  std::size_t max_buffered_bytes = 0;
  std::size_t max_connection_buffered_bytes = 0;
  KeepaliveOptions keepalive;
  // I/O threads, each with its own listener on the port (SO_REUSEPORT: the kernel spreads the
  // connections), epoll loop and connections; take() drains them all. max_connections is
  // shared out among them; each keeps the whole request byte budget.
  std::size_t io_threads = 1;
};

inline constexpr std::size_t kMaxIoThreads = 64;

inline constexpr std::size_t kMaxMetadataEntries = 64;
inline constexpr std::size_t kMaxMetadataBytes = 8192;

// A snapshot of the I/O thread's state, as of its last turn.
struct FrontendStats {
  std::size_t connections = 0;         // open ones, those closing included
  std::size_t paused_connections = 0;  // not read until the application takes what they hold
  std::size_t buffered_bytes = 0;      // request bytes held for the application
};

class GrpcFrontend {
 public:
  // Creates the notification eventfd and, with TLS, loads the certificates (throws
  // std::invalid_argument naming a file that does not load, or io_threads out of range);
  // opens no socket yet.
  explicit GrpcFrontend(FrontendOptions options);
  // Stops without grace (see stop()).
  ~GrpcFrontend();

  GrpcFrontend(const GrpcFrontend&) = delete;
  GrpcFrontend& operator=(const GrpcFrontend&) = delete;

  // Binds and listens (SO_REUSEADDR; SO_REUSEPORT with reuse_port), then starts the I/O
  // thread. Throws std::system_error when the address cannot be bound, std::logic_error when
  // called twice.
  void start();

  // The bound port (after start()), or the configured one before.
  int port() const;

  // An eventfd that is readable while ready items wait; take() resets it.
  int notify_fd() const;

  // Moves every waiting ready item into `out` (appended) and resets notify_fd(), both under the
  // queue lock, so notify_fd() is readable exactly while items wait. Never blocks on I/O.
  void take(std::vector<ReadyItem>& out);

  // Queues responses for the I/O thread and wakes it. Responses to unknown or finished calls
  // are dropped there.
  void respond(std::vector<Response>&& responses);

  // Stops accepting connections and shuts every connection down in two steps, as grpc-core does:
  // a GOAWAY with the last stream id 2^31-1 and a PING, then, once the PING is acknowledged (one
  // round trip, at most 1 s), a GOAWAY with the real last stream id. Calls that reached the
  // server before the second go on; streams opened after it get RST_STREAM(REFUSED_STREAM), which
  // clients retry elsewhere. Non-blocking; idempotent.
  void shutdown();

  // shutdown(), then waits up to `grace_s` seconds for every connection to finish its calls
  // and flush, then closes every socket and joins the I/O thread. Blocks; idempotent.
  void stop(double grace_s);

  // Calls whose HTTP/2 stream is open (received, not yet closed).
  std::size_t active_calls() const;

  // Why the I/O thread stopped on its own (an exception escaped its loop, epoll failed), or
  // empty while it runs or after a requested stop. Once set, notify_fd() is readable (take()
  // resets it) and nothing is served any more: the application should exit.
  std::string failure() const;

  FrontendStats stats() const;

  // For tests: the I/O thread fails with `message` on its next turn, as if its loop had thrown.
  void inject_failure(std::string message);

  class Loop;  // the I/O thread's state (grpc_frontend.cpp)

 private:
  UniqueFd notify_fd_;  // declared first: the loops signal it until they are gone
  std::vector<std::unique_ptr<Loop>> loops_;
};

}  // namespace tachyon::grpc
