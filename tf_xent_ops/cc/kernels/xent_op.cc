/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

OpKernels of the fused cross-entropy ops: validate, allocate, call the functor.
*/
#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

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

// Reads and checks the attributes every op shares.
void ReadParams(OpKernelConstruction* ctx, XentParams* p) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("from_logits", &p->from_logits));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("label_smoothing", &p->label_smoothing));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &p->epsilon));
  OP_REQUIRES(ctx, p->label_smoothing >= 0.0f && p->label_smoothing <= 1.0f,
              InvalidArgument("label_smoothing must be in [0, 1], got ",
                              p->label_smoothing));
  OP_REQUIRES(ctx, p->epsilon >= 0.0f && p->epsilon <= 0.5f,
              InvalidArgument("epsilon must be in [0, 0.5], got ", p->epsilon));
  if (ctx->HasAttr("use_ignore_class")) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_ignore_class", &p->use_ignore_class));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ignore_class", &p->ignore_class));
  }
}

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

// Checks predictions is [N, C] and sets num_rows / num_classes.
void CheckPredictions(OpKernelContext* ctx, const Tensor& predictions,
                      XentParams* p) {
  OP_REQUIRES(
      ctx, predictions.dims() == 2,
      InvalidArgument("predictions must be 2-D [num_rows, num_classes], "
                      "got shape ",
                      predictions.shape().DebugString()));
  p->num_rows = predictions.dim_size(0);
  p->num_classes = predictions.dim_size(1);
  OP_REQUIRES(ctx, p->num_rows == 0 || p->num_classes > 0,
              InvalidArgument("predictions must have at least one class, got "
                              "shape ",
                              predictions.shape().DebugString()));
}

// Checks `t` has exactly `shape`.
void CheckShape(OpKernelContext* ctx, const char* name, const Tensor& t,
                const TensorShape& shape) {
  OP_REQUIRES(ctx, t.shape() == shape,
              InvalidArgument(name, " must have shape ", shape.DebugString(),
                              ", got ", t.shape().DebugString()));
}

// Every sparse label is a class index or the ignored class: checked before
// any row is read, so no kernel indexes out of bounds.
template <typename Tidx>
void CheckLabels(OpKernelContext* ctx, const XentParams& p,
                 const Tensor& labels) {
  const Tidx* data = labels.flat<Tidx>().data();
  const int64_t bad = FindInvalidLabel(p, data);
  OP_REQUIRES(
      ctx, bad < 0,
      InvalidArgument(
          "Received a label value of ",
          bad < 0 ? 0 : static_cast<int64_t>(data[bad]), " at position ", bad,
          " which is outside the valid range of [0, ", p.num_classes, ")",
          p.use_ignore_class ? ::tensorflow::strings::StrCat(
                                   " and is not ignore_class=", p.ignore_class)
                             : std::string()));
}

}  // namespace

template <typename Device, typename T, typename Tidx>
class SparseXentOp : public OpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit SparseXentOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadParams(ctx, &params_);
  }

  void Compute(OpKernelContext* ctx) override {
    XentParams p = params_;
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    CheckPredictions(ctx, predictions, &p);
    if (!ctx->status().ok()) return;
    CheckShape(ctx, "labels", labels, TensorShape({p.num_rows}));
    if (!ctx->status().ok()) return;
    if (DeviceTraits<Device>::kChecksLabels) {
      CheckLabels<Tidx>(ctx, p, labels);
      if (!ctx->status().ok()) return;
    }

    Tensor *loss = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, labels.shape(), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, labels.shape(), &lse));
    SparseXentForward<Device, typename KernelType<Device, T>::type, Tidx>()(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tidx>().data(), loss->flat<Tacc>().data(),
        lse->flat<Tacc>().data());
    DeviceTraits<Device>::CheckLaunch(ctx);
  }

 private:
  XentParams params_;
};

template <typename Device, typename T, typename Tidx>
class SparseXentGradOp : public OpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit SparseXentGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadParams(ctx, &params_);
  }

  void Compute(OpKernelContext* ctx) override {
    XentParams p = params_;
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    const Tensor& lse = ctx->input(2);
    const Tensor& grad_loss = ctx->input(3);
    CheckPredictions(ctx, predictions, &p);
    if (!ctx->status().ok()) return;
    const TensorShape rows({p.num_rows});
    CheckShape(ctx, "labels", labels, rows);
    CheckShape(ctx, "log_sum_exp", lse, rows);
    CheckShape(ctx, "grad_loss", grad_loss, rows);
    if (!ctx->status().ok()) return;
    if (DeviceTraits<Device>::kChecksLabels) {
      CheckLabels<Tidx>(ctx, p, labels);
      if (!ctx->status().ok()) return;
    }

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, predictions.shape(), &grad));
    SparseXentBackward<Device, typename KernelType<Device, T>::type, Tidx>()(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tidx>().data(), lse.flat<Tacc>().data(),
        grad_loss.flat<Tacc>().data(), MutableData<Device, T>(grad));
    DeviceTraits<Device>::CheckLaunch(ctx);
  }

 private:
  XentParams params_;
};

template <typename Device, typename T>
class DenseXentOp : public OpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadParams(ctx, &params_);
  }

  void Compute(OpKernelContext* ctx) override {
    XentParams p = params_;
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    CheckPredictions(ctx, predictions, &p);
    if (!ctx->status().ok()) return;
    CheckShape(ctx, "labels", labels, predictions.shape());
    if (!ctx->status().ok()) return;

    Tensor *loss = nullptr, *stats = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(0, TensorShape({p.num_rows}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, TensorShape({p.num_rows, kDenseStats}), &stats));
    DenseXentForward<Device, typename KernelType<Device, T>::type>()(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tacc>().data(), loss->flat<Tacc>().data(),
        stats->flat<Tacc>().data());
    DeviceTraits<Device>::CheckLaunch(ctx);
  }

 private:
  XentParams params_;
};

template <typename Device, typename T>
class DenseXentGradOp : public OpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadParams(ctx, &params_);
  }

  void Compute(OpKernelContext* ctx) override {
    XentParams p = params_;
    const Tensor& predictions = ctx->input(0);
    const Tensor& labels = ctx->input(1);
    const Tensor& stats = ctx->input(2);
    const Tensor& grad_loss = ctx->input(3);
    CheckPredictions(ctx, predictions, &p);
    if (!ctx->status().ok()) return;
    CheckShape(ctx, "labels", labels, predictions.shape());
    CheckShape(ctx, "stats", stats, TensorShape({p.num_rows, kDenseStats}));
    CheckShape(ctx, "grad_loss", grad_loss, TensorShape({p.num_rows}));
    if (!ctx->status().ok()) return;

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, predictions.shape(), &grad));
    DenseXentBackward<Device, typename KernelType<Device, T>::type>()(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        labels.flat<Tacc>().data(), stats.flat<Tacc>().data(),
        grad_loss.flat<Tacc>().data(), MutableData<Device, T>(grad));
    DeviceTraits<Device>::CheckLaunch(ctx);
  }

 private:
  XentParams params_;
};

template <typename Device, typename T>
class DenseXentLabelsGradOp : public OpKernel {
 public:
  using Tacc = typename AccumulatorType<T>::type;
  explicit DenseXentLabelsGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadParams(ctx, &params_);
  }

  void Compute(OpKernelContext* ctx) override {
    XentParams p = params_;
    const Tensor& predictions = ctx->input(0);
    const Tensor& stats = ctx->input(1);
    const Tensor& grad_loss = ctx->input(2);
    CheckPredictions(ctx, predictions, &p);
    if (!ctx->status().ok()) return;
    CheckShape(ctx, "stats", stats, TensorShape({p.num_rows, kDenseStats}));
    CheckShape(ctx, "grad_loss", grad_loss, TensorShape({p.num_rows}));
    if (!ctx->status().ok()) return;

    Tensor* grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, predictions.shape(), &grad));
    DenseXentLabelsBackward<Device, typename KernelType<Device, T>::type>()(
        DeviceTraits<Device>::Make(ctx), p, Data<Device, T>(predictions),
        stats.flat<Tacc>().data(), grad_loss.flat<Tacc>().data(),
        grad->flat<Tacc>().data());
    DeviceTraits<Device>::CheckLaunch(ctx);
  }

 private:
  XentParams params_;
};

// Tloss is pinned to the accumulation type so a mismatched call finds no
// kernel rather than a kernel writing the wrong type.
#define TFXENT_REGISTER_SPARSE(DEVICE, DeviceT, T, Tidx)     \
  REGISTER_KERNEL_BUILDER(                                   \
      Name("TfXent>SparseXent")                              \
          .Device(DEVICE)                                    \
          .TypeConstraint<T>("T")                            \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss") \
          .TypeConstraint<Tidx>("Tidx"),                     \
      SparseXentOp<DeviceT, T, Tidx>);                       \
  REGISTER_KERNEL_BUILDER(                                   \
      Name("TfXent>SparseXentGrad")                          \
          .Device(DEVICE)                                    \
          .TypeConstraint<T>("T")                            \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss") \
          .TypeConstraint<Tidx>("Tidx"),                     \
      SparseXentGradOp<DeviceT, T, Tidx>);

#define TFXENT_REGISTER_DENSE(DEVICE, DeviceT, T)             \
  REGISTER_KERNEL_BUILDER(                                    \
      Name("TfXent>DenseXent")                                \
          .Device(DEVICE)                                     \
          .TypeConstraint<T>("T")                             \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss"), \
      DenseXentOp<DeviceT, T>);                               \
  REGISTER_KERNEL_BUILDER(                                    \
      Name("TfXent>DenseXentGrad")                            \
          .Device(DEVICE)                                     \
          .TypeConstraint<T>("T")                             \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss"), \
      DenseXentGradOp<DeviceT, T>);                           \
  REGISTER_KERNEL_BUILDER(                                    \
      Name("TfXent>DenseXentLabelsGrad")                      \
          .Device(DEVICE)                                     \
          .TypeConstraint<T>("T")                             \
          .TypeConstraint<AccumulatorType<T>::type>("Tloss"), \
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

}  // namespace tf_xent_ops
