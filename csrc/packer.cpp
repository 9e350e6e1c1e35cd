// Fast path of the PRIOR data pipeline: fills a whole batch of token rows and loss-weight
// rows from the memory-mapped token and log-prob arrays in one call, with the GIL released
// and the rows split over threads.
//
// The semantics are those of megatron_prior/data/packing.py (the numpy reference):
//   w_i = (1 - exp(logprob_i)) ** alpha   (computed as -expm1(logprob_i)), PRIOR's weighting, or
//   w_i = clamp(a_i - b_i, low, high)     (b_i = 0 without a second score array): MI's floored
//                                         pointwise mutual information, CAL's clamped logit gap
//   m_i = scale[doc] * w_i, where scale[doc] = n_doc / sum_{j in doc} w_j over the loss
//   tokens of the whole document (so a caption cut across samples keeps its normaliser);
//   a document whose weights sum to zero gets m_i = 1.
//   A token is not a loss token (m_i = 0, not counted in n_doc) when it is the pad id, or,
//   with mask_eod, when the token before it is EOD, as megatron-core's eod_mask_loss
//   masks it; every document counts as preceded by EOD (its first token, with mask_eod,
//   is never a loss token).
// Sample boundaries follow megatron-core's GPTDataset: sample s spans from
// sample_index[s] = (doc position, offset) to sample_index[s + 1] inclusive of one extra
// token, walking documents in document_index order; short samples are padded.
//
// Packed rows (pack_rows): a next-fit pass over per-sample costs in order, a row taking
// samples while their costs sum to at most the budget (packing.pack_rows_numpy).
//
// Arrays are taken as they are (no silent dtype conversion, which would copy a whole
// memory-mapped corpus per call): a wrong dtype or a non-contiguous array is an error.
// Scalar arguments are checked with the numpy reference's exact messages (check_alpha,
// check_pad_value in packing.py).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <limits>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
struct Tag {
  using type = T;
};

template <typename T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

template <typename T>
const T* data_of(const py::array& a, const char* name, int ndim = 1) {
  if (!has_dtype<T>(a))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) + "-D array");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": array must be C-contiguous");
  return static_cast<const T*>(a.data());
}

// Calls f(Tag<T>{}) for the integer dtype of `a` among those token files use.
template <typename F>
auto dispatch_tokens(const py::array& a, const char* name, F&& f) {
  if (has_dtype<uint16_t>(a)) return f(Tag<uint16_t>{});
  if (has_dtype<int32_t>(a)) return f(Tag<int32_t>{});
  if (has_dtype<int64_t>(a)) return f(Tag<int64_t>{});
  if (has_dtype<uint8_t>(a)) return f(Tag<uint8_t>{});
  throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) +
                       " is not one of uint8, uint16, int32, int64");
}

template <typename F>
auto dispatch_index(const py::array& a, const char* name, F&& f) {
  if (has_dtype<int32_t>(a)) return f(Tag<int32_t>{});
  if (has_dtype<int64_t>(a)) return f(Tag<int64_t>{});
  throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) +
                       " is not int32 or int64");
}

// Runs body(begin, end) over [0, n) split into at most num_threads contiguous ranges.
// A thread that cannot be started (process or address-space limit) is an error raised in
// Python once the threads already running are joined: a std::thread destroyed unjoined
// would abort the interpreter.
template <typename Body>
void parallel_for(int64_t n, int num_threads, Body body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n));
  if (threads == 1) {
    body(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (n + threads - 1) / threads;
  const int64_t ranges = (n + per - 1) / per;
  std::string failure;
  for (int64_t b = 0; b < n; b += per) {
    try {
      pool.emplace_back(body, b, std::min(n, b + per));
    } catch (const std::system_error& err) {
      failure = "packer: could not start thread " + std::to_string(pool.size() + 1) + " of " +
                std::to_string(ranges) + " (" + err.what() + "); use fewer threads";
      break;
    }
  }
  for (auto& th : pool) th.join();
  if (!failure.empty()) throw std::runtime_error(failure);
}

// Python's repr of a float, so that messages read as the numpy reference's do (GIL held).
std::string float_repr(double x) { return std::string(py::repr(py::float_(x))); }

void check_alpha(double alpha) {
  if (!(std::isfinite(alpha) && alpha >= 0.0))
    throw std::invalid_argument("alpha must be a finite number >= 0, got " + float_repr(alpha));
}

template <typename V>
void check_pad_value(double pad) {
  bool ok = !std::isnan(pad);
  if (ok && std::numeric_limits<V>::is_integer)
    ok = pad == std::floor(pad) && pad >= static_cast<double>(std::numeric_limits<V>::lowest()) &&
         pad <= static_cast<double>(std::numeric_limits<V>::max());
  if (!ok)
    throw std::invalid_argument("pad_value " + float_repr(pad) + " is not a value of dtype " +
                                std::string(py::str(py::dtype::of<V>())));
}

struct MaskRule {
  int64_t eod_id;
  bool mask_eod;
  int64_t pad_id;

  // Token i of a document starting at doc_start: is it a loss token?
  template <typename T>
  bool is_loss(const T* tok, int64_t i, int64_t doc_start) const {
    if (static_cast<int64_t>(tok[i]) == pad_id) return false;
    if (!mask_eod) return true;
    return i > doc_start && static_cast<int64_t>(tok[i - 1]) != eod_id;
  }
};

// How a token's weight comes from its scores (packing.Weighting): mode 0 is PRIOR's
// (1 - exp(a)) ** alpha, mode 1 clamp(a - b, low, high), with b = 0 when there is no b.
struct Weighting {
  int mode;
  double alpha, low, high;
  const float* a;
  const float* b;  // nullptr: one score per token

  double operator()(int64_t i) const {
    const double x = static_cast<double>(a[i]);
    if (mode == 1) return std::min(high, std::max(low, b ? x - static_cast<double>(b[i]) : x));
    // 1 - p: -expm1(lp) keeps full precision when p is near 1 (predictable tokens); further
    // from 1 the plain exp is as exact and about twice as fast.
    const double one_minus_p = std::max(0.0, x > -0.5 ? -std::expm1(x) : 1.0 - std::exp(x));
    return alpha == 1.0 ? one_minus_p : std::pow(one_minus_p, alpha);
  }
};

// The weighting's arguments checked (with the GIL held), as packing.py checks them.
Weighting make_weighting(int mode, double alpha, double low, double high, const py::array& logprobs,
                         const py::object& minus) {
  if (mode != 0 && mode != 1) throw std::invalid_argument("weighting mode " + std::to_string(mode) + " is not 0 or 1");
  check_alpha(alpha);
  if (std::isnan(low) || std::isnan(high) || low > high)
    throw std::invalid_argument("clamp [" + float_repr(low) + ", " + float_repr(high) + "] is not a range");
  Weighting w{mode, alpha, low, high, data_of<float>(logprobs, "logprobs"), nullptr};
  if (!minus.is_none()) {
    if (mode != 1) throw std::invalid_argument("minus is read by the clamped weighting (mode 1) only");
    const auto b = py::cast<py::array>(minus);
    if (b.shape(0) != logprobs.shape(0))
      throw std::invalid_argument("scores and minus differ in length (" + std::to_string(logprobs.shape(0)) +
                                  " vs " + std::to_string(b.shape(0)) + ")");
    w.b = data_of<float>(b, "minus");
  }
  return w;
}

int64_t check_offsets(const int64_t* off, int64_t n_docs, int64_t n_tokens) {
  if (n_docs < 0) throw std::invalid_argument("doc_offsets is empty");
  for (int64_t d = 0; d < n_docs; ++d)
    if (off[d] < 0 || off[d] > off[d + 1] || off[d + 1] > n_tokens)
      throw std::invalid_argument("doc_offsets are not monotone within the corpus at document " +
                                  std::to_string(d));
  return n_docs;
}

py::array_t<double> document_scales(const py::array& tokens, const py::array& logprobs,
                                    const py::array& doc_offsets, double alpha, int64_t eod_id,
                                    bool mask_eod, int64_t pad_id, int num_threads, int mode, double low,
                                    double high, const py::object& minus) {
  const Weighting weight = make_weighting(mode, alpha, low, high, logprobs, minus);
  const int64_t* off = data_of<int64_t>(doc_offsets, "doc_offsets");
  if (tokens.shape(0) != logprobs.shape(0))
    throw std::invalid_argument("tokens and logprobs differ in length (" + std::to_string(tokens.shape(0)) +
                                " vs " + std::to_string(logprobs.shape(0)) + ")");
  const int64_t n_docs = check_offsets(off, doc_offsets.shape(0) - 1, tokens.shape(0));
  const MaskRule rule{eod_id, mask_eod, pad_id};
  py::array_t<double> scales(n_docs);
  double* out = scales.mutable_data();
  dispatch_tokens(tokens, "tokens", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* tok = data_of<T>(tokens, "tokens");
    py::gil_scoped_release release;
    parallel_for(n_docs, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        double sum = 0.0;
        int64_t count = 0;
        for (int64_t i = off[d]; i < off[d + 1]; ++i) {
          if (!rule.is_loss(tok, i, off[d])) continue;
          sum += weight(i);
          ++count;
        }
        // A negative scale marks the fallback m_i = 1 (all weights zero).
        out[d] = sum > 0.0 ? static_cast<double>(count) / sum : -1.0;
      }
    });
  });
  return scales;
}

// The validated geometry of a batch: which sample each row is, and where samples start.
template <typename D, typename S>
struct Walk {
  const int64_t* off;
  const D* document_index;
  const S* sample_index;
  const int64_t* samples;
  int64_t seq_len;

  // Walks the pieces of row r's sample in order, calling piece(doc, start, at, n) for the
  // corpus elements [start, start + n) of document doc that land at row positions
  // [at, at + n), until the row's seq_len + 1 positions are full; returns how many are.
  template <typename Piece>
  int64_t fill_row(int64_t r, Piece&& piece) const {
    const int64_t s = samples[r];
    const int64_t beg_doc = sample_index[2 * s], beg_off = sample_index[2 * s + 1];
    const int64_t end_doc = sample_index[2 * s + 2], end_off = sample_index[2 * s + 3];
    int64_t filled = 0;
    for (int64_t k = beg_doc; k <= end_doc && filled <= seq_len; ++k) {
      const int64_t doc = document_index[k];
      const int64_t start = off[doc] + (k == beg_doc ? beg_off : 0);
      const int64_t stop = k == end_doc ? off[doc] + end_off + 1 : off[doc + 1];
      const int64_t n = std::min(stop - start, seq_len + 1 - filled);
      piece(doc, start, filled, n);
      filled += n;
    }
    return filled;
  }
};

template <typename D, typename S>
Walk<D, S> make_walk(const py::array& doc_offsets, const py::array& document_index, const py::array& sample_index,
                     const py::array& samples, int64_t seq_len, int64_t n_tokens) {
  const int64_t* off = data_of<int64_t>(doc_offsets, "doc_offsets");
  const D* di = data_of<D>(document_index, "document_index");
  const S* si = data_of<S>(sample_index, "sample_index", 2);
  const int64_t* sp = data_of<int64_t>(samples, "samples");
  if (sample_index.shape(1) != 2) throw std::invalid_argument("sample_index must have shape [n + 1, 2]");
  if (seq_len < 1) throw std::invalid_argument("seq_len must be positive");
  const int64_t n_docs = check_offsets(off, doc_offsets.shape(0) - 1, n_tokens);
  const int64_t n_samples = sample_index.shape(0) - 1, n_positions = document_index.shape(0);
  // Every index a row will follow is checked here, with the GIL held, so the threads
  // below cannot read outside the arrays.
  for (int64_t r = 0; r < samples.shape(0); ++r) {
    const int64_t s = sp[r];
    if (s < 0 || s >= n_samples)
      throw std::out_of_range("sample " + std::to_string(s) + " outside [0, " + std::to_string(n_samples) + ")");
    const int64_t beg = si[2 * s], end = si[2 * s + 2];
    if (beg < 0 || beg > end || end >= n_positions)
      throw std::out_of_range("sample " + std::to_string(s) + " spans document positions outside document_index");
    for (int64_t k = beg; k <= end; ++k)
      if (di[k] < 0 || di[k] >= n_docs)
        throw std::out_of_range("document_index[" + std::to_string(k) + "] = " + std::to_string(di[k]) +
                                " outside [0, " + std::to_string(n_docs) + ")");
    const int64_t beg_len = off[di[beg] + 1] - off[di[beg]], end_len = off[di[end] + 1] - off[di[end]];
    if (si[2 * s + 1] < 0 || si[2 * s + 1] > beg_len || si[2 * s + 3] < 0 || si[2 * s + 3] >= end_len ||
        (beg == end && si[2 * s + 1] > si[2 * s + 3]))
      throw std::out_of_range("sample " + std::to_string(s) + " has an offset outside its document");
  }
  return Walk<D, S>{off, di, si, sp, seq_len};
}

template <typename F>
auto dispatch_walk(const py::array& document_index, const py::array& sample_index, F&& f) {
  return dispatch_index(document_index, "document_index", [&](auto dtag) {
    return dispatch_index(sample_index, "sample_index", [&](auto stag) { return f(dtag, stag); });
  });
}

py::tuple pack_batch(const py::array& tokens, const py::array& logprobs, const py::array& doc_offsets,
                     const py::array& scales, const py::array& document_index, const py::array& sample_index,
                     const py::array& samples, int64_t seq_len, double alpha, int64_t eod_id, bool mask_eod,
                     int64_t pad_id, int num_threads, int mode, double low, double high, const py::object& minus) {
  const Weighting weight = make_weighting(mode, alpha, low, high, logprobs, minus);
  const double* sc = data_of<double>(scales, "scales");
  if (tokens.shape(0) != logprobs.shape(0)) throw std::invalid_argument("tokens and logprobs differ in length");
  if (scales.shape(0) != doc_offsets.shape(0) - 1)
    throw std::invalid_argument("scales must have one entry per document");
  const int64_t n_rows = samples.shape(0);
  py::array_t<int64_t> out_tokens({n_rows, seq_len + 1});
  py::array_t<float> out_weights({n_rows, seq_len});
  int64_t* ot = out_tokens.mutable_data();
  float* ow = out_weights.mutable_data();
  const MaskRule rule{eod_id, mask_eod, pad_id};
  dispatch_tokens(tokens, "tokens", [&](auto ttag) {
    using T = typename decltype(ttag)::type;
    const T* tok = data_of<T>(tokens, "tokens");
    dispatch_walk(document_index, sample_index, [&](auto dtag, auto stag) {
      using D = typename decltype(dtag)::type;
      using S = typename decltype(stag)::type;
      const auto walk = make_walk<D, S>(doc_offsets, document_index, sample_index, samples, seq_len, tokens.shape(0));
      py::gil_scoped_release release;
      parallel_for(n_rows, num_threads, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          int64_t* row_tok = ot + r * (seq_len + 1);
          float* row_w = ow + r * seq_len;
          int64_t filled = walk.fill_row(r, [&](int64_t doc, int64_t start, int64_t at, int64_t n) {
            const double scale = sc[doc];
            const int64_t doc_start = walk.off[doc];
            for (int64_t k = 0; k < n; ++k) row_tok[at + k] = static_cast<int64_t>(tok[start + k]);
            // Position 0 is input only; weight j belongs to label j = token j + 1.
            for (int64_t k = at == 0 ? 1 : 0; k < n; ++k) {
              const int64_t i = start + k;
              float m = 0.0f;
              if (rule.is_loss(tok, i, doc_start))
                m = scale < 0.0 ? 1.0f : static_cast<float>(scale * weight(i));
              row_w[at + k - 1] = m;
            }
          });
          for (; filled <= seq_len; ++filled) {
            row_tok[filled] = pad_id;
            if (filled > 0) row_w[filled - 1] = 0.0f;
          }
        }
      });
    });
  });
  return py::make_tuple(out_tokens, out_weights);
}

template <typename V>
py::array pack_values_typed(const py::array& values, const py::array& doc_offsets, const py::array& document_index,
                            const py::array& sample_index, const py::array& samples, int64_t seq_len,
                            double pad_value, int num_threads) {
  check_pad_value<V>(pad_value);
  const V* val = data_of<V>(values, "values");
  const int64_t n_rows = samples.shape(0);
  py::array_t<V> out({n_rows, seq_len + 1});
  V* o = out.mutable_data();
  const V pad = static_cast<V>(pad_value);
  dispatch_walk(document_index, sample_index, [&](auto dtag, auto stag) {
    using D = typename decltype(dtag)::type;
    using S = typename decltype(stag)::type;
    const auto walk = make_walk<D, S>(doc_offsets, document_index, sample_index, samples, seq_len, values.shape(0));
    py::gil_scoped_release release;
    parallel_for(n_rows, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        V* row = o + r * (seq_len + 1);
        const int64_t filled = walk.fill_row(r, [&](int64_t, int64_t start, int64_t at, int64_t n) {
          std::copy(val + start, val + start + n, row + at);
        });
        std::fill(row + filled, row + seq_len + 1, pad);
      }
    });
  });
  return out;
}

py::array pack_values(const py::array& values, const py::array& doc_offsets, const py::array& document_index,
                      const py::array& sample_index, const py::array& samples, int64_t seq_len, double pad_value,
                      int num_threads) {
  if (has_dtype<float>(values))
    return pack_values_typed<float>(values, doc_offsets, document_index, sample_index, samples, seq_len,
                                    pad_value, num_threads);
  return dispatch_tokens(values, "values", [&](auto tag) {
    using V = typename decltype(tag)::type;
    return pack_values_typed<V>(values, doc_offsets, document_index, sample_index, samples, seq_len, pad_value,
                                num_threads);
  });
}

py::array_t<int64_t> pack_rows(const py::array& costs, int64_t budget) {
  const int64_t* c = data_of<int64_t>(costs, "costs");
  const int64_t n = costs.shape(0);
  if (budget < 1) throw std::invalid_argument("budget must be positive, got " + std::to_string(budget));
  for (int64_t i = 0; i < n; ++i)
    if (c[i] < 0 || c[i] > budget)
      throw std::invalid_argument("item " + std::to_string(i) + " costs " + std::to_string(c[i]) +
                                  ", outside [0, " + std::to_string(budget) + "]");
  std::vector<int64_t> starts{0};
  {
    py::gil_scoped_release release;
    int64_t used = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (used + c[i] > budget) {
        starts.push_back(i);
        used = 0;
      }
      used += c[i];
    }
    if (n > 0) starts.push_back(n);
  }
  py::array_t<int64_t> out(static_cast<py::ssize_t>(starts.size()));
  std::copy(starts.begin(), starts.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
  m.doc() = "C++ packer for PRIOR loss weights (see megatron_prior/data/packing.py).";
  m.def("document_scales", &document_scales, py::arg("tokens"), py::arg("logprobs"), py::arg("doc_offsets"),
        py::arg("alpha"), py::arg("eod_id"), py::arg("mask_eod"), py::arg("pad_id"), py::arg("num_threads") = 1,
        py::arg("mode") = 0, py::arg("low") = 0.0, py::arg("high") = std::numeric_limits<double>::infinity(),
        py::arg("minus") = py::none());
  m.def("pack_batch", &pack_batch, py::arg("tokens"), py::arg("logprobs"), py::arg("doc_offsets"),
        py::arg("scales"), py::arg("document_index"), py::arg("sample_index"), py::arg("samples"),
        py::arg("seq_len"), py::arg("alpha"), py::arg("eod_id"), py::arg("mask_eod"), py::arg("pad_id"),
        py::arg("num_threads") = 1, py::arg("mode") = 0, py::arg("low") = 0.0,
        py::arg("high") = std::numeric_limits<double>::infinity(), py::arg("minus") = py::none());
  m.def("pack_values", &pack_values, py::arg("values"), py::arg("doc_offsets"), py::arg("document_index"),
        py::arg("sample_index"), py::arg("samples"), py::arg("seq_len"), py::arg("pad_value"),
        py::arg("num_threads") = 1);
  m.def("pack_rows", &pack_rows, py::arg("costs"), py::arg("budget"));
}
