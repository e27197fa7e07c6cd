"""Per-candidate samplers: llama.cpp's own sampler chain, seeded per candidate so tokens never depend
on which other candidates share the batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import llama_cpp

from edge_metastone.errors import InvalidRequestError
from edge_metastone.types import SamplingSettings


class Sampler:
    """Owns one llama.cpp sampler chain for one candidate."""

    def __init__(self, settings: SamplingSettings, candidate: int, n_vocab: int) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._ptr = llama_cpp.llama_sampler_chain_init(params)
        s = settings

        def add(smpl: Any) -> None:
            llama_cpp.llama_sampler_chain_add(self._ptr, smpl)

        if s.logit_bias:
            arr = (llama_cpp.llama_logit_bias * len(s.logit_bias))()
            for i, (tok, bias) in enumerate(s.logit_bias):
                if not 0 <= tok < n_vocab:
                    raise InvalidRequestError(f"logit_bias token {tok} is outside the vocabulary")
                arr[i].token, arr[i].bias = tok, bias
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), arr))
        if s.repeat_penalty != 1.0 and s.repeat_last_n > 0:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0
                )
            )
        if s.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        add(llama_cpp.llama_sampler_init_dist(s.candidate_seed(candidate)))

    def accept_all(self, tokens: Iterable[int]) -> None:
        """Feed history (the prompt) to stateful samplers such as the repetition penalty."""
        for t in tokens:
            llama_cpp.llama_sampler_accept(self._ptr, t)

    def sample(self, ctx_ptr: Any, row: int) -> int:
        """Draw from the logits of batch row `row` of the last decode (and accept the token)."""
        return int(llama_cpp.llama_sampler_sample(self._ptr, ctx_ptr, row))

    def close(self) -> None:
        """Free the chain."""
        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()
