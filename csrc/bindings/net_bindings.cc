// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// _C.DataServer and _C.DataChannel: the TCP data plane (net/) for Python's TcpTransport. Arguments are
// checked as the table's own methods check them (array_checks.h); every call that blocks releases the
// GIL. A channel failure (connection lost, no reply in time) raises ConnectionError; a request the
// server refused raises ValueError (bad values, unknown table) or RuntimeError with the server's message.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/table_handle.h"
#include "net/data_channel.h"
#include "net/data_server.h"

namespace py = pybind11;

namespace psembed {
namespace {

// The Python exception of a status code: the channel's own failures (IOError) are ConnectionError, a
// refusal of bad values ValueError, running out of memory MemoryError, anything else RuntimeError.
// server_side: the status is a data server's verdict on a request, not this process's own: an IOError there
// is the server's failure (RuntimeError), not a broken connection.
[[noreturn]] void ThrowStatus(Status::Code code, const std::string& message, bool server_side = false) {
  PyObject* type = PyExc_RuntimeError;
  switch (code) {
    case Status::kIOError:
      if (!server_side) type = PyExc_ConnectionError;
      break;
    case Status::kInvalidArgument:
    case Status::kNotFound:
      type = PyExc_ValueError;
      break;
    case Status::kResourceExhausted:
      type = PyExc_MemoryError;
      break;
    default:
      break;
  }
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

void ThrowIfFailed(const Status& s) {
  if (!s.ok()) ThrowStatus(s.code(), s.message());
}

double CheckTimeout(double seconds, const char* name) {
  if (!(seconds > 0) || seconds > 1e9) {
    throw py::value_error(std::string(name) + " must be a number of seconds > 0, got " + std::to_string(seconds));
  }
  return seconds;
}

class PyDataServer {
 public:
  PyDataServer(const std::string& host, int port) {
    Status s;
    {
      py::gil_scoped_release release;
      s = DataServer::Start(host, port, &server_);
    }
    ThrowIfFailed(s);
  }
  int port() const { return server_->port(); }
  void Register(const std::string& name, const py::handle& table) { server_->Register(name, SharedTableOf(table)); }
  void Clear() { server_->Clear(); }
  void Stop() {
    py::gil_scoped_release release;
    server_->Stop();
  }
  uint64_t requests() const { return server_->requests(); }
  uint64_t errors() const { return server_->errors(); }
  double pull_seconds() const { return server_->pull_seconds(); }
  double push_seconds() const { return server_->push_seconds(); }

 private:
  std::unique_ptr<DataServer> server_;
};

class PyDataChannel {
 public:
  PyDataChannel(const std::string& host, int port, double connect_timeout, double send_timeout) {
    CheckTimeout(connect_timeout, "connect_timeout");
    CheckTimeout(send_timeout, "send_timeout");
    Status s;
    {
      py::gil_scoped_release release;
      s = DataChannel::Connect(host, port, connect_timeout, send_timeout, &channel_);
    }
    ThrowIfFailed(s);
  }

  uint64_t Pull(const std::string& table, const py::handle& keys_obj, bool with_stats) {
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    const uint64_t* k = KeyPtr(keys);
    uint64_t id = 0;
    Status s;
    {
      py::gil_scoped_release release;
      s = channel_->SendPull(table, k, n, with_stats, &id);
    }
    ThrowIfFailed(s);
    return id;
  }

  uint64_t Push(const std::string& table, const py::handle& keys_obj, const py::handle& grads_obj,
                const py::handle& shows_obj, const py::handle& clicks_obj, const py::handle& slots_obj,
                const py::handle& push_id_obj) {
    PushArgs a;
    if (!push_id_obj.is_none()) {
      const int64_t v = py::cast<int64_t>(push_id_obj);
      if (v < 0) throw py::value_error("push_id must be >= 0, got " + std::to_string(v));
      a.push_id = static_cast<uint64_t>(v);
    }
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    py::array grads = CheckArray(grads_obj, "grads", 'f', 4, "float32", 2);
    CheckRows(grads, "grads", n, "len(keys)");
    py::array shows = CheckArray(shows_obj, "shows", 'f', 4, "float32", 1);
    CheckRows(shows, "shows", n, "len(keys)");
    py::array clicks = CheckArray(clicks_obj, "clicks", 'f', 4, "float32", 1);
    CheckRows(clicks, "clicks", n, "len(keys)");
    py::array slots;
    if (!slots_obj.is_none()) {
      slots = CheckArray(slots_obj, "slots", 'i', 4, "int32", 1);
      CheckRows(slots, "slots", n, "len(keys)");
      a.slots = Ptr<int32_t>(slots);
    }
    a.keys = KeyPtr(keys);
    a.n = n;
    a.grads = Ptr<float>(grads);
    a.shows = Ptr<float>(shows);
    a.clicks = Ptr<float>(clicks);
    const uint32_t width = static_cast<uint32_t>(grads.shape(1));
    uint64_t id = 0;
    Status s;
    {
      py::gil_scoped_release release;
      s = channel_->SendPush(table, a, width, &id);
    }
    ThrowIfFailed(s);
    return id;
  }

  // A pull's rows (float32 [rows, width]) or a push's count of skipped rows.
  py::object Wait(uint64_t id, double timeout) {
    CheckTimeout(timeout, "timeout");
    DataReply r;
    Status s;
    {
      py::gil_scoped_release release;
      s = channel_->Wait(id, timeout, &r);
    }
    ThrowIfFailed(s);
    if (r.code != Status::kOk) ThrowStatus(r.code, r.message, /*server_side=*/true);
    if (r.width == 0) return py::int_(r.value);  // a push
    const std::vector<py::ssize_t> shape = {static_cast<py::ssize_t>(r.value), static_cast<py::ssize_t>(r.width)};
    if (r.value == 0) return py::array_t<float>(shape);
    float* rows = r.rows.release();
    py::capsule owner(rows, [](void* p) { delete[] static_cast<float*>(p); });
    return py::array_t<float>(shape, rows, owner);
  }

  bool Ready(uint64_t id) { return channel_->Ready(id); }

  void Close() {
    py::gil_scoped_release release;
    channel_->Close();
  }

 private:
  std::unique_ptr<DataChannel> channel_;
};

}  // namespace

void RegisterNetBindings(py::module_& m) {
  // The longest table name a data-plane request carries (net/wire.h); SparseTable refuses longer names.
  m.attr("MAX_TABLE_NAME_BYTES") = wire::kMaxNameLen;
  py::class_<PyDataServer>(m, "DataServer", R"doc(DataServer(host: str, port: int = 0): serves the pulls and pushes
of registered tables over TCP with no Python on the path (docs/distributed.md, "The TCP data plane").
host is an IPv4 address; port 0 takes any free port (see .port). ConnectionError if it cannot listen.)doc")
      .def(py::init<const std::string&, int>(), py::arg("host"), py::arg("port") = 0)
      .def_property_readonly("port", &PyDataServer::port)
      .def("register", &PyDataServer::Register, py::arg("name"), py::arg("table"),
           "Serve the _C.Table `table` under `name` (replacing one of that name).")
      .def("clear", &PyDataServer::Clear, "Forget every table.")
      .def("stop", &PyDataServer::Stop, "Stop accepting, close every connection, join the threads (idempotent).")
      .def_property_readonly("requests", &PyDataServer::requests)
      .def_property_readonly("errors", &PyDataServer::errors)
      .def_property_readonly("pull_seconds", &PyDataServer::pull_seconds,
                             "Seconds spent in the tables' pulls (all connections).")
      .def_property_readonly("push_seconds", &PyDataServer::push_seconds,
                             "Seconds spent in the tables' pushes, their checks included (all connections).");

  py::class_<PyDataChannel>(m, "DataChannel", R"doc(DataChannel(host, port, connect_timeout, send_timeout): a
connection to one DataServer. pull()/push() send a request and return its id; wait(id, timeout) returns a
pull's rows (float32 [n, width]) or a push's count of skipped rows. ConnectionError when the connection is
lost, a reply does not match its request, or no reply comes within the timeout (which fails every request
on the channel); ValueError/RuntimeError with the server's message when it refused the request,
MemoryError when either end ran out of memory for it.)doc")
      .def(py::init<const std::string&, int, double, double>(), py::arg("host"), py::arg("port"),
           py::arg("connect_timeout"), py::arg("send_timeout"))
      .def("pull", &PyDataChannel::Pull, py::arg("table"), py::arg("keys"), py::arg("with_stats") = false)
      .def("push", &PyDataChannel::Push, py::arg("table"), py::arg("keys"), py::arg("grads"), py::arg("shows"),
           py::arg("clicks"), py::arg("slots") = py::none(), py::arg("push_id") = py::none())
      .def("wait", &PyDataChannel::Wait, py::arg("id"), py::arg("timeout"))
      .def("ready", &PyDataChannel::Ready, py::arg("id"), "Whether wait(id) would return at once.")
      .def("close", &PyDataChannel::Close);
}

}  // namespace psembed
