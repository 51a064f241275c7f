// The _C Python module beside the ops (schemas.cpp): the workspace budget, the CPU kernels' instruction set, the
// test-only emulated CUDA backend and the hooks tests and tools read the GEMM policy and strip plans through.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // available_cpu_isas' list
#include <torch/python.h>  // the at::Tensor type caster of the test hooks below

#include <ATen/ATen.h>

#include "backends/cpu/cpu_isa.h"
#include "backends/select.h"
#include "orchestration/gemm.h"
#include "orchestration/plan_inputs.h"
#include "orchestration/workspace.h"

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
      "gemm_converts",
      [](const at::Tensor& x) {
        const ckd::Gemm gemm(x.scalar_type(), ckd::accumulation_type(x.scalar_type()), ckd::device_kind(x));
        return gemm.operand_dtype() != x.scalar_type();
      },
      "Whether the GEMM policy converts operands of x's dtype on x's backend (to the accumulation dtype) rather than "
      "multiplying them as they are: the fused-linear losses then convert a head once per call, not once per chunk.");
  module.def(
      "gemm_product",
      [](const at::Tensor& coef, const at::Tensor& rows, const std::string& device) {
        const ckd::DeviceKind kind = ckd::parse_device_kind(device);
        TORCH_CHECK(kind != ckd::DeviceKind::Cuda, "gemm_product: device must be 'cpu' or 'emulated'");
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
         int64_t workspace, bool masked, bool want_grad, bool symmetric, bool backward) {
        const auto scalar = dtype == "float64"    ? at::kDouble
                            : dtype == "float32"  ? at::kFloat
                            : dtype == "float16"  ? at::kHalf
                            : dtype == "bfloat16" ? at::kBFloat16
                                                  : throw std::invalid_argument("strip_plan: unknown dtype " + dtype);
        const ckd::DeviceKind kind = ckd::parse_device_kind(device);
        const ckd::PlanCall call{rows, cols, scalar, scalar, masked, kind, want_grad, workspace, want_grad && backward};
        pybind11::dict out;
        auto counts = [&out](const auto& plan) {  // what both plan types report
          out["gemms"] = plan.gemms;
          out["gemm_flops"] = plan.gemm_flops;
          out["launches"] = plan.launches;
          out["min_gemm_dim"] = plan.min_gemm_dim;
          out["transient_bytes"] = plan.transient_bytes;
        };
        if (loss == "bickd") {
          const ckd::Gemm gemm(scalar, ckd::accumulation_type(scalar), kind);
          const ckd::BicKDPlan plan = ckd::plan_bickd(ckd::bickd_plan_inputs(call, gemm), symmetric, true, true);
          out["tensor_cores"] = plan.gemms > 0 && gemm.tensor_cores();
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
        const ckd::Gemm gemm(scalar, ckd::accumulation_type(scalar), kind);
        TORCH_CHECK(loss == "ckd_student" || loss == "ckd_teacher", "strip_plan: unknown loss ", loss);
        const ckd::CkdPlan plan = ckd::plan_ckd(ckd::ckd_plan_inputs(call, gemm), loss == "ckd_student");
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
      "The strip plan of one call (orchestration/plan.h), as a dict: sizes, GEMMs, kernel launches, transient bytes. "
      "A forward computing the gradient keeps it in the accumulation dtype; backward=True plans the backward op, "
      "which writes it in the student's dtype.",
      pybind11::arg("loss"), pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("dtype"),
      pybind11::arg("device"), pybind11::arg("workspace"), pybind11::arg("masked") = false,
      pybind11::arg("want_grad") = true, pybind11::arg("symmetric") = false, pybind11::arg("backward") = false);
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
