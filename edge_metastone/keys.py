"""GGUF metadata keys of the SPRM head, step delimiters and tokenizer facts (SPEC §2)."""

from __future__ import annotations

SPRM_VERSION = "metastone.sprm.version"
SPRM_FEATURE_LAYER = "metastone.sprm.feature_layer"
SPRM_HIDDEN_SIZE = "metastone.sprm.hidden_size"
SPRM_INNER_SIZE = "metastone.sprm.inner_size"
SPRM_DTYPE = "metastone.sprm.dtype"
SPRM_FC1_WEIGHT = "metastone.sprm.fc1.weight"
SPRM_FC1_BIAS = "metastone.sprm.fc1.bias"
SPRM_FC2_WEIGHT = "metastone.sprm.fc2.weight"
SPRM_FC2_BIAS = "metastone.sprm.fc2.bias"
STEP_TOKEN_IDS = "metastone.step_token_ids"
THINK_START_ID = "metastone.think_start_id"
THINK_END_ID = "metastone.think_end_id"
DEFAULT_STRATEGY = "metastone.default_strategy"
# JSON object: the model's measured adaptive-compute settings (search.adaptive.AdaptiveSettings:
# waves, consensus, min_agree, sharpness, window, floor, calibrate_floor, floor_margin, selector,
# measured); absent or unreadable: safe defaults.
ADAPTIVE = "metastone.adaptive"
# JSON object: the model's measured accuracy over k x thinking budget (thinking_scaling.ScalingTable:
# version, selector, max_new_tokens, measured, points), which `--effort auto` under a latency budget
# chooses both axes from; absent or unreadable: auto chooses k alone.
THINKING_SCALING = "metastone.thinking_scaling"
# JSON object: the fitted combined selector (search.combined.Selector: version, features, weights,
# bias, window, measured), a logistic combination of the head's step scores and the model's own
# token log-probabilities that `combined` / `combined-vote` use; written by train-sprm with its
# validation numbers. Absent or unreadable: those strategies are unavailable.
SELECTOR = "metastone.selector"
PROVENANCE = "metastone.provenance"
SPRM_TRAINED_WITH = "metastone.sprm.trained_with"
# The tokenizer's Unicode normal form (NFC, NFD, NFKC or NFKD); absent: text is not normalized.
TOKENIZER_NORMALIZER = "metastone.tokenizer.normalizer"
# JSON object: the tokenizer's named special tokens (bos_token, eos_token, ...) as its own config
# defines them, the chat template's variables; absent: taken from the token ids, as before.
TOKENIZER_SPECIAL_TOKENS = "metastone.tokenizer.special_tokens"

SPRM_FORMAT_VERSION = 1
SPRM_ARRAYS = (SPRM_FC1_WEIGHT, SPRM_FC1_BIAS, SPRM_FC2_WEIGHT, SPRM_FC2_BIAS)
