"""Inference: sliding window, Mask2Former semantic inference, LiverMax, post-processing.

`predict.run_predict` (files in, files out) is imported from its module so that importing this
package does not pull in the data readers.
"""

from lidia_jax.inference.patient_scores import livermax, livermax_scores
from lidia_jax.inference.postprocess import PostprocessResult, measure_lesions
from lidia_jax.inference.semantic import (bind, label_probabilities, make_tile_predictor,
                                          model_tile_predictor)
from lidia_jax.inference.sliding_window import (gaussian_importance_map,
                                                sliding_window_inference, tile_starts)

__all__ = [
    "livermax", "livermax_scores", "measure_lesions", "PostprocessResult", "bind",
    "label_probabilities", "make_tile_predictor", "model_tile_predictor",
    "gaussian_importance_map", "sliding_window_inference", "tile_starts",
]
