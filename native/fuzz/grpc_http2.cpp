// libFuzzer target: the native gRPC front end's HTTP/2 connection handling (nghttp2 with our
// callbacks, the calls' message readers, responses and stream closing), driven over loopback
// through the public GrpcFrontend interface, as a client would.
//
// One GrpcFrontend serves the whole run. Each input is one connection: the client preface and
// an empty SETTINGS frame, then the frames the input describes, then a PING. Once the PING is
// answered (or the server closed the connection), the harness plays the application: it takes
// every ready item and answers it (echoing the message, with a status drawn from it), sends a
// second PING so the answers are written, and closes the connection.
//
// Input: a sequence of records [type][flags][stream][length: 2 bytes, big-endian][payload],
// each becoming one frame (stream ids are small, so frames meet the streams they open; the
// length is clamped to the bytes left). Hangs count as findings: a PING unanswered for
// kAnswerMs with the connection still open is reported (libFuzzer's -timeout catches the rest).
#include "grpc_frontend.hpp"
#include "grpc_wire.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using tachyon::grpc::GrpcFrontend;
using tachyon::grpc::ItemKind;
using tachyon::grpc::ReadyItem;
using tachyon::grpc::Response;

constexpr int kAnswerMs = 5000;
constexpr std::uint8_t kPing = 6;
constexpr std::uint8_t kAck = 1;
constexpr char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

GrpcFrontend* frontend = nullptr;

void append_frame(std::string& out, std::uint8_t type, std::uint8_t flags, std::uint32_t stream,
                  const std::uint8_t* payload, std::size_t len) {
  const char header[9] = {static_cast<char>(len >> 16), static_cast<char>(len >> 8),
                          static_cast<char>(len),       static_cast<char>(type),
                          static_cast<char>(flags),     static_cast<char>(stream >> 24),
                          static_cast<char>(stream >> 16), static_cast<char>(stream >> 8),
                          static_cast<char>(stream)};
  out.append(header, sizeof header);
  out.append(reinterpret_cast<const char*>(payload), len);
}

void append_ping(std::string& out, const char (&opaque)[9]) {
  append_frame(out, kPing, 0, 0, reinterpret_cast<const std::uint8_t*>(opaque), 8);
}

class Client {
 public:
  Client() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(frontend->port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int on = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 &&
        !(errno == EINTR && connected_after_signal())) {
      std::perror("grpc_http2: connect");
      std::abort();
    }
  }
  ~Client() { ::close(fd_); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // False once the server has closed (or reset) the connection.
  bool send_all(const std::string& bytes) {
    std::size_t off = 0;
    while (off < bytes.size() && !closed_) {
      // Read while writing: a server blocked on a full socket never reads our bytes.
      drain(0);
      const ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off,
                               MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        off += static_cast<std::size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        drain(10);
      } else if (n < 0 && errno != EINTR) {
        closed_ = true;
      }
    }
    return !closed_;
  }

  // Reads frames until a PING ACK carrying `opaque` or the end of the connection.
  void await_ping_ack(const char (&opaque)[9]) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kAnswerMs);
    while (!closed_) {
      if (find_ack(opaque)) {
        return;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "grpc_http2: the server neither answered a PING nor closed the "
                             "connection within %d ms\n", kAnswerMs);
        std::abort();
      }
      drain(50);
    }
  }

 private:
  void drain(int timeout_ms) {
    pollfd p{fd_, POLLIN, 0};
    while (!closed_ && ::poll(&p, 1, timeout_ms) > 0) {
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        in_.append(buf, static_cast<std::size_t>(n));
        timeout_ms = 0;
      } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        closed_ = true;
      } else {
        return;
      }
    }
  }

  // Consumes whole frames from the input buffer; true when one is the awaited PING ACK.
  bool find_ack(const char (&opaque)[9]) {
    while (in_.size() - in_off_ >= 9) {
      const auto* h = reinterpret_cast<const std::uint8_t*>(in_.data() + in_off_);
      const std::size_t len = (std::size_t{h[0]} << 16) | (std::size_t{h[1]} << 8) | h[2];
      if (in_.size() - in_off_ < 9 + len) {
        return false;
      }
      const bool ack = h[3] == kPing && (h[4] & kAck) != 0 && len == 8 &&
                       std::memcmp(h + 9, opaque, 8) == 0;
      in_off_ += 9 + len;
      if (ack) {
        return true;
      }
    }
    return false;
  }

  // A connect interrupted by a signal (libFuzzer's timers) goes on in the background.
  bool connected_after_signal() const {
    pollfd p{fd_, POLLOUT, 0};
    int rc = 0;
    do {
      rc = ::poll(&p, 1, kAnswerMs);
    } while (rc < 0 && errno == EINTR);
    int error = 0;
    socklen_t len = sizeof error;
    return rc > 0 && ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
  }

  int fd_;
  bool closed_ = false;
  std::string in_;
  std::size_t in_off_ = 0;
};

// The application's side: answers every ready item, including ones for calls already gone.
void answer_ready_items() {
  std::vector<ReadyItem> items;
  frontend->take(items);
  std::vector<Response> responses;
  for (ReadyItem& item : items) {
    Response r;
    r.call_id = item.call_id;
    const std::uint8_t first = item.message.empty() ? 0 : static_cast<std::uint8_t>(item.message[0]);
    switch (item.kind) {
      case ItemKind::kUnary:
        r.framed = tachyon::grpc_wire::frame(item.message.data(),
                                             static_cast<std::uint32_t>(item.message.size()));
        r.final = true;
        r.status = first % 17;
        r.status_message = item.message.substr(0, 64);
        break;
      case ItemKind::kStreamMessage:
        r.framed = tachyon::grpc_wire::frame(item.message.data(),
                                             static_cast<std::uint32_t>(item.message.size()));
        r.final = (first & 1) != 0;
        break;
      case ItemKind::kHalfClosed:
      case ItemKind::kCancelled:
        r.final = true;
        r.status = tachyon::grpc_wire::kOk;
        break;
    }
    responses.push_back(std::move(r));
  }
  frontend->respond(std::move(responses));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tachyon::grpc::FrontendOptions options;
  options.host = "127.0.0.1";
  options.port = 0;
  options.max_message_bytes = 4096;  // small, so the limits are reachable
  options.service = "inference.GRPCInferenceService";
  options.streaming_methods = {"ModelStreamInfer"};
  // Never destroyed: the I/O thread serves until the process exits.
  frontend = new GrpcFrontend(options);
  frontend->start();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string out(kPreface, sizeof kPreface - 1);
  append_frame(out, 4, 0, 0, nullptr, 0);  // SETTINGS
  std::size_t pos = 0;
  while (size - pos >= 5) {
    const std::uint8_t type = data[pos];
    const std::uint8_t flags = data[pos + 1];
    const std::uint32_t stream = data[pos + 2];
    std::size_t len = (std::size_t{data[pos + 3]} << 8) | data[pos + 4];
    pos += 5;
    len = len < size - pos ? len : size - pos;
    append_frame(out, type, flags, stream, data + pos, len);
    pos += len;
  }
  static const char kFirst[9] = "tachyon1";
  static const char kSecond[9] = "tachyon2";
  append_ping(out, kFirst);

  Client client;
  if (client.send_all(out)) {
    client.await_ping_ack(kFirst);
  }
  answer_ready_items();
  std::string ping;
  append_ping(ping, kSecond);
  if (client.send_all(ping)) {
    client.await_ping_ack(kSecond);
  }
  return 0;
}
