// A gRPC server transport (cleartext HTTP/2 on nghttp2) that runs on its own I/O thread and
// hands complete calls to the embedding application in batches. Free of any Python dependency:
// the bindings (grpc_frontend_py.cpp) convert between these structs and Python objects.
//
// Threads: one I/O thread owns every socket, nghttp2 session and call. The application thread
// talks to it only through two queues guarded by one mutex: ready items (I/O -> application,
// announced on notify_fd()) and responses (application -> I/O, announced on an internal eventfd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tachyon::grpc {

// What a ready item tells the application.
enum class ItemKind : int {
  kUnary = 0,          // a whole unary request: answer it with one final Response
  kStreamMessage = 1,  // one request message of a streaming call (the call stays open)
  kHalfClosed = 2,     // the client of a streaming call will send no more messages
  kCancelled = 3,      // the call is gone (client reset or disconnected, or it failed in the
                       // transport): drop its state; responses to it are discarded
};

struct ReadyItem {
  std::uint64_t call_id;
  std::string method;   // the RPC name, without the "/<service>/" prefix
  std::string message;  // the request message (empty unless kind is kUnary / kStreamMessage)
  ItemKind kind;
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
  std::string service;                // e.g. "inference.GRPCInferenceService"
  std::vector<std::string> streaming_methods;  // bidirectional-streaming RPC names
};

class GrpcFrontend {
 public:
  // Creates the notification eventfd; opens no socket yet.
  explicit GrpcFrontend(FrontendOptions options);
  // Stops without grace (see stop()).
  ~GrpcFrontend();

  GrpcFrontend(const GrpcFrontend&) = delete;
  GrpcFrontend& operator=(const GrpcFrontend&) = delete;

  // Binds and listens (SO_REUSEADDR, SO_REUSEPORT), then starts the I/O thread. Throws
  // std::system_error when the address cannot be bound, std::logic_error when called twice.
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

  // Stops accepting connections and sends GOAWAY on every connection: calls already started
  // go on, new ones are refused. Non-blocking; idempotent.
  void shutdown();

  // shutdown(), then waits up to `grace_s` seconds for every connection to finish its calls
  // and flush, then closes every socket and joins the I/O thread. Blocks; idempotent.
  void stop(double grace_s);

  // Calls whose HTTP/2 stream is open (received, not yet closed).
  std::size_t active_calls() const;

  class Loop;  // the I/O thread's state (grpc_frontend.cpp)

 private:
  std::unique_ptr<Loop> loop_;
};

}  // namespace tachyon::grpc
