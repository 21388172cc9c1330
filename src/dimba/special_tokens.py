"""The special tokens every dimba tokenizer holds, at fixed ids: what models, samplers and data agree on."""

PAD, EOS, MASK = "[PAD]", "[EOS]", "[MASK]"
SPECIAL_TOKENS = (PAD, EOS, MASK)  # ids 0, 1, 2 in this order
PAD_ID, EOS_ID, MASK_ID = range(len(SPECIAL_TOKENS))
