// Fast path of the PRIOR data pipeline: fills a whole batch of token rows and loss-weight
// rows from the memory-mapped token and log-prob arrays in one call, with the GIL released.
//
// The semantics are those of megatron_prior/data/packing.py (the numpy reference):
//   w_i = (1 - exp(logprob_i)) ** alpha
//   m_i = scale[doc] * w_i, where scale[doc] = n_doc / sum_{j in doc} w_j over the loss
//   tokens of the whole document (so a caption cut across samples keeps its normaliser);
//   a document whose weights sum to zero gets m_i = 1; a masked token (EOD when eod is
//   masked, pad) gets m_i = 0 and does not count in n_doc.
// Sample boundaries follow megatron-core's GPTDataset: sample s spans from
// sample_index[s] = (doc position, offset) to sample_index[s + 1] inclusive of one extra
// token, walking documents in document_index order; short samples are padded.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
inline bool is_masked(T token, int64_t eod_id, bool mask_eod, int64_t pad_id) {
  const int64_t t = static_cast<int64_t>(token);
  return (mask_eod && t == eod_id) || t == pad_id;
}

inline double token_weight(float logprob, double alpha) {
  const double p = std::exp(static_cast<double>(logprob));
  const double one_minus_p = std::max(0.0, 1.0 - p);
  return alpha == 1.0 ? one_minus_p : std::pow(one_minus_p, alpha);
}

template <typename T>
py::array_t<double> document_scales_impl(py::array_t<T, py::array::c_style> tokens,
                                         py::array_t<float, py::array::c_style> logprobs,
                                         py::array_t<int64_t, py::array::c_style> doc_offsets,
                                         double alpha, int64_t eod_id, bool mask_eod,
                                         int64_t pad_id) {
  if (tokens.ndim() != 1 || logprobs.ndim() != 1 || doc_offsets.ndim() != 1)
    throw std::invalid_argument("document_scales: tokens, logprobs and doc_offsets must be 1-D");
  if (tokens.shape(0) != logprobs.shape(0))
    throw std::invalid_argument("document_scales: tokens and logprobs differ in length (" +
                                std::to_string(tokens.shape(0)) + " vs " +
                                std::to_string(logprobs.shape(0)) + ")");
  const int64_t n_docs = doc_offsets.shape(0) - 1;
  if (n_docs < 0) throw std::invalid_argument("document_scales: doc_offsets is empty");
  const T* tok = tokens.data();
  const float* lp = logprobs.data();
  const int64_t* off = doc_offsets.data();
  const int64_t n_tokens = tokens.shape(0);
  for (int64_t d = 0; d < n_docs; ++d)
    if (off[d] < 0 || off[d] > off[d + 1] || off[d + 1] > n_tokens)
      throw std::invalid_argument("document_scales: doc_offsets not monotone within the corpus at document " +
                                  std::to_string(d));
  py::array_t<double> scales(n_docs);
  double* out = scales.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t d = 0; d < n_docs; ++d) {
      double sum = 0.0;
      int64_t count = 0;
      for (int64_t i = off[d]; i < off[d + 1]; ++i) {
        if (is_masked(tok[i], eod_id, mask_eod, pad_id)) continue;
        sum += token_weight(lp[i], alpha);
        ++count;
      }
      // A negative scale marks the fallback m_i = 1 (all weights zero).
      out[d] = sum > 0.0 ? static_cast<double>(count) / sum : -1.0;
    }
  }
  return scales;
}

template <typename T, typename I>
void pack_rows(const T* tok, const float* lp, const int64_t* doc_offsets, const double* scales,
               const I* document_index, const I* sample_index, const int64_t* samples,
               int64_t row_begin, int64_t row_end, int64_t seq_len, double alpha, int64_t eod_id,
               bool mask_eod, int64_t pad_id, int64_t* out_tokens, float* out_weights) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t s = samples[r];
    const int64_t beg_doc = sample_index[2 * s], beg_off = sample_index[2 * s + 1];
    const int64_t end_doc = sample_index[2 * s + 2], end_off = sample_index[2 * s + 3];
    int64_t* row_tok = out_tokens + r * (seq_len + 1);
    float* row_w = out_weights + r * seq_len;
    int64_t filled = 0;
    for (int64_t k = beg_doc; k <= end_doc && filled <= seq_len; ++k) {
      const int64_t doc = document_index[k];
      const int64_t start = doc_offsets[doc] + (k == beg_doc ? beg_off : 0);
      const int64_t stop = k == end_doc ? doc_offsets[doc] + end_off + 1 : doc_offsets[doc + 1];
      const double scale = scales[doc];
      for (int64_t i = start; i < stop && filled <= seq_len; ++i, ++filled) {
        row_tok[filled] = static_cast<int64_t>(tok[i]);
        // Position 0 is input only; weight j belongs to label j = token j + 1.
        if (filled == 0) continue;
        float m;
        if (is_masked(tok[i], eod_id, mask_eod, pad_id))
          m = 0.0f;
        else if (scale < 0.0)
          m = 1.0f;
        else
          m = static_cast<float>(scale * token_weight(lp[i], alpha));
        row_w[filled - 1] = m;
      }
    }
    for (; filled <= seq_len; ++filled) {
      row_tok[filled] = pad_id;
      if (filled > 0) row_w[filled - 1] = 0.0f;
    }
  }
}

template <typename T, typename I>
py::tuple pack_batch_impl(py::array_t<T, py::array::c_style> tokens,
                          py::array_t<float, py::array::c_style> logprobs,
                          py::array_t<int64_t, py::array::c_style> doc_offsets,
                          py::array_t<double, py::array::c_style> scales,
                          py::array_t<I, py::array::c_style> document_index,
                          py::array_t<I, py::array::c_style> sample_index,
                          py::array_t<int64_t, py::array::c_style> samples, int64_t seq_len,
                          double alpha, int64_t eod_id, bool mask_eod, int64_t pad_id,
                          int num_threads) {
  if (sample_index.ndim() != 2 || sample_index.shape(1) != 2)
    throw std::invalid_argument("pack_batch: sample_index must have shape [n + 1, 2]");
  if (scales.shape(0) != doc_offsets.shape(0) - 1)
    throw std::invalid_argument("pack_batch: scales must have one entry per document");
  if (tokens.shape(0) != logprobs.shape(0))
    throw std::invalid_argument("pack_batch: tokens and logprobs differ in length");
  const int64_t n_rows = samples.shape(0);
  const int64_t n_samples = sample_index.shape(0) - 1;
  const int64_t* sp = samples.data();
  for (int64_t r = 0; r < n_rows; ++r)
    if (sp[r] < 0 || sp[r] >= n_samples)
      throw std::out_of_range("pack_batch: sample " + std::to_string(sp[r]) + " outside [0, " +
                              std::to_string(n_samples) + ")");
  py::array_t<int64_t> out_tokens({n_rows, seq_len + 1});
  py::array_t<float> out_weights({n_rows, seq_len});
  int64_t* ot = out_tokens.mutable_data();
  float* ow = out_weights.mutable_data();
  const T* tok = tokens.data();
  const float* lp = logprobs.data();
  const int64_t* off = doc_offsets.data();
  const double* sc = scales.data();
  const I* di = document_index.data();
  const I* si = sample_index.data();
  {
    py::gil_scoped_release release;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n_rows));
    if (threads == 1) {
      pack_rows(tok, lp, off, sc, di, si, sp, 0, n_rows, seq_len, alpha, eod_id, mask_eod, pad_id, ot, ow);
    } else {
      std::vector<std::thread> pool;
      const int64_t per = (n_rows + threads - 1) / threads;
      for (int64_t t = 0; t < threads; ++t) {
        const int64_t b = t * per, e = std::min(n_rows, b + per);
        if (b >= e) break;
        pool.emplace_back(pack_rows<T, I>, tok, lp, off, sc, di, si, sp, b, e, seq_len, alpha, eod_id,
                          mask_eod, pad_id, ot, ow);
      }
      for (auto& th : pool) th.join();
    }
  }
  return py::make_tuple(out_tokens, out_weights);
}

template <typename T>
py::tuple pack_batch_dispatch_index(py::array_t<T, py::array::c_style> tokens, py::array logprobs,
                                    py::array doc_offsets, py::array scales, py::array document_index,
                                    py::array sample_index, py::array samples, int64_t seq_len,
                                    double alpha, int64_t eod_id, bool mask_eod, int64_t pad_id,
                                    int num_threads) {
  if (py::isinstance<py::array_t<int32_t>>(sample_index) && py::isinstance<py::array_t<int32_t>>(document_index))
    return pack_batch_impl<T, int32_t>(tokens, logprobs, doc_offsets, scales, document_index, sample_index,
                                       samples, seq_len, alpha, eod_id, mask_eod, pad_id, num_threads);
  return pack_batch_impl<T, int64_t>(tokens, logprobs, doc_offsets, scales, document_index, sample_index,
                                     samples, seq_len, alpha, eod_id, mask_eod, pad_id, num_threads);
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
  m.doc() = "C++ packer for PRIOR loss weights (see megatron_prior/data/packing.py).";
  m.def("document_scales", &document_scales_impl<uint16_t>, py::arg("tokens"), py::arg("logprobs"),
        py::arg("doc_offsets"), py::arg("alpha"), py::arg("eod_id"), py::arg("mask_eod"), py::arg("pad_id"));
  m.def("document_scales", &document_scales_impl<int32_t>, py::arg("tokens"), py::arg("logprobs"),
        py::arg("doc_offsets"), py::arg("alpha"), py::arg("eod_id"), py::arg("mask_eod"), py::arg("pad_id"));
  m.def("document_scales", &document_scales_impl<int64_t>, py::arg("tokens"), py::arg("logprobs"),
        py::arg("doc_offsets"), py::arg("alpha"), py::arg("eod_id"), py::arg("mask_eod"), py::arg("pad_id"));
  m.def("pack_batch", &pack_batch_dispatch_index<uint16_t>);
  m.def("pack_batch", &pack_batch_dispatch_index<int32_t>);
  m.def("pack_batch", &pack_batch_dispatch_index<int64_t>);
}
