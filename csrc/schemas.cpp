// Schemas of the ckd_ext ops, their CPU (and CUDA) kernels and the _C Python module (the workspace budget, the CPU
// kernels' instruction set and the test-only emulated CUDA backend). Autograd and the fake (meta) implementations are registered from Python
// (ckd_ext/ops.py) with torch.library.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // available_cpu_isas' list
#include <torch/library.h>
#include <torch/python.h>  // the at::Tensor type caster of the test hooks below

#include <ATen/ATen.h>

#include "backends/cpu/cpu_isa.h"
#include "backends/select.h"
#include "losses.h"
#include "orchestration/gemm.h"
#include "orchestration/plan.h"
#include "orchestration/workspace.h"

TORCH_LIBRARY(ckd_ext, m) {
  m.def(
      "ckd_forward(Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "ckd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float tau, str anchor, "
      "str reduction) -> Tensor");
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "kd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, float temperature, "
      "str reduction) -> Tensor");
  m.def(
      "bickd_forward(Tensor student, Tensor teacher, Tensor? mask, float temperature, float tau, float w_sample, "
      "float w_class, bool symmetric, str reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bickd_backward(Tensor grad_sample, Tensor grad_class, Tensor student, Tensor teacher, Tensor? mask, "
      "float temperature, float tau, float w_sample, float w_class, bool symmetric, str reduction) -> Tensor");
}

// The orchestration is device-generic; each device key maps to the same functions, which pick that
// device's kernel backend (backends/select.h).
namespace {
void register_kernels(torch::Library& m) {
  m.impl("ckd_forward", &ckd::ckd_forward);
  m.impl("ckd_backward", &ckd::ckd_backward);
  m.impl("kd_forward", &ckd::kd_forward);
  m.impl("kd_backward", &ckd::kd_backward);
  m.impl("bickd_forward", &ckd::bickd_forward);
  m.impl("bickd_backward", &ckd::bickd_backward);
}
}  // namespace

TORCH_LIBRARY_IMPL(ckd_ext, CPU, m) { register_kernels(m); }
#if defined(CKD_WITH_CUDA)
TORCH_LIBRARY_IMPL(ckd_ext, CUDA, m) { register_kernels(m); }
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "ckd_ext compiled ops (registered under torch.ops.ckd_ext)";
  module.def("workspace_setting", &ckd::workspace_setting, "The user's workspace budget in bytes, 0 when unset.");
  module.def("set_workspace_bytes", &ckd::set_workspace_bytes, "Set the bytes of work buffers one op call may use.");
  module.def("reset_workspace_bytes", &ckd::reset_workspace_bytes, "Back to each device's default budget.");
  module.def(
      "default_workspace_bytes",
      [](const std::string& device) { return ckd::default_workspace_for(at::empty({0}, at::Device(device))); },
      "The default budget of calls on `device` (CPU: 64 MiB; CUDA: from the device's free memory).");
  module.def("bickd_cpu_workspace", &ckd::bickd_cpu_workspace,
             "BicKD's default CPU budget for an N x C call accumulating in `acc_bytes` (without a setting).",
             pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("acc_bytes") = 4);
  module.def("cuda_workspace_from_free_memory", &ckd::cuda_workspace_from_free_memory,
             "The CUDA default budget for a device with `free_bytes` free.");
  module.def("cpu_isa", &ckd::cpu_isa, "The instruction set the CPU kernels run with: baseline, avx2 or avx512.");
  module.def("available_cpu_isas", &ckd::available_cpu_isas,
             "The instruction sets this build has CPU kernels for and this CPU runs, lowest first.");
  module.def("set_cpu_isa", &ckd::set_cpu_isa, "Run the CPU kernels with this instruction set (process-wide).");
  module.def("gemm_calls", &ckd::gemm_calls, "Matrix products issued by the ops since the process started.");
  module.def(
      "gemm_product",
      [](const at::Tensor& coef, const at::Tensor& rows, const std::string& device) {
        const ckd::DeviceKind kind = device == "emulated" ? ckd::DeviceKind::EmulatedCuda : ckd::DeviceKind::Cpu;
        const ckd::Gemm gemm(rows.scalar_type(), coef.scalar_type(), kind);
        TORCH_CHECK(rows.scalar_type() == gemm.operand_dtype(), "gemm_product: rows must be in the operand dtype ",
                    gemm.operand_dtype());
        at::Tensor out = at::empty({coef.size(0), rows.size(1)}, coef.options());
        gemm.product(out, coef, rows, /*accumulate=*/false);
        return out;
      },
      "Test hook: coef @ rows through the GEMM policy of a backend ('cpu' or 'emulated', CPU tensors).");
  module.def(
      "strip_plan",
      [](const std::string& loss, int64_t rows, int64_t cols, const std::string& dtype, const std::string& device,
         int64_t workspace, bool masked, bool want_grad, bool symmetric) {
        const auto scalar = dtype == "float64"    ? at::kDouble
                            : dtype == "float32"  ? at::kFloat
                            : dtype == "float16"  ? at::kHalf
                            : dtype == "bfloat16" ? at::kBFloat16
                                                  : throw std::invalid_argument("strip_plan: unknown dtype " + dtype);
        const ckd::DeviceKind kind = device == "cpu"        ? ckd::DeviceKind::Cpu
                                     : device == "cuda"     ? ckd::DeviceKind::Cuda
                                     : device == "emulated" ? ckd::DeviceKind::EmulatedCuda
                                                            : throw std::invalid_argument("strip_plan: unknown device " + device);
        const auto acc = scalar == at::kDouble ? at::kDouble : at::kFloat;
        pybind11::dict out;
        auto counts = [&out](const auto& plan) {  // what both plan types report
          out["gemms"] = plan.gemms;
          out["gemm_flops"] = plan.gemm_flops;
          out["launches"] = plan.launches;
          out["min_gemm_dim"] = plan.min_gemm_dim;
          out["transient_bytes"] = plan.transient_bytes;
        };
        ckd::PlanInputs p;
        p.rows = rows;
        p.cols = cols;
        p.acc_bytes = at::elementSize(acc);
        p.grad_in_acc = scalar == acc;
        p.want_grad = want_grad;
        p.workspace = workspace;
        p.gpu = kind != ckd::DeviceKind::Cpu;
        if (loss == "bickd") {
          p.operand_bytes = p.acc_bytes;
          p.operands_are_inputs = false;
          const ckd::BicKDPlan plan = ckd::plan_bickd(p, symmetric, true, true);
          auto side = [&out](const char* name, const ckd::BicKDSide& s) {
            const std::string prefix(name);
            out[(prefix + "_operands").c_str()] = s.operands == ckd::BicKDOperands::Whole        ? "whole"
                                                  : s.operands == ckd::BicKDOperands::Candidates ? "candidates"
                                                                                                 : "blocks";
            out[(prefix + "_strip").c_str()] = s.strip;
            out[(prefix + "_block").c_str()] = s.block;
          };
          side("sample", plan.sample);
          side("class", plan.cls);
          out["built_elements"] = plan.built_elements;
          out["work_bytes"] = plan.work_bytes;
          counts(plan);
          return out;
        }
        const ckd::Gemm gemm(scalar, acc, kind);
        p.operand_bytes = at::elementSize(gemm.operand_dtype());
        p.operands_are_inputs = !masked && gemm.operand_dtype() == scalar;
        p.tensor_cores = gemm.tensor_cores();
        TORCH_CHECK(loss == "ckd_student" || loss == "ckd_teacher", "strip_plan: unknown loss ", loss);
        const ckd::CkdPlan plan = ckd::plan_ckd(p, loss == "ckd_student");
        out["whole"] = plan.whole;
        out["strip"] = plan.strip;
        out["operand_block"] = plan.operand_block;
        out["recompute"] = plan.recompute;
        out["output_block"] = plan.output_block;
        out["gradient_block"] = plan.gradient_block;
        counts(plan);
        out["tensor_cores"] = plan.gemms > 0 && gemm.tensor_cores();
        return out;
      },
      "The strip plan of one call (orchestration/plan.h), as a dict: sizes, GEMMs, kernel launches, transient bytes.",
      pybind11::arg("loss"), pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("dtype"),
      pybind11::arg("device"), pybind11::arg("workspace"), pybind11::arg("masked") = false,
      pybind11::arg("want_grad") = true, pybind11::arg("symmetric") = false);
  module.def(
      "install_emulated_backend",
      [](const pybind11::capsule& table) {
        TORCH_CHECK(std::string_view(table.name()) == ckd::kEmulatedBackendCapsule,
                    "ckd_ext: install_emulated_backend expects ckd_ext._emulated.backend_table()");
        ckd::install_emulated_backend(table.get_pointer<const ckd::EmulatedBackendTable>());
      },
      "Installs ckd_ext._emulated's kernels as the emulated CUDA backend (test builds).");
  module.def("set_emulated_cuda", &ckd::set_emulated_cuda,
             "Test-only: run CPU tensors through the emulated CUDA backend (see ckd_ext.testing).");
  module.def("emulated_cuda", &ckd::emulated_cuda, "Whether CPU tensors run through the emulated CUDA backend.");
}
