/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

OpKernels of the fused cross-entropy ops: validate, allocate, call the functor
(on the CPU, the functor of the instruction-set level in use). Every check
lives in XentOpKernel; each op's Compute names its inputs.
*/
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_dispatch.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"
#include "tf_xent_ops/cc/kernels/xent_row_math.h"

#ifdef TFXENT_WITH_CUDA
#include "xla/stream_executor/stream.h"

// CUDA's 16-bit types, which the GPU functors are instantiated with (same
// layout as Eigen::half and Eigen::bfloat16). Only pointers cross over.
struct __half;
struct __nv_bfloat16;
#endif

namespace tf_xent_ops {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

namespace {

CpuDevice MakeCpuDevice(OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  CpuDevice d;
  d.parallel_for = [pool](int64_t total, int64_t cost_per_unit,
                          const CpuDevice::ShardFn& fn) {
    pool->ParallelFor(
        total,
        ::tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost_per_unit),
        fn);
  };
  return d;
}

// What differs between devices: how to get one from the context, whether
// labels can be checked on the host before the kernel runs, and the element
// type the functors take.
template <typename Device>
struct DeviceTraits;

template <>
struct DeviceTraits<CpuDevice> {
  static CpuDevice Make(OpKernelContext* ctx) { return MakeCpuDevice(ctx); }
  static constexpr bool kChecksLabels = true;
  static void CheckLaunch(OpKernelContext*) {}
};

template <typename Device, typename T>
struct KernelType {
  using type = T;
};

#ifdef TFXENT_WITH_CUDA
template <>
struct DeviceTraits<GpuDevice> {
  static GpuDevice Make(OpKernelContext* ctx) {
    return GpuDevice{
        ctx->op_device_context()->stream()->platform_specific_handle().stream};
  }
  // Labels live on the device; the kernels give a bad label's row a NaN loss
  // and never read through it.
  static constexpr bool kChecksLabels = false;
  // A kernel that could not be launched leaves its outputs unwritten.
  static void CheckLaunch(OpKernelContext* ctx) {
    if (const char* error = TakeGpuLaunchError()) {
      ctx->CtxFailure(::tensorflow::errors::Internal(
          "tf_xent_ops: GPU kernel launch failed: ", error));
    }
  }
};
template <>
struct KernelType<GpuDevice, Eigen::half> {
  using type = __half;
};
template <>
struct KernelType<GpuDevice, ::tensorflow::bfloat16> {
  using type = __nv_bfloat16;
};
#endif

// Runs a functor: the CPU's through the table of the level in use (the
// kernel's construction checked that there is one), the GPU's directly.
template <typename Functor, typename... Args>
void Run(const CpuDevice& d, Args&&... args) {
  CpuFunction<Functor> (*CpuKernelsInUse(nullptr))(d,
                                                   std::forward<Args>(args)...);
}
#ifdef TFXENT_WITH_CUDA
template <typename Functor, typename... Args>
void Run(const GpuDevice& d, Args&&... args) {
  Functor()(d, std::forward<Args>(args)...);
}
#endif

// The data of `t` as the functors' element type for T.
template <typename Device, typename T>
const typename KernelType<Device, T>::type* Data(const Tensor& t) {
  return reinterpret_cast<const typename KernelType<Device, T>::type*>(
      t.flat<T>().data());
}
template <typename Device, typename T>
typename KernelType<Device, T>::type* MutableData(Tensor* t) {
  return reinterpret_cast<typename KernelType<Device, T>::type*>(
      t->flat<T>().data());
}

// The dense statistics of `t` ([N, DenseRowStats::kColumns] of Tacc).
template <typename Tacc>
const DenseRowStats<Tacc>* RowStats(const Tensor& t) {
  return reinterpret_cast<const DenseRowStats<Tacc>*>(t.flat<Tacc>().data());
}
template <typename Tacc>
DenseRowStats<Tacc>* MutableRowStats(Tensor* t) {
  return reinterpret_cast<DenseRowStats<Tacc>*>(t->flat<Tacc>().data());
}

// The shape an input must have, given predictions of shape [N, C].
enum class Extent {
  kRows,         // [N]
  kRowsClasses,  // [N, C]
  kRowStats,     // [N, DenseRowStats::kColumns]
};
struct InputSpec {
  const char* name;
  Extent extent;
};

TensorShape ShapeOf(Extent extent, const XentParams& p) {
  switch (extent) {
    case Extent::kRows:
      return TensorShape({p.num_rows});
    case Extent::kRowsClasses:
      return TensorShape({p.num_rows, p.num_classes});
    case Extent::kRowStats:
      return TensorShape({p.num_rows, DenseRowStats<float>::kColumns});
  }
  return TensorShape();
}

// The scalar coefficients every op takes last, in this order.
constexpr int kNumCoefficients = 4;

// Reads the coefficient inputs (scalars of type Tacc) into `p`, checked.
template <typename Tacc>
bool ReadCoefficients(OpKernelContext* ctx, XentParams* p) {
  const int first = ctx->num_inputs() - kNumCoefficients;
  const char* const kNames[kNumCoefficients] = {"label_smoothing", "epsilon",
                                                "z_loss", "logit_soft_cap"};
  double* const values[kNumCoefficients] = {&p->label_smoothing, &p->epsilon,
                                            &p->z_loss, &p->logit_soft_cap};
  for (int i = 0; i < kNumCoefficients; ++i) {
    const Tensor& t = ctx->input(first + i);
    if (!::tensorflow::TensorShapeUtils::IsScalar(t.shape())) {
      ctx->CtxFailure(InvalidArgument(
          kNames[i], " must be a scalar, got shape ", t.shape().DebugString()));
      return false;
    }
    *values[i] = static_cast<double>(t.scalar<Tacc>()());
  }
  // The caps Tacc can apply: normal, with z / cap flushed to 0 only for
  // logits within an ulp of 1 of 0 (as ops.soft_cap_range).
  constexpr double kMinCap = std::numeric_limits<Tacc>::min();
  constexpr double kMaxCap = std::numeric_limits<Tacc>::epsilon() / kMinCap;
  const bool cap_in_range =
      p->logit_soft_cap == 0.0 ||
      (p->logit_soft_cap >= kMinCap && p->logit_soft_cap <= kMaxCap);
  const char* bad = nullptr;
  if (!(p->label_smoothing >= 0.0 && p->label_smoothing <= 1.0)) {
    bad = "label_smoothing must be in [0, 1]";
  } else if (!(p->epsilon >= 0.0 && p->epsilon <= 0.5)) {
    bad = "epsilon must be in [0, 0.5]";
  } else if (!(p->z_loss >= 0.0 && std::isfinite(p->z_loss))) {
    bad = "z_loss must be finite and >= 0";
  } else if (!(p->logit_soft_cap >= 0.0 && std::isfinite(p->logit_soft_cap))) {
    bad = "logit_soft_cap must be finite and >= 0 (0: no cap)";
  } else if (!p->from_logits &&
             (p->z_loss != 0.0 || p->logit_soft_cap != 0.0)) {
    bad = "z_loss and logit_soft_cap apply to logits only (from_logits=true)";
  }
  if (bad == nullptr && !cap_in_range) {
    ctx->CtxFailure(InvalidArgument(
        "logit_soft_cap must be 0 or within [", kMinCap, ", ", kMaxCap,
        "] for ", std::is_same_v<Tacc, double> ? "float64" : "float32",
        " losses; got logit_soft_cap=", p->logit_soft_cap));
    return false;
  }
  if (bad == nullptr) return true;
  ctx->CtxFailure(
      InvalidArgument(bad, "; got label_smoothing=", p->label_smoothing,
                      ", epsilon=", p->epsilon, ", z_loss=", p->z_loss,
                      ", logit_soft_cap=", p->logit_soft_cap));
  return false;
}

// The base of every op's kernel: reads the attributes once, and checks each
// call's inputs before anything is allocated or read.
class XentOpKernel : public OpKernel {
 protected:
  explicit XentOpKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("from_logits", &params_.from_logits));
    if (ctx->HasAttr("use_ignore_class")) {
      OP_REQUIRES_OK(
          ctx, ctx->GetAttr("use_ignore_class", &params_.use_ignore_class));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("ignore_class", &params_.ignore_class));
    }
    if (ctx->device_type() == DEVICE_CPU) {
      std::string error;
      OP_REQUIRES(
          ctx, CpuKernelsInUse(&error) != nullptr,
          ::tensorflow::errors::FailedPrecondition("tf_xent_ops: ", error));
    }
  }

  // The parameters of this call: input 0, the predictions, must be [N, C]
  // (C > 0 where N > 0), inputs 1, 2, ... must have the shapes `inputs`
  // lists, and the coefficients (the last inputs, of type Tacc) must be
  // scalars in range. Returns false, with the context's status set, if not.
  template <typename Tacc>
  bool Validate(OpKernelContext* ctx, std::initializer_list<InputSpec> inputs,
                XentParams* p) const {
    *p = params_;
    if (!ReadCoefficients<Tacc>(ctx, p)) return false;
    const Tensor& predictions = ctx->input(0);
    if (predictions.dims() != 2) {
      ctx->CtxFailure(InvalidArgument(
          "predictions must be 2-D [num_rows, num_classes], got shape ",
          predictions.shape().DebugString()));
      return false;
    }
    p->num_rows = predictions.dim_size(0);
    p->num_classes = predictions.dim_size(1);
    if (p->num_rows > 0 && p->num_classes == 0) {
      ctx->CtxFailure(InvalidArgument(
          "predictions must have at least one class, got shape ",
          predictions.shape().DebugString()));
      return false;
    }
    int index = 1;
    for (const InputSpec& spec : inputs) {
      const TensorShape expected = ShapeOf(spec.extent, *p);
      const Tensor& t = ctx->input(index++);
      if (t.shape() != expected) {
        ctx->CtxFailure(InvalidArgument(spec.name, " must have shape ",
                                        expected.DebugString(), ", got ",
                                        t.shape().DebugString()));
        return false;
      }
    }
    return true;
  }

  // Every sparse label is a class index or the ignored class: checked before
  // any row is read, so no kernel indexes out of bounds. Devices whose labels
  // the host cannot read check nothing here (their kernels give a bad
  // label's row a NaN loss instead).
  template <typename Device, typename Tidx>
  static bool CheckLabels(OpKernelContext* ctx, const XentParams& p,
                          const Tensor& labels) {
    if (!DeviceTraits<Device>::kChecksLabels) return true;
    const Tidx* data = labels.flat<Tidx>().data();
    const int64_t bad = FindInvalidLabel(p, data);
    if (bad < 0) return true;
    ctx->CtxFailure(InvalidArgument(
        "Received a label value of ", static_cast<int64_t>(data[bad]),
        " at position ", bad, " which is outside the valid range of [0, ",
        p.num_classes, ")",
        p.use_ignore_class ? ::tensorflow::strings::StrCat(
                                 " and is not ignore_class=", p.ignore_class)
                           : std::string()));
    return false;
  }

 private:
  XentParams params_;
};

}  // namespace

template <typename Device, typename T, typename Tidx>
class SparseXentOp : public XentOpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit SparseXentOp(OpKernelConstruction* ctx) : XentOpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    XentParams p;
    if (!Validate<Tacc>(ctx, {{"labels", Extent::kRows}}, &p)) return;
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    if (!CheckLabels<Device, Tidx>(ctx, p, labels)) return;

    Tensor *loss = nullptr, *normalizer = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, labels.shape(), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, labels.shape(), &normalizer));
    Run<SparseXentForward<Device, typename KernelType<Device, T>::type, Tidx>>(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tidx>().data(), loss->flat<Tacc>().data(),
        normalizer->flat<Tacc>().data());
    DeviceTraits<Device>::CheckLaunch(ctx);
  }
};

template <typename Device, typename T, typename Tidx>
class SparseXentGradOp : public XentOpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit SparseXentGradOp(OpKernelConstruction* ctx) : XentOpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    XentParams p;
    if (!Validate<Tacc>(ctx,
                        {{"labels", Extent::kRows},
                         {"normalizer", Extent::kRows},
                         {"grad_loss", Extent::kRows}},
                        &p)) {
      return;
    }
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    if (!CheckLabels<Device, Tidx>(ctx, p, labels)) return;

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, predictions.shape(), &grad));
    Run<SparseXentBackward<Device, typename KernelType<Device, T>::type, Tidx>>(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tidx>().data(), ctx->input(2).flat<Tacc>().data(),
        ctx->input(3).flat<Tacc>().data(), MutableData<Device, T>(grad));
    DeviceTraits<Device>::CheckLaunch(ctx);
  }
};

template <typename Device, typename T>
class DenseXentOp : public XentOpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentOp(OpKernelConstruction* ctx) : XentOpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    XentParams p;
    if (!Validate<Tacc>(ctx, {{"labels", Extent::kRowsClasses}}, &p)) return;
    const Tensor& predictions = ctx->input(0);

    Tensor *loss = nullptr, *row_stats = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(0, ShapeOf(Extent::kRows, p), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ShapeOf(Extent::kRowStats, p),
                                             &row_stats));
    Run<DenseXentForward<Device, typename KernelType<Device, T>::type>>(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        ctx->input(1).flat<Tacc>().data(), loss->flat<Tacc>().data(),
        MutableRowStats<Tacc>(row_stats));
    DeviceTraits<Device>::CheckLaunch(ctx);
  }
};

template <typename Device, typename T>
class DenseXentGradOp : public XentOpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentGradOp(OpKernelConstruction* ctx) : XentOpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    XentParams p;
    if (!Validate<Tacc>(ctx,
                        {{"labels", Extent::kRowsClasses},
                         {"row_stats", Extent::kRowStats},
                         {"grad_loss", Extent::kRows}},
                        &p)) {
      return;
    }
    const Tensor& predictions = ctx->input(0);

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, predictions.shape(), &grad));
    Run<DenseXentBackward<Device, typename KernelType<Device, T>::type>>(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        ctx->input(1).flat<Tacc>().data(), RowStats<Tacc>(ctx->input(2)),
        ctx->input(3).flat<Tacc>().data(), MutableData<Device, T>(grad));
    DeviceTraits<Device>::CheckLaunch(ctx);
  }
};

template <typename Device, typename T>
class DenseXentLabelsGradOp : public XentOpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentLabelsGradOp(OpKernelConstruction* ctx)
      : XentOpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    XentParams p;
    if (!Validate<Tacc>(
            ctx,
            {{"row_stats", Extent::kRowStats}, {"grad_loss", Extent::kRows}},
            &p)) {
      return;
    }
    const Tensor& predictions = ctx->input(0);

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, predictions.shape(), &grad));
    Run<DenseXentLabelsBackward<Device, typename KernelType<Device, T>::type>>(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        RowStats<Tacc>(ctx->input(1)), ctx->input(2).flat<Tacc>().data(),
        grad->flat<Tacc>().data());
    DeviceTraits<Device>::CheckLaunch(ctx);
  }
};

// Tloss is pinned to the accumulation type so a mismatched call finds no
// kernel rather than a kernel writing the wrong type. The coefficients are
// read on the host (on every device: a no-op for CPU kernels).
#define TFXENT_COEFFICIENTS_IN_HOST_MEMORY \
  .HostMemory("label_smoothing")           \
      .HostMemory("epsilon")               \
      .HostMemory("z_loss")                \
      .HostMemory("logit_soft_cap")
#define TFXENT_REGISTER_SPARSE(DEVICE, DeviceT, T, Tidx)                    \
  REGISTER_KERNEL_BUILDER(                                                  \
      Name("TfXent>SparseXent")                                             \
          .Device(DEVICE)                                                   \
          .TypeConstraint<T>("T")                                           \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss")                \
          .TypeConstraint<Tidx>("Tidx") TFXENT_COEFFICIENTS_IN_HOST_MEMORY, \
      SparseXentOp<DeviceT, T, Tidx>);                                      \
  REGISTER_KERNEL_BUILDER(                                                  \
      Name("TfXent>SparseXentGrad")                                         \
          .Device(DEVICE)                                                   \
          .TypeConstraint<T>("T")                                           \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss")                \
          .TypeConstraint<Tidx>("Tidx") TFXENT_COEFFICIENTS_IN_HOST_MEMORY, \
      SparseXentGradOp<DeviceT, T, Tidx>);

#define TFXENT_REGISTER_DENSE(DEVICE, DeviceT, T)                              \
  REGISTER_KERNEL_BUILDER(Name("TfXent>DenseXent")                             \
                              .Device(DEVICE)                                  \
                              .TypeConstraint<T>("T")                          \
                              .TypeConstraint<AccumulatorType<T>::type>(       \
                                  "Tloss") TFXENT_COEFFICIENTS_IN_HOST_MEMORY, \
                          DenseXentOp<DeviceT, T>);                            \
  REGISTER_KERNEL_BUILDER(Name("TfXent>DenseXentGrad")                         \
                              .Device(DEVICE)                                  \
                              .TypeConstraint<T>("T")                          \
                              .TypeConstraint<AccumulatorType<T>::type>(       \
                                  "Tloss") TFXENT_COEFFICIENTS_IN_HOST_MEMORY, \
                          DenseXentGradOp<DeviceT, T>);                        \
  REGISTER_KERNEL_BUILDER(Name("TfXent>DenseXentLabelsGrad")                   \
                              .Device(DEVICE)                                  \
                              .TypeConstraint<T>("T")                          \
                              .TypeConstraint<AccumulatorType<T>::type>(       \
                                  "Tloss") TFXENT_COEFFICIENTS_IN_HOST_MEMORY, \
                          DenseXentLabelsGradOp<DeviceT, T>);

#define TFXENT_REGISTER_TYPE(DEVICE, DeviceT, T)      \
  TFXENT_REGISTER_SPARSE(DEVICE, DeviceT, T, int32_t) \
  TFXENT_REGISTER_SPARSE(DEVICE, DeviceT, T, int64_t) \
  TFXENT_REGISTER_DENSE(DEVICE, DeviceT, T)

#define TFXENT_REGISTER_ALL(DEVICE, DeviceT)                    \
  TFXENT_REGISTER_TYPE(DEVICE, DeviceT, Eigen::half)            \
  TFXENT_REGISTER_TYPE(DEVICE, DeviceT, ::tensorflow::bfloat16) \
  TFXENT_REGISTER_TYPE(DEVICE, DeviceT, float)                  \
  TFXENT_REGISTER_TYPE(DEVICE, DeviceT, double)

TFXENT_REGISTER_ALL(DEVICE_CPU, CpuDevice)
#ifdef TFXENT_WITH_CUDA
TFXENT_REGISTER_ALL(::tensorflow::DEVICE_GPU, GpuDevice)
#endif

#undef TFXENT_REGISTER_ALL
#undef TFXENT_REGISTER_TYPE
#undef TFXENT_REGISTER_DENSE
#undef TFXENT_REGISTER_SPARSE
#undef TFXENT_COEFFICIENTS_IN_HOST_MEMORY

}  // namespace tf_xent_ops
