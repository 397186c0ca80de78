// Fused EWC-AdamW step for CPU: OpenMP across threads, a SIMD inner loop, one call for a whole list of tensors.
//
// The same math as kernels/ewc_adamw.py (ewc_adamw_ref is the definition), per element:
//   d  = p - anchor;  e = lambda * F * d                       (EWC gradient, at the pre-step p)
//   g' = (g * grad_mul + e) * total_mul                        (clip "task": grad_mul = s, total_mul = 1;
//                                                               clip "total": grad_mul = 1, total_mul = s)
//        g * grad_mul                                          (decoupled mode: clip "task" only)
//   m  = lerp(m, g', 1 - beta1);  v = v * beta2 + (1 - beta2) * g' * g'
//   p  = p * (1 - lr * wd) - (lr / bc1) * m / (sqrt(v) * (1 / sqrt(bc2)) + eps)
//   p  = lerp(p, anchor, c / (1 + c)), c = min((lr * lambda) * F, max)   (decoupled mode: the proximal pull)
// (torch divides sqrt(v) by sqrt(bc2); multiplying by the reciprocal differs by at most an ulp in the denominator
// and frees the FP divider, which sqrt and the other division already keep busy: 25% less compute per element,
// measured, which matters when one core streams from memory faster than it computes.)
// and reduces sum(F * d * d), sum(e * e) and sum(d * d) in the same pass; a chunk never spans two tensors, so its
// partial sums also give each tensor's drift sum(F * d * d), sum(d * d) (the per-block telemetry) without a pass.
//
// Memory traffic per element (float32 p/g/m/v): read p, g, m, v and write p, m, v = 28 bytes; EWC adds the reads
// of F and anchor: +8 bytes (float32) or +4 bytes (bfloat16), in either mode (the decoupled pull reuses the F and
// anchor values already loaded). Nothing else is read or written, so the kernel runs at memory bandwidth when the
// chunking keeps both cores streaming.
//
// Work split: the concatenated index space of all tensors is cut into chunks of kChunk elements (a chunk never
// spans two tensors); chunks are dealt to threads statically, so small tensors do not serialize and big ones are
// shared. Each chunk writes its partial sums to its own slot and the slots are added in order at the end: the
// penalty is bitwise identical for any thread count.
//
// Element types: p/g/m/v float32 with F and anchor each float32 or bfloat16; or everything float64 (tests).
// Built with -ffp-contract=off: g' must be rounded exactly as the reference rounds it (see FP_FUSION in
// kernels/ewc_adamw_triton.py: where g * s and e nearly cancel, AdamW's normalisation turns an ulp of g' into a
// visible step difference), so no product may be fused into an add.
//
// kernels/ewc_adamw.py checks devices, dtypes, shapes and contiguity; kernels/ewc_adamw_cpp.py builds this file and
// passes data pointers: the module includes no torch header (pybind11 only), which keeps the first-use build to
// seconds.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;  // 64 KiB of float32 per stream: long enough to stream, many per big tensor

using bf16_bits = uint16_t;

// Explicit fused multiply-add where rounding does not matter (reductions) or where torch fuses too (its
// vectorized lerp is an fmadd): -ffp-contract=off keeps every other product rounded on its own.
template <typename T>
inline T fmadd(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;  // no FMA unit: std::fma would be a library call
#endif
}

inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(bf16_bits x) {
  // bfloat16 is the top half of a float32: widening is exact (and vectorizes to a shift).
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
struct Coeffs {
  T ewc_lambda, grad_mul, total_mul;
  bool decoupled;  // the EWC term as a pull after the Adam update, not a gradient
  T pull_rate;     // lr * lambda (decoupled)
  T lerp_weight;  // 1 - beta1
  bool lerp_small;  // torch's lerp picks its formula by |weight| < 0.5
  T beta2, one_minus_beta2, inv_bc2_sqrt, eps, decay, neg_step_size;
};

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// Compile-time switches keep the loop free of per-element branches and of useless work: LERP_SMALL picks torch's
// lerp formula (by |1 - beta1| < 0.5; a per-element select on the uniform flag made GCC emit a loop 4-8x slower),
// HAS_SCALE drops the two clip multiplies when there is no clipping, DECOUPLED (with HAS_EWC) moves the EWC term
// from the gradient to the pull after the update. With one core streaming from memory the loop is close to
// compute-bound, so every operation saved shows in the time.
template <typename T, typename TF, typename TA, bool HAS_EWC, bool LERP_SMALL, bool HAS_SCALE, bool DECOUPLED>
inline void step_chunk_impl(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                            const TF* __restrict f, const TA* __restrict a, int64_t n, const Coeffs<T>& c,
                            double* out) {
  T pen = 0, fd_sq = 0, d_sq = 0;
  const T lam = c.ewc_lambda, gm = c.grad_mul, tm = c.total_mul, w = c.lerp_weight, b2 = c.beta2,
          omb2 = c.one_minus_beta2, ibc2s = c.inv_bc2_sqrt, eps = c.eps, decay = c.decay, nss = c.neg_step_size,
          rate = c.pull_rate, cmax = std::numeric_limits<T>::max();
#pragma omp simd reduction(+ : pen, fd_sq, d_sq)
  for (int64_t i = 0; i < n; ++i) {
    const T pi = p[i];
    T gi = g[i];
    T fi = 0, ai = 0;
    if constexpr (HAS_SCALE) {
      gi = gi * gm;  // clip "task" (total_mul = 1) or 1 for clip "total" (grad_mul = 1): exact either way
    }
    if constexpr (HAS_EWC) {
      fi = to_compute(f[i]);
      ai = to_compute(a[i]);
      const T d = pi - ai;
      const T fd = fi * d;
      pen = fmadd(fd, d, pen);
      fd_sq = fmadd(fd, fd, fd_sq);  // sum(e^2) = lambda^2 * sum((F d)^2), scaled once at the end
      d_sq = fmadd(d, d, d_sq);
      if constexpr (!DECOUPLED) {
        gi = gi + lam * fd;  // e = lambda * (F d), then g + e: two roundings, as the reference
      }
    }
    if constexpr (HAS_SCALE) {
      gi = gi * tm;
    }
    const T mi = m[i];
    T mn;
    if constexpr (LERP_SMALL) {  // torch's lerp_vec: fmadd(weight, end - self, self)
      mn = fmadd(w, gi - mi, mi);
    } else {  // fmadd(weight - 1, end - self, end)
      mn = fmadd(w - T(1), gi - mi, gi);
    }
    const T vn = v[i] * b2 + omb2 * gi * gi;
    const T denom = std::sqrt(vn) * ibc2s + eps;
    T pn = pi * decay + nss * (mn / denom);
    if constexpr (HAS_EWC && DECOUPLED) {
      // the proximal pull lerp(p, anchor, c / (1 + c)) with torch's lerp formulas (see ewc_adamw_ref): both
      // branches stay between p and the anchor for any c >= 0; c capped so that inf / inf cannot occur
      const T cf = std::min(fi * rate, cmax);
      const T wp = cf / (cf + T(1));
      const T toward = ai - pn;
      pn = wp < T(0.5) ? fmadd(wp, toward, pn) : fmadd(wp - T(1), toward, ai);
    }
    m[i] = mn;
    v[i] = vn;
    p[i] = pn;
  }
  out[0] = static_cast<double>(pen);
  out[1] = static_cast<double>(lam) * static_cast<double>(lam) * static_cast<double>(fd_sq);
  out[2] = static_cast<double>(d_sq);
}

template <typename T, typename TF, typename TA, bool HAS_EWC, bool DECOUPLED>
inline void step_chunk_mode(T* p, const T* g, T* m, T* v, const TF* f, const TA* a, int64_t n, const Coeffs<T>& c,
                            double* out) {
  const bool scale = c.grad_mul != T(1) || c.total_mul != T(1);
  if (c.lerp_small) {
    if (scale) {
      step_chunk_impl<T, TF, TA, HAS_EWC, true, true, DECOUPLED>(p, g, m, v, f, a, n, c, out);
    } else {
      step_chunk_impl<T, TF, TA, HAS_EWC, true, false, DECOUPLED>(p, g, m, v, f, a, n, c, out);
    }
  } else if (scale) {
    step_chunk_impl<T, TF, TA, HAS_EWC, false, true, DECOUPLED>(p, g, m, v, f, a, n, c, out);
  } else {
    step_chunk_impl<T, TF, TA, HAS_EWC, false, false, DECOUPLED>(p, g, m, v, f, a, n, c, out);
  }
}

template <typename T, typename TF, typename TA, bool HAS_EWC>
inline void step_chunk(T* p, const T* g, T* m, T* v, const TF* f, const TA* a, int64_t n, const Coeffs<T>& c,
                       double* out) {
  if constexpr (HAS_EWC) {  // without EWC state the mode changes nothing: one instantiation
    if (c.decoupled) {
      step_chunk_mode<T, TF, TA, true, true>(p, g, m, v, f, a, n, c, out);
      return;
    }
  }
  step_chunk_mode<T, TF, TA, HAS_EWC, false>(p, g, m, v, f, a, n, c, out);
}

template <typename T, typename TF, typename TA, bool HAS_EWC>
inline void norm_chunk(const T* __restrict p, const T* __restrict g, const TF* __restrict f,
                       const TA* __restrict a, int64_t n, T lam, double* out) {
  T gsq = 0, tsq = 0;
#pragma omp simd reduction(+ : gsq, tsq)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    gsq += gi * gi;
    if constexpr (HAS_EWC) {
      const T t = gi + lam * (to_compute(f[i]) * (p[i] - to_compute(a[i])));
      tsq += t * t;
    }
  }
  out[0] = static_cast<double>(gsq);
  out[1] = static_cast<double>(tsq);
}

using Ptrs = std::vector<uintptr_t>;

std::vector<Chunk> make_chunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  chunks.reserve(static_cast<size_t>(total / kChunk) + sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    for (int64_t b = 0; b < sizes[t]; b += kChunk) {
      chunks.push_back({static_cast<int32_t>(t), b, std::min(sizes[t], b + kChunk)});
    }
  }
  return chunks;
}

// The partial sums of a run over chunks: their totals, and their sums per tensor (row-major [tensors, K]).
template <int K>
struct Sums {
  std::array<double, K> total{};
  std::vector<double> per_tensor;
};

// Runs body(chunk, partial_slot) over all chunks on the OpenMP team, then adds the K partial sums per chunk in
// chunk order, in total and per tensor (deterministic for any thread count).
template <int K, typename Body>
Sums<K> for_chunks(const std::vector<int64_t>& sizes, const Body& body) {
  const std::vector<Chunk> chunks = make_chunks(sizes);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(static_cast<size_t>(K * nchunks), 0.0);
  // torch.set_num_threads sets omp_get_max_threads here too: torch ships libgomp.so.1 and the dynamic linker
  // reuses it for this module (same soname), so there is one OpenMP runtime and one thread pool.
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t k = 0; k < nchunks; ++k) body(chunks[k], partials.data() + K * k);
  Sums<K> sums;
  sums.per_tensor.assign(K * sizes.size(), 0.0);
  for (int64_t k = 0; k < nchunks; ++k) {
    double* row = sums.per_tensor.data() + K * static_cast<size_t>(chunks[k].tensor);
    for (int j = 0; j < K; ++j) {
      sums.total[j] += partials[K * k + j];
      row[j] += partials[K * k + j];
    }
  }
  return sums;
}

template <typename S>
inline S* at_(const Ptrs& ptrs, int64_t t) {
  return reinterpret_cast<S*>(ptrs[static_cast<size_t>(t)]);
}

struct StepArgs {
  double ewc_lambda, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, grad_mul, total_mul;
  bool decoupled;
  double pull_rate;
};

// Scalars are formed in double on the host and rounded once to the compute type, as torch's foreach AdamW does.
template <typename T>
Coeffs<T> make_coeffs(const StepArgs& s) {
  Coeffs<T> c;
  c.ewc_lambda = T(s.ewc_lambda);
  c.grad_mul = T(s.grad_mul);
  c.total_mul = T(s.total_mul);
  c.decoupled = s.decoupled;
  c.pull_rate = T(s.pull_rate);
  c.lerp_weight = T(1.0 - s.beta1);
  c.lerp_small = std::abs(1.0 - s.beta1) < 0.5;
  c.beta2 = T(s.beta2);
  c.one_minus_beta2 = T(1.0 - s.beta2);
  c.inv_bc2_sqrt = T(1.0 / std::sqrt(s.bias_correction2));
  c.eps = T(s.eps);
  c.decay = T(1.0 - s.lr * s.weight_decay);
  c.neg_step_size = T(-(s.lr / s.bias_correction1));
  return c;
}

struct StepFn {
  const std::vector<int64_t>& sizes;
  const Ptrs &p, &g, &m, &v, &f, &a;
  const StepArgs& args;
  template <typename T, typename TF, typename TA, bool HAS_EWC>
  Sums<3> run() const {
    const Coeffs<T> c = make_coeffs<T>(args);
    return for_chunks<3>(sizes, [&](const Chunk& ch, double* out) {
      const int64_t b = ch.begin, n = ch.end - ch.begin, t = ch.tensor;
      step_chunk<T, TF, TA, HAS_EWC>(at_<T>(p, t) + b, at_<T>(g, t) + b, at_<T>(m, t) + b, at_<T>(v, t) + b,
                                     HAS_EWC ? at_<TF>(f, t) + b : nullptr, HAS_EWC ? at_<TA>(a, t) + b : nullptr,
                                     n, c, out);
    });
  }
};

struct NormsFn {
  const std::vector<int64_t>& sizes;
  const Ptrs &p, &g, &f, &a;
  double lam;
  template <typename T, typename TF, typename TA, bool HAS_EWC>
  Sums<2> run() const {
    return for_chunks<2>(sizes, [&](const Chunk& ch, double* out) {
      const int64_t b = ch.begin, n = ch.end - ch.begin, t = ch.tensor;
      norm_chunk<T, TF, TA, HAS_EWC>(HAS_EWC ? at_<T>(p, t) + b : nullptr, at_<T>(g, t) + b,
                                     HAS_EWC ? at_<TF>(f, t) + b : nullptr, HAS_EWC ? at_<TA>(a, t) + b : nullptr,
                                     n, T(lam), out);
    });
  }
};

void check_lengths(const std::vector<int64_t>& sizes, std::initializer_list<const Ptrs*> lists) {
  for (const Ptrs* l : lists) {
    if (l->size() != sizes.size()) throw std::invalid_argument("ewc_adamw: pointer lists differ in length");
  }
}

// Calls fn.run<T, TF, TA, HAS_EWC>() for the element types named by the caller (torch dtype names).
template <typename Fn>
auto dispatch(const std::string& param_dtype, bool has_ewc, const std::string& fisher_dtype,
                                   const std::string& anchor_dtype, const Fn& fn) {
  if (param_dtype == "float64") {
    if (!has_ewc) return fn.template run<double, double, double, false>();
    if (fisher_dtype != "float64" || anchor_dtype != "float64") {
      throw std::invalid_argument("ewc_adamw: float64 parameters need float64 fisher and anchor");
    }
    return fn.template run<double, double, double, true>();
  }
  if (param_dtype != "float32") {
    throw std::invalid_argument("ewc_adamw: parameters must be float32 or float64, got " + param_dtype);
  }
  if (!has_ewc) return fn.template run<float, float, float, false>();
  const bool f32 = fisher_dtype == "float32", a32 = anchor_dtype == "float32";
  if ((!f32 && fisher_dtype != "bfloat16") || (!a32 && anchor_dtype != "bfloat16")) {
    throw std::invalid_argument("ewc_adamw: fisher and anchor must be float32 or bfloat16");
  }
  if (f32 && a32) return fn.template run<float, float, float, true>();
  if (f32) return fn.template run<float, float, bf16_bits, true>();
  if (a32) return fn.template run<float, bf16_bits, float, true>();
  return fn.template run<float, bf16_bits, bf16_bits, true>();
}

}  // namespace

// One fused step over same-dtype lists of contiguous tensors, given as data pointers and element counts. Empty
// fisher/anchor lists mean no EWC. `decoupled`: the EWC term as the pull lerp(p, anchor, c / (1 + c)), c =
// pull_rate * F, after the update instead of a gradient. Returns (sum(F * d * d), sum(e * e), drift), zeros
// without EWC; drift: per tensor sum(F * d * d) and sum(d * d), flat [tensors, 2], empty unless `drift`.
std::tuple<double, double, std::vector<double>> ewc_adamw_step(const std::vector<int64_t>& sizes, const Ptrs& params, const Ptrs& grads,
                                         const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs, const Ptrs& fishers,
                                         const Ptrs& anchors, const std::string& param_dtype,
                                         const std::string& fisher_dtype, const std::string& anchor_dtype,
                                         double ewc_lambda, double lr, double beta1, double beta2, double eps,
                                         double weight_decay, double bias_correction1, double bias_correction2,
                                         double grad_mul, double total_mul, bool decoupled, double pull_rate,
                                         bool drift) {
  const bool has_ewc = !fishers.empty();
  check_lengths(sizes, {&params, &grads, &exp_avgs, &exp_avg_sqs});
  if (has_ewc) check_lengths(sizes, {&fishers, &anchors});
  if (decoupled && total_mul != 1.0) {
    throw std::invalid_argument("ewc_adamw: decoupled mode clips the data gradient only (grad_mul)");
  }
  const StepArgs args{ewc_lambda, lr,       beta1,     beta2,     eps,       weight_decay,
                      bias_correction1, bias_correction2, grad_mul, total_mul, decoupled, pull_rate};
  const Sums<3> sums = dispatch(param_dtype, has_ewc, fisher_dtype, anchor_dtype,
                                StepFn{sizes, params, grads, exp_avgs, exp_avg_sqs, fishers, anchors, args});
  std::vector<double> per_tensor;
  if (drift && has_ewc) {
    per_tensor.reserve(2 * sizes.size());
    for (size_t t = 0; t < sizes.size(); ++t) {
      per_tensor.push_back(sums.per_tensor[3 * t]);
      per_tensor.push_back(sums.per_tensor[3 * t + 2]);
    }
  }
  return {sums.total[0], sums.total[1], std::move(per_tensor)};
}

// The extra read pass of clip mode "total": (sum(g * g), sum((g + e)^2)); the second is 0 without EWC.
std::pair<double, double> ewc_grad_sq_norms(const std::vector<int64_t>& sizes, const Ptrs& params,
                                            const Ptrs& grads, const Ptrs& fishers, const Ptrs& anchors,
                                            const std::string& param_dtype, const std::string& fisher_dtype,
                                            const std::string& anchor_dtype, double ewc_lambda) {
  const bool has_ewc = !fishers.empty();
  check_lengths(sizes, {&params, &grads});
  if (has_ewc) check_lengths(sizes, {&fishers, &anchors});
  const Sums<2> sums = dispatch(param_dtype, has_ewc, fisher_dtype, anchor_dtype,
                                NormsFn{sizes, params, grads, fishers, anchors, ewc_lambda});
  return {sums.total[0], sums.total[1]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the threads stream through memory (a data loader thread can run meanwhile).
  m.def("ewc_adamw_step", &ewc_adamw_step, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "fused EWC-AdamW step over lists of tensors given as data pointers (CPU)");
  m.def("ewc_grad_sq_norms", &ewc_grad_sq_norms, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "sum(g^2) and sum((g + EWC grad)^2) over lists of tensors given as data pointers (CPU)");
}
