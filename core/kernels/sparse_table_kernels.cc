// Sparse embedding table op family: OpKernel glue over sparse::Table.

#define EIGEN_USE_THREADS

#include <cmath>
#include <string>

#include "core/kernels/exceptions_to_status.h"
#include "core/kernels/resource_handle.h"
#include "core/kernels/sparse_table.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_lora {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::ResourceBase;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;

namespace {

class SparseTableResource : public ResourceBase {
 public:
  explicit SparseTableResource(const sparse::Config& config) : table(config) {}
  std::string DebugString() const override {
    return absl::StrCat("SparseTable(dim=", table.dim(), ")");
  }
  sparse::Table table;
};

// Work spread over TensorFlow's CPU worker threads.
sparse::ParallelFor WorkerThreads(OpKernelContext* ctx) {
  return [ctx](int64_t n, double cycles_per_unit,
               std::function<void(int64_t, int64_t)> fn) {
    ctx->eigen_device<Eigen::ThreadPoolDevice>().parallelFor(
        n, Eigen::TensorOpCost(0, 0, cycles_per_unit),
        [&fn](Eigen::Index begin, Eigen::Index end) { fn(begin, end); });
  };
}

absl::Status GetTable(
    OpKernelContext* ctx, const char* op,
    tensorflow::core::RefCountPtr<SparseTableResource>* table) {
  TF_RETURN_IF_ERROR(CheckScalarHandle(ctx, op, "table"));
  const absl::Status s = tensorflow::LookupResource(
      ctx, tensorflow::HandleFromInput(ctx, 0), table);
  if (s.ok()) return s;
  return absl::InvalidArgumentError(absl::StrCat(
      op,
      ": table must be the handle of a tf_lora SparseTable: ", s.message()));
}

absl::Status ParseConfig(OpKernelConstruction* ctx, sparse::Config* config) {
  std::string initializer, optimizer;
  TF_RETURN_IF_ERROR(ctx->GetAttr("dim", &config->dim));
  TF_RETURN_IF_ERROR(ctx->GetAttr("initializer", &initializer));
  TF_RETURN_IF_ERROR(ctx->GetAttr("init_a", &config->initializer.a));
  TF_RETURN_IF_ERROR(ctx->GetAttr("init_b", &config->initializer.b));
  int64_t seed;
  TF_RETURN_IF_ERROR(ctx->GetAttr("seed", &seed));
  config->initializer.seed = static_cast<uint64_t>(seed);
  TF_RETURN_IF_ERROR(ctx->GetAttr("optimizer", &optimizer));
  TF_RETURN_IF_ERROR(ctx->GetAttr("initial_accumulator",
                                  &config->optimizer.initial_accumulator));
  TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", &config->optimizer.epsilon));
  TF_RETURN_IF_ERROR(ctx->GetAttr("beta_1", &config->optimizer.beta_1));
  TF_RETURN_IF_ERROR(ctx->GetAttr("beta_2", &config->optimizer.beta_2));
  float one_minus[2];
  TF_RETURN_IF_ERROR(ctx->GetAttr("one_minus_beta_1", &one_minus[0]));
  TF_RETURN_IF_ERROR(ctx->GetAttr("one_minus_beta_2", &one_minus[1]));
  config->optimizer.one_minus_beta_1 =
      one_minus[0] >= 0 ? one_minus[0] : 1.f - config->optimizer.beta_1;
  config->optimizer.one_minus_beta_2 =
      one_minus[1] >= 0 ? one_minus[1] : 1.f - config->optimizer.beta_2;
  TF_RETURN_IF_ERROR(ctx->GetAttr("l1", &config->optimizer.l1));
  TF_RETURN_IF_ERROR(ctx->GetAttr("l2", &config->optimizer.l2));
  TF_RETURN_IF_ERROR(ctx->GetAttr("lr_power", &config->optimizer.lr_power));
  using Init = sparse::Initializer::Kind;
  config->initializer.kind = initializer == "uniform"  ? Init::kUniform
                             : initializer == "normal" ? Init::kNormal
                             : initializer == "truncated_normal"
                                 ? Init::kTruncatedNormal
                                 : Init::kZeros;
  using Opt = sparse::Optimizer::Kind;
  config->optimizer.kind = optimizer == "adagrad" ? Opt::kAdagrad
                           : optimizer == "adam"  ? Opt::kAdam
                           : optimizer == "ftrl"  ? Opt::kFtrl
                                                  : Opt::kSgd;
  const std::string error = config->Check();
  if (!error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("SparseTable: ", error));
  }
  return absl::OkStatus();
}

}  // namespace

// Finds the table with the op's container and shared_name, creating it when
// there is none, and outputs its handle. Looked up on every run, as
// TensorFlow's lookup-table ops do: a table destroyed (DestroyResourceOp) is
// created afresh by the next run, never handed out stale.
class SparseTableOp : public OpKernel {
 public:
  explicit SparseTableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseConfig(ctx, &config_));
  }

  void Compute(OpKernelContext* ctx) override {
    tensorflow::mutex_lock lock(mu_);
    if (!initialized_) {
      OP_REQUIRES_OK(ctx, cinfo_.Init(ctx->resource_manager(), def(),
                                      /*use_node_name_as_default=*/true));
      initialized_ = true;
    }
    SparseTableResource* table = nullptr;
    OP_REQUIRES_OK(
        ctx, cinfo_.resource_manager()->LookupOrCreate<SparseTableResource>(
                 cinfo_.container(), cinfo_.name(), &table,
                 [this](SparseTableResource** out) {
                   return ExceptionsToStatus(
                       "SparseTable", "creating the table",
                       [&] { *out = new SparseTableResource(config_); });
                 }));
    tensorflow::core::ScopedUnref unref(table);
    const sparse::Config& existing = table->table.config();
    OP_REQUIRES(ctx,
                existing.dim == config_.dim &&
                    existing.optimizer.kind == config_.optimizer.kind,
                absl::InvalidArgumentError(
                    absl::StrCat("SparseTable: a table named '", cinfo_.name(),
                                 "' already exists with dim ", existing.dim,
                                 " and another optimizer or dim than the dim ",
                                 config_.dim, " asked for")));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::ResourceHandle>()() =
        tensorflow::MakeResourceHandle<SparseTableResource>(
            ctx, cinfo_.container(), cinfo_.name());
  }

 private:
  sparse::Config config_;
  tensorflow::mutex mu_;
  bool initialized_ = false;
  tensorflow::ContainerInfo cinfo_;
};

class SparseTablePullOp : public OpKernel {
 public:
  explicit SparseTablePullOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dim", &dim_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &training_));
    const std::string error = sparse::Config::CheckDim(dim_);
    OP_REQUIRES(
        ctx, error.empty(),
        absl::InvalidArgumentError(absl::StrCat("SparseTablePull: ", error)));
  }

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTablePull", &table));
    OP_REQUIRES(ctx, table->table.dim() == dim_,
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTablePull: the table has dim ", table->table.dim(),
                    " but the op was built for dim ", dim_)));
    const Tensor& ids = ctx->input(1);
    TensorShape shape = ids.shape();
    OP_REQUIRES_OK(ctx, shape.AddDimWithStatus(dim_));
    Tensor* values;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &values));
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus(
                 "SparseTablePull",
                 "inserting new ids; the table keeps every key it had, and "
                 "holds whole rows for the new ids inserted before that",
                 [&] {
                   table->table.Pull(
                       ids.flat<int64_t>().data(), ids.NumElements(), training_,
                       values->flat<float>().data(), WorkerThreads(ctx));
                 }));
  }

 private:
  int64_t dim_;
  bool training_;
};

class SparseTablePushOp : public OpKernel {
 public:
  explicit SparseTablePushOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTablePush", &table));
    const Tensor& ids = ctx->input(1);
    const Tensor& grads = ctx->input(2);
    const Tensor& lr = ctx->input(3);
    TensorShape expected = ids.shape();
    OP_REQUIRES_OK(ctx, expected.AddDimWithStatus(table->table.dim()));
    OP_REQUIRES(
        ctx, grads.shape() == expected,
        absl::InvalidArgumentError(absl::StrCat(
            "SparseTablePush: grads must have shape ids.shape + [dim] = ",
            expected.DebugString(), "; got ", grads.shape().DebugString())));
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(lr.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTablePush: learning_rate must be a scalar; got ",
                    lr.shape().DebugString())));
    // A NaN or infinite gradient or learning rate would poison every row it
    // reaches, and the optimizer's slots with it: refused, the table unchanged
    // (the gradients are checked by Table::Push, on the per-id sums).
    const float learning_rate = lr.scalar<float>()();
    OP_REQUIRES(ctx, std::isfinite(learning_rate) && learning_rate >= 0,
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTablePush: learning_rate must be finite and >= 0; "
                    "got ",
                    learning_rate)));
    Tensor* step;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &step));
    int64_t non_finite_id = 0;
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus(
                 "SparseTablePush",
                 "inserting new ids; the table keeps every key it had, and "
                 "the ids updated before that keep their update (the others "
                 "were not updated)",
                 [&] {
                   step->scalar<int64_t>()() = table->table.Push(
                       ids.flat<int64_t>().data(), ids.NumElements(),
                       grads.flat<float>().data(), learning_rate,
                       WorkerThreads(ctx), &non_finite_id);
                 }));
    OP_REQUIRES(
        ctx, step->scalar<int64_t>()() > 0,
        absl::InvalidArgumentError(absl::StrCat(
            "SparseTablePush: grads must be finite; the gradient of id ",
            non_finite_id,
            " (summed over its repeats) holds a NaN or an infinity. "
            "The table is unchanged")));
  }
};

class SparseTableSizeOp : public OpKernel {
 public:
  explicit SparseTableSizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableSize", &table));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = table->table.Size();
  }
};

class SparseTableExportOp : public OpKernel {
 public:
  explicit SparseTableExportOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableExport", &table));
    const sparse::Table& t = table->table;
    sparse::Table::Contents c;
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus("SparseTableExport",
                                "copying the table out; the table is unchanged",
                                [&] { c = t.Export(); }));
    const int64_t n = c.keys.size(), slot_width = t.row_width() - t.dim();
    Tensor* out[6];
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &out[0]));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(1, TensorShape({n, t.dim()}), &out[1]));
    OP_REQUIRES_OK(
        ctx, ctx->allocate_output(2, TensorShape({n, slot_width}), &out[2]));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({n}), &out[3]));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({n}), &out[4]));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({}), &out[5]));
    std::copy(c.keys.begin(), c.keys.end(), out[0]->flat<int64_t>().data());
    std::copy(c.values.begin(), c.values.end(), out[1]->flat<float>().data());
    std::copy(c.slots.begin(), c.slots.end(), out[2]->flat<float>().data());
    std::copy(c.update_counts.begin(), c.update_counts.end(),
              out[3]->flat<int64_t>().data());
    std::copy(c.last_steps.begin(), c.last_steps.end(),
              out[4]->flat<int64_t>().data());
    out[5]->scalar<int64_t>()() = t.step();
  }
};

class SparseTableImportOp : public OpKernel {
 public:
  explicit SparseTableImportOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableImport", &table));
    sparse::Table& t = table->table;
    const Tensor& keys = ctx->input(1);
    const Tensor& values = ctx->input(2);
    const Tensor& slots = ctx->input(3);
    const Tensor& counts = ctx->input(4);
    const Tensor& steps = ctx->input(5);
    const Tensor& step = ctx->input(6);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(keys.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTableImport: keys must be a vector; got ",
                    keys.shape().DebugString())));
    const int64_t n = keys.dim_size(0), slot_width = t.row_width() - t.dim();
    const auto expect = [&](const char* name, const Tensor& tensor,
                            const TensorShape& shape) {
      return tensor.shape() == shape
                 ? absl::OkStatus()
                 : absl::InvalidArgumentError(absl::StrCat(
                       "SparseTableImport: ", name, " must have shape ",
                       shape.DebugString(), " for ", n,
                       " keys and a table of dim ", t.dim(), "; got ",
                       tensor.shape().DebugString()));
    };
    OP_REQUIRES_OK(ctx, expect("values", values, TensorShape({n, t.dim()})));
    if (slots.shape() != TensorShape({n, slot_width})) {
      // Mostly contents saved with another optimizer: say which one this is.
      static constexpr const char* kNames[] = {"SGD", "Adagrad", "Adam",
                                               "FTRL"};
      const auto& optimizer = t.config().optimizer;
      ctx->SetStatus(absl::InvalidArgumentError(absl::StrCat(
          "SparseTableImport: slots must have shape ",
          TensorShape({n, slot_width}).DebugString(), " for ", n,
          " keys and a table of dim ", t.dim(), " whose optimizer, ",
          kNames[static_cast<int>(optimizer.kind)], ", keeps ",
          optimizer.Slots(), " slot(s) per value; got ",
          slots.shape().DebugString(),
          " (contents saved with another optimizer?)")));
      return;
    }
    OP_REQUIRES_OK(ctx, expect("update_counts", counts, TensorShape({n})));
    OP_REQUIRES_OK(ctx, expect("last_steps", steps, TensorShape({n})));
    OP_REQUIRES_OK(ctx, expect("step", step, TensorShape({})));
    sparse::Table::Contents c;
    const auto copy = [](const Tensor& from, auto* to) {
      using V = typename std::remove_pointer_t<decltype(to)>::value_type;
      const V* data = from.flat<V>().data();
      to->assign(data, data + from.NumElements());
    };
    std::string error;
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus(
                 "SparseTableImport",
                 "building the new contents; the table is unchanged", [&] {
                   copy(keys, &c.keys);
                   copy(values, &c.values);
                   copy(slots, &c.slots);
                   copy(counts, &c.update_counts);
                   copy(steps, &c.last_steps);
                   error = t.Import(c, step.scalar<int64_t>()());
                 }));
    OP_REQUIRES(ctx, error.empty(),
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTableImport: ", error, "; the table is unchanged")));
  }
};

class SparseTableRemoveOp : public OpKernel {
 public:
  explicit SparseTableRemoveOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableRemove", &table));
    const Tensor& ids = ctx->input(1);
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    OP_REQUIRES_OK(
        ctx,
        ExceptionsToStatus(
            "SparseTableRemove",
            "grouping the ids; the keys removed before that stay removed", [&] {
              out->scalar<int64_t>()() = table->table.Remove(
                  ids.flat<int64_t>().data(), ids.NumElements());
            }));
  }
};

class SparseTableEvictOp : public OpKernel {
 public:
  explicit SparseTableEvictOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableEvict", &table));
    const Tensor& min_count = ctx->input(1);
    const Tensor& max_age = ctx->input(2);
    OP_REQUIRES(ctx,
                TensorShapeUtils::IsScalar(min_count.shape()) &&
                    TensorShapeUtils::IsScalar(max_age.shape()),
                absl::InvalidArgumentError(absl::StrCat(
                    "SparseTableEvict: min_update_count and max_age must be "
                    "scalars; got ",
                    min_count.shape().DebugString(), " and ",
                    max_age.shape().DebugString())));
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    OP_REQUIRES_OK(
        ctx, ExceptionsToStatus(
                 "SparseTableEvict",
                 "listing the keys to evict; the keys evicted before that stay "
                 "evicted",
                 [&] {
                   out->scalar<int64_t>()() =
                       table->table.Evict(min_count.scalar<int64_t>()(),
                                          max_age.scalar<int64_t>()());
                 }));
  }
};

#define TF_LORA_REGISTER(OP) \
  REGISTER_KERNEL_BUILDER(   \
      Name("TfLora>" #OP).Device(::tensorflow::DEVICE_CPU), OP##Op)
TF_LORA_REGISTER(SparseTable);
TF_LORA_REGISTER(SparseTablePull);
TF_LORA_REGISTER(SparseTablePush);
TF_LORA_REGISTER(SparseTableSize);
TF_LORA_REGISTER(SparseTableExport);
TF_LORA_REGISTER(SparseTableImport);
TF_LORA_REGISTER(SparseTableRemove);
TF_LORA_REGISTER(SparseTableEvict);
#undef TF_LORA_REGISTER

}  // namespace tf_lora
