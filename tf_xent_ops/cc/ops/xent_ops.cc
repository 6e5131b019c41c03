/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Registration of the fused cross-entropy ops: the op contract. Inputs are
row-major [num_rows, num_classes]; the Python layer moves the class axis last
and flattens. `Tloss` is float for half/bfloat16/float predictions and double
for double: losses, row statistics and dense labels are kept in that type.
The forwards return the loss and the row statistics their backwards read
(never an [N, C] tensor); docs/design.md describes each op.
*/
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Tloss must be the accumulation type of T.
Status CheckLossType(InferenceContext* c) {
  DataType t, tloss;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("Tloss", &tloss));
  const DataType expected = t == ::tensorflow::DT_DOUBLE
                                ? ::tensorflow::DT_DOUBLE
                                : ::tensorflow::DT_FLOAT;
  if (tloss != expected) {
    return ::tensorflow::errors::InvalidArgument(
        "Tloss must be ", ::tensorflow::DataTypeString(expected),
        " for predictions of type ", ::tensorflow::DataTypeString(t), ", got ",
        ::tensorflow::DataTypeString(tloss));
  }
  return ::tensorflow::OkStatus();
}

// The scalar coefficients every op takes last: label_smoothing, epsilon,
// z_loss, logit_soft_cap.
constexpr int kNumCoefficients = 4;

// The number of inputs before the coefficients, which must be scalars.
Status CheckCoefficients(InferenceContext* c, int* num_tensors) {
  *num_tensors = c->num_inputs() - kNumCoefficients;
  ShapeHandle scalar;
  for (int i = *num_tensors; i < c->num_inputs(); ++i) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &scalar));
  }
  return ::tensorflow::OkStatus();
}

// predictions [N, C] -> the handle, and N merged from `rows`.
Status PredictionsShape(InferenceContext* c, ShapeHandle* predictions,
                        DimensionHandle* num_rows) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, predictions));
  *num_rows = c->Dim(*predictions, 0);
  return ::tensorflow::OkStatus();
}

// Merges dimension 0 of input `index` (rank `rank`) into num_rows.
Status MergeRows(InferenceContext* c, int index, int rank,
                 DimensionHandle* num_rows, ShapeHandle* shape) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), rank, shape));
  return c->Merge(*num_rows, c->Dim(*shape, 0), num_rows);
}

Status SparseForwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckLossType(c));
  int num_tensors;
  TF_RETURN_IF_ERROR(CheckCoefficients(c, &num_tensors));
  ShapeHandle predictions, labels;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(PredictionsShape(c, &predictions, &n));
  TF_RETURN_IF_ERROR(MergeRows(c, 1, 1, &n, &labels));
  c->set_output(0, c->Vector(n));
  c->set_output(1, c->Vector(n));
  return ::tensorflow::OkStatus();
}

Status SparseBackwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckLossType(c));
  int num_tensors;
  TF_RETURN_IF_ERROR(CheckCoefficients(c, &num_tensors));
  ShapeHandle predictions, other;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(PredictionsShape(c, &predictions, &n));
  for (int i = 1; i < num_tensors; ++i)
    TF_RETURN_IF_ERROR(MergeRows(c, i, 1, &n, &other));
  c->set_output(0, c->Matrix(n, c->Dim(predictions, 1)));
  return ::tensorflow::OkStatus();
}

Status DenseForwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckLossType(c));
  int num_tensors;
  TF_RETURN_IF_ERROR(CheckCoefficients(c, &num_tensors));
  ShapeHandle predictions, labels;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(PredictionsShape(c, &predictions, &n));
  TF_RETURN_IF_ERROR(c->Merge(predictions, c->input(1), &labels));
  n = c->Dim(labels, 0);
  c->set_output(0, c->Vector(n));
  c->set_output(1, c->Matrix(n, DenseRowStats<float>::kColumns));
  return ::tensorflow::OkStatus();
}

Status DenseBackwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckLossType(c));
  int num_tensors;
  TF_RETURN_IF_ERROR(CheckCoefficients(c, &num_tensors));
  const bool with_labels = num_tensors == 4;
  ShapeHandle predictions, other;
  DimensionHandle n;
  TF_RETURN_IF_ERROR(PredictionsShape(c, &predictions, &n));
  int next = 1;
  if (with_labels) {
    TF_RETURN_IF_ERROR(c->Merge(predictions, c->input(next++), &predictions));
    n = c->Dim(predictions, 0);
  }
  ShapeHandle row_stats;
  TF_RETURN_IF_ERROR(MergeRows(c, next++, 2, &n, &row_stats));
  DimensionHandle columns;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(row_stats, 1),
                                  DenseRowStats<float>::kColumns, &columns));
  TF_RETURN_IF_ERROR(MergeRows(c, next, 1, &n, &other));
  c->set_output(0, c->Matrix(n, c->Dim(predictions, 1)));
  return ::tensorflow::OkStatus();
}

}  // namespace

#define TFXENT_COMMON_ATTRS                      \
  Attr("T: {half, bfloat16, float, double}")     \
      .Attr("Tloss: {float, double} = DT_FLOAT") \
      .Attr("from_logits: bool = true")

// The coefficients, scalars in the loss type (exact for double predictions,
// which float attributes would not be).
#define TFXENT_COEFFICIENTS       \
  Input("label_smoothing: Tloss") \
      .Input("epsilon: Tloss")    \
      .Input("z_loss: Tloss")     \
      .Input("logit_soft_cap: Tloss")

#define TFXENT_COEFFICIENTS_DOC                                           \
  "label_smoothing: in [0, 1]; every class gets label_smoothing / C of\n" \
  "  target mass, the labelled classes 1 - label_smoothing more.\n"       \
  "epsilon: probabilities are clipped to [epsilon, 1 - epsilon].\n"       \
  "z_loss: >= 0, logits only: each row's loss adds z_loss * lse^2.\n"     \
  "logit_soft_cap: >= 0, logits only; where > 0 the logits z become\n"    \
  "  logit_soft_cap * tanh(z / logit_soft_cap) first.\n"

#define TFXENT_SPARSE_ATTRS                                   \
  TFXENT_COMMON_ATTRS.Attr("Tidx: {int32, int64} = DT_INT64") \
      .Attr("ignore_class: int = 0")                          \
      .Attr("use_ignore_class: bool = false")

REGISTER_OP("TfXent>SparseXent")
    .Input("predictions: T")
    .Input("labels: Tidx")
    .TFXENT_COEFFICIENTS.Output("loss: Tloss")
    .Output("normalizer: Tloss")
    .TFXENT_SPARSE_ATTRS.SetShapeFn(SparseForwardShape)
    .Doc(R"doc(
Per-row softmax cross-entropy with integer labels, fused.

predictions: [N, C] logits (from_logits) or probabilities.
labels: [N] class indices in [0, C), or ignore_class when use_ignore_class.
loss: [N] per-row loss; 0 for ignored rows.
normalizer: [N] the row statistic the gradient reads: for logits the
  log-sum-exp, log sum_k exp(z'_k) (of the capped logits where there is a
  soft cap); for probabilities the sum of the clipped probabilities,
  sum_k clip(p_k, epsilon, 1 - epsilon). 0 for ignored rows.
)doc" TFXENT_COEFFICIENTS_DOC);

REGISTER_OP("TfXent>SparseXentGrad")
    .Input("predictions: T")
    .Input("labels: Tidx")
    .Input("normalizer: Tloss")
    .Input("grad_loss: Tloss")
    .TFXENT_COEFFICIENTS.Output("grad_predictions: T")
    .TFXENT_SPARSE_ATTRS.SetShapeFn(SparseBackwardShape)
    .Doc("Gradient of TfXent>SparseXent with respect to the predictions.");

REGISTER_OP("TfXent>DenseXent")
    .Input("predictions: T")
    .Input("labels: Tloss")
    .TFXENT_COEFFICIENTS.Output("loss: Tloss")
    .Output("row_stats: Tloss")
    .TFXENT_COMMON_ATTRS.SetShapeFn(DenseForwardShape)
    .Doc(R"doc(
Per-row cross-entropy with dense (soft) labels, fused.

predictions: [N, C] logits (from_logits) or probabilities.
labels: [N, C] targets, smoothed inside the op by label_smoothing.
loss: [N] per-row loss.
row_stats: [N, 4] the row statistics the gradients read, per row
  (normalizer, target_mass, single_label, single_label_value): for logits
  (log-sum-exp of the (capped) logits, sum of the smoothed targets, the class
  of the row's only nonzero label or -1, that label's value or 0); for
  probabilities (row sum, sum of the smoothed targets whose normalized
  probability is inside the clip range, -1, 0).
)doc" TFXENT_COEFFICIENTS_DOC);

REGISTER_OP("TfXent>DenseXentGrad")
    .Input("predictions: T")
    .Input("labels: Tloss")
    .Input("row_stats: Tloss")
    .Input("grad_loss: Tloss")
    .TFXENT_COEFFICIENTS.Output("grad_predictions: T")
    .TFXENT_COMMON_ATTRS.SetShapeFn(DenseBackwardShape)
    .Doc("Gradient of TfXent>DenseXent with respect to the predictions.");

REGISTER_OP("TfXent>DenseXentLabelsGrad")
    .Input("predictions: T")
    .Input("row_stats: Tloss")
    .Input("grad_loss: Tloss")
    .TFXENT_COEFFICIENTS.Output("grad_labels: Tloss")
    .TFXENT_COMMON_ATTRS.SetShapeFn(DenseBackwardShape)
    .Doc("Gradient of TfXent>DenseXent with respect to the labels.");

#undef TFXENT_SPARSE_ATTRS
#undef TFXENT_COEFFICIENTS_DOC
#undef TFXENT_COEFFICIENTS
#undef TFXENT_COMMON_ATTRS

}  // namespace tf_xent_ops
