"""RotationModifier through llmcompressor's real oneshot: the rotated model computes what the
original did, its lm_head is untied, its norms are folded; a layout SpinQuant's mappings do not
describe is refused by name; and the upstream embedding centering it leaves out does change an
RMSNorm model (the reason it is left out)."""
import pytest
import torch

pytest.importorskip("llmcompressor")

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.core import reset_session  # noqa: E402
from llmcompressor.modifiers.transform import SpinQuantModifier  # noqa: E402

from vllm_slq.modifiers import RotationModifier  # noqa: E402
from vllm_slq.modifiers.rotation import RotationError  # noqa: E402
from vllm_slq.testing import tiny_llama  # noqa: E402

pytestmark = pytest.mark.llmcompressor


def _loaded(model, path):
    """oneshot reads the model's config again from where it was loaded: save, then load."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path, dtype=torch.float32).eval()


def _model_with_trained_looking_norms(path, tied: bool):
    """The tiny Llama with norm weights away from 1 (folding them is the point) and an
    embedding whose rows have non-zero means (what centering would change)."""
    model = tiny_llama(seed=3, hidden=64, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        model.model.embed_tokens.weight.add_(0.05 * torch.randn(model.config.vocab_size, 1, generator=gen))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model = _loaded(model, path)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.fixture(autouse=True)
def _fresh_session():
    reset_session()
    yield
    reset_session()


@pytest.mark.parametrize("tied", [True, False])
def test_rotated_model_computes_the_same_function(tied, tmp_path):
    model = _model_with_trained_looking_norms(tmp_path, tied)
    ids = torch.randint(model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rotation = RotationModifier()
    model = oneshot(model=model, recipe=[rotation], pipeline="datafree")

    out = _logits(model, ids)
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item()), (out - ref).abs().max()
    assert rotation.function_kl is not None and rotation.function_kl < 1e-6
    # the weights did change: every q_proj input channel now mixes all of them
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q - q_before).abs().max() > 0.1 * q_before.abs().max()
    # norms folded into the Linears that read them; lm_head its own tensor
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    # fused: plain Linears, no transform submodules left for a loader to trip on
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))


def test_upstream_centering_changes_an_rmsnorm_model(tmp_path):
    """What RotationModifier._center_embeddings leaves out: SpinQuantModifier as shipped
    changes the model's outputs (its embedding centering), RotationModifier does not."""
    ids = torch.randint(512, (1, 24), generator=torch.Generator().manual_seed(0))
    base = _model_with_trained_looking_norms(tmp_path / "a", tied=False)
    ref = _logits(base, ids).log_softmax(-1)
    upstream = oneshot(model=base, recipe=[SpinQuantModifier(rotations=["R1", "R2"],
                                                             transform_type="random-hadamard")],
                       pipeline="datafree")
    lp = _logits(upstream, ids).log_softmax(-1)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kl > 1e-6, kl
    reset_session()
    ours = oneshot(model=_model_with_trained_looking_norms(tmp_path / "b", tied=False), recipe=[RotationModifier()],
                   pipeline="datafree")
    lp = _logits(ours, ids).log_softmax(-1)
    assert (ref.exp() * (ref - lp)).sum(-1).mean().item() < 1e-6


def test_a_layout_the_mappings_do_not_describe_is_refused_by_name(tmp_path):
    """StableLM has Llama's module names but LayerNorms (mean subtracted, with a bias), which no
    rotation commutes with: SpinQuant's default mappings fold and rotate it as if it were Llama,
    and the probe catches the changed function instead of quantizing it. (Architectures whose
    names differ stop earlier, in llmcompressor's own matching.)"""
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(0)
    cfg = StableLmConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = StableLmForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm." in name:
                p.normal_(0.5 if name.endswith("weight") else 0, 0.5)
    model = _loaded(model, tmp_path)
    with pytest.raises(RotationError, match=r"StableLmForCausalLM.*mean KL"):
        oneshot(model=model, recipe=[RotationModifier()], pipeline="datafree")


def test_rotated_recipe_parses_with_the_rotation_first():
    from pathlib import Path

    from llmcompressor.recipe import Recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    mods = list(Recipe.create_instance(str(root / "slq_bpp_rotated.yaml")).modifiers)
    assert [type(m).__name__ for m in mods] == ["RotationModifier", "SLQModifier"]
    assert list(mods[0].rotations) == ["R1", "R2"] and mods[0].transform_type == "random-hadamard"
    assert mods[1].target_bpp == 4.0


def test_online_rotations_are_refused_when_the_recipe_is_built():
    with pytest.raises(ValueError, match=r"R4.*R1 and R2 are fused"):
        RotationModifier(rotations=["R1", "R4"])
