// The resource-handle input of a stateful op.

#ifndef TF_LORA_CORE_KERNELS_RESOURCE_HANDLE_H_
#define TF_LORA_CORE_KERNELS_RESOURCE_HANDLE_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_lora {

// Input 0 must be one handle (a scalar). TensorFlow's HandleFromInput reads
// its element 0 unchecked: an empty handle tensor (shape [0], which a
// tf.function can build) would be read out of bounds.
inline absl::Status CheckScalarHandle(tensorflow::OpKernelContext* ctx,
                                      const char* op, const char* name) {
  const tensorflow::TensorShape& shape = ctx->input(0).shape();
  if (tensorflow::TensorShapeUtils::IsScalar(shape)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": ", name, " must be a scalar resource handle; got shape ",
      shape.DebugString()));
}

}  // namespace tf_lora

#endif  // TF_LORA_CORE_KERNELS_RESOURCE_HANDLE_H_
