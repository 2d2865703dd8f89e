"""Parameter-space merges of models of one architecture: FuseChat's VaRM and SCE, and mergekit's TA, TIES, DARE,
SLERP and linear, streamed tensor by tensor (`fusion.merge.stream`) from a mergekit-style config
(`fusion.merge.config`); `python -m fusion.merge CONFIG.yaml OUT` on its own."""
