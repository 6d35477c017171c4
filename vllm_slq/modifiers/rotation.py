"""RotationModifier: rotate the residual stream and the value heads before quantizing.

A pre-norm decoder computes the same function when its residual stream is rotated by an
orthogonal R1 and each value head by an orthogonal R2 (SpinQuant, arXiv:2405.16406,
sec. 3; QuaRot's "computational invariance"):

    fold norms      RMSNorm(x) * g  ->  RMSNorm(x), g folded into the Linears that read it,
                    so the norm commutes with any rotation (||x R1|| = ||x||)
    R1              embedding and the Linears writing the stream (o_proj, down_proj)
                    W <- W R1 on their outputs; the Linears reading it (q/k/v, gate/up,
                    lm_head) W <- W R1 on their inputs
    R2              v_proj's output and o_proj's input, per head of head_dim

Both are fused into the weights: the model stays a plain transformers model with plain
Linears (lm_head untied from the embedding), so the checkpoint format, the vLLM plugin and
its kernels serve it unchanged. What changes is what the quantizer sees: a random Hadamard
rotation spreads every outlier channel over all channels, so group scales fit the weights
more tightly (measured in README, "Rotations").

llmcompressor's SpinQuantModifier supplies the pieces (its architecture mappings and norm
fold, compressed-tensors' random-Hadamard transforms in float64). Three things differ:

- No embedding centering. SpinQuant's reference code subtracts each embedding's mean, which
  is an identity only before a LayerNorm; before an RMSNorm it changes the model (KL 0.006 on
  a probe sentence through the reference model, more than its 8-bit quantization's error;
  the SpinQuant authors' issue #14 reports the same).
- The rotated model is checked against the original on a probe sequence, and a KL above
  max_kl stops the run, naming the architecture: a model with Llama's module names but
  LayerNorms (StableLM) would otherwise quantize a broken model. (Names that do not match
  stop earlier, in llmcompressor's own matching.)
- The fold and the fusion are applied here, in `_rotate`, by one rank under torchrun.

Put it first in a recipe: the quantizers after it collect their Hessians in the rotated
basis.

YAML:
    quant_stage:
      quant_modifiers:
        RotationModifier: {}
        SLQModifier: {target_bpp: 4.0}
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
from compressed_tensors import match_named_modules
from compressed_tensors.distributed import is_distributed, is_source_process
from compressed_tensors.offload import align_module_device, get_execution_device, update_offload_parameter
from compressed_tensors.transform import TransformFactory, TransformLocation
from llmcompressor.core import Event, State
from llmcompressor.modifiers.transform import SpinQuantModifier
from llmcompressor.utils import untie_word_embeddings
from loguru import logger
from pydantic import PrivateAttr, field_validator

__all__ = ["RotationError", "RotationModifier"]


class RotationError(RuntimeError):
    """The rotated model does not compute what the original did."""


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(get_execution_device(model))).logits.float().log_softmax(-1).cpu()


class RotationModifier(SpinQuantModifier):
    # rotations: SpinQuant's default, R1 and R2, the two it can fuse into weights
    # compressed-tensors' deterministic "hadamard" needs powers of two; the random one
    # factors any size with a known Hadamard block (576 = 36 x 16)
    transform_type: Literal["hadamard", "random-hadamard", "random-matrix"] = "random-hadamard"
    # mean KL(original || rotated) per probe token above which the rotation is refused:
    # a fused rotation costs ~1e-8 in fp32 and ~1e-6 in fp16 weights, a wrong mapping > 1e-2
    max_kl: float = 1e-3
    probe_tokens: int = 64
    _function_kl: Optional[float] = PrivateAttr(default=None)

    @field_validator("rotations", mode="after")
    @classmethod
    def _fused_only(cls, value):
        online = [str(r) for r in value if str(r) not in ("R1", "R2")]
        if online:
            raise ValueError(f"RotationModifier.rotations: {online} rotate activations at inference, which the "
                             f"checkpoint format and the plugin do not carry; R1 and R2 are fused into the weights")
        return value

    @property
    def function_kl(self) -> Optional[float]:
        """The measured KL(original || rotated) per probe token, once rotated."""
        return self._function_kl

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        model = state.model
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(vocab, (1, self.probe_tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = _log_probs(model, ids)
            self._rotate(model)
            after = _log_probs(model, ids)
        kl = float((before.exp() * (before - after)).sum(-1).mean())
        arch = type(model).__name__
        if not kl <= self.max_kl:
            raise RotationError(f"RotationModifier: the rotated {arch} differs from the original, mean KL "
                                f"{kl:.3g} over {self.probe_tokens} probe tokens (max_kl {self.max_kl:g}); "
                                f"its module names or norm placement are not the pre-norm layout "
                                f"SpinQuant's mappings describe")
        logger.info(f"RotationModifier: {arch} rotated ({', '.join(self.rotations)}, {self.transform_type}); "
                    f"KL to the original {kl:.2e} on {self.probe_tokens} probe tokens")
        self._function_kl = kl

    @torch.no_grad()
    def _rotate(self, model: torch.nn.Module) -> None:
        """SpinQuant's fold and fusion, written once. Under torchrun llmcompressor keeps the
        weights in CPU memory shared by the ranks, and every update is a read-modify-write
        (W <- W R): done by each rank, it would be applied once per rank (measured: the probe KL
        0.03 with two ranks). So one rank rotates and the others wait; untying re-registers the
        embeddings, which the shared cache does collectively, so every rank unties."""
        untie_word_embeddings(model)
        if is_source_process():
            self._fuse_norms(model)
            for name, scheme in self.transform_config.config_groups.items():
                factory = TransformFactory.from_scheme(scheme, name=name)
                for args in scheme.apply:
                    for _, module in match_named_modules(model, args.targets, args.ignore):
                        transform = factory.create_transform(module, args)
                        with align_module_device(module):
                            update_offload_parameter(module, "weight", transform(module.weight))
                            # y R = (W x + b) R: an output rotation turns the bias too
                            if args.location == TransformLocation.WEIGHT_OUTPUT and getattr(module, "bias", None) is not None:
                                update_offload_parameter(module, "bias", transform(module.bias[:, None])[:, 0])
        if is_distributed():
            dist.barrier()
