// ann2snn's optional onnxruntime custom-op library: the IF neurons of runtime/ops.py run over
// a chunk of timesteps in one call (domain "ann2snn.kernels", opset 1).
//
//   IFChunk(current, v, threshold) -> (spikes, v_next)
//   SignedIFChunk(current, v, count, threshold) -> (spikes, v_next, count_next)
//   SignedBurstIFChunk(current, v, count, threshold, max_spikes) -> (spikes, v_next, count_next)
//
// Attribute `steps` (int, >= 1). `v` and `count` are [N, ...]; `current` is [steps*N, ...]
// (time-major: step t is rows t*N .. t*N+N-1) or [N, ...] (the same current at every step);
// `spikes` is [steps*N, ...]; the states out are those after the last step. `threshold` and
// `max_spikes` hold one value or one per element of a sample (the runtime expands them).
// Each step does the float32 operations of the ONNX function, in the same order, so the
// results are the same bit for bit (built with -ffp-contract=off: no fused multiply-add; the
// one exception, the sign of a zero burst, is at max_nan below).
// Elements are independent: blocks of elements run in parallel on onnxruntime's threads,
// each block going through every step while its membranes stay in cache.
//
// Built by `make kernels` against the onnxruntime C API headers (fetched, not committed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT  // the API comes from RegisterCustomOps, not from a linked onnxruntime
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace {

const OrtApi* g_api = nullptr;

enum class Kind { kIF, kSigned, kBurst };

constexpr size_t kBlock = 8192;  // elements per parallel work item
// below this many element-steps a call runs on the calling thread: waking onnxruntime's
// (non-spinning) pool costs more than it saves on a small layer (batch 1, one step)
constexpr size_t kParallelWork = size_t{1} << 18;

struct Args {
  Kind kind;
  int64_t steps;
  size_t elems;        // N * sample
  size_t sample;       // elements per sample
  bool x_constant;     // current is [N, ...]: the same every step
  const float* x;
  const float* v;
  const float* c;      // count (signed kinds)
  const float* th;
  size_t th_n;         // 1 or sample
  const float* m;      // max_spikes (burst)
  size_t m_n;
  float* s;
  float* v_out;
  float* c_out;
};

// onnxruntime's Max / Min propagate NaN. Of 0 and -0 they return either, by the element's lane
// in a vector register; these return the second: the burst neuron's values are the function's,
// the sign of a zero spike may differ
inline float max_nan(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b); }
inline float min_nan(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (a < b ? a : b); }

// One step of one neuron kind over n contiguous elements, in place on the states (`v`, `c`);
// `th` / `mx` point at one value (TS / ms = 0) or at one per element (1). The IF and signed
// kinds run four elements at a time (GCC vector extensions: the same IEEE float32 operations
// as the scalar code, whatever the target); the burst kind and the tail run the scalar code.
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));

inline f4 load4(const float* p) {
  f4 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store4(float* p, f4 r) { std::memcpy(p, &r, sizeof r); }

template <Kind K, int TS>
inline void step(size_t n, const float* __restrict x, float* __restrict v, float* __restrict c,
                 const float* __restrict th, const float* __restrict mx, int ms, float* __restrict s) {
  size_t i = 0;
  if (K != Kind::kBurst) {
    const f4 one = {1.0f, 1.0f, 1.0f, 1.0f}, zero = {0.0f, 0.0f, 0.0f, 0.0f};
    const i4 one_bits = reinterpret_cast<const i4&>(one);
    const f4 th_all = {th[0], th[0], th[0], th[0]};
    for (; i + 4 <= n; i += 4) {
      const f4 t = TS ? load4(th + i) : th_all;
      const f4 charged = load4(v + i) + load4(x + i);  // Add(v, current)
      f4 spike = reinterpret_cast<f4>((charged >= t) & one_bits);  // Cast(GreaterOrEqual(v', θ))
      if (K == Kind::kSigned) {
        const f4 cnt = load4(c + i);
        const f4 down = reinterpret_cast<f4>((charged < zero) & (cnt > zero) & one_bits);
        spike = spike - down;
        store4(c + i, cnt + spike);  // Add(count, spikes)
      }
      store4(s + i, spike);
      store4(v + i, charged - spike * t);  // Sub(v', Mul(spikes, θ))
    }
  }
  for (; i < n; ++i) {
    const float t = th[i * TS];
    const float charged = v[i] + x[i];  // Add(v, current)
    float spike;
    if (K == Kind::kIF) {
      spike = charged >= t ? 1.0f : 0.0f;  // Cast(GreaterOrEqual(v', θ))
    } else if (K == Kind::kSigned) {
      const float up = charged >= t ? 1.0f : 0.0f;
      const float down = (charged < 0.0f && c[i] > 0.0f) ? 1.0f : 0.0f;
      spike = up - down;
    } else {
      const float m = mx[i * ms];
      const float whole = std::floor(charged / t);  // Floor(Div(v', θ))
      spike = min_nan(max_nan(max_nan(whole, -c[i]), -m), m);
    }
    s[i] = spike;
    v[i] = charged - spike * t;  // Sub(v', Mul(spikes, θ))
    if (K != Kind::kIF) c[i] = c[i] + spike;  // Add(count, spikes)
  }
}

template <Kind K>
void run_block_kind(const Args& a, size_t b0, size_t b1) {
  // the states start as the inputs' values and are updated in the outputs' buffers (which may
  // be the inputs' own: each element is read before it is written)
  if (a.v_out != a.v) std::memcpy(a.v_out + b0, a.v + b0, (b1 - b0) * sizeof(float));
  if (K != Kind::kIF && a.c_out != a.c) std::memcpy(a.c_out + b0, a.c + b0, (b1 - b0) * sizeof(float));
  for (int64_t t = 0; t < a.steps; ++t) {
    const float* x = a.x + (a.x_constant ? 0 : static_cast<size_t>(t) * a.elems);
    float* s = a.s + static_cast<size_t>(t) * a.elems;
    if (a.th_n == 1 && (K != Kind::kBurst || a.m_n == 1)) {
      step<K, 0>(b1 - b0, x + b0, a.v_out + b0, a.c_out ? a.c_out + b0 : nullptr, a.th, a.m, 0, s + b0);
      continue;
    }
    // per-element parameters: runs of consecutive elements within one sample
    for (size_t i = b0; i < b1;) {
      const size_t j = i % a.sample, n = std::min(b1 - i, a.sample - j);
      const float* th = a.th + (a.th_n == 1 ? 0 : j);
      const float* mx = a.m ? a.m + (a.m_n == 1 ? 0 : j) : nullptr;
      if (a.th_n == 1) {  // only max_spikes varies (burst)
        step<K, 0>(n, x + i, a.v_out + i, a.c_out + i, th, mx, 1, s + i);
      } else {
        step<K, 1>(n, x + i, a.v_out + i, a.c_out ? a.c_out + i : nullptr, th, mx, a.m_n == 1 ? 0 : 1, s + i);
      }
      i += n;
    }
  }
}

void run_block(void* data, size_t block) {
  const Args& a = *static_cast<const Args*>(data);
  const size_t b0 = block * kBlock, b1 = std::min(a.elems, b0 + kBlock);
  if (b0 >= b1) return;
  if (a.kind == Kind::kIF) run_block_kind<Kind::kIF>(a, b0, b1);
  else if (a.kind == Kind::kSigned) run_block_kind<Kind::kSigned>(a, b0, b1);
  else run_block_kind<Kind::kBurst>(a, b0, b1);
}

#define RETURN_IF(expr)                  \
  do {                                   \
    if (OrtStatus* st_ = (expr)) return st_; \
  } while (0)

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

struct Tensor {
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  size_t size = 1;
};

OrtStatus* read_input(OrtKernelContext* ctx, size_t index, Tensor& t) {
  RETURN_IF(g_api->KernelContext_GetInput(ctx, index, &t.value));
  if (t.value == nullptr) return fail("ann2snn.kernels: missing input " + std::to_string(index));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF(g_api->GetTensorTypeAndShape(t.value, &info));
  size_t rank = 0;
  OrtStatus* st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t.shape.resize(rank);
    st = g_api->GetDimensions(info, t.shape.data(), rank);
  }
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (st == nullptr) st = g_api->GetTensorElementType(info, &type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail("ann2snn.kernels: input " + std::to_string(index) + " is not float32");
  t.size = 1;
  for (int64_t d : t.shape) {
    if (d < 0) return fail("ann2snn.kernels: negative dimension");
    t.size *= static_cast<size_t>(d);
  }
  return nullptr;
}

template <typename P>
OrtStatus* data_of(const OrtValue* v, P** out) {
  void* p = nullptr;
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  *out = static_cast<P*>(p);
  return nullptr;
}

OrtStatus* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, float** data) {
  OrtValue* out = nullptr;
  RETURN_IF(g_api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &out));
  return data_of(out, data);
}

struct Kernel {
  Kind kind;
  int64_t steps = 1;

  OrtStatus* ComputeV2(OrtKernelContext* ctx) {
    const bool signed_kind = kind != Kind::kIF;
    Tensor x, v, c, th, m;
    RETURN_IF(read_input(ctx, 0, x));
    RETURN_IF(read_input(ctx, 1, v));
    size_t k = 2;
    if (signed_kind) RETURN_IF(read_input(ctx, k++, c));
    RETURN_IF(read_input(ctx, k++, th));
    if (kind == Kind::kBurst) RETURN_IF(read_input(ctx, k++, m));
    if (v.shape.empty() || v.shape[0] == 0) return fail("ann2snn.kernels: the state needs a batch axis");
    const size_t n = static_cast<size_t>(v.shape[0]), sample = v.size / n;
    if (x.shape.size() != v.shape.size() || !std::equal(x.shape.begin() + 1, x.shape.end(), v.shape.begin() + 1))
      return fail("ann2snn.kernels: current and state shapes differ beyond the batch axis");
    const size_t rows = static_cast<size_t>(x.shape[0]);
    if (rows != n && rows != n * static_cast<size_t>(steps))
      return fail("ann2snn.kernels: current has " + std::to_string(rows) + " rows, expected the batch (" +
                  std::to_string(n) + ") or steps x batch");
    if (signed_kind && c.shape != v.shape) return fail("ann2snn.kernels: count and membrane shapes differ");
    if (th.size != 1 && th.size != sample) return fail("ann2snn.kernels: threshold must hold 1 or one value per element of a sample");
    if (kind == Kind::kBurst && m.size != 1 && m.size != sample)
      return fail("ann2snn.kernels: max_spikes must hold 1 or one value per element of a sample");
    Args a{};
    a.kind = kind;
    a.steps = steps;
    a.elems = v.size;
    a.sample = sample == 0 ? 1 : sample;
    a.x_constant = rows == n && steps > 1;
    std::vector<int64_t> s_shape = v.shape;
    s_shape[0] = static_cast<int64_t>(n * static_cast<size_t>(steps));
    RETURN_IF(data_of(x.value, &a.x));
    RETURN_IF(data_of(v.value, &a.v));
    RETURN_IF(data_of(th.value, &a.th));
    a.th_n = th.size;
    if (signed_kind) RETURN_IF(data_of(c.value, &a.c));
    if (kind == Kind::kBurst) {
      RETURN_IF(data_of(m.value, &a.m));
      a.m_n = m.size;
    }
    RETURN_IF(output(ctx, 0, s_shape, &a.s));
    RETURN_IF(output(ctx, 1, v.shape, &a.v_out));
    if (signed_kind) RETURN_IF(output(ctx, 2, v.shape, &a.c_out));
    if (a.elems == 0) return nullptr;
    const size_t blocks = (a.elems + kBlock - 1) / kBlock;
    if (blocks == 1 || a.elems * static_cast<size_t>(steps) < kParallelWork) {
      for (size_t b = 0; b < blocks; ++b) run_block(&a, b);
      return nullptr;
    }
    return g_api->KernelContext_ParallelFor(ctx, run_block, blocks, 0, &a);
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, true> {
  Kind kind;
  const char* name;
  Op(Kind k, const char* n) : kind(k), name(n) {}

  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    int64_t steps = 1;
    RETURN_IF(api.KernelInfoGetAttribute_int64(info, "steps", &steps));
    if (steps < 1) return fail(std::string(name) + ": attribute steps must be >= 1");
    auto* kernel = new Kernel{kind, steps};
    *out = kernel;
    return nullptr;
  }
  // Output shapes for onnxruntime's graph optimiser (without them it cannot prove the shapes
  // downstream equal, and fuses less: a residual Add stays out of the Conv before it, which
  // changes the convolution's last bits): spikes as the current (or [steps*N, ...] for a
  // current given once), the states as the state inputs.
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    using Dim = Ort::ShapeInferContext::SymbolicInteger;
    const Ort::ShapeInferContext::Shape x = ctx.GetInputShape(0), v = ctx.GetInputShape(1);
    const int64_t steps = ctx.GetAttrInt("steps");
    // an empty shape is an unknown one here (a neuron's tensors have a batch axis), and a
    // symbolic dimension does not come through this API (onnxruntime 1.32 makes the shape []):
    // such shapes are left unset (the runtime gives the outputs' shapes as value_info instead)
    auto known = [](const Ort::ShapeInferContext::Shape& s) {
      return !s.empty() && std::all_of(s.begin(), s.end(), [](const Dim& d) { return d.IsInt() && d.AsInt() >= 0; });
    };
    if (!known(x) || !known(v)) return nullptr;
    {
      Ort::ShapeInferContext::Shape spikes = x;
      if (steps > 1 && x[0] == v[0]) spikes[0] = Dim(v[0].AsInt() * steps);
      Ort::Status st = ctx.SetOutputShape(0, spikes);
      if (!st.IsOK()) return st.release();
    }
    for (size_t k = 1; k < (ctx.GetInputCount() >= 4 ? 3u : 2u); ++k) {
      Ort::Status st = ctx.SetOutputShape(k, v);
      if (!st.IsOK()) return st.release();
    }
    return nullptr;
  }
  const char* GetName() const { return name; }
  size_t GetInputTypeCount() const { return kind == Kind::kIF ? 3 : (kind == Kind::kSigned ? 4 : 5); }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return kind == Kind::kIF ? 2 : 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

Op g_if(Kind::kIF, "IFChunk");
Op g_signed(Kind::kSigned, "SignedIFChunk");
Op g_burst(Kind::kBurst, "SignedBurstIFChunk");

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an older onnxruntime: no status API to report with
  g_api = api;
  Ort::InitApi(api);  // the C++ wrapper's shape inference context uses it
  // One domain for the process, made at the first registration: onnxruntime keeps a pointer to
  // it for each session's life and never frees it, so a domain per registration (per session)
  // would leak. The ops it holds are the static g_* objects above.
  static OrtCustomOpDomain* domain = nullptr;
  static OrtStatus* failure = nullptr;
  static std::once_flag once;
  std::call_once(once, [api] {
    failure = api->CreateCustomOpDomain("ann2snn.kernels", &domain);
    for (Op* op : {&g_if, &g_signed, &g_burst})
      if (failure == nullptr) failure = api->CustomOpDomain_Add(domain, op);
  });
  if (failure != nullptr) return api->CreateStatus(api->GetErrorCode(failure), api->GetErrorMessage(failure));
  return api->AddCustomOpDomain(options, domain);
}
