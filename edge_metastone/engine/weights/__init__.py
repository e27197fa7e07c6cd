"""Where llama.cpp keeps a model's weights on the CPU: the weight-buffer mode, decided per load.

llama.cpp's CPU backend offers "extra" buffer types that re-lay weights for faster matmuls:
`CPU_REPACK` (AVX2/AVX-512/NEON interleaved Q4_0, Q4_K, IQ4_NL, ...) and, on CPUs with AMX,
`AMX`, which comes first and takes every weight it can. The AMX matmul segfaults in the first
decode on some Xeons (llama.cpp issue 20824, open) and has given wrong Q4_0 results (PR 16315),
so the package never lets it hold weights unless asked to.

Modes (`WeightBuffers`):
  extra   llama.cpp's default: every extra buffer type the build offers (AMX included)
  repack  extra buffer types off, and each matmul weight that CPU_REPACK takes put there by a
          `tensor_buft_overrides` entry (llama.cpp's own `supports_op` decides which): the
          default's layout minus AMX
  plain   extra buffer types off: plain CPU buffers
  auto    extra where the build offers no buffer type known to fail, else repack (plain when
          the build has no CPU_REPACK, or with GPU offload); then a one-time canary: a real
          decode of the model in a child process, cached per (llama.cpp build, CPU, mode, weight
          types), steps down repack -> plain if the child crashes

The mode comes from the caller, else `$EDGE_METASTONE_WEIGHT_BUFFERS`, else auto.

The modules, one reason to change each: `build` (what this llama.cpp build and CPU offer, read
through ggml's own functions), `decision` (the mode from the request and the build, no I/O),
`placement` (repack mode's `tensor_buft_overrides`, applied to `llama_model_params`) and `plan`
(the canary decode and its verdict cache, and one load's plan, which the canary confirms). This
`__init__` exports nothing: import each name from its module.
"""
