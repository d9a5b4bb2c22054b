"""Models: DeepLabv3+ experts, the MC-dropout baseline, ensembles and model-level MoEs.

Output structures (one batch ``x [B,3,H,W]`` in [0,1], per-sample seeds ``[B]``):
:meth:`ModelZoo.forward` returns ``{model name: shiftbench.uncertainty.Prediction}`` with

==========  =====================  ==========================  ====================
kind        probs [B,K,H,W]        members [M,B,K,H,W]          gate
==========  =====================  ==========================  ====================
expert      softmax of the expert  None                        None
ensemble    mean of the members    the experts' softmax (M=E)  None
moe         the combined output    the experts' softmax (M=E)  [B,E] or [B,E,K]
mc_dropout  mean of the passes     the T passes' softmax       None
custom      softmax of its logits  None                        None
==========  =====================  ==========================  ====================

All probabilities are float32. Every expert runs once per batch, whatever the number of
ensembles and MoE variants built on it.
"""

from shiftbench.models.backbones import BACKBONES, BackboneSpec, backbone_spec
from shiftbench.models.checkpoints import load_strict, read_checkpoint, save_checkpoint
from shiftbench.models.deeplab import DeepLabV3Plus, KeyedDropout
from shiftbench.models.gates import GATES, ClasswiseGate, SimpleGate, build_gate
from shiftbench.models.moe import COMBINE, MixtureOfExperts, MoEHead
from shiftbench.models.zoo import ModelZoo, import_factory

__all__ = [
    "BACKBONES", "BackboneSpec", "backbone_spec", "load_strict", "read_checkpoint", "save_checkpoint",
    "DeepLabV3Plus", "KeyedDropout", "GATES", "ClasswiseGate", "SimpleGate", "build_gate", "COMBINE",
    "MixtureOfExperts", "MoEHead", "ModelZoo", "import_factory",
]
