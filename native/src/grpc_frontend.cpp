#include "grpc_frontend.hpp"

#include "grpc_compression.hpp"
#include "grpc_wire.hpp"
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
#include <exception>
#include <functional>
#include <iterator>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

namespace tachyon::grpc {
namespace {

// Advertised to every client. Large windows (per stream and per connection) let a client send a
// whole multi-megabyte request without waiting for WINDOW_UPDATE round trips.
constexpr std::uint32_t kMaxConcurrentStreams = 1024;
constexpr std::int32_t kWindowBytes = 16 << 20;

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

  // Request side.
  std::string method;  // RPC name, set once the headers validate
  bool streaming = false;
  grpc_wire::MessageReader reader;
  std::string unary_message;
  bool has_message = false;
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
  // Declared after `calls`, so destroyed first: nghttp2 may point at calls until it is gone.
  std::unordered_map<std::int32_t, std::unique_ptr<Call>> calls;
  SessionPtr session;
  std::string wbuf;  // bytes taken from nghttp2, not yet accepted by the socket
  std::size_t woff = 0;
  bool epollout = false;  // EPOLLOUT is in the interest set
  bool dirty = false;     // on the loop's flush list
  bool dead = false;      // close at the end of this turn
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

}  // namespace

// The I/O thread and everything it owns. Members under "shared" are guarded by mu_; the rest
// is touched only by the I/O thread once start() has launched it.
class GrpcFrontend::Loop {
 public:
  explicit Loop(FrontendOptions options)
      : options_(std::move(options)), notify_fd_(make_eventfd()), wake_fd_(make_eventfd()) {
    prefix_ = "/" + options_.service + "/";
    services_ = options_.service;
    for (const std::string& extra : options_.extra_services) {
      services_ += ", " + extra;
    }
  }

  ~Loop() { stop(0.0); }

  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // -- application thread ------------------------------------------------------------------

  void start() {
    std::lock_guard<std::mutex> control(control_mu_);
    if (thread_.joinable() || stopped_) {
      throw std::logic_error("GrpcFrontend.start() may be called once");
    }
    listen();
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
  int notify_fd() const { return notify_fd_.get(); }

  void take(std::vector<ReadyItem>& out) {
    std::lock_guard<std::mutex> lock(mu_);
    if (out.empty()) {
      out.swap(ready_);
    } else {
      std::move(ready_.begin(), ready_.end(), std::back_inserter(out));
      ready_.clear();
    }
    // Reset under the lock that publish() signals under: readable exactly while items wait.
    drain_eventfd(notify_fd_.get());
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

  // -- nghttp2 callbacks (I/O thread) ------------------------------------------------------
  // Each body runs under guarded(): an exception becomes a connection error, never crosses C.

  static int on_begin_frame(nghttp2_session* session, const nghttp2_frame_hd* hd, void* user) {
    auto* conn = static_cast<Connection*>(user);
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
    if (call == nullptr) {
      return 0;
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
      }
      return 0;
    });
  }

  static int on_frame_recv(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    auto* conn = static_cast<Connection*>(user);
    if (frame->hd.type == NGHTTP2_PING) {
      if ((frame->hd.flags & NGHTTP2_FLAG_ACK) != 0 &&
          std::memcmp(frame->ping.opaque_data, kShutdownPing, sizeof kShutdownPing) == 0) {
        return guarded([&] {
          conn->loop->send_final_goaway(*conn);
          return 0;
        });
      }
      return 0;
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
    Call* call = conn->find(stream_id);
    if (call == nullptr) {
      return 0;
    }
    return guarded([&] {
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

  void listen() {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    const std::string port = std::to_string(options_.port);
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
      // SO_REUSEPORT: several server processes may share the port (ARCHITECTURE.md, 6).
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &on, sizeof on);
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
  }

  // -- the loop ----------------------------------------------------------------------------

  void run_guarded() {
    try {
      run();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "tachyon: gRPC front end I/O thread failed: %s\n", e.what());
    }
    close_all();
    std::lock_guard<std::mutex> lock(mu_);
    drained_ = true;
    drained_cv_.notify_all();
  }

  void run() {
    std::vector<epoll_event> events(256);
    rbuf_.resize(kReadChunk);
    for (;;) {
      const int n = ::epoll_wait(epoll_fd_.get(), events.data(), static_cast<int>(events.size()),
                                 next_timeout_ms());
      if (n < 0 && errno != EINTR) {
        throw std::system_error(errno, std::generic_category(), "epoll_wait");
      }
      for (int i = 0; i < n; ++i) {
        dispatch(events[static_cast<std::size_t>(i)]);
      }
      run_timers();
      publish();  // before writing: the application starts on new calls meanwhile
      std::vector<Response> responses;
      bool exit = false;
      bool shutdown = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        responses.swap(outgoing_);
        exit = exit_requested_;
        shutdown = shutdown_requested_;
      }
      if (exit) {
        return;
      }
      if (shutdown && !shutting_down_) {
        begin_shutdown();
      }
      for (Response& r : responses) {
        apply_guarded(r);
      }
      flush_dirty();
      publish();  // cancellations found while writing
      if (shutting_down_ && connections_.empty()) {  // lingering ones included
        std::lock_guard<std::mutex> lock(mu_);
        drained_ = true;
        drained_cv_.notify_all();
      }
    }
  }

  void dispatch(const epoll_event& ev) {
    if (ev.data.u64 == kListenerTag) {
      accept_all();
      return;
    }
    if (ev.data.u64 == kWakeTag) {
      drain_eventfd(wake_fd_.get());
      return;
    }
    const auto it = connections_.find(ev.data.u64);
    if (it == connections_.end()) {
      return;
    }
    Connection& conn = *it->second;
    if (conn.lingering) {
      discard_input(conn);
      return;
    }
    if ((ev.events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0) {
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
        return;  // EAGAIN: accepted all; EMFILE and friends: retried on the next event
      }
      const int on = 1;
      // Responses are small and latency-bound: never wait for Nagle's coalescing.
      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
      auto conn = std::make_unique<Connection>();
      conn->tag = next_tag_++;
      conn->loop = this;
      conn->fd = std::move(fd);
      nghttp2_session* session = nullptr;
      if (nghttp2_session_server_new(&session, callbacks_.get(), conn.get()) != 0) {
        continue;
      }
      conn->session.reset(session);
      const nghttp2_settings_entry settings[] = {
          {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kMaxConcurrentStreams},
          {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<std::uint32_t>(kWindowBytes)},
      };
      if (nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, 2) != 0 ||
          nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, 0, kWindowBytes) != 0) {
        continue;
      }
      watch(conn->fd.get(), conn->tag, EPOLLIN);
      Connection& ref = *conn;
      connections_.emplace(conn->tag, std::move(conn));
      mark_dirty(ref);  // our SETTINGS go out first
    }
  }

  void read_from(Connection& conn) {
    for (int i = 0; i < kMaxReadsPerWakeup && !conn.dead; ++i) {
      const ssize_t n = ::recv(conn.fd.get(), rbuf_.data(), rbuf_.size(), 0);
      if (n > 0) {
        const ssize_t used =
            nghttp2_session_mem_recv(conn.session.get(), rbuf_.data(), static_cast<std::size_t>(n));
        if (used < 0) {
          conn.dead = true;  // bad preface, flood, or a fatal protocol error
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
      while (conn.wbuf.size() < kWriteBatch) {
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
      if (conn.wbuf.empty()) {
        break;
      }
    }
    set_epollout(conn, false);
    const bool open =
        nghttp2_session_want_read(session) != 0 || nghttp2_session_want_write(session) != 0;
    return open ? Flushed::kOpen : Flushed::kFinished;
  }

  void set_epollout(Connection& conn, bool on) {
    if (conn.epollout == on) {
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | (on ? EPOLLOUT : 0u);
    ev.data.u64 = conn.tag;
    ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, conn.fd.get(), &ev);
    conn.epollout = on;
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
    ::shutdown(conn.fd.get(), SHUT_WR);
    set_epollout(conn, false);
    conn.lingering = true;
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
    if (signal) {
      signal_eventfd(notify_fd_.get());
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
    call_index_.erase(call.id);
    active_calls_.store(call_index_.size(), std::memory_order_relaxed);
  }

  void headers_complete(Connection& conn, Call& call) {
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
    if (call.done) {
      return;  // already answered: the rest of the request is read and dropped
    }
    bool extra = false;
    grpc_wire::ReadError error;
    try {
      error = call.reader.feed(data, len, [&](std::string&& message) {
        if (call.streaming) {
          call.delivered = true;
          local_ready_.push_back(
              {call.id, call.method, std::move(message), ItemKind::kStreamMessage});
        } else if (call.has_message) {
          extra = true;
        } else {
          call.unary_message = std::move(message);
          call.has_message = true;
        }
      });
    } catch (const std::bad_alloc&) {
      error = {grpc_wire::kResourceExhausted, "the server is out of memory for this message"};
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
      call.delivered = true;
      local_ready_.push_back({call.id, call.method, std::string(), ItemKind::kHalfClosed});
      return;
    }
    if (!call.has_message) {
      fail(conn, call, grpc_wire::kUnimplemented,
           call.method + " is a unary call but the client sent no request message");
      return;
    }
    call.delivered = true;
    local_ready_.push_back(
        {call.id, call.method, std::move(call.unary_message), ItemKind::kUnary});
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
  std::string prefix_;    // "/<service>/"
  std::string services_;  // every service, for UNIMPLEMENTED's message
  const UniqueFd notify_fd_;
  const UniqueFd wake_fd_;
  UniqueFd epoll_fd_;
  UniqueFd listen_fd_;
  int bound_port_ = 0;
  std::mutex control_mu_;  // serializes start() and stop() between application threads
  std::thread thread_;
  bool stopped_ = false;  // under control_mu_
  std::atomic<std::size_t> active_calls_{0};

  // Shared, under mu_.
  std::mutex mu_;
  std::condition_variable drained_cv_;
  std::vector<ReadyItem> ready_;
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
  std::vector<std::uint8_t> rbuf_;
  std::uint64_t next_tag_ = kFirstConnection;
  std::uint64_t next_call_id_ = 1;
  std::vector<Deadline> deadlines_;  // a min-heap on `at` (std::greater)
  std::size_t lingering_ = 0;        // connections with `lingering` set
  bool shutting_down_ = false;
  bool final_goaway_pending_ = false;
  Clock::time_point final_goaway_at_;
};

GrpcFrontend::GrpcFrontend(FrontendOptions options)
    : loop_(std::make_unique<Loop>(std::move(options))) {}

GrpcFrontend::~GrpcFrontend() = default;  // ~Loop stops without grace

void GrpcFrontend::start() { loop_->start(); }
int GrpcFrontend::port() const { return loop_->port(); }
int GrpcFrontend::notify_fd() const { return loop_->notify_fd(); }
void GrpcFrontend::take(std::vector<ReadyItem>& out) { loop_->take(out); }
void GrpcFrontend::respond(std::vector<Response>&& responses) {
  loop_->respond(std::move(responses));
}
void GrpcFrontend::shutdown() { loop_->shutdown(); }
void GrpcFrontend::stop(double grace_s) { loop_->stop(grace_s); }
std::size_t GrpcFrontend::active_calls() const { return loop_->active_calls(); }

}  // namespace tachyon::grpc
