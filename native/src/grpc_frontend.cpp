#include "grpc_frontend.hpp"

#include "grpc_compression.hpp"
#include "grpc_wire.hpp"
#include "http2_limits.hpp"
#include "keepalive.hpp"
#include "request_budget.hpp"
#include "tls.hpp"
#include "unique_fd.hpp"

#include <nghttp2/nghttp2.h>

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

namespace tachyon::grpc {
namespace {

// Advertised to every client. Large windows (per stream and per connection) let a client send a
// whole multi-megabyte request without waiting for WINDOW_UPDATE round trips. The windows are
// given back (nghttp2_session_consume) as the application takes what arrived, not as it arrives,
// so a client that sends faster than the application takes calls is stopped by them.
constexpr std::uint32_t kMaxConcurrentStreams = 1024;
constexpr std::int32_t kWindowBytes = 16 << 20;
// take() wakes the I/O thread to give windows back once this much was taken since it last did
// (or at once while a connection waits for the budget); less waits for its next turn.
constexpr std::size_t kWakeOnTakeBytes = kWindowBytes / 4;
// accept() out of file descriptors (EMFILE, ENFILE) or memory: the listener rests this long
// instead of spinning on a readiness it cannot act on.
constexpr std::chrono::milliseconds kAcceptBackoff{100};

constexpr std::size_t kReadChunk = 256 * 1024;
// A connection reads at most this many chunks per wakeup; epoll is level-triggered, so the rest
// is read on the next turn, after the other connections had theirs.
constexpr int kMaxReadsPerWakeup = 16;
// Frames are gathered into one buffer of about this size per send().
constexpr std::size_t kWriteBatch = 256 * 1024;
// A stream's output buffer keeps its capacity between messages unless it grew past this.
constexpr std::size_t kKeepCapacity = 1 << 20;

// Shutdown: the final GOAWAY follows the first once the client acknowledged our PING, or after
// this long without an acknowledgement.
constexpr std::chrono::milliseconds kFinalGoawayAfter{1000};
constexpr std::uint8_t kShutdownPing[8] = {'t', 'a', 'c', 'h', 'y', 'o', 'n', 0};
constexpr std::uint8_t kKeepalivePing[8] = {'t', 'a', 'c', 'h', 'y', 'o', 'n', 1};
// A connection that ended cleanly half-closes (FIN) and reads what the client still sends for
// at most this long before closing, so that no RST can destroy answers it has not read yet.
constexpr std::chrono::milliseconds kLingerFor{2000};
// A grpc-timeout this long or longer is no deadline at all (it would overflow the clock).
constexpr std::chrono::hours kNoDeadlineFrom{24 * 365 * 100};
// The deadline heap is rebuilt without finished calls once it holds this many entries and
// four times as many as there are calls.
constexpr std::size_t kPruneDeadlinesFrom = 4096;

using Clock = std::chrono::steady_clock;
using grpc_compression::Encoding;

// epoll tags: connections are numbered from kFirstConnection on and never reuse a number, so a
// stale event for a closed connection finds nothing.
constexpr std::uint64_t kListenerTag = 0;
constexpr std::uint64_t kWakeTag = 1;
constexpr std::uint64_t kFirstConnection = 2;

struct SessionDeleter {
  void operator()(nghttp2_session* s) const { nghttp2_session_del(s); }
};
struct CallbacksDeleter {
  void operator()(nghttp2_session_callbacks* c) const { nghttp2_session_callbacks_del(c); }
};
using SessionPtr = std::unique_ptr<nghttp2_session, SessionDeleter>;
using CallbacksPtr = std::unique_ptr<nghttp2_session_callbacks, CallbacksDeleter>;
struct OptionDeleter {
  void operator()(nghttp2_option* o) const { nghttp2_option_del(o); }
};
using OptionPtr = std::unique_ptr<nghttp2_option, OptionDeleter>;

void signal_eventfd(int fd) {
  const std::uint64_t one = 1;
  // Fails only with EAGAIN when the counter would overflow, i.e. it is readable already.
  [[maybe_unused]] const ssize_t r = ::write(fd, &one, sizeof one);
}

void drain_eventfd(int fd) {
  std::uint64_t value = 0;
  [[maybe_unused]] const ssize_t r = ::read(fd, &value, sizeof value);  // EAGAIN when unset
}

UniqueFd make_eventfd() {
  UniqueFd fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!fd) {
    throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  return fd;
}

nghttp2_nv header(std::string_view name, std::string_view value) {
  // nghttp2 copies names and values when a frame is submitted (no NO_COPY flags).
  return nghttp2_nv{reinterpret_cast<std::uint8_t*>(const_cast<char*>(name.data())),
                    reinterpret_cast<std::uint8_t*>(const_cast<char*>(value.data())),
                    name.size(), value.size(), NGHTTP2_NV_FLAG_NONE};
}

struct Connection;

BudgetLimits budget_for(const FrontendOptions& options) {
  BudgetLimits limits = default_budget(options.max_message_bytes);
  if (options.max_buffered_bytes != 0) {
    limits.total = options.max_buffered_bytes;
  }
  if (options.max_connection_buffered_bytes != 0) {
    limits.per_connection = options.max_connection_buffered_bytes;
  }
  return limits;
}

// Runs a body of an nghttp2 callback: no exception may cross into C. One that escapes is a
// connection error (nghttp2 then fails the session and the connection is closed).
template <class Body>
auto guarded(Body&& body) noexcept -> decltype(body()) {
  try {
    return body();
  } catch (...) {
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
}

// The content-types of gRPC: application/grpc, optionally with +<codec> or ;<parameters>.
bool is_grpc_content_type(std::string_view type) {
  constexpr std::string_view kGrpc = "application/grpc";
  if (type.compare(0, kGrpc.size(), kGrpc) != 0) {
    return false;
  }
  return type.size() == kGrpc.size() || type[kGrpc.size()] == '+' || type[kGrpc.size()] == ';';
}

// One HTTP/2 stream carrying one gRPC call. Owned by its Connection; lives from the request
// HEADERS until nghttp2 closes the stream (or the connection goes).
struct Call {
  Call(std::uint64_t call_id, std::int32_t stream, Connection* owner, std::size_t max_message)
      : id(call_id), stream_id(stream), conn(owner), reader(max_message) {}

  const std::uint64_t id;
  const std::int32_t stream_id;
  Connection* const conn;

  // Request headers.
  std::string path;
  std::string http_method;
  std::string content_type;
  std::string encoding;         // grpc-encoding
  std::string accept_encoding;  // grpc-accept-encoding
  std::string timeout;          // grpc-timeout
  bool has_timeout = false;
  std::vector<std::pair<std::string, std::string>> metadata;  // kept for the application
  HeaderList header_list;  // over its limits: refused (RESOURCE_EXHAUSTED), fields not stored
  std::size_t metadata_bytes = 0;
  bool metadata_overflow = false;  // over kMaxMetadataEntries or kMaxMetadataBytes: refused

  // Request side.
  std::string method;  // RPC name, set once the headers validate
  bool streaming = false;
  grpc_wire::MessageReader reader;
  std::string unary_message;
  bool has_message = false;
  // DATA bytes received and not yet given back to the client's windows (nghttp2_session_consume).
  std::size_t unconsumed = 0;
  // Bytes of the message in progress held back while the connection has messages the
  // application has not taken (Connection::untaken); given back once it took them all.
  std::size_t owed = 0;
  bool delivered = false;      // the application has been told about this call
  bool done = false;           // the final status is decided; later input and responses dropped

  // Response side.
  Encoding respond_encoding = Encoding::kIdentity;  // what our messages are compressed with
  int http_status = 200;  // 415 for a request that is not gRPC
  bool headers_submitted = false;
  bool trailers_submitted = false;
  std::string out;  // framed messages not yet handed to nghttp2
  std::size_t out_off = 0;
  int status = grpc_wire::kOk;
  std::string status_message;
};

struct Connection {
  std::uint64_t tag = 0;
  UniqueFd fd;
  GrpcFrontend::Loop* loop = nullptr;
  std::unique_ptr<tls::Session> tls;  // null for cleartext HTTP/2
  // Declared after `calls`, so destroyed first: nghttp2 may point at calls until it is gone.
  std::unordered_map<std::int32_t, std::unique_ptr<Call>> calls;
  SessionPtr session;
  std::string wbuf;  // bytes from nghttp2 (encrypted, with TLS) not yet accepted by the socket
  std::size_t woff = 0;
  bool epollout = false;  // EPOLLOUT is in the interest set
  std::uint32_t events = EPOLLIN;  // the interest set (update_events())
  bool dirty = false;     // on the loop's flush list
  bool dead = false;      // close at the end of this turn
  // Request bytes this connection holds for the application (RequestBudget); over the budget it
  // is `paused`: not read (no EPOLLIN) until the application takes them.
  std::size_t held = 0;
  bool paused = false;
  Clock::time_point paused_since;
  std::size_t untaken = 0;  // items handed over (credits) the application has not taken yet
  std::size_t owing = 0;    // calls with Call::owed bytes
  // GOAWAY(ENHANCE_YOUR_CALM) submitted: nothing more is read; closed once it is flushed.
  bool calm = false;
  Clock::time_point calm_until;
  ResetRate resets;
  std::uint32_t continuations = 0;  // CONTINUATION frames since the last HEADERS
  std::optional<Keepalive> keepalive;
  // Finished cleanly: session and calls released, our side half-closed; reads are discarded
  // until the client closes or linger_until.
  bool lingering = false;
  Clock::time_point linger_until;

  // Shutdown (see GrpcFrontend::shutdown).
  enum class Goaway { kNone, kNotice, kFinal } goaway = Goaway::kNone;
  std::int32_t final_last_stream = 0;  // the last stream id of the final GOAWAY
  std::vector<std::int32_t> refused;   // streams begun after it, to refuse after this read

  Call* find(std::int32_t stream_id) {
    const auto it = calls.find(stream_id);
    return it == calls.end() ? nullptr : it->second.get();
  }
};

// Request bytes the application has been handed and not yet taken: `memory` held in the
// budget, `wire` bytes of the stream's DATA not yet given back to the windows.
struct Credit {
  std::uint64_t conn;  // Connection::tag
  std::int32_t stream_id;
  std::size_t memory;
  std::size_t wire;
};

}  // namespace

// The I/O thread and everything it owns. Members under "shared" are guarded by mu_; the rest
// is touched only by the I/O thread once start() has launched it.
class GrpcFrontend::Loop {
 public:
  // `notify_fd`: the front end's eventfd, shared by its loops (GrpcFrontend::take resets it);
  // call ids start at `first_call_id`, so that every loop's are distinct.
  Loop(FrontendOptions options, int notify_fd, std::uint64_t first_call_id)
      : options_(std::move(options)),
        notify_fd_(notify_fd),
        wake_fd_(make_eventfd()),
        budget_(budget_for(options_)) {
    next_call_id_ = first_call_id;
    prefix_ = "/" + options_.service + "/";
    services_ = options_.service;
    for (const std::string& extra : options_.extra_services) {
      services_ += ", " + extra;
    }
    if (options_.tls.enabled()) {
      tls_ = std::make_unique<tls::ServerContext>(options_.tls);
    }
  }

  ~Loop() { stop(0.0); }

  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // -- application thread ------------------------------------------------------------------

  // Binds `port` (0: any free one) and starts the I/O thread.
  void start(int port) {
    std::lock_guard<std::mutex> control(control_mu_);
    if (thread_.joinable() || stopped_) {
      throw std::logic_error("GrpcFrontend.start() may be called once");
    }
    listen(port);
    epoll_fd_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_fd_) {
      throw std::system_error(errno, std::generic_category(), "epoll_create1");
    }
    watch(listen_fd_.get(), kListenerTag, EPOLLIN);
    watch(wake_fd_.get(), kWakeTag, EPOLLIN);
    make_callbacks();
    thread_ = std::thread([this] { run_guarded(); });
  }

  int port() const { return bound_port_ != 0 ? bound_port_ : options_.port; }

  void take(std::vector<ReadyItem>& out) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (out.empty()) {
        out.swap(ready_);
      } else {
        std::move(ready_.begin(), ready_.end(), std::back_inserter(out));
        ready_.clear();
      }
      // The taken bytes are settled by the I/O thread on its next turn: at once when a
      // connection waits for the budget or enough window is due back, else whenever it wakes.
      if (!credits_pending_.empty()) {
        credits_taken_.insert(credits_taken_.end(), credits_pending_.begin(),
                              credits_pending_.end());
        credits_pending_.clear();
        taken_wire_ += pending_wire_;
        pending_wire_ = 0;
        wake = wake_on_take_ || taken_wire_ >= kWakeOnTakeBytes;
      }
    }
    if (wake) {
      signal_eventfd(wake_fd_.get());
    }
  }

  std::string failure() const {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }

  void inject_failure(std::string message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      injected_failure_ = message.empty() ? "injected failure" : std::move(message);
    }
    signal_eventfd(wake_fd_.get());
  }

  void respond(std::vector<Response>&& responses) {
    if (responses.empty()) {
      return;
    }
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The I/O thread empties the queue after every wakeup, so a non-empty queue means a
      // wakeup is already on its way.
      wake = outgoing_.empty();
      if (wake) {
        outgoing_.swap(responses);
      } else {
        std::move(responses.begin(), responses.end(), std::back_inserter(outgoing_));
      }
    }
    if (wake) {
      signal_eventfd(wake_fd_.get());
    }
  }

  void shutdown() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_requested_ = true;
    }
    signal_eventfd(wake_fd_.get());
  }

  void stop(double grace_s) {
    std::lock_guard<std::mutex> control(control_mu_);
    if (!thread_.joinable()) {
      stopped_ = true;
      return;
    }
    shutdown();
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Clamped: NaN or negative means none; a huge value must not overflow the clock.
      const double seconds = grace_s > 0.0 ? std::min(grace_s, 86400.0) : 0.0;
      const auto grace = std::chrono::duration<double>(seconds);
      drained_cv_.wait_for(lock, grace, [this] { return drained_; });
      exit_requested_ = true;
    }
    signal_eventfd(wake_fd_.get());
    thread_.join();
    stopped_ = true;
  }

  std::size_t active_calls() const { return active_calls_.load(std::memory_order_relaxed); }

  FrontendStats stats() const {
    FrontendStats stats;
    stats.connections = stat_connections_.load(std::memory_order_relaxed);
    stats.paused_connections = stat_paused_.load(std::memory_order_relaxed);
    stats.buffered_bytes = stat_buffered_.load(std::memory_order_relaxed);
    return stats;
  }

  // -- nghttp2 callbacks (I/O thread) ------------------------------------------------------
  // Each body runs under guarded(): an exception becomes a connection error, never crosses C.

  static int on_begin_frame(nghttp2_session* session, const nghttp2_frame_hd* hd, void* user) {
    auto* conn = static_cast<Connection*>(user);
    if (hd->type == NGHTTP2_HEADERS) {
      conn->continuations = 0;
    } else if (hd->type == NGHTTP2_CONTINUATION && ++conn->continuations > kMaxContinuations) {
      return NGHTTP2_ERR_CALLBACK_FAILURE;  // a CONTINUATION flood: the connection is closed
    }
    if (hd->type != NGHTTP2_HEADERS || conn->goaway != Connection::Goaway::kFinal ||
        hd->stream_id <= conn->final_last_stream || (hd->stream_id & 1) == 0 ||
        nghttp2_session_find_stream(session, hd->stream_id) != nullptr) {
      return 0;
    }
    // A new stream after the final GOAWAY: nghttp2 ignores it silently; we refuse it once this
    // read is processed (RST_STREAM is valid only after nghttp2 has seen the stream's HEADERS).
    return guarded([&] {
      conn->refused.push_back(hd->stream_id);
      return 0;
    });
  }

  static int on_begin_headers(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) {
      return 0;
    }
    return guarded([&] {
      auto* conn = static_cast<Connection*>(user);
      conn->loop->open_call(*conn, frame->hd.stream_id);
      return 0;
    });
  }

  static int on_header(nghttp2_session*, const nghttp2_frame* frame, const std::uint8_t* name,
                       std::size_t namelen, const std::uint8_t* value, std::size_t valuelen,
                       std::uint8_t, void* user) {
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) {
      return 0;
    }
    Call* call = static_cast<Connection*>(user)->find(frame->hd.stream_id);
    if (call == nullptr || !call->header_list.add(namelen, valuelen)) {
      return 0;  // over the header list's limits: headers_complete() refuses the call
    }
    return guarded([&] {
      const std::string_view n(reinterpret_cast<const char*>(name), namelen);
      const char* v = reinterpret_cast<const char*>(value);
      if (n == ":path") {
        call->path.assign(v, valuelen);
      } else if (n == ":method") {
        call->http_method.assign(v, valuelen);
      } else if (n == "content-type") {
        call->content_type.assign(v, valuelen);
      } else if (n == "grpc-encoding") {
        call->encoding.assign(v, valuelen);
      } else if (n == "grpc-accept-encoding") {
        call->accept_encoding.assign(v, valuelen);
      } else if (n == "grpc-timeout") {
        call->timeout.assign(v, valuelen);
        call->has_timeout = true;
      } else {
        call->conn->loop->keep_metadata(*call, n, std::string_view(v, valuelen));
      }
      return 0;
    });
  }

  static int on_frame_recv(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    auto* conn = static_cast<Connection*>(user);
    if (frame->hd.type == NGHTTP2_PING) {
      return guarded([&] {
        conn->loop->ping_received(*conn, frame->ping, (frame->hd.flags & NGHTTP2_FLAG_ACK) != 0);
        return 0;
      });
    }
    if (frame->hd.type == NGHTTP2_RST_STREAM) {
      return guarded([&] {
        conn->loop->reset_received(*conn);
        return 0;
      });
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) {
      return 0;
    }
    Call* call = conn->find(frame->hd.stream_id);
    if (call == nullptr) {
      return 0;
    }
    return guarded([&] {
      if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        conn->loop->headers_complete(*conn, *call);
      }
      if ((frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0) {
        conn->loop->request_ended(*conn, *call);
      }
      return 0;
    });
  }

  static int on_data_chunk(nghttp2_session*, std::uint8_t, std::int32_t stream_id,
                           const std::uint8_t* data, std::size_t len, void* user) {
    auto* conn = static_cast<Connection*>(user);
    return guarded([&] {
      Call* call = conn->find(stream_id);
      if (call == nullptr) {
        give_back(*conn, stream_id, len);  // nobody keeps these bytes
        return 0;
      }
      conn->loop->request_data(*conn, *call, data, len);
      return 0;
    });
  }

  static int on_stream_close(nghttp2_session*, std::int32_t stream_id, std::uint32_t, void* user) {
    return guarded([&] {
      auto* conn = static_cast<Connection*>(user);
      conn->loop->close_call(*conn, stream_id);
      return 0;
    });
  }

  // Hands nghttp2 the next piece of a call's response body; submits the trailers once the
  // final status is known and every byte went out.
  static ssize_t read_body(nghttp2_session* session, std::int32_t stream_id, std::uint8_t* buf,
                           std::size_t length, std::uint32_t* flags, nghttp2_data_source* source,
                           void*) {
    auto* call = static_cast<Call*>(source->ptr);
    const std::size_t n = std::min(length, call->out.size() - call->out_off);
    if (n != 0) {
      std::memcpy(buf, call->out.data() + call->out_off, n);
      call->out_off += n;
      call->conn->keepalive->sent_data();
    }
    if (call->out_off < call->out.size()) {
      return static_cast<ssize_t>(n);
    }
    if (call->out.capacity() > kKeepCapacity) {
      std::string().swap(call->out);
    } else {
      call->out.clear();
    }
    call->out_off = 0;
    if (!call->done) {
      // A stream with nothing more to send yet: resumed by pump() when the application sends.
      return n != 0 ? static_cast<ssize_t>(n) : static_cast<ssize_t>(NGHTTP2_ERR_DEFERRED);
    }
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    const int rc = guarded([&] { return submit_trailers(session, stream_id, *call); });
    if (rc != 0) {
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets this stream only
    }
    return static_cast<ssize_t>(n);
  }

 private:
  // -- setup -------------------------------------------------------------------------------

  void listen(int bind_port) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    const std::string port = std::to_string(bind_port);
    const char* host = options_.host.empty() ? nullptr : options_.host.c_str();
    const int rc = ::getaddrinfo(host, port.c_str(), &hints, &found);
    if (rc != 0) {
      throw std::system_error(EINVAL, std::generic_category(),
                              "cannot resolve " + options_.host + ": " + ::gai_strerror(rc));
    }
    const std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owned(found, &::freeaddrinfo);
    int error = EADDRNOTAVAIL;
    for (const addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
      UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                           ai->ai_protocol));
      if (!fd) {
        error = errno;
        continue;
      }
      const int on = 1;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
      if (options_.reuse_port) {
        // Several server processes may share the port (--reuse-grpc-port; ARCHITECTURE.md, 6).
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &on, sizeof on);
      }
      if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 ||
          ::listen(fd.get(), SOMAXCONN) != 0) {
        error = errno;
        continue;
      }
      sockaddr_storage addr{};
      socklen_t len = sizeof addr;
      if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
        bound_port_ = addr.ss_family == AF_INET6
                          ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                          : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
      }
      listen_fd_ = std::move(fd);
      return;
    }
    throw std::system_error(error, std::generic_category(),
                            "cannot bind gRPC to " + options_.host + ":" + port);
  }

  void watch(int fd, std::uint64_t tag, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = tag;
    if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
    }
  }

  void make_callbacks() {
    nghttp2_session_callbacks* callbacks = nullptr;
    if (nghttp2_session_callbacks_new(&callbacks) != 0) {
      throw std::bad_alloc();
    }
    callbacks_.reset(callbacks);
    nghttp2_session_callbacks_set_on_begin_frame_callback(callbacks, &Loop::on_begin_frame);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, &Loop::on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, &Loop::on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, &Loop::on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, &Loop::on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, &Loop::on_stream_close);
    nghttp2_option* option = nullptr;
    if (nghttp2_option_new(&option) != 0) {
      throw std::bad_alloc();
    }
    session_option_.reset(option);
    // Windows are given back as the application takes the bytes (give_back()). nghttp2's own
    // limits on resets and CONTINUATION frames (where this version has them) keep their
    // defaults; http2_limits.hpp's stricter ones hold on any version.
    nghttp2_option_set_no_auto_window_update(option, 1);
  }

  // -- the loop ----------------------------------------------------------------------------

  // Runs the loop; when it ends on its own (an exception), records why and makes notify_fd()
  // readable so that the application learns it (failure()).
  void run_guarded() {
    std::string failure;
    try {
      run();
    } catch (const std::exception& e) {
      failure = *e.what() != '\0' ? e.what() : "an exception without a message";
    } catch (...) {
      failure = "an exception that is not a std::exception";
    }
    if (!failure.empty()) {
      std::fprintf(stderr, "tachyon: gRPC front end I/O thread failed: %s\n", failure.c_str());
    }
    try {
      close_all();
    } catch (...) {  // out of memory while telling the application about the calls
    }
    std::lock_guard<std::mutex> lock(mu_);
    failure_ = std::move(failure);
    if (!failure_.empty()) {
      signal_eventfd(notify_fd_);
    }
    drained_ = true;
    drained_cv_.notify_all();
  }

  void run() {
    std::vector<epoll_event> events(256);
    rbuf_.resize(kReadChunk);
    if (tls_) {
      plain_.resize(tls::kPieceBytes);
    }
    for (;;) {
      const int n = ::epoll_wait(epoll_fd_.get(), events.data(), static_cast<int>(events.size()),
                                 next_timeout_ms());
      if (n < 0 && errno != EINTR) {
        throw std::system_error(errno, std::generic_category(), "epoll_wait");
      }
      now_ = Clock::now();
      for (int i = 0; i < n; ++i) {
        dispatch(events[static_cast<std::size_t>(i)]);
      }
      run_timers();
      publish();  // before writing: the application starts on new calls meanwhile
      std::vector<Response> responses;
      std::vector<Credit> taken;
      bool exit = false;
      bool shutdown = false;
      std::string injected;
      {
        std::lock_guard<std::mutex> lock(mu_);
        responses.swap(outgoing_);
        taken.swap(credits_taken_);
        taken_wire_ = 0;
        wake_on_take_ = !paused_.empty() || owing_calls_ != 0;
        exit = exit_requested_;
        shutdown = shutdown_requested_;
        injected.swap(injected_failure_);
      }
      if (exit) {
        return;
      }
      if (!injected.empty()) {
        throw std::runtime_error(injected);
      }
      settle(taken);
      resume_paused();
      if (shutdown && !shutting_down_) {
        begin_shutdown();
      }
      for (Response& r : responses) {
        apply_guarded(r);
      }
      flush_dirty();
      publish();  // cancellations found while writing
      stat_connections_.store(connections_.size(), std::memory_order_relaxed);
      stat_paused_.store(paused_.size(), std::memory_order_relaxed);
      stat_buffered_.store(budget_.total(), std::memory_order_relaxed);
      if (shutting_down_ && connections_.empty()) {  // lingering ones included
        std::lock_guard<std::mutex> lock(mu_);
        drained_ = true;
        drained_cv_.notify_all();
      }
    }
  }

  void dispatch(const epoll_event& ev) {
    // epoll_event is packed on x86-64 (data.u64 at offset 4): copy it out rather than bind a
    // reference to a misaligned field (undefined behaviour; UBSan flags it).
    const std::uint64_t tag = ev.data.u64;
    if (tag == kListenerTag) {
      accept_all();
      return;
    }
    if (tag == kWakeTag) {
      drain_eventfd(wake_fd_.get());
      return;
    }
    const auto it = connections_.find(tag);
    if (it == connections_.end()) {
      return;
    }
    Connection& conn = *it->second;
    if (conn.lingering) {
      discard_input(conn);
      return;
    }
    if ((conn.paused || conn.calm) && (ev.events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) != 0) {
      conn.dead = true;  // not being read, and the client is gone: nothing to wait for
    } else if ((ev.events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0) {
      read_from(conn);
    }
    mark_dirty(conn);  // readable: nghttp2 may owe frames; writable: the socket has room
  }

  void accept_all() {
    while (listen_fd_) {
      UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd) {
        if (errno == EINTR || errno == ECONNABORTED) {
          continue;
        }
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          rest_listener();  // the connection waits in the backlog until a descriptor frees
        }
        return;  // EAGAIN: accepted all
      }
      if (options_.max_connections != 0 && connections_.size() >= options_.max_connections) {
        refuse_connection(fd.get());
        continue;
      }
      const int on = 1;
      // Responses are small and latency-bound: never wait for Nagle's coalescing.
      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
      auto conn = std::make_unique<Connection>();
      conn->tag = next_tag_++;
      conn->loop = this;
      conn->fd = std::move(fd);
      if (tls_ && !start_tls(*conn)) {
        continue;
      }
      nghttp2_session* session = nullptr;
      if (nghttp2_session_server_new2(&session, callbacks_.get(), conn.get(),
                                      session_option_.get()) != 0) {
        continue;
      }
      conn->session.reset(session);
      conn->keepalive.emplace(options_.keepalive, now_);
      const nghttp2_settings_entry settings[] = {
          {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kMaxConcurrentStreams},
          {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<std::uint32_t>(kWindowBytes)},
          {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<std::uint32_t>(kMaxHeaderListBytes)},
      };
      if (nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, 3) != 0 ||
          nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, 0, kWindowBytes) != 0) {
        continue;
      }
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = conn->tag;
      if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, conn->fd.get(), &ev) != 0) {
        continue;  // out of memory (or of epoll watches): this connection only is dropped
      }
      Connection& ref = *conn;
      connections_.emplace(conn->tag, std::move(conn));
      mark_dirty(ref);  // our SETTINGS go out first
    }
  }

  void read_from(Connection& conn) {
    for (int i = 0; i < kMaxReadsPerWakeup && !conn.dead && !conn.calm; ++i) {
      if (!budget_.may_read(conn.held)) {
        pause(conn);
        return;
      }
      const ssize_t n = ::recv(conn.fd.get(), rbuf_.data(), rbuf_.size(), 0);
      if (n > 0) {
        conn.keepalive->heard(now_);
        if (!receive(conn, rbuf_.data(), static_cast<std::size_t>(n))) {
          conn.dead = true;  // bad preface, flood, a fatal protocol error, or TLS failed
        }
        refuse_new_streams(conn);
        if (static_cast<std::size_t>(n) < rbuf_.size()) {
          return;
        }
        continue;
      }
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;
      }
      conn.dead = true;  // EOF or a socket error: the client is gone
    }
  }

  // Hands bytes read from the socket to nghttp2, through TLS when the connection has it. False
  // when the connection must close.
  bool receive(Connection& conn, const std::uint8_t* data, std::size_t len) {
    if (!conn.tls) {
      return nghttp2_session_mem_recv(conn.session.get(), data, len) >= 0;
    }
    tls::Session& tls = *conn.tls;
    while (len != 0) {
      const std::size_t piece = std::min(len, tls::kPieceBytes);
      if (!tls.feed(data, piece)) {
        return false;
      }
      data += piece;
      len -= piece;
      while (const std::size_t n = tls.read(plain_.data(), plain_.size())) {
        if (nghttp2_session_mem_recv(conn.session.get(), plain_.data(), n) < 0) {
          return false;
        }
      }
    }
    switch (tls.state()) {
      case tls::Session::State::kHandshaking:
      case tls::Session::State::kOpen:
        return true;
      case tls::Session::State::kFailed:
        send_tls_remainder(conn);  // the alert that tells the client why
        return false;
      case tls::Session::State::kClosed:
        break;
    }
    return false;  // close_notify: the client is done, as at EOF
  }

  bool start_tls(Connection& conn) {
    conn.tls = tls_->accept();
    if (!conn.tls) {
      return false;
    }
    const auto timeout = std::chrono::duration<double>(options_.tls_handshake_timeout_s);
    handshakes_.push_back(
        {Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout), conn.tag});
    return true;
  }

  // Best effort, just before the connection closes or half-closes: what TLS still has to send
  // (an alert, close_notify), in one non-blocking send.
  void send_tls_remainder(Connection& conn) {
    std::string out;
    std::string scratch;
    if (conn.tls->seal(out, scratch) && !out.empty()) {
      [[maybe_unused]] const ssize_t n =
          ::send(conn.fd.get(), out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    }
  }

  void mark_dirty(Connection& conn) {
    if (!conn.dirty) {
      conn.dirty = true;
      dirty_.push_back(conn.tag);
    }
  }

  void flush_dirty() {
    // flush() may close streams whose callbacks mark nothing new, so one pass suffices.
    std::vector<std::uint64_t> tags;
    tags.swap(dirty_);
    for (const std::uint64_t tag : tags) {
      const auto it = connections_.find(tag);
      if (it == connections_.end()) {
        continue;
      }
      Connection& conn = *it->second;
      conn.dirty = false;
      if (conn.lingering) {
        continue;
      }
      const Flushed flushed = conn.dead ? Flushed::kFailed : flush(conn);
      if (flushed == Flushed::kFinished) {
        linger(conn);
      } else if (flushed == Flushed::kFailed) {
        close_connection(tag);
      }
    }
  }

  enum class Flushed { kOpen, kFinished, kFailed };

  // Writes what nghttp2 has for the connection until the socket is full. kFinished once both
  // sides are done (after a GOAWAY) and everything was handed to the socket.
  Flushed flush(Connection& conn) {
    nghttp2_session* session = conn.session.get();
    for (;;) {
      if (conn.woff < conn.wbuf.size()) {
        const ssize_t n = ::send(conn.fd.get(), conn.wbuf.data() + conn.woff,
                                 conn.wbuf.size() - conn.woff, MSG_NOSIGNAL);
        if (n > 0) {
          conn.woff += static_cast<std::size_t>(n);
          continue;
        }
        if (n < 0 && errno == EINTR) {
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
          set_epollout(conn, true);
          return Flushed::kOpen;
        }
        return Flushed::kFailed;
      }
      conn.wbuf.clear();
      conn.woff = 0;
      // Over TLS, HTTP/2 waits for the handshake (whose messages seal() gives meanwhile).
      const bool h2 = !conn.tls || conn.tls->state() == tls::Session::State::kOpen;
      while (h2 && conn.wbuf.size() < kWriteBatch) {
        const std::uint8_t* data = nullptr;
        const ssize_t n = nghttp2_session_mem_send(session, &data);
        if (n < 0) {
          return Flushed::kFailed;
        }
        if (n == 0) {
          break;
        }
        conn.wbuf.append(reinterpret_cast<const char*>(data), static_cast<std::size_t>(n));
      }
      if (conn.tls && !conn.tls->seal(conn.wbuf, tls_scratch_)) {
        return Flushed::kFailed;
      }
      if (conn.wbuf.empty()) {
        break;
      }
    }
    set_epollout(conn, false);
    // A calmed-down connection is finished once its GOAWAY is out.
    const bool open = !conn.calm && (nghttp2_session_want_read(session) != 0 ||
                                     nghttp2_session_want_write(session) != 0);
    return open ? Flushed::kOpen : Flushed::kFinished;
  }

  void set_epollout(Connection& conn, bool on) {
    conn.epollout = on;
    update_events(conn);
  }

  // EPOLLIN while the connection may be read (not paused for the budget, not calmed down),
  // else EPOLLRDHUP, to learn that the client left; EPOLLOUT while the socket refused some of
  // its bytes.
  void update_events(Connection& conn) {
    const bool read = conn.lingering || (!conn.paused && !conn.calm);
    const std::uint32_t events = (read ? EPOLLIN : EPOLLRDHUP) | (conn.epollout ? EPOLLOUT : 0u);
    if (events == conn.events) {
      return;
    }
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = conn.tag;
    ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, conn.fd.get(), &ev);
    conn.events = events;
  }

  // A cleanly finished connection: FIN now, close once the client closes too (or after
  // kLingerFor). Closing at once would answer the client's late frames (a WINDOW_UPDATE for
  // our last DATA, say) with RST, which may destroy answers it has not read yet.
  void linger(Connection& conn) {
    conn.session.reset();
    for (auto& entry : conn.calls) {
      forget(*entry.second);
    }
    conn.calls.clear();
    if (conn.tls) {
      conn.tls->close();
      send_tls_remainder(conn);  // close_notify
    }
    ::shutdown(conn.fd.get(), SHUT_WR);
    conn.lingering = true;
    set_epollout(conn, false);
    conn.linger_until = Clock::now() + kLingerFor;
    ++lingering_;
  }

  void discard_input(Connection& conn) {
    for (;;) {
      const ssize_t n = ::recv(conn.fd.get(), rbuf_.data(), rbuf_.size(), 0);
      if (n > 0) {
        continue;
      }
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;
      }
      close_connection(conn.tag);  // the client closed too (or the socket failed)
      return;
    }
  }

  void close_connection(std::uint64_t tag) {
    const auto it = connections_.find(tag);
    if (it == connections_.end()) {
      return;
    }
    Connection& conn = *it->second;
    if (conn.lingering) {
      --lingering_;
    }
    conn.session.reset();  // first: it may point at calls; deleting it calls no callback
    for (auto& entry : conn.calls) {
      forget(*entry.second);
    }
    conn.calls.clear();
    ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, conn.fd.get(), nullptr);
    connections_.erase(it);
  }

  void close_all() {
    std::vector<std::uint64_t> tags;
    tags.reserve(connections_.size());
    for (const auto& entry : connections_) {
      tags.push_back(entry.first);
    }
    for (const std::uint64_t tag : tags) {
      close_connection(tag);
    }
    publish();
    listen_fd_.reset();
  }

  void begin_shutdown() {
    shutting_down_ = true;
    if (listen_fd_) {
      ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, listen_fd_.get(), nullptr);
      listen_fd_.reset();
    }
    for (auto& entry : connections_) {
      Connection& conn = *entry.second;
      if (conn.lingering) {
        continue;
      }
      if (conn.tls && conn.tls->state() != tls::Session::State::kOpen) {
        conn.dead = true;  // still in its handshake: no call to finish
        mark_dirty(conn);
        continue;
      }
      nghttp2_session* session = conn.session.get();
      // First step: "stop opening streams soon" (last stream id 2^31-1), and a PING whose
      // acknowledgement tells that the client has seen it (on_frame_recv).
      if (nghttp2_submit_shutdown_notice(session) == 0 &&
          nghttp2_submit_ping(session, NGHTTP2_FLAG_NONE, kShutdownPing) == 0) {
        conn.goaway = Connection::Goaway::kNotice;
      } else {
        send_final_goaway(conn);
      }
      mark_dirty(conn);
    }
    final_goaway_at_ = Clock::now() + kFinalGoawayAfter;
    final_goaway_pending_ = true;
  }

  // Second step: streams up to the last one seen go on; later ones are refused (the client
  // opens them on a new connection).
  void send_final_goaway(Connection& conn) {
    if (conn.goaway == Connection::Goaway::kFinal || conn.lingering) {
      return;
    }
    nghttp2_session* session = conn.session.get();
    conn.final_last_stream = nghttp2_session_get_last_proc_stream_id(session);
    conn.goaway = Connection::Goaway::kFinal;
    if (nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE, conn.final_last_stream,
                              NGHTTP2_NO_ERROR, nullptr, 0) != 0) {
      conn.dead = true;
    }
    mark_dirty(conn);
  }

  void refuse_new_streams(Connection& conn) {
    for (const std::int32_t stream_id : conn.refused) {
      nghttp2_submit_rst_stream(conn.session.get(), NGHTTP2_FLAG_NONE, stream_id,
                                NGHTTP2_REFUSED_STREAM);
    }
    conn.refused.clear();
  }

  // -- timers ------------------------------------------------------------------------------

  // epoll_wait's timeout: until the earliest deadline or the final GOAWAY, rounded up.
  int next_timeout_ms() const {
    Clock::time_point next = Clock::time_point::max();
    if (!deadlines_.empty()) {
      next = deadlines_.front().at;
    }
    if (final_goaway_pending_) {
      next = std::min(next, final_goaway_at_);
    }
    if (lingering_ != 0) {
      next = std::min(next, Clock::now() + kLingerFor / 4);  // checked now and then
    }
    if (!handshakes_.empty()) {
      next = std::min(next, handshakes_.front().first);
    }
    if (!connections_.empty()) {
      next = std::min(next, next_sweep_);
    }
    if (listener_resting_) {
      next = std::min(next, listener_wakes_at_);
    }
    if (next == Clock::time_point::max()) {
      return -1;
    }
    const auto left = next - Clock::now();
    if (left <= Clock::duration::zero()) {
      return 0;
    }
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
    return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
  }

  void run_timers() {
    const Clock::time_point now = Clock::now();
    now_ = now;
    if (listener_resting_ && now >= listener_wakes_at_) {
      wake_listener();
    }
    if (now >= next_sweep_) {
      next_sweep_ = now + options_.keepalive.sweep_period();
      sweep();
    }
    if (final_goaway_pending_ && now >= final_goaway_at_) {
      final_goaway_pending_ = false;
      for (auto& entry : connections_) {
        send_final_goaway(*entry.second);  // no PING acknowledgement in time
      }
    }
    if (lingering_ != 0) {
      std::vector<std::uint64_t> expired;
      for (const auto& entry : connections_) {
        if (entry.second->lingering && entry.second->linger_until <= now) {
          expired.push_back(entry.first);
        }
      }
      for (const std::uint64_t tag : expired) {
        close_connection(tag);
      }
    }
    while (!handshakes_.empty() && handshakes_.front().first <= now) {
      const std::uint64_t tag = handshakes_.front().second;
      handshakes_.pop_front();
      const auto it = connections_.find(tag);
      if (it != connections_.end() && it->second->tls &&
          it->second->tls->state() == tls::Session::State::kHandshaking) {
        close_connection(tag);
      }
    }
    while (!deadlines_.empty() && deadlines_.front().at <= now) {
      std::pop_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
      const std::uint64_t call_id = deadlines_.back().call_id;
      deadlines_.pop_back();
      const auto it = call_index_.find(call_id);
      if (it != call_index_.end() && !it->second->done) {
        // grpc-core's words; the application is told to drop the call (kCancelled).
        fail(*it->second->conn, *it->second, grpc_wire::kDeadlineExceeded, "Deadline Exceeded");
      }
    }
  }

  void add_deadline(Call& call, std::chrono::nanoseconds timeout) {
    if (timeout >= kNoDeadlineFrom) {
      return;
    }
    if (deadlines_.size() >= kPruneDeadlinesFrom && deadlines_.size() > 4 * call_index_.size()) {
      // Entries of finished calls stay until they expire; drop them all at once.
      const auto gone = [this](const Deadline& d) { return call_index_.count(d.call_id) == 0; };
      deadlines_.erase(std::remove_if(deadlines_.begin(), deadlines_.end(), gone),
                       deadlines_.end());
      std::make_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
    }
    const auto at = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
    deadlines_.push_back({at, call.id});
    std::push_heap(deadlines_.begin(), deadlines_.end(), std::greater<>());
  }

  // Moves the items found in this turn to the application's queue; signals it on the
  // empty -> non-empty transition only (take() resets the signal under the same lock).
  void publish() {
    if (local_ready_.empty()) {
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    const bool signal = ready_.empty();
    if (signal) {
      ready_.swap(local_ready_);
    } else {
      std::move(local_ready_.begin(), local_ready_.end(), std::back_inserter(ready_));
    }
    local_ready_.clear();
    credits_pending_.insert(credits_pending_.end(), local_credits_.begin(), local_credits_.end());
    local_credits_.clear();
    pending_wire_ += local_wire_;
    local_wire_ = 0;
    if (signal) {
      signal_eventfd(notify_fd_);
    }
  }

  // -- flow control and budget -------------------------------------------------------------

  // What a call holds of its request: the message in progress, and a unary message waiting for
  // the end of the request.
  static std::size_t call_held(const Call& call) {
    const bool waiting = call.has_message && !call.delivered;
    return call.reader.buffered() + (waiting ? call.unary_message.size() : 0);
  }

  // A call needs no more of its request: what it holds leaves the budget, the bytes not yet
  // given back go back to the windows. Idempotent.
  void drop_request(Connection& conn, Call& call) {
    budget_.release(conn.held, call_held(call));
    call.reader.discard();
    if (!call.delivered) {
      std::string().swap(call.unary_message);
    }
    give_back(conn, call.stream_id, call.unconsumed + call.owed);
    call.unconsumed = 0;
    if (call.owed != 0) {
      call.owed = 0;
      --conn.owing;
      --owing_calls_;
    }
  }

  void owe(Connection& conn, Call& call, std::size_t n) {
    if (call.owed == 0) {
      ++conn.owing;
      ++owing_calls_;
    }
    call.owed += n;
  }

  // The application took everything the connection delivered: what its messages in progress
  // owe goes back to the windows.
  void repay(Connection& conn) {
    for (auto& entry : conn.calls) {
      Call& call = *entry.second;
      if (call.owed != 0) {
        give_back(conn, call.stream_id, call.owed);
        call.owed = 0;
        --owing_calls_;
      }
    }
    conn.owing = 0;
    mark_dirty(conn);
  }

  // Tells nghttp2 that `n` DATA bytes of a stream were consumed: its WINDOW_UPDATEs follow (for
  // the connection always, for the stream while it is open).
  static void give_back(Connection& conn, std::int32_t stream_id, std::size_t n) {
    nghttp2_session* session = conn.session.get();
    if (session == nullptr || n == 0) {
      return;
    }
    nghttp2_session_consume_connection(session, n);
    if (nghttp2_session_find_stream(session, stream_id) != nullptr) {
      nghttp2_session_consume_stream(session, stream_id, n);
    }
  }

  // What the application took leaves the budget, and its bytes go back to the windows.
  void settle(const std::vector<Credit>& taken) {
    for (const Credit& credit : taken) {
      const auto it = connections_.find(credit.conn);
      if (it == connections_.end()) {
        budget_.release_orphaned(credit.memory);
        continue;
      }
      Connection& conn = *it->second;
      budget_.release(conn.held, credit.memory);
      conn.untaken -= std::min<std::size_t>(conn.untaken, 1);
      if (credit.wire != 0) {
        give_back(conn, credit.stream_id, credit.wire);
        mark_dirty(conn);
      }
      if (conn.untaken == 0 && conn.owing != 0) {
        repay(conn);
      }
    }
  }

  // Over the budget: the connection is not read (TCP holds the client back) until resumed.
  void pause(Connection& conn) {
    if (!conn.paused) {
      conn.paused = true;
      conn.paused_since = now_;
      paused_.push_back(conn.tag);
      update_events(conn);
    }
  }

  void resume_paused() {
    auto keep = paused_.begin();
    for (const std::uint64_t tag : paused_) {
      const auto it = connections_.find(tag);
      if (it == connections_.end()) {
        continue;
      }
      Connection& conn = *it->second;
      if (!conn.lingering && !budget_.may_read(conn.held)) {
        *keep++ = tag;
        continue;
      }
      conn.paused = false;
      conn.keepalive->heard(now_);  // it could not answer PINGs while it was not read
      update_events(conn);          // level-triggered: what waits is reported at once
    }
    paused_.erase(keep, paused_.end());
  }

  // -- abuse -------------------------------------------------------------------------------

  void reset_received(Connection& conn) {
    if (conn.resets.record(now_)) {
      calm_down(conn, "too many streams reset");  // HTTP/2 rapid reset (CVE-2023-44487)
    }
  }

  void ping_received(Connection& conn, const nghttp2_ping& ping, bool ack) {
    if (!ack) {
      if (conn.keepalive->received_ping(now_, !conn.calls.empty())) {
        calm_down(conn, "too_many_pings");  // grpc-core's words: its clients back off on them
      }
      return;
    }
    if (std::memcmp(ping.opaque_data, kShutdownPing, sizeof kShutdownPing) == 0) {
      send_final_goaway(conn);
    }
  }

  // GOAWAY(ENHANCE_YOUR_CALM) with `why` as its debug data; the connection is read no more and
  // closes once the GOAWAY is flushed (or kLingerFor later, should the client not read it).
  void calm_down(Connection& conn, std::string_view why) {
    if (conn.calm || conn.lingering || !conn.session) {
      return;
    }
    conn.calm = true;
    conn.calm_until = now_ + kLingerFor;
    nghttp2_session* session = conn.session.get();
    if (nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(session),
                              NGHTTP2_ENHANCE_YOUR_CALM,
                              reinterpret_cast<const std::uint8_t*>(why.data()), why.size()) != 0) {
      conn.dead = true;
    }
    update_events(conn);
    mark_dirty(conn);
  }

  // A connection over max_connections: our SETTINGS and GOAWAY(ENHANCE_YOUR_CALM, "too many
  // connections"), in one non-blocking send, then close. The client sees why and retries.
  static void refuse_connection(int fd) {
    static constexpr char kWhy[] = "too many connections";
    constexpr std::uint32_t kGoawayLength = 8 + sizeof kWhy - 1;
    std::uint8_t frames[9 + 9 + kGoawayLength] = {
        0, 0, 0, NGHTTP2_SETTINGS, 0, 0, 0, 0, 0,  // an empty SETTINGS frame
        0, 0, static_cast<std::uint8_t>(kGoawayLength), NGHTTP2_GOAWAY, 0, 0, 0, 0, 0,
        0, 0, 0, 0,                                 // last stream id: none
        0, 0, 0, NGHTTP2_ENHANCE_YOUR_CALM};
    std::memcpy(frames + 9 + 9 + 8, kWhy, sizeof kWhy - 1);
    [[maybe_unused]] const ssize_t n = ::send(fd, frames, sizeof frames, MSG_NOSIGNAL | MSG_DONTWAIT);
    ::shutdown(fd, SHUT_WR);
  }

  // accept() failed for want of descriptors or memory: stop polling the listener for a while
  // (level-triggered, it would report the waiting connection again at once, in a busy loop).
  void rest_listener() {
    epoll_event ev{};
    ev.data.u64 = kListenerTag;
    if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, listen_fd_.get(), &ev) == 0) {
      listener_resting_ = true;
      listener_wakes_at_ = now_ + kAcceptBackoff;
    }
  }

  void wake_listener() {
    listener_resting_ = false;
    if (listen_fd_) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kListenerTag;
      ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, listen_fd_.get(), &ev);
    }
  }

  // Keepalive PINGs due, connections whose acknowledgement did not come, calmed-down ones that
  // did not flush their GOAWAY in time: every connection, every KeepaliveOptions::sweep_period().
  void sweep() {
    std::vector<std::uint64_t> expired;
    for (auto& entry : connections_) {
      Connection& conn = *entry.second;
      if (conn.lingering || !conn.session) {
        continue;  // timed by linger_until
      }
      if (conn.paused) {
        // Not read, it cannot show it is alive (even its FIN waits behind the bytes we do not
        // read): paused for longer than the keepalive timeout, it is closed and what it holds
        // freed. The application drains a paused connection quickly unless it holds only
        // messages that stopped arriving, or the budget is held by such connections.
        if (now_ - conn.paused_since >= options_.keepalive.timeout) {
          expired.push_back(entry.first);
        }
        continue;
      }
      if (conn.calm) {
        if (now_ >= conn.calm_until) {
          expired.push_back(entry.first);
        }
        continue;
      }
      switch (conn.keepalive->due(now_, !conn.calls.empty())) {
        case Keepalive::Due::kNothing:
          break;
        case Keepalive::Due::kPing:
          if (nghttp2_submit_ping(conn.session.get(), NGHTTP2_FLAG_NONE, kKeepalivePing) == 0) {
            conn.keepalive->ping_sent(now_);
            mark_dirty(conn);
          }
          break;
        case Keepalive::Due::kDead:
          expired.push_back(entry.first);  // keepalive watchdog: the client is gone
          break;
      }
    }
    for (const std::uint64_t tag : expired) {
      close_connection(tag);
    }
  }

  // -- calls -------------------------------------------------------------------------------

  void open_call(Connection& conn, std::int32_t stream_id) {
    const std::uint64_t id = next_call_id_++;
    auto call = std::make_unique<Call>(id, stream_id, &conn, options_.max_message_bytes);
    call_index_[id] = call.get();
    conn.calls[stream_id] = std::move(call);
    active_calls_.store(call_index_.size(), std::memory_order_relaxed);
  }

  void close_call(Connection& conn, std::int32_t stream_id) {
    const auto it = conn.calls.find(stream_id);
    if (it == conn.calls.end()) {
      return;
    }
    forget(*it->second);
    conn.calls.erase(it);
  }

  // Drops a call from the index, telling the application when it still expects an answer.
  void forget(Call& call) {
    if (call.delivered && !call.done) {
      local_ready_.push_back({call.id, call.method, std::string(), ItemKind::kCancelled});
    }
    call.done = true;
    drop_request(*call.conn, call);
    call_index_.erase(call.id);
    active_calls_.store(call_index_.size(), std::memory_order_relaxed);
  }

  // Keeps a request header the application asked for (metadata_prefixes), within the bounds.
  void keep_metadata(Call& call, std::string_view name, std::string_view value) {
    for (const std::string& prefix : options_.metadata_prefixes) {
      if (name.substr(0, prefix.size()) != prefix) {
        continue;
      }
      call.metadata_bytes += name.size() + value.size();
      if (call.metadata.size() >= kMaxMetadataEntries || call.metadata_bytes > kMaxMetadataBytes) {
        call.metadata_overflow = true;
        return;
      }
      call.metadata.emplace_back(name, value);
      return;
    }
  }

  // Queues an item for the application; a call's first carries its kept request headers.
  void deliver(Call& call, std::string&& message, ItemKind kind) {
    // The message stays in the budget, and the bytes that brought it out of the windows, until
    // the application takes it (settle()).
    local_credits_.push_back({call.conn->tag, call.stream_id, message.size(), call.unconsumed});
    local_wire_ += call.unconsumed;
    call.unconsumed = 0;
    ++call.conn->untaken;
    local_ready_.push_back({call.id, call.method, std::move(message), kind});
    if (!call.delivered) {
      local_ready_.back().metadata = std::move(call.metadata);
      local_ready_.back().first = true;
      call.delivered = true;
    }
  }

  void headers_complete(Connection& conn, Call& call) {
    if (call.header_list.over()) {
      fail(conn, call, grpc_wire::kResourceExhausted,
           "the request's header list is over the limit of " +
               std::to_string(kMaxHeaderFields) + " fields and " +
               std::to_string(kMaxHeaderListBytes) + " bytes (names, values and 32 per field)");
      return;
    }
    if (call.http_method != "POST") {
      fail(conn, call, grpc_wire::kUnimplemented,
           "gRPC calls use POST, not '" + call.http_method + "'");
      return;
    }
    if (!is_grpc_content_type(call.content_type)) {
      // PROTOCOL-HTTP2.md: HTTP 415, so that no HTTP client takes the answer for a success
      // (grpc-go adds grpc-status INTERNAL; so do we).
      call.http_status = 415;
      fail(conn, call, grpc_wire::kInternal,
           "invalid gRPC request content-type '" + call.content_type + "'");
      return;
    }
    if (call.metadata_overflow) {
      std::string names;
      for (const std::string& prefix : options_.metadata_prefixes) {
        names += (names.empty() ? "'" : ", '") + prefix + "*'";
      }
      fail(conn, call, grpc_wire::kResourceExhausted,
           "too much request metadata: at most " + std::to_string(kMaxMetadataEntries) +
               " headers named " + names + ", of " + std::to_string(kMaxMetadataBytes) +
               " bytes in all");
      return;
    }
    if (call.has_timeout) {
      const auto timeout = grpc_wire::parse_timeout(call.timeout);
      if (!timeout) {
        // grpc-go answers a malformed grpc-timeout with INTERNAL too.
        fail(conn, call, grpc_wire::kInternal,
             "malformed grpc-timeout '" + call.timeout +
                 "': expected 1 to 8 digits and a unit (H, M, S, m, u or n)");
        return;
      }
      add_deadline(call, *timeout);
    }
    if (!route(call)) {
      fail(conn, call, grpc_wire::kUnimplemented,
           "unknown method '" + call.path + "': this server implements " + services_);
      return;
    }
    call.streaming = std::find(options_.streaming_methods.begin(), options_.streaming_methods.end(),
                               call.method) != options_.streaming_methods.end();
    const Encoding encoding = grpc_compression::parse_encoding(call.encoding);
    call.reader.set_encoding(encoding, call.encoding);
    // Answer in the request's encoding when the client accepts it, as grpc-core servers do.
    if ((encoding == Encoding::kGzip || encoding == Encoding::kDeflate) &&
        grpc_compression::accepts(call.accept_encoding, encoding)) {
      call.respond_encoding = encoding;
    }
  }

  // Sets call.method from its :path: the bare RPC name for the primary service,
  // "<service>/<method>" for an extra one. False for any other path.
  bool route(Call& call) const {
    const std::string& path = call.path;
    if (path.size() > prefix_.size() && path.compare(0, prefix_.size(), prefix_) == 0) {
      if (path.find('/', prefix_.size()) != std::string::npos) {
        return false;
      }
      call.method = path.substr(prefix_.size());
      return true;
    }
    const std::size_t slash = path.find('/', 1);
    if (path.empty() || path[0] != '/' || slash == std::string::npos || slash + 1 >= path.size() ||
        path.find('/', slash + 1) != std::string::npos) {
      return false;
    }
    const std::string_view service(path.data() + 1, slash - 1);
    for (const std::string& extra : options_.extra_services) {
      if (extra == service) {
        call.method = path.substr(1);
        return true;
      }
    }
    return false;
  }

  void request_data(Connection& conn, Call& call, const std::uint8_t* data, std::size_t len) {
    call.unconsumed += len;
    if (call.done) {
      drop_request(conn, call);  // already answered: the rest is read, dropped and given back
      return;
    }
    bool extra = false;
    grpc_wire::ReadError error;
    const std::size_t before = call.reader.buffered();
    try {
      error = call.reader.feed(data, len, [&](std::string&& message) {
        if (call.streaming) {
          budget_.add(conn.held, message.size());
          deliver(call, std::move(message), ItemKind::kStreamMessage);
        } else if (call.has_message) {
          extra = true;
        } else {
          budget_.add(conn.held, message.size());
          call.unary_message = std::move(message);
          call.has_message = true;
        }
      });
    } catch (const std::bad_alloc&) {
      error = {grpc_wire::kResourceExhausted, "the server is out of memory for this message"};
    }
    // The message in progress counts as held. Its bytes go back to the windows at once while
    // the application has taken everything this connection delivered, else once it has: held
    // back for good, a message larger than the windows (or several interleaved) could never
    // complete; given back regardless, a client could send on while the application falls
    // behind. The budget, not the windows, bounds what arrives meanwhile.
    budget_.release(conn.held, before);
    budget_.add(conn.held, call.reader.buffered());
    if (!call.reader.at_boundary() && call.unconsumed != 0) {
      if (conn.untaken == 0) {
        give_back(conn, call.stream_id, call.unconsumed);
      } else {
        owe(conn, call, call.unconsumed);
      }
      call.unconsumed = 0;
    }
    if (error) {
      fail(conn, call, error.code, error.message);
    } else if (extra) {
      fail(conn, call, grpc_wire::kUnimplemented,
           call.method + " is a unary call but the client sent more than one request message");
    }
  }

  void request_ended(Connection& conn, Call& call) {
    if (call.done) {
      return;
    }
    if (!call.reader.at_boundary()) {
      fail(conn, call, grpc_wire::kInternal, "the request ended in the middle of a message");
      return;
    }
    if (call.streaming) {
      deliver(call, std::string(), ItemKind::kHalfClosed);
      return;
    }
    if (!call.has_message) {
      fail(conn, call, grpc_wire::kUnimplemented,
           call.method + " is a unary call but the client sent no request message");
      return;
    }
    deliver(call, std::move(call.unary_message), ItemKind::kUnary);
  }

  // Ends a call from here with an error status; the application, if it knew the call, is told
  // to forget it.
  void fail(Connection& conn, Call& call, int code, std::string message) {
    if (call.done) {
      return;
    }
    if (call.delivered) {
      local_ready_.push_back({call.id, call.method, std::string(), ItemKind::kCancelled});
    }
    call.done = true;
    call.status = code;
    call.status_message = std::move(message);
    drop_request(conn, call);
    // The rest of the request is read and dropped rather than refused with RST_STREAM
    // (NO_ERROR): grpc-core clients still writing their message report such a reset as
    // INTERNAL "Stream removed" instead of the status sent just before it.
    pump(conn, call);
    mark_dirty(conn);
  }

  // apply(), with a failure (out of memory) ending that call instead of the I/O thread.
  void apply_guarded(Response& r) {
    try {
      apply(r);
    } catch (const std::exception&) {
      const auto it = call_index_.find(r.call_id);
      if (it != call_index_.end()) {
        fail(*it->second->conn, *it->second, grpc_wire::kInternal,
             "the server could not send its answer (out of memory)");
      }
    }
  }

  // Replaces a framed message by its compressed form, when that is smaller.
  static void compress_framed(Encoding encoding, std::string& framed) {
    std::string packed;
    const std::size_t size = framed.size() - grpc_wire::kPrefixBytes;
    if (!grpc_compression::deflate(encoding, framed.data() + grpc_wire::kPrefixBytes, size,
                                   packed)) {
      return;  // not smaller: sent uncompressed (compressed flag 0), as grpc-core does
    }
    char prefix[grpc_wire::kPrefixBytes];
    grpc_wire::write_prefix(prefix, static_cast<std::uint32_t>(packed.size()), true);
    framed.assign(prefix, grpc_wire::kPrefixBytes);
    framed.append(packed);
  }

  void apply(Response& r) {
    const auto it = call_index_.find(r.call_id);
    if (it == call_index_.end()) {
      return;  // the call is gone (client reset or disconnected): dropped silently
    }
    Call& call = *it->second;
    Connection& conn = *call.conn;
    if (call.done) {
      return;
    }
    if (!r.framed.empty()) {
      const std::size_t size = r.framed.size() - grpc_wire::kPrefixBytes;
      if (size > options_.max_message_bytes) {
        // grpc-core's wording for its own send limit.
        r.final = true;
        r.status = grpc_wire::kResourceExhausted;
        r.status_message = "Sent message larger than max (" + std::to_string(size) + " vs. " +
                           std::to_string(options_.max_message_bytes) + ")";
      } else {
        if (call.respond_encoding != Encoding::kIdentity) {
          compress_framed(call.respond_encoding, r.framed);
        }
        if (call.out.empty()) {
          call.out = std::move(r.framed);
          call.out_off = 0;
        } else {
          call.out.append(r.framed);
        }
      }
    }
    if (r.final) {
      call.done = true;
      call.status = r.status;
      call.status_message = std::move(r.status_message);
    }
    pump(conn, call);
    mark_dirty(conn);
  }

  // Gives nghttp2 whatever the call has to send: the response HEADERS (with a body provider),
  // a trailers-only response, or a nudge to a deferred body.
  void pump(Connection& conn, Call& call) {
    nghttp2_session* session = conn.session.get();
    if (call.trailers_submitted) {
      return;
    }
    if (call.headers_submitted) {
      nghttp2_session_resume_data(session, call.stream_id);  // fails harmlessly if not deferred
      return;
    }
    if (call.out.empty()) {
      if (call.done) {
        submit_trailers_only(session, call);
        conn.keepalive->sent_data();
      }
      return;  // a stream with nothing to send yet
    }
    const nghttp2_nv headers[] = {
        header(":status", "200"), header("content-type", "application/grpc"),
        header("grpc-accept-encoding", grpc_compression::kAcceptEncoding),
        header("grpc-encoding", grpc_compression::encoding_name(call.respond_encoding))};
    const std::size_t count = call.respond_encoding == Encoding::kIdentity ? 3 : 4;
    nghttp2_data_provider body{};
    body.source.ptr = &call;
    body.read_callback = &Loop::read_body;
    if (nghttp2_submit_response(session, call.stream_id, headers, count, &body) == 0) {
      call.headers_submitted = true;
      conn.keepalive->sent_data();
    }
  }

  static int submit_trailers(nghttp2_session* session, std::int32_t stream_id, Call& call) {
    const std::string status = std::to_string(call.status);
    const std::string message = grpc_wire::percent_encode(call.status_message);
    const nghttp2_nv trailers[] = {header("grpc-status", status), header("grpc-message", message)};
    const std::size_t count = message.empty() ? 1 : 2;
    const int rc = nghttp2_submit_trailer(session, stream_id, trailers, count);
    call.trailers_submitted = rc == 0;
    return rc;
  }

  static void submit_trailers_only(nghttp2_session* session, Call& call) {
    const std::string status = std::to_string(call.status);
    const std::string message = grpc_wire::percent_encode(call.status_message);
    const std::string http_status = std::to_string(call.http_status);
    const nghttp2_nv headers[] = {
        header(":status", http_status), header("content-type", "application/grpc"),
        header("grpc-accept-encoding", grpc_compression::kAcceptEncoding),
        header("grpc-status", status), header("grpc-message", message)};
    const std::size_t count = message.empty() ? 4 : 5;
    if (nghttp2_submit_response(session, call.stream_id, headers, count, nullptr) == 0) {
      call.headers_submitted = true;
      call.trailers_submitted = true;
    }
  }

  struct Deadline {
    Clock::time_point at;
    std::uint64_t call_id;
    bool operator>(const Deadline& other) const { return at > other.at; }
  };

  const FrontendOptions options_;
  std::unique_ptr<tls::ServerContext> tls_;  // null: cleartext HTTP/2
  std::string prefix_;    // "/<service>/"
  std::string services_;  // every service, for UNIMPLEMENTED's message
  const int notify_fd_;  // the front end's, shared by its loops
  const UniqueFd wake_fd_;
  UniqueFd epoll_fd_;
  UniqueFd listen_fd_;
  int bound_port_ = 0;
  std::mutex control_mu_;  // serializes start() and stop() between application threads
  std::thread thread_;
  bool stopped_ = false;  // under control_mu_
  std::atomic<std::size_t> active_calls_{0};
  std::atomic<std::size_t> stat_connections_{0};  // FrontendStats, stored every turn
  std::atomic<std::size_t> stat_paused_{0};
  std::atomic<std::size_t> stat_buffered_{0};

  // Shared, under mu_.
  mutable std::mutex mu_;
  std::condition_variable drained_cv_;
  std::vector<ReadyItem> ready_;
  std::vector<Credit> credits_pending_;  // of the items in ready_
  std::vector<Credit> credits_taken_;    // of items taken, for the I/O thread to settle
  std::size_t pending_wire_ = 0;         // Credit::wire in credits_pending_
  std::size_t taken_wire_ = 0;           // and in credits_taken_
  bool wake_on_take_ = false;            // a connection is paused: take() wakes the I/O thread
  std::string failure_;                  // why the I/O thread stopped on its own
  std::string injected_failure_;         // inject_failure(), for the I/O thread's next turn
  std::vector<Response> outgoing_;
  bool shutdown_requested_ = false;
  bool exit_requested_ = false;
  bool drained_ = false;  // after shutdown, every connection closed (or the thread ended)

  // I/O thread only.
  CallbacksPtr callbacks_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Connection>> connections_;
  std::unordered_map<std::uint64_t, Call*> call_index_;
  std::vector<std::uint64_t> dirty_;
  std::vector<ReadyItem> local_ready_;
  std::vector<Credit> local_credits_;  // of the items in local_ready_
  std::size_t local_wire_ = 0;
  OptionPtr session_option_;
  RequestBudget budget_;
  std::vector<std::uint64_t> paused_;  // connections not read for the budget
  std::size_t owing_calls_ = 0;  // calls with Call::owed bytes, on any connection
  Clock::time_point now_ = Clock::now();  // when this turn of the loop began
  Clock::time_point next_sweep_;
  bool listener_resting_ = false;
  Clock::time_point listener_wakes_at_;
  std::vector<std::uint8_t> rbuf_;
  std::vector<std::uint8_t> plain_;  // decrypted input (TLS)
  std::string tls_scratch_;          // Session::seal()'s spare buffer
  // TLS connections by accept time, with the time their handshake must be done by.
  std::deque<std::pair<Clock::time_point, std::uint64_t>> handshakes_;
  std::uint64_t next_tag_ = kFirstConnection;
  std::uint64_t next_call_id_ = 1;
  std::vector<Deadline> deadlines_;  // a min-heap on `at` (std::greater)
  std::size_t lingering_ = 0;        // connections with `lingering` set
  bool shutting_down_ = false;
  bool final_goaway_pending_ = false;
  Clock::time_point final_goaway_at_;
};

namespace {

// A call id's top byte names its loop (GrpcFrontend::respond routes by it).
constexpr int kLoopShift = 56;

}  // namespace

GrpcFrontend::GrpcFrontend(FrontendOptions options) : notify_fd_(make_eventfd()) {
  const std::size_t count = std::max<std::size_t>(options.io_threads, 1);
  if (count > kMaxIoThreads) {
    throw std::invalid_argument("io_threads must be 1.." + std::to_string(kMaxIoThreads));
  }
  if (count > 1) {
    options.reuse_port = true;  // one listener per loop on the same port
    // The connection limit holds for the whole front end (shared out); each loop keeps the
    // whole request byte budget, so that any message that fits one loop fits each.
    if (options.max_connections != 0) {
      options.max_connections = (options.max_connections + count - 1) / count;
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    loops_.push_back(std::make_unique<Loop>(options, notify_fd_.get(),
                                            (static_cast<std::uint64_t>(i) << kLoopShift) + 1));
  }
}

GrpcFrontend::~GrpcFrontend() = default;  // ~Loop stops without grace

void GrpcFrontend::start() {
  loops_[0]->start(loops_[0]->port());
  const int port = loops_[0]->port();  // the port bound, also when 0 asked for any
  for (std::size_t i = 1; i < loops_.size(); ++i) {
    loops_[i]->start(port);
  }
}

int GrpcFrontend::port() const { return loops_[0]->port(); }
int GrpcFrontend::notify_fd() const { return notify_fd_.get(); }

void GrpcFrontend::take(std::vector<ReadyItem>& out) {
  // Reset first, then drain every loop: an item published after its loop was drained signals
  // again, so the eventfd is readable whenever items wait (at worst once more than needed).
  drain_eventfd(notify_fd_.get());
  for (const auto& loop : loops_) {
    loop->take(out);
  }
}

void GrpcFrontend::respond(std::vector<Response>&& responses) {
  if (loops_.size() == 1) {
    loops_[0]->respond(std::move(responses));
    return;
  }
  std::vector<std::vector<Response>> per_loop(loops_.size());
  for (Response& r : responses) {
    const std::size_t loop = static_cast<std::size_t>(r.call_id >> kLoopShift);
    if (loop < loops_.size()) {  // else an unknown call: dropped, as a loop drops one
      per_loop[loop].push_back(std::move(r));
    }
  }
  for (std::size_t i = 0; i < loops_.size(); ++i) {
    loops_[i]->respond(std::move(per_loop[i]));
  }
}

void GrpcFrontend::shutdown() {
  for (const auto& loop : loops_) {
    loop->shutdown();
  }
}

void GrpcFrontend::stop(double grace_s) {
  shutdown();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(grace_s > 0.0 ? std::min(grace_s, 86400.0)
                                                                    : 0.0);
  for (const auto& loop : loops_) {
    const std::chrono::duration<double> left = deadline - std::chrono::steady_clock::now();
    loop->stop(std::max(left.count(), 0.0));
  }
}

std::size_t GrpcFrontend::active_calls() const {
  std::size_t total = 0;
  for (const auto& loop : loops_) {
    total += loop->active_calls();
  }
  return total;
}

std::string GrpcFrontend::failure() const {
  for (const auto& loop : loops_) {
    std::string failure = loop->failure();
    if (!failure.empty()) {
      return failure;
    }
  }
  return std::string();
}

FrontendStats GrpcFrontend::stats() const {
  FrontendStats total;
  for (const auto& loop : loops_) {
    const FrontendStats s = loop->stats();
    total.connections += s.connections;
    total.paused_connections += s.paused_connections;
    total.buffered_bytes += s.buffered_bytes;
  }
  return total;
}

void GrpcFrontend::inject_failure(std::string message) {
  loops_[0]->inject_failure(std::move(message));
}

}  // namespace tachyon::grpc
