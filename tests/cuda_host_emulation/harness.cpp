// C entry points over the CUDA launchers of softmax_loss_kernels.cu, for ctypes
// (tests/test_cuda_build.py compiles this with the emulation headers of this directory).
#include "softmax_loss_kernels.cu"
extern "C" int emu_forward(int dtype, int index64, const void* user, const void* items, const void* pos,
                           const void* neg, const void* pos_scale, const void* neg_scale,
                           const void* neg_logq, int64_t B, int64_t N, int64_t D, int64_t M, int neg_mode,
                           int include_pos, int normalize, int remove_hits, int compute_raw, void* loss,
                           void* lse, void* raw) {
  adaptau_cuda::Problem problem{dtype,
                                index64 != 0,
                                user,
                                items,
                                pos,
                                neg,
                                pos_scale,
                                neg_scale,
                                neg_logq,
                                B,
                                N,
                                D,
                                M,
                                neg_mode,
                                include_pos != 0,
                                normalize != 0,
                                remove_hits != 0};
  return adaptau_cuda::forward(problem, compute_raw != 0, loss, lse, raw, nullptr);
}
extern "C" int emu_backward(int dtype, int index64, const void* user, const void* items, const void* pos,
                            const void* neg, const void* pos_scale, const void* neg_scale,
                            const void* neg_logq, int64_t B, int64_t N, int64_t D, int64_t M, int neg_mode,
                            int include_pos, int normalize, int remove_hits, const void* grad_loss,
                            const void* lse, void* grad_user, void* grad_items, void* accum, void* gpos,
                            void* gneg) {
  adaptau_cuda::Problem problem{dtype,
                                index64 != 0,
                                user,
                                items,
                                pos,
                                neg,
                                pos_scale,
                                neg_scale,
                                neg_logq,
                                B,
                                N,
                                D,
                                M,
                                neg_mode,
                                include_pos != 0,
                                normalize != 0,
                                remove_hits != 0};
  return adaptau_cuda::backward(problem, grad_loss, lse, grad_user, grad_items, accum, gpos, gneg, nullptr);
}
