"""The scores' default sample counts and the reference distribution's quantiles, shared by the scorer,
training's reference scores, the scoring job, the drift check and the Python API (no torch: the scoring
driver and ``vaepipe check`` import them)."""

import numpy as np

DEFAULT_MC_SAMPLES = 16  # S: Monte Carlo samples of z for recon_log_density and the ELBO
DEFAULT_IW_SAMPLES = 64  # K: importance samples for log_marginal
DEFAULT_CONDITIONAL_SAMPLES = 8  # samples per feature for the per-column conditional scores
REFERENCE_QUANTILES = np.linspace(0.0, 1.0, 1001)  # the stored reference's quantiles: 0.1% steps
