// The schema of every effseg op, in one place. Kernels are registered per device beside their
// code (csrc/<family>/*_cpu.cpp, *_cuda.cu); fake kernels and autograd live in effseg/ops/.
//
// Group statistics are (C,) (one per channel: batch norm, or running statistics) or (N, C) (one
// per sample and channel: instance norm), in float32, or float64 for float64 inputs.
#include <torch/library.h>

TORCH_LIBRARY(effseg, m) {
  // Mean and biased variance of each group of the input.
  m.def("norm_stats(Tensor input, bool per_sample) -> (Tensor mean, Tensor var)");
  // input <- act(weight * (input - mean) / sqrt(var + eps) + bias), in place.
  m.def(
      "norm_act_forward_(Tensor(a!) input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, str activation, float activation_param) -> ()");
  // From the output y = act(z) and dL/dy: per-group sum(dL/dz) and sum(dL/dz * xhat).
  m.def(
      "norm_act_backward_reduce(Tensor output, Tensor grad_output, Tensor? weight, Tensor? bias, "
      "bool per_sample, str activation, float activation_param) -> (Tensor sum_dz, "
      "Tensor sum_dz_xhat)");
  // dL/dinput. With sum_dz/sum_dz_xhat the statistics are the batch's own (training); without
  // them they are constants (eval). count overrides the local number of values per group (the
  // global count when the sums were all-reduced across processes).
  m.def(
      "norm_act_backward_input(Tensor output, Tensor grad_output, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor? sum_dz, Tensor? sum_dz_xhat, int? count, float eps, str activation, "
      "float activation_param) -> Tensor");
  // The same, written into grad_output's storage (for callers that own that buffer).
  m.def(
      "norm_act_backward_input_(Tensor output, Tensor(a!) grad_output, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor? sum_dz, Tensor? sum_dz_xhat, int? count, float eps, "
      "str activation, float activation_param) -> ()");
  // PReLU variants: the activation is leaky ReLU with a learned slope per channel (C,), every
  // slope > 0. The reduce also returns per-group sum(dL/dy * z) over z <= 0, the slope's
  // gradient.
  m.def(
      "norm_act_forward_prelu_(Tensor(a!) input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps, Tensor slope) -> ()");
  m.def(
      "norm_act_backward_reduce_prelu(Tensor output, Tensor grad_output, Tensor? weight, "
      "Tensor? bias, Tensor slope, bool per_sample) -> (Tensor sum_dz, Tensor sum_dz_xhat, "
      "Tensor sum_dy_z)");
  m.def(
      "norm_act_backward_input_prelu(Tensor output, Tensor grad_output, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor slope, Tensor? sum_dz, Tensor? sum_dz_xhat, "
      "int? count, float eps) -> Tensor");
  // Fused softmax + cross-entropy + soft-Dice loss on logits (N, K, *spatial) (contiguous and
  // channels-last read in place, other layouts copied once) and integer labels (N, *spatial);
  // voxels labelled ignore_index are left out of every sum.
  // stats (N, K, 3) holds, per sample and class, I = sum p_k [y == k], P = sum p_k and
  // G = sum [y == k]; ce holds (sum w_y * -log p_y, sum w_y). Both are float32 (float64 for
  // float64 logits). A label outside [0, K) that is not ignore_index is an error.
  m.def(
      "dice_ce_forward(Tensor logits, Tensor labels, Tensor? weight, int ignore_index) -> "
      "(Tensor stats, Tensor ce)");
  // dLoss/dlogits, recomputing the softmax: grad * (coef_ce * w_y * (p_k - [y == k]) +
  // p_k * (c_k - sum_j c_j p_j)) with c_k = beta + [y == k] * alpha, (alpha, beta) =
  // coef_dice[n, k]; zero where the label is ignore_index (or, unchecked here, invalid).
  m.def(
      "dice_ce_backward(Tensor grad, Tensor logits, Tensor labels, Tensor? weight, "
      "int ignore_index, Tensor coef_dice, Tensor coef_ce) -> Tensor");
}

// `import effseg._C` loads this library, which registers the ops above with the dispatcher. The
// module itself is empty: every op is reached through torch.ops.effseg.
#if !defined(EFFSEG_NO_PYTHON)
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
