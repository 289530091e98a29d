// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Shims between Python and psembed::SparseTable: check every argument (dtype, C-contiguity, shape,
// lengths, values) BEFORE changing anything, raising TypeError/ValueError that name the argument;
// then release the GIL for the work. Arrays are taken as py::object and checked by hand (not
// py::array_t with conversion), so wrong dtypes and strided arrays are refused, never cast or copied.
// The buffers are borrowed under the GIL and stay alive (we hold references) while it is released;
// no py:: object is touched inside a gil_scoped_release block.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/array_checks.h"
#include "bindings/table_handle.h"
#include "table/checked_push.h"
#include "table/row_store/feature_value.h"
#include "table/sparse_rule.h"
#include "table/sparse_table.h"
#include "util/crc32.h"
#include "util/float_string.h"
#include "util/hash.h"
#include "util/saturate.h"
#include "util/thread_scratch.h"

namespace py = pybind11;

namespace psembed {
namespace {

// -------------------------------------------------------------------- config

class DictReader {
 public:
  DictReader(const py::handle& obj, std::string ctx) : ctx_(std::move(ctx)) {
    if (!py::isinstance<py::dict>(obj)) {
      throw py::type_error(ctx_ + " must be a dict, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    d_ = py::reinterpret_borrow<py::dict>(obj);
  }

  bool Has(const char* key) const { return d_.contains(key); }
  py::object Get(const char* key) {
    seen_.insert(key);
    return d_[key];
  }

  double Double(const char* key, double def) {
    if (!Has(key)) return def;
    py::object v = Get(key);
    if (v.is_none() || !(py::isinstance<py::float_>(v) || py::isinstance<py::int_>(v))) {
      throw py::type_error(ctx_ + "['" + key + "'] must be a number, got " + std::string(py::repr(v)));
    }
    return v.cast<double>();
  }
  double NonNeg(const char* key, double def) {
    const double v = Double(key, def);
    if (!(std::isfinite(v) && v >= 0)) {
      throw py::value_error(ctx_ + "['" + key + "'] must be a finite number >= 0, got " + FloatString(v));
    }
    return v;
  }
  int64_t Int(const char* key, int64_t def, int64_t lo, int64_t hi) {
    if (!Has(key)) return def;
    py::object v = Get(key);
    if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v)) {
      throw py::type_error(ctx_ + "['" + key + "'] must be an int, got " + std::string(py::repr(v)));
    }
    int64_t x;
    try {
      x = v.cast<int64_t>();
    } catch (const py::cast_error&) {
      throw py::value_error(ctx_ + "['" + key + "'] is out of range: " + std::string(py::repr(v)));
    }
    if (x < lo || x > hi) {
      throw py::value_error(ctx_ + "['" + key + "'] must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "], got " + std::to_string(x));
    }
    return x;
  }
  bool Bool(const char* key, bool def) {
    if (!Has(key)) return def;
    py::object v = Get(key);
    if (!py::isinstance<py::bool_>(v)) {
      throw py::type_error(ctx_ + "['" + key + "'] must be a bool, got " + std::string(py::repr(v)));
    }
    return v.cast<bool>();
  }
  // Unknown keys are refused (a typo must not silently fall back to a default).
  void CheckNoUnknown() {
    for (auto item : d_) {
      const std::string k = py::str(item.first);
      if (!seen_.count(k)) throw py::value_error(ctx_ + " has unknown key '" + k + "'");
    }
  }
  const std::string& ctx() const { return ctx_; }

 private:
  py::dict d_;
  std::string ctx_;
  std::set<std::string> seen_;
};

RuleOptions ParseRule(const py::handle& obj, const std::string& ctx) {
  DictReader r(obj, ctx);
  RuleOptions o;
  if (!r.Has("name")) throw py::value_error(ctx + " is missing 'name'");
  py::object nm = r.Get("name");
  if (!py::isinstance<py::str>(nm)) throw py::type_error(ctx + "['name'] must be a str");
  const std::string name = nm.cast<std::string>();
  if (name == "sgd") {
    o.kind = RuleOptions::kSgd;
  } else if (name == "adagrad") {
    o.kind = RuleOptions::kAdaGrad;
  } else if (name == "std_adagrad") {
    o.kind = RuleOptions::kStdAdaGrad;
  } else if (name == "adam") {
    o.kind = RuleOptions::kAdam;
  } else if (name == "ftrl") {
    o.kind = RuleOptions::kFtrl;
  } else {
    throw py::value_error(ctx + "['name'] must be one of 'sgd', 'adagrad', 'std_adagrad', 'adam', 'ftrl', got '" +
                          name + "'");
  }
  o.learning_rate = r.NonNeg("learning_rate", o.kind == RuleOptions::kAdam ? 0.001 : 0.05);
  o.initial_range = r.NonNeg("initial_range", o.initial_range);
  if (r.Has("weight_bounds")) {
    py::object wb = r.Get("weight_bounds");
    std::vector<double> b;
    try {
      b = wb.cast<std::vector<double>>();
    } catch (const py::cast_error&) {
      throw py::type_error(ctx + "['weight_bounds'] must be [low, high], got " + std::string(py::repr(wb)));
    }
    if (b.size() != 2 || !(b[0] <= b[1]) || std::isnan(b[0]) || std::isnan(b[1])) {
      throw py::value_error(ctx + "['weight_bounds'] must be [low, high] with low <= high, got " +
                            std::string(py::repr(wb)));
    }
    o.min_bound = b[0];
    o.max_bound = b[1];
  }
  if (o.kind == RuleOptions::kAdaGrad || o.kind == RuleOptions::kStdAdaGrad) {
    o.initial_g2sum = r.Double("initial_g2sum", o.initial_g2sum);
    if (!(std::isfinite(o.initial_g2sum) && o.initial_g2sum > 0)) {
      throw py::value_error(ctx + "['initial_g2sum'] must be > 0, got " + FloatString(o.initial_g2sum));
    }
  }
  if (o.kind == RuleOptions::kAdam) {
    o.beta1 = r.Double("beta1", o.beta1);
    o.beta2 = r.Double("beta2", o.beta2);
    o.epsilon = r.Double("epsilon", o.epsilon);
    // The rule keeps the betas and their powers in float32 (sparse_rule.cc): a beta that rounds to 1 there
    // divides by 1 - beta1^t = 0, or stops every step with 1 - beta2^t = 0.
    if (!(o.beta1 >= 0 && static_cast<float>(o.beta1) < 1.0f)) {
      throw py::value_error(ctx + "['beta1'] must be in [0, 1), and below 1 in float32, got " + FloatString(o.beta1));
    }
    if (!(o.beta2 >= 0 && static_cast<float>(o.beta2) < 1.0f)) {
      throw py::value_error(ctx + "['beta2'] must be in [0, 1), and below 1 in float32, got " + FloatString(o.beta2));
    }
    if (!(std::isfinite(o.epsilon) && o.epsilon > 0)) throw py::value_error(ctx + "['epsilon'] must be > 0");
  }
  if (o.kind == RuleOptions::kFtrl) {
    o.alpha = o.learning_rate;
    if (r.Has("alpha") && !r.Get("alpha").is_none()) o.alpha = r.Double("alpha", o.alpha);
    if (!(std::isfinite(o.alpha) && o.alpha > 0)) {
      throw py::value_error(ctx + "['alpha'] must be > 0, got " + FloatString(o.alpha));
    }
    o.beta = r.NonNeg("beta", o.beta);
    o.l1 = r.NonNeg("l1", o.l1);
    o.l2 = r.NonNeg("l2", o.l2);
    // With beta / alpha and l2 both 0 in float32 (beta = l2 = 0, or too small to be stored) a tiny gradient
    // would send the weight to a bound (FtrlFloats, table/sparse_rule.h).
    if (!FtrlFloats(o).DenominatorPositive()) {
      throw py::value_error(ctx + " FTRL needs beta > 0 or l2 > 0 in float32 (beta / alpha and l2 as the table "
                            "stores them), got beta " + FloatString(o.beta) + ", l2 " + FloatString(o.l2) +
                            ", alpha " + FloatString(o.alpha));
    }
  }
  r.CheckNoUnknown();
  return o;
}

TableOptions ParseConfig(const py::handle& obj) {
  DictReader r(obj, "config");
  TableOptions o;
  if (!r.Has("dim")) throw py::value_error("config is missing 'dim'");
  o.dim = static_cast<int>(r.Int("dim", 8, 1, 4096));
  if (r.Has("accessor")) {
    DictReader a(r.Get("accessor"), "config['accessor']");
    AccessorOptions& ao = o.accessor;
    ao.nonclk_coeff = a.NonNeg("nonclk_coeff", ao.nonclk_coeff);
    ao.click_coeff = a.NonNeg("click_coeff", ao.click_coeff);
    ao.embedx_threshold = a.NonNeg("embedx_threshold", ao.embedx_threshold);
    ao.base_threshold = a.NonNeg("base_threshold", ao.base_threshold);
    ao.delta_threshold = a.NonNeg("delta_threshold", ao.delta_threshold);
    ao.delta_keep_days = a.Int("delta_keep_days", ao.delta_keep_days, 0, std::numeric_limits<int64_t>::max());
    ao.show_click_decay_rate = a.Double("show_click_decay_rate", ao.show_click_decay_rate);
    if (!(ao.show_click_decay_rate >= 0 && ao.show_click_decay_rate <= 1)) {
      throw py::value_error("config['accessor']['show_click_decay_rate'] must be in [0, 1], got " +
                            FloatString(ao.show_click_decay_rate));
    }
    ao.delete_threshold = a.NonNeg("delete_threshold", ao.delete_threshold);
    ao.delete_after_unseen_days =
        a.Int("delete_after_unseen_days", ao.delete_after_unseen_days, 0, std::numeric_limits<int64_t>::max());
    ao.show_scale = a.Bool("show_scale", ao.show_scale);
    ao.create_probability_from_score = a.Bool("create_probability_from_score", ao.create_probability_from_score);
    a.CheckNoUnknown();
  }
  if (r.Has("lr_optimizer")) o.lr_rule = ParseRule(r.Get("lr_optimizer"), "config['lr_optimizer']");
  if (r.Has("mf_optimizer")) o.mf_rule = ParseRule(r.Get("mf_optimizer"), "config['mf_optimizer']");
  if (r.Has("seed")) {
    py::object s = r.Get("seed");
    if (!py::isinstance<py::int_>(s) || py::isinstance<py::bool_>(s)) {
      throw py::type_error("config['seed'] must be an int, got " + std::string(py::repr(s)));
    }
    try {
      o.seed = s.cast<uint64_t>();
    } catch (const py::cast_error&) {
      throw py::value_error("config['seed'] must be in [0, 2**64), got " + std::string(py::repr(s)));
    }
  }
  o.num_shards = static_cast<int>(r.Int("num_shards", o.num_shards, 1, 65536));
  o.num_threads = static_cast<int>(r.Int("num_threads", o.num_threads, 0, 4096));
  o.spin_wait_us = static_cast<int>(r.Int("spin_wait_us", o.spin_wait_us, 0, 1000000));
  if (r.Has("max_keys") && !r.Get("max_keys").is_none()) {  // None (or absent): no limit
    o.max_keys = static_cast<uint64_t>(r.Int("max_keys", 0, o.num_shards, std::numeric_limits<int64_t>::max()));
  }
  if (r.Has("nan_policy")) {
    py::object p = r.Get("nan_policy");
    const std::string pol = py::isinstance<py::str>(p) ? p.cast<std::string>() : std::string("?");
    if (pol != "raise" && pol != "skip") {
      throw py::value_error("config['nan_policy'] must be 'raise' or 'skip', got " + std::string(py::repr(p)));
    }
    o.nan_skip = pol == "skip";
  }
  r.CheckNoUnknown();
  return o;
}

ExportMode ParseMode(const std::string& mode) {
  if (mode == "checkpoint") return ExportMode::kCheckpoint;
  if (mode == "base") return ExportMode::kBase;
  if (mode == "delta") return ExportMode::kDelta;
  if (mode == "serving") return ExportMode::kServing;
  throw py::value_error("mode must be one of 'checkpoint', 'base', 'delta', 'serving', got '" + mode + "'");
}

// A numpy array that owns a moved-in ExportBuffer (no copy).
template <typename T>
py::array BufferToArray(ExportBuffer&& buf, std::vector<py::ssize_t> shape) {
  auto* holder = new ExportBuffer(std::move(buf));
  py::capsule owner(holder, [](void* p) { delete static_cast<ExportBuffer*>(p); });
  // An empty buffer has no memory: give numpy a valid dummy pointer for its zero-size array.
  static T empty_dummy{};
  T* data = holder->data() != nullptr ? holder->as<T>() : &empty_dummy;
  return py::array_t<T>(shape, data, owner);
}

// A numpy array that owns a moved-in vector (no copy).
template <typename T, typename V>
py::array VectorToArray(std::vector<V>&& v, std::vector<py::ssize_t> shape) {
  static_assert(sizeof(T) == sizeof(V), "reinterpretation must keep the element size");
  auto* holder = new std::vector<V>(std::move(v));
  py::capsule owner(holder, [](void* p) { delete static_cast<std::vector<V>*>(p); });
  return py::array_t<T>(shape, reinterpret_cast<T*>(holder->data()), owner);
}

// ---------------------------------------------------------------------- Table

class PyTable {
 public:
  explicit PyTable(const py::handle& config) : options_(ParseConfig(config)) {
    table_ = std::make_shared<SparseTable>(options_);
  }

  SparseTable& t() { return *table_; }
  std::shared_ptr<SparseTable> shared() const { return table_; }
  const TableOptions& options() const { return options_; }

  py::array Pull(const py::handle& keys_obj, bool with_stats) {
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    const int width = table_->pull_width(with_stats);
    py::array_t<float> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(width)});
    float* o = out.mutable_data();
    const uint64_t* k = KeyPtr(keys);
    {
      py::gil_scoped_release release;
      table_->Pull(k, n, with_stats, o);
    }
    return out;
  }

  size_t Push(const py::handle& keys_obj, const py::handle& grads_obj, const py::handle& shows_obj,
              const py::handle& clicks_obj, const py::handle& slots_obj, const py::handle& push_id_obj) {
    uint64_t push_id = SparseTable::kOwnPushId;
    if (!push_id_obj.is_none()) {
      // An int in [0, 2^63): the Python caller's (trainer << 32) | count.
      const int64_t v = py::cast<int64_t>(push_id_obj);
      if (v < 0) throw py::value_error("push_id must be >= 0, got " + std::to_string(v));
      push_id = static_cast<uint64_t>(v);
    }
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    const size_t gw = 1 + options_.dim;
    py::array grads = CheckArray(grads_obj, "grads", 'f', 4, "float32", 2);
    CheckMatrix(grads, "grads", n, gw, "len(keys)");
    py::array shows = CheckArray(shows_obj, "shows", 'f', 4, "float32", 1);
    CheckRows(shows, "shows", n, "len(keys)");
    py::array clicks = CheckArray(clicks_obj, "clicks", 'f', 4, "float32", 1);
    CheckRows(clicks, "clicks", n, "len(keys)");
    py::array slots;
    const int32_t* sl = nullptr;
    if (!slots_obj.is_none()) {
      slots = CheckArray(slots_obj, "slots", 'i', 4, "int32", 1);
      CheckRows(slots, "slots", n, "len(keys)");
      sl = Ptr<int32_t>(slots);
    }
    PushArgs args;
    args.keys = KeyPtr(keys);
    args.n = n;
    args.grads = Ptr<float>(grads);
    args.shows = Ptr<float>(shows);
    args.clicks = Ptr<float>(clicks);
    args.slots = sl;
    args.push_id = push_id;
    size_t skipped = 0;
    Status st;
    {
      py::gil_scoped_release release;
      st = CheckedPush(table_.get(), args, &skipped);
    }
    if (!st.ok()) throw py::value_error(st.message());
    return skipped;
  }

  py::dict Export(const std::string& mode_name, int64_t buckets, int64_t bucket) {
    const ExportMode mode = ParseMode(mode_name);
    if (buckets < 1 || buckets > std::numeric_limits<uint32_t>::max()) {
      throw py::value_error("buckets must be >= 1, got " + std::to_string(buckets));
    }
    if (bucket < -1 || bucket >= buckets) {
      throw py::value_error("bucket must be -1 (all) or in [0, buckets = " + std::to_string(buckets) + "), got " +
                            std::to_string(bucket));
    }
    ExportResult r;
    {
      py::gil_scoped_release release;
      table_->Export(mode, static_cast<uint32_t>(buckets), bucket, &r);
    }
    const RowLayout& lay = table_->layout();
    const py::ssize_t n = static_cast<py::ssize_t>(r.keys.size());
    const py::ssize_t m = lay.mf_width() ? static_cast<py::ssize_t>(r.mf.size() / lay.mf_width()) : 0;
    const py::ssize_t nt = static_cast<py::ssize_t>(r.tombstones.size());
    py::dict d;
    d["keys"] = VectorToArray<int64_t>(std::move(r.keys), {n});
    d["base"] = VectorToArray<float>(std::move(r.base), {n, lay.base_export_width()});
    d["has_mf"] = VectorToArray<uint8_t>(std::move(r.has_mf), {n});
    d["mf"] = VectorToArray<float>(std::move(r.mf), {m, lay.mf_width()});
    d["tombstones"] = VectorToArray<int64_t>(std::move(r.tombstones), {nt});
    d["pending_tombstones"] = r.pending_tombstones;
    return d;
  }

  py::dict ExportBuckets(const std::string& mode_name, int64_t buckets, uint64_t salt) {
    const ExportMode mode = ParseMode(mode_name);
    if (buckets < 1 || buckets > (int64_t{1} << 20)) {
      throw py::value_error("buckets must be in [1, 2**20], got " + std::to_string(buckets));
    }
    BucketExport r;
    {
      py::gil_scoped_release release;
      table_->ExportBuckets(mode, static_cast<uint32_t>(buckets), salt, &r);
    }
    const RowLayout& lay = table_->layout();
    const py::ssize_t n = static_cast<py::ssize_t>(r.rows);
    const py::ssize_t nb = static_cast<py::ssize_t>(buckets);
    const py::ssize_t nt = static_cast<py::ssize_t>(r.tombstones.size());
    py::dict d;
    d["keys"] = BufferToArray<int64_t>(std::move(r.keys), {n});
    d["base"] = BufferToArray<float>(std::move(r.base), {n, lay.base_export_width()});
    d["has_mf"] = BufferToArray<uint8_t>(std::move(r.has_mf), {n});
    d["mf"] = BufferToArray<float>(std::move(r.mf), {n, lay.mf_width()});
    d["row_begin"] = VectorToArray<int64_t>(std::move(r.row_begin), {nb + 1});
    d["mf_rows"] = VectorToArray<int64_t>(std::move(r.mf_rows), {nb});
    d["tombstones"] = VectorToArray<int64_t>(std::move(r.tombstones), {nt});
    d["pending_tombstones"] = r.pending_tombstones;
    return d;
  }

  py::dict SaveBuckets(const std::string& mode_name, int64_t buckets, uint64_t salt, const std::vector<std::string>& paths,
                       bool sync) {
    const ExportMode mode = ParseMode(mode_name);
    if (buckets < 1 || buckets > (int64_t{1} << 20)) {
      throw py::value_error("buckets must be in [1, 2**20], got " + std::to_string(buckets));
    }
    if (paths.size() != static_cast<size_t>(buckets) * 4) {
      throw py::value_error("paths must hold 4 paths per bucket (keys, base, has_mf, mf), got " +
                            std::to_string(paths.size()) + " for " + std::to_string(buckets) + " buckets");
    }
    BucketSave r;
    Status st;
    {
      py::gil_scoped_release release;
      st = table_->SaveBuckets(mode, static_cast<uint32_t>(buckets), salt, paths, sync, &r);
    }
    if (!st.ok()) {
      PyErr_SetString(st.code() == Status::kIOError ? PyExc_OSError : PyExc_ValueError, st.message().c_str());
      throw py::error_already_set();
    }
    py::list files;
    for (const SavedFile& f : r.files) files.append(py::make_tuple(f.bucket, f.column, f.rows, f.bytes, f.crc32));
    const py::ssize_t nt = static_cast<py::ssize_t>(r.tombstones.size());
    py::dict d;
    d["files"] = files;
    d["rows"] = r.rows;
    d["mf_rows"] = r.mf_rows;
    d["tombstones"] = VectorToArray<int64_t>(std::move(r.tombstones), {nt});
    d["pending_tombstones"] = r.pending_tombstones;
    return d;
  }

  void CommitSave(const std::string& mode_name, const py::handle& keys_obj, const py::handle& ds_obj,
                  int64_t tombstones) {
    const ExportMode mode = ParseMode(mode_name);
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    py::array ds = CheckArray(ds_obj, "delta_scores", 'f', 4, "float32", 1);
    CheckRows(ds, "delta_scores", n, "len(keys)");
    if (tombstones < 0) throw py::value_error("tombstones must be >= 0, got " + std::to_string(tombstones));
    const uint64_t* k = KeyPtr(keys);
    const float* d = Ptr<float>(ds);
    py::gil_scoped_release release;
    table_->CommitSave(mode, k, d, n, static_cast<size_t>(tombstones));
  }

  void LoadRows(const py::handle& keys_obj, const py::handle& base_obj, const py::handle& has_mf_obj,
                const py::handle& mf_obj) {
    const RowLayout& lay = table_->layout();
    py::array keys = CheckKeys(keys_obj);
    const size_t n = keys.shape(0);
    const size_t bw = lay.base_export_width(), mw = lay.mf_width();
    py::array base = CheckArray(base_obj, "base", 'f', 4, "float32", 2);
    CheckMatrix(base, "base", n, bw, "len(keys)");
    py::array has_mf = CheckArray(has_mf_obj, "has_mf", 'u', 1, "uint8", 1);
    CheckRows(has_mf, "has_mf", n, "len(keys)");
    py::array mf = CheckArray(mf_obj, "mf", 'f', 4, "float32", 2);
    const uint8_t* hm = Ptr<uint8_t>(has_mf);
    size_t m = 0;
    for (size_t i = 0; i < n; ++i) {
      if (hm[i] > 1) {
        throw py::value_error("has_mf must hold 0 or 1, got has_mf[" + std::to_string(i) + "] = " +
                              std::to_string(int{hm[i]}));
      }
      m += hm[i];
    }
    CheckMatrix(mf, "mf", m, mw, "has_mf.sum()");
    const float* b = Ptr<float>(base);
    const float* f = Ptr<float>(mf);
    for (size_t i = 0; i < n; ++i) {
      const float* row = b + i * bw;
      for (size_t j = 0; j < bw; ++j) {
        if (!std::isfinite(row[j])) {
          throw py::value_error("base[" + std::to_string(i) + ", " + std::to_string(j) + "] is not finite");
        }
      }
      if (row[0] < 0 || row[1] < 0) {
        throw py::value_error("base[" + std::to_string(i) + "]: show and click must be >= 0");
      }
      if (row[3] < 0 || row[3] > kMaxUnseenDays || row[3] != std::floor(row[3])) {
        throw py::value_error("base[" + std::to_string(i) + ", 3] (unseen_days) must be an integer in [0, 65535], got " +
                              FloatString(row[3]));
      }
      if (row[4] != std::floor(row[4]) || std::fabs(row[4]) > 2147483647.0) {
        throw py::value_error("base[" + std::to_string(i) + ", 4] (slot) must be an int32, got " + FloatString(row[4]));
      }
    }
    for (size_t i = 0; i < m * mw; ++i) {
      if (!std::isfinite(f[i])) {
        throw py::value_error("mf[" + std::to_string(i / mw) + ", " + std::to_string(i % mw) + "] is not finite");
      }
    }
    const uint64_t* k = KeyPtr(keys);
    py::gil_scoped_release release;
    table_->LoadRows(k, n, b, hm, f);
  }

  void LoadSegments(const py::handle& segs_obj, bool check) { RunSegments(segs_obj, check, /*load=*/true); }
  void CheckSegments(const py::handle& segs_obj) { RunSegments(segs_obj, /*check=*/true, /*load=*/false); }

  void RunSegments(const py::handle& segs_obj, bool check, bool load) {
    if (!py::isinstance<py::sequence>(segs_obj) || py::isinstance<py::str>(segs_obj)) {
      throw py::type_error("segments must be a sequence of (keys, base, has_mf, mf) tuples");
    }
    const RowLayout& lay = table_->layout();
    const size_t bw = lay.base_export_width(), mw = lay.mf_width();
    auto seq = py::reinterpret_borrow<py::sequence>(segs_obj);
    // The arrays stay alive below, but another Python thread may write them while the load runs without the
    // GIL. The load reads keys and has_mf in more than one pass (to count, then to place each shard's rows),
    // and counts that disagree between passes would write past its buffers: those two are copied first.
    // (A base or mf value written meanwhile loads as written, like any value a caller passes.)
    std::vector<py::array> keep;
    std::vector<std::vector<uint64_t>> key_copies;
    std::vector<std::vector<uint8_t>> has_mf_copies;
    std::vector<RowSegment> segs;
    for (size_t i = 0; i < seq.size(); ++i) {
      py::object item = seq[i];
      if (!py::isinstance<py::tuple>(item) || py::len(item) != 4) {
        throw py::type_error("segments[" + std::to_string(i) + "] must be a (keys, base, has_mf, mf) tuple");
      }
      auto t = py::reinterpret_borrow<py::tuple>(item);
      py::array keys = CheckKeys(t[0]);
      const size_t n = keys.shape(0);
      py::array base = CheckArray(t[1], "base", 'f', 4, "float32", 2);
      CheckMatrix(base, "base", n, bw, "len(keys)");
      py::array has_mf = CheckArray(t[2], "has_mf", 'u', 1, "uint8", 1);
      CheckRows(has_mf, "has_mf", n, "len(keys)");
      py::array mf = CheckArray(t[3], "mf", 'f', 4, "float32", 2);
      if (static_cast<size_t>(mf.shape(1)) != mw) {
        throw py::value_error("mf must have shape [m, " + std::to_string(mw) + "], got " + ShapeString(mf));
      }
      key_copies.emplace_back(KeyPtr(keys), KeyPtr(keys) + n);
      has_mf_copies.emplace_back(Ptr<uint8_t>(has_mf), Ptr<uint8_t>(has_mf) + n);
      RowSegment seg;
      seg.keys = key_copies.back().data();
      seg.n = n;
      seg.base = Ptr<float>(base);
      seg.has_mf = has_mf_copies.back().data();
      seg.mf = Ptr<float>(mf);
      seg.mf_rows = static_cast<size_t>(mf.shape(0));
      segs.push_back(seg);
      keep.insert(keep.end(), {keys, base, has_mf, mf});
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = load ? table_->LoadRowSegments(segs.data(), segs.size(), check)
                : table_->CheckRowSegments(segs.data(), segs.size());
    }
    if (!st.ok()) throw py::value_error(st.message());
  }

  // set_tombstones / forget_tombstones: checked keys, then the table's method without the GIL.
  void OnTombstones(const py::handle& keys_obj, void (SparseTable::*method)(const uint64_t*, size_t)) {
    py::array keys = CheckKeys(keys_obj);
    const uint64_t* k = KeyPtr(keys);
    const size_t n = keys.shape(0);
    py::gil_scoped_release release;
    (table_.get()->*method)(k, n);
  }

  size_t Erase(const py::handle& keys_obj) {
    py::array keys = CheckKeys(keys_obj);
    const uint64_t* k = KeyPtr(keys);
    const size_t n = keys.shape(0);
    py::gil_scoped_release release;
    return table_->Erase(k, n);
  }

  py::dict Stats() {
    TableStats s;
    {
      py::gil_scoped_release release;
      s = table_->Stats();
    }
    py::dict d;
    d["keys"] = s.keys;
    d["keys_with_mf"] = s.keys_with_mf;
    d["bytes"] = s.bytes;
    d["pull_misses"] = s.pull_misses;
    d["inserts"] = s.inserts;
    d["mf_created"] = s.mf_created;
    d["deleted"] = s.deleted;
    d["rejected"] = s.rejected;
    d["admission_rejected"] = s.admission_rejected;
    d["capacity_rejected"] = s.capacity_rejected;
    return d;
  }

  bool Contains(const py::handle& key) {
    if (!py::isinstance<py::int_>(key) && !py::hasattr(key, "__index__")) return false;
    py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(key.ptr()));
    if (!v) {
      PyErr_Clear();
      return false;
    }
    uint64_t k;
    try {
      k = static_cast<uint64_t>(v.cast<int64_t>());
    } catch (const py::cast_error&) {
      try {
        k = v.cast<uint64_t>();
      } catch (const py::cast_error&) {
        return false;  // outside [-2**63, 2**64)
      }
    }
    py::gil_scoped_release release;
    return table_->Contains(k);
  }

 private:
  TableOptions options_;
  std::shared_ptr<SparseTable> table_;  // shared with a DataServer that serves it (net/)
};

py::array_t<int64_t> Mix64Array(const py::handle& keys_obj) {
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  py::array_t<int64_t> out(static_cast<py::ssize_t>(n));
  const uint64_t* k = KeyPtr(keys);
  auto* o = reinterpret_cast<uint64_t*>(out.mutable_data());
  py::gil_scoped_release release;
  for (size_t i = 0; i < n; ++i) o[i] = Mix64(k[i]);
  return out;
}

void CheckNumParts(int64_t num_parts) {
  if (num_parts < 1 || num_parts > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("num_parts must be in [1, 2**31), got " + std::to_string(num_parts));
  }
}

py::array_t<int32_t> RouteArray(const py::handle& keys_obj, int64_t num_parts) {
  CheckNumParts(num_parts);
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  py::array_t<int32_t> out(static_cast<py::ssize_t>(n));
  const uint64_t* k = KeyPtr(keys);
  int32_t* o = out.mutable_data();
  py::gil_scoped_release release;
  for (size_t i = 0; i < n; ++i) o[i] = static_cast<int32_t>(Route(k[i], static_cast<uint32_t>(num_parts)));
  return out;
}

// The checkpoint's bucket check (docs/format.md): the first i with mix64(keys[i] ^ salt) % num_buckets !=
// bucket, or -1. No allocation; the GIL is released.
int64_t FirstOutsideBucket(const py::handle& keys_obj, int64_t num_buckets, int64_t bucket, uint64_t salt) {
  CheckNumParts(num_buckets);
  if (bucket < 0 || bucket >= num_buckets) {
    throw py::value_error("bucket must be in [0, num_buckets), got " + std::to_string(bucket));
  }
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  const uint64_t* k = KeyPtr(keys);
  const uint32_t nb = static_cast<uint32_t>(num_buckets), b = static_cast<uint32_t>(bucket);
  py::gil_scoped_release release;
  for (size_t i = 0; i < n; ++i) {
    if (Route(k[i] ^ salt, nb) != b) return static_cast<int64_t>(i);
  }
  return -1;
}

py::tuple GroupByOwnerArray(const py::handle& keys_obj, int64_t num_parts) {
  CheckNumParts(num_parts);
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  const size_t parts = static_cast<size_t>(num_parts);
  py::array_t<int64_t> order(static_cast<py::ssize_t>(n));
  py::array_t<int64_t> starts(static_cast<py::ssize_t>(parts));
  const uint64_t* k = KeyPtr(keys);
  int64_t* o = order.mutable_data();
  int64_t* st = starts.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> owner(n);
    for (size_t i = 0; i < n; ++i) owner[i] = Route(k[i], static_cast<uint32_t>(parts));
    GroupByInverse(owner.data(), n, parts, o, st);
  }
  return py::make_tuple(order, starts);
}

// out[inverse[i]] += values[i] (rows of width w) for every i, in input order: the order the table's own
// merge sums in, so a client-side merge rounds exactly like a local push. The restrict qualifiers let
// the compiler vectorize the row add (values and out never overlap). REQUIRES: inverse[i] in [0, u),
// out zeroed.
void AddRowsByInverse(const int64_t* __restrict inv, size_t n, const float* __restrict v, size_t w,
                      float* __restrict out) {
  if (w == 1) {
    for (size_t i = 0; i < n; ++i) out[inv[i]] += v[i];
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    float* __restrict dst = out + static_cast<size_t>(inv[i]) * w;
    const float* __restrict src = v + i * w;
    for (size_t d = 0; d < w; ++d) dst[d] += src[d];
  }
}

py::array CheckInverse(const py::handle& inverse_obj, int64_t u) {
  py::array inverse = CheckArray(inverse_obj, "inverse", 'i', 8, "int64", 1);
  if (u < 0) throw py::value_error("u must be >= 0, got " + std::to_string(u));
  const size_t n = inverse.shape(0);
  const int64_t* inv = Ptr<int64_t>(inverse);
  for (size_t i = 0; i < n; ++i) {
    if (inv[i] < 0 || inv[i] >= u) {
      throw py::value_error("inverse[" + std::to_string(i) + "] = " + std::to_string(inv[i]) + " is outside [0, u = " +
                            std::to_string(u) + ")");
    }
  }
  return inverse;
}

// One pass of AddRowsByInverse; ~10x faster than torch.index_add_ on [n, 9] rows, which loops per
// index on one thread.
py::array_t<float> SumByInverseArray(const py::handle& inverse_obj, int64_t u, const py::handle& values_obj) {
  py::array inverse = CheckInverse(inverse_obj, u);
  py::array values = CheckArray(values_obj, "values", 'f', 4, "float32", 2);
  const size_t n = inverse.shape(0);
  CheckRows(values, "values", n, "len(inverse)");
  const size_t w = values.shape(1);
  py::array_t<float> out({static_cast<py::ssize_t>(u), static_cast<py::ssize_t>(w)});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::memset(o, 0, static_cast<size_t>(u) * w * sizeof(float));
    AddRowsByInverse(Ptr<int64_t>(inverse), n, Ptr<float>(values), w, o);
  }
  return out;
}

// A push's merge in one call: grads [n, w], shows [n] and clicks [n] summed by inverse (as
// SumByInverseArray), so the client pays one Python call and one argument check.
py::tuple MergePushArray(const py::handle& inverse_obj, int64_t u, const py::handle& grads_obj,
                         const py::handle& shows_obj, const py::handle& clicks_obj) {
  py::array inverse = CheckInverse(inverse_obj, u);
  const size_t n = inverse.shape(0);
  py::array grads = CheckArray(grads_obj, "grads", 'f', 4, "float32", 2);
  py::array shows = CheckArray(shows_obj, "shows", 'f', 4, "float32", 1);
  py::array clicks = CheckArray(clicks_obj, "clicks", 'f', 4, "float32", 1);
  CheckRows(grads, "grads", n, "len(inverse)");
  CheckRows(shows, "shows", n, "len(inverse)");
  CheckRows(clicks, "clicks", n, "len(inverse)");
  const size_t w = grads.shape(1);
  const auto rows = static_cast<py::ssize_t>(u);
  py::array_t<float> g({rows, static_cast<py::ssize_t>(w)});
  py::array_t<float> s(rows);
  py::array_t<float> c(rows);
  float* go = g.mutable_data();
  float* so = s.mutable_data();
  float* co = c.mutable_data();
  {
    py::gil_scoped_release release;
    std::memset(go, 0, static_cast<size_t>(u) * w * sizeof(float));
    std::memset(so, 0, static_cast<size_t>(u) * sizeof(float));
    std::memset(co, 0, static_cast<size_t>(u) * sizeof(float));
    // Three passes, not one fused loop: the fused loop measured 0.72 ms against 0.52 ms on [106k, 9]
    // (most likely its row add no longer vectorizes beside the two scalar adds; not checked).
    const int64_t* inv = Ptr<int64_t>(inverse);
    AddRowsByInverse(inv, n, Ptr<float>(grads), w, go);
    AddRowsByInverse(inv, n, Ptr<float>(shows), 1, so);
    AddRowsByInverse(inv, n, Ptr<float>(clicks), 1, co);
    // Sums past float32's range saturate at +-FLT_MAX, once per merged key, as a table's own merge does
    // (PushMerger::PointItemsAtSums): finite rows summing to an inf would be refused by the server that owns
    // the key, after the other servers applied their parts of the push. A NaN passes (nan_policy sees it).
    for (int64_t i = 0; i < u; ++i) SaturateSums(go + static_cast<size_t>(i) * w, w, so + i, co + i);
  }
  return py::make_tuple(g, s, c);
}

// Room for the n distinct keys a dedup writes before they are copied out (u <= n of it), reused per
// thread (util/thread_scratch.h): a fresh n-key buffer page-faulted on every call.
thread_local std::vector<uint64_t> tls_unique;

py::tuple DedupArray(const py::handle& keys_obj, bool groups) {
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  const uint64_t* k = KeyPtr(keys);
  ScratchBuffer<uint64_t> uniq_buf(&tls_unique, n);
  uint64_t* uniq = uniq_buf.data();
  py::array_t<int64_t> inverse(static_cast<py::ssize_t>(n));
  py::array_t<int64_t> order(static_cast<py::ssize_t>(groups ? n : 0));
  int64_t* inv = inverse.mutable_data();
  std::vector<int64_t> starts;
  size_t u = 0;
  {
    py::gil_scoped_release release;
    u = Dedup(k, n, uniq, inv);
    if (groups) {
      starts.resize(u);
      GroupByInverse(inv, n, u, order.mutable_data(), starts.data());
    }
  }
  // array_t(count, ptr) copies; unlike memcpy it accepts the null pointer of an empty input
  py::array_t<int64_t> out(static_cast<py::ssize_t>(u), reinterpret_cast<const int64_t*>(uniq));
  if (!groups) return py::make_tuple(out, inverse);
  py::array_t<int64_t> st(static_cast<py::ssize_t>(u), starts.data());
  return py::make_tuple(out, inverse, order, st);
}

py::tuple DedupByOwnerArray(const py::handle& keys_obj, int64_t num_parts) {
  CheckNumParts(num_parts);
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  const uint64_t* k = KeyPtr(keys);
  ScratchBuffer<uint64_t> uniq_buf(&tls_unique, n);
  uint64_t* uniq = uniq_buf.data();
  py::array_t<int64_t> inverse(static_cast<py::ssize_t>(n));
  py::array_t<int64_t> starts(static_cast<py::ssize_t>(num_parts + 1));
  int64_t* inv = inverse.mutable_data();
  int64_t* st = starts.mutable_data();
  size_t u = 0;
  {
    py::gil_scoped_release release;
    u = DedupByOwner(k, n, static_cast<uint32_t>(num_parts), uniq, inv, st);
  }
  py::array_t<int64_t> out(static_cast<py::ssize_t>(u), reinterpret_cast<const int64_t*>(uniq));
  return py::make_tuple(out, inverse, starts);
}

// The rows of values (float32 [n, w]) holding a NaN or Inf, ascending. The all-finite case, every
// healthy push, costs one vectorized pass; numpy's isfinite(...).all(axis=1) took ~2.5 ms on [106k, 9].
py::array_t<int64_t> NonfiniteRowsArray(const py::handle& values_obj) {
  py::array values = CheckArray(values_obj, "values", 'f', 4, "float32", 2);
  const size_t n = values.shape(0);
  const size_t w = values.shape(1);
  const float* v = Ptr<float>(values);
  std::vector<int64_t> bad;
  {
    py::gil_scoped_release release;
    if (!AllFinite(v, n * w)) {
      for (size_t i = 0; i < n; ++i) {
        if (!AllFinite(v + i * w, w)) bad.push_back(static_cast<int64_t>(i));
      }
    }
  }
  return py::array_t<int64_t>(static_cast<py::ssize_t>(bad.size()), bad.data());  // a copy, as in DedupArray
}

py::array_t<double> UniformArray(uint64_t seed, const py::handle& keys_obj, uint64_t stream, uint64_t index) {
  py::array keys = CheckKeys(keys_obj);
  const size_t n = keys.shape(0);
  py::array_t<double> out(static_cast<py::ssize_t>(n));
  const uint64_t* k = KeyPtr(keys);
  double* o = out.mutable_data();
  for (size_t i = 0; i < n; ++i) o[i] = Uniform01(seed, k[i], stream, index);
  return out;
}

}  // namespace

uint32_t Crc32Buffer(const py::buffer& data, uint32_t value) {
  const py::buffer_info info = data.request();
  if (info.ndim > 1) {
    ssize_t expect = info.itemsize;
    for (ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] != 1 && info.strides[d] != expect) throw py::value_error("crc32: data must be C-contiguous");
      expect *= info.shape[d];
    }
  } else if (info.ndim == 1 && info.shape[0] > 1 && info.strides[0] != info.itemsize) {
    throw py::value_error("crc32: data must be C-contiguous");
  }
  const size_t bytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  const void* ptr = info.ptr;
  py::gil_scoped_release release;
  return Crc32(ptr, bytes, value);
}

std::shared_ptr<SparseTable> SharedTableOf(const py::handle& table) {
  if (!py::isinstance<PyTable>(table)) {
    throw py::type_error("expected a torch_psembed._C.Table, got " +
                         std::string(py::str(py::type::of(table).attr("__name__"))));
  }
  return table.cast<PyTable&>().shared();
}

void RegisterTableBindings(py::module_& m) {
  // Pushed slots must lie in [0, SLOT_LIMIT) (table/row_store/feature_value.h says why); PSEmbedding checks
  // its slot against it.
  m.attr("SLOT_LIMIT") = kSlotLimit;
  m.def("crc32", &Crc32Buffer, py::arg("data"), py::arg("value") = 0,
        R"doc(crc32(data: buffer, value=0) -> int: zlib.crc32(data, value), the checksum of the save files
(carry-less multiply where the CPU has it). Any C-contiguous buffer (bytes, numpy array, mmap); releases the GIL.)doc");
  m.def("first_outside_bucket", &FirstOutsideBucket, py::arg("keys"), py::arg("num_buckets"), py::arg("bucket"),
        py::arg("salt"),
        R"doc(first_outside_bucket(keys: int64[n], num_buckets, bucket, salt) -> int: the first i whose checkpoint
bucket mix64(keys[i] ^ salt) % num_buckets is not bucket, or -1 (the load's bucket check; no allocation, GIL released).)doc");
  m.def("mix64", &Mix64Array, py::arg("keys"),
        R"doc(mix64(keys: int64[n]) -> int64[n]: the frozen splitmix64 finalizer of each key (uint64 bits).)doc");
  m.def("dedup", &DedupArray, py::arg("keys"), py::arg("groups") = false,
        R"doc(dedup(keys: int64[n], groups=False) -> (unique int64[u], inverse int64[n]): distinct keys in order
of first occurrence, and unique[inverse] == keys. With groups=True also (order int64[n], starts int64[u]):
order[starts[j]:starts[j+1]] are the positions of unique[j] in keys, ascending (a counting sort by inverse).
Hash-based; releases the GIL.)doc");
  m.def("route", &RouteArray, py::arg("keys"), py::arg("num_parts"),
        R"doc(route(keys: int64[n], num_parts: int) -> int32[n]: owner part mix64(k) % num_parts (unsigned).)doc");
  m.def("sum_by_inverse", &SumByInverseArray, py::arg("inverse"), py::arg("u"), py::arg("values"),
        R"doc(sum_by_inverse(inverse: int64[n], u: int, values: float32[n, w]) -> float32[u, w]: out[inverse[i]] +=
values[i], summed in input order (float32, as the table merges a push). Releases the GIL.)doc");
  m.def("merge_push", &MergePushArray, py::arg("inverse"), py::arg("u"), py::arg("grads"), py::arg("shows"),
        py::arg("clicks"),
        R"doc(merge_push(inverse: int64[n], u, grads: float32[n, w], shows: float32[n], clicks: float32[n]) ->
(grads float32[u, w], shows float32[u], clicks float32[u]): each summed by inverse in input order, as
sum_by_inverse, then saturated at +-FLT_MAX as a table's own merge (a NaN stays NaN). Releases the GIL.)doc");
  m.def("group_by_owner", &GroupByOwnerArray, py::arg("keys"), py::arg("num_parts"),
        R"doc(group_by_owner(keys: int64[n], num_parts) -> (order int64[n], starts int64[num_parts]): the positions
of keys grouped by owner route(k, num_parts): order[starts[p]:starts[p+1]] (the last up to n) are those of part p,
ascending. A counting sort; releases the GIL.)doc");
  m.def("dedup_by_owner", &DedupByOwnerArray, py::arg("keys"), py::arg("num_parts"),
        R"doc(dedup_by_owner(keys: int64[n], num_parts) -> (unique int64[u], inverse int64[n], starts int64[num_parts + 1]):
the distinct keys grouped by owner route(k, num_parts): unique[starts[p]:starts[p+1]] are those of part p in
order of first occurrence, and unique[inverse] == keys. Hash-based; releases the GIL.)doc");
  m.def("nonfinite_rows", &NonfiniteRowsArray, py::arg("values"),
        R"doc(nonfinite_rows(values: float32[n, w]) -> int64[k]: the rows holding a NaN or Inf, ascending.
Releases the GIL.)doc");
  m.def("uniform", &UniformArray, py::arg("seed"), py::arg("keys"), py::arg("stream"), py::arg("index"),
        R"doc(uniform(seed, keys, stream, index) -> float64[n]: the counter-based generator,
(splitmix64(seed ^ mix64(key) ^ ((stream << 56) + index)) >> 40) * 2**-24, where
splitmix64(x) = mix64(x + 0x9e3779b97f4a7c15). Streams: 1 lr init, 2 mf init, 3 admission.)doc");

  py::class_<PyTable>(m, "Table", R"doc(Table(config: dict): the sharded C++ sparse table.

config is TableConfig.to_dict(). Every method validates its arguments before changing anything and
releases the GIL for the work; methods may be called from many threads at once.)doc")
      .def(py::init<const py::handle&>(), py::arg("config"))
      .def_property_readonly("dim", [](PyTable& t) { return t.options().dim; })
      .def_property_readonly("lr_state_dim", [](PyTable& t) { return t.t().layout().lr_state_dim(); })
      .def_property_readonly("mf_state_dim", [](PyTable& t) { return t.t().layout().mf_state_dim(); })
      .def_property_readonly("base_width", [](PyTable& t) { return t.t().layout().base_export_width(); })
      .def_property_readonly("mf_width", [](PyTable& t) { return t.t().layout().mf_width(); })
      .def_property_readonly("num_shards", [](PyTable& t) { return t.options().num_shards; })
      .def_property("num_threads", [](PyTable& t) { return t.t().num_threads(); },
                    [](PyTable& t, int n) {
                      if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
                      t.t().set_num_threads(n);
                    },
                    R"doc(Threads one call may use (settable within [1, the pool size chosen by config num_threads]).)doc")
      .def("pull", &PyTable::Pull, py::arg("keys"), py::arg("with_stats") = false,
           R"doc(pull(keys: int64[n], with_stats=False) -> float32[n, 1+dim] ([n, 3+dim] with show, click first).
Unknown keys and keys without mf read zeros in the missing part. Never inserts.)doc")
      .def("push", &PyTable::Push, py::arg("keys"), py::arg("grads"), py::arg("shows"), py::arg("clicks"),
           py::arg("slots") = py::none(), py::arg("push_id") = py::none(),
           R"doc(push(keys, grads f32[n, 1+dim], shows f32[n], clicks f32[n], slots int32[n] | None, push_id=None) -> int.
Duplicate keys are merged in input order. Returns the rows skipped for NaN/Inf (nan_policy="skip").
push_id (int >= 0) names the push for admission draws: (day + 1) << 48 | push_id mod 2^48; None takes
the table's own count of pushes (a sharded table's trainer passes (trainer << 32) | its count).)doc")
      .def("shrink", [](PyTable& t) {
        py::gil_scoped_release r;
        return t.t().Shrink();
      }, R"doc(shrink() -> int: decay once, then delete by the predicates; returns rows deleted.)doc")
      .def("new_day", [](PyTable& t) {
        py::gil_scoped_release r;
        t.t().NewDay();
      }, R"doc(new_day(): unseen_days += 1 for every row.)doc")
      .def("end_day", [](PyTable& t, int64_t day) {
        size_t deleted = 0;
        Status s;
        {
          py::gil_scoped_release r;
          s = t.t().EndDay(day, &deleted);
        }
        if (!s.ok()) throw py::value_error(s.message());
        return deleted;
      }, py::arg("day"), R"doc(end_day(day: int) -> int: decay by elapsed days, age, delete. Idempotent per day.)doc")
      .def_property("day", [](PyTable& t) { return t.t().day(); },
                    [](PyTable& t, int64_t d) {
                      // below INT64_MAX, as end_day's: the admission draws use day + 1
                      if (d < -1 || d == INT64_MAX) {
                        throw py::value_error("day must be in [-1, 2^63 - 1), got " + std::to_string(d));
                      }
                      t.t().set_day(d);
                    })
      .def("stats", &PyTable::Stats)
      .def("__len__", [](PyTable& t) {
        py::gil_scoped_release r;
        return t.t().Size();
      })
      .def("__contains__", &PyTable::Contains)
      .def("export", &PyTable::Export, py::arg("mode"), py::arg("buckets") = 1, py::arg("bucket") = -1,
           R"doc(export(mode, buckets=1, bucket=-1) -> dict(keys, base, has_mf, mf, tombstones, pending_tombstones).
One consistent snapshot, rows sorted by key (uint64). bucket >= 0 keeps keys with mix64(k) % buckets == bucket.)doc")
      .def("export_buckets", &PyTable::ExportBuckets, py::arg("mode"), py::arg("buckets"), py::arg("salt"),
           R"doc(export_buckets(mode, buckets, salt) -> dict(keys, base, has_mf, mf, row_begin, mf_rows, tombstones,
pending_tombstones): the rows export(mode) returns, of one moment, grouped by bucket mix64(key ^ salt) % buckets.
Bucket b is rows row_begin[b]:row_begin[b+1] of keys/base/has_mf, ascending by key as uint64; its mf rows are
rows row_begin[b]:row_begin[b]+mf_rows[b] of mf (mf has one row of room per row; the rest is unused).
tombstones: the whole pending list (checkpoint, delta) or empty. The save path (docs/format.md).)doc")
      .def("save_buckets", &PyTable::SaveBuckets, py::arg("mode"), py::arg("buckets"), py::arg("salt"), py::arg("paths"),
           py::arg("sync") = true,
           R"doc(save_buckets(mode, buckets, salt, paths, sync=True) -> dict(files, rows, mf_rows, tombstones, pending_tombstones):
the rows export_buckets returns, written straight to paths[4*b + c] (c: keys, base, has_mf, mf) bucket by bucket
while mutating calls wait; buckets without rows get no files. files: (bucket, column index, rows, bytes, crc32)
per file written, by bucket then column. sync: each file is fsynced on a background thread as soon as it is
written, and the call returns once all are durable (False: the caller syncs). OSError naming the file if a write
or an fsync fails.)doc")
      .def("commit_save", &PyTable::CommitSave, py::arg("mode"), py::arg("keys"), py::arg("delta_scores"),
           py::arg("tombstones"))
      .def("load_segments", &PyTable::LoadSegments, py::arg("segments"), py::arg("check") = true,
           R"doc(load_segments(segments: [(keys, base, has_mf, mf), ...], check=True): load_rows of many blocks at
once (the checkpoint load path): every value is checked first (ValueError naming the segment and row; nothing
changes), then all rows are loaded in parallel. A key in several segments: the last one wins. check=False skips
the value checks (not the has_mf count) for rows check_segments passed already.)doc")
      .def("check_segments", &PyTable::CheckSegments, py::arg("segments"),
           R"doc(check_segments(segments): the checks of load_segments alone (ValueError naming the segment and
row); changes nothing.)doc")
      .def("load_rows", &PyTable::LoadRows, py::arg("keys"), py::arg("base"), py::arg("has_mf"), py::arg("mf"))
      .def("set_tombstones", [](PyTable& t, const py::handle& k) { t.OnTombstones(k, &SparseTable::SetTombstones); },
           py::arg("keys"),
           R"doc(set_tombstones(keys: int64[n]) -> None: replace the pending tombstone list with keys, in order.
Used to restore a checkpoint's pending list; the next checkpoint/delta export lists them.)doc")
      .def("forget_tombstones",
           [](PyTable& t, const py::handle& k) { t.OnTombstones(k, &SparseTable::ForgetTombstones); }, py::arg("keys"),
           R"doc(forget_tombstones(keys: int64[n]) -> None: remove keys from the pending tombstone list (a delta
loaded into this table published them already).)doc")
      .def_property("track_tombstones", [](PyTable& t) { return t.t().track_tombstones(); },
                    [](PyTable& t, bool on) { t.t().SetTrackTombstones(on); },
                    R"doc(Whether deletions (shrink, end_day) add their keys to the pending tombstone list (default True;
commit_save of a base or delta sets it). The checkpoint code turns it off while the table's save chain has no base
or delta: no serving view can hold its keys then, and the list would otherwise only grow.)doc")
      .def("erase", &PyTable::Erase, py::arg("keys"))
      .def("clear", [](PyTable& t) {
        py::gil_scoped_release r;
        t.t().Clear();
      })
      .def("__repr__", [](PyTable& t) {
        return "_C.Table(dim=" + std::to_string(t.options().dim) + ", num_shards=" +
               std::to_string(t.options().num_shards) + ")";
      });
}

}  // namespace psembed
