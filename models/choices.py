"""The names of the models' choices, written once: the modules that implement them (:mod:`models.unet`,
:mod:`models.text_encoders`, :mod:`models.condition_embedder`, :mod:`utils.samplers.schedule`) import them from here,
and so do the command lines that offer them as ``choices``.

Standard library only (why this module exists): the training and reconstruction ``--help`` must not import
torch/diffusers for a tuple of names.
"""

from __future__ import annotations

#: The UNet folders of the released ContextMRI checkpoint (``{MRI_checkpoint}/{type}/``).
RELEASED_MODEL_TYPES: tuple[str, ...] = ("fastmri", "skm-tea")
#: Text encoders of the prompt (``"none"``: metadata tokens only, or no condition at all).
TEXT_ENCODER_KINDS: tuple[str, ...] = ("clip", "t5", "none")
#: How the condition embedder drops metadata for classifier-free guidance: one draw per sample for every key
#: (``"joint"``) or one draw per key (``"independent"``).
CFG_STRATEGIES: tuple[str, ...] = ("joint", "independent")
#: What the UNet predicts (saved as ``prediction_type`` in ``scheduler/scheduler_config.json``).
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
